//! Counting AWS API calls by operation, from inside the SDK.
//!
//! [`ApiCallInterceptor`] sits in every client hangar builds and sees each
//! logical call and each attempt (the SDK retries below our code), so the
//! counters include retries the SDK made on its own. It also debits the
//! matching token bucket for every retry attempt: AWS charges retries to
//! the same budget, so later callers must wait for them too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime::client::retries::classifiers::run_classifiers_on_ctx;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::retries::classifiers::{RetryAction, RetryReason};
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::ErrorKind;
use serde::Serialize;

use super::limiter::{Budget, Limiter};

/// Counters of one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CallStats {
    /// Logical calls (one per `send()`), however many attempts each took.
    pub calls: u64,
    /// HTTP attempts, retries included.
    pub attempts: u64,
    /// Attempts after the first.
    pub retries: u64,
    /// Attempts the SDK classified as throttled.
    pub throttles: u64,
    /// Logical calls that ended in an error (after retries).
    pub errors: u64,
}

impl CallStats {
    fn add(&mut self, other: &CallStats) {
        self.calls += other.calls;
        self.attempts += other.attempts;
        self.retries += other.retries;
        self.throttles += other.throttles;
        self.errors += other.errors;
    }
}

/// One row of [`ApiCalls::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OperationStats {
    /// `ec2`, `elbv2`, `cloudwatch`, `s3`, `prometheus`.
    pub service: &'static str,
    /// `DescribeInstances`, `RegisterTargets`, …
    pub operation: String,
    #[serde(flatten)]
    pub stats: CallStats,
}

/// API call counters by service and operation; cheap to read at any time
/// (e.g. on every Prometheus scrape).
#[derive(Debug, Default)]
pub struct ApiCalls {
    by_service: Mutex<BTreeMap<&'static str, BTreeMap<String, CallStats>>>,
}

impl ApiCalls {
    /// Every operation called so far, sorted by service then operation.
    pub fn snapshot(&self) -> Vec<OperationStats> {
        let map = self.lock();
        map.iter()
            .flat_map(|(service, ops)| {
                ops.iter().map(|(operation, stats)| OperationStats {
                    service,
                    operation: operation.clone(),
                    stats: *stats,
                })
            })
            .collect()
    }

    /// Counters of one operation (zero if never called).
    pub fn get(&self, service: &str, operation: &str) -> CallStats {
        self.lock()
            .get(service)
            .and_then(|ops| ops.get(operation))
            .copied()
            .unwrap_or_default()
    }

    /// Sum over every operation of `service` (`None`: of everything).
    pub fn total(&self, service: Option<&str>) -> CallStats {
        let mut total = CallStats::default();
        for (s, ops) in self.lock().iter() {
            if service.is_none_or(|want| want == *s) {
                ops.values().for_each(|stats| total.add(stats));
            }
        }
        total
    }

    /// Records a call that does not go through an SDK client (the
    /// Prometheus query here; an in-memory cloud's calls in benchmarks).
    pub fn record(&self, service: &'static str, operation: &str, ok: bool) {
        self.update(service, operation, |s| {
            s.calls += 1;
            s.attempts += 1;
            if !ok {
                s.errors += 1;
            }
        });
    }

    fn update(&self, service: &'static str, operation: &str, f: impl FnOnce(&mut CallStats)) {
        let mut map = self.lock();
        let ops = map.entry(service).or_default();
        // Look up by `&str` first: the steady state allocates nothing.
        match ops.get_mut(operation) {
            Some(stats) => f(stats),
            None => f(ops.entry(operation.to_string()).or_default()),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, BTreeMap<String, CallStats>>> {
        self.by_service.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The SDK interceptor that feeds [`ApiCalls`] and debits retries from the
/// [`Limiter`]. One per client, labelled with hangar's service name.
#[derive(Debug)]
pub struct ApiCallInterceptor {
    service: &'static str,
    calls: Arc<ApiCalls>,
    limiter: Arc<Limiter>,
}

impl ApiCallInterceptor {
    pub fn new(service: &'static str, calls: Arc<ApiCalls>, limiter: Arc<Limiter>) -> Self {
        ApiCallInterceptor {
            service,
            calls,
            limiter,
        }
    }

    fn operation(cfg: &ConfigBag) -> String {
        cfg.load::<Metadata>()
            .map(|m| m.name().to_string())
            .unwrap_or_else(|| "unknown".to_string())
    }
}

impl Intercept for ApiCallInterceptor {
    fn name(&self) -> &'static str {
        "hangar::ApiCallInterceptor"
    }

    fn read_before_attempt(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = Self::operation(cfg);
        let attempt = cfg.load::<RequestAttempts>().map_or(1, |a| a.attempts());
        let retry = attempt > 1;
        // The first attempt stands for the call: `Metadata` is not yet in
        // the config bag when `read_before_execution` runs.
        self.calls.update(self.service, &op, |s| {
            s.attempts += 1;
            if retry {
                s.retries += 1;
            } else {
                s.calls += 1;
            }
        });
        // The first attempt's token was acquired (and waited for) before
        // `send()`; a retry is charged here without waiting, the SDK's
        // backoff already spaces it.
        if retry {
            if let Some(budget) = Budget::of(self.service, &op) {
                self.limiter.bucket(budget).debit(1);
            }
        }
        Ok(())
    }

    fn read_after_attempt(
        &self,
        ctx: &FinalizerInterceptorContextRef<'_>,
        rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let failed = matches!(ctx.output_or_error(), Some(Err(_)));
        if !failed {
            return Ok(());
        }
        // Ask the SDK's own classifiers, so "throttled" means exactly what
        // the retry strategy acted on.
        let throttled = matches!(
            run_classifiers_on_ctx(rc.retry_classifiers(), ctx.inner()),
            RetryAction::RetryIndicated(RetryReason::RetryableError {
                kind: ErrorKind::ThrottlingError,
                ..
            })
        );
        if throttled {
            let op = Self::operation(cfg);
            self.calls.update(self.service, &op, |s| s.throttles += 1);
        }
        Ok(())
    }

    fn read_after_execution(
        &self,
        ctx: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if matches!(ctx.output_or_error(), Some(Err(_)) | None) {
            let op = Self::operation(cfg);
            // A call that failed before its first attempt (request
            // construction) still counts as a call.
            let never_sent = cfg.load::<RequestAttempts>().is_none();
            self.calls.update(self.service, &op, |s| {
                s.errors += 1;
                if never_sent {
                    s.calls += 1;
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_per_service() {
        let calls = ApiCalls::default();
        calls.update("ec2", "DescribeInstances", |s| {
            s.calls += 2;
            s.attempts += 3;
            s.retries += 1;
            s.throttles += 1;
        });
        calls.update("ec2", "CreateTags", |s| s.calls += 1);
        calls.record("prometheus", "query", false);
        assert_eq!(calls.get("ec2", "DescribeInstances").retries, 1);
        assert_eq!(calls.get("ec2", "Nothing"), CallStats::default());
        assert_eq!(calls.total(Some("ec2")).calls, 3);
        assert_eq!(calls.total(None).calls, 4);
        assert_eq!(calls.total(None).errors, 1);
        let ops: Vec<_> = calls
            .snapshot()
            .into_iter()
            .map(|o| (o.service, o.operation))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("ec2", "CreateTags".to_string()),
                ("ec2", "DescribeInstances".to_string()),
                ("prometheus", "query".to_string())
            ]
        );
    }
}
