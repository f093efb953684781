//! Where a directory is and how to bind to it; opening a bound ldap3 handle.

use std::time::Duration;

use idsync_core::secret::Secret;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings};

use crate::LdapError;
use crate::error::bind_reason;

/// How long opening the TCP connection may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a single request/response operation (bind, add, read…) may take.
/// Sync searches have no timeout: a persist search is silent for as long as nothing changes.
pub(crate) const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach a directory.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `ldap://host:port` (no TLS yet).
    pub url: String,
    /// The DN to bind as; empty for an anonymous session.
    pub bind_dn: String,
    /// The bind password; never logged or put into an error.
    pub password: Secret,
}

/// Connect, start the connection driver on the current Tokio runtime and
/// bind (simple bind; skipped when `bind_dn` is empty).
pub(crate) async fn open(conn: &Connection) -> Result<Ldap, LdapError> {
    let settings = LdapConnSettings::new().set_conn_timeout(CONNECT_TIMEOUT);
    let (driver, mut ldap) = LdapConnAsync::with_settings(settings, &conn.url)
        .await
        .map_err(|e| LdapError::Connect {
            url: conn.url.clone(),
            reason: connect_reason(&e),
        })?;
    ldap3::drive!(driver);
    if conn.bind_dn.is_empty() {
        return Ok(ldap);
    }
    let bind_failed = |reason: String| LdapError::Bind {
        url: conn.url.clone(),
        bind_dn: conn.bind_dn.clone(),
        reason,
    };
    let result = ldap
        .with_timeout(OPERATION_TIMEOUT)
        .simple_bind(&conn.bind_dn, conn.password.expose())
        .await
        .map_err(|e| match e {
            ldap3::LdapError::Timeout { .. } => {
                bind_failed(format!("no answer within {OPERATION_TIMEOUT:?}"))
            }
            ldap3::LdapError::LdapResult { result } => {
                bind_failed(bind_reason(result.rc, &result.text))
            }
            // Transport failures: ldap3's messages carry no request content.
            other => bind_failed(other.to_string()),
        })?;
    if result.rc != 0 {
        return Err(bind_failed(bind_reason(result.rc, &result.text)));
    }
    tracing::debug!(url = %conn.url, bind_dn = %conn.bind_dn, "bound to LDAP server");
    Ok(ldap)
}

fn connect_reason(err: &ldap3::LdapError) -> String {
    match err {
        ldap3::LdapError::Timeout { .. } => format!("no connection within {CONNECT_TIMEOUT:?}"),
        other => other.to_string(),
    }
}
