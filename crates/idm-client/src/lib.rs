//! The IDM's gRPC client as the services use it: typed calls over domain
//! types, one error enum that tells a lost race from an outage, and the
//! correlation step (reads plus the pure situation table) shared by the
//! correlator and the applier.

use std::time::Duration;

use idsync_core::config::Config;
use idsync_core::inbound::utf8_values;
use idsync_core::model::{
    Focus, KIND_GROUP, KIND_USER, MemberRef, ObjectType, Op, Shadow, SourceChange,
};
use idsync_core::secret::Secret;
use idsync_core::situation::{Situation, situation};
use idsync_proto::v1;
use idsync_proto::v1::idm_client::IdmClient as Raw;
use tonic::Code;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

mod batch;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdmError {
    #[error("IDM URL {url:?} is not valid: {reason}")]
    Url { url: String, reason: String },
    /// Someone committed first; re-read and decide again.
    #[error("IDM: lost a race: {0}")]
    Conflict(String),
    /// The IDM cannot be reached or is overloaded; retry later.
    #[error("IDM unavailable: {0}")]
    Unavailable(String),
    /// The agreement is halted: nothing of it is applied until it is resumed.
    #[error("IDM: {0}")]
    Halted(String),
    /// A deletion would cross its resource's deletion guard.
    #[error("IDM: {0}")]
    MassDeletion(String),
    /// An operator discarded this deletion: skip it.
    #[error("IDM: {0}")]
    DeletionDiscarded(String),
    /// The IDM refused the credential (missing, malformed, revoked, foreign).
    #[error("IDM refused the credential: {0}")]
    Unauthenticated(String),
    /// The IDM refused the request; retrying the same request will not help.
    #[error("IDM refused the request ({code:?}): {message}")]
    Rejected { code: Code, message: String },
}

impl IdmError {
    /// Whether the same call may succeed later without any change.
    pub fn is_transient(&self) -> bool {
        matches!(self, IdmError::Unavailable(_) | IdmError::Conflict(_))
    }

    /// Whether the IDM refused a focus because another holds its name.
    pub fn is_name_taken(&self) -> bool {
        matches!(
            self,
            IdmError::Rejected {
                code: Code::AlreadyExists,
                ..
            }
        )
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
            // The connection broke under the call (the IDM restarting sends
            // GOAWAY and closes): tonic reports the HTTP/2 error as Internal.
            // Whether the call took effect is unknown, as for Unavailable;
            // commits are conditional, so one that did is found out on retry.
            Code::Internal if message.starts_with("h2 protocol error") => {
                IdmError::Unavailable(message)
            }
            Code::Unauthenticated => IdmError::Unauthenticated(message),
            Code::FailedPrecondition => {
                let kind = s
                    .metadata()
                    .get(idsync_proto::ERROR_KIND_HEADER)
                    .and_then(|v| v.to_str().ok());
                match kind {
                    Some("deletion-guard") => IdmError::MassDeletion(message),
                    Some("deletion-discarded") => IdmError::DeletionDiscarded(message),
                    _ => IdmError::Halted(message),
                }
            }
            code => IdmError::Rejected { code, message },
        }
    }
}

/// A batch member's result, as the error [`IdmClient::commit`] would give.
fn batch_result(r: v1::CommitResult) -> Result<Vec<u64>, IdmError> {
    if r.code == 0 {
        return Ok(r.versions);
    }
    let mut status = tonic::Status::new(Code::from(r.code), r.message);
    if let Ok(kind) = r.error_kind.parse() {
        status
            .metadata_mut()
            .insert(idsync_proto::ERROR_KIND_HEADER, kind);
    }
    Err(status.into())
}

/// Puts the credential on every call, as a sensitive header (never printed).
#[derive(Clone)]
pub struct Credential(AsciiMetadataValue);

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(***)")
    }
}

impl tonic::service::Interceptor for Credential {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        // The caller's span, so the IDM's work joins its trace.
        if let Some(tp) = idsync_telemetry::trace::current_traceparent()
            && let Ok(value) = tp.parse()
        {
            req.metadata_mut()
                .insert(idsync_telemetry::trace::TRACEPARENT, value);
        }
        Ok(req)
    }
}

type Transport = InterceptedService<Channel, Credential>;

/// Cheap to clone; clones share one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct IdmClient {
    raw: Raw<Transport>,
    /// When set, commits, shadow reads and focus searches made at the same
    /// time go to the IDM together ([`IdmClient::with_batching`]).
    batches: Option<Batches>,
}

#[derive(Debug, Clone)]
struct Batches {
    commits: batch::Batcher<v1::CommitRequest, Vec<u64>>,
    shadows: batch::Batcher<(String, String), Option<Shadow>>,
    finds: batch::Batcher<v1::FindFocusRequest, Vec<Focus>>,
}

impl IdmClient {
    /// A client for the IDM at `url`. Connects lazily, so a service can start
    /// before the IDM; calls fail with [`IdmError::Unavailable`] until it is up.
    ///
    /// # Errors
    /// [`IdmError::Url`] for a malformed URL.
    pub fn new(url: &str, credential: &Secret) -> Result<Self, IdmError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| IdmError::Url {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(30));
        // A credential that cannot be a header value is sent empty, and refused.
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", credential.expose()))
                .unwrap_or_else(|_| MetadataValue::from_static(""));
        value.set_sensitive(true);
        // As the IDM allows (tonic's default is 4 MB to receive): a group of
        // 50,000 members is a commit of about 4.3 MB and a focus of 2.3 MB.
        const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
        Ok(Self {
            raw: Raw::with_interceptor(endpoint.connect_lazy(), Credential(value))
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
            batches: None,
        })
    }

    /// This client, with the calls of concurrent callers gathered, up to
    /// `max_batch` at once: commits ([`IdmClient::commit`]) into one
    /// `CommitBatch` call and one write transaction, shadow reads
    /// ([`IdmClient::get_shadow`]) into `GetShadows`, focus searches
    /// ([`IdmClient::find_focus`]) into `FindFocusBatch` — what a worker
    /// handling many messages at once wants. Each caller gets the answer a
    /// call of its own would have had, once its batch is answered (a commit
    /// once its transaction is durable). Spawns tasks on the current tokio
    /// runtime; they end with the last clone of this client.
    #[must_use]
    pub fn with_batching(self, max_batch: usize) -> Self {
        let plain = Self {
            raw: self.raw.clone(),
            batches: None,
        };
        let (for_commits, for_shadows, for_finds) = (plain.clone(), plain.clone(), plain);
        let commits = batch::Batcher::spawn(
            max_batch,
            "commit",
            |r: &v1::CommitRequest| prost::Message::encoded_len(r),
            move |requests| {
                let idm = for_commits.clone();
                async move { idm.commit_batch(requests).await }
            },
        );
        let shadows = batch::Batcher::spawn(
            max_batch,
            "get_shadows",
            |(r, u): &(String, String)| r.len() + u.len(),
            move |keys| {
                let idm = for_shadows.clone();
                async move { idm.shadows_of(keys).await }
            },
        );
        let finds = batch::Batcher::spawn(
            // The IDM answers at most 1,000 searches a call.
            max_batch.min(1000),
            "find_focus",
            |q: &v1::FindFocusRequest| q.kind.len() + q.attribute.len() + q.value.len(),
            move |queries| {
                let idm = for_finds.clone();
                async move { idm.find_focus_batch(queries).await }
            },
        );
        Self {
            raw: self.raw,
            batches: Some(Batches {
                commits,
                shadows,
                finds,
            }),
        }
    }

    /// The shadow (or none) of each (resource, entry UUID), in as few
    /// `GetShadows` calls as there are resources and pages of 1,000.
    async fn shadows_of(
        &self,
        keys: Vec<(String, String)>,
    ) -> Result<Vec<Result<Option<Shadow>, IdmError>>, IdmError> {
        let mut by_resource: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (resource, uuid) in &keys {
            by_resource
                .entry(resource.as_str())
                .or_default()
                .push(uuid.clone());
        }
        let mut found = std::collections::HashMap::new();
        for (resource, uuids) in by_resource {
            for page in uuids.chunks(1000) {
                for s in self.get_shadows(resource, page.to_vec(), true).await? {
                    found.insert((s.resource.clone(), s.entry_uuid.clone()), s);
                }
            }
        }
        Ok(keys.iter().map(|k| Ok(found.get(k).cloned())).collect())
    }

    /// Many searches in one call, answered in order.
    async fn find_focus_batch(
        &self,
        queries: Vec<v1::FindFocusRequest>,
    ) -> Result<Vec<Result<Vec<Focus>, IdmError>>, IdmError> {
        let req = v1::FindFocusBatchRequest { queries };
        let r = self.raw.clone().find_focus_batch(req).await?.into_inner();
        Ok(r.results
            .into_iter()
            .map(|l| Ok(l.items.into_iter().map(Focus::from).collect()))
            .collect())
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
        if let Some(b) = &self.batches {
            return b.finds.run(req).await;
        }
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
        if let Some(b) = &self.batches {
            return b
                .shadows
                .run((resource.to_owned(), entry_uuid.to_owned()))
                .await;
        }
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

    /// The shadows of `entry_uuids` on `resource` that exist (at most 1,000 a call).
    /// Without `values`, each shadow comes without its attribute values.
    pub async fn get_shadows(
        &self,
        resource: &str,
        entry_uuids: Vec<String>,
        values: bool,
    ) -> Result<Vec<Shadow>, IdmError> {
        let req = v1::GetShadowsRequest {
            resource: resource.to_owned(),
            entry_uuids,
            without_values: !values,
        };
        let list = self.raw.clone().get_shadows(req).await?.into_inner();
        Ok(list.items.into_iter().map(Shadow::from).collect())
    }

    /// Who refers to role `role`: (ids of focus objects assigned it, names
    /// of roles that include it).
    pub async fn role_referrers(&self, role: &str) -> Result<(Vec<String>, Vec<String>), IdmError> {
        let req = v1::RoleReferrersRequest {
            role: role.to_owned(),
        };
        let r = self.raw.clone().role_referrers(req).await?.into_inner();
        Ok((r.holder_ids, r.including_roles))
    }

    /// The role named `name`, if there is one.
    pub async fn get_role(&self, name: &str) -> Result<Option<Focus>, IdmError> {
        let found = self
            .find_focus(
                idsync_core::model::KIND_ROLE,
                idsync_core::model::NAME_ATTRIBUTE,
                name,
            )
            .await?;
        Ok(found.into_iter().next())
    }

    /// The roles `focus` holds, with those they include (those that do not
    /// exist are left out: `constructions` names them).
    pub async fn roles_of(&self, focus: &Focus) -> Result<idsync_core::outbound::Roles, IdmError> {
        use idsync_core::outbound::{Roles, missing_roles};
        let mut roles = Roles::new();
        let mut absent = std::collections::BTreeSet::new();
        loop {
            let missing: Vec<String> = missing_roles(focus, &roles)
                .into_iter()
                .filter(|r| !absent.contains(r))
                .collect();
            if missing.is_empty() {
                return Ok(roles);
            }
            for name in missing {
                match self.get_role(&name).await? {
                    Some(role) => {
                        roles.insert(name, role);
                    }
                    None => {
                        absent.insert(name);
                    }
                }
            }
        }
    }

    /// How many live shadows `resource` has.
    pub async fn live_shadows(&self, resource: &str) -> Result<u64, IdmError> {
        let req = v1::CountShadowsRequest {
            resource: resource.to_owned(),
        };
        Ok(self.raw.clone().count_shadows(req).await?.into_inner().live)
    }

    /// Up to `limit` shadows of `resource` after `after`, in entry UUID
    /// order, without their attribute values (identity, DN, state, CSN, link).
    pub async fn shadow_summaries(
        &self,
        resource: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<Shadow>, IdmError> {
        let req = v1::ListShadowsRequest {
            resource: resource.to_owned(),
            after_entry_uuid: after.to_owned(),
            limit,
            without_values: true,
        };
        let page = self.raw.clone().list_shadows(req).await?.into_inner().items;
        Ok(page.into_iter().map(Shadow::from).collect())
    }

    pub async fn all_shadows(&self, resource: &str) -> Result<Vec<Shadow>, IdmError> {
        let mut out: Vec<Shadow> = Vec::new();
        loop {
            let req = v1::ListShadowsRequest {
                resource: resource.to_owned(),
                after_entry_uuid: out.last().map(|s| s.entry_uuid.clone()).unwrap_or_default(),
                limit: 500,
                without_values: false,
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

    /// Commits `ops` atomically; returns the new versions in order. On a
    /// batching client ([`IdmClient::with_batching`]) the commit may share
    /// its transaction with others made meanwhile, each checked as if alone.
    ///
    /// # Errors
    /// [`IdmError::Conflict`] when a version read is no longer current.
    pub async fn commit(&self, ops: Vec<Op>, origin_resource: &str) -> Result<Vec<u64>, IdmError> {
        let req = v1::CommitRequest {
            operations: ops.into_iter().map(v1::Operation::from).collect(),
            origin_resource: origin_resource.to_owned(),
            // The caller's span, for a batch whose call is nobody's: its
            // change's outbox records join its trace.
            trace_parent: idsync_telemetry::trace::current_traceparent().unwrap_or_default(),
        };
        if let Some(b) = &self.batches {
            return b.commits.run(req).await;
        }
        Ok(self.raw.clone().commit(req).await?.into_inner().versions)
    }

    /// Commits many in one call and one write transaction on the IDM. Each
    /// is checked exactly as [`IdmClient::commit`] would, seeing those before
    /// it, and gets its own result; a refused one leaves nothing.
    ///
    /// # Errors
    /// The call as a whole failed: none of the commits is known to have
    /// taken effect (retry them; they are conditional).
    pub async fn commit_batch(
        &self,
        commits: Vec<v1::CommitRequest>,
    ) -> Result<Vec<Result<Vec<u64>, IdmError>>, IdmError> {
        let n = commits.len();
        let req = v1::CommitBatchRequest { commits };
        let results = self
            .raw
            .clone()
            .commit_batch(req)
            .await?
            .into_inner()
            .results;
        if results.len() != n {
            return Err(IdmError::Unavailable(format!(
                "the IDM answered {} results for a batch of {n}",
                results.len()
            )));
        }
        Ok(results.into_iter().map(batch_result).collect())
    }

    /// Runs `commits` (operations and origin resource) under agreement
    /// `agreement` and rolls them back; per commit, the versions or the refusal.
    pub async fn dry_run(
        &self,
        agreement: &str,
        commits: Vec<(Vec<Op>, String)>,
    ) -> Result<Vec<v1::DryRunResult>, IdmError> {
        let req = v1::DryRunRequest {
            agreement: agreement.to_owned(),
            commits: commits
                .into_iter()
                .map(|(ops, origin)| v1::CommitRequest {
                    operations: ops.into_iter().map(v1::Operation::from).collect(),
                    origin_resource: origin,
                    trace_parent: String::new(),
                })
                .collect(),
        };
        Ok(self.raw.clone().dry_run(req).await?.into_inner().results)
    }

    fn name(name: &str) -> v1::AgreementName {
        v1::AgreementName {
            name: name.to_owned(),
        }
    }

    pub async fn create_agreement(&self, name: &str) -> Result<v1::Agreement, IdmError> {
        Ok(self
            .raw
            .clone()
            .create_agreement(Self::name(name))
            .await?
            .into_inner())
    }

    pub async fn list_agreements(&self) -> Result<Vec<v1::Agreement>, IdmError> {
        let req = v1::ListAgreementsRequest {};
        Ok(self
            .raw
            .clone()
            .list_agreements(req)
            .await?
            .into_inner()
            .items)
    }

    pub async fn get_agreement(&self, name: &str) -> Result<v1::Agreement, IdmError> {
        Ok(self
            .raw
            .clone()
            .get_agreement(Self::name(name))
            .await?
            .into_inner())
    }

    /// A new token for `agreement`; the IDM shows it this once.
    pub async fn generate_token(&self, agreement: &str, label: &str) -> Result<Secret, IdmError> {
        let req = v1::GenerateTokenRequest {
            agreement: agreement.to_owned(),
            label: label.to_owned(),
        };
        let r = self.raw.clone().generate_token(req).await?.into_inner();
        Ok(Secret::new(r.token))
    }

    /// Revokes the token labelled `label`, or all when `None`.
    pub async fn destroy_token(
        &self,
        agreement: &str,
        label: Option<&str>,
    ) -> Result<v1::Agreement, IdmError> {
        let req = v1::DestroyTokenRequest {
            agreement: agreement.to_owned(),
            label: label.unwrap_or_default().to_owned(),
        };
        Ok(self.raw.clone().destroy_token(req).await?.into_inner())
    }

    pub async fn set_yield_attributes(
        &self,
        agreement: &str,
        attributes: &[String],
    ) -> Result<v1::Agreement, IdmError> {
        let req = v1::SetYieldAttributesRequest {
            agreement: agreement.to_owned(),
            attributes: attributes.to_vec(),
        };
        Ok(self
            .raw
            .clone()
            .set_yield_attributes(req)
            .await?
            .into_inner())
    }

    /// Returns how many entries were released.
    pub async fn finalise_agreement(&self, name: &str) -> Result<u64, IdmError> {
        let r = self
            .raw
            .clone()
            .finalise_agreement(Self::name(name))
            .await?;
        Ok(r.into_inner().entries)
    }

    /// Returns how many entries were deleted.
    pub async fn terminate_agreement(&self, name: &str) -> Result<u64, IdmError> {
        let r = self
            .raw
            .clone()
            .terminate_agreement(Self::name(name))
            .await?;
        Ok(r.into_inner().entries)
    }

    /// Records a failure of `agreement`; with `halt`, stops it there.
    pub async fn report_failure(
        &self,
        agreement: &str,
        failure: v1::AgreementFailure,
        halt: bool,
    ) -> Result<v1::Agreement, IdmError> {
        let req = v1::ReportFailureRequest {
            agreement: agreement.to_owned(),
            failure: Some(failure),
        };
        let r = if halt {
            self.raw.clone().halt_agreement(req).await?
        } else {
            self.raw.clone().report_failure(req).await?
        };
        Ok(r.into_inner())
    }

    /// Lets `resource`'s deletions through its guard for one window.
    pub async fn accept_deletions(
        &self,
        agreement: &str,
        resource: &str,
    ) -> Result<v1::Agreement, IdmError> {
        let req = v1::GuardRequest {
            agreement: agreement.to_owned(),
            resource: resource.to_owned(),
            through_seq: 0,
        };
        Ok(self.raw.clone().accept_deletions(req).await?.into_inner())
    }

    /// Skips `resource`'s deletions from changes up to `through_seq`.
    pub async fn discard_deletions(
        &self,
        agreement: &str,
        resource: &str,
        through_seq: u64,
    ) -> Result<v1::Agreement, IdmError> {
        let req = v1::GuardRequest {
            agreement: agreement.to_owned(),
            resource: resource.to_owned(),
            through_seq,
        };
        Ok(self.raw.clone().discard_deletions(req).await?.into_inner())
    }

    pub async fn resume_agreement(&self, name: &str) -> Result<v1::Agreement, IdmError> {
        Ok(self
            .raw
            .clone()
            .resume_agreement(Self::name(name))
            .await?
            .into_inner())
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
    // The agreement's remapping of this entry replaces correlation: its id,
    // or its name, says which focus is its own.
    let remapped = if owner.is_some() || change.is_delete() {
        false
    } else if let Some(id) = config.mapped_id(&change.resource, &change.entry_uuid) {
        candidates.extend(idm.get_focus(id).await?);
        true
    } else if let Some(name) = config.mapped_name(&change.resource, &change.entry_uuid) {
        let kind = if is_group { KIND_GROUP } else { KIND_USER };
        candidates = idm.find_focus(kind, "name", name).await?;
        true
    } else {
        false
    };
    if owner.is_none() && !change.is_delete() && is_group && !remapped {
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
    if owner.is_none() && !change.is_delete() && !is_group && !remapped {
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

/// For a group, who owns each member it names, by DN or by uid (the store
/// resolves the rest when their accounts arrive).
///
/// # Errors
/// An IDM call failed, a member value is not UTF-8, or the resource is not configured.
pub async fn memberships(
    config: &Config,
    idm: &IdmClient,
    change: &SourceChange,
) -> Result<Vec<(MemberRef, Option<String>)>, CorrelateError> {
    if change.is_delete() || change.object_type != ObjectType::Group {
        return Ok(Vec::new());
    }
    let resource = config.resource(&change.resource)?;
    let Some(groups) = resource.groups.as_ref() else {
        return Ok(Vec::new());
    };
    let mut refs: Vec<MemberRef> = utf8_values(change, &groups.member_attribute, "members")?
        .into_iter()
        .map(|dn| MemberRef {
            resource: change.resource.clone(),
            dn,
            uid: String::new(),
        })
        .collect();
    if let Some(attribute) = &groups.member_uid_attribute {
        refs.extend(
            utf8_values(change, attribute, "members")?
                .into_iter()
                .map(|uid| MemberRef {
                    resource: change.resource.clone(),
                    dn: String::new(),
                    uid,
                }),
        );
    }
    let owners = idm.resolve_members(&refs).await?;
    Ok(refs.into_iter().zip(owners).collect())
}

#[derive(Debug, thiserror::Error)]
pub enum CorrelateError {
    #[error(transparent)]
    Idm(#[from] IdmError),
    #[error(transparent)]
    Core(#[from] idsync_core::CoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_transient_and_an_internal_error_of_the_idm_is_not() {
        // What tonic makes of an HTTP/2 error when the IDM closes the
        // connection under a call (seen while it restarted).
        let broken = IdmError::from(tonic::Status::internal(
            "h2 protocol error: error reading a body from connection",
        ));
        assert!(broken.is_transient(), "{broken:?}");
        let refused = IdmError::from(tonic::Status::internal("the store failed"));
        assert!(!refused.is_transient(), "{refused:?}");
        assert!(
            matches!(
                refused,
                IdmError::Rejected {
                    code: Code::Internal,
                    ..
                }
            ),
            "{refused:?}"
        );
    }

    /// An IDM that cannot be reached fails every caller of a batch with the
    /// same transient error (their messages are retried), and none waits
    /// for ever.
    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn an_unreachable_idm_fails_every_caller_of_a_batch_as_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let idm = IdmClient::new(&format!("http://127.0.0.1:{port}"), &Secret::new("x"))
            .unwrap()
            .with_batching(4);
        let calls = (0..6).map(|_| idm.commit(Vec::new(), "hr"));
        for r in futures::future::join_all(calls).await {
            let e = r.unwrap_err();
            assert!(e.is_transient(), "{e:?}");
        }
        let e = idm.get_shadow("hr", "u").await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        let e = idm.find_focus("user", "name", "n").await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
    }
}
