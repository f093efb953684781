//! `idsync`: the operator's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use idsync::cases;
use idsync::dev::Deployment;
use idsync_core::config::Config;
use idsync_core::model::{Assignment, Focus, FocusStatus};
use idsync_core::secret::Secret;
use idsync_idm_client::IdmClient;

mod agreements;
mod events;
mod roles;

#[derive(Debug, Parser)]
#[command(
    name = "idsync",
    version,
    about = "Identity synchronisation: the operator's tool"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Where the IDM and NATS are, and the credential to show.
#[derive(Debug, clap::Args)]
struct Global {
    /// The IDM's gRPC URL (default: the configuration's, else http://127.0.0.1:50051).
    #[arg(long, global = true, env = "IDSYNC_IDM_URL")]
    idm: Option<String>,
    /// NATS (default: the configuration's, else nats://127.0.0.1:4222).
    #[arg(long, global = true, env = "IDSYNC_NATS_URL")]
    nats: Option<String>,
    /// File holding the administrator credential (else IDSYNC_ADMIN_TOKEN,
    /// else the configuration's idm.admin_token_file or admin_token_env).
    #[arg(long, global = true, env = "IDSYNC_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// The configuration, for commands that need it (dry runs, parked
    /// entries, force-refresh, cases resolve).
    #[arg(long, global = true, env = "IDSYNC_CONFIG")]
    config: Option<PathBuf>,
}

impl Global {
    fn config(&self) -> Result<Config> {
        let path = self
            .config
            .as_ref()
            .context("this command needs the configuration: --config <file> or IDSYNC_CONFIG")?;
        Ok(idsync_runtime::load_config(path)?)
    }

    fn optional_config(&self) -> Result<Option<Config>> {
        self.config.as_ref().map(|_| self.config()).transpose()
    }

    fn idm_url(&self) -> Result<String> {
        Ok(match (&self.idm, self.optional_config()?) {
            (Some(url), _) => url.clone(),
            (None, Some(c)) => c.idm.url,
            (None, None) => "http://127.0.0.1:50051".to_owned(),
        })
    }

    fn nats_url(&self) -> Result<String> {
        Ok(match (&self.nats, self.optional_config()?) {
            (Some(url), _) => url.clone(),
            (None, Some(c)) => c.nats.url,
            (None, None) => "nats://127.0.0.1:4222".to_owned(),
        })
    }

    /// A client presenting the administrator credential.
    fn admin(&self) -> Result<(IdmClient, String)> {
        let credential = if let Some(file) = &self.admin_token_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the admin token file {}", file.display()))?;
            Secret::new(text.trim_end_matches(['\n', '\r']))
        } else if let Ok(token) = std::env::var("IDSYNC_ADMIN_TOKEN") {
            Secret::new(token)
        } else if let Some(c) = self.optional_config()? {
            idsync_runtime::admin_token(&c)?
        } else {
            bail!(
                "the IDM needs the administrator credential: --admin-token-file, IDSYNC_ADMIN_TOKEN_FILE, IDSYNC_ADMIN_TOKEN or a --config naming it"
            )
        };
        let url = self.idm_url()?;
        Ok((IdmClient::new(&url, &credential)?, url))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Users in the IDM.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Roles: accounts, values and group memberships they give their holders.
    Roles {
        #[command(subcommand)]
        command: roles::RolesCommand,
    },
    /// Groups in the IDM.
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// Sync agreements: the authority under which sources write to the IDM.
    Sync {
        #[command(subcommand)]
        command: agreements::SyncCommand,
    },
    /// Compares a resource with the IDM in full: publishes what changed and
    /// what is gone (source), or puts back drift and finds orphans (target).
    /// When entries could not be read, nothing of their kind is taken for
    /// gone (no deletion, no account re-created): the summary says so and the
    /// command exits with status 3.
    Reconcile {
        resource: String,
        /// At most this many entries a second, to spare the directory.
        #[arg(long)]
        rate: Option<u32>,
        /// Print a summary only (no progress bar).
        #[arg(long)]
        quiet: bool,
        /// The summary as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Change events kept in JetStream: tail, show, and replay (simulated,
    /// compared between two configurations, or into the pipeline).
    Events {
        #[command(subcommand)]
        command: events::EventsCommand,
    },
    /// Provisioning operations the provisioner gave up on.
    Provisioning {
        #[command(subcommand)]
        command: ProvisioningCommand,
    },
    /// The administrator credential.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Correlation cases: disputed entries waiting for a decision.
    Cases {
        #[command(subcommand)]
        command: CasesCommand,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Runs one service in this process, as its own binary would
    /// (`idsync-<service>`): one image or package serves them all. Probes
    /// and metrics on IDSYNC_HEALTH_BIND; SIGTERM drains.
    Serve {
        #[arg(value_parser = ["idm", "detector", "correlator", "applier", "provisioner"])]
        service: String,
    },
    /// A local all-in-one deployment for trying idsync out.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ProvisioningCommand {
    /// Lists accounts with an operation the provisioner is still retrying
    /// (as their shadows show it).
    Pending {
        #[arg(long)]
        json: bool,
    },
    /// Lists parked provisioning operations with their reasons.
    Parked,
    /// Provisions the user of a parked operation again (its current state).
    Retry { seq: u64 },
    /// Forgets a parked operation.
    Drop { seq: u64 },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Prints a new random administrator credential, to put in the file
    /// that idm.admin_token_file names (or the variable admin_token_env names).
    NewCredential,
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Creates a user that the IDM owns (no sync agreement writes it).
    Create {
        name: String,
        /// An attribute: `--set fullName="Ann Smith"`; repeat for more.
        #[arg(long = "set", value_name = "ATTR=VALUE")]
        set: Vec<String>,
    },
    /// Sets attributes of a user (an agreement's user: only those it yields).
    Set {
        /// The user's name or id.
        user: String,
        /// `ATTR=VALUE` replaces the values; `ATTR=` removes the attribute.
        #[arg(required = true, value_name = "ATTR=VALUE")]
        values: Vec<String>,
    },
    /// Assigns a user an account on a resource, or a role (`--role`); the
    /// provisioner makes what it calls for.
    Assign {
        user: String,
        #[arg(required_unless_present = "role", conflicts_with = "role")]
        resource: Option<String>,
        #[arg(long)]
        role: Option<String>,
    },
    /// Removes a user's assignments to a resource, or a role (`--role`).
    /// Accounts nothing else calls for are deprovisioned by their resource's
    /// policy (deleted, or disabled and kept).
    Unassign {
        user: String,
        #[arg(required_unless_present = "role", conflicts_with = "role")]
        resource: Option<String>,
        #[arg(long)]
        role: Option<String>,
    },
    /// Lists users with their links to accounts.
    List {
        /// One JSON document, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GroupsCommand {
    /// Lists groups with their members (and members whose accounts have not arrived yet).
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CasesCommand {
    /// Lists open cases with the users correlation proposed.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Resolves a case: link the entry to a user, or create a new user.
    Resolve {
        /// The resource of the entry.
        resource: String,
        /// The entry's UUID (as `cases list` shows it).
        entry_uuid: String,
        /// Link the entry to this user (name or id).
        #[arg(long, conflicts_with = "create", required_unless_present = "create")]
        link: Option<String>,
        /// Create a new user from the entry.
        #[arg(long)]
        create: bool,
        /// How long to wait for the result.
        #[arg(long, default_value_t = 30)]
        wait_seconds: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Checks a configuration without running it; lists every problem.
    Check { file: PathBuf },
    /// Prints the configuration's JSON Schema.
    Schema,
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// Starts NATS, a source and a target OpenLDAP, the IDM and the four
    /// services, runs them until Ctrl-C, then stops everything.
    Up {
        /// Where state lives; reused if it exists.
        #[arg(long, default_value = ".idsync-local")]
        dir: PathBuf,
        /// The IDM's store: `embedded` (redb in the directory) or `postgres`
        /// (a throwaway PostgreSQL cluster for this run; its data does not
        /// survive the run).
        #[arg(long, env = "IDSYNC_DEV_STORE", default_value = "embedded")]
        store: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idsync: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Sync { command } => agreements::run(&global, command).await,
        Command::Provisioning {
            command: ProvisioningCommand::Pending { json },
        } => {
            let (idm, url) = global.admin()?;
            let config = global.config()?;
            let mut pending = Vec::new();
            for r in config.resources.iter().filter(|r| r.dn_template.is_some()) {
                let shadows = idm
                    .all_shadows(&r.name)
                    .await
                    .with_context(|| format!("cannot read the shadows of {} from {url}", r.name))?;
                pending.extend(shadows.into_iter().filter(|s| s.pending.is_some()));
            }
            if json {
                let out: Vec<_> = pending
                    .iter()
                    .filter_map(|s| {
                        let p = s.pending.as_ref()?;
                        Some(serde_json::json!({
                            "resource": s.resource,
                            "dn": s.dn,
                            "user": s.focus_id,
                            "operation": p.operation,
                            "attempts": p.attempts,
                            "since": idsync_core::schedule::format_utc(p.since_ms / 1000),
                            "reason": p.reason,
                        }))
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if pending.is_empty() {
                println!("no pending operations");
            } else {
                for s in &pending {
                    if let Some(p) = &s.pending {
                        println!(
                            "{} {}: {} pending since {}, {} attempts\n    {}",
                            s.resource,
                            s.dn,
                            p.operation,
                            idsync_core::schedule::format_utc(p.since_ms / 1000),
                            p.attempts,
                            p.reason
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Provisioning { command } => {
            let bus = || async { anyhow::Ok(idsync_bus::Bus::connect(&global.nats_url()?).await?) };
            match command {
                // Answered above: it reads the IDM only.
                ProvisioningCommand::Pending { .. } => {}
                ProvisioningCommand::Parked => {
                    let bus = bus().await?;
                    let parked = idsync::sync::parked_provisioning(&bus).await?;
                    if parked.is_empty() {
                        println!("no parked provisioning");
                    }
                    for p in parked {
                        println!("{}  user {}\n    {}", p.seq, p.focus_id, p.reason);
                    }
                }
                ProvisioningCommand::Retry { seq } => {
                    let bus = bus().await?;
                    let (idm, _) = global.admin()?;
                    idsync::sync::retry_provisioning(&bus, &idm, seq).await?;
                    println!("provisioning {seq} sent again");
                }
                ProvisioningCommand::Drop { seq } => {
                    let bus = bus().await?;
                    idsync::sync::drop_provisioning(&bus, seq).await?;
                    println!("provisioning {seq} dropped");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile {
            resource,
            rate,
            quiet,
            json,
        } => reconcile(&global, &resource, rate, quiet || json, json).await,
        Command::Admin {
            command: AdminCommand::NewCredential,
        } => {
            println!(
                "{}",
                idsync_store::token::new_admin_credential().map_err(anyhow::Error::msg)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Users {
            command: UsersCommand::Create { name, set },
        } => {
            let (client, _) = global.admin()?;
            let mut focus = Focus {
                id: uuid::Uuid::new_v4().to_string(),
                kind: "user".into(),
                ..Default::default()
            };
            focus.attributes.insert("name".into(), vec![name.clone()]);
            apply_values(&mut focus, &set)?;
            let id = focus.id.clone();
            put_user(&client, focus, 0)
                .await
                .with_context(|| format!("cannot create user {name:?}"))?;
            println!("created user {name} (id {id})");
            Ok(ExitCode::SUCCESS)
        }
        Command::Users {
            command: UsersCommand::Set { user, values },
        } => {
            let (client, _) = global.admin()?;
            let mut focus = find_user(&client, &user).await?;
            let expected_version = focus.version;
            apply_values(&mut focus, &values)?;
            put_user(&client, focus, expected_version)
                .await
                .with_context(|| format!("cannot change user {user:?}"))?;
            println!("user {user} changed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Roles { command } => roles::run(&global, command).await,
        Command::Serve { service } => Ok(serve(&service).await),
        Command::Events { command } => events::run(&global, command).await,
        Command::Users {
            command:
                UsersCommand::Assign {
                    user,
                    resource,
                    role,
                },
        } => {
            let (client, _) = global.admin()?;
            let wanted = match (resource, role) {
                (Some(resource), _) => {
                    if let Some(c) = global.optional_config()?
                        && c.resource(&resource).is_err()
                    {
                        bail!("resource {resource:?} is not in the configuration");
                    }
                    Assignment {
                        resource,
                        source: "manual".into(),
                        role: String::new(),
                    }
                }
                (None, Some(role)) => {
                    if client.get_role(&role).await?.is_none() {
                        bail!("no role named {role:?} (`idsync roles list` shows them)");
                    }
                    Assignment {
                        resource: String::new(),
                        source: "manual".into(),
                        role,
                    }
                }
                (None, None) => bail!("name a resource or a --role"),
            };
            let what = assignment_words(&wanted);
            let mut focus = find_user(&client, &user).await?;
            if focus
                .assignments
                .iter()
                .any(|a| a.resource == wanted.resource && a.role == wanted.role)
            {
                println!("user {user} is already assigned {what}");
                return Ok(ExitCode::SUCCESS);
            }
            let expected_version = focus.version;
            focus.assignments.push(wanted);
            put_user(&client, focus, expected_version)
                .await
                .with_context(|| format!("cannot assign {what} to {user:?}"))?;
            println!("user {user} assigned {what}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Users {
            command:
                UsersCommand::Unassign {
                    user,
                    resource,
                    role,
                },
        } => {
            let (client, _) = global.admin()?;
            let mut focus = find_user(&client, &user).await?;
            let expected_version = focus.version;
            let before = focus.assignments.len();
            let what = match (&resource, &role) {
                (Some(r), _) => {
                    focus
                        .assignments
                        .retain(|a| !(a.role.is_empty() && a.resource == *r));
                    r.clone()
                }
                (None, Some(r)) => {
                    focus.assignments.retain(|a| a.role != *r);
                    format!("role {r}")
                }
                (None, None) => bail!("name a resource or a --role"),
            };
            if focus.assignments.len() == before {
                println!("user {user} has no assignment to {what}");
                return Ok(ExitCode::SUCCESS);
            }
            put_user(&client, focus, expected_version)
                .await
                .with_context(|| format!("cannot unassign {what} from {user:?}"))?;
            println!("user {user} no longer assigned {what}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Users {
            command: UsersCommand::List { json },
        } => {
            let (client, idm) = global.admin()?;
            let users = client
                .all_focus("user")
                .await
                .with_context(|| format!("cannot list users from the IDM at {idm}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users_json(&users))?);
            } else {
                print_users(&users);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Groups {
            command: GroupsCommand::List { json },
        } => {
            let (client, idm) = global.admin()?;
            let groups = client
                .all_focus("group")
                .await
                .with_context(|| format!("cannot list groups from the IDM at {idm}"))?;
            let users = client.all_focus("user").await?;
            let name_of = |id: &str| {
                users
                    .iter()
                    .find(|u| u.id == id)
                    .and_then(|u| u.first("name"))
                    .unwrap_or(id)
                    .to_owned()
            };
            if json {
                let out: Vec<_> = groups
                    .iter()
                    .map(|g| {
                        serde_json::json!({
                            "id": g.id,
                            "name": g.first("name"),
                            "attributes": g.attributes,
                            "members": g.members.iter().map(|m| serde_json::json!({"id": m, "name": name_of(m)})).collect::<Vec<_>>(),
                            "pending_members": g.pending_members.iter().map(|m| serde_json::json!({"resource": m.resource, "dn": m.dn})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if groups.is_empty() {
                println!("no groups");
            } else {
                for g in &groups {
                    println!(
                        "{}  (id {}, version {})",
                        g.first("name").unwrap_or("<no name>"),
                        g.id,
                        g.version
                    );
                    for m in &g.members {
                        println!("    member: {}", name_of(m));
                    }
                    for m in &g.pending_members {
                        println!("    pending: {} on {} (not synced yet)", m.dn, m.resource);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cases {
            command: CasesCommand::List { json },
        } => {
            let (client, idm) = global.admin()?;
            let cases = cases::list(&client)
                .await
                .with_context(|| format!("cannot list cases from the IDM at {idm}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&cases_json(&cases))?);
            } else if cases.is_empty() {
                println!("no open cases");
            } else {
                for c in &cases {
                    println!(
                        "{}  {}  [{}]",
                        c.shadow.resource, c.shadow.dn, c.shadow.entry_uuid
                    );
                    for f in &c.candidates {
                        println!(
                            "    candidate: {} (id {})",
                            f.first("name").unwrap_or("<no name>"),
                            f.id
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cases {
            command:
                CasesCommand::Resolve {
                    resource,
                    entry_uuid,
                    link,
                    create: _,
                    wait_seconds,
                },
        } => {
            let config = global.config()?;
            let agreement = config
                .agreement_of(&resource)
                .with_context(|| format!("resource {resource:?} writes under no agreement"))?
                .to_owned();
            let (client, _) = global.admin()?;
            let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
            let resolution = match link {
                Some(user) => cases::Resolution::Link(user),
                None => cases::Resolution::Create,
            };
            let shadow = cases::resolve(
                &client,
                &bus,
                &agreement,
                &resource,
                &entry_uuid,
                resolution,
                std::time::Duration::from_secs(wait_seconds),
            )
            .await?;
            match &shadow.focus_id {
                Some(id) => println!("{}: now linked to user {id}", shadow.dn),
                None => println!("{}: situation {}", shadow.dn, shadow.situation),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match idsync_runtime::load_config(&file) {
            Ok(c) => {
                println!(
                    "{}: valid ({} resources, {} templates)",
                    file.display(),
                    c.resources.len(),
                    c.templates.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Config {
            command: ConfigCommand::Schema,
        } => {
            print!("{}", idsync_core::config::Config::json_schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev {
            command: DevCommand::Up { dir, store },
        } => dev_up(dir, &store).await,
    }
}

async fn dev_up(dir: PathBuf, store: &str) -> Result<ExitCode> {
    let store = match store {
        "embedded" => idsync_core::config::StoreKind::Embedded,
        "postgres" => idsync_core::config::StoreKind::Postgres,
        other => anyhow::bail!("--store {other:?}: use embedded or postgres"),
    };
    idsync_runtime::init_tracing();
    let shutdown = idsync_runtime::shutdown_on_signal();
    let deployment = Deployment::start_with_options(
        &dir,
        idsync::dev::EXAMPLE_CONFIG,
        idsync::dev::Options {
            store: Some(store),
            ..Default::default()
        },
    )
    .await?;
    let d = &deployment.dir;
    println!(
        "\nidsync is running (state in {dir}).\n\n\
         \x20 NATS           {nats}\n\
         \x20 source LDAP    {src}  (cn=admin,dc=example,dc=com, password in {dir}/secrets/hr)\n\
         \x20 target LDAP    {tgt}  (cn=admin,o=Acme, password in {dir}/secrets/acme)\n\
         \x20 IDM (gRPC)     {idm}\n\
         \x20 configuration  {dir}/idsync.toml\n\n\
         In another terminal:  source {dir}/env && target/debug/idsync users list\n\
         Press Ctrl-C to stop everything.\n",
        dir = d.display(),
        nats = deployment.nats.url(),
        src = deployment.source.url(),
        tgt = deployment.target.url(),
        idm = deployment.config.idm.url,
    );
    shutdown.cancelled().await;
    deployment.shutdown().await?;
    println!("idsync stopped; state kept in {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

async fn reconcile(
    global: &Global,
    resource: &str,
    rate: Option<u32>,
    quiet: bool,
    json: bool,
) -> Result<ExitCode> {
    use idsync_detector::reconcile::{Options, Progress};
    use std::io::{IsTerminal as _, Write as _};
    let config = global.config()?;
    let (idm, _) = global.admin()?;
    let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
    let bar = !quiet && std::io::stderr().is_terminal();
    let draw = |p: &Progress| {
        if !bar {
            return;
        }
        let share = if p.expected > 0 {
            (p.scanned as f64 / p.expected as f64).min(1.0)
        } else {
            0.0
        };
        let filled = (share * 30.0) as usize;
        let eta = p
            .eta()
            .map_or_else(String::new, |d| format!(", ETA {}s", d.as_secs()));
        let unreadable = if p.errors > 0 {
            format!(", {} skipped", p.errors)
        } else {
            String::new()
        };
        eprint!(
            "\r[{}{}] {}/{} entries, {} changed, {} deleted{unreadable}, {:.0}/s{eta}   ",
            "#".repeat(filled),
            "-".repeat(30 - filled),
            p.scanned,
            p.expected,
            p.changed,
            p.deleted,
            p.rate()
        );
        let _ = std::io::stderr().flush();
    };
    let options = Options {
        rate,
        ..Options::default()
    };
    let p = idsync_detector::reconcile::reconcile(&config, &bus, &idm, resource, options, draw)
        .await
        .with_context(|| format!("reconciliation of {resource} failed"))?;
    if bar {
        eprintln!();
    }
    if json {
        let out = serde_json::json!({
            "resource": p.resource,
            "scanned": p.scanned,
            "changed": p.changed,
            "deleted": p.deleted,
            "orphans": p.orphans,
            "reprovisioned": p.reprovisioned,
            "errors": p.errors,
            "withheld": p.withheld.iter().map(|w| serde_json::json!({
                "object_type": w.kind(),
                "unreadable": w.unreadable,
                "withheld": if w.target { "reprovisioning" } else { "deletions" },
                "message": w.to_string(),
                "examples": w.examples,
            })).collect::<Vec<_>>(),
            "seconds": p.elapsed.as_secs_f64(),
            "rate": p.rate(),
        });
        println!("{out}");
        return Ok(reconcile_status(&p));
    }
    println!(
        "reconciled {resource}: {} entries scanned in {:.1}s ({:.0}/s): {} changed, {} deleted, {} orphans, {} users provisioned again, {} unreadable",
        p.scanned,
        p.elapsed.as_secs_f64(),
        p.rate(),
        p.changed,
        p.deleted,
        p.orphans,
        p.reprovisioned,
        p.errors
    );
    for w in &p.withheld {
        println!("withheld on {resource}: {w}");
        for reason in &w.examples {
            println!("  {reason}");
        }
    }
    if !p.withheld.is_empty() {
        println!(
            "what is really gone there stays in the IDM until those entries can be read (each needs its {} readable by the bind DN); then reconcile {resource} again",
            config
                .resources
                .iter()
                .find(|r| r.name == resource)
                .map_or("identifier", |r| r.id_attribute.as_str())
        );
    }
    Ok(reconcile_status(&p))
}

/// 3 when a scope's gone pass was withheld (the run did not finish its
/// work: what is gone there is still live), else success.
fn reconcile_status(p: &idsync_detector::reconcile::Progress) -> ExitCode {
    if p.withheld.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

/// Applies `ATTR=VALUE` settings (`ATTR=` removes the attribute).
fn apply_values(focus: &mut Focus, settings: &[String]) -> Result<()> {
    for s in settings {
        let (attr, value) = s
            .split_once('=')
            .with_context(|| format!("{s:?} is not ATTR=VALUE"))?;
        if value.is_empty() {
            focus.attributes.remove(attr);
        } else {
            focus
                .attributes
                .insert(attr.to_owned(), vec![value.to_owned()]);
        }
    }
    Ok(())
}

async fn serve(service: &str) -> ExitCode {
    let name = service.to_owned();
    idsync_runtime::service_main(service, move |config, stop| async move {
        match name.as_str() {
            "idm" => idsync_idm::run(config, stop)
                .await
                .map_err(|e| e.to_string()),
            "detector" => idsync_detector::run(config, stop)
                .await
                .map_err(|e| e.to_string()),
            "correlator" => idsync_correlator::run(config, stop)
                .await
                .map_err(|e| e.to_string()),
            "applier" => idsync_applier::run(config, stop)
                .await
                .map_err(|e| e.to_string()),
            "provisioner" => idsync_provisioner::run(config, stop)
                .await
                .map_err(|e| e.to_string()),
            other => Err(format!("no service {other:?}")),
        }
    })
    .await
}

fn assignment_words(a: &Assignment) -> String {
    if a.role.is_empty() {
        a.resource.clone()
    } else {
        format!("role {}", a.role)
    }
}

/// Stores `focus` as the administrator, if it is still at `expected_version`.
async fn put_user(
    client: &IdmClient,
    focus: Focus,
    expected_version: u64,
) -> Result<(), idsync_idm_client::IdmError> {
    let op = idsync_core::model::Op::PutFocus {
        focus,
        expected_version,
    };
    client.commit(vec![op], "").await.map(drop)
}

/// A user by id, else by name.
async fn find_user(client: &IdmClient, user: &str) -> Result<Focus> {
    if let Some(f) = client.get_focus(user).await? {
        return Ok(f);
    }
    client
        .find_focus("user", "name", user)
        .await?
        .into_iter()
        .next()
        .with_context(|| format!("no user named {user:?} (nor with that id)"))
}

fn status(f: &Focus) -> &'static str {
    match f.status {
        FocusStatus::Enabled => "enabled",
        FocusStatus::Disabled => "disabled",
    }
}

fn print_users(users: &[Focus]) {
    if users.is_empty() {
        println!("no users");
        return;
    }
    for u in users {
        println!(
            "{name}  ({status}, id {id}, version {v})",
            name = u.first("name").unwrap_or("<no name>"),
            status = status(u),
            id = u.id,
            v = u.version
        );
        if u.sync_parent.is_empty() {
            println!("    owner: the IDM (native)");
        } else {
            println!("    owner: agreement {}", u.sync_parent);
        }
        for (attr, values) in &u.attributes {
            if attr != "name" {
                println!("    {attr}: {}", values.join(" | "));
            }
        }
        for a in &u.assignments {
            println!("    assigned: {} ({})", assignment_words(a), a.source);
        }
        for l in &u.links {
            println!("    -> {}: {}  [{}]", l.resource, l.dn, l.entry_uuid);
        }
    }
}

fn users_json(users: &[Focus]) -> serde_json::Value {
    serde_json::Value::Array(
        users
            .iter()
            .map(|u| {
                serde_json::json!({
                    "id": u.id,
                    "version": u.version,
                    "status": status(u),
                    "sync_parent": (!u.sync_parent.is_empty()).then_some(&u.sync_parent),
                    "attributes": u.attributes,
                    "assignments": u.assignments.iter().map(|a| if a.role.is_empty() { serde_json::json!({"resource": a.resource, "source": a.source}) } else { serde_json::json!({"role": a.role, "source": a.source}) }).collect::<Vec<_>>(),
                    "links": u.links.iter().map(|l| serde_json::json!({"resource": l.resource, "dn": l.dn, "entry_uuid": l.entry_uuid})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn cases_json(cases: &[cases::Case]) -> serde_json::Value {
    serde_json::Value::Array(
        cases
            .iter()
            .map(|c| {
                serde_json::json!({
                    "resource": c.shadow.resource,
                    "dn": c.shadow.dn,
                    "entry_uuid": c.shadow.entry_uuid,
                    "candidates": c.candidates.iter().map(|f| serde_json::json!({"id": f.id, "name": f.first("name")})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
