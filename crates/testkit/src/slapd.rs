//! A throwaway OpenLDAP `slapd` (mdb + syncprov) on loopback, configured and seeded offline.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::process::{log_len, log_stdio, log_tail, require_binary, run_tool, terminate};
use crate::wait::free_port;
use crate::{TestkitError, ldif};

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";
const MODULE_DIR: &str = "/usr/lib/ldap";
const SCHEMA_DIR: &str = "/etc/ldap/schema";
const SCHEMAS: [&str; 4] = ["core", "cosine", "nis", "inetorgperson"];
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
const PORT_ATTEMPTS: usize = 5;
const CONFIG_DIR: &str = "slapd.d";
const PARTIAL_CONFIG_DIR: &str = "slapd.d.partial";
const DATA_DIR: &str = "data";
const PID_FILE: &str = "slapd.pid";
const LOG_FILE: &str = "slapd.log";

/// What a new throwaway directory holds.
#[derive(Clone)]
pub struct SlapdOptions {
    /// The naming context, e.g. `dc=example,dc=com`.
    pub suffix: String,
    /// Password of the root DN `cn=admin,<suffix>`.
    pub admin_password: String,
    /// Entries loaded offline with `slapadd -q -w`, including the suffix entry itself.
    pub seed_ldif: String,
    /// Keep an in-memory syncprov session log (`olcSpSessionlog: 10000`), so
    /// resumed syncrepl sessions get deletes as a delete phase, not a present phase.
    pub session_log: bool,
}

impl fmt::Debug for SlapdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlapdOptions")
            .field("suffix", &self.suffix)
            .field("admin_password", &"<redacted>")
            .field("seed_ldif_bytes", &self.seed_ldif.len())
            .field("session_log", &self.session_log)
            .finish()
    }
}

/// A real slapd on `127.0.0.1`, killed when dropped.
pub struct Slapd {
    child: Option<Child>,
    port: u16,
    /// The `ldaps://` port of a directory with certificates.
    ldaps_port: Option<u16>,
    url: String,
    suffix: String,
    admin_dn: String,
    admin_password: String,
    dir: PathBuf,
    _temp: Option<TempDir>,
}

impl fmt::Debug for Slapd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slapd")
            .field("url", &self.url)
            .field("suffix", &self.suffix)
            .field("admin_dn", &self.admin_dn)
            .field("dir", &self.dir)
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

impl Slapd {
    /// Create, seed and start a directory in a fresh temporary directory
    /// (removed on drop).
    ///
    /// # Errors
    ///
    /// A missing binary or schema, `slapadd` rejecting the config or the seed
    /// (the error carries its output), or a slapd that exits or is not ready
    /// within ten seconds (with its log tail).
    pub async fn start(opts: SlapdOptions) -> Result<Self, TestkitError> {
        let temp = tempfile::Builder::new()
            .prefix("idsync-slapd-")
            .tempdir()
            .map_err(|e| TestkitError::io("create temporary directory for slapd", e))?;
        let dir = temp.path().to_path_buf();
        create_retrying(&dir, &opts).await?;
        Self::launch(dir, Some(temp), opts).await
    }

    /// As [`Slapd::start`], with StartTLS on its `ldap://` listener: a
    /// throwaway CA and a server certificate for `127.0.0.1` (made with
    /// `openssl`) in its `tls/` directory. Returns the CA certificate's path,
    /// for clients to trust.
    ///
    /// # Errors
    ///
    /// As for [`Slapd::start`], and `openssl` failing or missing.
    pub async fn start_with_starttls(opts: SlapdOptions) -> Result<(Self, PathBuf), TestkitError> {
        let temp = tempfile::Builder::new()
            .prefix("idsync-slapd-tls-")
            .tempdir()
            .map_err(|e| TestkitError::io("create temporary directory for slapd", e))?;
        let dir = temp.path().to_path_buf();
        let ca = make_certificates(&dir.join(TLS_DIR)).await?;
        create_retrying(&dir, &opts).await?;
        Ok((Self::launch(dir, Some(temp), opts).await?, ca))
    }

    /// Start the directory kept in `dir`: reuse its config and data when
    /// `dir/slapd.d` exists (no re-seed), else create and seed it first.
    /// The directory is kept on drop.
    ///
    /// # Errors
    ///
    /// As for [`Slapd::start`].
    pub async fn open_or_create(dir: &Path, opts: SlapdOptions) -> Result<Self, TestkitError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| TestkitError::io(format!("create directory {}", dir.display()), e))?;
        let dir = std::path::absolute(dir)
            .map_err(|e| TestkitError::io(format!("resolve directory {}", dir.display()), e))?;
        if dir.join(CONFIG_DIR).is_dir() {
            tracing::debug!(dir = %dir.display(), "reusing existing slapd config and data");
        } else {
            create_retrying(&dir, &opts).await?;
        }
        Self::launch(dir, None, opts).await
    }

    async fn launch(
        dir: PathBuf,
        temp: Option<TempDir>,
        opts: SlapdOptions,
    ) -> Result<Self, TestkitError> {
        let mut slapd = Self {
            child: None,
            port: 0,
            ldaps_port: None,
            url: String::new(),
            admin_dn: admin_dn(&opts.suffix),
            suffix: opts.suffix,
            admin_password: opts.admin_password,
            dir,
            _temp: temp,
        };
        slapd.spawn_on_free_port().await?;
        Ok(slapd)
    }

    /// `ldap://127.0.0.1:PORT`; the same across restarts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The naming context.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// The root DN, `cn=admin,<suffix>`.
    pub fn admin_dn(&self) -> &str {
        &self.admin_dn
    }

    /// The root DN's password.
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// The directory holding `slapd.d`, the data and `slapd.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stop slapd (SIGTERM, SIGKILL after about five seconds), keeping the data.
    /// Stopping a stopped server does nothing.
    ///
    /// # Errors
    ///
    /// [`TestkitError::Io`] when the process cannot be signalled or reaped.
    pub async fn stop(&mut self) -> Result<(), TestkitError> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, "slapd").await?;
        }
        Ok(())
    }

    /// Start slapd again on the same port and data; a running slapd is stopped first.
    ///
    /// # Errors
    ///
    /// As for [`Slapd::start`]; [`TestkitError::PortsInUse`] when the port has
    /// been taken meanwhile.
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop().await?;
        match self.spawn_on(self.port).await? {
            Spawned::Ready => Ok(()),
            Spawned::PortInUse(log_tail) => Err(TestkitError::PortsInUse {
                what: format!("slapd in {}", self.dir.display()),
                ports: vec![self.port],
                log: self.dir.join(LOG_FILE),
                log_tail,
            }),
        }
    }

    /// `ldaps://127.0.0.1:PORT` of a directory started with certificates.
    pub fn ldaps_url(&self) -> Option<String> {
        self.ldaps_port.map(|p| format!("ldaps://127.0.0.1:{p}"))
    }

    /// A connection bound as the root DN, for tests to change entries.
    ///
    /// # Errors
    ///
    /// [`TestkitError::Ldap`] when connecting or binding fails.
    pub async fn admin_conn(&self) -> Result<ldap3::Ldap, TestkitError> {
        let ldap_err = |operation: String| {
            let url = self.url.clone();
            move |source| TestkitError::Ldap {
                operation,
                url,
                source: Box::new(source),
            }
        };
        let (conn, mut ldap) = LdapConnAsync::new(&self.url)
            .await
            .map_err(ldap_err("connect".to_owned()))?;
        ldap3::drive!(conn);
        ldap.simple_bind(&self.admin_dn, &self.admin_password)
            .await
            .and_then(ldap3::LdapResult::success)
            .map_err(ldap_err(format!("simple bind as {}", self.admin_dn)))?;
        Ok(ldap)
    }

    async fn spawn_on_free_port(&mut self) -> Result<(), TestkitError> {
        let mut tried = Vec::with_capacity(PORT_ATTEMPTS);
        let mut last_tail = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            tried.push(port);
            match self.spawn_on(port).await? {
                Spawned::Ready => return Ok(()),
                Spawned::PortInUse(tail) => {
                    tracing::debug!(port, "slapd port taken; trying another");
                    self.ldaps_port = None;
                    last_tail = tail;
                }
            }
        }
        Err(TestkitError::PortsInUse {
            what: format!("slapd in {}", self.dir.display()),
            ports: tried,
            log: self.dir.join(LOG_FILE),
            log_tail: last_tail,
        })
    }

    /// Start slapd on `port` and wait until it answers a root DSE read.
    async fn spawn_on(&mut self, port: u16) -> Result<Spawned, TestkitError> {
        let binary = require_binary(SLAPD)?;
        let url = format!("ldap://127.0.0.1:{port}/");
        let mut listen = url.clone();
        // With certificates, an ldaps:// listener too (StartTLS works on ldap://).
        if self.dir.join(TLS_DIR).join("server.pem").exists() {
            let tls_port = match self.ldaps_port {
                Some(p) => p,
                None => free_port()?,
            };
            self.ldaps_port = Some(tls_port);
            listen.push_str(&format!(" ldaps://127.0.0.1:{tls_port}/"));
        }
        let config_dir = self.dir.join(CONFIG_DIR);
        let pid_file = self.dir.join(PID_FILE);
        let log = self.dir.join(LOG_FILE);
        let log_from = log_len(&log);
        let (stdout, stderr) = log_stdio(&log)?;
        // `-d none` keeps slapd in the foreground like `-d 0`, but unlike
        // `-d 0` it still prints its errors (bind failures, bad config) to stderr.
        let child = Command::new(&binary)
            .arg("-h")
            .arg(&listen)
            .arg("-F")
            .arg(&config_dir)
            .arg("-d")
            .arg("none")
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                TestkitError::io(
                    format!(
                        "start {} -h {listen} -F {}",
                        binary.display(),
                        config_dir.display()
                    ),
                    e,
                )
            })?;
        let child = self.child.insert(child);
        let pid = child.id().unwrap_or_default();
        let what = format!("slapd (pid {pid}) on {url} in {}", self.dir.display());

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| TestkitError::io(format!("check on {what}"), e))?
            {
                self.child = None;
                let tail = log_tail(&log, log_from);
                if tail.contains("errno=98") || tail.contains("Address already in use") {
                    return Ok(Spawned::PortInUse(tail));
                }
                return Err(TestkitError::ServerExited {
                    what,
                    status,
                    log,
                    log_tail: tail,
                });
            }
            // slapd writes its pid file only after binding its listener, so a
            // root DSE answer with our pid in place cannot come from a neighbour
            // that grabbed the same port.
            let last = if pid_file_names(&pid_file, pid).await {
                match root_dse(&url).await {
                    Ok(()) => {
                        self.port = port;
                        self.url = url.trim_end_matches('/').to_owned();
                        tracing::debug!(url = %self.url, dir = %self.dir.display(), "slapd is ready");
                        return Ok(Spawned::Ready);
                    }
                    Err(reason) => reason,
                }
            } else {
                format!("waiting for pid file {} to name {pid}", pid_file.display())
            };
            if Instant::now() >= deadline {
                return Err(TestkitError::ServerNotReady {
                    what,
                    timeout: READY_TIMEOUT,
                    last,
                    log_tail: log_tail(&log, log_from),
                    log,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Best effort: the process may already be gone.
            let _ = child.start_kill();
        }
    }
}

enum Spawned {
    Ready,
    /// The port was taken; carries slapd's log tail.
    PortInUse(String),
}

fn admin_dn(suffix: &str) -> String {
    format!("cn=admin,{suffix}")
}

async fn pid_file_names(path: &Path, pid: u32) -> bool {
    tokio::fs::read_to_string(path)
        .await
        .is_ok_and(|text| text.trim() == pid.to_string())
}

/// An anonymous base search of the root DSE: the readiness probe.
async fn root_dse(url: &str) -> Result<(), String> {
    let probe = async {
        let settings = LdapConnSettings::new().set_conn_timeout(Duration::from_secs(1));
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, url).await?;
        ldap3::drive!(conn);
        ldap.search("", Scope::Base, "(objectClass=*)", vec!["namingContexts"])
            .await?
            .success()?;
        let _ = ldap.unbind().await;
        Ok::<_, ldap3::LdapError>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("root DSE read on {url}: {e}")),
        Err(_) => Err(format!("root DSE read on {url} timed out")),
    }
}

/// Build `dir/slapd.d` and `dir/data` from scratch: config and seed are loaded
/// into a partial config dir that is renamed only once both succeeded, so a
/// failed attempt is never mistaken for a usable directory.
/// [`create`], again from an empty directory when a tool died of a signal:
/// Debian 12's `slapadd -q` was seen to abort now and then with heap
/// corruption ("double free") on seeds of tens of thousands of entries, and
/// once three times in a row on 20,000; the last attempt loads the seed
/// without `-q` (slower: every entry checked and written in a transaction).
async fn create_retrying(dir: &Path, opts: &SlapdOptions) -> Result<(), TestkitError> {
    const ATTEMPTS: u32 = 4;
    let mut attempt = 1;
    loop {
        match create(dir, opts, attempt < ATTEMPTS).await {
            Err(e) if attempt < ATTEMPTS && e.to_string().contains("(signal:") => {
                tracing::warn!(error = %e, attempt, "slapd setup crashed; starting it over");
                attempt += 1;
                tokio::fs::remove_dir_all(dir)
                    .await
                    .map_err(|e| TestkitError::io(format!("clear {}", dir.display()), e))?;
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| TestkitError::io(format!("create {}", dir.display()), e))?;
            }
            result => return result,
        }
    }
}

async fn create(dir: &Path, opts: &SlapdOptions, quick: bool) -> Result<(), TestkitError> {
    let slapadd = require_binary(SLAPADD)?;
    require_binary(SLAPD)?;
    let partial = dir.join(PARTIAL_CONFIG_DIR);
    let data = dir.join(DATA_DIR);
    for stale in [&partial, &data] {
        if stale.exists() {
            tokio::fs::remove_dir_all(stale)
                .await
                .map_err(|e| TestkitError::io(format!("remove stale {}", stale.display()), e))?;
        }
        tokio::fs::create_dir_all(stale)
            .await
            .map_err(|e| TestkitError::io(format!("create {}", stale.display()), e))?;
    }

    let config_ldif = dir.join("config.ldif");
    let config = config_ldif_text(dir, opts).await?;
    write(&config_ldif, &config).await?;
    run_tool(
        &slapadd,
        &[
            OsStr::new("-n0"),
            OsStr::new("-F"),
            partial.as_os_str(),
            OsStr::new("-l"),
            config_ldif.as_os_str(),
            OsStr::new("-q"),
        ],
    )
    .await?;

    let seed_ldif = dir.join("seed.ldif");
    write(&seed_ldif, &opts.seed_ldif).await?;
    if !opts.seed_ldif.trim().is_empty() {
        let mut args = vec![
            OsStr::new("-w"),
            OsStr::new("-F"),
            partial.as_os_str(),
            OsStr::new("-b"),
            OsStr::new(&opts.suffix),
            OsStr::new("-l"),
            seed_ldif.as_os_str(),
        ];
        if quick {
            args.insert(0, OsStr::new("-q"));
        }
        run_tool(&slapadd, &args).await?;
    }

    let config_dir = dir.join(CONFIG_DIR);
    tokio::fs::rename(&partial, &config_dir)
        .await
        .map_err(|e| {
            TestkitError::io(
                format!("rename {} to {}", partial.display(), config_dir.display()),
                e,
            )
        })?;
    tracing::debug!(dir = %dir.display(), suffix = %opts.suffix, "created slapd directory");
    Ok(())
}

async fn write(path: &Path, text: &str) -> Result<(), TestkitError> {
    tokio::fs::write(path, text)
        .await
        .map_err(|e| TestkitError::io(format!("write {}", path.display()), e))
}

/// The whole cn=config tree as one LDIF for `slapadd -n0`.
/// Where [`Slapd::start_with_starttls`] keeps its certificates.
const TLS_DIR: &str = "tls";

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`.
/// Returns the CA certificate's path.
async fn make_certificates(dir: &Path) -> Result<PathBuf, TestkitError> {
    let openssl = Path::new("/usr/bin/openssl");
    if !openssl.exists() {
        return Err(TestkitError::MissingBinary {
            path: openssl.to_path_buf(),
        });
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| TestkitError::io(format!("create {}", dir.display()), e))?;
    let p = |name: &str| dir.join(name).into_os_string();
    let ext = dir.join("server.ext");
    tokio::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .await
    .map_err(|e| TestkitError::io(format!("write {}", ext.display()), e))?;
    let ec = [
        OsStr::new("-newkey"),
        OsStr::new("ec"),
        OsStr::new("-pkeyopt"),
        OsStr::new("ec_paramgen_curve:prime256v1"),
        OsStr::new("-nodes"),
    ];
    let mut ca_args: Vec<&OsStr> = vec![OsStr::new("req"), OsStr::new("-x509")];
    ca_args.extend(ec);
    let (ca_key, ca_pem, key, csr, pem, ext_os) = (
        p("ca.key"),
        p("ca.pem"),
        p("server.key"),
        p("server.csr"),
        p("server.pem"),
        ext.into_os_string(),
    );
    ca_args.extend([
        OsStr::new("-keyout"),
        &ca_key,
        OsStr::new("-out"),
        &ca_pem,
        OsStr::new("-days"),
        OsStr::new("2"),
        OsStr::new("-subj"),
        OsStr::new("/CN=idsync test CA"),
    ]);
    run_tool(openssl, &ca_args).await?;
    let mut req_args: Vec<&OsStr> = vec![OsStr::new("req")];
    req_args.extend(ec);
    req_args.extend([
        OsStr::new("-keyout"),
        &key,
        OsStr::new("-out"),
        &csr,
        OsStr::new("-subj"),
        OsStr::new("/CN=127.0.0.1"),
    ]);
    run_tool(openssl, &req_args).await?;
    let sign_args: Vec<&OsStr> = vec![
        OsStr::new("x509"),
        OsStr::new("-req"),
        OsStr::new("-in"),
        &csr,
        OsStr::new("-CA"),
        &ca_pem,
        OsStr::new("-CAkey"),
        &ca_key,
        OsStr::new("-CAcreateserial"),
        OsStr::new("-out"),
        &pem,
        OsStr::new("-days"),
        OsStr::new("2"),
        OsStr::new("-extfile"),
        &ext_os,
    ];
    run_tool(openssl, &sign_args).await?;
    Ok(dir.join("ca.pem"))
}

async fn config_ldif_text(dir: &Path, opts: &SlapdOptions) -> Result<String, TestkitError> {
    let admin = admin_dn(&opts.suffix);
    let path = |name: &str| dir.join(name).display().to_string();
    let mut out = String::new();

    out.push_str("dn: cn=config\nobjectClass: olcGlobal\ncn: config\n");
    out.push_str(&ldif::line("olcPidFile", &path(PID_FILE)));
    out.push_str(&ldif::line("olcArgsFile", &path("slapd.args")));
    out.push_str("olcSizeLimit: unlimited\n");
    let tls = dir.join(TLS_DIR);
    if tls.join("server.pem").exists() {
        let file = |name: &str| tls.join(name).display().to_string();
        out.push_str(&ldif::line("olcTLSCACertificateFile", &file("ca.pem")));
        out.push_str(&ldif::line("olcTLSCertificateFile", &file("server.pem")));
        out.push_str(&ldif::line("olcTLSCertificateKeyFile", &file("server.key")));
    }
    out.push('\n');

    out.push_str("dn: cn=module{0},cn=config\nobjectClass: olcModuleList\ncn: module{0}\n");
    out.push_str(&ldif::line("olcModulePath", MODULE_DIR));
    out.push_str("olcModuleLoad: back_mdb\nolcModuleLoad: syncprov\n\n");

    out.push_str("dn: cn=schema,cn=config\nobjectClass: olcSchemaConfig\ncn: schema\n\n");
    for schema in SCHEMAS {
        let file = Path::new(SCHEMA_DIR).join(format!("{schema}.ldif"));
        let text = tokio::fs::read_to_string(&file).await.map_err(|e| {
            TestkitError::io(
                format!(
                    "read LDAP schema {} (run scripts/install-deps)",
                    file.display()
                ),
                e,
            )
        })?;
        out.push_str(text.trim());
        out.push_str("\n\n");
    }

    out.push_str(
        "dn: olcDatabase={-1}frontend,cn=config\n\
         objectClass: olcDatabaseConfig\n\
         objectClass: olcFrontendConfig\n\
         olcDatabase: {-1}frontend\n\
         olcSizeLimit: unlimited\n\n",
    );
    out.push_str(
        "dn: olcDatabase={0}config,cn=config\n\
         objectClass: olcDatabaseConfig\n\
         olcDatabase: {0}config\n\n",
    );

    out.push_str(
        "dn: olcDatabase={1}mdb,cn=config\n\
         objectClass: olcDatabaseConfig\n\
         objectClass: olcMdbConfig\n\
         olcDatabase: {1}mdb\n",
    );
    out.push_str(&ldif::line("olcSuffix", &opts.suffix));
    out.push_str(&ldif::line("olcRootDN", &admin));
    out.push_str(&ldif::line("olcRootPW", &opts.admin_password));
    out.push_str(&ldif::line("olcDbDirectory", &path(DATA_DIR)));
    out.push_str(
        "olcDbNoSync: TRUE\n\
         olcDbMaxSize: 4294967296\n\
         olcDbIndex: objectClass eq\n\
         olcDbIndex: entryCSN,entryUUID eq\n\
         olcSizeLimit: unlimited\n\
         olcTimeLimit: unlimited\n",
    );
    out.push_str(&ldif::line(
        "olcLimits",
        &format!("dn.exact=\"{admin}\" size=unlimited time=unlimited"),
    ));
    out.push('\n');

    out.push_str(
        "dn: olcOverlay={0}syncprov,olcDatabase={1}mdb,cn=config\n\
         objectClass: olcOverlayConfig\n\
         objectClass: olcSyncProvConfig\n\
         olcOverlay: {0}syncprov\n\
         olcSpCheckpoint: 100 10\n",
    );
    if opts.session_log {
        out.push_str("olcSpSessionlog: 10000\n");
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use ldap3::{Mod, SearchEntry};
    use std::collections::HashSet;

    const SUFFIX: &str = "dc=example,dc=com";

    fn seed(extra: &str) -> String {
        format!(
            "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
             dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: uid=jack,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: jack\n\
             cn: Jack Sparrow\nsn: Sparrow\ngivenName: Jack\n{extra}"
        )
    }

    fn options(seed_ldif: String) -> SlapdOptions {
        SlapdOptions {
            suffix: SUFFIX.to_owned(),
            admin_password: "s3cret: with spaces ".to_owned(),
            seed_ldif,
            session_log: true,
        }
    }

    /// uid -> entryUUID of every person under the suffix.
    async fn people(slapd: &Slapd) -> Vec<(String, String)> {
        let mut ldap = slapd.admin_conn().await.unwrap();
        let (entries, _) = ldap
            .search(
                slapd.suffix(),
                Scope::Subtree,
                "(objectClass=inetOrgPerson)",
                vec!["uid", "entryUUID"],
            )
            .await
            .unwrap()
            .success()
            .unwrap();
        ldap.unbind().await.unwrap();
        let mut out: Vec<_> = entries
            .into_iter()
            .map(|e| {
                let e = SearchEntry::construct(e);
                (e.attrs["uid"][0].clone(), e.attrs["entryUUID"][0].clone())
            })
            .collect();
        out.sort();
        out
    }

    async fn add_person(slapd: &Slapd, uid: &str) {
        let mut ldap = slapd.admin_conn().await.unwrap();
        let dn = format!("uid={uid},ou=people,{SUFFIX}");
        let oc = HashSet::from(["inetOrgPerson"]);
        let uids = HashSet::from([uid]);
        let cn = HashSet::from(["Someone"]);
        let sn = HashSet::from(["One"]);
        ldap.add(
            &dn,
            vec![("objectClass", oc), ("uid", uids), ("cn", cn), ("sn", sn)],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
        ldap.unbind().await.unwrap();
    }

    #[tokio::test]
    async fn starts_seeded_and_keeps_data_across_restart() {
        let mut slapd = Slapd::start(options(seed(""))).await.unwrap();
        assert!(slapd.url().starts_with("ldap://127.0.0.1:"));
        assert_eq!(slapd.admin_dn(), "cn=admin,dc=example,dc=com");
        let before = people(&slapd).await;
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].0, "jack");
        assert_eq!(before[0].1.len(), 36, "entryUUID {:?}", before[0].1);

        // An online change and a modify, then a restart on the same port.
        add_person(&slapd, "anne").await;
        let mut ldap = slapd.admin_conn().await.unwrap();
        ldap.modify(
            &format!("uid=jack,ou=people,{SUFFIX}"),
            vec![Mod::Replace("givenName", HashSet::from(["Captain"]))],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
        ldap.unbind().await.unwrap();

        let url = slapd.url().to_owned();
        let dir = slapd.dir().to_path_buf();
        slapd.stop().await.unwrap();
        slapd.stop().await.unwrap();
        slapd.restart().await.unwrap();
        assert_eq!(slapd.url(), url);
        let after = people(&slapd).await;
        assert_eq!(after.len(), 2);
        assert_eq!(after[1], before[0], "jack keeps its entryUUID");
        assert_eq!(after[0].0, "anne");

        drop(slapd);
        eventually_gone(&dir).await;
    }

    async fn eventually_gone(dir: &Path) {
        crate::eventually("temp dir removed", Duration::from_secs(5), || async {
            Ok((!dir.exists()).then_some(()))
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn open_or_create_reuses_without_reseeding() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("ldap");
        let mut first = Slapd::open_or_create(&dir, options(seed("")))
            .await
            .unwrap();
        add_person(&first, "anne").await;
        let first_people = people(&first).await;
        first.stop().await.unwrap();
        drop(first);

        // A different seed must be ignored: the directory already exists.
        let extra = "\ndn: uid=zed,ou=people,dc=example,dc=com\nobjectClass: inetOrgPerson\nuid: zed\ncn: Zed\nsn: Zed\n";
        let second = Slapd::open_or_create(&dir, options(seed(extra)))
            .await
            .unwrap();
        assert_eq!(people(&second).await, first_people);
        drop(second);

        // Dropped without stop(): killed, data still usable.
        let third = Slapd::open_or_create(&dir, options(String::new()))
            .await
            .unwrap();
        assert_eq!(people(&third).await, first_people);
        assert!(dir.join(CONFIG_DIR).is_dir());
    }

    #[tokio::test]
    async fn malformed_seed_names_slapadd_and_its_message() {
        let err = Slapd::start(options(format!(
            "dn: {SUFFIX}\nobjectClass: dcObject\nthis is not ldif\n"
        )))
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TestkitError::CommandFailed { .. }), "{text}");
        assert!(text.contains("slapadd"), "{text}");
        assert!(text.contains("could not parse entry"), "{text}");
    }

    #[tokio::test]
    async fn failed_create_leaves_no_usable_directory() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("ldap");
        let bad = format!("dn: uid=x,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: x\n");
        let err = Slapd::open_or_create(&dir, options(format!("{}\n\n{bad}", seed(""))))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("requires attribute 'sn'"), "{err}");
        assert!(!dir.join(CONFIG_DIR).exists());

        // The next attempt with a good seed starts from scratch.
        let slapd = Slapd::open_or_create(&dir, options(seed("")))
            .await
            .unwrap();
        assert_eq!(people(&slapd).await.len(), 1);
    }

    #[tokio::test]
    async fn restart_reports_a_taken_port() {
        let mut slapd = Slapd::start(options(seed(""))).await.unwrap();
        slapd.stop().await.unwrap();
        let port = slapd
            .url()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap();
        let _squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let err = slapd.restart().await.unwrap_err();
        assert!(matches!(err, TestkitError::PortsInUse { .. }), "{err}");
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }
}
