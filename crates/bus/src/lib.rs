//! idsync-bus
