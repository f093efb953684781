//! The one consume loop every worker service shares: pull a message, hand it
//! to the service, then ack, retry later, or park it as a dead letter —
//! and stop cleanly when asked.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::{Bus, BusError};

/// What a service made of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handling {
    /// Effects are durable: acknowledge.
    Done,
    /// A transient failure (a server is down, a race was lost): deliver again after `delay`.
    Retry { delay: Duration, reason: String },
    /// The message can never succeed as it is: park it with the reason.
    Poison(String),
    /// The message's owner has stopped: deliver it again later, and take no
    /// further message until the worker's gate opens.
    Halt(String),
}

/// A delivered message, as the service's handler sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub payload: Bytes,
    /// Position in its stream.
    pub stream_seq: u64,
    /// How many times it has been delivered, this time included.
    pub delivered: u64,
}

/// Where a worker reads from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Service name, used for the dead-letter subject and in logs.
    pub service: &'a str,
    pub stream: &'a str,
    /// Durable consumer shared by all replicas of the service.
    pub durable: &'a str,
    pub filter_subject: Option<&'a str>,
    /// Messages handled at once by this replica (`[workers]`).
    pub concurrency: usize,
}

/// Consumes `source` until `shutdown`, handling up to `source.concurrency`
/// messages at once. Messages in hand when shutdown comes are finished first.
///
/// # Errors
/// The consumer cannot be created, or its message stream ends for good. An
/// acknowledgement the server does not confirm is no error: the message is
/// delivered again.
pub async fn run_worker<H, Fut>(
    bus: &Bus,
    source: Source<'_>,
    shutdown: CancellationToken,
    handle: H,
) -> Result<(), BusError>
where
    H: FnMut(Message) -> Fut,
    Fut: Future<Output = Handling>,
{
    run_gated_worker(bus, source, shutdown, || std::future::ready(()), handle).await
}

/// As [`run_worker`]; after a [`Handling::Halt`] the worker takes no new
/// message, finishes those in hand, and waits for `gate` to return before it
/// takes another. Messages it had already been sent are not acknowledged, so
/// they come back after the ack wait.
///
/// Handling several messages at once is what several replicas do too:
/// correctness rests on the conditional commits and the shadows' positions,
/// never on order, so one replica with `concurrency` N behaves as N replicas
/// of one — and keeps the round trips of N messages in flight.
///
/// # Errors
/// As [`run_worker`].
pub async fn run_gated_worker<G, GFut, H, Fut>(
    bus: &Bus,
    source: Source<'_>,
    shutdown: CancellationToken,
    mut gate: G,
    mut handle: H,
) -> Result<(), BusError>
where
    G: FnMut() -> GFut,
    GFut: Future<Output = ()>,
    H: FnMut(Message) -> Fut,
    Fut: Future<Output = Handling>,
{
    use futures::StreamExt as _;
    let limit = source.concurrency.max(1);
    let mut deliveries = bus
        .consume_batched(
            source.stream,
            source.durable,
            source.filter_subject,
            (limit * 4).clamp(8, 200),
        )
        .await?;
    idsync_telemetry::health::set_ready(true);
    let mut in_hand = futures::stream::FuturesUnordered::new();
    let mut halted = false;
    loop {
        if halted && in_hand.is_empty() {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                _ = gate() => {}
            }
            tracing::info!(
                service = source.service,
                durable = source.durable,
                "resumed"
            );
            halted = false;
        }
        let taking = !halted && in_hand.len() < limit && !shutdown.is_cancelled();
        tokio::select! {
            biased;
            // Stopping: finish what is in hand, take nothing new.
            _ = shutdown.cancelled(), if in_hand.is_empty() => return Ok(()),
            Some(halts) = in_hand.next(), if !in_hand.is_empty() => {
                halted |= halts;
            }
            next = deliveries.next(), if taking => {
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(service = source.service, error = %e, "receiving failed; continuing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    None => {
                        return Err(BusError::ConsumerEnded {
                            stream: source.stream.to_owned(),
                            durable: source.durable.to_owned(),
                        });
                    }
                };
                let message = Message {
                    subject: delivery.subject().to_owned(),
                    payload: Bytes::copy_from_slice(delivery.payload()),
                    stream_seq: delivery.stream_seq(),
                    delivered: delivery.delivered(),
                };
                // One span per message, continuing the trace its publisher began.
                let span = tracing::info_span!(
                    parent: None,
                    "message",
                    service = source.service,
                    stream = source.stream,
                    seq = message.stream_seq,
                    delivered = message.delivered
                );
                if let Some(tp) = delivery.traceparent() {
                    idsync_telemetry::trace::set_parent(&span, tp);
                }
                let work = tracing::Instrument::instrument(handle(message), span);
                let source = &source;
                in_hand.push(async move {
                    let started = std::time::Instant::now();
                    let handling = work.await;
                    count(source.service, &handling, started.elapsed());
                    settle(bus, source, delivery, handling).await
                });
            }
        }
    }
}

/// Acknowledges, retries or parks one handled message; true when it halted
/// the worker. An acknowledgement the server does not confirm (NATS
/// restarting) is logged, not fatal: the message is delivered again after
/// the ack wait, and handling is idempotent.
async fn settle(
    bus: &Bus,
    source: &Source<'_>,
    delivery: crate::consume::Delivery,
    handling: Handling,
) -> bool {
    let seq = delivery.stream_seq();
    let (settled, halted) = match handling {
        Handling::Done => (delivery.ack().await, false),
        Handling::Retry { delay, reason } => {
            tracing::warn!(service = source.service, seq, %reason, retry_in_ms = delay.as_millis() as u64, "will retry");
            (delivery.nak(delay).await, false)
        }
        Handling::Poison(reason) => {
            tracing::error!(service = source.service, seq, %reason, "parked in the dead-letter stream");
            (
                bus.dead_letter(source.service, delivery, &reason).await,
                false,
            )
        }
        Handling::Halt(reason) => {
            tracing::error!(service = source.service, durable = source.durable, seq, %reason, "halted; waiting to be resumed");
            (delivery.nak(Duration::from_millis(500)).await, true)
        }
    };
    if let Err(e) = settled {
        unconfirmed(source.service, seq, &e);
    }
    halted
}

fn unconfirmed(service: &str, seq: u64, error: &BusError) {
    tracing::warn!(service, seq, %error, "not confirmed by the server; the message will be delivered again");
}

/// Counts a handled message by its outcome, and how long handling took.
fn count(service: &str, handling: &Handling, took: Duration) {
    use idsync_telemetry::metrics;
    let outcome = match handling {
        Handling::Done => "done",
        Handling::Retry { .. } => "retry",
        Handling::Poison(_) => "parked",
        Handling::Halt(_) => "halted",
    };
    metrics::inc(
        "idsync_messages_total",
        "Messages handled, by service and outcome (done, retry, parked, halted).",
        &[("service", service), ("outcome", outcome)],
    );
    metrics::observe(
        "idsync_message_handling_seconds",
        "Time to handle one message, by service.",
        &[("service", service)],
        took.as_secs_f64(),
    );
}

/// Backoff for the `delivered`-th attempt: 200 ms doubling up to 30 s, less
/// up to a fifth at random, so that replicas retrying together spread out.
pub fn backoff(delivered: u64) -> Duration {
    let exp = delivered.saturating_sub(1).min(8) as u32;
    let full = (Duration::from_millis(200) * 2u32.pow(exp)).min(Duration::from_secs(30));
    let noise = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    full - full.mul_f64(f64::from(noise % 1000) / 5000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter_below() {
        for (attempt, full) in [(1, 200), (2, 400), (3, 800), (20, 30_000)] {
            let d = backoff(attempt).as_millis() as u64;
            assert!(d <= full && d >= full * 4 / 5, "attempt {attempt}: {d} ms");
        }
    }
}
