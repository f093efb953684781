//! The transactional key-value layer under the store's rules: named tables
//! of ordered byte keys to byte values, read in a snapshot or written in a
//! transaction serialised against every other writer.
//!
//! Every rule of the store (versions, authority, indexes, outbox, agreements,
//! tokens, the deletion guard) is written once against this layer; redb
//! (`redb_kv`) and PostgreSQL (`pg`) implement it. Keys compare bytewise in
//! both (redb's `&str` and big-endian `u64`, PostgreSQL's `bytea`), so range
//! scans return rows in the same order whichever backend holds them.

use prost::Message;

use crate::{StoreError, decode};

/// The store's tables. The discriminant is the `tbl` column in PostgreSQL:
/// never renumber one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tbl {
    /// Focus id → encoded `Focus`.
    Focus = 1,
    /// `<kind>\0<name>` → focus id; names are unique per kind.
    FocusName = 2,
    /// `<resource>\0<entry uuid>` → encoded `Shadow`.
    Shadow = 3,
    /// `<resource>\0<member key>` → entry uuid, for live shadows (`dn:…`, `uid:…`).
    ShadowByMemberKey = 4,
    /// `<resource>\0<normalized member dn>\0<group id>` → (): groups waiting for a member.
    Pending = 5,
    /// `<member focus id>\0<group id>` → (): the groups a focus is a member of.
    MemberOf = 6,
    /// `<role>\0f\0<focus id>` → () for a focus assigned the role, and
    /// `<role>\0r\0<role name>` → () for a role that includes it.
    RoleRef = 7,
    /// Outbox sequence (8 bytes, big-endian) → encoded `FocusChange`.
    Outbox = 8,
    /// Name → u64 (the outbox position, the store's instance, the revocation count).
    Meta = 9,
    /// Agreement name → encoded `Agreement` (token hashes, yielded attributes, status).
    Agreement = 10,
    /// `<agreement>\0<focus id>` → (): the entries each agreement owns.
    SyncChild = 11,
    /// Secrets the store makes for itself (the key that signs tokens).
    Secret = 12,
    /// Resource → number of its live shadows (the deletion guard's population).
    ShadowLive = 13,
    /// Resource → encoded `DeletionGuardState`.
    Guard = 14,
    /// `<attribute>\0<kind>\0<value>\0<focus id>` → (): focus objects by
    /// the value of an indexed attribute (those correlation searches).
    FocusAttr = 15,
}

impl Tbl {
    /// Every table, for backends that create them up front.
    pub(crate) const ALL: [Tbl; 15] = [
        Tbl::Focus,
        Tbl::FocusName,
        Tbl::Shadow,
        Tbl::ShadowByMemberKey,
        Tbl::Pending,
        Tbl::MemberOf,
        Tbl::RoleRef,
        Tbl::Outbox,
        Tbl::Meta,
        Tbl::Agreement,
        Tbl::SyncChild,
        Tbl::Secret,
        Tbl::ShadowLive,
        Tbl::Guard,
        Tbl::FocusAttr,
    ];
}

/// What a scan's visitor says after each row.
pub(crate) type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError>;

/// Reads, in one consistent snapshot.
pub(crate) trait Kv {
    /// The value under `key`, if any.
    fn get(&self, t: Tbl, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// The values under each of `keys`, in order. A backend across a
    /// network answers them in a few round trips, not one each.
    fn get_many(&self, t: Tbl, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|k| self.get(t, k)).collect()
    }
    /// Visits the rows with `lo <= key < hi` (to the end when `hi` is `None`)
    /// in key order, until `visit` returns `false`.
    fn scan(
        &self,
        t: Tbl,
        lo: &[u8],
        hi: Option<&[u8]>,
        visit: Visit<'_>,
    ) -> Result<(), StoreError>;
}

/// Writes, in one transaction that no other writer interleaves with.
pub(crate) trait KvWrite: Kv {
    fn insert(&mut self, t: Tbl, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn remove(&mut self, t: Tbl, key: &[u8]) -> Result<(), StoreError>;
    /// Removes the rows with `lo <= key < hi` (to the end when `hi` is `None`).
    fn remove_range(&mut self, t: Tbl, lo: &[u8], hi: Option<&[u8]>) -> Result<(), StoreError>;
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when there is none (a prefix of only 0xff bytes).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Typed access over either backend.
pub(crate) trait KvExt: Kv {
    /// The record under `key`, decoded.
    fn load<M: Message + Default>(&self, t: Tbl, key: &str) -> Result<Option<M>, StoreError> {
        self.get(t, key.as_bytes())?.map(|v| decode(&v)).transpose()
    }

    /// The text under `key` (focus ids, entry uuids).
    fn get_str(&self, t: Tbl, key: &str) -> Result<Option<String>, StoreError> {
        self.get(t, key.as_bytes())?
            .map(|v| String::from_utf8(v).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    /// The number under `key` (counters, positions).
    fn get_u64(&self, t: Tbl, key: &str) -> Result<Option<u64>, StoreError> {
        self.get(t, key.as_bytes())?
            .map(|v| decode_u64(&v))
            .transpose()
    }

    /// The rest of every key that starts with `prefix`, in order.
    fn suffixes(&self, t: Tbl, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let end = prefix_end(prefix.as_bytes());
        self.scan(t, prefix.as_bytes(), end.as_deref(), &mut |k, _| {
            let rest = k.get(prefix.len()..).unwrap_or_default();
            out.push(String::from_utf8_lossy(rest).into_owned());
            Ok(true)
        })?;
        Ok(out)
    }

    /// Visits every record of `t` whose key starts with `prefix`, decoded,
    /// until `visit` returns `false`.
    fn each<M: Message + Default>(
        &self,
        t: Tbl,
        prefix: &str,
        visit: &mut dyn FnMut(&str, M) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        self.scan(t, prefix.as_bytes(), end.as_deref(), &mut |k, v| {
            let key = std::str::from_utf8(k).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            visit(key, decode(v)?)
        })
    }
}

impl<K: Kv + ?Sized> KvExt for K {}

/// Typed writes over either backend.
pub(crate) trait KvWriteExt: KvWrite {
    fn put_msg<M: Message>(&mut self, t: Tbl, key: &str, m: &M) -> Result<(), StoreError> {
        self.insert(t, key.as_bytes(), &m.encode_to_vec())
    }

    fn put_str(&mut self, t: Tbl, key: &str, value: &str) -> Result<(), StoreError> {
        self.insert(t, key.as_bytes(), value.as_bytes())
    }

    fn put_u64(&mut self, t: Tbl, key: &str, value: u64) -> Result<(), StoreError> {
        self.insert(t, key.as_bytes(), &value.to_be_bytes())
    }

    /// Adds `key` to an index table (no value).
    fn mark(&mut self, t: Tbl, key: &str) -> Result<(), StoreError> {
        self.insert(t, key.as_bytes(), &[])
    }

    fn del(&mut self, t: Tbl, key: &str) -> Result<(), StoreError> {
        self.remove(t, key.as_bytes())
    }
}

impl<K: KvWrite + ?Sized> KvWriteExt for K {}

/// A counter as the layer holds it: 8 bytes, big-endian.
pub(crate) fn decode_u64(v: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("a counter of {} bytes", v.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(prefix_end(b"ab\0"), Some(b"ab\x01".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
