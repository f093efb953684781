//! A paged scan of a subtree (RFC 2696 simple paged results): every entry
//! once, a page at a time, so that reading a million entries holds one page.

use ldap3::adapters::{EntriesOnly, PagedResults};
use ldap3::{Ldap, Scope, SearchStream};

use crate::connection::{OPERATION_TIMEOUT, open};
use crate::decode;
use crate::error::Op;
use crate::{Connection, LdapError};

/// Entries per page asked of the server.
pub const PAGE_SIZE: i32 = 500;

/// One entry as a scan reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScannedEntry {
    /// The value of the identifier attribute (`entryUUID`, `nsUniqueId`), lower case.
    pub entry_uuid: String,
    pub dn: String,
    /// `entryCSN`, when the server keeps one.
    pub csn: Option<String>,
    /// Every attribute with its raw values, as the server sent them
    /// (including the identifier and `entryCSN`).
    pub attributes: Vec<(String, Vec<Vec<u8>>)>,
}

/// An ongoing paged scan.
pub struct Scan {
    url: String,
    base: String,
    id_attribute: String,
    stream: SearchStream<'static, String, Vec<String>>,
    _ldap: Ldap,
    done: bool,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("url", &self.url)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Scan {
    /// Connects, binds and starts a paged subtree search of `base` with
    /// `filter`, asking for `*`, `id_attribute` and `entryCSN`.
    ///
    /// # Errors
    /// [`LdapError::Connect`], [`LdapError::Bind`], or the search's refusal.
    pub async fn start(
        conn: &Connection,
        base: &str,
        filter: &str,
        id_attribute: &str,
    ) -> Result<Self, LdapError> {
        let mut ldap = open(conn).await?;
        let op = Op {
            url: &conn.url,
            operation: "paged search",
            dn: base,
        };
        let attrs = vec![
            "*".to_owned(),
            id_attribute.to_owned(),
            "entryCSN".to_owned(),
        ];
        let adapters: Vec<Box<dyn ldap3::adapters::Adapter<'static, String, Vec<String>>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(PAGE_SIZE)),
        ];
        let stream = ldap
            .streaming_search_with(adapters, base, Scope::Subtree, filter, attrs)
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        Ok(Self {
            url: conn.url.clone(),
            base: base.to_owned(),
            id_attribute: id_attribute.to_lowercase(),
            stream,
            _ldap: ldap,
            done: false,
        })
    }

    /// The next entry; `Ok(None)` at the end. An entry without the
    /// identifier attribute, or one that does not decode, is an error for that
    /// entry alone: the scan goes on with the next.
    ///
    /// # Errors
    /// [`LdapError::Protocol`] for an entry that cannot be used,
    /// [`LdapError::Operation`] when the server ends the search with an
    /// error, [`LdapError::Closed`] when the connection drops.
    pub async fn next(&mut self) -> Result<Option<ScannedEntry>, LdapError> {
        if self.done {
            return Ok(None);
        }
        let op = Op {
            url: &self.url,
            operation: "paged search",
            dn: &self.base,
        };
        let item = match self.stream.next().await {
            Ok(item) => item,
            Err(e) => {
                self.done = true;
                return Err(op.failed(e, OPERATION_TIMEOUT));
            }
        };
        let Some(item) = item else {
            self.done = true;
            let result = self.stream.finish().await;
            if result.rc != 0 {
                return Err(op.result(result.rc, &result.text));
            }
            return Ok(None);
        };
        let protocol = |reason: String| LdapError::Protocol {
            url: self.url.clone(),
            reason,
        };
        let (dn, attributes) = decode::guarded(|| decode::entry(item.0))
            .map_err(|e| protocol(format!("a search entry does not decode: {e}")))?
            .ok_or_else(|| protocol("a search entry does not decode".into()))?;
        let first = |name: &str| {
            attributes
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.first())
                .and_then(|v| String::from_utf8(v.clone()).ok())
        };
        let entry_uuid = first(&self.id_attribute)
            .map(|v| decode::canonical_uuid(&v))
            .ok_or_else(|| protocol(format!("entry {dn} has no {}", self.id_attribute)))?;
        let csn = first("entryCSN");
        Ok(Some(ScannedEntry {
            entry_uuid,
            dn,
            csn,
            attributes,
        }))
    }
}
