//! The IDM's gRPC client as the services use it: typed calls over domain
//! types, one error enum that tells a lost race from an outage, and the
//! correlation step (reads plus the pure situation table) shared by the
//! correlator and the applier.

use std::time::Duration;

use idsync_core::config::Config;
use idsync_core::model::{
    Focus, KIND_GROUP, KIND_USER, MemberRef, ObjectType, Op, Shadow, SourceChange,
};
use idsync_core::situation::{Situation, situation};
use idsync_proto::v1;
use idsync_proto::v1::idm_client::IdmClient as Raw;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum IdmError {
    #[error("IDM URL {url:?} is not valid: {reason}")]
    Url { url: String, reason: String },
    /// Someone committed first; re-read and decide again.
    #[error("IDM: lost a race: {0}")]
    Conflict(String),
    /// The IDM cannot be reached or is overloaded; retry later.
    #[error("IDM unavailable: {0}")]
    Unavailable(String),
    /// The IDM refused the request; retrying the same request will not help.
    #[error("IDM refused the request ({code:?}): {message}")]
    Rejected { code: Code, message: String },
}

impl IdmError {
    /// Whether the same call may succeed later without any change.
    pub fn is_transient(&self) -> bool {
        matches!(self, IdmError::Unavailable(_) | IdmError::Conflict(_))
    }
}

impl From<tonic::Status> for IdmError {
    fn from(s: tonic::Status) -> Self {
        let message = s.message().to_owned();
        match s.code() {
            Code::Aborted => IdmError::Conflict(message),
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Cancelled
            | Code::Unknown => IdmError::Unavailable(message),
            code => IdmError::Rejected { code, message },
        }
    }
}

/// Cheap to clone; clones share one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct IdmClient {
    raw: Raw<Channel>,
}

impl IdmClient {
    /// A client for the IDM at `url`. Connects lazily, so a service can start
    /// before the IDM; calls fail with [`IdmError::Unavailable`] until it is up.
    ///
    /// # Errors
    /// [`IdmError::Url`] for a malformed URL.
    pub fn new(url: &str) -> Result<Self, IdmError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| IdmError::Url {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30));
        Ok(Self {
            raw: Raw::new(endpoint.connect_lazy()),
        })
    }

    pub async fn get_focus(&self, id: &str) -> Result<Option<Focus>, IdmError> {
        let req = v1::GetFocusRequest { id: id.to_owned() };
        match self.raw.clone().get_focus(req).await {
            Ok(r) => Ok(Some(r.into_inner().into())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    pub async fn find_focus(
        &self,
        kind: &str,
        attribute: &str,
        value: &str,
    ) -> Result<Vec<Focus>, IdmError> {
        let req = v1::FindFocusRequest {
            kind: kind.to_owned(),
            attribute: attribute.to_owned(),
            value: value.to_owned(),
        };
        let list = self.raw.clone().find_focus(req).await?.into_inner();
        Ok(list.items.into_iter().map(Focus::from).collect())
    }

    /// Up to `limit` focus objects of `kind` after `after_id`, in id order.
    pub async fn list_focus(
        &self,
        kind: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<Vec<Focus>, IdmError> {
        let req = v1::ListFocusRequest {
            kind: kind.to_owned(),
            after_id: after_id.to_owned(),
            limit,
        };
        let list = self.raw.clone().list_focus(req).await?.into_inner();
        Ok(list.items.into_iter().map(Focus::from).collect())
    }

    /// Every focus of `kind`, page by page.
    pub async fn all_focus(&self, kind: &str) -> Result<Vec<Focus>, IdmError> {
        let mut out: Vec<Focus> = Vec::new();
        loop {
            let after = out.last().map(|f| f.id.clone()).unwrap_or_default();
            let page = self.list_focus(kind, &after, 500).await?;
            if page.is_empty() {
                return Ok(out);
            }
            out.extend(page);
        }
    }

    pub async fn get_shadow(
        &self,
        resource: &str,
        entry_uuid: &str,
    ) -> Result<Option<Shadow>, IdmError> {
        let req = v1::ShadowKey {
            resource: resource.to_owned(),
            entry_uuid: entry_uuid.to_owned(),
        };
        match self.raw.clone().get_shadow(req).await {
            Ok(r) => Ok(Some(r.into_inner().into())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Every shadow of `resource`, page by page.
    pub async fn all_shadows(&self, resource: &str) -> Result<Vec<Shadow>, IdmError> {
        let mut out: Vec<Shadow> = Vec::new();
        loop {
            let req = v1::ListShadowsRequest {
                resource: resource.to_owned(),
                after_entry_uuid: out.last().map(|s| s.entry_uuid.clone()).unwrap_or_default(),
                limit: 500,
            };
            let page = self.raw.clone().list_shadows(req).await?.into_inner().items;
            if page.is_empty() {
                return Ok(out);
            }
            out.extend(page.into_iter().map(Shadow::from));
        }
    }

    /// For each member reference, the id of the focus its account's live
    /// shadow is linked to, or `None`.
    pub async fn resolve_members(
        &self,
        members: &[MemberRef],
    ) -> Result<Vec<Option<String>>, IdmError> {
        let req = v1::ResolveMembersRequest {
            members: members
                .iter()
                .map(|m| v1::MemberRef {
                    resource: m.resource.clone(),
                    dn: m.dn.clone(),
                    uid: m.uid.clone(),
                })
                .collect(),
        };
        let ids = self
            .raw
            .clone()
            .resolve_members(req)
            .await?
            .into_inner()
            .focus_ids;
        Ok(ids
            .into_iter()
            .map(|id| (!id.is_empty()).then_some(id))
            .collect())
    }

    /// Open correlation cases (disputed, unlinked, live shadows).
    pub async fn list_cases(&self) -> Result<Vec<Shadow>, IdmError> {
        let req = v1::ListCasesRequest { limit: 10_000 };
        let list = self.raw.clone().list_cases(req).await?.into_inner();
        Ok(list.items.into_iter().map(Shadow::from).collect())
    }

    /// Commits `ops` atomically; returns the new versions in order.
    ///
    /// # Errors
    /// [`IdmError::Conflict`] when a version read is no longer current.
    pub async fn commit(&self, ops: Vec<Op>, origin_resource: &str) -> Result<Vec<u64>, IdmError> {
        let req = v1::CommitRequest {
            operations: ops.into_iter().map(v1::Operation::from).collect(),
            origin_resource: origin_resource.to_owned(),
        };
        Ok(self.raw.clone().commit(req).await?.into_inner().versions)
    }
}

/// What the IDM holds about a change, and its situation.
#[derive(Debug, Clone, PartialEq)]
pub struct Correlation {
    pub situation: Option<Situation>,
    pub shadow: Option<Shadow>,
    /// The owner when linked, else the single candidate.
    pub focus: Option<Focus>,
    /// Ids of the focus objects correlation found (when not linked).
    pub candidates: Vec<String>,
}

/// Reads the shadow and its owner, runs the resource's correlation rules in
/// order when there is no owner, and decides the situation.
///
/// # Errors
/// An IDM call failed, or the resource is not configured.
pub async fn correlate(
    idm: &IdmClient,
    config: &Config,
    change: &SourceChange,
) -> Result<Correlation, CorrelateError> {
    let resource = config.resource(&change.resource)?;
    let shadow = idm.get_shadow(&change.resource, &change.entry_uuid).await?;
    let owner = match shadow
        .as_ref()
        .filter(|s| !s.dead)
        .and_then(|s| s.focus_id.as_deref())
    {
        Some(id) => idm.get_focus(id).await?,
        None => None,
    };
    let mut candidates = Vec::new();
    let is_group = change.object_type == ObjectType::Group;
    if owner.is_none() && !change.is_delete() && is_group {
        // Groups correlate by name, which is unique per kind.
        let name_source = resource
            .groups
            .as_ref()
            .map_or("cn", |g| g.name_source.as_str());
        let names = idsync_core::inbound::utf8_values(change, name_source, "name")?;
        if let Some(name) = names.first() {
            candidates = idm.find_focus(KIND_GROUP, "name", name).await?;
        }
    }
    if owner.is_none() && !change.is_delete() && !is_group {
        for rule in &resource.correlation {
            // A rule whose sources the entry lacks does not apply.
            let Some(all) = idsync_core::correlation::query(change, &rule.conditions)? else {
                continue;
            };
            let Some((attribute, value)) = all.first() else {
                continue;
            };
            let found = idm.find_focus(KIND_USER, attribute, value).await?;
            candidates = idsync_core::correlation::narrow(rule, change, &all, found)?;
            if !candidates.is_empty() {
                break;
            }
        }
    }
    let mut situation = situation(change, shadow.as_ref(), owner.is_some(), candidates.len());
    // A candidate that already owns another account on this resource would
    // get two: that is a dispute for a person to settle, not a link.
    if situation == Some(Situation::Unlinked)
        && candidates[0]
            .link_to(&change.resource)
            .is_some_and(|l| l.entry_uuid != change.entry_uuid)
    {
        situation = Some(Situation::Disputed);
    }
    let candidate_ids = candidates.iter().map(|f| f.id.clone()).collect();
    let focus = owner.or_else(|| (candidates.len() == 1).then(|| candidates.remove(0)));
    Ok(Correlation {
        situation,
        shadow,
        focus,
        candidates: candidate_ids,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CorrelateError {
    #[error(transparent)]
    Idm(#[from] IdmError),
    #[error(transparent)]
    Core(#[from] idsync_core::CoreError),
}
