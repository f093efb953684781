//! The shared worker loop against a real nats-server: several messages in
//! hand at once, and a halt that finishes what is in hand, takes nothing new
//! until the gate opens, and loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use idsync_bus::worker::{Handling, Source, run_gated_worker, run_worker};
use idsync_bus::{Bus, names};
use idsync_testkit::NatsServer;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

async fn publish(bus: &Bus, n: usize) {
    let subject = names::change_subject("hr");
    for i in 0..n {
        bus.publish_and_wait(&subject, &format!("ev-{i}"), Bytes::from(vec![i as u8]))
            .await
            .unwrap();
    }
}

fn source(concurrency: usize) -> Source<'static> {
    Source {
        service: "test",
        stream: names::CHANGES_STREAM,
        durable: names::CORRELATOR,
        filter_subject: None,
        concurrency,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_holds_as_many_messages_as_its_concurrency() {
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(nats.url()).await.unwrap();
    publish(&bus, 8).await;
    // Every handling waits until four are in hand at once: one message at
    // a time would never get there.
    let barrier = Arc::new(tokio::sync::Barrier::new(4));
    let (in_hand, most, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let stop = CancellationToken::new();
    let worker = {
        let (bus, stop) = (bus.clone(), stop.clone());
        let (barrier, in_hand, most, done) =
            (barrier.clone(), in_hand.clone(), most.clone(), done.clone());
        tokio::spawn(async move {
            run_worker(&bus, source(4), stop.clone(), |_| {
                let (barrier, in_hand, most, done, stop) = (
                    barrier.clone(),
                    in_hand.clone(),
                    most.clone(),
                    done.clone(),
                    stop.clone(),
                );
                async move {
                    let now = in_hand.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    barrier.wait().await;
                    in_hand.fetch_sub(1, Ordering::SeqCst);
                    if done.fetch_add(1, Ordering::SeqCst) + 1 == 8 {
                        stop.cancel();
                    }
                    Handling::Done
                }
            })
            .await
        })
    };
    tokio::time::timeout(WAIT, worker)
        .await
        .expect("eight messages handled four at a time")
        .unwrap()
        .unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 8);
    assert_eq!(
        most.load(Ordering::SeqCst),
        4,
        "never more than its concurrency"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_finishes_what_is_in_hand_and_waits_for_the_gate_losing_nothing() {
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(nats.url()).await.unwrap();
    publish(&bus, 6).await;
    // Message 0 halts the worker the first time it comes; every handling
    // records whether the gate had opened by then.
    let gate_open = Arc::new(Notify::new());
    let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handled: Arc<Mutex<Vec<(u8, bool)>>> = Arc::default();
    let stop = CancellationToken::new();
    let worker = {
        let (bus, stop) = (bus.clone(), stop.clone());
        let (gate_open, opened, handled) = (gate_open.clone(), opened.clone(), handled.clone());
        tokio::spawn(async move {
            run_gated_worker(
                &bus,
                source(3),
                stop.clone(),
                || {
                    let (gate_open, opened) = (gate_open.clone(), opened.clone());
                    async move {
                        gate_open.notified().await;
                        opened.store(true, Ordering::SeqCst);
                    }
                },
                |msg| {
                    let (handled, opened, stop) = (handled.clone(), opened.clone(), stop.clone());
                    async move {
                        let id = msg.payload[0];
                        let mut h = handled.lock().await;
                        if id == 0 && !h.iter().any(|(i, _)| *i == 0) {
                            h.push((0, false));
                            return Handling::Halt("entry 0 failed".into());
                        }
                        h.push((id, opened.load(Ordering::SeqCst)));
                        // Six messages, each done once: then stop.
                        if h.len() == 7 {
                            stop.cancel();
                        }
                        drop(h);
                        // Still in hand when message 0 halts the worker.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Handling::Done
                    }
                },
            )
            .await
        })
    };
    // Halted: whatever was in hand with message 0 is finished; the rest waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: Vec<(u8, bool)> = handled.lock().await.clone();
    assert!(before.len() <= 3, "at most what was in hand: {before:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*handled.lock().await, before, "nothing new while halted");
    gate_open.notify_one();
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("every message handled after the gate opened")
        .unwrap()
        .unwrap();
    let handled = handled.lock().await.clone();
    let mut done: Vec<u8> = handled
        .iter()
        .filter(|(i, opened)| *i != 0 || *opened)
        .map(|(i, _)| *i)
        .collect();
    done.sort_unstable();
    done.dedup();
    assert_eq!(done, [0, 1, 2, 3, 4, 5], "nothing lost: {handled:?}");
    // Message 0 came back (redelivered after its nak) and was done after
    // the gate opened.
    assert!(handled.contains(&(0, true)), "{handled:?}");
}

/// How far a consumer has come, as a refresh's deletions read it before
/// they are published: not at all before the consumer exists, not past a
/// message still in hand, up to the end once everything is acknowledged; a
/// filtered consumer with nothing of its own left counts as through any
/// sequence; a stream that does not exist is an error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_through_follows_the_acknowledged_messages() {
    let nats = NatsServer::start().await.unwrap();
    let bus = Bus::connect(nats.url()).await.unwrap();
    publish(&bus, 4).await;
    let through = |seq| {
        let bus = bus.clone();
        async move {
            bus.consumed_through(names::CHANGES_STREAM, names::CORRELATOR, seq)
                .await
                .unwrap()
        }
    };
    assert!(!through(1).await, "no consumer yet");
    // Messages 0 and 1 (sequences 1 and 2) are done; 2 stays in hand until
    // released; 3 follows it (one at a time).
    let release = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let worker = {
        let (bus, stop, release) = (bus.clone(), stop.clone(), release.clone());
        tokio::spawn(async move {
            run_worker(&bus, source(1), stop.clone(), |msg| {
                let (release, stop) = (release.clone(), stop.clone());
                async move {
                    match msg.payload[0] {
                        2 => release.notified().await,
                        3 => stop.cancel(),
                        _ => {}
                    }
                    Handling::Done
                }
            })
            .await
        })
    };
    idsync_testkit::eventually("sequences 1 and 2 acknowledged", WAIT, || async {
        Ok(through(2).await.then_some(()))
    })
    .await
    .unwrap();
    assert!(!through(3).await, "sequence 3 is still in hand");
    assert!(!through(4).await);
    release.notify_one();
    tokio::time::timeout(WAIT, worker)
        .await
        .expect("the rest handled once released")
        .unwrap()
        .unwrap();
    idsync_testkit::eventually("everything acknowledged", WAIT, || async {
        Ok(through(4).await.then_some(()))
    })
    .await
    .unwrap();

    // A consumer of another resource's changes only: none of the four is
    // its own, so it is through all of them as soon as it exists.
    let other = names::change_subject("other");
    let stop = CancellationToken::new();
    let idle = {
        let (bus, stop, other) = (bus.clone(), stop.clone(), other.clone());
        tokio::spawn(async move {
            let source = Source {
                durable: "other",
                filter_subject: Some(&other),
                ..source(1)
            };
            run_worker(&bus, source, stop, |_| async { Handling::Done }).await
        })
    };
    idsync_testkit::eventually("the filtered consumer is through", WAIT, || async {
        let done = bus
            .consumed_through(names::CHANGES_STREAM, "other", 4)
            .await
            .map_err(|e| e.to_string())?;
        Ok(done.then_some(()))
    })
    .await
    .unwrap();
    stop.cancel();
    idle.await.unwrap().unwrap();

    let err = bus
        .consumed_through("NO_SUCH_STREAM", names::CORRELATOR, 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NO_SUCH_STREAM"), "{err}");
}
