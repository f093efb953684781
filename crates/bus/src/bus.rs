//! Connecting, declaring streams and the cookie bucket, publishing and cookies.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{
    self, consumer, context::PublishAckFuture, kv, message::PublishMessage, stream,
};
use bytes::Bytes;
use prost::Message as _;

use crate::consume::{Deliveries, Delivery};
use crate::names;
use crate::{BusError, Cause};

/// How long [`Bus::connect`] waits for the server before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long change, decision and focus messages are kept.
const RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Window in which a re-published message id is recognised as a duplicate.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60);
/// How long a delivery may stay unacknowledged before it is redelivered.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Deliveries handed out but not yet acknowledged, per durable consumer.
const MAX_ACK_PENDING: i64 = 1024;
/// Attempts at declaring a stream or bucket; concurrent declarers may race.
const DECLARE_ATTEMPTS: u32 = 4;

/// A connection to NATS with idsync's streams and cookie bucket declared.
///
/// Cheap to clone: clones share the connection.
#[derive(Clone, Debug)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    cookies: kv::Store,
}

/// A publish the server has received but whose stream acknowledgement is still
/// to come. Await it with [`PendingAck::wait`]; dropping it gives up knowing
/// whether the message was stored.
#[derive(Debug)]
pub struct PendingAck {
    ack: PublishAckFuture,
    subject: String,
    msg_id: String,
}

/// A stored message, as the stream acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The message's sequence in its stream (that of the original when a duplicate).
    pub stream_seq: u64,
    /// The stream had already stored a message with this id in its duplicate window.
    pub duplicate: bool,
}

impl PendingAck {
    /// Wait until the stream has stored the message (or recognised a duplicate).
    ///
    /// # Errors
    ///
    /// [`BusError::Publish`] when no stream takes the subject, the stream
    /// refuses the message, or no acknowledgement comes in time.
    pub async fn wait(self) -> Result<Published, BusError> {
        let Self {
            ack,
            subject,
            msg_id,
        } = self;
        match ack.await {
            Ok(ack) => Ok(Published {
                stream_seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) => Err(BusError::Publish {
                subject,
                msg_id,
                operation: "await stream ack of publish",
                source: Box::new(e),
            }),
        }
    }
}

impl Bus {
    /// Connect to `url` and declare the four streams and the cookie bucket.
    ///
    /// Declaring is create-or-update, so any number of services may call this
    /// at the same time and a changed setting here reaches existing streams.
    ///
    /// # Errors
    ///
    /// [`BusError::Connect`] / [`BusError::ConnectTimeout`] naming the URL when
    /// the server cannot be reached within a few seconds; [`BusError::Stream`]
    /// or [`BusError::Bucket`] when JetStream refuses a declaration (for
    /// example JetStream is not enabled).
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        Self::connect_with(url, None).await
    }

    /// As [`Bus::connect`]; with `retention`, the change, decision and focus
    /// streams keep messages that long (they are created so, and changed to
    /// it when they exist with another). Services pass the configuration's
    /// `nats.retention_days`; tools that only read pass `None` and leave the
    /// streams as they are.
    ///
    /// # Errors
    /// As [`Bus::connect`], and a stream whose retention cannot be changed.
    pub async fn connect_with(url: &str, retention: Option<Duration>) -> Result<Self, BusError> {
        let options = async_nats::ConnectOptions::new()
            .name("idsync")
            .connection_timeout(CONNECT_TIMEOUT);
        // The client's own timeout covers one attempt; this bounds the whole.
        let client = match tokio::time::timeout(
            CONNECT_TIMEOUT + Duration::from_secs(1),
            options.connect(url),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(BusError::Connect {
                    url: url.to_owned(),
                    source: Box::new(e),
                });
            }
            Err(_) => {
                return Err(BusError::ConnectTimeout {
                    url: url.to_owned(),
                    timeout: CONNECT_TIMEOUT,
                });
            }
        };
        let js = jetstream::new(client.clone());
        for config in stream_configs(retention.unwrap_or(RETENTION)) {
            let keep = if config.max_age.is_zero() {
                None
            } else {
                retention
            };
            declare_stream(&js, config, keep).await?;
        }
        let cookies = declare_cookie_bucket(&js).await?;
        tracing::debug!(url, "connected to NATS and declared idsync streams");
        Ok(Self {
            client,
            js,
            cookies,
        })
    }

    /// The underlying NATS client, for health checks and plain subscriptions.
    /// The largest message the server takes (`max_payload`), in bytes.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Send `payload` to `subject` with JetStream message id `msg_id` and return
    /// the pending stream acknowledgement.
    ///
    /// The stream drops a second message with the same id within its
    /// two-minute duplicate window, so re-publishing after a crash is safe.
    /// Callers may pipeline many publishes and await the acks in order; at most
    /// a few thousand may be outstanding, after which this waits.
    ///
    /// # Errors
    ///
    /// [`BusError::Publish`] when the subject is invalid, the message is too
    /// large or the connection cannot take it.
    pub async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<PendingAck, BusError> {
        let traceparent = idsync_telemetry::trace::current_traceparent();
        self.publish_traced(subject, msg_id, payload, traceparent.as_deref())
            .await
    }

    /// [`Bus::publish`] with the trace context `traceparent` in the message's
    /// headers instead of the current span's (the IDM's outbox carries the
    /// context of the commit that wrote each record).
    ///
    /// # Errors
    ///
    /// As for [`Bus::publish`].
    pub async fn publish_traced(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
        traceparent: Option<&str>,
    ) -> Result<PendingAck, BusError> {
        let mut message = PublishMessage::build().payload(payload).message_id(msg_id);
        if let Some(tp) = traceparent {
            message = message.header(idsync_telemetry::trace::TRACEPARENT, tp);
        }
        match self.js.send_publish(subject.to_owned(), message).await {
            Ok(ack) => Ok(PendingAck {
                ack,
                subject: subject.to_owned(),
                msg_id: msg_id.to_owned(),
            }),
            Err(e) => Err(BusError::Publish {
                subject: subject.to_owned(),
                msg_id: msg_id.to_owned(),
                operation: "send publish",
                source: Box::new(e),
            }),
        }
    }

    /// [`Bus::publish`] and wait for the stream to store the message.
    ///
    /// # Errors
    ///
    /// As for [`Bus::publish`] and [`PendingAck::wait`].
    pub async fn publish_and_wait(
        &self,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<Published, BusError> {
        self.publish(subject, msg_id, payload).await?.wait().await
    }

    /// The resource's sync cookie as last stored, if any.
    ///
    /// # Errors
    ///
    /// [`BusError::Bucket`] when the bucket cannot be read.
    pub async fn load_cookie(&self, resource: &str) -> Result<Option<Vec<u8>>, BusError> {
        let key = cookie_key(resource);
        match self.cookies.get(key.clone()).await {
            Ok(value) => Ok(value.map(|v| v.to_vec())),
            Err(e) => Err(bucket_error(key, "get", Box::new(e))),
        }
    }

    /// Store the resource's sync cookie, returning once the bucket has it on disk.
    ///
    /// # Errors
    ///
    /// [`BusError::Bucket`] when the put is refused or not acknowledged.
    pub async fn store_cookie(&self, resource: &str, cookie: &[u8]) -> Result<(), BusError> {
        let key = cookie_key(resource);
        self.cookies
            .put(key.clone(), Bytes::copy_from_slice(cookie))
            .await
            .map(|_revision| ())
            .map_err(|e| bucket_error(key, "put", Box::new(e)))
    }

    /// Forget the resource's sync cookie: its next session reads everything.
    ///
    /// # Errors
    ///
    /// [`BusError::Bucket`] when the delete is refused.
    pub async fn delete_cookie(&self, resource: &str) -> Result<(), BusError> {
        let key = cookie_key(resource);
        self.cookies
            .delete(key.clone())
            .await
            .map_err(|e| bucket_error(key, "delete", Box::new(e)))
    }

    /// Remove message `seq` from `stream` (a parked message dropped or retried).
    ///
    /// # Errors
    ///
    /// [`BusError::Stream`] when the stream refuses, for example because the
    /// message is not there.
    pub async fn delete_message(&self, stream: &str, seq: u64) -> Result<(), BusError> {
        let stream_err = |operation: &'static str| {
            move |e: Box<dyn std::error::Error + Send + Sync>| BusError::Stream {
                stream: stream.to_owned(),
                operation,
                source: e,
            }
        };
        let handle = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| stream_err("get info of")(Box::new(e)))?;
        handle
            .delete_message(seq)
            .await
            .map(drop)
            .map_err(|e| stream_err("delete a message of")(Box::new(e)))
    }

    /// Pull deliveries from the durable consumer `durable` on `stream`,
    /// creating it if missing (explicit ack, 30 s ack wait, at most 1,024
    /// unacknowledged, starting from the first message, only `filter_subject`
    /// when given).
    ///
    /// Processes using the same durable share its messages: each is handed to
    /// one of them at a time, which is how a service scales out.
    ///
    /// # Errors
    ///
    /// [`BusError::Consumer`] when the stream does not exist or the server
    /// refuses the consumer (for example an existing durable with a different
    /// filter it cannot change).
    pub async fn consume(
        &self,
        stream: &str,
        durable: &str,
        filter_subject: Option<&str>,
    ) -> Result<Deliveries, BusError> {
        self.consume_batched(stream, durable, filter_subject, 200)
            .await
    }

    /// [`Bus::consume`], pulling at most `batch` messages at a time. A
    /// worker asks for a few times what it handles at once: messages pulled
    /// but not yet handled wait in this process, and past the ack wait (30 s)
    /// the server hands them to another replica as well, so a slow replica
    /// holding hundreds would make the others redo its work.
    ///
    /// # Errors
    /// As [`Bus::consume`].
    pub async fn consume_batched(
        &self,
        stream: &str,
        durable: &str,
        filter_subject: Option<&str>,
        batch: usize,
    ) -> Result<Deliveries, BusError> {
        let error = |operation, source: Cause| BusError::Consumer {
            stream: stream.to_owned(),
            durable: durable.to_owned(),
            operation,
            source,
        };
        let config = consumer::pull::Config {
            durable_name: Some(durable.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            deliver_policy: consumer::DeliverPolicy::All,
            // Server 2.9 ignores the plural `filter_subjects`.
            filter_subject: filter_subject.unwrap_or_default().to_owned(),
            ..Default::default()
        };
        let consumer: consumer::PullConsumer = self
            .js
            .create_consumer_on_stream(config, stream)
            .await
            .map_err(|e| error("create", Box::new(e)))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch.max(1))
            .heartbeat(Duration::from_secs(15))
            .messages()
            .await
            .map_err(|e| error("pull messages from", Box::new(e)))?;
        Ok(Deliveries::new(messages, stream, durable, consumer))
    }

    /// Park a message that cannot be processed: store a
    /// [`DeadLetter`](idsync_proto::v1::DeadLetter) with `reason` and the
    /// original payload on [`names::dead_subject`]`(service)`, then terminate
    /// the original so it is not redelivered.
    ///
    /// The dead letter's message id is `dead:<service>:<stream>:<seq>`, so
    /// parking the same delivery twice stores it once.
    ///
    /// # Errors
    ///
    /// [`BusError::Publish`] when the dead letter is not stored (the original
    /// is then left to be redelivered); [`BusError::Delivery`] when the
    /// termination is not confirmed (the original may come back, and parking
    /// it again is de-duplicated).
    pub async fn dead_letter(
        &self,
        service: &str,
        delivery: Delivery,
        reason: &str,
    ) -> Result<(), BusError> {
        let mut record = idsync_proto::v1::DeadLetter {
            schema_version: idsync_proto::SCHEMA_VERSION,
            service: service.to_owned(),
            subject: delivery.subject().to_owned(),
            stream_seq: delivery.stream_seq(),
            reason: reason.to_owned(),
            payload: delivery.payload().to_vec(),
            parked_at_ms: now_ms(),
        };
        // A message close to the server's limit does not fit with the
        // record around it: park the reason, and say where the original is.
        let limit = self.max_payload();
        if limit > 0 && record.encoded_len() + 1024 > limit {
            record.reason = format!(
                "{reason} (the original, {} bytes, is too large to keep here: it is message {} of stream {})",
                record.payload.len(),
                delivery.stream_seq(),
                delivery.stream()
            );
            record.payload.clear();
        }
        let msg_id = format!(
            "dead:{service}:{}:{}",
            delivery.stream(),
            delivery.stream_seq()
        );
        let subject = names::dead_subject(service);
        self.publish_and_wait(&subject, &msg_id, Bytes::from(record.encode_to_vec()))
            .await?;
        tracing::warn!(
            service,
            stream = delivery.stream(),
            stream_seq = delivery.stream_seq(),
            subject = delivery.subject(),
            reason,
            "parked a message on the dead-letter stream"
        );
        delivery.term().await
    }

    /// Number of messages currently in `stream`.
    ///
    /// # Errors
    ///
    /// [`BusError::Stream`] when the stream does not exist or cannot be asked.
    pub async fn stream_messages(&self, stream: &str) -> Result<u64, BusError> {
        let handle = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| BusError::Stream {
                stream: stream.to_owned(),
                operation: "get info of",
                source: Box::new(e),
            })?;
        Ok(handle.cached_info().state.messages)
    }

    /// Sequence of the last message stored in `stream` (0 when none ever was).
    ///
    /// # Errors
    ///
    /// [`BusError::Stream`] when the stream does not exist or cannot be asked.
    pub async fn last_sequence(&self, stream: &str) -> Result<u64, BusError> {
        let handle = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| BusError::Stream {
                stream: stream.to_owned(),
                operation: "get info of",
                source: Box::new(e),
            })?;
        Ok(handle.cached_info().state.last_sequence)
    }

    /// Whether durable consumer `durable` of `stream` has acknowledged every
    /// message of its own up to stream sequence `through`: its ack floor is
    /// there, or it holds nothing delivered and nothing pending (a filtered
    /// consumer's floor stays at its own last message, which may be below
    /// `through`). `false` while the consumer does not exist.
    ///
    /// # Errors
    /// [`BusError::Stream`] when the stream does not exist or cannot be asked.
    pub async fn consumed_through(
        &self,
        stream: &str,
        durable: &str,
        through: u64,
    ) -> Result<bool, BusError> {
        let error = |source: Cause| BusError::Stream {
            stream: stream.to_owned(),
            operation: "read a consumer's progress on",
            source,
        };
        let handle = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| error(Box::new(e)))?;
        match handle.consumer_info(durable).await {
            Ok(info) => Ok(info.ack_floor.stream_sequence >= through
                || (info.num_pending == 0 && info.num_ack_pending == 0)),
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(false),
            Err(e) => Err(error(Box::new(e))),
        }
    }

    /// Up to `limit` messages of `stream` from sequence `from` on, without
    /// consuming them (for the admin CLI and tests). Sequences that were
    /// removed are skipped.
    ///
    /// # Errors
    /// [`BusError::Stream`] when the stream does not exist or cannot be read.
    pub async fn peek(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, BusError> {
        let stream_err = |operation: &'static str| {
            move |e: Box<dyn std::error::Error + Send + Sync>| BusError::Stream {
                stream: stream.to_owned(),
                operation,
                source: e,
            }
        };
        let handle = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| stream_err("get info of")(Box::new(e)))?;
        let last = handle.cached_info().state.last_sequence;
        let mut out = Vec::new();
        let mut seq = from.max(1);
        while seq <= last && out.len() < limit {
            match handle.get_raw_message(seq).await {
                Ok(m) => out.push(StoredMessage {
                    subject: m.subject.to_string(),
                    stream_seq: m.sequence,
                    payload: m.payload,
                }),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(stream_err("read a message of")(Box::new(e))),
            }
            seq += 1;
        }
        Ok(out)
    }
}

/// A message as stored in a stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub subject: String,
    pub stream_seq: u64,
    pub payload: bytes::Bytes,
}

/// The four streams: file storage, limits retention, de-duplication window.
fn stream_configs(retention: Duration) -> [stream::Config; 4] {
    let config =
        |name: &str, subjects: &str, max_age: Duration, description: &str| stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            description: Some(description.to_owned()),
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: DUPLICATE_WINDOW,
            max_age,
            num_replicas: 1,
            ..Default::default()
        };
    [
        config(
            names::CHANGES_STREAM,
            names::CHANGES_SUBJECTS,
            retention,
            "idsync: changes read from connected resources",
        ),
        config(
            names::DECISIONS_STREAM,
            names::DECISIONS_SUBJECTS,
            retention,
            "idsync: decisions made by the correlator",
        ),
        config(
            names::FOCUS_STREAM,
            names::FOCUS_SUBJECTS,
            retention,
            "idsync: changes of focus objects in the IDM",
        ),
        // Parked messages wait for a person; they never age out.
        config(
            names::DEAD_STREAM,
            names::DEAD_SUBJECTS,
            Duration::ZERO,
            "idsync: messages services gave up on",
        ),
    ]
}

fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

async fn declare_stream(
    js: &jetstream::Context,
    config: stream::Config,
    retention: Option<Duration>,
) -> Result<(), BusError> {
    let mut attempt = 1;
    loop {
        // Look before creating: services that start after the first find the
        // stream and send no create at all. (nats-server 2.9 can leave
        // concurrent creates of one stream unanswered.)
        let declared = match js.get_stream(&config.name).await {
            Ok(found) => match retention {
                Some(age) if found.cached_info().config.max_age != age => {
                    let mut changed = found.cached_info().config.clone();
                    changed.max_age = age;
                    tracing::info!(stream = %config.name, retention_s = age.as_secs(), "stream retention changed");
                    js.update_stream(changed)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
                _ => Ok(()),
            },
            Err(e) if stream_not_found(&e) => js
                .create_stream(config.clone())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match declared {
            Ok(()) => return Ok(()),
            // Another service may have created it between our update and create.
            Err(e) if attempt < DECLARE_ATTEMPTS => {
                tracing::debug!(stream = %config.name, attempt, error = %e, "declaring stream failed, retrying");
            }
            Err(e) => {
                return Err(BusError::Stream {
                    stream: config.name,
                    operation: "look up or create",
                    source: e.into(),
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(50) * attempt).await;
        attempt += 1;
    }
}

/// Declare the cookie bucket's backing stream ourselves, then open the bucket.
///
/// async-nats 0.51's `create_key_value` first asks for the account info and
/// cannot parse a 2.9 server's answer (it requires 2.10's `reserved_*`
/// fields), so the stream is declared with the settings async-nats would use.
async fn declare_cookie_bucket(js: &jetstream::Context) -> Result<kv::Store, BusError> {
    declare_stream(js, cookie_stream_config(), None).await?;
    js.get_key_value(names::COOKIE_BUCKET)
        .await
        .map_err(|e| bucket_error(String::new(), "open", Box::new(e)))
}

/// The stream of a KV bucket with history 1, as `kv::Config` would produce it.
fn cookie_stream_config() -> stream::Config {
    stream::Config {
        name: format!("KV_{}", names::COOKIE_BUCKET),
        description: Some("idsync: last sync cookie of each resource".to_owned()),
        subjects: vec![format!("$KV.{}.>", names::COOKIE_BUCKET)],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: 1,
        ..Default::default()
    }
}

fn bucket_error(key: String, operation: &'static str, source: Cause) -> BusError {
    BusError::Bucket {
        bucket: names::COOKIE_BUCKET.to_owned(),
        key,
        operation,
        source,
    }
}

/// The bucket key of a resource's cookie.
///
/// KV keys allow only `[-/_=.A-Za-z0-9]`; every other byte, and `=`, `.` and
/// `/` (which would split or mangle the subject), becomes `=XX`, so any
/// resource name maps to a distinct valid key and plain names stay readable.
fn cookie_key(resource: &str) -> String {
    let mut key = String::with_capacity(resource.len());
    for byte in resource.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            key.push(char::from(byte));
        } else {
            key.push_str(&format!("={byte:02X}"));
        }
    }
    if key.is_empty() {
        // The empty resource name still needs a valid, distinct key.
        key.push('=');
    }
    key
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_keys_are_valid_and_distinct() {
        assert_eq!(cookie_key("ldap-main_1"), "ldap-main_1");
        assert_eq!(cookie_key("a.b"), "a=2Eb");
        assert_eq!(cookie_key("a=2Eb"), "a=3D2Eb");
        assert_eq!(cookie_key("ou=x y"), "ou=3Dx=20y");
        assert_eq!(cookie_key(""), "=");
        assert_ne!(cookie_key("é"), cookie_key("e"));
    }

    #[test]
    fn streams_follow_the_names() {
        let configs = stream_configs(RETENTION);
        let names: Vec<_> = configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                names::CHANGES_STREAM,
                names::DECISIONS_STREAM,
                names::FOCUS_STREAM,
                names::DEAD_STREAM
            ]
        );
        for c in &configs {
            assert_eq!(c.duplicate_window, DUPLICATE_WINDOW);
            assert_eq!(c.storage, stream::StorageType::File);
        }
    }
}
