//! The syncrepl consumer against real throwaway 389 Directory Server instances
//! (Content Synchronization plugin over the Retro Changelog), one per test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use idsync_core::secret::Secret;
use idsync_ldap::{Connection, Directory, EntryState, SyncMessage, SyncSession};
use idsync_testkit::dirsrv::sync_uuid_from_nsuniqueid;
use idsync_testkit::{DirSrv, DirSrvOptions};
use ldap3::{Mod, Scope, SearchEntry};

const SUFFIX: &str = "dc=example,dc=com";
const PEOPLE: &str = "ou=people,dc=example,dc=com";
const FILTER: &str = "(objectClass=*)";
/// Not valid UTF-8: a JPEG header.
const PHOTO: [u8; 6] = [0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10];
const PHOTO_BASE64: &str = "/9j/4AAQ";
const WAIT: Duration = Duration::from_secs(15);

fn dn(uid: &str) -> String {
    format!("uid={uid},{PEOPLE}")
}

fn seed() -> String {
    let mut ldif = format!(
        "dn: {SUFFIX}\nobjectClass: top\nobjectClass: domain\ndc: example\n\n\
         dn: {PEOPLE}\nobjectClass: top\nobjectClass: organizationalUnit\nou: people\n\n"
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

async fn dirsrv() -> DirSrv {
    let begun = Instant::now();
    let server = DirSrv::start(DirSrvOptions {
        suffix: SUFFIX.to_owned(),
        root_password: "admin-secret-4711".to_owned(),
        seed_ldif: seed(),
    })
    .await
    .unwrap();
    eprintln!("389-ds seeded and ready in {:?}", begun.elapsed());
    server
}

fn connection(server: &DirSrv) -> Connection {
    Connection {
        url: server.url().to_owned(),
        bind_dn: server.root_dn().to_owned(),
        password: Secret::new(server.root_password()),
        tls: Default::default(),
    }
}

/// The first value of `attr` of `dn`, read with the testkit's admin connection.
async fn read_attr(server: &DirSrv, dn: &str, attr: &str) -> Option<String> {
    let mut ldap = server.admin_conn().await.unwrap();
    let (entries, _) = ldap
        .search(dn, Scope::Base, FILTER, vec![attr])
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap.unbind().await.unwrap();
    let entry = SearchEntry::construct(entries.into_iter().next().unwrap());
    entry
        .attrs
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(attr))
        .map(|(_, values)| values[0].clone())
}

/// The UUID the sync controls carry for `dn`: its nsUniqueId, hyphenated as a UUID.
async fn sync_uuid(server: &DirSrv, dn: &str) -> String {
    let ns_unique_id = read_attr(server, dn, "nsUniqueId").await.unwrap();
    sync_uuid_from_nsuniqueid(&ns_unique_id).unwrap()
}

async fn admin_modify(server: &DirSrv, dn: &str, attr: &str, value: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    ldap.modify(dn, vec![Mod::Replace(attr, HashSet::from([value]))])
        .await
        .unwrap()
        .success()
        .unwrap();
    ldap.unbind().await.unwrap();
}

async fn admin_delete(server: &DirSrv, dn: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    ldap.delete(dn).await.unwrap().success().unwrap();
    ldap.unbind().await.unwrap();
}

async fn admin_add_person(server: &DirSrv, uid: &str) {
    let mut ldap = server.admin_conn().await.unwrap();
    ldap.add(
        &dn(uid),
        vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([uid])),
            ("cn", HashSet::from(["Bootstrap Bill"])),
            ("sn", HashSet::from(["Turner"])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
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

/// Every message of a refreshOnly search, until the server ends it.
async fn refresh_only(session: &mut SyncSession) -> Vec<SyncMessage> {
    let mut out = Vec::new();
    while let Some(message) = tokio::time::timeout(WAIT, session.next())
        .await
        .unwrap()
        .unwrap()
    {
        eprintln!("sync message: {}", describe(&message));
        out.push(message);
    }
    out
}

fn describe(message: &SyncMessage) -> String {
    fn text(cookie: &Option<Vec<u8>>) -> Option<String> {
        cookie
            .as_deref()
            .map(|c| String::from_utf8_lossy(c).into_owned())
    }
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
            text(cookie)
        ),
        SyncMessage::RefreshDone { cookie, deletes } => {
            format!("RefreshDone deletes={deletes} cookie={:?}", text(cookie))
        }
        SyncMessage::Deleted {
            entry_uuids,
            cookie,
        } => format!("Deleted {entry_uuids:?} cookie={:?}", text(cookie)),
        SyncMessage::Present {
            entry_uuids,
            cookie,
        } => format!("Present {entry_uuids:?} cookie={:?}", text(cookie)),
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

fn entries(messages: &[SyncMessage]) -> usize {
    messages
        .iter()
        .filter(|m| matches!(m, SyncMessage::Entry { .. }))
        .count()
}

/// Whether `uuid` is named anywhere in `messages` (entry, present or deleted set).
fn names(messages: &[SyncMessage], uuid: &str) -> bool {
    messages.iter().any(|m| match m {
        SyncMessage::Entry { entry_uuid, .. } => entry_uuid == uuid,
        SyncMessage::Present { entry_uuids, .. } | SyncMessage::Deleted { entry_uuids, .. } => {
            entry_uuids.iter().any(|u| u == uuid)
        }
        _ => false,
    })
}

/// The RefreshDone that ends `messages`: its cookie and refreshDeletes.
fn refresh_done(messages: &[SyncMessage]) -> (Vec<u8>, bool) {
    match messages.last() {
        Some(SyncMessage::RefreshDone {
            cookie: Some(cookie),
            deletes,
        }) => (cookie.clone(), *deletes),
        other => panic!("expected a RefreshDone with a cookie, got {other:?}"),
    }
}

#[tokio::test]
async fn refresh_carries_uuids_derived_from_nsuniqueid() {
    let server = dirsrv().await;
    let conn = connection(&server);
    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, None, true)
        .await
        .unwrap();
    let messages = refresh(&mut session).await;
    assert_eq!(entries(&messages), 5, "suffix, ou and three people");
    let (cookie, _) = refresh_done(&messages);
    // localhost:<port>#<bind dn>:<base>:<filter>#<retro changelog number>
    let cookie = String::from_utf8(cookie).unwrap();
    let port = server.url().rsplit(':').next().unwrap();
    assert!(
        cookie.starts_with(&format!("localhost:{port}#cn=directory manager:{SUFFIX}:")),
        "{cookie}"
    );
    assert!(
        cookie.ends_with("#0"),
        "nothing changed since the import: {cookie}"
    );

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
    assert_eq!(*state, EntryState::Add);
    assert_eq!(values(attributes, "jpegPhoto"), vec![&PHOTO[..]]);
    assert_eq!(values(attributes, "givenName"), vec![&b"Jack"[..]]);
    // Without replication 389-ds keeps no entryCSN.
    assert_eq!(*csn, None);

    // The Sync State UUID is the entry's nsUniqueId: the same 32 hex digits,
    // grouped 8-8-8-8 there and 8-4-4-4-12 here.
    let ns_unique_id = read_attr(&server, &dn("jack"), "nsUniqueId").await.unwrap();
    assert_eq!(ns_unique_id.len(), 35, "{ns_unique_id}");
    assert_eq!(entry_uuid.replace('-', ""), ns_unique_id.replace('-', ""));
    assert_eq!(
        sync_uuid_from_nsuniqueid(&ns_unique_id).as_ref(),
        Some(entry_uuid)
    );
    // Every entry's UUID is its nsUniqueId.
    for message in &messages {
        if let SyncMessage::Entry { entry_uuid, dn, .. } = message {
            assert_eq!(entry_uuid, &sync_uuid(&server, dn).await, "{dn}");
        }
    }

    // A Directory identifying entries by nsUniqueId gives and takes them in
    // the sync control's UUID form, whichever form it is handed.
    let mut directory = Directory::connect(&conn)
        .await
        .unwrap()
        .with_id_attribute("nsUniqueId");
    let jack = directory.read(&dn("jack")).await.unwrap().unwrap();
    assert_eq!(&jack.entry_uuid, entry_uuid, "read in the sync UUID form");
    let found = directory.find_by_uuid(SUFFIX, &ns_unique_id).await.unwrap();
    assert_eq!(found.map(|e| e.dn), Some(dn("jack")));
    let by_sync_uuid = directory.find_by_uuid(SUFFIX, entry_uuid).await.unwrap();
    assert_eq!(by_sync_uuid.map(|e| e.dn), Some(dn("jack")));
    directory.close().await.unwrap();

    // Entries added online also get an entryUUID (389-ds's entryuuid plugin):
    // a different value, not the one the sync controls carry.
    admin_add_person(&server, "bill").await;
    let SyncMessage::Entry {
        dn: got_dn,
        entry_uuid,
        state,
        ..
    } = next_entry(&mut session).await
    else {
        unreachable!()
    };
    assert_eq!(got_dn, dn("bill"));
    assert_eq!(state, EntryState::Add);
    assert_eq!(entry_uuid, sync_uuid(&server, &dn("bill")).await);
    let entry_uuid_attr = read_attr(&server, &dn("bill"), "entryUUID").await.unwrap();
    assert_ne!(entry_uuid_attr, entry_uuid);
    assert_eq!(read_attr(&server, &dn("jack"), "entryUUID").await, None);
    session.close().await.unwrap();
}

#[tokio::test]
async fn persist_delivers_modify_add_and_delete() {
    let server = dirsrv().await;
    let mut session = SyncSession::start(&connection(&server), SUFFIX, FILTER, None, true)
        .await
        .unwrap();
    let messages = refresh(&mut session).await;
    assert_eq!(entries(&messages), 5);

    admin_modify(&server, &dn("jack"), "givenName", "Captain").await;
    let SyncMessage::Entry {
        dn: got_dn,
        state,
        attributes,
        entry_uuid,
        cookie,
        ..
    } = next_entry(&mut session).await
    else {
        unreachable!()
    };
    assert_eq!(got_dn, dn("jack"));
    assert_eq!(state, EntryState::Modify);
    assert_eq!(values(&attributes, "givenName"), vec![&b"Captain"[..]]);
    assert_eq!(values(&attributes, "jpegPhoto"), vec![&PHOTO[..]]);
    assert_eq!(entry_uuid, sync_uuid(&server, &dn("jack")).await);
    let cookie = String::from_utf8(cookie.expect("persist entries carry a cookie")).unwrap();
    assert!(
        cookie.ends_with("#1"),
        "first retro changelog entry: {cookie}"
    );

    admin_add_person(&server, "bill").await;
    let SyncMessage::Entry {
        dn: got_dn, state, ..
    } = next_entry(&mut session).await
    else {
        unreachable!()
    };
    assert_eq!(got_dn, dn("bill"));
    assert_eq!(state, EntryState::Add);

    let anne_uuid = sync_uuid(&server, &dn("anne")).await;
    admin_delete(&server, &dn("anne")).await;
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
    // The server forgets the abandoned search and keeps serving.
    admin_modify(&server, &dn("will"), "givenName", "Bill").await;
    assert_eq!(
        read_attr(&server, &dn("will"), "givenName")
            .await
            .as_deref(),
        Some("Bill")
    );
}

/// refreshAndPersist from a cookie: only what changed while away, deletes as a
/// syncIdSet, and a refreshDelete phase end.
#[tokio::test]
async fn resume_from_cookie_gets_only_changes_made_while_away() {
    let server = dirsrv().await;
    let conn = connection(&server);
    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, None, true)
        .await
        .unwrap();
    let (cookie, _) = refresh_done(&refresh(&mut session).await);
    session.close().await.unwrap();

    let anne_uuid = sync_uuid(&server, &dn("anne")).await;
    let will_uuid = sync_uuid(&server, &dn("will")).await;
    admin_modify(&server, &dn("jack"), "givenName", "Captain").await;
    admin_delete(&server, &dn("anne")).await;

    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, Some(cookie.clone()), true)
        .await
        .unwrap();
    let messages = refresh(&mut session).await;
    let (new_cookie, deletes) = refresh_done(&messages);
    assert_ne!(new_cookie, cookie);
    assert!(deletes, "a delete phase, not a present phase: {messages:?}");

    let Some(SyncMessage::Entry {
        state, attributes, ..
    }) = entry_for(&messages, &dn("jack"))
    else {
        panic!("jack's change missing from {messages:?}");
    };
    assert_eq!(*state, EntryState::Add, "changed while away comes as add");
    assert_eq!(values(attributes, "givenName"), vec![&b"Captain"[..]]);
    assert!(
        messages.iter().any(|m| matches!(
            m,
            SyncMessage::Deleted { entry_uuids, .. } if entry_uuids.contains(&anne_uuid)
        )),
        "anne's delete missing from {messages:?}"
    );
    assert!(!names(&messages, &will_uuid), "unchanged will came back");
    assert_eq!(entries(&messages), 1, "no full reload: {messages:?}");

    // And the session goes on into the persist phase.
    admin_modify(&server, &dn("will"), "givenName", "Bill").await;
    let SyncMessage::Entry {
        dn: got_dn, state, ..
    } = next_entry(&mut session).await
    else {
        unreachable!()
    };
    assert_eq!(got_dn, dn("will"));
    assert_eq!(state, EntryState::Modify);
    session.close().await.unwrap();
}

/// A quirk a consumer must know: resumed in refreshOnly mode, 389-ds sends only
/// the changes and the deletions (as a syncIdSet with refreshDeletes=TRUE) but
/// ends with SyncDone refreshDeletes=FALSE, although there was no present
/// phase. Read as RFC 4533 says, every entry not named would be gone.
#[tokio::test]
async fn resumed_refresh_only_ends_with_refresh_deletes_false_without_a_present_phase() {
    let server = dirsrv().await;
    let conn = connection(&server);
    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, None, false)
        .await
        .unwrap();
    let first = refresh_only(&mut session).await;
    assert_eq!(entries(&first), 5);
    let (cookie, deletes) = refresh_done(&first);
    assert!(!deletes, "a full refresh ends as a present phase");
    session.close().await.unwrap();

    let anne_uuid = sync_uuid(&server, &dn("anne")).await;
    let will_uuid = sync_uuid(&server, &dn("will")).await;
    admin_modify(&server, &dn("jack"), "givenName", "Captain").await;
    admin_delete(&server, &dn("anne")).await;

    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, Some(cookie), false)
        .await
        .unwrap();
    let messages = refresh_only(&mut session).await;
    let (_, deletes) = refresh_done(&messages);
    assert!(
        messages.iter().any(|m| matches!(
            m,
            SyncMessage::Deleted { entry_uuids, .. } if entry_uuids == &vec![anne_uuid.clone()]
        )),
        "{messages:?}"
    );
    assert!(entry_for(&messages, &dn("jack")).is_some(), "{messages:?}");
    assert!(
        !names(&messages, &will_uuid),
        "will is not named: {messages:?}"
    );
    assert!(
        !deletes,
        "389-ds ends a resumed refreshOnly with refreshDeletes=FALSE: {messages:?}"
    );
    session.close().await.unwrap();
}

/// The retro changelog and the cookie survive a restart on the same port.
#[tokio::test]
async fn cookie_survives_a_server_restart() {
    let mut server = dirsrv().await;
    let conn = connection(&server);
    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, None, true)
        .await
        .unwrap();
    let (cookie, _) = refresh_done(&refresh(&mut session).await);
    admin_modify(&server, &dn("jack"), "givenName", "Captain").await;
    let SyncMessage::Entry {
        cookie: Some(cookie_after_jack),
        ..
    } = next_entry(&mut session).await
    else {
        panic!("jack's change without a cookie")
    };
    assert_ne!(cookie_after_jack, cookie);
    session.close().await.unwrap();

    let begun = Instant::now();
    server.restart().await.unwrap();
    eprintln!("389-ds restarted in {:?}", begun.elapsed());
    admin_modify(&server, &dn("will"), "givenName", "Bill").await;

    let mut session = SyncSession::start(&conn, SUFFIX, FILTER, Some(cookie_after_jack), true)
        .await
        .unwrap();
    let messages = refresh(&mut session).await;
    assert_eq!(entries(&messages), 1, "only will: {messages:?}");
    let Some(SyncMessage::Entry { attributes, .. }) = entry_for(&messages, &dn("will")) else {
        panic!("will's change missing from {messages:?}");
    };
    assert_eq!(values(attributes, "givenName"), vec![&b"Bill"[..]]);
    session.close().await.unwrap();
}
