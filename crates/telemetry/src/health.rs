//! Liveness, readiness and metrics over HTTP: `GET /healthz` answers 200
//! while the process serves; `GET /readyz` 200 once the service has its
//! connections and takes work, 503 before that and while it drains;
//! `GET /metrics` the registry. One request per connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The environment variable that names the listener's address.
pub const BIND_ENV: &str = "IDSYNC_HEALTH_BIND";

static READY: AtomicBool = AtomicBool::new(false);

/// The service takes work (`true`) or does not (starting, draining).
pub fn set_ready(ready: bool) {
    READY.store(ready, Ordering::SeqCst);
}

pub fn is_ready() -> bool {
    READY.load(Ordering::SeqCst)
}

#[derive(Debug, thiserror::Error)]
#[error("health listener {addr} ({origin}): {reason}")]
pub struct HealthError {
    addr: String,
    origin: &'static str,
    reason: String,
}

/// Binds `bind` now (a taken port fails the start), then serves until
/// `shutdown`; the task ends and the listener closes after that.
///
/// # Errors
/// The address is malformed or cannot be bound.
pub async fn serve(
    bind: &str,
    origin: &'static str,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, HealthError> {
    let err = |reason: String| HealthError {
        addr: bind.to_owned(),
        origin,
        reason,
    };
    let addr: SocketAddr = bind.parse().map_err(|e| err(format!("{e}")))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    tracing::info!(addr = %bind, "health, readiness and metrics over HTTP");
    Ok(tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((mut conn, _)) = accepted else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
                let n = match read {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let (status, content_type, body) = answer(&request);
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    }))
}

fn answer(request: &str) -> (&'static str, &'static str, String) {
    let path = request
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("");
    match path {
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if is_ready() => ("200 OK", "text/plain", "ready\n".into()),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    async fn get(addr: &str, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn probes_and_metrics_answer_and_the_listener_closes_on_shutdown() {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap().to_string();
        drop(probe);
        let stop = CancellationToken::new();
        let task = serve(&addr, "test", stop.clone()).await.unwrap();
        set_ready(false);
        assert!(get(&addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(&addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        set_ready(true);
        assert!(get(&addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        crate::metrics::inc("h_total", "A test counter.", &[]);
        assert!(get(&addr, "/metrics").await.contains("h_total 1"));
        assert!(get(&addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
        task.await.unwrap();
        assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
        let bad = serve("not an address", "test", stop).await.unwrap_err();
        assert!(bad.to_string().contains("not an address"), "{bad}");
    }
}
