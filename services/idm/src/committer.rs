//! Group commit: concurrent `Commit` calls share write transactions.
//!
//! Every commit is a write transaction, and writers take turns (redb has one
//! writer; the PostgreSQL store takes one advisory lock), so each call would
//! otherwise pay a whole durable write of its own. One blocking task takes
//! the commits waiting in its queue — those that arrived while the previous
//! batch was being written — and hands them to `Store::commit_batch`, which
//! applies each exactly as alone and reports each its own result. A lone
//! call is a batch of one: nothing waits for company.

use idsync_proto::v1;
use idsync_store::{Store, StoreError, Writer};
use tokio::sync::{mpsc, oneshot};

/// Commits in one transaction at most.
const MAX_BATCH: usize = 128;
/// Calls waiting for the committer at most; more wait to be queued.
const QUEUE: usize = 1024;

struct Job {
    ops: Vec<v1::Operation>,
    origin: String,
    writer: Writer,
    reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

/// The queue in front of the committing task; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    queue: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("ops", &self.ops.len())
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Committer {
    /// Starts the committing task over `store`; it ends once every clone of
    /// the returned committer is dropped, releasing the store.
    pub(crate) fn start(store: Store) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let task = tokio::task::spawn_blocking(move || run(&store, jobs));
        (Self { queue }, task)
    }

    /// Commits `ops` as `writer`, in the next batch.
    ///
    /// # Errors
    /// The commit's own refusal, or the database's failure.
    pub(crate) async fn commit(
        &self,
        ops: Vec<v1::Operation>,
        origin: String,
        writer: Writer,
    ) -> Result<Vec<u64>, StoreError> {
        let (reply, result) = oneshot::channel();
        let job = Job {
            ops,
            origin,
            writer,
            reply,
        };
        let stopped = || StoreError::Unavailable("the IDM is stopping".into());
        self.queue.send(job).await.map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

fn run(store: &Store, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        idsync_telemetry::metrics::observe(
            "idsync_idm_commit_batch_size",
            "Commits written in one transaction by the IDM's group commit.",
            &[],
            batch.len() as f64,
        );
        let commits: Vec<(&[v1::Operation], &str, &Writer)> = batch
            .iter()
            .map(|j| (j.ops.as_slice(), j.origin.as_str(), &j.writer))
            .collect();
        let results = store.commit_batch(&commits);
        drop(commits);
        match results {
            Ok(results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                // Nothing of this batch was written: every caller learns why.
                let reason = e.to_string();
                for job in batch {
                    let copy = match &e {
                        StoreError::Unavailable(_) => StoreError::Unavailable(reason.clone()),
                        _ => StoreError::Db(reason.clone()),
                    };
                    let _ = job.reply.send(Err(copy));
                }
            }
        }
    }
}
