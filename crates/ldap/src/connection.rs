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

/// Transport security. `ldaps://` URLs always use TLS; `starttls` upgrades an
/// `ldap://` connection before binding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    pub starttls: bool,
    /// PEM file of the CA certificates to trust; the system's when `None`.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Tls {
    fn wanted(&self, url: &str) -> bool {
        self.starttls || url.starts_with("ldaps://")
    }
}

/// How to reach a directory.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `ldap://host:port` (no TLS yet).
    pub url: String,
    /// The DN to bind as; empty for an anonymous session.
    pub bind_dn: String,
    /// The bind password; never logged or put into an error.
    pub password: Secret,
    pub tls: Tls,
}

impl Connection {
    /// The connection a configured resource describes, with its bind password.
    pub fn for_resource(resource: &idsync_core::config::ResourceConfig, password: Secret) -> Self {
        let tls = resource.tls.as_ref().map_or_else(Tls::default, |t| Tls {
            starttls: t.starttls,
            ca_file: t.ca_file.as_ref().map(std::path::PathBuf::from),
        });
        Self {
            url: resource.url.clone(),
            bind_dn: resource.bind_dn.clone(),
            password,
            tls,
        }
    }
}

/// A rustls configuration trusting the CA certificates in `ca_file`.
fn tls_config(
    url: &str,
    ca_file: &std::path::Path,
) -> Result<std::sync::Arc<rustls::ClientConfig>, LdapError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let fail = |reason: String| LdapError::Tls {
        url: url.to_owned(),
        reason,
    };
    let shown = ca_file.display();
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| fail(format!("cannot read CA file {shown}: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| fail(format!("CA file {shown}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("CA file {shown}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(fail(format!("CA file {shown} holds no certificate")));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Connect, start the connection driver on the current Tokio runtime and
/// bind (simple bind; skipped when `bind_dn` is empty).
pub(crate) async fn open(conn: &Connection) -> Result<Ldap, LdapError> {
    let mut settings = LdapConnSettings::new().set_conn_timeout(CONNECT_TIMEOUT);
    if conn.tls.wanted(&conn.url) {
        settings = settings.set_starttls(conn.tls.starttls && !conn.url.starts_with("ldaps://"));
        if let Some(ca) = &conn.tls.ca_file {
            settings = settings.set_config(tls_config(&conn.url, ca)?);
        }
    }
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
