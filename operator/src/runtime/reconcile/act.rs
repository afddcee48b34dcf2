//! Act: carry out a [`Decision`], each action on its own.
//!
//! A failing action never skips the others: it is reported into the next
//! pass's observation ([`ActionFailure`]), where `decide` folds it into
//! memory.

use std::sync::Arc;

use chrono::Utc;
use hangar_cloud::{Cloud, CloudError, Instance, LaunchRequest};

use super::{lock, Operator, ReconcileError};
use crate::core::decide::Decision;
use crate::core::fleet::{self, Task};
use crate::core::rollout::ReleaseStatus;
use crate::core::Observation;
use crate::effects::node_task::{self, NodeContext};
use crate::runtime::specs::ClusterSpecEntry;
use crate::runtime::status::ClusterStatus;

use crate::core::observation::ActionFailure;

/// What acting on a decision reported.
pub(super) struct Acted {
    /// The first launch error, if any (the pass then fails as a whole
    /// after everything else ran, and the cluster backs off).
    pub launch_error: Option<CloudError>,
}

impl Operator {
    /// Cancels and starts node tasks, then launches. `status` gets the
    /// launches' activity entries.
    pub(super) async fn act(
        &self,
        entry: &ClusterSpecEntry,
        cloud: &Cloud,
        obs: &Observation,
        decision: &Decision,
        status: &mut ClusterStatus,
    ) -> Acted {
        let name = entry.name();
        let mut failures = Vec::new();
        for action in &decision.diff.actions {
            match action {
                fleet::Action::Cancel { node, reason } => {
                    tracing::info!(cluster = %name, node = %node, reason = %reason, "cancelling node task");
                    self.tasks.cancel(node);
                }
                fleet::Action::Start { node, task } => {
                    let Some(instance) = obs.instances.iter().find(|i| i.id == *node) else {
                        continue;
                    };
                    // A cluster whose SSH settings are broken (missing key
                    // file…) cannot start node work; say so, keep going.
                    let started = self.start_task(
                        name,
                        Some(entry),
                        obs,
                        cloud,
                        instance,
                        task.clone(),
                        &decision.memory.release,
                    );
                    if let Err(e) = started {
                        tracing::warn!(cluster = %name, node = %node, error = %e, "cannot start node task");
                        failures.push(ActionFailure::Start {
                            node: node.clone(),
                            task: task.clone(),
                            error: e.to_string(),
                            at: Utc::now(),
                        });
                    }
                }
                fleet::Action::Launch { .. } => {}
            }
        }
        let mut launch_error = None;
        for action in &decision.diff.actions {
            let fleet::Action::Launch { subnet, count } = action else {
                continue;
            };
            let req = LaunchRequest {
                cluster: name.to_string(),
                release: decision.memory.release.target.clone(),
                count: *count,
                launch_template: obs.spec.instances.launch_template.clone(),
                launch_template_version: obs.spec.instances.launch_template_version.clone(),
                instance_type: obs.spec.instances.instance_type.clone(),
                subnet: subnet.clone(),
                extra_tags: obs.spec.instances.tags.clone(),
                client_token: client_token(name, subnet, *count, &obs.instances),
            };
            match cloud.compute.launch(&req).await {
                Ok(launched) => {
                    let ids: Vec<&str> = launched.iter().map(|i| i.id.as_str()).collect();
                    let message = format!("launched {} in {subnet}: {}", ids.len(), ids.join(", "));
                    tracing::info!(cluster = %name, subnet = %subnet, instances = ?ids, "launched");
                    status.record(Utc::now(), "launch", None, message);
                    self.inventory.launched(&obs.spec.region, launched);
                }
                Err(error) => {
                    tracing::warn!(cluster = %name, subnet = %subnet, error = %error, "launch failed");
                    launch_error.get_or_insert_with(|| error.clone());
                    failures.push(ActionFailure::Launch {
                        subnet: subnet.clone(),
                        count: *count,
                        error,
                        at: Utc::now(),
                    });
                }
            }
        }
        if !failures.is_empty() {
            lock(&self.failures)
                .entry(name.to_string())
                .or_default()
                .extend(failures);
        }
        Acted { launch_error }
    }

    /// A removed cluster's decision only drains and cancels.
    pub(super) fn act_removed(
        &self,
        name: &str,
        cloud: &Cloud,
        obs: &Observation,
        decision: &Decision,
    ) {
        let mut failures = Vec::new();
        for action in &decision.diff.actions {
            match action {
                fleet::Action::Start { node, task } => {
                    let Some(instance) = obs.instances.iter().find(|i| i.id == *node) else {
                        continue;
                    };
                    let started = self.start_task(
                        name,
                        None,
                        obs,
                        cloud,
                        instance,
                        task.clone(),
                        &decision.memory.release,
                    );
                    if let Err(e) = started {
                        failures.push(ActionFailure::Start {
                            node: node.clone(),
                            task: task.clone(),
                            error: e.to_string(),
                            at: Utc::now(),
                        });
                    }
                }
                fleet::Action::Cancel { node, .. } => self.tasks.cancel(node),
                fleet::Action::Launch { .. } => {}
            }
        }
        if !failures.is_empty() {
            lock(&self.failures)
                .entry(name.to_string())
                .or_default()
                .extend(failures);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_task(
        &self,
        cluster: &str,
        entry: Option<&ClusterSpecEntry>,
        obs: &Observation,
        cloud: &Cloud,
        instance: &Instance,
        task: Task,
        releases: &ReleaseStatus,
    ) -> Result<(), ReconcileError> {
        let spec_dir = entry.map(|e| e.loaded.spec_dir().to_path_buf());
        let ssh = self.ssh_pool(cluster, &obs.spec, spec_dir.as_deref())?;
        let ctx = NodeContext {
            cluster: cluster.to_string(),
            spec: obs.spec.clone(),
            runbook: entry.map(|e| e.loaded.runbook_path()),
            env_file: entry.and_then(|e| e.loaded.env_file_path()),
            config_hash: entry.map(|e| e.config_hash.clone()),
            release: releases.target.clone(),
            fallback_release: releases.last_good.clone(),
            artifacts: releases.known.clone(),
            cloud: cloud.clone(),
            ssh,
            instances: Arc::new(self.inventory.view(
                &obs.spec.region,
                cloud.compute.clone(),
                cluster,
            )),
            ssh_errors: self.telemetry.ssh_errors.clone(),
        };
        let instance = instance.clone();
        let node = instance.id.clone();
        let task_for_run = task.clone();
        self.tasks.start(cluster, &node, task, move |handle| {
            node_task::run(ctx, instance, task_for_run, handle)
        });
        Ok(())
    }
}

/// The same observation yields the same token, so a launch retried after a
/// lost response is recognised by EC2 instead of launching twice.
fn client_token(cluster: &str, subnet: &str, count: u32, instances: &[Instance]) -> String {
    use sha2::{Digest, Sha256};
    let mut ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    ids.sort_unstable();
    let mut h = Sha256::new();
    h.update(format!("{cluster}|{subnet}|{count}|{}", ids.join(",")));
    let mut token = hex::encode(h.finalize());
    token.truncate(40);
    format!("hangar-{token}")
}
