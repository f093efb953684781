//! Real throwaway servers (nats-server, slapd, 389-ds, PostgreSQL) on free loopback ports, for tests and the quick start.
//!
//! Every server binds only `127.0.0.1`, keeps its files in one directory
//! (temporary unless the caller names one) and is killed when dropped.

pub mod dirsrv;
mod error;
mod ldif;
pub mod logs;
mod nats;
pub mod postgres;
mod process;
mod slapd;
mod wait;

pub use dirsrv::{DirSrv, DirSrvOptions};
pub use error::TestkitError;
pub use nats::{MAX_PAYLOAD as NATS_MAX_PAYLOAD, NatsServer};
pub use postgres::Postgres;
pub use slapd::{Slapd, SlapdOptions};
pub use wait::{CLOSED_PORT, eventually, free_port};
