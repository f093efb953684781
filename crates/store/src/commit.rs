//! Commits: conditional, atomic, and under authority. Every write names who
//! makes it ([`Writer`]); the store refuses what that writer does not own,
//! inside the same transaction that checks versions.
//!
//! Ownership, after Kanidm's sync agreements: a focus created through an
//! agreement records it as its sync parent, and only that agreement writes it —
//! except its *yielded* attributes, which belong to the IDM (an administrator
//! writes them; the agreement may no longer). A focus without a sync parent is
//! the IDM's own: administrators write it, no agreement may. A shadow belongs
//! to the agreement its resource writes under (configuration), or to the IDM
//! when the resource has none (provisioning targets). Links to another
//! owner's resources and assignments are the IDM's on every focus.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use prost::Message;

use idsync_proto::v1;

use crate::kv::{Kv, KvExt, KvWrite, KvWriteExt, Tbl};
use crate::{
    NAME, NEXT_OUTBOX, Store, StoreError, focus_name, name_key, now_ms, pending_key, ref_key,
    resolve_pending, shadow_key, shadow_member_keys,
};

/// Who makes a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The IDM's administrator credential (the CLI, the provisioner).
    Admin,
    /// A sync agreement's token.
    Agreement(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Admin => f.write_str("an administrator"),
            Principal::Agreement(a) => write!(f, "agreement {a:?}"),
        }
    }
}

/// A resource's deletion thresholds (from its `deletion_guard`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardLimits {
    pub max_count: Option<u64>,
    pub max_share: Option<f64>,
    pub window_ms: i64,
}

/// A principal, and which agreement each resource writes under.
#[derive(Debug, Clone)]
pub struct Writer {
    pub principal: Principal,
    /// Resource → agreement, from the configuration.
    pub owners: Arc<BTreeMap<String, String>>,
    /// Whether an agreement principal may take over native entries
    /// (`adopt_native` in its configuration).
    pub may_adopt: bool,
    /// Resource → its deletion thresholds.
    pub guards: Arc<BTreeMap<String, GuardLimits>>,
    /// The W3C trace context of the request, kept with each outbox record
    /// so the provisioner's work joins the trace of the change behind it.
    pub trace_parent: Option<String>,
}

impl Writer {
    /// An administrator, with no resource under any agreement (tests, tools).
    pub fn admin() -> Self {
        Self {
            principal: Principal::Admin,
            owners: Arc::default(),
            may_adopt: false,
            guards: Arc::default(),
            trace_parent: None,
        }
    }

    pub fn agreement(name: &str, owners: Arc<BTreeMap<String, String>>) -> Self {
        Self {
            principal: Principal::Agreement(name.to_owned()),
            owners,
            may_adopt: false,
            guards: Arc::default(),
            trace_parent: None,
        }
    }
}

/// One write transaction, and the outbox position it appends at.
pub(crate) struct Tables<'k> {
    pub kv: &'k mut dyn KvWrite,
    pub next_seq: u64,
    /// Copied into every outbox record this commit appends.
    pub trace_parent: String,
    /// Attributes whose values are indexed (read from the store, so that
    /// every writer keeps every index, whoever built it).
    pub indexed: Vec<String>,
}

impl<'k> Tables<'k> {
    pub fn open(kv: &'k mut dyn KvWrite) -> Result<Self, StoreError> {
        let next_seq = kv.get_u64(Tbl::Meta, NEXT_OUTBOX)?.unwrap_or(1);
        let indexed = kv.suffixes(Tbl::Meta, ATTR_INDEX)?;
        Ok(Self {
            kv,
            next_seq,
            trace_parent: String::new(),
            indexed,
        })
    }

    /// Keeps the attribute index of a focus that was `before` and is
    /// `after` (`None`: absent).
    pub fn index_attributes(
        &mut self,
        before: Option<&v1::Focus>,
        after: Option<&v1::Focus>,
    ) -> Result<(), StoreError> {
        if self.indexed.is_empty() {
            return Ok(());
        }
        let old = before.map_or_else(BTreeSet::new, |f| attr_keys(f, &self.indexed));
        let new = after.map_or_else(BTreeSet::new, |f| attr_keys(f, &self.indexed));
        for k in old.difference(&new) {
            self.kv.del(Tbl::FocusAttr, k)?;
        }
        for k in new.difference(&old) {
            self.kv.mark(Tbl::FocusAttr, k)?;
        }
        Ok(())
    }

    /// Records the outbox position; call before the transaction commits.
    pub fn finish(self) -> Result<(), StoreError> {
        self.kv.put_u64(Tbl::Meta, NEXT_OUTBOX, self.next_seq)
    }

    /// The record under `key` in `t`, decoded.
    pub fn load<M: Message + Default>(&self, t: Tbl, key: &str) -> Result<Option<M>, StoreError> {
        self.kv.load(t, key)
    }

    /// Appends the change of `focus` to the outbox under the next sequence.
    pub fn append_outbox(
        &mut self,
        focus: v1::Focus,
        deleted: bool,
        origin: &str,
        before: Option<&v1::Focus>,
    ) -> Result<(), StoreError> {
        let links_added_only = !deleted && before.is_some_and(|b| only_links_added(b, &focus));
        let change = v1::FocusChange {
            schema_version: idsync_proto::SCHEMA_VERSION,
            outbox_seq: self.next_seq,
            focus_id: focus.id.clone(),
            focus: Some(focus),
            deleted,
            origin_resource: origin.to_owned(),
            before_attributes: before.map(|b| b.attributes.clone()).unwrap_or_default(),
            has_before: before.is_some(),
            traceparent: self.trace_parent.clone(),
            links_added_only,
        };
        self.kv.insert(
            Tbl::Outbox,
            &self.next_seq.to_be_bytes(),
            &change.encode_to_vec(),
        )?;
        self.next_seq += 1;
        Ok(())
    }

    /// Adds `delta` to the count of `resource`'s live shadows.
    pub fn count_live(&mut self, resource: &str, delta: i64) -> Result<(), StoreError> {
        if delta == 0 {
            return Ok(());
        }
        let now = self.kv.get_u64(Tbl::ShadowLive, resource)?.unwrap_or(0);
        let next = now.saturating_add_signed(delta);
        self.kv.put_u64(Tbl::ShadowLive, resource, next)
    }

    pub fn guard_state(&self, resource: &str) -> Result<v1::DeletionGuardState, StoreError> {
        Ok(self.load(Tbl::Guard, resource)?.unwrap_or_default())
    }

    pub fn put_guard_state(
        &mut self,
        resource: &str,
        state: &v1::DeletionGuardState,
    ) -> Result<(), StoreError> {
        self.kv.put_msg(Tbl::Guard, resource, state)
    }

    /// Counts the death of `shadow` against its resource's guard, or refuses it.
    fn guard_deletion(&mut self, writer: &Writer, shadow: &v1::Shadow) -> Result<(), StoreError> {
        let Some(limits) = writer.guards.get(&shadow.resource) else {
            return Ok(());
        };
        let mut state = self.guard_state(&shadow.resource)?;
        if state.discard_through_seq > 0 && shadow.position <= state.discard_through_seq {
            return Err(StoreError::DeletionDiscarded {
                resource: shadow.resource.clone(),
                entry_uuid: shadow.entry_uuid.clone(),
            });
        }
        let now = now_ms();
        state.recent_ms.retain(|t| *t > now - limits.window_ms);
        if now >= state.allow_until_ms {
            let count = state.recent_ms.len() as u64 + 1;
            let live = self
                .kv
                .get_u64(Tbl::ShadowLive, &shadow.resource)?
                .unwrap_or(0);
            // The population when the window began: live now, plus those
            // deleted within it.
            let population = (live + count - 1).max(1);
            let share = count as f64 / population as f64;
            let over_count = limits.max_count.filter(|m| count > *m);
            let over_share = limits.max_share.filter(|m| share > *m);
            if over_count.is_some() || over_share.is_some() {
                return Err(StoreError::MassDeletion {
                    resource: shadow.resource.clone(),
                    count,
                    population,
                    percent: share * 100.0,
                    window_s: limits.window_ms / 1000,
                    limit: match (over_count, over_share) {
                        (Some(m), _) => format!("max_count {m}"),
                        (None, Some(s)) => format!("max_share {s}"),
                        (None, None) => String::new(),
                    },
                });
            }
        }
        state.recent_ms.push(now);
        self.put_guard_state(&shadow.resource, &state)
    }

    pub fn agreement(&self, name: &str) -> Result<Option<v1::Agreement>, StoreError> {
        self.load(Tbl::Agreement, name)
    }

    pub fn put_agreement(&mut self, a: &v1::Agreement) -> Result<(), StoreError> {
        self.kv.put_msg(Tbl::Agreement, &a.name, a)
    }

    /// Replaces the role references of `before` by those of `after` (either
    /// absent for a focus created or deleted).
    pub fn index_role_refs(
        &mut self,
        before: Option<&v1::Focus>,
        after: Option<&v1::Focus>,
    ) -> Result<(), StoreError> {
        let old = before.map(role_ref_keys).unwrap_or_default();
        let new = after.map(role_ref_keys).unwrap_or_default();
        for k in old.difference(&new) {
            self.kv.del(Tbl::RoleRef, k)?;
        }
        for k in new.difference(&old) {
            self.kv.mark(Tbl::RoleRef, k)?;
        }
        Ok(())
    }

    /// Writes `focus` with the next version and its outbox record.
    pub fn rewrite_focus(&mut self, mut focus: v1::Focus, origin: &str) -> Result<(), StoreError> {
        if !self.indexed.is_empty() {
            let before: Option<v1::Focus> = self.load(Tbl::Focus, &focus.id)?;
            self.index_attributes(before.as_ref(), Some(&focus))?;
        }
        focus.version += 1;
        self.kv.put_msg(Tbl::Focus, &focus.id, &focus)?;
        self.append_outbox(focus, false, origin, None)
    }

    /// Deletes focus `id` with its indexes; it leaves every group it was a
    /// member of. Returns the deleted focus, or `None` when it is not there.
    pub fn delete_focus(
        &mut self,
        id: &str,
        origin: &str,
    ) -> Result<Option<v1::Focus>, StoreError> {
        let Some(last) = self.load::<v1::Focus>(Tbl::Focus, id)? else {
            return Ok(None);
        };
        if let Some(n) = focus_name(&last) {
            self.kv.del(Tbl::FocusName, &name_key(&last.kind, n))?;
        }
        for m in &last.pending_members {
            self.kv.del(Tbl::Pending, &pending_key(m, &last.id))?;
        }
        for m in &last.members {
            self.kv.del(Tbl::MemberOf, &format!("{m}\0{}", last.id))?;
        }
        self.index_role_refs(Some(&last), None)?;
        self.index_attributes(Some(&last), None)?;
        if !last.sync_parent.is_empty() {
            self.kv
                .del(Tbl::SyncChild, &format!("{}\0{id}", last.sync_parent))?;
        }
        self.kv.del(Tbl::Focus, id)?;
        let prefix = format!("{id}\0");
        for group_id in self.kv.suffixes(Tbl::MemberOf, &prefix)? {
            self.kv.del(Tbl::MemberOf, &format!("{prefix}{group_id}"))?;
            let Some(mut group) = self.load::<v1::Focus>(Tbl::Focus, &group_id)? else {
                continue;
            };
            group.members.retain(|m| m != id);
            self.rewrite_focus(group, origin)?;
        }
        self.append_outbox(last.clone(), true, origin, None)?;
        Ok(Some(last))
    }
}

/// Meta keys `attr-index:<attribute>`: the attribute's index is built.
pub(crate) const ATTR_INDEX: &str = "attr-index:";

/// Whether `after` is `before` with links added and nothing else changed
/// but the version: every field is named, so a new one must be decided here.
/// Runs for every update in the writer's transaction: the links are looked
/// at first, which rules out nearly every commit.
fn only_links_added(before: &v1::Focus, after: &v1::Focus) -> bool {
    let v1::Focus {
        id,
        kind,
        version: _,
        attributes,
        assignments,
        links,
        status,
        members,
        pending_members,
        sync_parent,
        inducements,
    } = after;
    links.len() > before.links.len()
        && before.links.iter().all(|l| links.contains(l))
        && *id == before.id
        && *kind == before.kind
        && *attributes == before.attributes
        && *assignments == before.assignments
        && *status == before.status
        && *members == before.members
        && *pending_members == before.pending_members
        && *sync_parent == before.sync_parent
        && *inducements == before.inducements
}

/// The index key of each value `f` holds of the indexed attributes.
pub(crate) fn attr_keys(f: &v1::Focus, indexed: &[String]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for attribute in indexed {
        for v in f.attributes.get(attribute).map_or(&[][..], |v| &v.values) {
            keys.insert(attr_key(attribute, &f.kind, v, &f.id));
        }
    }
    keys
}

/// `<attribute>\0<kind>\0<value>\0<id>`; without the id, the prefix of a search.
pub(crate) fn attr_key(attribute: &str, kind: &str, value: &str, id: &str) -> String {
    format!("{attribute}\0{kind}\0{value}\0{id}")
}

/// How a user or group is named in errors: kind, name and id.
pub(crate) fn describe(f: &v1::Focus) -> String {
    match focus_name(f) {
        Some(n) => format!("{} {n:?} ({})", f.kind, f.id),
        None => format!("{} {}", f.kind, f.id),
    }
}

/// Who owns a focus, in words.
pub(crate) fn owner_words(f: &v1::Focus) -> String {
    if f.sync_parent.is_empty() {
        "a native IDM entry".to_owned()
    } else {
        format!("owned by agreement {:?}", f.sync_parent)
    }
}

/// The role-index keys of `f`: the roles it is assigned, and for a role,
/// the roles it includes.
fn role_ref_keys(f: &v1::Focus) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    for a in f.assignments.iter().filter(|a| !a.role.is_empty()) {
        keys.insert(format!("{}\0f\0{}", a.role, f.id));
    }
    if let Some(name) = focus_name(f) {
        for i in f.inducements.iter().filter(|i| !i.role.is_empty()) {
            keys.insert(format!("{}\0r\0{name}", i.role));
        }
    }
    keys
}

/// The IDM's own rules for a focus, whoever writes it.
fn check_schema(f: &v1::Focus) -> Result<(), StoreError> {
    let on = |attribute: &str, reason: String| StoreError::Schema {
        object: describe(f),
        attribute: attribute.to_owned(),
        reason,
    };
    for name in f.attributes.keys() {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(on(
                name,
                "the attribute's name is empty or holds spaces or control characters".into(),
            ));
        }
    }
    if !f.inducements.is_empty() && f.kind != idsync_core::model::KIND_ROLE {
        return Err(on(
            "inducements",
            format!("only roles give accounts and groups; this is a {}", f.kind),
        ));
    }
    for i in &f.inducements {
        if i.role.is_empty() == i.resource.is_empty() {
            return Err(on(
                "inducements",
                "each names either a resource (an account there) or a role to include".into(),
            ));
        }
    }
    for a in &f.assignments {
        if a.role.is_empty() == a.resource.is_empty() {
            return Err(on(
                "assignments",
                "each names either a resource or a role".into(),
            ));
        }
    }
    let schema = |reason: String| on(NAME, reason);
    let names = f
        .attributes
        .get(NAME)
        .map(|v| v.values.as_slice())
        .unwrap_or_default();
    let name = match names {
        [] => {
            return Err(schema(
                "has no name (the name attribute is required)".into(),
            ));
        }
        [one] => one,
        more => {
            return Err(schema(format!(
                "name is single-valued, but {} values were given",
                more.len()
            )));
        }
    };
    if name.trim().is_empty() || name.len() > 256 {
        return Err(schema("a name has 1 to 256 characters".into()));
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        return Err(schema(format!(
            "name {name:?} has control characters or surrounding spaces"
        )));
    }
    if f.kind == idsync_core::model::KIND_USER && name.chars().any(char::is_whitespace) {
        return Err(schema(format!(
            "user name {name:?} holds whitespace; a user's name is a login name"
        )));
    }
    Ok(())
}

/// Agreements read during one commit, each once.
struct Agreements(HashMap<String, v1::Agreement>);

impl Agreements {
    fn get(&mut self, t: &Tables<'_>, name: &str) -> Result<&v1::Agreement, StoreError> {
        if !self.0.contains_key(name) {
            let a = t.agreement(name)?.ok_or_else(|| StoreError::NoAgreement {
                name: name.to_owned(),
            })?;
            self.0.insert(name.to_owned(), a);
        }
        self.0.get(name).ok_or_else(|| StoreError::NoAgreement {
            name: name.to_owned(),
        })
    }
}

/// Attributes whose values differ between `a` and `b`.
fn changed_attributes<'a>(a: &'a v1::Focus, b: &'a v1::Focus) -> Vec<&'a str> {
    let mut names: Vec<&str> = a
        .attributes
        .keys()
        .chain(b.attributes.keys())
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter(|n| {
            let va = a.attributes.get(*n).map(|v| v.values.as_slice());
            let vb = b.attributes.get(*n).map(|v| v.values.as_slice());
            va.unwrap_or_default() != vb.unwrap_or_default()
        })
        .collect()
}

/// Links of `f` to resources that `owner` writes under (`owned`), or to
/// the others, in a stable order for comparison.
fn links_by_owner<'a>(
    f: &'a v1::Focus,
    owners: &BTreeMap<String, String>,
    owner: &str,
    owned: bool,
) -> Vec<&'a v1::Link> {
    let mut links: Vec<&v1::Link> = f
        .links
        .iter()
        .filter(|l| (owners.get(&l.resource).map(String::as_str) == Some(owner)) == owned)
        .collect();
    links.sort_by(|x, y| (&x.resource, &x.entry_uuid).cmp(&(&y.resource, &y.entry_uuid)));
    links
}

/// Whether `writer` may store `next` over `current`; sets `next`'s sync parent.
fn authorize_put(
    writer: &Writer,
    agreements: &mut Agreements,
    t: &Tables<'_>,
    current: Option<&v1::Focus>,
    next: &mut v1::Focus,
) -> Result<(), StoreError> {
    // Roles are the IDM's: administrators make and change them, no agreement.
    let is_role = |f: &v1::Focus| f.kind == idsync_core::model::KIND_ROLE;
    if let Principal::Agreement(a) = &writer.principal
        && (is_role(next) || current.is_some_and(is_role))
    {
        return Err(StoreError::NotOwned {
            object: describe(next),
            owner: "a role (roles are the IDM's)".into(),
            writer: format!("agreement {a:?}"),
            detail: "manage roles with `idsync roles`".into(),
        });
    }
    let Some(current) = current else {
        // A new entry belongs to whoever creates it.
        next.sync_parent = match &writer.principal {
            Principal::Admin => String::new(),
            Principal::Agreement(a) => {
                let yielded = &agreements.get(t, a)?.yield_attributes;
                if let Some(attr) = yielded.iter().find(|y| next.attributes.contains_key(*y)) {
                    return Err(StoreError::Yielded {
                        agreement: a.clone(),
                        attribute: attr.clone(),
                        object: describe(next),
                    });
                }
                a.clone()
            }
        };
        return Ok(());
    };
    // An agreement allowed to adopt takes a native entry over by writing it.
    if let Principal::Agreement(a) = &writer.principal
        && writer.may_adopt
        && current.sync_parent.is_empty()
        && (next.sync_parent.is_empty() || next.sync_parent == *a)
    {
        next.sync_parent = a.clone();
        return Ok(());
    }
    if next.sync_parent != current.sync_parent {
        return Err(StoreError::NotOwned {
            object: describe(current),
            owner: owner_words(current),
            writer: writer.principal.to_string(),
            detail: "a commit cannot change an entry's sync parent; finalise or terminate the agreement instead".into(),
        });
    }
    let not_owned = |detail: String| StoreError::NotOwned {
        object: describe(current),
        owner: owner_words(current),
        writer: writer.principal.to_string(),
        detail,
    };
    match &writer.principal {
        Principal::Agreement(a) => {
            if current.sync_parent != *a {
                return Err(not_owned(String::new()));
            }
            let yielded = &agreements.get(t, a)?.yield_attributes;
            if let Some(attr) = changed_attributes(current, next)
                .into_iter()
                .find(|c| yielded.iter().any(|y| y == c))
            {
                return Err(StoreError::Yielded {
                    agreement: a.clone(),
                    attribute: attr.to_owned(),
                    object: describe(current),
                });
            }
            if links_by_owner(current, &writer.owners, a, false)
                != links_by_owner(next, &writer.owners, a, false)
            {
                return Err(not_owned(
                    "links to accounts on resources outside the agreement are the IDM's".into(),
                ));
            }
        }
        Principal::Admin if current.sync_parent.is_empty() => {}
        Principal::Admin => {
            let owner = current.sync_parent.clone();
            let yielded = agreements.get(t, &owner)?.yield_attributes.clone();
            let shown = if yielded.is_empty() {
                "none".to_owned()
            } else {
                yielded.join(", ")
            };
            if let Some(attr) = changed_attributes(current, next)
                .into_iter()
                .find(|c| !yielded.iter().any(|y| y == c))
            {
                return Err(not_owned(format!(
                    "attribute {attr:?} is the agreement's; outside it only yielded attributes can change (yielded: {shown})"
                )));
            }
            let same = current.kind == next.kind
                && current.status == next.status
                && current.members == next.members
                && current.pending_members == next.pending_members
                && links_by_owner(current, &writer.owners, &owner, true)
                    == links_by_owner(next, &writer.owners, &owner, true);
            if !same {
                return Err(not_owned(format!(
                    "its status, members and links to the agreement's accounts are the agreement's (yielded attributes: {shown})"
                )));
            }
        }
    }
    Ok(())
}

fn authorize_delete(writer: &Writer, current: &v1::Focus) -> Result<(), StoreError> {
    let allowed = match &writer.principal {
        Principal::Admin => current.sync_parent.is_empty(),
        Principal::Agreement(a) => current.sync_parent == *a,
    };
    if allowed {
        return Ok(());
    }
    Err(StoreError::NotOwned {
        object: describe(current),
        owner: owner_words(current),
        writer: writer.principal.to_string(),
        detail: if current.sync_parent.is_empty() {
            String::new()
        } else {
            format!(
                "delete it at the source, or end the agreement with `idsync sync terminate {}`",
                current.sync_parent
            )
        },
    })
}

fn authorize_shadow(writer: &Writer, resource: &str, entry_uuid: &str) -> Result<(), StoreError> {
    let owner = writer.owners.get(resource);
    let allowed = match &writer.principal {
        Principal::Admin => owner.is_none(),
        Principal::Agreement(a) => owner == Some(a),
    };
    if allowed {
        return Ok(());
    }
    Err(StoreError::NotOwned {
        object: format!("the shadow of {resource}/{entry_uuid}"),
        owner: match owner {
            Some(a) => format!("owned by agreement {a:?} (resource {resource} writes under it)"),
            None => format!("the IDM's (resource {resource} writes under no agreement)"),
        },
        writer: writer.principal.to_string(),
        detail: String::new(),
    })
}

/// Applies `ops` in the open transaction; on error the caller must not commit it.
pub(crate) fn apply(
    t: &mut Tables<'_>,
    ops: &[v1::Operation],
    origin: &str,
    writer: &Writer,
    dry_run: bool,
) -> Result<Vec<u64>, StoreError> {
    use v1::operation::Op;
    t.trace_parent = writer.trace_parent.clone().unwrap_or_default();
    let mut agreements = Agreements(HashMap::new());
    if let Principal::Agreement(a) = &writer.principal {
        let record = agreements.get(t, a)?;
        if record.halted && !dry_run {
            return Err(StoreError::Halted {
                name: a.clone(),
                reason: record
                    .last_error
                    .as_ref()
                    .map(|e| e.reason.clone())
                    .unwrap_or_default(),
            });
        }
    }
    // Version preconditions first, over all operations: a lost race is
    // reported as a conflict, never as a side effect of it (such as a name
    // taken by the winner).
    for op in ops {
        check_version(op, &*t.kv)?;
    }
    let mut versions = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let invalid = |reason: &str| StoreError::Invalid {
            index,
            reason: reason.to_owned(),
        };
        match op.op.as_ref() {
            Some(Op::PutFocus(put)) => {
                let mut focus = put
                    .focus
                    .clone()
                    .ok_or_else(|| invalid("put_focus without a focus"))?;
                if focus.id.is_empty() || focus.kind.is_empty() {
                    return Err(invalid("a focus needs an id and a kind"));
                }
                let current: Option<v1::Focus> = t.load(Tbl::Focus, &focus.id)?;
                let found = current.as_ref().map_or(0, |f| f.version);
                if found != put.expected_version {
                    return Err(StoreError::Conflict {
                        object: format!("focus {}", focus.id),
                        expected: put.expected_version,
                        found,
                    });
                }
                authorize_put(writer, &mut agreements, t, current.as_ref(), &mut focus)?;
                check_schema(&focus)?;
                let old_name = current.as_ref().and_then(focus_name).map(str::to_owned);
                let new_name = focus_name(&focus).map(str::to_owned);
                if old_name != new_name {
                    if let Some(n) = &new_name {
                        let key = name_key(&focus.kind, n);
                        let holder = t.kv.get_str(Tbl::FocusName, &key)?;
                        if let Some(holder) = holder
                            && holder != focus.id
                        {
                            let holder_focus: Option<v1::Focus> = t.load(Tbl::Focus, &holder)?;
                            return Err(StoreError::NameTaken {
                                kind: focus.kind.clone(),
                                name: n.clone(),
                                holder: holder.clone(),
                                holder_owner: holder_focus
                                    .as_ref()
                                    .map(owner_words)
                                    .unwrap_or_default(),
                            });
                        }
                        t.kv.put_str(Tbl::FocusName, &key, &focus.id)?;
                    }
                    if let Some(n) = &old_name {
                        t.kv.del(Tbl::FocusName, &name_key(&focus.kind, n))?;
                    }
                }
                let parent_before = current.as_ref().map(|c| c.sync_parent.as_str());
                if !focus.sync_parent.is_empty()
                    && parent_before != Some(focus.sync_parent.as_str())
                {
                    t.kv.mark(
                        Tbl::SyncChild,
                        &format!("{}\0{}", focus.sync_parent, focus.id),
                    )?;
                }
                t.index_role_refs(current.as_ref(), Some(&focus))?;
                t.index_attributes(current.as_ref(), Some(&focus))?;
                // Pending members whose accounts are already here resolve now,
                // inside this transaction: no account can slip in between.
                resolve_pending(&mut focus, &*t.kv)?;
                if let Some(old) = &current {
                    for m in &old.members {
                        t.kv.del(Tbl::MemberOf, &format!("{m}\0{}", old.id))?;
                    }
                    for m in &old.pending_members {
                        t.kv.del(Tbl::Pending, &pending_key(m, &old.id))?;
                    }
                }
                for m in &focus.members {
                    t.kv.mark(Tbl::MemberOf, &format!("{m}\0{}", focus.id))?;
                }
                for m in &focus.pending_members {
                    t.kv.mark(Tbl::Pending, &pending_key(m, &focus.id))?;
                }
                focus.version = found + 1;
                t.kv.put_msg(Tbl::Focus, &focus.id, &focus)?;
                versions.push(focus.version);
                t.append_outbox(focus, false, origin, current.as_ref())?;
            }
            Some(Op::DeleteFocus(del)) => {
                let current: Option<v1::Focus> = t.load(Tbl::Focus, &del.id)?;
                let found = current.as_ref().map_or(0, |f| f.version);
                let Some(current) = current.filter(|_| found == del.expected_version) else {
                    return Err(StoreError::Conflict {
                        object: format!("focus {}", del.id),
                        expected: del.expected_version,
                        found,
                    });
                };
                authorize_delete(writer, &current)?;
                t.delete_focus(&del.id, origin)?;
                versions.push(0);
            }
            Some(Op::PutShadow(put)) => {
                let mut shadow = put
                    .shadow
                    .clone()
                    .ok_or_else(|| invalid("put_shadow without a shadow"))?;
                if shadow.resource.is_empty() || shadow.entry_uuid.is_empty() {
                    return Err(invalid("a shadow needs a resource and an entry uuid"));
                }
                authorize_shadow(writer, &shadow.resource, &shadow.entry_uuid)?;
                let key = shadow_key(&shadow.resource, &shadow.entry_uuid);
                let previous = t.load::<v1::Shadow>(Tbl::Shadow, &key)?;
                let found = previous.as_ref().map_or(0, |s| s.version);
                if found != put.expected_version {
                    return Err(StoreError::Conflict {
                        object: format!("shadow {}/{}", shadow.resource, shadow.entry_uuid),
                        expected: put.expected_version,
                        found,
                    });
                }
                let was_live = previous.as_ref().is_some_and(|p| !p.dead);
                if was_live && shadow.dead {
                    t.guard_deletion(writer, &shadow)?;
                }
                t.count_live(
                    &shadow.resource,
                    i64::from(!shadow.dead) - i64::from(was_live),
                )?;
                // The member keys index live shadows: those it no longer has
                // go, the others are (re)written (another shadow's death may
                // have taken a key two shared).
                let member_keys = shadow_member_keys(&shadow);
                let before = previous
                    .as_ref()
                    .filter(|p| !p.dead)
                    .map(shadow_member_keys)
                    .unwrap_or_default();
                let after: &[String] = if shadow.dead { &[] } else { &member_keys };
                for k in before.iter().filter(|k| !after.contains(k)) {
                    t.kv.del(Tbl::ShadowByMemberKey, k)?;
                }
                for k in after {
                    t.kv.put_str(Tbl::ShadowByMemberKey, k, &shadow.entry_uuid)?;
                }
                shadow.version = found + 1;
                t.kv.put_msg(Tbl::Shadow, &key, &shadow)?;
                versions.push(shadow.version);
                // Groups waiting for this account get its owner, in this transaction.
                if !shadow.dead && !shadow.focus_id.is_empty() {
                    let mut waiting = Vec::new();
                    for member_key in &member_keys {
                        let prefix = format!("{member_key}\0");
                        for id in t.kv.suffixes(Tbl::Pending, &prefix)? {
                            waiting.push((format!("{prefix}{id}"), id));
                        }
                    }
                    for (pending_key, group_id) in waiting {
                        t.kv.del(Tbl::Pending, &pending_key)?;
                        let Some(mut group) = t.load::<v1::Focus>(Tbl::Focus, &group_id)? else {
                            continue;
                        };
                        group
                            .pending_members
                            .retain(|m| !member_keys.contains(&ref_key(m)));
                        if !group.members.contains(&shadow.focus_id) {
                            group.members.push(shadow.focus_id.clone());
                        }
                        t.kv.mark(Tbl::MemberOf, &format!("{}\0{}", shadow.focus_id, group.id))?;
                        t.rewrite_focus(group, origin)?;
                    }
                }
            }
            Some(Op::DeleteShadow(del)) => {
                let k = del
                    .key
                    .as_ref()
                    .ok_or_else(|| invalid("delete_shadow without a key"))?;
                authorize_shadow(writer, &k.resource, &k.entry_uuid)?;
                let key = shadow_key(&k.resource, &k.entry_uuid);
                let previous = t.load::<v1::Shadow>(Tbl::Shadow, &key)?;
                let found = previous.as_ref().map_or(0, |s| s.version);
                if found != del.expected_version || found == 0 {
                    return Err(StoreError::Conflict {
                        object: format!("shadow {}/{}", k.resource, k.entry_uuid),
                        expected: del.expected_version,
                        found,
                    });
                }
                if let Some(p) = &previous {
                    for k in shadow_member_keys(p) {
                        t.kv.del(Tbl::ShadowByMemberKey, &k)?;
                    }
                    t.count_live(&k.resource, -i64::from(!p.dead))?;
                }
                t.kv.del(Tbl::Shadow, &key)?;
                versions.push(0);
            }
            None => return Err(invalid("operation is empty")),
        }
    }
    if let Principal::Agreement(a) = &writer.principal
        && !dry_run
    {
        record_success(t, a)?;
    }
    Ok(versions)
}

/// Marks agreement `name` Ok as of now. Written at most about once a second
/// while it stays Ok, so a busy agreement does not rewrite its record on
/// every commit.
fn record_success(t: &mut Tables<'_>, name: &str) -> Result<(), StoreError> {
    let Some(mut a) = t.agreement(name)? else {
        return Ok(());
    };
    let now = now_ms();
    let ok = v1::AgreementState::Ok as i32;
    if a.state == ok && now - a.last_success_ms < 1000 {
        return Ok(());
    }
    a.state = ok;
    a.last_success_ms = now;
    t.put_agreement(&a)
}

impl Store {
    /// Applies `ops` atomically as `writer`: every precondition and every
    /// rule of ownership holds and every write is made, or nothing is.
    /// Returns the new version of each object written (0 for deletions), in order.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when a stored version differs from the one the
    /// operation expects, [`StoreError::NameTaken`] when a focus would take
    /// another's name, [`StoreError::NotOwned`] and [`StoreError::Yielded`]
    /// for a write the writer does not own, [`StoreError::Schema`] for a focus
    /// the IDM cannot hold, [`StoreError::Halted`] while the writer's
    /// agreement is halted, [`StoreError::Invalid`] for an operation without
    /// its object.
    pub fn commit(
        &self,
        ops: &[v1::Operation],
        origin: &str,
        writer: &Writer,
    ) -> Result<Vec<u64>, StoreError> {
        self.transact(true, |kv| {
            let mut t = Tables::open(kv)?;
            let versions = apply(&mut t, ops, origin, writer, false)?;
            t.finish()?;
            Ok(versions)
        })
    }

    /// Commits `commits` in order in as few write transactions as it can:
    /// each is checked and applied exactly as [`Store::commit`] would, seeing
    /// those before it, and its result is its own. A refused commit is left
    /// out: the transaction is rolled back and the ones before it are
    /// committed alone, then the rest continue. This is group commit — one
    /// durable write (redb's fsync, a PostgreSQL round trip and lock) for
    /// many concurrent callers instead of one each.
    ///
    /// # Errors
    /// The database fails; then none of the commits not yet reported took
    /// effect. Each commit's own refusal is in its result.
    pub fn commit_batch(
        &self,
        commits: &[(&[v1::Operation], &str, &Writer)],
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
        let mut results: Vec<Result<Vec<u64>, StoreError>> = Vec::with_capacity(commits.len());
        while results.len() < commits.len() {
            let start = results.len();
            let mut refused: Option<(usize, StoreError)> = None;
            let mut applied = Vec::new();
            let all = self.transact(true, |kv| {
                let mut t = Tables::open(kv)?;
                for (i, (ops, origin, writer)) in commits[start..].iter().enumerate() {
                    match apply(&mut t, ops, origin, writer, false) {
                        Ok(v) => applied.push(v),
                        Err(e) if e.is_database() => return Err(e),
                        Err(e) => {
                            refused = Some((start + i, e));
                            // Roll back: the refused commit may have written part.
                            return Err(StoreError::BadRequest("batch rolled back".into()));
                        }
                    }
                }
                t.finish()
            });
            match (all, refused) {
                (Ok(()), _) => {
                    results.extend(applied.into_iter().map(Ok));
                }
                (Err(_), Some((at, reason))) => {
                    // Those before the refusal, alone; then the refusal.
                    if at > start {
                        let prefix = self.transact(true, |kv| {
                            let mut t = Tables::open(kv)?;
                            let mut versions = Vec::with_capacity(at - start);
                            for (ops, origin, writer) in &commits[start..at] {
                                versions.push(apply(&mut t, ops, origin, writer, false)?);
                            }
                            t.finish()?;
                            Ok(versions)
                        });
                        match prefix {
                            Ok(versions) => results.extend(versions.into_iter().map(Ok)),
                            Err(e) if e.is_database() => return fail_rest(results, commits, e),
                            // Not the same outcome twice (the deletion
                            // guard's window moved on): one at a time.
                            Err(_) => {
                                for (ops, origin, writer) in &commits[start..at] {
                                    results.push(self.commit(ops, origin, writer));
                                }
                            }
                        }
                    }
                    results.push(Err(reason));
                }
                (Err(e), None) => return fail_rest(results, commits, e),
            }
        }
        Ok(results)
    }

    /// Runs `commits` one after another as `writer` would, each seeing the
    /// ones before it that succeeded, with every check a commit makes; then
    /// rolls everything back. A commit that fails is left out of the state
    /// the later ones see (its transaction is replayed without it).
    ///
    /// # Errors
    /// The database fails; each commit's own refusal is in its result.
    pub fn dry_run(
        &self,
        commits: &[(Vec<v1::Operation>, String)],
        writer: &Writer,
    ) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
        let mut results: Vec<Result<Vec<u64>, StoreError>> = Vec::with_capacity(commits.len());
        // Each pass is one transaction, rolled back: it replays the commits
        // that succeeded so far, then goes on until the next refusal.
        while results.len() < commits.len() {
            self.transact(false, |kv| {
                let mut t = Tables::open(kv)?;
                for (j, r) in results.iter().enumerate() {
                    if r.is_ok() {
                        let (ops, origin) = &commits[j];
                        apply(&mut t, ops, origin, writer, true)?;
                    }
                }
                while let Some((ops, origin)) = commits.get(results.len()) {
                    match apply(&mut t, ops, origin, writer, true) {
                        Ok(v) => results.push(Ok(v)),
                        Err(e) if e.is_database() => return Err(e),
                        Err(e) => {
                            results.push(Err(e));
                            return Ok(());
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(results)
    }
}

/// The results of a batch whose database failed: what was committed keeps
/// its result, the rest share the failure.
fn fail_rest(
    mut results: Vec<Result<Vec<u64>, StoreError>>,
    commits: &[(&[v1::Operation], &str, &Writer)],
    e: StoreError,
) -> Result<Vec<Result<Vec<u64>, StoreError>>, StoreError> {
    if results.is_empty() {
        return Err(e);
    }
    let reason = e.to_string();
    while results.len() < commits.len() {
        results.push(Err(match &e {
            StoreError::Unavailable(_) => StoreError::Unavailable(reason.clone()),
            _ => StoreError::Db(reason.clone()),
        }));
    }
    Ok(results)
}

fn check_version(op: &v1::Operation, kv: &dyn Kv) -> Result<(), StoreError> {
    use v1::operation::Op;
    let focus_version = |id: &str| -> Result<u64, StoreError> {
        Ok(kv
            .load::<v1::Focus>(Tbl::Focus, id)?
            .map_or(0, |f| f.version))
    };
    let shadow_version = |resource: &str, uuid: &str| -> Result<u64, StoreError> {
        Ok(kv
            .load::<v1::Shadow>(Tbl::Shadow, &shadow_key(resource, uuid))?
            .map_or(0, |s| s.version))
    };
    let (object, expected, found) = match op.op.as_ref() {
        Some(Op::PutFocus(p)) => {
            let id = p.focus.as_ref().map(|f| f.id.as_str()).unwrap_or_default();
            (
                format!("focus {id}"),
                p.expected_version,
                focus_version(id)?,
            )
        }
        Some(Op::DeleteFocus(d)) => (
            format!("focus {}", d.id),
            d.expected_version,
            focus_version(&d.id)?,
        ),
        Some(Op::PutShadow(p)) => {
            let (r, u) = p
                .shadow
                .as_ref()
                .map(|s| (s.resource.as_str(), s.entry_uuid.as_str()))
                .unwrap_or_default();
            (
                format!("shadow {r}/{u}"),
                p.expected_version,
                shadow_version(r, u)?,
            )
        }
        Some(Op::DeleteShadow(d)) => {
            let (r, u) = d
                .key
                .as_ref()
                .map(|k| (k.resource.as_str(), k.entry_uuid.as_str()))
                .unwrap_or_default();
            (
                format!("shadow {r}/{u}"),
                d.expected_version,
                shadow_version(r, u)?,
            )
        }
        None => return Ok(()),
    };
    if expected != found {
        return Err(StoreError::Conflict {
            object,
            expected,
            found,
        });
    }
    Ok(())
}
