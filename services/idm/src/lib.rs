//! The IDM: the identity repository behind a gRPC API. It holds focus
//! objects, shadows and links in the embedded store, commits conditionally,
//! and drains its transactional outbox to the focus stream.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idsync_bus::{Bus, names};
use idsync_core::config::Config;
use idsync_proto::v1;
use idsync_proto::v1::idm_server::{Idm, IdmServer};
use idsync_store::{Store, StoreError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("IDM listen address {addr:?}: {reason}")]
    Listen { addr: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("IDM gRPC server: {0}")]
    Serve(String),
}

/// Runs the IDM until `shutdown`: opens the store in `idm.data_dir`, serves
/// gRPC on `idm.listen`, and publishes committed changes from the outbox.
///
/// # Errors
/// The store cannot be opened or the address cannot be bound.
pub async fn run(config: Arc<Config>, shutdown: CancellationToken) -> Result<(), Error> {
    let addr: SocketAddr = config.idm.listen.parse().map_err(|e| Error::Listen {
        addr: config.idm.listen.clone(),
        reason: format!("{e}"),
    })?;
    let store = open_store(Path::new(&config.idm.data_dir)).await?;
    serve(store, addr, config.nats.url.clone(), shutdown).await
}

async fn open_store(dir: &Path) -> Result<Store, Error> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || Store::open(&dir))
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
    addr: SocketAddr,
    nats_url: String,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let outbox_ready = Arc::new(Notify::new());
    let service = IdmService {
        store: store.clone(),
        outbox_ready: outbox_ready.clone(),
    };
    let publisher = tokio::spawn(drain_outbox(
        store,
        nats_url,
        outbox_ready,
        shutdown.clone(),
    ));
    tracing::info!(%addr, "IDM listening");
    let result = tonic::transport::Server::builder()
        .add_service(IdmServer::new(service))
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
    outbox_ready: Arc<Notify>,
}

/// Maps a store error to the gRPC status the client's error enum reads.
fn status(e: StoreError) -> Status {
    match e {
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        StoreError::NameTaken { .. } => Status::already_exists(e.to_string()),
        StoreError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        StoreError::Corrupt(_) => Status::data_loss(e.to_string()),
        StoreError::Open { .. } | StoreError::Db(_) => Status::internal(e.to_string()),
    }
}

impl IdmService {
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

#[tonic::async_trait]
impl Idm for IdmService {
    async fn get_focus(
        &self,
        req: Request<v1::GetFocusRequest>,
    ) -> Result<Response<v1::Focus>, Status> {
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
        let r = req.into_inner();
        let items = self
            .blocking(move |s| s.find_focus(&r.kind, &r.attribute, &r.value))
            .await?;
        Ok(Response::new(v1::FocusList { items }))
    }

    async fn list_focus(
        &self,
        req: Request<v1::ListFocusRequest>,
    ) -> Result<Response<v1::FocusList>, Status> {
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
        let r = req.into_inner();
        let limit = (r.limit as usize).clamp(1, MAX_PAGE);
        let items = self
            .blocking(move |s| s.list_shadows(&r.resource, &r.after_entry_uuid, limit))
            .await?;
        Ok(Response::new(v1::ShadowList { items }))
    }

    async fn resolve_members(
        &self,
        req: Request<v1::ResolveMembersRequest>,
    ) -> Result<Response<v1::ResolveMembersResponse>, Status> {
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
        let limit = (req.into_inner().limit as usize).clamp(1, 10_000);
        let items = self.blocking(move |s| s.list_cases(limit)).await?;
        Ok(Response::new(v1::ShadowList { items }))
    }

    async fn commit(
        &self,
        req: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let r = req.into_inner();
        let versions = self
            .blocking(move |s| s.commit(&r.operations, &r.origin_resource))
            .await?;
        self.outbox_ready.notify_one();
        Ok(Response::new(v1::CommitResponse { versions }))
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
        let ack = bus
            .publish(
                names::FOCUS_SUBJECT,
                &format!("focus:{}:{seq}", store.instance()),
                bytes::Bytes::from(payload.clone()),
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
