//! The inbound half: from a source change, its situation and the configured
//! reaction to the exact, conditional writes the IDM must commit.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use crate::CoreError;

use crate::config::{Condition, Config, Mapping, ObjectTemplate, Range, ResourceConfig};
use crate::mapping::{applies, apply_mapping, evaluate};
use crate::model::{
    Assignment, Attrs, ChangeKind, Focus, FocusStatus, KIND_GROUP, KIND_USER, Link, MemberRef,
    NAME_ATTRIBUTE, ObjectType, Op, Shadow, SourceChange, member_key,
};
use crate::situation::{Reaction, Situation, reaction};

/// What the IDM held when the change was looked at.
#[derive(Debug, Clone, Copy, Default)]
pub struct InboundState<'a> {
    pub shadow: Option<&'a Shadow>,
    /// The shadow's owner when linked, else the single correlation candidate
    /// (or the user an operator chose).
    pub focus: Option<&'a Focus>,
    pub situation: Option<Situation>,
    /// Ids of the correlation candidates, recorded on a disputed shadow.
    pub candidates: &'a [String],
    /// An operator's resolution of a disputed case, applied instead of the
    /// configured reaction, to the change the case was opened for.
    pub resolution: Option<Reaction>,
    /// Groups: each member the entry names (by DN or uid), and the focus
    /// that owns that account (None: not synced yet).
    pub members: &'a [(MemberRef, Option<String>)],
}

/// How entries of one object type map to focus objects.
struct Profile<'a> {
    kind: &'static str,
    /// The resource's own for accounts; built for groups (name first).
    mappings: Cow<'a, [Mapping]>,
    /// Groups: the attribute holding member DNs.
    member_attribute: Option<&'a str>,
}

impl<'a> Profile<'a> {
    fn of(resource: &'a ResourceConfig, object_type: ObjectType) -> Result<Self, CoreError> {
        match object_type {
            ObjectType::Account => Ok(Self {
                kind: KIND_USER,
                mappings: Cow::Borrowed(&resource.inbound),
                member_attribute: None,
            }),
            ObjectType::Group => {
                let groups = resource.groups.as_ref().ok_or_else(|| CoreError::Config {
                    path: format!("resources ({}).groups", resource.name),
                    reason: "a group arrived, but the resource has no groups section".into(),
                })?;
                let mut mappings = vec![Mapping {
                    source: Some(groups.name_source.clone()),
                    value: None,
                    template: None,
                    expression: None,
                    condition: None,
                    target: NAME_ATTRIBUTE.to_owned(),
                    strength: crate::config::Strength::Strong,
                    range: Range::All,
                }];
                mappings.extend(groups.inbound.iter().cloned());
                Ok(Self {
                    kind: KIND_GROUP,
                    mappings: Cow::Owned(mappings),
                    member_attribute: Some(&groups.member_attribute),
                })
            }
        }
    }
}

/// The reaction to a situation of a group: fixed (see `GroupsConfig`).
fn group_reaction(situation: Situation) -> Reaction {
    match situation {
        Situation::Linked => Reaction::Synchronize,
        Situation::Unlinked => Reaction::Link,
        Situation::Unmatched => Reaction::AddFocus,
        Situation::Disputed => Reaction::Nothing,
        Situation::Deleted => Reaction::DeleteFocus,
    }
}

/// Sets a group's members from the resolved member references.
fn set_members(focus: &mut Focus, members: &[(MemberRef, Option<String>)]) {
    focus.members.clear();
    focus.pending_members.clear();
    for (member, owner) in members {
        match owner {
            Some(id) if !focus.members.contains(id) => focus.members.push(id.clone()),
            Some(_) => {}
            None => focus.pending_members.push(member.clone()),
        }
    }
}

/// The keys besides its DN under which groups of `resource` name an account:
/// `uid:<value>` when its groups list members by uid.
fn account_member_keys(
    resource: &ResourceConfig,
    change: &SourceChange,
) -> Result<Vec<String>, CoreError> {
    let Some(groups) = resource
        .groups
        .as_ref()
        .filter(|g| g.member_uid_attribute.is_some())
    else {
        return Ok(Vec::new());
    };
    let uids = utf8_values(change, &groups.uid_source, "memberUid")?;
    Ok(uids.iter().map(|u| member_key("", u)).collect())
}

/// What applying a change comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The shadow already holds this position or a later one: nothing to do.
    Stale { shadow_position: u64 },
    /// No situation, and nothing to remember: the deletion of an entry whose
    /// shadow is already dead, or belongs to another object type.
    Ignored,
    /// The deletion of an entry never seen: no situation, but a dead shadow
    /// at the deletion's position, so that an older change of the entry that
    /// arrives after it (another replica, a redelivery) is discarded as
    /// stale instead of creating what the source no longer has.
    Tombstone { ops: Vec<Op> },
    Commit {
        situation: Situation,
        reaction: Reaction,
        ops: Vec<Op>,
    },
}

/// Plans the commit for `change`, read at stream position `change_seq`.
/// `new_focus_id` names the focus that `add_focus` creates.
///
/// # Errors
/// A mapped attribute that is not UTF-8, a reaction that needs a focus that is
/// not there, or a reaction naming an unknown template.
pub fn plan(
    config: &Config,
    change: &SourceChange,
    change_seq: u64,
    state: InboundState<'_>,
    new_focus_id: &str,
) -> Result<Outcome, CoreError> {
    let resource = config.resource(&change.resource)?;
    // The commit must find the shadow as it was read, whatever it is.
    let expected_version = state.shadow.map_or(0, |s| s.version);
    // One resource may run one sync session per object type, and a session
    // may name entries outside its scope as deleted (OpenLDAP's syncprov
    // does, for entries that changed while it was away). When such a
    // deletion comes before the entry's own changes, its tombstone has the
    // other type, and it says nothing about this type's entry: it must not
    // make this change stale (an add discarded so, its user never made), nor
    // be the base of its shadow. A tombstone only counts for its own type,
    // unless the entry's deletion was confirmed: by both sessions (see
    // below), or applied to a live shadow (situation `deleted`).
    let confirmed = |s: &Shadow| s.situation == Situation::Deleted.as_str();
    let other_tombstone = state
        .shadow
        .filter(|s| s.dead && s.object_type != change.object_type && !confirmed(s));
    let state = InboundState {
        shadow: state
            .shadow
            .filter(|s| !s.dead || s.object_type == change.object_type || confirmed(s)),
        ..state
    };
    // A resolution re-applies the change its case was opened for, which the
    // shadow already holds; anything newer still makes it stale.
    let stale = match (state.shadow, state.resolution) {
        (Some(shadow), Some(_)) => shadow.position > change_seq,
        (Some(shadow), None) => is_stale(shadow, change, change_seq),
        (None, _) => false,
    };
    if let Some(shadow) = state.shadow
        && stale
    {
        return Ok(Outcome::Stale {
            shadow_position: shadow.position,
        });
    }
    let Some(situation) = state.situation else {
        if change.is_delete() && state.shadow.is_none() {
            let mut shadow = next_shadow(change, change_seq, None, None);
            shadow.object_type = change.object_type;
            // Both sessions name the entry as deleted: it is gone whatever
            // its type, and the tombstone must keep discarding a late add of
            // either. Written over the other session's tombstone with only
            // this one's type, it would let the entry's own late add through
            // (the outage test's lost deletions: the accounts session's
            // tombstone overwritten by the groups session's).
            if let Some(other) = other_tombstone {
                shadow.situation = Situation::Deleted.to_string();
                shadow.position = shadow.position.max(other.position);
                if shadow.dn.is_empty() {
                    shadow.dn = other.dn.clone();
                }
            }
            return Ok(Outcome::Tombstone {
                ops: vec![Op::PutShadow {
                    shadow,
                    expected_version,
                }],
            });
        }
        return Ok(Outcome::Ignored);
    };
    let profile = Profile::of(resource, change.object_type)?;
    let (configured, template_name) = match change.object_type {
        ObjectType::Account => reaction(resource, situation),
        ObjectType::Group => (group_reaction(situation), None),
    };
    let reaction = state.resolution.unwrap_or(configured);
    let template = match template_name {
        Some(name) => Some(config.template(name).ok_or_else(|| CoreError::Config {
            path: format!(
                "resources ({}).reactions.{situation}.template",
                resource.name
            ),
            reason: format!("names template {name:?}, which is not defined"),
        })?),
        None => None,
    };

    let mut shadow = next_shadow(change, change_seq, state.shadow, Some(situation));
    if !change.is_delete() {
        shadow.attributes = snapshot(resource, &profile, change)?;
        shadow.member_keys = match change.object_type {
            ObjectType::Account => account_member_keys(resource, change)?,
            ObjectType::Group => Vec::new(),
        };
    }
    shadow.candidates = if situation == Situation::Disputed {
        state.candidates.to_vec()
    } else {
        Vec::new()
    };
    let previous = state.shadow.filter(|s| !s.dead).map(|s| &s.attributes);
    let mut ops = Vec::new();
    let need_focus = || CoreError::NoFocus {
        reaction: reaction.to_string(),
    };

    match reaction {
        Reaction::Synchronize | Reaction::Link => {
            let focus = state.focus.ok_or_else(need_focus)?;
            let mut next = focus.clone();
            // A newly linked entry has no history with this focus: all its sources count as changed.
            let previous = if reaction == Reaction::Link {
                None
            } else {
                previous
            };
            apply_inbound(&profile.mappings, change, previous, &mut next.attributes)?;
            rename(config, change, &mut next);
            if profile.member_attribute.is_some() {
                set_members(&mut next, state.members);
            }
            if let Some(t) = template {
                apply_template(t, &focus.attributes, &mut next)?;
            }
            next.set_link(link(change, state.shadow));
            shadow.focus_id = Some(next.id.clone());
            if next != *focus {
                ops.push(Op::PutFocus {
                    expected_version: focus.version,
                    focus: next,
                });
            }
        }
        Reaction::AddFocus => {
            let mut focus = Focus {
                id: new_focus_id.to_owned(),
                kind: profile.kind.to_owned(),
                ..Default::default()
            };
            apply_inbound(&profile.mappings, change, None, &mut focus.attributes)?;
            rename(config, change, &mut focus);
            if profile.member_attribute.is_some() {
                set_members(&mut focus, state.members);
            }
            if let Some(t) = template {
                apply_template(t, &Attrs::new(), &mut focus)?;
            }
            focus.set_link(link(change, state.shadow));
            shadow.focus_id = Some(focus.id.clone());
            ops.push(Op::PutFocus {
                focus,
                expected_version: 0,
            });
        }
        Reaction::DeleteFocus => {
            if let Some(focus) = state.focus {
                ops.push(Op::DeleteFocus {
                    id: focus.id.clone(),
                    expected_version: focus.version,
                });
            }
            shadow.focus_id = None;
        }
        Reaction::Unlink | Reaction::InactivateFocus => {
            if let Some(focus) = state.focus {
                let mut next = focus.clone();
                next.remove_link(&change.resource, &change.entry_uuid);
                if reaction == Reaction::InactivateFocus {
                    next.status = FocusStatus::Disabled;
                }
                ops.push(Op::PutFocus {
                    expected_version: focus.version,
                    focus: next,
                });
            }
            shadow.focus_id = None;
        }
        // The account itself is the applier's to change, before this commit;
        // the shadow records the situation, unlinked. A deleted account's
        // shadow is dead at once, so the deletion that comes back as a change
        // (possibly before this commit is seen) changes nothing.
        Reaction::DeleteShadow => {
            shadow.focus_id = None;
            shadow.dead = true;
            shadow.attributes.clear();
        }
        Reaction::InactivateShadow => {
            shadow.focus_id = None;
        }
        Reaction::Nothing => {}
    }
    ops.push(Op::PutShadow {
        expected_version,
        shadow,
    });
    Ok(Outcome::Commit {
        situation,
        reaction,
        ops,
    })
}

/// The agreement's `map_name` for this entry replaces the mapped name.
fn rename(config: &Config, change: &SourceChange, focus: &mut Focus) {
    if let Some(name) = config.mapped_name(&change.resource, &change.entry_uuid) {
        focus
            .attributes
            .insert(NAME_ATTRIBUTE.to_owned(), vec![name.to_owned()]);
    }
}

/// Whether `shadow` already reflects `change` or something newer: a position
/// at or past the change's, or — for an event published again later, which
/// gets a new position — a source CSN at or past the change's.
fn is_stale(shadow: &Shadow, change: &SourceChange, change_seq: u64) -> bool {
    if shadow.position >= change_seq {
        return true;
    }
    match change.csn.as_deref() {
        Some(csn) if !shadow.csn.is_empty() => csn <= shadow.csn.as_str(),
        _ => false,
    }
}

fn next_shadow(
    change: &SourceChange,
    change_seq: u64,
    current: Option<&Shadow>,
    situation: Option<Situation>,
) -> Shadow {
    let mut shadow = current.cloned().unwrap_or_else(|| Shadow {
        resource: change.resource.clone(),
        entry_uuid: change.entry_uuid.clone(),
        ..Default::default()
    });
    if !change.dn.is_empty() {
        shadow.dn = change.dn.clone();
    }
    shadow.position = change_seq;
    if !change.is_delete() {
        shadow.object_type = change.object_type;
    }
    if let Some(csn) = &change.csn {
        shadow.csn = csn.clone();
    }
    shadow.situation = situation.map(|s| s.to_string()).unwrap_or_default();
    shadow.dead = change.is_delete();
    if shadow.dead {
        shadow.attributes.clear();
    }
    shadow
}

fn link(change: &SourceChange, shadow: Option<&Shadow>) -> Link {
    let dn = if change.dn.is_empty() {
        shadow.map(|s| s.dn.clone()).unwrap_or_default()
    } else {
        change.dn.clone()
    };
    Link {
        resource: change.resource.clone(),
        entry_uuid: change.entry_uuid.clone(),
        dn,
    }
}

/// What the shadow of `change`'s entry would hold of it: the values every
/// inbound mapping and correlation rule reads (reconciliation compares this
/// with the shadow when the source keeps no entryCSN).
///
/// # Errors
/// The resource is not configured, or a read value is not UTF-8.
pub fn shadow_snapshot(config: &Config, change: &SourceChange) -> Result<Attrs, CoreError> {
    let resource = config.resource(&change.resource)?;
    let profile = Profile::of(resource, change.object_type)?;
    snapshot(resource, &profile, change)
}

/// The entry's values of every attribute an inbound mapping or correlation
/// rule reads, as UTF-8 strings, keyed by lower-cased name.
fn snapshot(
    resource: &ResourceConfig,
    profile: &Profile,
    change: &SourceChange,
) -> Result<Attrs, CoreError> {
    let mut names: BTreeSet<String> = profile
        .mappings
        .iter()
        .flat_map(Mapping::sources)
        .map(|s| s.to_ascii_lowercase())
        .collect();
    names.extend(
        resource
            .correlation
            .iter()
            .flat_map(|r| r.conditions.iter().chain(&r.confirmation))
            .flat_map(Condition::sources)
            .map(|s| s.to_ascii_lowercase()),
    );
    names.extend(
        profile
            .member_attribute
            .iter()
            .map(|m| m.to_ascii_lowercase()),
    );
    let mut out = Attrs::new();
    for name in names {
        let values = utf8_values(change, &name, "").map_err(|e| match e {
            // An error names what the value was for: the first mapping that
            // reads it, else correlation or the group's members (looked
            // up only now: this runs for every entry).
            CoreError::NotUtf8 { dn, attribute, .. } => CoreError::NotUtf8 {
                target: reader_of(profile, &name),
                dn,
                attribute,
            },
            e => e,
        })?;
        if !values.is_empty() {
            out.insert(name, values);
        }
    }
    Ok(out)
}

/// What reads source attribute `name`: the target of the first mapping
/// that reads it, else `members` or `correlation`.
fn reader_of(profile: &Profile, name: &str) -> String {
    profile
        .mappings
        .iter()
        .find(|m| m.sources().iter().any(|s| s.eq_ignore_ascii_case(name)))
        .map_or_else(
            || {
                if profile
                    .member_attribute
                    .is_some_and(|m| m.eq_ignore_ascii_case(name))
                {
                    "members".to_owned()
                } else {
                    "correlation".to_owned()
                }
            },
            |m| m.target.clone(),
        )
}

/// Values of `attribute` in `change` as strings.
///
/// # Errors
/// [`CoreError::NotUtf8`] naming the entry, attribute and mapping target.
pub fn utf8_values(
    change: &SourceChange,
    attribute: &str,
    target: &str,
) -> Result<Vec<String>, CoreError> {
    change
        .values(attribute)
        .iter()
        .map(|v| {
            String::from_utf8(v.clone()).map_err(|_| CoreError::NotUtf8 {
                dn: change.dn.clone(),
                attribute: attribute.to_owned(),
                target: target.to_owned(),
            })
        })
        .collect()
}

/// Applies the resource's inbound mappings to `focus_attrs`. `previous` is the
/// shadow's snapshot from the last applied change (None: everything changed).
fn apply_inbound(
    mappings: &[Mapping],
    change: &SourceChange,
    previous: Option<&Attrs>,
    focus_attrs: &mut Attrs,
) -> Result<(), CoreError> {
    let all = || text_attributes(change);
    for m in mappings {
        let sources = m.sources();
        let mut values = Vec::new();
        for s in &sources {
            values.push((s.clone(), utf8_values(change, s, &m.target)?));
        }
        // An expression over `all` may read anything: it counts as changed.
        let changed = reads_all(m)
            || previous.is_none_or(|prev| {
                values.iter().any(|(s, v)| {
                    prev.get(&s.to_ascii_lowercase())
                        .map_or(!v.is_empty(), |p| p != v)
                })
            });
        let lookup = |name: &str| {
            values
                .iter()
                .find(|(s, _)| s == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let old_lookup = |name: &str| {
            previous
                .and_then(|p| p.get(&name.to_ascii_lowercase()).cloned())
                .unwrap_or_default()
        };
        // What the mapping produced before only matters to a mapped range; an
        // expression that fails on the old state produced nothing then.
        let old_output = match previous {
            Some(prev) if m.range == Range::Mapped => {
                let prev_all = || prev.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                evaluate(m, &old_lookup, &prev_all).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        if !applies(m, &lookup, &all)? {
            continue;
        }
        let output = evaluate(m, &lookup, &all)?;
        apply_mapping(m, &old_output, output, changed, focus_attrs);
    }
    Ok(())
}

fn reads_all(m: &Mapping) -> bool {
    m.expression
        .as_deref()
        .and_then(|e| crate::expression::compiled(e).ok())
        .is_some_and(|e| e.reads_all())
}

/// Every attribute of `change` whose values are all UTF-8, for expressions.
fn text_attributes(change: &SourceChange) -> HashMap<String, Vec<String>> {
    let ChangeKind::Upsert { attributes } = &change.kind else {
        return HashMap::new();
    };
    attributes
        .iter()
        .filter_map(|(k, vals)| {
            let texts: Result<Vec<String>, _> =
                vals.iter().map(|v| String::from_utf8(v.clone())).collect();
            texts.ok().map(|t| (k.clone(), t))
        })
        .collect()
}

/// Applies an object template's mappings (focus → focus) and assignments.
/// `before` is the focus's attributes before this change, to tell which
/// sources changed.
///
/// # Errors
/// An expression that fails.
pub fn apply_template(
    template: &ObjectTemplate,
    before: &Attrs,
    focus: &mut Focus,
) -> Result<(), CoreError> {
    for m in &template.mappings {
        let changed = reads_all(m)
            || m.sources()
                .iter()
                .any(|s| before.get(s) != focus.attributes.get(s));
        let current = focus.attributes.clone();
        let lookup = |name: &str| current.get(name).cloned().unwrap_or_default();
        let all = || {
            current
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let old_lookup = |name: &str| before.get(name).cloned().unwrap_or_default();
        let old_all = || before.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let old_output = if m.range == Range::Mapped {
            evaluate(m, &old_lookup, &old_all).unwrap_or_default()
        } else {
            Vec::new()
        };
        if !applies(m, &lookup, &all)? {
            continue;
        }
        let output = evaluate(m, &lookup, &all)?;
        apply_mapping(m, &old_output, output, changed, &mut focus.attributes);
    }
    for resource in &template.assignments {
        if !focus.has_assignment(resource) {
            focus.assignments.push(Assignment {
                resource: resource.clone(),
                source: format!("template:{}", template.name),
                role: String::new(),
            });
        }
    }
    for role in &template.roles {
        if !focus.has_role(role) {
            focus.assignments.push(Assignment {
                resource: String::new(),
                source: format!("template:{}", template.name),
                role: role.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::model::ChangeKind;

    fn config() -> Config {
        toml::from_str(include_str!("../../../deploy/local/idsync.toml")).unwrap()
    }

    fn entry(uid: &str, cn: &str, given: &str, sn: &str) -> SourceChange {
        let attrs = [("uid", uid), ("cn", cn), ("givenname", given), ("sn", sn)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), vec![v.as_bytes().to_vec()]))
            .collect();
        SourceChange {
            resource: "hr".into(),
            entry_uuid: format!("uuid-{uid}"),
            dn: format!("uid={uid},ou=people,dc=example,dc=com"),
            kind: ChangeKind::Upsert { attributes: attrs },
            object_type: Default::default(),
            csn: Some(format!("20260101000000.000000Z#000000#000#{uid}")),
        }
    }

    fn commit(outcome: Outcome) -> (Situation, Reaction, Vec<Op>) {
        match outcome {
            Outcome::Commit {
                situation,
                reaction,
                ops,
            } => (situation, reaction, ops),
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    fn unmatched_will() -> (Focus, Shadow) {
        let cfg = config();
        let change = entry("will", "Will Turner", "Will", "Turner");
        let state = InboundState {
            shadow: None,
            focus: None,
            situation: Some(Situation::Unmatched),
            ..Default::default()
        };
        let (_, reaction, ops) = commit(plan(&cfg, &change, 7, state, "f-will").unwrap());
        assert_eq!(reaction, Reaction::AddFocus);
        let [
            Op::PutFocus {
                focus,
                expected_version: 0,
            },
            Op::PutShadow {
                shadow,
                expected_version: 0,
            },
        ] = &ops[..]
        else {
            panic!("unexpected ops {ops:#?}");
        };
        (focus.clone(), shadow.clone())
    }

    #[test]
    fn unmatched_adds_a_focus_with_template_assignment() {
        let (focus, shadow) = unmatched_will();
        assert_eq!(focus.first("name"), Some("will"));
        assert_eq!(focus.first("givenName"), Some("Will"));
        assert_eq!(focus.first("familyName"), Some("Turner"));
        assert_eq!(focus.first("fullName"), Some("Will Turner"));
        assert!(focus.has_assignment("acme"));
        assert_eq!(focus.links.len(), 1);
        assert_eq!(shadow.focus_id.as_deref(), Some("f-will"));
        assert_eq!(shadow.position, 7);
    }

    #[test]
    fn a_template_assigns_its_roles_once() {
        let mut template = config().templates[0].clone();
        template.roles = vec!["employee".into()];
        let mut focus = Focus::default();
        apply_template(&template, &Attrs::new(), &mut focus).unwrap();
        apply_template(&template, &Attrs::new(), &mut focus).unwrap();
        assert!(focus.has_role("employee"));
        assert!(focus.has_assignment("acme"));
        assert_eq!(focus.assignments.len(), 2, "{:?}", focus.assignments);
        let role = focus
            .assignments
            .iter()
            .find(|a| a.role == "employee")
            .unwrap();
        assert_eq!(role.resource, "");
        assert_eq!(role.source, "template:default-user");
    }

    #[test]
    fn weak_template_fills_full_name_when_source_has_none() {
        let cfg = config();
        let mut change = entry("will", "x", "Will", "Turner");
        if let ChangeKind::Upsert { attributes } = &mut change.kind {
            attributes.remove("cn");
        }
        let state = InboundState {
            shadow: None,
            focus: None,
            situation: Some(Situation::Unmatched),
            ..Default::default()
        };
        let (_, _, ops) = commit(plan(&cfg, &change, 1, state, "f").unwrap());
        let Op::PutFocus { focus, .. } = &ops[0] else {
            panic!()
        };
        assert_eq!(focus.first("fullName"), Some("Will Turner"));
    }

    #[test]
    fn linked_change_of_cn_changes_full_name_only() {
        let cfg = config();
        let (mut focus, mut shadow) = unmatched_will();
        focus.version = 1;
        shadow.version = 1;
        let mut change = entry("will", "cpt. Will Turner", "Will", "Turner");
        change.csn = Some("20260105000000.000000Z#000000#000#000000".into());
        let state = InboundState {
            shadow: Some(&shadow),
            focus: Some(&focus),
            situation: Some(Situation::Linked),
            ..Default::default()
        };
        let (_, reaction, ops) = commit(plan(&cfg, &change, 9, state, "unused").unwrap());
        assert_eq!(reaction, Reaction::Synchronize);
        let Op::PutFocus {
            focus: next,
            expected_version: 1,
        } = &ops[0]
        else {
            panic!("{ops:#?}")
        };
        assert_eq!(next.first("fullName"), Some("cpt. Will Turner"));
        assert_eq!(next.first("givenName"), Some("Will"));
        let Op::PutShadow {
            expected_version: 1,
            shadow: s,
        } = &ops[1]
        else {
            panic!()
        };
        assert_eq!(s.position, 9);
    }

    #[test]
    fn unchanged_entry_writes_only_the_shadow_position() {
        let cfg = config();
        let (mut focus, mut shadow) = unmatched_will();
        focus.version = 1;
        shadow.version = 1;
        let mut change = entry("will", "Will Turner", "Will", "Turner");
        // The same state read again (same CSN) is stale ...
        let same = InboundState {
            shadow: Some(&shadow),
            focus: Some(&focus),
            situation: Some(Situation::Linked),
            ..Default::default()
        };
        assert!(matches!(
            plan(&cfg, &change, 9, same, "unused"),
            Ok(Outcome::Stale { .. })
        ));
        // ... a later change that leaves mapped values alone moves only the shadow.
        change.csn = Some("20260105000000.000000Z#000000#000#000000".into());
        let state = InboundState {
            shadow: Some(&shadow),
            focus: Some(&focus),
            situation: Some(Situation::Linked),
            ..Default::default()
        };
        let (_, _, ops) = commit(plan(&cfg, &change, 9, state, "unused").unwrap());
        assert!(matches!(&ops[..], [Op::PutShadow { .. }]), "{ops:#?}");
    }

    #[test]
    fn a_mapped_range_replaces_only_what_the_source_gave() {
        use crate::config::{Mapping, Range, Strength};
        let mut cfg = config();
        cfg.resources[0].inbound.push(Mapping {
            source: Some("mail".into()),
            value: None,
            template: None,
            expression: None,
            condition: None,
            target: "emails".into(),
            strength: Strength::Normal,
            range: Range::Mapped,
        });
        let (mut focus, mut shadow) = unmatched_will();
        focus.version = 1;
        shadow.version = 1;
        shadow
            .attributes
            .insert("mail".into(), vec!["will@hr".into()]);
        focus.attributes.insert(
            "emails".into(),
            vec!["will@hr".into(), "captain@idm".into()],
        );
        let mut change = entry("will", "Will Turner", "Will", "Turner");
        change.csn = Some("20270101000000.000000Z#000000#000#000000".into());
        if let ChangeKind::Upsert { attributes } = &mut change.kind {
            attributes.insert("mail".into(), vec![b"turner@hr".to_vec()]);
        }
        let state = InboundState {
            shadow: Some(&shadow),
            focus: Some(&focus),
            situation: Some(Situation::Linked),
            ..Default::default()
        };
        let (_, _, ops) = commit(plan(&cfg, &change, 9, state, "x").unwrap());
        let Op::PutFocus { focus: next, .. } = &ops[0] else {
            panic!("{ops:#?}")
        };
        assert_eq!(next.attributes["emails"], vec!["captain@idm", "turner@hr"]);
    }

    fn group_entry(cn: &str, members: &[&str]) -> SourceChange {
        let mut attrs: std::collections::BTreeMap<String, Vec<Vec<u8>>> =
            std::collections::BTreeMap::new();
        attrs.insert("cn".into(), vec![cn.as_bytes().to_vec()]);
        attrs.insert(
            "member".into(),
            members.iter().map(|m| m.as_bytes().to_vec()).collect(),
        );
        SourceChange {
            resource: "hr".into(),
            entry_uuid: format!("uuid-{cn}"),
            dn: format!("cn={cn},ou=groups,dc=example,dc=com"),
            kind: ChangeKind::Upsert { attributes: attrs },
            csn: Some("20260101000000.000000Z#000000#000#000000".into()),
            object_type: ObjectType::Group,
        }
    }

    #[test]
    fn a_new_group_resolves_known_members_and_keeps_the_rest_pending() {
        let cfg = config();
        let jack = "uid=jack,ou=people,dc=example,dc=com".to_owned();
        let will = "uid=will,ou=people,dc=example,dc=com".to_owned();
        let change = group_entry("crew", &[&jack, &will]);
        let by_dn = |dn: &str| MemberRef {
            resource: "hr".into(),
            dn: dn.to_owned(),
            uid: String::new(),
        };
        let members = [
            (by_dn(&jack), Some("f-jack".to_owned())),
            (by_dn(&will), None),
        ];
        let state = InboundState {
            situation: Some(Situation::Unmatched),
            members: &members,
            ..Default::default()
        };
        let (_, reaction, ops) = commit(plan(&cfg, &change, 3, state, "g1").unwrap());
        assert_eq!(
            reaction,
            Reaction::AddFocus,
            "fixed group reaction, no template"
        );
        let Op::PutFocus { focus, .. } = &ops[0] else {
            panic!("{ops:#?}")
        };
        assert_eq!(focus.kind, "group");
        assert_eq!(focus.first("name"), Some("crew"));
        assert_eq!(focus.members, ["f-jack"]);
        assert_eq!(focus.pending_members, [by_dn(&will)]);
        assert!(
            focus.assignments.is_empty(),
            "the user template is not for groups"
        );
    }

    #[test]
    fn the_deletion_of_an_entry_never_seen_leaves_a_tombstone_that_makes_its_older_add_stale() {
        let cfg = config();
        let mut gone = entry("eve", "Eve", "Eve", "Once");
        gone.kind = ChangeKind::Delete;
        gone.csn = None;
        let nothing_known = InboundState::default();
        let Outcome::Tombstone { ops } = plan(&cfg, &gone, 12, nothing_known, "x").unwrap() else {
            panic!("a deletion with no shadow must be remembered")
        };
        let [
            Op::PutShadow {
                shadow,
                expected_version: 0,
            },
        ] = ops.as_slice()
        else {
            panic!("{ops:#?}")
        };
        assert!(shadow.dead && shadow.focus_id.is_none(), "{shadow:#?}");
        assert_eq!((shadow.position, shadow.situation.as_str()), (12, ""));
        // The add that came before it, applied after it, changes nothing.
        let add = entry("eve", "Eve", "Eve", "Once");
        let later = InboundState {
            shadow: Some(shadow),
            situation: Some(Situation::Unmatched),
            ..Default::default()
        };
        assert_eq!(
            plan(&cfg, &add, 11, later, "x").unwrap(),
            Outcome::Stale {
                shadow_position: 12
            }
        );
        // A deletion of an entry whose shadow is already dead needs nothing.
        let again = InboundState {
            shadow: Some(shadow),
            ..Default::default()
        };
        assert_eq!(plan(&cfg, &gone, 13, again, "x").unwrap(), Outcome::Ignored);
    }

    /// The outage test's lost adds: the groups session, resumed, named a
    /// person that changed while it was away as deleted (OpenLDAP's syncprov
    /// does so for entries outside a session's scope) before the person's
    /// add was applied. The groups' tombstone must not discard that add.
    #[test]
    fn another_sessions_tombstone_neither_makes_an_add_stale_nor_hides_a_deletion() {
        let cfg = config();
        let mut out_of_scope = entry("eve", "Eve", "Eve", "Once");
        out_of_scope.kind = ChangeKind::Delete;
        out_of_scope.dn.clear();
        out_of_scope.csn = None;
        out_of_scope.object_type = ObjectType::Group;
        let Outcome::Tombstone { ops } =
            plan(&cfg, &out_of_scope, 20, InboundState::default(), "x").unwrap()
        else {
            panic!("a deletion with no shadow must be remembered")
        };
        let [Op::PutShadow { shadow, .. }] = ops.as_slice() else {
            panic!("{ops:#?}")
        };
        let groups_tombstone = Shadow {
            version: 1,
            ..shadow.clone()
        };
        assert_eq!(groups_tombstone.object_type, ObjectType::Group);

        // The person's add, published before it and applied after it.
        let add = entry("eve", "Eve", "Eve", "Once");
        let state = InboundState {
            shadow: Some(&groups_tombstone),
            situation: Some(Situation::Unmatched),
            ..Default::default()
        };
        let (situation, reaction, ops) = commit(plan(&cfg, &add, 11, state, "f-eve").unwrap());
        assert_eq!(
            (situation, reaction),
            (Situation::Unmatched, Reaction::AddFocus)
        );
        let Some(Op::PutShadow {
            shadow,
            expected_version: 1,
        }) = ops.last()
        else {
            panic!("the shadow must be written over the tombstone it found: {ops:#?}")
        };
        assert!(!shadow.dead, "{shadow:#?}");
        assert_eq!(
            (
                shadow.object_type,
                shadow.position,
                shadow.focus_id.as_deref()
            ),
            (ObjectType::Account, 11, Some("f-eve"))
        );

        // The person's own deletion, coming after the groups' tombstone,
        // leaves a tombstone of its type, which a late add finds stale.
        let mut deleted = out_of_scope.clone();
        deleted.object_type = ObjectType::Account;
        let state = InboundState {
            shadow: Some(&groups_tombstone),
            ..Default::default()
        };
        let Outcome::Tombstone { ops } = plan(&cfg, &deleted, 30, state, "x").unwrap() else {
            panic!("the person's deletion must be remembered over the groups' tombstone")
        };
        let [
            Op::PutShadow {
                shadow,
                expected_version: 1,
            },
        ] = ops.as_slice()
        else {
            panic!("{ops:#?}")
        };
        assert!(shadow.dead && shadow.object_type == ObjectType::Account);
        let own_tombstone = Shadow {
            version: 2,
            ..shadow.clone()
        };
        let state = InboundState {
            shadow: Some(&own_tombstone),
            situation: Some(Situation::Unmatched),
            ..Default::default()
        };
        assert_eq!(
            plan(&cfg, &add, 11, state, "x").unwrap(),
            Outcome::Stale {
                shadow_position: 30
            }
        );
    }

    /// The outage test's lost deletions: a person deleted while its add was
    /// still in the pipeline. The accounts session's deletion came first and
    /// left a tombstone; the groups session's deletion of the same entry
    /// (syncprov names every deletion to every session) then wrote a
    /// tombstone of type group over it, and the person's late add, finding
    /// no tombstone of its type, made the user and account of a person gone.
    #[test]
    fn a_deletion_named_by_both_sessions_keeps_discarding_a_late_add_in_either_order() {
        let cfg = config();
        let add = entry("eve", "Eve", "Eve", "Once");
        let mut gone = add.clone();
        gone.kind = ChangeKind::Delete;
        gone.dn.clear();
        gone.csn = None;
        for (first, second) in [
            (ObjectType::Account, ObjectType::Group),
            (ObjectType::Group, ObjectType::Account),
        ] {
            let first_deletion = SourceChange {
                object_type: first,
                ..gone.clone()
            };
            let Outcome::Tombstone { ops } =
                plan(&cfg, &first_deletion, 20, InboundState::default(), "x").unwrap()
            else {
                panic!("a deletion with no shadow must be remembered")
            };
            let [Op::PutShadow { shadow, .. }] = ops.as_slice() else {
                panic!("{ops:#?}")
            };
            let tombstone = Shadow {
                version: 1,
                ..shadow.clone()
            };
            let second_deletion = SourceChange {
                object_type: second,
                ..gone.clone()
            };
            let state = InboundState {
                shadow: Some(&tombstone),
                ..Default::default()
            };
            let both = match plan(&cfg, &second_deletion, 30, state, "x").unwrap() {
                Outcome::Tombstone { ops } => match ops.as_slice() {
                    [
                        Op::PutShadow {
                            shadow,
                            expected_version: 1,
                        },
                    ] => Shadow {
                        version: 2,
                        ..shadow.clone()
                    },
                    _ => panic!("{ops:#?}"),
                },
                Outcome::Ignored => tombstone.clone(),
                other => panic!("{first:?} then {second:?}: {other:?}"),
            };
            assert!(both.dead, "{both:#?}");
            let state = InboundState {
                shadow: Some(&both),
                situation: Some(Situation::Unmatched),
                ..Default::default()
            };
            assert!(
                matches!(
                    plan(&cfg, &add, 11, state, "f-eve").unwrap(),
                    Outcome::Stale { .. }
                ),
                "{first:?} then {second:?}: the late add must be discarded over {both:#?}"
            );
        }
    }

    #[test]
    fn older_change_is_stale() {
        let cfg = config();
        let (_, mut shadow) = unmatched_will();
        shadow.position = 10;
        let change = entry("will", "Old", "Will", "Turner");
        let state = InboundState {
            shadow: Some(&shadow),
            focus: None,
            situation: Some(Situation::Linked),
            ..Default::default()
        };
        assert_eq!(
            plan(&cfg, &change, 9, state, "x").unwrap(),
            Outcome::Stale {
                shadow_position: 10
            }
        );
    }

    #[test]
    fn an_old_state_published_again_is_stale_by_its_csn() {
        let cfg = config();
        let (_, mut shadow) = unmatched_will();
        shadow.csn = "20260102000000.000000Z#000000#000#000000".into();
        let mut change = entry("will", "Old", "Will", "Turner");
        let linked = InboundState {
            shadow: Some(&shadow),
            focus: None,
            situation: Some(Situation::Linked),
            ..Default::default()
        };
        assert!(matches!(
            plan(&cfg, &change, 99, linked, "x"),
            Ok(Outcome::Stale { .. })
        ));
        change.csn = Some("20260103000000.000000Z#000000#000#000000".into());
        let unmatched = InboundState {
            situation: Some(Situation::Unmatched),
            ..linked
        };
        assert!(matches!(
            plan(&cfg, &change, 99, unmatched, "x"),
            Ok(Outcome::Commit { .. })
        ));
    }

    #[test]
    fn deletion_deletes_the_focus_and_keeps_a_dead_shadow() {
        let cfg = config();
        let (mut focus, mut shadow) = unmatched_will();
        focus.version = 3;
        shadow.version = 2;
        let change = SourceChange {
            kind: ChangeKind::Delete,
            dn: String::new(),
            csn: None,
            ..entry("will", "", "", "")
        };
        let state = InboundState {
            shadow: Some(&shadow),
            focus: Some(&focus),
            situation: Some(Situation::Deleted),
            ..Default::default()
        };
        let (_, reaction, ops) = commit(plan(&cfg, &change, 11, state, "x").unwrap());
        assert_eq!(reaction, Reaction::DeleteFocus);
        assert!(matches!(
            &ops[0],
            Op::DeleteFocus {
                expected_version: 3,
                ..
            }
        ));
        let Op::PutShadow { shadow: s, .. } = &ops[1] else {
            panic!()
        };
        assert!(s.dead);
        assert_eq!(s.focus_id, None);
        assert_eq!(s.dn, shadow.dn, "a tombstone keeps the DN it had");
    }

    /// Every reaction, in every situation it fits: which writes it plans.
    #[test]
    fn reaction_table() {
        use crate::config::ReactionConfig;
        let (mut owner, mut shadow) = unmatched_will();
        owner.version = 4;
        shadow.version = 2;
        let upsert = {
            let mut c = entry("will", "cpt. Will Turner", "Will", "Turner");
            c.csn = Some("20270101000000.000000Z#000000#000#000000".into());
            c
        };
        let delete = SourceChange {
            kind: ChangeKind::Delete,
            csn: None,
            ..upsert.clone()
        };
        // (situation, reaction, with shadow, with focus, expected op kinds, focus status, shadow linked, shadow dead)
        type Row = (
            Situation,
            Reaction,
            bool,
            bool,
            &'static [&'static str],
            Option<FocusStatus>,
            bool,
            bool,
        );
        let table: &[Row] = &[
            (
                Situation::Linked,
                Reaction::Synchronize,
                true,
                true,
                &["put_focus", "put_shadow"],
                Some(FocusStatus::Enabled),
                true,
                false,
            ),
            (
                Situation::Linked,
                Reaction::Unlink,
                true,
                true,
                &["put_focus", "put_shadow"],
                Some(FocusStatus::Enabled),
                false,
                false,
            ),
            (
                Situation::Linked,
                Reaction::Nothing,
                true,
                true,
                &["put_shadow"],
                None,
                true,
                false,
            ),
            (
                Situation::Unlinked,
                Reaction::Link,
                false,
                true,
                &["put_focus", "put_shadow"],
                Some(FocusStatus::Enabled),
                true,
                false,
            ),
            (
                Situation::Unlinked,
                Reaction::Nothing,
                false,
                true,
                &["put_shadow"],
                None,
                false,
                false,
            ),
            (
                Situation::Unmatched,
                Reaction::AddFocus,
                false,
                false,
                &["put_focus", "put_shadow"],
                Some(FocusStatus::Enabled),
                true,
                false,
            ),
            (
                Situation::Unmatched,
                Reaction::Nothing,
                false,
                false,
                &["put_shadow"],
                None,
                false,
                false,
            ),
            (
                Situation::Disputed,
                Reaction::Nothing,
                false,
                false,
                &["put_shadow"],
                None,
                false,
                false,
            ),
            (
                Situation::Unmatched,
                Reaction::DeleteShadow,
                false,
                false,
                &["put_shadow"],
                None,
                false,
                true,
            ),
            (
                Situation::Unmatched,
                Reaction::InactivateShadow,
                false,
                false,
                &["put_shadow"],
                None,
                false,
                false,
            ),
            (
                Situation::Disputed,
                Reaction::DeleteShadow,
                false,
                false,
                &["put_shadow"],
                None,
                false,
                true,
            ),
            (
                Situation::Deleted,
                Reaction::DeleteFocus,
                true,
                true,
                &["delete_focus", "put_shadow"],
                None,
                false,
                true,
            ),
            (
                Situation::Deleted,
                Reaction::InactivateFocus,
                true,
                true,
                &["put_focus", "put_shadow"],
                Some(FocusStatus::Disabled),
                false,
                true,
            ),
            (
                Situation::Deleted,
                Reaction::Unlink,
                true,
                true,
                &["put_focus", "put_shadow"],
                Some(FocusStatus::Enabled),
                false,
                true,
            ),
            (
                Situation::Deleted,
                Reaction::Nothing,
                true,
                true,
                &["put_shadow"],
                None,
                true,
                true,
            ),
        ];
        for &(situation, reaction, with_shadow, with_focus, kinds, status, linked, dead) in table {
            let mut cfg = config();
            cfg.resources[0].reactions.insert(
                situation,
                ReactionConfig {
                    action: reaction,
                    template: None,
                },
            );
            let state = InboundState {
                shadow: with_shadow.then_some(&shadow),
                focus: with_focus.then_some(&owner),
                situation: Some(situation),
                ..Default::default()
            };
            let change = if situation == Situation::Deleted {
                &delete
            } else {
                &upsert
            };
            let what = format!("{situation} → {reaction}");
            let (s, r, ops) = commit(plan(&cfg, change, 50, state, "new-id").unwrap());
            assert_eq!((s, r), (situation, reaction), "{what}");
            let got: Vec<&str> = ops
                .iter()
                .map(|op| match op {
                    Op::PutFocus { .. } => "put_focus",
                    Op::DeleteFocus { .. } => "delete_focus",
                    Op::PutShadow { .. } => "put_shadow",
                    Op::DeleteShadow { .. } => "delete_shadow",
                })
                .collect();
            assert_eq!(got, kinds, "{what}");
            for op in &ops {
                match op {
                    Op::PutFocus { focus, .. } => {
                        assert_eq!(Some(focus.status), status, "{what}");
                        assert_eq!(focus.link_to("hr").is_some(), linked, "{what}: focus link");
                    }
                    Op::PutShadow { shadow: sh, .. } => {
                        assert_eq!(sh.focus_id.is_some(), linked, "{what}: shadow link");
                        assert_eq!(sh.dead, dead, "{what}");
                        assert_eq!(sh.situation, situation.as_str(), "{what}");
                        assert_eq!(sh.position, 50, "{what}");
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn non_utf8_mapped_value_is_refused_naming_the_attribute() {
        let cfg = config();
        let mut change = entry("will", "x", "Will", "Turner");
        if let ChangeKind::Upsert { attributes } = &mut change.kind {
            attributes.insert("cn".into(), vec![vec![0xff, 0xfe]]);
        }
        let state = InboundState {
            shadow: None,
            focus: None,
            situation: Some(Situation::Unmatched),
            ..Default::default()
        };
        let err = plan(&cfg, &change, 1, state, "f").unwrap_err();
        assert!(
            matches!(err, CoreError::NotUtf8 { ref attribute, .. } if attribute == "cn"),
            "{err}"
        );
        // The error names the mapping's target, not the attribute again.
        assert!(err.to_string().contains("mapped to \"fullName\""), "{err}");
    }

    /// A binary attribute that no mapping or rule reads is ignored whatever
    /// its bytes; one that a rule reads without a mapping is named as such.
    #[test]
    fn non_utf8_values_matter_only_where_read() {
        let mut cfg = config();
        let mut change = entry("will", "Will Turner", "Will", "Turner");
        if let ChangeKind::Upsert { attributes } = &mut change.kind {
            attributes.insert("jpegphoto".into(), vec![vec![0xff, 0xd8, 0xff]]);
            attributes.insert("employeenumber".into(), vec![vec![0xc3, 0x28]]);
        }
        let state = InboundState {
            situation: Some(Situation::Unmatched),
            ..Default::default()
        };
        let (_, _, ops) = commit(plan(&cfg, &change, 1, state, "f").unwrap());
        let Op::PutFocus { focus, .. } = &ops[0] else {
            panic!("{ops:#?}")
        };
        assert_eq!(focus.first("name"), Some("will"));
        cfg.resources[0].correlation[0]
            .confirmation
            .push(crate::config::Condition {
                focus_attribute: "employeeNumber".into(),
                source: Some("employeeNumber".into()),
                expression: None,
            });
        let err = plan(&cfg, &change, 1, state, "f").unwrap_err();
        assert_eq!(
            err,
            CoreError::NotUtf8 {
                dn: change.dn.clone(),
                attribute: "employeenumber".into(),
                target: "correlation".into(),
            }
        );
    }
}
