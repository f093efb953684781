//! The situations that the seed scenarios do not reach: unlinked (an IDM user
//! that correlation finds) and disputed (a candidate that already owns an
//! account on the resource).

use idsync_core::model::{Focus, Op};

use crate::support::*;

fn admin_user(id: &str, name: &str, full_name: &str) -> Focus {
    Focus {
        id: id.into(),
        kind: "user".into(),
        attributes: [
            ("name".to_owned(), vec![name.to_owned()]),
            ("fullName".to_owned(), vec![full_name.to_owned()]),
        ]
        .into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlinked_account_is_linked_to_the_user_correlation_finds() {
    let env = start_with(&adopting()).await;
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;
    // A user made in the IDM before its account appears on the source.
    let op = Op::PutFocus {
        focus: admin_user("admin-will", "will", "W. Turner"),
        expected_version: 0,
    };
    env.idm.commit(vec![op], "").await.unwrap();

    add_person(&env.deployment.source, "will", "Will", "Turner").await;

    let will = env
        .user_where("will", "linked to hr", |u| links_to(u, "hr"))
        .await;
    assert_eq!(will.id, "admin-will", "the existing user, not a new one");
    // The link reaction synchronizes: normal mappings apply, as the source is new to this user.
    assert_eq!(will.first("fullName"), Some("Will Turner"));
    assert_eq!(will.first("familyName"), Some("Turner"));
    let shadow = env
        .idm
        .get_shadow("hr", &will.link_to("hr").unwrap().entry_uuid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shadow.situation, "unlinked");
    assert_eq!(shadow.focus_id.as_deref(), Some("admin-will"));
    assert_eq!(
        env.idm
            .find_focus("user", "name", "will")
            .await
            .unwrap()
            .len(),
        1
    );
    env.deployment.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_account_for_an_owned_user_is_disputed_and_changes_nothing() {
    let env = start().await;
    let jack = env
        .user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;

    // Another entry whose uid correlates to jack, who already owns uid=jack.
    let mut ldap = env.deployment.source.admin_conn().await.unwrap();
    let attrs = vec![
        (
            "objectClass",
            std::collections::HashSet::from(["inetOrgPerson"]),
        ),
        ("uid", std::collections::HashSet::from(["jack"])),
        ("cn", std::collections::HashSet::from(["Jack Impostor"])),
        ("sn", std::collections::HashSet::from(["Impostor"])),
    ];
    ldap.add("cn=Jack Impostor,ou=people,dc=example,dc=com", attrs)
        .await
        .unwrap()
        .success()
        .unwrap();

    // Its shadow is recorded as disputed and unlinked ...
    let idm = env.idm.clone();
    let shadow = idsync_testkit::eventually("a disputed shadow", WAIT, || {
        let idm = idm.clone();
        async move {
            let shadows = idm.all_shadows("hr").await.map_err(|e| e.to_string())?;
            Ok(shadows
                .into_iter()
                .find(|s| s.dn.starts_with("cn=Jack Impostor")))
        }
    })
    .await
    .unwrap();
    assert_eq!(shadow.situation, "disputed");
    assert_eq!(shadow.focus_id, None);
    // ... and jack is untouched.
    let after = env.idm.get_focus(&jack.id).await.unwrap().unwrap();
    assert_eq!(after.first("fullName"), Some("Jack Sparrow"));
    assert_eq!(after.links, jack.links);
    env.deployment.shutdown().await.unwrap();
}

/// The example plus a second, ambiguous correlation rule (by family name).
fn config_with_family_name_rule() -> String {
    let example = &adopting();
    let rule = "[[resources.correlation]]\nconditions = [{ focus_attribute = \"name\", source = \"uid\" }]\n";
    assert!(example.contains(rule));
    let second = "[[resources.correlation]]\nconditions = [{ focus_attribute = \"familyName\", source = \"sn\" }]\n";
    example.replace(rule, &format!("{rule}\n{second}"))
}

fn turner(id: &str, name: &str) -> Op {
    let mut f = admin_user(id, name, "A Turner");
    f.attributes
        .insert("familyName".into(), vec!["Turner".into()]);
    Op::PutFocus {
        focus: f,
        expected_version: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resolves_disputed_cases_by_link_and_by_creation() {
    use idsync::cases::{self, Resolution};
    let dir = tempfile::tempdir().unwrap();
    let deployment =
        idsync::dev::Deployment::start_with(dir.path(), &config_with_family_name_rule())
            .await
            .unwrap();
    let idm = deployment.admin().unwrap();
    let bus = idsync_bus::Bus::connect(deployment.nats.url())
        .await
        .unwrap();
    idm.commit(vec![turner("t1", "wturner"), turner("t2", "bturner")], "")
        .await
        .unwrap();

    add_person(&deployment.source, "will", "Will", "Turner").await;
    let open = idsync_testkit::eventually("a case for will", WAIT, || {
        let idm = idm.clone();
        async move {
            let open = cases::list(&idm).await.map_err(|e| e.to_string())?;
            Ok((!open.is_empty()).then_some(open))
        }
    })
    .await
    .unwrap();
    assert_eq!(open.len(), 1);
    let case = &open[0];
    assert_eq!(case.shadow.dn, person_dn("will"));
    let mut names: Vec<_> = case
        .candidates
        .iter()
        .filter_map(|f| f.first("name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["bturner", "wturner"]);
    // Nothing changed while the case is open.
    assert!(idm.get_focus("t1").await.unwrap().unwrap().links.is_empty());

    // Link it to wturner. The strong name mapping renames the user to the uid.
    let wait = std::time::Duration::from_secs(30);
    let uuid = case.shadow.entry_uuid.clone();
    let shadow = cases::resolve(
        &idm,
        &bus,
        "hr",
        "hr",
        &uuid,
        Resolution::Link("wturner".into()),
        wait,
    )
    .await
    .unwrap();
    assert_eq!(shadow.focus_id.as_deref(), Some("t1"));
    let t1 = idm.get_focus("t1").await.unwrap().unwrap();
    assert_eq!(t1.first("name"), Some("will"));
    assert_eq!(t1.first("fullName"), Some("Will Turner"));
    assert!(links_to(&t1, "hr"));

    // A second dispute, resolved by creating a new user (with the template's acme account).
    add_person(&deployment.source, "elizabeth", "Elizabeth", "Turner").await;
    let case = idsync_testkit::eventually("a case for elizabeth", WAIT, || {
        let idm = idm.clone();
        async move {
            let open = cases::list(&idm).await.map_err(|e| e.to_string())?;
            Ok(open.into_iter().next())
        }
    })
    .await
    .unwrap();
    cases::resolve(
        &idm,
        &bus,
        "hr",
        "hr",
        &case.shadow.entry_uuid,
        Resolution::Create,
        wait,
    )
    .await
    .unwrap();
    let env_idm = idm.clone();
    idsync_testkit::eventually("elizabeth created and provisioned", WAIT, || {
        let idm = env_idm.clone();
        async move {
            let found = idm
                .find_focus("user", "name", "elizabeth")
                .await
                .map_err(|e| e.to_string())?;
            Ok(found
                .into_iter()
                .find(|u| links_to(u, "hr") && links_to(u, "acme")))
        }
    })
    .await
    .unwrap();
    assert!(cases::list(&idm).await.unwrap().is_empty());

    // Resolving what is not an open case says so.
    let err = cases::resolve(&idm, &bus, "hr", "hr", &uuid, Resolution::Create, wait)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not an open case"), "{err}");
    deployment.shutdown().await.unwrap();
}

/// The example with the unmatched reaction replaced.
fn config_with_unmatched(reaction: &str) -> String {
    let example = idsync::dev::EXAMPLE_CONFIG;
    let unmatched = "unmatched = { action = \"add_focus\", template = \"default-user\" }";
    assert!(example.contains(unmatched));
    example
        .replace(
            unmatched,
            &format!("unmatched = {{ action = \"{reaction}\" }}"),
        )
        .replace(
            "live_sync = true",
            "live_sync = true\ndisable = { attribute = \"employeeType\", value = \"disabled\" }",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_accounts_can_be_disabled_or_deleted_on_the_source() {
    // inactivate_shadow: the account gets the disabling value, once.
    let dir = tempfile::tempdir().unwrap();
    let deployment = idsync::dev::Deployment::start_with(
        dir.path(),
        &config_with_unmatched("inactivate_shadow"),
    )
    .await
    .unwrap();
    let env = Env::from(deployment, dir);
    let jack_dn = person_dn("jack");
    let source = &env.deployment.source;
    idsync_testkit::eventually("jack disabled on the source", WAIT, || async {
        let e = read(source, &jack_dn).await;
        Ok(e.filter(|e| e.get("employeetype") == Some(&set(&["disabled"]))))
    })
    .await
    .unwrap();
    // The write's own change comes back and is left alone: the stream settles.
    let bus = idsync_bus::Bus::connect(env.deployment.nats.url())
        .await
        .unwrap();
    let settled = idsync_testkit::eventually("the change stream settles", WAIT, || {
        let bus = bus.clone();
        async move {
            let before = bus
                .stream_messages(idsync_bus::names::CHANGES_STREAM)
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let after = bus
                .stream_messages(idsync_bus::names::CHANGES_STREAM)
                .await
                .map_err(|e| e.to_string())?;
            Ok((before == after).then_some(after))
        }
    })
    .await
    .unwrap();
    assert!(
        settled <= 3,
        "jack, crew and jack's disabling: {settled} events"
    );
    assert!(
        env.idm
            .find_focus("user", "name", "jack")
            .await
            .unwrap()
            .is_empty()
    );
    env.deployment.shutdown().await.unwrap();

    // delete_shadow: the account is deleted on the source, and its shadow dies.
    let dir = tempfile::tempdir().unwrap();
    let deployment =
        idsync::dev::Deployment::start_with(dir.path(), &config_with_unmatched("delete_shadow"))
            .await
            .unwrap();
    let env = Env::from(deployment, dir);
    let source = &env.deployment.source;
    idsync_testkit::eventually("jack deleted on the source", WAIT, || async {
        Ok(read(source, &jack_dn).await.is_none().then_some(()))
    })
    .await
    .unwrap();
    let idm = env.idm.clone();
    idsync_testkit::eventually("jack's shadow dead", WAIT, || {
        let idm = idm.clone();
        async move {
            let shadows = idm.all_shadows("hr").await.map_err(|e| e.to_string())?;
            Ok(shadows
                .into_iter()
                .find(|s| s.dn == person_dn("jack") && s.dead))
        }
    })
    .await
    .unwrap();
    assert!(
        env.idm
            .find_focus("user", "name", "jack")
            .await
            .unwrap()
            .is_empty()
    );
    env.deployment.shutdown().await.unwrap();
}

/// Account types (midPoint's intents) are resources of their own over the
/// same directory: here admin accounts under ou=admins, linked to the users
/// their cn names. Each type has its own sync session, shadows and link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_account_type_on_the_same_directory_links_to_the_same_user() {
    let admins = r#"
[[resources]]
name = "hr-admins"
agreement = "hr"
url = "ldap://127.0.0.1:389"
bind_dn = "cn=admin,dc=example,dc=com"
bind_password_env = "IDSYNC_HR_PASSWORD"
base_dn = "ou=admins,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
live_sync = true

[[resources.inbound]]
source = "description"
target = "adminNote"

[[resources.correlation]]
conditions = [{ focus_attribute = "name", source = "cn" }]

[resources.reactions]
linked = { action = "synchronize" }
unlinked = { action = "link" }
unmatched = { action = "nothing" }
deleted = { action = "unlink" }
"#;
    let config = idsync::dev::EXAMPLE_CONFIG.replacen(
        "[[resources]]\nname = \"acme\"",
        &format!("{admins}\n[[resources]]\nname = \"acme\""),
        1,
    );
    assert!(config.contains("hr-admins"));
    let dir = tempfile::tempdir().unwrap();
    let deployment = idsync::dev::Deployment::start_with(dir.path(), &config)
        .await
        .unwrap();
    let env = Env::from(deployment, dir);
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;

    let mut ldap = env.deployment.source.admin_conn().await.unwrap();
    let ou = "ou=admins,dc=example,dc=com";
    ldap.add(
        ou,
        vec![
            (
                "objectClass",
                std::collections::HashSet::from(["organizationalUnit"]),
            ),
            ("ou", std::collections::HashSet::from(["admins"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    ldap.add(
        &format!("uid=adm-jack,{ou}"),
        vec![
            (
                "objectClass",
                std::collections::HashSet::from(["inetOrgPerson"]),
            ),
            ("uid", std::collections::HashSet::from(["adm-jack"])),
            ("cn", std::collections::HashSet::from(["jack"])),
            ("sn", std::collections::HashSet::from(["Sparrow"])),
            (
                "description",
                std::collections::HashSet::from(["captain's admin account"]),
            ),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();

    let jack = env
        .user_where("jack", "linked to his admin account too", |u| {
            links_to(u, "hr-admins")
        })
        .await;
    assert!(links_to(&jack, "hr") && links_to(&jack, "acme"), "{jack:?}");
    assert_eq!(jack.first("adminNote"), Some("captain's admin account"));
    assert_eq!(
        jack.first("fullName"),
        Some("Jack Sparrow"),
        "the admin type maps only what it owns"
    );
    // Deleting the admin account unlinks it; the user stays.
    ldap.delete(&format!("uid=adm-jack,{ou}"))
        .await
        .unwrap()
        .success()
        .unwrap();
    let jack = env
        .user_where("jack", "admin account unlinked", |u| {
            !links_to(u, "hr-admins")
        })
        .await;
    assert!(links_to(&jack, "hr"));
    env.deployment.shutdown().await.unwrap();
}
