//! The service binary as Kubernetes runs it: probes and metrics on
//! `IDSYNC_HEALTH_BIND`, and a prompt, clean exit on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use idsync_testkit::{NatsServer, eventually, free_port};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn get(addr: &str, path: &str) -> Result<String, String> {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    conn.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_metrics_count_and_sigterm_drains_and_exits() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("hr.token");
    std::fs::write(&token, "idsync1.not-checked-until-a-message-comes\n").unwrap();
    let config = include_str!("../../../deploy/local/idsync.toml")
        .replace("nats://127.0.0.1:4222", nats.url())
        .replace("http://127.0.0.1:50051", "http://127.0.0.1:1")
        .replace(
            "token_env = \"IDSYNC_HR_TOKEN\"",
            &format!("token_file = \"{}\"", token.display()),
        );
    let file = dir.path().join("idsync.toml");
    std::fs::write(&file, config).unwrap();
    // The streams, as `dev up` or the IDM declares them.
    idsync_bus::Bus::connect(nats.url()).await.unwrap();

    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_idsync-correlator"))
        .arg("--config")
        .arg(&file)
        .env("IDSYNC_HEALTH_BIND", &addr)
        .env("IDSYNC_SHUTDOWN_GRACE_SECONDS", "10")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let a = addr.as_str();
    let live = eventually("liveness", Duration::from_secs(20), || async move {
        Ok(get(a, "/healthz").await.ok())
    })
    .await
    .unwrap();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");
    eventually(
        "ready once it consumes",
        Duration::from_secs(20),
        || async move {
            Ok(get(a, "/readyz")
                .await
                .ok()
                .filter(|r| r.starts_with("HTTP/1.1 200")))
        },
    )
    .await
    .unwrap();
    let metrics = eventually(
        "the consumer's lag",
        Duration::from_secs(20),
        || async move {
            Ok(get(a, "/metrics")
                .await
                .ok()
                .filter(|m| m.contains("idsync_consumer_pending{")))
        },
    )
    .await
    .unwrap();
    assert!(
        metrics.contains("# TYPE idsync_consumer_pending gauge"),
        "{metrics}"
    );
    assert!(metrics.contains("durable=\"correlator\""), "{metrics}");

    let asked = Instant::now();
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits within its grace period")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    // And its listener is gone with it.
    assert!(get(&addr, "/healthz").await.is_err());
}
