//! Act: carry out a [`Decision`], each action on its own.
//!
//! A failing action never skips the others: it is reported into the next
//! pass's observation ([`ActionFailure`]), where `decide` folds it into
//! memory.

use std::sync::Arc;

use chrono::Utc;
use hangar_cloud::{Cloud, Instance, LaunchRequest};

use super::{lock, Operator, ReconcileError};
use crate::core::decide::Decision;
use crate::core::fleet::{self, Task};
use crate::core::launches::LaunchIntent;
use crate::core::rollout::ReleaseStatus;
use crate::core::Observation;
use crate::effects::node_task::{self, NodeContext};
use crate::runtime::specs::ClusterSpecEntry;
use crate::runtime::status::ClusterStatus;

use crate::core::observation::ActionFailure;

/// What acting on a decision reported.
pub(super) struct Acted {
    /// A launch failed: the next pass (which falls back to other subnets
    /// or retries) should come soon.
    pub launch_failed: bool,
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
        let mut stored = true;
        if decision.persist_first {
            // Launch intents (their tokens) and the node a once run was
            // given to reach the disk before EC2 or the node hears of
            // them: a crash in between finds them after the restart.
            stored = self.persist(status);
        }
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
                // Launches are made from `decision.launches` below.
                fleet::Action::Launch { .. } => {}
            }
        }
        for intent in &decision.launches {
            // lease: an intent a successor could not read is not launched.
            let launched = match stored {
                true => self.launch(name, cloud, obs, intent, status).await,
                false => Err(intent_not_stored(intent)),
            };
            if let Err(failure) = launched {
                failures.push(failure);
            }
        }
        let launch_failed = failures
            .iter()
            .any(|f| matches!(f, ActionFailure::Launch { .. }));
        if !failures.is_empty() {
            lock(&self.failures)
                .entry(name.to_string())
                .or_default()
                .extend(failures);
        }
        Acted { launch_failed }
    }

    /// One `RunInstances` for `intent`, with its token.
    async fn launch(
        &self,
        name: &str,
        cloud: &Cloud,
        obs: &Observation,
        intent: &LaunchIntent,
        status: &mut ClusterStatus,
    ) -> Result<(), ActionFailure> {
        let instances = &obs.spec.instances;
        let req = LaunchRequest {
            cluster: name.to_string(),
            release: intent.release.clone(),
            count: intent.count,
            launch_template: instances.launch_template.clone(),
            // The number `$Latest`/`$Default` named when deciding: what the
            // node is stamped with is what it was launched from.
            launch_template_version: obs
                .launch_version
                .clone()
                .unwrap_or_else(|| instances.launch_template_version.clone()),
            instance_type: instances.instance_type.clone(),
            subnet: intent.subnet.clone(),
            extra_tags: instances.tags.clone(),
            client_token: intent.token.clone(),
            launch_settings: obs.launch_stamp().unwrap_or_default(),
        };
        let subnet = &intent.subnet;
        match cloud.compute.launch(&req).await {
            Ok(launched) => {
                let ids: Vec<&str> = launched.iter().map(|i| i.id.as_str()).collect();
                let message = format!("launched {} in {subnet}: {}", ids.len(), ids.join(", "));
                tracing::info!(cluster = %name, subnet = %subnet, token = %intent.token, instances = ?ids, "launched");
                status.record(Utc::now(), "launch", None, message);
                self.inventory.launched(&obs.spec.region, launched);
                Ok(())
            }
            Err(error) => {
                tracing::warn!(cluster = %name, subnet = %subnet, token = %intent.token, error = %error, "launch failed");
                Err(ActionFailure::Launch {
                    token: intent.token.clone(),
                    subnet: subnet.clone(),
                    count: intent.count,
                    error,
                    at: Utc::now(),
                })
            }
        }
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
            secret_env: entry.and_then(|_| self.secrets.current(cluster)),
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

/// The launch was not made because its intent could not be stored (with a
/// distributed lease: not in the shared store, so a successor would not
/// know its token). Transient: the next pass calls again, same token.
fn intent_not_stored(intent: &LaunchIntent) -> ActionFailure {
    ActionFailure::Launch {
        token: intent.token.clone(),
        subnet: intent.subnet.clone(),
        count: intent.count,
        error: hangar_cloud::CloudError::NotLeader {
            operation: "RunInstances".into(),
            reason: "its launch intent could not be stored".into(),
        },
        at: Utc::now(),
    }
}
