//! The midPoint example's scenarios, live: modification, creation, deletion.

use idsync_core::model::Focus;

use crate::support::*;

fn full_name(u: &Focus) -> Option<&str> {
    u.first("fullName")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modification_of_cn_reaches_the_idm_and_the_target() {
    let env = start().await;
    // The initial sync imports jack and gives him his acme account.
    let jack = env
        .user_where("jack", "imported and linked to hr and acme", |u| {
            links_to(u, "hr") && links_to(u, "acme")
        })
        .await;
    assert_eq!(full_name(&jack), Some("Jack Sparrow"));
    env.target_where("cn=jack,o=Acme", "cn from fullName", |e| {
        e.is_some_and(|e| {
            e["cn"] == set(&["jack", "Jack Sparrow"])
                && e["description"] == set(&["Created by IDM"])
        })
    })
    .await;

    set_cn(&env.deployment.source, "jack", "cpt. Jack Sparrow").await;

    let jack = env
        .user_where("jack", "fullName changed", |u| {
            full_name(u) == Some("cpt. Jack Sparrow")
        })
        .await;
    assert_eq!(jack.first("givenName"), Some("Jack"));
    assert_eq!(jack.first("familyName"), Some("Sparrow"));
    env.target_where("cn=jack,o=Acme", "cn follows fullName", |e| {
        e.is_some_and(|e| e["cn"] == set(&["jack", "cpt. Jack Sparrow"]))
    })
    .await;
    env.assert_no_secret_logged();
    env.deployment.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_then_deletion_of_an_account() {
    let env = start().await;
    env.user_where("jack", "imported", |u| links_to(u, "acme"))
        .await;

    add_person(&env.deployment.source, "will", "Will", "Turner").await;

    let will = env
        .user_where("will", "created and linked to both accounts", |u| {
            links_to(u, "hr") && links_to(u, "acme")
        })
        .await;
    assert_eq!(will.first("givenName"), Some("Will"));
    assert_eq!(will.first("familyName"), Some("Turner"));
    assert_eq!(full_name(&will), Some("Will Turner"));
    assert!(
        will.has_assignment("acme"),
        "the template's assignment: {will:?}"
    );
    let hr_link = will.link_to("hr").unwrap();
    assert_eq!(hr_link.dn, person_dn("will"));
    let shadow = env
        .idm
        .get_shadow("hr", &hr_link.entry_uuid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        shadow.situation, "unmatched",
        "will was new: situation unmatched, reaction add_focus"
    );
    let account = env
        .target_where("cn=will,o=Acme", "account constructed", |e| e.is_some())
        .await
        .unwrap();
    assert_eq!(account["cn"], set(&["will", "Will Turner"]));
    assert_eq!(account["sn"], set(&["Turner"]));
    assert_eq!(account["givenname"], set(&["Will"]));
    let acme = env
        .idm
        .get_shadow("acme", &will.link_to("acme").unwrap().entry_uuid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acme.focus_id.as_deref(), Some(will.id.as_str()));

    // Deletion: the example configures delete_focus; the account goes with the user.
    delete_person(&env.deployment.source, "will").await;
    env.user_gone("will").await;
    env.target_where("cn=will,o=Acme", "account deleted", |e| e.is_none())
        .await;
    let shadow = env
        .idm
        .get_shadow("hr", &hr_link.entry_uuid)
        .await
        .unwrap()
        .unwrap();
    assert!(
        shadow.dead && shadow.focus_id.is_none(),
        "a tombstone stays: {shadow:?}"
    );
    // jack is untouched.
    env.user_where("jack", "still there", |u| links_to(u, "acme"))
        .await;
    env.assert_no_secret_logged();
    env.deployment.shutdown().await.unwrap();
}

/// An outbound mapping with the mapped range removes only what idsync set:
/// a value added on the target by someone else stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_range_keeps_values_set_on_the_target() {
    use std::collections::HashSet;
    let mut config = idsync::dev::EXAMPLE_CONFIG.to_owned();
    config = config.replacen(
        "[[resources.inbound]]\nsource = \"sn\"",
        "[[resources.inbound]]\nsource = \"mail\"\ntarget = \"mail\"\n\n[[resources.inbound]]\nsource = \"sn\"",
        1,
    );
    config = config.replacen(
        "[[resources.outbound]]\nvalue = \"Created by IDM\"",
        "[[resources.outbound]]\nsource = \"mail\"\ntarget = \"mail\"\nstrength = \"strong\"\nrange = \"mapped\"\n\n[[resources.outbound]]\nvalue = \"Created by IDM\"",
        1,
    );
    assert!(
        config.contains("range = \"mapped\"")
            && config.contains("source = \"mail\"\ntarget = \"mail\"\n\n")
    );
    let dir = tempfile::tempdir().unwrap();
    let deployment = idsync::dev::Deployment::start_with(dir.path(), &config)
        .await
        .unwrap();
    let env = Env::from(deployment, dir);
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;

    let mut src = env.deployment.source.admin_conn().await.unwrap();
    let jack = person_dn("jack");
    src.modify(
        &jack,
        vec![ldap3::Mod::Replace("mail", HashSet::from(["jack@hr"]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    env.target_where("cn=jack,o=Acme", "mail from hr", |e| {
        e.is_some_and(|e| e.get("mail") == Some(&set(&["jack@hr"])))
    })
    .await;
    // Someone adds a mail on the target directly.
    let mut tgt = env.deployment.target.admin_conn().await.unwrap();
    tgt.modify(
        "cn=jack,o=Acme",
        vec![ldap3::Mod::Add("mail", HashSet::from(["sparrow@acme"]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    // The source's mail changes: idsync replaces its own value and keeps the other.
    src.modify(
        &jack,
        vec![ldap3::Mod::Replace("mail", HashSet::from(["captain@hr"]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    env.target_where("cn=jack,o=Acme", "hr's mail replaced, acme's kept", |e| {
        e.is_some_and(|e| e.get("mail") == Some(&set(&["sparrow@acme", "captain@hr"])))
    })
    .await;
    env.deployment.shutdown().await.unwrap();
}

/// A rename at the source (modrdn of uid) renames the user, and the account
/// on the target is renamed with it (modrdn), not deleted and re-created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_at_the_source_renames_the_target_account() {
    let env = start().await;
    let jack = env
        .user_where("jack", "provisioned", |u| links_to(u, "acme"))
        .await;
    let account_uuid = jack.link_to("acme").unwrap().entry_uuid.clone();
    let mut ldap = env.deployment.source.admin_conn().await.unwrap();
    ldap.modifydn(&person_dn("jack"), "uid=jsparrow", true, None)
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;

    let renamed = env
        .user_where("jsparrow", "renamed, account renamed", |u| {
            u.link_to("acme")
                .is_some_and(|l| l.dn.eq_ignore_ascii_case("cn=jsparrow,o=Acme"))
        })
        .await;
    assert_eq!(renamed.id, jack.id, "the same user");
    let link = renamed.link_to("acme").unwrap();
    assert_eq!(link.entry_uuid, account_uuid, "the same account, renamed");
    env.target_where("cn=jsparrow,o=Acme", "present", |e| e.is_some())
        .await;
    env.target_where("cn=jack,o=Acme", "gone", |e| e.is_none())
        .await;
    let shadow = env
        .idm
        .get_shadow("acme", &account_uuid)
        .await
        .unwrap()
        .unwrap();
    assert!(
        shadow.dn.eq_ignore_ascii_case("cn=jsparrow,o=Acme"),
        "{}",
        shadow.dn
    );
    env.deployment.shutdown().await.unwrap();
}

/// The secret search finds a secret that does reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_search_would_find_a_leak() {
    let env = start().await;
    env.assert_no_secret_logged();
    let admin = std::fs::read_to_string(env.deployment.dir.join("secrets/admin")).unwrap();
    tracing::info!("deliberate leak for this test: {admin}");
    let env = std::panic::AssertUnwindSafe(env);
    let found = std::panic::catch_unwind(|| env.assert_no_secret_logged());
    assert!(found.is_err(), "the leak was not found");
    let std::panic::AssertUnwindSafe(env) = env;
    env.deployment.shutdown().await.unwrap();
}
