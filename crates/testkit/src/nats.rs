//! A throwaway `nats-server` with JetStream on loopback, stopped on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::TestkitError;
use crate::process::{log_len, log_stdio, log_tail, quoted, require_binary, terminate};

const NATS_SERVER: &str = "/usr/sbin/nats-server";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
const CONFIG_FILE: &str = "nats.conf";
const LOG_FILE: &str = "nats-server.log";
/// Largest message the server takes (its default is 1 MB). A change event
/// carries an entry's whole state: a group of 50,000 members is about 2 MB,
/// and its decision carries that event again. nats-server warns above 8 MB.
pub const MAX_PAYLOAD: &str = "8MB";

/// A real JetStream server on `127.0.0.1`, killed when dropped.
///
/// The store lives in a directory: a fresh temporary one ([`NatsServer::start`],
/// removed on drop) or one the caller names ([`NatsServer::start_in`], kept).
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    url: String,
    monitor_url: String,
    /// Client port, fixed after the first start so a restart keeps the URL.
    port: Option<u16>,
    dir: PathBuf,
    /// nats-server's `max_payload`.
    max_payload: String,
    _temp: Option<TempDir>,
}

impl NatsServer {
    /// Start a JetStream server whose store is a fresh temporary directory.
    ///
    /// # Errors
    ///
    /// A missing binary, an I/O failure preparing the directory, or a server
    /// that exits or is not healthy within ten seconds (with its log tail).
    pub async fn start() -> Result<Self, TestkitError> {
        let temp = tempfile::Builder::new()
            .prefix("idsync-nats-")
            .tempdir()
            .map_err(|e| TestkitError::io("create temporary directory for nats-server", e))?;
        let dir = temp.path().to_path_buf();
        Self::launch(dir, Some(temp), MAX_PAYLOAD).await
    }

    /// Start a JetStream server whose store lives in `dir`, created if missing
    /// and kept on drop, so data survives for a quick start or a restart test.
    ///
    /// # Errors
    ///
    /// As for [`NatsServer::start`].
    pub async fn start_in(dir: &Path) -> Result<Self, TestkitError> {
        Self::start_in_with(dir, MAX_PAYLOAD).await
    }

    /// As [`NatsServer::start_in`], taking messages of at most `max_payload`
    /// (`"1MB"`, `"8MB"`).
    ///
    /// # Errors
    ///
    /// As for [`NatsServer::start`].
    pub async fn start_in_with(dir: &Path, max_payload: &str) -> Result<Self, TestkitError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| TestkitError::io(format!("create directory {}", dir.display()), e))?;
        let dir = std::path::absolute(dir)
            .map_err(|e| TestkitError::io(format!("resolve directory {}", dir.display()), e))?;
        Self::launch(dir, None, max_payload).await
    }

    async fn launch(
        dir: PathBuf,
        temp: Option<TempDir>,
        max_payload: &str,
    ) -> Result<Self, TestkitError> {
        let mut server = Self {
            max_payload: max_payload.to_owned(),
            child: None,
            url: String::new(),
            monitor_url: String::new(),
            port: None,
            dir,
            _temp: temp,
        };
        server.spawn_and_wait().await?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:PORT`; the same across restarts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The directory holding the config, log and JetStream store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stop the server (SIGTERM, SIGKILL after about five seconds), keeping the store.
    /// Stopping a stopped server does nothing.
    ///
    /// # Errors
    ///
    /// [`TestkitError::Io`] when the process cannot be signalled or reaped.
    pub async fn stop(&mut self) -> Result<(), TestkitError> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, "nats-server").await?;
        }
        Ok(())
    }

    /// Start the server again on the same client port and store; a running
    /// server is stopped first.
    ///
    /// # Errors
    ///
    /// As for [`NatsServer::start`]; also when the port has been taken meanwhile.
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop().await?;
        self.spawn_and_wait().await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    fn config(&self) -> String {
        let listen = self.port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        format!(
            "listen: 127.0.0.1:{listen}\n\
             http: 127.0.0.1:-1\n\
             server_name: idsync_testkit\n\
             max_payload: {max_payload}\n\
             ports_file_dir: {dir}\n\
             jetstream {{\n  store_dir: {store}\n  max_memory_store: 256MB\n  max_file_store: 4GB\n}}\n",
            dir = quoted(&self.dir),
            store = quoted(&self.dir.join("js")),
            max_payload = self.max_payload,
        )
    }

    async fn spawn_and_wait(&mut self) -> Result<(), TestkitError> {
        let binary = require_binary(NATS_SERVER)?;
        let config_path = self.dir.join(CONFIG_FILE);
        tokio::fs::write(&config_path, self.config())
            .await
            .map_err(|e| {
                TestkitError::io(format!("write nats config {}", config_path.display()), e)
            })?;
        let log = self.log_path();
        let log_from = log_len(&log);
        let (stdout, stderr) = log_stdio(&log)?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                TestkitError::io(
                    format!("start {} -c {}", binary.display(), config_path.display()),
                    e,
                )
            })?;
        let child = self.child.insert(child);
        let pid = child.id().unwrap_or_default();
        let ports_file = self.dir.join(format!("nats-server_{pid}.ports"));
        let what = format!("nats-server (pid {pid}, dir {})", self.dir.display());

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut urls: Option<(String, String)> = None;
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| TestkitError::io(format!("check on {what}"), e))?
            {
                self.child = None;
                return Err(TestkitError::ServerExited {
                    what,
                    status,
                    log_tail: log_tail(&log, log_from),
                    log,
                });
            }
            let last = match &urls {
                None => match read_ports_file(&ports_file).await {
                    Ok(found) => {
                        urls = found;
                        format!("waiting for ports file {}", ports_file.display())
                    }
                    Err(e) => return Err(e),
                },
                Some((client, monitor)) => match healthz(monitor).await {
                    Ok(()) => {
                        self.port = Some(url_port(client, &ports_file)?);
                        self.url = client.clone();
                        self.monitor_url = monitor.clone();
                        tracing::debug!(url = %self.url, dir = %self.dir.display(), "nats-server is ready");
                        return Ok(());
                    }
                    Err(reason) => reason,
                },
            };
            if Instant::now() >= deadline {
                return Err(TestkitError::ServerNotReady {
                    what,
                    timeout: READY_TIMEOUT,
                    last,
                    log_tail: log_tail(&log, log_from),
                    log,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Whether the monitor endpoint reports JetStream healthy right now.
    #[cfg(test)]
    pub(crate) async fn is_healthy(&self) -> Result<(), String> {
        healthz(&self.monitor_url).await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Best effort: the process may already be gone.
            let _ = child.start_kill();
        }
    }
}

/// The client and monitor URLs from `nats-server_<pid>.ports`, once it is complete.
async fn read_ports_file(path: &Path) -> Result<Option<(String, String)>, TestkitError> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(TestkitError::io(
                format!("read ports file {}", path.display()),
                e,
            ));
        }
    };
    // A half-written file simply lacks one of the keys: try again later.
    Ok(first_url(&text, "nats").zip(first_url(&text, "monitoring")))
}

/// The first string in the JSON array under `key`, e.g. `"nats":["nats://..."]`.
fn first_url(json: &str, key: &str) -> Option<String> {
    let after_key = json.split_once(&format!("\"{key}\""))?.1;
    let after_bracket = after_key.split_once('[')?.1;
    let after_quote = after_bracket.split_once('"')?.1;
    let url = after_quote.split_once('"')?.0;
    (!url.is_empty()).then(|| url.to_owned())
}

fn url_port(url: &str, source: &Path) -> Result<u16, TestkitError> {
    url.rsplit_once(':')
        .and_then(|(_, port)| port.trim_end_matches('/').parse().ok())
        .ok_or_else(|| TestkitError::BadServerOutput {
            path: source.to_path_buf(),
            reason: format!("no port in URL {url:?}"),
        })
}

/// `GET <path>` on the monitor endpoint over a bare HTTP/1.0 connection: the
/// whole response, status line and headers included.
async fn monitor_get(monitor_url: &str, path: &str) -> Result<String, String> {
    let host_port = monitor_url
        .strip_prefix("http://")
        .unwrap_or(monitor_url)
        .trim_end_matches('/');
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(host_port).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), request)
        .await
        .map_err(|_| format!("GET {monitor_url}{path} timed out"))?
        .map_err(|e| format!("GET {monitor_url}{path}: {e}"))
}

/// `GET /healthz?js-enabled-only=true`: Ok when JetStream is healthy.
async fn healthz(monitor_url: &str) -> Result<(), String> {
    let response = monitor_get(monitor_url, "/healthz?js-enabled-only=true").await?;
    let status_ok = response
        .lines()
        .next()
        .is_some_and(|line| line.split_whitespace().nth(1) == Some("200"));
    if status_ok && response.contains("\"ok\"") {
        Ok(())
    } else {
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Err(format!(
            "GET {monitor_url}/healthz: {} {}",
            response.lines().next().unwrap_or("(no status line)"),
            body.trim()
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_file() {
        let text = r#"{"nats":["nats://127.0.0.1:34793"],"monitoring":["http://127.0.0.1:32871"]}"#;
        assert_eq!(first_url(text, "nats").unwrap(), "nats://127.0.0.1:34793");
        assert_eq!(
            first_url(text, "monitoring").unwrap(),
            "http://127.0.0.1:32871"
        );
        assert_eq!(first_url(r#"{"nats":["#, "nats"), None);
        assert_eq!(
            url_port("nats://127.0.0.1:34793", Path::new("x")).unwrap(),
            34793
        );
    }

    #[tokio::test]
    async fn starts_healthy_and_restarts_on_same_port() {
        let mut nats = NatsServer::start().await.unwrap();
        let url = nats.url().to_owned();
        assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
        nats.is_healthy().await.unwrap();
        let dir = nats.dir().to_path_buf();
        assert!(dir.join("js").is_dir());

        nats.stop().await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(url.trim_start_matches("nats://"))
                .await
                .is_err(),
            "port still open after stop"
        );
        nats.restart().await.unwrap();
        assert_eq!(nats.url(), url);
        nats.is_healthy().await.unwrap();
        // Restarting a running server stops it first.
        nats.restart().await.unwrap();
        assert_eq!(nats.url(), url);

        drop(nats);
        assert!(!dir.exists(), "temporary store not removed");
    }

    /// Change events carry whole entries: the server takes messages of up
    /// to 8 MB, not its default 1 MB.
    #[tokio::test]
    async fn takes_large_messages() {
        let nats = NatsServer::start().await.unwrap();
        let varz = monitor_get(&nats.monitor_url, "/varz").await.unwrap();
        assert!(
            varz.contains(&format!("\"max_payload\": {}", 8 * 1024 * 1024)),
            "{varz}"
        );
    }

    #[tokio::test]
    async fn start_in_keeps_the_directory() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("nats-store");
        let nats = NatsServer::start_in(&dir).await.unwrap();
        nats.is_healthy().await.unwrap();
        drop(nats);
        assert!(dir.join("js").is_dir());
        assert!(dir.join(LOG_FILE).is_file());

        let mut again = NatsServer::start_in(&dir).await.unwrap();
        again.is_healthy().await.unwrap();
        again.stop().await.unwrap();
    }
}
