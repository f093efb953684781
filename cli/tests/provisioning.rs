//! Provisioning on real servers: roles that give accounts, values and group
//! membership on the target, and changes made by an administrator.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use idsync::dev::{EXAMPLE_CONFIG, TARGET_SUFFIX};
use idsync_core::model::{Assignment, Op};
use idsync_testkit::eventually;

mod support;
use support::*;

fn dn(cn: &str) -> String {
    format!("cn={cn},{TARGET_SUFFIX}")
}

/// A group on the target with one member put there by hand.
async fn add_group(env: &Env, cn: &str) {
    add_target(
        env,
        &dn(cn),
        &[
            ("objectClass", &["groupOfNames"]),
            ("cn", &[cn]),
            ("member", &["cn=placeholder,o=Acme"]),
        ],
    )
    .await;
}

fn member_of(group: Option<&ldap3::SearchEntry>, who: &str) -> bool {
    values(group, "member")
        .iter()
        .any(|m| m.eq_ignore_ascii_case(who))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_give_accounts_values_and_groups_and_take_them_back() {
    let env = start(EXAMPLE_CONFIG).await;
    add_group(&env, "engineers").await;
    add_group(&env, "staff").await;

    env.ok(&["roles", "create", "employee"]).await;
    env.ok(&["roles", "add", "employee", "acme", "--group", &dn("staff")])
        .await;
    env.ok(&["roles", "create", "engineer", "--description", "Builds"])
        .await;
    env.ok(&[
        "roles",
        "add",
        "engineer",
        "acme",
        "--set",
        "title=Engineer",
        "--group",
        &dn("engineers"),
    ])
    .await;
    env.ok(&["roles", "include", "engineer", "employee"]).await;
    let cycle = env.cli(&["roles", "include", "employee", "engineer"]).await;
    assert!(!cycle.status.success());
    assert!(text(&cycle).contains("cycle"), "{}", text(&cycle));
    let unknown = env.cli(&["roles", "add", "engineer", "hr"]).await;
    assert!(
        text(&unknown).contains("no dn_template"),
        "a source is no target: {}",
        text(&unknown)
    );

    // A native user, given the role from the CLI.
    env.ok(&[
        "users",
        "create",
        "will",
        "--set",
        "fullName=Will Turner",
        "--set",
        "familyName=Turner",
    ])
    .await;
    env.ok(&["users", "assign", "will", "--role", "engineer"])
        .await;
    let will = dn("will");
    target_where(&env, &will, "made with the role's title", |e| {
        values(e, "title") == ["Engineer"] && values(e, "description") == ["Created by IDM"]
    })
    .await;
    target_where(&env, &dn("engineers"), "will is a member", |g| {
        member_of(g, &will)
    })
    .await;
    target_where(&env, &dn("staff"), "will is a member (nested)", |g| {
        member_of(g, &will)
    })
    .await;
    let shown = env.ok(&["roles", "show", "engineer"]).await;
    assert!(shown.contains("held by 1"), "{shown}");
    assert!(shown.contains("includes employee"), "{shown}");

    // A change of the role reaches its holders; values set by hand stay.
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    ldap.modify(&will, vec![ldap3::Mod::Add("title", ["Captain"].into())])
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    env.ok(&["roles", "add", "engineer", "acme", "--set", "title=Builder"])
        .await;
    target_where(&env, &will, "the new title given", |e| {
        let mut t = values(e, "title");
        t.sort_unstable();
        t == ["Builder", "Captain", "Engineer"]
    })
    .await;
    env.ok(&[
        "roles",
        "remove",
        "engineer",
        "acme",
        "--set",
        "title=Engineer",
    ])
    .await;
    target_where(
        &env,
        &will,
        "the old title taken back, the hand-set one kept",
        |e| {
            let mut t = values(e, "title");
            t.sort_unstable();
            t == ["Builder", "Captain"]
        },
    )
    .await;
    env.ok(&["roles", "exclude", "engineer", "employee"]).await;
    target_where(
        &env,
        &dn("staff"),
        "will left staff, the hand-made member stayed",
        |g| !member_of(g, &will) && member_of(g, "cn=placeholder,o=Acme"),
    )
    .await;

    // A rename moves the membership to the new DN.
    env.ok(&["users", "set", "will", "name=wturner"]).await;
    let renamed = dn("wturner");
    target_where(&env, &renamed, "renamed", |e| e.is_some()).await;
    target_where(&env, &dn("engineers"), "membership moved", |g| {
        member_of(g, &renamed) && !member_of(g, &will)
    })
    .await;

    // A role still held cannot be deleted.
    let refused = env.cli(&["roles", "delete", "engineer"]).await;
    assert!(!refused.status.success());
    assert!(text(&refused).contains("held by 1"), "{}", text(&refused));

    // The last assignment gone: the account is deleted and leaves its groups.
    env.ok(&["users", "unassign", "wturner", "--role", "engineer"])
        .await;
    target_where(&env, &renamed, "deleted", |e| e.is_none()).await;
    target_where(&env, &dn("engineers"), "left by the deleted account", |g| {
        !member_of(g, &renamed) && member_of(g, "cn=placeholder,o=Acme")
    })
    .await;
    env.ok(&["roles", "delete", "engineer"]).await;
    let list = env.ok(&["roles", "list"]).await;
    assert!(!list.contains("engineer"), "{list}");
    assert!(list.contains("employee"), "{list}");
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_does_not_exist_parks_the_provisioning_with_its_name() {
    let env = start(&format!(
        "{EXAMPLE_CONFIG}\n[provisioning]\nmax_attempts = 2\n"
    ))
    .await;
    env.ok(&[
        "users",
        "create",
        "bob",
        "--set",
        "fullName=Bob",
        "--set",
        "familyName=Bo",
    ])
    .await;
    // Written past the CLI (which refuses unknown roles), as any gRPC client could.
    let mut bob = env.user("bob").await.unwrap();
    let version = bob.version;
    bob.assignments.push(Assignment {
        role: "ghost".into(),
        source: "api".into(),
        ..Default::default()
    });
    env.admin
        .commit(
            vec![Op::PutFocus {
                focus: bob,
                expected_version: version,
            }],
            "",
        )
        .await
        .unwrap();
    let parked = eventually("bob's provisioning parked", WAIT, || async {
        let out = env.ok(&["provisioning", "parked"]).await;
        Ok(out.contains("ghost").then_some(out))
    })
    .await
    .unwrap();
    assert!(
        parked.contains("user bob is given role \"ghost\", which does not exist"),
        "{parked}"
    );
    // Once the role exists, its holders are provisioned; the parked
    // operation is then dropped.
    env.ok(&["roles", "create", "ghost"]).await;
    env.ok(&["roles", "add", "ghost", "acme"]).await;
    target_where(&env, &dn("bob"), "provisioned once the role exists", |e| {
        e.is_some()
    })
    .await;
    let seq = parked
        .lines()
        .find(|l| l.contains("user"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    env.ok(&["provisioning", "drop", &seq]).await;
    env.d.shutdown().await.unwrap();
}
