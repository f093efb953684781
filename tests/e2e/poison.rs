//! Bad messages on the bus go to the dead-letter stream with their reason,
//! and the pipeline carries on.

use idsync_bus::{Bus, names};
use idsync_proto::v1;
use idsync_testkit::eventually;
use prost::Message;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_unknown_resource_events_are_parked() {
    let env = start().await;
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    let subject = names::change_subject("hr");
    bus.publish_and_wait(
        &subject,
        "garbage-1",
        bytes::Bytes::from_static(b"\xff\x00not protobuf"),
    )
    .await
    .unwrap();
    let stranger = v1::ChangeEvent {
        schema_version: idsync_proto::SCHEMA_VERSION,
        event_id: "x".into(),
        resource: "nowhere".into(),
        entry_uuid: "00000000-0000-0000-0000-000000000001".into(),
        dn: "uid=x".into(),
        kind: v1::ChangeKind::Upsert as i32,
        ..Default::default()
    };
    bus.publish_and_wait(&subject, "stranger-1", stranger.encode_to_vec().into())
        .await
        .unwrap();

    // The pipeline goes on with good changes.
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    env.user_where("will", "synced after the bad messages", |u| {
        links_to(u, "acme")
    })
    .await;

    let reasons = eventually("two dead letters", WAIT, || {
        let bus = bus.clone();
        async move {
            let stored = bus
                .peek(names::DEAD_STREAM, 1, 100)
                .await
                .map_err(|e| e.to_string())?;
            let reasons: Vec<String> = stored
                .iter()
                .map(|m| v1::DeadLetter::decode(m.payload.as_ref()).unwrap().reason)
                .collect();
            Ok((reasons.len() >= 2).then_some(reasons))
        }
    })
    .await
    .unwrap();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("not a ChangeEvent")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("\"nowhere\" is not in the configuration")),
        "{reasons:?}"
    );
    env.deployment.shutdown().await.unwrap();
}
