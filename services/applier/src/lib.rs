//! idsync-applier
