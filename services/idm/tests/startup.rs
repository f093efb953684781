//! The IDM refuses to start, with a message naming what and where, when its
//! address is taken or its address is not an address.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use idsync_core::config::Config;
use tokio_util::sync::CancellationToken;

fn config(listen: &str, data_dir: &std::path::Path) -> Arc<Config> {
    let mut config: Config =
        toml::from_str(include_str!("../../../deploy/local/idsync.toml")).unwrap();
    config.idm.listen = listen.to_owned();
    config.idm.data_dir = data_dir.display().to_string();
    config.nats.url = format!("nats://127.0.0.1:{}", 1);
    let credential = data_dir.join("admin");
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(&credential, "test-admin-credential").unwrap();
    config.idm.admin_token_env = None;
    config.idm.admin_token_file = Some(credential.display().to_string());
    config.idm.http_bind = None;
    config.agreements.clear();
    Arc::new(config)
}

#[tokio::test]
async fn no_administrator_credential_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = (*config("127.0.0.1:0", dir.path())).clone();
    c.idm.admin_token_file = None;
    c.idm.admin_token_env = Some("IDSYNC_TEST_UNSET_ADMIN_TOKEN".into());
    let err = idsync_idm::run(Arc::new(c), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("administrator credential") && err.contains("IDSYNC_TEST_UNSET_ADMIN_TOKEN"),
        "{err}"
    );
}

#[tokio::test]
async fn a_taken_status_address_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut c = (*config("127.0.0.1:0", dir.path())).clone();
    c.idm.http_bind = Some(addr.clone());
    let err = idsync_idm::run(Arc::new(c), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&addr) && err.contains("idm.http_bind"),
        "{err}"
    );
}

#[tokio::test]
async fn a_taken_address_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let err = idsync_idm::run(config(&addr, dir.path()), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&addr), "{err}");
}

#[tokio::test]
async fn a_malformed_address_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = idsync_idm::run(
        config("localhost-50051", dir.path()),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"localhost-50051\""), "{err}");
}

#[tokio::test]
async fn an_unreachable_postgres_store_is_named_by_host_and_port_without_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = (*config("127.0.0.1:0", dir.path())).clone();
    let url_file = dir.path().join("postgres_url");
    std::fs::write(
        &url_file,
        "postgresql://idsync:correct-horse-battery@127.0.0.1:1/idsync\n",
    )
    .unwrap();
    c.idm.store = idsync_core::config::StoreKind::Postgres;
    c.idm.postgres_url_file = Some(url_file.display().to_string());
    let err = idsync_idm::run(Arc::new(c.clone()), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    eprintln!("{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("correct-horse-battery"), "{err}");

    // No URL where the configuration says: named, without a URL to leak.
    c.idm.postgres_url_file = None;
    c.idm.postgres_url_env = Some("IDSYNC_TEST_UNSET_PG_URL".into());
    let err = idsync_idm::run(Arc::new(c), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("PostgreSQL URL") && err.contains("IDSYNC_TEST_UNSET_PG_URL"),
        "{err}"
    );
}
