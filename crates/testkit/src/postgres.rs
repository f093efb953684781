//! A throwaway PostgreSQL cluster on loopback: `initdb` in a temporary
//! directory, the server on a free port, a database per test.
//!
//! The server runs under a small shell that stops it (fast shutdown)
//! when its standard input closes — when the cluster is dropped, and also
//! when the test process dies without dropping it (a static shared by a test
//! binary, a killed test run), so no server outlives its tests. As root,
//! `initdb` and the server run as the `postgres` user (initdb refuses root).
//!
//! The API is synchronous: the start takes about a second, and the IDM's
//! store client is synchronous too.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::TestkitError;
use crate::process::{log_len, log_tail};

/// Where Debian puts each server version's binaries.
const PG_LIB: &str = "/usr/lib/postgresql";
/// Overrides the binary directory (`…/bin` holding initdb and postgres).
pub const PG_BIN_ENV: &str = "IDSYNC_PG_BIN";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(25);
const LOG_FILE: &str = "postgres.log";
/// The superuser the cluster is made with.
pub const SUPERUSER: &str = "postgres";

/// A running (or stopped) throwaway cluster; stopped and removed on drop.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
    /// Whether to run the tools as the `postgres` user (we are root).
    as_postgres: bool,
    server: Option<(Child, ChildStdin)>,
    databases: AtomicU64,
    _temp: TempDir,
}

/// The directory with `initdb` and `postgres`: [`PG_BIN_ENV`], else the
/// newest version under `/usr/lib/postgresql`.
fn bin_dir() -> Result<PathBuf, TestkitError> {
    if let Ok(dir) = std::env::var(PG_BIN_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_LIB)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").is_file().then_some((v, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| TestkitError::MissingBinary {
            path: PathBuf::from(PG_LIB).join("<version>/bin/initdb"),
        })
}

fn random_password() -> Result<String, TestkitError> {
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| TestkitError::io("read /dev/urandom", e))?;
    use base64::Engine;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

impl Postgres {
    /// Makes a cluster in a fresh temporary directory and starts it on a
    /// free loopback port. Connections over TCP need the superuser's
    /// password ([`Postgres::url`] holds it); the Unix socket in the
    /// directory trusts local tools.
    ///
    /// # Errors
    /// PostgreSQL is not installed (run scripts/install-deps), initdb fails,
    /// or the server does not accept connections within 20 s.
    pub fn start() -> Result<Self, TestkitError> {
        let bin = bin_dir()?;
        for tool in ["initdb", "postgres", "pg_isready", "psql"] {
            if !bin.join(tool).is_file() {
                return Err(TestkitError::MissingBinary {
                    path: bin.join(tool),
                });
            }
        }
        let temp = tempfile::Builder::new()
            .prefix("idsync-pg-")
            .tempdir()
            .map_err(|e| TestkitError::io("create temporary directory for PostgreSQL", e))?;
        let dir = temp.path().to_path_buf();
        let as_postgres = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&dir))?;
        }
        let password = random_password()?;
        let pwfile = dir.join("superuser.pw");
        std::fs::write(&pwfile, format!("{password}\n"))
            .map_err(|e| TestkitError::io(format!("write {}", pwfile.display()), e))?;
        let mut pg = Self {
            bin,
            port: 0,
            password,
            as_postgres,
            server: None,
            databases: AtomicU64::new(0),
            dir,
            _temp: temp,
        };
        let data = pg.dir.join("data");
        let mut initdb = pg.tool("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "-E", "UTF8", "--locale=C", "-N"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(&mut initdb)?;
        let _ = std::fs::remove_file(&pwfile);
        pg.launch(None)?;
        Ok(pg)
    }

    /// One cluster for the whole test binary, started at the first call;
    /// give each test its own database ([`Postgres::create_database`]).
    ///
    /// # Errors
    /// As [`Postgres::start`] (the first failure is reported to every caller).
    pub fn shared() -> Result<&'static Self, TestkitError> {
        static SHARED: OnceLock<Result<Postgres, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::start().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|reason| TestkitError::Timeout {
                what: "the shared PostgreSQL cluster".into(),
                timeout: READY_TIMEOUT,
                last: reason.clone(),
            })
    }

    /// A command for a server tool, as the `postgres` user when we are root.
    fn tool(&self, name: &str) -> Command {
        let path = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Starts the server on `port`, or on free ports until one is not taken.
    fn launch(&mut self, port: Option<u16>) -> Result<(), TestkitError> {
        let mut tried = Vec::new();
        for _ in 0..5 {
            let port = match port {
                Some(p) => p,
                None => crate::free_port()?,
            };
            tried.push(port);
            match self.spawn_on(port)? {
                true => return Ok(()),
                false if port_taken(&self.log_path()) => continue,
                false => return Err(exited_at_start(self)),
            }
        }
        Err(TestkitError::PortsInUse {
            what: "postgres".into(),
            ports: tried,
            log: self.log_path(),
            log_tail: log_tail(&self.log_path(), 0),
        })
    }

    /// Starts the server on `port`; `Ok(false)` when it exited at once.
    fn spawn_on(&mut self, port: u16) -> Result<bool, TestkitError> {
        let log = self.log_path();
        let from = log_len(&log);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| TestkitError::io(format!("open {}", log.display()), e))?;
        let err = file
            .try_clone()
            .map_err(|e| TestkitError::io(format!("open {}", log.display()), e))?;
        // The server in the background; a reader of our stdin stops it when
        // the pipe closes; the shell ends when the server does.
        let script = r#"exec 3<&0
"$0" -D "$1" -p "$2" -k "$3" -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200 </dev/null &
pid=$!
(read _ <&3; kill -INT $pid 2>/dev/null) &
wait $pid"#;
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", script]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        };
        let mut child = cmd
            .arg(self.bin.join("postgres"))
            .arg(self.dir.join("data"))
            .arg(port.to_string())
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| TestkitError::io("start postgres", e))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| TestkitError::BadServerOutput {
                path: log.clone(),
                reason: "no stdin pipe to the postgres supervisor".into(),
            })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                drop(stdin);
                return Ok(false);
            }
            let ready = self
                .tool("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.port = port;
                self.server = Some((child, stdin));
                return Ok(true);
            }
            if Instant::now() >= deadline {
                drop(stdin);
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestkitError::ServerNotReady {
                    what: format!("postgres on 127.0.0.1:{port}"),
                    timeout: READY_TIMEOUT,
                    last: "pg_isready: not accepting connections".into(),
                    log: log.clone(),
                    log_tail: log_tail(&log, from),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// The loopback port; the same across [`Postgres::stop`] and [`Postgres::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password (in every URL this cluster hands out).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A libpq URL for database `db` as the superuser, over TCP.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Runs `sql` in database `db` through psql on the Unix socket.
    ///
    /// # Errors
    /// psql fails (the server is down, the SQL is wrong), with its output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, TestkitError> {
        let out = self
            .tool("psql")
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| TestkitError::io("run psql", e))?;
        if !out.status.success() {
            return Err(TestkitError::CommandFailed {
                command: format!("psql -d {db} -c {sql:?}"),
                status: out.status,
                output_tail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates a new, empty database and returns its URL; each call gives
    /// another one, so tests sharing a cluster do not see each other.
    ///
    /// # Errors
    /// As [`Postgres::psql`].
    pub fn create_database(&self) -> Result<String, TestkitError> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// Stops the server (fast shutdown: clients are disconnected), keeping its data. Stopping a
    /// stopped server does nothing.
    ///
    /// # Errors
    /// The server does not exit within ten seconds.
    pub fn stop(&mut self) -> Result<(), TestkitError> {
        let Some((mut child, stdin)) = self.server.take() else {
            return Ok(());
        };
        drop(stdin);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestkitError::Timeout {
                    what: "postgres to stop".into(),
                    timeout: STOP_TIMEOUT,
                    last: log_tail(&self.log_path(), 0),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts the stopped server again on the same port.
    ///
    /// # Errors
    /// As [`Postgres::start`]; the port was taken meanwhile.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop()?;
        let port = self.port;
        self.launch(Some(port))
    }

    /// The directory holding the cluster and its log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Whether the server's last start failed on a taken port.
fn port_taken(log: &Path) -> bool {
    log_tail(log, 0).contains("Address already in use")
}

fn exited_at_start(pg: &Postgres) -> TestkitError {
    TestkitError::BadServerOutput {
        path: pg.log_path(),
        reason: format!("postgres exited at start: {}", log_tail(&pg.log_path(), 0)),
    }
}

/// Runs a command to completion; a failure carries its output.
fn run(cmd: &mut Command) -> Result<(), TestkitError> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::io(format!("run {command}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = out.stderr;
    text.extend_from_slice(&out.stdout);
    Err(TestkitError::CommandFailed {
        command,
        status: out.status,
        output_tail: String::from_utf8_lossy(&text).trim().to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn starts_serves_a_database_per_caller_and_restarts_on_its_port() {
        let mut pg = Postgres::start().unwrap();
        let a = pg.create_database().unwrap();
        let b = pg.create_database().unwrap();
        assert_ne!(a, b);
        let name = a.rsplit('/').next().unwrap().to_owned();
        assert_eq!(pg.psql(&name, "SELECT 1").unwrap(), "1");
        let port = pg.port();
        pg.stop().unwrap();
        assert!(pg.psql(&name, "SELECT 1").is_err());
        pg.restart().unwrap();
        assert_eq!(pg.port(), port);
        assert_eq!(pg.psql(&name, "SELECT 1").unwrap(), "1");
    }
}
