//! Observe: everything a pass reads, into one [`Observation`].

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hangar_cloud::{Cloud, Instance};
use hangar_crds::ClusterSpec;

use super::{lock, Operator, ReconcileError};
use crate::core::decide;
use crate::core::fleet::Task;
use crate::core::observation::ErrorCounts;
use crate::core::{Memory, Observation};
use crate::effects::traffic;
use crate::runtime::specs::ClusterSpecEntry;

/// Whether the pass will act on what it observes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Takes the finished tasks and the last actions' failures: they are
    /// folded into memory by this pass.
    Live,
    /// `hangar plan`: leaves them for the operator that acts.
    Preview,
}

impl Operator {
    pub(super) async fn observe(
        &self,
        entry: &ClusterSpecEntry,
        cloud: &Cloud,
        memory: &Memory,
        now: DateTime<Utc>,
        mode: Mode,
    ) -> Result<Observation, ReconcileError> {
        let spec = Arc::new(entry.loaded.cluster.spec.clone());
        let mut obs = self
            .observe_fleet(entry.name(), spec, cloud, now, mode)
            .await?;
        obs.config_hash = entry.config_hash.clone();
        let inst = &obs.spec.instances;
        obs.launch_version = match cloud
            .compute
            .resolve_template_version(&inst.launch_template, &inst.launch_template_version)
            .await
        {
            Ok(v) => Some(v),
            Err(error) => {
                tracing::warn!(cluster = %entry.name(), %error, "launch template version unknown this pass");
                None
            }
        };
        obs.unhealthy = self.probes.unhealthy(entry.name());
        self.read_metrics(&mut obs, cloud, memory).await;
        Ok(obs)
    }

    /// A removed cluster's pass reads only its nodes and tasks.
    pub(super) async fn observe_removed(
        &self,
        name: &str,
        spec: Arc<ClusterSpec>,
        cloud: &Cloud,
        now: DateTime<Utc>,
    ) -> Result<Observation, ReconcileError> {
        self.observe_fleet(name, spec, cloud, now, Mode::Live).await
    }

    async fn observe_fleet(
        &self,
        name: &str,
        spec: Arc<ClusterSpec>,
        cloud: &Cloud,
        now: DateTime<Utc>,
        mode: Mode,
    ) -> Result<Observation, ReconcileError> {
        let (instances, unlisted) = self
            .inventory
            .cluster_listing(&spec.region, cloud.compute.as_ref(), name)
            .await?;
        let running = self.tasks.running(name);
        let ((finished, notes), failures) = match mode {
            Mode::Live => (
                self.tasks.drain(name),
                lock(&self.failures).remove(name).unwrap_or_default(),
            ),
            Mode::Preview => ((Vec::new(), Vec::new()), Vec::new()),
        };
        Ok(Observation {
            cluster: name.to_string(),
            spec,
            config_hash: String::new(),
            now,
            instances,
            unlisted,
            running,
            finished,
            notes,
            traffic: None,
            errors: None,
            unhealthy: HashMap::new(),
            failures,
            launch_version: None,
        })
    }

    /// The cluster's instances (only its own, through the inventory's
    /// index) and the node tasks running for it.
    pub(super) async fn look(
        &self,
        name: &str,
        region: &str,
        cloud: &Cloud,
    ) -> Result<(Vec<Instance>, HashMap<String, Task>), ReconcileError> {
        let instances = self
            .inventory
            .cluster_instances(region, cloud.compute.as_ref(), name)
            .await?;
        Ok((instances, self.tasks.running(name)))
    }

    /// The metric reads [`decide::reads`] asks for. A failed read is part
    /// of the observation (the planner holds); it is logged here.
    async fn read_metrics(&self, obs: &mut Observation, cloud: &Cloud, memory: &Memory) {
        let reads = decide::reads(obs, memory);
        let spec = obs.spec.clone();
        if reads.traffic {
            let read = traffic::read_rate(cloud.metrics.as_ref(), &spec, obs.now).await;
            if let Err(e) = &read {
                tracing::warn!(cluster = %obs.cluster, error = %e, "cannot read traffic metric; holding");
            }
            obs.traffic = Some(read.map_err(|e| e.to_string()));
        }
        if let Some(since) = reads.errors_since {
            let read = traffic::read_errors(
                cloud.metrics.as_ref(),
                &spec.load_balancer.target_group_arn,
                since,
                obs.now,
                traffic::error_period(&spec),
            )
            .await;
            if let Err(e) = &read {
                tracing::warn!(cluster = %obs.cluster, error = %e, "cannot read the error rate");
            }
            obs.errors = Some(
                read.map(|(errors_5xx, requests)| ErrorCounts {
                    errors_5xx,
                    requests,
                })
                .map_err(|e| e.to_string()),
            );
        }
    }
}
