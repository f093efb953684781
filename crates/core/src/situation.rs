//! midPoint's situations (what a change means, given what the IDM holds) and
//! reactions (what to do about it).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::ResourceConfig;
use crate::model::{Shadow, SourceChange};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Deserialize,
    Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Situation {
    /// The entry has a shadow linked to a focus.
    Linked,
    /// No link, but correlation found exactly one focus.
    Unlinked,
    /// No link and correlation found no focus.
    Unmatched,
    /// Correlation found several candidate focus objects.
    Disputed,
    /// The entry is gone from the resource.
    Deleted,
}

impl Situation {
    pub const ALL: [Situation; 5] = [
        Situation::Linked,
        Situation::Unlinked,
        Situation::Unmatched,
        Situation::Disputed,
        Situation::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Situation::Linked => "linked",
            Situation::Unlinked => "unlinked",
            Situation::Unmatched => "unmatched",
            Situation::Disputed => "disputed",
            Situation::Deleted => "deleted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for Situation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reaction {
    /// Apply inbound mappings to the owner.
    Synchronize,
    /// Link the entry to the single candidate, then synchronize.
    Link,
    /// Create a focus from the entry and link it.
    AddFocus,
    /// Remove the link; the focus stays.
    Unlink,
    /// Delete the owning focus.
    DeleteFocus,
    /// Unlink and disable the owning focus.
    InactivateFocus,
    /// Delete the account on the resource (an account nobody should have).
    DeleteShadow,
    /// Disable the account on the resource, by the resource's `disable` setting.
    InactivateShadow,
    /// Record the shadow and do nothing else.
    Nothing,
}

impl Reaction {
    pub const ALL: [Reaction; 9] = [
        Reaction::Synchronize,
        Reaction::Link,
        Reaction::AddFocus,
        Reaction::Unlink,
        Reaction::DeleteFocus,
        Reaction::InactivateFocus,
        Reaction::DeleteShadow,
        Reaction::InactivateShadow,
        Reaction::Nothing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reaction::Synchronize => "synchronize",
            Reaction::Link => "link",
            Reaction::AddFocus => "add_focus",
            Reaction::Unlink => "unlink",
            Reaction::DeleteFocus => "delete_focus",
            Reaction::InactivateFocus => "inactivate_focus",
            Reaction::DeleteShadow => "delete_shadow",
            Reaction::InactivateShadow => "inactivate_shadow",
            Reaction::Nothing => "nothing",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether the reaction acts on the account on the resource itself.
    pub fn acts_on_account(self) -> bool {
        matches!(self, Reaction::DeleteShadow | Reaction::InactivateShadow)
    }

    /// Whether this reaction makes sense for `situation`.
    pub fn fits(self, situation: Situation) -> bool {
        use Reaction as R;
        use Situation as S;
        match situation {
            S::Linked => matches!(self, R::Synchronize | R::Unlink | R::Nothing),
            S::Unlinked => matches!(
                self,
                R::Link | R::DeleteShadow | R::InactivateShadow | R::Nothing
            ),
            S::Unmatched => matches!(
                self,
                R::AddFocus | R::DeleteShadow | R::InactivateShadow | R::Nothing
            ),
            S::Disputed => matches!(self, R::DeleteShadow | R::InactivateShadow | R::Nothing),
            S::Deleted => matches!(
                self,
                R::DeleteFocus | R::InactivateFocus | R::Unlink | R::Nothing
            ),
        }
    }
}

impl fmt::Display for Reaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The situation of `change`, given its shadow, whether the shadow's owner
/// still exists, and how many focus objects correlation found. `None` means
/// there is nothing to react to (the deletion of an entry never seen).
pub fn situation(
    change: &SourceChange,
    shadow: Option<&Shadow>,
    owner_exists: bool,
    candidates: usize,
) -> Option<Situation> {
    let live_shadow = shadow.filter(|s| !s.dead);
    if change.is_delete() {
        // One resource may run one sync session per object type, and a
        // session may name entries of another scope as deleted (RFC 4533
        // allows a server to): a tombstone only counts for its own type.
        let live_shadow = live_shadow.filter(|s| s.object_type == change.object_type);
        return live_shadow.map(|_| Situation::Deleted);
    }
    if live_shadow.is_some_and(|s| s.focus_id.is_some()) && owner_exists {
        return Some(Situation::Linked);
    }
    Some(match candidates {
        0 => Situation::Unmatched,
        1 => Situation::Unlinked,
        _ => Situation::Disputed,
    })
}

/// The configured reaction to `situation` on `resource` and the object template
/// it names. A situation without a configured reaction gets `nothing`.
pub fn reaction(resource: &ResourceConfig, situation: Situation) -> (Reaction, Option<&str>) {
    resource
        .reactions
        .get(&situation)
        .map(|r| (r.action, r.template.as_deref()))
        .unwrap_or((Reaction::Nothing, None))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::ChangeKind;

    fn change(delete: bool) -> SourceChange {
        SourceChange {
            resource: "hr".into(),
            entry_uuid: "u1".into(),
            dn: "uid=jack".into(),
            object_type: Default::default(),
            csn: None,
            kind: if delete {
                ChangeKind::Delete
            } else {
                ChangeKind::Upsert {
                    attributes: Default::default(),
                }
            },
        }
    }

    fn shadow(linked: bool, dead: bool) -> Shadow {
        Shadow {
            focus_id: linked.then(|| "f1".into()),
            dead,
            ..Default::default()
        }
    }

    #[test]
    fn situation_table() {
        let up = change(false);
        let del = change(true);
        assert_eq!(
            situation(&up, Some(&shadow(true, false)), true, 0),
            Some(Situation::Linked)
        );
        // A link to a focus that no longer exists is no link.
        assert_eq!(
            situation(&up, Some(&shadow(true, false)), false, 0),
            Some(Situation::Unmatched)
        );
        assert_eq!(situation(&up, None, false, 0), Some(Situation::Unmatched));
        assert_eq!(situation(&up, None, false, 1), Some(Situation::Unlinked));
        assert_eq!(
            situation(&up, Some(&shadow(false, false)), false, 2),
            Some(Situation::Disputed)
        );
        assert_eq!(
            situation(&del, Some(&shadow(true, false)), true, 0),
            Some(Situation::Deleted)
        );
        assert_eq!(
            situation(&del, Some(&shadow(false, false)), false, 0),
            Some(Situation::Deleted)
        );
        assert_eq!(situation(&del, None, false, 0), None);
        assert_eq!(situation(&del, Some(&shadow(false, true)), false, 0), None);
        // A group session's tombstone for an account's UUID is not the account's deletion.
        let group_del = SourceChange {
            object_type: crate::model::ObjectType::Group,
            ..del.clone()
        };
        assert_eq!(
            situation(&group_del, Some(&shadow(true, false)), true, 0),
            None
        );
    }

    proptest::proptest! {
        /// Invariants of the situation table over every combination of inputs.
        #[test]
        fn situation_invariants(delete in proptest::bool::ANY, has_shadow in proptest::bool::ANY,
                                linked in proptest::bool::ANY, dead in proptest::bool::ANY,
                                owner in proptest::bool::ANY, candidates in 0usize..4) {
            let c = change(delete);
            let s = shadow(linked, dead);
            let got = situation(&c, has_shadow.then_some(&s), owner, candidates);
            let live = has_shadow && !dead;
            // Deleted exactly for the deletion of something we hold.
            proptest::prop_assert_eq!(got == Some(Situation::Deleted), delete && live);
            proptest::prop_assert_eq!(got.is_none(), delete && !live);
            // Linked only through a live link to an existing owner.
            if got == Some(Situation::Linked) {
                proptest::prop_assert!(live && linked && owner);
            }
            // Without a live owner, correlation alone decides an upsert.
            let owned = live && linked && owner;
            if !delete && !owned {
                let want = match candidates { 0 => Situation::Unmatched, 1 => Situation::Unlinked, _ => Situation::Disputed };
                proptest::prop_assert_eq!(got, Some(want));
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Situation::ALL {
            assert_eq!(Situation::parse(s.as_str()), Some(s));
        }
        for r in Reaction::ALL {
            assert_eq!(Reaction::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn every_situation_accepts_nothing() {
        for s in Situation::ALL {
            assert!(Reaction::Nothing.fits(s));
        }
        assert!(!Reaction::AddFocus.fits(Situation::Linked));
    }
}
