//! `idsync events …`: the change events JetStream keeps, shown, simulated
//! against a configuration (or two, to compare), or replayed into the
//! pipeline.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::Subcommand;
use idsync::replay::{self, Slice, StoredEvent};
use idsync_bus::names;
use idsync_proto::v1;
use prost::Message as _;

use crate::Global;

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// The last change events, newest last.
    Tail {
        #[arg(long)]
        resource: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        last: usize,
        /// Look back at most this many stream messages.
        #[arg(long, default_value_t = 10_000)]
        window: u64,
    },
    /// One change event in full (password values hidden).
    Show { seq: u64 },
    /// Replays a slice of events: by default a simulation that prints, per
    /// event, the situation, the reaction and the changes it would make to
    /// the IDM and to each target — writing nothing anywhere.
    Replay {
        #[command(flatten)]
        slice: SliceArgs,
        /// Also simulate with this configuration and print only the events
        /// whose outcome differs (preview a mapping change on real traffic).
        #[arg(long, value_name = "FILE", conflicts_with = "into_pipeline")]
        against: Option<std::path::PathBuf>,
        /// Publish the events again into the live pipeline instead.
        #[arg(long)]
        into_pipeline: bool,
        /// With --into-pipeline: also events without a CSN (which would roll
        /// back a newer change of their entry).
        #[arg(long, requires = "into_pipeline")]
        allow_without_csn: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Which events: any combination narrows the slice.
#[derive(Debug, clap::Args)]
pub struct SliceArgs {
    /// From this stream sequence on.
    #[arg(long)]
    from_seq: Option<u64>,
    /// Up to this stream sequence.
    #[arg(long)]
    to_seq: Option<u64>,
    /// Detected within this long before now: `90s`, `15m`, `2h`, `1d`.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    resource: Option<String>,
    /// One entry: its UUID or its DN.
    #[arg(long)]
    entry: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

impl SliceArgs {
    fn slice(&self) -> Result<Slice> {
        let since_ms = match &self.since {
            Some(s) => Some(now_ms() - parse_age(s)?),
            None => None,
        };
        Ok(Slice {
            from_seq: self.from_seq,
            to_seq: self.to_seq,
            since_ms,
            resource: self.resource.clone(),
            entry: self.entry.clone(),
            limit: self.limit,
        })
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `90s`, `15m`, `2h`, `1d` in milliseconds.
fn parse_age(text: &str) -> Result<i64> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = number
        .parse()
        .with_context(|| format!("--since {text:?}: a number and s, m, h or d (\"15m\")"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("--since {text:?}: the unit is s, m, h or d (\"15m\")"),
    };
    Ok(n.saturating_mul(ms))
}

pub async fn run(global: &Global, command: EventsCommand) -> Result<ExitCode> {
    let bus = idsync_bus::Bus::connect(&global.nats_url()?).await?;
    match command {
        EventsCommand::Tail {
            resource,
            last,
            window,
        } => {
            let events = replay::tail(&bus, resource.as_deref(), last, window).await?;
            if events.is_empty() {
                println!("no change events");
            }
            for e in &events {
                println!("{}", line(e));
            }
        }
        EventsCommand::Show { seq } => {
            let m = bus
                .peek(names::CHANGES_STREAM, seq, 1)
                .await?
                .into_iter()
                .next()
                .filter(|m| m.stream_seq == seq)
                .with_context(|| format!("no change event {seq} (aged out, or never there)"))?;
            let event = v1::ChangeEvent::decode(m.payload.as_ref())
                .with_context(|| format!("message {seq} is not a change event"))?;
            print_event(&StoredEvent { seq, event });
        }
        EventsCommand::Replay {
            slice,
            against,
            into_pipeline,
            allow_without_csn,
            json,
        } => {
            let events = replay::select(&bus, &slice.slice()?).await?;
            if into_pipeline {
                let n = replay::republish(&bus, &events, allow_without_csn).await?;
                println!("{n} events published again into the pipeline");
                return Ok(ExitCode::SUCCESS);
            }
            let config = global.config()?;
            let (idm, _) = global.admin()?;
            let simulated = replay::simulate(&config, &idm, &events).await?;
            if let Some(other) = against {
                let other_config = idsync_runtime::load_config(&other)?;
                let theirs = replay::simulate(&other_config, &idm, &events).await?;
                let diffs = replay::differences(&simulated, &theirs);
                if json {
                    let out: Vec<_> = diffs
                        .iter()
                        .map(|(a, b)| serde_json::json!({"current": a, "against": b}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&out)?);
                } else {
                    println!(
                        "{} events replayed; {} differ with {}",
                        events.len(),
                        diffs.len(),
                        other.display()
                    );
                    for (a, b) in &diffs {
                        println!("{}  {} {} ({})", a.seq, a.resource, a.dn, a.kind);
                        print_outcome("  current: ", a);
                        print_outcome("  against: ", b);
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&simulated)?);
            } else {
                println!("{} events simulated; nothing written", simulated.len());
                for s in &simulated {
                    println!("{}  {} {} ({})", s.seq, s.resource, s.dn, s.kind);
                    print_outcome("  ", s);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_outcome(prefix: &str, s: &replay::Simulated) {
    println!("{prefix}{}", s.decision);
    for c in &s.idm {
        println!("{prefix}  idm: {c}");
    }
    for t in &s.targets {
        println!("{prefix}  {t}");
    }
    if !s.refusal.is_empty() {
        println!("{prefix}  refused: {}", s.refusal);
    }
}

fn kind(e: &v1::ChangeEvent) -> &'static str {
    if e.kind == v1::ChangeKind::Delete as i32 {
        "delete"
    } else {
        "upsert"
    }
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    idsync_core::schedule::format_utc(ms / 1000)
}

fn line(e: &StoredEvent) -> String {
    format!(
        "{}  {}  {} {} {} ({})",
        e.seq,
        when(e.event.detected_at_ms),
        e.event.resource,
        kind(&e.event),
        e.event.dn,
        e.event.entry_uuid
    )
}

fn print_event(e: &StoredEvent) {
    println!("{}", line(e));
    println!("  event id: {}", e.event.event_id);
    if let Some(p) = &e.event.position {
        println!("  csn: {}", if p.csn.is_empty() { "-" } else { &p.csn });
    }
    for a in &e.event.attributes {
        for v in &a.values {
            let shown = if replay::is_secret(&a.name) {
                format!("({} bytes, hidden)", v.len())
            } else {
                match std::str::from_utf8(v) {
                    Ok(text) => text.to_owned(),
                    Err(_) => format!(
                        "(base64) {}",
                        base64::engine::general_purpose::STANDARD.encode(v)
                    ),
                }
            };
            println!("  {}: {shown}", a.name);
        }
    }
}
