//! The one error type of the LDAP adapter: every variant names the server, the entry and what the server said.

use std::time::Duration;

/// Why talking to a directory failed. No variant ever carries a password.
#[derive(Debug, thiserror::Error)]
pub enum LdapError {
    /// TLS could not be set up (an unreadable or empty CA file).
    #[error("TLS for LDAP server {url}: {reason}")]
    Tls {
        /// The server URL.
        url: String,
        /// What went wrong, naming the file.
        reason: String,
    },
    /// The TCP connection could not be opened (refused, unreachable, timed out, bad URL).
    #[error("cannot connect to LDAP server {url}: {reason}")]
    Connect {
        /// The server URL.
        url: String,
        /// What went wrong, e.g. `connection refused`.
        reason: String,
    },

    /// The simple bind was refused, e.g. a wrong password (`invalid credentials (rc 49)`).
    #[error("bind to {url} as {bind_dn} failed: {reason}")]
    Bind {
        /// The server URL.
        url: String,
        /// The DN that tried to bind.
        bind_dn: String,
        /// The server's verdict (result code and text), never the password.
        reason: String,
    },

    /// The server answered an operation with an error result code.
    #[error("LDAP {operation} of {dn} on {url} failed: rc {rc} ({name}){text}", name = rc_name(*rc), text = text_suffix(text))]
    Operation {
        /// The server URL.
        url: String,
        /// The operation, e.g. `modify`.
        operation: String,
        /// The entry (or search base) it was about.
        dn: String,
        /// The LDAP result code.
        rc: u32,
        /// The server's diagnostic message, possibly empty.
        text: String,
    },

    /// An add or rename found the entry already there (rc 68).
    #[error("LDAP {operation} on {url}: entry {dn} already exists (rc 68, entryAlreadyExists)")]
    AlreadyExists {
        /// The entry that exists.
        dn: String,
        operation: String,
        url: String,
    },

    /// The entry to change or delete does not exist (rc 32).
    #[error("LDAP {operation} on {url}: entry {dn} does not exist (rc 32, noSuchObject)")]
    NoSuchObject {
        /// The missing entry.
        dn: String,
        operation: String,
        url: String,
    },

    /// The sync provider cannot resume from the cookie (e-syncRefreshRequired, rc 4096):
    /// start again without a cookie and reconcile everything.
    #[error(
        "the sync provider requires a full refresh (e-syncRefreshRequired, rc 4096): restart the sync session without a cookie"
    )]
    RefreshRequired,

    /// The server sent something this adapter cannot decode.
    #[error("protocol error talking to {url}: {reason}")]
    Protocol {
        /// The server URL.
        url: String,
        /// What was malformed.
        reason: String,
    },

    /// A [`crate::Pool`] was asked for a resource it has no connection for.
    #[error("no LDAP connection is configured for resource {resource:?}")]
    NotConfigured {
        /// The resource name.
        resource: String,
    },

    /// The connection is gone (closed by the server or the network).
    #[error("connection to {url} closed")]
    Closed {
        /// The server URL.
        url: String,
    },

    /// The server did not answer an operation in time.
    #[error("LDAP {operation} of {dn} on {url} timed out after {after:?}")]
    Timeout {
        /// The server URL.
        url: String,
        /// The operation, e.g. `add`.
        operation: String,
        /// The entry it was about.
        dn: String,
        /// How long the adapter waited.
        after: Duration,
    },

    /// The request could not be sent as given (e.g. an unparsable filter).
    #[error("invalid LDAP {operation} request for {dn} on {url}: {reason}")]
    Request {
        /// The server URL.
        url: String,
        /// The operation.
        operation: String,
        /// The entry or base it was about.
        dn: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Where an operation went, for building errors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Op<'a> {
    pub(crate) url: &'a str,
    pub(crate) operation: &'a str,
    pub(crate) dn: &'a str,
}

impl Op<'_> {
    /// rc 68 for `dn` (the operation's own DN, or a rename's new one).
    pub(crate) fn exists(&self, dn: &str) -> LdapError {
        LdapError::AlreadyExists {
            dn: dn.to_owned(),
            operation: self.operation.to_owned(),
            url: self.url.to_owned(),
        }
    }

    /// rc 32 for the operation's DN.
    pub(crate) fn missing(&self) -> LdapError {
        LdapError::NoSuchObject {
            dn: self.dn.to_owned(),
            operation: self.operation.to_owned(),
            url: self.url.to_owned(),
        }
    }

    /// An error result from the server.
    pub(crate) fn result(&self, rc: u32, text: &str) -> LdapError {
        LdapError::Operation {
            url: self.url.to_owned(),
            operation: self.operation.to_owned(),
            dn: self.dn.to_owned(),
            rc,
            text: text.to_owned(),
        }
    }

    /// An ldap3 failure while sending or awaiting the operation.
    pub(crate) fn failed(&self, err: ldap3::LdapError, timeout: Duration) -> LdapError {
        use ldap3::LdapError as E;
        match err {
            E::LdapResult { result } => self.result(result.rc, &result.text),
            E::Timeout { .. } => LdapError::Timeout {
                url: self.url.to_owned(),
                operation: self.operation.to_owned(),
                dn: self.dn.to_owned(),
                after: timeout,
            },
            E::OpSend { .. }
            | E::ResultRecv { .. }
            | E::IdScrubSend { .. }
            | E::MiscSend { .. }
            | E::EndOfStream
            | E::Io { .. } => LdapError::Closed {
                url: self.url.to_owned(),
            },
            other => LdapError::Request {
                url: self.url.to_owned(),
                operation: self.operation.to_owned(),
                dn: self.dn.to_owned(),
                reason: other.to_string(),
            },
        }
    }
}

/// The RFC 4511 name of a result code, for messages a person can act on.
pub(crate) fn rc_name(rc: u32) -> &'static str {
    match rc {
        0 => "success",
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        7 => "authMethodNotSupported",
        8 => "strongerAuthRequired",
        10 => "referral",
        11 => "adminLimitExceeded",
        12 => "unavailableCriticalExtension",
        13 => "confidentialityRequired",
        16 => "noSuchAttribute",
        17 => "undefinedAttributeType",
        18 => "inappropriateMatching",
        19 => "constraintViolation",
        20 => "attributeOrValueExists",
        21 => "invalidAttributeSyntax",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        64 => "namingViolation",
        65 => "objectClassViolation",
        66 => "notAllowedOnNonLeaf",
        67 => "notAllowedOnRDN",
        68 => "entryAlreadyExists",
        69 => "objectClassModsProhibited",
        80 => "other",
        4096 => "e-syncRefreshRequired",
        _ => "unknown result code",
    }
}

fn text_suffix(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// The reason text of a failed bind: result code, its name and the server's text.
pub(crate) fn bind_reason(rc: u32, text: &str) -> String {
    let what = match rc {
        49 => "invalid credentials (wrong DN or password)".to_owned(),
        _ => rc_name(rc).to_owned(),
    };
    format!("{what}, rc {rc}{}", text_suffix(text))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn operation_message_names_everything() {
        let op = Op {
            url: "ldap://h:1",
            operation: "modify",
            dn: "cn=x,dc=y",
        };
        let text = op.result(67, "cannot remove RDN value").to_string();
        for part in [
            "ldap://h:1",
            "modify",
            "cn=x,dc=y",
            "rc 67",
            "notAllowedOnRDN",
            "cannot remove RDN value",
        ] {
            assert!(text.contains(part), "{text:?} lacks {part:?}");
        }
        assert!(!op.result(32, "").to_string().ends_with(": "));
    }

    #[test]
    fn bind_reason_is_clear() {
        assert_eq!(
            bind_reason(49, ""),
            "invalid credentials (wrong DN or password), rc 49"
        );
    }
}
