//! Conversions between protobuf messages and `idsync_core` domain types.

use std::collections::BTreeMap;

use idsync_core::model::{
    Assignment, Attrs, ChangeKind, Focus, FocusStatus, Inducement, Link, MemberRef, ObjectType, Op,
    PendingOperation, Shadow, SourceChange,
};

use crate::v1;

/// A message that does not describe a valid domain object.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{message}: field {field} is missing or empty")]
    Missing {
        message: &'static str,
        field: &'static str,
    },
    #[error("change event {event_id:?}: unknown change kind {kind}")]
    UnknownKind { event_id: String, kind: i32 },
    #[error("message has schema version {found}; this build understands {expected}")]
    SchemaVersion { found: u32, expected: u32 },
}

fn attrs_from(map: BTreeMap<String, v1::Values>) -> Attrs {
    map.into_iter().map(|(k, v)| (k, v.values)).collect()
}

fn attrs_to(attrs: Attrs) -> std::collections::HashMap<String, v1::Values> {
    attrs
        .into_iter()
        .map(|(k, values)| (k, v1::Values { values }))
        .collect()
}

impl From<v1::Focus> for Focus {
    fn from(f: v1::Focus) -> Self {
        Focus {
            id: f.id,
            kind: f.kind,
            version: f.version,
            attributes: attrs_from(f.attributes.into_iter().collect()),
            assignments: f
                .assignments
                .into_iter()
                .map(|a| Assignment {
                    resource: a.resource,
                    source: a.source,
                    role: a.role,
                })
                .collect(),
            links: f
                .links
                .into_iter()
                .map(|l| Link {
                    resource: l.resource,
                    entry_uuid: l.entry_uuid,
                    dn: l.dn,
                })
                .collect(),
            status: if f.status == v1::FocusStatus::Disabled as i32 {
                FocusStatus::Disabled
            } else {
                FocusStatus::Enabled
            },
            members: f.members,
            pending_members: f
                .pending_members
                .into_iter()
                .map(|m| MemberRef {
                    resource: m.resource,
                    dn: m.dn,
                    uid: m.uid,
                })
                .collect(),
            sync_parent: f.sync_parent,
            inducements: f
                .inducements
                .into_iter()
                .map(|i| Inducement {
                    resource: i.resource,
                    attributes: attrs_from(i.attributes.into_iter().collect()),
                    groups: i.groups,
                    role: i.role,
                })
                .collect(),
        }
    }
}

impl From<Focus> for v1::Focus {
    fn from(f: Focus) -> Self {
        v1::Focus {
            id: f.id,
            kind: f.kind,
            version: f.version,
            attributes: attrs_to(f.attributes),
            assignments: f
                .assignments
                .into_iter()
                .map(|a| v1::Assignment {
                    resource: a.resource,
                    source: a.source,
                    role: a.role,
                })
                .collect(),
            links: f
                .links
                .into_iter()
                .map(|l| v1::Link {
                    resource: l.resource,
                    entry_uuid: l.entry_uuid,
                    dn: l.dn,
                })
                .collect(),
            status: match f.status {
                FocusStatus::Enabled => v1::FocusStatus::Enabled,
                FocusStatus::Disabled => v1::FocusStatus::Disabled,
            } as i32,
            members: f.members,
            pending_members: f
                .pending_members
                .into_iter()
                .map(|m| v1::MemberRef {
                    resource: m.resource,
                    dn: m.dn,
                    uid: m.uid,
                })
                .collect(),
            sync_parent: f.sync_parent,
            inducements: f
                .inducements
                .into_iter()
                .map(|i| v1::Inducement {
                    resource: i.resource,
                    attributes: attrs_to(i.attributes),
                    groups: i.groups,
                    role: i.role,
                })
                .collect(),
        }
    }
}

impl From<v1::Shadow> for Shadow {
    fn from(s: v1::Shadow) -> Self {
        Shadow {
            resource: s.resource,
            entry_uuid: s.entry_uuid,
            dn: s.dn,
            focus_id: (!s.focus_id.is_empty()).then_some(s.focus_id),
            position: s.position,
            version: s.version,
            attributes: attrs_from(s.attributes.into_iter().collect()),
            situation: s.situation,
            dead: s.dead,
            csn: s.csn,
            candidates: s.candidates,
            object_type: object_type(s.object_type),
            member_keys: s.member_keys,
            groups: s.groups,
            pending: s.pending.map(|p| PendingOperation {
                operation: p.operation,
                attempts: p.attempts,
                reason: p.reason,
                since_ms: p.since_ms,
            }),
        }
    }
}

fn object_type(raw: i32) -> ObjectType {
    match v1::ObjectType::try_from(raw) {
        Ok(v1::ObjectType::Group) => ObjectType::Group,
        _ => ObjectType::Account,
    }
}

impl From<Shadow> for v1::Shadow {
    fn from(s: Shadow) -> Self {
        v1::Shadow {
            resource: s.resource,
            entry_uuid: s.entry_uuid,
            dn: s.dn,
            focus_id: s.focus_id.unwrap_or_default(),
            position: s.position,
            version: s.version,
            attributes: attrs_to(s.attributes),
            situation: s.situation,
            dead: s.dead,
            csn: s.csn,
            candidates: s.candidates,
            object_type: match s.object_type {
                ObjectType::Account => v1::ObjectType::Account,
                ObjectType::Group => v1::ObjectType::Group,
            } as i32,
            member_keys: s.member_keys,
            groups: s.groups,
            pending: s.pending.map(|p| v1::PendingOperation {
                operation: p.operation,
                attempts: p.attempts,
                reason: p.reason,
                since_ms: p.since_ms,
            }),
        }
    }
}

impl From<Op> for v1::Operation {
    fn from(op: Op) -> Self {
        use v1::operation::Op as P;
        let op = match op {
            Op::PutFocus {
                focus,
                expected_version,
            } => P::PutFocus(v1::PutFocus {
                focus: Some(focus.into()),
                expected_version,
            }),
            Op::DeleteFocus {
                id,
                expected_version,
            } => P::DeleteFocus(v1::DeleteFocus {
                id,
                expected_version,
            }),
            Op::PutShadow {
                shadow,
                expected_version,
            } => P::PutShadow(v1::PutShadow {
                shadow: Some(shadow.into()),
                expected_version,
            }),
            Op::DeleteShadow {
                resource,
                entry_uuid,
                expected_version,
            } => P::DeleteShadow(v1::DeleteShadow {
                key: Some(v1::ShadowKey {
                    resource,
                    entry_uuid,
                }),
                expected_version,
            }),
        };
        v1::Operation { op: Some(op) }
    }
}

impl TryFrom<v1::ChangeEvent> for SourceChange {
    type Error = ConvertError;

    /// Attribute names are lower-cased (LDAP names are case-insensitive).
    fn try_from(e: v1::ChangeEvent) -> Result<Self, Self::Error> {
        check_version(e.schema_version)?;
        let missing = |field| ConvertError::Missing {
            message: "ChangeEvent",
            field,
        };
        if e.resource.is_empty() {
            return Err(missing("resource"));
        }
        if e.entry_uuid.is_empty() {
            return Err(missing("entry_uuid"));
        }
        let kind = match v1::ChangeKind::try_from(e.kind) {
            Ok(v1::ChangeKind::Upsert) => {
                let mut attributes: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
                for a in e.attributes {
                    attributes
                        .entry(a.name.to_ascii_lowercase())
                        .or_default()
                        .extend(a.values);
                }
                ChangeKind::Upsert { attributes }
            }
            Ok(v1::ChangeKind::Delete) => ChangeKind::Delete,
            _ => {
                return Err(ConvertError::UnknownKind {
                    event_id: e.event_id,
                    kind: e.kind,
                });
            }
        };
        let csn = e.position.map(|p| p.csn).filter(|c| !c.is_empty());
        let object_type = object_type(e.object_type);
        Ok(SourceChange {
            csn,
            object_type,
            resource: e.resource,
            entry_uuid: e.entry_uuid,
            dn: e.dn,
            kind,
        })
    }
}

/// Refuses a bus message written with another schema version.
///
/// # Errors
/// [`ConvertError::SchemaVersion`].
pub fn check_version(found: u32) -> Result<(), ConvertError> {
    if found == crate::SCHEMA_VERSION {
        Ok(())
    } else {
        Err(ConvertError::SchemaVersion {
            found,
            expected: crate::SCHEMA_VERSION,
        })
    }
}
