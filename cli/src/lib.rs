//! The admin CLI's library: the local all-in-one deployment (`idsync dev up`),
//! shared with the end-to-end tests so that they run exactly what a user runs.

pub mod cases;
pub mod dev;
pub mod replay;
pub mod sync;
