//! The LDAP adapter against real throwaway slapd instances (one per test).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use idsync_core::secret::Secret;
use idsync_ldap::{Connection, Directory, EntryState, LdapError, SyncMessage, SyncSession};
use idsync_testkit::{Slapd, SlapdOptions, eventually};
use ldap3::{Mod, Scope, SearchEntry};

const SUFFIX: &str = "dc=example,dc=com";
const PEOPLE: &str = "ou=people,dc=example,dc=com";
const FILTER: &str = "(objectClass=*)";
/// Not valid UTF-8: a JPEG header.
const PHOTO: [u8; 6] = [0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10];
const PHOTO_BASE64: &str = "/9j/4AAQ";
const WAIT: Duration = Duration::from_secs(10);

fn dn(uid: &str) -> String {
    format!("uid={uid},{PEOPLE}")
}

fn seed() -> String {
    let mut ldif = format!(
        "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
         dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
    );
    for (uid, given) in [("jack", "Jack"), ("anne", "Anne"), ("will", "Will")] {
        ldif.push_str(&format!(
            "dn: {}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {given} Pirate\nsn: Pirate\n\
             givenName: {given}\njpegPhoto:: {PHOTO_BASE64}\n\n",
            dn(uid)
        ));
    }
    ldif
}

async fn slapd() -> Slapd {
    slapd_with(true).await
}

async fn slapd_with(session_log: bool) -> Slapd {
    Slapd::start(SlapdOptions {
        suffix: SUFFIX.to_owned(),
        admin_password: "admin-secret-4711".to_owned(),
        seed_ldif: seed(),
        session_log,
    })
    .await
    .unwrap()
}

fn connection(slapd: &Slapd) -> Connection {
    Connection {
        url: slapd.url().to_owned(),
        bind_dn: slapd.admin_dn().to_owned(),
        password: Secret::new(slapd.admin_password()),
        tls: Default::default(),
    }
}

/// entryUUID of `dn`, read with the testkit's admin connection.
async fn uuid_of(slapd: &Slapd, dn: &str) -> String {
    let mut ldap = slapd.admin_conn().await.unwrap();
    let (entries, _) = ldap
        .search(dn, Scope::Base, FILTER, vec!["entryUUID"])
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap.unbind().await.unwrap();
    SearchEntry::construct(entries.into_iter().next().unwrap()).attrs["entryUUID"][0].clone()
}

async fn admin_modify(slapd: &Slapd, dn: &str, attr: &str, value: &str) {
    let mut ldap = slapd.admin_conn().await.unwrap();
    ldap.modify(dn, vec![Mod::Replace(attr, HashSet::from([value]))])
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap.unbind().await.unwrap();
}

async fn admin_delete(slapd: &Slapd, dn: &str) {
    let mut ldap = slapd.admin_conn().await.unwrap();
    ldap.delete(dn).await.unwrap().success().unwrap();
    ldap.unbind().await.unwrap();
}

/// The next message, which must come within [`WAIT`].
async fn next(session: &mut SyncSession) -> SyncMessage {
    let message = tokio::time::timeout(WAIT, session.next())
        .await
        .expect("a sync message within the deadline")
        .unwrap()
        .expect("the search is still running");
    eprintln!("sync message: {}", describe(&message));
    message
}

/// The next Entry message, skipping cookie updates.
async fn next_entry(session: &mut SyncSession) -> SyncMessage {
    loop {
        let message = next(session).await;
        if matches!(message, SyncMessage::Entry { .. }) {
            return message;
        }
        assert!(
            matches!(message, SyncMessage::Cookie(_)),
            "unexpected {message:?}"
        );
    }
}

/// Messages up to and including the first RefreshDone.
async fn refresh(session: &mut SyncSession) -> Vec<SyncMessage> {
    let mut out = Vec::new();
    loop {
        let message = next(session).await;
        let done = matches!(message, SyncMessage::RefreshDone { .. });
        out.push(message);
        if done {
            return out;
        }
    }
}

fn describe(message: &SyncMessage) -> String {
    match message {
        SyncMessage::Entry {
            entry_uuid,
            dn,
            state,
            attributes,
            csn,
            cookie,
        } => format!(
            "Entry {state:?} {dn} {entry_uuid} attrs={} csn={csn:?} cookie={:?}",
            attributes.len(),
            cookie.as_deref().map(String::from_utf8_lossy)
        ),
        SyncMessage::RefreshDone { cookie, deletes } => format!(
            "RefreshDone deletes={deletes} cookie={:?}",
            cookie.as_deref().map(String::from_utf8_lossy)
        ),
        SyncMessage::Deleted {
            entry_uuids,
            cookie,
        } => format!(
            "Deleted {entry_uuids:?} cookie={:?}",
            cookie.as_deref().map(String::from_utf8_lossy)
        ),
        SyncMessage::Present {
            entry_uuids,
            cookie,
        } => format!(
            "Present {entry_uuids:?} cookie={:?}",
            cookie.as_deref().map(String::from_utf8_lossy)
        ),
        SyncMessage::Cookie(cookie) => format!("Cookie {:?}", String::from_utf8_lossy(cookie)),
    }
}

fn values<'a>(attributes: &'a [(String, Vec<Vec<u8>>)], name: &str) -> Vec<&'a [u8]> {
    attributes
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.iter().map(Vec::as_slice))
        .collect()
}

fn entry_for<'a>(messages: &'a [SyncMessage], wanted: &str) -> Option<&'a SyncMessage> {
    messages
        .iter()
        .find(|m| matches!(m, SyncMessage::Entry { dn, .. } if dn.eq_ignore_ascii_case(wanted)))
}

fn last_cookie(messages: &[SyncMessage]) -> Vec<u8> {
    match messages.last() {
        Some(SyncMessage::RefreshDone {
            cookie: Some(cookie),
            ..
        }) => cookie.clone(),
        other => panic!("expected a RefreshDone with a cookie, got {other:?}"),
    }
}

#[tokio::test]
async fn refresh_without_cookie_returns_seeded_entries_then_refresh_done() {
    let slapd = slapd().await;
    let mut session = SyncSession::start(&connection(&slapd), SUFFIX, FILTER, None, false)
        .await
        .unwrap();
    let messages = refresh(&mut session).await;
    assert!(!last_cookie(&messages).is_empty());
    assert_eq!(
        session.next().await.unwrap(),
        None,
        "refreshOnly ends after SyncDone"
    );
    assert_eq!(session.next().await.unwrap(), None, "and stays ended");

    let entries: Vec<_> = messages
        .iter()
        .filter(|m| matches!(m, SyncMessage::Entry { .. }))
        .collect();
    assert_eq!(
        entries.len(),
        5,
        "suffix, ou and three people: {messages:?}"
    );

    let jack_uuid = uuid_of(&slapd, &dn("jack")).await;
    let Some(SyncMessage::Entry {
        entry_uuid,
        state,
        attributes,
        csn,
        ..
    }) = entry_for(&messages, &dn("jack"))
    else {
        panic!("no entry for jack in {messages:?}");
    };
    assert_eq!(entry_uuid, &jack_uuid);
    assert!(matches!(state, EntryState::Add | EntryState::Present));
    assert_eq!(values(attributes, "jpegPhoto"), vec![&PHOTO[..]]);
    assert_eq!(values(attributes, "givenName"), vec![&b"Jack"[..]]);
    assert_eq!(values(attributes, "uid"), vec![&b"jack"[..]]);
    let csn = csn.as_deref().expect("entryCSN requested");
    assert!(csn.contains("#000000#"), "{csn}");
    session.close().await.unwrap();
}

#[tokio::test]
async fn persist_delivers_modify_add_and_delete() {
    let slapd = slapd().await;
    let mut session = SyncSession::start(&connection(&slapd), SUFFIX, FILTER, None, true)
        .await
        .unwrap();
    let messages = refresh(&mut session).await;
    assert_eq!(
        messages
            .iter()
            .filter(|m| matches!(m, SyncMessage::Entry { .. }))
            .count(),
        5
    );

    admin_modify(&slapd, &dn("jack"), "givenName", "Captain").await;
    let SyncMessage::Entry {
        dn: got_dn,
        state,
        attributes,
        entry_uuid,
        ..
    } = next_entry(&mut session).await
    else {
        unreachable!()
    };
    assert_eq!(got_dn, dn("jack"));
    assert!(matches!(state, EntryState::Modify | EntryState::Add));
    assert_eq!(values(&attributes, "givenName"), vec![&b"Captain"[..]]);
    assert_eq!(values(&attributes, "jpegPhoto"), vec![&PHOTO[..]]);
    assert_eq!(entry_uuid, uuid_of(&slapd, &dn("jack")).await);

    let mut ldap = slapd.admin_conn().await.unwrap();
    ldap.add(
        &dn("bill"),
        vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from(["bill"])),
            ("cn", HashSet::from(["Bootstrap Bill"])),
            ("sn", HashSet::from(["Turner"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    ldap.unbind().await.unwrap();
    let SyncMessage::Entry {
        dn: got_dn, state, ..
    } = next_entry(&mut session).await
    else {
        unreachable!()
    };
    assert_eq!(got_dn, dn("bill"));
    assert_eq!(state, EntryState::Add);

    let anne_uuid = uuid_of(&slapd, &dn("anne")).await;
    admin_delete(&slapd, &dn("anne")).await;
    let SyncMessage::Entry {
        dn: got_dn,
        state,
        attributes,
        entry_uuid,
        csn,
        ..
    } = next_entry(&mut session).await
    else {
        unreachable!()
    };
    assert_eq!(state, EntryState::Delete);
    assert_eq!(got_dn, dn("anne"));
    assert_eq!(entry_uuid, anne_uuid);
    assert!(attributes.is_empty());
    assert_eq!(csn, None);

    session.close().await.unwrap();
    // The server forgets the abandoned search: a later change is harmless
    // and the server keeps serving.
    admin_modify(&slapd, &dn("will"), "givenName", "Bill").await;
    eventually("slapd still answers", WAIT, || async {
        Ok(Some(uuid_of(&slapd, &dn("will")).await))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn resume_from_cookie_gets_only_changes_made_while_away() {
    let slapd = slapd().await;
    let conn = connection(&slapd);
    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, None, true)
        .await
        .unwrap();
    let cookie = last_cookie(&refresh(&mut session).await);
    session.close().await.unwrap();

    let anne_uuid = uuid_of(&slapd, &dn("anne")).await;
    admin_modify(&slapd, &dn("jack"), "givenName", "Captain").await;
    admin_delete(&slapd, &dn("anne")).await;

    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, Some(cookie.clone()), false)
        .await
        .unwrap();
    let mut messages = Vec::new();
    while let Some(message) = tokio::time::timeout(WAIT, session.next())
        .await
        .unwrap()
        .unwrap()
    {
        eprintln!("resumed: {}", describe(&message));
        messages.push(message);
    }
    let new_cookie = last_cookie(&messages);
    assert_ne!(new_cookie, cookie);

    let Some(SyncMessage::Entry {
        state, attributes, ..
    }) = entry_for(&messages, &dn("jack"))
    else {
        panic!("jack's change missing from {messages:?}");
    };
    assert!(matches!(state, EntryState::Add | EntryState::Modify));
    assert_eq!(values(attributes, "givenName"), vec![&b"Captain"[..]]);

    let anne_gone = messages.iter().any(|m| match m {
        SyncMessage::Deleted { entry_uuids, .. } => entry_uuids.contains(&anne_uuid),
        SyncMessage::Entry {
            entry_uuid, state, ..
        } => entry_uuid == &anne_uuid && *state == EntryState::Delete,
        _ => false,
    });
    assert!(anne_gone, "anne's delete missing from {messages:?}");
    for unchanged in [SUFFIX, PEOPLE, &dn("will")] {
        assert!(
            entry_for(&messages, unchanged).is_none(),
            "{unchanged} did not change but came back: {messages:?}"
        );
    }
    session.close().await.unwrap();
}

/// Without a session log the provider cannot list deletes: it falls back to a
/// present phase, and whatever is not named was deleted.
#[tokio::test]
async fn resume_without_session_log_is_a_present_phase() {
    let slapd = slapd_with(false).await;
    let conn = connection(&slapd);
    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, None, false)
        .await
        .unwrap();
    let cookie = last_cookie(&refresh(&mut session).await);
    session.close().await.unwrap();

    let anne_uuid = uuid_of(&slapd, &dn("anne")).await;
    let will_uuid = uuid_of(&slapd, &dn("will")).await;
    admin_modify(&slapd, &dn("jack"), "givenName", "Captain").await;
    admin_delete(&slapd, &dn("anne")).await;

    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, Some(cookie), true)
        .await
        .unwrap();
    let messages = refresh(&mut session).await;
    assert!(
        matches!(
            messages.last(),
            Some(SyncMessage::RefreshDone { deletes: false, .. })
        ),
        "{messages:?}"
    );
    let named = |uuid: &str| {
        messages.iter().any(|m| match m {
            SyncMessage::Present { entry_uuids, .. } => entry_uuids.iter().any(|u| u == uuid),
            SyncMessage::Entry { entry_uuid, .. } => entry_uuid == uuid,
            _ => false,
        })
    };
    assert!(
        named(&will_uuid),
        "unchanged will must be named: {messages:?}"
    );
    assert!(
        !named(&anne_uuid),
        "deleted anne must not be named: {messages:?}"
    );
    let Some(SyncMessage::Entry {
        state, attributes, ..
    }) = entry_for(&messages, &dn("jack"))
    else {
        panic!("jack's change missing from {messages:?}");
    };
    assert_eq!(*state, EntryState::Add);
    assert_eq!(values(attributes, "givenName"), vec![&b"Captain"[..]]);
    session.close().await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_a_bind_error_without_the_password() {
    let slapd = slapd().await;
    let password = "not-the-password-93b7";
    let conn = Connection {
        password: Secret::new(password),
        ..connection(&slapd)
    };
    let err = SyncSession::start(&conn, SUFFIX, FILTER, None, true)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, LdapError::Bind { .. }), "{text}");
    assert!(!text.contains(password), "{text}");
    assert!(!format!("{err:?}").contains(password), "{err:?}");
    assert!(
        text.contains(slapd.url()) && text.contains(slapd.admin_dn()),
        "{text}"
    );
    assert!(
        text.contains("invalid credentials") && text.contains("49"),
        "{text}"
    );

    let err = Directory::connect(&conn).await.unwrap_err();
    assert!(matches!(err, LdapError::Bind { .. }), "{err}");
    assert!(!err.to_string().contains(password), "{err}");
}

#[tokio::test]
async fn unreachable_server_is_a_connect_error_naming_the_url() {
    let url = format!("ldap://127.0.0.1:{}", idsync_testkit::CLOSED_PORT);
    let conn = Connection {
        url: url.clone(),
        bind_dn: "cn=admin,dc=example,dc=com".to_owned(),
        password: Secret::new("irrelevant-pw"),
        tls: Default::default(),
    };
    let err = SyncSession::start(&conn, SUFFIX, FILTER, None, false)
        .await
        .unwrap_err();
    assert!(matches!(err, LdapError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    let err = Directory::connect(&conn).await.unwrap_err();
    assert!(matches!(err, LdapError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
}

fn attrs(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(name, values)| {
            (
                (*name).to_owned(),
                values.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn directory_round_trip_and_errors() {
    let slapd = slapd().await;
    let mut directory = Directory::connect(&connection(&slapd)).await.unwrap();
    let dora = format!("cn=Dora Explorer,{PEOPLE}");
    let wanted = attrs(&[
        ("objectClass", &["inetOrgPerson"]),
        ("cn", &["Dora Explorer"]),
        ("sn", &["Explorer"]),
        ("givenName", &["Dora"]),
        ("mail", &["dora@example.com", "dora.explorer@example.com"]),
        ("description", &[]),
    ]);
    directory.add(&dora, &wanted).await.unwrap();

    let read = directory.read(&dora).await.unwrap().expect("dora exists");
    assert_eq!(read.dn, dora);
    assert_eq!(read.entry_uuid.len(), 36, "{read:?}");
    assert_eq!(read.entry_uuid, uuid_of(&slapd, &dora).await);
    assert_eq!(read.attributes["objectclass"], vec!["inetOrgPerson"]);
    assert_eq!(read.attributes["givenname"], vec!["Dora"]);
    let mut mail = read.attributes["mail"].clone();
    mail.sort();
    assert_eq!(mail, vec!["dora.explorer@example.com", "dora@example.com"]);
    assert!(!read.attributes.contains_key("description"));
    assert!(!read.attributes.contains_key("entryuuid"));

    let found = directory
        .find_by_uuid(SUFFIX, &read.entry_uuid)
        .await
        .unwrap();
    assert_eq!(found.as_ref(), Some(&read));
    assert_eq!(
        directory
            .find_by_uuid(SUFFIX, "00000000-0000-0000-0000-000000000000")
            .await
            .unwrap(),
        None
    );

    let err = directory.add(&dora, &wanted).await.unwrap_err();
    assert!(
        matches!(&err, LdapError::AlreadyExists { dn, .. } if dn == &dora),
        "{err}"
    );

    directory
        .replace(
            &dora,
            &[
                ("givenName".to_owned(), vec!["Dorothea".to_owned()]),
                ("mail".to_owned(), vec![]),
                ("description".to_owned(), vec!["explorer".to_owned()]),
            ],
        )
        .await
        .unwrap();
    let read = directory.read(&dora).await.unwrap().unwrap();
    assert_eq!(read.attributes["givenname"], vec!["Dorothea"]);
    assert_eq!(read.attributes["description"], vec!["explorer"]);
    assert!(!read.attributes.contains_key("mail"));

    let err = directory
        .replace(&dora, &[("cn".to_owned(), vec!["Someone Else".to_owned()])])
        .await
        .unwrap_err();
    let text = err.to_string();
    eprintln!("removing the RDN value: {text}");
    match &err {
        LdapError::Operation { dn, rc, .. } => {
            assert_eq!(dn, &dora);
            assert_ne!(*rc, 0);
            assert!(
                text.contains(&dora) && text.contains(&format!("rc {rc}")),
                "{text}"
            );
            assert!(
                text.contains(slapd.url()) && text.contains("modify"),
                "{text}"
            );
        }
        other => panic!("expected an Operation error, got {other}"),
    }

    // Binary values are skipped on read.
    let jack = directory.read(&dn("jack")).await.unwrap().unwrap();
    assert!(!jack.attributes.contains_key("jpegphoto"), "{jack:?}");
    assert_eq!(jack.attributes["uid"], vec!["jack"]);

    directory.delete(&dora).await.unwrap();
    assert_eq!(directory.read(&dora).await.unwrap(), None);
    let err = directory.delete(&dora).await.unwrap_err();
    assert!(
        matches!(&err, LdapError::NoSuchObject { dn, .. } if dn == &dora),
        "{err}"
    );
    let err = directory
        .replace(&dora, &[("sn".to_owned(), vec!["X".to_owned()])])
        .await
        .unwrap_err();
    assert!(matches!(&err, LdapError::NoSuchObject { .. }), "{err}");
    directory.close().await.unwrap();
}

fn options() -> SlapdOptions {
    SlapdOptions {
        suffix: SUFFIX.to_owned(),
        admin_password: "secret".to_owned(),
        seed_ldif: seed(),
        session_log: true,
    }
}

#[tokio::test]
async fn starttls_with_the_servers_ca_works_and_without_it_is_refused() {
    let (slapd, ca) = Slapd::start_with_starttls(options()).await.unwrap();
    let trusted = Connection {
        tls: idsync_ldap::Tls {
            starttls: true,
            ca_file: Some(ca.clone()),
        },
        ..connection(&slapd)
    };
    let mut dir = Directory::connect(&trusted).await.unwrap();
    assert!(
        dir.read(&format!("uid=jack,ou=people,{SUFFIX}"))
            .await
            .unwrap()
            .is_some()
    );
    dir.close().await.unwrap();
    // The sync session runs over TLS too.
    let mut sync = SyncSession::start(&trusted, SUFFIX, FILTER, None, false)
        .await
        .unwrap();
    assert!(sync.next().await.unwrap().is_some());

    // The system's roots do not know the throwaway CA: refused, and the error says TLS.
    let untrusted = Connection {
        tls: idsync_ldap::Tls {
            starttls: true,
            ca_file: None,
        },
        ..connection(&slapd)
    };
    let err = Directory::connect(&untrusted)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(slapd.url()), "{err}");
    assert!(!err.contains(slapd.admin_password()), "{err}");

    // ldaps:// with the same CA.
    let ldaps = Connection {
        url: slapd.ldaps_url().unwrap(),
        tls: idsync_ldap::Tls {
            starttls: false,
            ca_file: Some(ca.clone()),
        },
        ..connection(&slapd)
    };
    let mut dir = Directory::connect(&ldaps).await.unwrap();
    assert!(
        dir.read(&format!("uid=jack,ou=people,{SUFFIX}"))
            .await
            .unwrap()
            .is_some()
    );
    dir.close().await.unwrap();

    // A CA file that is not there is named.
    let missing = Connection {
        tls: idsync_ldap::Tls {
            starttls: true,
            ca_file: Some("/nonexistent/ca.pem".into()),
        },
        ..connection(&slapd)
    };
    let err = Directory::connect(&missing).await.unwrap_err().to_string();
    assert!(
        err.contains("/nonexistent/ca.pem") && err.starts_with("TLS for LDAP server"),
        "{err}"
    );
}

#[tokio::test]
async fn another_identifier_attribute_can_be_configured() {
    let slapd = slapd().await;
    // OpenLDAP has no nsUniqueId; entryCSN stands in for "another operational attribute".
    let mut dir = Directory::connect(&connection(&slapd))
        .await
        .unwrap()
        .with_id_attribute("entryCSN");
    let jack = dir
        .read(&format!("uid=jack,ou=people,{SUFFIX}"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        jack.entry_uuid.contains('#'),
        "a CSN, not a UUID: {}",
        jack.entry_uuid
    );
    let again = dir
        .find_by_uuid(SUFFIX, &jack.entry_uuid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.dn, jack.dn);
}

/// Operations on one resource's pooled connection run at once: here the
/// first waits for the second to finish, which would never happen if the
/// pool handed the connection to one caller at a time.
#[tokio::test]
async fn pooled_operations_on_one_resource_run_at_once() {
    let slapd = slapd().await;
    let mut pool = idsync_ldap::Pool::new();
    pool.add("hr", connection(&slapd), "entryUUID");
    let (done, second_done) = tokio::sync::oneshot::channel::<()>();
    let first = pool.with("hr", async |dir| {
        let read = dir.read(SUFFIX).await?;
        let _ = second_done.await;
        Ok(read)
    });
    let second = pool.with("hr", async |dir| {
        let read = dir.read(SUFFIX).await?;
        let _ = done.send(());
        Ok(read)
    });
    let (a, b) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(first, second)
    })
    .await
    .expect("the second operation waited for the first: the pool serialises them");
    assert!(a.unwrap().is_some() && b.unwrap().is_some());
}
