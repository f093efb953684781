//! The one error type of the testkit: every variant names what failed and where.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Why a throwaway server or a wait could not be brought about.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A server binary the testkit drives is not installed.
    #[error("required binary {path} not found; run scripts/install-deps")]
    MissingBinary {
        /// Absolute path that was looked for.
        path: PathBuf,
    },

    /// A file-system or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, including the path or address.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper command (such as `slapadd`) ran and failed.
    #[error("`{command}` failed ({status}): {output_tail}")]
    CommandFailed {
        /// The command line as run.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of its stderr and stdout.
        output_tail: String,
    },

    /// A server process exited while it was expected to start or run.
    #[error("{what} exited early ({status}); tail of {log}: {log_tail}")]
    ServerExited {
        /// Which server, e.g. `slapd on ldap://127.0.0.1:4000/`.
        what: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// A server kept running but did not become ready before the deadline.
    #[error("{what} not ready after {timeout:?} (last check: {last}); tail of {log}: {log_tail}")]
    ServerNotReady {
        /// Which server and where.
        what: String,
        /// How long the testkit waited.
        timeout: Duration,
        /// The outcome of the last readiness check.
        last: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// Every port tried for a server was already in use.
    #[error("{what}: loopback port(s) {ports:?} already in use; tail of {log}: {log_tail}")]
    PortsInUse {
        /// Which server.
        what: String,
        /// The ports tried, in order.
        ports: Vec<u16>,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },

    /// A server reported its address in a form the testkit did not expect.
    #[error("unexpected content in {path}: {reason}")]
    BadServerOutput {
        /// The file that was read.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// An LDAP operation against a throwaway slapd failed.
    #[error("LDAP {operation} on {url}: {source}")]
    Ldap {
        /// The operation, e.g. `simple bind as cn=admin,dc=example,dc=com`.
        operation: String,
        /// The server URL.
        url: String,
        /// The underlying ldap3 error (boxed: it is large).
        #[source]
        source: Box<ldap3::LdapError>,
    },

    /// [`crate::eventually`] gave up.
    #[error("timed out after {timeout:?} waiting for {what}; last: {last}")]
    Timeout {
        /// The condition waited for.
        what: String,
        /// How long it waited.
        timeout: Duration,
        /// The last error or "not yet" reported by the check.
        last: String,
    },
}

impl TestkitError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
