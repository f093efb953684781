//! The IDM's embedded on-disk store (redb): focus objects, shadows and the
//! transactional outbox, with compare-and-swap commits.
//!
//! Every commit is one redb write transaction: its preconditions are checked,
//! its writes applied and one outbox record per focus change appended, all or
//! nothing. The outbox is drained to JetStream by the IDM service, so no
//! committed change is lost between commit and publish.

use std::path::Path;
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use idsync_proto::v1;

mod agreements;
mod commit;
pub mod token;

pub use agreements::status_word;
pub use commit::{GuardLimits, Principal, Writer};

const FOCUS: TableDefinition<&str, &[u8]> = TableDefinition::new("focus");
/// `<kind>\0<name>` → focus id; names are unique per kind.
const FOCUS_NAME: TableDefinition<&str, &str> = TableDefinition::new("focus_name");
/// `<resource>\0<entry uuid>` → shadow.
const SHADOW: TableDefinition<&str, &[u8]> = TableDefinition::new("shadow");
/// `<resource>\0<member key>` → entry uuid, for live shadows (`dn:…`, `uid:…`).
const SHADOW_BY_MEMBER_KEY: TableDefinition<&str, &str> = TableDefinition::new("shadow_member_key");
/// `<resource>\0<normalized member dn>\0<group id>` → (): groups waiting for a member.
const PENDING: TableDefinition<&str, ()> = TableDefinition::new("pending_member");
/// `<member focus id>\0<group id>` → (): the groups a focus is a member of.
const MEMBER_OF: TableDefinition<&str, ()> = TableDefinition::new("member_of");
/// `<role>\0f\0<focus id>` → () for a focus assigned the role, and
/// `<role>\0r\0<role name>` → () for a role that includes it.
const ROLE_REF: TableDefinition<&str, ()> = TableDefinition::new("role_ref");
/// outbox sequence → encoded `FocusChange`.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Agreement name → encoded `Agreement` (token hashes, yielded attributes, status).
const AGREEMENT: TableDefinition<&str, &[u8]> = TableDefinition::new("agreement");
/// `<agreement>\0<focus id>` → (): the entries each agreement owns.
const SYNC_CHILD: TableDefinition<&str, ()> = TableDefinition::new("sync_child");
/// Secrets the store makes for itself (the key that signs tokens).
const SECRET: TableDefinition<&str, &[u8]> = TableDefinition::new("secret");
const TOKEN_KEY: &str = "token_signing_key";
/// Resource → number of its live shadows (the deletion guard's population).
const SHADOW_LIVE: TableDefinition<&str, u64> = TableDefinition::new("shadow_live");
/// Resource → encoded `DeletionGuardState`.
const GUARD: TableDefinition<&str, &[u8]> = TableDefinition::new("deletion_guard");
const NEXT_OUTBOX: &str = "next_outbox_seq";
/// Set once when the store is created; distinguishes this store's outbox
/// sequence numbers from those of an earlier store on the same stream.
const INSTANCE: &str = "instance";

/// The IDM attribute that names a focus.
const NAME: &str = "name";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store: {0}")]
    Db(String),
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

/// The record stored under `key` in `table`, decoded.
fn load<M: Message + Default>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<M>, StoreError> {
    table
        .get(key)
        .map_err(db)?
        .map(|v| decode(v.value()))
        .transpose()
}

fn shadow_key(resource: &str, entry_uuid: &str) -> String {
    format!("{resource}\0{entry_uuid}")
}

/// Moves the group's pending members whose accounts have a live, linked
/// shadow to its members.
fn resolve_pending(
    group: &mut v1::Focus,
    by_member_key: &redb::Table<&str, &str>,
    shadows: &redb::Table<&str, &[u8]>,
) -> Result<(), StoreError> {
    let mut still = Vec::new();
    for m in std::mem::take(&mut group.pending_members) {
        let owner = match by_member_key.get(ref_key(&m).as_str()).map_err(db)? {
            Some(uuid) => load::<v1::Shadow>(shadows, &shadow_key(&m.resource, uuid.value()))?
                .filter(|s| !s.dead && !s.focus_id.is_empty())
                .map(|s| s.focus_id),
            None => None,
        };
        match owner {
            Some(id) if !group.members.contains(&id) => group.members.push(id),
            Some(_) => {}
            None => still.push(m),
        }
    }
    group.pending_members = still;
    Ok(())
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

/// Cheap to clone; all clones share one database.
#[derive(Clone, Debug)]
pub struct Store {
    db: Arc<Database>,
    instance: u64,
    /// Signs sync tokens; made when the store is created, never leaves it.
    token_key: Arc<[u8]>,
    /// Hashes of tokens verified against their agreement's record → the
    /// agreement: a hit needs no read. Every change that can revoke a token
    /// (destroy, finalise, terminate) goes through this store and clears it.
    verified: Arc<std::sync::Mutex<agreements::Verified>>,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    /// The directory cannot be created, or the database cannot be opened
    /// (for example because another process holds it).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let database =
            Database::create(dir.join("idm.redb")).map_err(|e| open_err(e.to_string()))?;
        let txn = database
            .begin_write()
            .map_err(|e| open_err(e.to_string()))?;
        let instance;
        let token_key;
        {
            txn.open_table(FOCUS).map_err(db)?;
            txn.open_table(FOCUS_NAME).map_err(db)?;
            txn.open_table(SHADOW).map_err(db)?;
            txn.open_table(SHADOW_BY_MEMBER_KEY).map_err(db)?;
            txn.open_table(PENDING).map_err(db)?;
            txn.open_table(MEMBER_OF).map_err(db)?;
            txn.open_table(ROLE_REF).map_err(db)?;
            txn.open_table(OUTBOX).map_err(db)?;
            txn.open_table(AGREEMENT).map_err(db)?;
            txn.open_table(SYNC_CHILD).map_err(db)?;
            txn.open_table(GUARD).map_err(db)?;
            let mut live = txn.open_table(SHADOW_LIVE).map_err(db)?;
            if live.is_empty().map_err(db)? {
                // Stores from before the counter: count once.
                let shadows = txn.open_table(SHADOW).map_err(db)?;
                let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
                for row in shadows.iter().map_err(db)? {
                    let (_, v) = row.map_err(db)?;
                    let s: v1::Shadow = decode(v.value())?;
                    if !s.dead {
                        *counts.entry(s.resource).or_default() += 1;
                    }
                }
                for (r, n) in counts {
                    live.insert(r.as_str(), n).map_err(db)?;
                }
            }
            let mut secrets = txn.open_table(SECRET).map_err(db)?;
            let stored = secrets
                .get(TOKEN_KEY)
                .map_err(db)?
                .map(|v| v.value().to_vec());
            token_key = match stored {
                Some(k) => k,
                None => {
                    let k = token::random_key().map_err(open_err)?;
                    secrets.insert(TOKEN_KEY, k.as_slice()).map_err(db)?;
                    k.to_vec()
                }
            };
            let mut meta = txn.open_table(META).map_err(db)?;
            let stored = meta.get(INSTANCE).map_err(db)?.map(|v| v.value());
            instance = match stored {
                Some(i) => i,
                None => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(1, |d| d.as_nanos() as u64);
                    meta.insert(INSTANCE, now).map_err(db)?;
                    now
                }
            };
        }
        txn.commit().map_err(db)?;
        Ok(Self {
            db: Arc::new(database),
            instance,
            token_key: token_key.into(),
            verified: Arc::default(),
        })
    }

    /// Identifies this store for ever (its creation time in nanoseconds).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    pub fn get_focus(&self, id: &str) -> Result<Option<v1::Focus>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(FOCUS).map_err(db)?;
        load(&table, id)
    }

    /// Focus objects of `kind` whose `attribute` holds `value`. `name` is
    /// answered from its unique index; other attributes by a scan.
    pub fn find_focus(
        &self,
        kind: &str,
        attribute: &str,
        value: &str,
    ) -> Result<Vec<v1::Focus>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let focus = txn.open_table(FOCUS).map_err(db)?;
        if attribute == NAME {
            let names = txn.open_table(FOCUS_NAME).map_err(db)?;
            let Some(id) = names.get(name_key(kind, value).as_str()).map_err(db)? else {
                return Ok(Vec::new());
            };
            let id = id.value().to_owned();
            return Ok(load(&focus, &id)?.into_iter().collect());
        }
        let mut out = Vec::new();
        for row in focus.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            let f: v1::Focus = decode(v.value())?;
            if f.kind == kind
                && f.attributes
                    .get(attribute)
                    .is_some_and(|vals| vals.values.iter().any(|x| x == value))
            {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Up to `limit` focus objects of `kind` (all kinds when empty) with ids after `after_id`.
    pub fn list_focus(
        &self,
        kind: &str,
        after_id: &str,
        limit: usize,
    ) -> Result<Vec<v1::Focus>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(FOCUS).map_err(db)?;
        let mut out = Vec::new();
        for row in table.range(after_id..).map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if k.value() == after_id {
                continue;
            }
            let f: v1::Focus = decode(v.value())?;
            if kind.is_empty() || f.kind == kind {
                out.push(f);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn get_shadow(
        &self,
        resource: &str,
        entry_uuid: &str,
    ) -> Result<Option<v1::Shadow>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(SHADOW).map_err(db)?;
        load(&table, &shadow_key(resource, entry_uuid))
    }

    /// The shadows of `entry_uuids` on `resource` that exist, in one read.
    pub fn get_shadows(
        &self,
        resource: &str,
        entry_uuids: &[String],
    ) -> Result<Vec<v1::Shadow>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(SHADOW).map_err(db)?;
        let mut out = Vec::with_capacity(entry_uuids.len());
        for uuid in entry_uuids {
            out.extend(load::<v1::Shadow>(&table, &shadow_key(resource, uuid))?);
        }
        Ok(out)
    }

    /// How many live shadows `resource` has.
    pub fn live_shadows(&self, resource: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(SHADOW_LIVE).map_err(db)?;
        Ok(table.get(resource).map_err(db)?.map_or(0, |v| v.value()))
    }

    /// Up to `limit` shadows of `resource` with entry UUIDs after `after`.
    pub fn list_shadows(
        &self,
        resource: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<v1::Shadow>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(SHADOW).map_err(db)?;
        let start = shadow_key(resource, after);
        let prefix = format!("{resource}\0");
        let mut out = Vec::new();
        for row in table.range(start.as_str()..).map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if !k.value().starts_with(&prefix) {
                break;
            }
            if k.value() == start {
                continue;
            }
            out.push(decode(v.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Who refers to role `role`: the ids of focus objects assigned it, and
    /// the names of roles that include it.
    pub fn role_referrers(&self, role: &str) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let refs = txn.open_table(ROLE_REF).map_err(db)?;
        let prefix = format!("{role}\0");
        let (mut holders, mut roles) = (Vec::new(), Vec::new());
        for row in refs.range(prefix.as_str()..).map_err(db)? {
            let (k, _) = row.map_err(db)?;
            let Some(rest) = k.value().strip_prefix(prefix.as_str()) else {
                break;
            };
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
        let txn = self.db.begin_read().map_err(db)?;
        let by_key = txn.open_table(SHADOW_BY_MEMBER_KEY).map_err(db)?;
        let shadows = txn.open_table(SHADOW).map_err(db)?;
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            let mut focus_id = String::new();
            if let Some(uuid) = by_key.get(ref_key(m).as_str()).map_err(db)? {
                let key = shadow_key(&m.resource, uuid.value());
                if let Some(v) = shadows.get(key.as_str()).map_err(db)? {
                    let s: v1::Shadow = decode(v.value())?;
                    if !s.dead {
                        focus_id = s.focus_id;
                    }
                }
            }
            out.push(focus_id);
        }
        Ok(out)
    }

    #[cfg(test)]
    /// Groups that list `member` among their pending members (for tests of the index).
    pub fn find_pending_groups(
        &self,
        member: &v1::MemberRef,
    ) -> Result<Vec<v1::Focus>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(PENDING).map_err(db)?;
        let focus = txn.open_table(FOCUS).map_err(db)?;
        let prefix = format!("{}\0", ref_key(member));
        let mut out = Vec::new();
        for row in table.range(prefix.as_str()..).map_err(db)? {
            let (k, _) = row.map_err(db)?;
            let Some(id) = k.value().strip_prefix(prefix.as_str()) else {
                break;
            };
            if let Some(v) = focus.get(id).map_err(db)? {
                out.push(decode(v.value())?);
            }
        }
        Ok(out)
    }

    /// Up to `limit` open correlation cases: live, unlinked, disputed shadows.
    pub fn list_cases(&self, limit: usize) -> Result<Vec<v1::Shadow>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(SHADOW).map_err(db)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            let s: v1::Shadow = decode(v.value())?;
            if s.situation == "disputed" && !s.dead && s.focus_id.is_empty() {
                out.push(s);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The oldest `limit` outbox records, in commit order.
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(OUTBOX).map_err(db)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db)?.take(limit) {
            let (k, v) = row.map_err(db)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Removes outbox records up to and including `seq`, once published.
    pub fn outbox_remove_through(&self, seq: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut table = txn.open_table(OUTBOX).map_err(db)?;
            table.retain_in(..=seq, |_, _| false).map_err(db)?;
        }
        txn.commit().map_err(db)
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
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.commit(
                &[put_focus(user("f1", "jack"), 0), put_shadow("u1", 0)],
                "hr",
                &Writer::admin(),
            )
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get_focus("f1").unwrap().unwrap().version, 1);
        assert_eq!(s.get_shadow("hr", "u1").unwrap().unwrap().version, 1);
        assert_eq!(s.find_focus("user", "name", "jack").unwrap().len(), 1);
        assert_eq!(s.outbox_batch(10).unwrap().len(), 1);
    }

    #[test]
    fn a_stale_version_fails_the_whole_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn two_creations_of_one_shadow_cannot_both_win() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn a_lost_race_is_a_conflict_even_when_the_name_is_taken_too() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn names_are_unique_per_kind() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn delete_writes_a_tombstone_to_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn members_resolve_by_dn_and_pending_groups_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn list_pages_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
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

    #[test]
    fn a_second_open_of_the_same_store_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
