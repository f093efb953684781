//! An RFC 4533 content synchronization session (syncrepl consumer side), decoded into [`SyncMessage`]s.

use ldap3::controls::{
    MakeCritical, RawControl, RefreshMode, SyncDone, SyncInfo, SyncRequest, SyncState,
    parse_syncinfo,
};
use ldap3::{Ldap, LdapResult, RequestId, ResultEntry, Scope, SearchStream};

use crate::connection::{OPERATION_TIMEOUT, open};
use crate::decode::{self, SYNC_DONE_OID, SYNC_INFO_OID, SYNC_STATE_OID};
use crate::error::Op;
use crate::{Connection, LdapError};

/// Result code of e-syncRefreshRequired: the cookie is too old, start over.
const RC_SYNC_REFRESH_REQUIRED: u32 = 4096;

/// One message of an RFC 4533 sync session, already decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncMessage {
    /// An entry with its sync state. For Add/Modify `attributes` is the whole
    /// entry (names as the server sent them, including `entryCSN`; values raw
    /// bytes, string and binary attributes alike); for Delete it is empty. A
    /// Present entry carries whatever the server sent, often no attributes.
    Entry {
        /// Lower-case hyphenated UUID from the Sync State control's 16 raw bytes.
        entry_uuid: String,
        /// The entry's DN.
        dn: String,
        /// The sync state.
        state: EntryState,
        /// The entry's attributes.
        attributes: Vec<(String, Vec<Vec<u8>>)>,
        /// The `entryCSN` value if present.
        csn: Option<String>,
        /// The cookie of the Sync State control, if the server sent one.
        cookie: Option<Vec<u8>>,
    },
    /// syncIdSet with refreshDeletes=TRUE: these entries are gone.
    Deleted {
        /// The deleted entries, sorted.
        entry_uuids: Vec<String>,
        /// The cookie, if any.
        cookie: Option<Vec<u8>>,
    },
    /// syncIdSet with refreshDeletes=FALSE: these entries are still present (present phase).
    Present {
        /// The unchanged entries, sorted.
        entry_uuids: Vec<String>,
        /// The cookie, if any.
        cookie: Option<Vec<u8>>,
    },
    /// End of the refresh phase (syncInfo refreshDelete/refreshPresent, or
    /// SyncDone in refreshOnly). `deletes` is refreshDeletes: false means a
    /// present phase happened and every entry in scope not named during this
    /// refresh was deleted.
    RefreshDone {
        /// The cookie to resume from, if any.
        cookie: Option<Vec<u8>>,
        /// refreshDeletes.
        deletes: bool,
    },
    /// syncInfo newcookie.
    Cookie(Vec<u8>),
}

/// The sync state of an entry (RFC 4533 Sync State control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// Unchanged since the cookie (present phase).
    Present,
    /// New, or changed while the consumer was away.
    Add,
    /// Changed (persist phase).
    Modify,
    /// Deleted (persist phase).
    Delete,
}

impl From<ldap3::controls::EntryState> for EntryState {
    fn from(state: ldap3::controls::EntryState) -> Self {
        use ldap3::controls::EntryState as S;
        match state {
            S::Present => Self::Present,
            S::Add => Self::Add,
            S::Modify => Self::Modify,
            S::Delete => Self::Delete,
        }
    }
}

/// Where the search stands.
#[derive(Debug)]
enum Phase {
    /// Messages may still arrive.
    Running,
    /// The server ended the search; everything has been handed out.
    Ended,
}

/// A refreshAndPersist (or refreshOnly) search.
///
/// Dropping a session closes its connection; [`SyncSession::close`] also
/// abandons the search politely first.
pub struct SyncSession {
    url: String,
    base: String,
    ldap: Ldap,
    stream: SearchStream<'static, String, Vec<String>>,
    msgid: RequestId,
    phase: Phase,
}

impl std::fmt::Debug for SyncSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSession")
            .field("url", &self.url)
            .field("base", &self.base)
            .field("msgid", &self.msgid)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl SyncSession {
    /// Connects, binds, and starts the sync search of `base` with `filter`
    /// (subtree) asking for `*` and `entryCSN`, resuming from `cookie` when
    /// given. `persist` selects refreshAndPersist, otherwise refreshOnly.
    ///
    /// The Sync Request control is sent critical, so a server without
    /// syncprov refuses the search instead of answering a plain one.
    ///
    /// # Errors
    ///
    /// [`LdapError::Connect`], [`LdapError::Bind`], [`LdapError::Request`] for
    /// a filter that does not parse, [`LdapError::Closed`] when the connection
    /// drops. A refusal of the search itself shows up on the first [`next`](Self::next).
    pub async fn start(
        conn: &Connection,
        base: &str,
        filter: &str,
        cookie: Option<Vec<u8>>,
        persist: bool,
    ) -> Result<Self, LdapError> {
        let mut ldap = open(conn).await?;
        let mode = if persist {
            RefreshMode::RefreshAndPersist
        } else {
            RefreshMode::RefreshOnly
        };
        let request = SyncRequest {
            mode,
            cookie,
            reload_hint: false,
        };
        let op = Op {
            url: &conn.url,
            operation: "sync search",
            dn: base,
        };
        let attrs = vec!["*".to_owned(), "entryCSN".to_owned()];
        let mut stream = ldap
            .with_controls(RawControl::from(request.critical()))
            .streaming_search(base, Scope::Subtree, filter, attrs)
            .await
            .map_err(|e| op.failed(e, OPERATION_TIMEOUT))?;
        let msgid = stream.ldap_handle().last_id();
        tracing::debug!(url = %conn.url, base, filter, persist, msgid, "sync search started");
        Ok(Self {
            url: conn.url.clone(),
            base: base.to_owned(),
            ldap,
            stream,
            msgid,
            phase: Phase::Running,
        })
    }

    /// The next message; `Ok(None)` when the search ended (refreshOnly done,
    /// or the server ended it).
    ///
    /// # Errors
    ///
    /// [`LdapError::RefreshRequired`] when the server cannot resume from the
    /// cookie (restart without one); [`LdapError::Operation`] when the server
    /// ends the search with another error code; [`LdapError::Protocol`] for a
    /// message that cannot be decoded (the session may continue after it);
    /// [`LdapError::Closed`] when the connection drops.
    pub async fn next(&mut self) -> Result<Option<SyncMessage>, LdapError> {
        loop {
            if let Phase::Ended = self.phase {
                return Ok(None);
            }
            let item = match self.stream.next().await {
                Ok(item) => item,
                Err(e) => {
                    self.phase = Phase::Ended;
                    return Err(self.op().failed(e, OPERATION_TIMEOUT));
                }
            };
            let Some(item) = item else {
                // ldap3 must not be polled again after the final result.
                self.phase = Phase::Ended;
                let result = self.stream.finish().await;
                return self.search_done(result);
            };
            if item.is_intermediate() {
                if let Some(message) = self.sync_info(item)? {
                    return Ok(Some(message));
                }
            } else if item.is_ref() {
                tracing::debug!(url = %self.url, base = %self.base, "ignoring a search continuation reference");
            } else {
                return self.entry(item).map(Some);
            }
        }
    }

    /// Abandons the search (if still running) and unbinds.
    ///
    /// # Errors
    ///
    /// [`LdapError::Closed`] when the connection is already gone.
    pub async fn close(mut self) -> Result<(), LdapError> {
        if let Phase::Running = self.phase {
            // Stops ldap3 from routing further results; the server is told next.
            let _ = self.stream.finish().await;
            self.ldap
                .abandon(self.msgid)
                .await
                .map_err(|e| self.op().failed(e, OPERATION_TIMEOUT))?;
        }
        self.ldap.unbind().await.map_err(|e| {
            Op {
                url: &self.url,
                operation: "unbind",
                dn: "",
            }
            .failed(e, OPERATION_TIMEOUT)
        })
    }

    fn op(&self) -> Op<'_> {
        Op {
            url: &self.url,
            operation: "sync search",
            dn: &self.base,
        }
    }

    fn protocol(&self, reason: impl Into<String>) -> LdapError {
        LdapError::Protocol {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    /// The final SearchResultDone: a SyncDone (refreshOnly) or an error.
    fn search_done(&self, result: LdapResult) -> Result<Option<SyncMessage>, LdapError> {
        match result.rc {
            0 => {}
            RC_SYNC_REFRESH_REQUIRED => return Err(LdapError::RefreshRequired),
            rc => return Err(self.op().result(rc, &result.text)),
        }
        let Some(raw) = result.ctrls.iter().find(|c| c.1.ctype == SYNC_DONE_OID) else {
            tracing::debug!(url = %self.url, base = %self.base, "sync search ended without SyncDone");
            return Ok(None);
        };
        let done = decode::guarded(|| raw.1.parse::<SyncDone>())
            .map_err(|e| self.protocol(format!("malformed SyncDone control: {e}")))?;
        Ok(Some(SyncMessage::RefreshDone {
            cookie: done.cookie,
            deletes: done.refresh_deletes,
        }))
    }

    /// An IntermediateResponse: a syncInfo message, or something else to skip.
    fn sync_info(&self, item: ResultEntry) -> Result<Option<SyncMessage>, LdapError> {
        match decode::intermediate_oid(&item.0) {
            Some(oid) if oid == SYNC_INFO_OID => {}
            other => {
                tracing::debug!(url = %self.url, oid = ?other, "ignoring an intermediate response");
                return Ok(None);
            }
        }
        let info = decode::guarded(|| parse_syncinfo(item))
            .map_err(|e| self.protocol(format!("malformed syncInfo message: {e}")))?;
        Ok(Some(match info {
            SyncInfo::NewCookie(cookie) => SyncMessage::Cookie(cookie),
            // syncprov always sends refreshDone=TRUE here; a phase end with
            // FALSE still closes a present or delete phase for the consumer.
            SyncInfo::RefreshDelete { cookie, .. } => SyncMessage::RefreshDone {
                cookie,
                deletes: true,
            },
            SyncInfo::RefreshPresent { cookie, .. } => SyncMessage::RefreshDone {
                cookie,
                deletes: false,
            },
            SyncInfo::SyncIdSet {
                cookie,
                refresh_deletes,
                sync_uuids,
            } => {
                let mut entry_uuids = sync_uuids
                    .iter()
                    .map(|raw| {
                        decode::uuid(raw).ok_or_else(|| {
                            self.protocol(format!(
                                "syncIdSet holds a {}-byte entryUUID, expected 16",
                                raw.len()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                entry_uuids.sort_unstable();
                if refresh_deletes {
                    SyncMessage::Deleted {
                        entry_uuids,
                        cookie,
                    }
                } else {
                    SyncMessage::Present {
                        entry_uuids,
                        cookie,
                    }
                }
            }
        }))
    }

    /// A SearchResultEntry with its Sync State control.
    fn entry(&self, item: ResultEntry) -> Result<SyncMessage, LdapError> {
        let controls = item.1;
        let (dn, attributes) = decode::entry(item.0)
            .ok_or_else(|| self.protocol("malformed SearchResultEntry in sync search"))?;
        let raw = controls
            .iter()
            .find(|c| c.1.ctype == SYNC_STATE_OID)
            .ok_or_else(|| {
                self.protocol(format!("entry {dn} came without a Sync State control"))
            })?;
        let sync_state = decode::guarded(|| raw.1.parse::<SyncState>()).map_err(|e| {
            self.protocol(format!("malformed Sync State control on entry {dn}: {e}"))
        })?;
        let entry_uuid = decode::uuid(&sync_state.entry_uuid).ok_or_else(|| {
            self.protocol(format!(
                "Sync State control on entry {dn} holds a {}-byte entryUUID, expected 16",
                sync_state.entry_uuid.len()
            ))
        })?;
        let state = EntryState::from(sync_state.state);
        let attributes = if state == EntryState::Delete {
            Vec::new()
        } else {
            attributes
        };
        let csn = attributes
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("entryCSN"))
            .and_then(|(_, values)| values.first())
            .map(|v| String::from_utf8_lossy(v).into_owned());
        Ok(SyncMessage::Entry {
            entry_uuid,
            dn,
            state,
            attributes,
            csn,
            cookie: sync_state.cookie,
        })
    }
}
