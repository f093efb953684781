//! Bad input and safety (issue 5): binary and non-UTF-8 values, escaped and
//! multi-valued DNs, non-ASCII names, missing attributes and a very large
//! group are each carried, or refused for that entry alone with a clear
//! error; no other entry is affected.

use std::collections::HashSet;
use std::time::Instant;

use idsync::dev::{GROUPS, PEOPLE};
use idsync_bus::{Bus, names};
use idsync_core::model::Focus;
use idsync_proto::v1;
use idsync_testkit::{Slapd, eventually};
use prost::Message;

use crate::support::*;

/// A self-signed P-256 certificate (DER), for `userCertificate;binary`:
/// OpenLDAP checks that a certificate parses.
const CERTIFICATE_HEX: &str = concat!(
    "308201763082011da00302010202140e2c26940cbeebba7e3071096b4ae259cb6cf744300a06082a8648ce3d04030230",
    "10310e300c06035504030c05736d6974683020170d3236313132323036323233325a180f323132363130323930363232",
    "33325a3010310e300c06035504030c05736d6974683059301306072a8648ce3d020106082a8648ce3d03010703420004",
    "d5b22403929158655771847c23d22c1ec938bf86b93ac07af0bc041294ce6c0a9aa15745c31f440f758f6e74b6bb442e",
    "d4a35eb19e7dec0c8472a6d340066ee0a3533051301d0603551d0e041604141e418bdcee1d43fc05dd477fdce93e22b3",
    "77b25a301f0603551d230418301680141e418bdcee1d43fc05dd477fdce93e22b377b25a300f0603551d130101ff0405",
    "30030101ff300a06082a8648ce3d04030203470030440220422360ba8777bf8a0b9975437a27bb0daa1cc07b5c49b326",
    "0dd491278b1833d8022016e2b7d685db6b891e179ec56740483cccc66bddc585311f41c58cc5dcc9794b",
);

/// The start of a JPEG file: not UTF-8.
const JPEG: &[u8] = &[
    0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0xff, 0xd9,
];

/// Bytes that are not UTF-8 (a truncated sequence, then invalid bytes).
const NOT_UTF8: &[u8] = &[0xc3, 0x28, 0xa0, 0xa1, 0xff];

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Adds `dn` with raw values (binary or text).
async fn add_raw(server: &Slapd, dn: &str, attrs: Vec<(&str, Vec<Vec<u8>>)>) {
    let mut ldap = server.admin_conn().await.unwrap();
    let attrs: Vec<(Vec<u8>, HashSet<Vec<u8>>)> = attrs
        .into_iter()
        .map(|(name, values)| (name.as_bytes().to_vec(), values.into_iter().collect()))
        .collect();
    ldap.add(dn, attrs)
        .await
        .unwrap()
        .success()
        .unwrap_or_else(|e| panic!("add {dn}: {e}"));
    let _ = ldap.unbind().await;
}

fn text(values: &[&str]) -> Vec<Vec<u8>> {
    values.iter().map(|v| v.as_bytes().to_vec()).collect()
}

/// An inetOrgPerson at `dn`: uid, cn and sn, givenName when given, and
/// whatever else `extra` holds.
async fn add_user(
    server: &Slapd,
    dn: &str,
    uid: Option<&str>,
    cn: &str,
    given: Option<&str>,
    sn: &str,
    extra: Vec<(&str, Vec<Vec<u8>>)>,
) {
    let mut attrs = vec![
        ("objectClass", text(&["inetOrgPerson"])),
        ("cn", text(&[cn])),
        ("sn", text(&[sn])),
    ];
    if let Some(uid) = uid {
        attrs.push(("uid", text(&[uid])));
    }
    if let Some(given) = given {
        attrs.push(("givenName", text(&[given])));
    }
    attrs.extend(extra);
    add_raw(server, dn, attrs).await;
}

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

/// The reasons of every dead letter parked so far.
async fn dead_letter_reasons(bus: &Bus) -> Vec<String> {
    bus.peek(names::DEAD_STREAM, 1, 1000)
        .await
        .unwrap()
        .iter()
        .map(|m| v1::DeadLetter::decode(m.payload.as_ref()).unwrap().reason)
        .collect()
}

/// Binary attributes, a non-UTF-8 value in an unmapped attribute, an escaped
/// DN, non-ASCII and CJK names, a multi-valued RDN and a missing optional
/// attribute: all carried, under the example's `on_error = "halt"` (so a
/// failure of any would stop the ones after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_entries_are_carried_exactly() {
    let env = start().await;
    let source = &env.deployment.source;
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;

    // Binary attributes (not mapped): ignored, the user syncs.
    let certificate = unhex(CERTIFICATE_HEX);
    add_user(
        source,
        &person_dn("elizabeth"),
        Some("elizabeth"),
        "Elizabeth Swann",
        Some("Elizabeth"),
        "Swann",
        vec![
            ("jpegPhoto", vec![JPEG.to_vec()]),
            ("userCertificate;binary", vec![certificate.clone()]),
            ("audio", vec![NOT_UTF8.to_vec()]),
        ],
    )
    .await;
    // A comma in the uid, so the DN escapes it; a comma in the cn.
    let smith_dn = format!("uid=smith\\,john,{PEOPLE}");
    add_user(
        source,
        &smith_dn,
        Some("smith,john"),
        "Smith, John",
        Some("John"),
        "Smith",
        vec![],
    )
    .await;
    // Non-ASCII and CJK names.
    let jurgen_dn = format!("uid=jürgen,{PEOPLE}");
    add_user(
        source,
        &jurgen_dn,
        Some("jürgen"),
        "Jürgen Groß",
        Some("Jürgen"),
        "Groß",
        vec![],
    )
    .await;
    let wang_dn = format!("uid=王芳,{PEOPLE}");
    add_user(
        source,
        &wang_dn,
        Some("王芳"),
        "王芳",
        Some("芳"),
        "王",
        vec![],
    )
    .await;
    // A multi-valued RDN.
    let teach_dn = format!("uid=blackbeard+cn=Edward Teach,{PEOPLE}");
    add_user(
        source,
        &teach_dn,
        Some("blackbeard"),
        "Edward Teach",
        Some("Edward"),
        "Teach",
        vec![],
    )
    .await;
    // No givenName (optional): the user has none, fullName comes from cn.
    add_user(
        source,
        &person_dn("gibbs"),
        Some("gibbs"),
        "Joshamee Gibbs",
        None,
        "Gibbs",
        vec![],
    )
    .await;

    let synced = |u: &Focus| links_to(u, "hr") && links_to(u, "acme");
    let elizabeth = env.user_where("elizabeth", "synced", synced).await;
    assert_eq!(elizabeth.first("fullName"), Some("Elizabeth Swann"));
    assert!(
        elizabeth
            .attributes
            .keys()
            .all(|k| ["name", "fullName", "givenName", "familyName"].contains(&k.as_str())),
        "binary attributes are not mapped: {elizabeth:?}"
    );
    let account = env
        .target_where("cn=elizabeth,o=Acme", "created", |e| e.is_some())
        .await
        .unwrap();
    assert_eq!(account["cn"], set(&["elizabeth", "Elizabeth Swann"]));
    assert!(!account.contains_key("jpegphoto"));
    // The change event carried the binary values byte for byte.
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    let event = bus
        .peek(names::CHANGES_STREAM, 1, 100)
        .await
        .unwrap()
        .iter()
        .map(|m| v1::ChangeEvent::decode(m.payload.as_ref()).unwrap())
        .find(|e| e.dn == person_dn("elizabeth"))
        .unwrap();
    let values = |name: &str| {
        event
            .attributes
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name))
            .map(|a| a.values.clone())
    };
    assert_eq!(values("jpegPhoto"), Some(vec![JPEG.to_vec()]));
    assert_eq!(values("userCertificate;binary"), Some(vec![certificate]));
    assert_eq!(values("audio"), Some(vec![NOT_UTF8.to_vec()]));

    let smith = env.user_where("smith,john", "synced", synced).await;
    assert_eq!(smith.first("fullName"), Some("Smith, John"));
    // OpenLDAP gives the DN with the comma escaped in hex: the same DN.
    let hr_dn = &smith.link_to("hr").unwrap().dn;
    assert!(
        [smith_dn.clone(), format!("uid=smith\\2Cjohn,{PEOPLE}")].contains(hr_dn),
        "{hr_dn}"
    );
    let account = env
        .target_where("cn=smith\\,john,o=Acme", "created", |e| e.is_some())
        .await
        .unwrap();
    assert_eq!(account["cn"], set(&["smith,john", "Smith, John"]));
    assert_eq!(
        smith.link_to("acme").unwrap().dn.to_lowercase(),
        "cn=smith\\,john,o=acme"
    );

    let jurgen = env.user_where("jürgen", "synced", synced).await;
    assert_eq!(jurgen.first("fullName"), Some("Jürgen Groß"));
    assert_eq!(jurgen.first("givenName"), Some("Jürgen"));
    assert_eq!(jurgen.first("familyName"), Some("Groß"));
    let account = env
        .target_where("cn=jürgen,o=Acme", "created", |e| e.is_some())
        .await
        .unwrap();
    assert_eq!(account["cn"], set(&["jürgen", "Jürgen Groß"]));
    assert_eq!(account["sn"], set(&["Groß"]));

    let wang = env.user_where("王芳", "synced", synced).await;
    assert_eq!(wang.first("fullName"), Some("王芳"));
    assert_eq!(wang.first("familyName"), Some("王"));
    let account = env
        .target_where("cn=王芳,o=Acme", "created", |e| e.is_some())
        .await
        .unwrap();
    assert_eq!(account["cn"], set(&["王芳"]));
    assert_eq!(account["givenname"], set(&["芳"]));

    let teach = env.user_where("blackbeard", "synced", synced).await;
    assert_eq!(teach.first("fullName"), Some("Edward Teach"));
    env.target_where("cn=blackbeard,o=Acme", "created", |e| {
        e.is_some_and(|e| e["cn"] == set(&["blackbeard", "Edward Teach"]))
    })
    .await;

    let gibbs = env.user_where("gibbs", "synced", synced).await;
    assert_eq!(gibbs.first("givenName"), None);
    assert_eq!(gibbs.first("fullName"), Some("Joshamee Gibbs"));
    let account = env
        .target_where("cn=gibbs,o=Acme", "created", |e| e.is_some())
        .await
        .unwrap();
    assert!(!account.contains_key("givenname"), "{account:?}");
    assert_eq!(account["sn"], set(&["Gibbs"]));

    // A group naming them by DNs in other forms than the entries': hex-escaped
    // UTF-8, another case, the RDN's values in another order, spaces.
    let mut ldap = source.admin_conn().await.unwrap();
    ldap.add(
        &format!("cn=odd ones,{GROUPS}"),
        vec![
            ("objectClass", HashSet::from(["groupOfNames"])),
            ("cn", HashSet::from(["odd ones"])),
            (
                "member",
                HashSet::from([
                    smith_dn.as_str(),
                    "uid=J\\C3\\9CRGEN,ou=people,dc=example,dc=com",
                    "UID=王芳,OU=People,DC=Example,DC=com",
                    "cn=Edward Teach+uid=blackbeard,ou=people,dc=example,dc=com",
                    "uid = gibbs , ou=people,dc=example,dc=com",
                ]),
            ),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let odd = group_where(&env, "odd ones", "synced", |g| links_to(g, "hr")).await;
    let expected: HashSet<&str> = [&smith, &jurgen, &wang, &teach, &gibbs]
        .iter()
        .map(|u| u.id.as_str())
        .collect();
    // Every user was synced before the group: each member resolves at once.
    assert_eq!(
        odd.members
            .iter()
            .map(String::as_str)
            .collect::<HashSet<_>>(),
        expected,
        "pending: {:?}",
        odd.pending_members
    );

    // The escaped DN on both sides through a change and a deletion.
    ldap.modify(
        &smith_dn,
        vec![ldap3::Mod::Replace("cn", HashSet::from(["John Smith"]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    env.target_where("cn=smith\\,john,o=Acme", "cn follows", |e| {
        e.is_some_and(|e| e["cn"] == set(&["smith,john", "John Smith"]))
    })
    .await;
    ldap.delete(&smith_dn).await.unwrap().success().unwrap();
    env.user_gone("smith,john").await;
    env.target_where("cn=smith\\,john,o=Acme", "deleted", |e| e.is_none())
        .await;
    group_where(&env, "odd ones", "smith,john left", |g| {
        g.members.len() == 4
    })
    .await;

    // Nothing was refused, and jack is as he was.
    let a = env.idm.get_agreement("hr").await.unwrap();
    assert!(!a.halted, "{a:?}");
    assert_eq!(a.state, v1::AgreementState::Ok as i32, "{a:?}");
    let jack = env.user_where("jack", "untouched", synced).await;
    assert_eq!(jack.first("fullName"), Some("Jack Sparrow"));
    assert_eq!(dead_letter_reasons(&bus).await, Vec::<String>::new());
    env.deployment.shutdown().await.unwrap();
}

/// The example with `on_error = "quarantine"` and a mapping from a binary
/// attribute (`audio` → `voice`), which can hold bytes that are not UTF-8.
fn quarantining() -> String {
    let halt = "on_error = \"halt\"";
    let sn = "source = \"sn\"\ntarget = \"familyName\"\n";
    let example = idsync::dev::EXAMPLE_CONFIG;
    assert!(example.contains(halt) && example.contains(sn));
    example.replace(halt, "on_error = \"quarantine\"").replace(
        sn,
        &format!("{sn}\n[[resources.inbound]]\nsource = \"audio\"\ntarget = \"voice\"\n"),
    )
}

/// Entries the IDM cannot take (a user name with a space, a mapped value
/// that is not UTF-8, no name at all) are parked one by one with a reason
/// naming the entry; the entries around them are synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_entries_are_parked_alone() {
    let env = start_with(&quarantining()).await;
    let source = &env.deployment.source;
    env.user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;

    let bonny_dn = person_dn("anne bonny");
    add_user(
        source,
        &bonny_dn,
        Some("anne bonny"),
        "Anne Bonny",
        Some("Anne"),
        "Bonny",
        vec![],
    )
    .await;
    let calypso_dn = person_dn("calypso");
    add_user(
        source,
        &calypso_dn,
        Some("calypso"),
        "Calypso",
        None,
        "Calypso",
        vec![("audio", vec![NOT_UTF8.to_vec()])],
    )
    .await;
    // inetOrgPerson does not require a uid, the mapping to name reads it.
    let nameless_dn = format!("cn=Nobody,{PEOPLE}");
    add_user(source, &nameless_dn, None, "Nobody", None, "Nobody", vec![]).await;
    // A good entry after them, with a UTF-8 value in the binary attribute.
    add_user(
        source,
        &person_dn("tia"),
        Some("tia"),
        "Tia Dalma",
        Some("Tia"),
        "Dalma",
        vec![("audio", text(&["la la"]))],
    )
    .await;

    let tia = env
        .user_where("tia", "synced past the refused entries", |u| {
            links_to(u, "acme")
        })
        .await;
    assert_eq!(tia.first("voice"), Some("la la"));
    env.target_where("cn=tia,o=Acme", "created", |e| e.is_some())
        .await;

    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    let reasons = eventually("three parked entries", WAIT, || {
        let bus = bus.clone();
        async move {
            let reasons = dead_letter_reasons(&bus).await;
            Ok((reasons.len() >= 3).then_some(reasons))
        }
    })
    .await
    .unwrap();
    assert_eq!(reasons.len(), 3, "{reasons:#?}");
    let about = |dn: &str| -> &str {
        reasons
            .iter()
            .find(|r| r.contains(&format!("{dn:?}")))
            .unwrap_or_else(|| panic!("no reason names {dn}: {reasons:#?}"))
    };
    let bonny = about(&bonny_dn);
    assert!(
        bonny.contains("quarantined") && bonny.contains("holds whitespace"),
        "{bonny}"
    );
    let calypso = about(&calypso_dn);
    assert!(
        calypso.contains("attribute \"audio\" has a value that is not UTF-8")
            && calypso.contains("mapped to \"voice\""),
        "{calypso}"
    );
    let nameless = about(&nameless_dn);
    assert!(nameless.contains("has no name"), "{nameless}");

    for name in ["anne bonny", "calypso", "Nobody"] {
        assert!(
            env.idm
                .find_focus("user", "name", name)
                .await
                .unwrap()
                .is_empty(),
            "{name} must not be imported"
        );
    }
    // The status is that of the last commit (tia's, Ok); the last failure stays.
    let a = env.idm.get_agreement("hr").await.unwrap();
    assert!(!a.halted, "quarantine does not halt: {a:?}");
    let failure = a.last_error.as_ref().unwrap();
    assert!(
        [&bonny_dn, &calypso_dn, &nameless_dn].contains(&&failure.dn),
        "{failure:?}"
    );
    let users = env.idm.all_focus("user").await.unwrap();
    let mut names: Vec<&str> = users.iter().filter_map(|u| u.first("name")).collect();
    names.sort_unstable();
    assert_eq!(names, ["jack", "tia"]);
    env.deployment.shutdown().await.unwrap();
}

/// A group of 50,000 members (none of them synced yet but one) arrives whole:
/// one member, the rest pending; the pipeline is not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_50000_members_is_carried() {
    const MEMBERS: usize = 50_000;
    let env = start().await;
    let source = &env.deployment.source;
    let jack = env
        .user_where("jack", "synced", |u| links_to(u, "acme"))
        .await;

    let mut members: Vec<Vec<u8>> = (0..MEMBERS)
        .map(|i| format!("uid=m{i},{PEOPLE}").into_bytes())
        .collect();
    members.push(person_dn("jack").into_bytes());
    let started = Instant::now();
    add_raw(
        source,
        &format!("cn=big,{GROUPS}"),
        vec![
            ("objectClass", text(&["groupOfNames"])),
            ("cn", text(&["big"])),
            ("member", members),
        ],
    )
    .await;
    let added = started.elapsed();
    // A user and a small group after it.
    add_person(source, "will", "Will", "Turner").await;
    let mut ldap = source.admin_conn().await.unwrap();
    let will_dn = person_dn("will");
    ldap.add(
        &format!("cn=small,{GROUPS}"),
        vec![
            ("objectClass", HashSet::from(["groupOfNames"])),
            ("cn", HashSet::from(["small"])),
            ("member", HashSet::from([will_dn.as_str()])),
        ],
    )
    .await
    .unwrap()
    .success()
    .unwrap();

    // The small group comes after the big one: once it is there, so is the
    // big one (read it then, rather than poll answers of 2 MB).
    let will = env
        .user_where("will", "synced after the big group", |u| {
            links_to(u, "acme")
        })
        .await;
    group_where(&env, "small", "with will", |g| {
        g.members == [will.id.clone()]
    })
    .await;
    let synced = started.elapsed();
    let t = Instant::now();
    let big = group_where(&env, "big", "all members there", |g| {
        g.pending_members.len() == MEMBERS
    })
    .await;
    let read = t.elapsed();
    assert_eq!(big.members, [jack.id.as_str()]);
    assert!(
        big.pending_members
            .iter()
            .all(|m| m.dn.starts_with("uid=m") && m.dn.ends_with(PEOPLE)),
        "{:?}",
        &big.pending_members[..3]
    );

    // A change to the big group goes through too, and so does one after it.
    let t = Instant::now();
    ldap.modify(
        &format!("cn=big,{GROUPS}"),
        vec![ldap3::Mod::Add("member", HashSet::from([will_dn.as_str()]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    let jack_dn = person_dn("jack");
    ldap.modify(
        &format!("cn=small,{GROUPS}"),
        vec![ldap3::Mod::Add("member", HashSet::from([jack_dn.as_str()]))],
    )
    .await
    .unwrap()
    .success()
    .unwrap();
    group_where(&env, "small", "jack added", |g| g.members.len() == 2).await;
    let big = group_where(&env, "big", "will added", |g| g.members.len() == 2).await;
    assert_eq!(big.pending_members.len(), MEMBERS);
    eprintln!(
        "50,000 members: ldap add {added:?}; the group and the changes after it \
         in the IDM after {synced:?}; one read of the group {read:?}; a change \
         of the group {:?}",
        t.elapsed()
    );
    // A dry run sends the commits of every entry, the big group's too, in one call.
    let t = Instant::now();
    let entries = idsync::sync::dry_run(&env.deployment.config, &env.idm, "hr")
        .await
        .unwrap();
    let big_entry = entries
        .iter()
        .find(|e| e.dn == format!("cn=big,{GROUPS}"))
        .unwrap();
    assert!(
        big_entry.refusal.is_empty() && !big_entry.would_change(),
        "{big_entry:?}"
    );
    eprintln!("dry run of {} entries: {:?}", entries.len(), t.elapsed());

    let a = env.idm.get_agreement("hr").await.unwrap();
    assert!(
        !a.halted && a.state == v1::AgreementState::Ok as i32,
        "{a:?}"
    );
    let bus = Bus::connect(env.deployment.nats.url()).await.unwrap();
    assert_eq!(dead_letter_reasons(&bus).await, Vec::<String>::new());
    env.deployment.shutdown().await.unwrap();
}

/// An entry larger than the NATS server takes is refused alone: the detector
/// logs it with its size and goes on, so the entries after it still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_too_large_for_the_bus_is_skipped_alone() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let deployment = idsync::dev::Deployment::start_with_options(
        dir.path(),
        idsync::dev::EXAMPLE_CONFIG,
        idsync::dev::Options {
            nats_max_payload: Some("1MB".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let env = Env::from(deployment, dir);
    let source = &env.deployment.source;
    // About 1.3 MB of members.
    let members: Vec<Vec<u8>> = (0..30_000)
        .map(|i| format!("uid=m{i},{PEOPLE}").into_bytes())
        .collect();
    add_raw(
        source,
        &format!("cn=huge,{GROUPS}"),
        vec![
            ("objectClass", text(&["groupOfNames"])),
            ("cn", text(&["huge"])),
            ("member", members),
        ],
    )
    .await;
    add_person(source, "will", "Will", "Turner").await;
    env.user_where("will", "synced after the huge group", |u| {
        links_to(u, "acme")
    })
    .await;
    let groups = env.idm.all_focus("group").await.unwrap();
    let names: Vec<_> = groups.iter().filter_map(|g| g.first("name")).collect();
    assert_eq!(
        names,
        ["crew"],
        "the huge group was not carried, the rest was"
    );
    env.deployment.shutdown().await.unwrap();
}
