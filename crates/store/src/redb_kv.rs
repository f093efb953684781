//! The embedded backend: the key-value layer over redb, in the typed tables
//! earlier builds wrote (`&str` keys, `u64` outbox sequences, `&[u8]`, `&str`,
//! `()` and `u64` values), so a store written before the layer existed
//! opens unchanged.

use std::ops::Bound;

use redb::{ReadableTable, TableDefinition};

use crate::kv::{Kv, KvWrite, Tbl, Visit, decode_u64};
use crate::{StoreError, db};

const FOCUS: TableDefinition<&str, &[u8]> = TableDefinition::new("focus");
const FOCUS_NAME: TableDefinition<&str, &str> = TableDefinition::new("focus_name");
const SHADOW: TableDefinition<&str, &[u8]> = TableDefinition::new("shadow");
const SHADOW_BY_MEMBER_KEY: TableDefinition<&str, &str> = TableDefinition::new("shadow_member_key");
const PENDING: TableDefinition<&str, ()> = TableDefinition::new("pending_member");
const MEMBER_OF: TableDefinition<&str, ()> = TableDefinition::new("member_of");
const ROLE_REF: TableDefinition<&str, ()> = TableDefinition::new("role_ref");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const AGREEMENT: TableDefinition<&str, &[u8]> = TableDefinition::new("agreement");
const SYNC_CHILD: TableDefinition<&str, ()> = TableDefinition::new("sync_child");
const SECRET: TableDefinition<&str, &[u8]> = TableDefinition::new("secret");
const SHADOW_LIVE: TableDefinition<&str, u64> = TableDefinition::new("shadow_live");
const GUARD: TableDefinition<&str, &[u8]> = TableDefinition::new("deletion_guard");
const FOCUS_ATTR: TableDefinition<&str, ()> = TableDefinition::new("focus_attr");

/// One open table of each of redb's value types.
enum Open<B, S, U, C, Q> {
    Bytes(B),
    Text(S),
    Unit(U),
    Count(C),
    Seq(Q),
}

type WriteTable<'t> = Open<
    redb::Table<'t, &'static str, &'static [u8]>,
    redb::Table<'t, &'static str, &'static str>,
    redb::Table<'t, &'static str, ()>,
    redb::Table<'t, &'static str, u64>,
    redb::Table<'t, u64, &'static [u8]>,
>;

type ReadTable = Open<
    redb::ReadOnlyTable<&'static str, &'static [u8]>,
    redb::ReadOnlyTable<&'static str, &'static str>,
    redb::ReadOnlyTable<&'static str, ()>,
    redb::ReadOnlyTable<&'static str, u64>,
    redb::ReadOnlyTable<u64, &'static [u8]>,
>;

/// Opens table `t` with `$open` (a transaction's `open_table`), as the
/// variant of its value type.
macro_rules! open {
    ($txn:expr, $t:expr) => {
        match $t {
            Tbl::Focus => Open::Bytes($txn.open_table(FOCUS).map_err(db)?),
            Tbl::FocusName => Open::Text($txn.open_table(FOCUS_NAME).map_err(db)?),
            Tbl::Shadow => Open::Bytes($txn.open_table(SHADOW).map_err(db)?),
            Tbl::ShadowByMemberKey => {
                Open::Text($txn.open_table(SHADOW_BY_MEMBER_KEY).map_err(db)?)
            }
            Tbl::Pending => Open::Unit($txn.open_table(PENDING).map_err(db)?),
            Tbl::MemberOf => Open::Unit($txn.open_table(MEMBER_OF).map_err(db)?),
            Tbl::RoleRef => Open::Unit($txn.open_table(ROLE_REF).map_err(db)?),
            Tbl::Outbox => Open::Seq($txn.open_table(OUTBOX).map_err(db)?),
            Tbl::Meta => Open::Count($txn.open_table(META).map_err(db)?),
            Tbl::Agreement => Open::Bytes($txn.open_table(AGREEMENT).map_err(db)?),
            Tbl::SyncChild => Open::Unit($txn.open_table(SYNC_CHILD).map_err(db)?),
            Tbl::Secret => Open::Bytes($txn.open_table(SECRET).map_err(db)?),
            Tbl::ShadowLive => Open::Count($txn.open_table(SHADOW_LIVE).map_err(db)?),
            Tbl::Guard => Open::Bytes($txn.open_table(GUARD).map_err(db)?),
            Tbl::FocusAttr => Open::Unit($txn.open_table(FOCUS_ATTR).map_err(db)?),
        }
    };
}

/// The value of one of redb's value types, as the layer's bytes.
trait Encode: redb::Value {
    fn encode(v: Self::SelfType<'_>) -> Vec<u8>;
}

impl Encode for &'static [u8] {
    fn encode(v: &[u8]) -> Vec<u8> {
        v.to_vec()
    }
}

impl Encode for &'static str {
    fn encode(v: &str) -> Vec<u8> {
        v.as_bytes().to_vec()
    }
}

impl Encode for () {
    fn encode(_: ()) -> Vec<u8> {
        Vec::new()
    }
}

impl Encode for u64 {
    fn encode(v: u64) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }
}

fn text(k: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(k).map_err(|e| StoreError::Corrupt(format!("a key is not UTF-8: {e}")))
}

fn get_text<V: Encode + 'static>(
    table: &impl ReadableTable<&'static str, V>,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table
        .get(text(key)?)
        .map_err(db)?
        .map(|g| V::encode(g.value())))
}

fn scan_text<V: Encode + 'static>(
    table: &impl ReadableTable<&'static str, V>,
    lo: &[u8],
    hi: Option<&[u8]>,
    visit: Visit<'_>,
) -> Result<(), StoreError> {
    let hi = match hi {
        Some(h) => Bound::Excluded(text(h)?),
        None => Bound::Unbounded,
    };
    let range: (Bound<&str>, Bound<&str>) = (Bound::Included(text(lo)?), hi);
    for row in table.range::<&str>(range).map_err(db)? {
        let (k, v) = row.map_err(db)?;
        if !visit(k.value().as_bytes(), &V::encode(v.value()))? {
            break;
        }
    }
    Ok(())
}

fn seq(k: &[u8]) -> Result<u64, StoreError> {
    decode_u64(k)
}

fn get_seq(
    table: &impl ReadableTable<u64, &'static [u8]>,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(table
        .get(seq(key)?)
        .map_err(db)?
        .map(|g| g.value().to_vec()))
}

fn scan_seq(
    table: &impl ReadableTable<u64, &'static [u8]>,
    lo: &[u8],
    hi: Option<&[u8]>,
    visit: Visit<'_>,
) -> Result<(), StoreError> {
    let hi = match hi {
        Some(h) => Bound::Excluded(seq(h)?),
        None => Bound::Unbounded,
    };
    let range: (Bound<u64>, Bound<u64>) = (Bound::Included(seq(lo)?), hi);
    for row in table.range::<u64>(range).map_err(db)? {
        let (k, v) = row.map_err(db)?;
        if !visit(&k.value().to_be_bytes(), v.value())? {
            break;
        }
    }
    Ok(())
}

macro_rules! read_ops {
    ($open:expr, $t:expr, get $key:expr) => {
        match $open {
            Open::Bytes(x) => get_text(x, $key),
            Open::Text(x) => get_text(x, $key),
            Open::Unit(x) => get_text(x, $key),
            Open::Count(x) => get_text(x, $key),
            Open::Seq(x) => get_seq(x, $key),
        }
    };
    ($open:expr, $t:expr, scan $lo:expr, $hi:expr, $visit:expr) => {
        match $open {
            Open::Bytes(x) => scan_text(x, $lo, $hi, $visit),
            Open::Text(x) => scan_text(x, $lo, $hi, $visit),
            Open::Unit(x) => scan_text(x, $lo, $hi, $visit),
            Open::Count(x) => scan_text(x, $lo, $hi, $visit),
            Open::Seq(x) => scan_seq(x, $lo, $hi, $visit),
        }
    };
}

/// A read transaction; each table is opened when first read (a read
/// usually touches one or two of them).
pub(crate) struct RedbRead<'t> {
    txn: &'t redb::ReadTransaction,
    tables: [std::cell::OnceCell<ReadTable>; Tbl::ALL.len()],
}

impl<'t> RedbRead<'t> {
    pub(crate) fn open(txn: &'t redb::ReadTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            txn,
            tables: Default::default(),
        })
    }

    fn table(&self, t: Tbl) -> Result<&ReadTable, StoreError> {
        let i = Tbl::ALL.iter().position(|x| *x == t).unwrap_or(usize::MAX);
        let cell = self
            .tables
            .get(i)
            .ok_or_else(|| StoreError::Db(format!("table {t:?} is not known")))?;
        if cell.get().is_none() {
            let opened: ReadTable = open!(self.txn, t);
            let _ = cell.set(opened);
        }
        cell.get()
            .ok_or_else(|| StoreError::Db(format!("table {t:?} is not open")))
    }
}

impl Kv for RedbRead<'_> {
    fn get(&self, t: Tbl, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        read_ops!(self.table(t)?, t, get key)
    }

    fn scan(
        &self,
        t: Tbl,
        lo: &[u8],
        hi: Option<&[u8]>,
        visit: Visit<'_>,
    ) -> Result<(), StoreError> {
        read_ops!(self.table(t)?, t, scan lo, hi, visit)
    }
}

/// A write transaction's tables, every one open (as commits always did).
pub(crate) struct RedbWrite<'t> {
    tables: Vec<WriteTable<'t>>,
}

impl<'t> RedbWrite<'t> {
    /// Opens (and on a new store creates) every table.
    pub(crate) fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        let mut tables = Vec::with_capacity(Tbl::ALL.len());
        for t in Tbl::ALL {
            tables.push(open!(txn, t));
        }
        Ok(Self { tables })
    }

    fn index(t: Tbl) -> usize {
        Tbl::ALL.iter().position(|x| *x == t).unwrap_or(usize::MAX)
    }

    fn table(&self, t: Tbl) -> Result<&WriteTable<'t>, StoreError> {
        self.tables
            .get(Self::index(t))
            .ok_or_else(|| StoreError::Db(format!("table {t:?} is not open")))
    }

    fn table_mut(&mut self, t: Tbl) -> Result<&mut WriteTable<'t>, StoreError> {
        self.tables
            .get_mut(Self::index(t))
            .ok_or_else(|| StoreError::Db(format!("table {t:?} is not open")))
    }
}

impl Kv for RedbWrite<'_> {
    fn get(&self, t: Tbl, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        read_ops!(self.table(t)?, t, get key)
    }

    fn scan(
        &self,
        t: Tbl,
        lo: &[u8],
        hi: Option<&[u8]>,
        visit: Visit<'_>,
    ) -> Result<(), StoreError> {
        read_ops!(self.table(t)?, t, scan lo, hi, visit)
    }
}

impl KvWrite for RedbWrite<'_> {
    fn insert(&mut self, t: Tbl, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match self.table_mut(t)? {
            Open::Bytes(x) => x.insert(text(key)?, value).map(drop),
            Open::Text(x) => x.insert(text(key)?, text(value)?).map(drop),
            Open::Unit(x) => x.insert(text(key)?, ()).map(drop),
            Open::Count(x) => x.insert(text(key)?, decode_u64(value)?).map(drop),
            Open::Seq(x) => x.insert(seq(key)?, value).map(drop),
        }
        .map_err(db)
    }

    fn remove(&mut self, t: Tbl, key: &[u8]) -> Result<(), StoreError> {
        match self.table_mut(t)? {
            Open::Bytes(x) => x.remove(text(key)?).map(drop),
            Open::Text(x) => x.remove(text(key)?).map(drop),
            Open::Unit(x) => x.remove(text(key)?).map(drop),
            Open::Count(x) => x.remove(text(key)?).map(drop),
            Open::Seq(x) => x.remove(seq(key)?).map(drop),
        }
        .map_err(db)
    }

    fn remove_range(&mut self, t: Tbl, lo: &[u8], hi: Option<&[u8]>) -> Result<(), StoreError> {
        let text_range =
            |lo: &[u8], hi: Option<&[u8]>| -> Result<(Bound<String>, Bound<String>), StoreError> {
                Ok((
                    Bound::Included(text(lo)?.to_owned()),
                    match hi {
                        Some(h) => Bound::Excluded(text(h)?.to_owned()),
                        None => Bound::Unbounded,
                    },
                ))
            };
        macro_rules! drop_text {
            ($x:expr) => {{
                let (lo, hi) = text_range(lo, hi)?;
                let range: (Bound<&str>, Bound<&str>) = (
                    lo.as_ref().map(String::as_str),
                    hi.as_ref().map(String::as_str),
                );
                $x.retain_in::<&str, _>(range, |_, _| false)
            }};
        }
        match self.table_mut(t)? {
            Open::Bytes(x) => drop_text!(x),
            Open::Text(x) => drop_text!(x),
            Open::Unit(x) => drop_text!(x),
            Open::Count(x) => drop_text!(x),
            Open::Seq(x) => {
                let range: (Bound<u64>, Bound<u64>) = (
                    Bound::Included(seq(lo)?),
                    match hi {
                        Some(h) => Bound::Excluded(seq(h)?),
                        None => Bound::Unbounded,
                    },
                );
                x.retain_in::<u64, _>(range, |_, _| false)
            }
        }
        .map_err(db)
    }
}
