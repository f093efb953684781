//! `idsync`: the operator's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use idsync::cases;
use idsync::dev::Deployment;
use idsync_core::model::{Focus, FocusStatus};
use idsync_idm_client::IdmClient;

#[derive(Debug, Parser)]
#[command(
    name = "idsync",
    version,
    about = "Identity synchronisation: the operator's tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Users in the IDM.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Groups in the IDM.
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
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
    /// A local all-in-one deployment for trying idsync out.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Lists users with their links to accounts.
    List {
        /// The IDM's gRPC URL.
        #[arg(long, env = "IDSYNC_IDM_URL", default_value = "http://127.0.0.1:50051")]
        idm: String,
        /// One JSON document, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GroupsCommand {
    /// Lists groups with their members (and members whose accounts have not arrived yet).
    List {
        #[arg(long, env = "IDSYNC_IDM_URL", default_value = "http://127.0.0.1:50051")]
        idm: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CasesCommand {
    /// Lists open cases with the users correlation proposed.
    List {
        #[arg(long, env = "IDSYNC_IDM_URL", default_value = "http://127.0.0.1:50051")]
        idm: String,
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
        #[arg(long, env = "IDSYNC_IDM_URL", default_value = "http://127.0.0.1:50051")]
        idm: String,
        #[arg(long, env = "IDSYNC_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats: String,
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
    match cli.command {
        Command::Users {
            command: UsersCommand::List { idm, json },
        } => {
            let client = IdmClient::new(&idm)?;
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
            command: GroupsCommand::List { idm, json },
        } => {
            let client = IdmClient::new(&idm)?;
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
            command: CasesCommand::List { idm, json },
        } => {
            let client = IdmClient::new(&idm)?;
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
                    idm,
                    nats,
                    wait_seconds,
                },
        } => {
            let client = IdmClient::new(&idm)?;
            let bus = idsync_bus::Bus::connect(&nats).await?;
            let resolution = match link {
                Some(user) => cases::Resolution::Link(user),
                None => cases::Resolution::Create,
            };
            let shadow = cases::resolve(
                &client,
                &bus,
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
            command: DevCommand::Up { dir },
        } => dev_up(dir).await,
    }
}

async fn dev_up(dir: PathBuf) -> Result<ExitCode> {
    idsync_runtime::init_tracing();
    let shutdown = idsync_runtime::shutdown_on_signal();
    let deployment = Deployment::start(&dir).await?;
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
        for (attr, values) in &u.attributes {
            if attr != "name" {
                println!("    {attr}: {}", values.join(" | "));
            }
        }
        for a in &u.assignments {
            println!("    assigned: {} ({})", a.resource, a.source);
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
                    "attributes": u.attributes,
                    "assignments": u.assignments.iter().map(|a| serde_json::json!({"resource": a.resource, "source": a.source})).collect::<Vec<_>>(),
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
