//! Domain objects: focus objects, shadows, source entries and the write plans
//! that the IDM applies atomically.

use std::collections::BTreeMap;

/// Attribute name → values. Names are kept as configured (IDM side) or
/// lower-cased (LDAP side, whose names are case-insensitive).
pub type Attrs = BTreeMap<String, Vec<String>>;

/// Focus object kinds.
pub const KIND_USER: &str = "user";
pub const KIND_GROUP: &str = "group";
pub const KIND_ROLE: &str = "role";

/// A DN in a form for comparison (RFC 4514): lower case; no spaces around
/// the `,`, `+` and `=` that separate RDNs and their parts; every escape
/// (`\,` or its hex form `\2C`, `\C3\9C` for `Ü`) decoded and the value
/// escaped again one way only; the attribute-value pairs of a multi-valued
/// RDN in sorted order. Two spellings of one DN give one string.
pub fn normalize_dn(dn: &str) -> String {
    if is_plain_dn(dn) {
        return dn.to_ascii_lowercase();
    }
    parse_and_normalize(dn)
}

/// [`normalize_dn`] the long way, for any DN.
fn parse_and_normalize(dn: &str) -> String {
    split_unescaped(dn, ',')
        .iter()
        .map(|rdn| {
            let mut avas: Vec<String> = split_unescaped(rdn, '+')
                .iter()
                .map(|ava| match split_unescaped(ava, '=').split_first() {
                    Some((attr, rest)) if !rest.is_empty() => {
                        let value = unescape(rest.join("=").trim());
                        let attr = unescape(attr.trim()).to_lowercase();
                        format!("{}={}", escape(&attr), escape(&value.to_lowercase()))
                    }
                    // Not attribute=value: kept, escaped the same way.
                    _ => escape(&unescape(ava.trim()).to_lowercase()),
                })
                .collect();
            avas.sort();
            avas.join("+")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A DN that is already in [`normalize_dn`]'s form but for its case: every
/// RDN one `attribute=value` of letters, digits and `-._@`, with no space,
/// escape or multi-valued RDN (`uid=ann,ou=people,dc=example,dc=com`).
/// Nearly every DN is; it needs no splitting.
fn is_plain_dn(dn: &str) -> bool {
    !dn.is_empty()
        && dn.split(',').all(|rdn| {
            rdn.bytes().filter(|b| *b == b'=').count() == 1
                && !rdn.starts_with('=')
                && rdn.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'=' | b'-' | b'.' | b'_' | b'@')
                })
        })
}

/// `text` split at every `sep` that is not escaped; escapes are kept.
fn split_unescaped(text: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            current.push(c);
            escaped = false;
        } else if c == '\\' {
            current.push(c);
            escaped = true;
        } else if c == sep {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

/// An attribute value with its escapes decoded: `\,` → `,`, `\2C` → `,`,
/// and hex pairs as UTF-8 bytes (`\C3\9C` → `Ü`). A malformed escape is kept.
fn unescape(value: &str) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let chars: Vec<char> = value.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            let hex: Option<u8> = chars
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(char::is_ascii_hexdigit))
                .and_then(|h| u8::from_str_radix(&h.iter().collect::<String>(), 16).ok());
            if let Some(b) = hex {
                bytes.push(b);
                i += 3;
                continue;
            }
            if let Some(next) = chars.get(i + 1) {
                let mut buf = [0u8; 4];
                bytes.extend_from_slice(next.encode_utf8(&mut buf).as_bytes());
                i += 2;
                continue;
            }
        }
        let mut buf = [0u8; 4];
        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        i += 1;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One escaping of a value (RFC 4514 section 2.4): the special characters
/// with a backslash, a leading `#`, control characters and whitespace at
/// either end in hex (`\\0A`, `\\20`).
fn escape(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let edge = i == 0 || i == last;
        if c.is_control() || (edge && c.is_whitespace()) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\{b:02x}"));
            }
        } else if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && c == '#')
        {
            out.push('\\');
            out.push(c);
        } else {
            out.push(c);
        }
    }
    out
}

/// The IDM attribute that names a focus; unique per kind.
pub const NAME_ATTRIBUTE: &str = "name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FocusStatus {
    #[default]
    Enabled,
    Disabled,
}

/// Why a focus should have an account on a resource: assigned the resource
/// itself (`resource`), or a role that gives one (`role`, `resource` empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    pub resource: String,
    pub source: String,
    pub role: String,
}

/// What a role gives its holders (midPoint's inducement): an account on
/// `resource` with `attributes` and membership of `groups` there, or all
/// that the role named `role` gives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inducement {
    pub resource: String,
    /// Attribute names as the resource spells them (compared lower-cased).
    pub attributes: Attrs,
    /// DNs of groups on the resource.
    pub groups: Vec<String>,
    pub role: String,
}

/// A target operation still being retried, as its account's shadow shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingOperation {
    pub operation: String,
    pub attempts: u32,
    pub reason: String,
    pub since_ms: i64,
}

/// A focus's link to one of its shadows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub resource: String,
    pub entry_uuid: String,
    pub dn: String,
}

/// A user or group in the IDM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Focus {
    pub id: String,
    pub kind: String,
    /// 0 for a focus that is not stored yet.
    pub version: u64,
    pub attributes: Attrs,
    pub assignments: Vec<Assignment>,
    pub links: Vec<Link>,
    pub status: FocusStatus,
    /// Groups: ids of member focus objects.
    pub members: Vec<String>,
    /// Groups: members the source names whose accounts are not known yet.
    pub pending_members: Vec<MemberRef>,
    /// The sync agreement that created the focus and alone may write it
    /// (except for its yielded attributes); empty when the IDM owns it.
    pub sync_parent: String,
    /// Roles: what the role gives its holders.
    pub inducements: Vec<Inducement>,
}

/// A member as a source names it: by DN, or by uid (`memberUid`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct MemberRef {
    pub resource: String,
    pub dn: String,
    pub uid: String,
}

impl MemberRef {
    /// The key that finds the member's account among shadows.
    pub fn key(&self) -> String {
        member_key(&self.dn, &self.uid)
    }
}

/// `dn:<normalized dn>` for a DN, else `uid:<lower-case uid>`.
pub fn member_key(dn: &str, uid: &str) -> String {
    if dn.is_empty() {
        format!("uid:{}", uid.to_lowercase())
    } else {
        format!("dn:{}", normalize_dn(dn))
    }
}

impl Focus {
    /// The first value of `attribute`, if any.
    pub fn first(&self, attribute: &str) -> Option<&str> {
        self.attributes
            .get(attribute)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    pub fn link_to(&self, resource: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.resource == resource)
    }

    /// Replace the link to `link.resource` (a focus has one account per resource).
    /// In place when there is one, so that linking again changes nothing.
    pub fn set_link(&mut self, link: Link) {
        let resource = link.resource.clone();
        match self.links.iter().position(|l| l.resource == resource) {
            Some(at) => {
                self.links[at] = link;
                // One account per resource: any later duplicate goes.
                let mut index = 0;
                self.links.retain(|l| {
                    let keep = l.resource != resource || index == at;
                    index += 1;
                    keep
                });
            }
            None => self.links.push(link),
        }
    }

    pub fn remove_link(&mut self, resource: &str, entry_uuid: &str) {
        self.links
            .retain(|l| !(l.resource == resource && l.entry_uuid == entry_uuid));
    }

    /// Whether the focus is assigned `resource` itself (not through a role).
    pub fn has_assignment(&self, resource: &str) -> bool {
        self.assignments
            .iter()
            .any(|a| a.role.is_empty() && a.resource == resource)
    }

    /// Whether the focus is assigned the role named `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.assignments.iter().any(|a| a.role == role)
    }
}

/// The IDM's record of one entry on one resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shadow {
    pub resource: String,
    pub entry_uuid: String,
    pub dn: String,
    pub focus_id: Option<String>,
    pub position: u64,
    /// 0 for a shadow that is not stored yet.
    pub version: u64,
    pub attributes: Attrs,
    pub situation: String,
    pub dead: bool,
    /// CSN of the last change applied, when the source gives one.
    pub csn: String,
    /// Focus ids correlation found, while the situation is disputed.
    pub candidates: Vec<String>,
    pub object_type: ObjectType,
    /// Keys besides its DN under which groups name this account (`uid:jack`).
    pub member_keys: Vec<String>,
    /// Target accounts: the groups idsync made the account a member of.
    pub groups: Vec<String>,
    /// Target accounts: the operation still being retried.
    pub pending: Option<PendingOperation>,
}

/// An entry as a source resource reports it: whole state or tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceChange {
    pub resource: String,
    pub entry_uuid: String,
    pub dn: String,
    pub kind: ChangeKind,
    /// The entry's change sequence number in the source (OpenLDAP's
    /// entryCSN), when known. CSNs of one source order its changes.
    pub csn: Option<String>,
    pub object_type: ObjectType,
}

/// What an entry is on its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ObjectType {
    #[default]
    Account,
    Group,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// The whole after-image; attribute names lower-cased, values raw bytes.
    Upsert {
        attributes: BTreeMap<String, Vec<Vec<u8>>>,
    },
    Delete,
}

impl SourceChange {
    /// Values of `attribute` (case-insensitive) as raw bytes.
    pub fn values(&self, attribute: &str) -> &[Vec<u8>] {
        match &self.kind {
            ChangeKind::Upsert { attributes } => attributes
                .get(&attribute.to_ascii_lowercase())
                .map(Vec::as_slice)
                .unwrap_or(&[]),
            ChangeKind::Delete => &[],
        }
    }

    pub fn is_delete(&self) -> bool {
        matches!(self.kind, ChangeKind::Delete)
    }
}

/// One write of a commit plan, conditional on the version read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Store `focus`; its stored version must equal `expected_version` (0: absent).
    PutFocus {
        focus: Focus,
        expected_version: u64,
    },
    DeleteFocus {
        id: String,
        expected_version: u64,
    },
    PutShadow {
        shadow: Shadow,
        expected_version: u64,
    },
    DeleteShadow {
        resource: String,
        entry_uuid: String,
        expected_version: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::normalize_dn;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn normalizing_is_idempotent_and_never_panics(dn in "[a-zA-Z0-9=,+\\\\ #;<>\"äÜ王]{0,40}") {
            let once = normalize_dn(&dn);
            prop_assert_eq!(normalize_dn(&once), once);
        }

        /// The shortcut for plain DNs gives what parsing gives, for DNs it
        /// takes and for near misses it must leave to the parser.
        #[test]
        fn the_plain_dn_shortcut_agrees_with_parsing(dn in "[a-zA-Z0-9=,._@ #+-]{0,40}") {
            prop_assert_eq!(normalize_dn(&dn), super::parse_and_normalize(&dn));
        }
    }

    #[test]
    fn linking_again_changes_nothing() {
        let link = |resource: &str, uuid: &str| super::Link {
            resource: resource.into(),
            entry_uuid: uuid.into(),
            dn: format!("uid=x,o={resource}"),
        };
        let mut f = super::Focus::default();
        f.set_link(link("hr", "1"));
        f.set_link(link("crm", "2"));
        let before = f.clone();
        f.set_link(link("hr", "1"));
        assert_eq!(f, before, "the order of links is kept");
        f.set_link(link("hr", "3"));
        assert_eq!(f.links, vec![link("hr", "3"), link("crm", "2")]);
    }

    #[test]
    fn plain_dns_take_the_shortcut_and_others_do_not() {
        for plain in [
            "uid=Ann.Lee,ou=People,dc=example,dc=com",
            "cn=a-b_c@d",
            "uid=,o=x",
        ] {
            assert!(super::is_plain_dn(plain), "{plain}");
            assert_eq!(normalize_dn(plain), super::parse_and_normalize(plain));
        }
        for other in [
            "",
            "uid=a, ou=b",
            "cn=a+sn=b",
            "cn=a\\,b",
            "cn=#x",
            "o=a=b",
            "=a",
            "o=a,,o=b",
            "cn=Ü",
        ] {
            assert!(!super::is_plain_dn(other), "{other}");
        }
    }

    #[test]
    fn dns_compare_without_case_or_spacing() {
        assert_eq!(
            normalize_dn("UID=Jack, ou=People ,dc=Example,dc=com"),
            "uid=jack,ou=people,dc=example,dc=com"
        );
        assert_eq!(
            normalize_dn("cn=Smith\\, John,o=Acme"),
            "cn=smith\\, john,o=acme"
        );
    }

    #[test]
    fn every_spelling_of_one_dn_is_one_string() {
        let canonical = normalize_dn("uid=smith\\,john,ou=people,dc=example,dc=com");
        for spelling in [
            "uid=smith\\2Cjohn,ou=people,dc=example,dc=com",
            "UID = Smith\\2cJohn , OU=People,DC=example,DC=com",
        ] {
            assert_eq!(normalize_dn(spelling), canonical, "{spelling}");
        }
        assert_eq!(
            normalize_dn("uid=J\\C3\\9CRGEN,ou=people"),
            normalize_dn("uid=jürgen,ou=people")
        );
        assert_eq!(
            normalize_dn("uid=x+cn=Edward Teach,ou=people"),
            normalize_dn("CN=edward teach + UID=X,ou=people"),
            "multi-valued RDNs in any order"
        );
        assert_eq!(normalize_dn("cn=a\\+b,o=x"), "cn=a\\+b,o=x");
        assert_ne!(normalize_dn("cn=a\\+b,o=x"), normalize_dn("cn=a+b=,o=x"));
    }
}
