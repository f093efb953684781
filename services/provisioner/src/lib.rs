//! The provisioner: for each committed focus change, brings the focus's
//! accounts on target resources in line with its assignments and the outbound
//! mappings — create, modify, delete — and records shadows and links in the IDM.
//!
//! It works from the focus's current state in the IDM, not from the event, so
//! changes delivered late, twice or out of order converge to the same result.

use std::sync::Arc;

use idsync_bus::worker::{Handling, Message, Source, backoff, run_worker};
use idsync_bus::{Bus, BusError, names};
use idsync_core::config::{Config, Deprovision, ResourceConfig};
use idsync_core::model::{Attrs, Focus, Link, Op, Shadow, normalize_dn};
use idsync_core::outbound::{account_modifications, desired_account, wanted_resources};
use idsync_core::situation::{Reaction, Situation};
use idsync_idm_client::{IdmClient, IdmError};
use idsync_ldap::{Connection, Directory, LdapError, Pool};
use idsync_proto::v1;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "provisioner";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Idm(#[from] IdmError),
    #[error(transparent)]
    Config(#[from] idsync_runtime::ConfigError),
}

/// Consumes the focus stream until `shutdown`.
///
/// # Errors
/// NATS cannot be reached at start, the IDM URL is malformed, or a target's
/// bind password cannot be read.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    let bus = Bus::connect(&config.nats.url).await?;
    // Provisioning is the IDM's own work: target shadows belong to no agreement.
    let idm = idsync_runtime::admin_client(&config)?;
    let mut targets = Pool::new();
    for r in config.resources.iter().filter(|r| r.dn_template.is_some()) {
        let conn = Connection::for_resource(r, idsync_runtime::bind_password(r)?);
        targets.add(&r.name, conn, &r.id_attribute);
    }
    let source = Source {
        service: SERVICE,
        stream: names::FOCUS_STREAM,
        durable: names::PROVISIONER,
        filter_subject: None,
    };
    run_worker(&bus, source, shutdown, |msg| {
        handle(&config, &idm, &targets, msg)
    })
    .await?;
    Ok(())
}

/// Why provisioning one account failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

impl From<IdmError> for Failure {
    fn from(e: IdmError) -> Self {
        if e.is_transient() {
            Failure::Transient(e.to_string())
        } else {
            Failure::Permanent(e.to_string())
        }
    }
}

fn ldap_failure(resource: &str, e: LdapError) -> Failure {
    let text = format!("resource {resource}: {e}");
    match e {
        LdapError::Connect { .. } | LdapError::Closed { .. } => Failure::Transient(text),
        _ => Failure::Permanent(text),
    }
}

#[tracing::instrument(skip_all, fields(seq = msg.stream_seq))]
async fn handle(config: &Config, idm: &IdmClient, targets: &Pool, msg: Message) -> Handling {
    let change = match v1::FocusChange::decode(msg.payload.as_ref()) {
        Ok(c) => c,
        Err(e) => return Handling::Poison(format!("not a FocusChange: {e}")),
    };
    if let Err(e) = idsync_proto::check_version(change.schema_version) {
        return Handling::Poison(e.to_string());
    }
    let result = if change.deleted {
        let last: Focus = change.focus.unwrap_or_default().into();
        deprovision_all(config, idm, targets, &last).await
    } else {
        match idm.get_focus(&change.focus_id).await {
            // Deleted since: its tombstone event deprovisions it.
            Ok(None) => Ok(()),
            Ok(Some(focus)) => provision(config, idm, targets, focus).await,
            Err(e) => Err(e.into()),
        }
    };
    match result {
        Ok(()) => Handling::Done,
        Err(Failure::Transient(reason)) if msg.delivered >= config.provisioning.max_attempts => {
            Handling::Poison(format!(
                "focus {}: gave up after {} attempts: {reason}",
                change.focus_id, msg.delivered
            ))
        }
        Err(Failure::Transient(reason)) => Handling::Retry {
            delay: backoff(msg.delivered),
            reason,
        },
        Err(Failure::Permanent(reason)) => {
            Handling::Poison(format!("focus {}: {reason}", change.focus_id))
        }
    }
}

/// Creates, updates or removes the focus's account on every target resource.
async fn provision(
    config: &Config,
    idm: &IdmClient,
    targets: &Pool,
    focus: Focus,
) -> Result<(), Failure> {
    let wanted: Vec<&str> = wanted_resources(config, &focus)
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    for resource in config.resources.iter().filter(|r| r.dn_template.is_some()) {
        let link = focus.link_to(&resource.name).cloned();
        let want = wanted.contains(&resource.name.as_str());
        match (want, link) {
            (true, None) => create(idm, targets, resource, &focus).await?,
            (true, Some(link)) => update(idm, targets, resource, &focus, &link).await?,
            (false, Some(link)) if resource.deprovision == Deprovision::Disable => {
                disable(idm, targets, resource, &link, false).await?;
            }
            (false, Some(link)) => remove(idm, targets, resource, Some(&focus), &link).await?,
            (false, None) => {}
        }
    }
    Ok(())
}

/// Removes every account a deleted focus had on target resources.
async fn deprovision_all(
    config: &Config,
    idm: &IdmClient,
    targets: &Pool,
    last: &Focus,
) -> Result<(), Failure> {
    for link in &last.links {
        if let Ok(resource) = config.resource(&link.resource)
            && resource.dn_template.is_some()
        {
            if resource.deprovision == Deprovision::Disable {
                disable(idm, targets, resource, link, true).await?;
            } else {
                remove(idm, targets, resource, None, link).await?;
            }
        }
    }
    Ok(())
}

async fn with_dir<T>(
    targets: &Pool,
    resource: &ResourceConfig,
    op: impl AsyncFnOnce(&mut Directory) -> Result<T, LdapError>,
) -> Result<T, Failure> {
    targets
        .with(&resource.name, op)
        .await
        .map_err(|e| ldap_failure(&resource.name, e))
}

async fn create(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    focus: &Focus,
) -> Result<(), Failure> {
    let account =
        desired_account(resource, focus).map_err(|e| Failure::Permanent(e.to_string()))?;
    let added = with_dir(targets, resource, async |dir| {
        match dir.add(&account.dn, &account.attributes).await {
            Ok(()) => Ok(None),
            Err(LdapError::AlreadyExists { .. }) => dir.read(&account.dn).await,
            Err(e) => Err(e),
        }
    })
    .await?;
    if let Some(existing) = added {
        // Discovery (midPoint): the account is already there — made by us
        // before a crash, or by someone else. Whose is it, and what does the
        // resource's `unlinked` reaction say?
        let owner = idm
            .get_shadow(&resource.name, &existing.entry_uuid)
            .await?
            .filter(|s| !s.dead)
            .and_then(|s| s.focus_id);
        if let Some(other) = owner.filter(|o| *o != focus.id) {
            return Err(Failure::Permanent(format!(
                "resource {}: account {} already exists and belongs to user {other}",
                resource.name, account.dn
            )));
        }
        let reaction = resource
            .reactions
            .get(&Situation::Unlinked)
            .map_or(Reaction::Link, |r| r.action);
        if !matches!(reaction, Reaction::Link | Reaction::Synchronize) {
            return Err(Failure::Permanent(format!(
                "resource {}: account {} already exists, and the unlinked reaction ({reaction}) does not link it",
                resource.name, account.dn
            )));
        }
        tracing::info!(resource = %resource.name, dn = %account.dn, "account exists already; linking it");
        // What idsync set on an account it did not know is unknown: a mapped
        // range removes nothing there.
        let mods = account_modifications(&account, &existing.attributes, &Attrs::new());
        if !mods.is_empty() {
            with_dir(targets, resource, async |dir| {
                dir.replace(&account.dn, &mods).await
            })
            .await?;
        }
    }
    let entry = with_dir(targets, resource, async |dir| dir.read(&account.dn).await).await?;
    let Some(entry) = entry else {
        return Err(Failure::Transient(format!(
            "account {} vanished right after it was added",
            account.dn
        )));
    };
    tracing::info!(resource = %resource.name, dn = %entry.dn, focus = %focus.id, "account created");
    let existing = idm.get_shadow(&resource.name, &entry.entry_uuid).await?;
    let shadow = Shadow {
        resource: resource.name.clone(),
        entry_uuid: entry.entry_uuid.clone(),
        dn: account.dn.clone(),
        focus_id: Some(focus.id.clone()),
        position: focus.version,
        situation: "linked".into(),
        attributes: account.produced.clone(),
        ..existing.clone().unwrap_or_default()
    };
    let mut linked = focus.clone();
    linked.set_link(Link {
        resource: resource.name.clone(),
        entry_uuid: entry.entry_uuid,
        dn: account.dn,
    });
    let ops = vec![
        Op::PutShadow {
            expected_version: existing.map_or(0, |s| s.version),
            shadow,
        },
        Op::PutFocus {
            expected_version: focus.version,
            focus: linked,
        },
    ];
    commit(idm, ops, &resource.name).await
}

async fn update(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    focus: &Focus,
    link: &Link,
) -> Result<(), Failure> {
    let account =
        desired_account(resource, focus).map_err(|e| Failure::Permanent(e.to_string()))?;
    if normalize_dn(&account.dn) != normalize_dn(&link.dn) {
        // The name the DN comes from changed: rename the account (modrdn),
        // keeping its identity, then record the new DN on link and shadow.
        return rename(idm, targets, resource, focus, link, &account.dn).await;
    }
    // Mapped-range mappings need what they produced last time: the shadow has it.
    let shadow = if account.produced.is_empty() {
        None
    } else {
        idm.get_shadow(&resource.name, &link.entry_uuid).await?
    };
    let previous = shadow
        .as_ref()
        .map(|s| s.attributes.clone())
        .unwrap_or_default();
    let changed = with_dir(targets, resource, async |dir| {
        let Some(current) = dir.read(&link.dn).await? else {
            return Ok(None);
        };
        let mut mods = account_modifications(&account, &current.attributes, &previous);
        // Wanted again after it was disabled: enable it.
        if resource.deprovision == Deprovision::Disable
            && let Some(d) = &resource.disable
            && current
                .attributes
                .get(&d.attribute.to_ascii_lowercase())
                .is_some_and(|v| v.iter().any(|x| x.eq_ignore_ascii_case(&d.value)))
        {
            mods.push((d.attribute.clone(), Vec::new()));
        }
        if !mods.is_empty() {
            dir.replace(&link.dn, &mods).await?;
        }
        Ok(Some(mods.len()))
    })
    .await?;
    match changed {
        // The account was deleted behind our back: forget the link, create anew.
        None => {
            tracing::warn!(resource = %resource.name, dn = %link.dn, "linked account is gone; creating it again");
            let mut unlinked = focus.clone();
            unlinked.remove_link(&link.resource, &link.entry_uuid);
            commit(
                idm,
                vec![Op::PutFocus {
                    expected_version: focus.version,
                    focus: unlinked,
                }],
                &resource.name,
            )
            .await
        }
        Some(n) => {
            if n > 0 {
                tracing::info!(resource = %resource.name, dn = %link.dn, attributes = n, "account modified");
            }
            match shadow {
                Some(s) if s.attributes != account.produced => {
                    let expected_version = s.version;
                    let next = Shadow {
                        attributes: account.produced.clone(),
                        ..s
                    };
                    commit(
                        idm,
                        vec![Op::PutShadow {
                            shadow: next,
                            expected_version,
                        }],
                        &resource.name,
                    )
                    .await
                }
                _ => Ok(()),
            }
        }
    }
}

/// Renames the account of `link` to `new_dn` and records it; the next focus
/// event (this commit's own) brings its attributes in line.
async fn rename(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    focus: &Focus,
    link: &Link,
    new_dn: &str,
) -> Result<(), Failure> {
    let result = with_dir(targets, resource, async |dir| {
        match dir.rename(&link.dn, new_dn).await {
            Ok(()) => Ok(true),
            // Renamed already (a retry after a crash): nothing to do here.
            Err(LdapError::NoSuchObject { .. }) => Ok(dir.read(new_dn).await?.is_some()),
            Err(e) => Err(e),
        }
    })
    .await;
    match result {
        Ok(true) => {}
        Ok(false) => {
            return Err(Failure::Transient(format!(
                "resource {}: account {} is gone, and {new_dn} is not there either",
                resource.name, link.dn
            )));
        }
        Err(Failure::Permanent(reason)) | Err(Failure::Transient(reason))
            if reason.contains("already exists") =>
        {
            return Err(Failure::Permanent(format!(
                "resource {}: cannot rename {} to {new_dn}: {reason}",
                resource.name, link.dn
            )));
        }
        Err(e) => return Err(e),
    }
    tracing::info!(resource = %resource.name, from = %link.dn, to = %new_dn, focus = %focus.id, "account renamed");
    let mut renamed = focus.clone();
    renamed.set_link(Link {
        resource: resource.name.clone(),
        entry_uuid: link.entry_uuid.clone(),
        dn: new_dn.to_owned(),
    });
    let mut ops = vec![Op::PutFocus {
        expected_version: focus.version,
        focus: renamed,
    }];
    if let Some(shadow) = idm.get_shadow(&resource.name, &link.entry_uuid).await? {
        ops.push(Op::PutShadow {
            expected_version: shadow.version,
            shadow: Shadow {
                dn: new_dn.to_owned(),
                ..shadow
            },
        });
    }
    commit(idm, ops, &resource.name).await
}

/// Disables the account of `link` and keeps it (the `disable` policy). When
/// its user is gone (`orphaned`), the shadow is unlinked as well.
async fn disable(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    link: &Link,
    orphaned: bool,
) -> Result<(), Failure> {
    let Some(d) = &resource.disable else {
        return Err(Failure::Permanent(format!(
            "resource {}: deprovision = \"disable\" needs its `disable` setting",
            resource.name
        )));
    };
    let changed = with_dir(targets, resource, async |dir| {
        let Some(current) = dir.read(&link.dn).await? else {
            return Ok(false);
        };
        let already = current
            .attributes
            .get(&d.attribute.to_ascii_lowercase())
            .is_some_and(|v| v.iter().any(|x| x.eq_ignore_ascii_case(&d.value)));
        if !already {
            dir.replace(&link.dn, &[(d.attribute.clone(), vec![d.value.clone()])])
                .await?;
        }
        Ok(!already)
    })
    .await?;
    if changed {
        tracing::info!(resource = %resource.name, dn = %link.dn, "account disabled and kept");
    }
    if orphaned
        && let Some(shadow) = idm.get_shadow(&resource.name, &link.entry_uuid).await?
        && shadow.focus_id.is_some()
    {
        let expected_version = shadow.version;
        let unlinked = Shadow {
            focus_id: None,
            situation: "unlinked".into(),
            ..shadow
        };
        commit(
            idm,
            vec![Op::PutShadow {
                shadow: unlinked,
                expected_version,
            }],
            &resource.name,
        )
        .await?;
    }
    Ok(())
}

async fn remove(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    focus: Option<&Focus>,
    link: &Link,
) -> Result<(), Failure> {
    with_dir(targets, resource, async |dir| {
        match dir.delete(&link.dn).await {
            Ok(()) | Err(LdapError::NoSuchObject { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await?;
    tracing::info!(resource = %resource.name, dn = %link.dn, "account deleted");
    let mut ops = Vec::new();
    if let Some(shadow) = idm.get_shadow(&resource.name, &link.entry_uuid).await? {
        ops.push(Op::DeleteShadow {
            resource: resource.name.clone(),
            entry_uuid: link.entry_uuid.clone(),
            expected_version: shadow.version,
        });
    }
    if let Some(focus) = focus {
        let mut unlinked = focus.clone();
        unlinked.remove_link(&link.resource, &link.entry_uuid);
        ops.push(Op::PutFocus {
            expected_version: focus.version,
            focus: unlinked,
        });
    }
    if ops.is_empty() {
        return Ok(());
    }
    commit(idm, ops, &resource.name).await
}

/// A lost race means the focus changed meanwhile: its own change event will
/// run provisioning again on the new state, but this one must be retried too,
/// so that what it did on the target gets recorded.
async fn commit(idm: &IdmClient, ops: Vec<Op>, origin: &str) -> Result<(), Failure> {
    match idm.commit(ops, origin).await {
        Ok(_) => Ok(()),
        Err(IdmError::Conflict(reason)) => {
            Err(Failure::Transient(format!("lost a race: {reason}")))
        }
        Err(e) => Err(e.into()),
    }
}
