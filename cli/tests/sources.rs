//! Other kinds of source, end to end: a 389 Directory Server (the directory
//! behind FreeIPA) with its Content Synchronization plugin, identified by
//! nsUniqueId; and the FreeIPA layout example configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use idsync::dev::{Deployment, EXAMPLE_CONFIG, Options, PEOPLE};
use idsync_testkit::eventually;

mod support;
use support::*;

const DS_RESOURCE: &str = r#"
[agreements.ds]
token_env = "IDSYNC_DS_TOKEN"

[[resources]]
name = "ds"
agreement = "ds"
url = "ldap://127.0.0.1:1"
bind_dn = "cn=Directory Manager"
bind_password_env = "IDSYNC_DS_PASSWORD"
base_dn = "ou=people,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
id_attribute = "nsUniqueId"
live_sync = true

[[resources.inbound]]
source = "uid"
target = "name"
strength = "strong"

[[resources.inbound]]
source = "cn"
target = "fullName"

[[resources.inbound]]
source = "sn"
target = "familyName"

[[resources.correlation]]
conditions = [{ focus_attribute = "name", source = "uid" }]

[resources.reactions]
linked = { action = "synchronize" }
unlinked = { action = "link" }
unmatched = { action = "add_focus", template = "default-user" }
deleted = { action = "delete_focus" }
"#;

fn ds_seed() -> String {
    format!(
        "dn: dc=example,dc=com\nobjectClass: top\nobjectClass: domain\ndc: example\n\n\
         dn: {PEOPLE}\nobjectClass: top\nobjectClass: organizationalUnit\nou: people\n\n\
         dn: uid=dave,{PEOPLE}\nobjectClass: top\nobjectClass: person\nobjectClass: inetOrgPerson\n\
         uid: dave\ncn: Dave Lister\nsn: Lister\n"
    )
}

async fn ds_person(env: &Env, uid: &str, cn: &str) {
    let ds = env.d.dirsrv.as_ref().unwrap();
    let mut ldap = ds.admin_conn().await.unwrap();
    ldap.add(
        &format!("uid={uid},{PEOPLE}"),
        vec![
            (
                "objectClass",
                HashSet::from(["top", "person", "inetOrgPerson"]),
            ),
            ("uid", HashSet::from([uid])),
            ("cn", HashSet::from([cn])),
            ("sn", HashSet::from(["Person"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
}

async fn ds_ldap(env: &Env) -> ldap3::Ldap {
    env.d.dirsrv.as_ref().unwrap().admin_conn().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_389_directory_server_source_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    idsync_testkit::logs::init();
    let d = Deployment::start_with_options(
        dir.path(),
        &format!("{EXAMPLE_CONFIG}\n{DS_RESOURCE}"),
        Options {
            dirsrv_seed: Some(ds_seed()),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let admin = d.admin().unwrap();
    let mut env = Env {
        d,
        admin,
        _dir: dir,
    };
    // The seeded entry: imported, owned by the ds agreement, provisioned.
    let dave = env
        .user_where("dave", "imported from 389-ds", |u| {
            u.sync_parent == "ds" && u.link_to("acme").is_some()
        })
        .await;
    assert_eq!(dave.first("fullName"), Some("Dave Lister"));
    let link = dave.link_to("ds").unwrap();
    assert_eq!(
        link.entry_uuid.len(),
        36,
        "the sync UUID form: {}",
        link.entry_uuid
    );

    // Live: add, modify, delete.
    ds_person(&env, "kryten", "Kryten").await;
    env.user_where("kryten", "added", |u| u.sync_parent == "ds")
        .await;
    let mut ldap = ds_ldap(&env).await;
    ldap.modify(
        &format!("uid=dave,{PEOPLE}"),
        vec![ldap3::Mod::Replace("cn", HashSet::from(["Dave Lister II"]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    env.user_where("dave", "modified", |u| {
        u.first("fullName") == Some("Dave Lister II")
    })
    .await;

    // Deleted while the detector was away: the resumed session names it.
    env.d.stop_service("detector").await.unwrap();
    ldap.delete(&format!("uid=kryten,{PEOPLE}"))
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    env.d.start_service("detector").unwrap();
    eventually("kryten deleted", WAIT, || async {
        Ok(env.user("kryten").await.is_none().then_some(()))
    })
    .await
    .unwrap();

    // Reconciliation agrees, without entryCSN: nothing to change.
    let out = env.ok(&["reconcile", "ds", "--json"]).await;
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["scanned"], 1, "{r}");
    assert_eq!(
        (r["changed"].as_u64(), r["deleted"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}
