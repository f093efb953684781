//! idsync-idm
