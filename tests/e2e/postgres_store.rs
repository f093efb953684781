//! The pipeline with the IDM on its PostgreSQL store: the example flows
//! end to end, survives an IDM restart (a new process over the same
//! database), and a database outage mid-run delays changes without losing
//! or parking any.

use idsync_bus::{Bus, names};
use idsync_core::config::StoreKind;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_on_the_postgres_store_through_an_idm_restart_and_a_database_outage() {
    // Capture from the start: the IDM names its database when it migrates.
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let deployment = idsync::dev::Deployment::start_with_options(
        dir.path(),
        idsync::dev::EXAMPLE_CONFIG,
        idsync::dev::Options {
            store: Some(StoreKind::Postgres),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(deployment.config.idm.store, StoreKind::Postgres);
    let mut env = Env::from(deployment, dir);
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    env.target_where("cn=jack,o=Acme", "provisioned", |e| e.is_some())
        .await;

    // Another IDM process over the same database: the state is the database's.
    env.deployment.stop_service("idm").await.unwrap();
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    env.deployment.start_service("idm").unwrap();
    env.user_where("will", "synced after the IDM restart", |u| {
        links_to(u, "acme")
    })
    .await;
    env.target_where("cn=will,o=Acme", "provisioned", |e| e.is_some())
        .await;

    // The database goes away: the IDM answers UNAVAILABLE (retriable), and
    // what changed meanwhile is applied once it is back.
    let pg = env.deployment.postgres.as_mut().unwrap();
    pg.stop().unwrap();
    let err = env
        .idm
        .find_focus("user", "name", "jack")
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    set_cn(&env.deployment.source, "jack", "cpt. Jack Sparrow").await;
    env.deployment.postgres.as_mut().unwrap().restart().unwrap();
    env.user_where("jack", "renamed after the outage", |u| {
        u.first("fullName") == Some("cpt. Jack Sparrow")
    })
    .await;
    env.target_where("cn=jack,o=Acme", "cn follows", |e| {
        e.is_some_and(|e| e["cn"].contains("cpt. Jack Sparrow"))
    })
    .await;
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    assert_eq!(
        bus.stream_messages(names::DEAD_STREAM).await.unwrap(),
        0,
        "an outage parks nothing"
    );
    // The database URL and its password are among the secrets searched for.
    env.assert_no_secret_logged();
    env.deployment.shutdown().await.unwrap();
}
