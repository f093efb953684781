//! Decoding raw BER search results without ldap3's panicking helpers.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ldap3::asn1::StructureTag;

/// OID of the RFC 4533 Sync Info intermediate response.
pub(crate) const SYNC_INFO_OID: &str = "1.3.6.1.4.1.4203.1.9.1.4";
/// OID of the RFC 4533 Sync State response control.
pub(crate) const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
/// OID of the RFC 4533 Sync Done response control.
pub(crate) const SYNC_DONE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.3";

/// One attribute with its raw values, in the order the server sent them.
pub(crate) type RawAttribute = (String, Vec<Vec<u8>>);

/// DN and attributes of a SearchResultEntry (`[APPLICATION 4]`); `None` when malformed.
pub(crate) fn entry(tag: StructureTag) -> Option<(String, Vec<RawAttribute>)> {
    let mut parts = tag.match_id(4)?.expect_constructed()?.into_iter();
    let dn = String::from_utf8(parts.next()?.expect_primitive()?).ok()?;
    let mut attributes = Vec::new();
    for partial in parts.next()?.expect_constructed()? {
        let mut partial = partial.expect_constructed()?.into_iter();
        let name = String::from_utf8(partial.next()?.expect_primitive()?).ok()?;
        let values = partial
            .next()?
            .expect_constructed()?
            .into_iter()
            .map(StructureTag::expect_primitive)
            .collect::<Option<Vec<_>>>()?;
        attributes.push((name, values));
    }
    Some((dn, attributes))
}

/// The responseName OID of an IntermediateResponse (`[APPLICATION 25]`), if it has one.
pub(crate) fn intermediate_oid(tag: &StructureTag) -> Option<String> {
    tag.clone()
        .match_id(25)?
        .expect_constructed()?
        .into_iter()
        .find(|t| t.id == 0)?
        .expect_primitive()
        .and_then(|oid| String::from_utf8(oid).ok())
}

/// Run one of ldap3's parsers, which panic on malformed input, turning a panic into `Err`.
pub(crate) fn guarded<T>(parse: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(parse)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "malformed value".to_owned())
    })
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lower case, from the 16 raw bytes of an entryUUID.
pub(crate) fn uuid(bytes: &[u8]) -> Option<String> {
    if bytes.len() != 16 {
        return None;
    }
    let mut out = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{b:02x}"));
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use ldap3::asn1::{ASNTag, OctetString, Sequence, Set, Tag, TagClass};

    fn octets(bytes: &[u8]) -> Tag {
        Tag::OctetString(OctetString {
            inner: bytes.to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn uuid_is_lower_case_hyphenated() {
        let bytes: Vec<u8> = (0u8..16).map(|i| i * 17).collect();
        assert_eq!(
            uuid(&bytes).unwrap(),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        assert_eq!(uuid(&bytes[..15]), None);
    }

    #[test]
    fn entry_keeps_binary_values_and_order() {
        let tag = Tag::Sequence(Sequence {
            id: 4,
            class: TagClass::Application,
            inner: vec![
                octets(b"cn=x,dc=y"),
                Tag::Sequence(Sequence {
                    inner: vec![
                        Tag::Sequence(Sequence {
                            inner: vec![
                                octets(b"jpegPhoto"),
                                Tag::Set(Set {
                                    inner: vec![octets(&[0xff, 0xd8]), octets(b"ok")],
                                    ..Default::default()
                                }),
                            ],
                            ..Default::default()
                        }),
                        Tag::Sequence(Sequence {
                            inner: vec![
                                octets(b"cn"),
                                Tag::Set(Set {
                                    inner: vec![octets(b"x")],
                                    ..Default::default()
                                }),
                            ],
                            ..Default::default()
                        }),
                    ],
                    ..Default::default()
                }),
            ],
        })
        .into_structure();
        let (dn, attrs) = entry(tag).unwrap();
        assert_eq!(dn, "cn=x,dc=y");
        assert_eq!(
            attrs,
            vec![
                (
                    "jpegPhoto".to_owned(),
                    vec![vec![0xff, 0xd8], b"ok".to_vec()]
                ),
                ("cn".to_owned(), vec![b"x".to_vec()]),
            ]
        );
    }

    #[test]
    fn malformed_entry_is_none() {
        let tag = Tag::Sequence(Sequence {
            id: 4,
            class: TagClass::Application,
            inner: vec![octets(b"cn=x")],
        })
        .into_structure();
        assert_eq!(entry(tag), None);
    }

    #[test]
    fn guarded_turns_a_panic_into_err() {
        let raw = ldap3::controls::RawControl {
            ctype: SYNC_STATE_OID.to_owned(),
            crit: false,
            val: Some(vec![0x04, 0x01]),
        };
        let err = guarded(|| raw.parse::<ldap3::controls::SyncState>()).unwrap_err();
        assert!(err.contains("syncstate"), "{err}");
        assert_eq!(guarded(|| 7).unwrap(), 7);
    }
}

/// An identifier in the form the sync control gives it: 32 hexadecimal
/// digits grouped `8-4-4-4-12`, lower case. 389-ds writes its `nsUniqueId`
/// as `8-8-8-8` with the same digits in the same order; other values are
/// returned as they are.
pub fn canonical_uuid(value: &str) -> String {
    let hex: String = value.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return value.to_owned();
    }
    let hex = hex.to_lowercase();
    let part = |a: usize, b: usize| hex.get(a..b).unwrap_or_default();
    format!(
        "{}-{}-{}-{}-{}",
        part(0, 8),
        part(8, 12),
        part(12, 16),
        part(16, 20),
        part(20, 32)
    )
}

/// `uuid` (any grouping) in 389-ds's `nsUniqueId` form, `8-8-8-8`.
pub(crate) fn ns_unique_id(uuid: &str) -> String {
    let hex: String = uuid.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return uuid.to_owned();
    }
    let part = |a: usize, b: usize| hex.get(a..b).unwrap_or_default();
    format!(
        "{}-{}-{}-{}",
        part(0, 8),
        part(8, 16),
        part(16, 24),
        part(24, 32)
    )
}

#[cfg(test)]
mod uuid_tests {
    use super::*;

    #[test]
    fn ns_unique_ids_and_uuids_are_the_same_digits() {
        let ns = "b424d3a9-e63a11f1-8c2886d8-64e88067";
        let uuid = "b424d3a9-e63a-11f1-8c28-86d864e88067";
        assert_eq!(canonical_uuid(ns), uuid);
        assert_eq!(canonical_uuid(&uuid.to_uppercase()), uuid);
        assert_eq!(ns_unique_id(uuid), ns);
        assert_eq!(canonical_uuid("Not-A-UUID"), "Not-A-UUID");
    }
}
