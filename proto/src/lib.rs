//! The protobuf schema of idsync's bus messages and of the IDM's gRPC API.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// Version of the bus message schema this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

pub mod v1 {
    tonic::include_proto!("idsync.v1");
}
