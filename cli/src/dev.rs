//! A whole idsync deployment on one machine: NATS JetStream, a source and a
//! target OpenLDAP, the IDM and the four services, wired by the example
//! configuration. State lives in one directory and survives a restart
//! (except the IDM's PostgreSQL store: its throwaway cluster lives as long as
//! the deployment).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use idsync_core::config::{Config, StoreKind};
use idsync_testkit::dirsrv::{DirSrv, DirSrvOptions};
use idsync_testkit::{NatsServer, Postgres, Slapd, SlapdOptions, free_port};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Chooses the IDM's store when [`Options::store`] does not: `embedded`
/// (the default) or `postgres`. Lets a whole test suite run on either.
pub const STORE_ENV: &str = "IDSYNC_DEV_STORE";

/// The example configuration the deployment runs.
pub const EXAMPLE_CONFIG: &str = include_str!("../../deploy/local/idsync.toml");

pub const SOURCE_SUFFIX: &str = "dc=example,dc=com";
pub const PEOPLE: &str = "ou=people,dc=example,dc=com";
pub const GROUPS: &str = "ou=groups,dc=example,dc=com";
pub const TARGET_SUFFIX: &str = "o=Acme";

/// The source directory's first content: the example's jack.
pub fn source_seed() -> String {
    format!(
        "dn: {SOURCE_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
         dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: uid=jack,{PEOPLE}\nobjectClass: inetOrgPerson\nuid: jack\ncn: Jack Sparrow\n\
         givenName: Jack\nsn: Sparrow\n\n\
         dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n\n\
         dn: cn=crew,{GROUPS}\nobjectClass: groupOfNames\ncn: crew\ndescription: The Black Pearl's crew\n\
         member: uid=jack,{PEOPLE}\n"
    )
}

fn target_seed() -> String {
    format!("dn: {TARGET_SUFFIX}\nobjectClass: organization\no: Acme\n")
}

/// How the deployment's servers are set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The source's syncprov keeps a session log, so a resumed refresh names
    /// deletions (syncIdSet); without one it uses the present phase.
    pub source_session_log: SessionLog,
    /// Also start a 389 Directory Server (content sync and retro changelog
    /// on) with this seed; resources named `ds` or `ds-…` are on it.
    pub dirsrv_seed: Option<String>,
    /// nats-server's `max_payload` (default the testkit's, 8 MB).
    pub nats_max_payload: Option<String>,
    /// The IDM's store; unset, [`STORE_ENV`] decides (default embedded).
    /// `postgres` starts a throwaway PostgreSQL cluster for the deployment.
    pub store: Option<StoreKind>,
    /// More entries (LDIF) for a new source directory, loaded offline with
    /// its seed: a large import without thousands of LDAP adds.
    pub source_seed_extra: Option<String>,
    /// Start no service in this process once the IDM has set up the
    /// agreements: the caller runs them (`idsync serve <service>`), for
    /// example to kill them for real.
    pub services_elsewhere: bool,
}

/// The store [`Options::store`] or [`STORE_ENV`] asks for.
///
/// # Errors
/// [`STORE_ENV`] holds something else than `embedded` or `postgres`.
pub fn store_choice(options: &Options) -> Result<StoreKind> {
    if let Some(s) = options.store {
        return Ok(s);
    }
    match std::env::var(STORE_ENV).as_deref() {
        Err(_) | Ok("") | Ok("embedded") => Ok(StoreKind::Embedded),
        Ok("postgres") => Ok(StoreKind::Postgres),
        Ok(other) => anyhow::bail!("{STORE_ENV}={other:?}: use embedded or postgres"),
    }
}

/// Whether the source's syncprov keeps a session log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLog(pub bool);

impl Default for SessionLog {
    fn default() -> Self {
        Self(true)
    }
}

/// The services, in start order.
pub const SERVICES: [&str; 5] = ["idm", "detector", "correlator", "applier", "provisioner"];

#[derive(Debug)]
struct Running {
    name: &'static str,
    stop: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

/// A running local deployment.
#[derive(Debug)]
pub struct Deployment {
    pub dir: PathBuf,
    pub nats: NatsServer,
    pub source: Slapd,
    pub target: Slapd,
    /// The 389 Directory Server, when [`Options::dirsrv_seed`] asked for one.
    pub dirsrv: Option<DirSrv>,
    /// The IDM's PostgreSQL cluster, with `store = "postgres"`.
    pub postgres: Option<Postgres>,
    pub config: Arc<Config>,
    running: Vec<Running>,
}

impl Deployment {
    /// Starts everything with its state in `dir` (created, or reused as left).
    ///
    /// # Errors
    /// A server does not start, or the directory cannot be written.
    pub async fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, EXAMPLE_CONFIG).await
    }

    /// As [`Deployment::start`], running `config_text` (TOML) instead of the
    /// example; its URLs, passwords and IDM address are replaced by the
    /// deployment's own: resources named `hr` or `hr-…` (account types of the
    /// source) are on the source directory, all others on the target.
    ///
    /// # Errors
    /// As [`Deployment::start`], and an invalid configuration.
    pub async fn start_with(dir: &Path, config_text: &str) -> Result<Self> {
        Self::start_with_options(dir, config_text, Options::default()).await
    }

    /// As [`Deployment::start_with`], with the servers set up as `options` say.
    ///
    /// # Errors
    /// As [`Deployment::start_with`].
    pub async fn start_with_options(
        dir: &Path,
        config_text: &str,
        options: Options,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        let secrets = dir.join("secrets");
        let hr_password = secret(&secrets.join("hr"))?;
        let acme_password = secret(&secrets.join("acme"))?;

        let nats = NatsServer::start_in_with(
            &dir.join("nats"),
            options
                .nats_max_payload
                .as_deref()
                .unwrap_or(idsync_testkit::NATS_MAX_PAYLOAD),
        )
        .await?;
        let source = Slapd::open_or_create(
            &dir.join("source"),
            SlapdOptions {
                suffix: SOURCE_SUFFIX.into(),
                admin_password: hr_password,
                seed_ldif: match &options.source_seed_extra {
                    Some(extra) => format!("{}\n{extra}", source_seed()),
                    None => source_seed(),
                },
                session_log: options.source_session_log.0,
            },
        )
        .await?;
        let target = Slapd::open_or_create(
            &dir.join("target"),
            SlapdOptions {
                suffix: TARGET_SUFFIX.into(),
                admin_password: acme_password,
                seed_ldif: target_seed(),
                session_log: false,
            },
        )
        .await?;

        let dirsrv = match &options.dirsrv_seed {
            Some(seed) => Some(
                DirSrv::start(DirSrvOptions {
                    suffix: SOURCE_SUFFIX.into(),
                    root_password: secret(&secrets.join("ds"))?,
                    seed_ldif: seed.clone(),
                })
                .await?,
            ),
            None => None,
        };

        let postgres = match store_choice(&options)? {
            StoreKind::Embedded => None,
            StoreKind::Postgres => Some(
                tokio::task::spawn_blocking(Postgres::start)
                    .await
                    .context("starting PostgreSQL")??,
            ),
        };

        // Declare the streams once, before five services look for them at once.
        idsync_bus::Bus::connect(nats.url()).await?;

        let mut config = idsync_runtime::parse_config(config_text, "deploy/local/idsync.toml")?;
        config.nats.url = nats.url().to_owned();
        assign_idm_ports(&mut config)?;
        config.idm.data_dir = dir.join("idm").display().to_string();
        if let Some(pg) = &postgres {
            let db = pg.create_database()?;
            // The password is among the secrets the log checks search for;
            // the URL's other parts (user, host, port, database) are not
            // secret and are named in logs and errors.
            write_secret(&secrets.join("postgres"), pg.password())?;
            let url_file = dir.join("postgres_url");
            write_secret(&url_file, &db)?;
            config.idm.store = StoreKind::Postgres;
            config.idm.postgres_url_env = None;
            config.idm.postgres_url_file = Some(url_file.display().to_string());
        }
        secret(&secrets.join("admin"))?;
        config.idm.admin_token_env = None;
        config.idm.admin_token_file = Some(secrets.join("admin").display().to_string());
        for (name, a) in &mut config.agreements {
            a.token_env = None;
            a.token_file = Some(secrets.join(format!("{name}.token")).display().to_string());
        }
        for r in &mut config.resources {
            // Resources named hr… (account types of the source) are on the
            // source directory; the others on the target.
            let on_source = r.name == "hr" || r.name.starts_with("hr-");
            let on_ds = r.name == "ds" || r.name.starts_with("ds-");
            let (url, secret_name) = match (&dirsrv, on_ds, on_source) {
                (Some(ds), true, _) => (ds.url(), "ds"),
                (_, _, true) => (source.url(), "hr"),
                _ => (target.url(), "acme"),
            };
            r.url = url.to_owned();
            r.bind_password_env = None;
            r.bind_password_file = Some(secrets.join(secret_name).display().to_string());
        }
        let text = toml_string(&config)?;
        std::fs::write(dir.join("idsync.toml"), text)?;

        let mut deployment = Self {
            dir,
            nats,
            source,
            target,
            dirsrv,
            postgres,
            config: Arc::new(config),
            running: Vec::new(),
        };
        // Ports picked free can be taken before the IDM binds them (other
        // tests, other programs): then pick again.
        let mut attempts = 0;
        loop {
            deployment.start_service("idm")?;
            match deployment.bootstrap_agreements().await {
                Ok(()) => break,
                Err(e) if attempts < 5 && format!("{e:#}").contains("in use") => {
                    attempts += 1;
                    tracing::warn!(error = %format!("{e:#}"), "the IDM's port was taken; trying others");
                    let mut config = (*deployment.config).clone();
                    assign_idm_ports(&mut config)?;
                    deployment.reconfigure(|c| *c = config)?;
                }
                Err(e) => return Err(e),
            }
        }
        deployment.write_env()?;
        if options.services_elsewhere {
            deployment.stop_service("idm").await?;
            return Ok(deployment);
        }
        for name in SERVICES.into_iter().skip(1) {
            deployment.start_service(name)?;
        }
        Ok(deployment)
    }

    /// Changes the configuration that services started from now on run (and
    /// the file the CLI reads), as an operator edits it before a restart.
    ///
    /// # Errors
    /// The changed configuration is invalid or cannot be written.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut Config)) -> Result<()> {
        let mut config = (*self.config).clone();
        change(&mut config);
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!("invalid configuration: {problems:?}");
        }
        std::fs::write(self.dir.join("idsync.toml"), toml_string(&config)?)?;
        self.config = Arc::new(config);
        Ok(())
    }

    /// Restarts service `name` with the current configuration.
    ///
    /// # Errors
    /// The service had failed, or an unknown name.
    pub async fn restart_service(&mut self, name: &str) -> Result<()> {
        self.stop_service(name).await?;
        self.start_service(name)
    }

    /// An IDM client with the administrator credential.
    ///
    /// # Errors
    /// The credential cannot be read.
    pub fn admin(&self) -> Result<idsync_idm_client::IdmClient> {
        Ok(idsync_runtime::admin_client(&self.config)?)
    }

    /// Writes `env`: what a shell needs to talk to this deployment.
    fn write_env(&self) -> Result<()> {
        std::fs::write(
            self.dir.join("env"),
            format!(
                "export IDSYNC_CONFIG={}\nexport IDSYNC_ADMIN_TOKEN_FILE={}\n\
                 export IDSYNC_IDM_URL={}\nexport IDSYNC_NATS_URL={}\n\
                 export SOURCE_URL={}\nexport TARGET_URL={}\n",
                self.dir.join("idsync.toml").display(),
                self.dir.join("secrets").join("admin").display(),
                self.config.idm.url,
                self.config.nats.url,
                self.source.url(),
                self.target.url()
            ),
        )?;
        Ok(())
    }

    /// Creates each configured agreement that the IDM does not have yet, with
    /// a token in the file the configuration names (as an operator would with
    /// `idsync sync create` and `idsync sync generate-token`).
    async fn bootstrap_agreements(&mut self) -> Result<()> {
        let idm = self.admin()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let existing = loop {
            match idm.list_agreements().await {
                Ok(list) => break list,
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    let failed = self
                        .running
                        .iter()
                        .any(|r| r.name == "idm" && r.task.is_finished());
                    if failed {
                        // Its error says why (an address in use, a bad store).
                        return Err(self.stop_failed("idm").await);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("the IDM did not answer"),
            }
        };
        for (name, a) in &self.config.agreements {
            let Some(file) = &a.token_file else { continue };
            let known = existing.iter().any(|x| x.name == *name);
            if known && Path::new(file).exists() {
                continue;
            }
            if !known {
                idm.create_agreement(name).await?;
            }
            let label = format!("dev-{}", uuid::Uuid::new_v4().simple());
            let token = idm.generate_token(name, &label).await?;
            write_secret(Path::new(file), token.expose())?;
        }
        Ok(())
    }

    /// Starts one service (in this process) by name.
    ///
    /// # Errors
    /// An unknown name.
    pub fn start_service(&mut self, name: &str) -> Result<()> {
        let name: &'static str = SERVICES
            .into_iter()
            .find(|s| *s == name)
            .with_context(|| format!("no service {name:?}; services are {SERVICES:?}"))?;
        let stop = CancellationToken::new();
        let config = self.config.clone();
        let token = stop.clone();
        let span = tracing::info_span!("service", name);
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let result = match name {
                    "idm" => idsync_idm::run(config, token)
                        .await
                        .map_err(|e| e.to_string()),
                    "detector" => idsync_detector::run(config, token)
                        .await
                        .map_err(|e| e.to_string()),
                    "correlator" => idsync_correlator::run(config, token)
                        .await
                        .map_err(|e| e.to_string()),
                    "applier" => idsync_applier::run(config, token)
                        .await
                        .map_err(|e| e.to_string()),
                    _ => idsync_provisioner::run(config, token)
                        .await
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = &result {
                    tracing::error!(service = name, error = %e, "service stopped on an error");
                }
                result
            },
            span,
        ));
        self.running.push(Running { name, stop, task });
        Ok(())
    }

    /// The error of a service that stopped on its own.
    async fn stop_failed(&mut self, name: &str) -> anyhow::Error {
        match self.stop_service(name).await {
            Err(e) => e,
            Ok(()) => anyhow::anyhow!("{name} stopped without an error"),
        }
    }

    /// Stops one service and waits until it has drained.
    ///
    /// # Errors
    /// The service had failed.
    pub async fn stop_service(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.running.iter().position(|r| r.name == name) else {
            anyhow::bail!("service {name:?} is not running");
        };
        let r = self.running.remove(i);
        stop(r).await
    }

    /// Stops the services (last started first), then the servers.
    ///
    /// # Errors
    /// A service or server did not stop cleanly.
    pub async fn shutdown(mut self) -> Result<()> {
        let mut first_error = Ok(());
        while let Some(r) = self.running.pop() {
            if let Err(e) = stop(r).await {
                first_error = first_error.and(Err(e));
            }
        }
        self.source.stop().await?;
        self.target.stop().await?;
        if let Some(ds) = &mut self.dirsrv {
            ds.stop().await?;
        }
        self.nats.stop().await?;
        if let Some(mut pg) = self.postgres.take() {
            tokio::task::spawn_blocking(move || pg.stop()).await??;
        }
        first_error
    }
}

async fn stop(r: Running) -> Result<()> {
    r.stop.cancel();
    match tokio::time::timeout(Duration::from_secs(15), r.task).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => anyhow::bail!("{} failed: {e}", r.name),
        Ok(Err(e)) => anyhow::bail!("{} panicked: {e}", r.name),
        Err(_) => anyhow::bail!("{} did not stop within 15 s", r.name),
    }
}

/// Free loopback ports for the IDM's gRPC and status listeners.
fn assign_idm_ports(config: &mut Config) -> Result<()> {
    let idm_port = free_port()?;
    config.idm.listen = format!("127.0.0.1:{idm_port}");
    config.idm.url = format!("http://127.0.0.1:{idm_port}");
    if config.idm.http_bind.is_some() {
        config.idm.http_bind = Some(format!("127.0.0.1:{}", free_port()?));
    }
    for a in config.agreements.values_mut() {
        if a.status_bind.is_some() {
            a.status_bind = Some(format!("127.0.0.1:{}", free_port()?));
        }
    }
    Ok(())
}

/// Reads the password in `path`, creating a random one (mode 0600) first.
fn secret(path: &Path) -> Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        return Ok(existing);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let password = uuid::Uuid::new_v4().simple().to_string();
    write_secret(path, &password)?;
    Ok(password)
}

/// Writes `value` to `path`, readable by its owner only.
fn write_secret(path: &Path, value: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, value).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn toml_string(config: &Config) -> Result<String> {
    Ok(format!(
        "# Written by `idsync dev up` from deploy/local/idsync.toml with this run's addresses.\n{}",
        toml_ser(config)?
    ))
}

fn toml_ser(config: &Config) -> Result<String> {
    toml::to_string(config).context("cannot write the configuration as TOML")
}
