//! The applier: turns a decision into one atomic, conditional commit to the
//! IDM — inbound mappings with strength, the object template, link and unlink.
//! If the IDM moved on since the correlator looked, it reads again and decides
//! again; a lost race does the same.

use std::sync::Arc;
use std::time::Duration;

use idsync_bus::worker::{Handling, Message, Source, backoff, run_worker};
use idsync_bus::{Bus, BusError, names};
use idsync_core::config::Config;
use idsync_core::inbound::utf8_values;
use idsync_core::inbound::{InboundState, Outcome, plan};
use idsync_core::model::{MemberRef, ObjectType, SourceChange};
use idsync_core::situation::{Reaction, Situation};
use idsync_idm_client::{CorrelateError, Correlation, IdmClient, IdmError, correlate};
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

/// Consumes the decision stream until `shutdown`.
///
/// # Errors
/// NATS cannot be reached at start, or the IDM URL is malformed.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    let bus = Bus::connect(&config.nats.url).await?;
    let idm = IdmClient::new(&config.idm.url)?;
    // Connections only to resources whose reactions act on their accounts.
    let mut accounts = Pool::new();
    for r in &config.resources {
        if r.reactions.values().any(|x| x.action.acts_on_account()) {
            let conn = Connection::for_resource(r, idsync_runtime::bind_password(r)?);
            accounts.add(&r.name, conn, &r.id_attribute);
        }
    }
    let source = Source {
        service: SERVICE,
        stream: names::DECISIONS_STREAM,
        durable: names::APPLIER,
        filter_subject: None,
    };
    run_worker(&bus, source, shutdown, |msg| {
        handle(&config, &idm, &accounts, msg)
    })
    .await?;
    Ok(())
}

fn transient(msg: &Message, e: &dyn std::fmt::Display) -> Handling {
    Handling::Retry {
        delay: backoff(msg.delivered),
        reason: e.to_string(),
    }
}

#[tracing::instrument(skip_all, fields(seq = msg.stream_seq))]
async fn handle(config: &Config, idm: &IdmClient, accounts: &Pool, msg: Message) -> Handling {
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
            Err(e) => return Handling::Poison(format!("entry {:?}: {e}", change.dn)),
        };
        let members = match memberships(config, idm, &change).await {
            Ok(m) => m,
            Err(CorrelateError::Idm(e)) if e.is_transient() => return transient(&msg, &e),
            Err(e) => return Handling::Poison(format!("entry {:?}: {e}", change.dn)),
        };
        let input = InboundState {
            shadow: state.shadow.as_ref(),
            focus: state.focus.as_ref(),
            situation: state.situation,
            candidates: &state.candidates,
            members: &members,
            ..Default::default()
        };
        let new_id = uuid::Uuid::new_v4().to_string();
        let outcome = match plan(config, &change, decision.change_seq, input, &new_id) {
            Ok(o) => o,
            Err(e) => return Handling::Poison(format!("entry {:?}: {e}", change.dn)),
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
            Outcome::Commit {
                situation,
                reaction,
                ops,
            } => (situation, reaction, ops),
        };
        if reaction.acts_on_account()
            && let Err(h) = act_on_account(config, accounts, &change, reaction, &msg).await
        {
            return h;
        }
        match idm.commit(ops, &change.resource).await {
            Ok(_) => {
                tracing::info!(resource = %change.resource, dn = %change.dn, %situation, %reaction, "applied");
                return Handling::Done;
            }
            Err(IdmError::Conflict(reason)) => {
                tracing::debug!(attempt, %reason, "lost a race; reading again");
                fresh_read = true;
                tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
            }
            Err(e) if e.is_transient() => return transient(&msg, &e),
            Err(e) => {
                return Handling::Poison(format!(
                    "entry {:?} on {}: the IDM refused the commit: {e}",
                    change.dn, change.resource
                ));
            }
        }
    }
    transient(&msg, &"still losing races after several attempts")
}

/// The state the correlator decided on, if the IDM still holds exactly that;
/// otherwise a fresh correlation.
async fn as_decided(
    idm: &IdmClient,
    config: &Config,
    decision: &v1::Decision,
    change: &SourceChange,
) -> Result<Correlation, CorrelateError> {
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
    let new_id = uuid::Uuid::new_v4().to_string();
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

/// For a group, who owns each member it names, by DN or by uid (the store
/// resolves the rest when their accounts arrive).
async fn memberships(
    config: &Config,
    idm: &IdmClient,
    change: &SourceChange,
) -> Result<Vec<(MemberRef, Option<String>)>, CorrelateError> {
    if change.is_delete() || change.object_type != ObjectType::Group {
        return Ok(Vec::new());
    }
    let resource = config.resource(&change.resource)?;
    let Some(groups) = resource.groups.as_ref() else {
        return Ok(Vec::new());
    };
    let mut refs: Vec<MemberRef> = utf8_values(change, &groups.member_attribute, "members")?
        .into_iter()
        .map(|dn| MemberRef {
            resource: change.resource.clone(),
            dn,
            uid: String::new(),
        })
        .collect();
    if let Some(attribute) = &groups.member_uid_attribute {
        refs.extend(
            utf8_values(change, attribute, "members")?
                .into_iter()
                .map(|uid| MemberRef {
                    resource: change.resource.clone(),
                    dn: String::new(),
                    uid,
                }),
        );
    }
    let owners = idm.resolve_members(&refs).await?;
    Ok(refs.into_iter().zip(owners).collect())
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
