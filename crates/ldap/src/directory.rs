//! A bound connection for reading and writing accounts in a target directory.

use std::collections::{BTreeMap, HashSet};

use ldap3::{Ldap, LdapResult, Mod, ResultEntry, Scope, ldap_escape};

use crate::connection::{OPERATION_TIMEOUT, open};
use crate::decode;
use crate::error::Op;
use crate::{Connection, LdapError};

const RC_NO_SUCH_OBJECT: u32 = 32;
const RC_ALREADY_EXISTS: u32 = 68;
const RC_NO_SUCH_ATTRIBUTE: u32 = 16;
const RC_VALUE_EXISTS: u32 = 20;

/// An entry as read from a target directory; attribute names lower-cased,
/// values as UTF-8 strings (non-UTF-8 values skipped).
///
/// `entryUUID` is held in [`DirEntry::entry_uuid`] only (empty when the server
/// has none), not in `attributes`.
#[derive(Debug, Clone, PartialEq)]
pub struct DirEntry {
    /// The entry's DN as the server returned it.
    pub dn: String,
    /// The entry's `entryUUID`.
    pub entry_uuid: String,
    /// User attributes by lower-cased name.
    pub attributes: BTreeMap<String, Vec<String>>,
}

/// The first RDN of `dn` and the rest (its parent), split at the first
/// unescaped comma.
fn split_rdn(dn: &str) -> Option<(&str, &str)> {
    let mut escaped = false;
    for (i, c) in dn.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => return Some((dn.get(..i)?.trim(), dn.get(i + 1..)?.trim())),
            _ => {}
        }
    }
    None
}

/// A bound connection for writing accounts to a target directory. A clone
/// shares the connection: operations of clones are multiplexed over it.
#[derive(Debug, Clone)]
pub struct Directory {
    url: String,
    ldap: Ldap,
    /// The attribute that identifies entries (`entryUUID`, `nsUniqueId`).
    id_attribute: String,
}

impl Directory {
    /// Connects and binds.
    ///
    /// # Errors
    ///
    /// [`LdapError::Connect`] or [`LdapError::Bind`].
    pub async fn connect(conn: &Connection) -> Result<Self, LdapError> {
        Ok(Self {
            url: conn.url.clone(),
            ldap: open(conn).await?,
            id_attribute: "entryUUID".to_owned(),
        })
    }

    /// Identify entries by `attribute` instead of `entryUUID` (for example
    /// `nsUniqueId` on 389 Directory Server).
    pub fn with_id_attribute(mut self, attribute: &str) -> Self {
        attribute.clone_into(&mut self.id_attribute);
        self
    }

    /// Base-scope read of `dn` with `*` and `entryUUID`; `Ok(None)` when there
    /// is no such entry (rc 32).
    ///
    /// # Errors
    ///
    /// [`LdapError::Operation`] for any other error result,
    /// [`LdapError::Timeout`], [`LdapError::Closed`], [`LdapError::Protocol`].
    pub async fn read(&mut self, dn: &str) -> Result<Option<DirEntry>, LdapError> {
        let op = Op {
            url: &self.url,
            operation: "read",
            dn,
        };
        let (entries, result) = self.search(op, dn, Scope::Base, "(objectClass=*)").await?;
        match result.rc {
            0 => {}
            RC_NO_SUCH_OBJECT => return Ok(None),
            rc => return Err(op.result(rc, &result.text)),
        }
        entries
            .into_iter()
            .next()
            .map(|e| self.dir_entry(e))
            .transpose()
    }

    /// Subtree search under `base` for `(entryUUID=<uuid>)`; the first match.
    ///
    /// # Errors
    ///
    /// [`LdapError::Operation`] for an error result (including a missing
    /// `base`, rc 32), [`LdapError::Timeout`], [`LdapError::Closed`],
    /// [`LdapError::Protocol`].
    pub async fn find_by_uuid(
        &mut self,
        base: &str,
        entry_uuid: &str,
    ) -> Result<Option<DirEntry>, LdapError> {
        let op = Op {
            url: &self.url,
            operation: "search by entryUUID",
            dn: base,
        };
        // 389-ds writes nsUniqueId with its own grouping of the same digits.
        let value = if self.id_attribute.eq_ignore_ascii_case("nsUniqueId") {
            decode::ns_unique_id(entry_uuid)
        } else {
            entry_uuid.to_owned()
        };
        let filter = format!("({}={})", self.id_attribute, ldap_escape(value));
        let (entries, result) = self.search(op, base, Scope::Subtree, &filter).await?;
        if result.rc != 0 {
            return Err(op.result(result.rc, &result.text));
        }
        entries
            .into_iter()
            .next()
            .map(|e| self.dir_entry(e))
            .transpose()
    }

    /// Adds an entry; attributes with no values are left out.
    ///
    /// # Errors
    ///
    /// [`LdapError::AlreadyExists`] for rc 68, [`LdapError::Operation`] for
    /// other error results, [`LdapError::Timeout`], [`LdapError::Closed`].
    pub async fn add(
        &mut self,
        dn: &str,
        attributes: &BTreeMap<String, Vec<String>>,
    ) -> Result<(), LdapError> {
        let op = Op {
            url: &self.url,
            operation: "add",
            dn,
        };
        let attrs: Vec<(&str, HashSet<&str>)> = attributes
            .iter()
            .filter(|(_, values)| !values.is_empty())
            .map(|(name, values)| (name.as_str(), values.iter().map(String::as_str).collect()))
            .collect();
        let result = self
            .ldap
            .with_timeout(OPERATION_TIMEOUT)
            .add(dn, attrs)
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        match result.rc {
            0 => Ok(()),
            RC_ALREADY_EXISTS => Err(op.exists(dn)),
            rc => Err(op.result(rc, &result.text)),
        }
    }

    /// Replace modifications; an empty value list removes the attribute.
    /// No changes means no request.
    ///
    /// # Errors
    ///
    /// [`LdapError::NoSuchObject`] for rc 32, [`LdapError::Operation`] for
    /// other error results (e.g. rc 67 when the RDN value would go),
    /// [`LdapError::Timeout`], [`LdapError::Closed`].
    pub async fn replace(
        &mut self,
        dn: &str,
        changes: &[(String, Vec<String>)],
    ) -> Result<(), LdapError> {
        if changes.is_empty() {
            return Ok(());
        }
        let op = Op {
            url: &self.url,
            operation: "modify",
            dn,
        };
        let mods: Vec<Mod<&str>> = changes
            .iter()
            .map(|(name, values)| {
                Mod::Replace(name.as_str(), values.iter().map(String::as_str).collect())
            })
            .collect();
        let result = self
            .ldap
            .with_timeout(OPERATION_TIMEOUT)
            .modify(dn, mods)
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        match result.rc {
            0 => Ok(()),
            RC_NO_SUCH_OBJECT => Err(op.missing()),
            rc => Err(op.result(rc, &result.text)),
        }
    }

    /// Adds `value` to `attribute` of `dn` (`add: true`) or deletes it from
    /// there (`add: false`). Already there (rc 20) or already gone (rc 16)
    /// counts as done, so a retry changes nothing.
    ///
    /// # Errors
    ///
    /// [`LdapError::NoSuchObject`] when `dn` does not exist (rc 32),
    /// [`LdapError::Operation`] for other error results,
    /// [`LdapError::Timeout`], [`LdapError::Closed`].
    pub async fn change_value(
        &mut self,
        dn: &str,
        attribute: &str,
        value: &str,
        add: bool,
    ) -> Result<(), LdapError> {
        let op = Op {
            url: &self.url,
            operation: "modify",
            dn,
        };
        let values = HashSet::from([value]);
        let change = if add {
            Mod::Add(attribute, values)
        } else {
            Mod::Delete(attribute, values)
        };
        let result = self
            .ldap
            .with_timeout(OPERATION_TIMEOUT)
            .modify(dn, vec![change])
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        match result.rc {
            0 | RC_NO_SUCH_ATTRIBUTE | RC_VALUE_EXISTS => Ok(()),
            RC_NO_SUCH_OBJECT => Err(op.missing()),
            rc => Err(op.result(rc, &result.text)),
        }
    }

    /// Deletes an entry.
    ///
    /// # Errors
    ///
    /// [`LdapError::NoSuchObject`] for rc 32, [`LdapError::Operation`] for
    /// other error results, [`LdapError::Timeout`], [`LdapError::Closed`].
    pub async fn delete(&mut self, dn: &str) -> Result<(), LdapError> {
        let op = Op {
            url: &self.url,
            operation: "delete",
            dn,
        };
        let result = self
            .ldap
            .with_timeout(OPERATION_TIMEOUT)
            .delete(dn)
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        match result.rc {
            0 => Ok(()),
            RC_NO_SUCH_OBJECT => Err(op.missing()),
            rc => Err(op.result(rc, &result.text)),
        }
    }

    /// Renames `dn` to `new_dn` (modrdn, with a new superior when the parent
    /// differs); the old RDN value is removed. The entry keeps its identity.
    ///
    /// # Errors
    ///
    /// [`LdapError::AlreadyExists`] when `new_dn` is taken (rc 68),
    /// [`LdapError::NoSuchObject`] when `dn` is gone (rc 32),
    /// [`LdapError::Operation`] for other error results, [`LdapError::Protocol`]
    /// for a `new_dn` without an RDN.
    pub async fn rename(&mut self, dn: &str, new_dn: &str) -> Result<(), LdapError> {
        let op = Op {
            url: &self.url,
            operation: "rename",
            dn,
        };
        let (rdn, parent) = split_rdn(new_dn).ok_or_else(|| LdapError::Protocol {
            url: self.url.clone(),
            reason: format!("{new_dn:?} is not a DN with an RDN"),
        })?;
        let same_parent = split_rdn(dn).is_some_and(|(_, p)| {
            idsync_core::model::normalize_dn(p) == idsync_core::model::normalize_dn(parent)
        });
        let superior = (!same_parent).then_some(parent);
        let result = self
            .ldap
            .with_timeout(OPERATION_TIMEOUT)
            .modifydn(dn, rdn, true, superior)
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        match result.rc {
            0 => Ok(()),
            RC_NO_SUCH_OBJECT => Err(op.missing()),
            RC_ALREADY_EXISTS => Err(op.exists(new_dn)),
            rc => Err(op.result(rc, &result.text)),
        }
    }

    /// Unbinds and closes the connection.
    ///
    /// # Errors
    ///
    /// [`LdapError::Closed`] when the connection is already gone.
    pub async fn close(mut self) -> Result<(), LdapError> {
        let url = self.url;
        self.ldap.unbind().await.map_err(|e| {
            Op {
                url: &url,
                operation: "unbind",
                dn: "",
            }
            .failed(e, OPERATION_TIMEOUT)
        })
    }

    async fn search(
        &self,
        op: Op<'_>,
        base: &str,
        scope: Scope,
        filter: &str,
    ) -> Result<(Vec<ResultEntry>, LdapResult), LdapError> {
        // A clone shares the connection; it keeps `&self` borrowable for `op`.
        let mut ldap = self.ldap.clone();
        let result = ldap
            .with_timeout(OPERATION_TIMEOUT)
            .search(base, scope, filter, vec!["*", self.id_attribute.as_str()])
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        Ok((result.0, result.1))
    }

    fn dir_entry(&self, item: ResultEntry) -> Result<DirEntry, LdapError> {
        let (dn, raw) = decode::entry(item.0).ok_or_else(|| LdapError::Protocol {
            url: self.url.clone(),
            reason: "malformed SearchResultEntry".to_owned(),
        })?;
        let mut entry_uuid = String::new();
        let mut attributes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, values) in raw {
            let name = name.to_ascii_lowercase();
            let values: Vec<String> = values
                .into_iter()
                .filter_map(|v| String::from_utf8(v).ok())
                .collect();
            if name.eq_ignore_ascii_case(&self.id_attribute) {
                entry_uuid = values
                    .into_iter()
                    .next()
                    .map(|v| decode::canonical_uuid(&v))
                    .unwrap_or_default();
            } else if !values.is_empty() {
                attributes.entry(name).or_default().extend(values);
            }
        }
        Ok(DirEntry {
            dn,
            entry_uuid,
            attributes,
        })
    }
}
