//! Bound connections to several directories, opened on first use and dropped
//! after a transport error so that the next use reconnects.

use std::collections::HashMap;

use tokio::sync::Mutex;

use crate::{Connection, Directory, LdapError};

/// One [`Directory`] per resource name; operations on one resource are serialised.
#[derive(Debug)]
pub struct Pool {
    /// Resource name → how to reach it and which attribute identifies entries.
    connections: HashMap<String, (Connection, String)>,
    open: Mutex<HashMap<String, Directory>>,
}

impl Pool {
    pub fn new() -> Self {
        Self {
            connections: HashMap::new(),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a resource; `id_attribute` identifies its entries (`entryUUID`).
    pub fn add(&mut self, resource: &str, connection: Connection, id_attribute: &str) {
        self.connections
            .insert(resource.to_owned(), (connection, id_attribute.to_owned()));
    }

    /// Runs `op` on the resource's directory, connecting first if need be.
    ///
    /// # Errors
    /// [`LdapError::Closed`] naming the resource when it was never added; else
    /// what connecting or `op` returned.
    pub async fn with<T>(
        &self,
        resource: &str,
        op: impl AsyncFnOnce(&mut Directory) -> Result<T, LdapError>,
    ) -> Result<T, LdapError> {
        let mut open = self.open.lock().await;
        if !open.contains_key(resource) {
            let (conn, id_attribute) =
                self.connections
                    .get(resource)
                    .ok_or_else(|| LdapError::Closed {
                        url: format!("(no connection configured for resource {resource})"),
                    })?;
            let dir = Directory::connect(conn)
                .await?
                .with_id_attribute(id_attribute);
            open.insert(resource.to_owned(), dir);
        }
        let Some(dir) = open.get_mut(resource) else {
            return Err(LdapError::Closed {
                url: format!("(resource {resource})"),
            });
        };
        let result = op(dir).await;
        if matches!(
            result,
            Err(LdapError::Connect { .. } | LdapError::Closed { .. })
        ) {
            open.remove(resource);
        }
        result
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}
