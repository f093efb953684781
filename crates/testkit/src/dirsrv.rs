//! A throwaway 389 Directory Server (`ns-slapd`) on loopback, with the RFC 4533
//! Content Synchronization plugin and the Retro Changelog it depends on.
//!
//! How it runs without systemd (checked with 389-ds-base 2.3.1 on Debian 12, as root):
//!
//! - **Layout.** `dscreate` (lib389) takes every default path from
//!   `defaults.inf`, read from `$PREFIX/share/dirsrv/inf/` when `PREFIX` is
//!   set, and finds instances only at `$PREFIX/etc/dirsrv/slapd-<name>/dse.ldif`.
//!   The INF keys `config_dir`, `db_dir`, `log_dir`, ... alone are therefore
//!   not enough (its "instance exists" check fails). Instead a root gets a
//!   copy of the system `defaults.inf` with every path outside `/usr` moved
//!   under it (`sysconf_dir` stays `/etc`: schema and config templates are
//!   read from there), `with_systemd = 0`, `with_selinux = no`, and
//!   `user`/`group` = the current user (what `dscreate ds-root` does, which
//!   refuses root). Nothing is written outside the root.
//! - **Template.** `PREFIX=<root> dscreate from-file` with `[general] start =
//!   False, systemd = False, selinux = False, strict_host_checking = False`,
//!   `[slapd] instance_name, port, secure_port, self_sign_cert = False,
//!   root_password, user, group` and `[backend-userroot] suffix` (no suffix
//!   entry). It runs ns-slapd itself to configure it online (briefly on all
//!   interfaces: the INF cannot set the listen address) and stops it: about
//!   5.5 s. Its config directory (database and logs pruned) is cached as
//!   `<temp dir>/idsync-dirsrv-template-<hash>` (key: `RECIPE`,
//!   `defaults.inf`, suffix, user), shared by all processes; delete it to
//!   rebuild.
//! - **Instance.** Copy the template's config into a fresh temp root, replace
//!   the template's root path in `dse.ldif`, and edit it offline (the server
//!   reads it at start, so no restart is needed for the plugins):
//!   `nsslapd-listenhost: 127.0.0.1`, ldapi off, the root password in
//!   cleartext with `nsslapd-rootpwstoragescheme: CLEAR` (a cleartext
//!   `nsslapd-rootpw` is otherwise refused as a scheme mismatch),
//!   `cn=Retro Changelog Plugin` on with `nsslapd-attribute:
//!   nsuniqueid:targetUniqueId`, `cn=Content Synchronization` on, small
//!   non-durable bdb caches (the defaults autosize to a 1.5 GB db cache and a
//!   9 GB import cache here), and no `cn=uniqueid generator` entry, so each
//!   instance draws its own node id instead of handing out the template's
//!   nsUniqueIds.
//! - **Seed** offline: `ns-slapd ldif2db -D <config> -n userroot -i <ldif>`,
//!   about 1 s (fixed waits in the import threads). It reports only in the
//!   errors log; skipped entries exit 8, unparsable lines are dropped.
//! - **Run** `ns-slapd -D <config> -i <pidfile>` with `NOTIFY_SOCKET` set: as
//!   under systemd `Type=notify` it then stays in the foreground, a child the
//!   test owns, and logs to stderr as well. (`-d 0` also keeps it in the
//!   foreground, but `-d` replaces the error log level, so it logs nothing,
//!   not even why it exited.) Nothing listens on the notify path; ns-slapd
//!   ignores the failed notification. A taken port ends it with exit 1 and
//!   "PR_Bind() ... Local Network address is in use". Ready (pid file
//!   written, root DSE answers) about 0.6 s after spawn; SIGTERM takes about
//!   2 s. A new instance takes about 1.6 s from a cached template.
//!
//! What a consumer sees: the Sync State UUID is the entry's `nsUniqueId`
//! (see [`sync_uuid_from_nsuniqueid`]), not its `entryUUID`; there is no
//! `entryCSN` without replication; cookies read
//! `localhost:<port>#<bind dn>:<base>:<filter>#<changenumber>` (so an instance
//! keeps its port across restarts); a resumed refreshOnly search ends with
//! SyncDone refreshDeletes=FALSE although there was no present phase.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ldap3::{LdapConnAsync, LdapConnSettings, Scope};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::process::{log_len, log_stdio, log_tail, require_binary, run_tool, terminate};
use crate::wait::free_port;
use crate::{TestkitError, ldif};

const NS_SLAPD: &str = "/usr/sbin/ns-slapd";
const DSCREATE: &str = "/usr/sbin/dscreate";
const ENV: &str = "/usr/bin/env";
const ID: &str = "/usr/bin/id";
const DEFAULTS_INF: &str = "/usr/share/dirsrv/inf/defaults.inf";
const INSTANCE: &str = "idsync";
const BACKEND: &str = "userroot";
const ROOT_DN: &str = "cn=Directory Manager";
/// dscreate insists on a root password of 8+ characters; every instance sets its own.
const TEMPLATE_PASSWORD: &str = "idsync-template-only";
/// Part of the template cache key: change it whenever the template recipe changes.
const RECIPE: &str = "idsync-testkit dirsrv template v2";
/// Where `dscreate` puts the config of instance `idsync` under a root.
const CONFIG_DIR: &str = "etc/dirsrv/slapd-idsync";
/// Written last into a finished template: the root path it was built at.
const BUILT_AT: &str = "idsync-template-root";
const PID_FILE: &str = "run/dirsrv/slapd-idsync.pid";
/// `NOTIFY_SOCKET` target; nothing listens there.
const NOTIFY_SOCKET: &str = "run/notify.sock";
/// The child's stdout and stderr.
const LOG_FILE: &str = "ns-slapd.log";
const SEED_FILE: &str = "seed.ldif";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
const PORT_ATTEMPTS: usize = 5;

/// Serialises template creation within this process (other processes race
/// by rename and lose gracefully).
static TEMPLATE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a new throwaway 389 Directory Server holds.
#[derive(Clone)]
pub struct DirSrvOptions {
    /// The naming context of the one backend (`userroot`), e.g. `dc=example,dc=com`.
    pub suffix: String,
    /// Password of `cn=Directory Manager` (taken as pre-hashed if it starts with `{`).
    pub root_password: String,
    /// Entries loaded offline with `ns-slapd ldif2db`, including the suffix
    /// entry itself; empty leaves the backend empty.
    pub seed_ldif: String,
}

impl fmt::Debug for DirSrvOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirSrvOptions")
            .field("suffix", &self.suffix)
            .field("root_password", &"<redacted>")
            .field("seed_ldif_bytes", &self.seed_ldif.len())
            .finish()
    }
}

/// A real 389 Directory Server on `127.0.0.1`, killed when dropped and its
/// directory removed.
pub struct DirSrv {
    child: Option<Child>,
    port: u16,
    url: String,
    suffix: String,
    root_password: String,
    dir: PathBuf,
    errors_log: PathBuf,
    _temp: TempDir,
}

impl fmt::Debug for DirSrv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirSrv")
            .field("url", &self.url)
            .field("suffix", &self.suffix)
            .field("dir", &self.dir)
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

impl DirSrv {
    /// Create (from the cached template), seed and start an instance in a
    /// fresh temporary directory (removed on drop).
    ///
    /// # Errors
    ///
    /// [`TestkitError::MissingBinary`] when 389-ds-base is not installed (run
    /// `scripts/install-deps`); `dscreate` or `ldif2db` failing (the error
    /// carries their output or the errors log); an `ns-slapd` that exits or is
    /// not ready within twenty seconds (with its log tail).
    pub async fn start(opts: DirSrvOptions) -> Result<Self, TestkitError> {
        let ns_slapd = require_binary(NS_SLAPD)?;
        require_binary(DSCREATE)?;
        let begun = Instant::now();
        let template = template(&opts.suffix).await?;
        let temp = tempfile::Builder::new()
            .prefix("idsync-dirsrv-")
            .tempdir()
            .map_err(|e| TestkitError::io("create temporary directory for 389-ds", e))?;
        let dir = temp.path().to_path_buf();
        let errors_log = instantiate(&template, &dir, &opts).await?;
        if !opts.seed_ldif.trim().is_empty() {
            seed(&ns_slapd, &dir, &errors_log, &opts.seed_ldif).await?;
        }
        let mut server = Self {
            child: None,
            port: 0,
            url: String::new(),
            suffix: opts.suffix,
            root_password: opts.root_password,
            dir,
            errors_log,
            _temp: temp,
        };
        server.spawn_on_free_port().await?;
        tracing::debug!(url = %server.url, elapsed = ?begun.elapsed(), "389-ds instance ready");
        Ok(server)
    }

    /// `ldap://127.0.0.1:PORT`; the same across restarts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The naming context.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// The root DN, `cn=Directory Manager`.
    pub fn root_dn(&self) -> &str {
        ROOT_DN
    }

    /// The root DN's password.
    pub fn root_password(&self) -> &str {
        &self.root_password
    }

    /// The instance root (config under `etc/`, data and logs under `var/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's errors log (`ns-slapd.log` in [`DirSrv::dir`] holds its stderr).
    pub fn errors_log(&self) -> &Path {
        &self.errors_log
    }

    /// Stop ns-slapd (SIGTERM, SIGKILL after about five seconds), keeping the data.
    /// Stopping a stopped server does nothing.
    ///
    /// # Errors
    ///
    /// [`TestkitError::Io`] when the process cannot be signalled or reaped.
    pub async fn stop(&mut self) -> Result<(), TestkitError> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, "ns-slapd").await?;
        }
        Ok(())
    }

    /// Start ns-slapd again on the same port and data; a running one is stopped first.
    ///
    /// # Errors
    ///
    /// As for [`DirSrv::start`]; [`TestkitError::PortsInUse`] when the port has
    /// been taken meanwhile.
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop().await?;
        match self.spawn_on(self.port).await? {
            Spawned::Ready => Ok(()),
            Spawned::PortInUse(log_tail) => Err(TestkitError::PortsInUse {
                what: format!("ns-slapd in {}", self.dir.display()),
                ports: vec![self.port],
                log: self.dir.join(LOG_FILE),
                log_tail,
            }),
        }
    }

    /// A connection bound as `cn=Directory Manager`, for tests to change entries.
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
        ldap.simple_bind(ROOT_DN, &self.root_password)
            .await
            .and_then(ldap3::LdapResult::success)
            .map_err(ldap_err(format!("simple bind as {ROOT_DN}")))?;
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
                    tracing::debug!(port, "ns-slapd port taken; trying another");
                    last_tail = tail;
                }
            }
        }
        Err(TestkitError::PortsInUse {
            what: format!("ns-slapd in {}", self.dir.display()),
            ports: tried,
            log: self.dir.join(LOG_FILE),
            log_tail: last_tail,
        })
    }

    /// Set the port in `dse.ldif`, start ns-slapd and wait until it answers a root DSE read.
    async fn spawn_on(&mut self, port: u16) -> Result<Spawned, TestkitError> {
        let binary = require_binary(NS_SLAPD)?;
        let config_dir = self.dir.join(CONFIG_DIR);
        let dse = config_dir.join("dse.ldif");
        let text = read(&dse).await?;
        let text = set_attributes(
            &unfold(&text),
            "cn=config",
            &[("nsslapd-port", &port.to_string())],
        )
        .ok_or_else(|| no_entry(&dse, "cn=config"))?;
        write(&dse, &text).await?;

        let url = format!("ldap://127.0.0.1:{port}");
        let pid_file = self.dir.join(PID_FILE);
        let log = self.dir.join(LOG_FILE);
        let log_from = log_len(&log);
        let (stdout, stderr) = log_stdio(&log)?;
        // With NOTIFY_SOCKET set ns-slapd does not daemonise (see the module doc).
        let child = Command::new(&binary)
            .arg("-D")
            .arg(&config_dir)
            .arg("-i")
            .arg(&pid_file)
            .env("NOTIFY_SOCKET", self.dir.join(NOTIFY_SOCKET))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                TestkitError::io(
                    format!("start {} -D {}", binary.display(), config_dir.display()),
                    e,
                )
            })?;
        let child = self.child.insert(child);
        let pid = child.id().unwrap_or_default();
        let what = format!("ns-slapd (pid {pid}) on {url} in {}", self.dir.display());

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| TestkitError::io(format!("check on {what}"), e))?
            {
                self.child = None;
                let tail = log_tail(&log, log_from);
                if tail.contains("address is in use") || tail.contains("Address already in use") {
                    return Ok(Spawned::PortInUse(tail));
                }
                return Err(TestkitError::ServerExited {
                    what,
                    status,
                    log,
                    log_tail: tail,
                });
            }
            // ns-slapd writes its pid file right after opening its listeners,
            // so a root DSE answer with our pid in place is our server's.
            let last = if pid_file_names(&pid_file, pid).await {
                match root_dse(&url).await {
                    Ok(()) => {
                        self.port = port;
                        self.url = url;
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

impl Drop for DirSrv {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Best effort: the process may already be gone.
            let _ = child.start_kill();
        }
    }
}

enum Spawned {
    Ready,
    /// The port was taken; carries ns-slapd's log tail.
    PortInUse(String),
}

/// The UUID a 389-ds Sync State control carries for an entry, from its
/// `nsUniqueId`: the same 128 bits, hyphenated as a UUID
/// (`b424d3a9-e63a11f1-8c2886d8-64e88067` → `b424d3a9-e63a-11f1-8c28-86d864e88067`),
/// lower case. `None` when `ns_unique_id` is not 32 hex digits in four groups.
pub fn sync_uuid_from_nsuniqueid(ns_unique_id: &str) -> Option<String> {
    let groups: Vec<&str> = ns_unique_id.split('-').collect();
    if groups.len() != 4 || groups.iter().any(|g| g.len() != 8) {
        return None;
    }
    let hex: String = groups.concat().to_ascii_lowercase();
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8)?,
        hex.get(8..12)?,
        hex.get(12..16)?,
        hex.get(16..20)?,
        hex.get(20..32)?
    ))
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

/// The template for `suffix`: built with dscreate once, then reused by every
/// process of this user until `defaults.inf` or [`RECIPE`] changes.
async fn template(suffix: &str) -> Result<PathBuf, TestkitError> {
    let _serialised = TEMPLATE_LOCK.lock().await;
    let defaults = read(Path::new(DEFAULTS_INF)).await?;
    let user = output_of(Path::new(ID), &["-un"]).await?;
    let group = output_of(Path::new(ID), &["-gn"]).await?;
    let key = fnv1a(&[
        RECIPE.as_bytes(),
        defaults.as_bytes(),
        suffix.as_bytes(),
        user.as_bytes(),
        group.as_bytes(),
    ]);
    let name = format!("idsync-dirsrv-template-{key:016x}");
    let dir = std::env::temp_dir().join(&name);
    if is_template(&dir) {
        return Ok(dir);
    }
    if dir.exists() {
        tracing::debug!(dir = %dir.display(), "removing an unfinished 389-ds template");
        tokio::fs::remove_dir_all(&dir).await.map_err(|e| {
            TestkitError::io(format!("remove broken template {}", dir.display()), e)
        })?;
    }
    let partial = tempfile::Builder::new()
        .prefix(&format!("{name}.partial-"))
        .tempdir()
        .map_err(|e| TestkitError::io("create temporary directory for the 389-ds template", e))?;
    let begun = Instant::now();
    build_template(partial.path(), &defaults, suffix, &user, &group).await?;
    match tokio::fs::rename(partial.path(), &dir).await {
        Ok(()) => {}
        // Another process finished first: use its template, drop ours.
        Err(_) if is_template(&dir) => {}
        Err(e) => {
            return Err(TestkitError::io(
                format!("rename {} to {}", partial.path().display(), dir.display()),
                e,
            ));
        }
    }
    tracing::info!(dir = %dir.display(), elapsed = ?begun.elapsed(), "built 389-ds template with dscreate");
    Ok(dir)
}

fn is_template(dir: &Path) -> bool {
    dir.join(BUILT_AT).is_file() && dir.join(CONFIG_DIR).join("dse.ldif").is_file()
}

/// Run `dscreate from-file` with every path under `root` (see the module doc).
async fn build_template(
    root: &Path,
    defaults: &str,
    suffix: &str,
    user: &str,
    group: &str,
) -> Result<(), TestkitError> {
    let inf_dir = root.join("share/dirsrv/inf");
    tokio::fs::create_dir_all(&inf_dir)
        .await
        .map_err(|e| TestkitError::io(format!("create {}", inf_dir.display()), e))?;
    write(
        &inf_dir.join("defaults.inf"),
        &relocated_defaults(defaults, root, user, group),
    )
    .await?;
    let setup = root.join("setup.inf");
    write(
        &setup,
        &format!(
            "[general]\nfull_machine_name = localhost\nstrict_host_checking = False\n\
             start = False\nselinux = False\nsystemd = False\n\n\
             [slapd]\ninstance_name = {INSTANCE}\nport = {port}\nsecure_port = {secure}\n\
             self_sign_cert = False\nroot_password = {TEMPLATE_PASSWORD}\nuser = {user}\ngroup = {group}\n\n\
             [backend-{BACKEND}]\nsuffix = {suffix}\ncreate_suffix_entry = False\nsample_entries = no\n",
            port = free_port()?,
            secure = free_port()?,
        ),
    )
    .await?;
    let mut prefix = OsString::from("PREFIX=");
    prefix.push(root);
    run_tool(
        Path::new(ENV),
        &[
            &prefix,
            OsStr::new(DSCREATE),
            OsStr::new("from-file"),
            setup.as_os_str(),
        ],
    )
    .await?;
    if !root.join(CONFIG_DIR).join("dse.ldif").is_file() {
        return Err(TestkitError::BadServerOutput {
            path: root.join(CONFIG_DIR),
            reason: "dscreate succeeded but left no dse.ldif there".to_owned(),
        });
    }
    // Instances copy only the config: drop dscreate's database (about
    // 100 MB of bdb region and log files), logs and pid file.
    let var = root.join("var");
    tokio::task::spawn_blocking(move || remove_files(&var))
        .await
        .map_err(|e| TestkitError::io("prune the 389-ds template", std::io::Error::other(e)))??;
    write(&root.join(BUILT_AT), &root.display().to_string()).await
}

/// Remove every file below `dir`, keeping the directories.
fn remove_files(dir: &Path) -> Result<(), TestkitError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| TestkitError::io(format!("read directory {}", dir.display()), e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| TestkitError::io(format!("read directory {}", dir.display()), e))?
            .path();
        if path.is_dir() {
            remove_files(&path)?;
        } else {
            std::fs::remove_file(&path)
                .map_err(|e| TestkitError::io(format!("remove {}", path.display()), e))?;
        }
    }
    Ok(())
}

/// The system `defaults.inf` with every path outside `/usr` (and `/etc`
/// itself, which holds the schema templates) moved under `root`.
fn relocated_defaults(defaults: &str, root: &Path, user: &str, group: &str) -> String {
    let root = root.display().to_string();
    let mut out = String::with_capacity(defaults.len() + 2048);
    for line in defaults.lines() {
        let pair = (!line.starts_with([';', '#']))
            .then(|| line.split_once('='))
            .flatten()
            .map(|(k, v)| (k.trim(), v.trim()));
        let replaced = match pair {
            Some(("with_systemd", _)) => "with_systemd = 0".to_owned(),
            Some(("with_selinux", _)) => "with_selinux = no".to_owned(),
            Some(("user", _)) => format!("user = {user}"),
            Some(("group", _)) => format!("group = {group}"),
            Some((key, value))
                if value.starts_with('/')
                    && value != "/usr"
                    && !value.starts_with("/usr/")
                    && key != "sysconf_dir" =>
            {
                format!("{key} = {root}{value}")
            }
            _ => line.to_owned(),
        };
        out.push_str(&replaced);
        out.push('\n');
    }
    out
}

/// Copy the template's config into `dir`, recreate its empty directories,
/// and write this instance's `dse.ldif`. Returns the errors log path.
async fn instantiate(
    template: &Path,
    dir: &Path,
    opts: &DirSrvOptions,
) -> Result<PathBuf, TestkitError> {
    let (from, to) = (template.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || copy_skeleton(&from, &to, Path::new("")))
        .await
        .map_err(|e| TestkitError::io("copy the 389-ds template", std::io::Error::other(e)))??;

    let built_at = read(&template.join(BUILT_AT)).await?;
    let dse = dir.join(CONFIG_DIR).join("dse.ldif");
    let text = unfold(&read(&dse).await?).replace(built_at.trim(), &dir.display().to_string());
    let edits: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "cn=config",
            vec![
                ("nsslapd-listenhost", "127.0.0.1"),
                ("nsslapd-ldapilisten", "off"),
                ("nsslapd-rootpwstoragescheme", "CLEAR"),
                ("nsslapd-rootpw", &opts.root_password),
            ],
        ),
        (
            "cn=Retro Changelog Plugin,cn=plugins,cn=config",
            vec![
                ("nsslapd-pluginEnabled", "on"),
                ("nsslapd-attribute", "nsuniqueid:targetUniqueId"),
            ],
        ),
        (
            "cn=Content Synchronization,cn=plugins,cn=config",
            vec![("nsslapd-pluginEnabled", "on")],
        ),
        (
            "cn=bdb,cn=config,cn=ldbm database,cn=plugins,cn=config",
            vec![
                ("nsslapd-db-durable-transaction", "off"),
                ("nsslapd-cache-autosize", "0"),
                ("nsslapd-dbcachesize", "8388608"),
                ("nsslapd-import-cache-autosize", "0"),
                ("nsslapd-import-cachesize", "16777216"),
            ],
        ),
    ];
    let mut text = text;
    for (dn, attrs) in &edits {
        text = set_attributes(&text, dn, attrs).ok_or_else(|| no_entry(&dse, dn))?;
    }
    // Without the template's uniqueid generator entry each instance makes a
    // new state (random node id), as on a first start, so two instances never
    // hand out the same nsUniqueIds. (An entry without nsState is fatal.)
    let generator = "cn=uniqueid generator,cn=config";
    text = remove_entry(&text, generator).ok_or_else(|| no_entry(&dse, generator))?;
    write(&dse, &text).await?;
    let errors_log = attribute(&text, "cn=config", "nsslapd-errorlog")
        .map(PathBuf::from)
        .ok_or_else(|| TestkitError::BadServerOutput {
            path: dse.clone(),
            reason: "cn=config has no nsslapd-errorlog".to_owned(),
        })?;
    Ok(errors_log)
}

/// Recreate every directory of `template` under `dir` and copy the files of
/// the config directory (not the template's data, logs or backups of `dse.ldif`).
fn copy_skeleton(template: &Path, dir: &Path, rel: &Path) -> Result<(), TestkitError> {
    let from = template.join(rel);
    let entries = std::fs::read_dir(&from)
        .map_err(|e| TestkitError::io(format!("read directory {}", from.display()), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| TestkitError::io(format!("read directory {}", from.display()), e))?;
        let rel = rel.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(|e| TestkitError::io(format!("stat {}", entry.path().display()), e))?;
        let target = dir.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&target)
                .map_err(|e| TestkitError::io(format!("create {}", target.display()), e))?;
            copy_skeleton(template, dir, &rel)?;
        } else if kind.is_file()
            && rel.starts_with(CONFIG_DIR)
            && !entry.file_name().to_string_lossy().starts_with("dse.ldif.")
        {
            std::fs::copy(entry.path(), &target).map_err(|e| {
                TestkitError::io(
                    format!("copy {} to {}", entry.path().display(), target.display()),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

/// Load `ldif` into the stopped instance with `ns-slapd ldif2db`.
async fn seed(
    ns_slapd: &Path,
    dir: &Path,
    errors_log: &Path,
    ldif: &str,
) -> Result<(), TestkitError> {
    let file = dir.join(SEED_FILE);
    write(&file, ldif).await?;
    let config_dir = dir.join(CONFIG_DIR);
    let args = [
        OsStr::new("ldif2db"),
        OsStr::new("-D"),
        config_dir.as_os_str(),
        OsStr::new("-n"),
        OsStr::new(BACKEND),
        OsStr::new("-i"),
        file.as_os_str(),
        OsStr::new("-q"),
    ];
    let command = std::iter::once(ns_slapd.as_os_str())
        .chain(args)
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let from = log_len(errors_log);
    let output = Command::new(ns_slapd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| TestkitError::io(format!("run `{command}`"), e))?;
    // ldif2db reports only in the errors log: skipped entries exit 8,
    // lines it cannot parse are merely dropped with a warning.
    let log = log_since(errors_log, from).await;
    if output.status.success() && !log.contains("ignoring invalid line") {
        return Ok(());
    }
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" - ERR - ") || l.contains(" - WARN - "))
        .collect();
    Err(TestkitError::CommandFailed {
        command,
        status: output.status,
        output_tail: if problems.is_empty() {
            log_tail(errors_log, from)
        } else {
            problems.join("\n")
        },
    })
}

/// Everything appended to `path` after byte offset `from` (empty if unreadable).
async fn log_since(path: &Path, from: u64) -> String {
    let bytes = tokio::fs::read(path).await.unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(bytes.get(start..).unwrap_or_default()).into_owned()
}

/// Stdout of a short command, trimmed.
async fn output_of(program: &Path, args: &[&str]) -> Result<String, TestkitError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| TestkitError::io(format!("run `{command}`"), e))?;
    if !output.status.success() {
        return Err(TestkitError::CommandFailed {
            command,
            status: output.status,
            output_tail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

async fn read(path: &Path) -> Result<String, TestkitError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|e| TestkitError::io(format!("read {}", path.display()), e))
}

async fn write(path: &Path, text: &str) -> Result<(), TestkitError> {
    tokio::fs::write(path, text)
        .await
        .map_err(|e| TestkitError::io(format!("write {}", path.display()), e))
}

fn no_entry(path: &Path, dn: &str) -> TestkitError {
    TestkitError::BadServerOutput {
        path: path.to_path_buf(),
        reason: format!("no entry `dn: {dn}`"),
    }
}

/// 64-bit FNV-1a over `parts` (each followed by a separator): a cache key
/// that is stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(std::iter::once(&0xff)) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

/// LDIF with continuation lines joined (ns-slapd reads either form).
fn unfold(ldif: &str) -> String {
    ldif.replace("\r\n", "\n").replace("\n ", "")
}

/// The entries of unfolded LDIF, each with its lines (leading blank lines dropped).
fn entries(ldif: &str) -> impl Iterator<Item = &str> {
    ldif.split("\n\n")
        .map(|block| block.trim_start_matches('\n'))
        .filter(|block| !block.is_empty())
}

fn entry_dn(entry: &str) -> Option<&str> {
    entry.lines().next()?.strip_prefix("dn: ").map(str::trim)
}

fn attribute_name(line: &str) -> &str {
    line.split(':').next().unwrap_or_default()
}

/// `ldif` (unfolded) with every value of each attribute named in `attrs`
/// replaced by the values given there, in entry `dn`; `None` when there is no
/// such entry.
fn set_attributes(ldif: &str, dn: &str, attrs: &[(&str, &str)]) -> Option<String> {
    let mut out = String::with_capacity(ldif.len() + 512);
    let mut found = false;
    for entry in entries(ldif) {
        if !found && entry_dn(entry).is_some_and(|d| d.eq_ignore_ascii_case(dn)) {
            found = true;
            for line in entry.lines().filter(|line| {
                !attrs
                    .iter()
                    .any(|(name, _)| attribute_name(line).eq_ignore_ascii_case(name))
            }) {
                out.push_str(line);
                out.push('\n');
            }
            for (name, value) in attrs {
                out.push_str(&ldif::line(name, value));
            }
        } else {
            out.push_str(entry.trim_end_matches('\n'));
            out.push('\n');
        }
        out.push('\n');
    }
    found.then_some(out)
}

/// `ldif` (unfolded) without entry `dn`; `None` when there is no such entry.
fn remove_entry(ldif: &str, dn: &str) -> Option<String> {
    let mut out = String::with_capacity(ldif.len());
    let mut found = false;
    for entry in entries(ldif) {
        if !found && entry_dn(entry).is_some_and(|d| d.eq_ignore_ascii_case(dn)) {
            found = true;
        } else {
            out.push_str(entry.trim_end_matches('\n'));
            out.push_str("\n\n");
        }
    }
    found.then_some(out)
}

/// The first value of attribute `name` in entry `dn` of unfolded LDIF (plain values only).
fn attribute(ldif: &str, dn: &str, name: &str) -> Option<String> {
    let entry = entries(ldif).find(|e| entry_dn(e).is_some_and(|d| d.eq_ignore_ascii_case(dn)))?;
    entry.lines().find_map(|line| {
        let (attr, value) = line.split_once(": ")?;
        attr.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use ldap3::{Mod, SearchEntry};
    use std::collections::HashSet;

    const SUFFIX: &str = "dc=example,dc=com";

    #[test]
    fn nsuniqueid_maps_to_the_sync_uuid() {
        assert_eq!(
            sync_uuid_from_nsuniqueid("B424D3A9-e63a11f1-8c2886d8-64e88067").as_deref(),
            Some("b424d3a9-e63a-11f1-8c28-86d864e88067")
        );
        assert_eq!(
            sync_uuid_from_nsuniqueid("b424d3a9-e63a-11f1-8c28-86d864e88067"),
            None
        );
        assert_eq!(
            sync_uuid_from_nsuniqueid("g424d3a9-e63a11f1-8c2886d8-64e88067"),
            None
        );
    }

    #[test]
    fn defaults_are_relocated_except_usr_and_etc() {
        let defaults = "; comment = /var/x\n[slapd]\nprefix = /usr\nsysconf_dir = /etc\n\
                        config_dir = /etc/dirsrv/slapd-{instance_name}\nrun_dir = /run/dirsrv\n\
                        plugin_dir = /usr/lib/dirsrv/plugins\nwith_systemd = 1\nwith_selinux = \n\
                        user = dirsrv\ngroup = dirsrv\nroot_dn = cn=Directory Manager\n";
        let out = relocated_defaults(defaults, Path::new("/t/r"), "me", "us");
        assert_eq!(
            out,
            "; comment = /var/x\n[slapd]\nprefix = /usr\nsysconf_dir = /etc\n\
             config_dir = /t/r/etc/dirsrv/slapd-{instance_name}\nrun_dir = /t/r/run/dirsrv\n\
             plugin_dir = /usr/lib/dirsrv/plugins\nwith_systemd = 0\nwith_selinux = no\n\
             user = me\ngroup = us\nroot_dn = cn=Directory Manager\n"
        );
    }

    #[test]
    fn ldif_entries_are_edited_in_place() {
        let ldif = unfold(
            "dn: cn=config\ncn: config\nnsslapd-port: 389\nnsslapd-errorlog: /var/log/dirsrv/sl\n apd-x/errors\n\n\
             dn: cn=Other,cn=config\ncn: Other\nnsslapd-pluginEnabled: off\n\n",
        );
        assert_eq!(
            attribute(&ldif, "CN=config", "nsslapd-errorlog").as_deref(),
            Some("/var/log/dirsrv/slapd-x/errors")
        );
        let edited = set_attributes(
            &ldif,
            "cn=other,cn=config",
            &[("nsslapd-pluginenabled", "on"), ("a", " x"), ("a", "y")],
        )
        .unwrap();
        assert_eq!(
            edited,
            "dn: cn=config\ncn: config\nnsslapd-port: 389\nnsslapd-errorlog: /var/log/dirsrv/slapd-x/errors\n\n\
             dn: cn=Other,cn=config\ncn: Other\nnsslapd-pluginenabled: on\na:: IHg=\na: y\n\n"
        );
        assert_eq!(set_attributes(&ldif, "cn=missing", &[("a", "b")]), None);
        assert_eq!(
            remove_entry(&edited, "CN=config").unwrap(),
            "dn: cn=Other,cn=config\ncn: Other\nnsslapd-pluginenabled: on\na:: IHg=\na: y\n\n"
        );
        assert_eq!(remove_entry(&ldif, "cn=missing"), None);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    fn seed() -> String {
        format!(
            "dn: {SUFFIX}\nobjectClass: top\nobjectClass: domain\ndc: example\n\n\
             dn: uid=jack,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: jack\ncn: Jack Sparrow\nsn: Sparrow\n"
        )
    }

    fn options(seed_ldif: String) -> DirSrvOptions {
        DirSrvOptions {
            suffix: SUFFIX.to_owned(),
            root_password: "s3cret: with spaces ".to_owned(),
            seed_ldif,
        }
    }

    async fn people(server: &DirSrv) -> Vec<(String, String)> {
        let mut ldap = server.admin_conn().await.unwrap();
        let (entries, _) = ldap
            .search(
                server.suffix(),
                Scope::Subtree,
                "(objectClass=inetOrgPerson)",
                vec!["uid", "nsUniqueId"],
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
                (e.attrs["uid"][0].clone(), e.attrs["nsUniqueId"][0].clone())
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn starts_seeded_keeps_data_across_restart_and_cleans_up() {
        let mut server = DirSrv::start(options(seed())).await.unwrap();
        assert!(server.url().starts_with("ldap://127.0.0.1:"), "{server:?}");
        assert_eq!(server.root_dn(), "cn=Directory Manager");
        let before = people(&server).await;
        assert_eq!(before.len(), 1);
        assert!(
            sync_uuid_from_nsuniqueid(&before[0].1).is_some(),
            "{before:?}"
        );

        let mut ldap = server.admin_conn().await.unwrap();
        ldap.modify(
            &format!("uid=jack,{SUFFIX}"),
            vec![Mod::Replace("givenName", HashSet::from(["Captain"]))],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
        ldap.unbind().await.unwrap();

        let url = server.url().to_owned();
        server.stop().await.unwrap();
        server.stop().await.unwrap();
        server.restart().await.unwrap();
        assert_eq!(server.url(), url);
        assert_eq!(people(&server).await, before);

        // The plugins are on.
        let mut ldap = server.admin_conn().await.unwrap();
        let (entries, _) = ldap
            .search("", Scope::Base, "(objectClass=*)", vec!["namingContexts"])
            .await
            .unwrap()
            .success()
            .unwrap();
        let contexts = &SearchEntry::construct(entries[0].clone()).attrs["namingContexts"];
        assert!(contexts.iter().any(|c| c == "cn=changelog"), "{contexts:?}");
        ldap.unbind().await.unwrap();

        let dir = server.dir().to_path_buf();
        drop(server);
        crate::eventually("temp dir removed", Duration::from_secs(5), || async {
            Ok((!dir.exists()).then_some(()))
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn bad_seed_names_ldif2db_and_the_skipped_entry() {
        let bad = format!(
            "{}\ndn: uid=x,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: x\ncn: x\n",
            seed()
        );
        let err = DirSrv::start(options(bad)).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TestkitError::CommandFailed { .. }), "{text}");
        assert!(text.contains("ldif2db"), "{text}");
        assert!(text.contains("missing attribute \"sn\""), "{text}");
    }

    #[tokio::test]
    async fn instances_from_one_template_have_their_own_unique_ids() {
        let (a, b) = tokio::join!(
            DirSrv::start(options(seed())),
            DirSrv::start(options(seed()))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.dir(), b.dir());
        assert_ne!(a.url(), b.url());
        let (a_people, b_people) = (people(&a).await, people(&b).await);
        assert_ne!(a_people[0].1, b_people[0].1, "jack's nsUniqueId");
    }

    #[tokio::test]
    async fn empty_seed_starts_an_empty_backend() {
        let server = DirSrv::start(options(String::new())).await.unwrap();
        let mut ldap = server.admin_conn().await.unwrap();
        let result = ldap
            .search(SUFFIX, Scope::Base, "(objectClass=*)", vec!["dn"])
            .await
            .unwrap();
        assert_eq!(result.1.rc, 32, "no suffix entry yet: {:?}", result.1);
        ldap.unbind().await.unwrap();
    }
}
