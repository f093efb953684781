//! Reconciliation: a full comparison of a resource with the IDM, for what live
//! sync cannot see (changes made while nobody listened, a lost cookie, drift).
//!
//! A source resource is scanned page by page; each entry is compared with its
//! shadow (by entryCSN) and only changed or new entries become change events.
//! The identifiers seen are kept as 16-byte numbers in sorted runs that spill
//! to disk past a bound, and merged at the end with the IDM's shadows, read
//! in identifier order: every live shadow whose entry was not seen becomes a
//! deletion. Memory stays bounded whatever the size of the directory.
//!
//! An entry the scan could not read (no identifier, or one that does not
//! decode) was not seen either, yet it is not gone: when any entry of a scope
//! could not be read, that scope publishes no deletion at all ("withheld",
//! reported in [`Progress::withheld`]); its changed and new entries still are.
//!
//! A target resource (one idsync provisions) is scanned the same way: an
//! account whose shadow links it to a user has that user provisioned again
//! (the provisioner reads the account and puts back what strong mappings
//! demand); an account that no user calls for is an orphan, reported and
//! handled by the resource's `unmatched` reaction (`delete_shadow`,
//! `inactivate_shadow`, or nothing); a linked account that is gone has its
//! user provisioned again, which re-creates it — unless some account could
//! not be read, when none is taken for gone.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{BufReader, BufWriter, Read as _, Write as _};
use std::time::{Duration, Instant};

use idsync_bus::{Bus, BusError, names};
use idsync_core::config::{Config, ResourceConfig};
use idsync_core::model::{ObjectType, Shadow, SourceChange};
use idsync_core::situation::{Reaction, Situation};
use idsync_idm_client::{IdmClient, IdmError};
use idsync_ldap::{Connection, Directory, EntryState, LdapError, Scan, ScannedEntry};
use idsync_proto::v1;
use prost::Message as _;

use crate::{Publisher, SyncScope, change_event, now_ms, uuid_number};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Ldap(#[from] LdapError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Idm(#[from] IdmError),
    #[error(transparent)]
    Config(#[from] idsync_runtime::ConfigError),
    #[error("resource {0:?} is not in the configuration")]
    UnknownResource(String),
    #[error("spill file for the identifiers seen: {0}")]
    Spill(String),
    #[error("an entry read does not make a change event: {0}")]
    Event(String),
}

/// How a reconciliation runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// At most this many entries a second (spares the directory); unlimited when `None`.
    pub rate: Option<u32>,
    /// Identifiers held in memory before a sorted run spills to disk.
    pub run_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rate: None,
            run_size: 1 << 20,
        }
    }
}

/// Where a reconciliation stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub resource: String,
    pub scanned: u64,
    /// Entries that differ from their shadow (or have none): events published.
    pub changed: u64,
    /// Shadows whose entry is gone: deletions published.
    pub deleted: u64,
    /// Target accounts no user calls for.
    pub orphans: u64,
    /// Users provisioned again (target resources).
    pub reprovisioned: u64,
    /// Entries skipped, each logged: unreadable, with an identifier that is
    /// not a UUID, or too large for the bus.
    pub errors: u64,
    /// Scopes whose gone pass did not run because some of their entries
    /// could not be read (an entry not read cannot be told from one that is
    /// gone): no deletion published, no user provisioned again for an
    /// account that looks gone.
    pub withheld: Vec<Withheld>,
    /// Live shadows the IDM holds for the resource: the expected total.
    pub expected: u64,
    pub elapsed: Duration,
}

impl Progress {
    /// Entries a second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.scanned as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the current rate, when the total is known.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0 && self.expected > self.scanned)
            .then(|| Duration::from_secs_f64((self.expected - self.scanned) as f64 / rate))
    }
}

/// A scope whose shadows were not compared with what was read: entries of it
/// could not be read, and any of them could be one of the shadows not seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Withheld {
    /// Accounts or groups.
    pub object_type: ObjectType,
    /// Entries of the scope that could not be read.
    pub unreadable: u64,
    /// A target resource: what was withheld is provisioning users again,
    /// not deletions.
    pub target: bool,
    /// Why the first few could not be read (at most [`Withheld::EXAMPLES`]).
    pub examples: Vec<String>,
}

impl Withheld {
    /// Reasons kept, so that a report can name entries without holding them all.
    pub const EXAMPLES: usize = 3;

    /// `account` or `group`.
    pub fn kind(&self) -> &'static str {
        match self.object_type {
            ObjectType::Account => "account",
            ObjectType::Group => "group",
        }
    }
}

impl std::fmt::Display for Withheld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (n, kind) = (self.unreadable, self.kind());
        let entries = if n == 1 { "entry" } else { "entries" };
        if self.target {
            write!(
                f,
                "{n} {kind} {entries} could not be read, so no user was provisioned again \
                 for an account that looks gone (an entry not read cannot be told from one that is gone)"
            )
        } else {
            write!(
                f,
                "{n} {kind} {entries} could not be read, so no {kind} deletion was published \
                 (an entry not read cannot be told from one that is gone)"
            )
        }
    }
}

/// What a scope's read left out: `None` when every entry was read and the
/// gone pass may run.
fn withheld(
    object_type: ObjectType,
    target: bool,
    unreadable: u64,
    examples: Vec<String>,
) -> Option<Withheld> {
    (unreadable > 0).then_some(Withheld {
        object_type,
        unreadable,
        target,
        examples,
    })
}

/// Sorted runs of identifiers: in memory up to a bound, then on disk.
struct Seen {
    current: Vec<u128>,
    run_size: usize,
    spilled: Vec<tempfile::NamedTempFile>,
}

impl Seen {
    fn new(run_size: usize) -> Self {
        Self {
            current: Vec::new(),
            run_size: run_size.max(1),
            spilled: Vec::new(),
        }
    }

    fn insert(&mut self, id: u128) -> Result<(), ReconcileError> {
        self.current.push(id);
        if self.current.len() >= self.run_size {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<(), ReconcileError> {
        let err = |e: std::io::Error| ReconcileError::Spill(e.to_string());
        self.current.sort_unstable();
        let file = tempfile::NamedTempFile::new().map_err(err)?;
        {
            let mut w = BufWriter::new(file.as_file());
            for id in self.current.drain(..) {
                w.write_all(&id.to_be_bytes()).map_err(err)?;
            }
            w.flush().map_err(err)?;
        }
        self.spilled.push(file);
        Ok(())
    }

    /// All identifiers, ascending (duplicates possible), from every run.
    fn merged(mut self) -> Result<Merged, ReconcileError> {
        let err = |e: std::io::Error| ReconcileError::Spill(e.to_string());
        self.current.sort_unstable();
        let mut runs: Vec<Run> = vec![Run::Memory(self.current.into())];
        for file in self.spilled {
            let reader = BufReader::new(file.reopen().map_err(err)?);
            runs.push(Run::File {
                reader,
                _file: file,
            });
        }
        let mut heap = BinaryHeap::new();
        for (i, run) in runs.iter_mut().enumerate() {
            if let Some(v) = run.next()? {
                heap.push(std::cmp::Reverse((v, i)));
            }
        }
        Ok(Merged { runs, heap })
    }
}

enum Run {
    Memory(VecDeque<u128>),
    /// The file is removed when the run is dropped.
    File {
        reader: BufReader<std::fs::File>,
        _file: tempfile::NamedTempFile,
    },
}

impl Run {
    fn next(&mut self) -> Result<Option<u128>, ReconcileError> {
        match self {
            Run::Memory(v) => Ok(v.pop_front()),
            Run::File { reader: r, .. } => {
                let mut buf = [0u8; 16];
                match r.read_exact(&mut buf) {
                    Ok(()) => Ok(Some(u128::from_be_bytes(buf))),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(ReconcileError::Spill(e.to_string())),
                }
            }
        }
    }
}

/// A k-way merge of sorted runs, asked in ascending order.
struct Merged {
    runs: Vec<Run>,
    heap: BinaryHeap<std::cmp::Reverse<(u128, usize)>>,
}

impl Merged {
    /// Whether `id` was seen; calls must come in ascending order of `id`.
    fn contains(&mut self, id: u128) -> Result<bool, ReconcileError> {
        while let Some(std::cmp::Reverse((v, i))) = self.heap.peek().copied() {
            if v > id {
                return Ok(false);
            }
            self.heap.pop();
            if let Some(next) = self.runs.get_mut(i).map(Run::next).transpose()?.flatten() {
                self.heap.push(std::cmp::Reverse((next, i)));
            }
            if v == id {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Keeps to `rate` entries a second.
struct Pace {
    rate: Option<u32>,
    start: Instant,
}

impl Pace {
    async fn step(&self, done: u64) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return;
        };
        let due = Duration::from_secs_f64(done as f64 / f64::from(rate));
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Reconciles resource `name`, calling `report` after every page.
///
/// A scope (accounts, groups) of which some entry could not be read publishes
/// no deletion (on a target, no user is provisioned again for an account that
/// looks gone): it is listed in [`Progress::withheld`] and logged, and the run
/// still succeeds with the changes it read.
///
/// # Errors
/// The resource is unknown, its directory, NATS or the IDM fails.
pub async fn reconcile(
    config: &Config,
    bus: &Bus,
    idm: &IdmClient,
    name: &str,
    options: Options,
    mut report: impl FnMut(&Progress),
) -> Result<Progress, ReconcileError> {
    let resource = config
        .resources
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ReconcileError::UnknownResource(name.to_owned()))?;
    let conn = Connection::for_resource(resource, idsync_runtime::bind_password(resource)?);
    let mut progress = Progress {
        resource: name.to_owned(),
        expected: idm.live_shadows(name).await?,
        ..Default::default()
    };
    let started = Instant::now();
    let pace = Pace {
        rate: options.rate.or(resource.reconcile_rate),
        start: started,
    };
    let is_target = resource.agreement.is_none() && resource.dn_template.is_some();
    let scopes: Vec<SyncScope> = if is_target {
        vec![SyncScope::accounts(resource)]
    } else {
        std::iter::once(SyncScope::accounts(resource))
            .chain(SyncScope::groups(resource))
            .collect()
    };
    let run = now_ms();
    for scope in &scopes {
        let mut out = Publisher {
            refresh: Some(format!(":reconcile{run}")),
            bus,
            cookie_key: &scope.cookie_key,
            subject: names::change_subject(&scope.resource),
            object_type: scope.object_type,
            in_flight: VecDeque::new(),
            published: 0,
            skipped: 0,
        };
        let mut seen = Seen::new(options.run_size);
        let mut scan =
            Scan::start(&conn, &scope.base_dn, &scope.filter, &resource.id_attribute).await?;
        // The next page is read from the directory while this one is
        // compared with the IDM's shadows: a page ahead at most.
        let (pages, pending) = tokio::sync::mpsc::channel::<Vec<ScannedEntry>>(1);
        let read = async {
            let pages = pages;
            let mut unreadable = 0;
            let mut examples = Vec::new();
            let mut page = Vec::with_capacity(idsync_ldap::PAGE_SIZE as usize);
            loop {
                let entry = match scan.next().await {
                    Ok(e) => e,
                    Err(e @ LdapError::Protocol { .. }) => {
                        tracing::warn!(resource = name, error = %e, "an entry could not be read; skipped");
                        unreadable += 1;
                        if examples.len() < Withheld::EXAMPLES {
                            examples.push(e.to_string());
                        }
                        continue;
                    }
                    Err(e) => return Err(ReconcileError::from(e)),
                };
                let end = entry.is_none();
                page.extend(entry);
                if (page.len() >= idsync_ldap::PAGE_SIZE as usize || end)
                    && !page.is_empty()
                    // The comparing side stopped (it failed): so do we.
                    && pages.send(std::mem::take(&mut page)).await.is_err()
                {
                    break;
                }
                if end {
                    break;
                }
            }
            Ok::<_, ReconcileError>((unreadable, examples))
        };
        // The comparing side owns the receiver: when it fails, the reader's
        // next send fails and it stops too.
        let compare = async {
            let mut pending = pending;
            while let Some(batch) = pending.recv().await {
                for e in &batch {
                    match uuid_number(&e.entry_uuid) {
                        Some(n) => seen.insert(n)?,
                        None => {
                            tracing::warn!(resource = name, dn = %e.dn, id = %e.entry_uuid, "an identifier that is not a UUID; skipped");
                            progress.errors += 1;
                        }
                    }
                }
                if is_target {
                    target_page(resource, bus, idm, &conn, batch, &mut progress).await?;
                } else {
                    source_page(config, scope, idm, &mut out, batch, &mut progress).await?;
                }
                progress.elapsed = started.elapsed();
                report(&progress);
                pace.step(progress.scanned).await;
            }
            Ok::<(), ReconcileError>(())
        };
        let (read, compared) = tokio::join!(read, compare);
        compared?;
        let (unreadable, examples) = read?;
        progress.errors += unreadable;
        let kind = kind_of(scope);
        if let Some(w) = withheld(kind, is_target, unreadable, examples) {
            tracing::warn!(
                resource = name,
                object_type = w.kind(),
                unreadable,
                "{w}; the gone pass of this scope was skipped"
            );
            progress.withheld.push(w);
        } else {
            gone_pass(bus, idm, scope, is_target, seen, &mut out, &mut progress).await?;
        }
        out.commit(None).await?;
        // Entries too large for the bus were refused (each logged).
        progress.errors += out.skipped;
    }
    progress.elapsed = started.elapsed();
    report(&progress);
    tracing::info!(
        resource = name,
        scanned = progress.scanned,
        changed = progress.changed,
        deleted = progress.deleted,
        orphans = progress.orphans,
        reprovisioned = progress.reprovisioned,
        errors = progress.errors,
        withheld = progress.withheld.len(),
        elapsed_ms = progress.elapsed.as_millis() as u64,
        "reconciliation done"
    );
    Ok(progress)
}

/// Every live shadow of the scope's kind whose entry was not seen is gone: a
/// deletion is published (source), or its user is provisioned again (target).
async fn gone_pass(
    bus: &Bus,
    idm: &IdmClient,
    scope: &SyncScope,
    is_target: bool,
    seen: Seen,
    out: &mut Publisher<'_>,
    progress: &mut Progress,
) -> Result<(), ReconcileError> {
    let name = scope.resource.as_str();
    let mut merged = seen.merged()?;
    let kind = kind_of(scope);
    let mut after = String::new();
    loop {
        let shadows = idm.shadow_summaries(name, &after, 1000).await?;
        let Some(last) = shadows.last() else { break };
        after = last.entry_uuid.clone();
        for shadow in shadows {
            if shadow.dead || shadow.object_type != kind {
                continue;
            }
            let Some(n) = uuid_number(&shadow.entry_uuid) else {
                continue;
            };
            if merged.contains(n)? {
                continue;
            }
            if is_target {
                gone_target(bus, idm, &shadow, progress).await?;
            } else {
                let event = change_event(
                    scope,
                    shadow.entry_uuid.clone(),
                    shadow.dn.clone(),
                    EntryState::Delete,
                    Vec::new(),
                    None,
                    None,
                );
                out.publish(event).await?;
                progress.deleted += 1;
            }
        }
    }
    Ok(())
}

/// Source entries: publish those that differ from their shadows — by
/// entryCSN, or, for a source that keeps none (389-ds without replication),
/// by the values the shadow holds.
async fn source_page(
    config: &Config,
    scope: &SyncScope,
    idm: &IdmClient,
    out: &mut Publisher<'_>,
    batch: Vec<ScannedEntry>,
    progress: &mut Progress,
) -> Result<(), ReconcileError> {
    let shadows = shadows_of(idm, &scope.resource, &batch).await?;
    for entry in batch {
        progress.scanned += 1;
        let event = change_event(
            scope,
            entry.entry_uuid,
            entry.dn,
            EntryState::Add,
            entry.attributes,
            entry.csn,
            None,
        );
        let unchanged = match shadows.get(&event.entry_uuid).filter(|s| !s.dead) {
            None => false,
            Some(s) => match event.position.as_ref().map(|p| p.csn.as_str()) {
                Some(csn) if !csn.is_empty() => s.csn == csn,
                _ => {
                    let mut change = SourceChange::try_from(event.clone())
                        .map_err(|e| ReconcileError::Event(e.to_string()))?;
                    change.object_type = kind_of(scope);
                    idsync_core::inbound::shadow_snapshot(config, &change)
                        .is_ok_and(|snapshot| snapshot == s.attributes && s.dn == event.dn)
                }
            },
        };
        if unchanged {
            continue;
        }
        out.publish(event).await?;
        progress.changed += 1;
    }
    Ok(())
}

fn kind_of(scope: &SyncScope) -> ObjectType {
    match scope.object_type {
        v1::ObjectType::Group => ObjectType::Group,
        v1::ObjectType::Account => ObjectType::Account,
    }
}

/// The shadows of a page's entries, in one call.
async fn shadows_of(
    idm: &IdmClient,
    resource: &str,
    batch: &[ScannedEntry],
) -> Result<HashMap<String, Shadow>, ReconcileError> {
    let uuids = batch.iter().map(|e| e.entry_uuid.clone()).collect();
    // Entries with a CSN are compared by it; the others by values.
    let values = batch
        .iter()
        .any(|e| e.csn.as_deref().is_none_or(str::is_empty));
    Ok(idm
        .get_shadows(resource, uuids, values)
        .await?
        .into_iter()
        .map(|s| (s.entry_uuid.clone(), s))
        .collect())
}

/// Target accounts: linked ones have their user provisioned again (drift is
/// put back); the others are orphans, handled by the `unmatched` reaction.
async fn target_page(
    resource: &ResourceConfig,
    bus: &Bus,
    idm: &IdmClient,
    conn: &Connection,
    batch: Vec<ScannedEntry>,
    progress: &mut Progress,
) -> Result<(), ReconcileError> {
    let shadows = shadows_of(idm, &resource.name, &batch).await?;
    let reaction = resource
        .reactions
        .get(&Situation::Unmatched)
        .map_or(Reaction::Nothing, |r| r.action);
    let mut dir: Option<Directory> = None;
    let base = idsync_core::model::normalize_dn(&resource.base_dn);
    for entry in batch {
        progress.scanned += 1;
        // The subtree's own top entry is not an account.
        if idsync_core::model::normalize_dn(&entry.dn) == base {
            continue;
        }
        let owner = shadows
            .get(&entry.entry_uuid)
            .filter(|s| !s.dead)
            .and_then(|s| s.focus_id.clone());
        if let Some(focus_id) = owner {
            reprovision(bus, idm, &focus_id, progress).await?;
            continue;
        }
        progress.orphans += 1;
        tracing::warn!(resource = %resource.name, dn = %entry.dn, %reaction, "orphan: an account no user calls for");
        let dir = match &mut dir {
            Some(d) => d,
            None => dir.insert(
                Directory::connect(conn)
                    .await?
                    .with_id_attribute(&resource.id_attribute),
            ),
        };
        match reaction {
            Reaction::DeleteShadow => match dir.delete(&entry.dn).await {
                Ok(()) | Err(LdapError::NoSuchObject { .. }) => {}
                Err(e) => return Err(e.into()),
            },
            Reaction::InactivateShadow => {
                if let Some(disable) = &resource.disable {
                    let mods = [(disable.attribute.clone(), vec![disable.value.clone()])];
                    dir.replace(&entry.dn, &mods).await?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A linked target account is gone: its user is provisioned again.
async fn gone_target(
    bus: &Bus,
    idm: &IdmClient,
    shadow: &Shadow,
    progress: &mut Progress,
) -> Result<(), ReconcileError> {
    if let Some(focus_id) = &shadow.focus_id {
        tracing::warn!(resource = %shadow.resource, dn = %shadow.dn, "a linked account is gone; provisioning its user again");
        reprovision(bus, idm, focus_id, progress).await?;
    }
    Ok(())
}

/// Publishes the user's current state to the focus stream, as the IDM's
/// outbox does: the provisioner brings every account of it in line.
async fn reprovision(
    bus: &Bus,
    idm: &IdmClient,
    focus_id: &str,
    progress: &mut Progress,
) -> Result<(), ReconcileError> {
    let Some(focus) = idm.get_focus(focus_id).await? else {
        return Ok(());
    };
    let change = v1::FocusChange {
        schema_version: idsync_proto::SCHEMA_VERSION,
        outbox_seq: 0,
        focus_id: focus.id.clone(),
        focus: Some(focus.clone().into()),
        deleted: false,
        origin_resource: String::new(),
        // Nothing changed at the user: strong mappings are enforced, normal
        // ones (which follow changes of their sources) are not.
        before_attributes: focus
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v1::Values { values: v.clone() }))
            .collect(),
        has_before: true,
        traceparent: String::new(),
        links_added_only: false,
    };
    bus.publish_and_wait(
        names::FOCUS_SUBJECT,
        &format!("reconcile:{}:{}", focus.id, focus.version),
        change.encode_to_vec().into(),
    )
    .await?;
    progress.reprovisioned += 1;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn spilled_runs_merge_into_one_ascending_membership_test() {
        let mut seen = Seen::new(3);
        let ids: Vec<u128> = vec![50, 7, 99, 3, 42, 7, 1000, 8, 1];
        for id in &ids {
            seen.insert(*id).unwrap();
        }
        assert_eq!(seen.spilled.len(), 3, "runs of three spill");
        let mut merged = seen.merged().unwrap();
        let mut found = Vec::new();
        for probe in 0..1001u128 {
            if merged.contains(probe).unwrap() {
                found.push(probe);
            }
        }
        let mut expected = ids.clone();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(found, expected);
    }

    #[test]
    fn a_scope_with_an_unreadable_entry_withholds_its_gone_pass() {
        assert_eq!(withheld(ObjectType::Account, false, 0, Vec::new()), None);
        let w = withheld(
            ObjectType::Account,
            false,
            1,
            vec!["entry uid=anna has no entryUUID".into()],
        )
        .unwrap();
        assert_eq!((w.unreadable, w.kind()), (1, "account"));
        assert_eq!(
            w.to_string(),
            "1 account entry could not be read, so no account deletion was published \
             (an entry not read cannot be told from one that is gone)"
        );
        let w = withheld(ObjectType::Group, false, 2, Vec::new()).unwrap();
        assert!(
            w.to_string()
                .starts_with("2 group entries could not be read, so no group deletion"),
            "{w}"
        );
        let w = withheld(ObjectType::Account, true, 3, Vec::new()).unwrap();
        assert!(
            w.to_string()
                .contains("no user was provisioned again for an account that looks gone"),
            "{w}"
        );
    }

    #[test]
    fn progress_has_a_rate_and_an_eta() {
        let p = Progress {
            scanned: 100,
            expected: 300,
            elapsed: Duration::from_secs(10),
            ..Default::default()
        };
        assert!((p.rate() - 10.0).abs() < 1e-9);
        assert_eq!(p.eta(), Some(Duration::from_secs(20)));
    }
}
