//! A target outage during a burst of changes, on real servers: acme is down
//! for a minute while 200 people are renamed five times each (1,000 changes)
//! and 20 people join. Meanwhile the accounts' shadows show the pending
//! modification; once acme is back every account holds the last value and
//! nothing older, the newcomers have accounts, nothing is there twice, and
//! nothing is parked or still pending.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idsync::dev::{EXAMPLE_CONFIG, PEOPLE, TARGET_SUFFIX};
use idsync_bus::{Bus, names};
use idsync_core::model::Focus;
use idsync_testkit::eventually;
use tokio::time::Instant;

mod support;
use support::*;

/// People there before the outage; each is renamed `ROUNDS` times during it.
const PEOPLE_BEFORE: usize = 200;
const ROUNDS: usize = 5;
/// People who join during the outage.
const NEWCOMERS: usize = 20;
const OUTAGE: Duration = Duration::from_secs(60);
/// The checks read hundreds of entries: a few polls a second are enough.
const POLL: Duration = Duration::from_millis(200);

fn existing(i: usize) -> String {
    format!("u{i:03}")
}

fn newcomer(i: usize) -> String {
    format!("n{i:02}")
}

/// The person's cn (and so the user's fullName) after `round` renames.
fn full_name(uid: &str, round: usize) -> String {
    if round == 0 {
        format!("User {uid}")
    } else {
        format!("User {uid} v{round}")
    }
}

/// The account's DN on acme, lower case as [`accounts`] keys it.
fn account_dn(name: &str) -> String {
    format!("cn={name},{TARGET_SUFFIX}").to_ascii_lowercase()
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Adds people to the source over one connection.
async fn add_people(env: &Env, uids: &[String]) {
    let mut ldap = env.d.source.admin_conn().await.unwrap();
    for uid in uids {
        let cn = full_name(uid, 0);
        let attrs = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([uid.as_str()])),
            ("cn", HashSet::from([cn.as_str()])),
            ("sn", HashSet::from([uid.as_str()])),
            ("givenName", HashSet::from(["User"])),
        ];
        ldap.add(&format!("uid={uid},{PEOPLE}"), attrs)
            .await
            .unwrap()
            .success()
            .unwrap();
    }
    let _ = ldap.unbind().await;
}

/// Renames every person `ROUNDS` times over one connection, a round at a
/// time, so that one person's changes are spread through the stream.
async fn rename_in_rounds(env: &Env, uids: &[String]) {
    let mut ldap = env.d.source.admin_conn().await.unwrap();
    for round in 1..=ROUNDS {
        for uid in uids {
            let cn = full_name(uid, round);
            ldap.modify(
                &format!("uid={uid},{PEOPLE}"),
                vec![ldap3::Mod::Replace("cn", HashSet::from([cn.as_str()]))],
            )
            .await
            .unwrap()
            .success()
            .unwrap();
        }
    }
    let _ = ldap.unbind().await;
}

/// Every account on acme (DN in lower case → cn values), from one search.
async fn accounts(env: &Env) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let mut ldap = env.d.target.admin_conn().await.map_err(|e| e.to_string())?;
    let result = ldap
        .search(
            TARGET_SUFFIX,
            ldap3::Scope::Subtree,
            "(objectClass=inetOrgPerson)",
            vec!["cn"],
        )
        .await
        .map_err(|e| e.to_string())?;
    let _ = ldap.unbind().await;
    let (entries, _) = result.success().map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for e in entries.into_iter().map(ldap3::SearchEntry::construct) {
        let cn = e.attrs.get("cn").cloned().unwrap_or_default();
        let dn = e.dn.to_ascii_lowercase();
        assert!(
            out.insert(dn.clone(), cn.into_iter().collect()).is_none(),
            "{dn} returned twice"
        );
    }
    Ok(out)
}

/// Every user by name.
async fn users(env: &Env) -> Result<BTreeMap<String, Focus>, String> {
    let all = env
        .admin
        .all_focus("user")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for u in all {
        let name = u.first("name").unwrap_or_default().to_owned();
        assert!(
            out.insert(name.clone(), u).is_none(),
            "two users named {name}"
        );
    }
    Ok(out)
}

/// Focus events the provisioner has not yet received, and those it has
/// received but not acknowledged (JetStream's consumer info).
async fn provisioner_backlog(bus: &Bus) -> Result<(u64, u64), String> {
    backlog(bus, names::FOCUS_STREAM, names::PROVISIONER).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_a_minute_gets_every_change_once_and_in_order() {
    let started = Instant::now();
    let mut env = start(EXAMPLE_CONFIG).await;
    let people: Vec<String> = (0..PEOPLE_BEFORE).map(existing).collect();
    let newcomers: Vec<String> = (0..NEWCOMERS).map(newcomer).collect();

    add_people(&env, &people).await;
    let before = eventually(
        "every person has an account on acme",
        Duration::from_secs(120),
        || async {
            tokio::time::sleep(POLL).await;
            let users = users(&env).await?;
            let linked = people
                .iter()
                .filter(|p| users.get(*p).is_some_and(|u| u.link_to("acme").is_some()))
                .count();
            if linked == PEOPLE_BEFORE {
                Ok(Some(users))
            } else {
                Err(format!("{linked} of {PEOPLE_BEFORE} linked"))
            }
        },
    )
    .await
    .unwrap();
    eprintln!("{PEOPLE_BEFORE} accounts made in {:?}", started.elapsed());

    // The outage.
    env.d.target.stop().await.unwrap();
    let stopped = Instant::now();
    let stopped_ms = now_ms();
    rename_in_rounds(&env, &people).await;
    add_people(&env, &newcomers).await;
    eprintln!(
        "{} changes and {NEWCOMERS} newcomers written in {:?}",
        PEOPLE_BEFORE * ROUNDS,
        stopped.elapsed()
    );

    // The account's shadow shows the modification that is being retried.
    let watched = &before["u007"];
    let link = watched.link_to("acme").unwrap().clone();
    let (shadow_dn, pending) = eventually("u007's shadow shows a pending modify", OUTAGE, || {
        let link = &link;
        let env = &env;
        async move {
            tokio::time::sleep(POLL).await;
            let shadow = env
                .admin
                .get_shadow("acme", &link.entry_uuid)
                .await
                .map_err(|e| e.to_string())?;
            Ok(shadow.and_then(|s| s.pending.map(|p| (s.dn, p))))
        }
    })
    .await
    .unwrap();
    assert_eq!(pending.operation, "modify", "{pending:?}");
    assert!(pending.attempts >= 1, "{pending:?}");
    // The reason names the operation, the account, the resource and the server.
    let expected_reason = format!(
        "modify {shadow_dn}: resource acme: cannot connect to LDAP server {}",
        env.d.target.url()
    );
    assert!(
        pending.reason.starts_with(&expected_reason),
        "{pending:?} should start with {expected_reason:?}"
    );
    assert_eq!(shadow_dn.to_ascii_lowercase(), account_dn("u007"));
    assert!(
        pending.since_ms >= stopped_ms - 1_000 && pending.since_ms <= now_ms(),
        "{pending:?} (stopped at {stopped_ms})"
    );

    // The operator sees it from the CLI, and the attempts only go up.
    let listed = env.ok(&["provisioning", "pending"]).await;
    assert!(
        listed.contains(&format!("acme {shadow_dn}: modify pending since")),
        "{listed}"
    );
    let later = eventually("u007 tried again", OUTAGE, || async {
        let s = env
            .admin
            .get_shadow("acme", &link.entry_uuid)
            .await
            .map_err(|e| e.to_string())?;
        Ok(s.and_then(|s| s.pending)
            .filter(|p| p.attempts > pending.attempts))
    })
    .await
    .unwrap();
    assert_eq!(later.since_ms, pending.since_ms, "{later:?}");

    // Every change reaches the IDM while acme is down (should that take more
    // than the outage, acme stays down until it is done), and every account
    // waits for it.
    let pending_shadows = eventually(
        "the IDM has every change and every newcomer, and every account is pending",
        Duration::from_secs(120),
        || async {
            tokio::time::sleep(POLL).await;
            let users = users(&env).await?;
            let behind = people
                .iter()
                .filter(|p| {
                    users.get(*p).and_then(|u| u.first("fullName"))
                        != Some(full_name(p, ROUNDS).as_str())
                })
                .count();
            let missing = newcomers.iter().filter(|n| !users.contains_key(*n)).count();
            if behind + missing > 0 {
                return Err(format!(
                    "{behind} people not renamed yet, {missing} newcomers missing"
                ));
            }
            for n in &newcomers {
                assert!(
                    users[n].link_to("acme").is_none(),
                    "{n} linked while acme is down"
                );
            }
            let shadows = env
                .admin
                .all_shadows("acme")
                .await
                .map_err(|e| e.to_string())?;
            let pending: Vec<_> = shadows.iter().filter_map(|s| s.pending.as_ref()).collect();
            if let Some(p) = pending.iter().find(|p| p.operation != "modify") {
                panic!("only modifications wait: {p:?}");
            }
            if pending.len() < PEOPLE_BEFORE {
                return Err(format!(
                    "{} of {PEOPLE_BEFORE} shadows pending",
                    pending.len()
                ));
            }
            Ok(Some(pending.len()))
        },
    )
    .await
    .unwrap();
    let max_attempts = env
        .admin
        .all_shadows("acme")
        .await
        .unwrap()
        .iter()
        .filter_map(|s| s.pending.as_ref().map(|p| p.attempts))
        .max();
    eprintln!(
        "the IDM had every change {:?} into the outage; {pending_shadows} shadows pending, at most {max_attempts:?} attempts",
        stopped.elapsed()
    );

    // Back after a full minute.
    tokio::time::sleep_until(stopped + OUTAGE).await;
    env.d.target.restart().await.unwrap();
    let restarted = Instant::now();

    // Every account converges to the last change; the newcomers have theirs.
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &people {
        expected.insert(
            account_dn(p),
            BTreeSet::from([p.clone(), full_name(p, ROUNDS)]),
        );
    }
    for n in &newcomers {
        expected.insert(account_dn(n), BTreeSet::from([n.clone(), full_name(n, 0)]));
    }
    let expected = &expected;
    let found = eventually(
        "every account holds the last change",
        Duration::from_secs(180),
        || async {
            tokio::time::sleep(POLL).await;
            let found = accounts(&env).await?;
            let wrong: Vec<_> = expected
                .iter()
                .filter(|(dn, cn)| found.get(*dn) != Some(*cn))
                .map(|(dn, _)| (dn, found.get(dn)))
                .collect();
            match wrong.first() {
                None => Ok(Some(found)),
                Some(first) => Err(format!(
                    "{} accounts not there yet, e.g. {first:?}",
                    wrong.len()
                )),
            }
        },
    )
    .await
    .unwrap();
    eprintln!("converged {:?} after the restart", restarted.elapsed());

    // Nothing duplicated: the 220 accounts and jack's, each once.
    let jack = account_dn("jack");
    assert_eq!(
        found.len(),
        PEOPLE_BEFORE + NEWCOMERS + 1,
        "{:?}",
        found
            .keys()
            .filter(|dn| !expected.contains_key(*dn) && **dn != jack)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        found.get(&jack),
        Some(&BTreeSet::from([
            "jack".to_owned(),
            "Jack Sparrow".to_owned()
        ]))
    );

    // Settled: the provisioner has nothing left to retry (retries sent off
    // before acme came back wait out their backoff, up to 30 s), and what it
    // did last is still what the accounts hold.
    let bus = Bus::connect(env.d.nats.url()).await.unwrap();
    eventually(
        "the provisioner has handled every focus event",
        Duration::from_secs(90),
        || async {
            tokio::time::sleep(POLL).await;
            match provisioner_backlog(&bus).await? {
                (0, 0) => Ok(Some(())),
                (pending, unacked) => {
                    Err(format!("{pending} not delivered, {unacked} unacknowledged"))
                }
            }
        },
    )
    .await
    .unwrap();
    eprintln!(
        "the provisioner was done {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(
        accounts(&env).await.unwrap(),
        found,
        "changed after settling"
    );

    let out = env.ok(&["provisioning", "parked"]).await;
    assert_eq!(out.trim(), "no parked provisioning");

    // One shadow and one link per account, none of them pending any more.
    let users = users(&env).await.unwrap();
    assert_eq!(users.len(), PEOPLE_BEFORE + NEWCOMERS + 1);
    let shadows = env.admin.all_shadows("acme").await.unwrap();
    let still_pending: Vec<_> = shadows
        .iter()
        .filter(|s| s.pending.is_some())
        .map(|s| (&s.dn, &s.pending))
        .collect();
    assert!(still_pending.is_empty(), "{still_pending:?}");
    assert_eq!(shadows.len(), PEOPLE_BEFORE + NEWCOMERS + 1);
    let mut shadow_dns = BTreeSet::new();
    for s in &shadows {
        assert!(!s.dead, "{s:?}");
        assert_eq!(s.situation, "linked", "{s:?}");
        assert!(
            shadow_dns.insert(s.dn.to_ascii_lowercase()),
            "{} twice",
            s.dn
        );
        let owner = s.focus_id.as_deref().unwrap();
        let user = users.values().find(|u| u.id == owner).unwrap();
        assert_eq!(
            user.link_to("acme").map(|l| &l.entry_uuid),
            Some(&s.entry_uuid),
            "{s:?}"
        );
    }
    assert_eq!(
        shadow_dns,
        found.keys().cloned().collect::<BTreeSet<_>>(),
        "a shadow for every account"
    );

    env.assert_no_secret_logged();
    env.d.shutdown().await.unwrap();
    eprintln!("done in {:?}", started.elapsed());
}
