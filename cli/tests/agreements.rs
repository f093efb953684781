//! Sync agreements end to end, on real servers, through the `idsync` binary
//! as an operator runs it: tokens, authority and yield, halt and quarantine,
//! finalise and terminate, dry run, status, schedule.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use idsync::dev::EXAMPLE_CONFIG;
use idsync_core::config::{Config, OnError};
use idsync_core::model::{Focus, Op};
use idsync_core::secret::Secret;
use idsync_idm_client::{IdmClient, IdmError};
use idsync_testkit::eventually;

mod support;
use support::*;

fn refused_with(e: IdmError, expected: &str, token: &str) {
    let message = e.to_string();
    assert!(message.contains(expected), "{message}");
    assert!(
        token.is_empty() || !message.contains(token),
        "the error echoes the token: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refused_for_every_reason_and_never_echoed() {
    let env = start(EXAMPLE_CONFIG).await;
    let url = env.d.config.idm.url.clone();
    let out = env.ok(&["sync", "create", "crm"]).await;
    assert!(out.contains("agreement crm created"), "{out}");
    let shown = env.cli(&["sync", "generate-token", "crm", "first"]).await;
    assert!(shown.status.success(), "{}", text(&shown));
    let first = String::from_utf8(shown.stdout).unwrap().trim().to_owned();
    assert!(first.starts_with("idsync1."), "{first}");
    let file = env.d.dir.join("crm.token");
    env.ok(&[
        "sync",
        "generate-token",
        "crm",
        "second",
        "--out",
        file.to_str().unwrap(),
    ])
    .await;
    let second = std::fs::read_to_string(&file).unwrap();
    let as_first = IdmClient::new(&url, &Secret::new(first.clone())).unwrap();
    let as_second = IdmClient::new(&url, &Secret::new(second.clone())).unwrap();
    as_first.get_agreement("crm").await.unwrap();

    // Missing and malformed.
    let none = IdmClient::new(&url, &Secret::new("")).unwrap();
    refused_with(none.get_focus("x").await.unwrap_err(), "no credential", "");
    let garbage = "idsync1.bm90LWEtdG9rZW4.AAAA";
    let malformed = IdmClient::new(&url, &Secret::new(garbage)).unwrap();
    refused_with(
        malformed.get_focus("x").await.unwrap_err(),
        "not issued by this IDM",
        garbage,
    );
    let bad = IdmClient::new(&url, &Secret::new("idsync1.%%%")).unwrap();
    refused_with(
        bad.get_focus("x").await.unwrap_err(),
        "not a sync token",
        "%%%",
    );
    // A wrong administrator credential.
    let wrong = IdmClient::new(&url, &Secret::new("not-the-admin")).unwrap();
    refused_with(
        wrong.list_agreements().await.unwrap_err(),
        "administrator credential does not match",
        "not-the-admin",
    );
    // Foreign: issued by another IDM for an agreement of the same name.
    let other_dir = tempfile::tempdir().unwrap();
    let other = idsync_store::Store::open(other_dir.path()).unwrap();
    other.create_agreement("crm").unwrap();
    let (foreign, _) = other.generate_token("crm", "x").unwrap();
    let as_foreign = IdmClient::new(&url, &Secret::new(foreign.clone())).unwrap();
    refused_with(
        as_foreign.get_focus("x").await.unwrap_err(),
        "not issued by this IDM",
        &foreign,
    );
    // Foreign: another agreement's resource.
    let mut focus = Focus {
        id: "f-crm".into(),
        kind: "user".into(),
        ..Default::default()
    };
    focus
        .attributes
        .insert("name".into(), vec!["mallory".into()]);
    let put = Op::PutFocus {
        focus,
        expected_version: 0,
    };
    let e = as_first.commit(vec![put], "hr").await.unwrap_err();
    refused_with(
        e,
        "belongs to agreement \"crm\", but resource \"hr\" writes under agreement \"hr\"",
        &first,
    );
    // In a batch, each commit is checked under the token on its own: the
    // foreign resource's and the stale one are refused alone.
    let hr_token = env.admin.generate_token("hr", "batch").await.unwrap();
    let as_hr = IdmClient::new(&url, &hr_token).unwrap();
    let new_user = |id: &str, name: &str| Op::PutFocus {
        focus: Focus {
            id: id.into(),
            kind: "user".into(),
            attributes: [("name".to_owned(), vec![name.to_owned()])].into(),
            ..Default::default()
        },
        expected_version: 0,
    };
    let request = |op: Op, origin: &str| idsync_proto::v1::CommitRequest {
        operations: vec![op.into()],
        origin_resource: origin.into(),
        trace_parent: String::new(),
    };
    let results = as_hr
        .commit_batch(vec![
            request(new_user("f-b1", "batchone"), "hr"),
            request(new_user("f-b2", "batchtwo"), "acme"),
            request(new_user("f-b1", "batchagain"), "hr"),
            request(new_user("f-b3", "batchthree"), "hr"),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0].as_ref().unwrap(), &[1]);
    // A batch over the IDM's limit is refused whole, saying the limit.
    let too_many = (0..1025)
        .map(|i| request(new_user(&format!("f-x{i}"), &format!("x{i}")), "hr"))
        .collect();
    let e = as_hr.commit_batch(too_many).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("at most 1024 commits a call, not 1025"),
        "{e}"
    );
    assert!(env.admin.get_focus("f-x0").await.unwrap().is_none());
    let e = results[1].as_ref().unwrap_err();
    assert!(
        e.to_string().contains(
            "belongs to agreement \"hr\", but resource \"acme\" writes under no agreement"
        ),
        "{e}"
    );
    assert!(
        matches!(&results[2], Err(IdmError::Conflict(_))),
        "{:?}",
        results[2]
    );
    assert_eq!(results[3].as_ref().unwrap(), &[1]);
    for (id, name) in [
        ("f-b1", Some("batchone")),
        ("f-b2", None),
        ("f-b3", Some("batchthree")),
    ] {
        let f = env.admin.get_focus(id).await.unwrap();
        assert_eq!(f.as_ref().and_then(|f| f.first("name")), name, "{id}");
    }
    // Many callers at once through one batching client: each gets its own
    // result, whatever batches they shared.
    let batched = as_hr.clone().with_batching(8);
    let calls = (0..24).map(|i| {
        let batched = batched.clone();
        async move {
            // Every fifth takes a name already taken.
            let name = if i % 5 == 0 {
                "batchone".to_owned()
            } else {
                format!("many{i}")
            };
            batched
                .commit(vec![new_user(&format!("f-m{i}"), &name)], "hr")
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    for (i, r) in results.iter().enumerate() {
        let stored = env.admin.get_focus(&format!("f-m{i}")).await.unwrap();
        if i % 5 == 0 {
            assert!(r.as_ref().is_err_and(IdmError::is_name_taken), "{i}: {r:?}");
            assert!(stored.is_none(), "{i}");
        } else {
            assert_eq!(r.as_ref().unwrap(), &[1], "{i}");
            assert_eq!(
                stored.unwrap().first("name"),
                Some(format!("many{i}").as_str())
            );
        }
    }
    // Batched reads answer as one call each would, whatever they shared.
    let jack = env.user("jack").await.unwrap();
    let jack_uuid = jack.link_to("hr").unwrap().entry_uuid.clone();
    let reads = (0..24).map(|i| {
        let (batched, as_hr, jack_uuid) = (batched.clone(), as_hr.clone(), jack_uuid.clone());
        async move {
            let name = match i % 3 {
                0 => "jack".to_owned(),
                1 => format!("many{i}"),
                _ => format!("nobody{i}"),
            };
            let uuid = if i % 2 == 0 {
                jack_uuid
            } else {
                format!("00000000-0000-0000-0000-{i:012}")
            };
            let found = batched.find_focus("user", "name", &name).await.unwrap();
            let expected = as_hr.find_focus("user", "name", &name).await.unwrap();
            assert_eq!(found, expected, "{name}");
            assert_eq!(
                found.len(),
                usize::from(i % 3 != 2 && !(i % 3 == 1 && i % 5 == 0)),
                "{name}"
            );
            let shadow = batched.get_shadow("hr", &uuid).await.unwrap();
            assert_eq!(
                shadow,
                as_hr.get_shadow("hr", &uuid).await.unwrap(),
                "{uuid}"
            );
            assert_eq!(shadow.is_some(), i % 2 == 0, "{uuid}");
        }
    });
    futures::future::join_all(reads).await;
    // A sync token cannot make administrative calls.
    refused_with(
        as_first.list_agreements().await.unwrap_err(),
        "needs the administrator credential",
        &first,
    );
    refused_with(
        as_first.get_agreement("hr").await.unwrap_err(),
        "not \"hr\"",
        &first,
    );

    // Revoked one by one, then all.
    env.ok(&["sync", "destroy-token", "crm", "first"]).await;
    refused_with(
        as_first.get_focus("x").await.unwrap_err(),
        "revoked",
        &first,
    );
    as_second.get_agreement("crm").await.unwrap();
    let out = env.ok(&["sync", "destroy-token", "crm"]).await;
    assert!(
        out.contains("every token of agreement crm revoked"),
        "{out}"
    );
    refused_with(
        as_second.get_focus("x").await.unwrap_err(),
        "revoked",
        &second,
    );

    // The IDM stores hashes only, and `get` shows labels, never tokens.
    env.ok(&["sync", "generate-token", "crm", "third"]).await;
    let shown = env.ok(&["sync", "get", "crm"]).await;
    assert!(shown.contains("token \"third\""), "{shown}");
    // Every byte the store holds, whichever backend (IDSYNC_DEV_STORE).
    let store = match &env.d.postgres {
        None => std::fs::read(env.d.dir.join("idm/idm.redb")).unwrap(),
        Some(pg) => {
            let url = std::fs::read_to_string(env.d.dir.join("postgres_url")).unwrap();
            let db = url.trim().rsplit('/').next().unwrap().to_owned();
            pg.psql(
                &db,
                "SELECT string_agg(encode(k || v, 'escape'), '') FROM kv",
            )
            .unwrap()
            .into_bytes()
        }
    };
    for t in [&first, &second] {
        let secret_part = t.rsplit('.').next().unwrap();
        assert!(
            !store
                .windows(secret_part.len())
                .any(|w| w == secret_part.as_bytes()),
            "a token is stored in the clear"
        );
    }
    let listed = env.ok(&["sync", "list"]).await;
    assert!(
        listed.contains("crm  Unknown") && listed.contains("hr  "),
        "{listed}"
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_and_yield_hold_from_grpc_and_from_the_cli() {
    let env = start(EXAMPLE_CONFIG).await;
    // Once provisioned, jack changes no more by himself.
    let jack = env
        .user_where("jack", "synced by hr and provisioned", |u| {
            u.sync_parent == "hr" && u.link_to("acme").is_some()
        })
        .await;
    // The administrator cannot write what the agreement owns...
    let out = env
        .cli(&["users", "set", "jack", "fullName=Captain Jack"])
        .await;
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("owned by agreement \"hr\"") && t.contains("\"fullName\""),
        "{t}"
    );
    let mut changed = jack.clone();
    changed
        .attributes
        .insert("fullName".into(), vec!["Captain Jack".into()]);
    let e = env
        .admin
        .commit(
            vec![Op::PutFocus {
                focus: changed.clone(),
                expected_version: jack.version,
            }],
            "",
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is the agreement's"), "{e}");
    // ...nor can another agreement.
    env.ok(&["sync", "create", "crm"]).await;
    let crm = env.admin.generate_token("crm", "t").await.unwrap();
    let as_crm = IdmClient::new(&env.d.config.idm.url, &crm).unwrap();
    let e = as_crm
        .commit(
            vec![Op::PutFocus {
                focus: changed,
                expected_version: jack.version,
            }],
            "crm",
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("agreement \"crm\""), "{e}");

    // A yielded attribute is the IDM's to write...
    env.ok(&[
        "sync",
        "set-yield-attributes",
        "hr",
        "preferredLanguage",
        "fullName",
    ])
    .await;
    env.ok(&[
        "users",
        "set",
        "jack",
        "preferredLanguage=de",
        "fullName=Jack S.",
    ])
    .await;
    // ...and when the source sends it again, the agreement halts and says why.
    set_cn(&env.d.source, "jack", "Jack Sparrow II").await;
    let a = env.agreement_where("hr", "halted", |a| a.halted).await;
    let error = a.last_error.unwrap();
    assert_eq!(error.attribute, "fullName", "{error:?}");
    assert!(
        error.reason.contains("yields \"fullName\" to the IDM"),
        "{}",
        error.reason
    );
    assert!(
        error.reason.contains("set-yield-attributes hr"),
        "{}",
        error.reason
    );
    assert!(error.dn.starts_with("uid=jack,"), "{error:?}");
    assert_eq!(env.status_word("hr").await, "Err");
    let shown = env.ok(&["sync", "get", "hr"]).await;
    assert!(
        shown.contains("HALTED") && shown.contains("attribute fullName"),
        "{shown}"
    );
    // The operator gives fullName back to the source and retries.
    env.ok(&["sync", "set-yield-attributes", "hr", "preferredLanguage"])
        .await;
    env.ok(&["sync", "retry", "hr"]).await;
    let jack = env
        .user_where("jack", "cn applied after the retry", |u| {
            u.first("fullName") == Some("Jack Sparrow II")
        })
        .await;
    assert_eq!(
        jack.first("preferredLanguage"),
        Some("de"),
        "the yielded value stays"
    );
    env.agreement_where("hr", "Ok again", |a| !a.halted && a.state == 1)
        .await;
    assert_eq!(env.status_word("hr").await, "Ok");

    // A native user is the administrator's to write.
    env.ok(&["users", "create", "root", "--set", "fullName=Root"])
        .await;
    env.ok(&["users", "set", "root", "mail=root@example.com"])
        .await;
    let root = env.user("root").await.unwrap();
    assert_eq!(root.sync_parent, "");
    assert_eq!(root.first("mail"), Some("root@example.com"));
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

/// The uuid of the entry an agreement's last error names.
fn failed_uuid(a: &idsync_proto::v1::Agreement) -> String {
    a.last_error.as_ref().unwrap().entry_uuid.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_stops_at_the_conflict_and_resumes_after_an_exclusion() {
    let mut env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "synced", |_| true).await;
    // A native user holds the name the source's next entry maps to.
    env.ok(&["users", "create", "will", "--set", "fullName=Will (IDM)"])
        .await;
    add_person(&env.d.source, "will", "Will Turner").await;
    add_person(&env.d.source, "anna", "Anna Bell").await;
    let a = env.agreement_where("hr", "halted", |a| a.halted).await;
    let error = a.last_error.clone().unwrap();
    assert!(error.dn.starts_with("uid=will,"), "{error:?}");
    assert!(
        error.reason.contains("a native IDM entry"),
        "{}",
        error.reason
    );
    assert_eq!(env.status_word("hr").await, "Err");
    let json = env.http_status("/status/hr").await;
    assert_eq!(json["status"], "Err");
    assert_eq!(json["halted"], true);
    assert_eq!(json["last_error"]["entry_uuid"], error.entry_uuid.as_str());
    // Nothing after the failing entry is applied while halted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env.user("anna").await.is_none(), "anna came after the halt");
    assert_eq!(
        env.user("will").await.unwrap().first("fullName"),
        Some("Will (IDM)")
    );

    // The operator excludes the entry and retries: the rest continues.
    let uuid = failed_uuid(&a);
    env.d
        .reconfigure(|c: &mut Config| {
            c.agreements.get_mut("hr").unwrap().exclude.push(uuid);
        })
        .unwrap();
    env.d.restart_service("correlator").await.unwrap();
    env.d.restart_service("applier").await.unwrap();
    env.ok(&["sync", "retry", "hr"]).await;
    env.user_where("anna", "applied after the retry", |u| u.sync_parent == "hr")
        .await;
    let will = env.user("will").await.unwrap();
    assert_eq!(will.sync_parent, "", "the native user is left alone");
    assert!(will.link_to("hr").is_none());
    env.agreement_where("hr", "Ok", |a| a.state == 1 && !a.halted)
        .await;
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_parks_the_entry_and_the_rest_go_on() {
    let mut env =
        start(&EXAMPLE_CONFIG.replace("on_error = \"halt\"", "on_error = \"quarantine\"")).await;
    assert_eq!(env.d.config.agreements["hr"].on_error, OnError::Quarantine);
    env.user_where("jack", "synced", |_| true).await;
    env.ok(&["users", "create", "will"]).await;
    env.ok(&["users", "create", "bob"]).await;
    env.ok(&["users", "create", "kate"]).await;
    add_person(&env.d.source, "will", "Will Turner").await;
    add_person(&env.d.source, "anna", "Anna Bell").await;
    add_person(&env.d.source, "bob", "Bob Ross").await;
    add_person(&env.d.source, "kate", "Kate Bush").await;
    env.user_where("anna", "applied past the conflict", |u| {
        u.sync_parent == "hr"
    })
    .await;
    let parked = eventually("three parked entries", WAIT, || async {
        let out = env.ok(&["sync", "parked", "hr"]).await;
        Ok((out.matches("a native IDM entry").count() == 3).then_some(out))
    })
    .await
    .unwrap();
    assert!(
        parked.contains("uid=will,") && parked.contains("uid=bob,"),
        "{parked}"
    );
    let a = env.admin.get_agreement("hr").await.unwrap();
    assert!(!a.halted);
    assert_eq!(a.state, 2, "Err with the last failure");
    let seq_of = |uid: &str| -> String {
        parked
            .lines()
            .find(|l| l.contains(&format!("uid={uid},")))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let (will_seq, bob_seq, kate_seq) = (seq_of("will"), seq_of("bob"), seq_of("kate"));
    let uuid_of = |uid: &str| -> String {
        let line = parked
            .lines()
            .find(|l| l.contains(&format!("uid={uid},")))
            .unwrap();
        line.split('[')
            .nth(1)
            .unwrap()
            .split(']')
            .next()
            .unwrap()
            .to_owned()
    };
    let (will_uuid, kate_uuid) = (uuid_of("will"), uuid_of("kate"));
    let kate_id = "6b61a7e0-0000-4000-8000-00000000ca7e";

    // Remap will to a free name, and kate to a free name and a chosen id;
    // retry them and drop bob.
    env.d
        .reconfigure(|c: &mut Config| {
            let hr = c.agreements.get_mut("hr").unwrap();
            hr.map_name.insert(will_uuid, "will.turner".into());
            hr.map_name.insert(kate_uuid.clone(), "kate.bush".into());
            hr.map_uuid.insert(kate_uuid, kate_id.into());
        })
        .unwrap();
    env.d.restart_service("correlator").await.unwrap();
    env.d.restart_service("applier").await.unwrap();
    env.ok(&["sync", "retry-parked", "hr", &will_seq]).await;
    env.ok(&["sync", "retry-parked", "hr", &kate_seq]).await;
    env.ok(&["sync", "drop-parked", "hr", &bob_seq]).await;
    let kate = env
        .user_where("kate.bush", "imported with its mapped id", |u| {
            u.link_to("hr").is_some()
        })
        .await;
    assert_eq!(kate.id, kate_id);
    let will = env
        .user_where("will.turner", "imported under its mapped name", |u| {
            u.link_to("hr").is_some()
        })
        .await;
    assert_eq!(will.sync_parent, "hr");
    let out = env.ok(&["sync", "parked", "hr"]).await;
    assert!(out.contains("no parked entries"), "{out}");
    let dropped = env.cli(&["sync", "drop-parked", "hr", &bob_seq]).await;
    assert!(
        !dropped.status.success(),
        "already dropped: {}",
        text(&dropped)
    );
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_deletes_what_the_agreement_made_and_asks_first() {
    let env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "synced", |_| true).await;
    add_person(&env.d.source, "will", "Will Turner").await;
    env.user_where("will", "synced", |_| true).await;
    // An entry already deleted is simply not there any more.
    delete_person(&env.d.source, "will").await;
    eventually("will deleted", WAIT, || async {
        Ok(env.user("will").await.is_none().then_some(()))
    })
    .await
    .unwrap();
    env.ok(&["users", "create", "root"]).await;

    let declined = env
        .cli_with_input(&["sync", "terminate", "hr"], "no\n")
        .await;
    assert_eq!(declined.status.code(), Some(1), "{}", text(&declined));
    assert!(text(&declined).contains("nothing done"));
    assert!(env.user("jack").await.is_some());

    let out = env
        .cli_with_input(&["sync", "terminate", "hr"], "hr\n")
        .await;
    assert!(out.status.success(), "{}", text(&out));
    // jack and the crew group.
    assert!(text(&out).contains("2 entries deleted"), "{}", text(&out));
    assert!(env.user("jack").await.is_none());
    assert!(env.admin.all_focus("group").await.unwrap().is_empty());
    assert!(env.admin.all_shadows("hr").await.unwrap().is_empty());
    assert!(env.user("root").await.is_some(), "native users stay");
    let gone = env.cli(&["sync", "get", "hr"]).await;
    assert!(text(&gone).contains("does not exist"), "{}", text(&gone));
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalise_hands_the_entries_to_the_idm_and_ends_the_token() {
    let env = start(EXAMPLE_CONFIG).await;
    env.user_where("jack", "synced", |_| true).await;
    let token = std::fs::read_to_string(env.d.dir.join("secrets/hr.token")).unwrap();
    let as_hr = IdmClient::new(&env.d.config.idm.url, &Secret::new(token.clone())).unwrap();
    as_hr.get_agreement("hr").await.unwrap();

    // force-refresh reads everything again; nothing changes for it.
    let before = env.user("jack").await.unwrap();
    let bus = idsync_bus::Bus::connect(env.d.nats.url()).await.unwrap();
    let published = bus
        .stream_messages(idsync_bus::names::CHANGES_STREAM)
        .await
        .unwrap();
    let out = env.ok(&["sync", "force-refresh", "hr"]).await;
    assert!(out.contains("cookies of hr forgotten"), "{out}");
    eventually("a full refresh published", WAIT, || async {
        let now = bus
            .stream_messages(idsync_bus::names::CHANGES_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        Ok((now >= published + 2).then_some(()))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = env.user("jack").await.unwrap();
    assert_eq!(before.attributes, after.attributes);

    let out = env.ok(&["sync", "finalise", "hr", "--yes"]).await;
    assert!(out.contains("2 entries released"), "{out}");
    let jack = env.user("jack").await.unwrap();
    assert_eq!(jack.sync_parent, "", "the IDM owns jack now");
    env.ok(&["users", "set", "jack", "fullName=Jack (IDM)"])
        .await;
    let e = as_hr.get_focus(&jack.id).await.unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!e.to_string().contains(token.trim()));
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_shows_the_changes_and_leaves_no_trace() {
    let mut env = start(&format!(
        "{EXAMPLE_CONFIG}\n[agreements.crm]\ntoken_env = \"X\"\nstatus_bind = \"127.0.0.1:1\"\n"
    ))
    .await;
    // Before its first run an agreement is Unknown, never Ok.
    assert_eq!(env.status_word("crm").await, "Unknown");
    let json = env.http_status("/status/crm").await;
    assert_eq!(json["status"], "Unknown");
    assert!(json["last_success_ms"].is_null());
    let json = env.http_status("/status/nope").await;
    assert!(json["error"].as_str().unwrap().contains("does not exist"));
    env.user_where("jack", "synced", |_| true).await;
    env.agreement_where("hr", "Ok", |a| a.state == 1).await;
    assert_eq!(env.status_word("hr").await, "Ok");

    // Changes the pipeline does not see: the detector is stopped.
    env.d.stop_service("detector").await.unwrap();
    env.ok(&["users", "create", "will"]).await;
    add_person(&env.d.source, "will", "Will Turner").await;
    add_person(&env.d.source, "anna", "Anna Bell").await;
    set_cn(&env.d.source, "jack", "Jack Sparrow II").await;
    add_person(&env.d.source, "bad name", "Bad Name").await;
    let bus = idsync_bus::Bus::connect(env.d.nats.url()).await.unwrap();
    let streams = [
        idsync_bus::names::CHANGES_STREAM,
        idsync_bus::names::DECISIONS_STREAM,
        idsync_bus::names::FOCUS_STREAM,
        idsync_bus::names::DEAD_STREAM,
    ];
    let snapshot = || async {
        let mut counts = Vec::new();
        for s in streams {
            counts.push(bus.stream_messages(s).await.unwrap());
        }
        let users = env.admin.all_focus("user").await.unwrap();
        let shadows = env.admin.all_shadows("hr").await.unwrap();
        let hr = env.admin.get_agreement("hr").await.unwrap();
        (
            counts,
            format!("{users:?}"),
            format!("{shadows:?}"),
            hr.last_success_ms,
            bus.load_cookie("hr").await.unwrap(),
        )
    };
    let before = snapshot().await;
    let out = env.cli(&["sync", "dry-run", "hr"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "refusals exit 3: {t}");
    assert!(t.contains("nothing is written"), "{t}");
    assert!(t.contains("uid=anna,") && t.contains("create user"), "{t}");
    assert!(
        t.contains("update user jack: fullName=Jack Sparrow II"),
        "{t}"
    );
    assert!(
        t.contains("REFUSED") && t.contains("a native IDM entry"),
        "will: {t}"
    );
    assert!(
        t.contains("schema violation") && t.contains("bad name"),
        "bad: {t}"
    );
    assert!(t.contains("2 would be refused"), "{t}");
    assert_eq!(snapshot().await, before, "the dry run left a trace");
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_agreement_polls_a_source_without_live_sync() {
    let config =
        example_with("schedule = \"* * * * *\"").replace("live_sync = true", "live_sync = false");
    let env = start(&config).await;
    // The first poll, at the next minute, imports what the source holds.
    let jack = eventually(
        "jack imported by a poll",
        Duration::from_secs(75),
        || async { Ok(env.user("jack").await) },
    )
    .await
    .unwrap();
    assert_eq!(jack.sync_parent, "hr");
    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deletion_guard_stops_a_mass_deletion_until_an_operator_decides() {
    // Ten accounts and the crew group: eleven entries of hr.
    let config = EXAMPLE_CONFIG.replace(
        "[resources.reactions]\nlinked = { action = \"synchronize\" }",
        "[resources.deletion_guard]\nmax_share = 0.5\n\n[resources.reactions]\nlinked = { action = \"synchronize\" }",
    );
    assert_ne!(config, EXAMPLE_CONFIG);
    let env = start(&config).await;
    assert!(env.d.config.resources[0].deletion_guard.is_some());
    for i in 0..9 {
        add_person(&env.d.source, &format!("p{i}"), &format!("Person {i}")).await;
    }
    env.user_where("p8", "synced", |_| true).await;
    // 7 of 11 (64%) go; the guard lets 5 (45%) through and stops the 6th.
    for i in 0..7 {
        delete_person(&env.d.source, &format!("p{i}")).await;
    }
    let a = env
        .agreement_where("hr", "halted by the guard", |a| a.halted)
        .await;
    let reason = a.last_error.unwrap().reason;
    assert!(
        reason.contains("deletion 6") && reason.contains("of 11 entries"),
        "{reason}"
    );
    assert!(reason.contains("accept-deletions"), "{reason}");
    assert_eq!(env.status_word("hr").await, "Err");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let owned = env;
    let env = &owned;
    let present = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        async move {
            let mut found = Vec::new();
            for n in &names {
                if env.user(n).await.is_some() {
                    found.push(n.clone());
                }
            }
            found
        }
    };
    assert_eq!(
        present(&["p0", "p1", "p2", "p3", "p4", "p5", "p6"]).await,
        ["p5", "p6"],
        "exactly five deletions applied, none beyond the threshold"
    );

    // Discard: p5 and p6 stay in the IDM; the agreement goes on.
    let out = env.ok(&["sync", "discard-deletions", "hr", "hr"]).await;
    assert!(out.contains("discarded"), "{out}");
    env.agreement_where("hr", "resumed", |a| !a.halted).await;
    add_person(&env.d.source, "anna", "Anna Bell").await;
    env.user_where("anna", "applied after the discard", |_| true)
        .await;
    assert_eq!(present(&["p5", "p6"]).await, ["p5", "p6"]);

    // Within the same window: p7 still fits (6 of 12), p8 crosses it again.
    delete_person(&env.d.source, "p7").await;
    delete_person(&env.d.source, "p8").await;
    env.agreement_where("hr", "halted again", |a| a.halted)
        .await;
    assert_eq!(present(&["p7", "p8"]).await, ["p8"]);
    env.ok(&["sync", "accept-deletions", "hr", "hr"]).await;
    eventually("p8 deleted once accepted", WAIT, || async {
        Ok(env.user("p8").await.is_none().then_some(()))
    })
    .await
    .unwrap();

    owned.d.shutdown().await.unwrap();
}
