//! Prometheus metrics, served on `/metrics`.
//!
//! Label sets stay small on purpose: per cluster and per phase/kind, never
//! per node or per request, so a 1,000-cluster operator stays scrapeable.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
pub struct TaskLabels {
    pub task: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub operation: String,
    pub outcome: String,
}

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
    pub cloud_api_calls: Family<ApiLabels, Counter<u64, AtomicU64>>,
    pub spec_problems: Gauge,
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
        registry.register("reconcile_errors", "Reconciles that failed, per cluster", reconcile_errors.clone());
        let nodes = Family::default();
        registry.register("nodes", "Nodes per cluster and phase", nodes.clone());
        let desired_nodes = Family::default();
        registry.register("desired_nodes", "Node count the planner wants", desired_nodes.clone());
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
        let cloud_api_calls = Family::default();
        registry.register(
            "cloud_api_calls",
            "Cloud API calls by operation and outcome (ok, throttled, error)",
            cloud_api_calls.clone(),
        );
        let spec_problems = Gauge::default();
        registry.register("spec_problems", "Problems in the spec directory", spec_problems.clone());
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
            cloud_api_calls,
            spec_problems,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
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
        t.reconcile_errors.get_or_create(&Telemetry::cluster("web")).inc();
        let text = t.encode();
        assert!(text.contains("hangar_nodes{cluster=\"web\",phase=\"in-service\"} 3"), "{text}");
        assert!(text.contains("hangar_reconcile_errors_total{cluster=\"web\"} 1"), "{text}");
        assert!(text.contains("# TYPE hangar_reconcile_duration_seconds histogram"), "{text}");
    }
}
