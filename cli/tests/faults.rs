//! Fault injection (issue 8), on real servers and real processes: the five
//! services run as `idsync serve <service>` processes, so a SIGKILL is a
//! real one, while imports go through.
//!
//! - every service killed (SIGKILL) in turn in the middle of a 10,000-entry
//!   import (loaded into the source offline, before the services start), and
//!   restarted;
//! - NATS down for 15 s and started again on its file store, the target
//!   directory and the IDM each down for a while, during one import written
//!   over LDAP with modifications and deletions; the source directory
//!   restarted during another, and an entry deleted while the detector is
//!   away before its add is applied;
//! - an account made on the target but not recorded (the add's reply lost
//!   as the target stopped) for a user deleted before the add was retried;
//! - bus messages delivered twice and out of order on each of the three
//!   streams, and poison messages (undecodable, another schema version, a
//!   valid event for an unknown resource) on each, during an import.
//!
//! Each test ends with the IDM and the target compared with the source entry
//! by entry: one user per person with its values and a link to its entry,
//! one account per user, no user or account of anyone else, every consumer
//! idle, nothing parked in provisioning, no open case, and the dead-letter
//! stream holding exactly the poisoned messages. A failure prints what
//! differs (each kind counted, with examples), the shadows and events of
//! the first entries, and the processes' logs (`IDSYNC_SCALING_LOG=info`
//! makes the processes log every decision and commit).
//!
//! What these tests found, fixed: a resumed session's present phase was
//! compared with the IDM's shadows while an entry's add was still in the
//! pipeline, so its deletion was lost (the detector now waits for the
//! pipeline first); another session's tombstone made an add stale (a user
//! never made) or hid a deletion, and the two sessions' tombstones of one
//! deleted person overwrote each other; an HTTP/2 error from the IDM restarting
//! halted the agreement as if the IDM had refused the call; an account whose
//! add committed while its reply was lost to a target outage stayed behind
//! when its user was deleted before the retry.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use idsync::dev::{EXAMPLE_CONFIG, Options, PEOPLE, SERVICES};
use idsync_bus::{Bus, names};
use idsync_proto::v1;
use prost::Message as _;
use tokio::time::Instant;

mod support;
use support::*;

/// How long an import may take to settle after the last change or fault: a
/// safety net on a loaded machine; a lost change shows as [`STUCK`] sooner.
const SETTLE: Duration = Duration::from_secs(600);
/// Every consumer idle this long while something still differs: lost.
const STUCK: Duration = Duration::from_secs(45);

/// The example with the correlator and the applier at 64 messages at once:
/// the applier's commits go to the IDM in batches, so a kill lands in the
/// middle of one.
fn batched() -> String {
    format!("{EXAMPLE_CONFIG}\n[workers]\ninbound_concurrency = 64\n")
}

/// The five services as processes, the IDM first (the others retry until it
/// answers, but a known order keeps the logs readable).
async fn spawn_services(env: &Env) -> Replicas {
    let mut replicas = Replicas::new(&env.d.dir);
    for service in SERVICES {
        replicas.spawn(service, 0, 0);
        if service == "idm" {
            idm_answers(env).await;
        }
    }
    replicas
}

async fn idm_answers(env: &Env) {
    idsync_testkit::eventually("the IDM answers", WAIT, || async {
        Ok(env.admin.get_agreement("hr").await.ok().map(|_| ()))
    })
    .await
    .unwrap();
}

/// A durable consumer's state: `ack_floor.stream_seq` (every message of the
/// stream up to it is acknowledged) and its backlog (undelivered plus
/// unacknowledged).
async fn consumer(bus: &Bus, stream: &str, durable: &str) -> Result<(u64, u64), String> {
    let c = consumer_state(bus, stream, durable).await?;
    Ok((c.ack_floor, c.pending + c.unacked))
}

/// How far the import has come, as the bus shows it.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Change events stored (the detector's work).
    changes: u64,
    /// Acknowledged through, and backlog, of each worker's consumer.
    correlated: (u64, u64),
    applied: (u64, u64),
    provisioned: (u64, u64),
}

impl Progress {
    async fn read(bus: &Bus) -> Result<Self, String> {
        let applier = names::applier_durable("hr");
        Ok(Self {
            changes: bus
                .stream_messages(names::CHANGES_STREAM)
                .await
                .map_err(|e| e.to_string())?,
            correlated: consumer(bus, names::CHANGES_STREAM, names::CORRELATOR).await?,
            applied: consumer(bus, names::DECISIONS_STREAM, &applier).await?,
            provisioned: consumer(bus, names::FOCUS_STREAM, names::PROVISIONER).await?,
        })
    }
}

/// Waits until `reached` holds for the import's progress (polled every 50 ms).
async fn when(bus: &Bus, what: &str, reached: impl Fn(&Progress) -> bool) -> Progress {
    let reached = &reached;
    idsync_testkit::eventually(what, SETTLE, || async move {
        let p = Progress::read(bus).await?;
        Ok(reached(&p).then_some(p))
    })
    .await
    .unwrap()
}

/// People for the offline seed: `p00000`… with a cn and sn of their own.
fn people_ldif(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "dn: uid=p{i:05},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: p{i:05}\n\
                 cn: Person {i:05}\nsn: Family{i}\ngivenName: Person\n\n"
            )
        })
        .collect()
}

const IMPORT: usize = 10_000;

/// Each service SIGKILLed in turn while a 10,000-entry import goes through
/// it, restarted a second later: the detector during its first refresh (no
/// cookie stored yet, so it starts over), the correlator, the applier and
/// the IDM while decisions are being applied, the provisioner while accounts
/// are being created. Every kill is checked to have hit the service with
/// work still ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_killed_in_a_10000_entry_import_loses_and_duplicates_nothing() {
    let started = Instant::now();
    let env = start_with_options(
        &batched(),
        Options {
            source_seed_extra: Some(people_ldif(IMPORT)),
            services_elsewhere: true,
            ..Options::default()
        },
    )
    .await;
    let truth = source_people(&env).await;
    assert_eq!(truth.len(), IMPORT + 1, "the seed and jack");
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let mut replicas = spawn_services(&env).await;
    let import = Instant::now();

    // Change events: the import's people, jack and the crew group.
    let events = u64::try_from(IMPORT).unwrap() + 2;
    type Reached = fn(&Progress) -> bool;
    let plan: [(&'static str, &str, Reached); 5] = [
        ("detector", "2,000 change events stored", |p| {
            p.changes >= 2_000
        }),
        ("correlator", "2,500 changes correlated", |p| {
            p.correlated.0 >= 2_500
        }),
        // The IDM before the applier: with batched commits the applier,
        // once restarted, catches up faster than the correlator feeds it.
        ("idm", "1,500 decisions applied", |p| p.applied.0 >= 1_500),
        ("applier", "3,000 decisions applied", |p| {
            p.applied.0 >= 3_000
        }),
        ("provisioner", "4,000 focus changes provisioned", |p| {
            p.provisioned.0 >= 4_000
        }),
    ];
    // The kill must land mid-import: work still ahead of the service.
    let ahead_of = |service: &str, p: &Progress| match service {
        "detector" => events.saturating_sub(p.changes),
        "correlator" => p.correlated.1,
        "applier" | "idm" => p.applied.1,
        _ => p.provisioned.1,
    };
    for (service, what, reached) in plan {
        // A worker may catch up with the one before it (restarting) for a
        // moment: the kill waits until it has work in hand again.
        let p = when(&bus, what, |p| reached(p) && ahead_of(service, p) > 0).await;
        replicas.assert_running();
        let ahead = ahead_of(service, &p);
        let generation = replicas.stop(service, 0, Stop::Kill).await;
        eprintln!(
            "SIGKILL {service} {:?} into the import, after {what}: {ahead} messages ahead of it; {p:?}",
            import.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        replicas.spawn(service, 0, generation);
        if service == "idm" {
            idm_answers(&env).await;
        }
    }

    let settle = settle(
        &env,
        &bus,
        &mut replicas,
        &truth,
        Instant::now() + SETTLE,
        STUCK,
    )
    .await;
    assert_settled(&env, &bus, &truth, 0).await;
    // The restarted detector read everything again from no cookie (the
    // first refresh had stored none), under new event ids: those copies
    // were all discarded as stale, or the comparison above would differ.
    let stored = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    eprintln!(
        "{stored} change events stored for {events} entries ({} again after the detector's restart)",
        stored.saturating_sub(events)
    );
    finish(env, replicas).await;
    eprintln!(
        "{IMPORT} entries imported with five services killed in {:?} (settled {settle:?} after the last kill); test took {:?}",
        import.elapsed(),
        started.elapsed()
    );
}

/// Stops the processes (each must exit cleanly on SIGTERM), searches their
/// logs for secrets, and stops the servers.
async fn finish(env: Env, replicas: Replicas) {
    replicas.record_logs();
    replicas.shutdown().await;
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

/// Where the writers connect; the source may be restarted under them.
#[derive(Debug, Clone)]
struct Login {
    url: String,
    dn: String,
    password: String,
}

async fn connect(login: &Login) -> Option<ldap3::Ldap> {
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(&login.url).await.ok()?;
    ldap3::drive!(conn);
    let bound = ldap.simple_bind(&login.dn, &login.password).await.ok()?;
    (bound.rc == 0).then_some(ldap)
}

/// One write to the source.
#[derive(Debug, Clone)]
enum Op {
    Add(String, String),
    Modify(String, String),
    Delete(String),
}

/// LDAP result codes a retried write can meet when its first try had
/// succeeded before the connection broke.
const ENTRY_ALREADY_EXISTS: u32 = 68;
const NO_SUCH_OBJECT: u32 = 32;

/// One LDAP connection adding, modifying and deleting its own people at a
/// steady pace, through a source that may restart meanwhile.
struct Writer {
    id: usize,
    login: Login,
    ldap: Option<ldap3::Ldap>,
    rng: Rng,
    live: Vec<String>,
    added: usize,
    serial: usize,
    /// Writes retried over a new connection.
    retried: usize,
}

impl Writer {
    /// Applies `op`, over a new connection as often as it takes (a directory
    /// restarting drops and refuses connections for a moment); an add that
    /// finds its entry, or a delete that finds it gone, on a retry had
    /// succeeded before the connection broke.
    async fn apply(&mut self, op: &Op) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut first = true;
        loop {
            if !first {
                self.retried += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let retry = !first;
            first = false;
            assert!(
                Instant::now() < deadline,
                "writer {}: {op:?} failed for a minute",
                self.id
            );
            if self.ldap.is_none() {
                self.ldap = connect(&self.login).await;
            }
            let Some(ldap) = self.ldap.as_mut() else {
                continue;
            };
            let result = match op {
                Op::Add(uid, cn) => {
                    let attrs = vec![
                        (
                            "objectClass",
                            std::collections::HashSet::from(["inetOrgPerson"]),
                        ),
                        ("uid", std::collections::HashSet::from([uid.as_str()])),
                        ("cn", std::collections::HashSet::from([cn.as_str()])),
                        ("sn", std::collections::HashSet::from(["Writer"])),
                    ];
                    ldap.add(&format!("uid={uid},{PEOPLE}"), attrs).await
                }
                Op::Modify(uid, cn) => {
                    let mods = vec![ldap3::Mod::Replace(
                        "cn",
                        std::collections::HashSet::from([cn.as_str()]),
                    )];
                    ldap.modify(&format!("uid={uid},{PEOPLE}"), mods).await
                }
                Op::Delete(uid) => ldap.delete(&format!("uid={uid},{PEOPLE}")).await,
            };
            match result {
                Ok(r) if r.rc == 0 => return,
                Ok(r) if retry && r.rc == ENTRY_ALREADY_EXISTS && matches!(op, Op::Add(..)) => {
                    return;
                }
                Ok(r) if retry && r.rc == NO_SUCH_OBJECT && matches!(op, Op::Delete(_)) => return,
                // Busy, unavailable, shutting down: try again on a new connection.
                Ok(_) | Err(_) => self.ldap = None,
            }
        }
    }

    /// `ops` writes, one every `pace`: mostly new people, some modified,
    /// some deleted.
    async fn run(&mut self, ops: usize, pace: Duration) {
        let mut tick = tokio::time::interval(pace);
        for _ in 0..ops {
            tick.tick().await;
            let roll = self.rng.below(100);
            let op = if roll < 70 || self.live.len() < 10 {
                self.added += 1;
                let uid = format!("w{}-{:04}", self.id, self.added);
                self.live.push(uid.clone());
                Op::Add(uid.clone(), format!("Writer {uid}"))
            } else if roll < 90 {
                self.serial += 1;
                let uid = self.live[self.rng.below(self.live.len())].clone();
                Op::Modify(uid.clone(), format!("Writer {uid} r{}", self.serial))
            } else {
                let i = self.rng.below(self.live.len());
                Op::Delete(self.live.swap_remove(i))
            };
            self.apply(&op).await;
        }
    }
}

/// Writers per import over LDAP, and the writes of each.
const WRITERS: usize = 4;
const WRITES: usize = 700;
/// One write per writer every 30 ms: the writes last about 21 s.
const PACE: Duration = Duration::from_millis(30);

fn writers(env: &Env) -> Vec<Writer> {
    let login = Login {
        url: env.d.source.url().to_owned(),
        dn: env.d.source.admin_dn().to_owned(),
        password: env.d.source.admin_password().to_owned(),
    };
    (0..WRITERS)
        .map(|id| Writer {
            id,
            login: login.clone(),
            ldap: None,
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1)),
            live: Vec::new(),
            added: 0,
            serial: 0,
            retried: 0,
        })
        .collect()
}

/// Starts the writers; their handles give them back when they are done.
fn spawn_writers(env: &Env) -> Vec<tokio::task::JoinHandle<Writer>> {
    writers(env)
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                w.run(WRITES, PACE).await;
                w
            })
        })
        .collect()
}

/// Waits for the writers; returns how many writes they retried.
async fn join_writers(tasks: Vec<tokio::task::JoinHandle<Writer>>) -> usize {
    let mut retried = 0;
    for t in tasks {
        retried += t.await.unwrap().retried;
    }
    retried
}

/// A fault during an import written over LDAP, `at` seconds into the writes.
#[derive(Debug, Clone, Copy)]
enum Fault {
    NatsDown(u64),
    NatsUp(u64),
    SourceDown(u64),
    SourceUp(u64),
    TargetDown(u64),
    TargetUp(u64),
    IdmDown(u64),
    IdmUp(u64),
}

impl Fault {
    fn at(self) -> u64 {
        match self {
            Self::NatsDown(s)
            | Self::NatsUp(s)
            | Self::SourceDown(s)
            | Self::SourceUp(s)
            | Self::TargetDown(s)
            | Self::TargetUp(s)
            | Self::IdmDown(s)
            | Self::IdmUp(s) => s,
        }
    }
}

/// 2,800 adds, modifications and deletions written to the source over LDAP
/// from four connections, with `faults` along the way (in time order); then
/// the IDM and the target must come to equal the source, with no service
/// having given up.
async fn import_through(faults: &[Fault]) {
    let started = Instant::now();
    let mut env = start_with_options(
        EXAMPLE_CONFIG,
        Options {
            services_elsewhere: true,
            ..Options::default()
        },
    )
    .await;
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let mut replicas = spawn_services(&env).await;
    env.user_where("jack", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;

    let writing = Instant::now();
    let tasks = spawn_writers(&env);
    let mut idm_generation = 0;
    for fault in faults {
        tokio::time::sleep_until(writing + Duration::from_secs(fault.at())).await;
        // What is under way when the fault comes (unknown while NATS is down).
        let progress = match fault {
            Fault::NatsUp(_) => None,
            _ => Progress::read(&bus).await.ok(),
        };
        match *fault {
            Fault::NatsDown(_) => env.d.nats.stop().await.unwrap(),
            Fault::NatsUp(_) => env.d.nats.restart().await.unwrap(),
            Fault::SourceDown(_) => env.d.source.stop().await.unwrap(),
            Fault::SourceUp(_) => env.d.source.restart().await.unwrap(),
            Fault::TargetDown(_) => env.d.target.stop().await.unwrap(),
            Fault::TargetUp(_) => env.d.target.restart().await.unwrap(),
            Fault::IdmDown(_) => idm_generation = replicas.stop("idm", 0, Stop::Term).await,
            Fault::IdmUp(_) => replicas.spawn("idm", 0, idm_generation),
        }
        eprintln!(
            "{:?} into the writes: {fault:?} done; before it: {progress:?}",
            writing.elapsed()
        );
    }
    let retried = join_writers(tasks).await;
    eprintln!(
        "{:?} into the writes: writes done ({} in all, {retried} retried over a new connection)",
        writing.elapsed(),
        WRITERS * WRITES
    );
    replicas.assert_running();

    let truth = source_people(&env).await;
    let settle = settle(
        &env,
        &bus,
        &mut replicas,
        &truth,
        Instant::now() + SETTLE,
        STUCK,
    )
    .await;
    assert_settled(&env, &bus, &truth, 0).await;
    finish(env, replicas).await;
    eprintln!(
        "{} people at the end; settled {settle:?} after the writes and faults; test took {:?}",
        truth.len(),
        started.elapsed()
    );
}

/// NATS stopped for 15 s — longer than a client's request timeout (10 s),
/// so confirmations of acknowledgements time out meanwhile — and started
/// again on its file store; then the target directory down for 15 s, and
/// the IDM stopped (SIGTERM) for 10 s meanwhile; all while the writes go
/// on. Nothing is lost or duplicated, and no service gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_target_and_idm_outages_in_an_import_lose_and_duplicate_nothing() {
    import_through(&[
        Fault::NatsDown(3),
        Fault::NatsUp(18),
        Fault::TargetDown(20),
        Fault::IdmDown(23),
        Fault::IdmUp(33),
        Fault::TargetUp(35),
    ])
    .await;
}

/// The source directory stopped for 2 s and started again while the writes
/// go on (the writers wait for it), with the IDM down meanwhile, so that
/// the pipeline lags behind the detector as it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restart_in_an_import_loses_and_duplicates_nothing() {
    import_through(&[
        Fault::IdmDown(4),
        Fault::SourceDown(8),
        Fault::SourceUp(10),
        Fault::IdmUp(14),
    ])
    .await;
}

/// The smallest form of what the source restart shows, with the services
/// in-process and no session log at the source (so every resumed session
/// has a present phase, as after a restart): a person added while the
/// applier is stopped (its add is decided, not applied), then deleted while
/// the detector is stopped. The resumed session does not name it, but the
/// IDM has no shadow of it yet, so no deletion is published; the add is
/// applied afterwards and the user stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_deleted_while_the_detector_is_away_before_its_add_is_applied_is_deleted() {
    let mut env = start_with_options(
        EXAMPLE_CONFIG,
        Options {
            source_session_log: idsync::dev::SessionLog(false),
            ..Options::default()
        },
    )
    .await;
    env.user_where("jack", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    env.d.stop_service("applier").await.unwrap();
    let before = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    add_person(&env.d.source, "eve", "Eve Gone").await;
    correlated(&bus, before + 1).await;
    env.d.stop_service("detector").await.unwrap();
    delete_person(&env.d.source, "eve").await;
    env.d.start_service("detector").unwrap();
    // Positive control: a later change is through the detector and the
    // correlator, so the resumed session's refresh is over.
    add_person(&env.d.source, "zed", "Zed Later").await;
    let published = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    correlated(&bus, published.max(before + 2)).await;
    env.d.start_service("applier").unwrap();
    env.user_where("zed", "exists", |_| true).await;
    let gone = idsync_testkit::eventually("eve's user is deleted", WAIT, || async {
        Ok(env.user("eve").await.is_none().then_some(()))
    })
    .await;
    assert!(
        gone.is_ok(),
        "eve was deleted at the source, her user stays: {:#?}",
        env.user("eve").await
    );
    env.d.shutdown().await.unwrap();
}

/// What a target stopped under an add can leave: the account made, the
/// reply lost, so no shadow records it — and the user deleted before the
/// add is tried again. The provisioner, finding the user gone, takes back
/// the account at the DN the user would have had, which no shadow claims;
/// an account there that nobody was given stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_made_but_not_recorded_for_a_user_deleted_meanwhile_is_taken_back() {
    let mut env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    env.d.stop_service("provisioner").await.unwrap();
    add_person(&env.d.source, "eve", "Eve Gone").await;
    env.user_where("eve", "exists", |_| true).await;
    delete_person(&env.d.source, "eve").await;
    idsync_testkit::eventually("eve's user is deleted", WAIT, || async {
        Ok(env.user("eve").await.is_none().then_some(()))
    })
    .await
    .unwrap();
    // The account an add whose reply was lost leaves, and one nobody was given.
    for cn in ["eve", "stranger"] {
        add_target(
            &env,
            &format!("cn={cn},o=Acme"),
            &[
                ("objectClass", &["inetOrgPerson"]),
                ("cn", &[cn]),
                ("sn", &["Account"]),
            ],
        )
        .await;
    }
    env.d.start_service("provisioner").unwrap();
    let gone =
        idsync_testkit::eventually("eve's unrecorded account is taken back", WAIT, || async {
            Ok(target_entry(&env, "cn=eve,o=Acme")
                .await
                .is_none()
                .then_some(()))
        })
        .await;
    assert!(gone.is_ok(), "eve's account stays on acme: {gone:?}");
    assert!(
        target_entry(&env, "cn=stranger,o=Acme").await.is_some(),
        "an account nobody was given is not the provisioner's to remove"
    );
    assert!(target_entry(&env, "cn=jack,o=Acme").await.is_some());
    env.d.shutdown().await.unwrap();
}

/// Waits until the change stream holds at least `events` and the correlator
/// has acknowledged all of them.
async fn correlated(bus: &Bus, events: u64) {
    idsync_testkit::eventually("the correlator has decided", WAIT, || async {
        let now = bus
            .stream_messages(names::CHANGES_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let (_, backlog) = consumer(bus, names::CHANGES_STREAM, names::CORRELATOR).await?;
        Ok((now >= events && backlog == 0).then_some(()))
    })
    .await
    .unwrap();
}

/// The messages of `stream` whose payload `keep` picks (a small stream: one
/// read per message).
async fn stored(
    bus: &Bus,
    stream: &str,
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<idsync_bus::StoredMessage> {
    let last = bus.last_sequence(stream).await.unwrap();
    bus.peek(stream, 1, usize::try_from(last).unwrap())
        .await
        .unwrap()
        .into_iter()
        .filter(|m| keep(m.payload.as_ref()))
        .collect()
}

/// Publishes `payload` to `subject` under message id `id`, and says whether
/// the stream took it as a duplicate.
async fn inject(bus: &Bus, subject: &str, id: &str, payload: Vec<u8>) -> bool {
    bus.publish_and_wait(subject, id, payload.into())
        .await
        .unwrap()
        .duplicate
}

/// While 2,800 writes go through: one person's change events, decisions and
/// focus changes delivered again on each of the three streams — the latest
/// twice (under its own id, which the stream drops, and under a new one),
/// the oldest after the newer ones — and poison on each stream: an
/// undecodable payload on all three, a change event and a decision for a
/// resource the configuration does not have, a focus change of another
/// schema version. The person keeps its last state, nothing else changes,
/// and exactly the six poisoned messages are parked, each with a reason
/// that names what was wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_reordered_and_poisoned_messages_in_an_import_change_nothing() {
    let started = Instant::now();
    let env = start_with_options(
        &batched(),
        Options {
            services_elsewhere: true,
            ..Options::default()
        },
    )
    .await;
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let mut replicas = spawn_services(&env).await;
    add_person(&env.d.source, "ann", "Ann One").await;
    env.user_where("ann", "has an account on acme", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    target_where(&env, "cn=ann,o=Acme", "cn Ann One", |e| {
        values(e, "cn").contains(&"Ann One")
    })
    .await;
    set_cn(&env.d.source, "ann", "Ann Two").await;
    target_where(&env, "cn=ann,o=Acme", "cn Ann Two", |e| {
        values(e, "cn").contains(&"Ann Two")
    })
    .await;
    let ann = env
        .user_where("ann", "is Ann Two", |u| {
            u.first("fullName") == Some("Ann Two")
        })
        .await;

    // Ann's messages so far, oldest first, on each stream.
    let ann_dn = format!("uid=ann,{PEOPLE}");
    let changes = stored(&bus, names::CHANGES_STREAM, |p| {
        v1::ChangeEvent::decode(p).is_ok_and(|e| e.dn == ann_dn)
    })
    .await;
    let decisions = stored(&bus, names::DECISIONS_STREAM, |p| {
        v1::Decision::decode(p).is_ok_and(|d| d.change.is_some_and(|e| e.dn == ann_dn))
    })
    .await;
    let focus = stored(&bus, names::FOCUS_STREAM, |p| {
        v1::FocusChange::decode(p).is_ok_and(|f| f.focus_id == ann.id)
    })
    .await;
    assert_eq!(changes.len(), 2, "ann's add and modification");
    assert_eq!(decisions.len(), 2, "a decision for each");
    assert!(focus.len() >= 2, "{focus:?}");
    let (old_change, new_change) = (&changes[0], &changes[1]);
    let new_event = v1::ChangeEvent::decode(new_change.payload.as_ref()).unwrap();

    let writing = Instant::now();
    let tasks = spawn_writers(&env);
    // Well into the writes, with the services busy.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Twice: under the event's own id the stream drops it; under a new id it
    // is delivered again at a new position, with a CSN that is not newer.
    assert!(
        inject(
            &bus,
            &new_change.subject,
            &new_event.event_id,
            new_change.payload.to_vec()
        )
        .await
    );
    for (m, id) in [
        (new_change, "fault:change-again"),
        (old_change, "fault:old-change"),
        (&decisions[1], "fault:decision-again"),
        (&decisions[0], "fault:old-decision"),
        (&focus[focus.len() - 1], "fault:focus-again"),
        (&focus[0], "fault:old-focus"),
    ] {
        assert!(
            !inject(&bus, &m.subject, id, m.payload.to_vec()).await,
            "{id}"
        );
    }

    // Poison: six messages, two on each stream.
    let garbage = b"\xff\x00not protobuf".to_vec();
    let stranger = v1::ChangeEvent {
        schema_version: idsync_proto::SCHEMA_VERSION,
        event_id: "fault:stranger".into(),
        resource: "nowhere".into(),
        entry_uuid: "00000000-0000-0000-0000-00000000f001".into(),
        dn: format!("uid=stranger,{PEOPLE}"),
        kind: v1::ChangeKind::Upsert as i32,
        ..new_event.clone()
    };
    let stranger_decision = v1::Decision {
        schema_version: idsync_proto::SCHEMA_VERSION,
        change: Some(stranger.clone()),
        change_seq: bus.last_sequence(names::CHANGES_STREAM).await.unwrap() + 1_000_000,
        situation: "unmatched".into(),
        reaction: "add_focus".into(),
        ..Default::default()
    };
    let mut future = v1::FocusChange::decode(focus[focus.len() - 1].payload.as_ref()).unwrap();
    future.schema_version = idsync_proto::SCHEMA_VERSION + 1;
    let poison = [
        (
            names::change_subject("hr"),
            "fault:garbage-change",
            garbage.clone(),
        ),
        (
            names::change_subject("nowhere"),
            "fault:stranger-change",
            stranger.encode_to_vec(),
        ),
        (
            names::decision_subject("hr", "hr"),
            "fault:garbage-decision",
            garbage.clone(),
        ),
        (
            names::decision_subject("hr", "nowhere"),
            "fault:stranger-decision",
            stranger_decision.encode_to_vec(),
        ),
        (
            names::FOCUS_SUBJECT.to_owned(),
            "fault:garbage-focus",
            garbage.clone(),
        ),
        (
            names::FOCUS_SUBJECT.to_owned(),
            "fault:future-focus",
            future.encode_to_vec(),
        ),
    ];
    for (subject, id, payload) in poison {
        assert!(!inject(&bus, &subject, id, payload).await, "{id}");
    }
    eprintln!(
        "{:?} into the writes: 7 copies and 6 poisoned messages published",
        writing.elapsed()
    );

    let retried = join_writers(tasks).await;
    assert_eq!(retried, 0, "the source stayed up");
    let truth = source_people(&env).await;
    assert_eq!(truth["ann"].0.cn, "Ann Two");
    let settle = settle(
        &env,
        &bus,
        &mut replicas,
        &truth,
        Instant::now() + SETTLE,
        STUCK,
    )
    .await;
    assert_settled(&env, &bus, &truth, 6).await;

    // Each poisoned message parked by the service it reached, with a reason
    // naming what was wrong; nothing else parked.
    let mut parked = dead_letter_reasons(&bus).await;
    parked.sort();
    let expected: [(&str, &str); 6] = [
        ("applier", "not a Decision"),
        ("applier", "nowhere"),
        ("correlator", "not a ChangeEvent"),
        ("correlator", "\"nowhere\""),
        ("provisioner", "not a FocusChange"),
        ("provisioner", "schema version"),
    ];
    for (service, needle) in expected {
        assert!(
            parked
                .iter()
                .any(|(s, r)| s == service && r.contains(needle)),
            "no dead letter of {service} saying {needle:?}: {parked:#?}"
        );
    }
    // Ann as last written: neither the old state nor a second copy came back.
    let ann_now = env.user("ann").await.unwrap();
    assert_eq!(ann_now.id, ann.id);
    assert_eq!(ann_now.first("fullName"), Some("Ann Two"));
    finish(env, replicas).await;
    eprintln!(
        "{} people at the end; settled {settle:?} after the writes; test took {:?}",
        truth.len(),
        started.elapsed()
    );
}
