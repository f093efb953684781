//! End-to-end scenarios: the whole pipeline on real servers (NATS JetStream,
//! two OpenLDAP directories, the IDM over gRPC), as `idsync dev up` runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod bad_input;
mod failures;
mod groups;
mod poison;
mod postgres_store;
mod restart;
mod seed_scenarios;
mod situations;
mod support;
