//! The domain of idsync: configuration, situations, reactions, mappings and the
//! plans they produce. Pure functions over values; no I/O, no clock, no random ids.

pub mod config;
pub mod correlation;
pub mod error;
pub mod expression;
pub mod inbound;
pub mod mapping;
pub mod model;
pub mod outbound;
pub mod schedule;
pub mod secret;
pub mod situation;

pub use error::CoreError;
