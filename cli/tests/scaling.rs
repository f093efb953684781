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

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idsync::dev::{EXAMPLE_CONFIG, PEOPLE};
use idsync_bus::{Bus, names};
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

fn seeded_uid(i: usize) -> String {
    format!("p{i:04}")
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
    // has acknowledged everything; then one live shadow per person on hr,
    // linked to its user, one linked shadow per account on acme, none
    // pending, nothing parked.
    settle(
        &env,
        &bus,
        &mut replicas,
        &truth,
        last_change + SETTLE,
        STUCK,
    )
    .await;
    let settled = last_change.elapsed();
    assert_settled(&env, &bus, &truth, 0).await;

    let (kills, terms) = (replicas.kills, replicas.terms);
    replicas.record_logs();
    replicas.shutdown().await;
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
    eprintln!(
        "settled {settled:?} after the last change; {kills} replicas killed (SIGKILL) and {terms} stopped (SIGTERM), each replaced; {CHANGES} changes, {} people at the end; done in {:?}",
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
