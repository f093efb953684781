//! The detector: live sync (RFC 4533 refreshAndPersist) from each source
//! resource, one `ChangeEvent` per entry on the change stream. The sync cookie
//! is stored only after JetStream has acknowledged every event before it, so a
//! restart resumes where it left off: nothing lost, nothing reloaded.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idsync_bus::{Bus, BusError, PendingAck, names};
use idsync_core::config::{Config, ResourceConfig};
use idsync_ldap::{Connection, EntryState, LdapError, SyncMessage, SyncSession};
use idsync_proto::v1;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const SERVICE: &str = "detector";

/// Events published but not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Config(#[from] idsync_runtime::ConfigError),
    #[error("no resource has live_sync = true; nothing to detect")]
    NothingToDo,
}

/// Runs live sync for every resource with `live_sync = true` until `shutdown`.
///
/// # Errors
/// NATS cannot be reached at start, or a bind password cannot be read.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    tracing::debug!(url = %config.nats.url, "connecting to NATS");
    let bus = Bus::connect(&config.nats.url).await?;
    let tracker = TaskTracker::new();
    let mut any = false;
    for resource in config.resources.iter().filter(|r| r.live_sync) {
        any = true;
        let connection =
            Connection::for_resource(resource, idsync_runtime::bind_password(resource)?);
        tracker.spawn(live_sync(
            bus.clone(),
            SyncScope::accounts(resource),
            connection.clone(),
            shutdown.clone(),
        ));
        if let Some(scope) = SyncScope::groups(resource) {
            tracker.spawn(live_sync(bus.clone(), scope, connection, shutdown.clone()));
        }
    }
    tracker.close();
    if !any {
        return Err(Error::NothingToDo);
    }
    tracker.wait().await;
    Ok(())
}

/// One sync session's part of a resource: its accounts or its groups.
#[derive(Debug, Clone)]
struct SyncScope {
    resource: String,
    /// Key of the session's cookie in the cookie bucket.
    cookie_key: String,
    base_dn: String,
    filter: String,
    object_type: v1::ObjectType,
}

impl SyncScope {
    fn accounts(r: &ResourceConfig) -> Self {
        Self {
            resource: r.name.clone(),
            cookie_key: r.name.clone(),
            base_dn: r.base_dn.clone(),
            filter: r.filter.clone(),
            object_type: v1::ObjectType::Account,
        }
    }

    fn groups(r: &ResourceConfig) -> Option<Self> {
        let groups = r.groups.as_ref()?;
        Some(Self {
            resource: r.name.clone(),
            cookie_key: format!("{}.groups", r.name),
            base_dn: r.groups_base().unwrap_or(&r.base_dn).to_owned(),
            filter: groups.filter.clone(),
            object_type: v1::ObjectType::Group,
        })
    }
}

/// Keeps one resource's sync session going, reconnecting with backoff.
async fn live_sync(
    bus: Bus,
    resource: SyncScope,
    connection: Connection,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    let mut reset_cookie = false;
    loop {
        let result = session(
            &bus,
            &resource,
            &connection,
            &shutdown,
            &mut reset_cookie,
            &mut backoff,
        )
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => {
                tracing::info!(resource = %resource.resource, "sync session ended; reconnecting")
            }
            Err(SessionError::Ldap(LdapError::RefreshRequired)) => {
                tracing::warn!(resource = %resource.resource, "source asks for a full refresh; restarting without a cookie");
                reset_cookie = true;
                continue;
            }
            Err(e) => {
                tracing::warn!(resource = %resource.resource, error = %e, retry_in_ms = backoff.as_millis() as u64, "sync session failed")
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Ldap(#[from] LdapError),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Events published and the cookie that becomes safe once they are acked.
struct Publisher<'a> {
    bus: &'a Bus,
    cookie_key: &'a str,
    subject: String,
    object_type: v1::ObjectType,
    in_flight: VecDeque<PendingAck>,
    published: u64,
}

impl Publisher<'_> {
    async fn publish(&mut self, mut event: v1::ChangeEvent) -> Result<(), BusError> {
        event.object_type = self.object_type as i32;
        if self.in_flight.len() >= MAX_IN_FLIGHT
            && let Some(oldest) = self.in_flight.pop_front()
        {
            oldest.wait().await?;
        }
        let ack = self
            .bus
            .publish(&self.subject, &event.event_id, event.encode_to_vec().into())
            .await?;
        self.in_flight.push_back(ack);
        self.published += 1;
        Ok(())
    }

    /// Waits for every event to be stored, then stores `cookie`.
    async fn commit(&mut self, cookie: Option<&[u8]>) -> Result<(), BusError> {
        while let Some(ack) = self.in_flight.pop_front() {
            ack.wait().await?;
        }
        if let Some(cookie) = cookie {
            self.bus.store_cookie(self.cookie_key, cookie).await?;
        }
        Ok(())
    }
}

async fn session(
    bus: &Bus,
    resource: &SyncScope,
    connection: &Connection,
    shutdown: &CancellationToken,
    reset_cookie: &mut bool,
    backoff: &mut Duration,
) -> Result<(), SessionError> {
    let cookie = if *reset_cookie {
        None
    } else {
        bus.load_cookie(&resource.cookie_key).await?
    };
    let resumed = cookie.is_some();
    let mut sync = SyncSession::start(
        connection,
        &resource.base_dn,
        &resource.filter,
        cookie,
        true,
    )
    .await?;
    *reset_cookie = false;
    tracing::info!(resource = %resource.resource, resumed, "live sync started");
    let mut out = Publisher {
        bus,
        cookie_key: &resource.cookie_key,
        subject: names::change_subject(&resource.resource),
        object_type: resource.object_type,
        in_flight: VecDeque::new(),
        published: 0,
    };
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Events already published are acked before we go; the cookie
                // stays at the last point known to be safe.
                out.commit(None).await?;
                let _ = sync.close().await;
                return Ok(());
            }
            m = sync.next() => m?,
        };
        let Some(message) = message else {
            out.commit(None).await?;
            return Ok(());
        };
        *backoff = Duration::from_millis(250);
        match message {
            SyncMessage::Entry {
                entry_uuid,
                dn,
                state,
                attributes,
                csn,
                cookie,
            } => {
                let event = change_event(
                    resource,
                    entry_uuid,
                    dn,
                    state,
                    attributes,
                    csn,
                    cookie.clone(),
                );
                tracing::debug!(resource = %resource.resource, dn = %event.dn, ?state, "change");
                out.publish(event).await?;
                if cookie.is_some() {
                    out.commit(cookie.as_deref()).await?;
                }
            }
            SyncMessage::Deleted {
                entry_uuids,
                cookie,
            } => {
                tracing::debug!(resource = %resource.resource, base = %resource.base_dn, deleted = ?entry_uuids, "deleted while away");
                for uuid in entry_uuids {
                    let event = change_event(
                        resource,
                        uuid,
                        String::new(),
                        EntryState::Delete,
                        Vec::new(),
                        None,
                        cookie.clone(),
                    );
                    out.publish(event).await?;
                }
                out.commit(cookie.as_deref()).await?;
            }
            SyncMessage::Present {
                entry_uuids,
                cookie,
            } => {
                tracing::debug!(resource = %resource.resource, present = entry_uuids.len(), "present phase ids");
                out.commit(cookie.as_deref()).await?;
            }
            SyncMessage::RefreshDone { cookie, deletes } => {
                out.commit(cookie.as_deref()).await?;
                if !deletes && resumed {
                    tracing::warn!(resource = %resource.resource, "the source ended refresh with a present phase; deletions it implies are found by reconciliation, not live sync");
                }
                tracing::info!(resource = %resource.resource, events = out.published, "refresh done; persisting");
            }
            SyncMessage::Cookie(cookie) => out.commit(Some(&cookie)).await?,
        }
    }
}

/// The event for one entry. Its id (also the JetStream message id) is the
/// session, the entry and its entryCSN, so the same state read twice is
/// stored once.
fn change_event(
    scope: &SyncScope,
    entry_uuid: String,
    dn: String,
    state: EntryState,
    attributes: Vec<(String, Vec<Vec<u8>>)>,
    csn: Option<String>,
    cookie: Option<Vec<u8>>,
) -> v1::ChangeEvent {
    let delete = state == EntryState::Delete;
    // Per session: the accounts' and the groups' sessions of one resource may
    // both report one entry (a deletion outside a session's scope), and one
    // must not de-duplicate the other away.
    let prefix = &scope.cookie_key;
    let event_id = match (&csn, delete) {
        (_, true) => format!("{prefix}:{entry_uuid}:delete"),
        (Some(csn), false) => format!("{prefix}:{entry_uuid}:{csn}"),
        (None, false) => format!("{prefix}:{entry_uuid}:{}", now_ms()),
    };
    let resource = scope.resource.as_str();
    v1::ChangeEvent {
        schema_version: idsync_proto::SCHEMA_VERSION,
        event_id,
        resource: resource.to_owned(),
        entry_uuid,
        dn,
        kind: if delete {
            v1::ChangeKind::Delete
        } else {
            v1::ChangeKind::Upsert
        } as i32,
        attributes: attributes
            .into_iter()
            .map(|(name, values)| v1::Attribute { name, values })
            .collect(),
        position: Some(v1::SourcePosition {
            csn: csn.unwrap_or_default(),
            cookie: cookie.unwrap_or_default(),
        }),
        detected_at_ms: now_ms(),
        object_type: v1::ObjectType::Account as i32,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
