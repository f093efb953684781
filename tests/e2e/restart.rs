//! Restarts: the detector resumes from its cookie (nothing lost, nothing
//! re-read), and the IDM keeps its state.

use idsync_bus::{Bus, names};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detector_restart_loses_nothing_and_reloads_nothing() {
    let mut env = start().await;
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    env.user_where("will", "synced", |u| links_to(u, "acme"))
        .await;
    let jack = env
        .user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    let before = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    assert_eq!(
        before, 3,
        "one event per entry: jack, will and the crew group"
    );

    env.deployment.stop_service("detector").await.unwrap();
    let source = &env.deployment.source;
    set_cn(source, "jack", "cpt. Jack Sparrow").await;
    add_person(source, "elizabeth", "Elizabeth", "Swann").await;
    delete_person(source, "will").await;
    env.deployment.start_service("detector").unwrap();

    env.user_where("jack", "renamed", |u| {
        u.first("fullName") == Some("cpt. Jack Sparrow")
    })
    .await;
    env.user_where("elizabeth", "created", |u| links_to(u, "acme"))
        .await;
    env.user_gone("will").await;
    env.target_where("cn=will,o=Acme", "deleted", |e| e.is_none())
        .await;
    env.target_where("cn=jack,o=Acme", "cn follows", |e| {
        e.is_some_and(|e| e["cn"].contains("cpt. Jack Sparrow"))
    })
    .await;
    // Exactly the three account changes: the resumed session re-read nothing
    // else. (The groups' session may name out-of-scope entries as deleted,
    // which RFC 4533 allows; such tombstones are of type group and change
    // nothing, as jack's unchanged id shows.)
    let after = bus
        .peek(names::CHANGES_STREAM, before + 1, 100)
        .await
        .unwrap();
    let accounts: Vec<_> = after
        .iter()
        .map(|m| {
            <idsync_proto::v1::ChangeEvent as prost::Message>::decode(m.payload.as_ref()).unwrap()
        })
        .filter(|e| e.object_type == idsync_proto::v1::ObjectType::Account as i32)
        .collect();
    assert_eq!(
        accounts.len(),
        3,
        "account events after the restart: {accounts:#?}"
    );
    let jack_after = env.user_where("jack", "exists", |_| true).await;
    assert_eq!(
        jack_after.id, jack.id,
        "jack is the same user, never deleted and re-created"
    );
    let users = env.idm.all_focus("user").await.unwrap();
    let mut names: Vec<_> = users.iter().filter_map(|u| u.first("name")).collect();
    names.sort_unstable();
    assert_eq!(names, ["elizabeth", "jack"], "no duplicate, no leftover");

    // The IDM keeps its state over a restart.
    env.deployment.stop_service("idm").await.unwrap();
    env.deployment.start_service("idm").unwrap();
    env.user_where("elizabeth", "still there after an IDM restart", |u| {
        links_to(u, "hr")
    })
    .await;
    env.deployment.shutdown().await.unwrap();
}

/// Without a session log, a resumed refresh lists what is still there (the
/// present phase); the detector publishes the deletion of everything else the
/// IDM holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_while_away_are_found_by_the_present_phase() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let deployment = idsync::dev::Deployment::start_with_options(
        dir.path(),
        idsync::dev::EXAMPLE_CONFIG,
        idsync::dev::Options {
            source_session_log: idsync::dev::SessionLog(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut env = Env::from(deployment, dir);
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    add_person(&env.deployment.source, "anna", "Anna", "Bell").await;
    env.user_where("will", "synced", |u| links_to(u, "acme"))
        .await;
    env.user_where("anna", "synced", |u| links_to(u, "acme"))
        .await;

    env.deployment.stop_service("detector").await.unwrap();
    delete_person(&env.deployment.source, "will").await;
    set_cn(&env.deployment.source, "jack", "cpt. Jack Sparrow").await;
    env.deployment.start_service("detector").unwrap();

    env.user_gone("will").await;
    env.target_where("cn=will,o=Acme", "deleted", |e| e.is_none())
        .await;
    env.user_where("jack", "renamed", |u| {
        u.first("fullName") == Some("cpt. Jack Sparrow")
    })
    .await;
    let users = env.idm.all_focus("user").await.unwrap();
    let mut names: Vec<_> = users.iter().filter_map(|u| u.first("name")).collect();
    names.sort_unstable();
    assert_eq!(names, ["anna", "jack"], "only will is gone");
    let groups = env.idm.all_focus("group").await.unwrap();
    assert_eq!(groups.len(), 1, "the crew group is still there");
    env.deployment.shutdown().await.unwrap();
}

/// The source directory goes away during live sync and comes back: the
/// detector reconnects with backoff and resumes from its cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restart_during_live_sync_is_survived_without_a_reload() {
    let mut env = start().await;
    for i in 0..20 {
        add_person(
            &env.deployment.source,
            &format!("p{i}"),
            "P",
            &format!("Person{i}"),
        )
        .await;
    }
    env.user_where("p19", "synced", |u| links_to(u, "hr")).await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    let before = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();

    env.deployment.source.stop().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    env.deployment.source.restart().await.unwrap();
    set_cn(&env.deployment.source, "jack", "cpt. Jack Sparrow").await;
    env.user_where("jack", "renamed after the restart", |u| {
        u.first("fullName") == Some("cpt. Jack Sparrow")
    })
    .await;
    let after = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    assert!(
        after - before <= 3,
        "{} events after the restart: the 22 entries were read again",
        after - before
    );
    env.deployment.shutdown().await.unwrap();
}

/// A cookie the source cannot resume from (here one from the future, as after
/// the source is restored from a backup: OpenLDAP answers "consumer state is
/// newer than provider", as it answers others with e-syncRefreshRequired)
/// ends in a full refresh, and the pipeline converges: what was deleted
/// meanwhile is deleted, nothing else is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_the_source_cannot_resume_from_ends_in_a_full_refresh() {
    let mut env = start().await;
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    let jack = env
        .user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    env.user_where("will", "synced", |u| links_to(u, "acme"))
        .await;

    env.deployment.stop_service("detector").await.unwrap();
    delete_person(&env.deployment.source, "will").await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    bus.store_cookie(
        "hr",
        b"rid=000,csn=29990101000000.000000Z#000000#000#000000",
    )
    .await
    .unwrap();
    env.deployment.start_service("detector").unwrap();

    env.user_gone("will").await;
    let jack_after = env.user_where("jack", "still there", |_| true).await;
    assert_eq!(jack_after.id, jack.id, "jack kept, not re-created");
    env.deployment.shutdown().await.unwrap();
}
