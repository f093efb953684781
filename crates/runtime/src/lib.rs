//! idsync-runtime
