//! Reconciliation through `idsync reconcile`, on real servers: the source side
//! finds what live sync missed, the target side puts drift back and handles
//! orphans, and a second run over unchanged entries publishes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use idsync::dev::{EXAMPLE_CONFIG, TARGET_SUFFIX};
use idsync_bus::{Bus, names};
use idsync_testkit::eventually;

mod support;
use support::*;

async fn reconcile(env: &Env, resource: &str) -> serde_json::Value {
    let out = env
        .ok(&["reconcile", resource, "--json", "--rate", "2000"])
        .await;
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_side_finds_what_live_sync_missed_and_nothing_else() {
    let mut env = start(EXAMPLE_CONFIG).await;
    for uid in ["will", "anna", "bob"] {
        add_person(&env.d.source, uid, &format!("{uid} Person")).await;
    }
    env.user_where("bob", "synced", |_| true).await;

    // While nobody listens, and with the cookie lost.
    env.d.stop_service("detector").await.unwrap();
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    bus.delete_cookie("hr").await.unwrap();
    set_cn(&env.d.source, "jack", "cpt. Jack Sparrow").await;
    add_person(&env.d.source, "kate", "Kate Bush").await;
    delete_person(&env.d.source, "will").await;

    let r = reconcile(&env, "hr").await;
    // jack, anna, bob, kate and the crew group.
    assert_eq!(r["scanned"], 5, "{r}");
    assert_eq!(r["changed"], 2, "jack and kate: {r}");
    assert_eq!(r["deleted"], 1, "will: {r}");
    env.user_where("jack", "renamed", |u| {
        u.first("fullName") == Some("cpt. Jack Sparrow")
    })
    .await;
    env.user_where("kate", "created", |_| true).await;
    eventually("will deleted", WAIT, || async {
        Ok(env.user("will").await.is_none().then_some(()))
    })
    .await
    .unwrap();

    // Converged: another run finds nothing and publishes nothing, and keeps
    // to its rate limit (5 entries at 4 a second take at least a second).
    let published = bus.stream_messages(names::CHANGES_STREAM).await.unwrap();
    let out = env.ok(&["reconcile", "hr", "--json", "--rate", "4"]).await;
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert!(r["seconds"].as_f64().unwrap() >= 1.0, "{r}");
    assert_eq!(
        (r["changed"].as_u64(), r["deleted"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(
        bus.stream_messages(names::CHANGES_STREAM).await.unwrap(),
        published,
        "unchanged entries produce no events"
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_side_puts_drift_back_and_removes_orphans() {
    let config = EXAMPLE_CONFIG
        .replace(
            "value = \"Created by IDM\"\ntarget = \"description\"",
            "value = \"Created by IDM\"\ntarget = \"description\"\nstrength = \"strong\"",
        )
        .replace(
            "dn_template = \"cn={name},o=Acme\"",
            "dn_template = \"cn={name},o=Acme\"\n\n[resources.reactions]\nunmatched = { action = \"delete_shadow\" }",
        );
    assert!(config.contains("strength = \"strong\"") && config.contains("delete_shadow"));
    let env = start(&config).await;
    env.user_where("jack", "provisioned", |u| u.link_to("acme").is_some())
        .await;
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    // Drift: someone edits the account by hand.
    ldap.modify(
        &format!("cn=jack,{TARGET_SUFFIX}"),
        vec![ldap3::Mod::Replace(
            "description",
            HashSet::from(["edited by hand"]),
        )],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    // An orphan: an account no user calls for.
    ldap.add(
        &format!("cn=ghost,{TARGET_SUFFIX}"),
        vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("cn", HashSet::from(["ghost"])),
            ("sn", HashSet::from(["Ghost"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();

    let r = reconcile(&env, "acme").await;
    assert_eq!(r["scanned"], 2, "jack's account and the ghost: {r}");
    assert_eq!(r["orphans"], 1, "{r}");
    assert_eq!(r["reprovisioned"], 1, "{r}");
    let read = |dn: String| {
        let env = &env;
        async move {
            let mut ldap = env.d.target.admin_conn().await.unwrap();
            let result = ldap
                .search(
                    &dn,
                    ldap3::Scope::Base,
                    "(objectClass=*)",
                    vec!["description"],
                )
                .await
                .unwrap();
            let entries = result.success().map(|(e, _)| e).unwrap_or_default();
            entries
                .into_iter()
                .next()
                .map(ldap3::SearchEntry::construct)
        }
    };
    eventually("the strong description put back", WAIT, || async {
        let jack = read(format!("cn=jack,{TARGET_SUFFIX}")).await;
        Ok(jack
            .filter(|e| e.attrs.get("description") == Some(&vec!["Created by IDM".to_owned()]))
            .map(drop))
    })
    .await
    .unwrap();
    assert!(
        read(format!("cn=ghost,{TARGET_SUFFIX}")).await.is_none(),
        "the orphan is deleted"
    );
    let _ = ldap.unbind().await;
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detector_reconciles_on_its_schedule() {
    let config = EXAMPLE_CONFIG.replace(
        "live_sync = true",
        "live_sync = false\nreconcile_schedule = \"* * * * *\"",
    );
    let env = start(&config).await;
    // Without live sync, only the first reconciliation (next minute) imports jack.
    let jack = eventually(
        "jack imported by a scheduled reconciliation",
        std::time::Duration::from_secs(75),
        || async { Ok(env.user("jack").await) },
    )
    .await
    .unwrap();
    assert_eq!(jack.sync_parent, "hr");
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

async fn add_target_account(env: &Env, cn: &str) -> String {
    let mut ldap = env.d.target.admin_conn().await.unwrap();
    let dn = format!("cn={cn},{TARGET_SUFFIX}");
    ldap.add(
        &dn,
        vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("cn", HashSet::from([cn])),
            ("sn", HashSet::from(["Earlier"])),
            ("description", HashSet::from(["made by hand"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let (entries, _) = ldap
        .search(
            &dn,
            ldap3::Scope::Base,
            "(objectClass=*)",
            vec!["entryUUID"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let _ = ldap.unbind().await;
    ldap3::SearchEntry::construct(entries.into_iter().next().unwrap()).attrs["entryUUID"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_links_an_account_that_is_already_there_by_the_reaction() {
    let env = start(EXAMPLE_CONFIG).await;
    let uuid = add_target_account(&env, "will").await;
    add_person(&env.d.source, "will", "Will Turner").await;
    let will = env
        .user_where("will", "linked to the account found", |u| {
            u.link_to("acme").is_some()
        })
        .await;
    assert_eq!(
        will.link_to("acme").unwrap().entry_uuid,
        uuid,
        "the account that was there"
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();

    // With `unlinked = nothing` on the target, the account is left alone and
    // the user's provisioning is parked with the reason.
    let config = EXAMPLE_CONFIG.replace(
        "dn_template = \"cn={name},o=Acme\"",
        "dn_template = \"cn={name},o=Acme\"\n\n[resources.reactions]\nunlinked = { action = \"nothing\" }",
    );
    let env = start(&config).await;
    add_target_account(&env, "will").await;
    add_person(&env.d.source, "will", "Will Turner").await;
    env.user_where("will", "synced", |_| true).await;
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    eventually("the provisioning parked", WAIT, || async {
        let parked = bus
            .peek(names::DEAD_STREAM, 1, 100)
            .await
            .map_err(|e| e.to_string())?;
        Ok(parked
            .iter()
            .filter_map(|m| {
                <idsync_proto::v1::DeadLetter as prost::Message>::decode(m.payload.as_ref()).ok()
            })
            .find(|l| l.reason.contains("does not link it")))
    })
    .await
    .unwrap();
    assert!(env.user("will").await.unwrap().link_to("acme").is_none());
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

/// The entry `dn` of the target directory, if there is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigning_deprovisions_by_the_resources_policy() {
    // Default policy: delete.
    let env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "provisioned", |u| u.link_to("acme").is_some())
        .await;
    let out = env.ok(&["users", "unassign", "jack", "acme"]).await;
    assert!(out.contains("no longer assigned acme"), "{out}");
    env.user_where("jack", "unlinked from acme", |u| {
        u.link_to("acme").is_none()
    })
    .await;
    assert!(
        target_entry(&env, &format!("cn=jack,{TARGET_SUFFIX}"))
            .await
            .is_none()
    );
    // Assigned again from the CLI: provisioned like any other change.
    env.ok(&["users", "assign", "jack", "acme"]).await;
    env.user_where("jack", "linked again", |u| u.link_to("acme").is_some())
        .await;
    assert!(
        target_entry(&env, &format!("cn=jack,{TARGET_SUFFIX}"))
            .await
            .is_some()
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();

    // Policy disable: the account is kept, disabled, and enabled again.
    let config = EXAMPLE_CONFIG.replace(
        "dn_template = \"cn={name},o=Acme\"",
        "dn_template = \"cn={name},o=Acme\"\ndeprovision = \"disable\"\ndisable = { attribute = \"employeeType\", value = \"disabled\" }",
    );
    let env = start(&config).await;
    env.user_where("jack", "provisioned", |u| u.link_to("acme").is_some())
        .await;
    let dn = format!("cn=jack,{TARGET_SUFFIX}");
    env.ok(&["users", "unassign", "jack", "acme"]).await;
    eventually("jack's account disabled and kept", WAIT, || async {
        Ok(target_entry(&env, &dn)
            .await
            .filter(|e| e.attrs.get("employeeType") == Some(&vec!["disabled".to_owned()]))
            .map(drop))
    })
    .await
    .unwrap();
    assert!(
        env.user("jack").await.unwrap().link_to("acme").is_some(),
        "kept linked"
    );
    env.ok(&["users", "assign", "jack", "acme"]).await;
    eventually("jack's account enabled again", WAIT, || async {
        Ok(target_entry(&env, &dn)
            .await
            .filter(|e| !e.attrs.contains_key("employeeType"))
            .map(drop))
    })
    .await
    .unwrap();
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_hashes_travel_undecoded_and_the_target_accepts_them() {
    // {SSHA} of "pieces of eight", made by slappasswd.
    let output = std::process::Command::new("slappasswd")
        .args(["-s", "pieces of eight", "-h", "{SSHA}"])
        .output()
        .unwrap();
    let hash = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("{SSHA}"), "{hash}");
    let config = EXAMPLE_CONFIG
        .replace(
            "[[resources.inbound]]\nsource = \"sn\"",
            "[[resources.inbound]]\nsource = \"userPassword\"\ntarget = \"passwordHash\"\n\n[[resources.inbound]]\nsource = \"sn\"",
        )
        .replace(
            "[[resources.outbound]]\nsource = \"familyName\"",
            "[[resources.outbound]]\nsource = \"passwordHash\"\ntarget = \"userPassword\"\n\n[[resources.outbound]]\nsource = \"familyName\"",
        );
    assert!(config.contains("passwordHash\"\ntarget = \"userPassword"));
    let env = start(&config).await;
    let mut ldap = env.d.source.admin_conn().await.unwrap();
    ldap.add(
        &format!("uid=will,{}", idsync::dev::PEOPLE),
        vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from(["will"])),
            ("cn", HashSet::from(["Will Turner"])),
            ("sn", HashSet::from(["Turner"])),
            ("userPassword", HashSet::from([hash.as_str()])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
    let will = env
        .user_where("will", "provisioned", |u| u.link_to("acme").is_some())
        .await;
    assert_eq!(
        will.first("passwordHash"),
        Some(hash.as_str()),
        "not decoded"
    );
    // The target verifies the password against the hash it was given.
    let mut target = ldap3::LdapConnAsync::new(env.d.target.url()).await.unwrap();
    ldap3::drive!(target.0);
    let bound = target
        .1
        .simple_bind(&format!("cn=will,{TARGET_SUFFIX}"), "pieces of eight")
        .await
        .unwrap();
    assert_eq!(
        bound.rc, 0,
        "bind with the password on the target: {bound:?}"
    );
    let wrong = target
        .1
        .simple_bind(&format!("cn=will,{TARGET_SUFFIX}"), "wrong")
        .await
        .unwrap();
    assert_eq!(wrong.rc, 49, "a wrong password is refused");
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioning_that_keeps_failing_is_parked_and_retried_from_the_cli() {
    let mut env = start(&format!(
        "{EXAMPLE_CONFIG}\n[provisioning]\nmax_attempts = 3\n"
    ))
    .await;
    assert_eq!(env.d.config.provisioning.max_attempts, 3);
    env.user_where("jack", "provisioned", |u| u.link_to("acme").is_some())
        .await;
    env.d.target.stop().await.unwrap();
    add_person(&env.d.source, "will", "Will Turner").await;
    let will = env.user_where("will", "synced", |_| true).await;
    let parked = eventually("will's provisioning parked", WAIT, || async {
        let out = env.ok(&["provisioning", "parked"]).await;
        Ok(out.contains(&will.id).then_some(out))
    })
    .await
    .unwrap();
    assert!(parked.contains("gave up after 3 attempts"), "{parked}");
    assert!(parked.contains("acme"), "names the resource: {parked}");
    // Will's line: other focus events that met the stopped target may be
    // parked too, in any order.
    let seq = parked
        .lines()
        .find(|l| l.contains(&will.id))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();

    env.d.target.restart().await.unwrap();
    env.ok(&["provisioning", "retry", &seq]).await;
    env.user_where("will", "provisioned after the retry", |u| {
        u.link_to("acme").is_some()
    })
    .await;
    // The retried one is gone (other focus events that met the stopped
    // target, such as the crew group's, may be parked beside it).
    let out = env.ok(&["provisioning", "parked"]).await;
    assert!(
        !out.lines().any(|l| l.starts_with(&format!("{seq} "))),
        "{out}"
    );
    let dropped = env.cli(&["provisioning", "drop", &seq]).await;
    assert!(
        !dropped.status.success(),
        "already gone: {}",
        text(&dropped)
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

/// The source stopped in the middle of a reconciliation (pages are read
/// ahead while earlier ones are compared): the run fails, naming the
/// source, and publishes no deletion — entries it never got to read are
/// not gone, and every user stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_stops_mid_reconciliation_fails_it_and_deletes_nothing() {
    const PEOPLE_N: usize = 3_000;
    let extra: String = (0..PEOPLE_N)
        .map(|i| {
            format!(
                "dn: uid=r{i:04},ou=people,dc=example,dc=com\nobjectClass: inetOrgPerson\n\
                 uid: r{i:04}\ncn: Reconciled {i}\nsn: R\n\n"
            )
        })
        .collect();
    let mut env = start_with_options(
        EXAMPLE_CONFIG,
        idsync::dev::Options {
            source_seed_extra: Some(extra),
            ..Default::default()
        },
    )
    .await;
    let idm = env.d.admin().unwrap();
    eventually(
        "the seed imported",
        std::time::Duration::from_secs(300),
        || async {
            let live = idm.live_shadows("hr").await.map_err(|e| e.to_string())?;
            // The seed's people, jack and the crew group.
            Ok((live as usize >= PEOPLE_N + 2).then_some(()))
        },
    )
    .await
    .unwrap();
    env.d.stop_service("detector").await.unwrap();
    let live = idm.live_shadows("hr").await.unwrap();
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let published = bus.last_sequence(names::CHANGES_STREAM).await.unwrap();

    // Two pages a second: six pages take three seconds; the source stops
    // after the first.
    let run = env.cli_child(&["reconcile", "hr", "--json", "--rate", "1000"]);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    env.d.source.stop().await.unwrap();
    let out = cli_output(run).await;
    assert!(!out.status.success(), "the run must fail: {}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(env.d.source.url()),
        "names the source: {said}"
    );

    assert_eq!(
        deletions_published_after(&bus, published).await,
        0,
        "no deletion published by the broken run"
    );
    let now = idm.live_shadows("hr").await.unwrap();
    assert!(now >= live, "every user stays: {live} before, {now} after");
    env.d.shutdown().await.unwrap();
}

/// Deletions on the change stream after sequence `published`.
async fn deletions_published_after(bus: &Bus, published: u64) -> usize {
    use prost::Message as _;
    let after = bus.last_sequence(names::CHANGES_STREAM).await.unwrap();
    bus.peek(
        names::CHANGES_STREAM,
        published + 1,
        (after - published) as usize,
    )
    .await
    .unwrap()
    .into_iter()
    .filter(|m| {
        idsync_proto::v1::ChangeEvent::decode(m.payload.as_ref())
            .is_ok_and(|e| e.kind == idsync_proto::v1::ChangeKind::Delete as i32)
    })
    .count()
}

/// The account idsync binds to the source as in
/// [`an_entry_that_cannot_be_read_is_not_gone_and_no_deletion_is_published`]:
/// not the root DN, so the directory's access rules apply to it.
const SYNC_ACCOUNT: &str = "cn=idsync,dc=example,dc=com";

/// An entry the reconciliation cannot read is not gone. Here an access rule
/// (added as an operator would, with `slapmodify` on the stopped server)
/// hides anna's entryUUID from the account idsync binds as, so the scan gets
/// her entry without its identifier. The run reports it, publishes no
/// deletion for the accounts (it cannot tell anna from a person who left),
/// says so and exits 3; bob's change, read in the same run, is applied; and
/// every user stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_cannot_be_read_is_not_gone_and_no_deletion_is_published() {
    let mut env = start(EXAMPLE_CONFIG).await;
    let people = ["jack", "will", "anna", "bob"];
    for uid in &people[1..] {
        add_person(&env.d.source, uid, &format!("{uid} Person")).await;
    }
    for uid in people {
        env.user_where(uid, "synced", |_| true).await;
    }
    let idm = env.d.admin().unwrap();
    eventually("the people and the crew group synced", WAIT, || async {
        let live = idm.live_shadows("hr").await.map_err(|e| e.to_string())?;
        Ok((live >= 5).then_some(()))
    })
    .await
    .unwrap();
    env.d.stop_service("detector").await.unwrap();
    let live = idm.live_shadows("hr").await.unwrap();

    // A sync account of its own, with the bind password idsync has for hr,
    // and a rule that hides anna's entryUUID from it.
    let password = env.d.source.admin_password().to_owned();
    let mut ldap = env.d.source.admin_conn().await.unwrap();
    ldap.add(
        SYNC_ACCOUNT,
        vec![
            (
                "objectClass",
                HashSet::from(["organizationalRole", "simpleSecurityObject"]),
            ),
            ("cn", HashSet::from(["idsync"])),
            ("userPassword", HashSet::from([password.as_str()])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let _ = ldap.unbind().await;
    env.d.source.stop().await.unwrap();
    let rules = env.d.source.dir().join("hide-anna.ldif");
    std::fs::write(
        &rules,
        format!(
            "dn: olcDatabase={{1}}mdb,cn=config\nchangetype: modify\nadd: olcAccess\n\
             olcAccess: {{0}}to dn.exact=\"uid=anna,{base}\" attrs=entryUUID \
             by dn.exact=\"{SYNC_ACCOUNT}\" none by * read\n\
             olcAccess: {{1}}to attrs=userPassword by anonymous auth by * none\n\
             olcAccess: {{2}}to * by * read\n",
            base = idsync::dev::PEOPLE
        ),
    )
    .unwrap();
    let modified = std::process::Command::new("/usr/sbin/slapmodify")
        .arg("-n0")
        .arg("-F")
        .arg(env.d.source.dir().join("slapd.d"))
        .arg("-l")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(modified.status.success(), "slapmodify: {modified:?}");
    env.d.source.restart().await.unwrap();
    env.d
        .reconfigure(|c| {
            let hr = c.resources.iter_mut().find(|r| r.name == "hr").unwrap();
            hr.bind_dn = SYNC_ACCOUNT.to_owned();
        })
        .unwrap();
    // A real change in the same run.
    set_cn(&env.d.source, "bob", "Robert Person").await;

    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    let published = bus.last_sequence(names::CHANGES_STREAM).await.unwrap();
    let out = env
        .cli(&["reconcile", "hr", "--json", "--rate", "2000"])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(r["deleted"], 0, "anna is not gone: {r}");
    assert_eq!(r["errors"], 1, "anna could not be read: {r}");
    assert_eq!(r["changed"], 1, "bob: {r}");
    assert_eq!(r["scanned"], 4, "jack, will, bob and the crew group: {r}");
    let withheld = r["withheld"].as_array().unwrap();
    assert_eq!(withheld.len(), 1, "the accounts only, not the groups: {r}");
    assert_eq!(withheld[0]["object_type"], "account", "{r}");
    assert_eq!(withheld[0]["unreadable"], 1, "{r}");
    assert!(
        withheld[0]["examples"][0]
            .as_str()
            .unwrap()
            .contains(&format!("uid=anna,{}", idsync::dev::PEOPLE)),
        "names the entry: {r}"
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "withheld deletions are not a clean run: {}",
        text(&out)
    );

    env.user_where("bob", "renamed", |u| {
        u.first("fullName") == Some("Robert Person")
    })
    .await;
    // Said in words too, and again on the next run: nothing is lost by
    // running it once more.
    let out = env.cli(&["reconcile", "hr", "--rate", "2000"]).await;
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(
        said.contains("1 account entry could not be read")
            && said.contains("no account deletion was published")
            && said.contains("uid=anna"),
        "{said}"
    );
    assert_eq!(
        deletions_published_after(&bus, published).await,
        0,
        "no deletion published"
    );
    for uid in people {
        assert!(env.user(uid).await.is_some(), "{uid} stays");
    }
    let now = idm.live_shadows("hr").await.unwrap();
    assert_eq!(now, live, "every shadow stays live");
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}
