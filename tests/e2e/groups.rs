//! Groups: membership resolved through shadows, in any order.

use std::collections::HashSet;

use idsync::dev::GROUPS;
use idsync_core::model::Focus;
use idsync_testkit::eventually;
use ldap3::Mod;

use crate::support::*;

async fn group_where(env: &Env, name: &str, what: &str, check: impl Fn(&Focus) -> bool) -> Focus {
    let idm = env.idm.clone();
    eventually(&format!("group {name}: {what}"), WAIT, || {
        let idm = idm.clone();
        let check = &check;
        async move {
            let found = idm
                .find_focus("group", "name", name)
                .await
                .map_err(|e| e.to_string())?;
            Ok(found.into_iter().find(|g| check(g)))
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_resolve_whichever_arrives_first() {
    let env = start().await;
    let jack = env
        .user_where("jack", "synced", |u| links_to(u, "hr"))
        .await;
    // The seeded crew has jack.
    let crew = group_where(&env, "crew", "with jack", |g| {
        g.members == [jack.id.clone()]
    })
    .await;
    assert_eq!(crew.first("description"), Some("The Black Pearl's crew"));
    assert!(links_to(&crew, "hr"));

    // A group naming a member who is not there yet ...
    let mut ldap = env.deployment.source.admin_conn().await.unwrap();
    let will_dn = person_dn("will");
    let jack_dn = person_dn("jack");
    let officers = format!("cn=officers,{GROUPS}");
    ldap.add(
        &officers,
        vec![
            ("objectClass", HashSet::from(["groupOfNames"])),
            ("cn", HashSet::from(["officers"])),
            (
                "member",
                HashSet::from([will_dn.as_str(), jack_dn.as_str()]),
            ),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let pending = group_where(&env, "officers", "jack resolved, will pending", |g| {
        g.members == [jack.id.clone()] && g.pending_members.len() == 1
    })
    .await;
    assert_eq!(pending.pending_members[0].dn, will_dn);

    // ... gets him when his account arrives.
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    let will = env
        .user_where("will", "synced", |u| links_to(u, "hr"))
        .await;
    group_where(&env, "officers", "will resolved", |g| {
        g.members.contains(&will.id) && g.members.contains(&jack.id) && g.pending_members.is_empty()
    })
    .await;

    // A member added to an existing group.
    ldap.modify(
        &format!("cn=crew,{GROUPS}"),
        vec![Mod::Add("member", HashSet::from([will_dn.as_str()]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    group_where(&env, "crew", "has will too", |g| g.members.len() == 2).await;

    // A deleted group goes.
    ldap.delete(&officers).await.unwrap().success().unwrap();
    let idm = env.idm.clone();
    eventually("officers deleted", WAIT, || {
        let idm = idm.clone();
        async move {
            let found = idm
                .find_focus("group", "name", "officers")
                .await
                .map_err(|e| e.to_string())?;
            Ok(found.is_empty().then_some(()))
        }
    })
    .await
    .unwrap();
    // A deleted user leaves its groups.
    delete_person(&env.deployment.source, "will").await;
    env.user_gone("will").await;
    group_where(&env, "crew", "will gone", |g| {
        g.members == [jack.id.clone()]
    })
    .await;

    // Users are untouched by group changes, and groups get no accounts.
    let users = env.idm.all_focus("user").await.unwrap();
    assert_eq!(users.len(), 1);
    let groups = env.idm.all_focus("group").await.unwrap();
    assert!(
        groups
            .iter()
            .all(|g| g.assignments.is_empty() && !links_to(g, "acme"))
    );
    env.deployment.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_groups_resolve_members_by_uid() {
    let config = idsync::dev::EXAMPLE_CONFIG.replace(
        "base_dn = \"ou=groups,dc=example,dc=com\"",
        "base_dn = \"ou=groups,dc=example,dc=com\"\nfilter = \"(|(objectClass=groupOfNames)(objectClass=posixGroup))\"\nmember_uid_attribute = \"memberUid\"",
    );
    assert_ne!(config, idsync::dev::EXAMPLE_CONFIG);
    let dir = tempfile::tempdir().unwrap();
    let deployment = idsync::dev::Deployment::start_with(dir.path(), &config)
        .await
        .unwrap();
    let env = Env::from(deployment, dir);
    let jack = env
        .user_where("jack", "synced", |u| links_to(u, "hr"))
        .await;
    let mut ldap = env.deployment.source.admin_conn().await.unwrap();
    ldap.add(
        &format!("cn=sailors,{GROUPS}"),
        vec![
            ("objectClass", HashSet::from(["posixGroup"])),
            ("cn", HashSet::from(["sailors"])),
            ("gidNumber", HashSet::from(["1000"])),
            ("memberUid", HashSet::from(["jack", "will"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let sailors = group_where(&env, "sailors", "jack resolved, will pending", |g| {
        g.members == [jack.id.clone()] && g.pending_members.len() == 1
    })
    .await;
    assert_eq!(sailors.pending_members[0].uid, "will");
    add_person(&env.deployment.source, "will", "Will", "Turner").await;
    let will = env
        .user_where("will", "synced", |u| links_to(u, "hr"))
        .await;
    group_where(&env, "sailors", "will resolved by uid", |g| {
        g.members.contains(&will.id) && g.pending_members.is_empty()
    })
    .await;
    env.deployment.shutdown().await.unwrap();
}
