//! idsync-idm-client
