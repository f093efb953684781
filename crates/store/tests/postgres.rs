//! The PostgreSQL store as several IDM replicas see it: migrations at start,
//! concurrent commits through two stores over one database, revocation seen
//! across replicas, and the failures a network database adds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Barrier};

use idsync_proto::v1;
use idsync_proto::v1::operation::Op;
use idsync_store::{SCHEMA_VERSION, Store, StoreError, Writer};
use idsync_testkit::Postgres;

fn database() -> (String, String) {
    let url = Postgres::shared().unwrap().create_database().unwrap();
    let name = url.rsplit('/').next().unwrap().to_owned();
    (url, name)
}

fn user(id: &str, name: &str, counter: u64) -> v1::Focus {
    v1::Focus {
        id: id.into(),
        kind: "user".into(),
        attributes: [
            (
                "name".to_owned(),
                v1::Values {
                    values: vec![name.into()],
                },
            ),
            (
                "counter".to_owned(),
                v1::Values {
                    values: vec![counter.to_string()],
                },
            ),
        ]
        .into(),
        ..Default::default()
    }
}

fn put(f: v1::Focus, expected: u64) -> Vec<v1::Operation> {
    vec![v1::Operation {
        op: Some(Op::PutFocus(v1::PutFocus {
            focus: Some(f),
            expected_version: expected,
        })),
    }]
}

fn counter(f: &v1::Focus) -> u64 {
    f.attributes["counter"].values[0].parse().unwrap()
}

#[test]
fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let pg = Postgres::shared().unwrap();
    let (url, db) = database();
    let first = Store::open_postgres(&url).unwrap();
    let versions = || {
        pg.psql(
            &db,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
        )
        .unwrap()
    };
    let all: Vec<String> = (1..=SCHEMA_VERSION).map(|v| v.to_string()).collect();
    assert_eq!(versions(), all.join(","));
    // A second start (another replica, a restart) applies nothing and
    // shares the instance.
    let second = Store::open_postgres(&url).unwrap();
    assert_eq!(versions(), all.join(","));
    assert_eq!(first.instance(), second.instance());

    let future = SCHEMA_VERSION + 1;
    pg.psql(
        &db,
        &format!("INSERT INTO schema_migrations (version) VALUES ({future})"),
    )
    .unwrap();
    let err = Store::open_postgres(&url).unwrap_err().to_string();
    assert!(
        err.contains(&format!("version {future}")) && err.contains("newer"),
        "{err}"
    );
    assert!(!err.contains(pg.password()), "{err}");
}

#[test]
fn two_replicas_starting_together_migrate_once() {
    let (url, db) = database();
    let barrier = Arc::new(Barrier::new(4));
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Store::open_postgres(&url).map(|s| s.instance())
            })
        })
        .collect();
    let instances: Vec<u64> = starts
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    assert!(instances.windows(2).all(|w| w[0] == w[1]), "{instances:?}");
    let pg = Postgres::shared().unwrap();
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM schema_migrations")
            .unwrap(),
        SCHEMA_VERSION.to_string()
    );
}

#[test]
fn two_replicas_commit_concurrently_without_lost_updates_or_duplicate_names() {
    let (url, _) = database();
    let a = Store::open_postgres(&url).unwrap();
    let b = Store::open_postgres(&url).unwrap();
    assert_eq!(a.instance(), b.instance());
    a.commit(&put(user("f1", "jack", 0), 0), "", &Writer::admin())
        .unwrap();

    // Both read version 1; the second writer is told it lost.
    let seen_by_b = b.get_focus("f1").unwrap().unwrap();
    a.commit(&put(user("f1", "jack", 1), 1), "", &Writer::admin())
        .unwrap();
    let err = b
        .commit(
            &put(user("f1", "jack", counter(&seen_by_b) + 1), 1),
            "",
            &Writer::admin(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{err}"
    );

    // Read, increment, commit with the version read; retry on conflict.
    const EACH: u64 = 40;
    let barrier = Arc::new(Barrier::new(2));
    let workers: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|s| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut conflicts = 0;
                for _ in 0..EACH {
                    loop {
                        let f = s.get_focus("f1").unwrap().unwrap();
                        let next = user("f1", "jack", counter(&f) + 1);
                        match s.commit(&put(next, f.version), "", &Writer::admin()) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let f = a.get_focus("f1").unwrap().unwrap();
    assert_eq!(counter(&f), 1 + 2 * EACH, "an update was lost");
    assert_eq!(f.version, 2 + 2 * EACH);
    eprintln!("conflicts reported under contention: {conflicts}");

    // One name, two creators on two replicas at once: exactly one wins.
    for round in 0..10 {
        let name = format!("will{round}");
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [(a.clone(), "x"), (b.clone(), "y")]
            .into_iter()
            .map(|(s, side)| {
                let (barrier, name) = (barrier.clone(), name.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    s.commit(
                        &put(user(&format!("{side}{round}"), &name, 0), 0),
                        "",
                        &Writer::admin(),
                    )
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(StoreError::NameTaken { .. }))),
            "{results:?}"
        );
        assert_eq!(b.find_focus("user", "name", &name).unwrap().len(), 1);
    }

    // Every commit of either replica got its own outbox position, in order.
    let outbox = b.outbox_batch(10_000).unwrap();
    let seqs: Vec<u64> = outbox.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs.len() as u64, 2 + 2 * EACH + 10);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // Either replica removes what was published; removing again is harmless.
    a.outbox_remove_through(seqs[9]).unwrap();
    b.outbox_remove_through(seqs[9]).unwrap();
    assert_eq!(b.outbox_batch(10_000).unwrap().len(), seqs.len() - 10);
}

#[test]
fn a_token_revoked_through_one_replica_is_refused_by_the_other() {
    let (url, _) = database();
    let a = Store::open_postgres(&url).unwrap();
    let b = Store::open_postgres(&url).unwrap();
    a.create_agreement("hr").unwrap();
    let (token, _) = a.generate_token("hr", "applier").unwrap();
    let (other, _) = a.generate_token("hr", "correlator").unwrap();
    // B verifies (and remembers) both; a token issued by A verifies on B:
    // the signing key is the database's, not the process's.
    assert!(b.authenticate(&token).is_ok());
    assert!(b.authenticate(&other).is_ok());
    a.destroy_token("hr", Some("applier")).unwrap();
    let err = b.authenticate(&token).unwrap_err().to_string();
    assert!(err.contains("revoked"), "{err}");
    assert!(
        b.authenticate(&other).is_ok(),
        "only the one token is revoked"
    );
    a.finalise_agreement("hr").unwrap();
    assert!(b.authenticate(&other).is_err());
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    let err = Store::open_postgres(&format!(
        "postgresql://idsync:hunter2-secret@127.0.0.1:{}/idsync",
        idsync_testkit::CLOSED_PORT
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{}", idsync_testkit::CLOSED_PORT)),
        "{err}"
    );
    assert!(!err.contains("hunter2-secret"), "{err}");

    let pg = Postgres::shared().unwrap();
    let (_, db) = database();
    let wrong = format!(
        "postgresql://postgres:not-the-password-42@127.0.0.1:{}/{db}",
        pg.port()
    );
    let err = Store::open_postgres(&wrong).unwrap_err().to_string();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        !err.contains("not-the-password-42") && !err.contains(pg.password()),
        "{err}"
    );
    let err = Store::open_postgres("postgresql://idsync:p4ss@host:port/x")
        .unwrap_err()
        .to_string();
    assert!(!err.contains("p4ss"), "{err}");
}

#[test]
fn commits_fail_as_unavailable_while_the_database_is_down_and_succeed_after() {
    let mut pg = Postgres::start().unwrap();
    let url = pg.create_database().unwrap();
    let s = Store::open_postgres(&url).unwrap();
    s.commit(&put(user("f1", "jack", 0), 0), "", &Writer::admin())
        .unwrap();
    // Several connections in the pool, all of which break.
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || s.get_focus("f1").unwrap())
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }

    pg.stop().unwrap();
    let err = s
        .commit(&put(user("f1", "jack", 1), 1), "", &Writer::admin())
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.to_string().contains(pg.password()), "{err}");
    assert!(matches!(
        s.get_focus("f1").unwrap_err(),
        StoreError::Unavailable(_)
    ));

    pg.restart().unwrap();
    s.commit(&put(user("f1", "jack", 1), 1), "", &Writer::admin())
        .unwrap();
    assert_eq!(s.get_focus("f1").unwrap().unwrap().version, 2);
}
