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
    let env = start().await;
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
