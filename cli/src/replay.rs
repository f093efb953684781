//! Replay for debugging: change events kept in JetStream, selected by
//! sequence, time, resource or entry, and either simulated — correlation,
//! mappings and provisioning decisions against the current configuration,
//! with the IDM's checks run in a transaction it rolls back and the targets
//! only read — or published again into the live pipeline.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use idsync_bus::{Bus, names};
use idsync_core::config::{Config, Deprovision};
use idsync_core::inbound::Outcome;
use idsync_core::model::{Focus, Op, SourceChange, normalize_dn};
use idsync_core::outbound::{Writes, account_modifications, constructions, desired_account};
use idsync_idm_client::IdmClient;
use idsync_ldap::{Connection, Pool};
use idsync_proto::v1;
use prost::Message as _;

/// Which events to take.
#[derive(Debug, Clone, Default)]
pub struct Slice {
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    /// Detected at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    pub resource: Option<String>,
    /// An entry UUID, or a DN (compared normalised).
    pub entry: Option<String>,
    /// At most this many events.
    pub limit: usize,
}

/// A change event with its sequence in the change stream.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub event: v1::ChangeEvent,
}

/// Events of the change stream that `slice` selects, in stream order.
/// Messages that are not change events are skipped.
///
/// # Errors
/// NATS cannot be read.
pub async fn select(bus: &Bus, slice: &Slice) -> Result<Vec<StoredEvent>> {
    let last = bus.last_sequence(names::CHANGES_STREAM).await?;
    let to = slice.to_seq.unwrap_or(last).min(last);
    let mut seq = slice.from_seq.unwrap_or(1).max(1);
    let entry_dn = slice.entry.as_deref().map(normalize_dn);
    let mut out = Vec::new();
    while seq <= to && out.len() < slice.limit {
        let batch = bus.peek(names::CHANGES_STREAM, seq, 500).await?;
        let Some(tail) = batch.last().map(|m| m.stream_seq) else {
            break;
        };
        for m in batch {
            if m.stream_seq > to || out.len() >= slice.limit {
                break;
            }
            let Ok(event) = v1::ChangeEvent::decode(m.payload.as_ref()) else {
                continue;
            };
            if slice
                .resource
                .as_ref()
                .is_some_and(|r| *r != event.resource)
                || slice.since_ms.is_some_and(|t| event.detected_at_ms < t)
            {
                continue;
            }
            if let (Some(e), Some(dn)) = (&slice.entry, &entry_dn)
                && !e.eq_ignore_ascii_case(&event.entry_uuid)
                && normalize_dn(&event.dn) != *dn
            {
                continue;
            }
            out.push(StoredEvent {
                seq: m.stream_seq,
                event,
            });
        }
        seq = tail + 1;
    }
    Ok(out)
}

/// The last `count` events (of `resource`, when given), looking back at most
/// `window` messages.
///
/// # Errors
/// NATS cannot be read.
pub async fn tail(
    bus: &Bus,
    resource: Option<&str>,
    count: usize,
    window: u64,
) -> Result<Vec<StoredEvent>> {
    let last = bus.last_sequence(names::CHANGES_STREAM).await?;
    let slice = Slice {
        from_seq: Some(last.saturating_sub(window) + 1),
        resource: resource.map(str::to_owned),
        limit: usize::MAX,
        ..Default::default()
    };
    let mut all = select(bus, &slice).await?;
    let keep = all.len().saturating_sub(count);
    Ok(all.split_off(keep))
}

/// What replaying one event would do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Simulated {
    pub seq: u64,
    pub resource: String,
    pub dn: String,
    pub entry_uuid: String,
    pub kind: String,
    /// `<situation> → <reaction>`, `stale`, `ignored`, `excluded`.
    pub decision: String,
    /// Changes to the IDM, in words.
    pub idm: Vec<String>,
    /// Why the IDM or the mappings would refuse it; empty when it would pass.
    pub refusal: String,
    /// What provisioning would do on each target, in words.
    pub targets: Vec<String>,
}

impl Simulated {
    /// The outcome without the event's identity, to compare two configurations.
    fn outcome(&self) -> (&str, &[String], &str, &[String]) {
        (&self.decision, &self.idm, &self.refusal, &self.targets)
    }
}

/// Simulates `events` against `config`: writes nothing anywhere. Each event
/// is decided as if it arrived now, against the IDM as it is now.
///
/// # Errors
/// A malformed event, or the IDM, NATS or a target cannot be read.
pub async fn simulate(
    config: &Config,
    idm: &IdmClient,
    events: &[StoredEvent],
) -> Result<Vec<Simulated>> {
    let mut targets = Pool::new();
    for r in config.resources.iter().filter(|r| r.dn_template.is_some()) {
        let password = idsync_runtime::bind_password(r)?;
        targets.add(
            &r.name,
            Connection::for_resource(r, password),
            &r.id_attribute,
        );
    }
    let mut out = Vec::new();
    let mut commits: BTreeMap<String, Pending> = BTreeMap::new();
    for stored in events {
        let change = SourceChange::try_from(stored.event.clone())
            .with_context(|| format!("event {}", stored.seq))?;
        let mut sim = Simulated {
            seq: stored.seq,
            resource: change.resource.clone(),
            dn: change.dn.clone(),
            entry_uuid: change.entry_uuid.clone(),
            kind: if change.is_delete() {
                "delete"
            } else {
                "upsert"
            }
            .into(),
            decision: String::new(),
            idm: Vec::new(),
            refusal: String::new(),
            targets: Vec::new(),
        };
        if config.resource(&change.resource).is_err() {
            sim.refusal = format!(
                "resource {:?} is not in this configuration",
                change.resource
            );
            out.push(sim);
            continue;
        }
        if config.is_excluded(&change.resource, &change.entry_uuid) {
            sim.decision = "excluded".into();
            out.push(sim);
            continue;
        }
        match decide(config, idm, &change, stored.seq).await {
            Err(e) => sim.refusal = format!("{e:#}"),
            Ok(Decided::Stale) => sim.decision = "stale: the IDM holds this or newer".into(),
            Ok(Decided::Ignored) => sim.decision = "ignored".into(),
            Ok(Decided::Commit {
                decision,
                ops,
                before,
            }) => {
                sim.decision = decision;
                let before = before.map(|b| *b);
                sim.idm = crate::sync::describe(&ops, before.as_ref());
                sim.targets = provisioning(config, idm, &targets, &ops, before.as_ref())
                    .await
                    .unwrap_or_else(|e| vec![format!("cannot tell: {e:#}")]);
                if let Some(agreement) = config.agreement_of(&change.resource) {
                    let entry = commits.entry(agreement.to_owned()).or_default();
                    entry.0.push((ops, change.resource.clone()));
                    entry.1.push(out.len());
                }
            }
        }
        out.push(sim);
    }
    for (agreement, Pending(batch, at)) in commits {
        let results = idm.dry_run(&agreement, batch).await?;
        for (i, r) in at.into_iter().zip(results) {
            if let Some(sim) = out.get_mut(i) {
                sim.refusal = r.error;
            }
        }
    }
    Ok(out)
}

/// Events whose outcome differs between two configurations' simulations
/// (the same events, in the same order).
pub fn differences(a: &[Simulated], b: &[Simulated]) -> Vec<(Simulated, Simulated)> {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.outcome() != y.outcome())
        .map(|(x, y)| (x.clone(), y.clone()))
        .collect()
}

/// One agreement's commits for the IDM's dry run, each with its place in
/// the simulation's output.
#[derive(Default)]
struct Pending(Vec<(Vec<Op>, String)>, Vec<usize>);

enum Decided {
    Stale,
    Ignored,
    Commit {
        decision: String,
        ops: Vec<Op>,
        before: Option<Box<Focus>>,
    },
}

async fn decide(
    config: &Config,
    idm: &IdmClient,
    change: &SourceChange,
    seq: u64,
) -> Result<Decided> {
    // Decided as if it arrived now: an event the IDM has applied already is
    // simulated again, not discarded as stale.
    let (outcome, focus) = crate::sync::plan_against_idm(config, idm, change, seq, true).await?;
    Ok(match outcome {
        Outcome::Stale { .. } => Decided::Stale,
        Outcome::Ignored | Outcome::Tombstone { .. } => Decided::Ignored,
        Outcome::Commit {
            situation,
            reaction,
            ops,
        } => Decided::Commit {
            decision: format!("{situation} → {reaction}"),
            ops,
            before: focus.map(Box::new),
        },
    })
}

/// What the provisioner would do on the targets after `ops`, in words.
async fn provisioning(
    config: &Config,
    idm: &IdmClient,
    targets: &Pool,
    ops: &[Op],
    before: Option<&Focus>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let after = ops.iter().rev().find_map(|op| match op {
        Op::PutFocus { focus, .. } => Some(focus.clone()),
        _ => None,
    });
    let deleted = ops.iter().any(|op| matches!(op, Op::DeleteFocus { .. }));
    // A commit that leaves the focus as it is still shows what this
    // configuration would make of its accounts.
    let Some(focus) = after.or_else(|| before.cloned()) else {
        return Ok(out);
    };
    let roles = idm.roles_of(&focus).await?;
    let wanted = if deleted {
        BTreeMap::new()
    } else {
        constructions(config, &focus, &roles)?
    };
    for resource in config.resources.iter().filter(|r| r.dn_template.is_some()) {
        let name = &resource.name;
        let link = focus.link_to(name);
        match (wanted.get(name), link) {
            (Some(c), None) => {
                let account = desired_account(resource, &focus, c)?;
                out.push(format!("{name}: create {}", account.dn));
            }
            (Some(c), Some(link)) => {
                let account = desired_account(resource, &focus, c)?;
                if normalize_dn(&account.dn) != normalize_dn(&link.dn) {
                    out.push(format!("{name}: rename {} to {}", link.dn, account.dn));
                    continue;
                }
                let current = targets
                    .with(name, async |dir| dir.read(&link.dn).await)
                    .await
                    .with_context(|| format!("resource {name}: reading {}", link.dn))?;
                let Some(current) = current else {
                    out.push(format!("{name}: create {} (it is gone)", account.dn));
                    continue;
                };
                let previous = idm
                    .get_shadow(name, &link.entry_uuid)
                    .await?
                    .filter(|_| resource.agreement.is_none())
                    .map(|s| s.attributes)
                    .unwrap_or_default();
                // Every mapping by its strength: what it takes to bring the
                // account in line with this configuration (the provisioner
                // itself writes a normal mapping only when its sources
                // change, so a preview of a mapping change shows here).
                let mut mods = account_modifications(&account, &current.attributes, &previous);
                mods.retain(|(attr, _)| Writes::All.allows(&account, attr));
                if !mods.is_empty() {
                    out.push(format!("{name}: modify {}: {}", link.dn, words(&mods)));
                }
            }
            (None, Some(link)) if resource.deprovision == Deprovision::Disable => {
                out.push(format!("{name}: disable {}", link.dn));
            }
            (None, Some(link)) => out.push(format!("{name}: delete {}", link.dn)),
            (None, None) => {}
        }
    }
    Ok(out)
}

/// Modifications in words; values of password attributes are not shown.
fn words(mods: &[(String, Vec<String>)]) -> String {
    mods.iter()
        .map(|(attr, values)| {
            if values.is_empty() {
                format!("{attr} removed")
            } else if is_secret(attr) {
                format!("{attr}=({} values hidden)", values.len())
            } else {
                format!("{attr}={}", values.join("|"))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Attributes whose values are never printed (password hashes and the like).
pub fn is_secret(attribute: &str) -> bool {
    let a = attribute.to_ascii_lowercase();
    a.contains("password") || a.contains("secret") || a == "krbprincipalkey"
}

/// Every event has a CSN, by which the applier tells it from newer changes.
///
/// # Errors
/// The first event without one.
pub fn check_csns(events: &[StoredEvent]) -> Result<()> {
    if let Some(e) = events
        .iter()
        .find(|e| e.event.position.as_ref().is_none_or(|p| p.csn.is_empty()))
    {
        bail!(
            "event {} ({} on {}) has no CSN: replayed after a newer change of the entry it would roll that change back; select events with CSNs, or pass --allow-without-csn",
            e.seq,
            e.event.dn,
            e.event.resource
        );
    }
    Ok(())
}

/// Publishes `events` again into the live pipeline, each with an id of its
/// own. Safe because applying is idempotent: the applier discards an event
/// whose entry the IDM already holds at that CSN or newer. Events without a
/// CSN cannot be told apart from newer ones and are refused unless
/// `allow_without_csn`.
///
/// # Errors
/// An event without a CSN (not allowed), or NATS refuses a publication.
pub async fn republish(
    bus: &Bus,
    events: &[StoredEvent],
    allow_without_csn: bool,
) -> Result<usize> {
    if !allow_without_csn {
        check_csns(events)?;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut acks = Vec::with_capacity(events.len());
    for e in events {
        let mut event = e.event.clone();
        event.event_id = format!("replay:{stamp}:{}", e.seq);
        let ack = bus
            .publish(
                &names::change_subject(&event.resource),
                &event.event_id.clone(),
                event.encode_to_vec().into(),
            )
            .await?;
        acks.push(ack);
    }
    let n = acks.len();
    for ack in acks {
        ack.wait().await?;
    }
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn events_without_a_csn_are_not_replayed_into_the_pipeline() {
        let event = |seq: u64, csn: &str| StoredEvent {
            seq,
            event: v1::ChangeEvent {
                resource: "ds".into(),
                dn: format!("uid=u{seq},o=x"),
                position: Some(v1::SourcePosition {
                    csn: csn.into(),
                    cookie: Vec::new(),
                }),
                ..Default::default()
            },
        };
        assert!(check_csns(&[event(1, "20260101000000.000000Z#000000#000#000000")]).is_ok());
        let err = check_csns(&[
            event(1, "20260101000000.000000Z#000000#000#000000"),
            event(2, ""),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("event 2 (uid=u2,o=x on ds) has no CSN"),
            "{err}"
        );
    }

    #[test]
    fn secret_attributes_are_recognised() {
        assert!(is_secret("userPassword"));
        assert!(is_secret("sambaNTPassword"));
        assert!(!is_secret("cn"));
    }
}
