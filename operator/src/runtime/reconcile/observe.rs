//! Observe: everything a pass reads, into one [`Observation`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Target group reads of all clusters together stay under this rate: 5 %
/// of ELB's 10/s refill (BENCHMARKS.md §2). At 1,000 clusters each group
/// is read every ~33 minutes; at 15 or fewer, every
/// `target_group_check_interval`.
const TARGET_GROUP_READS_PER_SEC: f64 = 0.5;

/// Where in its interval a cluster's reads fall, in `[0, 1)`, from its name.
fn spread(cluster: &str) -> f64 {
    let h = cluster.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % 1024) as f64 / 1024.0
}

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
        self.read_target_group(&mut obs, cloud, mode).await;
        self.read_metrics(&mut obs, cloud, memory).await;
        Ok(obs)
    }

    /// The cluster's target group, when due (`hangar plan` always reads
    /// it). Read after the listing and the running tasks: a node listed in
    /// service with no task was registered before this read began.
    async fn read_target_group(&self, obs: &mut Observation, cloud: &Cloud, mode: Mode) {
        let now = Instant::now();
        if mode == Mode::Live {
            let clusters = self.specs().clusters.len().max(1) as f64;
            let every = self
                .settings
                .target_group_check
                .max(Duration::from_secs_f64(
                    clusters / TARGET_GROUP_READS_PER_SEC,
                ));
            let mut read_at = lock(&self.target_group_read_at);
            // A cluster seen first is read within one interval, at a point
            // of it set by its name: a restarted operator does not read
            // every group at once.
            let last = *read_at.entry(obs.cluster.clone()).or_insert_with(|| {
                now.checked_sub(every.mul_f64(spread(&obs.cluster)))
                    .unwrap_or(now)
            });
            if now.duration_since(last) < every {
                return;
            }
            read_at.insert(obs.cluster.clone(), now);
        }
        let arn = &obs.spec.load_balancer.target_group_arn;
        let read = cloud.load_balancer.target_health(arn).await;
        if let Err(error) = &read {
            tracing::warn!(cluster = %obs.cluster, %error, "cannot read the target group; its members are checked at the next interval");
        }
        obs.target_group = Some(read.map_err(|e| e.to_string()));
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
            target_group: None,
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
