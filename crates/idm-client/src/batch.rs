//! Calls made at the same time by many tasks (a worker's messages in hand)
//! gathered into one call to the IDM: the task takes what queued while the
//! last call was out, sends it as one, and hands each caller its own result.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::IdmError;

/// A batch's encoded size at most (the client sends up to 64 MiB).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Batch calls in flight at once: the IDM decodes the next while it serves one.
const IN_FLIGHT: usize = 2;

type Reply<R> = oneshot::Sender<Result<R, IdmError>>;

/// Gathers requests `Q` into calls answering each with an `R`. Cheap to
/// clone; the clones share one task, which ends with the last clone.
pub(crate) struct Batcher<Q, R> {
    jobs: mpsc::Sender<(Q, Reply<R>)>,
}

impl<Q, R> Clone for Batcher<Q, R> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
        }
    }
}

impl<Q, R> std::fmt::Debug for Batcher<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batcher")
    }
}

impl<Q: Send + 'static, R: Send + 'static> Batcher<Q, R> {
    /// Sends at most `max_batch` requests (and about 16 MiB, by `size`) in
    /// one `call`, which answers them in order; `name` labels the batch-size
    /// metric. Spawns its task on the current tokio runtime.
    pub(crate) fn spawn<F, Fut>(
        max_batch: usize,
        name: &'static str,
        size: fn(&Q) -> usize,
        call: F,
    ) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, IdmError>>, IdmError>> + Send + 'static,
    {
        let max_batch = max_batch.clamp(1, 1024);
        let (jobs, queue) = mpsc::channel(max_batch * 2);
        tokio::spawn(gather(queue, max_batch, name, size, call));
        Self { jobs }
    }

    /// `request`'s own answer, once the call it went out in is answered.
    ///
    /// # Errors
    /// The IDM's refusal of this request, or the failure of the whole call.
    pub(crate) async fn run(&self, request: Q) -> Result<R, IdmError> {
        let (reply, result) = oneshot::channel();
        let gone = || IdmError::Unavailable("the IDM call batcher has stopped".into());
        self.jobs.send((request, reply)).await.map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }
}

async fn gather<Q, R, F, Fut>(
    mut queue: mpsc::Receiver<(Q, Reply<R>)>,
    max_batch: usize,
    name: &'static str,
    size: fn(&Q) -> usize,
    call: F,
) where
    Q: Send + 'static,
    R: Send + 'static,
    F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<Result<R, IdmError>>, IdmError>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = size(&first.0);
        let mut jobs = vec![first];
        while jobs.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(job) => {
                    bytes += size(&job.0);
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        idsync_telemetry::metrics::observe(
            "idsync_idm_batch_size",
            "Requests sent to the IDM in one batched call, by call.",
            &[("call", name)],
            jobs.len() as f64,
        );
        let (requests, replies): (Vec<Q>, Vec<Reply<R>>) = jobs.into_iter().unzip();
        let answer = call(requests);
        tokio::spawn(async move {
            let _slot = slot;
            let answer = answer.await.and_then(|results| {
                if results.len() == replies.len() {
                    Ok(results)
                } else {
                    Err(IdmError::Unavailable(format!(
                        "the IDM answered {} of a batch of {}",
                        results.len(),
                        replies.len()
                    )))
                }
            });
            match answer {
                Ok(results) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
                // The whole call failed: every caller gets its failure.
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
