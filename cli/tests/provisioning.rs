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
    ldap.modify(
        &will,
        vec![
            ldap3::Mod::Add("title", ["Captain"].into()),
            ldap3::Mod::Replace("sn", ["Edited"].into()),
        ],
    )
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
    // A role change enforces what roles give and strong mappings; normal
    // ones leave the hand edit alone, as reconciliation does.
    let e = target_entry(&env, &will).await;
    assert_eq!(values(e.as_ref(), "sn"), ["Edited"]);
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

    // A rename moves the membership to the new DN; a change made in the same
    // commit reaches the renamed account too.
    env.ok(&[
        "users",
        "set",
        "will",
        "name=wturner",
        "familyName=Turner-Swann",
    ])
    .await;
    let renamed = dn("wturner");
    target_where(&env, &renamed, "renamed, with the new surname", |e| {
        values(e, "sn") == ["Turner-Swann"]
    })
    .await;
    target_where(&env, &dn("engineers"), "membership moved", |g| {
        member_of(g, &renamed) && !member_of(g, &will)
    })
    .await;
    // Any administrator's change is provisioned.
    env.ok(&["users", "set", "wturner", "fullName=William Turner"])
        .await;
    target_where(&env, &renamed, "the new full name", |e| {
        values(e, "cn").contains(&"William Turner")
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
    env.assert_no_secret_logged();
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

    // A group the role names that the target does not have: parked, named.
    env.ok(&[
        "roles",
        "add",
        "ghost",
        "acme",
        "--group",
        "cn=nogroup,o=Acme",
    ])
    .await;
    let parked = eventually("the missing group parks bob", WAIT, || async {
        let out = env.ok(&["provisioning", "parked"]).await;
        Ok(out.contains("nogroup").then_some(out))
    })
    .await
    .unwrap();
    assert!(
        parked
            .contains("resource acme: group cn=nogroup,o=Acme, which a role gives, does not exist"),
        "{parked}"
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

/// hr (the source) and crm (on the target directory) both read and written,
/// under one agreement: each sends its changes to the IDM, and the IDM's
/// changes go out to both.
fn two_way_config() -> String {
    let hr_start = EXAMPLE_CONFIG.find("[[resources]]").unwrap();
    let head = EXAMPLE_CONFIG[..hr_start].replace(
        "assignments = [\"acme\"]",
        "assignments = [\"hr\", \"crm\"]",
    );
    format!(
        r#"{head}
[[resources]]
name = "hr"
agreement = "hr"
url = "ldap://127.0.0.1:389"
bind_dn = "cn=admin,dc=example,dc=com"
base_dn = "ou=people,dc=example,dc=com"
filter = "(objectClass=inetOrgPerson)"
live_sync = true
object_classes = ["inetOrgPerson"]
dn_template = "uid={{name}},ou=people,dc=example,dc=com"
inbound = [
  {{ source = "uid", target = "name", strength = "strong" }},
  {{ source = "cn", target = "fullName" }},
  {{ source = "sn", target = "familyName" }},
]
outbound = [
  {{ source = "fullName", target = "cn" }},
  {{ source = "familyName", target = "sn" }},
  # Normal: follows the IDM, but never echoes hr's own change back to hr.
  {{ source = "fullName", target = "displayName" }},
  # Strong: enforced even on hr's own changes.
  {{ value = "idsync", target = "employeeType", strength = "strong" }},
]
correlation = [{{ conditions = [{{ focus_attribute = "name", source = "uid" }}] }}]

[resources.reactions]
linked = {{ action = "synchronize" }}
unlinked = {{ action = "link" }}
unmatched = {{ action = "add_focus", template = "default-user" }}
deleted = {{ action = "unlink" }}

[[resources]]
name = "crm"
agreement = "hr"
url = "ldap://127.0.0.1:390"
bind_dn = "cn=admin,o=Acme"
base_dn = "o=Acme"
filter = "(objectClass=inetOrgPerson)"
live_sync = true
object_classes = ["inetOrgPerson"]
dn_template = "uid={{name}},o=Acme"
inbound = [
  {{ source = "cn", target = "fullName" }},
  {{ source = "sn", target = "familyName" }},
]
outbound = [
  {{ source = "fullName", target = "cn" }},
  {{ source = "familyName", target = "sn" }},
]
correlation = [{{ conditions = [{{ focus_attribute = "name", source = "uid" }}] }}]

[resources.reactions]
linked = {{ action = "synchronize" }}
unlinked = {{ action = "link" }}
unmatched = {{ action = "nothing" }}
deleted = {{ action = "unlink" }}
"#
    )
}

/// The entry's attributes with its entryCSN (which every write changes).
async fn read(server: &idsync_testkit::Slapd, dn: &str) -> (String, ldap3::SearchEntry) {
    let mut ldap = server.admin_conn().await.unwrap();
    let (entries, _) = ldap
        .search(
            dn,
            ldap3::Scope::Base,
            "(objectClass=*)",
            vec!["*", "entryCSN"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    let e = ldap3::SearchEntry::construct(entries.into_iter().next().unwrap());
    (e.attrs["entryCSN"][0].clone(), e)
}

async fn set(server: &idsync_testkit::Slapd, dn: &str, attribute: &str, value: &str) -> String {
    let mut ldap = server.admin_conn().await.unwrap();
    ldap.modify(dn, vec![ldap3::Mod::Replace(attribute, [value].into())])
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    read(server, dn).await.0
}

/// Nothing changes any more: the user's version and both entries stay put
/// for a while.
async fn settled(env: &Env, hr: &str, crm: &str) -> (u64, String, String) {
    let state = || async {
        (
            env.user("jack").await.unwrap().version,
            read(&env.d.source, hr).await.0,
            read(&env.d.target, crm).await.0,
        )
    };
    let before = state().await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let after = state().await;
    assert_eq!(before, after, "still changing after 3 s: no settling");
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resources_mapped_both_ways_settle_without_echoes() {
    let env = start(&two_way_config()).await;
    let hr = format!("uid=jack,{}", idsync::dev::PEOPLE);
    let crm = format!("uid=jack,{TARGET_SUFFIX}");

    // jack from hr gets an account on crm, and hr the strong value.
    env.user_where("jack", "linked to both", |u| {
        u.link_to("hr").is_some() && u.link_to("crm").is_some()
    })
    .await;
    eventually("hr gets the strong value", WAIT, || async {
        let (_, e) = read(&env.d.source, &hr).await;
        Ok(e.attrs.contains_key("employeeType").then_some(()))
    })
    .await
    .unwrap();
    let (_, e) = read(&env.d.target, &crm).await;
    assert_eq!(e.attrs["cn"], ["Jack Sparrow"]);
    settled(&env, &hr, &crm).await;

    // A change on crm reaches hr, normal mappings included, and nothing
    // is written back to crm.
    let crm_csn = set(&env.d.target, &crm, "cn", "Jack the Pirate").await;
    eventually("hr follows crm", WAIT, || async {
        let (_, e) = read(&env.d.source, &hr).await;
        Ok((values(Some(&e), "cn") == ["Jack the Pirate"]
            && values(Some(&e), "displayName") == ["Jack the Pirate"])
        .then_some(()))
    })
    .await
    .unwrap();
    let (version, _, crm_after) = settled(&env, &hr, &crm).await;
    assert_eq!(crm_after, crm_csn, "crm was written back to");

    // And the other way: hr's change reaches crm, in one round.
    let hr_csn = set(&env.d.source, &hr, "cn", "Captain Jack").await;
    eventually("crm follows hr", WAIT, || async {
        let (_, e) = read(&env.d.target, &crm).await;
        Ok((values(Some(&e), "cn") == ["Captain Jack"]).then_some(()))
    })
    .await
    .unwrap();
    let (version_after, hr_after, _) = settled(&env, &hr, &crm).await;
    assert_eq!(hr_after, hr_csn, "hr was written back to");
    // So hr's own displayName (a normal mapping) is left as it was: it
    // follows changes that come from elsewhere.
    let (_, e) = read(&env.d.source, &hr).await;
    assert_eq!(values(Some(&e), "displayName"), ["Jack the Pirate"]);
    assert_eq!(
        version_after,
        version + 1,
        "one change of the user, not a ping-pong"
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_mappings_follow_their_sources_and_strong_ones_are_enforced() {
    // acme is the example's last resource: this mapping is its.
    let config = format!(
        "{EXAMPLE_CONFIG}\n[[resources.outbound]]\nvalue = \"idsync\"\ntarget = \"employeeType\"\nstrength = \"strong\"\n"
    );
    let env = start(&config).await;
    let jack = dn("jack");
    target_where(&env, &jack, "provisioned", |e| {
        values(e, "employeeType") == ["idsync"]
    })
    .await;
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    ldap.modify(
        &jack,
        vec![
            ldap3::Mod::Replace("sn", ["Hand"].into()),
            ldap3::Mod::Replace("description", ["by hand"].into()),
            ldap3::Mod::Replace("employeeType", ["hand"].into()),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;

    // fullName changes: cn follows, the strong value is put back, and the
    // normal mappings whose sources did not change leave the hand edits.
    set_cn(&env.d.source, "jack", "Captain Jack").await;
    target_where(&env, &jack, "cn follows, the strong value is back", |e| {
        values(e, "cn").contains(&"Captain Jack") && values(e, "employeeType") == ["idsync"]
    })
    .await;
    let e = target_entry(&env, &jack).await;
    assert_eq!(values(e.as_ref(), "sn"), ["Hand"]);
    assert_eq!(values(e.as_ref(), "description"), ["by hand"]);

    // Reconciliation enforces strong mappings only.
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    ldap.modify(
        &jack,
        vec![ldap3::Mod::Replace("employeeType", ["hand"].into())],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
    let out = env
        .ok(&["reconcile", "acme", "--json", "--rate", "2000"])
        .await;
    assert!(out.contains("\"reprovisioned\":1"), "{out}");
    target_where(&env, &jack, "the strong value put back", |e| {
        values(e, "employeeType") == ["idsync"]
    })
    .await;
    let e = target_entry(&env, &jack).await;
    assert_eq!(values(e.as_ref(), "sn"), ["Hand"], "normal: left alone");

    // A change of its source: the normal mapping follows.
    let mut ldap = env.d.source.admin_conn().await.unwrap();
    ldap.modify(
        &format!("uid=jack,{}", idsync::dev::PEOPLE),
        vec![ldap3::Mod::Replace("sn", ["Sparrow II"].into())],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
    target_where(&env, &jack, "sn follows its source", |e| {
        values(e, "sn") == ["Sparrow II"]
    })
    .await;
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}
