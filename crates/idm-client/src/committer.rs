//! Group commit on the caller's side: commits made at the same time by many
//! tasks (the applier's messages in hand) go to the IDM together, as one
//! `CommitBatch` call and one write transaction, and each caller gets its
//! own result once that transaction is durable. Nothing is acknowledged
//! before its commit: a caller's message is settled only after its result.

use idsync_core::model::Op;
use idsync_proto::v1;
use prost::Message as _;

use crate::batch::Batcher;
use crate::{IdmClient, IdmError};

/// Gathers concurrent commits into batches. Cheap to clone; the clones share
/// one batching task, which ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Committer {
    batches: Batcher<v1::CommitRequest, Vec<u64>>,
}

impl Committer {
    /// Commits through `idm`, at most `max_batch` in one call (1 to 1,024).
    /// Spawns its task on the current tokio runtime.
    pub fn new(idm: IdmClient, max_batch: usize) -> Self {
        let batches = Batcher::spawn(
            max_batch,
            "commit",
            |r: &v1::CommitRequest| r.encoded_len(),
            move |requests| {
                let idm = idm.clone();
                async move { idm.commit_batch(requests).await }
            },
        );
        Self { batches }
    }

    /// As [`IdmClient::commit`]; the commit may share its transaction with
    /// others made meanwhile, each checked as if alone.
    ///
    /// # Errors
    /// As [`IdmClient::commit`].
    pub async fn commit(&self, ops: Vec<Op>, origin_resource: &str) -> Result<Vec<u64>, IdmError> {
        self.batches
            .run(v1::CommitRequest {
                operations: ops.into_iter().map(v1::Operation::from).collect(),
                origin_resource: origin_resource.to_owned(),
                // The caller's span: its change's outbox records join its trace.
                trace_parent: idsync_telemetry::trace::current_traceparent().unwrap_or_default(),
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use idsync_core::secret::Secret;

    /// An IDM that cannot be reached fails every caller of the batch with
    /// the same transient error (their messages are retried), and none
    /// waits for ever.
    #[tokio::test]
    async fn an_unreachable_idm_fails_every_caller_of_a_batch_as_transient() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let idm = IdmClient::new(&format!("http://127.0.0.1:{port}"), &Secret::new("x")).unwrap();
        let committer = Committer::new(idm.clone().with_batched_reads(4), 4);
        let calls = (0..6).map(|_| committer.commit(Vec::new(), "hr"));
        for r in futures::future::join_all(calls).await {
            let e = r.unwrap_err();
            assert!(e.is_transient(), "{e:?}");
        }
        let reads = idm.with_batched_reads(4);
        let e = reads.get_shadow("hr", "u").await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        let e = reads.find_focus("user", "name", "n").await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
    }
}
