//! The outbound half: which accounts a focus should have, their DN and
//! attributes from outbound mappings, and the changes that bring an existing
//! account in line.

use std::collections::{BTreeMap, BTreeSet};

use crate::CoreError;
use crate::config::{Config, Range, ResourceConfig, Strength};
use crate::mapping::{Template, applies, dedup_in_order, escape_dn_value, evaluate};
use crate::model::{Attrs, Focus, FocusStatus, normalize_dn};

/// An account as idsync wants it on a resource. Attribute names lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub dn: String,
    /// The naming attribute and its value, which must stay in the entry.
    pub rdn: (String, String),
    pub attributes: Attrs,
    /// The strongest strength of the mappings that feed each mapped attribute.
    pub strengths: BTreeMap<String, Strength>,
    /// What the mappings with the `mapped` range produce, by attribute: the
    /// values idsync owns there. The account's shadow keeps the previous
    /// output, so that only values idsync set are ever removed.
    pub produced: Attrs,
}

/// What a focus should have on one target resource beside what the outbound
/// mappings give: the values and group memberships its roles give there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Construction {
    /// Values by attribute (lower-cased names), from every role that gives some.
    pub attributes: Attrs,
    /// Group DNs on the resource, one spelling per group.
    pub groups: Vec<String>,
}

/// Roles by name.
pub type Roles = BTreeMap<String, Focus>;

/// The roles `focus` holds, directly or through roles that include others,
/// that are missing from `known`: what must be read before
/// [`constructions`] can run. Cycles end where they close.
pub fn missing_roles(focus: &Focus, known: &Roles) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&str> = focus
        .assignments
        .iter()
        .filter(|a| !a.role.is_empty())
        .map(|a| a.role.as_str())
        .collect();
    let mut missing = Vec::new();
    while let Some(name) = stack.pop() {
        if !seen.insert(name) {
            continue;
        }
        match known.get(name) {
            Some(role) => stack.extend(
                role.inducements
                    .iter()
                    .filter(|i| !i.role.is_empty())
                    .map(|i| i.role.as_str()),
            ),
            None => missing.push(name.to_owned()),
        }
    }
    missing
}

/// Target resources on which `focus` should have an account, with what its
/// roles give there: those it is assigned directly and those its roles
/// (with the roles they include) construct — while it is enabled.
///
/// # Errors
/// A role that `roles` lacks, or a role that names a resource which is not a
/// target.
pub fn constructions(
    config: &Config,
    focus: &Focus,
    roles: &Roles,
) -> Result<BTreeMap<String, Construction>, CoreError> {
    let mut out: BTreeMap<String, Construction> = BTreeMap::new();
    if focus.status == FocusStatus::Disabled {
        return Ok(out);
    }
    for r in &config.resources {
        if r.dn_template.is_some() && focus.has_assignment(&r.name) {
            out.entry(r.name.clone()).or_default();
        }
    }
    let holder = format!(
        "{} {}",
        focus.kind,
        focus
            .first(crate::model::NAME_ATTRIBUTE)
            .unwrap_or(&focus.id)
    );
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&str> = focus
        .assignments
        .iter()
        .filter(|a| !a.role.is_empty())
        .map(|a| a.role.as_str())
        .collect();
    while let Some(name) = stack.pop() {
        if !seen.insert(name) {
            continue;
        }
        let role = roles.get(name).ok_or_else(|| CoreError::UnknownRole {
            holder: holder.clone(),
            role: name.to_owned(),
        })?;
        for i in &role.inducements {
            if !i.role.is_empty() {
                stack.push(&i.role);
                continue;
            }
            if !config
                .resources
                .iter()
                .any(|r| r.name == i.resource && r.dn_template.is_some())
            {
                return Err(CoreError::NotATarget {
                    role: name.to_owned(),
                    resource: i.resource.clone(),
                });
            }
            let c = out.entry(i.resource.clone()).or_default();
            for (attr, values) in &i.attributes {
                let have = c.attributes.entry(attr.to_ascii_lowercase()).or_default();
                have.extend(values.iter().cloned());
                dedup_in_order(have);
            }
            for g in &i.groups {
                let key = normalize_dn(g);
                if !c.groups.iter().any(|x| normalize_dn(x) == key) {
                    c.groups.push(g.clone());
                }
            }
        }
    }
    Ok(out)
}

/// The account `focus` should have on `resource`.
///
/// # Errors
/// A DN template whose attribute the focus lacks, or a malformed template.
pub fn desired_account(
    resource: &ResourceConfig,
    focus: &Focus,
    construction: &Construction,
) -> Result<Account, CoreError> {
    let template_text = resource
        .dn_template
        .as_deref()
        .ok_or_else(|| CoreError::Config {
            path: format!("resources ({}).dn_template", resource.name),
            reason: "is required to create accounts".into(),
        })?;
    let bad = |reason: String| CoreError::BadTemplate {
        template: template_text.to_owned(),
        reason,
    };
    let template = Template::parse(template_text).map_err(|e| bad(e.reason))?;
    let lookup = |name: &str| focus.first(name);
    let dn = template
        .render(lookup, escape_dn_value)
        .map_err(|attribute| CoreError::MissingValue {
            template: template_text.to_owned(),
            attribute,
        })?;
    let first_rdn = template_text.split(',').next().unwrap_or_default();
    let (rdn_attr, rdn_value_text) = first_rdn
        .split_once('=')
        .ok_or_else(|| bad("the first RDN has no '='".into()))?;
    let rdn_value = Template::parse(rdn_value_text)
        .map_err(|e| bad(e.reason))?
        .render(lookup, str::to_owned)
        .map_err(|attribute| CoreError::MissingValue {
            template: template_text.to_owned(),
            attribute,
        })?;
    let rdn = (rdn_attr.trim().to_ascii_lowercase(), rdn_value);

    let mut attributes = Attrs::new();
    let mut strengths = BTreeMap::new();
    attributes.insert("objectclass".into(), resource.object_classes.clone());
    let mut produced = Attrs::new();
    for (name, (strength, values, ranged)) in mapped_values(resource, focus)? {
        strengths.insert(name.clone(), strength);
        if ranged {
            produced.insert(name.clone(), values.clone());
        }
        if !values.is_empty() {
            attributes.insert(name, values);
        }
    }
    // What roles give is idsync's to keep (strong) and to take back when
    // the role goes (the mapped range): other values stay.
    for (name, values) in &construction.attributes {
        strengths.insert(name.clone(), Strength::Strong);
        let p = produced.entry(name.clone()).or_default();
        p.extend(values.iter().cloned());
        dedup_in_order(p);
        let a = attributes.entry(name.clone()).or_default();
        a.extend(values.iter().cloned());
        dedup_in_order(a);
    }
    keep_rdn(&rdn, &mut attributes);
    Ok(Account {
        dn,
        rdn,
        attributes,
        strengths,
        produced,
    })
}

/// Replace-modifications (attribute, new values; empty = remove) that bring
/// `current` (the account as read, lower-cased names) in line with `desired`,
/// by each mapping's strength. Weak mappings only fill empty attributes.
/// `previous` is what the mapped-range mappings produced last time (kept on
/// the account's shadow): of those attributes only values idsync set are
/// removed, and values from elsewhere stay.
pub fn modifications(
    desired: &Account,
    current: &Attrs,
    previous: &Attrs,
) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (name, strength) in &desired.strengths {
        let have = current.get(name).cloned().unwrap_or_default();
        let want = match desired.produced.get(name) {
            Some(produced) => {
                let before = previous.get(name).cloned().unwrap_or_default();
                let mut next: Vec<String> = have
                    .iter()
                    .filter(|v| produced.contains(v) || !before.contains(v))
                    .cloned()
                    .collect();
                for v in produced {
                    if !next.contains(v) {
                        next.push(v.clone());
                    }
                }
                next
            }
            None => desired.attributes.get(name).cloned().unwrap_or_default(),
        };
        let differs = want.iter().collect::<BTreeSet<_>>() != have.iter().collect::<BTreeSet<_>>();
        let write = match strength {
            Strength::Weak => have.is_empty() && !want.is_empty(),
            Strength::Normal | Strength::Strong => differs,
        };
        if write {
            out.push((name.clone(), want));
        }
    }
    // Attributes idsync fed before and feeds no more (a role taken away):
    // the values it set go, the others stay.
    for (name, before) in previous {
        if desired.strengths.contains_key(name) {
            continue;
        }
        let have = current.get(name).cloned().unwrap_or_default();
        let want: Vec<String> = have
            .iter()
            .filter(|v| !before.contains(v))
            .cloned()
            .collect();
        if want.len() != have.len() {
            out.push((name.clone(), want));
        }
    }
    out
}

/// One outbound target: the strongest strength of the mappings that feed it,
/// their values, and whether any of them has the `mapped` range.
type Target = (Strength, Vec<String>, bool);

/// Every outbound target's values.
fn mapped_values(
    resource: &ResourceConfig,
    focus: &Focus,
) -> Result<BTreeMap<String, Target>, CoreError> {
    let lookup = |name: &str| focus.attributes.get(name).cloned().unwrap_or_default();
    let all = || {
        focus
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let mut out: BTreeMap<String, Target> = BTreeMap::new();
    for m in &resource.outbound {
        let entry =
            out.entry(m.target.to_ascii_lowercase())
                .or_insert((m.strength, Vec::new(), false));
        entry.0 = stronger(entry.0, m.strength);
        entry.2 |= m.range == Range::Mapped;
        if !applies(m, &lookup, &all)? {
            continue;
        }
        entry.1.extend(evaluate(m, &lookup, &all)?);
        dedup_in_order(&mut entry.1);
    }
    Ok(out)
}

fn stronger(a: Strength, b: Strength) -> Strength {
    let rank = |s| match s {
        Strength::Weak => 0,
        Strength::Normal => 1,
        Strength::Strong => 2,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// LDAP requires the RDN value among the naming attribute's values.
fn keep_rdn(rdn: &(String, String), attributes: &mut Attrs) {
    let values = attributes.entry(rdn.0.clone()).or_default();
    if !values.iter().any(|v| v.eq_ignore_ascii_case(&rdn.1)) {
        values.insert(0, rdn.1.clone());
    }
}

/// Which mappings may write to an existing account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writes {
    /// Every mapping by its strength (creation, reconciliation, a role change,
    /// a retry from the parked list: the whole state is enforced).
    All,
    /// Strong mappings, and normal ones whose output differs from what they
    /// gave before the change (given here): normal follows its sources.
    Changed(Attrs),
    /// Strong mappings only: the change came from this very resource, and is
    /// not echoed back to it.
    StrongOnly,
}

impl Writes {
    /// Whether a modification of `attribute` may be written.
    pub fn allows(&self, account: &Account, attribute: &str) -> bool {
        match account.strengths.get(attribute) {
            Some(Strength::Strong) => true,
            // Fills only what is empty (decided by the modifications).
            Some(Strength::Weak) => !matches!(self, Writes::StrongOnly),
            // Fed no more: what idsync gave is taken back.
            None => !matches!(self, Writes::StrongOnly),
            Some(_) => match self {
                Writes::All => true,
                Writes::StrongOnly => false,
                Writes::Changed(old) => {
                    let set = |a: &Attrs| {
                        a.get(attribute)
                            .map(|v| v.iter().cloned().collect::<std::collections::BTreeSet<_>>())
                            .unwrap_or_default()
                    };
                    set(old) != set(&account.attributes)
                }
            },
        }
    }
}

/// As [`modifications`], with the RDN value kept in the naming attribute.
pub fn account_modifications(
    desired: &Account,
    current: &Attrs,
    previous: &Attrs,
) -> Vec<(String, Vec<String>)> {
    let mut mods = modifications(desired, current, previous);
    for (name, values) in &mut mods {
        if *name == desired.rdn.0 {
            let mut attrs = Attrs::from([(name.clone(), std::mem::take(values))]);
            keep_rdn(&desired.rdn, &mut attrs);
            *values = attrs.remove(name.as_str()).unwrap_or_default();
        }
    }
    // Re-check after keeping the RDN: the change may now be a no-op.
    mods.retain(|(name, values)| {
        let have = current.get(name).cloned().unwrap_or_default();
        values.iter().collect::<BTreeSet<_>>() != have.iter().collect::<BTreeSet<_>>()
    });
    mods
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::model::{Assignment, Inducement};

    fn setup() -> (Config, Focus) {
        let cfg: Config =
            toml::from_str(include_str!("../../../deploy/local/idsync.toml")).unwrap();
        let focus = Focus {
            id: "f1".into(),
            kind: "user".into(),
            version: 1,
            attributes: [
                ("name", "will"),
                ("fullName", "Will Turner"),
                ("familyName", "Turner"),
                ("givenName", "Will"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), vec![v.to_owned()]))
            .collect(),
            assignments: vec![Assignment {
                resource: "acme".into(),
                source: "template:default-user".into(),
                role: String::new(),
            }],
            ..Default::default()
        };
        (cfg, focus)
    }

    #[test]
    fn seed_account_on_acme() {
        let (cfg, focus) = setup();
        let wanted = constructions(&cfg, &focus, &Roles::new()).unwrap();
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["acme"]);
        let acc = desired_account(cfg.resource("acme").unwrap(), &focus, &wanted["acme"]).unwrap();
        assert_eq!(acc.dn, "cn=will,o=Acme");
        assert_eq!(acc.attributes["cn"], vec!["will", "Will Turner"]);
        assert_eq!(acc.attributes["description"], vec!["Created by IDM"]);
        assert_eq!(acc.attributes["sn"], vec!["Turner"]);
    }

    #[test]
    fn full_name_change_replaces_cn_keeping_the_rdn() {
        let (cfg, mut focus) = setup();
        let r = cfg.resource("acme").unwrap();
        let current = desired_account(r, &focus, &Construction::default())
            .unwrap()
            .attributes;
        focus
            .attributes
            .insert("fullName".into(), vec!["cpt. Will Turner".into()]);
        let desired = desired_account(r, &focus, &Construction::default()).unwrap();
        let mods = account_modifications(&desired, &current, &Attrs::new());
        assert_eq!(
            mods,
            vec![(
                "cn".to_owned(),
                vec!["will".to_owned(), "cpt. Will Turner".to_owned()]
            )]
        );
        assert!(account_modifications(&desired, &desired.attributes, &Attrs::new()).is_empty());
    }

    #[test]
    fn escaped_dn_and_missing_name() {
        let (cfg, mut focus) = setup();
        let r = cfg.resource("acme").unwrap();
        focus
            .attributes
            .insert("name".into(), vec!["Smith, John".into()]);
        let acc = desired_account(r, &focus, &Construction::default()).unwrap();
        assert_eq!(acc.dn, "cn=Smith\\, John,o=Acme");
        assert_eq!(acc.rdn.1, "Smith, John");
        focus.attributes.remove("name");
        assert!(matches!(
            desired_account(r, &focus, &Construction::default()),
            Err(CoreError::MissingValue { .. })
        ));
    }

    #[test]
    fn a_mapped_range_outbound_removes_only_what_idsync_set() {
        use crate::config::Mapping;
        let (mut cfg, mut focus) = setup();
        let r = cfg.resources.iter_mut().find(|r| r.name == "acme").unwrap();
        r.outbound.push(Mapping {
            source: Some("mail".into()),
            value: None,
            template: None,
            expression: None,
            condition: None,
            target: "mail".into(),
            strength: Strength::Strong,
            range: Range::Mapped,
        });
        let r = cfg.resource("acme").unwrap();
        focus
            .attributes
            .insert("mail".into(), vec!["new@idm".into()]);
        let desired = desired_account(r, &focus, &Construction::default()).unwrap();
        assert_eq!(desired.produced["mail"], vec!["new@idm"]);
        let mut current = desired.attributes.clone();
        current.insert("mail".into(), vec!["local@acme".into(), "old@idm".into()]);
        let previous = Attrs::from([("mail".to_owned(), vec!["old@idm".to_owned()])]);
        let mods = account_modifications(&desired, &current, &previous);
        assert_eq!(
            mods,
            vec![(
                "mail".to_owned(),
                vec!["local@acme".to_owned(), "new@idm".to_owned()]
            )]
        );
        // Once written, nothing more to do.
        current.insert("mail".into(), mods[0].1.clone());
        assert!(account_modifications(&desired, &current, &desired.produced).is_empty());
    }

    fn role(name: &str, inducements: Vec<Inducement>) -> (String, Focus) {
        let focus = Focus {
            id: format!("role-{name}"),
            kind: "role".into(),
            attributes: Attrs::from([("name".to_owned(), vec![name.to_owned()])]),
            inducements,
            ..Default::default()
        };
        (name.to_owned(), focus)
    }

    fn holding(roles: &[&str]) -> Focus {
        let (_, mut focus) = setup();
        focus.assignments = roles
            .iter()
            .map(|r| Assignment {
                role: (*r).to_owned(),
                source: "admin".into(),
                ..Default::default()
            })
            .collect();
        focus
    }

    #[test]
    fn nested_roles_give_an_account_its_values_and_groups() {
        let (cfg, _) = setup();
        let roles = Roles::from([
            role(
                "engineer",
                vec![
                    Inducement {
                        resource: "acme".into(),
                        attributes: Attrs::from([(
                            "Title".to_owned(),
                            vec!["Engineer".to_owned()],
                        )]),
                        groups: vec!["cn=engineers,o=Acme".into()],
                        ..Default::default()
                    },
                    Inducement {
                        role: "employee".into(),
                        ..Default::default()
                    },
                ],
            ),
            role(
                "employee",
                vec![
                    Inducement {
                        resource: "acme".into(),
                        groups: vec!["CN=Staff, o=Acme".into(), "cn=engineers,o=acme".into()],
                        ..Default::default()
                    },
                    // A cycle ends where it closes.
                    Inducement {
                        role: "engineer".into(),
                        ..Default::default()
                    },
                ],
            ),
        ]);
        let focus = holding(&["engineer"]);
        assert!(missing_roles(&focus, &roles).is_empty());
        let c = constructions(&cfg, &focus, &roles).unwrap();
        assert_eq!(c.keys().collect::<Vec<_>>(), ["acme"]);
        assert_eq!(c["acme"].attributes["title"], vec!["Engineer"]);
        assert_eq!(
            c["acme"].groups,
            vec![
                "cn=engineers,o=Acme".to_owned(),
                "CN=Staff, o=Acme".to_owned()
            ]
        );
        let acc = desired_account(cfg.resource("acme").unwrap(), &focus, &c["acme"]).unwrap();
        assert_eq!(acc.attributes["title"], vec!["Engineer"]);
        assert_eq!(acc.strengths["title"], Strength::Strong);

        // The role taken away: the value idsync gave goes, one set on the
        // target stays.
        let bare = desired_account(
            cfg.resource("acme").unwrap(),
            &focus,
            &Construction::default(),
        )
        .unwrap();
        let mut current = acc.attributes.clone();
        current.insert("title".into(), vec!["Engineer".into(), "Local".into()]);
        let mods = account_modifications(&bare, &current, &acc.produced);
        assert_eq!(mods, vec![("title".to_owned(), vec!["Local".to_owned()])]);
    }

    #[test]
    fn unknown_roles_and_resources_that_are_not_targets_are_named() {
        let (cfg, _) = setup();
        let focus = holding(&["ghost"]);
        assert_eq!(missing_roles(&focus, &Roles::new()), vec!["ghost"]);
        assert_eq!(
            constructions(&cfg, &focus, &Roles::new())
                .unwrap_err()
                .to_string(),
            "user will is given role \"ghost\", which does not exist"
        );
        let roles = Roles::from([role(
            "ghost",
            vec![Inducement {
                resource: "hr".into(),
                ..Default::default()
            }],
        )]);
        assert!(matches!(
            constructions(&cfg, &focus, &roles),
            Err(CoreError::NotATarget { .. })
        ));
    }

    #[test]
    fn disabled_focus_wants_no_account() {
        let (cfg, mut focus) = setup();
        focus.status = FocusStatus::Disabled;
        assert!(
            constructions(&cfg, &focus, &Roles::new())
                .unwrap()
                .is_empty()
        );
    }
}
