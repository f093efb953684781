//! The PostgreSQL backend: the key-value layer as one table,
//! `kv(tbl smallint, k bytea, v bytea, primary key (tbl, k))`, shared by
//! every IDM replica, with versioned migrations applied at start.
//!
//! redb's semantics are kept exactly. A write transaction takes a
//! transaction-level advisory lock first, so writers are serialised across
//! every replica as redb serialises them in one process; it runs READ
//! COMMITTED, so each statement after the lock sees every earlier writer's
//! commit (REPEATABLE READ would take its snapshot before the lock was
//! granted). A read is REPEATABLE READ READ ONLY: one consistent snapshot,
//! never blocked by writers. SERIALIZABLE with retries would let disjoint
//! commits run in parallel, but every commit writes the outbox position,
//! so they would all conflict anyway.
//!
//! The URL holds a password: errors and logs name the server as
//! [`PgTarget`] (user, host, port, database) and never the URL itself.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use postgres::{Client, IsolationLevel, NoTls, Statement, Transaction};

use crate::StoreError;
use crate::kv::{Kv, KvWrite, Tbl, Visit};

/// The schema version this build writes; a database at a newer one is refused.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Every migration in order; migration `n` (1-based) brings the schema
/// from version `n - 1` to `n`. Append only.
const MIGRATIONS: &[&str] = &["CREATE TABLE kv (
        tbl smallint NOT NULL,
        k bytea NOT NULL,
        v bytea NOT NULL,
        PRIMARY KEY (tbl, k)
    )"];

/// Advisory-lock keys (the two-integer form, first half "idsync").
const LOCK_SPACE: i32 = 0x1d5c;
/// Held by every write transaction.
const WRITE_LOCK: i32 = 1;
/// Held while migrations are checked and applied.
const MIGRATION_LOCK: i32 = 2;

/// Connections kept open for reuse; more are opened under load and closed after.
const POOL_IDLE: usize = 4;
/// Rows fetched per round trip of a range scan.
const SCAN_BATCH: i64 = 256;
/// A connection idle longer than this is checked with an empty query
/// before use: the server may have restarted meanwhile.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(10);
/// How long a connection attempt may take, unless the URL says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The server a URL names, without its password: what errors and logs show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTarget {
    user: String,
    host: String,
    port: u16,
    dbname: String,
}

impl std::fmt::Display for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "postgresql://{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

impl PgTarget {
    /// Parses `url` (a libpq URL or key-value string) without connecting.
    ///
    /// # Errors
    /// The text does not parse; the message never repeats it.
    pub fn parse(url: &str) -> Result<Self, String> {
        parse_config(url).map(|c| target_of(&c))
    }
}

fn parse_config(url: &str) -> Result<postgres::Config, String> {
    url.parse::<postgres::Config>()
        // The parser's message may quote the text, password and all.
        .map_err(|_| "the PostgreSQL URL does not parse (expected postgresql://user:password@host:port/database)".to_owned())
}

fn target_of(config: &postgres::Config) -> PgTarget {
    use postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    PgTarget {
        user: config.get_user().unwrap_or("").to_owned(),
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        dbname: config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("")
            .to_owned(),
    }
}

/// Buffered writes flushed in one statement of at most this many rows.
const FLUSH_ROWS: usize = 1000;
/// Keys looked up in one statement by `get_many`.
const GET_MANY_ROWS: usize = 1000;

/// The statements every connection prepares once.
struct Statements {
    get: Statement,
    get_many: Statement,
    upsert_many: Statement,
    delete_many: Statement,
    scan_to: Statement,
    scan_all: Statement,
    delete_to: Statement,
    delete_all: Statement,
}

struct Conn {
    client: Client,
    st: Statements,
    /// When it was last given back: one idle long enough is checked before use.
    idle_since: Instant,
}

/// A pool of connections to one database.
pub(crate) struct PgStore {
    config: postgres::Config,
    target: PgTarget,
    /// Removed from every error text, however the driver words it.
    password: Option<String>,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // A client closes its connection on its own small runtime, which
        // must not happen on an async worker thread: close them elsewhere.
        let idle = std::mem::take(
            self.idle
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("idsync-pg-close".into())
                .spawn(move || drop(idle));
        }
    }
}

impl PgStore {
    /// Connects once, checks and applies migrations.
    pub(crate) fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config = parse_config(url).map_err(|reason| StoreError::Open {
            path: "postgres_url".into(),
            reason,
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("idsync-idm");
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .filter(|p| !p.is_empty());
        let store = Self {
            target: target_of(&config),
            config,
            password,
            idle: Mutex::new(Vec::new()),
        };
        let open_err = |e: StoreError| StoreError::Open {
            path: store.target.to_string(),
            reason: match e {
                StoreError::Db(r) | StoreError::Unavailable(r) => r,
                other => other.to_string(),
            },
        };
        let mut client = store
            .config
            .connect(NoTls)
            .map_err(|e| open_err(store.error(&e)))?;
        store.migrate(&mut client).map_err(open_err)?;
        let conn = store.prepare(client).map_err(open_err)?;
        store.give_back(conn, &Ok(()));
        Ok(store)
    }

    pub(crate) fn target(&self) -> &PgTarget {
        &self.target
    }

    /// A driver error as the store reports it: retriable when the server
    /// cannot be reached, never with the password in it.
    fn error(&self, e: &postgres::Error) -> StoreError {
        let mut text = match e.as_db_error() {
            Some(d) => format!("{}: {}", d.severity(), d.message()),
            None => {
                // "error connecting to server" alone does not say why.
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    let c_text = c.to_string();
                    if !text.contains(&c_text) {
                        text = format!("{text}: {c_text}");
                    }
                    cause = c.source();
                }
                text
            }
        };
        if let Some(p) = &self.password {
            text = text.replace(p.as_str(), "***");
        }
        let text = format!(
            "PostgreSQL at {}:{}: {text}",
            self.target.host, self.target.port
        );
        let retriable = match e.code() {
            // Connection exceptions, operator intervention (shutdown), and
            // transaction rollbacks (serialization, deadlock).
            Some(code) => ["08", "57", "40"]
                .iter()
                .any(|class| code.code().starts_with(class)),
            None => true,
        };
        if retriable || e.is_closed() {
            StoreError::Unavailable(text)
        } else {
            StoreError::Db(text)
        }
    }

    /// Brings the schema to [`SCHEMA_VERSION`], one migration per
    /// transaction, under an advisory lock so that replicas starting together
    /// apply each migration once.
    fn migrate(&self, client: &mut Client) -> Result<(), StoreError> {
        let pg = |e: postgres::Error| self.error(&e);
        loop {
            let mut txn = client.transaction().map_err(pg)?;
            txn.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&LOCK_SPACE, &MIGRATION_LOCK],
            )
            .map_err(pg)?;
            txn.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .map_err(pg)?;
            let current: i32 = txn
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations",
                    &[],
                )
                .map_err(pg)?
                .try_get(0)
                .map_err(pg)?;
            if current > SCHEMA_VERSION {
                return Err(StoreError::Db(format!(
                    "the database's schema is at version {current}, newer than this build's {SCHEMA_VERSION}: run a newer idsync"
                )));
            }
            let Some(sql) = usize::try_from(current)
                .ok()
                .and_then(|i| MIGRATIONS.get(i))
            else {
                txn.commit().map_err(pg)?;
                return Ok(());
            };
            let next = current + 1;
            txn.batch_execute(sql).map_err(pg)?;
            txn.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&next],
            )
            .map_err(pg)?;
            txn.commit().map_err(pg)?;
            tracing::info!(database = %self.target, version = next, "store: schema migration applied");
        }
    }

    fn prepare(&self, mut client: Client) -> Result<Conn, StoreError> {
        let pg = |e: postgres::Error| self.error(&e);
        let mut p = |sql: &str| client.prepare(sql).map_err(pg);
        let st = Statements {
            get: p("SELECT v FROM kv WHERE tbl = $1 AND k = $2")?,
            get_many: p("SELECT k, v FROM kv WHERE tbl = $1 AND k = ANY($2)")?,
            upsert_many: p("INSERT INTO kv (tbl, k, v) SELECT * FROM unnest($1::int2[], $2::bytea[], $3::bytea[])
                 ON CONFLICT (tbl, k) DO UPDATE SET v = EXCLUDED.v")?,
            delete_many: p("DELETE FROM kv WHERE (tbl, k) IN (SELECT * FROM unnest($1::int2[], $2::bytea[]))")?,
            scan_to: p(
                "SELECT k, v FROM kv WHERE tbl = $1 AND k >= $2 AND k < $3 ORDER BY k LIMIT $4",
            )?,
            scan_all: p("SELECT k, v FROM kv WHERE tbl = $1 AND k >= $2 ORDER BY k LIMIT $3")?,
            delete_to: p("DELETE FROM kv WHERE tbl = $1 AND k >= $2 AND k < $3")?,
            delete_all: p("DELETE FROM kv WHERE tbl = $1 AND k >= $2")?,
        };
        Ok(Conn {
            client,
            st,
            idle_since: Instant::now(),
        })
    }

    /// An idle connection, or a new one.
    fn take(&self) -> Result<Conn, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        if let Some(mut c) = idle {
            let usable = !c.client.is_closed()
                && (c.idle_since.elapsed() < CHECK_AFTER_IDLE
                    || c.client.is_valid(CONNECT_TIMEOUT).is_ok());
            if usable {
                return Ok(c);
            }
        }
        let client = self.config.connect(NoTls).map_err(|e| self.error(&e))?;
        self.prepare(client)
    }

    /// Keeps `conn` for reuse unless it broke or enough are idle. After a
    /// call that found the server unreachable, the idle connections are
    /// closed too (they are most likely broken the same way), so the first
    /// call after the server is back connects afresh.
    fn give_back<T>(&self, mut conn: Conn, outcome: &Result<T, StoreError>) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut dropped = Vec::new();
        if matches!(outcome, Err(StoreError::Unavailable(_))) {
            dropped = std::mem::take(&mut *idle);
        }
        if !conn.client.is_closed() && idle.len() < POOL_IDLE {
            conn.idle_since = Instant::now();
            idle.push(conn);
        } else {
            dropped.push(conn);
        }
        drop(idle);
        drop(dropped);
    }

    /// Runs `f` on one REPEATABLE READ, READ ONLY snapshot.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&dyn Kv) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        let out = (|| {
            let txn = conn
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(|e| self.error(&e))?;
            let kv = PgTxn {
                store: self,
                st: &conn.st,
                txn: RefCell::new(txn),
                writes: RefCell::default(),
            };
            let out = f(&kv)?;
            kv.txn.into_inner().commit().map_err(|e| self.error(&e))?;
            Ok(out)
        })();
        self.give_back(conn, &out);
        out
    }

    /// Runs `f` in one write transaction under the write lock; commits when
    /// `keep` and `f` succeeded, rolls back otherwise.
    pub(crate) fn transact<T>(
        &self,
        keep: bool,
        f: impl FnOnce(&mut dyn KvWrite) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        let out = (|| {
            let mut txn = conn
                .client
                .build_transaction()
                .isolation_level(IsolationLevel::ReadCommitted)
                .start()
                .map_err(|e| self.error(&e))?;
            txn.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&LOCK_SPACE, &WRITE_LOCK],
            )
            .map_err(|e| self.error(&e))?;
            let mut kv = PgTxn {
                store: self,
                st: &conn.st,
                txn: RefCell::new(txn),
                writes: RefCell::default(),
            };
            let out = f(&mut kv)?;
            if keep {
                kv.flush()?;
            }
            let txn = kv.txn.into_inner();
            if keep {
                txn.commit().map_err(|e| self.error(&e))?;
            } else {
                txn.rollback().map_err(|e| self.error(&e))?;
            }
            Ok(out)
        })();
        self.give_back(conn, &out);
        out
    }
}

/// Table and key → the value a transaction will write, or `None` to remove.
type Writes = BTreeMap<(i16, Vec<u8>), Option<Vec<u8>>>;

/// One open transaction. Reads take `&self` in the layer; the driver
/// needs `&mut` for every statement, hence the cells (never borrowed across
/// a visitor call).
///
/// Writes are buffered and sent in batches (a group of 50,000 members
/// writes 50,000 index keys: one round trip each would take seconds). A
/// read of a buffered key is answered from the buffer; a scan or a range
/// removal flushes the buffer first, and so does the commit.
struct PgTxn<'a, 'c> {
    store: &'a PgStore,
    st: &'a Statements,
    txn: RefCell<Transaction<'c>>,
    /// Table and key → the value to write, or `None` to remove.
    writes: RefCell<Writes>,
}

impl<'c> PgTxn<'_, 'c> {
    fn txn(&self) -> Result<std::cell::RefMut<'_, Transaction<'c>>, StoreError> {
        self.txn
            .try_borrow_mut()
            .map_err(|_| StoreError::Db("a PostgreSQL transaction was used re-entrantly".into()))
    }

    fn writes(&self) -> Result<std::cell::RefMut<'_, Writes>, StoreError> {
        self.writes
            .try_borrow_mut()
            .map_err(|_| StoreError::Db("a PostgreSQL write buffer was used re-entrantly".into()))
    }

    /// The buffered value of `key`: `Some(None)` when it is to be removed.
    fn buffered(&self, t: Tbl, key: &[u8]) -> Result<Option<Option<Vec<u8>>>, StoreError> {
        Ok(self.writes()?.get(&(tbl(t), key.to_vec())).cloned())
    }

    /// Sends every buffered write, in batches.
    fn flush(&self) -> Result<(), StoreError> {
        let writes = std::mem::take(&mut *self.writes()?);
        if writes.is_empty() {
            return Ok(());
        }
        let mut txn = self.txn()?;
        let (mut ut, mut uk, mut uv) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dt, mut dk) = (Vec::new(), Vec::new());
        for ((t, k), v) in writes {
            match v {
                Some(v) => {
                    ut.push(t);
                    uk.push(k);
                    uv.push(v);
                }
                None => {
                    dt.push(t);
                    dk.push(k);
                }
            }
        }
        let pg = |e: postgres::Error| self.store.error(&e);
        for ((t, k), v) in ut
            .chunks(FLUSH_ROWS)
            .zip(uk.chunks(FLUSH_ROWS))
            .zip(uv.chunks(FLUSH_ROWS))
        {
            txn.execute(&self.st.upsert_many, &[&t, &k, &v])
                .map_err(pg)?;
        }
        for (t, k) in dt.chunks(FLUSH_ROWS).zip(dk.chunks(FLUSH_ROWS)) {
            txn.execute(&self.st.delete_many, &[&t, &k]).map_err(pg)?;
        }
        Ok(())
    }

    /// Buffers a write, sending the buffer when it is large.
    fn buffer(&self, t: Tbl, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        let full = {
            let mut writes = self.writes()?;
            writes.insert((tbl(t), key.to_vec()), value.map(<[u8]>::to_vec));
            writes.len() >= FLUSH_ROWS
        };
        if full { self.flush() } else { Ok(()) }
    }
}

/// The `tbl` column of table `t`.
fn tbl(t: Tbl) -> i16 {
    t as i16
}

impl Kv for PgTxn<'_, '_> {
    fn get(&self, t: Tbl, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.buffered(t, key)? {
            return Ok(v);
        }
        let row = self
            .txn()?
            .query_opt(&self.st.get, &[&tbl(t), &key])
            .map_err(|e| self.store.error(&e))?;
        row.map(|r| r.try_get::<_, Vec<u8>>(0))
            .transpose()
            .map_err(|e| self.store.error(&e))
    }

    fn get_many(&self, t: Tbl, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut out: Vec<Option<Option<Vec<u8>>>> = Vec::with_capacity(keys.len());
        let mut ask = Vec::new();
        for k in keys {
            let b = self.buffered(t, k)?;
            if b.is_none() {
                ask.push(k.clone());
            }
            out.push(b);
        }
        ask.sort();
        ask.dedup();
        let mut found: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for chunk in ask.chunks(GET_MANY_ROWS) {
            let rows = self
                .txn()?
                .query(&self.st.get_many, &[&tbl(t), &chunk])
                .map_err(|e| self.store.error(&e))?;
            for row in rows {
                let k: Vec<u8> = row.try_get(0).map_err(|e| self.store.error(&e))?;
                let v: Vec<u8> = row.try_get(1).map_err(|e| self.store.error(&e))?;
                found.insert(k, v);
            }
        }
        Ok(keys
            .iter()
            .zip(out)
            .map(|(k, b)| match b {
                Some(v) => v,
                None => found.get(k).cloned(),
            })
            .collect())
    }

    fn scan(
        &self,
        t: Tbl,
        lo: &[u8],
        hi: Option<&[u8]>,
        visit: Visit<'_>,
    ) -> Result<(), StoreError> {
        self.flush()?;
        let mut from = lo.to_vec();
        loop {
            let rows = {
                let mut txn = self.txn()?;
                match hi {
                    Some(hi) => txn.query(&self.st.scan_to, &[&tbl(t), &from, &hi, &SCAN_BATCH]),
                    None => txn.query(&self.st.scan_all, &[&tbl(t), &from, &SCAN_BATCH]),
                }
                .map_err(|e| self.store.error(&e))?
            };
            let full = rows.len() as i64 == SCAN_BATCH;
            let mut last = None;
            for row in rows {
                let k: Vec<u8> = row.try_get(0).map_err(|e| self.store.error(&e))?;
                let v: Vec<u8> = row.try_get(1).map_err(|e| self.store.error(&e))?;
                if !visit(&k, &v)? {
                    return Ok(());
                }
                last = Some(k);
            }
            match last {
                // The next key after `k` in byte order is `k` followed by 0.
                Some(mut k) if full => {
                    k.push(0);
                    from = k;
                }
                _ => return Ok(()),
            }
        }
    }
}

impl KvWrite for PgTxn<'_, '_> {
    fn insert(&mut self, t: Tbl, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.buffer(t, key, Some(value))
    }

    fn remove(&mut self, t: Tbl, key: &[u8]) -> Result<(), StoreError> {
        self.buffer(t, key, None)
    }

    fn remove_range(&mut self, t: Tbl, lo: &[u8], hi: Option<&[u8]>) -> Result<(), StoreError> {
        self.flush()?;
        let mut txn = self.txn()?;
        match hi {
            Some(hi) => txn.execute(&self.st.delete_to, &[&tbl(t), &lo, &hi]),
            None => txn.execute(&self.st.delete_all, &[&tbl(t), &lo]),
        }
        .map_err(|e| self.store.error(&e))
        .map(drop)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_target_names_the_server_and_never_the_password() {
        let t = PgTarget::parse("postgresql://idsync:s3cret@db.example:6543/idm").unwrap();
        assert_eq!(t.to_string(), "postgresql://idsync@db.example:6543/idm");
        let err = PgTarget::parse("postgresql://idsync:s3cret@db:notaport/idm").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
