//! Correlation cases: entries whose owner correlation could not decide
//! (situation *disputed*), waiting for an operator to link them to a user or to
//! create a new one.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use idsync_bus::{Bus, names};
use idsync_core::model::{Focus, Shadow};
use idsync_idm_client::IdmClient;
use idsync_proto::v1;
use prost::Message;

/// An open case and the users correlation proposed.
#[derive(Debug, Clone)]
pub struct Case {
    pub shadow: Shadow,
    pub candidates: Vec<Focus>,
}

/// Every open case.
///
/// # Errors
/// The IDM cannot be reached.
pub async fn list(idm: &IdmClient) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for shadow in idm.list_cases().await? {
        let mut candidates = Vec::new();
        for id in &shadow.candidates {
            if let Some(f) = idm.get_focus(id).await? {
                candidates.push(f);
            }
        }
        out.push(Case { shadow, candidates });
    }
    Ok(out)
}

/// What the operator decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Link the entry to this user (name or id).
    Link(String),
    /// Create a new user from the entry.
    Create,
}

/// Resolves the case of `entry_uuid` on `resource`: the change the case was
/// opened for goes to the applier again, with the operator's decision in place
/// of the configured reaction. Waits up to `wait` for the result.
///
/// # Errors
/// No such open case, no such user, the change is no longer in the stream, or
/// the IDM or NATS cannot be reached. Also when the case is still open after `wait`.
pub async fn resolve(
    idm: &IdmClient,
    bus: &Bus,
    agreement: &str,
    resource: &str,
    entry_uuid: &str,
    resolution: Resolution,
    wait: Duration,
) -> Result<Shadow> {
    let shadow = idm
        .get_shadow(resource, entry_uuid)
        .await?
        .with_context(|| format!("no entry {entry_uuid} on resource {resource}"))?;
    if shadow.situation != "disputed" || shadow.dead || shadow.focus_id.is_some() {
        bail!(
            "entry {} on {resource} is not an open case (situation {}{})",
            shadow.dn,
            shadow.situation,
            if shadow.dead { ", deleted" } else { "" }
        );
    }
    let (reaction, focus) = match &resolution {
        Resolution::Create => ("add_focus", None),
        Resolution::Link(user) => {
            let focus = match idm.get_focus(user).await? {
                Some(f) => f,
                None => idm
                    .find_focus("user", "name", user)
                    .await?
                    .into_iter()
                    .next()
                    .with_context(|| format!("no user named {user:?} (nor with that id)"))?,
            };
            ("link", Some(focus))
        }
    };
    let stored = bus
        .peek(names::CHANGES_STREAM, shadow.position, 1)
        .await?
        .into_iter()
        .next()
        .filter(|m| m.stream_seq == shadow.position)
        .with_context(|| {
            format!(
                "the change that opened the case (sequence {}) is no longer in {}",
                shadow.position,
                names::CHANGES_STREAM
            )
        })?;
    let change = v1::ChangeEvent::decode(stored.payload.as_ref())
        .context("the change that opened the case does not decode")?;
    if change.entry_uuid != entry_uuid {
        bail!(
            "sequence {} of {} is not this entry's change",
            shadow.position,
            names::CHANGES_STREAM
        );
    }
    let decision = v1::Decision {
        schema_version: idsync_proto::SCHEMA_VERSION,
        change: Some(change),
        change_seq: shadow.position,
        situation: if focus.is_some() {
            "unlinked"
        } else {
            "unmatched"
        }
        .to_owned(),
        reaction: reaction.to_owned(),
        focus_id: focus.as_ref().map(|f| f.id.clone()).unwrap_or_default(),
        shadow_version: shadow.version,
        focus_version: focus.as_ref().map_or(0, |f| f.version),
        resolution: reaction.to_owned(),
        failure: String::new(),
    };
    bus.publish_and_wait(
        &names::decision_subject(agreement, resource),
        &format!("resolution:{resource}:{entry_uuid}:{}", shadow.version),
        decision.encode_to_vec().into(),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(now) = idm.get_shadow(resource, entry_uuid).await?
            && now.version != shadow.version
        {
            return Ok(now);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the resolution was sent, but the case is still open after {wait:?}; see the applier's log"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
