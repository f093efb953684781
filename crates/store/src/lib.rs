//! The IDM's store: focus objects, shadows and the transactional outbox,
//! with compare-and-swap commits, over an embedded redb file or a
//! PostgreSQL database that several IDM replicas share.
//!
//! Every commit is one write transaction: its preconditions are checked,
//! its writes applied and one outbox record per focus change appended, all or
//! nothing. The outbox is drained to JetStream by the IDM service, so no
//! committed change is lost between commit and publish. The rules live once,
//! over the key-value layer of [`kv`]; the backends only store bytes.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase};

use idsync_proto::v1;

mod agreements;
mod commit;
mod kv;
mod pg;
mod redb_kv;
pub mod token;

pub use agreements::status_word;
pub use commit::{GuardLimits, Principal, Writer};
pub use pg::{PgTarget, SCHEMA_VERSION};

use kv::{Kv, KvExt, KvWrite, KvWriteExt, Tbl};

const TOKEN_KEY: &str = "token_signing_key";
const NEXT_OUTBOX: &str = "next_outbox_seq";
/// Set once when the store is created; distinguishes this store's outbox
/// sequence numbers from those of an earlier store on the same stream.
const INSTANCE: &str = "instance";
/// Bumped in the transaction of every change that can revoke a token, so a
/// replica that cached a verified token sees another replica's revocation.
const REVOCATIONS: &str = "revocations";

/// The IDM attribute that names a focus.
const NAME: &str = "name";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store: {0}")]
    Db(String),
    /// The database cannot be reached now (connection refused or lost, the
    /// server shutting down): the call may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store: a stored record does not decode: {0}")]
    Corrupt(String),
    /// A precondition of the commit did not hold: someone wrote first.
    #[error("version conflict on {object}: expected version {expected}, found {found}")]
    Conflict {
        object: String,
        expected: u64,
        found: u64,
    },
    #[error("{kind} name {name:?} is already taken by {holder} ({holder_owner})")]
    NameTaken {
        kind: String,
        name: String,
        holder: String,
        /// "a native IDM entry", or "owned by agreement …".
        holder_owner: String,
    },
    /// The writer does not own what it writes.
    #[error("{object} is {owner}; {writer} may not write it{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    NotOwned {
        object: String,
        owner: String,
        writer: String,
        detail: String,
    },
    /// An agreement wrote an attribute it yields to the IDM.
    #[error(
        "agreement {agreement:?} sent attribute {attribute:?} of {object}, but it yields {attribute:?} to the IDM: remove the inbound mapping to {attribute:?} from its resources, or stop yielding it with `idsync sync set-yield-attributes {agreement} <the others>`"
    )]
    Yielded {
        agreement: String,
        attribute: String,
        object: String,
    },
    /// A focus the IDM cannot hold, whoever writes it.
    #[error("schema violation: {object}: attribute {attribute:?}: {reason}")]
    Schema {
        object: String,
        attribute: String,
        reason: String,
    },
    #[error("agreement {name:?} does not exist")]
    NoAgreement { name: String },
    #[error("agreement {name:?} already exists")]
    AgreementExists { name: String },
    #[error(
        "agreement {name:?} is halted ({reason}); fix the cause, then run `idsync sync retry {name}`"
    )]
    Halted { name: String, reason: String },
    #[error("{0}")]
    BadRequest(String),
    /// A deletion would cross the resource's deletion guard.
    #[error(
        "deletion guard of resource {resource}: this would be deletion {count} within {window_s} s, of {population} entries ({percent:.0}%), beyond {limit}; accept with `idsync sync accept-deletions <agreement> {resource}` or discard with `idsync sync discard-deletions <agreement> {resource}`"
    )]
    MassDeletion {
        resource: String,
        count: u64,
        population: u64,
        percent: f64,
        window_s: i64,
        limit: String,
    },
    /// An operator discarded this deletion.
    #[error("the deletion of {resource}/{entry_uuid} was discarded by an operator")]
    DeletionDiscarded {
        resource: String,
        entry_uuid: String,
    },
    #[error("invalid operation {index}: {reason}")]
    Invalid { index: usize, reason: String },
}

impl StoreError {
    /// Whether the database failed (rather than the request being refused):
    /// such an error aborts a dry run whole.
    fn is_database(&self) -> bool {
        matches!(
            self,
            StoreError::Db(_)
                | StoreError::Unavailable(_)
                | StoreError::Corrupt(_)
                | StoreError::Open { .. }
        )
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into().to_string())
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn shadow_key(resource: &str, entry_uuid: &str) -> String {
    format!("{resource}\0{entry_uuid}")
}

/// Moves the group's pending members whose accounts have a live, linked
/// shadow to its members.
fn resolve_pending(group: &mut v1::Focus, kv: &dyn Kv) -> Result<(), StoreError> {
    let pending = std::mem::take(&mut group.pending_members);
    let owners = member_owners(kv, &pending)?;
    let mut still = Vec::new();
    for (m, owner) in pending.into_iter().zip(owners) {
        let owner = owner
            .filter(|(s, _)| !s.focus_id.is_empty())
            .map(|(s, _)| s.focus_id);
        match owner {
            Some(id) if !group.members.contains(&id) => group.members.push(id),
            Some(_) => {}
            None => still.push(m),
        }
    }
    group.pending_members = still;
    Ok(())
}

/// For each member reference, the live shadow its member key names (with
/// the shadow's key), if any: two batched reads, whatever the group's size.
fn member_owners(
    kv: &dyn Kv,
    members: &[v1::MemberRef],
) -> Result<Vec<Option<(v1::Shadow, String)>>, StoreError> {
    let keys: Vec<Vec<u8>> = members.iter().map(|m| ref_key(m).into_bytes()).collect();
    let uuids = kv.get_many(Tbl::ShadowByMemberKey, &keys)?;
    let shadow_keys: Vec<Option<String>> = members
        .iter()
        .zip(uuids)
        .map(|(m, uuid)| {
            uuid.map(|u| {
                String::from_utf8(u)
                    .map(|u| shadow_key(&m.resource, &u))
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .transpose()
        })
        .collect::<Result<_, _>>()?;
    let wanted: Vec<Vec<u8>> = shadow_keys
        .iter()
        .flatten()
        .map(|k| k.clone().into_bytes())
        .collect();
    let mut found = kv.get_many(Tbl::Shadow, &wanted)?.into_iter();
    let mut out = Vec::with_capacity(members.len());
    for key in shadow_keys {
        let Some(key) = key else {
            out.push(None);
            continue;
        };
        let shadow = found
            .next()
            .flatten()
            .map(|v| decode::<v1::Shadow>(&v))
            .transpose()?
            .filter(|s| !s.dead);
        out.push(shadow.map(|s| (s, key)));
    }
    Ok(out)
}

/// Index key of a member reference: `<resource>\0dn:<dn>` or `<resource>\0uid:<uid>`.
fn ref_key(m: &v1::MemberRef) -> String {
    format!(
        "{}\0{}",
        m.resource,
        idsync_core::model::member_key(&m.dn, &m.uid)
    )
}

/// Every index key under which groups may name `shadow`'s account.
fn shadow_member_keys(shadow: &v1::Shadow) -> Vec<String> {
    let mut keys = Vec::new();
    if !shadow.dn.is_empty() {
        keys.push(format!(
            "{}\0{}",
            shadow.resource,
            idsync_core::model::member_key(&shadow.dn, "")
        ));
    }
    keys.extend(
        shadow
            .member_keys
            .iter()
            .map(|k| format!("{}\0{k}", shadow.resource)),
    );
    keys
}

fn pending_key(m: &v1::MemberRef, group_id: &str) -> String {
    format!("{}\0{group_id}", ref_key(m))
}

fn name_key(kind: &str, name: &str) -> String {
    format!("{kind}\0{name}")
}

fn focus_name(f: &v1::Focus) -> Option<&str> {
    f.attributes
        .get(NAME)
        .and_then(|v| v.values.first())
        .map(String::as_str)
}

/// Where the store's bytes live.
#[derive(Debug)]
enum Backend {
    /// One redb file, held by one process.
    Embedded(Database),
    /// A PostgreSQL database, shared by every replica.
    Postgres(Box<pg::PgStore>),
}

/// Cheap to clone; all clones share one database.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<Backend>,
    instance: u64,
    /// Signs sync tokens; made when the store is created, never leaves it.
    token_key: Arc<[u8]>,
    /// Hashes of tokens verified against their agreement's record → the
    /// agreement: a hit needs no read of the record. Every change that can
    /// revoke a token (destroy, finalise, terminate) clears it, and bumps the
    /// stored revocation count that a shared database's other replicas
    /// compare before they trust a hit.
    verified: Arc<std::sync::Mutex<agreements::Verified>>,
}

/// The embedded store's page cache unless configured (`idm.cache_mib`).
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

impl Store {
    /// Opens (or creates) the embedded store in `dir`.
    ///
    /// # Errors
    /// The directory cannot be created, or the database cannot be opened
    /// (for example because another process holds it).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// As [`Store::open`], keeping at most `cache_bytes` of pages in memory.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let database = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(dir.join("idm.redb"))
            .map_err(|e| open_err(e.to_string()))?;
        Self::initialise(Backend::Embedded(database), &|reason| open_err(reason))
    }

    /// Connects to the PostgreSQL database at `url` (a libpq URL or
    /// key-value string), applies the schema migrations it lacks, and makes
    /// the store's instance and token-signing key if no replica has yet.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming the server (never the password) when it
    /// cannot be reached or refuses the credentials, when the URL does not
    /// parse, or when the database's schema is newer than this build knows.
    pub fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let pg = pg::PgStore::connect(url)?;
        let target = pg.target().to_string();
        Self::initialise(Backend::Postgres(Box::new(pg)), &|reason| {
            StoreError::Open {
                path: target.clone(),
                reason,
            }
        })
    }

    /// Makes what a new store needs (every table, the live-shadow counts of
    /// a store from before them, the token key, the instance), once.
    fn initialise(
        backend: Backend,
        open_err: &dyn Fn(String) -> StoreError,
    ) -> Result<Self, StoreError> {
        let mut store = Self {
            backend: Arc::new(backend),
            instance: 0,
            token_key: Arc::from(Vec::new()),
            verified: Arc::default(),
        };
        let (instance, token_key) = store.transact(true, |kv| {
            let mut any_live = false;
            kv.scan(Tbl::ShadowLive, b"", None, &mut |_, _| {
                any_live = true;
                Ok(false)
            })?;
            if !any_live {
                // Stores from before the counter: count once.
                let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
                kv.each::<v1::Shadow>(Tbl::Shadow, "", &mut |_, s| {
                    if !s.dead {
                        *counts.entry(s.resource).or_default() += 1;
                    }
                    Ok(true)
                })?;
                for (r, n) in counts {
                    kv.put_u64(Tbl::ShadowLive, &r, n)?;
                }
            }
            let token_key = match kv.get(Tbl::Secret, TOKEN_KEY.as_bytes())? {
                Some(k) => k,
                None => {
                    let k = token::random_key().map_err(open_err)?;
                    kv.insert(Tbl::Secret, TOKEN_KEY.as_bytes(), &k)?;
                    k.to_vec()
                }
            };
            let instance = match kv.get_u64(Tbl::Meta, INSTANCE)? {
                Some(i) => i,
                None => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(1, |d| d.as_nanos() as u64);
                    kv.put_u64(Tbl::Meta, INSTANCE, now)?;
                    now
                }
            };
            Ok((instance, token_key))
        })?;
        store.instance = instance;
        store.token_key = token_key.into();
        Ok(store)
    }

    /// Runs `f` on one consistent snapshot.
    fn read<T>(&self, f: impl FnOnce(&dyn Kv) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &*self.backend {
            Backend::Embedded(database) => {
                let txn = database.begin_read().map_err(db)?;
                let kv = redb_kv::RedbRead::open(&txn)?;
                f(&kv)
            }
            Backend::Postgres(pg) => pg.read(f),
        }
    }

    /// Runs `f` in one write transaction, serialised against every other
    /// writer (of every replica), and commits it when `keep` and `f`
    /// succeeded; otherwise rolls it back.
    fn transact<T>(
        &self,
        keep: bool,
        f: impl FnOnce(&mut dyn KvWrite) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &*self.backend {
            Backend::Embedded(database) => {
                let txn = database.begin_write().map_err(db)?;
                let out = {
                    let mut kv = redb_kv::RedbWrite::open(&txn)?;
                    f(&mut kv)
                };
                match out {
                    Ok(v) if keep => {
                        txn.commit().map_err(db)?;
                        Ok(v)
                    }
                    Ok(v) => {
                        txn.abort().map_err(db)?;
                        Ok(v)
                    }
                    Err(e) => {
                        let _ = txn.abort();
                        Err(e)
                    }
                }
            }
            Backend::Postgres(pg) => pg.transact(keep, f),
        }
    }

    /// Whether several processes may share this store's database (then
    /// every call may block on the network: call it off the async runtime).
    pub fn shares_database(&self) -> bool {
        matches!(&*self.backend, Backend::Postgres(_))
    }

    /// Identifies this store for ever (its creation time in nanoseconds);
    /// every replica over one database reads the same.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn get_focus(&self, id: &str) -> Result<Option<v1::Focus>, StoreError> {
        self.read(|kv| kv.load(Tbl::Focus, id))
    }

    /// Focus objects of `kind` whose `attribute` holds `value`. `name` is
    /// answered from its unique index; other attributes by a scan.
    pub fn find_focus(
        &self,
        kind: &str,
        attribute: &str,
        value: &str,
    ) -> Result<Vec<v1::Focus>, StoreError> {
        self.read(|kv| {
            if attribute == NAME {
                let Some(id) = kv.get_str(Tbl::FocusName, &name_key(kind, value))? else {
                    return Ok(Vec::new());
                };
                return Ok(kv.load(Tbl::Focus, &id)?.into_iter().collect());
            }
            let holds = |f: &v1::Focus| {
                f.kind == kind
                    && f.attributes
                        .get(attribute)
                        .is_some_and(|vals| vals.values.iter().any(|x| x == value))
            };
            let marker = format!("{}{attribute}", commit::ATTR_INDEX);
            if kv.get_u64(Tbl::Meta, &marker)?.is_some() {
                let prefix = commit::attr_key(attribute, kind, value, "");
                let ids: Vec<Vec<u8>> = kv
                    .suffixes(Tbl::FocusAttr, &prefix)?
                    .into_iter()
                    .map(String::into_bytes)
                    .collect();
                // In one read of many keys (one round trip on PostgreSQL).
                let mut out = Vec::new();
                for v in kv.get_many(Tbl::Focus, &ids)?.into_iter().flatten() {
                    out.extend(Some(decode::<v1::Focus>(&v)?).filter(holds));
                }
                return Ok(out);
            }
            let mut out = Vec::new();
            kv.each::<v1::Focus>(Tbl::Focus, "", &mut |_, f| {
                if holds(&f) {
                    out.push(f);
                }
                Ok(true)
            })?;
            Ok(out)
        })
    }

    /// Makes [`Store::find_focus`] answer searches by each of `attributes`
    /// from an index (`name` has its own): builds the index of each that has
    /// none, in one transaction over every focus, and drops the indexes of
    /// attributes no longer listed. Every write keeps every built index.
    /// Returns the attributes whose index was built now.
    ///
    /// # Errors
    /// The database fails; then no index changed.
    pub fn index_attributes(
        &self,
        attributes: &BTreeSet<String>,
    ) -> Result<Vec<String>, StoreError> {
        let wanted: BTreeSet<&str> = attributes
            .iter()
            .map(String::as_str)
            .filter(|a| *a != NAME && !a.is_empty())
            .collect();
        self.transact(true, |kv| {
            let built = kv.suffixes(Tbl::Meta, commit::ATTR_INDEX)?;
            for gone in built.iter().filter(|a| !wanted.contains(a.as_str())) {
                let prefix = format!("{gone}\0");
                let end = kv::prefix_end(prefix.as_bytes());
                kv.remove_range(Tbl::FocusAttr, prefix.as_bytes(), end.as_deref())?;
                kv.del(Tbl::Meta, &format!("{}{gone}", commit::ATTR_INDEX))?;
            }
            let new: Vec<String> = wanted
                .iter()
                .filter(|a| !built.iter().any(|b| b == *a))
                .map(|a| (*a).to_owned())
                .collect();
            if new.is_empty() {
                return Ok(new);
            }
            // Page by page: the keys of a page are collected, then written.
            let mut after: Vec<u8> = Vec::new();
            loop {
                let mut keys = Vec::new();
                let mut last = None;
                let mut seen = 0;
                kv.scan(Tbl::Focus, &after, None, &mut |k, v| {
                    if k == after.as_slice() {
                        return Ok(true);
                    }
                    let f: v1::Focus = decode(v)?;
                    keys.extend(commit::attr_keys(&f, &new));
                    last = Some(k.to_vec());
                    seen += 1;
                    Ok(seen < 1000)
                })?;
                for k in &keys {
                    kv.mark(Tbl::FocusAttr, k)?;
                }
                match last {
                    Some(k) => after = k,
                    None => break,
                }
            }
            for a in &new {
                kv.put_u64(Tbl::Meta, &format!("{}{a}", commit::ATTR_INDEX), 1)?;
            }
            Ok(new)
        })
    }

    /// Up to `limit` focus objects of `kind` (all kinds when empty) with ids after `after_id`.
    pub fn list_focus(
        &self,
        kind: &str,
        after_id: &str,
        limit: usize,
    ) -> Result<Vec<v1::Focus>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(|kv| {
            let mut out = Vec::new();
            kv.scan(Tbl::Focus, after_id.as_bytes(), None, &mut |k, v| {
                if k == after_id.as_bytes() {
                    return Ok(true);
                }
                let f: v1::Focus = decode(v)?;
                if kind.is_empty() || f.kind == kind {
                    out.push(f);
                }
                Ok(out.len() < limit)
            })?;
            Ok(out)
        })
    }

    pub fn get_shadow(
        &self,
        resource: &str,
        entry_uuid: &str,
    ) -> Result<Option<v1::Shadow>, StoreError> {
        self.read(|kv| kv.load(Tbl::Shadow, &shadow_key(resource, entry_uuid)))
    }

    /// The shadows of `entry_uuids` on `resource` that exist, in one read.
    pub fn get_shadows(
        &self,
        resource: &str,
        entry_uuids: &[String],
    ) -> Result<Vec<v1::Shadow>, StoreError> {
        self.read(|kv| {
            let keys: Vec<Vec<u8>> = entry_uuids
                .iter()
                .map(|u| shadow_key(resource, u).into_bytes())
                .collect();
            kv.get_many(Tbl::Shadow, &keys)?
                .into_iter()
                .flatten()
                .map(|v| decode(&v))
                .collect()
        })
    }

    /// How many live shadows `resource` has.
    pub fn live_shadows(&self, resource: &str) -> Result<u64, StoreError> {
        self.read(|kv| Ok(kv.get_u64(Tbl::ShadowLive, resource)?.unwrap_or(0)))
    }

    /// Up to `limit` shadows of `resource` with entry UUIDs after `after`.
    pub fn list_shadows(
        &self,
        resource: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<v1::Shadow>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(|kv| {
            let start = shadow_key(resource, after);
            let end = kv::prefix_end(format!("{resource}\0").as_bytes());
            let mut out = Vec::new();
            kv.scan(
                Tbl::Shadow,
                start.as_bytes(),
                end.as_deref(),
                &mut |k, v| {
                    if k == start.as_bytes() {
                        return Ok(true);
                    }
                    out.push(decode(v)?);
                    Ok(out.len() < limit)
                },
            )?;
            Ok(out)
        })
    }

    /// Who refers to role `role`: the ids of focus objects assigned it, and
    /// the names of roles that include it.
    pub fn role_referrers(&self, role: &str) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let refs = self.read(|kv| kv.suffixes(Tbl::RoleRef, &format!("{role}\0")))?;
        let (mut holders, mut roles) = (Vec::new(), Vec::new());
        for rest in refs {
            if let Some(id) = rest.strip_prefix("f\0") {
                holders.push(id.to_owned());
            } else if let Some(name) = rest.strip_prefix("r\0") {
                roles.push(name.to_owned());
            }
        }
        Ok((holders, roles))
    }

    /// For each member reference, the focus its live shadow is linked to, or "".
    pub fn resolve_members(&self, members: &[v1::MemberRef]) -> Result<Vec<String>, StoreError> {
        self.read(|kv| {
            Ok(member_owners(kv, members)?
                .into_iter()
                .map(|o| o.map(|(s, _)| s.focus_id).unwrap_or_default())
                .collect())
        })
    }

    #[cfg(test)]
    /// Groups that list `member` among their pending members (for tests of the index).
    pub fn find_pending_groups(
        &self,
        member: &v1::MemberRef,
    ) -> Result<Vec<v1::Focus>, StoreError> {
        self.read(|kv| {
            let mut out = Vec::new();
            for id in kv.suffixes(Tbl::Pending, &format!("{}\0", ref_key(member)))? {
                out.extend(kv.load::<v1::Focus>(Tbl::Focus, &id)?);
            }
            Ok(out)
        })
    }

    /// Up to `limit` open correlation cases: live, unlinked, disputed shadows.
    pub fn list_cases(&self, limit: usize) -> Result<Vec<v1::Shadow>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(|kv| {
            let mut out = Vec::new();
            kv.each::<v1::Shadow>(Tbl::Shadow, "", &mut |_, s| {
                if s.situation == "disputed" && !s.dead && s.focus_id.is_empty() {
                    out.push(s);
                }
                Ok(out.len() < limit)
            })?;
            Ok(out)
        })
    }

    /// The oldest `limit` outbox records, in commit order.
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(|kv| {
            let mut out = Vec::new();
            kv.scan(Tbl::Outbox, &0u64.to_be_bytes(), None, &mut |k, v| {
                out.push((kv::decode_u64(k)?, v.to_vec()));
                Ok(out.len() < limit)
            })?;
            Ok(out)
        })
    }

    /// Removes outbox records up to and including `seq`, once published.
    /// Removing what another replica removed already does nothing.
    pub fn outbox_remove_through(&self, seq: u64) -> Result<(), StoreError> {
        let end = seq.checked_add(1).map(u64::to_be_bytes);
        self.transact(true, |kv| {
            kv.remove_range(
                Tbl::Outbox,
                &0u64.to_be_bytes(),
                end.as_ref().map(|e| e.as_slice()),
            )
        })
    }
}

/// Fixtures for running the store's tests on each backend.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod testing {
    use super::Store;

    /// Where one test's store lives.
    #[derive(Debug)]
    pub(crate) enum Place {
        Embedded(tempfile::TempDir),
        /// A fresh database of the test binary's shared cluster.
        Postgres(String),
    }

    impl Place {
        /// Opens the store here (again, after an earlier store was dropped).
        pub(crate) fn open(&self) -> Store {
            eprintln!("store backend: {}", self.name());
            match self {
                Place::Embedded(dir) => Store::open(dir.path()).unwrap(),
                Place::Postgres(url) => Store::open_postgres(url).unwrap(),
            }
        }

        pub(crate) fn name(&self) -> &'static str {
            match self {
                Place::Embedded(_) => "embedded",
                Place::Postgres(_) => "postgres",
            }
        }
    }

    /// A fresh PostgreSQL database of the shared throwaway cluster.
    pub(crate) fn pg_database() -> String {
        idsync_testkit::Postgres::shared()
            .and_then(|pg| pg.create_database())
            .expect("a throwaway PostgreSQL (run scripts/install-deps)")
    }

    /// A fresh place of each backend: run a test's body on each.
    pub(crate) fn places() -> Vec<Place> {
        vec![
            Place::Embedded(tempfile::tempdir().unwrap()),
            Place::Postgres(pg_database()),
        ]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use v1::operation::Op;

    fn user(id: &str, name: &str) -> v1::Focus {
        v1::Focus {
            id: id.into(),
            kind: "user".into(),
            attributes: [(
                "name".to_owned(),
                v1::Values {
                    values: vec![name.into()],
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    fn put_focus(f: v1::Focus, expected: u64) -> v1::Operation {
        v1::Operation {
            op: Some(Op::PutFocus(v1::PutFocus {
                focus: Some(f),
                expected_version: expected,
            })),
        }
    }

    fn put_shadow(uuid: &str, expected: u64) -> v1::Operation {
        v1::Operation {
            op: Some(Op::PutShadow(v1::PutShadow {
                shadow: Some(v1::Shadow {
                    resource: "hr".into(),
                    entry_uuid: uuid.into(),
                    ..Default::default()
                }),
                expected_version: expected,
            })),
        }
    }

    #[test]
    fn shadows_are_read_many_at_a_time_leaving_out_the_missing() {
        for place in crate::testing::places() {
            let s = place.open();
            s.commit(&[put_shadow("u1", 0)], "", &Writer::admin())
                .unwrap();
            s.commit(&[put_shadow("u2", 0)], "", &Writer::admin())
                .unwrap();
            let got = s
                .get_shadows("hr", &["u2".into(), "nope".into(), "u1".into()])
                .unwrap();
            let uuids: Vec<_> = got.iter().map(|s| s.entry_uuid.as_str()).collect();
            assert_eq!(uuids, ["u2", "u1"]);
        }
    }

    #[test]
    fn a_batch_commits_each_as_alone_and_leaves_out_only_the_refused() {
        for place in crate::testing::places() {
            let s = place.open();
            let admin = Writer::admin();
            s.commit(&[put_focus(user("f0", "taken"), 0)], "", &admin)
                .unwrap();
            // 1: fine; 2: sees 1 (version 1 of f1); 3: a name already
            // taken, after writing its shadow first; 4: a lost race; 5: fine.
            let c1 = [put_focus(user("f1", "ann"), 0)];
            let c2 = [put_focus(user("f1", "anna"), 1)];
            let c3 = [put_shadow("u3", 0), put_focus(user("f3", "taken"), 0)];
            let c4 = [put_focus(user("f0", "zed"), 7)];
            let c5 = [put_shadow("u5", 0), put_focus(user("f5", "eve"), 0)];
            let batch: Vec<(&[v1::Operation], &str, &Writer)> = vec![
                (&c1, "", &admin),
                (&c2, "", &admin),
                (&c3, "", &admin),
                (&c4, "", &admin),
                (&c5, "", &admin),
            ];
            let results = s.commit_batch(&batch).unwrap();
            assert_eq!(results.len(), 5);
            assert_eq!(results[0].as_ref().unwrap(), &[1]);
            assert_eq!(results[1].as_ref().unwrap(), &[2]);
            assert!(
                matches!(results[2], Err(StoreError::NameTaken { .. })),
                "{:?}",
                results[2]
            );
            assert!(
                matches!(results[3], Err(StoreError::Conflict { .. })),
                "{:?}",
                results[3]
            );
            assert_eq!(results[4].as_ref().unwrap(), &[1, 1]);
            // Nothing of the refused ones, everything of the rest.
            assert!(s.get_shadow("hr", "u3").unwrap().is_none());
            assert!(s.get_focus("f3").unwrap().is_none());
            assert_eq!(s.get_focus("f0").unwrap().unwrap().version, 1);
            assert_eq!(s.get_focus("f1").unwrap().unwrap().version, 2);
            assert!(s.get_shadow("hr", "u5").unwrap().is_some());
            // One outbox record per focus change, in commit order.
            let outbox = s.outbox_batch(10).unwrap();
            let seqs: Vec<u64> = outbox.iter().map(|(q, _)| *q).collect();
            assert_eq!(seqs, [1, 2, 3, 4]);
        }
    }

    #[test]
    fn a_commit_that_only_adds_links_says_so_in_its_focus_change() {
        let link = |resource: &str, uuid: &str| v1::Link {
            resource: resource.into(),
            entry_uuid: uuid.into(),
            dn: format!("uid=ann,o={resource}"),
        };
        for place in crate::testing::places() {
            let s = place.open();
            let admin = Writer::admin();
            let mut f = user("f1", "ann");
            let mut version = 0;
            let mut step = |s: &Store, f: &v1::Focus| {
                version = s
                    .commit(&[put_focus(f.clone(), version)], "", &admin)
                    .unwrap()[0];
                let (_, record) = s.outbox_batch(100).unwrap().pop().unwrap();
                v1::FocusChange::decode(record.as_slice())
                    .unwrap()
                    .links_added_only
            };
            assert!(!step(&s, &f), "a creation");
            f.links.push(link("ldap2", "u1"));
            assert!(step(&s, &f), "a link added");
            f.links.push(link("ad", "u2"));
            f.attributes.insert(
                "mail".into(),
                v1::Values {
                    values: vec!["a@x".into()],
                },
            );
            assert!(!step(&s, &f), "a link added with an attribute");
            f.links[0].dn = "uid=anna,o=ldap2".into();
            assert!(!step(&s, &f), "a link moved");
            f.links.remove(1);
            assert!(!step(&s, &f), "a link removed");
            assert!(!step(&s, &f), "nothing changed");
        }
    }

    #[test]
    fn an_attribute_index_answers_as_the_scan_and_follows_every_write() {
        for place in crate::testing::places() {
            let s = place.open();
            let admin = Writer::admin();
            let with_mail = |id: &str, name: &str, mails: &[&str]| {
                let mut f = user(id, name);
                f.attributes.insert(
                    "mail".into(),
                    v1::Values {
                        values: mails.iter().map(|m| (*m).to_owned()).collect(),
                    },
                );
                f
            };
            // Before the index: one user, found by the scan.
            s.commit(
                &[put_focus(with_mail("f1", "ann", &["a@x", "ann@x"]), 0)],
                "",
                &admin,
            )
            .unwrap();
            let ids = |found: Vec<v1::Focus>| found.into_iter().map(|f| f.id).collect::<Vec<_>>();
            let mail: BTreeSet<String> = ["mail".to_owned(), "name".to_owned()].into();
            assert_eq!(s.index_attributes(&mail).unwrap(), ["mail"]);
            // Built over what was there; a second call builds nothing.
            assert!(s.index_attributes(&mail).unwrap().is_empty());
            assert_eq!(ids(s.find_focus("user", "mail", "ann@x").unwrap()), ["f1"]);
            // New users, a changed value, another kind with the same value.
            s.commit(
                &[put_focus(with_mail("f2", "bob", &["b@x"]), 0)],
                "",
                &admin,
            )
            .unwrap();
            s.commit(
                &[put_focus(with_mail("f1", "ann", &["a@x"]), 1)],
                "",
                &admin,
            )
            .unwrap();
            let mut group = with_mail("g1", "crew", &["b@x"]);
            group.kind = "group".into();
            s.commit(&[put_focus(group, 0)], "", &admin).unwrap();
            assert!(s.find_focus("user", "mail", "ann@x").unwrap().is_empty());
            assert_eq!(ids(s.find_focus("user", "mail", "a@x").unwrap()), ["f1"]);
            assert_eq!(ids(s.find_focus("user", "mail", "b@x").unwrap()), ["f2"]);
            assert_eq!(ids(s.find_focus("group", "mail", "b@x").unwrap()), ["g1"]);
            // Deleted: gone from the index too.
            s.commit(
                &[v1::Operation {
                    op: Some(Op::DeleteFocus(v1::DeleteFocus {
                        id: "f2".into(),
                        expected_version: 1,
                    })),
                }],
                "",
                &admin,
            )
            .unwrap();
            assert!(s.find_focus("user", "mail", "b@x").unwrap().is_empty());
            // A store opened again keeps the index up without being told.
            drop(s);
            let s = place.open();
            s.commit(
                &[put_focus(with_mail("f3", "cid", &["c@x"]), 0)],
                "",
                &admin,
            )
            .unwrap();
            assert_eq!(ids(s.find_focus("user", "mail", "c@x").unwrap()), ["f3"]);
            // Dropped: searches scan again, with the same answers.
            assert!(s.index_attributes(&BTreeSet::new()).unwrap().is_empty());
            assert_eq!(ids(s.find_focus("user", "mail", "c@x").unwrap()), ["f3"]);
            assert_eq!(ids(s.find_focus("user", "mail", "a@x").unwrap()), ["f1"]);
            s.read(|kv| {
                let mut rows = 0;
                kv.scan(Tbl::FocusAttr, b"", None, &mut |_, _| {
                    rows += 1;
                    Ok(true)
                })?;
                assert_eq!(rows, 0, "the dropped index left rows");
                Ok(())
            })
            .unwrap();
        }
    }

    #[test]
    fn state_survives_reopen() {
        for place in crate::testing::places() {
            {
                let s = place.open();
                s.commit(
                    &[put_focus(user("f1", "jack"), 0), put_shadow("u1", 0)],
                    "hr",
                    &Writer::admin(),
                )
                .unwrap();
            }
            let s = place.open();
            assert_eq!(s.get_focus("f1").unwrap().unwrap().version, 1);
            assert_eq!(s.get_shadow("hr", "u1").unwrap().unwrap().version, 1);
            assert_eq!(s.find_focus("user", "name", "jack").unwrap().len(), 1);
            assert_eq!(s.outbox_batch(10).unwrap().len(), 1);
        }
    }

    #[test]
    fn a_stale_version_fails_the_whole_commit() {
        for place in crate::testing::places() {
            let s = place.open();
            s.commit(&[put_focus(user("f1", "jack"), 0)], "", &Writer::admin())
                .unwrap();
            // Second writer read version 0 too: its commit must change nothing.
            let err = s
                .commit(
                    &[put_shadow("u1", 0), put_focus(user("f1", "jack"), 0)],
                    "",
                    &Writer::admin(),
                )
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Conflict {
                        expected: 0,
                        found: 1,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(s.get_shadow("hr", "u1").unwrap().is_none());
            assert_eq!(s.outbox_batch(10).unwrap().len(), 1);
        }
    }

    #[test]
    fn two_creations_of_one_shadow_cannot_both_win() {
        for place in crate::testing::places() {
            let s = place.open();
            s.commit(
                &[put_shadow("u1", 0), put_focus(user("f1", "jack"), 0)],
                "",
                &Writer::admin(),
            )
            .unwrap();
            let err = s
                .commit(
                    &[put_shadow("u1", 0), put_focus(user("f2", "jack2"), 0)],
                    "",
                    &Writer::admin(),
                )
                .unwrap_err();
            assert!(matches!(err, StoreError::Conflict { .. }));
            assert!(s.get_focus("f2").unwrap().is_none());
        }
    }

    #[test]
    fn a_lost_race_is_a_conflict_even_when_the_name_is_taken_too() {
        for place in crate::testing::places() {
            let s = place.open();
            s.commit(
                &[put_focus(user("f1", "jack"), 0), put_shadow("u1", 0)],
                "",
                &Writer::admin(),
            )
            .unwrap();
            let err = s
                .commit(
                    &[put_focus(user("f2", "jack"), 0), put_shadow("u1", 0)],
                    "",
                    &Writer::admin(),
                )
                .unwrap_err();
            assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        }
    }

    #[test]
    fn names_are_unique_per_kind() {
        for place in crate::testing::places() {
            let s = place.open();
            s.commit(&[put_focus(user("f1", "jack"), 0)], "", &Writer::admin())
                .unwrap();
            let err = s
                .commit(&[put_focus(user("f2", "jack"), 0)], "", &Writer::admin())
                .unwrap_err();
            assert!(
                matches!(err, StoreError::NameTaken { ref holder, .. } if holder == "f1"),
                "{err}"
            );
            // Renaming frees the old name.
            s.commit(&[put_focus(user("f1", "jacky"), 1)], "", &Writer::admin())
                .unwrap();
            s.commit(&[put_focus(user("f2", "jack"), 0)], "", &Writer::admin())
                .unwrap();
            assert_eq!(s.find_focus("user", "name", "jacky").unwrap()[0].id, "f1");
        }
    }

    #[test]
    fn delete_writes_a_tombstone_to_the_outbox() {
        for place in crate::testing::places() {
            let s = place.open();
            s.commit(&[put_focus(user("f1", "jack"), 0)], "", &Writer::admin())
                .unwrap();
            let del = v1::Operation {
                op: Some(Op::DeleteFocus(v1::DeleteFocus {
                    id: "f1".into(),
                    expected_version: 1,
                })),
            };
            s.commit(&[del], "hr", &Writer::admin()).unwrap();
            assert!(s.get_focus("f1").unwrap().is_none());
            assert!(s.find_focus("user", "name", "jack").unwrap().is_empty());
            let batch = s.outbox_batch(10).unwrap();
            let last = v1::FocusChange::decode(batch[1].1.as_slice()).unwrap();
            assert!(last.deleted);
            assert_eq!(last.origin_resource, "hr");
            s.outbox_remove_through(batch[1].0).unwrap();
            assert!(s.outbox_batch(10).unwrap().is_empty());
        }
    }

    #[test]
    fn members_resolve_by_dn_and_pending_groups_are_found() {
        for place in crate::testing::places() {
            let s = place.open();
            let mut sh = v1::Shadow {
                resource: "hr".into(),
                entry_uuid: "u1".into(),
                dn: "uid=Jack,ou=people".into(),
                focus_id: "f1".into(),
                ..Default::default()
            };
            let put = |sh: &v1::Shadow, expected| v1::Operation {
                op: Some(Op::PutShadow(v1::PutShadow {
                    shadow: Some(sh.clone()),
                    expected_version: expected,
                })),
            };
            s.commit(&[put(&sh, 0)], "", &Writer::admin()).unwrap();
            let by_dn = |dn: &str| v1::MemberRef {
                resource: "hr".into(),
                dn: dn.into(),
                uid: String::new(),
            };
            let dns = [by_dn("UID=jack, ou=People"), by_dn("uid=will,ou=people")];
            assert_eq!(s.resolve_members(&dns).unwrap(), ["f1", ""]);
            // A dead shadow resolves to nobody; a rename moves the index.
            sh.dn = "uid=jacky,ou=people".into();
            s.commit(&[put(&sh, 1)], "", &Writer::admin()).unwrap();
            assert_eq!(s.resolve_members(&dns).unwrap(), ["", ""]);
            sh.dead = true;
            s.commit(&[put(&sh, 2)], "", &Writer::admin()).unwrap();
            assert_eq!(
                s.resolve_members(&[by_dn("uid=jacky,ou=people")]).unwrap(),
                [""]
            );

            let mut group = user("g1", "crew");
            group.kind = "group".into();
            group.pending_members = vec![by_dn("uid=will,ou=people")];
            s.commit(&[put_focus(group.clone(), 0)], "", &Writer::admin())
                .unwrap();
            let found = s.find_pending_groups(&by_dn("UID=Will,ou=people")).unwrap();
            assert_eq!(found.len(), 1);
            assert!(
                s.find_pending_groups(&by_dn("uid=wil,ou=people"))
                    .unwrap()
                    .is_empty()
            );
            // The account arrives: the group gets its owner in the same commit.
            let will = v1::Shadow {
                resource: "hr".into(),
                entry_uuid: "u2".into(),
                dn: "uid=Will,ou=people".into(),
                focus_id: "f2".into(),
                ..Default::default()
            };
            s.commit(&[put(&will, 0)], "hr", &Writer::admin()).unwrap();
            let g = s.get_focus("g1").unwrap().unwrap();
            assert_eq!(g.members, ["f2"]);
            assert!(g.pending_members.is_empty());
            assert_eq!(g.version, 2);
            assert!(
                s.find_pending_groups(&by_dn("uid=will,ou=people"))
                    .unwrap()
                    .is_empty()
            );
            // A group written with a member whose account is known resolves it at once.
            let mut crew = user("g2", "crew2");
            crew.kind = "group".into();
            crew.pending_members = vec![by_dn("uid=will,ou=people")];
            s.commit(&[put_focus(crew, 0)], "", &Writer::admin())
                .unwrap();
            let g2 = s.get_focus("g2").unwrap().unwrap();
            assert_eq!(g2.members, ["f2"]);
            assert!(g2.pending_members.is_empty());

            // posixGroup: a member named by uid resolves through the account's member key.
            let by_uid = v1::MemberRef {
                resource: "hr".into(),
                dn: String::new(),
                uid: "Bob".into(),
            };
            let mut posix = user("g3", "sailors");
            posix.kind = "group".into();
            posix.pending_members = vec![by_uid.clone()];
            s.commit(&[put_focus(posix, 0)], "", &Writer::admin())
                .unwrap();
            assert_eq!(s.find_pending_groups(&by_uid).unwrap().len(), 1);
            let bob = v1::Shadow {
                resource: "hr".into(),
                entry_uuid: "u3".into(),
                dn: "uid=bob,ou=people".into(),
                focus_id: "f3".into(),
                member_keys: vec!["uid:bob".into()],
                ..Default::default()
            };
            s.commit(&[put(&bob, 0)], "hr", &Writer::admin()).unwrap();
            assert_eq!(s.get_focus("g3").unwrap().unwrap().members, ["f3"]);
            assert_eq!(s.resolve_members(&[by_uid]).unwrap(), ["f3"]);

            // A deleted member leaves every group it was in, in the same commit.
            s.commit(&[put_focus(user("f2", "will"), 0)], "", &Writer::admin())
                .unwrap();
            let del = v1::Operation {
                op: Some(Op::DeleteFocus(v1::DeleteFocus {
                    id: "f2".into(),
                    expected_version: 1,
                })),
            };
            s.commit(&[del], "hr", &Writer::admin()).unwrap();
            assert!(s.get_focus("g1").unwrap().unwrap().members.is_empty());
            assert!(s.get_focus("g2").unwrap().unwrap().members.is_empty());
            assert_eq!(s.get_focus("g3").unwrap().unwrap().members, ["f3"]);
        }
    }

    #[test]
    fn a_large_group_and_what_one_commit_wrote_before_are_seen_within_it() {
        for place in crate::testing::places() {
            let s = place.open();
            let member = |i: usize| v1::MemberRef {
                resource: "hr".into(),
                dn: format!("uid=m{i},ou=people"),
                uid: String::new(),
            };
            // An account and, in the same commit, a group naming it: the
            // group resolves it from what this commit wrote.
            let m0 = v1::Shadow {
                resource: "hr".into(),
                entry_uuid: "u0".into(),
                dn: "uid=m0,ou=people".into(),
                focus_id: "f0".into(),
                ..Default::default()
            };
            let mut group = user("g1", "many");
            group.kind = "group".into();
            group.pending_members = (0..2_500).map(member).collect();
            s.commit(
                &[
                    v1::Operation {
                        op: Some(Op::PutShadow(v1::PutShadow {
                            shadow: Some(m0),
                            expected_version: 0,
                        })),
                    },
                    put_focus(group, 0),
                ],
                "hr",
                &Writer::admin(),
            )
            .unwrap();
            let g = s.get_focus("g1").unwrap().unwrap();
            assert_eq!(g.members, ["f0"]);
            assert_eq!(g.pending_members.len(), 2_499);
            assert_eq!(s.find_pending_groups(&member(2_499)).unwrap().len(), 1);
            assert!(s.find_pending_groups(&member(0)).unwrap().is_empty());
            let mut members: Vec<_> = (0..3).map(member).collect();
            members.push(member(0));
            assert_eq!(s.resolve_members(&members).unwrap(), ["f0", "", "", "f0"]);
            // Deleting the group removes every index key it wrote.
            let del = v1::Operation {
                op: Some(Op::DeleteFocus(v1::DeleteFocus {
                    id: "g1".into(),
                    expected_version: 1,
                })),
            };
            s.commit(&[del], "", &Writer::admin()).unwrap();
            assert!(s.find_pending_groups(&member(1_234)).unwrap().is_empty());
        }
    }

    #[test]
    fn list_pages_in_id_order() {
        for place in crate::testing::places() {
            let s = place.open();
            for i in 0..5 {
                s.commit(
                    &[put_focus(user(&format!("f{i}"), &format!("n{i}")), 0)],
                    "",
                    &Writer::admin(),
                )
                .unwrap();
            }
            let first = s.list_focus("user", "", 2).unwrap();
            assert_eq!(
                first.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
                ["f0", "f1"]
            );
            let next = s.list_focus("user", "f1", 10).unwrap();
            assert_eq!(next.len(), 3);
        }
    }

    #[test]
    fn a_store_written_before_the_key_value_layer_opens_unchanged() {
        use redb::TableDefinition;
        let dir = tempfile::tempdir().unwrap();
        {
            // The tables and types earlier builds wrote.
            let db = Database::create(dir.path().join("idm.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut focus = txn
                    .open_table(TableDefinition::<&str, &[u8]>::new("focus"))
                    .unwrap();
                let mut f = user("f1", "jack");
                f.version = 3;
                focus.insert("f1", f.encode_to_vec().as_slice()).unwrap();
                let mut names = txn
                    .open_table(TableDefinition::<&str, &str>::new("focus_name"))
                    .unwrap();
                names.insert("user\0jack", "f1").unwrap();
                let mut outbox = txn
                    .open_table(TableDefinition::<u64, &[u8]>::new("outbox"))
                    .unwrap();
                outbox.insert(7, b"old".as_slice()).unwrap();
                let mut meta = txn
                    .open_table(TableDefinition::<&str, u64>::new("meta"))
                    .unwrap();
                meta.insert("next_outbox_seq", 8).unwrap();
                meta.insert("instance", 42).unwrap();
                let mut refs = txn
                    .open_table(TableDefinition::<&str, ()>::new("role_ref"))
                    .unwrap();
                refs.insert("admins\0f\0f1", ()).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.instance(), 42);
        assert_eq!(s.get_focus("f1").unwrap().unwrap().version, 3);
        assert_eq!(s.find_focus("user", "name", "jack").unwrap()[0].id, "f1");
        assert_eq!(s.role_referrers("admins").unwrap().0, ["f1"]);
        assert_eq!(s.outbox_batch(10).unwrap(), [(7, b"old".to_vec())]);
        s.commit(&[put_focus(user("f1", "jacky"), 3)], "", &Writer::admin())
            .unwrap();
        let seqs: Vec<u64> = s.outbox_batch(10).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(seqs, [7, 8], "the outbox goes on where it was");
        assert!(s.find_focus("user", "name", "jack").unwrap().is_empty());
    }

    #[test]
    fn a_second_open_of_the_same_store_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
