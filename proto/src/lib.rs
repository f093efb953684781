//! The protobuf schema of idsync's bus messages and of the IDM's gRPC API,
//! and the conversions between its messages and the domain types.

/// Version of the bus message schema this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// gRPC response header that tells FAILED_PRECONDITIONs apart: `halted`,
/// `deletion-guard` or `deletion-discarded`.
pub const ERROR_KIND_HEADER: &str = "idsync-error";

#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("idsync.v1");
}

mod convert;

pub use convert::{ConvertError, check_version};
