//! idsync-store
