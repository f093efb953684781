//! Replay for debugging through `idsync events`, on real servers: the events
//! are shown; a simulation (and a comparison of two configurations) prints
//! what would happen and leaves every stream, the IDM and the target exactly
//! as they were; a replay into the pipeline changes nothing that is current.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use idsync::dev::{EXAMPLE_CONFIG, TARGET_SUFFIX};
use idsync_bus::{Bus, names};

mod support;
use support::*;

/// Everything a simulation must leave alone: each stream's last sequence
/// and count, every user and shadow, and the target's entries with their CSNs.
async fn snapshot(env: &Env, bus: &Bus) -> String {
    let mut out = String::new();
    for stream in [
        names::CHANGES_STREAM,
        names::DECISIONS_STREAM,
        names::FOCUS_STREAM,
        names::DEAD_STREAM,
    ] {
        out += &format!(
            "{stream}: {} {}\n",
            bus.last_sequence(stream).await.unwrap(),
            bus.stream_messages(stream).await.unwrap()
        );
    }
    out += &format!("{:?}\n", env.admin.all_focus("user").await.unwrap());
    for r in ["hr", "acme"] {
        out += &format!("{:?}\n", env.admin.all_shadows(r).await.unwrap());
    }
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    let (entries, _) = ldap
        .search(
            TARGET_SUFFIX,
            ldap3::Scope::Subtree,
            "(objectClass=*)",
            vec!["*", "entryCSN"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    let mut entries: Vec<_> = entries
        .into_iter()
        .map(|e| {
            let e = ldap3::SearchEntry::construct(e);
            let attrs: std::collections::BTreeMap<_, _> = e.attrs.into_iter().collect();
            format!("{} {attrs:?}", e.dn)
        })
        .collect();
    entries.sort();
    out += &entries.join("\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_shown_simulated_compared_and_replayed_safely() {
    let env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "provisioned", |u| u.link_to("acme").is_some())
        .await;
    add_person(&env.d.source, "will", "Will Turner").await;
    set_cn(&env.d.source, "jack", "Captain Jack").await;
    env.user_where("jack", "renamed in the IDM", |u| {
        u.first("fullName") == Some("Captain Jack")
    })
    .await;
    env.user_where("will", "provisioned", |u| u.link_to("acme").is_some())
        .await;

    let tail = env.ok(&["events", "tail", "--resource", "hr"]).await;
    assert!(tail.contains("hr upsert uid=will,"), "{tail}");
    let jack_line = tail
        .lines()
        .rfind(|l| l.contains("uid=jack,"))
        .unwrap()
        .to_owned();
    let seq = jack_line.split_whitespace().next().unwrap().to_owned();
    let shown = env.ok(&["events", "show", &seq]).await;
    assert!(shown.contains("cn: Captain Jack"), "{shown}");
    assert!(shown.contains("csn: 20"), "{shown}");
    let missing = env.cli(&["events", "show", "999999"]).await;
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("no change event 999999"),
        "{}",
        text(&missing)
    );

    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let before = snapshot(&env, &bus).await;

    // The simulation: decisions and changes, nothing written.
    let sim = env
        .ok(&[
            "events",
            "replay",
            "--resource",
            "hr",
            "--entry",
            "uid=jack,ou=people,dc=example,dc=com",
        ])
        .await;
    assert!(sim.contains("nothing written"), "{sim}");
    assert!(sim.contains("linked → synchronize"), "{sim}");
    // jack's first event, replayed as new, would take his old name back.
    assert!(sim.contains("idm: "), "{sim}");
    assert!(sim.contains("fullName=Jack Sparrow"), "{sim}");
    assert!(sim.contains("acme: modify cn=jack,o=Acme"), "{sim}");
    let json: serde_json::Value = serde_json::from_str(
        &env.ok(&["events", "replay", "--resource", "hr", "--json"])
            .await,
    )
    .unwrap();
    assert!(json.as_array().unwrap().len() >= 3, "{json}");

    // Two configurations on the same traffic: only will's and jack's
    // accounts would differ, by their description.
    let other = env.d.dir.join("other.toml");
    let current = std::fs::read_to_string(env.d.dir.join("idsync.toml")).unwrap();
    let changed = current.replace("Created by IDM", "Made by idsync");
    assert_ne!(changed, current);
    std::fs::write(&other, changed).unwrap();
    let diff = env
        .ok(&[
            "events",
            "replay",
            "--resource",
            "hr",
            "--from-seq",
            &seq,
            "--against",
            other.to_str().unwrap(),
        ])
        .await;
    assert!(diff.contains("1 differ with"), "{diff}");
    assert!(
        diff.contains("against:   acme: modify cn=jack,o=Acme: description=Made by idsync"),
        "{diff}"
    );

    assert_eq!(
        snapshot(&env, &bus).await,
        before,
        "a simulation wrote something"
    );

    // Into the pipeline: every event is older than what the IDM holds, so
    // nothing changes but the change stream, which has them again.
    let changes_before = bus.last_sequence(names::CHANGES_STREAM).await.unwrap();
    let jack = env.user("jack").await.unwrap();
    let out = env
        .ok(&["events", "replay", "--resource", "hr", "--into-pipeline"])
        .await;
    let n: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(n >= 3, "{out}");
    assert_eq!(
        bus.last_sequence(names::CHANGES_STREAM).await.unwrap(),
        changes_before + n
    );
    // A new change after them: once it is applied, the replayed events
    // ahead of it in the same stream have been handled too.
    set_cn(&env.d.source, "jack", "Captain Jack Sparrow").await;
    let after = env
        .user_where("jack", "the newest change applied", |u| {
            u.first("fullName") == Some("Captain Jack Sparrow")
        })
        .await;
    assert_eq!(
        after.version,
        jack.version + 1,
        "only the new change: no replayed event was applied"
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}
