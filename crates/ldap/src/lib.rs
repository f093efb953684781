//! LDAP adapter: an RFC 4533 syncrepl consumer for source directories and a
//! bound connection for writing accounts to target directories (ldap3, async).

mod connection;
mod decode;
mod directory;
mod error;
mod pool;
mod scan;
mod sync;

pub use connection::{Connection, Tls};
pub use directory::{DirEntry, Directory};
pub use error::LdapError;
pub use pool::Pool;
pub use scan::{PAGE_SIZE, Scan, ScannedEntry};
pub use sync::{EntryState, SyncMessage, SyncSession};
