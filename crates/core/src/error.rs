//! Errors of the domain crate.

/// What went wrong while deciding or mapping; each names the thing at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    #[error("configuration {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("resource {resource:?} is not in the configuration")]
    UnknownResource { resource: String },
    #[error(
        "entry {dn:?}: attribute {attribute:?} has a value that is not UTF-8 and cannot be mapped to {target:?}"
    )]
    NotUtf8 {
        dn: String,
        attribute: String,
        target: String,
    },
    #[error("template {template:?}: attribute {attribute:?} has no value")]
    MissingValue { template: String, attribute: String },
    #[error("template {template:?}: {reason}")]
    BadTemplate { template: String, reason: String },
    #[error("mapping to {target:?}: expression {expression:?}: {reason}")]
    Expression {
        target: String,
        expression: String,
        reason: String,
    },
    #[error("{holder} is given role {role:?}, which does not exist")]
    UnknownRole { holder: String, role: String },
    #[error(
        "role {role:?} gives an account on resource {resource:?}, which is not a target in the configuration (no such resource, or it has no dn_template)"
    )]
    NotATarget { role: String, resource: String },
    #[error("reaction {reaction} needs a focus but none was found")]
    NoFocus { reaction: String },
}
