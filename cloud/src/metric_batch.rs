//! Metric reads that share one API call: while a batch is in flight, the
//! reads that arrive wait and go out together in the next one.
//!
//! CloudWatch's `GetMetricData` answers up to 500 queries per call and is
//! limited per account and region (50 calls/s by default). A thousand
//! clusters evaluating every 15 s, each asking alone, make 66.7 calls/s:
//! over the quota. Coalesced, the call rate is bounded by one call in flight
//! per region, whatever the number of clusters.
//!
//! Before each call the batch lingers [`LINGER`]: the reconciles freed by
//! the previous answer start their next cluster and join, instead of
//! ping-ponging in two half-full batches (measured: 4 reads per call
//! without it at 8 concurrent reconciles, 8 with it).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;

use crate::error::CloudError;
use crate::metrics::{AlbMetric, Datapoint};

/// The most queries one `GetMetricData` call may carry.
pub const MAX_QUERIES_PER_CALL: usize = 500;

/// How long a batch waits for company before it goes out: small next to a
/// CloudWatch call (tens of milliseconds).
pub const LINGER: Duration = Duration::from_millis(2);

/// One [`crate::Metrics::alb_sums`] question.
#[derive(Clone, Debug, PartialEq)]
pub struct AlbQuery {
    pub target_group_arn: String,
    pub metric: AlbMetric,
    pub period: Duration,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl AlbQuery {
    /// The query of one [`crate::Metrics::alb_sums`] call, in its argument order.
    pub fn new(
        target_group_arn: &str,
        metric: AlbMetric,
        period: Duration,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> AlbQuery {
        AlbQuery {
            target_group_arn: target_group_arn.to_string(),
            metric,
            period,
            start,
            end,
        }
    }
}

pub type AlbAnswer = Result<Vec<Datapoint>, CloudError>;

/// A cloud that answers many ALB queries with one call.
#[async_trait]
pub trait AlbBatch: Send + Sync + 'static {
    /// One answer per query, in order. A query the service rejects gets its
    /// own error; a failed call fails every query it carried.
    async fn alb_sums_batch(&self, queries: &[AlbQuery]) -> Vec<AlbAnswer>;
}

/// The waiting room in front of an [`AlbBatch`]. One per region: what it
/// bounds is the call rate against that region's quota.
#[derive(Debug, Default)]
pub struct MetricBatcher {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: Vec<(AlbQuery, oneshot::Sender<AlbAnswer>)>,
    /// A flush task is running and will take what waits.
    flushing: bool,
}

impl MetricBatcher {
    /// Answers `query` through `backend`, in a call shared with every
    /// query that arrives before the call goes out.
    pub async fn alb_sums<B: AlbBatch + Clone>(
        self: &Arc<Self>,
        backend: &B,
        query: AlbQuery,
    ) -> AlbAnswer {
        let (tx, rx) = oneshot::channel();
        let start_flushing = {
            let mut state = self.lock();
            state.waiting.push((query, tx));
            !std::mem::replace(&mut state.flushing, true)
        };
        if start_flushing {
            // A task of its own, not the first caller's future: a caller
            // that gives up (a cancelled reconcile) must not strand the
            // others' answers.
            tokio::spawn(Arc::clone(self).flush(backend.clone()));
        }
        rx.await.unwrap_or_else(|_| {
            Err(CloudError::Transport {
                service: "cloudwatch",
                message: "the metric batch carrying this query was abandoned".into(),
            })
        })
    }

    async fn flush<B: AlbBatch>(self: Arc<Self>, backend: B) {
        let guard = ResetOnDrop(&self);
        loop {
            tokio::time::sleep(LINGER).await;
            let batch: Vec<_> = {
                let mut state = self.lock();
                if state.waiting.is_empty() {
                    state.flushing = false;
                    std::mem::forget(guard);
                    return;
                }
                let n = state.waiting.len().min(MAX_QUERIES_PER_CALL);
                state.waiting.drain(..n).collect()
            };
            let (queries, senders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let mut answers = backend.alb_sums_batch(&queries).await.into_iter();
            for tx in senders {
                let answer = answers.next().unwrap_or_else(|| {
                    Err(CloudError::Transport {
                        service: "cloudwatch",
                        message: "the metric batch came back short".into(),
                    })
                });
                // The caller may have given up; nothing to tell it then.
                let _ = tx.send(answer);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A flush that panicked or was dropped with the runtime: release the
/// waiting callers (their answer is an error) and let the next read start
/// a new flush instead of queueing forever.
struct ResetOnDrop<'a>(&'a MetricBatcher);

impl Drop for ResetOnDrop<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.flushing = false;
        state.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers each query with one datapoint whose value is its period in
    /// seconds, and remembers the size of every call.
    #[derive(Clone, Default)]
    struct Echo {
        calls: Arc<Mutex<Vec<usize>>>,
        panics_left: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl AlbBatch for Echo {
        async fn alb_sums_batch(&self, queries: &[AlbQuery]) -> Vec<AlbAnswer> {
            tokio::task::yield_now().await;
            if self
                .panics_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                panic!("backend blew up");
            }
            self.calls.lock().unwrap().push(queries.len());
            queries
                .iter()
                .map(|q| {
                    Ok(vec![Datapoint {
                        start: q.start,
                        value: q.period.as_secs() as f64,
                    }])
                })
                .collect()
        }
    }

    fn query(period_secs: u64) -> AlbQuery {
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        AlbQuery {
            target_group_arn: format!("tg-{period_secs}"),
            metric: AlbMetric::RequestCount,
            period: Duration::from_secs(period_secs),
            start,
            end: start + chrono::Duration::seconds(600),
        }
    }

    fn value(answer: &AlbAnswer) -> f64 {
        answer.as_ref().expect("an answer")[0].value
    }

    #[tokio::test]
    async fn concurrent_reads_share_one_call_and_each_gets_its_own_answer() {
        let backend = Echo::default();
        let batcher = Arc::new(MetricBatcher::default());
        let reads = (1..=20).map(|p| batcher.alb_sums(&backend, query(p)));
        let answers = futures::future::join_all(reads).await;
        let got: Vec<f64> = answers.iter().map(value).collect();
        assert_eq!(got, (1..=20).map(|p| p as f64).collect::<Vec<_>>());
        assert_eq!(*backend.calls.lock().unwrap(), [20]);
    }

    #[tokio::test]
    async fn a_batch_never_exceeds_the_call_limit() {
        let backend = Echo::default();
        let batcher = Arc::new(MetricBatcher::default());
        let reads = (0..1_200).map(|i| batcher.alb_sums(&backend, query(60 + i)));
        let answers = futures::future::join_all(reads).await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(*backend.calls.lock().unwrap(), [500, 500, 200]);
    }

    #[tokio::test]
    async fn reads_after_a_flush_start_a_new_one() {
        let backend = Echo::default();
        let batcher = Arc::new(MetricBatcher::default());
        assert_eq!(value(&batcher.alb_sums(&backend, query(5)).await), 5.0);
        assert_eq!(value(&batcher.alb_sums(&backend, query(10)).await), 10.0);
        assert_eq!(*backend.calls.lock().unwrap(), [1, 1]);
    }

    #[tokio::test]
    async fn a_backend_that_panics_fails_its_batch_and_not_the_next() {
        let backend = Echo::default();
        backend.panics_left.store(1, Ordering::SeqCst);
        let batcher = Arc::new(MetricBatcher::default());
        let failed = batcher.alb_sums(&backend, query(5)).await;
        assert!(
            matches!(failed, Err(CloudError::Transport { .. })),
            "{failed:?}"
        );
        assert_eq!(value(&batcher.alb_sums(&backend, query(10)).await), 10.0);
    }
}
