//! What every idsync binary does the same way: load and check the
//! configuration, resolve secrets, start tracing, and turn SIGINT/SIGTERM into
//! one cancellation token. Written once so no service copies it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use idsync_core::config::{Config, ResourceConfig};
use idsync_core::secret::Secret;
use tokio_util::sync::CancellationToken;

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "IDSYNC_CONFIG";
/// Overrides `nats.url`.
pub const NATS_URL_ENV: &str = "IDSYNC_NATS_URL";
/// Overrides `idm.url`.
pub const IDM_URL_ENV: &str = "IDSYNC_IDM_URL";
/// Log filter when `RUST_LOG` is unset: the NATS client's connection chatter is left out.
pub const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn";
/// `json` for JSON logs (Kubernetes); anything else for human logs.
pub const LOG_FORMAT_ENV: &str = "IDSYNC_LOG_FORMAT";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration {path}: cannot read: {reason}")]
    Read { path: String, reason: String },
    #[error("configuration {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("configuration {path} is invalid:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<String> },
    #[error("{what}: {reason}")]
    Secret { what: String, reason: String },
    #[error(transparent)]
    Idm(#[from] idsync_idm_client::IdmError),
}

/// Reads, parses and validates the configuration at `path`, then applies the
/// environment overrides.
///
/// # Errors
/// The file cannot be read, does not parse (the message names line and
/// column), or fails validation (every problem is listed with its field path).
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut config = parse_config(&text, &shown)?;
    // Files the configuration names must be readable now, not at the first
    // connection.
    let problems: Vec<String> = config
        .resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let ca = r.tls.as_ref()?.ca_file.as_ref()?;
            std::fs::metadata(ca).err().map(|e| {
                format!(
                    "resources[{i}] ({}).tls.ca_file: cannot read {ca}: {e}",
                    r.name
                )
            })
        })
        .collect();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            path: shown,
            problems,
        });
    }
    if let Ok(url) = std::env::var(NATS_URL_ENV) {
        config.nats.url = url;
    }
    if let Ok(url) = std::env::var(IDM_URL_ENV) {
        config.idm.url = url;
    }
    Ok(config)
}

/// Parses and validates configuration text; `origin` names it in errors.
///
/// # Errors
/// As [`load_config`].
pub fn parse_config(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        reason: e.to_string().trim_end().to_owned(),
    })?;
    let problems: Vec<String> = config
        .validate()
        .iter()
        .map(|e| match e {
            idsync_core::CoreError::Config { path, reason } => match line_of(text, path) {
                Some(line) => format!("line {line}: {path}: {reason}"),
                None => format!("{path}: {reason}"),
            },
            other => other.to_string(),
        })
        .collect();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            path: origin.to_owned(),
            problems,
        });
    }
    Ok(config)
}

/// The line (1-based) where the field at `path` is written, or the nearest
/// enclosing field that is written: `path` as the validation reports it,
/// such as `resources[0] (hr).reactions.unmatched.template`.
fn line_of(text: &str, path: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut table: &DeTable = doc.get_ref();
    let mut found: Option<std::ops::Range<usize>> = None;
    for segment in path.split('.') {
        // "resources[0] (hr)" → key "resources", index 0.
        let segment = segment.split(" (").next().unwrap_or(segment);
        let (key, index) = match segment.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let Some((k, value)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
            break;
        };
        found = Some(k.span());
        let value = match (index, value.get_ref()) {
            (Some(i), DeValue::Array(items)) => match items.get(i) {
                Some(item) => {
                    if !item.span().is_empty() {
                        found = Some(item.span());
                    }
                    item
                }
                None => break,
            },
            _ => value,
        };
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    let start = found?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// The bind password of `resource`, from its file or environment variable.
///
/// # Errors
/// Neither is configured, the file cannot be read, or the variable is unset.
/// The message never contains the password.
pub fn bind_password(resource: &ResourceConfig) -> Result<Secret, ConfigError> {
    read_secret(
        &format!("resource {:?}: bind password", resource.name),
        ("bind_password_file", resource.bind_password_file.as_deref()),
        ("bind_password_env", resource.bind_password_env.as_deref()),
    )
}

/// The administrator credential (`idm.admin_token_file` or `idm.admin_token_env`).
///
/// # Errors
/// As [`bind_password`]; the message never contains the credential.
pub fn admin_token(config: &Config) -> Result<Secret, ConfigError> {
    read_secret(
        "idm: administrator credential",
        ("admin_token_file", config.idm.admin_token_file.as_deref()),
        ("admin_token_env", config.idm.admin_token_env.as_deref()),
    )
}

/// The PostgreSQL URL of the IDM's store (`idm.postgres_url_file` or
/// `idm.postgres_url_env`); it holds the database password.
///
/// # Errors
/// As [`bind_password`]; the message never contains the URL.
pub fn postgres_url(config: &Config) -> Result<Secret, ConfigError> {
    read_secret(
        "idm: PostgreSQL URL",
        ("postgres_url_file", config.idm.postgres_url_file.as_deref()),
        ("postgres_url_env", config.idm.postgres_url_env.as_deref()),
    )
}

/// The sync token of agreement `name` (`token_file` or `token_env`).
///
/// # Errors
/// The agreement is not configured, or as [`bind_password`].
pub fn agreement_token(config: &Config, name: &str) -> Result<Secret, ConfigError> {
    let what = format!("agreement {name:?}: sync token");
    let a = config
        .agreements
        .get(name)
        .ok_or_else(|| ConfigError::Secret {
            what: what.clone(),
            reason: "the agreement is not in [agreements]".into(),
        })?;
    read_secret(
        &what,
        ("token_file", a.token_file.as_deref()),
        ("token_env", a.token_env.as_deref()),
    )
}

/// An IDM client per configured agreement, each presenting that agreement's
/// sync token.
///
/// # Errors
/// A token cannot be read, or the IDM URL is malformed.
pub fn agreement_clients(
    config: &Config,
) -> Result<std::collections::BTreeMap<String, idsync_idm_client::IdmClient>, ConfigError> {
    config
        .agreements
        .keys()
        .map(|name| {
            let token = agreement_token(config, name)?;
            let client = idsync_idm_client::IdmClient::new(&config.idm.url, &token)?;
            Ok((name.clone(), client))
        })
        .collect()
}

/// An IDM client that presents the administrator credential.
///
/// # Errors
/// The credential cannot be read, or the IDM URL is malformed.
pub fn admin_client(config: &Config) -> Result<idsync_idm_client::IdmClient, ConfigError> {
    let credential = admin_token(config)?;
    Ok(idsync_idm_client::IdmClient::new(
        &config.idm.url,
        &credential,
    )?)
}

/// A secret from a file (trailing newline ignored) or an environment variable.
fn read_secret(
    what: &str,
    (file_key, file): (&str, Option<&str>),
    (env_key, env): (&str, Option<&str>),
) -> Result<Secret, ConfigError> {
    let err = |reason: String| ConfigError::Secret {
        what: what.to_owned(),
        reason,
    };
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| err(format!("cannot read {file_key} {file}: {e}")))?;
        return Ok(Secret::new(text.trim_end_matches(['\n', '\r'])));
    }
    if let Some(var) = env {
        return std::env::var(var)
            .map(Secret::new)
            .map_err(|_| err(format!("environment variable {var} ({env_key}) is not set")));
    }
    Err(err(format!("set {file_key} or {env_key}")))
}

/// Starts tracing: JSON when `IDSYNC_LOG_FORMAT=json`, human-readable
/// otherwise; the filter comes from `RUST_LOG` (default `info`).
pub fn init_tracing() {
    init_tracing_as("cli");
}

/// [`init_tracing`] for `service`, with its spans exported over OTLP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`idsync_telemetry::trace`). Call it
/// inside the Tokio runtime. An unusable endpoint is reported on stderr and
/// the service runs without exporting traces.
pub fn init_tracing_as(service: &str) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let traces = match idsync_telemetry::trace::layer(service) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("idsync-{service}: {e}; traces are not exported");
            None
        }
    };
    // A second initialisation (tests, the all-in-one runner) is harmless.
    // Spans of idsync's own handlers are info; libraries' debug spans
    // (h2, tonic) are not worth exporting.
    // (Only with a layer: a filter on none would raise the subscriber's
    // level to info whatever RUST_LOG says.)
    let traces = traces.map(|l| l.with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    let _ = tracing_subscriber::registry()
        .with(traces)
        .with(fmt.with_filter(filter))
        .try_init();
}

/// A token cancelled at the first SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining");
        child.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The configuration path from `--config <path>` or `IDSYNC_CONFIG`.
pub fn config_path_from_args() -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os(CONFIG_ENV).map(PathBuf::from)
}

/// The environment variable with the seconds a stopping service may take to
/// drain (default 20, inside Kubernetes' default 30 s termination grace).
pub const GRACE_ENV: &str = "IDSYNC_SHUTDOWN_GRACE_SECONDS";

fn grace_period() -> Duration {
    let seconds = std::env::var(GRACE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds)
}

/// The whole `main` of a service binary: tracing, configuration, signals,
/// then `run`; a failure becomes one line on stderr and exit code 1 (2 for
/// a configuration problem).
pub async fn service_main<F, Fut, E>(name: &str, run: F) -> ExitCode
where
    F: FnOnce(Arc<Config>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    init_tracing_as(name);
    let Some(path) = config_path_from_args() else {
        eprintln!("idsync-{name}: no configuration: pass --config <file> or set {CONFIG_ENV}");
        return ExitCode::from(2);
    };
    let config = match load_config(&path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("idsync-{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let shutdown = shutdown_on_signal();
    // Probes and metrics live until the service has drained.
    let probes = CancellationToken::new();
    let health = match std::env::var(idsync_telemetry::health::BIND_ENV) {
        Ok(bind) => {
            match idsync_telemetry::health::serve(
                &bind,
                idsync_telemetry::health::BIND_ENV,
                probes.clone(),
            )
            .await
            {
                Ok(task) => Some(task),
                Err(e) => {
                    eprintln!("idsync-{name}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        Err(_) => None,
    };
    let grace = grace_period();
    let draining = shutdown.clone();
    tracing::info!(service = name, config = %path.display(), "starting");
    let span = tracing::info_span!("service", name);
    let work = tracing::Instrument::instrument(run(config, shutdown), span);
    tokio::pin!(work);
    // On SIGTERM the service stops taking work and finishes what it holds;
    // past the grace period it exits anyway (unacknowledged messages are
    // delivered again, to another replica or after the restart).
    let outcome = tokio::select! {
        r = &mut work => Some(r),
        () = async {
            draining.cancelled().await;
            idsync_telemetry::health::set_ready(false);
            tokio::time::sleep(grace).await;
        } => None,
    };
    probes.cancel();
    if let Some(task) = health {
        let _ = task.await;
    }
    // The last spans go to the collector before the process exits (the
    // exporter's batch thread needs the runtime, so wait off it).
    let _ = tokio::task::spawn_blocking(idsync_telemetry::trace::shutdown).await;
    let Some(outcome) = outcome else {
        tracing::error!(
            service = name,
            grace_s = grace.as_secs(),
            "did not stop within the grace period; exiting"
        );
        eprintln!(
            "idsync-{name}: did not stop within the grace period of {} s ({GRACE_ENV}); exiting",
            grace.as_secs()
        );
        return ExitCode::FAILURE;
    };
    match outcome {
        Ok(()) => {
            tracing::info!(service = name, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(service = name, error = %e, "stopped on an error");
            eprintln!("idsync-{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../deploy/local/idsync.toml");

    #[test]
    fn a_missing_sync_token_names_the_agreement_and_the_file_not_the_token() {
        let mut config = parse_config(EXAMPLE, "idsync.toml").unwrap();
        let hr = config.agreements.get_mut("hr").unwrap();
        hr.token_env = None;
        hr.token_file = Some("/nonexistent/hr.token".into());
        let err = agreement_clients(&config).unwrap_err().to_string();
        assert!(
            err.contains("agreement \"hr\": sync token")
                && err.contains("token_file /nonexistent/hr.token"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hr.token");
        std::fs::write(&file, "idsync1.secret-token-value\n").unwrap();
        config.agreements.get_mut("hr").unwrap().token_file = Some(file.display().to_string());
        let token = agreement_token(&config, "hr").unwrap();
        assert_eq!(token.expose(), "idsync1.secret-token-value");
        assert!(!format!("{token:?} {token}").contains("secret-token"));
        let err = agreement_token(&config, "crm").unwrap_err().to_string();
        assert!(
            err.contains("agreement \"crm\"") && err.contains("not in [agreements]"),
            "{err}"
        );
    }

    #[test]
    fn parse_errors_name_the_file_and_line() {
        let text = EXAMPLE.replace("live_sync = true", "live_sync = yes");
        let err = parse_config(&text, "idsync.toml").unwrap_err().to_string();
        assert!(err.starts_with("configuration idsync.toml:"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn validation_problems_are_all_listed() {
        let text = EXAMPLE
            .replace("version = 1", "version = 9")
            .replace("assignments = [\"acme\"]", "assignments = [\"nope\"]");
        let err = parse_config(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("version: is 9"), "{err}");
        assert!(err.contains("assignments[0]"), "{err}");
    }

    #[test]
    fn validation_problems_name_their_line() {
        let text = EXAMPLE.replace(
            "unmatched = { action = \"add_focus\", template = \"default-user\" }",
            "unmatched = { action = \"add_focus\", template = \"nope\" }",
        );
        let line = text
            .lines()
            .position(|l| l.contains("template = \"nope\""))
            .unwrap()
            + 1;
        let err = parse_config(&text, "x.toml").unwrap_err().to_string();
        assert!(
            err.contains(&format!("line {line}: resources[0] (hr).reactions.unmatched.template: names template \"nope\"")),
            "{err}"
        );
        // A problem in the second [[resources]] points into that table.
        let text = EXAMPLE.replace(
            "dn_template = \"cn={name},o=Acme\"",
            "dn_template = \"cn={name,o=Acme\"",
        );
        let line = text
            .lines()
            .position(|l| l.contains("cn={name,o=Acme"))
            .unwrap()
            + 1;
        let err = parse_config(&text, "x.toml").unwrap_err().to_string();
        assert!(
            err.contains(&format!("line {line}: resources[1] (acme).dn_template")),
            "{err}"
        );
    }

    /// One case per class of configuration error, with the exact message.
    #[test]
    fn each_class_of_error_has_its_message() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "version = 1",
                "version = 2",
                "version: is 2, this build reads version 1",
            ),
            (
                "dn_template = \"cn={name},o=Acme\"",
                "dn_template = \"cn={name,o=Acme\"",
                "resources[1] (acme).dn_template: template \"cn={name,o=Acme\": ',' cannot be part of an attribute name",
            ),
            (
                "template = \"{givenName} {familyName}\"",
                "template = \"{givenName} {familyName\"",
                "templates[0] (default-user).mappings[0]: template \"{givenName} {familyName\": a '{' is never closed",
            ),
            (
                "template = \"default-user\" }",
                "template = \"nope\" }",
                "resources[0] (hr).reactions.unmatched.template: names template \"nope\", which is not defined",
            ),
            (
                "linked = { action = \"synchronize\" }",
                "linked = { action = \"add_focus\" }",
                "resources[0] (hr).reactions.linked.action: add_focus does not apply to situation linked",
            ),
            (
                "source = \"uid\"\ntarget = \"name\"",
                "source = \"uid\"\nvalue = \"x\"\ntarget = \"name\"",
                "resources[0] (hr).inbound[0]: exactly one of source, value, template or expression must be set",
            ),
            (
                "conditions = [{ focus_attribute = \"name\", source = \"uid\" }]",
                "conditions = []",
                "resources[0] (hr).correlation[0].conditions: a rule needs at least one condition",
            ),
            (
                "assignments = [\"acme\"]",
                "assignments = [\"ad\"]",
                "templates[0] (default-user).assignments[0]: names resource \"ad\", which is not defined",
            ),
            (
                "name = \"acme\"",
                "name = \"hr\"",
                "resources: two resources have the same name",
            ),
            (
                "name = \"acme\"",
                "name = \"ac me\"",
                "resources[1] (ac me).name: must be letters, digits, '-' or '_' (it names NATS subjects)",
            ),
            (
                "url = \"ldap://127.0.0.1:390\"",
                "url = \"http://127.0.0.1:390\"",
                "resources[1] (acme).url: \"http://127.0.0.1:390\" is not an ldap:// URL",
            ),
            (
                "bind_password_env = \"IDSYNC_HR_PASSWORD\"",
                "bind_password_env = \"IDSYNC_HR_PASSWORD\"\nbind_password_file = \"/x\"",
                "resources[0] (hr).bind_password_file: set bind_password_file or bind_password_env, not both",
            ),
            (
                "object_classes = [\"inetOrgPerson\"]",
                "object_classes = []",
                "resources[1] (acme).object_classes: a resource with outbound mappings needs object_classes",
            ),
            (
                "template = \"{givenName} {familyName}\"",
                "expression = \"givenName + \"",
                "templates[0] (default-user).mappings[0]: expression \"givenName + \" does not compile",
            ),
            (
                "[nats]",
                "[nats]\nurll = \"x\"",
                "unknown field `urll`, expected `url`",
            ),
            (
                "live_sync = true",
                "live_sync = \"yes\"",
                "invalid type: string \"yes\", expected a boolean",
            ),
            (
                "version = 1",
                "version = 1\n[workers]\ninbound_concurrency = 0",
                "workers.inbound_concurrency: must be between 1 and 256",
            ),
            (
                "version = 1",
                "version = 1\n[workers]\nprovisioner_concurrency = 300",
                "workers.provisioner_concurrency: must be between 1 and 256",
            ),
            (
                "data_dir = \"/var/lib/idsync/idm\"",
                "data_dir = \"/var/lib/idsync/idm\"\ncache_mib = 0",
                "idm.cache_mib: must be between 1 and 65536 (MiB)",
            ),
            (
                "strength = \"strong\"",
                "strength = \"strongest\"",
                "unknown variant `strongest`, expected one of `weak`, `normal`, `strong`",
            ),
        ];
        for (from, to, want) in cases {
            assert!(EXAMPLE.contains(from), "the example has no {from:?}");
            let text = EXAMPLE.replacen(from, to, 1);
            let err = parse_config(&text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(want), "{to:?}: expected {want:?} in:\n{err}");
            assert!(err.contains("line "), "{to:?}: no line in:\n{err}");
        }
    }

    #[test]
    fn an_unreadable_ca_file_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("idsync.toml");
        let text = EXAMPLE.replace(
            "live_sync = true",
            "live_sync = true\ntls = { starttls = true, ca_file = \"/nonexistent/ca.pem\" }",
        );
        std::fs::write(&file, text).unwrap();
        let err = load_config(&file).unwrap_err().to_string();
        assert!(
            err.contains("resources[0] (hr).tls.ca_file: cannot read /nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn password_from_file_is_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut config = parse_config(EXAMPLE, "x").unwrap();
        let r = &mut config.resources[0];
        r.bind_password_env = None;
        r.bind_password_file = Some(file.display().to_string());
        assert_eq!(bind_password(r).unwrap().expose(), "s3cret");
        r.bind_password_file = Some("/nonexistent/pw".into());
        let err = bind_password(r).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/pw") && err.contains("\"hr\""),
            "{err}"
        );
        r.bind_password_file = None;
        r.bind_password_env = Some("IDSYNC_TEST_SURELY_UNSET".into());
        let err = bind_password(r).unwrap_err().to_string();
        assert!(err.contains("IDSYNC_TEST_SURELY_UNSET"), "{err}");
    }
}
