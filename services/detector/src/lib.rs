//! idsync-detector
