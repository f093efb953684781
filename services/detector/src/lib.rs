//! The detector: live sync (RFC 4533 refreshAndPersist) from each source
//! resource, one `ChangeEvent` per entry on the change stream. The sync cookie
//! is stored only after JetStream has acknowledged every event before it, so a
//! restart resumes where it left off: nothing lost, nothing reloaded.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idsync_bus::{Bus, BusError, PendingAck, names};
use idsync_core::config::{Config, ResourceConfig};
use idsync_core::model::ObjectType;
use idsync_core::schedule::Schedule;
use idsync_idm_client::{IdmClient, IdmError};
use idsync_ldap::{Connection, EntryState, LdapError, SyncMessage, SyncSession};
use idsync_proto::v1;
use prost::Message as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod reconcile;

pub const SERVICE: &str = "detector";

/// Events published but not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Config(#[from] idsync_runtime::ConfigError),
    #[error("no resource has live_sync = true or a scheduled agreement; nothing to detect")]
    NothingToDo,
    #[error("schedule: {0}")]
    Schedule(String),
}

/// Runs live sync for every resource with `live_sync = true` until `shutdown`.
///
/// # Errors
/// NATS cannot be reached at start, or a bind password cannot be read.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    tracing::debug!(url = %config.nats.url, "connecting to NATS");
    let bus = Bus::connect_with(&config.nats.url, Some(config.nats.retention())).await?;
    // Each agreement's shadows are read with its token, to find what a
    // refresh implies is gone.
    let clients = idsync_runtime::agreement_clients(&config)?;
    let tracker = TaskTracker::new();
    let mut refreshers: Vec<(String, Arc<Notify>)> = Vec::new();
    let mut any_reconciliation = false;
    for resource in &config.resources {
        let schedule = resource
            .agreement
            .as_deref()
            .and_then(|a| config.agreements.get(a))
            .and_then(|a| a.schedule.as_deref());
        let mode = match (resource.live_sync, schedule) {
            (true, _) => Mode::Live,
            (false, Some(expr)) => {
                Mode::Scheduled(Schedule::parse(expr).map_err(|e| Error::Schedule(e.to_string()))?)
            }
            (false, None) => continue,
        };
        let connection =
            Connection::for_resource(resource, idsync_runtime::bind_password(resource)?);
        let agreement = resource.agreement.clone().unwrap_or_default();
        let idm = clients.get(&agreement).cloned();
        let scopes =
            std::iter::once(SyncScope::accounts(resource)).chain(SyncScope::groups(resource));
        for scope in scopes {
            let refresh = Arc::new(Notify::new());
            refreshers.push((agreement.clone(), refresh.clone()));
            tracker.spawn(sync_loop(
                bus.clone(),
                idm.clone(),
                scope,
                mode.clone(),
                connection.clone(),
                refresh,
                shutdown.clone(),
            ));
        }
    }
    for resource in &config.resources {
        let (Some(expr), Some(agreement)) = (&resource.reconcile_schedule, &resource.agreement)
        else {
            continue;
        };
        let schedule = Schedule::parse(expr).map_err(|e| Error::Schedule(e.to_string()))?;
        let Some(idm) = clients.get(agreement).cloned() else {
            continue;
        };
        tracker.spawn(scheduled_reconciliation(
            config.clone(),
            bus.clone(),
            idm,
            resource.name.clone(),
            schedule,
            shutdown.clone(),
        ));
        any_reconciliation = true;
    }
    tracker.close();
    if refreshers.is_empty() && !any_reconciliation {
        return Err(Error::NothingToDo);
    }
    tracker.spawn(refresh_requests(bus.clone(), refreshers, shutdown.clone()));
    tracker.wait().await;
    Ok(())
}

/// Reconciles `resource` in full at each firing of `schedule`.
async fn scheduled_reconciliation(
    config: Arc<Config>,
    bus: Bus,
    idm: IdmClient,
    resource: String,
    schedule: Schedule,
    shutdown: CancellationToken,
) {
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(next) = schedule.next_after(now) else {
            tracing::warn!(%resource, %schedule, "the reconciliation schedule never fires again");
            return;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(next - now)) => {}
        }
        tracing::info!(%resource, "scheduled reconciliation starts");
        let mut last_report = std::time::Instant::now();
        let report = |p: &reconcile::Progress| {
            // Every ten seconds: scanned, changed, deleted, rate, ETA.
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = std::time::Instant::now();
                tracing::info!(
                    resource = %p.resource,
                    scanned = p.scanned,
                    expected = p.expected,
                    changed = p.changed,
                    deleted = p.deleted,
                    errors = p.errors,
                    rate = p.rate().round(),
                    eta_s = p.eta().map(|d| d.as_secs()),
                    "reconciliation progress"
                );
            }
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = reconcile::reconcile(&config, &bus, &idm, &resource, reconcile::Options::default(), report) => r,
        };
        if let Err(e) = result {
            tracing::error!(%resource, error = %e, "scheduled reconciliation failed; next at the next firing");
        }
    }
}

/// Live sync, or polls on a schedule.
#[derive(Debug, Clone)]
enum Mode {
    Live,
    Scheduled(Schedule),
}

/// Restarts the sessions of an agreement without a cookie when an operator
/// asks (`idsync sync force-refresh`).
async fn refresh_requests(
    bus: Bus,
    sessions: Vec<(String, Arc<Notify>)>,
    shutdown: CancellationToken,
) {
    let mut requests = match bus.client().subscribe(names::REFRESH_SUBJECTS).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for refresh requests");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = futures::StreamExt::next(&mut requests) => r,
        };
        let Some(request) = request else { return };
        let Some(agreement) = request.subject.as_str().strip_prefix(names::REFRESH_PREFIX) else {
            continue;
        };
        tracing::info!(agreement, "full refresh requested");
        for (a, notify) in &sessions {
            if a == agreement {
                notify.notify_one();
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SyncScope {
    pub(crate) resource: String,
    /// Key of the session's cookie in the cookie bucket.
    pub(crate) cookie_key: String,
    pub(crate) base_dn: String,
    pub(crate) filter: String,
    pub(crate) object_type: v1::ObjectType,
    /// The agreement the resource writes under: its applier is the end of
    /// the pipeline a refresh's deletions wait for.
    pub(crate) agreement: Option<String>,
}

impl SyncScope {
    pub(crate) fn accounts(r: &ResourceConfig) -> Self {
        Self {
            resource: r.name.clone(),
            cookie_key: r.name.clone(),
            base_dn: r.base_dn.clone(),
            filter: r.filter.clone(),
            object_type: v1::ObjectType::Account,
            agreement: r.agreement.clone(),
        }
    }

    pub(crate) fn groups(r: &ResourceConfig) -> Option<Self> {
        let groups = r.groups.as_ref()?;
        Some(Self {
            resource: r.name.clone(),
            cookie_key: format!("{}.groups", r.name),
            base_dn: r.groups_base().unwrap_or(&r.base_dn).to_owned(),
            filter: groups.filter.clone(),
            object_type: v1::ObjectType::Group,
            agreement: r.agreement.clone(),
        })
    }
}

/// Keeps one resource's sync session going, reconnecting with backoff.
async fn sync_loop(
    bus: Bus,
    idm: Option<IdmClient>,
    resource: SyncScope,
    mode: Mode,
    connection: Connection,
    refresh: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    let mut reset_cookie = false;
    loop {
        if let Mode::Scheduled(schedule) = &mode {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let Some(next) = schedule.next_after(now) else {
                tracing::warn!(resource = %resource.resource, schedule = %schedule, "the schedule never fires again; polling stops");
                return;
            };
            tracing::debug!(resource = %resource.resource, in_s = next - now, "next poll");
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = refresh.notified() => reset_cookie = true,
                _ = tokio::time::sleep(Duration::from_secs(next - now)) => {}
            }
        }
        let persist = matches!(mode, Mode::Live);
        let result = tokio::select! {
            r = session(
                Outputs { bus: &bus, idm: idm.as_ref() },
                &resource,
                &connection,
                &shutdown,
                persist,
                &mut reset_cookie,
                &mut backoff,
            ) => r,
            _ = refresh.notified() => {
                tracing::info!(resource = %resource.resource, "restarting without a cookie: full refresh");
                reset_cookie = true;
                continue;
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        match result {
            Ok(()) if !persist => {
                tracing::info!(resource = %resource.resource, "scheduled poll done");
                continue;
            }
            Ok(()) => {
                tracing::info!(resource = %resource.resource, "sync session ended; reconnecting")
            }
            Err(SessionError::Ldap(LdapError::RefreshRequired)) => {
                tracing::warn!(resource = %resource.resource, "source asks for a full refresh; restarting without a cookie");
                reset_cookie = true;
                continue;
            }
            // OpenLDAP's answer to a cookie ahead of its own state: the
            // source was restored from a backup, or the cookie is another's.
            // The cookie is no use any more; read everything again.
            Err(SessionError::Ldap(LdapError::Operation { rc: 53, text, .. }))
                if text.contains("newer than provider") =>
            {
                tracing::warn!(resource = %resource.resource, reason = %text, "the source is behind the stored cookie (restored from a backup?); restarting without a cookie");
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
    #[error("reading the IDM's shadows: {0}")]
    Idm(#[from] IdmError),
}

/// Events published and the cookie that becomes safe once they are acked.
pub(crate) struct Publisher<'a> {
    /// Suffix of event ids in a full refresh.
    pub(crate) refresh: Option<String>,
    pub(crate) bus: &'a Bus,
    pub(crate) cookie_key: &'a str,
    pub(crate) subject: String,
    pub(crate) object_type: v1::ObjectType,
    pub(crate) in_flight: VecDeque<PendingAck>,
    pub(crate) published: u64,
    /// Entries too large to publish.
    pub(crate) skipped: u64,
}

impl Publisher<'_> {
    pub(crate) async fn publish(&mut self, mut event: v1::ChangeEvent) -> Result<(), BusError> {
        event.object_type = self.object_type as i32;
        if let Some(suffix) = &self.refresh {
            event.event_id.push_str(suffix);
        }
        // An entry larger than the server takes is refused alone: the
        // session goes on with the next (a failed publish would end it and
        // retry the same entry for ever).
        let size = event.encoded_len();
        let limit = self.bus.max_payload();
        if limit > 0 && size + 1024 > limit {
            tracing::error!(
                resource = %event.resource,
                dn = %event.dn,
                entry_uuid = %event.entry_uuid,
                bytes = size,
                max_payload = limit,
                "entry too large for the NATS server's max_payload; skipped (raise max_payload to carry it)"
            );
            self.skipped += 1;
            return Ok(());
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT
            && let Some(oldest) = self.in_flight.pop_front()
        {
            oldest.wait().await?;
        }
        let publish =
            self.bus
                .publish(&self.subject, &event.event_id, event.encode_to_vec().into());
        // With traces on, each change starts its own trace (the correlator,
        // the applier, the IDM and the provisioner continue it); off, a
        // refresh of a million entries makes no span at all.
        let ack = if idsync_telemetry::trace::enabled() {
            let span = tracing::info_span!(
                parent: None,
                "change detected",
                resource = %event.resource,
                dn = %event.dn,
                entry_uuid = %event.entry_uuid
            );
            tracing::Instrument::instrument(publish, span).await?
        } else {
            publish.await?
        };
        self.in_flight.push_back(ack);
        self.published += 1;
        Ok(())
    }

    /// Waits for every event to be stored, then stores `cookie`.
    pub(crate) async fn commit(&mut self, cookie: Option<&[u8]>) -> Result<(), BusError> {
        while let Some(ack) = self.in_flight.pop_front() {
            ack.wait().await?;
        }
        if let Some(cookie) = cookie {
            self.bus.store_cookie(self.cookie_key, cookie).await?;
            tracing::debug!(key = self.cookie_key, cookie = %String::from_utf8_lossy(cookie), "cookie stored");
        }
        Ok(())
    }
}

/// Where a session's results go: the bus, and the IDM it compares with.
#[derive(Clone, Copy)]
struct Outputs<'a> {
    bus: &'a Bus,
    idm: Option<&'a IdmClient>,
}

async fn session(
    outputs: Outputs<'_>,
    resource: &SyncScope,
    connection: &Connection,
    shutdown: &CancellationToken,
    persist: bool,
    reset_cookie: &mut bool,
    backoff: &mut Duration,
) -> Result<(), SessionError> {
    let Outputs { bus, idm } = outputs;
    let cookie = if *reset_cookie {
        None
    } else {
        bus.load_cookie(&resource.cookie_key).await?
    };
    let resumed = cookie.is_some();
    tracing::debug!(key = %resource.cookie_key, cookie = ?cookie.as_deref().map(String::from_utf8_lossy), "cookie loaded");
    // Everything published before this session: a refresh's deletions wait
    // until the pipeline has taken it (see `Sweep`).
    let before = match idm {
        Some(_) => bus.last_sequence(names::CHANGES_STREAM).await?,
        None => 0,
    };
    let mut sync = SyncSession::start(
        connection,
        &resource.base_dn,
        &resource.filter,
        cookie,
        persist,
    )
    .await?;
    *reset_cookie = false;
    // A full refresh reads every entry again: its events get ids of their
    // own, so that JetStream's de-duplication does not drop them as the
    // states they were the first time.
    let refresh = (!resumed).then(|| format!(":full{}", now_ms()));
    tracing::info!(resource = %resource.resource, resumed, persist, "sync session started");
    idsync_telemetry::health::set_ready(true);
    let mut refreshing = Some(Refreshing::default());
    let mut out = Publisher {
        refresh,
        bus,
        cookie_key: &resource.cookie_key,
        subject: names::change_subject(&resource.resource),
        object_type: resource.object_type,
        in_flight: VecDeque::new(),
        published: 0,
        skipped: 0,
    };
    let mut sweep_tick = tokio::time::interval(SWEEP_POLL);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sweeping = refreshing.as_ref().is_some_and(|r| r.sweep.is_some());
        let message = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Events already published are acked before we go; the cookie
                // stays at the last point known to be safe.
                out.commit(None).await?;
                let _ = sync.close().await;
                return Ok(());
            }
            _ = sweep_tick.tick(), if sweeping => {
                if let Some(r) = refreshing.as_mut()
                    && sweep_if_caught_up(&mut out, resource, idm, r).await?
                {
                    let cookie = refreshing.take().and_then(|r| r.cookie);
                    out.commit(cookie.as_deref()).await?;
                }
                continue;
            }
            m = sync.next() => m?,
        };
        let Some(message) = message else {
            // A refreshOnly session ends with its refresh: its deletions
            // are published (and its cookie stored) before it returns.
            if let Some(mut r) = refreshing.take_if(|r| r.sweep.is_some()) {
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => {
                            out.commit(None).await?;
                            return Ok(());
                        }
                        _ = sweep_tick.tick() => {}
                    }
                    if sweep_if_caught_up(&mut out, resource, idm, &mut r).await? {
                        break;
                    }
                }
                out.commit(r.cookie.as_deref()).await?;
                return Ok(());
            }
            out.commit(None).await?;
            return Ok(());
        };
        *backoff = Duration::from_millis(250);
        match message {
            SyncMessage::Entry {
                entry_uuid,
                state: EntryState::Present,
                cookie,
                ..
            } => {
                // Unchanged since the cookie: not a change, only a name the
                // present phase lists.
                if let Some(r) = refreshing.as_mut() {
                    r.see(&entry_uuid);
                    r.present_phase = true;
                }
                hold_or_commit(&mut out, &mut refreshing, cookie).await?;
            }
            SyncMessage::Entry {
                entry_uuid,
                dn,
                state,
                attributes,
                csn,
                cookie,
            } => {
                if let Some(r) = refreshing.as_mut() {
                    r.see(&entry_uuid);
                }
                let event = change_event(
                    resource,
                    entry_uuid,
                    dn,
                    state,
                    attributes,
                    csn,
                    cookie.clone(),
                );
                tracing::debug!(resource = %resource.resource, key = %resource.cookie_key, dn = %event.dn, entry_uuid = %event.entry_uuid, ?state, cookie = ?event.position.as_ref().map(|p| String::from_utf8_lossy(&p.cookie).into_owned()), "change");
                out.publish(event).await?;
                hold_or_commit(&mut out, &mut refreshing, cookie).await?;
            }
            SyncMessage::Deleted {
                entry_uuids,
                cookie,
            } => {
                tracing::debug!(resource = %resource.resource, key = %resource.cookie_key, base = %resource.base_dn, deleted = ?entry_uuids, cookie = ?cookie.as_deref().map(String::from_utf8_lossy), "deleted while away");
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
                hold_or_commit(&mut out, &mut refreshing, cookie).await?;
            }
            SyncMessage::Present {
                entry_uuids,
                cookie,
            } => {
                tracing::debug!(resource = %resource.resource, present = entry_uuids.len(), "present phase ids");
                if let Some(r) = refreshing.as_mut() {
                    entry_uuids.iter().for_each(|u| r.see(u));
                    r.present_phase = true;
                }
                hold_or_commit(&mut out, &mut refreshing, cookie).await?;
            }
            SyncMessage::RefreshDone { cookie, deletes } => {
                tracing::debug!(key = %resource.cookie_key, deletes, cookie = ?cookie.as_deref().map(String::from_utf8_lossy), "refresh done message");
                if let Some(r) = refreshing.as_mut() {
                    if cookie.is_some() {
                        r.cookie = cookie;
                    }
                    // A present phase (or a refresh from nothing) names what
                    // is still there; whatever the IDM knows beyond that is
                    // gone, once the pipeline has applied what was published
                    // before: until then the refresh's cookie is held.
                    if (!resumed || (!deletes && r.present_phase)) && idm.is_some() {
                        tracing::debug!(resource = %resource.resource, through = before, "refresh's deletions wait for the pipeline");
                        r.sweep = Some(Stage::Changes { through: before });
                        r.waiting_since = Instant::now();
                    } else {
                        if !resumed || (!deletes && r.present_phase) {
                            tracing::warn!(resource = %resource.resource, "no agreement, so no IDM to compare with: deletions implied by the refresh are not published");
                        }
                        let cookie = refreshing.take().and_then(|r| r.cookie);
                        out.commit(cookie.as_deref()).await?;
                    }
                } else {
                    out.commit(cookie.as_deref()).await?;
                }
                out.refresh = None;
                tracing::info!(resource = %resource.resource, events = out.published, too_large = out.skipped, "refresh done");
                idsync_telemetry::metrics::add(
                    "idsync_detected_events_total",
                    "Change events published by the detector, by resource.",
                    &[("resource", &resource.resource)],
                    out.published as u64,
                );
            }
            SyncMessage::Cookie(cookie) => {
                tracing::debug!(key = %resource.cookie_key, cookie = %String::from_utf8_lossy(&cookie), "new cookie");
                hold_or_commit(&mut out, &mut refreshing, Some(cookie)).await?;
            }
        }
    }
}

/// How often a refresh's deletions look whether the pipeline has caught up.
const SWEEP_POLL: Duration = Duration::from_millis(200);
/// How often a refresh's deletions that still wait say so.
const SWEEP_REPORT: Duration = Duration::from_secs(30);

/// What a refresh has named so far, and the cookie it will store at its end.
/// During a refresh no cookie is stored: if the session breaks before the
/// deletions the refresh implies are published, the next one starts over.
///
/// Those deletions are whatever the IDM has a shadow of and the refresh did
/// not name. An entry whose add was published before this session but is
/// not applied yet (still in the change or the decision stream) has no
/// shadow, so they wait (`sweep`) until the correlator and then the
/// agreement's applier have taken everything published before the session
/// began; the entries the session names meanwhile count as named.
struct Refreshing {
    /// Entry UUIDs as numbers (16 bytes each: a million entries take 16 MB).
    seen: HashSet<u128>,
    /// UUIDs that do not parse as such, kept as text.
    seen_text: HashSet<String>,
    cookie: Option<Vec<u8>>,
    /// The server sent a present phase (a Present id set or entry). 389-ds
    /// ends a resumed refreshOnly with refreshDeletes=FALSE after sending
    /// its deletions as an id set, with no present phase at all: that must
    /// not read as "everything unnamed is gone".
    present_phase: bool,
    /// The refresh is done and its deletions wait for the pipeline.
    sweep: Option<Stage>,
    waiting_since: Instant,
}

impl Default for Refreshing {
    fn default() -> Self {
        Self {
            seen: HashSet::new(),
            seen_text: HashSet::new(),
            cookie: None,
            present_phase: false,
            sweep: None,
            waiting_since: Instant::now(),
        }
    }
}

/// How far the pipeline must have come before a refresh's deletions.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// The correlator has acknowledged the change stream up to `through`.
    Changes { through: u64 },
    /// The agreement's applier has acknowledged the decision stream up to
    /// `through` (its last message when the correlator got there).
    Decisions { through: u64 },
}

/// Publishes the deletions `r` implies if the pipeline has caught up with
/// what was published before the session, and says whether it did.
async fn sweep_if_caught_up(
    out: &mut Publisher<'_>,
    scope: &SyncScope,
    idm: Option<&IdmClient>,
    r: &mut Refreshing,
) -> Result<bool, SessionError> {
    let agreement = scope.agreement.as_deref().unwrap_or_default();
    loop {
        match r.sweep {
            None => return Ok(true),
            Some(Stage::Changes { through }) => {
                if through > 0
                    && !out
                        .bus
                        .consumed_through(names::CHANGES_STREAM, names::CORRELATOR, through)
                        .await?
                {
                    break;
                }
                let decisions = out.bus.last_sequence(names::DECISIONS_STREAM).await?;
                r.sweep = Some(Stage::Decisions {
                    through: if through > 0 { decisions } else { 0 },
                });
            }
            Some(Stage::Decisions { through }) => {
                let durable = names::applier_durable(agreement);
                if through > 0
                    && !out
                        .bus
                        .consumed_through(names::DECISIONS_STREAM, &durable, through)
                        .await?
                {
                    break;
                }
                let gone = publish_gone(out, scope, idm, r).await?;
                if gone > 0 {
                    tracing::info!(resource = %scope.resource, gone, "entries gone from the source while nobody listened");
                }
                r.sweep = None;
                return Ok(true);
            }
        }
    }
    if r.waiting_since.elapsed() >= SWEEP_REPORT {
        r.waiting_since = Instant::now();
        tracing::info!(resource = %scope.resource, stage = ?r.sweep, "the refresh's deletions still wait for the correlator and the applier to take what was published before the session");
    }
    Ok(false)
}

impl Refreshing {
    fn see(&mut self, uuid: &str) {
        match uuid_number(uuid) {
            Some(n) => {
                self.seen.insert(n);
            }
            None => {
                self.seen_text.insert(uuid.to_owned());
            }
        }
    }

    fn has_seen(&self, uuid: &str) -> bool {
        match uuid_number(uuid) {
            Some(n) => self.seen.contains(&n),
            None => self.seen_text.contains(uuid),
        }
    }
}

pub(crate) fn uuid_number(uuid: &str) -> Option<u128> {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// Stores `cookie` now, or keeps it for the end of the refresh.
async fn hold_or_commit(
    out: &mut Publisher<'_>,
    refreshing: &mut Option<Refreshing>,
    cookie: Option<Vec<u8>>,
) -> Result<(), BusError> {
    match refreshing {
        Some(r) => {
            if cookie.is_some() {
                r.cookie = cookie;
            }
            Ok(())
        }
        None if cookie.is_some() => out.commit(cookie.as_deref()).await,
        None => Ok(()),
    }
}

/// Publishes a deletion for every live shadow of this session's kind that
/// the refresh did not name, reading the IDM's shadows page by page.
async fn publish_gone(
    out: &mut Publisher<'_>,
    scope: &SyncScope,
    idm: Option<&IdmClient>,
    refresh: &Refreshing,
) -> Result<u64, SessionError> {
    let Some(idm) = idm else {
        return Ok(0);
    };
    let kind = match scope.object_type {
        v1::ObjectType::Group => ObjectType::Group,
        v1::ObjectType::Account => ObjectType::Account,
    };
    let mut after = String::new();
    let mut gone = 0;
    loop {
        let page = idm.shadow_summaries(&scope.resource, &after, 1000).await?;
        let Some(last) = page.last() else {
            return Ok(gone);
        };
        after = last.entry_uuid.clone();
        for shadow in page {
            if shadow.dead || shadow.object_type != kind || refresh.has_seen(&shadow.entry_uuid) {
                continue;
            }
            let event = change_event(
                scope,
                shadow.entry_uuid,
                shadow.dn,
                EntryState::Delete,
                Vec::new(),
                None,
                None,
            );
            out.publish(event).await?;
            gone += 1;
        }
    }
}

/// The event for one entry. Its id (also the JetStream message id) is the
/// session, the entry and its entryCSN, so the same state read twice is
/// stored once.
pub(crate) fn change_event(
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

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
