//! The IDM: the identity repository behind a gRPC API. It holds focus
//! objects, shadows and links in the embedded store, commits conditionally,
//! and drains its transactional outbox to the focus stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idsync_bus::{Bus, names};
use idsync_core::config::{Config, StoreKind};
use idsync_proto::v1;
use idsync_proto::v1::idm_server::{Idm, IdmServer};
use idsync_store::token::{self, AdminCredential, TokenError};
use idsync_store::{GuardLimits, Principal, Store, StoreError, Writer};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

mod status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("IDM listen address {addr:?}: {reason}")]
    Listen { addr: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("IDM gRPC server: {0}")]
    Serve(String),
    #[error(transparent)]
    Config(#[from] idsync_runtime::ConfigError),
}

/// What the IDM knows of its configuration: who may call it and which
/// agreement each resource writes under.
#[derive(Debug, Clone)]
pub struct Authority {
    admin: AdminCredential,
    /// Resource → agreement.
    owners: Arc<BTreeMap<String, String>>,
    /// Agreement → the resources that write under it.
    resources: Arc<BTreeMap<String, Vec<String>>>,
    /// Agreements whose configuration lets them adopt native entries.
    adopters: Arc<std::collections::BTreeSet<String>>,
    /// Resource → its deletion thresholds.
    guards: Arc<BTreeMap<String, GuardLimits>>,
}

impl Authority {
    /// # Errors
    /// The administrator credential is not configured or cannot be read.
    pub fn from_config(config: &Config) -> Result<Self, Error> {
        let credential = idsync_runtime::admin_token(config)?;
        let admin = AdminCredential::new(credential.expose()).map_err(Error::Serve)?;
        let mut owners = BTreeMap::new();
        let mut resources: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in &config.resources {
            if let Some(a) = &r.agreement {
                owners.insert(r.name.clone(), a.clone());
                resources.entry(a.clone()).or_default().push(r.name.clone());
            }
        }
        let adopters = config
            .agreements
            .iter()
            .filter(|(_, a)| a.adopt_native)
            .map(|(n, _)| n.clone())
            .collect();
        let guards = config
            .resources
            .iter()
            .filter_map(|r| {
                let g = r.deletion_guard.as_ref()?;
                let limits = GuardLimits {
                    max_count: g.max_count,
                    max_share: g.max_share,
                    window_ms: i64::try_from(g.window_seconds.saturating_mul(1000))
                        .unwrap_or(i64::MAX),
                };
                Some((r.name.clone(), limits))
            })
            .collect();
        Ok(Self {
            admin,
            owners: Arc::new(owners),
            resources: Arc::new(resources),
            adopters: Arc::new(adopters),
            guards: Arc::new(guards),
        })
    }
}

/// Runs the IDM until `shutdown`: opens the store (embedded in
/// `idm.data_dir`, or the PostgreSQL database of `idm.postgres_url_*`), serves
/// gRPC on `idm.listen`, and publishes committed changes from the outbox.
///
/// # Errors
/// The store cannot be opened or the address cannot be bound.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    let addr: SocketAddr = config.idm.listen.parse().map_err(|e| Error::Listen {
        addr: config.idm.listen.clone(),
        reason: format!("{e}"),
    })?;
    let authority = Authority::from_config(&config)?;
    let store = match config.idm.store {
        StoreKind::Embedded => {
            let cache = config.idm.cache_mib as usize * 1024 * 1024;
            open_store(Path::new(&config.idm.data_dir), cache).await?
        }
        StoreKind::Postgres => {
            let url = idsync_runtime::postgres_url(&config)?;
            let store = tokio::task::spawn_blocking(move || Store::open_postgres(url.expose()))
                .await
                .map_err(|e| Error::Serve(e.to_string()))??;
            tracing::info!(
                instance = store.instance(),
                "store: PostgreSQL database opened"
            );
            store
        }
    };
    // Correlation searches by attribute values: answered from an index,
    // built now for an attribute the configuration newly searches by.
    let searched = searched_attributes(&config);
    let indexing = store.clone();
    let built = tokio::task::spawn_blocking(move || indexing.index_attributes(&searched))
        .await
        .map_err(|e| Error::Serve(e.to_string()))??;
    if !built.is_empty() {
        tracing::info!(attributes = ?built, "correlation index built");
    }
    let listeners = status::start(&config, &store, &shutdown).await?;
    let result = serve(
        store,
        authority,
        addr,
        config.nats.url.clone(),
        shutdown.clone(),
    )
    .await;
    // The status listeners close before the service returns.
    shutdown.cancel();
    for task in listeners {
        let _ = task.await;
    }
    result
}

/// The focus attributes correlation rules search by (each rule's first
/// condition: the others narrow what it found).
fn searched_attributes(config: &Config) -> std::collections::BTreeSet<String> {
    config
        .resources
        .iter()
        .flat_map(|r| &r.correlation)
        .filter_map(|rule| rule.conditions.first())
        .map(|c| c.focus_attribute.clone())
        .collect()
}

async fn open_store(dir: &Path, cache_bytes: usize) -> Result<Store, Error> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || Store::open_with_cache(&dir, cache_bytes))
        .await
        .map_err(|e| Error::Serve(e.to_string()))?
        .map_err(Error::from)
}

/// Serves `store` on `addr` and drains its outbox to NATS at `nats_url`.
///
/// # Errors
/// The address cannot be bound or the server fails.
pub async fn serve(
    store: Store,
    authority: Authority,
    addr: SocketAddr,
    nats_url: String,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let outbox_ready = Arc::new(Notify::new());
    let service = IdmService {
        store: store.clone(),
        authority,
        outbox_ready: outbox_ready.clone(),
    };
    let publisher = tokio::spawn(drain_outbox(
        store,
        nats_url,
        outbox_ready,
        shutdown.clone(),
    ));
    tracing::info!(%addr, "IDM listening");
    idsync_telemetry::health::set_ready(true);
    // tonic takes requests of at most 4 MB by default; a commit of a group
    // carries every member twice (the focus and its shadow's snapshot), about
    // 4.3 MB for 50,000 members. The clients allow as much (IdmClient::new).
    const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;
    let service = IdmServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let result = tonic::transport::Server::builder()
        .trace_fn(call_span)
        .add_service(service)
        .serve_with_shutdown(addr, shutdown.clone().cancelled_owned())
        .await
        .map_err(|e| Error::Listen {
            addr: addr.to_string(),
            reason: format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ),
        });
    shutdown.cancel();
    let _ = publisher.await;
    result
}

#[derive(Debug, Clone)]
struct IdmService {
    store: Store,
    authority: Authority,
    outbox_ready: Arc<Notify>,
}

/// A FAILED_PRECONDITION that says which one in the `idsync-error` header.
fn tagged(kind: &'static str, e: &StoreError) -> Status {
    let mut status = Status::failed_precondition(e.to_string());
    status.metadata_mut().insert(
        idsync_proto::ERROR_KIND_HEADER,
        tonic::metadata::MetadataValue::from_static(kind),
    );
    status
}

/// Maps a store error to the gRPC status the client's error enum reads.
fn status(e: StoreError) -> Status {
    match e {
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        StoreError::NameTaken { .. } | StoreError::AgreementExists { .. } => {
            Status::already_exists(e.to_string())
        }
        StoreError::NotOwned { .. } | StoreError::Yielded { .. } => {
            Status::permission_denied(e.to_string())
        }
        StoreError::Halted { .. } => tagged("halted", &e),
        StoreError::MassDeletion { .. } => tagged("deletion-guard", &e),
        StoreError::DeletionDiscarded { .. } => tagged("deletion-discarded", &e),
        StoreError::NoAgreement { .. } => Status::not_found(e.to_string()),
        StoreError::Invalid { .. } | StoreError::Schema { .. } | StoreError::BadRequest(_) => {
            Status::invalid_argument(e.to_string())
        }
        StoreError::Corrupt(_) => Status::data_loss(e.to_string()),
        StoreError::Unavailable(_) => Status::unavailable(e.to_string()),
        StoreError::Open { .. } | StoreError::Db(_) => Status::internal(e.to_string()),
    }
}

const NEEDS_ADMIN: &str =
    "this call needs the administrator credential; a sync token cannot make it";

impl IdmService {
    /// Who presents the request's credential. Errors name the problem, never
    /// the credential.
    async fn principal<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let refuse = |e: TokenError| {
            if let TokenError::Unavailable(_) = e {
                return Status::unavailable(e.to_string());
            }
            tracing::warn!(reason = %e, "refused a credential");
            Status::unauthenticated(e.to_string())
        };
        let value = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| refuse(TokenError::Missing))?;
        let value = value.to_str().map_err(|_| refuse(TokenError::Malformed))?;
        let credential = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| refuse(TokenError::Missing))?
            .trim();
        if credential.is_empty() {
            return Err(refuse(TokenError::Missing));
        }
        if credential.starts_with(&format!("{}.", token::SYNC_PREFIX)) {
            if self.store.shares_database() {
                // Every check reads the database (the revocation count, at
                // least): off the async runtime.
                let store = self.store.clone();
                let credential = credential.to_owned();
                return tokio::task::spawn_blocking(move || store.authenticate(&credential))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(refuse);
            }
            // A token seen before is answered from memory; only its first use
            // reads the store (briefly, on this thread).
            return self.store.authenticate(credential).map_err(refuse);
        }
        if self.authority.admin.matches(credential) {
            Ok(Principal::Admin)
        } else {
            Err(refuse(TokenError::BadAdmin))
        }
    }

    async fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.principal(req).await? {
            Principal::Admin => Ok(()),
            Principal::Agreement(_) => Err(Status::permission_denied(NEEDS_ADMIN)),
        }
    }

    /// An administrator, or agreement `name`'s own token.
    async fn admin_or_own<T>(&self, req: &Request<T>, name: &str) -> Result<(), Status> {
        match self.principal(req).await? {
            Principal::Admin => Ok(()),
            Principal::Agreement(a) if a == name => Ok(()),
            Principal::Agreement(a) => Err(Status::permission_denied(format!(
                "the token belongs to agreement {a:?}, not {name:?}"
            ))),
        }
    }

    fn writer(&self, principal: Principal) -> Writer {
        let may_adopt = match &principal {
            Principal::Agreement(a) => self.authority.adopters.contains(a),
            Principal::Admin => false,
        };
        Writer {
            principal,
            owners: self.authority.owners.clone(),
            may_adopt,
            guards: self.authority.guards.clone(),
            // The call's span (see `call_span`) continues its caller's trace.
            trace_parent: idsync_telemetry::trace::current_traceparent(),
        }
    }

    /// Whether `principal` may commit changes of `resource`: an
    /// administrator may; a token only for the resources its agreement owns.
    fn may_write_for(&self, principal: &Principal, resource: &str) -> Result<(), Status> {
        let Principal::Agreement(a) = principal else {
            return Ok(());
        };
        let owner = self.authority.owners.get(resource);
        if owner == Some(a) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "the token belongs to agreement {a:?}, but resource {resource:?} writes under {}",
            owner.map_or("no agreement".to_owned(), |o| format!("agreement {o:?}"))
        )))
    }

    /// Runs a blocking store call off the async runtime.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)
    }
}

const MAX_PAGE: usize = 1000;

/// Whether `s` is a W3C traceparent (`00-<32 hex>-<16 hex>-<2 hex>`): what a
/// caller sends is kept with outbox records only in that shape.
fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    matches!(parts.as_slice(), [v, t, p, f]
        if [(v, 2), (t, 32), (p, 16), (f, 2)]
            .iter()
            .all(|(x, n)| x.len() == *n && x.bytes().all(|b| b.is_ascii_hexdigit())))
}

/// `writer`, its outbox records in the trace of the change behind the
/// commit when the caller named one.
fn traced(mut writer: Writer, trace_parent: &str) -> Writer {
    if is_traceparent(trace_parent) {
        writer.trace_parent = Some(trace_parent.to_owned());
    }
    writer
}

/// Shadows as reconciliation reads them: without their attribute values.
fn strip_values(shadows: &mut [v1::Shadow]) {
    for s in shadows {
        s.attributes.clear();
    }
}

/// Refuses a call asking for more than `limit` `what`s at once.
fn at_most(n: usize, limit: usize, what: &str) -> Result<(), Status> {
    if n > limit {
        return Err(Status::invalid_argument(format!(
            "at most {limit} {what} a call, not {n}"
        )));
    }
    Ok(())
}

/// Commits in one `CommitBatch` call at most.
const MAX_BATCH: usize = 1024;

/// A batch member's outcome, as `Commit` would have returned it.
fn commit_result(r: Result<Vec<u64>, Status>) -> v1::CommitResult {
    match r {
        Ok(versions) => v1::CommitResult {
            versions,
            ..Default::default()
        },
        Err(s) => v1::CommitResult {
            versions: Vec::new(),
            code: s.code() as i32,
            message: s.message().to_owned(),
            error_kind: s
                .metadata()
                .get(idsync_proto::ERROR_KIND_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        },
    }
}

#[tonic::async_trait]
impl Idm for IdmService {
    async fn get_focus(
        &self,
        req: Request<v1::GetFocusRequest>,
    ) -> Result<Response<v1::Focus>, Status> {
        self.principal(&req).await?;
        let id = req.into_inner().id;
        let shown = id.clone();
        self.blocking(move |s| s.get_focus(&id))
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no focus {shown}")))
    }

    async fn find_focus(
        &self,
        req: Request<v1::FindFocusRequest>,
    ) -> Result<Response<v1::FocusList>, Status> {
        self.principal(&req).await?;
        let r = req.into_inner();
        let items = self
            .blocking(move |s| s.find_focus(&r.kind, &r.attribute, &r.value))
            .await?;
        Ok(Response::new(v1::FocusList { items }))
    }

    async fn find_focus_batch(
        &self,
        req: Request<v1::FindFocusBatchRequest>,
    ) -> Result<Response<v1::FindFocusBatchResponse>, Status> {
        self.principal(&req).await?;
        let queries = req.into_inner().queries;
        at_most(queries.len(), MAX_PAGE, "queries")?;
        let results = self
            .blocking(move |s| {
                queries
                    .iter()
                    .map(|q| {
                        let items = s.find_focus(&q.kind, &q.attribute, &q.value)?;
                        Ok(v1::FocusList { items })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        Ok(Response::new(v1::FindFocusBatchResponse { results }))
    }

    async fn list_focus(
        &self,
        req: Request<v1::ListFocusRequest>,
    ) -> Result<Response<v1::FocusList>, Status> {
        self.principal(&req).await?;
        let r = req.into_inner();
        let limit = (r.limit as usize).clamp(1, MAX_PAGE);
        let items = self
            .blocking(move |s| s.list_focus(&r.kind, &r.after_id, limit))
            .await?;
        Ok(Response::new(v1::FocusList { items }))
    }

    async fn get_shadow(
        &self,
        req: Request<v1::ShadowKey>,
    ) -> Result<Response<v1::Shadow>, Status> {
        self.principal(&req).await?;
        let k = req.into_inner();
        let shown = format!("{}/{}", k.resource, k.entry_uuid);
        self.blocking(move |s| s.get_shadow(&k.resource, &k.entry_uuid))
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no shadow {shown}")))
    }

    async fn list_shadows(
        &self,
        req: Request<v1::ListShadowsRequest>,
    ) -> Result<Response<v1::ShadowList>, Status> {
        self.principal(&req).await?;
        let r = req.into_inner();
        let limit = (r.limit as usize).clamp(1, MAX_PAGE);
        let mut items = self
            .blocking(move |s| s.list_shadows(&r.resource, &r.after_entry_uuid, limit))
            .await?;
        if r.without_values {
            strip_values(&mut items);
        }
        Ok(Response::new(v1::ShadowList { items }))
    }

    async fn get_shadows(
        &self,
        req: Request<v1::GetShadowsRequest>,
    ) -> Result<Response<v1::ShadowList>, Status> {
        self.principal(&req).await?;
        let r = req.into_inner();
        at_most(r.entry_uuids.len(), MAX_PAGE, "shadows")?;
        let without_values = r.without_values;
        let mut items = self
            .blocking(move |s| s.get_shadows(&r.resource, &r.entry_uuids))
            .await?;
        if without_values {
            strip_values(&mut items);
        }
        Ok(Response::new(v1::ShadowList { items }))
    }

    async fn count_shadows(
        &self,
        req: Request<v1::CountShadowsRequest>,
    ) -> Result<Response<v1::ShadowCount>, Status> {
        self.principal(&req).await?;
        let r = req.into_inner();
        let live = self.blocking(move |s| s.live_shadows(&r.resource)).await?;
        Ok(Response::new(v1::ShadowCount { live }))
    }

    async fn role_referrers(
        &self,
        req: Request<v1::RoleReferrersRequest>,
    ) -> Result<Response<v1::RoleReferrersResponse>, Status> {
        self.principal(&req).await?;
        let r = req.into_inner();
        let (holder_ids, including_roles) =
            self.blocking(move |s| s.role_referrers(&r.role)).await?;
        Ok(Response::new(v1::RoleReferrersResponse {
            holder_ids,
            including_roles,
        }))
    }

    async fn resolve_members(
        &self,
        req: Request<v1::ResolveMembersRequest>,
    ) -> Result<Response<v1::ResolveMembersResponse>, Status> {
        self.principal(&req).await?;
        let r = req.into_inner();
        let focus_ids = self
            .blocking(move |s| s.resolve_members(&r.members))
            .await?;
        Ok(Response::new(v1::ResolveMembersResponse { focus_ids }))
    }

    async fn list_cases(
        &self,
        req: Request<v1::ListCasesRequest>,
    ) -> Result<Response<v1::ShadowList>, Status> {
        self.principal(&req).await?;
        let limit = (req.into_inner().limit as usize).clamp(1, 10_000);
        let items = self.blocking(move |s| s.list_cases(limit)).await?;
        Ok(Response::new(v1::ShadowList { items }))
    }

    async fn commit(
        &self,
        req: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let principal = self.principal(&req).await?;
        let r = req.into_inner();
        self.may_write_for(&principal, &r.origin_resource)?;
        let writer = traced(self.writer(principal), &r.trace_parent);
        let versions = self
            .blocking(move |s| s.commit(&r.operations, &r.origin_resource, &writer))
            .await?;
        self.outbox_ready.notify_one();
        Ok(Response::new(v1::CommitResponse { versions }))
    }

    async fn commit_batch(
        &self,
        req: Request<v1::CommitBatchRequest>,
    ) -> Result<Response<v1::CommitBatchResponse>, Status> {
        let principal = self.principal(&req).await?;
        let commits = req.into_inner().commits;
        at_most(commits.len(), MAX_BATCH, "commits")?;
        let base = self.writer(principal.clone());
        // Each commit's own span, in the trace of the change behind it (the
        // call's span belongs to no one change); they last as the batch does.
        let _spans: Vec<tracing::Span> = commits
            .iter()
            .filter(|c| is_traceparent(&c.trace_parent))
            .map(|c| {
                let span = tracing::info_span!(parent: None, "commit", service = "idm", origin = %c.origin_resource, batch = commits.len());
                idsync_telemetry::trace::set_parent(&span, &c.trace_parent);
                span
            })
            .collect();
        // A commit for a resource the token does not write for is refused
        // alone; the others go into the transaction.
        let mut results: Vec<Option<v1::CommitResult>> = Vec::with_capacity(commits.len());
        let mut batch = Vec::with_capacity(commits.len());
        for c in commits {
            match self.may_write_for(&principal, &c.origin_resource) {
                Ok(()) => {
                    let writer = traced(base.clone(), &c.trace_parent);
                    batch.push((c, writer));
                    results.push(None);
                }
                Err(status) => results.push(Some(commit_result(Err(status)))),
            }
        }
        let outcomes = self
            .blocking(move |s| {
                let refs: Vec<(&[v1::Operation], &str, &Writer)> = batch
                    .iter()
                    .map(|(c, w)| (c.operations.as_slice(), c.origin_resource.as_str(), w))
                    .collect();
                s.commit_batch(&refs)
            })
            .await?;
        self.outbox_ready.notify_one();
        let mut outcomes = outcomes.into_iter();
        let results = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    commit_result(
                        outcomes
                            .next()
                            .unwrap_or_else(|| Err(StoreError::Db("batch result missing".into())))
                            .map_err(status),
                    )
                })
            })
            .collect();
        Ok(Response::new(v1::CommitBatchResponse { results }))
    }

    async fn dry_run(
        &self,
        req: Request<v1::DryRunRequest>,
    ) -> Result<Response<v1::DryRunResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        let writer = self.writer(Principal::Agreement(r.agreement.clone()));
        let commits: Vec<(Vec<v1::Operation>, String)> = r
            .commits
            .into_iter()
            .map(|c| (c.operations, c.origin_resource))
            .collect();
        let results = self.blocking(move |s| s.dry_run(&commits, &writer)).await?;
        Ok(Response::new(v1::DryRunResponse {
            results: results
                .into_iter()
                .map(|r| match r {
                    Ok(versions) => v1::DryRunResult {
                        versions,
                        error: String::new(),
                    },
                    Err(e) => v1::DryRunResult {
                        versions: Vec::new(),
                        error: e.to_string(),
                    },
                })
                .collect(),
        }))
    }

    async fn create_agreement(
        &self,
        req: Request<v1::AgreementName>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.admin(&req).await?;
        let name = req.into_inner().name;
        let a = self.blocking(move |s| s.create_agreement(&name)).await?;
        tracing::info!(agreement = %a.name, "agreement created");
        Ok(Response::new(a))
    }

    async fn list_agreements(
        &self,
        req: Request<v1::ListAgreementsRequest>,
    ) -> Result<Response<v1::AgreementList>, Status> {
        self.admin(&req).await?;
        let items = self.blocking(Store::list_agreements).await?;
        Ok(Response::new(v1::AgreementList { items }))
    }

    async fn get_agreement(
        &self,
        req: Request<v1::AgreementName>,
    ) -> Result<Response<v1::Agreement>, Status> {
        let name = req.get_ref().name.clone();
        self.admin_or_own(&req, &name).await?;
        let shown = name.clone();
        self.blocking(move |s| s.get_agreement(&name))
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("agreement {shown:?} does not exist")))
    }

    async fn generate_token(
        &self,
        req: Request<v1::GenerateTokenRequest>,
    ) -> Result<Response<v1::GenerateTokenResponse>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        let (token, agreement) = self
            .blocking(move |s| s.generate_token(&r.agreement, &r.label))
            .await?;
        tracing::info!(agreement = %agreement.name, "sync token issued");
        Ok(Response::new(v1::GenerateTokenResponse {
            token,
            agreement: Some(agreement),
        }))
    }

    async fn destroy_token(
        &self,
        req: Request<v1::DestroyTokenRequest>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        let a = self
            .blocking(move |s| {
                let label = (!r.label.is_empty()).then_some(r.label.as_str());
                s.destroy_token(&r.agreement, label)
            })
            .await?;
        tracing::info!(agreement = %a.name, "sync token revoked");
        Ok(Response::new(a))
    }

    async fn set_yield_attributes(
        &self,
        req: Request<v1::SetYieldAttributesRequest>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        let a = self
            .blocking(move |s| s.set_yield_attributes(&r.agreement, &r.attributes))
            .await?;
        Ok(Response::new(a))
    }

    async fn finalise_agreement(
        &self,
        req: Request<v1::AgreementName>,
    ) -> Result<Response<v1::EndAgreementResponse>, Status> {
        self.admin(&req).await?;
        let name = req.into_inner().name;
        let shown = name.clone();
        let entries = self.blocking(move |s| s.finalise_agreement(&name)).await?;
        self.outbox_ready.notify_one();
        tracing::info!(agreement = %shown, entries, "agreement finalised: its entries are the IDM's now");
        Ok(Response::new(v1::EndAgreementResponse { entries }))
    }

    async fn terminate_agreement(
        &self,
        req: Request<v1::AgreementName>,
    ) -> Result<Response<v1::EndAgreementResponse>, Status> {
        self.admin(&req).await?;
        let name = req.into_inner().name;
        let shown = name.clone();
        let resources = self
            .authority
            .resources
            .get(&name)
            .cloned()
            .unwrap_or_default();
        let entries = self
            .blocking(move |s| s.terminate_agreement(&name, &resources))
            .await?;
        self.outbox_ready.notify_one();
        tracing::info!(agreement = %shown, entries, "agreement terminated: its entries are deleted");
        Ok(Response::new(v1::EndAgreementResponse { entries }))
    }

    async fn halt_agreement(
        &self,
        req: Request<v1::ReportFailureRequest>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.report(req, true).await
    }

    async fn report_failure(
        &self,
        req: Request<v1::ReportFailureRequest>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.report(req, false).await
    }

    async fn accept_deletions(
        &self,
        req: Request<v1::GuardRequest>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.guard(req, true).await
    }

    async fn discard_deletions(
        &self,
        req: Request<v1::GuardRequest>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.guard(req, false).await
    }

    async fn resume_agreement(
        &self,
        req: Request<v1::AgreementName>,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.admin(&req).await?;
        let name = req.into_inner().name;
        let a = self.blocking(move |s| s.resume_agreement(&name)).await?;
        tracing::info!(agreement = %a.name, "agreement resumed");
        Ok(Response::new(a))
    }
}

impl IdmService {
    async fn guard(
        &self,
        req: Request<v1::GuardRequest>,
        accept: bool,
    ) -> Result<Response<v1::Agreement>, Status> {
        self.admin(&req).await?;
        let r = req.into_inner();
        let Some(limits) = self.authority.guards.get(&r.resource).copied() else {
            return Err(Status::invalid_argument(format!(
                "resource {:?} has no deletion_guard in the IDM's configuration",
                r.resource
            )));
        };
        if self.authority.owners.get(&r.resource) != Some(&r.agreement) {
            return Err(Status::invalid_argument(format!(
                "resource {:?} does not write under agreement {:?}",
                r.resource, r.agreement
            )));
        }
        let shown = r.clone();
        let a = self
            .blocking(move |s| {
                if accept {
                    s.accept_deletions(&r.agreement, &r.resource, limits.window_ms)
                } else {
                    s.discard_deletions(&r.agreement, &r.resource, r.through_seq)
                }
            })
            .await?;
        tracing::warn!(agreement = %shown.agreement, resource = %shown.resource, accept, through_seq = shown.through_seq, "deletion guard: operator decision");
        Ok(Response::new(a))
    }

    async fn report(
        &self,
        req: Request<v1::ReportFailureRequest>,
        halt: bool,
    ) -> Result<Response<v1::Agreement>, Status> {
        let name = req.get_ref().agreement.clone();
        self.admin_or_own(&req, &name).await?;
        let failure = req.into_inner().failure.unwrap_or_default();
        let shown = failure.clone();
        let a = self
            .blocking(move |s| s.record_failure(&name, failure, halt))
            .await?;
        tracing::error!(agreement = %a.name, halted = a.halted, resource = %shown.resource, dn = %shown.dn, attribute = %shown.attribute, reason = %shown.reason, "agreement failure");
        Ok(Response::new(a))
    }
}

const OUTBOX_BATCH: usize = 512;

/// Publishes outbox records to the focus stream in commit order, deleting
/// them once JetStream has stored them. The outbox sequence is the message id,
/// so a record published twice (crash between publish and delete) is stored once.
async fn drain_outbox(
    store: Store,
    nats_url: String,
    ready: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut bus: Option<Bus> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let result = async {
            let bus = match &bus {
                Some(b) => b.clone(),
                None => {
                    let b = Bus::connect(&nats_url).await.map_err(|e| e.to_string())?;
                    bus = Some(b.clone());
                    b
                }
            };
            publish_batch(&store, &bus).await
        }
        .await;
        match result {
            Ok(0) => {
                backoff = Duration::from_millis(100);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = ready.notified() => {}
                    // A commit notified before we waited is caught here.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            Ok(_) => backoff = Duration::from_millis(100),
            Err(reason) => {
                tracing::warn!(%reason, retry_in_ms = backoff.as_millis() as u64, "outbox: publishing failed; will retry");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One span per gRPC call, a child of the caller's span when its metadata
/// carries a trace context.
fn call_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let span =
        tracing::info_span!(parent: None, "grpc", service = "idm", method = %req.uri().path());
    if let Some(tp) = req
        .headers()
        .get(idsync_telemetry::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
    {
        idsync_telemetry::trace::set_parent(&span, tp);
    }
    span
}

/// Publishes one batch; returns how many records it published.
async fn publish_batch(store: &Store, bus: &Bus) -> Result<usize, String> {
    let s = store.clone();
    let batch = tokio::task::spawn_blocking(move || s.outbox_batch(OUTBOX_BATCH))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let Some(&(last, _)) = batch.last() else {
        return Ok(0);
    };
    let mut pending = Vec::with_capacity(batch.len());
    for (seq, payload) in &batch {
        // The record carries the trace context of the commit that wrote it.
        let traceparent = idsync_telemetry::trace::enabled()
            .then(|| <v1::FocusChange as prost::Message>::decode(payload.as_slice()).ok())
            .flatten()
            .map(|c| c.traceparent)
            .filter(|t| !t.is_empty());
        let ack = bus
            .publish_traced(
                names::FOCUS_SUBJECT,
                &format!("focus:{}:{seq}", store.instance()),
                bytes::Bytes::from(payload.clone()),
                traceparent.as_deref(),
            )
            .await
            .map_err(|e| e.to_string())?;
        pending.push(ack);
    }
    for ack in pending {
        ack.wait().await.map_err(|e| e.to_string())?;
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.outbox_remove_through(last))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    tracing::debug!(records = batch.len(), through = last, "outbox: published");
    Ok(batch.len())
}

#[cfg(test)]
mod tests {
    use super::is_traceparent;

    #[test]
    fn only_a_w3c_traceparent_is_kept_from_a_commit() {
        assert!(is_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            &"a".repeat(100_000),
        ] {
            assert!(!is_traceparent(bad), "{bad:.60}");
        }
    }
}
