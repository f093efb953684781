//! The one error type of the bus: every variant names the NATS object and the operation.

use std::time::Duration;

/// The underlying cause, as async-nats reports it.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong talking to NATS, and on which stream, subject or bucket.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A durable consumer's message stream ended for good.
    #[error("consumer {durable} on stream {stream} ended")]
    ConsumerEnded {
        /// Stream name.
        stream: String,
        /// Durable consumer name.
        durable: String,
    },
    /// The server at `url` refused or failed the connection.
    #[error("connect to NATS at {url}: {source}")]
    Connect {
        /// The URL given to [`crate::Bus::connect`].
        url: String,
        /// The client's reason.
        #[source]
        source: Cause,
    },
    /// No connection to `url` within `timeout`.
    #[error("connect to NATS at {url}: no connection within {timeout:?}")]
    ConnectTimeout {
        /// The URL given to [`crate::Bus::connect`].
        url: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A stream could not be created, updated or inspected.
    #[error("{operation} stream {stream}: {source}")]
    Stream {
        /// Stream name.
        stream: String,
        /// What we were doing, e.g. "create or update".
        operation: &'static str,
        /// The client's reason.
        #[source]
        source: Cause,
    },
    /// A publish was not sent or not stored by the stream.
    #[error("{operation} to subject {subject} (message id {msg_id}): {source}")]
    Publish {
        /// Subject published to.
        subject: String,
        /// JetStream message id used for de-duplication.
        msg_id: String,
        /// "send publish" or "await stream ack".
        operation: &'static str,
        /// The client's reason.
        #[source]
        source: Cause,
    },
    /// The key-value bucket could not be created, read or written.
    #[error("{operation} key {key:?} in bucket {bucket}: {source}")]
    Bucket {
        /// Bucket name.
        bucket: String,
        /// Key ("" for bucket-level operations).
        key: String,
        /// What we were doing, e.g. "put".
        operation: &'static str,
        /// The client's reason.
        #[source]
        source: Cause,
    },
    /// A durable consumer could not be created or its messages not pulled.
    #[error("{operation} consumer {durable} on stream {stream}: {source}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Durable consumer name.
        durable: String,
        /// What we were doing, e.g. "create" or "pull messages".
        operation: &'static str,
        /// The client's reason.
        #[source]
        source: Cause,
    },
    /// Acknowledging (ack, nak, term) or reading a delivered message failed.
    #[error("{operation} message {stream_seq} of stream {stream} (subject {subject}): {source}")]
    Delivery {
        /// Stream name.
        stream: String,
        /// Subject of the message.
        subject: String,
        /// Stream sequence of the message (0 when unknown).
        stream_seq: u64,
        /// "ack", "nak", "term" or "read metadata of".
        operation: &'static str,
        /// The client's reason.
        #[source]
        source: Cause,
    },
}
