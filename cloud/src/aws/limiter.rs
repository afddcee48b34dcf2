//! Client-side token buckets that keep hangar inside AWS's request budgets.
//!
//! AWS meters API calls with token buckets per account and region (EC2 per
//! API, ELB account-wide). Mirroring them on the client means a large fleet
//! waits a little instead of being throttled, which would slow every other
//! tool sharing the account too.
//!
//! The bucket is a *reservation* bucket: taking a token is O(1) under a
//! short mutex and may drive the balance negative; the caller then sleeps
//! until the balance it owes has refilled. Callers are therefore served in
//! the order they asked (FIFO, so fair), and there is no waiter queue to
//! maintain. A caller cancelled while waiting hands its tokens back.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// Size and refill rate of one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BucketSpec {
    /// Maximum tokens (the burst).
    pub capacity: f64,
    /// Tokens added per second.
    pub refill_per_sec: f64,
}

impl BucketSpec {
    /// Capacity below 1 or a non-positive rate would never let a call
    /// through; they are raised to 1 token and 0.001/s.
    pub const fn new(capacity: f64, refill_per_sec: f64) -> BucketSpec {
        BucketSpec {
            capacity,
            refill_per_sec,
        }
    }

    fn sanitized(self) -> BucketSpec {
        let capacity = if self.capacity.is_finite() && self.capacity >= 1.0 {
            self.capacity
        } else {
            1.0
        };
        let refill_per_sec = if self.refill_per_sec.is_finite() && self.refill_per_sec > 0.001 {
            self.refill_per_sec
        } else {
            0.001
        };
        BucketSpec {
            capacity,
            refill_per_sec,
        }
    }
}

/// One token bucket. Starts full, like AWS's.
pub struct TokenBucket {
    name: &'static str,
    spec: BucketSpec,
    state: Mutex<Balance>,
    acquired: AtomicU64,
    waited_micros: AtomicU64,
}

struct Balance {
    tokens: f64,
    at: Instant,
}

/// What a bucket has done so far, for metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BucketStats {
    pub name: &'static str,
    pub spec: BucketSpec,
    /// Tokens handed out (including those debited for retries).
    pub acquired: u64,
    /// Total time callers spent waiting for tokens.
    pub waited: Duration,
    /// Balance right now; negative while callers are queued.
    pub available: f64,
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .finish()
    }
}

impl TokenBucket {
    pub fn new(name: &'static str, spec: BucketSpec) -> TokenBucket {
        let spec = spec.sanitized();
        TokenBucket {
            name,
            spec,
            state: Mutex::new(Balance {
                tokens: spec.capacity,
                at: Instant::now(),
            }),
            acquired: AtomicU64::new(0),
            waited_micros: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Waits until `n` tokens are ours. Callers are served in call order.
    /// Dropping the future before it completes returns the tokens.
    pub async fn acquire(&self, n: u32) {
        let n = f64::from(n);
        let wait = self.reserve(n);
        if wait.is_zero() {
            return;
        }
        let mut refund = Refund {
            bucket: self,
            tokens: n,
        };
        tokio::time::sleep(wait).await;
        refund.tokens = 0.0;
        self.waited_micros.fetch_add(
            u64::try_from(wait.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Takes `n` tokens now without waiting, even into debt: used for
    /// retries the SDK makes on its own, so they count against the budget
    /// and later callers wait for them.
    pub fn debit(&self, n: u32) {
        let _ = self.reserve(f64::from(n));
    }

    pub fn stats(&self) -> BucketStats {
        let available = {
            let mut balance = self.lock();
            self.refill(&mut balance, Instant::now());
            balance.tokens
        };
        BucketStats {
            name: self.name,
            spec: self.spec,
            acquired: self.acquired.load(Ordering::Relaxed),
            waited: Duration::from_micros(self.waited_micros.load(Ordering::Relaxed)),
            available,
        }
    }

    /// Takes `n` tokens and returns how long until the balance is back to
    /// zero, i.e. until this caller's tokens have really been refilled.
    fn reserve(&self, n: f64) -> Duration {
        self.acquired.fetch_add(n as u64, Ordering::Relaxed);
        let mut balance = self.lock();
        self.refill(&mut balance, Instant::now());
        balance.tokens -= n;
        if balance.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-balance.tokens / self.spec.refill_per_sec)
        }
    }

    fn refill(&self, balance: &mut Balance, now: Instant) {
        let elapsed = now.saturating_duration_since(balance.at).as_secs_f64();
        balance.tokens =
            (balance.tokens + elapsed * self.spec.refill_per_sec).min(self.spec.capacity);
        balance.at = now;
    }

    fn give_back(&self, n: f64) {
        self.acquired.fetch_sub(n as u64, Ordering::Relaxed);
        let mut balance = self.lock();
        self.refill(&mut balance, Instant::now());
        balance.tokens = (balance.tokens + n).min(self.spec.capacity);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Balance> {
        // The balance is two plain numbers; a panic elsewhere cannot leave
        // it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Returns a cancelled waiter's tokens.
struct Refund<'a> {
    bucket: &'a TokenBucket,
    tokens: f64,
}

impl Drop for Refund<'_> {
    fn drop(&mut self) {
        if self.tokens > 0.0 {
            self.bucket.give_back(self.tokens);
        }
    }
}

/// The request budgets hangar observes, per account and region.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Budgets {
    /// EC2 `DescribeInstances` (non-mutating).
    pub ec2_describe: BucketSpec,
    /// EC2 `RunInstances`: requests.
    pub ec2_run_instances: BucketSpec,
    /// EC2 `RunInstances`: instances launched (resource bucket).
    pub ec2_run_instances_resource: BucketSpec,
    /// EC2 `CreateTags` (mutating).
    pub ec2_create_tags: BucketSpec,
    /// EC2 `TerminateInstances`: requests.
    pub ec2_terminate: BucketSpec,
    /// EC2 `TerminateInstances`: instances terminated (resource bucket).
    pub ec2_terminate_resource: BucketSpec,
    /// Every ELBv2 call (one account-wide bucket).
    pub elb: BucketSpec,
    /// CloudWatch `GetMetricData`.
    pub cloudwatch_get_metric_data: BucketSpec,
}

impl Default for Budgets {
    /// AWS's documented defaults; see the crate README for sources.
    fn default() -> Budgets {
        Budgets {
            ec2_describe: BucketSpec::new(100.0, 20.0),
            ec2_run_instances: BucketSpec::new(5.0, 2.0),
            ec2_run_instances_resource: BucketSpec::new(1000.0, 2.0),
            ec2_create_tags: BucketSpec::new(200.0, 5.0),
            ec2_terminate: BucketSpec::new(200.0, 5.0),
            ec2_terminate_resource: BucketSpec::new(1000.0, 20.0),
            elb: BucketSpec::new(40.0, 10.0),
            // The account quota is 50 TPS; hangar keeps half of it so
            // dashboards and alarms sharing the account are not starved.
            cloudwatch_get_metric_data: BucketSpec::new(50.0, 25.0),
        }
    }
}

impl Budgets {
    /// Effectively unlimited; for tests that measure something else.
    pub fn unlimited() -> Budgets {
        let inf = BucketSpec::new(1e9, 1e9);
        Budgets {
            ec2_describe: inf,
            ec2_run_instances: inf,
            ec2_run_instances_resource: inf,
            ec2_create_tags: inf,
            ec2_terminate: inf,
            ec2_terminate_resource: inf,
            elb: inf,
            cloudwatch_get_metric_data: inf,
        }
    }
}

/// Which bucket a call draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Ec2Describe,
    Ec2RunInstances,
    Ec2CreateTags,
    Ec2Terminate,
    Elb,
    CloudWatchGetMetricData,
}

impl Budget {
    /// The bucket of an SDK operation (`service` as hangar labels it), or
    /// `None` for calls hangar does not meter (S3 reads).
    pub fn of(service: &str, operation: &str) -> Option<Budget> {
        match (service, operation) {
            ("ec2", "RunInstances") => Some(Budget::Ec2RunInstances),
            ("ec2", "CreateTags") => Some(Budget::Ec2CreateTags),
            ("ec2", "TerminateInstances") => Some(Budget::Ec2Terminate),
            ("ec2", op) if op.starts_with("Describe") => Some(Budget::Ec2Describe),
            ("elbv2", _) => Some(Budget::Elb),
            ("cloudwatch", "GetMetricData") => Some(Budget::CloudWatchGetMetricData),
            _ => None,
        }
    }
}

/// All of hangar's buckets.
#[derive(Debug)]
pub struct Limiter {
    ec2_describe: TokenBucket,
    ec2_run_instances: TokenBucket,
    ec2_run_instances_resource: TokenBucket,
    ec2_create_tags: TokenBucket,
    ec2_terminate: TokenBucket,
    ec2_terminate_resource: TokenBucket,
    elb: TokenBucket,
    cloudwatch_get_metric_data: TokenBucket,
}

impl Limiter {
    pub fn new(budgets: &Budgets) -> Limiter {
        Limiter {
            ec2_describe: TokenBucket::new("ec2_describe", budgets.ec2_describe),
            ec2_run_instances: TokenBucket::new("ec2_run_instances", budgets.ec2_run_instances),
            ec2_run_instances_resource: TokenBucket::new(
                "ec2_run_instances_resource",
                budgets.ec2_run_instances_resource,
            ),
            ec2_create_tags: TokenBucket::new("ec2_create_tags", budgets.ec2_create_tags),
            ec2_terminate: TokenBucket::new("ec2_terminate", budgets.ec2_terminate),
            ec2_terminate_resource: TokenBucket::new(
                "ec2_terminate_resource",
                budgets.ec2_terminate_resource,
            ),
            elb: TokenBucket::new("elb", budgets.elb),
            cloudwatch_get_metric_data: TokenBucket::new(
                "cloudwatch_get_metric_data",
                budgets.cloudwatch_get_metric_data,
            ),
        }
    }

    /// The request bucket of `budget`.
    pub fn bucket(&self, budget: Budget) -> &TokenBucket {
        match budget {
            Budget::Ec2Describe => &self.ec2_describe,
            Budget::Ec2RunInstances => &self.ec2_run_instances,
            Budget::Ec2CreateTags => &self.ec2_create_tags,
            Budget::Ec2Terminate => &self.ec2_terminate,
            Budget::Elb => &self.elb,
            Budget::CloudWatchGetMetricData => &self.cloudwatch_get_metric_data,
        }
    }

    /// Waits for one request token of `budget`.
    pub async fn request(&self, budget: Budget) {
        self.bucket(budget).acquire(1).await;
    }

    /// Waits for a `RunInstances` request token and `count` instance tokens.
    pub async fn run_instances(&self, count: u32) {
        self.ec2_run_instances_resource.acquire(count).await;
        self.ec2_run_instances.acquire(1).await;
    }

    /// Waits for a `TerminateInstances` request token and `count` instance
    /// tokens.
    pub async fn terminate(&self, count: u32) {
        self.ec2_terminate_resource.acquire(count).await;
        self.ec2_terminate.acquire(1).await;
    }

    pub fn stats(&self) -> Vec<BucketStats> {
        [
            &self.ec2_describe,
            &self.ec2_run_instances,
            &self.ec2_run_instances_resource,
            &self.ec2_create_tags,
            &self.ec2_terminate,
            &self.ec2_terminate_resource,
            &self.elb,
            &self.cloudwatch_get_metric_data,
        ]
        .into_iter()
        .map(TokenBucket::stats)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Completes `fut` if it can without time passing.
    async fn ready_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::ZERO, fut).await.ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_serves_its_burst_at_once_then_the_refill_rate() {
        let bucket = TokenBucket::new("t", BucketSpec::new(5.0, 2.0));
        for i in 0..5 {
            assert!(
                ready_now(bucket.acquire(1)).await.is_some(),
                "burst token {i}"
            );
        }
        let start = Instant::now();
        bucket.acquire(1).await;
        assert_eq!(start.elapsed(), ms(500), "6th token after 1/rate");
        bucket.acquire(1).await;
        assert_eq!(start.elapsed(), ms(1000));
        assert_eq!(bucket.stats().acquired, 7);
        assert_eq!(bucket.stats().waited, ms(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn refill_stops_at_capacity() {
        let bucket = TokenBucket::new("t", BucketSpec::new(3.0, 10.0));
        for _ in 0..3 {
            bucket.acquire(1).await;
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!((bucket.stats().available - 3.0).abs() < 1e-9);
        for _ in 0..3 {
            assert!(ready_now(bucket.acquire(1)).await.is_some());
        }
        assert!(
            ready_now(bucket.acquire(1)).await.is_none(),
            "only 3 after a long idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order_at_the_refill_rate() {
        let bucket = Arc::new(TokenBucket::new("t", BucketSpec::new(1.0, 10.0)));
        bucket.acquire(1).await;
        let start = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..5u32 {
            let bucket = bucket.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                bucket.acquire(1).await;
                let _ = tx.send((i, start.elapsed()));
            });
            // Let task `i` reserve before task `i + 1` is spawned.
            tokio::task::yield_now().await;
        }
        drop(tx);
        let mut served = Vec::new();
        while let Some(x) = rx.recv().await {
            served.push(x);
        }
        let expected: Vec<_> = (0..5u32).map(|i| (i, ms(100 * u64::from(i + 1)))).collect();
        assert_eq!(served, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_returns_its_tokens() {
        let bucket = TokenBucket::new("t", BucketSpec::new(1.0, 1.0));
        bucket.acquire(1).await;
        // Would wait 1 s; give up after 100 ms.
        assert!(tokio::time::timeout(ms(100), bucket.acquire(1))
            .await
            .is_err());
        let start = Instant::now();
        bucket.acquire(1).await;
        assert_eq!(
            start.elapsed(),
            ms(900),
            "the abandoned token was handed back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn debits_delay_later_callers() {
        let bucket = TokenBucket::new("t", BucketSpec::new(2.0, 4.0));
        bucket.debit(1);
        bucket.debit(1);
        bucket.debit(1);
        let start = Instant::now();
        bucket.acquire(1).await;
        assert_eq!(start.elapsed(), ms(500), "two tokens of debt at 4/s");
    }

    #[tokio::test(start_paused = true)]
    async fn weighted_requests_larger_than_the_bucket_still_complete() {
        let bucket = TokenBucket::new("t", BucketSpec::new(10.0, 5.0));
        let start = Instant::now();
        bucket.acquire(20).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[test]
    fn nonsense_specs_are_made_usable() {
        let bucket = TokenBucket::new("t", BucketSpec::new(0.0, -1.0));
        assert_eq!(bucket.spec, BucketSpec::new(1.0, 0.001));
    }

    #[test]
    fn operations_map_to_their_buckets() {
        assert_eq!(
            Budget::of("ec2", "DescribeInstances"),
            Some(Budget::Ec2Describe)
        );
        assert_eq!(
            Budget::of("ec2", "RunInstances"),
            Some(Budget::Ec2RunInstances)
        );
        assert_eq!(Budget::of("ec2", "CreateTags"), Some(Budget::Ec2CreateTags));
        assert_eq!(
            Budget::of("ec2", "TerminateInstances"),
            Some(Budget::Ec2Terminate)
        );
        assert_eq!(
            Budget::of("elbv2", "DescribeTargetHealth"),
            Some(Budget::Elb)
        );
        assert_eq!(
            Budget::of("cloudwatch", "GetMetricData"),
            Some(Budget::CloudWatchGetMetricData)
        );
        assert_eq!(Budget::of("s3", "GetObject"), None);
    }
}
