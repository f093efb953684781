//! Bound connections to several directories, opened on first use and dropped
//! after a transport error so that the next use reconnects.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Mutex;

use crate::{Connection, Directory, LdapError};

/// One connection per resource name, shared: operations on one resource run
/// at once, multiplexed over it (each on its own clone of the handle).
#[derive(Debug)]
pub struct Pool {
    /// Resource name → how to reach it and which attribute identifies entries.
    connections: HashMap<String, (Connection, String)>,
    /// The open connection of each resource, with the generation it was
    /// opened in (a failure drops only the connection it happened on).
    open: Mutex<HashMap<String, (u64, Directory)>>,
    generation: AtomicU64,
}

impl Pool {
    pub fn new() -> Self {
        Self {
            connections: HashMap::new(),
            open: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        }
    }

    /// Adds a resource; `id_attribute` identifies its entries (`entryUUID`).
    pub fn add(&mut self, resource: &str, connection: Connection, id_attribute: &str) {
        self.connections
            .insert(resource.to_owned(), (connection, id_attribute.to_owned()));
    }

    /// Runs `op` on the resource's directory, connecting first if need be;
    /// operations of concurrent callers share the connection.
    ///
    /// # Errors
    /// [`LdapError::NotConfigured`] when the resource was never added; else
    /// what connecting or `op` returned.
    pub async fn with<T>(
        &self,
        resource: &str,
        op: impl AsyncFnOnce(&mut Directory) -> Result<T, LdapError>,
    ) -> Result<T, LdapError> {
        let (conn, id_attribute) =
            self.connections
                .get(resource)
                .ok_or_else(|| LdapError::NotConfigured {
                    resource: resource.to_owned(),
                })?;
        let (generation, mut dir) = {
            // Held while connecting, so that callers at once open one connection.
            let mut open = self.open.lock().await;
            match open.entry(resource.to_owned()) {
                Entry::Occupied(e) => e.get().clone(),
                Entry::Vacant(e) => {
                    let dir = Directory::connect(conn)
                        .await?
                        .with_id_attribute(id_attribute);
                    let generation = self.generation.fetch_add(1, Ordering::Relaxed);
                    e.insert((generation, dir)).clone()
                }
            }
        };
        let result = op(&mut dir).await;
        // A connection that broke or hung is not used again: the next
        // operation dials anew (a timed-out request may still be in flight
        // on the old one). Only the connection it happened on is dropped.
        if matches!(
            result,
            Err(LdapError::Connect { .. } | LdapError::Closed { .. } | LdapError::Timeout { .. })
        ) {
            let mut open = self.open.lock().await;
            if open.get(resource).is_some_and(|(g, _)| *g == generation) {
                open.remove(resource);
            }
        }
        result
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unknown_resource_is_named_and_not_retried_as_an_outage() {
        let pool = Pool::new();
        let err = pool.with("hr", async |_dir| Ok(())).await.unwrap_err();
        assert!(matches!(err, LdapError::NotConfigured { ref resource } if resource == "hr"));
        assert_eq!(
            err.to_string(),
            "no LDAP connection is configured for resource \"hr\""
        );
    }
}
