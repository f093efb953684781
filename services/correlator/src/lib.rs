//! idsync-correlator
