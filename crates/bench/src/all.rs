//! `idsync-bench all`: issue 8's scenarios in one run, each against its
//! baseline measured in the same run on the same data. Prints one summary
//! line per scenario at the end, and writes them to
//! `target/bench/results.json` and, as a chart of each measurement against
//! its target, `target/bench/results.svg`.

use std::time::{Duration, Instant};

use anyhow::Result;
use idsync_bus::{Bus, names};

use super::{
    Setup, Workers, baseline, imported, latency, profiled, run_reconcile, spawn, write_json,
};

/// The sizes of one run (`--import`, `--provision`, `--people`, `--changes`,
/// `--rate`, `--million`, `--scaling`).
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub import: usize,
    pub provision: usize,
    pub people: usize,
    pub changes: usize,
    pub rate: f64,
    pub million: usize,
    pub scaling: usize,
}

/// One scenario's result: what was measured against what, and the target.
#[derive(Debug, Clone)]
struct Line {
    scenario: String,
    /// Measured / baseline (or measured / limit): the chart's bar.
    ratio: f64,
    /// The target for `ratio` (1.0 for a limit); none for a measurement
    /// that is only reported (scaling, with its reason).
    target: Option<f64>,
    text: String,
}

impl Line {
    fn met(&self) -> Option<bool> {
        self.target.map(|t| self.ratio <= t)
    }
}

/// `[workers] inbound_concurrency` for the imports: as an administrator sets
/// it for a first import (the default, 1, keeps halts exact).
pub(crate) const IMPORT_CONCURRENCY: u32 = 256;

pub async fn all(sizes: Sizes) -> Result<()> {
    let mut lines = Vec::new();
    let mut json = serde_json::Map::new();

    // Initial import, then the same entries reconciled unchanged; the peak
    // memory of every process during the import.
    println!("== initial import of {} entries", sizes.import);
    let workers = Workers {
        inbound_concurrency: IMPORT_CONCURRENCY,
        appliers: 1,
    };
    let setup = Setup::start_with(sizes.import, Some(workers)).await?;
    let search = baseline(&setup.slapd, &setup.password_file).await?;
    let (reconcile_peak, took) = profiled("import", async {
        let started = Instant::now();
        let (_, _, peak) = run_reconcile(&setup.config, &setup.admin_file).await?;
        Ok((peak, imported(&setup, sizes.import, started).await?))
    })
    .await?;
    let cpu = setup.cpu_seconds();
    let ratio = took.as_secs_f64() / search.as_secs_f64();
    println!(
        "  {:.1}s ({:.0} users/s), ldapsearch {:.2}s: {ratio:.0}x; CPU seconds: {}",
        took.as_secs_f64(),
        sizes.import as f64 / took.as_secs_f64(),
        search.as_secs_f64(),
        show_cpu(&cpu)
    );
    lines.push(Line {
        scenario: format!("initial import, {} entries", sizes.import),
        ratio,
        target: Some(5.0),
        text: format!(
            "{:.1}s ({:.0} users/s) vs ldapsearch {:.2}s",
            took.as_secs_f64(),
            sizes.import as f64 / took.as_secs_f64(),
            search.as_secs_f64()
        ),
    });
    let mut peaks = serde_json::Map::new();
    peaks.insert("reconcile".into(), serde_json::json!(reconcile_peak));
    setup.peaks(&mut peaks, "import");
    let search_again = baseline(&setup.slapd, &setup.password_file).await?;
    let (same, same_time, same_peak) = profiled(
        "reconcile-unchanged",
        run_reconcile(&setup.config, &setup.admin_file),
    )
    .await?;
    let unchanged_ratio = same_time.as_secs_f64() / search_again.as_secs_f64();
    println!(
        "  reconciliation of the same entries, unchanged: {:.2}s, {} events, {} deletions; ldapsearch {:.2}s: {unchanged_ratio:.1}x",
        same_time.as_secs_f64(),
        same["changed"],
        same["deleted"],
        search_again.as_secs_f64()
    );
    let events =
        same["changed"].as_u64().unwrap_or(u64::MAX) + same["deleted"].as_u64().unwrap_or(u64::MAX);
    lines.push(Line {
        scenario: format!("reconciliation, {} unchanged", sizes.import),
        ratio: unchanged_ratio,
        target: Some(2.0),
        text: format!(
            "{:.2}s, {events} events vs ldapsearch {:.2}s",
            same_time.as_secs_f64(),
            search_again.as_secs_f64()
        ),
    });
    if events != 0 {
        lines.push(Line {
            scenario: "reconciliation, unchanged: events".into(),
            ratio: f64::INFINITY,
            target: Some(0.0),
            text: format!("{events} events published for unchanged entries"),
        });
    }
    peaks.insert("reconcile unchanged".into(), serde_json::json!(same_peak));
    json.insert(
        "import".into(),
        serde_json::json!({
            "entries": sizes.import,
            "inbound_concurrency": workers.inbound_concurrency,
            "seconds": took.as_secs_f64(),
            "ldapsearch_seconds": search.as_secs_f64(),
            "cpu_seconds": cpu,
            "unchanged_reconcile_seconds": same_time.as_secs_f64(),
            "unchanged_ldapsearch_seconds": search_again.as_secs_f64(),
            "unchanged_reconcile": same,
            "peak_rss_kib": peaks,
        }),
    );
    setup.stop().await;

    println!("== import with provisioning of {} people", sizes.provision);
    let provisioning = latency::provisioning(sizes.provision).await?;
    lines.push(Line {
        scenario: format!("import with provisioning, {}", sizes.provision),
        ratio: provisioning["ratio"].as_f64().unwrap_or(f64::INFINITY),
        target: Some(1.5),
        text: format!(
            "{:.1}s vs ldapadd {:.2}s",
            provisioning["seconds"].as_f64().unwrap_or_default(),
            provisioning["ldapadd_seconds"].as_f64().unwrap_or_default()
        ),
    });
    json.insert("provisioning".into(), provisioning);

    println!(
        "== live sync, {} modifications at {}/s",
        sizes.changes, sizes.rate
    );
    let live = latency::latency(sizes.people, sizes.changes, sizes.rate).await?;
    for (key, what, limit) in [
        ("to_idm_ms", "source → IDM", 25.0),
        ("to_target_ms", "source → target", 50.0),
    ] {
        let p99 = live[key]["p99"].as_f64().unwrap_or(f64::INFINITY);
        lines.push(Line {
            scenario: format!("live sync p99, {what}"),
            ratio: p99 / limit,
            target: Some(1.0),
            text: format!(
                "p50 {:.1} ms, p99 {p99:.1} ms (limit {limit} ms)",
                live[key]["p50"].as_f64().unwrap_or_default()
            ),
        });
    }
    json.insert("live_sync".into(), live);

    println!(
        "== reconciliation of {} new entries (memory)",
        sizes.million
    );
    let big = Setup::start(sizes.million, false).await?;
    let search = baseline(&big.slapd, &big.password_file).await?;
    let (summary, big_time, big_peak) = run_reconcile(&big.config, &big.admin_file).await?;
    let mut big_peaks = serde_json::Map::new();
    big_peaks.insert("reconcile".into(), serde_json::json!(big_peak));
    big.peaks(&mut big_peaks, "million");
    println!(
        "  {:.1}s, {} events; ldapsearch {:.2}s ({:.1}x)",
        big_time.as_secs_f64(),
        summary["changed"],
        search.as_secs_f64(),
        big_time.as_secs_f64() / search.as_secs_f64()
    );
    big.stop().await;
    json.insert(
        "million".into(),
        serde_json::json!({
            "entries": sizes.million,
            "seconds": big_time.as_secs_f64(),
            "ldapsearch_seconds": search.as_secs_f64(),
            "summary": summary,
            "peak_rss_kib": big_peaks,
        }),
    );
    let mut all_peaks: Vec<(String, u64)> = Vec::new();
    for (scenario, peaks) in [
        ("import", &json["import"]["peak_rss_kib"]),
        ("provisioning", &json["provisioning"]["peak_rss_kib"]),
        ("million", &json["million"]["peak_rss_kib"]),
    ] {
        for (name, kib) in peaks.as_object().into_iter().flatten() {
            all_peaks.push((format!("{scenario}: {name}"), kib.as_u64().unwrap_or(0)));
        }
    }
    let (worst, worst_kib) = all_peaks
        .iter()
        .max_by_key(|(_, k)| *k)
        .cloned()
        .unwrap_or_default();
    lines.push(Line {
        scenario: "peak RSS, any process".into(),
        ratio: worst_kib as f64 / (256.0 * 1024.0),
        target: Some(1.0),
        text: format!("{} MiB at most ({worst}; limit 256 MiB)", worst_kib / 1024),
    });

    // Scaling, and where the time goes: the same import at the import's
    // settings with one applier, then two; then staged, each worker alone.
    println!(
        "== scaling: import of {} entries, one applier then two",
        sizes.scaling
    );
    let mut rates = Vec::new();
    for appliers in [1, 2] {
        let setup = Setup::start_with(
            sizes.scaling,
            Some(Workers {
                inbound_concurrency: IMPORT_CONCURRENCY,
                appliers,
            }),
        )
        .await?;
        let started = Instant::now();
        run_reconcile(&setup.config, &setup.admin_file).await?;
        let took = imported(&setup, sizes.scaling, started).await?;
        let cpu = setup.cpu_seconds();
        println!(
            "  {appliers} applier(s): {:.1}s ({:.0} users/s); CPU seconds: {}",
            took.as_secs_f64(),
            sizes.scaling as f64 / took.as_secs_f64(),
            show_cpu(&cpu)
        );
        rates.push(serde_json::json!({
            "appliers": appliers,
            "seconds": took.as_secs_f64(),
            "users_per_second": sizes.scaling as f64 / took.as_secs_f64(),
            "cpu_seconds": cpu,
        }));
        setup.stop().await;
    }
    let staged = staged(sizes.scaling, IMPORT_CONCURRENCY).await?;
    let speedup = rates[0]["seconds"].as_f64().unwrap_or_default()
        / rates[1]["seconds"].as_f64().unwrap_or(f64::INFINITY);
    lines.push(Line {
        scenario: "scaling, 2 appliers vs 1".into(),
        ratio: speedup,
        target: None,
        text: format!(
            "{speedup:.2}x the throughput; alone: detector {:.1}s, correlator {:.1}s, applier {:.1}s",
            staged["publish_seconds"].as_f64().unwrap_or_default(),
            staged["correlate_seconds"].as_f64().unwrap_or_default(),
            staged["apply_seconds"].as_f64().unwrap_or_default(),
        ),
    });
    json.insert(
        "scaling".into(),
        serde_json::json!({ "runs": rates, "staged": staged }),
    );

    println!("== summary");
    for l in &lines {
        let target = l
            .target
            .map_or("reported".to_owned(), |t| format!("target {t}"));
        let met = match l.met() {
            Some(true) => "met    ",
            Some(false) => "NOT MET",
            None => "       ",
        };
        println!(
            "{:<40} {:>8.2} ({target:>10}) {met}  {}",
            l.scenario, l.ratio, l.text
        );
    }
    json.insert(
        "summary".into(),
        serde_json::Value::Array(
            lines
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "scenario": l.scenario,
                        "ratio": l.ratio,
                        "target": l.target,
                        "met": l.met(),
                        "text": l.text,
                    })
                })
                .collect(),
        ),
    );
    write_json("results.json", &serde_json::Value::Object(json))?;
    std::fs::write("target/bench/results.svg", chart(&lines))?;
    println!("written: target/bench/results.svg");
    Ok(())
}

/// The import taken apart: the reconciliation publishes every event with
/// no worker running, then the correlator alone decides them all, then the
/// applier alone applies them: each stage's own wall time and CPU.
pub(crate) async fn staged(entries: usize, concurrency: u32) -> Result<serde_json::Value> {
    println!(
        "== where the time goes: import of {entries} entries, one stage at a time (inbound_concurrency {concurrency})"
    );
    let mut setup = Setup::start_configured(entries, concurrency, None).await?;
    let bus = Bus::connect(&setup.nats_url).await?;
    let (_, publish, _) = run_reconcile(&setup.config, &setup.admin_file).await?;
    let last = bus.last_sequence(names::CHANGES_STREAM).await?;
    let t0 = Instant::now();
    setup.procs.push(
        spawn(
            "correlator",
            "idsync-correlator",
            &setup.config,
            &setup.work,
        )
        .await?,
    );
    while !bus
        .consumed_through(names::CHANGES_STREAM, names::CORRELATOR, last)
        .await?
    {
        if t0.elapsed() > Duration::from_secs(3600) {
            anyhow::bail!("the correlator did not finish");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let correlate = t0.elapsed();
    let t1 = Instant::now();
    setup
        .procs
        .push(spawn("applier", "idsync-applier", &setup.config, &setup.work).await?);
    let apply = imported(&setup, entries, t1).await?;
    let cpu = setup.cpu_seconds();
    println!(
        "  publish (reconcile) {:.1}s, correlate {:.1}s, apply {:.1}s; CPU seconds: {}",
        publish.as_secs_f64(),
        correlate.as_secs_f64(),
        apply.as_secs_f64(),
        show_cpu(&cpu)
    );
    setup.stop().await;
    Ok(serde_json::json!({
        "entries": entries,
        "inbound_concurrency": concurrency,
        "publish_seconds": publish.as_secs_f64(),
        "correlate_seconds": correlate.as_secs_f64(),
        "apply_seconds": apply.as_secs_f64(),
        "cpu_seconds": cpu,
    }))
}

pub(crate) fn show_cpu(cpu: &serde_json::Map<String, serde_json::Value>) -> String {
    cpu.iter()
        .map(|(k, v)| format!("{k} {:.1}", v.as_f64().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each line's measurement as a bar against its target (the line at 1×),
/// on a logarithmic scale from 0.1× to 1000× the target.
fn chart(lines: &[Line]) -> String {
    let (left, width, row) = (330.0, 420.0, 28.0);
    let height = row * lines.len() as f64 + 50.0;
    let x = |v: f64| left + width * ((v.clamp(0.1, 1000.0)).log10() + 1.0) / 4.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        w = left + width + 20.0
    );
    for (i, l) in lines.iter().enumerate() {
        let y = 10.0 + row * i as f64;
        let of_target = match l.target {
            Some(t) if t > 0.0 => l.ratio / t,
            Some(_) => 1000.0,
            None => l.ratio,
        };
        let (colour, unit) = match l.met() {
            Some(true) => ("#4a8", "target"),
            Some(false) => ("#d64", "target"),
            None => ("#999", "(reported, no target)"),
        };
        svg.push_str(&format!(
            "<text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{name}</text>\n\
             <rect x=\"{left}\" y=\"{y}\" width=\"{bw:.1}\" height=\"18\" fill=\"{colour}\"/>\n\
             <text x=\"{vx:.1}\" y=\"{ty}\">{of_target:.1}× {unit}</text>\n",
            tx = left - 8.0,
            ty = y + 13.0,
            name = escape(&l.scenario),
            bw = x(of_target) - left,
            vx = x(of_target) + 4.0,
        ));
    }
    let axis_y = 10.0 + row * lines.len() as f64;
    for (v, label) in [
        (0.1, "0.1×"),
        (1.0, "target"),
        (10.0, "10×"),
        (100.0, "100×"),
        (1000.0, "1000×"),
    ] {
        svg.push_str(&format!(
            "<line x1=\"{p:.1}\" y1=\"5\" x2=\"{p:.1}\" y2=\"{axis_y}\" stroke=\"{c}\" stroke-dasharray=\"3,3\"/>\n\
             <text x=\"{p:.1}\" y=\"{ly}\" text-anchor=\"middle\">{label}</text>\n",
            p = x(v),
            c = if v == 1.0 { "#000" } else { "#aaa" },
            ly = axis_y + 16.0,
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
