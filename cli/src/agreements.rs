//! `idsync sync …`: Kanidm's sync agreement commands, and what a quarantining
//! or halted agreement needs besides.

use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use idsync::sync;
use idsync_proto::v1;
use idsync_store::status_word;

use crate::Global;

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// Creates an agreement (no tokens, nothing yielded, status Unknown).
    Create { name: String },
    /// Lists agreements with their status.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Shows one agreement: status, last success and error, tokens, yield.
    Get {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Issues a token for the agreement's services. It is shown once.
    GenerateToken {
        name: String,
        label: String,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Revokes the token with this label, or every token without one.
    DestroyToken { name: String, label: Option<String> },
    /// Sets the attributes the agreement yields to the IDM (none: yields nothing).
    SetYieldAttributes {
        name: String,
        attributes: Vec<String>,
    },
    /// Makes the next sync of the agreement's resources read everything again.
    ForceRefresh { name: String },
    /// Lifts a halt: the agreement's pending changes are tried again.
    Retry { name: String },
    /// Lets a resource's deletions through its deletion guard for one window,
    /// and resumes the agreement.
    AcceptDeletions { name: String, resource: String },
    /// Skips a resource's deletions that are waiting (their entries stay in
    /// the IDM), and resumes the agreement.
    DiscardDeletions { name: String, resource: String },
    /// Shows what a sync would change, with the IDM's checks, writing nothing.
    DryRun {
        name: String,
        /// Also list entries that would not change.
        #[arg(long)]
        all: bool,
    },
    /// Lists the entries a quarantining agreement parked.
    Parked { name: String },
    /// Sends a parked entry (or all) through the pipeline again.
    RetryParked {
        name: String,
        /// The parked message's number (`parked` shows it).
        #[arg(required_unless_present = "all")]
        seq: Option<u64>,
        #[arg(long, conflicts_with = "seq")]
        all: bool,
    },
    /// Drops a parked entry for good.
    DropParked { name: String, seq: u64 },
    /// Ends the agreement: its entries become the IDM's own.
    Finalise {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Ends the agreement and deletes every entry it created.
    Terminate {
        name: String,
        #[arg(long)]
        yes: bool,
    },
}

fn time(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    idsync_core::schedule::format_utc(ms.div_euclid(1000))
}

fn print_agreement(a: &v1::Agreement) {
    println!(
        "{}  {}{}  ({} entries)",
        a.name,
        status_word(a),
        if a.halted { ", HALTED" } else { "" },
        a.entries
    );
    println!("    last success: {}", time(a.last_success_ms));
    if let Some(e) = &a.last_error {
        println!("    last error:   {} at {}", e.reason, time(e.at_ms));
        if !e.dn.is_empty() {
            println!(
                "                  entry {} [{}] on {}",
                e.dn, e.entry_uuid, e.resource
            );
        }
        if !e.attribute.is_empty() {
            println!("                  attribute {}", e.attribute);
        }
    }
    if a.yield_attributes.is_empty() {
        println!("    yields:       nothing");
    } else {
        println!("    yields:       {}", a.yield_attributes.join(", "));
    }
    for t in &a.tokens {
        println!(
            "    token {:?} (id {}, issued {})",
            t.label,
            t.id,
            time(t.issued_at_ms)
        );
    }
}

fn agreement_json(a: &v1::Agreement) -> serde_json::Value {
    serde_json::json!({
        "name": a.name,
        "status": status_word(a),
        "halted": a.halted,
        "entries": a.entries,
        "last_success": (a.last_success_ms > 0).then(|| time(a.last_success_ms)),
        "last_error": a.last_error.as_ref().map(|e| serde_json::json!({
            "resource": e.resource, "dn": e.dn, "entry_uuid": e.entry_uuid,
            "attribute": e.attribute, "reason": e.reason, "at": time(e.at_ms),
        })),
        "yield_attributes": a.yield_attributes,
        "tokens": a.tokens.iter().map(|t| serde_json::json!({
            "label": t.label, "id": t.id, "issued": time(t.issued_at_ms),
        })).collect::<Vec<_>>(),
    })
}

/// Asks the operator to type the agreement's name.
fn confirm(what: &str, name: &str) -> Result<bool> {
    print!("{what}\nType the agreement's name ({name}) to go on: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == name)
}

pub async fn run(global: &Global, command: SyncCommand) -> Result<ExitCode> {
    match command {
        SyncCommand::Create { name } => {
            let (idm, _) = global.admin()?;
            let a = idm
                .create_agreement(&name)
                .await
                .with_context(|| format!("cannot create agreement {name:?}"))?;
            println!(
                "agreement {} created; give its services a token with `idsync sync generate-token {} <label>`",
                a.name, a.name
            );
        }
        SyncCommand::List { json } => {
            let (idm, url) = global.admin()?;
            let all = idm
                .list_agreements()
                .await
                .with_context(|| format!("cannot list agreements from the IDM at {url}"))?;
            if json {
                let out: Vec<_> = all.iter().map(agreement_json).collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if all.is_empty() {
                println!("no agreements");
            } else {
                all.iter().for_each(print_agreement);
            }
        }
        SyncCommand::Get { name, json } => {
            let (idm, _) = global.admin()?;
            let a = idm
                .get_agreement(&name)
                .await
                .with_context(|| format!("cannot read agreement {name:?}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&agreement_json(&a))?);
            } else {
                print_agreement(&a);
            }
        }
        SyncCommand::GenerateToken { name, label, out } => {
            let (idm, _) = global.admin()?;
            let token = idm
                .generate_token(&name, &label)
                .await
                .with_context(|| format!("cannot issue a token for agreement {name:?}"))?;
            match out {
                Some(path) => {
                    std::fs::write(&path, token.expose())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                    }
                    eprintln!(
                        "token {label:?} of agreement {name} written to {}",
                        path.display()
                    );
                }
                None => {
                    eprintln!(
                        "token {label:?} of agreement {name} (shown once; the IDM keeps only its hash):"
                    );
                    println!("{}", token.expose());
                }
            }
        }
        SyncCommand::DestroyToken { name, label } => {
            let (idm, _) = global.admin()?;
            let a = idm
                .destroy_token(&name, label.as_deref())
                .await
                .with_context(|| format!("cannot revoke tokens of agreement {name:?}"))?;
            match label {
                Some(l) => println!("token {l:?} of agreement {name} revoked"),
                None => println!("every token of agreement {name} revoked"),
            }
            println!("{} token(s) left", a.tokens.len());
        }
        SyncCommand::SetYieldAttributes { name, attributes } => {
            let (idm, _) = global.admin()?;
            let a = idm
                .set_yield_attributes(&name, &attributes)
                .await
                .with_context(|| format!("cannot set what agreement {name:?} yields"))?;
            if a.yield_attributes.is_empty() {
                println!("agreement {name} yields nothing");
            } else {
                println!("agreement {name} yields {}", a.yield_attributes.join(", "));
            }
        }
        SyncCommand::ForceRefresh { name } => {
            let config = global.config()?;
            let resources: Vec<_> = config.resources_of(&name).collect();
            if resources.is_empty() {
                bail!("no resource in the configuration writes under agreement {name:?}");
            }
            let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
            for r in &resources {
                bus.delete_cookie(&r.name).await?;
                bus.delete_cookie(&format!("{}.groups", r.name)).await?;
            }
            bus.client()
                .publish(idsync_bus::names::refresh_subject(&name), "".into())
                .await
                .context("cannot ask the detectors")?;
            bus.client()
                .flush()
                .await
                .context("cannot ask the detectors")?;
            println!(
                "agreement {name}: cookies of {} forgotten; running detectors read everything again now, others at their next start",
                resources
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        SyncCommand::Retry { name } => {
            let (idm, _) = global.admin()?;
            let a = idm
                .resume_agreement(&name)
                .await
                .with_context(|| format!("cannot resume agreement {name:?}"))?;
            println!(
                "agreement {} resumed; its pending changes are applied again (status {} until the next success)",
                a.name,
                status_word(&a)
            );
        }
        SyncCommand::AcceptDeletions { name, resource } => {
            let (idm, _) = global.admin()?;
            idm.accept_deletions(&name, &resource)
                .await
                .with_context(|| format!("cannot accept the deletions of {resource}"))?;
            println!("deletions of {resource} accepted for one window; agreement {name} resumed");
        }
        SyncCommand::DiscardDeletions { name, resource } => {
            let (idm, _) = global.admin()?;
            let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
            let through = bus.last_sequence(idsync_bus::names::CHANGES_STREAM).await?;
            idm.discard_deletions(&name, &resource, through)
                .await
                .with_context(|| format!("cannot discard the deletions of {resource}"))?;
            println!(
                "deletions of {resource} detected so far (through change {through}) discarded; agreement {name} resumed"
            );
        }
        SyncCommand::DryRun { name, all } => {
            let config = global.config()?;
            let (idm, _) = global.admin()?;
            let entries = sync::dry_run(&config, &idm, &name).await?;
            println!("dry run of agreement {name}: nothing is written\n");
            let (mut changing, mut refused, mut unchanged) = (0, 0, 0);
            for e in &entries {
                if !e.refusal.is_empty() {
                    refused += 1;
                    println!("  {}  [{}]  {}", e.dn, e.resource, e.decision);
                    for c in &e.changes {
                        println!("      {c}");
                    }
                    println!("      REFUSED: {}", e.refusal);
                } else if e.would_change() {
                    changing += 1;
                    println!("  {}  [{}]  {}", e.dn, e.resource, e.decision);
                    for c in &e.changes {
                        println!("      {c}");
                    }
                } else {
                    unchanged += 1;
                    if all {
                        println!("  {}  [{}]  {}", e.dn, e.resource, e.decision);
                    }
                }
            }
            println!(
                "\n{} entries read: {changing} would change, {refused} would be refused, {unchanged} unchanged or excluded",
                entries.len()
            );
            if refused > 0 {
                return Ok(ExitCode::from(3));
            }
        }
        SyncCommand::Parked { name } => {
            let config = global.config()?;
            let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
            let parked = sync::parked(&config, &bus, &name).await?;
            if parked.is_empty() {
                println!("agreement {name} has no parked entries");
            }
            for p in parked {
                println!(
                    "{}  {} [{}] on {}, parked by the {} at {}\n    {}",
                    p.seq,
                    p.dn,
                    p.entry_uuid,
                    p.resource,
                    p.service,
                    time(p.parked_at_ms),
                    p.reason
                );
            }
        }
        SyncCommand::RetryParked { name, seq, all } => {
            let config = global.config()?;
            let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
            let seqs: Vec<u64> = match seq {
                Some(s) => vec![s],
                None if all => sync::parked(&config, &bus, &name)
                    .await?
                    .into_iter()
                    .map(|p| p.seq)
                    .collect(),
                None => bail!("name a parked message, or --all"),
            };
            for s in &seqs {
                sync::retry_parked(&config, &bus, &name, *s).await?;
            }
            println!(
                "{} parked entr(ies) of agreement {name} sent again",
                seqs.len()
            );
        }
        SyncCommand::DropParked { name, seq } => {
            let config = global.config()?;
            let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
            sync::drop_parked(&config, &bus, &name, seq).await?;
            println!("parked message {seq} of agreement {name} dropped");
        }
        SyncCommand::Finalise { name, yes } => {
            let (idm, _) = global.admin()?;
            let a = idm.get_agreement(&name).await?;
            if !yes
                && !confirm(
                    &format!(
                        "Finalising agreement {name} makes its {} entries the IDM's own and revokes its tokens; its sources no longer write them.",
                        a.entries
                    ),
                    &name,
                )?
            {
                println!("nothing done");
                return Ok(ExitCode::from(1));
            }
            let n = idm.finalise_agreement(&name).await?;
            println!("agreement {name} finalised: {n} entries released to the IDM");
        }
        SyncCommand::Terminate { name, yes } => {
            let (idm, _) = global.admin()?;
            let a = idm.get_agreement(&name).await?;
            if !yes
                && !confirm(
                    &format!(
                        "Terminating agreement {name} DELETES the {} entries it created and revokes its tokens.",
                        a.entries
                    ),
                    &name,
                )?
            {
                println!("nothing done");
                return Ok(ExitCode::from(1));
            }
            let n = idm.terminate_agreement(&name).await?;
            println!("agreement {name} terminated: {n} entries deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc_iso() {
        assert_eq!(super::time(0), "never");
        assert_eq!(super::time(1_795_347_296_000), "2026-11-22T11:34:56Z");
        assert_eq!(super::time(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
