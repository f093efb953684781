//! Horizontal scaling, on real servers and real processes: three replicas
//! each of the correlator, the applier and the provisioner (`idsync serve`,
//! as their own binaries run them) share the durable consumers while 10,000
//! source changes go through: 2,000 people added, then bursts of rapid
//! successive modifications of one entry, modifications followed at once by
//! a deletion, deletions followed at once by the same uid added again (a new
//! entryUUID), and new people modified right after they were added — from
//! four LDAP connections at once. Meanwhile replicas are killed (SIGKILL)
//! and one is stopped (SIGTERM), each replaced a moment later. Afterwards
//! the IDM and the target equal the source: one user per person with its
//! last values and a link to its current entry, no user whose person is gone
//! (hr's `deleted` reaction deletes it), one account per user, nothing parked
//! and nothing left in any consumer.
//!
//! When it fails, the panic message carries the evidence: each kind of
//! difference counted, and for the first entries of each kind the source,
//! the user, the shadows, the entry's change events and the replicas' log
//! lines about it. `IDSYNC_SCALING_LOG=info` makes the replicas log every
//! decision and commit (they log warnings only by default);
//! `IDSYNC_SCALING_ON_ERROR=quarantine` lets the run go on past an entry
//! that would halt the agreement, to show what else differs.
//!
//! Two small tests at the end reproduce, with one replica of each service,
//! what the scaled run found: the correlator decides on a change before the
//! applier has applied the changes before it, so a deletion of an entry whose
//! shadow the applier has not made yet is dropped, and an "unmatched"
//! decision is applied after another entry's user took the name.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idsync::dev::{EXAMPLE_CONFIG, PEOPLE, TARGET_SUFFIX};
use idsync_bus::{Bus, names};
use idsync_core::model::Focus;
use tokio::time::Instant;

mod support;
use support::*;

/// Replicas of each scaled service.
const REPLICAS: usize = 3;
const SCALED: [&str; 3] = ["correlator", "applier", "provisioner"];
/// People added first (each add is one of the changes).
const SEEDED: usize = 2_000;
/// Source changes in all: the seeding's adds and what follows.
const CHANGES: usize = 10_000;
/// LDAP connections writing at once, each on its own people.
const WRITERS: usize = 4;
/// Longest pause of a writer between two bursts.
const PAUSE_MS: u64 = 8;
/// The checks read thousands of entries: two polls a second are enough.
const POLL: Duration = Duration::from_millis(500);
/// How long the pipeline may take to settle after the last change.
const SETTLE: Duration = Duration::from_secs(300);
/// Every consumer idle this long while the IDM or the target still differs
/// from the source: a change was lost (retries and redeliveries of killed
/// replicas' messages count as unacknowledged, so they are not idle).
const STUCK: Duration = Duration::from_secs(30);

/// How a replica is stopped during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill,
    Term,
}

/// Debugging only: `IDSYNC_SCALING_ON_ERROR=quarantine` runs hr with that
/// failure policy instead of halting at the first failed entry, to see what
/// lies behind it (the test still fails on any parked message or difference).
fn config() -> String {
    match std::env::var("IDSYNC_SCALING_ON_ERROR") {
        Ok(policy) => {
            EXAMPLE_CONFIG.replace("on_error = \"halt\"", &format!("on_error = \"{policy}\""))
        }
        Err(_) => EXAMPLE_CONFIG.to_owned(),
    }
}

/// When (seconds after the changes start), which replica, and how. The
/// writers are done in about 15 s; the replicas work through their backlog
/// for a minute or more after that, so every stop hits replicas at work
/// (the backlogs at each stop are printed).
const CHAOS: [(u64, &str, usize, Stop); 6] = [
    (3, "correlator", 0, Stop::Kill),
    (10, "applier", 1, Stop::Kill),
    (17, "provisioner", 2, Stop::Kill),
    (24, "correlator", 2, Stop::Term),
    (31, "applier", 0, Stop::Kill),
    (38, "provisioner", 0, Stop::Kill),
];

/// A person as the source holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Person {
    cn: String,
    sn: String,
}

/// A small deterministic generator (xorshift64*), so a failing run can be
/// repeated with the same writes.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        usize::try_from(x >> 33).unwrap() % n
    }
}

fn seeded_uid(i: usize) -> String {
    format!("p{i:04}")
}

/// The account's DN on acme, lower case as [`accounts`] keys it.
fn account_dn(name: &str) -> String {
    format!("cn={name},{TARGET_SUFFIX}").to_ascii_lowercase()
}

/// One LDAP connection writing to its own people, and what it wrote.
struct Writer {
    id: usize,
    ldap: ldap3::Ldap,
    rng: Rng,
    /// Each of its people as last written (`None`: deleted).
    people: BTreeMap<String, Option<Person>>,
    /// Values are numbered so that an older one is never taken for the last.
    serial: usize,
    newcomers: usize,
    /// Changes written, and the limit.
    written: usize,
    budget: usize,
    /// Changes written by every writer since the seeding.
    progress: Arc<AtomicUsize>,
    /// When it wrote its last change.
    finished: Option<Instant>,
}

impl Writer {
    fn has_budget(&self) -> bool {
        self.written < self.budget
    }

    fn written_one(&mut self) {
        self.written += 1;
        self.finished = Some(Instant::now());
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    fn fresh(&mut self, uid: &str) -> Person {
        self.serial += 1;
        Person {
            cn: format!("Person {uid} r{}", self.serial),
            sn: format!("Family{}", self.serial),
        }
    }

    async fn add(&mut self, uid: &str) {
        let p = self.fresh(uid);
        let attrs = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([uid])),
            ("cn", HashSet::from([p.cn.as_str()])),
            ("sn", HashSet::from([p.sn.as_str()])),
            ("givenName", HashSet::from(["Person"])),
        ];
        self.ldap
            .add(&format!("uid={uid},{PEOPLE}"), attrs)
            .await
            .unwrap()
            .success()
            .unwrap();
        self.people.insert(uid.to_owned(), Some(p));
        self.written_one();
    }

    /// A new cn, and now and then a new sn with it.
    async fn modify(&mut self, uid: &str) {
        let fresh = self.fresh(uid);
        let mut p = self.people[uid].clone().unwrap();
        p.cn = fresh.cn;
        let mut mods = vec![ldap3::Mod::Replace("cn", HashSet::from([p.cn.as_str()]))];
        if self.rng.below(3) == 0 {
            p.sn = fresh.sn;
            mods.push(ldap3::Mod::Replace("sn", HashSet::from([p.sn.as_str()])));
        }
        self.ldap
            .modify(&format!("uid={uid},{PEOPLE}"), mods)
            .await
            .unwrap()
            .success()
            .unwrap();
        self.people.insert(uid.to_owned(), Some(p));
        self.written_one();
    }

    async fn delete(&mut self, uid: &str) {
        self.ldap
            .delete(&format!("uid={uid},{PEOPLE}"))
            .await
            .unwrap()
            .success()
            .unwrap();
        self.people.insert(uid.to_owned(), None);
        self.written_one();
    }

    /// Up to `n` modifications in a row, as the budget allows.
    async fn modify_times(&mut self, uid: &str, n: usize) {
        for _ in 0..n {
            if !self.has_budget() {
                return;
            }
            self.modify(uid).await;
        }
    }

    /// Adds this writer's share of the first people.
    async fn seed(&mut self) {
        for i in (self.id..SEEDED).step_by(WRITERS) {
            self.add(&seeded_uid(i)).await;
        }
    }

    /// Bursts on one entry at a time until the budget is spent.
    async fn run(&mut self) {
        while self.has_budget() {
            let known: Vec<String> = self.people.keys().cloned().collect();
            let uid = known[self.rng.below(known.len())].clone();
            let roll = self.rng.below(100);
            if self.people[&uid].is_none() {
                // Gone: the same uid comes back as a new entry.
                self.add(&uid).await;
                let n = self.rng.below(4);
                self.modify_times(&uid, n).await;
            } else if roll < 35 {
                let n = 3 + self.rng.below(4);
                self.modify_times(&uid, n).await;
            } else if roll < 55 {
                self.modify(&uid).await;
            } else if roll < 70 {
                let n = 1 + self.rng.below(3);
                self.modify_times(&uid, n).await;
                if self.has_budget() {
                    self.delete(&uid).await;
                }
            } else if roll < 85 {
                self.delete(&uid).await;
                if self.has_budget() {
                    self.add(&uid).await;
                    let n = self.rng.below(3);
                    self.modify_times(&uid, n).await;
                }
            } else {
                self.newcomers += 1;
                let uid = format!("w{}n{:03}", self.id, self.newcomers);
                self.add(&uid).await;
                let n = 1 + self.rng.below(3);
                self.modify_times(&uid, n).await;
            }
            let pause = u64::try_from(self.rng.below(usize::try_from(PAUSE_MS).unwrap() + 1));
            tokio::time::sleep(Duration::from_millis(pause.unwrap())).await;
        }
    }
}

/// One `idsync serve <service>` process.
struct Replica {
    service: &'static str,
    slot: usize,
    generation: usize,
    log: PathBuf,
    child: tokio::process::Child,
}

/// The replicas running now, and those stopped along the way.
struct Replicas {
    config: PathBuf,
    logs: PathBuf,
    live: Vec<Replica>,
    /// Stopped with SIGTERM: they must drain and exit cleanly.
    terminated: Vec<Replica>,
    kills: usize,
    terms: usize,
}

impl Replicas {
    fn new(dir: &Path) -> Self {
        let logs = dir.join("replica-logs");
        std::fs::create_dir_all(&logs).unwrap();
        Self {
            config: dir.join("idsync.toml"),
            logs,
            live: Vec::new(),
            terminated: Vec::new(),
            kills: 0,
            terms: 0,
        }
    }

    fn spawn(&mut self, service: &'static str, slot: usize, generation: usize) {
        let log = self.logs.join(format!("{service}-{slot}.{generation}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
            .args(["serve", service])
            .env("IDSYNC_CONFIG", &self.config)
            .env("RUST_LOG", replica_log_filter())
            .env("NO_COLOR", "1")
            .env("IDSYNC_SHUTDOWN_GRACE_SECONDS", "15")
            .env_remove("IDSYNC_IDM_URL")
            .env_remove("IDSYNC_NATS_URL")
            .env_remove("IDSYNC_HEALTH_BIND")
            .env_remove("IDSYNC_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.live.push(Replica {
            service,
            slot,
            generation,
            log,
            child,
        });
    }

    /// Stops one replica as `how` says, and starts its replacement a moment later.
    async fn stop_and_replace(&mut self, service: &'static str, slot: usize, how: Stop) {
        let i = self
            .live
            .iter()
            .position(|r| r.service == service && r.slot == slot)
            .unwrap();
        let mut r = self.live.remove(i);
        let generation = r.generation + 1;
        match how {
            Stop::Kill => {
                r.child.start_kill().unwrap();
                let status = r.child.wait().await.unwrap();
                assert!(!status.success(), "{service}-{slot} killed: {status}");
                self.kills += 1;
            }
            Stop::Term => {
                signal(&r.child, "TERM").await;
                self.terms += 1;
                self.terminated.push(r);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.spawn(service, slot, generation);
    }

    /// Panics, with its log, when a replica has exited on its own.
    fn assert_running(&mut self) {
        for r in &mut self.live {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!(
                    "{}-{} (generation {}) exited on its own: {status}\n{}",
                    r.service,
                    r.slot,
                    r.generation,
                    tail(&r.log, 40)
                );
            }
        }
    }

    /// Stops every replica with SIGTERM; each must drain and exit with 0.
    async fn shutdown(mut self) {
        for r in &self.live {
            signal(&r.child, "TERM").await;
        }
        let all = self.live.drain(..).chain(self.terminated.drain(..));
        for mut r in all {
            let status = tokio::time::timeout(Duration::from_secs(30), r.child.wait())
                .await
                .unwrap_or_else(|_| panic!("{}-{} did not stop", r.service, r.slot))
                .unwrap();
            assert!(
                status.success(),
                "{}-{} (generation {}) stopped with {status}\n{}",
                r.service,
                r.slot,
                r.generation,
                tail(&r.log, 40)
            );
        }
    }

    /// Every replica log, for the search for secrets.
    fn record_logs(&self) {
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            idsync_testkit::logs::record(&std::fs::read(entry.path()).unwrap());
        }
    }

    /// Every replica log line containing `needle`, in time order, each with
    /// the replica that wrote it.
    fn grep(&self, needle: &str) -> String {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains(needle)) {
                lines.push(format!("{line}  [{name}]"));
            }
        }
        lines.sort();
        lines.join("\n")
    }

    /// The last lines of every replica log.
    fn tails(&self, lines: usize) -> String {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| tail(p, lines))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The replicas' log filter: `warn` keeps the logs small; set
/// `IDSYNC_SCALING_LOG=info` to see every decision and commit when a run fails.
fn replica_log_filter() -> String {
    std::env::var("IDSYNC_SCALING_LOG").unwrap_or_else(|_| "warn".into())
}

async fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let status = tokio::process::Command::new("kill")
        .args([format!("-{name}").as_str(), pid.as_str()])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- {} ({} lines) ---\n{}",
        path.file_name().unwrap().to_string_lossy(),
        all.len(),
        all[from..].join("\n")
    )
}

/// The source's people (uid → person and entryUUID), from one search.
async fn source_people(env: &Env) -> BTreeMap<String, (Person, String)> {
    let mut ldap = env.d.source.admin_conn().await.unwrap();
    let (entries, _) = ldap
        .search(
            PEOPLE,
            ldap3::Scope::Subtree,
            "(objectClass=inetOrgPerson)",
            vec!["uid", "cn", "sn", "entryUUID"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    let one = |e: &ldap3::SearchEntry, a: &str| {
        let v = e.attrs.get(a).unwrap_or_else(|| panic!("{}: no {a}", e.dn));
        assert_eq!(v.len(), 1, "{}: {a} {v:?}", e.dn);
        v[0].clone()
    };
    let mut out = BTreeMap::new();
    for e in entries.into_iter().map(ldap3::SearchEntry::construct) {
        let person = Person {
            cn: one(&e, "cn"),
            sn: one(&e, "sn"),
        };
        let uuid = one(&e, "entryUUID");
        assert!(out.insert(one(&e, "uid"), (person, uuid)).is_none());
    }
    out
}

/// Every user by name; two users of one name fail the test at once.
///
/// The listing reads page by page while the pipeline writes, so a user
/// deleted and made again (a person deleted and added again) can be listed
/// twice, the old one on an early page and the new one on a later page: a
/// name listed twice is read again by id, and only two users that both
/// still exist are a duplicate.
async fn users(env: &Env) -> Result<BTreeMap<String, Focus>, String> {
    let all = env
        .admin
        .all_focus("user")
        .await
        .map_err(|e| e.to_string())?;
    let mut out: BTreeMap<String, Focus> = BTreeMap::new();
    for u in all {
        let name = u.first("name").unwrap_or_default().to_owned();
        let Some(other) = out.insert(name.clone(), u) else {
            continue;
        };
        let mut both = Vec::new();
        for id in [&other.id, &out[&name].id] {
            let now = env.admin.get_focus(id).await.map_err(|e| e.to_string())?;
            both.extend(now.filter(|f| f.first("name") == Some(name.as_str())));
        }
        if both.len() == 2 {
            panic!("two users named {name}: {both:#?}");
        }
        return Err(format!("{name} listed twice while it changed"));
    }
    Ok(out)
}

/// An account on acme.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Account {
    cn: BTreeSet<String>,
    sn: Vec<String>,
}

/// Every account on acme (DN in lower case), from one search.
async fn accounts(env: &Env) -> Result<BTreeMap<String, Account>, String> {
    let mut ldap = env.d.target.admin_conn().await.map_err(|e| e.to_string())?;
    let result = ldap
        .search(
            TARGET_SUFFIX,
            ldap3::Scope::Subtree,
            "(objectClass=inetOrgPerson)",
            vec!["cn", "sn"],
        )
        .await
        .map_err(|e| e.to_string())?;
    let _ = ldap.unbind().await;
    let (entries, _) = result.success().map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for e in entries.into_iter().map(ldap3::SearchEntry::construct) {
        let dn = e.dn.to_ascii_lowercase();
        let account = Account {
            cn: e
                .attrs
                .get("cn")
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            sn: e.attrs.get("sn").cloned().unwrap_or_default(),
        };
        assert!(out.insert(dn.clone(), account).is_none(), "{dn} twice");
    }
    Ok(out)
}

/// Messages a durable consumer has not delivered yet, and those delivered
/// but not acknowledged (retries waiting out their backoff included).
async fn backlog(bus: &Bus, stream: &str, durable: &str) -> Result<(u64, u64), String> {
    let subject = format!("$JS.API.CONSUMER.INFO.{stream}.{durable}");
    let reply = bus
        .client()
        .request(subject, "".into())
        .await
        .map_err(|e| e.to_string())?;
    let info: serde_json::Value =
        serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
    match (
        info["num_pending"].as_u64(),
        info["num_ack_pending"].as_u64(),
    ) {
        (Some(pending), Some(unacked)) => Ok((pending, unacked)),
        _ => Err(format!("unexpected consumer info: {info}")),
    }
}

/// The backlog of the three scaled services' consumers.
async fn backlogs(bus: &Bus) -> Result<Vec<(&'static str, u64, u64)>, String> {
    let applier = names::applier_durable("hr");
    let consumers = [
        ("correlator", names::CHANGES_STREAM, names::CORRELATOR),
        ("applier", names::DECISIONS_STREAM, applier.as_str()),
        ("provisioner", names::FOCUS_STREAM, names::PROVISIONER),
    ];
    let mut out = Vec::new();
    for (service, stream, durable) in consumers {
        let (pending, unacked) = backlog(bus, stream, durable).await?;
        out.push((service, pending, unacked));
    }
    Ok(out)
}

/// One way the IDM or the target differs from the source.
#[derive(Debug)]
struct Difference {
    /// The person's uid (the user's name, the account's RDN).
    name: String,
    kind: &'static str,
    detail: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.name, self.kind, self.detail)
    }
}

/// How the IDM and the target differ from the source; empty when they are equal.
fn differences(
    truth: &BTreeMap<String, (Person, String)>,
    users: &BTreeMap<String, Focus>,
    accounts: &BTreeMap<String, Account>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut differ = |name: &str, kind, detail: String| {
        out.push(Difference {
            name: name.to_owned(),
            kind,
            detail,
        });
    };
    for (uid, (p, uuid)) in truth {
        let wanted = Account {
            cn: BTreeSet::from([uid.clone(), p.cn.clone()]),
            sn: vec![p.sn.clone()],
        };
        match accounts.get(&account_dn(uid)) {
            None => differ(uid, "no account", String::new()),
            Some(a) if *a != wanted => differ(
                uid,
                "account's values differ:",
                format!("{a:?}, not {wanted:?}"),
            ),
            Some(_) => {}
        }
        let Some(u) = users.get(uid) else {
            differ(uid, "no user", String::new());
            continue;
        };
        let (full, family) = (u.first("fullName"), u.first("familyName"));
        if full != Some(p.cn.as_str()) || family != Some(p.sn.as_str()) {
            differ(
                uid,
                "user's values differ:",
                format!("{full:?} {family:?}, not {:?} {:?}", p.cn, p.sn),
            );
        }
        let hr = u.link_to("hr").map(|l| l.entry_uuid.to_ascii_lowercase());
        if hr.as_deref() != Some(uuid.to_ascii_lowercase().as_str()) {
            differ(
                uid,
                "user linked to another hr entry:",
                format!("{hr:?}, not {uuid}"),
            );
        }
        if u.link_to("acme").is_none() {
            differ(uid, "user not linked to acme", String::new());
        }
    }
    for name in users.keys().filter(|n| !truth.contains_key(*n)) {
        differ(name, "user of a person who is gone", String::new());
    }
    let expected: BTreeSet<String> = truth.keys().map(|uid| account_dn(uid)).collect();
    for dn in accounts.keys().filter(|dn| !expected.contains(*dn)) {
        let name = dn.trim_start_matches("cn=").split(',').next().unwrap_or(dn);
        differ(name, "account of a person who is gone", dn.clone());
    }
    out
}

/// What the IDM, the bus and the logs say about the entries that differ:
/// a count of each kind of difference, then the first two entries of each
/// kind (and those in `also`) in full.
async fn evidence(
    env: &Env,
    bus: &Bus,
    replicas: &Replicas,
    truth: &BTreeMap<String, (Person, String)>,
    problems: &[Difference],
    also: &[String],
) -> String {
    let mut kinds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in problems {
        kinds.entry(p.kind).or_default().push(&p.name);
    }
    let mut out = format!("{} differences:\n", problems.len());
    for (kind, names) in &kinds {
        out += &format!(
            "  {} × {kind} (e.g. {:?})\n",
            names.len(),
            &names[..names.len().min(5)]
        );
    }
    for p in problems.iter().take(20) {
        out += &format!("  {p}\n");
    }
    // Users whose provisioning was parked: "… account cn=<name>,o=Acme …".
    let parked = text(&env.cli(&["provisioning", "parked"]).await);
    let parked_names: Vec<&str> = parked
        .split("account cn=")
        .skip(1)
        .filter_map(|rest| rest.split(',').next())
        .take(2)
        .collect();
    let names: BTreeSet<&str> = kinds
        .values()
        .flat_map(|names| names.iter().take(2).copied())
        .chain(also.iter().map(String::as_str))
        .chain(parked_names)
        .collect();
    let hr = env.admin.all_shadows("hr").await.unwrap_or_default();
    let acme = env.admin.all_shadows("acme").await.unwrap_or_default();
    for name in names {
        out += &format!("\n== {name}: source {:?}\n", truth.get(name));
        let user = env.user(name).await;
        out += &format!("user: {user:#?}\n");
        let source_dn = format!("uid={name},{PEOPLE}").to_ascii_lowercase();
        for s in hr.iter().filter(|s| s.dn.to_ascii_lowercase() == source_dn) {
            out += &format!(
                "hr shadow {}: situation {}, dead {}, position {}, version {}, focus {:?}, candidates {:?}\n",
                s.entry_uuid, s.situation, s.dead, s.position, s.version, s.focus_id, s.candidates
            );
        }
        for s in acme
            .iter()
            .filter(|s| s.dn.to_ascii_lowercase() == account_dn(name))
        {
            out += &format!(
                "acme shadow {}: situation {}, dead {}, focus {:?}, pending {:?}\n",
                s.entry_uuid, s.situation, s.dead, s.focus_id, s.pending
            );
        }
        let dn = format!("uid={name},{PEOPLE}");
        // A simulation of the entry's events in order against the IDM as
        // it is now: it lists each event's position and kind.
        let events = env
            .cli(&["events", "replay", "--entry", &dn, "--limit", "100"])
            .await;
        out += &format!("events of {dn} (simulated):\n{}\n", text(&events));
        out += &format!("replica log lines naming {dn}:\n{}\n", replicas.grep(&dn));
        let account = format!("cn={name},{TARGET_SUFFIX}");
        out += &format!(
            "replica log lines naming {account}:\n{}\n",
            replicas.grep(&account)
        );
    }
    let agreement = env.admin.get_agreement("hr").await;
    out += &format!("\nagreement hr: {agreement:?}\n");
    out += &format!("backlogs: {:?}\n", backlogs(bus).await);
    out += &format!(
        "dead letters: {:?}\n",
        bus.stream_messages(names::DEAD_STREAM).await
    );
    out += &text(&env.cli(&["cases", "list"]).await);
    out += &parked;
    out += &replicas.tails(15);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_of_each_service_killed_and_restarted_lose_and_duplicate_nothing() {
    let started = Instant::now();
    let mut env = start(&config()).await;
    // jack (the example's person) is through before the replicas take over.
    env.user_where("jack", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    for service in SCALED {
        env.d.stop_service(service).await.unwrap();
    }
    let mut replicas = Replicas::new(&env.d.dir);
    for service in SCALED {
        for slot in 0..REPLICAS {
            replicas.spawn(service, slot, 0);
        }
    }
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();

    // The seeding: 2,000 adds from four connections.
    let seeding = Instant::now();
    let progress = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for id in 0..WRITERS {
        writers.push(Writer {
            id,
            ldap: env.d.source.admin_conn().await.unwrap(),
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1)),
            people: BTreeMap::new(),
            serial: 0,
            newcomers: 0,
            written: 0,
            budget: (CHANGES - SEEDED) / WRITERS,
            progress: progress.clone(),
            finished: None,
        });
    }
    let tasks: Vec<_> = writers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                w.seed().await;
                w
            })
        })
        .collect();
    let mut writers = Vec::new();
    for t in tasks {
        writers.push(t.await.unwrap());
    }
    progress.store(0, Ordering::Relaxed);
    for w in &mut writers {
        w.written = 0;
    }
    let seeded = eventually_seeded(&env, &mut replicas).await;
    eprintln!(
        "seeding: {SEEDED} people written and provisioned in {:?} ({seeded} users)",
        seeding.elapsed()
    );

    // The bursts, with replicas killed and replaced along the way.
    let changing = Instant::now();
    let tasks: Vec<_> = writers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                w.run().await;
                w
            })
        })
        .collect();
    for (at, service, slot, how) in CHAOS {
        tokio::time::sleep_until(changing + Duration::from_secs(at)).await;
        let written = progress.load(Ordering::Relaxed);
        let backlogs = backlogs(&bus).await.unwrap();
        replicas.stop_and_replace(service, slot, how).await;
        eprintln!(
            "{how:?} {service}-{slot} {at} s into the changes ({written} written); backlogs (service, undelivered, unacknowledged): {backlogs:?}"
        );
    }
    let mut writers = Vec::new();
    for t in tasks {
        writers.push(t.await.unwrap());
    }
    let last_change = writers.iter().filter_map(|w| w.finished).max().unwrap();
    let written: usize = SEEDED + writers.iter().map(|w| w.written).sum::<usize>();
    assert_eq!(written, CHANGES);
    eprintln!(
        "changes: {} written in {:?}",
        CHANGES - SEEDED,
        last_change.duration_since(changing)
    );

    // What the writers wrote is what the source holds; the source is the truth.
    let truth = source_people(&env).await;
    let mut expected: BTreeMap<String, Person> = BTreeMap::from([(
        "jack".to_owned(),
        Person {
            cn: "Jack Sparrow".into(),
            sn: "Sparrow".into(),
        },
    )]);
    for w in &writers {
        for (uid, p) in &w.people {
            if let Some(p) = p {
                expected.insert(uid.clone(), p.clone());
            }
        }
    }
    let held: BTreeMap<String, Person> = truth
        .iter()
        .map(|(uid, (p, _))| (uid.clone(), p.clone()))
        .collect();
    assert_eq!(held, expected, "the source holds what was written");
    let gone = writers
        .iter()
        .flat_map(|w| w.people.values())
        .filter(|p| p.is_none())
        .count();
    eprintln!(
        "the source holds {} people; {gone} uids ended deleted",
        truth.len()
    );

    // The IDM and the target come to equal the source, and every consumer
    // has acknowledged everything.
    let deadline = last_change + SETTLE;
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(POLL).await;
        replicas.assert_running();
        let agreement = env.admin.get_agreement("hr").await.unwrap();
        if agreement.halted {
            // The entry it halted at: uid=<name>,ou=people,…
            let at: Vec<String> = agreement
                .last_error
                .iter()
                .filter_map(|e| e.dn.strip_prefix("uid=")?.split(',').next())
                .map(str::to_owned)
                .collect();
            panic!(
                "agreement hr halted: {:?}\n{}",
                agreement.last_error,
                evidence(&env, &bus, &replicas, &truth, &[], &at).await
            );
        }
        let (Ok(users), Ok(accounts), Ok(backlogs)) = (
            users(&env).await,
            accounts(&env).await,
            backlogs(&bus).await,
        ) else {
            continue;
        };
        let problems = differences(&truth, &users, &accounts);
        let idle = backlogs.iter().all(|(_, p, u)| *p == 0 && *u == 0);
        if problems.is_empty() && idle {
            break;
        }
        let now = Instant::now();
        let stuck = idle && now.duration_since(*idle_since.get_or_insert(now)) >= STUCK;
        if !idle {
            idle_since = None;
        }
        if stuck || now >= deadline {
            panic!(
                "{} {:?} after the last change; backlogs {backlogs:?}\n{}",
                if stuck {
                    "every consumer idle, yet the IDM or the target differs from the source"
                } else {
                    "not settled"
                },
                last_change.elapsed(),
                evidence(&env, &bus, &replicas, &truth, &problems, &[]).await
            );
        }
    }
    let settle = last_change.elapsed();

    // Settled: one live shadow per person on hr, linked to its user; one
    // linked shadow per account on acme, none pending; nothing parked.
    let users = users(&env).await.unwrap();
    assert_eq!(users.len(), truth.len());
    let hr_person_shadows: Vec<_> = env
        .admin
        .all_shadows("hr")
        .await
        .unwrap()
        .into_iter()
        .filter(|s| {
            !s.dead
                && s.dn
                    .to_ascii_lowercase()
                    .ends_with(&PEOPLE.to_ascii_lowercase())
        })
        .collect();
    let mut live = BTreeSet::new();
    for s in &hr_person_shadows {
        // A shadow records the situation its last change was found in:
        // unmatched (then add_focus) or unlinked (then link) for a person
        // added and not changed since, linked after that; owned either way.
        assert!(
            ["linked", "unmatched", "unlinked"].contains(&s.situation.as_str()),
            "{s:?}"
        );
        let owner = s
            .focus_id
            .as_deref()
            .expect("a live hr shadow has an owner");
        let uid = s.attributes.get("uid").and_then(|v| v.first()).unwrap();
        assert_eq!(users.get(uid).map(|u| u.id.as_str()), Some(owner), "{s:?}");
        assert!(live.insert(s.entry_uuid.to_ascii_lowercase()), "{s:?}");
    }
    let uuids: BTreeSet<String> = truth
        .values()
        .map(|(_, uuid)| uuid.to_ascii_lowercase())
        .collect();
    assert_eq!(
        live, uuids,
        "a live hr shadow for exactly the source's entries"
    );
    let acme = env.admin.all_shadows("acme").await.unwrap();
    let acme_live: Vec<_> = acme.iter().filter(|s| !s.dead).collect();
    assert_eq!(acme_live.len(), truth.len(), "one acme shadow per account");
    for s in &acme_live {
        assert_eq!(s.situation, "linked", "{s:?}");
        assert!(s.pending.is_none(), "{s:?}");
        let owner = s.focus_id.as_deref().unwrap();
        let user = users.values().find(|u| u.id == owner).unwrap();
        assert_eq!(
            user.link_to("acme").map(|l| &l.entry_uuid),
            Some(&s.entry_uuid),
            "{s:?}"
        );
    }
    assert_eq!(bus.stream_messages(names::DEAD_STREAM).await.unwrap(), 0);
    let parked = env.ok(&["provisioning", "parked"]).await;
    assert_eq!(parked.trim(), "no parked provisioning");
    let cases = env.ok(&["cases", "list"]).await;
    assert_eq!(cases.trim(), "no open cases");

    let (kills, terms) = (replicas.kills, replicas.terms);
    replicas.record_logs();
    replicas.shutdown().await;
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
    eprintln!(
        "settled {settle:?} after the last change; {kills} replicas killed (SIGKILL) and {terms} stopped (SIGTERM), each replaced; {CHANGES} changes, {} people at the end; done in {:?}",
        truth.len(),
        started.elapsed()
    );
}

/// Waits until every seeded person has a user with an account on acme.
async fn eventually_seeded(env: &Env, replicas: &mut Replicas) -> usize {
    let deadline = Instant::now() + SETTLE;
    loop {
        tokio::time::sleep(POLL).await;
        replicas.assert_running();
        let Ok(users) = users(env).await else {
            continue;
        };
        let linked = users
            .values()
            .filter(|u| u.link_to("acme").is_some())
            .count();
        if linked == SEEDED + 1 {
            return users.len();
        }
        assert!(
            Instant::now() < deadline,
            "{linked} of {} users provisioned\n{}",
            SEEDED + 1,
            replicas.tails(15)
        );
    }
}

// With one replica of each service: the applier behind the correlator.

/// Waits until the correlator has handled `more` change events beyond
/// `before` (the change stream's count) and acknowledged all of them.
async fn correlator_caught_up(bus: &Bus, before: u64, more: u64) {
    idsync_testkit::eventually("the correlator has decided", WAIT, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = bus
            .stream_messages(names::CHANGES_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let backlog = backlog(bus, names::CHANGES_STREAM, names::CORRELATOR).await?;
        Ok((now >= before + more && backlog == (0, 0)).then_some(()))
    })
    .await
    .unwrap();
}

/// One replica of each service: a person added and deleted at once while
/// the applier is behind the correlator (here: stopped until the correlator
/// has decided both changes) is gone from the IDM afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_added_and_deleted_while_the_applier_lags_leaves_no_user() {
    let mut env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let before = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    env.d.stop_service("applier").await.unwrap();
    add_person(&env.d.source, "eve", "Eve Once").await;
    delete_person(&env.d.source, "eve").await;
    correlator_caught_up(&bus, before, 2).await;
    env.d.start_service("applier").unwrap();
    // Positive control: a later change goes through, so the applier is done
    // with eve's changes before the check.
    add_person(&env.d.source, "zed", "Zed Later").await;
    env.user_where("zed", "exists", |_| true).await;
    let eve = env.user("eve").await;
    assert!(eve.is_none(), "eve was deleted at the source: {eve:#?}");
    env.d.shutdown().await.unwrap();
}

/// One replica of each service: a person deleted and added again with the
/// same uid (a new entry) while the applier is behind the correlator ends
/// as one user, linked to the new entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_added_deleted_and_added_again_while_the_applier_lags_is_one_user() {
    let mut env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let before = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    env.d.stop_service("applier").await.unwrap();
    add_person(&env.d.source, "ann", "Ann First").await;
    delete_person(&env.d.source, "ann").await;
    add_person(&env.d.source, "ann", "Ann Second").await;
    correlator_caught_up(&bus, before, 3).await;
    env.d.start_service("applier").unwrap();
    add_person(&env.d.source, "zed", "Zed Later").await;
    let waited = idsync_testkit::eventually("zed exists", WAIT, || async {
        let a = env
            .admin
            .get_agreement("hr")
            .await
            .map_err(|e| e.to_string())?;
        if a.halted {
            return Ok(Some(Err(a.last_error)));
        }
        Ok(env.user("zed").await.map(Ok))
    })
    .await
    .unwrap();
    let halted = waited.err();
    assert!(halted.is_none(), "agreement hr halted: {halted:?}");
    let ann = env.user("ann").await.unwrap();
    assert_eq!(ann.first("fullName"), Some("Ann Second"), "{ann:#?}");
    env.d.shutdown().await.unwrap();
}
