//! idsync-provisioner
