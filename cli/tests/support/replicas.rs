//! `idsync serve <service>` processes for tests that kill and replace them:
//! each writes its own log, a SIGKILL is a real one, and the logs are there
//! to grep when a test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// How a replica is stopped during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Kill,
    Term,
}

/// One `idsync serve <service>` process.
pub struct Replica {
    pub service: &'static str,
    pub slot: usize,
    pub generation: usize,
    pub log: PathBuf,
    pub child: tokio::process::Child,
}

/// The replicas running now, and those stopped along the way.
pub struct Replicas {
    pub config: PathBuf,
    pub logs: PathBuf,
    pub live: Vec<Replica>,
    /// Stopped with SIGTERM: they must drain and exit cleanly.
    pub terminated: Vec<Replica>,
    pub kills: usize,
    pub terms: usize,
    /// More environment for every replica (`OTEL_EXPORTER_OTLP_ENDPOINT`, …).
    pub env: Vec<(String, String)>,
}

impl Replicas {
    pub fn new(dir: &Path) -> Self {
        let logs = dir.join("replica-logs");
        std::fs::create_dir_all(&logs).unwrap();
        Self {
            config: dir.join("idsync.toml"),
            logs,
            live: Vec::new(),
            terminated: Vec::new(),
            kills: 0,
            terms: 0,
            env: Vec::new(),
        }
    }

    pub fn spawn(&mut self, service: &'static str, slot: usize, generation: usize) {
        let log = self.logs.join(format!("{service}-{slot}.{generation}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync"))
            .args(["serve", service])
            .env("IDSYNC_CONFIG", &self.config)
            .env("RUST_LOG", replica_log_filter())
            .env("NO_COLOR", "1")
            .env("IDSYNC_SHUTDOWN_GRACE_SECONDS", "15")
            .env_remove("IDSYNC_IDM_URL")
            .env_remove("IDSYNC_NATS_URL")
            .env_remove("IDSYNC_HEALTH_BIND")
            .env_remove("IDSYNC_LOG_FORMAT")
            .env_remove("OTEL_SERVICE_NAME")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.live.push(Replica {
            service,
            slot,
            generation,
            log,
            child,
        });
    }

    /// Stops one replica as `how` says, and starts its replacement a moment later.
    pub async fn stop_and_replace(&mut self, service: &'static str, slot: usize, how: Stop) {
        let i = self
            .live
            .iter()
            .position(|r| r.service == service && r.slot == slot)
            .unwrap();
        let mut r = self.live.remove(i);
        let generation = r.generation + 1;
        match how {
            Stop::Kill => {
                r.child.start_kill().unwrap();
                let status = r.child.wait().await.unwrap();
                assert!(!status.success(), "{service}-{slot} killed: {status}");
                self.kills += 1;
            }
            Stop::Term => {
                signal(&r.child, "TERM").await;
                self.terms += 1;
                self.terminated.push(r);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.spawn(service, slot, generation);
    }

    /// Stops one replica as `how` says and waits until it has exited (a
    /// SIGTERM must end in a clean exit); returns the generation its
    /// replacement gets. For a service that must not run twice at once (the
    /// IDM holds its store file), or one kept down for a while.
    pub async fn stop(&mut self, service: &'static str, slot: usize, how: Stop) -> usize {
        let i = self
            .live
            .iter()
            .position(|r| r.service == service && r.slot == slot)
            .unwrap();
        let mut r = self.live.remove(i);
        match how {
            Stop::Kill => {
                r.child.start_kill().unwrap();
                self.kills += 1;
            }
            Stop::Term => {
                signal(&r.child, "TERM").await;
                self.terms += 1;
            }
        }
        let status = tokio::time::timeout(Duration::from_secs(30), r.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{service}-{slot} did not stop"))
            .unwrap();
        assert_eq!(
            status.success(),
            how == Stop::Term,
            "{service}-{slot} stopped by {how:?}: {status}\n{}",
            tail(&r.log, 40)
        );
        r.generation + 1
    }

    /// Panics, with its log, when a replica has exited on its own.
    pub fn assert_running(&mut self) {
        for r in &mut self.live {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!(
                    "{}-{} (generation {}) exited on its own: {status}\n{}",
                    r.service,
                    r.slot,
                    r.generation,
                    tail(&r.log, 40)
                );
            }
        }
    }

    /// Stops every replica with SIGTERM; each must drain and exit with 0.
    pub async fn shutdown(mut self) {
        for r in &self.live {
            signal(&r.child, "TERM").await;
        }
        let all = self.live.drain(..).chain(self.terminated.drain(..));
        for mut r in all {
            let status = tokio::time::timeout(Duration::from_secs(30), r.child.wait())
                .await
                .unwrap_or_else(|_| panic!("{}-{} did not stop", r.service, r.slot))
                .unwrap();
            assert!(
                status.success(),
                "{}-{} (generation {}) stopped with {status}\n{}",
                r.service,
                r.slot,
                r.generation,
                tail(&r.log, 40)
            );
        }
    }

    /// Every replica log, for the search for secrets.
    pub fn record_logs(&self) {
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            idsync_testkit::logs::record(&std::fs::read(entry.path()).unwrap());
        }
    }

    /// Every replica log line containing `needle`, in time order, each with
    /// the replica that wrote it.
    pub fn grep(&self, needle: &str) -> String {
        let mut lines = Vec::new();
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines().filter(|l| l.contains(needle)) {
                lines.push(format!("{line}  [{name}]"));
            }
        }
        lines.sort();
        lines.join("\n")
    }

    /// The last lines of every replica log.
    pub fn tails(&self, lines: usize) -> String {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| tail(p, lines))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The replicas' log filter: `warn` keeps the logs small; set
/// `IDSYNC_SCALING_LOG=info` to see every decision and commit when a run fails.
pub fn replica_log_filter() -> String {
    std::env::var("IDSYNC_SCALING_LOG").unwrap_or_else(|_| "warn".into())
}

pub async fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let status = tokio::process::Command::new("kill")
        .args([format!("-{name}").as_str(), pid.as_str()])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- {} ({} lines) ---\n{}",
        path.file_name().unwrap().to_string_lossy(),
        all.len(),
        all[from..].join("\n")
    )
}
