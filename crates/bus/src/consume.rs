//! Deliveries from a durable pull consumer, and acknowledging them.

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt as _;

use crate::{BusError, Cause};

/// The messages of a durable consumer, in delivery order; see [`crate::Bus::consume`].
pub struct Deliveries {
    messages: consumer::pull::Stream,
    stream: String,
    durable: String,
    /// Samples the consumer's backlog into a gauge while the deliveries live.
    lag: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        if let Some(task) = self.lag.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliveries")
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

impl Deliveries {
    pub(crate) fn new(
        messages: consumer::pull::Stream,
        stream: &str,
        durable: &str,
        mut consumer: consumer::PullConsumer,
    ) -> Self {
        let (s, d) = (stream.to_owned(), durable.to_owned());
        let lag = tokio::spawn(async move {
            loop {
                if let Ok(info) = consumer.info().await {
                    idsync_telemetry::metrics::set(
                        "idsync_consumer_pending",
                        "Messages of a durable consumer not yet delivered or not yet acknowledged (consumer lag).",
                        &[("stream", &s), ("durable", &d)],
                        (info.num_pending + info.num_ack_pending as u64) as f64,
                    );
                }
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            }
        });
        Self {
            messages,
            stream: stream.to_owned(),
            durable: durable.to_owned(),
            lag: Some(lag),
        }
    }

    /// The next delivery, waiting for one to arrive.
    ///
    /// An `Err` reports a problem pulling (for example missed heartbeats while
    /// the server restarts); the stream keeps going, so callers may log it and
    /// call again. `None` means the stream has ended for good.
    pub async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        let item = self.messages.next().await?;
        Some(match item {
            Ok(message) => Delivery::new(message, &self.stream),
            Err(e) => Err(BusError::Consumer {
                stream: self.stream.clone(),
                durable: self.durable.clone(),
                operation: "pull messages from",
                source: Box::new(e),
            }),
        })
    }
}

/// One message handed to this process; acknowledge it once its effects are
/// durable, or ask for redelivery with [`Delivery::nak`]. An unacknowledged
/// delivery comes back after the ack wait.
#[derive(Debug)]
pub struct Delivery {
    message: jetstream::Message,
    stream: String,
    stream_seq: u64,
    delivered: u64,
}

impl Delivery {
    fn new(message: jetstream::Message, stream: &str) -> Result<Self, BusError> {
        let (stream, stream_seq, delivered) = match message.info() {
            Ok(info) => (
                info.stream.to_owned(),
                info.stream_sequence,
                u64::try_from(info.delivered).unwrap_or(0),
            ),
            Err(source) => {
                return Err(BusError::Delivery {
                    stream: stream.to_owned(),
                    subject: message.subject.to_string(),
                    stream_seq: 0,
                    operation: "read metadata of",
                    source,
                });
            }
        };
        Ok(Self {
            message,
            stream,
            stream_seq,
            delivered,
        })
    }

    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    /// The message body.
    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The W3C trace context the publisher sent, if any.
    pub fn traceparent(&self) -> Option<&str> {
        self.message
            .headers
            .as_ref()?
            .get(idsync_telemetry::trace::TRACEPARENT)
            .map(|v| v.as_str())
    }

    /// The stream the message belongs to.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Position in the stream (from the message's metadata).
    pub fn stream_seq(&self) -> u64 {
        self.stream_seq
    }

    /// How many times it has been delivered, this time included.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Acknowledge. The server does not confirm it: a confirmation would
    /// cost a round trip per message, and an acknowledgement that is lost
    /// (NATS restarting) only brings the message back after the ack wait,
    /// which every handler takes as a duplicate (the shadow's position).
    ///
    /// # Errors
    ///
    /// [`BusError::Delivery`] when the acknowledgement cannot be sent (the
    /// connection is gone); the message is then redelivered.
    pub async fn ack(self) -> Result<(), BusError> {
        let sent = self.message.ack().await;
        sent.map_err(|source| self.failed("ack", source))
    }

    /// Ask for redelivery after `delay`, confirmed by the server.
    ///
    /// # Errors
    ///
    /// [`BusError::Delivery`] when the server does not confirm in time; the
    /// message is then redelivered after the ack wait instead.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        self.confirm(AckKind::Nak(Some(delay)), "nak").await
    }

    /// Stop redelivery without processing, confirmed by the server.
    pub(crate) async fn term(self) -> Result<(), BusError> {
        self.confirm(AckKind::Term, "term").await
    }

    async fn confirm(self, kind: AckKind, operation: &'static str) -> Result<(), BusError> {
        let confirmed = self.message.double_ack_with(kind).await;
        confirmed.map_err(|source| self.failed(operation, source))
    }

    /// `operation` on this delivery failed, naming the message.
    fn failed(&self, operation: &'static str, source: Cause) -> BusError {
        BusError::Delivery {
            stream: self.stream.clone(),
            subject: self.subject().to_owned(),
            stream_seq: self.stream_seq,
            operation,
            source,
        }
    }
}
