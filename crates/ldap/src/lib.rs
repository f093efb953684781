//! idsync-ldap
