//! `idsync roles …`: roles (midPoint's RBAC) kept in the IDM. A role gives
//! its holders accounts on target resources, values there and membership of
//! groups there, and can include other roles. Every change reaches the
//! holders through the provisioner.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use idsync_core::config::check_role_name;
use idsync_core::model::{Focus, Inducement, KIND_ROLE, NAME_ATTRIBUTE, Op, normalize_dn};
use idsync_idm_client::IdmClient;

use crate::Global;

#[derive(Debug, Subcommand)]
pub enum RolesCommand {
    /// Creates a role that gives nothing yet.
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// Lists roles with what they give.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Shows one role: what it gives, the roles it includes and who holds it.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Makes the role give an account on a resource, with values there and
    /// membership of groups there (repeat --set and --group for more).
    Add {
        role: String,
        resource: String,
        /// A value on the account: `--set title=Engineer`.
        #[arg(long = "set", value_name = "ATTR=VALUE")]
        set: Vec<String>,
        /// The DN of a group on the resource to make the account a member of.
        #[arg(long = "group", value_name = "DN")]
        groups: Vec<String>,
    },
    /// Takes back values or groups the role gives on a resource; with
    /// neither, the role no longer gives an account there at all.
    Remove {
        role: String,
        resource: String,
        #[arg(long = "set", value_name = "ATTR=VALUE")]
        set: Vec<String>,
        #[arg(long = "group", value_name = "DN")]
        groups: Vec<String>,
    },
    /// Makes the role give everything another role gives.
    Include { role: String, other: String },
    /// Undoes `include`.
    Exclude { role: String, other: String },
    /// Deletes a role that nobody holds and no role includes.
    Delete { name: String },
}

pub async fn run(global: &Global, command: RolesCommand) -> Result<ExitCode> {
    let (idm, url) = global.admin()?;
    match command {
        RolesCommand::Create { name, description } => {
            check_role_name(&name).map_err(anyhow::Error::msg)?;
            if idm.get_role(&name).await?.is_some() {
                bail!("role {name:?} already exists");
            }
            let mut role = Focus {
                id: uuid::Uuid::new_v4().to_string(),
                kind: KIND_ROLE.into(),
                ..Default::default()
            };
            role.attributes
                .insert(NAME_ATTRIBUTE.into(), vec![name.clone()]);
            if let Some(d) = description {
                role.attributes.insert("description".into(), vec![d]);
            }
            put(&idm, role, 0)
                .await
                .with_context(|| format!("cannot create role {name:?}"))?;
            println!("created role {name}");
        }
        RolesCommand::List { json } => {
            let roles = idm
                .all_focus(KIND_ROLE)
                .await
                .with_context(|| format!("cannot list roles from the IDM at {url}"))?;
            if json {
                let out: Vec<_> = roles.iter().map(role_json).collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if roles.is_empty() {
                println!("no roles");
            } else {
                for r in &roles {
                    print_role(r);
                }
            }
        }
        RolesCommand::Show { name, json } => {
            let role = find(&idm, &name).await?;
            let (holders, including) = idm.role_referrers(&name).await?;
            if json {
                let mut out = role_json(&role);
                out["holders"] = serde_json::json!(holders.len());
                out["included_by"] = serde_json::json!(including);
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_role(&role);
                println!("  held by {} directly", holders.len());
                if !including.is_empty() {
                    println!("  included by {}", including.join(", "));
                }
            }
        }
        RolesCommand::Add {
            role,
            resource,
            set,
            groups,
        } => {
            check_target(global, &resource)?;
            let values = pairs(&set)?;
            change(&idm, &role, |r| {
                let i = construction(r, &resource);
                for (attr, value) in &values {
                    let have = i.attributes.entry(attr.clone()).or_default();
                    if !have.contains(value) {
                        have.push(value.clone());
                    }
                }
                for g in &groups {
                    let key = normalize_dn(g);
                    if !i.groups.iter().any(|x| normalize_dn(x) == key) {
                        i.groups.push(g.clone());
                    }
                }
                Ok(())
            })
            .await?;
            println!("role {role} gives an account on {resource}");
        }
        RolesCommand::Remove {
            role,
            resource,
            set,
            groups,
        } => {
            let values = pairs(&set)?;
            change(&idm, &role, |r| {
                let at = r
                    .inducements
                    .iter()
                    .position(|i| i.role.is_empty() && i.resource == resource)
                    .with_context(|| format!("role {role} gives nothing on {resource}"))?;
                if values.is_empty() && groups.is_empty() {
                    r.inducements.remove(at);
                    return Ok(());
                }
                let i = &mut r.inducements[at];
                for (attr, value) in &values {
                    if let Some(have) = i.attributes.get_mut(attr) {
                        have.retain(|v| v != value);
                        if have.is_empty() {
                            i.attributes.remove(attr);
                        }
                    }
                }
                let keys: BTreeSet<String> = groups.iter().map(|g| normalize_dn(g)).collect();
                i.groups.retain(|g| !keys.contains(&normalize_dn(g)));
                Ok(())
            })
            .await?;
            println!("role {role} changed on {resource}");
        }
        RolesCommand::Include { role, other } => {
            if role == other {
                bail!("a role cannot include itself");
            }
            find(&idm, &other).await?;
            // The other role must not include this one, at any depth.
            if includes(&idm, &other, &role).await? {
                bail!("role {other} already includes {role}; including it back would make a cycle");
            }
            change(&idm, &role, |r| {
                if !r.inducements.iter().any(|i| i.role == other) {
                    r.inducements.push(Inducement {
                        role: other.clone(),
                        ..Default::default()
                    });
                }
                Ok(())
            })
            .await?;
            println!("role {role} includes {other}");
        }
        RolesCommand::Exclude { role, other } => {
            change(&idm, &role, |r| {
                let before = r.inducements.len();
                r.inducements.retain(|i| i.role != other);
                if r.inducements.len() == before {
                    bail!("role {role} does not include {other}");
                }
                Ok(())
            })
            .await?;
            println!("role {role} no longer includes {other}");
        }
        RolesCommand::Delete { name } => {
            let role = find(&idm, &name).await?;
            let (holders, including) = idm.role_referrers(&name).await?;
            if !holders.is_empty() || !including.is_empty() {
                bail!(
                    "role {name} is held by {} and included by [{}]; unassign and exclude it first (deleting it would deprovision what it gives)",
                    holders.len(),
                    including.join(", ")
                );
            }
            idm.commit(
                vec![Op::DeleteFocus {
                    id: role.id.clone(),
                    expected_version: role.version,
                }],
                "",
            )
            .await
            .with_context(|| format!("cannot delete role {name:?}"))?;
            println!("deleted role {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The resource must be a target in the configuration, when there is one.
fn check_target(global: &Global, resource: &str) -> Result<()> {
    if let Some(c) = global.optional_config()? {
        let r = c.resource(resource)?;
        if r.dn_template.is_none() {
            bail!(
                "resource {resource:?} has no dn_template: idsync does not create accounts there"
            );
        }
    }
    Ok(())
}

fn pairs(settings: &[String]) -> Result<Vec<(String, String)>> {
    settings
        .iter()
        .map(|s| {
            let (a, v) = s
                .split_once('=')
                .filter(|(a, v)| !a.is_empty() && !v.is_empty())
                .with_context(|| format!("{s:?} is not ATTR=VALUE"))?;
            Ok((a.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The construction of `role` on `resource`, added when missing.
fn construction<'a>(role: &'a mut Focus, resource: &str) -> &'a mut Inducement {
    let at = match role
        .inducements
        .iter()
        .position(|i| i.role.is_empty() && i.resource == resource)
    {
        Some(at) => at,
        None => {
            role.inducements.push(Inducement {
                resource: resource.to_owned(),
                ..Default::default()
            });
            role.inducements.len() - 1
        }
    };
    &mut role.inducements[at]
}

async fn find(idm: &IdmClient, name: &str) -> Result<Focus> {
    idm.get_role(name)
        .await?
        .with_context(|| format!("no role named {name:?} (`idsync roles list` shows them)"))
}

/// Whether `role` includes `other`, at any depth.
async fn includes(idm: &IdmClient, role: &str, other: &str) -> Result<bool> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![role.to_owned()];
    while let Some(name) = stack.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(r) = idm.get_role(&name).await? else {
            continue;
        };
        for i in r.inducements.iter().filter(|i| !i.role.is_empty()) {
            if i.role == other {
                return Ok(true);
            }
            stack.push(i.role.clone());
        }
    }
    Ok(false)
}

/// Reads the role, changes it and stores it if nobody wrote it meanwhile.
async fn change(
    idm: &IdmClient,
    name: &str,
    edit: impl FnOnce(&mut Focus) -> Result<()>,
) -> Result<()> {
    let mut role = find(idm, name).await?;
    let version = role.version;
    edit(&mut role)?;
    put(idm, role, version)
        .await
        .with_context(|| format!("cannot change role {name:?}"))
}

async fn put(
    idm: &IdmClient,
    role: Focus,
    expected_version: u64,
) -> Result<(), idsync_idm_client::IdmError> {
    idm.commit(
        vec![Op::PutFocus {
            focus: role,
            expected_version,
        }],
        "",
    )
    .await
    .map(drop)
}

fn print_role(r: &Focus) {
    let name = r.first(NAME_ATTRIBUTE).unwrap_or(&r.id);
    match r.first("description") {
        Some(d) => println!("{name}  ({d})"),
        None => println!("{name}"),
    }
    for i in &r.inducements {
        if !i.role.is_empty() {
            println!("  includes {}", i.role);
            continue;
        }
        println!("  account on {}", i.resource);
        for (attr, values) in &i.attributes {
            println!("    {attr}: {}", values.join(", "));
        }
        for g in &i.groups {
            println!("    member of {g}");
        }
    }
}

fn role_json(r: &Focus) -> serde_json::Value {
    let gives: Vec<_> = r
        .inducements
        .iter()
        .filter(|i| i.role.is_empty())
        .map(|i| {
            serde_json::json!({
                "resource": i.resource,
                "attributes": i.attributes,
                "groups": i.groups,
            })
        })
        .collect();
    let includes: Vec<_> = r
        .inducements
        .iter()
        .filter(|i| !i.role.is_empty())
        .map(|i| i.role.clone())
        .collect();
    serde_json::json!({
        "id": r.id,
        "name": r.first(NAME_ATTRIBUTE),
        "description": r.first("description"),
        "accounts": gives,
        "includes": includes,
    })
}
