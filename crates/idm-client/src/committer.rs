//! Group commit on the caller's side: commits made at the same time by many
//! tasks (the applier's messages in hand) go to the IDM together, as one
//! `CommitBatch` call and one write transaction, and each caller gets its
//! own result once that transaction is durable. Nothing is acknowledged
//! before its commit: a caller's message is settled only after its result.

use std::sync::Arc;

use idsync_core::model::Op;
use idsync_proto::v1;
use prost::Message as _;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{IdmClient, IdmError};

/// A batch's encoded size at most (the client sends up to 64 MiB).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Batch calls in flight at once: the IDM decodes the next while it writes one.
const IN_FLIGHT: usize = 2;

struct Job {
    request: v1::CommitRequest,
    reply: oneshot::Sender<Result<Vec<u64>, IdmError>>,
}

/// Gathers concurrent commits into batches. Cheap to clone; the clones share
/// one batching task, which ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
}

impl Committer {
    /// Commits through `idm`, at most `max_batch` in one call (at least 1).
    /// Spawns its task on the current tokio runtime.
    pub fn new(idm: IdmClient, max_batch: usize) -> Self {
        let max_batch = max_batch.clamp(1, 1024);
        let (jobs, queue) = mpsc::channel(max_batch * 2);
        tokio::spawn(run(idm, queue, max_batch));
        Self { jobs }
    }

    /// As [`IdmClient::commit`]; the commit may share its transaction with
    /// others made meanwhile, each checked as if alone.
    ///
    /// # Errors
    /// As [`IdmClient::commit`].
    pub async fn commit(&self, ops: Vec<Op>, origin_resource: &str) -> Result<Vec<u64>, IdmError> {
        let request = v1::CommitRequest {
            operations: ops.into_iter().map(v1::Operation::from).collect(),
            origin_resource: origin_resource.to_owned(),
            // The caller's span: its change's outbox records join its trace.
            trace_parent: idsync_telemetry::trace::current_traceparent().unwrap_or_default(),
        };
        let (reply, result) = oneshot::channel();
        let gone = || IdmError::Unavailable("the commit batcher has stopped".into());
        self.jobs
            .send(Job { request, reply })
            .await
            .map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }
}

/// Takes what queued while the last batch was being written, up to the
/// limits, and sends it as the next batch.
async fn run(idm: IdmClient, mut queue: mpsc::Receiver<Job>, max_batch: usize) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.request.encoded_len();
        let mut jobs = vec![first];
        while jobs.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(job) => {
                    bytes += job.request.encoded_len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let idm = idm.clone();
        tokio::spawn(async move {
            let _slot = slot;
            send(&idm, jobs).await;
        });
    }
}

/// One batch call; every caller gets its own result, or the call's failure.
async fn send(idm: &IdmClient, jobs: Vec<Job>) {
    idsync_telemetry::metrics::observe(
        "idsync_commit_batch_size",
        "Commits sent to the IDM in one batch.",
        &[],
        jobs.len() as f64,
    );
    let (requests, replies): (Vec<_>, Vec<_>) =
        jobs.into_iter().map(|j| (j.request, j.reply)).unzip();
    match idm.commit_batch(requests).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
