//! The applier: turns a decision into one atomic, conditional commit to the
//! IDM — inbound mappings with strength, the object template, link and unlink.
//! If the IDM moved on since the correlator looked, it reads again and decides
//! again; a lost race does the same.

use std::sync::Arc;
use std::time::Duration;

use idsync_bus::worker::{Handling, Message, Source, backoff, run_gated_worker};
use idsync_bus::{Bus, BusError, names};
use idsync_core::config::{Config, OnError};
use idsync_core::inbound::{InboundState, Outcome, plan};
use idsync_core::model::{ObjectType, SourceChange};
use idsync_core::situation::{Reaction, Situation};
use idsync_idm_client::{CorrelateError, Correlation, IdmClient, IdmError, correlate, memberships};
use idsync_ldap::{Connection, LdapError, Pool};
use idsync_proto::v1;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "applier";

/// Attempts at one decision before the message is retried later.
const ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Idm(#[from] IdmError),
    #[error(transparent)]
    Config(#[from] idsync_runtime::ConfigError),
}

/// Consumes the decision stream until `shutdown`: one worker per agreement,
/// each on its own durable consumer and with its own token, so an agreement
/// that halts holds back only its own changes.
///
/// # Errors
/// NATS cannot be reached at start, a token cannot be read, or the IDM URL is malformed.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    // Tokens first: a missing one is a configuration error, named at once.
    // The commits and reads of the messages in hand go to the IDM
    // together: one call and one write transaction for as many as are ready.
    let concurrency = config.workers.inbound_concurrency as usize;
    let clients: Vec<(String, IdmClient)> = idsync_runtime::agreement_clients(&config)?
        .into_iter()
        .map(|(agreement, idm)| (agreement, idm.with_batching(concurrency)))
        .collect();
    let bus = Bus::connect_with(&config.nats.url, Some(config.nats.retention())).await?;
    // Connections (opened on first use) to the resources the agreements
    // read: reactions that act on accounts write there, and a dispute over
    // an account the source may have deleted is checked there.
    let mut accounts = Pool::new();
    for r in config.resources.iter().filter(|r| r.agreement.is_some()) {
        let conn = Connection::for_resource(r, idsync_runtime::bind_password(r)?);
        accounts.add(&r.name, conn, &r.id_attribute);
    }
    let accounts = Arc::new(accounts);
    // One task drives every agreement's worker: they wait on I/O, and a
    // halted one costs nothing.
    let workers = clients.iter().map(|(agreement, idm)| {
        let (bus, config, accounts, shutdown) = (&bus, &config, &accounts, &shutdown);
        async move {
            let durable = names::applier_durable(agreement);
            let filter = names::agreement_decisions(agreement);
            let source = Source {
                service: SERVICE,
                stream: names::DECISIONS_STREAM,
                durable: &durable,
                filter_subject: Some(&filter),
                concurrency,
            };
            let ctx = Agreement {
                name: agreement,
                idm,
            };
            run_gated_worker(
                bus,
                source,
                shutdown.clone(),
                || ctx.until_resumed(shutdown),
                |msg| handle(config, ctx, accounts, msg),
            )
            .await
        }
    });
    for result in futures::future::join_all(workers).await {
        result?;
    }
    Ok(())
}

/// The agreement a worker applies for, and its client (with its token).
#[derive(Debug, Clone, Copy)]
struct Agreement<'a> {
    name: &'a str,
    idm: &'a IdmClient,
}

impl Agreement<'_> {
    /// Returns once the agreement is no longer halted (or no longer exists).
    async fn until_resumed(&self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match self.idm.get_agreement(self.name).await {
                Ok(a) if !a.halted => return,
                Ok(_) => {}
                Err(e @ (IdmError::Unauthenticated(_) | IdmError::Rejected { .. })) => {
                    tracing::warn!(agreement = self.name, error = %e, "cannot read the agreement; resuming to find out");
                    return;
                }
                Err(_) => {}
            }
        }
    }

    /// Halts the agreement at this entry, whatever its policy.
    async fn halt(&self, change: &SourceChange, reason: String, msg: &Message) -> Handling {
        self.report(change, reason, true, msg).await
    }

    /// An entry failed: by the agreement's policy, halt here (Kanidm) or park
    /// the entry and go on (quarantine). Either way the status turns Err.
    async fn fail(
        &self,
        config: &Config,
        change: &SourceChange,
        reason: String,
        msg: &Message,
    ) -> Handling {
        let halt = config
            .agreements
            .get(self.name)
            .is_none_or(|a| a.on_error == OnError::Halt);
        self.report(change, reason, halt, msg).await
    }

    async fn report(
        &self,
        change: &SourceChange,
        reason: String,
        halt: bool,
        msg: &Message,
    ) -> Handling {
        let failure = v1::AgreementFailure {
            resource: change.resource.clone(),
            dn: change.dn.clone(),
            entry_uuid: change.entry_uuid.clone(),
            attribute: blamed_attribute(&reason).unwrap_or_default(),
            reason: reason.clone(),
            at_ms: 0,
        };
        match self.idm.report_failure(self.name, failure, halt).await {
            Ok(_) => {}
            Err(e) if e.is_transient() => return transient(msg, &e),
            Err(e) => {
                tracing::error!(agreement = self.name, error = %e, "could not record the failure");
            }
        }
        if halt {
            Handling::Halt(format!("agreement {} halted: {reason}", self.name))
        } else {
            Handling::Poison(format!(
                "agreement {} quarantined the entry: {reason}",
                self.name
            ))
        }
    }
}

/// Whether agreement `agreement`'s applier may apply a decision about
/// `resource`: the resource exists and writes under that agreement.
fn check_resource(config: &Config, agreement: &str, resource: &str) -> Result<(), String> {
    config.resource(resource).map_err(|e| e.to_string())?;
    match config.agreement_for(resource) {
        Some((name, _)) if name == agreement => Ok(()),
        Some((name, _)) => Err(format!(
            "resource {resource} writes under agreement {name}, not {agreement}"
        )),
        None => Err(format!(
            "resource {resource} writes under no sync agreement, so its changes cannot reach the IDM"
        )),
    }
}

/// The attribute an IDM refusal names (`attribute "x"`), if any.
fn blamed_attribute(reason: &str) -> Option<String> {
    let rest = reason.split_once("attribute \"")?.1;
    rest.split_once('"').map(|(a, _)| a.to_owned())
}

fn transient(msg: &Message, e: &dyn std::fmt::Display) -> Handling {
    Handling::Retry {
        delay: backoff(msg.delivered),
        reason: e.to_string(),
    }
}

#[tracing::instrument(skip_all, fields(seq = msg.stream_seq, agreement = ctx.name))]
async fn handle(config: &Config, ctx: Agreement<'_>, accounts: &Pool, msg: Message) -> Handling {
    let idm = ctx.idm;
    let decision = match v1::Decision::decode(msg.payload.as_ref()) {
        Ok(d) => d,
        Err(e) => return Handling::Poison(format!("not a Decision: {e}")),
    };
    if let Err(e) = idsync_proto::check_version(decision.schema_version) {
        return Handling::Poison(e.to_string());
    }
    let Some(event) = decision.change.clone() else {
        return Handling::Poison("decision without its change event".into());
    };
    let change = match SourceChange::try_from(event) {
        Ok(c) => c,
        Err(e) => return Handling::Poison(e.to_string()),
    };
    // A decision about a resource this configuration does not have, or one
    // writing under another agreement, is a bad message, not an entry that
    // failed: park it, rather than halt the agreement on it.
    if let Err(reason) = check_resource(config, ctx.name, &change.resource) {
        return Handling::Poison(reason);
    }
    if config.is_excluded(&change.resource, &change.entry_uuid) {
        tracing::info!(resource = %change.resource, dn = %change.dn, "excluded by the agreement's configuration; skipped");
        return Handling::Done;
    }
    if !decision.failure.is_empty() {
        return ctx
            .fail(config, &change, decision.failure.clone(), &msg)
            .await;
    }
    if !decision.resolution.is_empty() {
        return resolve(config, idm, &decision, &change, &msg).await;
    }
    let mut fresh_read = false;
    for attempt in 1..=ATTEMPTS {
        let state = if fresh_read {
            correlate(idm, config, &change).await
        } else {
            as_decided(idm, config, &decision, &change).await
        };
        let state = match state {
            Ok(s) => s,
            Err(CorrelateError::Idm(e)) if e.is_transient() => return transient(&msg, &e),
            Err(e) => return ctx.fail(config, &change, e.to_string(), &msg).await,
        };
        let members = match memberships(config, idm, &change).await {
            Ok(m) => m,
            Err(CorrelateError::Idm(e)) if e.is_transient() => return transient(&msg, &e),
            Err(e) => return ctx.fail(config, &change, e.to_string(), &msg).await,
        };
        let input = InboundState {
            shadow: state.shadow.as_ref(),
            focus: state.focus.as_ref(),
            situation: state.situation,
            candidates: &state.candidates,
            members: &members,
            ..Default::default()
        };
        let new_id = new_focus_id(config, &change);
        let outcome = match plan(config, &change, decision.change_seq, input, &new_id) {
            Ok(o) => o,
            Err(e) => return ctx.fail(config, &change, e.to_string(), &msg).await,
        };
        let (situation, reaction, ops) = match outcome {
            Outcome::Stale { shadow_position } => {
                tracing::debug!(
                    shadow_position,
                    "older than what the shadow holds; discarded"
                );
                return Handling::Done;
            }
            Outcome::Ignored => return Handling::Done,
            Outcome::Tombstone { ops } => match idm.commit(ops, &change.resource).await {
                Ok(_) => {
                    tracing::debug!(resource = %change.resource, entry_uuid = %change.entry_uuid, "deletion of an entry never seen; tombstone kept");
                    return Handling::Done;
                }
                // The entry's add got there first: decide again, on its shadow.
                Err(IdmError::Conflict(_)) => {
                    fresh_read = true;
                    continue;
                }
                Err(e) if e.is_transient() => return transient(&msg, &e),
                Err(e) => return refused(config, ctx, &change, e, &msg).await,
            },
            Outcome::Commit {
                situation,
                reaction,
                ops,
            } => (situation, reaction, ops),
        };
        if situation == Situation::Disputed
            && let Err(h) = transient_dispute(config, accounts, &change, &state, &msg).await
        {
            return h;
        }
        if reaction.acts_on_account()
            && let Err(h) = act_on_account(config, accounts, &change, reaction, &msg).await
        {
            return h;
        }
        match idm.commit(ops, &change.resource).await {
            Ok(_) => {
                tracing::info!(resource = %change.resource, dn = %change.dn, %situation, %reaction, "applied");
                let detected = decision.change.as_ref().map_or(0, |c| c.detected_at_ms);
                if detected > 0 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                    idsync_telemetry::metrics::observe(
                        "idsync_end_to_end_seconds",
                        "From detection at the source to the IDM commit, by resource.",
                        &[("resource", &change.resource)],
                        (now - detected).max(0) as f64 / 1000.0,
                    );
                }
                return Handling::Done;
            }
            Err(IdmError::Conflict(reason)) => {
                tracing::debug!(attempt, %reason, "lost a race; reading again");
                fresh_read = true;
                tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
            }
            // Decided on an IDM that has moved on since: another entry's
            // user took the name (a uid deleted and added again, applied out
            // of order). Correlate again before calling it a failure.
            Err(e) if e.is_name_taken() && !fresh_read => {
                tracing::debug!(attempt, reason = %e, "the name was taken after the decision; correlating again");
                fresh_read = true;
            }
            Err(e) if e.is_transient() => return transient(&msg, &e),
            Err(e) => return refused(config, ctx, &change, e, &msg).await,
        }
    }
    transient(&msg, &"still losing races after several attempts")
}

/// A dispute because the one candidate owns another account on the resource
/// can be an artefact of order: the source deleted that account before this
/// entry took its name (a uid deleted and added again), but the deletion is
/// still on its way through another replica. When the source no longer has
/// the other account, the change waits (retried with backoff) until its
/// deletion is applied, instead of opening a case that nobody would need.
async fn transient_dispute(
    config: &Config,
    accounts: &Pool,
    change: &SourceChange,
    state: &Correlation,
    msg: &Message,
) -> Result<(), Handling> {
    if change.object_type != ObjectType::Account || state.candidates.len() != 1 {
        return Ok(());
    }
    let Some(other) = state
        .focus
        .as_ref()
        .and_then(|f| f.link_to(&change.resource))
        .filter(|l| l.entry_uuid != change.entry_uuid)
    else {
        return Ok(());
    };
    let resource = config
        .resource(&change.resource)
        .map_err(|e| Handling::Poison(e.to_string()))?;
    let base = resource.base_dn.clone();
    let uuid = other.entry_uuid.clone();
    match accounts
        .with(&resource.name, async |dir| {
            dir.find_by_uuid(&base, &uuid).await
        })
        .await
    {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Handling::Retry {
            delay: backoff(msg.delivered),
            reason: format!(
                "entry {:?} would dispute {:?}, which its candidate owns but {} no longer has; waiting for that deletion",
                change.dn, other.dn, change.resource
            ),
        }),
        Err(e) => Err(transient(msg, &e)),
    }
}

/// The id a new focus gets: the agreement's `map_uuid` for the entry, or a new one.
fn new_focus_id(config: &Config, change: &SourceChange) -> String {
    config
        .mapped_id(&change.resource, &change.entry_uuid)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// The IDM refused a commit for good: a credential problem waits (nothing
/// is lost while an operator fixes the token), a halted agreement halts this
/// worker too, and anything else is the entry's failure.
async fn refused(
    config: &Config,
    ctx: Agreement<'_>,
    change: &SourceChange,
    e: IdmError,
    msg: &Message,
) -> Handling {
    match &e {
        IdmError::Unauthenticated(_) => Handling::Retry {
            delay: backoff(msg.delivered.max(8)),
            reason: format!("agreement {}: {e}", ctx.name),
        },
        IdmError::Halted(_) => Handling::Halt(e.to_string()),
        IdmError::DeletionDiscarded(_) => {
            tracing::warn!(resource = %change.resource, dn = %change.dn, "deletion discarded by an operator; skipped");
            Handling::Done
        }
        // The guard halts the agreement whatever its failure policy: the
        // deletions wait for an operator's decision, none is parked.
        IdmError::MassDeletion(_) => ctx.halt(change, e.to_string(), msg).await,
        _ => {
            let reason = format!(
                "entry {:?} on {}: the IDM refused the commit: {e}",
                change.dn, change.resource
            );
            ctx.fail(config, change, reason, msg).await
        }
    }
}

/// The state the correlator decided on, if the IDM still holds exactly that;
/// otherwise a fresh correlation.
async fn as_decided(
    idm: &IdmClient,
    config: &Config,
    decision: &v1::Decision,
    change: &SourceChange,
) -> Result<Correlation, CorrelateError> {
    // An entry that was new when decided (no shadow, no user): nothing to
    // read again. The commit expects no shadow (version 0) and a free name;
    // if either changed since, it is refused, and the entry is correlated
    // afresh. Half the IDM calls of a first import go.
    if decision.shadow_version == 0
        && decision.focus_id.is_empty()
        && Situation::parse(&decision.situation) == Some(Situation::Unmatched)
    {
        return Ok(Correlation {
            situation: Some(Situation::Unmatched),
            shadow: None,
            focus: None,
            candidates: Vec::new(),
        });
    }
    let shadow = idm.get_shadow(&change.resource, &change.entry_uuid).await?;
    let focus = if decision.focus_id.is_empty() {
        None
    } else {
        idm.get_focus(&decision.focus_id).await?
    };
    let unchanged = shadow.as_ref().map_or(0, |s| s.version) == decision.shadow_version
        && focus.as_ref().map_or(0, |f| f.version) == decision.focus_version;
    match Situation::parse(&decision.situation) {
        // A dispute's candidates are not in the decision: read them again.
        Some(situation) if unchanged && situation != Situation::Disputed => Ok(Correlation {
            situation: Some(situation),
            shadow,
            focus,
            candidates: Vec::new(),
        }),
        _ => correlate(idm, config, change).await,
    }
}

/// Applies an operator's resolution of a disputed case: link the entry to the
/// chosen user, or create a new one. The case must be as the operator saw it;
/// if a newer change arrived meanwhile, correlation has already looked again
/// and the resolution is dropped.
async fn resolve(
    config: &Config,
    idm: &IdmClient,
    decision: &v1::Decision,
    change: &SourceChange,
    msg: &Message,
) -> Handling {
    let reaction = match Reaction::parse(&decision.resolution) {
        Some(r @ (Reaction::Link | Reaction::AddFocus)) => r,
        _ => {
            return Handling::Poison(format!(
                "unknown resolution {:?}; use link or add_focus",
                decision.resolution
            ));
        }
    };
    let shadow = match idm.get_shadow(&change.resource, &change.entry_uuid).await {
        Ok(s) => s,
        Err(e) if e.is_transient() => return transient(msg, &e),
        Err(e) => return Handling::Poison(e.to_string()),
    };
    if shadow.as_ref().map_or(0, |s| s.version) != decision.shadow_version {
        tracing::warn!(resource = %change.resource, dn = %change.dn, "the case changed after it was resolved; resolution dropped");
        return Handling::Done;
    }
    let focus = if reaction == Reaction::Link {
        match idm.get_focus(&decision.focus_id).await {
            Ok(Some(f)) => Some(f),
            Ok(None) => {
                return Handling::Poison(format!(
                    "resolution links to user {}, which does not exist",
                    decision.focus_id
                ));
            }
            Err(e) if e.is_transient() => return transient(msg, &e),
            Err(e) => return Handling::Poison(e.to_string()),
        }
    } else {
        None
    };
    let situation = if reaction == Reaction::Link {
        Situation::Unlinked
    } else {
        Situation::Unmatched
    };
    let members = match memberships(config, idm, change).await {
        Ok(m) => m,
        Err(CorrelateError::Idm(e)) if e.is_transient() => return transient(msg, &e),
        Err(e) => return Handling::Poison(format!("entry {:?}: {e}", change.dn)),
    };
    let input = InboundState {
        shadow: shadow.as_ref(),
        focus: focus.as_ref(),
        situation: Some(situation),
        resolution: Some(reaction),
        members: &members,
        ..Default::default()
    };
    let new_id = new_focus_id(config, change);
    let ops = match plan(config, change, decision.change_seq, input, &new_id) {
        Ok(Outcome::Commit { ops, .. }) => ops,
        Ok(_) => return Handling::Done,
        Err(e) => return Handling::Poison(format!("entry {:?}: {e}", change.dn)),
    };
    match idm.commit(ops, &change.resource).await {
        Ok(_) => {
            tracing::info!(resource = %change.resource, dn = %change.dn, %reaction, "disputed case resolved");
            Handling::Done
        }
        Err(IdmError::Conflict(reason)) => {
            tracing::warn!(%reason, "the case changed while its resolution was applied; resolution dropped");
            Handling::Done
        }
        Err(e) if e.is_transient() => transient(msg, &e),
        Err(e) => Handling::Poison(format!(
            "entry {:?} on {}: the IDM refused the resolution: {e}",
            change.dn, change.resource
        )),
    }
}

/// Deletes or disables the account on its resource (`delete_shadow`,
/// `inactivate_shadow`) before the shadow records it. Idempotent: an account
/// already gone, or already disabled, is left alone — so the change that a
/// disabling write causes comes back as a no-op.
async fn act_on_account(
    config: &Config,
    accounts: &Pool,
    change: &SourceChange,
    reaction: Reaction,
    msg: &Message,
) -> Result<(), Handling> {
    let resource = config
        .resource(&change.resource)
        .map_err(|e| Handling::Poison(e.to_string()))?;
    let dn = change.dn.clone();
    let result = match reaction {
        Reaction::DeleteShadow => {
            accounts
                .with(&resource.name, async |dir| match dir.delete(&dn).await {
                    Ok(()) | Err(LdapError::NoSuchObject { .. }) => Ok(()),
                    Err(e) => Err(e),
                })
                .await
        }
        Reaction::InactivateShadow => {
            let Some(disable) = &resource.disable else {
                return Err(Handling::Poison(format!(
                    "resource {}: inactivate_shadow needs a `disable` setting",
                    resource.name
                )));
            };
            let already = change
                .values(&disable.attribute)
                .iter()
                .any(|v| String::from_utf8_lossy(v).eq_ignore_ascii_case(&disable.value));
            if already {
                return Ok(());
            }
            let mods = [(disable.attribute.clone(), vec![disable.value.clone()])];
            accounts
                .with(&resource.name, async |dir| dir.replace(&dn, &mods).await)
                .await
        }
        _ => Ok(()),
    };
    match result {
        Ok(()) => {
            tracing::info!(resource = %resource.name, %dn, %reaction, "account acted on");
            Ok(())
        }
        Err(e @ (LdapError::Connect { .. } | LdapError::Closed { .. })) => Err(transient(msg, &e)),
        Err(e) => Err(Handling::Poison(format!(
            "resource {}: {reaction} of {dn}: {e}",
            resource.name
        ))),
    }
}
