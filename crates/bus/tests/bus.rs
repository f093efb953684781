//! The bus against a real nats-server from the testkit, one server per test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idsync_bus::{Bus, Delivery, names};
use idsync_testkit::{NatsServer, eventually};
use prost::Message as _;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const WAIT: Duration = Duration::from_secs(10);

async fn next_delivery(deliveries: &mut idsync_bus::Deliveries) -> Delivery {
    tokio::time::timeout(WAIT, deliveries.next())
        .await
        .expect("a delivery within the deadline")
        .expect("deliveries still open")
        .expect("a delivery, not an error")
}

/// Acknowledged-pending and pending counts of a durable consumer.
async fn consumer_state(
    bus: &Bus,
    stream: &str,
    durable: &str,
) -> Result<(usize, u64, u64), String> {
    let js = async_nats::jetstream::new(bus.client().clone());
    let info = js
        .get_stream(stream)
        .await
        .map_err(|e| e.to_string())?
        .consumer_info(durable)
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        info.num_ack_pending,
        info.num_pending,
        info.ack_floor.stream_sequence,
    ))
}

#[tokio::test]
async fn same_message_id_is_stored_once() -> TestResult {
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(nats.url()).await?;
    let subject = names::change_subject("ldap1");

    let first = bus
        .publish_and_wait(&subject, "ev-1", Bytes::from_static(b"one"))
        .await?;
    let second = bus
        .publish_and_wait(&subject, "ev-1", Bytes::from_static(b"one again"))
        .await?;

    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.stream_seq, first.stream_seq);
    assert_eq!(bus.stream_messages(names::CHANGES_STREAM).await?, 1);
    Ok(())
}

#[tokio::test]
async fn pipelined_publishes_are_all_stored_in_order() -> TestResult {
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(nats.url()).await?;
    let subject = names::decision_subject("hr", "ldap1");

    let mut pending = Vec::with_capacity(1000);
    for i in 0..1000 {
        let msg_id = format!("decision-{i}");
        pending.push(
            bus.publish(&subject, &msg_id, Bytes::from(msg_id.clone()))
                .await?,
        );
    }
    let mut last = 0;
    for ack in pending {
        let published = ack.wait().await?;
        assert!(!published.duplicate);
        assert!(published.stream_seq > last, "acks out of order");
        last = published.stream_seq;
    }
    assert_eq!(last, 1000);
    assert_eq!(bus.stream_messages(names::DECISIONS_STREAM).await?, 1000);
    Ok(())
}

#[tokio::test]
async fn cookie_round_trip_survives_restart() -> TestResult {
    let mut nats = NatsServer::start().await?;
    let bus = Bus::connect(nats.url()).await?;

    assert_eq!(bus.load_cookie("ldap1").await?, None);
    bus.store_cookie("ldap1", b"rid=001,csn=1").await?;
    bus.store_cookie("ldap1", b"rid=001,csn=2").await?;
    bus.store_cookie("odd name.with/dots", b"other").await?;
    assert_eq!(
        bus.load_cookie("ldap1").await?.as_deref(),
        Some(&b"rid=001,csn=2"[..])
    );
    assert_eq!(
        bus.load_cookie("odd name.with/dots").await?.as_deref(),
        Some(&b"other"[..])
    );
    assert_eq!(bus.load_cookie("odd name").await?, None);

    nats.restart().await?;

    // The existing connection reconnects by itself...
    let cookie = eventually("cookie readable after restart", WAIT, || async {
        bus.load_cookie("ldap1").await.map_err(|e| e.to_string())
    })
    .await?;
    assert_eq!(cookie, b"rid=001,csn=2");
    // ...and a fresh one re-declares everything without losing it.
    let again = Bus::connect(nats.url()).await?;
    assert_eq!(
        again.load_cookie("ldap1").await?.as_deref(),
        Some(&b"rid=001,csn=2"[..])
    );
    Ok(())
}

#[tokio::test]
async fn one_durable_shares_work_and_nak_redelivers() -> TestResult {
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(nats.url()).await?;
    let subject = names::change_subject("ldap1");
    let filter = Some(subject.as_str());
    let mut a = bus
        .consume(names::CHANGES_STREAM, names::CORRELATOR, filter)
        .await?;
    let mut b = bus
        .consume(names::CHANGES_STREAM, names::CORRELATOR, filter)
        .await?;
    // Not matching the filter: never delivered to this durable.
    bus.publish_and_wait(&names::change_subject("other"), "x", Bytes::new())
        .await?;

    const COUNT: u64 = 2000;
    let mut pending = Vec::new();
    for i in 0..COUNT {
        pending.push(
            bus.publish(&subject, &format!("c-{i}"), Bytes::from(i.to_string()))
                .await?,
        );
    }
    for ack in pending {
        ack.wait().await?;
    }

    let mut seen = HashSet::new();
    let (mut by_a, mut by_b) = (0, 0);
    let deadline = Instant::now() + WAIT;
    while (seen.len() as u64) < COUNT {
        assert!(
            Instant::now() < deadline,
            "only {} of {COUNT} delivered",
            seen.len()
        );
        let (delivery, from_a) = tokio::select! {
            d = a.next() => (d, true),
            d = b.next() => (d, false),
        };
        let delivery = delivery.expect("deliveries still open")?;
        assert_eq!(delivery.subject(), subject);
        assert_eq!(delivery.delivered(), 1);
        assert!(
            seen.insert(delivery.stream_seq()),
            "seq {} delivered twice",
            delivery.stream_seq()
        );
        if from_a {
            by_a += 1
        } else {
            by_b += 1
        }
        delivery.ack().await?;
    }
    assert!(by_a > 0 && by_b > 0, "work not shared: a={by_a} b={by_b}");
    eventually("all acknowledged", WAIT, || async {
        let (ack_pending, pending, _) =
            consumer_state(&bus, names::CHANGES_STREAM, names::CORRELATOR).await?;
        Ok((ack_pending == 0 && pending == 0).then_some(()))
    })
    .await?;

    // A nak'd message comes back, to either sharer, after the delay.
    let published = bus
        .publish_and_wait(&subject, "retry-me", Bytes::from_static(b"retry"))
        .await?;
    let first = tokio::select! { d = a.next() => d, d = b.next() => d }.expect("open")?;
    assert_eq!(first.stream_seq(), published.stream_seq);
    first.nak(Duration::from_millis(200)).await?;
    let again = tokio::select! { d = a.next() => d, d = b.next() => d }.expect("open")?;
    assert_eq!(again.stream_seq(), published.stream_seq);
    assert_eq!(again.delivered(), 2);
    assert_eq!(again.payload(), b"retry");
    again.ack().await?;
    Ok(())
}

#[tokio::test]
async fn dead_letter_parks_payload_and_reason_and_terms_original() -> TestResult {
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(nats.url()).await?;
    let subject = names::decision_subject("hr", "ldap1");
    let published = bus
        .publish_and_wait(&subject, "d-1", Bytes::from_static(b"\x00poison"))
        .await?;

    let mut deliveries = bus
        .consume(names::DECISIONS_STREAM, names::APPLIER, None)
        .await?;
    let delivery = next_delivery(&mut deliveries).await;
    assert_eq!(delivery.stream_seq(), published.stream_seq);
    bus.dead_letter(names::APPLIER, delivery, "cannot decode decision")
        .await?;

    assert_eq!(bus.stream_messages(names::DEAD_STREAM).await?, 1);
    let mut dead = bus
        .consume(
            names::DEAD_STREAM,
            "inspector",
            Some(&names::dead_subject(names::APPLIER)),
        )
        .await?;
    let parked = next_delivery(&mut dead).await;
    let record = idsync_proto::v1::DeadLetter::decode(parked.payload())?;
    assert_eq!(record.schema_version, idsync_proto::SCHEMA_VERSION);
    assert_eq!(record.service, names::APPLIER);
    assert_eq!(record.subject, subject);
    assert_eq!(record.stream_seq, published.stream_seq);
    assert_eq!(record.reason, "cannot decode decision");
    assert_eq!(record.payload, b"\x00poison");
    assert!(record.parked_at_ms > 0);
    parked.ack().await?;

    // Terminated: nothing pending or awaiting an ack, the floor moved past it.
    let (ack_pending, pending, floor) =
        consumer_state(&bus, names::DECISIONS_STREAM, names::APPLIER).await?;
    assert_eq!((ack_pending, pending, floor), (0, 0, published.stream_seq));
    Ok(())
}

#[tokio::test]
async fn a_message_too_large_to_park_whole_is_parked_without_its_payload() -> TestResult {
    let dir = tempfile::tempdir()?;
    let nats = NatsServer::start_in_with(dir.path(), "64KB").await?;
    let bus = Bus::connect(nats.url()).await?;
    assert_eq!(bus.max_payload(), 64 * 1024);
    let subject = names::decision_subject("hr", "ldap1");
    let big = Bytes::from(vec![b'x'; 64 * 1024 - 200]);
    let published = bus.publish_and_wait(&subject, "d-big", big).await?;
    let mut deliveries = bus
        .consume(names::DECISIONS_STREAM, names::APPLIER, None)
        .await?;
    let delivery = next_delivery(&mut deliveries).await;
    bus.dead_letter(names::APPLIER, delivery, "cannot decode decision")
        .await?;
    let parked = bus.peek(names::DEAD_STREAM, 1, 10).await?;
    let record = idsync_proto::v1::DeadLetter::decode(parked[0].payload.as_ref())?;
    assert!(record.payload.is_empty());
    assert!(
        record.reason.starts_with("cannot decode decision")
            && record.reason.contains(&format!(
                "message {} of stream {}",
                published.stream_seq,
                names::DECISIONS_STREAM
            )),
        "{}",
        record.reason
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_connects_declare_once() -> TestResult {
    let nats = NatsServer::start().await?;
    let url = nats.url().to_owned();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Bus::connect(&url).await })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let bus = Bus::connect(&url).await?;
    for stream in [
        names::CHANGES_STREAM,
        names::DECISIONS_STREAM,
        names::FOCUS_STREAM,
        names::DEAD_STREAM,
    ] {
        assert_eq!(bus.stream_messages(stream).await?, 0);
    }
    bus.publish_and_wait(names::FOCUS_SUBJECT, "f-1", Bytes::new())
        .await?;
    assert_eq!(bus.stream_messages(names::FOCUS_STREAM).await?, 1);
    Ok(())
}

#[tokio::test]
async fn connect_to_nothing_fails_fast_naming_the_url() -> TestResult {
    let port = idsync_testkit::CLOSED_PORT;
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    let err = Bus::connect(&url).await.expect_err("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(text.contains(&url), "{text}");
    Ok(())
}

#[tokio::test]
async fn unknown_stream_errors_name_it() -> TestResult {
    let nats = NatsServer::start().await?;
    let bus = Bus::connect(nats.url()).await?;
    let err = bus
        .stream_messages("NO_SUCH")
        .await
        .expect_err("no such stream");
    assert!(err.to_string().contains("NO_SUCH"), "{err}");
    let err = bus
        .publish_and_wait("nowhere.at.all", "m-1", Bytes::new())
        .await
        .expect_err("no stream takes the subject");
    assert!(err.to_string().contains("nowhere.at.all"), "{err}");
    Ok(())
}

#[tokio::test]
async fn deliveries_resume_after_a_server_restart() -> TestResult {
    let mut nats = NatsServer::start().await?;
    let bus = Bus::connect(nats.url()).await?;
    let mut deliveries = bus
        .consume(names::FOCUS_STREAM, names::PROVISIONER, None)
        .await?;
    bus.publish_and_wait(names::FOCUS_SUBJECT, "f-1", Bytes::from_static(b"1"))
        .await?;
    next_delivery(&mut deliveries).await.ack().await?;
    // Acknowledgements are not confirmed: wait until the server has this one.
    eventually("the first acknowledged", WAIT, || async {
        let (ack_pending, pending, _) =
            consumer_state(&bus, names::FOCUS_STREAM, names::PROVISIONER).await?;
        Ok((ack_pending == 0 && pending == 0).then_some(()))
    })
    .await?;

    nats.restart().await?;
    eventually("publish accepted after restart", WAIT, || async {
        bus.publish_and_wait(names::FOCUS_SUBJECT, "f-2", Bytes::from_static(b"2"))
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    })
    .await?;

    // Pull errors while the server was away are reported, then delivery goes on.
    let deadline = Instant::now() + Duration::from_secs(40);
    let delivery = loop {
        assert!(Instant::now() < deadline, "no delivery after restart");
        match tokio::time::timeout(Duration::from_secs(40), deliveries.next()).await? {
            Some(Ok(delivery)) => break delivery,
            Some(Err(e)) => eprintln!("pull error while resuming: {e}"),
            None => return Err("deliveries ended".into()),
        }
    };
    assert_eq!(delivery.payload(), b"2");
    delivery.ack().await?;
    Ok(())
}

#[tokio::test]
async fn a_configured_retention_is_applied_and_readers_leave_it_alone() -> TestResult {
    let nats = NatsServer::start().await?;
    let max_age = |name: &'static str| {
        let url = nats.url().to_owned();
        async move {
            let client = async_nats::connect(url).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream(name).await.unwrap();
            stream.cached_info().config.max_age
        }
    };
    Bus::connect(nats.url()).await?;
    assert_eq!(
        max_age(names::CHANGES_STREAM).await,
        Duration::from_secs(7 * 86_400)
    );
    let day = Duration::from_secs(86_400);
    Bus::connect_with(nats.url(), Some(day)).await?;
    for stream in [
        names::CHANGES_STREAM,
        names::DECISIONS_STREAM,
        names::FOCUS_STREAM,
    ] {
        assert_eq!(max_age(stream).await, day, "{stream}");
    }
    assert_eq!(
        max_age(names::DEAD_STREAM).await,
        Duration::ZERO,
        "parked messages never age out"
    );
    // A tool that only reads does not put the default back.
    Bus::connect(nats.url()).await?;
    assert_eq!(max_age(names::CHANGES_STREAM).await, day);
    Ok(())
}
