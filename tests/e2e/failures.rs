//! Outages and misdelivery: nothing is lost while a server is down, and
//! duplicates or old events change nothing.

use std::time::Duration;

use idsync_bus::{Bus, names};

use crate::support::*;

async fn dead_letters(bus: &Bus) -> u64 {
    bus.stream_messages(names::DEAD_STREAM).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_the_idm_is_down_is_applied_when_it_returns() {
    let mut env = start().await;
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    env.deployment.stop_service("idm").await.unwrap();

    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    // The correlator keeps retrying; give it a few rounds against the closed port.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        env.idm.find_focus("user", "name", "will").await.is_err(),
        "the IDM is down"
    );

    env.deployment.start_service("idm").unwrap();
    env.user_where("will", "synced after the IDM came back", |u| {
        links_to(u, "acme")
    })
    .await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    assert_eq!(
        dead_letters(&bus).await,
        0,
        "an outage is not a poison message"
    );
    env.deployment.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_created_when_the_target_returns() {
    let mut env = start().await;
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    env.deployment.target.stop().await.unwrap();

    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    let will = env
        .user_where("will", "in the IDM while acme is down", |u| {
            links_to(u, "hr")
        })
        .await;
    assert!(!links_to(&will, "acme"));
    tokio::time::sleep(Duration::from_millis(1000)).await;

    env.deployment.target.restart().await.unwrap();
    env.user_where("will", "linked to acme once it is back", |u| {
        links_to(u, "acme")
    })
    .await;
    env.target_where("cn=will,o=Acme", "created", |e| e.is_some())
        .await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    assert_eq!(
        dead_letters(&bus).await,
        0,
        "an outage is not a poison message"
    );
    env.deployment.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_old_events_change_nothing() {
    let env = start().await;
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    let first = bus
        .peek(names::CHANGES_STREAM, 1, 1)
        .await
        .unwrap()
        .remove(0);

    set_cn(&env.deployment.source, "jack", "cpt. Jack Sparrow").await;
    env.user_where("jack", "renamed", |u| {
        u.first("fullName") == Some("cpt. Jack Sparrow")
    })
    .await;
    let before = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();

    // The same event again, with its own id: de-duplicated by the stream.
    let event =
        <idsync_proto::v1::ChangeEvent as prost::Message>::decode(first.payload.as_ref()).unwrap();
    let again = bus
        .publish_and_wait(&first.subject, &event.event_id, first.payload.clone())
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        bus.stream_messages(names::CHANGES_STREAM).await.unwrap(),
        before
    );

    // The old state published again under a new id (a replay gone wrong): it
    // gets a new position, but its CSN is older than the shadow's.
    bus.publish_and_wait(&first.subject, "replayed-old-jack", first.payload.clone())
        .await
        .unwrap();
    // A later change to another entry: once it is through, so is the old event.
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    env.user_where("will", "synced", |u| links_to(u, "acme"))
        .await;
    let jack = env.user_where("jack", "exists", |_| true).await;
    assert_eq!(
        jack.first("fullName"),
        Some("cpt. Jack Sparrow"),
        "the old state must not come back"
    );
    env.target_where("cn=jack,o=Acme", "keeps the new cn", |e| {
        e.is_some_and(|e| e["cn"].contains("cpt. Jack Sparrow"))
    })
    .await;
    assert_eq!(dead_letters(&bus).await, 0);
    env.deployment.shutdown().await.unwrap();
}
