//! The source as the truth: its people read in one search, the IDM's users
//! and the target's accounts read the same way, and every way they differ,
//! with the evidence a failing test prints.

use std::collections::{BTreeMap, BTreeSet};

use idsync::dev::{PEOPLE, TARGET_SUFFIX};
use idsync_bus::{Bus, names};
use idsync_core::model::Focus;

use tokio::time::Instant;

use super::{Env, Replicas, text};

/// The checks read thousands of entries: two polls a second are enough.
pub const POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// A person as the source holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub cn: String,
    pub sn: String,
}

/// The account's DN on acme, lower case as [`accounts`] keys it.
pub fn account_dn(name: &str) -> String {
    format!("cn={name},{TARGET_SUFFIX}").to_ascii_lowercase()
}

/// The source's people (uid → person and entryUUID), from one search.
pub async fn source_people(env: &Env) -> BTreeMap<String, (Person, String)> {
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
pub async fn users(env: &Env) -> Result<BTreeMap<String, Focus>, String> {
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
pub struct Account {
    pub cn: BTreeSet<String>,
    pub sn: Vec<String>,
}

/// Every account on acme (DN in lower case), from one search.
pub async fn accounts(env: &Env) -> Result<BTreeMap<String, Account>, String> {
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

/// A durable consumer's state as the server reports it.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerState {
    /// Every message of the stream up to this sequence is acknowledged.
    pub ack_floor: u64,
    /// Messages not delivered yet.
    pub pending: u64,
    /// Delivered but not acknowledged (retries waiting out their backoff included).
    pub unacked: u64,
}

/// The state of `durable` on `stream`, from the JetStream API.
pub async fn consumer_state(
    bus: &Bus,
    stream: &str,
    durable: &str,
) -> Result<ConsumerState, String> {
    let subject = format!("$JS.API.CONSUMER.INFO.{stream}.{durable}");
    let reply = bus
        .client()
        .request(subject, "".into())
        .await
        .map_err(|e| e.to_string())?;
    let info: serde_json::Value =
        serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
    match (
        info["ack_floor"]["stream_seq"].as_u64(),
        info["num_pending"].as_u64(),
        info["num_ack_pending"].as_u64(),
    ) {
        (Some(ack_floor), Some(pending), Some(unacked)) => Ok(ConsumerState {
            ack_floor,
            pending,
            unacked,
        }),
        _ => Err(format!("unexpected consumer info: {info}")),
    }
}

/// Messages a durable consumer has not delivered yet, and those delivered
/// but not acknowledged (retries waiting out their backoff included).
pub async fn backlog(bus: &Bus, stream: &str, durable: &str) -> Result<(u64, u64), String> {
    let c = consumer_state(bus, stream, durable).await?;
    Ok((c.pending, c.unacked))
}

/// The backlog of the three scaled services' consumers.
pub async fn backlogs(bus: &Bus) -> Result<Vec<(&'static str, u64, u64)>, String> {
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
pub struct Difference {
    /// The person's uid (the user's name, the account's RDN).
    pub name: String,
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.name, self.kind, self.detail)
    }
}

/// How the IDM and the target differ from the source; empty when they are equal.
pub fn differences(
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
pub async fn evidence(
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
    for &name in &names {
        out += &format!("\n== {name}: source {:?}\n", truth.get(name));
        let user = env.user(name).await;
        out += &format!("user: {user:#?}\n");
        let source_dn = format!("uid={name},{PEOPLE}").to_ascii_lowercase();
        // By UUID too: a tombstone from a deletion that named only the UUID has no DN.
        let uuid = truth.get(name).map(|(_, uuid)| uuid.as_str());
        for s in hr.iter().filter(|s| {
            s.dn.to_ascii_lowercase() == source_dn || Some(s.entry_uuid.as_str()) == uuid
        }) {
            out += &format!(
                "hr shadow {}: {:?}, dn {:?}, situation {}, dead {}, position {}, version {}, focus {:?}, candidates {:?}\n",
                s.entry_uuid,
                s.object_type,
                s.dn,
                s.situation,
                s.dead,
                s.position,
                s.version,
                s.focus_id,
                s.candidates
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
    out += &decisions_naming(bus, replicas, truth, &names).await;
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
    out += &keep_logs(env, replicas);
    out
}

/// The decisions stored for each of `people`'s source entries (by DN or by
/// entryUUID: a deletion may name only the UUID), in stream
/// order, with the applier's log lines about each: whether a lost change
/// was never decided, decided but never stored, or stored but never applied.
async fn decisions_naming(
    bus: &Bus,
    replicas: &Replicas,
    truth: &BTreeMap<String, (Person, String)>,
    people: &BTreeSet<&str>,
) -> String {
    use prost::Message as _;
    let stored = match bus.peek(names::DECISIONS_STREAM, 1, usize::MAX).await {
        Ok(s) => s,
        Err(e) => return format!("\ndecisions stream unreadable: {e}\n"),
    };
    let mut out = format!(
        "\n{} decisions stored; applier consumer: {}\n",
        stored.len(),
        consumer_info(bus, names::DECISIONS_STREAM, &names::applier_durable("hr")).await
    );
    for name in people {
        let dn = format!("uid={name},{PEOPLE}").to_ascii_lowercase();
        out += &format!("decisions of {dn}:\n");
        for m in &stored {
            let Ok(d) = idsync_proto::v1::Decision::decode(m.payload.as_ref()) else {
                continue;
            };
            let Some(c) = d.change.as_ref() else {
                continue;
            };
            let uuid = truth.get(*name).map(|(_, uuid)| uuid.as_str());
            if c.dn.to_ascii_lowercase() != dn && Some(c.entry_uuid.as_str()) != uuid {
                continue;
            }
            out += &format!(
                "  decision seq {} (change seq {}, {:?} of a {:?}, dn {:?}): situation {:?} reaction {:?} failure {:?}\n",
                m.stream_seq,
                d.change_seq,
                c.kind(),
                c.object_type(),
                c.dn,
                d.situation,
                d.reaction,
                d.failure
            );
            let lines = replicas.grep(&format!(
                "stream=\"{}\" seq={} ",
                names::DECISIONS_STREAM,
                m.stream_seq
            ));
            for line in lines.lines() {
                out += &format!("    {line}\n");
            }
        }
    }
    out
}

/// The whole consumer info of `durable` on `stream`, as the server sends it.
async fn consumer_info(bus: &Bus, stream: &str, durable: &str) -> String {
    let subject = format!("$JS.API.CONSUMER.INFO.{stream}.{durable}");
    match bus.client().request(subject, "".into()).await {
        Ok(reply) => String::from_utf8_lossy(&reply.payload).into_owned(),
        Err(e) => format!("(consumer info of {durable} on {stream}: {e})"),
    }
}

/// Copies the replicas' logs and the NATS server's log out of the test's
/// temporary directory, which is removed when the failing test unwinds, to
/// a directory under the target dir that stays; returns a line naming it.
fn keep_logs(env: &Env, replicas: &Replicas) -> String {
    let Some(name) = env.d.dir.file_name() else {
        return String::new();
    };
    let kept = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("failed")
        .join(name);
    let copy = || -> std::io::Result<()> {
        std::fs::create_dir_all(&kept)?;
        for entry in std::fs::read_dir(&replicas.logs)?.flatten() {
            std::fs::copy(entry.path(), kept.join(entry.file_name()))?;
        }
        let nats_log = env.d.nats.dir().join("nats-server.log");
        if nats_log.exists() {
            std::fs::copy(nats_log, kept.join("nats-server.log"))?;
        }
        Ok(())
    };
    match copy() {
        Ok(()) => format!("\nlogs kept in {}\n", kept.display()),
        Err(e) => format!("\nlogs not kept in {}: {e}\n", kept.display()),
    }
}

/// Waits until the IDM and the target equal `truth` and every consumer has
/// acknowledged everything, checking that no replica exited on its own and
/// the agreement did not halt; returns how long it took. The IDM and the
/// target are read whole only while every consumer is idle, so that
/// thousands of reads do not slow the pipeline they wait for. Panics with
/// the evidence when `deadline` passes, or when every consumer has been
/// idle for `stuck` while something still differs (a change was lost:
/// retries and redeliveries count as unacknowledged, so they are not idle).
pub async fn settle(
    env: &Env,
    bus: &Bus,
    replicas: &mut Replicas,
    truth: &BTreeMap<String, (Person, String)>,
    deadline: Instant,
    stuck: std::time::Duration,
) -> std::time::Duration {
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(POLL).await;
        replicas.assert_running();
        let Ok(agreement) = env.admin.get_agreement("hr").await else {
            continue;
        };
        if agreement.halted {
            let at: Vec<String> = agreement
                .last_error
                .iter()
                .filter_map(|e| e.dn.strip_prefix("uid=")?.split(',').next())
                .map(str::to_owned)
                .collect();
            panic!(
                "agreement hr halted: {:?}\n{}",
                agreement.last_error,
                evidence(env, bus, replicas, truth, &[], &at).await
            );
        }
        let Ok(backlogs) = backlogs(bus).await else {
            continue;
        };
        let idle = backlogs.iter().all(|(_, p, u)| *p == 0 && *u == 0);
        let now = Instant::now();
        if !idle {
            idle_since = None;
            if now < deadline {
                continue;
            }
        }
        let (Ok(users), Ok(accounts)) = (users(env).await, accounts(env).await) else {
            continue;
        };
        let problems = differences(truth, &users, &accounts);
        if problems.is_empty() && idle {
            return started.elapsed();
        }
        let is_stuck = idle && now.duration_since(*idle_since.get_or_insert(now)) >= stuck;
        if is_stuck || now >= deadline {
            panic!(
                "{} {:?} into the settling; backlogs {backlogs:?}\n{}",
                if is_stuck {
                    "every consumer idle, yet the IDM or the target differs from the source"
                } else {
                    "not settled"
                },
                started.elapsed(),
                evidence(env, bus, replicas, truth, &problems, &[]).await
            );
        }
    }
}

/// After [`settle`]: one live hr shadow per source entry, owned by its
/// person's user; one linked acme shadow per account, none pending;
/// `dead_letters` messages in `IDSYNC_DEAD`; nothing parked in
/// provisioning but the provisioner's dead letters; no open case.
pub async fn assert_settled(
    env: &Env,
    bus: &Bus,
    truth: &BTreeMap<String, (Person, String)>,
    dead_letters: u64,
) {
    let users = users(env).await.unwrap();
    assert_eq!(users.len(), truth.len(), "one user per person");
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
        // The situation its last change was found in: unmatched (then
        // add_focus) or unlinked (then link) for a person added and not
        // changed since, linked after that; owned either way.
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
    if live != uuids {
        let missing: Vec<_> = uuids.difference(&live).take(5).collect();
        let extra: Vec<_> = live.difference(&uuids).take(5).collect();
        panic!(
            "{} live hr shadows for {} source entries; e.g. missing {missing:?}, extra {extra:?}",
            live.len(),
            uuids.len()
        );
    }
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
    assert_eq!(
        bus.stream_messages(names::DEAD_STREAM).await.unwrap(),
        dead_letters,
        "dead letters: {:?}",
        dead_letter_reasons(bus).await
    );
    // The provisioner's dead letters are what `provisioning parked` lists.
    let provisioner_dead = dead_letter_reasons(bus)
        .await
        .iter()
        .filter(|(service, _)| service == "provisioner")
        .count();
    let parked = env.ok(&["provisioning", "parked"]).await;
    if provisioner_dead == 0 {
        assert_eq!(parked.trim(), "no parked provisioning");
    } else {
        let listed = parked
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .count();
        assert_eq!(listed, provisioner_dead, "{parked}");
    }
    let cases = env.ok(&["cases", "list"]).await;
    assert_eq!(cases.trim(), "no open cases");
}

/// Every dead letter as (service, reason).
pub async fn dead_letter_reasons(bus: &Bus) -> Vec<(String, String)> {
    use prost::Message as _;
    bus.peek(names::DEAD_STREAM, 1, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|m| {
            let d = idsync_proto::v1::DeadLetter::decode(m.payload.as_ref()).unwrap();
            (d.service, d.reason)
        })
        .collect()
}
