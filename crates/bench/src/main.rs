//! `idsync-bench`: measures idsync on real servers, each service its own
//! process, against a baseline taken in the same run on the same data.
//!
//! `idsync-bench reconcile [--entries N] [--import M]` seeds a source directory with N
//! people (offline, `slapadd`), starts NATS, the IDM, the correlator and the
//! applier as separate processes from the binaries beside this one, and runs
//! `idsync reconcile` twice: first over a source the IDM has never seen (every
//! entry becomes an event and is imported), then over the same, unchanged
//! entries (no event may come out). The baseline is `ldapsearch` of the same
//! entries with the same attributes, paged the same way. It prints one line
//! per measurement, the peak resident memory of every process, and writes the
//! numbers as JSON to `target/bench/reconcile.json`.
//!
//! `idsync-bench latency [--people N] [--changes M] [--rate R]` runs the
//! whole pipeline with live sync and a target, and times M single
//! modifications at R a second from the source's modify to the IDM's commit
//! and to the target's entry, against the source's own modify round trip
//! (`target/bench/latency.json`).
//!
//! `idsync-bench store [--commits N]` times the IDM store's commits and
//! reads on the embedded store and on PostgreSQL (`target/bench/store.json`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use idsync_core::secret::Secret;
use idsync_idm_client::IdmClient;
use idsync_testkit::{NatsServer, Slapd, SlapdOptions, free_port};
use tokio::process::{Child, Command};

mod all;
mod latency;
mod store;

const SUFFIX: &str = "dc=example,dc=com";
const PEOPLE: &str = "ou=people,dc=example,dc=com";
/// The directories' admin password and the IDM's admin credential (made up
/// for the run; the processes read them from files).
const PASSWORD: &str = "bench-secret-password";
const ADMIN: &str = "bench-admin-credential-0123456789";

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |flag: &str, default: usize| -> Result<usize> {
        match args.iter().position(|a| a == flag) {
            Some(i) => args
                .get(i + 1)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{flag} needs a number")),
            None => Ok(default),
        }
    };
    match args.first().map(String::as_str) {
        Some("reconcile") => {
            reconcile(number("--entries", 100_000)?, number("--import", 5_000)?).await
        }
        Some("latency") => latency::latency(
            number("--people", 1_000)?,
            number("--changes", 1_000)?,
            number("--rate", 20)? as f64,
        )
        .await
        .map(drop),
        Some("provisioning") => {
            let report = latency::provisioning(number("--people", 10_000)?).await?;
            write_json("provisioning.json", &report)
        }
        Some("all") => {
            all::all(all::Sizes {
                import: number("--import", 100_000)?,
                provision: number("--provision", 20_000)?,
                people: number("--people", 1_000)?,
                changes: number("--changes", 1_000)?,
                rate: number("--rate", 20)? as f64,
                million: number("--million", 1_000_000)?,
                scaling: number("--scaling", 20_000)?,
            })
            .await
        }
        Some("import") => {
            let levels = match args.iter().position(|a| a == "--concurrency") {
                Some(_) => vec![u32::try_from(number("--concurrency", 1)?)?],
                None => vec![1, 16],
            };
            import(number("--entries", 10_000)?, &levels).await
        }
        Some("staged") => {
            let report = all::staged(
                number("--entries", 20_000)?,
                u32::try_from(number("--concurrency", 1)?)?,
            )
            .await?;
            write_json("staged.json", &report)
        }
        Some("store") => {
            let n = number("--commits", 5_000)?;
            // The store client blocks: off the async runtime.
            tokio::task::spawn_blocking(move || store::store(n)).await?
        }
        _ => bail!(
            "usage: idsync-bench all [--import N] [--provision N] [--people N] [--changes M] [--rate R] [--million N] [--scaling N] | reconcile [--entries N] [--import M] | import [--entries N] [--concurrency C] | staged [--entries N] [--concurrency C] | provisioning [--people N] | latency [--people N] [--changes M] [--rate R] | store [--commits N]"
        ),
    }
}

/// The binaries built beside this one.
fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("no directory for the binaries")?
        .join(name);
    if !path.exists() {
        bail!("{} is missing: build it with scripts/bench", path.display());
    }
    Ok(path)
}

fn seed(entries: usize) -> String {
    let mut ldif = format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
         dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
    );
    for i in 0..entries {
        ldif.push_str(&format!(
            "dn: uid=u{i},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: User {i}\n\
             givenName: User\nsn: Number{i}\nmail: u{i}@example.com\n\n"
        ));
    }
    ldif
}

fn config(
    nats: &str,
    idm_port: u16,
    source: &str,
    secrets: &Path,
    data: &Path,
    inbound_concurrency: u32,
) -> String {
    format!(
        r#"version = 1
[workers]
inbound_concurrency = {inbound_concurrency}
[nats]
url = "{nats}"
[idm]
url = "http://127.0.0.1:{idm_port}"
listen = "127.0.0.1:{idm_port}"
data_dir = "{data}"
admin_token_file = "{admin}"
[agreements.hr]
token_file = "{token}"
on_error = "quarantine"
[[resources]]
name = "hr"
agreement = "hr"
url = "{source}"
bind_dn = "cn=admin,{SUFFIX}"
bind_password_file = "{password}"
base_dn = "{PEOPLE}"
filter = "(objectClass=inetOrgPerson)"
[[resources.inbound]]
source = "uid"
target = "name"
strength = "strong"
[[resources.inbound]]
source = "cn"
target = "fullName"
[[resources.inbound]]
source = "givenName"
target = "givenName"
[[resources.inbound]]
source = "sn"
target = "familyName"
[[resources.inbound]]
source = "mail"
target = "mail"
[[resources.correlation]]
conditions = [{{ focus_attribute = "name", source = "uid" }}]
[resources.reactions]
linked = {{ action = "synchronize" }}
unlinked = {{ action = "link" }}
unmatched = {{ action = "add_focus" }}
deleted = {{ action = "delete_focus" }}
"#,
        data = data.display(),
        admin = secrets.join("admin").display(),
        token = secrets.join("hr.token").display(),
        password = secrets.join("hr").display(),
    )
}

/// A service process.
struct Proc {
    name: &'static str,
    child: Child,
}

/// The peak resident set (VmHWM) of a running process, in KiB.
fn peak_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user and system) a running process has used, from
/// `/proc/<pid>/stat` (in clock ticks of 1/100 s, Linux's USER_HZ).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", pid.unwrap_or(0))) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count from after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15: 12 and 13 after the name.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Starts the IDM, waits until it answers, creates agreement `hr` and
/// writes its token to `secrets/hr.token` for the workers to read.
async fn start_idm(
    config: &Path,
    work: &Path,
    port: u16,
    secrets: &Path,
) -> Result<(Proc, IdmClient)> {
    let proc = spawn("idm", "idsync-idm", config, work).await?;
    let idm = IdmClient::new(&format!("http://127.0.0.1:{port}"), &Secret::new(ADMIN))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match idm.create_agreement("hr").await {
            Ok(_) => break,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("the IDM did not come up"),
        }
    }
    let token = idm.generate_token("hr", "bench").await?;
    std::fs::write(secrets.join("hr.token"), token.expose())?;
    Ok((proc, idm))
}

async fn spawn(name: &'static str, binary: &str, config: &Path, log: &Path) -> Result<Proc> {
    let log = std::fs::File::create(log.join(format!("{name}.log")))?;
    let child = Command::new(bin(binary)?)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {binary}"))?;
    Ok(Proc { name, child })
}

/// Runs `idsync reconcile hr --json`, sampling its peak memory; returns its
/// summary, wall time and peak.
async fn run_reconcile(config: &Path, admin: &Path) -> Result<(serde_json::Value, Duration, u64)> {
    let started = Instant::now();
    let mut child = Command::new(bin("idsync")?)
        .args(["reconcile", "hr", "--json"])
        .env("IDSYNC_CONFIG", config)
        .env("IDSYNC_ADMIN_TOKEN_FILE", admin)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        if let Some(k) = peak_kib(pid) {
            peak = peak.max(k);
        }
        tokio::select! {
            s = child.wait() => break s?,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    let elapsed = started.elapsed();
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use tokio::io::AsyncReadExt as _;
        stdout.read_to_string(&mut out).await?;
    }
    if !status.success() {
        bail!("idsync reconcile failed: {out}");
    }
    let summary = serde_json::from_str(out.lines().last().unwrap_or_default())
        .with_context(|| format!("unexpected output: {out}"))?;
    Ok((summary, elapsed, peak))
}

/// `ldapsearch` of the same entries and attributes, paged as idsync pages.
async fn baseline(slapd: &Slapd, password_file: &Path) -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new("ldapsearch")
        .args([
            "-x",
            "-LLL",
            "-H",
            slapd.url(),
            "-D",
            &format!("cn=admin,{SUFFIX}"),
        ])
        .arg("-y")
        .arg(password_file)
        .args([
            "-b",
            PEOPLE,
            "-E",
            "pr=500/noprompt",
            "(objectClass=inetOrgPerson)",
            "*",
            "entryUUID",
            "entryCSN",
        ])
        .stdout(Stdio::null())
        .status()
        .await
        .context("cannot run ldapsearch (scripts/install-deps installs ldap-utils)")?;
    if !status.success() {
        bail!("ldapsearch failed: {status}");
    }
    Ok(started.elapsed())
}

/// Servers and services for one measurement.
struct Setup {
    work: PathBuf,
    config: PathBuf,
    admin_file: PathBuf,
    password_file: PathBuf,
    slapd: Slapd,
    _nats: NatsServer,
    nats_url: String,
    idm: IdmClient,
    procs: Vec<Proc>,
}

/// The workers a [`Setup`] starts.
#[derive(Debug, Clone, Copy)]
struct Workers {
    /// `[workers] inbound_concurrency`: messages the correlator and each
    /// applier handle at once.
    inbound_concurrency: u32,
    /// Applier processes (replicas on one durable consumer).
    appliers: usize,
}

impl Workers {
    const DEFAULT: Self = Self {
        inbound_concurrency: 1,
        appliers: 1,
    };
}

impl Setup {
    async fn start(entries: usize, workers: bool) -> Result<Self> {
        Self::start_with(entries, workers.then_some(Workers::DEFAULT)).await
    }

    /// As [`Setup::start`], with these workers (none: only the IDM).
    async fn start_with(entries: usize, workers: Option<Workers>) -> Result<Self> {
        let inbound_concurrency = workers.map_or(1, |w| w.inbound_concurrency);
        Self::start_configured(entries, inbound_concurrency, workers).await
    }

    /// As [`Setup::start_with`], the configuration's `inbound_concurrency`
    /// set apart from the workers started (staging starts its own later).
    async fn start_configured(
        entries: usize,
        inbound_concurrency: u32,
        workers: Option<Workers>,
    ) -> Result<Self> {
        let work = tempfile_dir()?;
        let secrets = work.join("secrets");
        std::fs::create_dir_all(&secrets)?;
        let (password, admin) = (PASSWORD, ADMIN);
        for (file, value) in [("hr", password), ("admin", admin)] {
            std::fs::write(secrets.join(file), value)?;
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(secrets.join(file), std::fs::Permissions::from_mode(0o600))?;
        }
        let seeded = Instant::now();
        let slapd = Slapd::start(SlapdOptions {
            suffix: SUFFIX.into(),
            admin_password: password.into(),
            seed_ldif: seed(entries),
            session_log: true,
        })
        .await?;
        eprintln!(
            "seeded {entries} entries (slapadd) in {:.1}s",
            seeded.elapsed().as_secs_f64()
        );
        let nats = NatsServer::start_in(&work.join("nats")).await?;
        let idm_port = free_port()?;
        let config_path = work.join("idsync.toml");
        std::fs::write(
            &config_path,
            config(
                nats.url(),
                idm_port,
                slapd.url(),
                &secrets,
                &work.join("idm"),
                inbound_concurrency,
            ),
        )?;
        let (idm_proc, idm) = start_idm(&config_path, &work, idm_port, &secrets).await?;
        let mut procs = vec![idm_proc];
        if let Some(w) = workers {
            procs.push(spawn("correlator", "idsync-correlator", &config_path, &work).await?);
            for i in 0..w.appliers {
                let name = if i == 0 { "applier" } else { "applier-2" };
                procs.push(spawn(name, "idsync-applier", &config_path, &work).await?);
            }
        }
        Ok(Self {
            nats_url: nats.url().to_owned(),
            config: config_path,
            admin_file: secrets.join("admin"),
            password_file: secrets.join("hr"),
            work,
            slapd,
            _nats: nats,
            idm,
            procs,
        })
    }

    /// CPU seconds (user and system) each service process has used so far.
    fn cpu_seconds(&self) -> serde_json::Map<String, serde_json::Value> {
        self.procs
            .iter()
            .map(|p| {
                (
                    p.name.to_owned(),
                    serde_json::json!(cpu_seconds(p.child.id())),
                )
            })
            .collect()
    }

    fn peaks(&self, into: &mut serde_json::Map<String, serde_json::Value>, phase: &str) {
        for p in &self.procs {
            let peak = peak_kib(p.child.id()).unwrap_or(0);
            println!("  peak RSS {}: {} MiB", p.name, peak / 1024);
            into.insert(format!("{phase}: {}", p.name), serde_json::json!(peak));
        }
    }

    async fn stop(mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Waits until the IDM holds `entries` live shadows of the source.
async fn imported(setup: &Setup, entries: usize, started: Instant) -> Result<Duration> {
    loop {
        let live = setup.idm.live_shadows("hr").await?;
        if live >= entries as u64 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("import stalled at {live} of {entries}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One import: a reconciliation publishes every entry; correlator, applier
/// and IDM take them in. Returns its wall time and `ldapsearch`'s.
async fn timed_import(setup: &Setup, entries: usize) -> Result<(Duration, Duration)> {
    let search = baseline(&setup.slapd, &setup.password_file).await?;
    let started = Instant::now();
    run_reconcile(&setup.config, &setup.admin_file).await?;
    Ok((imported(setup, entries, started).await?, search))
}

/// The same import with the workers handling one message at a time, then
/// sixteen: what concurrency within a replica gives, measured in one run on
/// the same data.
async fn import(entries: usize, levels: &[u32]) -> Result<()> {
    let mut results = serde_json::Map::new();
    for &concurrency in levels {
        let workers = Workers {
            inbound_concurrency: concurrency,
            appliers: 1,
        };
        let setup = Setup::start_with(entries, Some(workers)).await?;
        let (took, search) = profiled(
            &format!("import-{concurrency}"),
            timed_import(&setup, entries),
        )
        .await?;
        let cpu = setup.cpu_seconds();
        println!(
            "import of {entries} entries, correlator and applier concurrency {concurrency}: {:.1}s ({:.0} users/s; {:.0}x ldapsearch's {:.2}s); CPU seconds: {}",
            took.as_secs_f64(),
            entries as f64 / took.as_secs_f64(),
            took.as_secs_f64() / search.as_secs_f64(),
            search.as_secs_f64(),
            all::show_cpu(&cpu)
        );
        setup.peaks(&mut serde_json::Map::new(), "import");
        results.insert(
            format!("concurrency {concurrency}"),
            serde_json::json!({
                "seconds": took.as_secs_f64(),
                "users_per_second": entries as f64 / took.as_secs_f64(),
                "ldapsearch_seconds": search.as_secs_f64(),
            }),
        );
        setup.stop().await;
    }
    write_json("import.json", &serde_json::Value::Object(results))
}

/// With `IDSYNC_BENCH_PERF` set, a system-wide `perf record` while `work`
/// runs, kept as `target/bench/<name>.perf`, and the CPU samples by process
/// and binary printed: where the time of a scenario goes, every process of
/// it at once (`perf report -i target/bench/<name>.perf` for the functions).
async fn profiled<T>(name: &str, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    if std::env::var_os("IDSYNC_BENCH_PERF").is_none() {
        return work.await;
    }
    std::fs::create_dir_all("target/bench")?;
    let out = format!("target/bench/{name}.perf");
    let mut perf = Command::new("perf")
        .args(["record", "-F", "499", "-a", "-o", &out])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run perf (Debian's linux-perf)")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = work.await;
    let pid = perf.id().context("perf ended early")?;
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await?;
    perf.wait().await?;
    let report = Command::new("perf")
        .args([
            "report",
            "-i",
            &out,
            "--stdio",
            "--sort",
            "comm,dso",
            "--percent-limit",
            "2",
        ])
        .stderr(Stdio::null())
        .output()
        .await?;
    println!("  CPU samples by process and binary ({out}):");
    for line in String::from_utf8_lossy(&report.stdout).lines() {
        if line.trim_start().starts_with(|c: char| c.is_ascii_digit()) {
            println!("    {}", line.trim());
        }
    }
    result
}

/// Writes `value` to `target/bench/<name>` and says so.
fn write_json(name: &str, value: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all("target/bench")?;
    let path = format!("target/bench/{name}");
    std::fs::write(&path, serde_json::to_string_pretty(value)?)?;
    println!("written: {path}");
    Ok(())
}

async fn reconcile(entries: usize, import: usize) -> Result<()> {
    let mut peaks = serde_json::Map::new();

    // A: a reconciliation of `entries` the IDM has never seen: every entry
    // read, compared, published. The workers are not running, so the
    // reconciliation alone is measured.
    println!("A. reconciliation of {entries} new entries");
    let a = Setup::start(entries, false).await?;
    let search_a = baseline(&a.slapd, &a.password_file).await?;
    println!(
        "  baseline ldapsearch (paged 500): {:.2}s",
        search_a.as_secs_f64()
    );
    let (new, new_time, new_peak) = run_reconcile(&a.config, &a.admin_file).await?;
    println!(
        "  idsync reconcile: {} scanned, {} events in {:.2}s ({:.1}x ldapsearch); peak RSS {} MiB",
        new["scanned"],
        new["changed"],
        new_time.as_secs_f64(),
        new_time.as_secs_f64() / search_a.as_secs_f64(),
        new_peak / 1024
    );
    peaks.insert("A: reconcile".into(), serde_json::json!(new_peak));
    a.peaks(&mut peaks, "A");
    a.stop().await;

    // B: `import` entries imported through correlator, applier and IDM, then
    // reconciled again unchanged: no event may come out.
    println!("B. import of {import} entries, then a reconciliation of them unchanged");
    let b = Setup::start_with(
        import,
        Some(Workers {
            inbound_concurrency: all::IMPORT_CONCURRENCY,
            appliers: 1,
        }),
    )
    .await?;
    let search_b = baseline(&b.slapd, &b.password_file).await?;
    let started = Instant::now();
    let (first, _, _) = run_reconcile(&b.config, &b.admin_file).await?;
    loop {
        let live = b.idm.live_shadows("hr").await?;
        if live >= import as u64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("import stalled at {live} of {import}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let import_time = started.elapsed();
    println!(
        "  import: {} events, {import} users in {:.1}s ({:.0}/s)",
        first["changed"],
        import_time.as_secs_f64(),
        import as f64 / import_time.as_secs_f64()
    );
    let (same, same_time, same_peak) = profiled(
        "reconcile-unchanged",
        run_reconcile(&b.config, &b.admin_file),
    )
    .await?;
    println!(
        "  idsync reconcile, unchanged: {} scanned, {} events, {} deletions in {:.2}s; ldapsearch {:.2}s ({:.1}x); peak RSS {} MiB",
        same["scanned"],
        same["changed"],
        same["deleted"],
        same_time.as_secs_f64(),
        search_b.as_secs_f64(),
        same_time.as_secs_f64() / search_b.as_secs_f64(),
        same_peak / 1024
    );
    peaks.insert(
        "B: reconcile unchanged".into(),
        serde_json::json!(same_peak),
    );
    b.peaks(&mut peaks, "B");
    b.stop().await;

    let report = serde_json::json!({
        "a_entries": entries,
        "a_ldapsearch_seconds": search_a.as_secs_f64(),
        "a_reconcile_seconds": new_time.as_secs_f64(),
        "a_reconcile": new,
        "b_entries": import,
        "b_import_seconds": import_time.as_secs_f64(),
        "b_ldapsearch_seconds": search_b.as_secs_f64(),
        "b_reconcile_unchanged_seconds": same_time.as_secs_f64(),
        "b_reconcile_unchanged": same,
        "peak_rss_kib": peaks,
    });
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/reconcile.json",
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("written: target/bench/reconcile.json");
    Ok(())
}

/// A fresh working directory under the system's temporary directory.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "idsync-bench-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
