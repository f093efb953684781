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
use idsync_core::model::{
    Attrs, Focus, KIND_ROLE, Link, Op, PendingOperation, Shadow, normalize_dn,
};
use idsync_core::outbound::{
    Construction, Writes, account_modifications, constructions, desired_account,
};
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
    let bus = Bus::connect_with(&config.nats.url, Some(config.nats.retention())).await?;
    // Provisioning is the IDM's own work: target shadows belong to no agreement.
    // The commits (shadows, links) and reads of the users in hand go to the
    // IDM together.
    let idm = idsync_runtime::admin_client(&config)?
        .with_batching(config.workers.provisioner_concurrency as usize);
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
        concurrency: config.workers.provisioner_concurrency as usize,
    };
    run_worker(&bus, source, shutdown, |msg| {
        handle(&config, &bus, &idm, &targets, msg)
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
        // A directory that does not answer in time is as good as down.
        LdapError::Connect { .. } | LdapError::Closed { .. } | LdapError::Timeout { .. } => {
            Failure::Transient(text)
        }
        // The account went between the read and the write (another replica
        // deleted it, or someone by hand): the next attempt reads again and
        // creates it or leaves it gone. It was parked (three-replica test).
        LdapError::NoSuchObject { .. } => Failure::Transient(text),
        _ => Failure::Permanent(text),
    }
}

#[tracing::instrument(skip_all, fields(seq = msg.stream_seq))]
async fn handle(
    config: &Config,
    bus: &Bus,
    idm: &IdmClient,
    targets: &Pool,
    msg: Message,
) -> Handling {
    let change = match v1::FocusChange::decode(msg.payload.as_ref()) {
        Ok(c) => c,
        Err(e) => return Handling::Poison(format!("not a FocusChange: {e}")),
    };
    if let Err(e) = idsync_proto::check_version(change.schema_version) {
        return Handling::Poison(e.to_string());
    }
    // The provisioner's record of the account it just made, or the IDM's
    // own link: nothing to bring in line that the account was not made from.
    if change.links_added_only && change.origin_resource.is_empty() {
        tracing::debug!(focus_id = %change.focus_id, "links recorded; nothing to provision");
        return Handling::Done;
    }
    let attempt = Attempt {
        origin: change.origin_resource.clone(),
        before: change.has_before.then(|| {
            change
                .before_attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.values.clone()))
                .collect()
        }),
    };
    let kind = change.focus.as_ref().map(|f| f.kind.as_str());
    let result = if kind == Some(KIND_ROLE) {
        let role: Focus = change.focus.clone().unwrap_or_default().into();
        fan_out(bus, idm, &role, change.outbox_seq).await
    } else if change.deleted {
        let last: Focus = change.focus.unwrap_or_default().into();
        deprovision_all(config, idm, targets, &last).await
    } else {
        match idm.get_focus(&change.focus_id).await {
            // Deleted since: its tombstone event deprovisions it; an account
            // an earlier attempt at this change made without recording it
            // (the reply lost) is taken back here or there.
            Ok(None) => {
                let last: Focus = change.focus.unwrap_or_default().into();
                take_back_unrecorded(config, idm, targets, &last).await
            }
            Ok(Some(focus)) => provision(config, idm, targets, focus, &attempt).await,
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

/// Which resource a change came from (empty for the IDM's own changes), and
/// the focus's attributes before it (absent where the whole state is to be
/// enforced).
struct Attempt {
    origin: String,
    before: Option<Attrs>,
}

/// A role changed (or went): every focus that holds it, directly or through
/// roles that include it, is provisioned again — one focus event each, so
/// that they spread over the provisioner's replicas.
async fn fan_out(bus: &Bus, idm: &IdmClient, role: &Focus, seq: u64) -> Result<(), Failure> {
    let Some(name) = role.first(idsync_core::model::NAME_ATTRIBUTE) else {
        return Ok(());
    };
    let mut holders = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::from([name.to_owned()]);
    let mut queue = vec![name.to_owned()];
    while let Some(r) = queue.pop() {
        let (ids, including) = idm.role_referrers(&r).await?;
        holders.extend(ids);
        queue.extend(including.into_iter().filter(|i| seen.insert(i.clone())));
    }
    let mut acks = Vec::with_capacity(holders.len());
    for id in &holders {
        // Nothing changed at the user: its attributes as they are are the
        // before-image, so strong mappings and what roles give are enforced
        // and normal mappings leave hand edits alone (as reconciliation does).
        let Some(holder) = idm.get_focus(id).await? else {
            continue;
        };
        let change = v1::FocusChange {
            schema_version: idsync_proto::SCHEMA_VERSION,
            outbox_seq: 0,
            focus_id: id.clone(),
            focus: None,
            deleted: false,
            origin_resource: String::new(),
            before_attributes: holder
                .attributes
                .into_iter()
                .map(|(k, values)| (k, v1::Values { values }))
                .collect(),
            has_before: true,
            traceparent: String::new(),
            links_added_only: false,
        };
        let msg_id = format!("role:{}:{seq}:{id}", role.id);
        let ack = bus
            .publish(names::FOCUS_SUBJECT, &msg_id, change.encode_to_vec().into())
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.wait()
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?;
    }
    if !holders.is_empty() {
        tracing::info!(role = %name, holders = holders.len(), "role changed; its holders are provisioned again");
    }
    Ok(())
}

/// Creates, updates or removes the focus's account on every target resource.
async fn provision(
    config: &Config,
    idm: &IdmClient,
    targets: &Pool,
    focus: Focus,
    attempt: &Attempt,
) -> Result<(), Failure> {
    let roles = idm.roles_of(&focus).await?;
    let wanted =
        constructions(config, &focus, &roles).map_err(|e| Failure::Permanent(e.to_string()))?;
    for resource in config.resources.iter().filter(|r| r.dn_template.is_some()) {
        let link = focus.link_to(&resource.name).cloned();
        let (operation, result) = match (wanted.get(&resource.name), &link) {
            (Some(c), None) => ("create", create(idm, targets, resource, &focus, c).await),
            (Some(c), Some(link)) => {
                let only = if attempt.origin == resource.name {
                    Writes::StrongOnly
                } else if let Some(before) = &attempt.before {
                    let mut old = focus.clone();
                    old.attributes = before.clone();
                    // What the mappings gave before the change; a template
                    // that cannot render then wrote nothing to compare with.
                    match desired_account(resource, &old, c) {
                        Ok(account) => Writes::Changed(account.attributes),
                        Err(_) => Writes::All,
                    }
                } else {
                    Writes::All
                };
                (
                    "modify",
                    update(idm, targets, resource, &focus, c, link, only).await,
                )
            }
            (None, Some(link)) if resource.deprovision == Deprovision::Disable => (
                "disable",
                disable(idm, targets, resource, link, false).await,
            ),
            (None, Some(link)) => (
                "delete",
                remove(idm, targets, resource, Some(&focus), link).await,
            ),
            (None, None) => continue,
        };
        idsync_telemetry::metrics::inc(
            "idsync_provisioning_total",
            "Provisioning of one account, by resource, operation and outcome.",
            &[
                ("resource", &resource.name),
                ("operation", operation),
                (
                    "outcome",
                    match &result {
                        Ok(()) => "ok",
                        Err(Failure::Transient(_)) => "retry",
                        Err(Failure::Permanent(_)) => "failed",
                    },
                ),
            ],
        );
        if let (Err(Failure::Transient(reason)), Some(link)) = (&result, &link) {
            note_pending(idm, resource, link, operation, reason).await;
        }
        result?;
    }
    Ok(())
}

/// Whether the IDM keeps this resource's shadows for the provisioner: a
/// resource that also writes to the IDM under an agreement has its shadows
/// and links made by its own inbound synchronisation instead.
fn idm_owned(resource: &ResourceConfig) -> bool {
    resource.agreement.is_none()
}

/// Shows a failed operation on the account's shadow while it is retried
/// (best effort: the IDM may be what failed).
async fn note_pending(
    idm: &IdmClient,
    resource: &ResourceConfig,
    link: &Link,
    operation: &str,
    reason: &str,
) {
    if !idm_owned(resource) {
        return;
    }
    let noted = async {
        let Some(shadow) = idm.get_shadow(&resource.name, &link.entry_uuid).await? else {
            return Ok(());
        };
        // Attempts on the account, whichever of its user's events made them.
        let (since_ms, attempts) = shadow.pending.as_ref().map_or((now_ms(), 1), |p| {
            (p.since_ms, p.attempts.saturating_add(1))
        });
        let expected_version = shadow.version;
        let next = Shadow {
            pending: Some(PendingOperation {
                operation: operation.to_owned(),
                attempts,
                reason: format!("{operation} {}: {reason}", link.dn),
                since_ms,
            }),
            ..shadow
        };
        idm.commit(
            vec![Op::PutShadow {
                shadow: next,
                expected_version,
            }],
            "",
        )
        .await
        .map(|_| ())
    };
    if let Err(e) = noted.await {
        tracing::warn!(resource = %resource.name, dn = %link.dn, error = %e, "could not record the pending operation on the shadow");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
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
            deprovision(idm, targets, resource, link).await?;
        }
    }
    take_back_unrecorded(config, idm, targets, last).await
}

/// The account of a user that is gone, by the resource's `deprovision`
/// policy: deleted, or disabled and unlinked.
async fn deprovision(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    link: &Link,
) -> Result<(), Failure> {
    if resource.deprovision == Deprovision::Disable {
        disable(idm, targets, resource, link, true).await
    } else {
        remove(idm, targets, resource, None, link).await
    }
}

/// Whether an add that finds the account already there links it (the
/// resource's `unlinked` reaction, `link` unless configured); the reaction.
fn links_existing(resource: &ResourceConfig) -> (bool, Reaction) {
    let reaction = resource
        .reactions
        .get(&Situation::Unlinked)
        .map_or(Reaction::Link, |r| r.action);
    (
        matches!(reaction, Reaction::Link | Reaction::Synchronize),
        reaction,
    )
}

/// A user gone before its account was recorded: an add whose reply was
/// lost (the target stopped under it) made an account that no shadow names,
/// so no deletion finds it. On each target the deleted user `last` had an
/// account wanted on but no link to, an account at the DN it would have had
/// that no live shadow claims, and that no user now holding the name could
/// own, is the one provisioning made: it is deprovisioned as a linked one
/// would have been. Had the add been recorded, or found the account there
/// already (which it links), the user's deletion would have done the same.
async fn take_back_unrecorded(
    config: &Config,
    idm: &IdmClient,
    targets: &Pool,
    last: &Focus,
) -> Result<(), Failure> {
    let unlinked: Vec<&ResourceConfig> = config
        .resources
        .iter()
        .filter(|r| r.dn_template.is_some() && idm_owned(r) && last.link_to(&r.name).is_none())
        // Only where an add that found the account there would have linked
        // it: elsewhere an unclaimed account at that DN is someone else's.
        .filter(|r| links_existing(r).0)
        .collect();
    if unlinked.is_empty() || last.id.is_empty() {
        return Ok(());
    }
    let roles = match idm.roles_of(last).await {
        Ok(r) => r,
        Err(e) if e.is_transient() => return Err(e.into()),
        // Its roles are gone too: nothing says which accounts it had.
        Err(_) => return Ok(()),
    };
    let Ok(wanted) = constructions(config, last, &roles) else {
        return Ok(());
    };
    for resource in unlinked {
        let Some(account) = wanted
            .get(&resource.name)
            .and_then(|c| desired_account(resource, last, c).ok())
        else {
            continue;
        };
        let found = with_dir(targets, resource, async |dir| dir.read(&account.dn).await).await?;
        let Some(entry) = found else { continue };
        let claimed = idm
            .get_shadow(&resource.name, &entry.entry_uuid)
            .await?
            .is_some_and(|s| !s.dead);
        if claimed {
            continue;
        }
        // The name may be someone's again (deleted and added back): their
        // account, not an orphan.
        if let Some(name) = last.first("name")
            && !idm.find_focus(&last.kind, "name", name).await?.is_empty()
        {
            return Ok(());
        }
        tracing::warn!(resource = %resource.name, dn = %account.dn, focus = %last.id, "an account no shadow records, made for a user now deleted; deprovisioning it");
        let link = Link {
            resource: resource.name.clone(),
            entry_uuid: entry.entry_uuid,
            dn: account.dn,
        };
        deprovision(idm, targets, resource, &link).await?;
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

/// The value that names the account in a group's member attribute.
fn member_value(resource: &ResourceConfig, dn: &str, account: &Attrs) -> Result<String, Failure> {
    let e = &resource.entitlements;
    if e.value.eq_ignore_ascii_case("dn") {
        return Ok(dn.to_owned());
    }
    account
        .get(&e.value.to_ascii_lowercase())
        .and_then(|v| v.first())
        .cloned()
        .ok_or_else(|| {
            Failure::Permanent(format!(
                "resource {}: account {dn} has no {} to name it in groups (entitlements.value)",
                resource.name, e.value
            ))
        })
}

/// Makes the account a member of the groups `wanted` and no longer of those
/// in `before` that are not wanted; returns the groups it is now in.
async fn sync_groups(
    targets: &Pool,
    resource: &ResourceConfig,
    value: &str,
    wanted: &[String],
    before: &[String],
) -> Result<Vec<String>, Failure> {
    let has = |list: &[String], g: &str| {
        let key = normalize_dn(g);
        list.iter().any(|x| normalize_dn(x) == key)
    };
    let attribute = &resource.entitlements.attribute;
    for g in wanted.iter().filter(|g| !has(before, g)) {
        let added = targets
            .with(&resource.name, async |dir| {
                dir.change_value(g, attribute, value, true).await
            })
            .await;
        match added {
            Ok(()) => {}
            Err(LdapError::NoSuchObject { .. }) => {
                return Err(Failure::Permanent(format!(
                    "resource {}: group {g}, which a role gives, does not exist (idsync manages members, not groups)",
                    resource.name
                )));
            }
            Err(e) => return Err(ldap_failure(&resource.name, e)),
        }
        tracing::info!(resource = %resource.name, group = %g, member = %value, "member added");
    }
    for g in before.iter().filter(|g| !has(wanted, g)) {
        let result = with_dir(targets, resource, async |dir| {
            match dir.change_value(g, attribute, value, false).await {
                // The group is gone, and the membership with it.
                Err(LdapError::NoSuchObject { .. }) => Ok(()),
                other => other,
            }
        })
        .await;
        result?;
        tracing::info!(resource = %resource.name, group = %g, member = %value, "member removed");
    }
    Ok(wanted.to_vec())
}

async fn create(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    focus: &Focus,
    construction: &Construction,
) -> Result<(), Failure> {
    let account = desired_account(resource, focus, construction)
        .map_err(|e| Failure::Permanent(e.to_string()))?;
    let added = with_dir(targets, resource, async |dir| {
        match dir.add(&account.dn, &account.attributes).await {
            Ok(()) => Ok(None),
            Err(LdapError::AlreadyExists { .. }) => dir.read(&account.dn).await,
            Err(e) => Err(e),
        }
    })
    .await?;
    let created = added.is_none();
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
            // A user deleted in the IDM whose account is not deprovisioned
            // yet (its focus event is with another replica, or waiting to be
            // retried): the name is about to be free, so wait for it.
            if idm.get_focus(&other).await?.is_none() {
                return Err(Failure::Transient(format!(
                    "resource {}: account {} still belongs to user {other}, which is deleted; waiting for the account to be deprovisioned",
                    resource.name, account.dn
                )));
            }
            return Err(Failure::Permanent(format!(
                "resource {}: account {} already exists and belongs to user {other}",
                resource.name, account.dn
            )));
        }
        let (links, reaction) = links_existing(resource);
        if !links {
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
    let value = member_value(resource, &account.dn, &account.attributes)?;
    let groups = sync_groups(targets, resource, &value, &construction.groups, &[]).await?;
    if !idm_owned(resource) {
        // The resource's own inbound synchronisation sees the new account,
        // correlates it to this focus and links it.
        tracing::info!(resource = %resource.name, dn = %account.dn, focus = %focus.id, "account created");
        return Ok(());
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
        groups: groups.clone(),
        pending: None,
        ..existing.clone().unwrap_or_default()
    };
    let mut linked = focus.clone();
    linked.set_link(Link {
        resource: resource.name.clone(),
        entry_uuid: entry.entry_uuid,
        dn: account.dn.clone(),
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
    let dn = account.dn;
    match commit(idm, ops).await {
        // The user went while its account was being made: its deletion was
        // provisioned (by another replica or task) before this account
        // existed, so nothing else will ever remove it. Take back what this
        // pass created; an account found already there is left alone.
        Err(Failure::Transient(reason)) if created => {
            if idm.get_focus(&focus.id).await?.is_some() {
                return Err(Failure::Transient(reason));
            }
            sync_groups(targets, resource, &value, &[], &groups).await?;
            with_dir(targets, resource, async |dir| match dir.delete(&dn).await {
                Ok(()) | Err(LdapError::NoSuchObject { .. }) => Ok(()),
                Err(e) => Err(e),
            })
            .await?;
            tracing::info!(resource = %resource.name, dn = %dn, focus = %focus.id, "user deleted before its new account was recorded; account removed");
            Ok(())
        }
        other => other,
    }
}

/// Brings a linked account in line, writing what `only` allows.
async fn update(
    idm: &IdmClient,
    targets: &Pool,
    resource: &ResourceConfig,
    focus: &Focus,
    construction: &Construction,
    link: &Link,
    only: Writes,
) -> Result<(), Failure> {
    let account = desired_account(resource, focus, construction)
        .map_err(|e| Failure::Permanent(e.to_string()))?;
    // What idsync produced and the groups it gave, last time.
    let shadow = if idm_owned(resource) {
        idm.get_shadow(&resource.name, &link.entry_uuid).await?
    } else {
        None
    };
    // The name the DN comes from changed: rename the account (modrdn),
    // keeping its identity; its attributes are brought in line right after,
    // and the new DN recorded on link and shadow with them.
    let renamed = normalize_dn(&account.dn) != normalize_dn(&link.dn);
    if renamed {
        rename(targets, resource, focus, link, &account.dn, shadow.as_ref()).await?;
    }
    let dn = if renamed { &account.dn } else { &link.dn };
    let previous = shadow
        .as_ref()
        .map(|s| s.attributes.clone())
        .unwrap_or_default();
    let changed = with_dir(targets, resource, async |dir| {
        let Some(current) = dir.read(dn).await? else {
            return Ok(None);
        };
        let mut mods = account_modifications(&account, &current.attributes, &previous);
        mods.retain(|(name, _)| only.allows(&account, name));
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
            dir.replace(dn, &mods).await?;
        }
        Ok(Some(mods.len()))
    })
    .await?;
    let Some(n) = changed else {
        // The account was deleted behind our back: forget the link, create anew.
        tracing::warn!(resource = %resource.name, dn = %link.dn, "linked account is gone; creating it again");
        if !idm_owned(resource) {
            return create(idm, targets, resource, focus, construction).await;
        }
        let mut unlinked = focus.clone();
        unlinked.remove_link(&link.resource, &link.entry_uuid);
        return commit(
            idm,
            vec![Op::PutFocus {
                expected_version: focus.version,
                focus: unlinked,
            }],
        )
        .await;
    };
    if n > 0 {
        tracing::info!(resource = %resource.name, dn = %dn, attributes = n, "account modified");
    }
    let before = shadow
        .as_ref()
        .map(|s| s.groups.clone())
        .unwrap_or_default();
    let value = member_value(resource, dn, &account.attributes)?;
    let groups = sync_groups(targets, resource, &value, &construction.groups, &before).await?;
    let mut ops = Vec::new();
    if renamed && idm_owned(resource) {
        let mut moved = focus.clone();
        moved.set_link(Link {
            resource: resource.name.clone(),
            entry_uuid: link.entry_uuid.clone(),
            dn: dn.clone(),
        });
        ops.push(Op::PutFocus {
            expected_version: focus.version,
            focus: moved,
        });
    }
    if let Some(s) = shadow
        && (renamed
            || s.attributes != account.produced
            || s.groups != groups
            || s.pending.is_some())
    {
        let expected_version = s.version;
        ops.push(Op::PutShadow {
            shadow: Shadow {
                dn: dn.clone(),
                attributes: account.produced.clone(),
                groups,
                pending: None,
                ..s
            },
            expected_version,
        });
    }
    if ops.is_empty() {
        return Ok(());
    }
    commit(idm, ops).await
}

/// Renames the account of `link` to `new_dn` on the directory, and moves
/// the memberships idsync gave it (groups name members by DN).
async fn rename(
    targets: &Pool,
    resource: &ResourceConfig,
    focus: &Focus,
    link: &Link,
    new_dn: &str,
    shadow: Option<&Shadow>,
) -> Result<(), Failure> {
    let result = targets
        .with(&resource.name, async |dir| {
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
        Err(e @ LdapError::AlreadyExists { .. }) => {
            return Err(Failure::Permanent(format!(
                "resource {}: cannot rename {} to {new_dn}: {e}",
                resource.name, link.dn
            )));
        }
        Err(e) => return Err(ldap_failure(&resource.name, e)),
    }
    tracing::info!(resource = %resource.name, from = %link.dn, to = %new_dn, focus = %focus.id, "account renamed");
    if resource.entitlements.value.eq_ignore_ascii_case("dn")
        && let Some(s) = shadow
    {
        for g in &s.groups {
            let attribute = &resource.entitlements.attribute;
            with_dir(targets, resource, async |dir| {
                dir.change_value(g, attribute, new_dn, true).await?;
                match dir.change_value(g, attribute, &link.dn, false).await {
                    Err(LdapError::NoSuchObject { .. }) => Ok(()),
                    other => other,
                }
            })
            .await?;
        }
    }
    Ok(())
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
    if !idm_owned(resource) {
        return Ok(());
    }
    if let Some(shadow) = idm.get_shadow(&resource.name, &link.entry_uuid).await?
        && (shadow.pending.is_some() || (orphaned && shadow.focus_id.is_some()))
    {
        let expected_version = shadow.version;
        let next = if orphaned {
            Shadow {
                focus_id: None,
                situation: "unlinked".into(),
                pending: None,
                ..shadow
            }
        } else {
            Shadow {
                pending: None,
                ..shadow
            }
        };
        commit(
            idm,
            vec![Op::PutShadow {
                shadow: next,
                expected_version,
            }],
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
    let shadow = if idm_owned(resource) {
        idm.get_shadow(&resource.name, &link.entry_uuid).await?
    } else {
        None
    };
    // Groups keep a deleted member's DN unless told (no referential integrity).
    if let Some(s) = &shadow
        && !s.groups.is_empty()
    {
        let value = if resource.entitlements.value.eq_ignore_ascii_case("dn") {
            Some(link.dn.clone())
        } else {
            with_dir(targets, resource, async |dir| dir.read(&link.dn).await)
                .await?
                .and_then(|e| {
                    e.attributes
                        .get(&resource.entitlements.value.to_ascii_lowercase())
                        .and_then(|v| v.first().cloned())
                })
        };
        if let Some(value) = value {
            sync_groups(targets, resource, &value, &[], &s.groups).await?;
        }
    }
    with_dir(targets, resource, async |dir| {
        match dir.delete(&link.dn).await {
            Ok(()) | Err(LdapError::NoSuchObject { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await?;
    tracing::info!(resource = %resource.name, dn = %link.dn, "account deleted");
    if !idm_owned(resource) {
        return Ok(());
    }
    let mut ops = Vec::new();
    if let Some(shadow) = shadow {
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
    commit(idm, ops).await
}

/// A lost race means the focus changed meanwhile: its own change event will
/// run provisioning again on the new state, but this one must be retried too,
/// so that what it did on the target gets recorded.
///
/// The commit names no origin resource: it records what the provisioner did,
/// and no resource's change caused it, so its own focus event is not taken
/// for an echo of one.
async fn commit(idm: &IdmClient, ops: Vec<Op>) -> Result<(), Failure> {
    match idm.commit(ops, "").await {
        Ok(_) => Ok(()),
        Err(IdmError::Conflict(reason)) => {
            Err(Failure::Transient(format!("lost a race: {reason}")))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_gone_under_a_write_is_retried_not_parked() {
        let gone = LdapError::NoSuchObject {
            dn: "cn=p0284,o=Acme".into(),
            operation: "modify".into(),
            url: "ldap://127.0.0.1:1".into(),
        };
        assert!(
            matches!(ldap_failure("acme", gone), Failure::Transient(t) if t.contains("cn=p0284"))
        );
    }
}
