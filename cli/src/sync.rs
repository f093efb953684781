//! Sync agreements as an operator handles them: dry runs, and the entries a
//! quarantining agreement parked.

use anyhow::{Context, Result, bail};
use idsync_bus::{Bus, names};
use idsync_core::config::Config;
use idsync_core::inbound::{InboundState, Outcome, plan};
use idsync_core::model::{Focus, Op, SourceChange};
use idsync_idm_client::{IdmClient, correlate, memberships};
use idsync_ldap::{Connection, SyncMessage, SyncSession};
use idsync_proto::v1;
use prost::Message as _;

/// What a dry run found for one entry.
#[derive(Debug, Clone)]
pub struct DryRunEntry {
    pub resource: String,
    pub dn: String,
    pub entry_uuid: String,
    /// `unchanged`, `excluded`, or `<situation> → <reaction>`.
    pub decision: String,
    /// The changes to the IDM, in words.
    pub changes: Vec<String>,
    /// Why the IDM (or the mappings) would refuse it; empty when it would pass.
    pub refusal: String,
}

impl DryRunEntry {
    pub fn would_change(&self) -> bool {
        !self.changes.is_empty() && self.refusal.is_empty()
    }
}

/// Reads every entry of agreement `agreement`'s resources from the sources,
/// decides and plans each as the pipeline would, and has the IDM run the
/// commits — with all its checks — in a transaction it rolls back. Nothing is
/// written anywhere and no cookie moves.
///
/// # Errors
/// The agreement has no resources, a source or the IDM cannot be reached.
pub async fn dry_run(
    config: &Config,
    idm: &IdmClient,
    agreement: &str,
) -> Result<Vec<DryRunEntry>> {
    let resources: Vec<_> = config.resources_of(agreement).collect();
    if resources.is_empty() {
        bail!("no resource in the configuration writes under agreement {agreement:?}");
    }
    let mut entries = Vec::new();
    let mut commits = Vec::new();
    // Indexes into `entries` of the entries that have a commit.
    let mut committed = Vec::new();
    for resource in resources {
        let password = idsync_runtime::bind_password(resource)?;
        let conn = Connection::for_resource(resource, password);
        let mut scopes = vec![(
            resource.base_dn.clone(),
            resource.filter.clone(),
            v1::ObjectType::Account,
        )];
        if let (Some(g), Some(base)) = (&resource.groups, resource.groups_base()) {
            scopes.push((base.to_owned(), g.filter.clone(), v1::ObjectType::Group));
        }
        for (base, filter, object_type) in scopes {
            let mut session = SyncSession::start(&conn, &base, &filter, None, false)
                .await
                .with_context(|| format!("cannot read resource {}", resource.name))?;
            while let Some(message) = session.next().await? {
                let SyncMessage::Entry {
                    entry_uuid,
                    dn,
                    attributes,
                    csn,
                    ..
                } = message
                else {
                    continue;
                };
                let event = v1::ChangeEvent {
                    schema_version: idsync_proto::SCHEMA_VERSION,
                    event_id: format!("dry-run:{entry_uuid}"),
                    resource: resource.name.clone(),
                    entry_uuid,
                    dn,
                    kind: v1::ChangeKind::Upsert as i32,
                    attributes: attributes
                        .into_iter()
                        .map(|(name, values)| v1::Attribute { name, values })
                        .collect(),
                    position: Some(v1::SourcePosition {
                        csn: csn.unwrap_or_default(),
                        cookie: Vec::new(),
                    }),
                    detected_at_ms: 0,
                    object_type: object_type as i32,
                };
                let change = SourceChange::try_from(event)?;
                let mut entry = DryRunEntry {
                    resource: change.resource.clone(),
                    dn: change.dn.clone(),
                    entry_uuid: change.entry_uuid.clone(),
                    decision: String::new(),
                    changes: Vec::new(),
                    refusal: String::new(),
                };
                if config.is_excluded(&change.resource, &change.entry_uuid) {
                    entry.decision = "excluded".into();
                    entries.push(entry);
                    continue;
                }
                match plan_entry(config, idm, &change).await {
                    Ok(Some((decision, ops, before))) => {
                        entry.decision = decision;
                        entry.changes = describe(&ops, before.as_ref());
                        if entry.changes.is_empty() {
                            entry.decision = "unchanged".into();
                        } else {
                            committed.push(entries.len());
                            commits.push((ops, change.resource.clone()));
                        }
                    }
                    Ok(None) => entry.decision = "unchanged".into(),
                    Err(e) => entry.refusal = e.to_string(),
                }
                entries.push(entry);
            }
            let _ = session.close().await;
        }
    }
    let results = idm.dry_run(agreement, commits).await?;
    for (i, result) in committed.into_iter().zip(results) {
        if let Some(entry) = entries.get_mut(i) {
            entry.refusal = result.error;
        }
    }
    Ok(entries)
}

/// The decision and the operations for one entry, with the focus as it is
/// now; `None` when the IDM already holds this state.
async fn plan_entry(
    config: &Config,
    idm: &IdmClient,
    change: &SourceChange,
) -> Result<Option<(String, Vec<Op>, Option<Focus>)>> {
    let (outcome, focus) = plan_against_idm(config, idm, change, u64::MAX, false).await?;
    Ok(match outcome {
        // A tombstone changes nothing an operator sees.
        Outcome::Stale { .. } | Outcome::Ignored | Outcome::Tombstone { .. } => None,
        Outcome::Commit {
            situation,
            reaction,
            ops,
        } => Some((format!("{situation} → {reaction}"), ops, focus)),
    })
}

/// Correlates `change` against the IDM as it is and plans it as the applier
/// would at stream position `seq`; `as_new` plans it even when its shadow
/// holds it or newer. Returns the plan and the focus as it is now.
///
/// # Errors
/// The IDM cannot be read, or the mappings fail.
pub(crate) async fn plan_against_idm(
    config: &Config,
    idm: &IdmClient,
    change: &SourceChange,
    seq: u64,
    as_new: bool,
) -> Result<(Outcome, Option<Focus>)> {
    let state = correlate(idm, config, change).await?;
    let members = memberships(config, idm, change).await?;
    let shadow = state.shadow.clone().map(|mut s| {
        if as_new {
            s.position = 0;
            s.csn.clear();
        }
        s
    });
    let input = InboundState {
        shadow: shadow.as_ref(),
        focus: state.focus.as_ref(),
        situation: state.situation,
        candidates: &state.candidates,
        members: &members,
        ..Default::default()
    };
    let new_id = config
        .mapped_id(&change.resource, &change.entry_uuid)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let outcome = plan(config, change, seq, input, &new_id)?;
    Ok((outcome, state.focus))
}

/// The focus operations in words; a shadow's bookkeeping is left out.
pub(crate) fn describe(ops: &[Op], before: Option<&Focus>) -> Vec<String> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::PutFocus {
                focus,
                expected_version: 0,
            } => {
                let attrs: Vec<String> = focus
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.join("|")))
                    .collect();
                out.push(format!("create {} {}", focus.kind, attrs.join(", ")));
            }
            Op::PutFocus { focus, .. } => {
                let empty = Focus::default();
                let old = before.filter(|b| b.id == focus.id).unwrap_or(&empty);
                let mut diffs = Vec::new();
                for (k, v) in &focus.attributes {
                    if old.attributes.get(k) != Some(v) {
                        diffs.push(format!("{k}={}", v.join("|")));
                    }
                }
                for k in old.attributes.keys() {
                    if !focus.attributes.contains_key(k) {
                        diffs.push(format!("{k} removed"));
                    }
                }
                if old.links != focus.links {
                    diffs.push("links".into());
                }
                if old.members != focus.members {
                    diffs.push(format!("members ({})", focus.members.len()));
                }
                if old.status != focus.status {
                    diffs.push(format!("status {:?}", focus.status));
                }
                if !diffs.is_empty() {
                    out.push(format!(
                        "update {} {}: {}",
                        focus.kind,
                        focus.first("name").unwrap_or(&focus.id),
                        diffs.join(", ")
                    ));
                }
            }
            Op::DeleteFocus { id, .. } => out.push(format!("delete focus {id}")),
            Op::PutShadow { .. } | Op::DeleteShadow { .. } => {}
        }
    }
    out
}

/// A message an agreement's pipeline parked, with its reason.
#[derive(Debug, Clone)]
pub struct Parked {
    /// Sequence in the dead-letter stream: what `retry-parked` and `drop-parked` take.
    pub seq: u64,
    pub service: String,
    pub resource: String,
    pub dn: String,
    pub entry_uuid: String,
    pub reason: String,
    pub parked_at_ms: i64,
    /// The change event to feed to the pipeline again.
    change: Option<v1::ChangeEvent>,
}

/// The change a parked message carries, whichever stream it came from.
fn parked_change(letter: &v1::DeadLetter) -> Option<v1::ChangeEvent> {
    if letter.subject.starts_with("idsync.decisions.") {
        v1::Decision::decode(letter.payload.as_slice())
            .ok()
            .and_then(|d| d.change)
    } else if letter.subject.starts_with("idsync.changes.") {
        v1::ChangeEvent::decode(letter.payload.as_slice()).ok()
    } else {
        None
    }
}

/// Every parked message whose entry belongs to agreement `agreement`.
///
/// # Errors
/// NATS cannot be reached.
pub async fn parked(config: &Config, bus: &Bus, agreement: &str) -> Result<Vec<Parked>> {
    let mut out = Vec::new();
    for m in bus.peek(names::DEAD_STREAM, 1, usize::MAX).await? {
        let Ok(letter) = v1::DeadLetter::decode(m.payload.as_ref()) else {
            continue;
        };
        let Some(change) = parked_change(&letter) else {
            continue;
        };
        if config.agreement_of(&change.resource) != Some(agreement) {
            continue;
        }
        out.push(Parked {
            seq: m.stream_seq,
            service: letter.service,
            resource: change.resource.clone(),
            dn: change.dn.clone(),
            entry_uuid: change.entry_uuid.clone(),
            reason: letter.reason,
            parked_at_ms: letter.parked_at_ms,
            change: Some(change),
        });
    }
    Ok(out)
}

/// Sends parked message `seq` of agreement `agreement` through the pipeline
/// again (from the correlator, so the current configuration decides), then
/// removes it from the dead-letter stream.
///
/// # Errors
/// No such parked message of that agreement, or NATS fails.
pub async fn retry_parked(config: &Config, bus: &Bus, agreement: &str, seq: u64) -> Result<()> {
    let parked = find(config, bus, agreement, seq).await?;
    let Some(mut change) = parked.change else {
        bail!("parked message {seq} holds no change to retry");
    };
    change.event_id = format!("retry:{}:{seq}", change.event_id);
    bus.publish_and_wait(
        &names::change_subject(&change.resource),
        &change.event_id,
        change.encode_to_vec().into(),
    )
    .await?;
    bus.delete_message(names::DEAD_STREAM, seq).await?;
    Ok(())
}

/// Removes parked message `seq` of agreement `agreement` for good.
///
/// # Errors
/// No such parked message of that agreement, or NATS fails.
pub async fn drop_parked(config: &Config, bus: &Bus, agreement: &str, seq: u64) -> Result<()> {
    find(config, bus, agreement, seq).await?;
    bus.delete_message(names::DEAD_STREAM, seq).await?;
    Ok(())
}

async fn find(config: &Config, bus: &Bus, agreement: &str, seq: u64) -> Result<Parked> {
    parked(config, bus, agreement)
        .await?
        .into_iter()
        .find(|p| p.seq == seq)
        .with_context(|| format!("agreement {agreement:?} has no parked message {seq}"))
}

/// A provisioning the provisioner gave up on, with its reason.
#[derive(Debug, Clone)]
pub struct ParkedProvisioning {
    /// Sequence in the dead-letter stream: what `retry` and `drop` take.
    pub seq: u64,
    pub focus_id: String,
    pub reason: String,
    pub parked_at_ms: i64,
}

/// Every provisioning the provisioner parked.
///
/// # Errors
/// NATS cannot be reached.
pub async fn parked_provisioning(bus: &Bus) -> Result<Vec<ParkedProvisioning>> {
    let mut out = Vec::new();
    for m in bus.peek(names::DEAD_STREAM, 1, usize::MAX).await? {
        let Ok(letter) = v1::DeadLetter::decode(m.payload.as_ref()) else {
            continue;
        };
        if letter.service != names::PROVISIONER {
            continue;
        }
        let focus_id = v1::FocusChange::decode(letter.payload.as_slice())
            .map(|c| c.focus_id)
            .unwrap_or_default();
        out.push(ParkedProvisioning {
            seq: m.stream_seq,
            focus_id,
            reason: letter.reason,
            parked_at_ms: letter.parked_at_ms,
        });
    }
    Ok(out)
}

/// Provisions the user of parked operation `seq` again, from its current
/// state, and removes the parked operation.
///
/// # Errors
/// No such parked operation, or NATS or the IDM fails.
pub async fn retry_provisioning(bus: &Bus, idm: &IdmClient, seq: u64) -> Result<()> {
    let parked = parked_provisioning(bus)
        .await?
        .into_iter()
        .find(|p| p.seq == seq)
        .with_context(|| format!("no parked provisioning {seq}"))?;
    let focus = idm.get_focus(&parked.focus_id).await?;
    let change = v1::FocusChange {
        schema_version: idsync_proto::SCHEMA_VERSION,
        outbox_seq: 0,
        focus_id: parked.focus_id.clone(),
        deleted: focus.is_none(),
        focus: focus.map(Into::into),
        origin_resource: String::new(),
        // No before-image: the user's whole state is enforced again.
        ..Default::default()
    };
    bus.publish_and_wait(
        names::FOCUS_SUBJECT,
        &format!("retry-provisioning:{seq}"),
        change.encode_to_vec().into(),
    )
    .await?;
    bus.delete_message(names::DEAD_STREAM, seq).await?;
    Ok(())
}

/// Forgets parked operation `seq`.
///
/// # Errors
/// No such parked operation, or NATS fails.
pub async fn drop_provisioning(bus: &Bus, seq: u64) -> Result<()> {
    if !parked_provisioning(bus).await?.iter().any(|p| p.seq == seq) {
        bail!("no parked provisioning {seq}");
    }
    bus.delete_message(names::DEAD_STREAM, seq).await?;
    Ok(())
}
