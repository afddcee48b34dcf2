//! Prometheus metrics, served on `/metrics`.
//!
//! Label sets stay small on purpose: per cluster and per phase/kind, never
//! per node or per request, so a 1,000-cluster operator stays scrapeable.

use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use crate::effects::node_task::KindLabel;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub cluster: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub cluster: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultOnly {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub service: String,
    pub operation: String,
}

/// Cumulative counters of one cloud API operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiSample {
    pub service: String,
    pub operation: String,
    pub calls: u64,
    pub retries: u64,
    pub throttles: u64,
    pub errors: u64,
}

/// Where API counters come from (the cloud layer keeps them); read on
/// every scrape, so the exported numbers are never stale copies.
pub trait ApiStats: Send + Sync {
    fn sample(&self) -> Vec<ApiSample>;
}

#[derive(Clone, Default)]
struct ApiCollector {
    source: Arc<RwLock<Option<Arc<dyn ApiStats>>>>,
}

impl std::fmt::Debug for ApiCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiCollector")
    }
}

impl Collector for ApiCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = match self
            .source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(src) => src.sample(),
            None => return Ok(()),
        };
        type Family = (&'static str, &'static str, fn(&ApiSample) -> u64);
        let families: [Family; 4] = [
            (
                "cloud_api_calls",
                "Cloud API calls by service and operation",
                |s| s.calls,
            ),
            (
                "cloud_api_retries",
                "Retried attempts (backoff) by service and operation",
                |s| s.retries,
            ),
            ("cloud_api_throttles", "Attempts the cloud throttled", |s| {
                s.throttles
            }),
            ("cloud_api_errors", "Calls that failed after retries", |s| {
                s.errors
            }),
        ];
        for (name, help, value) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &samples {
                let labels = ApiLabels {
                    service: s.service.clone(),
                    operation: s.operation.clone(),
                };
                ConstCounter::new(value(s)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The `result` label values of `hangar_rollouts_total`.
pub const ROLLOUT_RESULTS: [&str; 5] = [
    "started",
    "completed",
    "halted",
    "rolled-back",
    "rollback-done",
];

/// Every metric hangar exports, cheap to clone (shared handles).
#[derive(Clone)]
pub struct Telemetry {
    registry: Arc<Mutex<Registry>>,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<ClusterLabel, Counter>,
    pub nodes: Family<PhaseLabels, Gauge>,
    pub desired_nodes: Family<ClusterLabel, Gauge>,
    pub scaling_actions: Family<ResultLabels, Counter>,
    pub rollouts: Family<ResultLabels, Counter>,
    pub node_tasks: Family<TaskLabels, Counter>,
    pub ssh_errors: Family<KindLabel, Counter>,
    pub spec_problems: Gauge,
    /// 1 while this process leads (always with the single-host lease).
    pub leader: Gauge,
    /// The fence of the term this process leads (0 while a standby).
    pub lease_fence: Gauge,
    /// Unix time of the last fetch of the git spec source that succeeded.
    pub git_last_sync: Gauge,
    pub git_sync_failures: Counter,
    /// Webhook calls by result (`accepted`, `unauthorized`, `replayed`).
    pub webhooks: Family<ResultOnly, Counter>,
    api: ApiCollector,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("hangar");
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time one cluster reconcile took",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, per cluster",
            reconcile_errors.clone(),
        );
        let nodes = Family::default();
        registry.register("nodes", "Nodes per cluster and phase", nodes.clone());
        let desired_nodes = Family::default();
        registry.register(
            "desired_nodes",
            "Node count the planner wants",
            desired_nodes.clone(),
        );
        let scaling_actions = Family::default();
        registry.register(
            "scaling_actions",
            "Scaling decisions that changed the desired count (result: out, in)",
            scaling_actions.clone(),
        );
        let rollouts = Family::default();
        registry.register(
            "rollouts",
            "Release rollout events (result: started, completed, halted, rolled-back)",
            rollouts.clone(),
        );
        let node_tasks = Family::default();
        registry.register(
            "node_tasks",
            "Node tasks finished (task: advance, update, rollback, drain; result: ok, failed, cancelled)",
            node_tasks.clone(),
        );
        let ssh_errors = Family::default();
        registry.register("ssh_errors", "SSH failures by kind", ssh_errors.clone());
        let api = ApiCollector::default();
        registry.register_collector(Box::new(api.clone()));
        let spec_problems = Gauge::default();
        registry.register(
            "spec_problems",
            "Problems in the spec directory",
            spec_problems.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this operator holds the lease and acts, 0 while a standby",
            leader.clone(),
        );
        let lease_fence = Gauge::default();
        registry.register(
            "lease_fence",
            "Fence (hangar:epoch) of the term this operator leads; 0 while a standby",
            lease_fence.clone(),
        );
        let git_last_sync = Gauge::default();
        registry.register(
            "git_last_sync_timestamp_seconds",
            "Unix time of the last successful fetch of the git spec source",
            git_last_sync.clone(),
        );
        let git_sync_failures = Counter::default();
        registry.register(
            "git_sync_failures",
            "Fetches of the git spec source that failed",
            git_sync_failures.clone(),
        );
        let webhooks = Family::default();
        registry.register(
            "webhooks",
            "POST /api/v1/sync calls (result: accepted, unauthorized, replayed)",
            webhooks.clone(),
        );
        Telemetry {
            registry: Arc::new(Mutex::new(registry)),
            reconcile_duration,
            reconcile_errors,
            nodes,
            desired_nodes,
            scaling_actions,
            rollouts,
            node_tasks,
            ssh_errors,
            spec_problems,
            leader,
            lease_fence,
            git_last_sync,
            git_sync_failures,
            webhooks,
            api,
        }
    }

    /// Exports the cloud layer's API counters from now on.
    pub fn set_api_stats(&self, source: Arc<dyn ApiStats>) {
        *self.api.source.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Drops every series of a cluster that is gone, so `/metrics` does
    /// not report its last node counts forever.
    pub fn forget_cluster(&self, name: &str) {
        let cluster = Telemetry::cluster(name);
        self.desired_nodes.remove(&cluster);
        self.reconcile_errors.remove(&cluster);
        for phase in hangar_cloud::Phase::ALL {
            self.nodes.remove(&PhaseLabels {
                cluster: name.to_string(),
                phase: phase.to_string(),
            });
        }
        let results = ["out", "in"].iter().chain(ROLLOUT_RESULTS.iter());
        for result in results {
            let labels = ResultLabels {
                cluster: name.to_string(),
                result: result.to_string(),
            };
            self.scaling_actions.remove(&labels);
            self.rollouts.remove(&labels);
        }
    }

    pub fn cluster(name: &str) -> ClusterLabel {
        ClusterLabel {
            cluster: name.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_what_it_counts() {
        let t = Telemetry::new();
        t.nodes
            .get_or_create(&PhaseLabels {
                cluster: "web".into(),
                phase: "in-service".into(),
            })
            .set(3);
        t.reconcile_errors
            .get_or_create(&Telemetry::cluster("web"))
            .inc();
        let text = t.encode();
        assert!(
            text.contains("hangar_nodes{cluster=\"web\",phase=\"in-service\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("hangar_reconcile_errors_total{cluster=\"web\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hangar_reconcile_duration_seconds histogram"),
            "{text}"
        );
    }

    #[test]
    fn a_forgotten_cluster_leaves_no_series() {
        let t = Telemetry::new();
        for name in ["web", "api"] {
            t.desired_nodes
                .get_or_create(&Telemetry::cluster(name))
                .set(2);
            t.nodes
                .get_or_create(&PhaseLabels {
                    cluster: name.into(),
                    phase: "in-service".into(),
                })
                .set(2);
            t.rollouts
                .get_or_create(&ResultLabels {
                    cluster: name.into(),
                    result: "completed".into(),
                })
                .inc();
        }
        t.forget_cluster("web");
        let text = t.encode();
        assert!(!text.contains("cluster=\"web\""), "{text}");
        assert!(
            text.contains("hangar_desired_nodes{cluster=\"api\"} 2"),
            "{text}"
        );
    }

    struct Fixed;
    impl ApiStats for Fixed {
        fn sample(&self) -> Vec<ApiSample> {
            vec![ApiSample {
                service: "ec2".into(),
                operation: "DescribeInstances".into(),
                calls: 7,
                retries: 2,
                throttles: 1,
                errors: 0,
            }]
        }
    }

    #[test]
    fn exports_cloud_api_counters_read_at_scrape_time() {
        let t = Telemetry::new();
        assert!(!t.encode().contains("hangar_cloud_api_calls_total{"));
        t.set_api_stats(Arc::new(Fixed));
        let text = t.encode();
        let series = |name: &str, v: u64| {
            format!("{name}{{service=\"ec2\",operation=\"DescribeInstances\"}} {v}")
        };
        assert!(
            text.contains(&series("hangar_cloud_api_calls_total", 7)),
            "{text}"
        );
        assert!(
            text.contains(&series("hangar_cloud_api_throttles_total", 1)),
            "{text}"
        );
        assert!(
            text.contains(&series("hangar_cloud_api_retries_total", 2)),
            "{text}"
        );
    }
}
