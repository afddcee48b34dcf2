//! What runs beside moto: the host manager, the LB data plane, the AWS
//! gateway in front of moto and the metrics publisher, started and stopped
//! together. The test harness runs
//! them in-process; `hangar-local serve` runs them as the quickstart's daemon.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::aws::Clients;
use crate::debian::DebianOptions;
use crate::gateway::{Gateway, GatewayError, Semantics};
use crate::hosts::{HostOptions, Hosts, HostsError, NodeView};
use crate::lb::{HealthCheckOptions, Lb, LbError, LbOptions, TargetView};
use crate::metrics::{MetricsOptions, Published, Publisher};
use crate::seed::Seeded;
use crate::slot::Slot;

#[derive(Debug, thiserror::Error)]
pub enum ServicesError {
    #[error("host manager: {0}")]
    Hosts(#[from] HostsError),
    #[error(transparent)]
    Lb(#[from] LbError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("the seeded ARNs have no CloudWatch dimensions: {0}")]
    Dimensions(String),
    #[error("starting the host manager: {0}")]
    Join(String),
}

#[derive(Clone, Debug)]
pub struct ServiceOptions {
    pub slot: Slot,
    pub nodes_dir: PathBuf,
    /// Public key line every node accepts.
    pub authorized_key: String,
    /// Keep nodes a previous daemon left running (see [`HostOptions::adopt`]).
    pub adopt: bool,
    pub host_poll: Duration,
    pub lb_listen: SocketAddr,
    /// Where the AWS gateway listens (see [`crate::gateway`]).
    pub gateway_listen: SocketAddr,
    /// moto's own endpoint, behind the gateway.
    pub moto_endpoint: String,
    pub target_poll: Duration,
    pub health: HealthCheckOptions,
    pub metrics_interval: Duration,
    /// The AWS behaviours the gateway adds to moto (AWS's by default).
    pub semantics: Semantics,
    /// `Some`: `debian` nodes (see [`HostOptions::debian`]).
    pub debian: Option<DebianOptions>,
}

/// The running services. Stop them with [`Services::shutdown`]; dropping
/// them only cancels (nodes are then stopped by the host manager's task if
/// its runtime is still alive).
pub struct Services {
    pub hosts: Hosts,
    pub lb: Lb,
    pub gateway: Gateway,
    pub metrics: Publisher,
    slot: Slot,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("slot", &self.slot)
            .field("lb", &self.lb)
            .finish()
    }
}

impl Services {
    pub async fn start(
        clients: &Clients,
        seeded: &Seeded,
        options: ServiceOptions,
    ) -> Result<Services, ServicesError> {
        let load_balancer = seeded
            .load_balancer_dimension()
            .ok_or_else(|| ServicesError::Dimensions(seeded.load_balancer_arn.clone()))?;
        let target_group = seeded
            .target_group_dimension()
            .ok_or_else(|| ServicesError::Dimensions(seeded.target_group_arn.clone()))?;

        let mut host_options =
            HostOptions::new(options.slot, &options.nodes_dir, &options.authorized_key);
        host_options.vpc_id = Some(seeded.vpc_id.clone());
        host_options.poll = options.host_poll;
        host_options.adopt = options.adopt;
        host_options.debian = options.debian.clone();
        // Blocking: may kill a previous run's leftovers.
        let hosts = tokio::task::spawn_blocking(move || Hosts::new(host_options))
            .await
            .map_err(|e| ServicesError::Join(e.to_string()))??;

        let cancel = CancellationToken::new();
        let mut lb_options = LbOptions::new(options.lb_listen, &seeded.target_group_arn);
        lb_options.target_poll = options.target_poll;
        lb_options.health = options.health;
        let (lb, lb_task) = Lb::start(
            lb_options,
            clients.elb.clone(),
            hosts.directory(),
            cancel.clone(),
        )
        .await?;

        let (gateway, gateway_task) = Gateway::start(
            options.gateway_listen,
            &options.moto_endpoint,
            lb.clone(),
            options.semantics.clone(),
            cancel.clone(),
        )
        .await?;

        let hosts_task = tokio::spawn(hosts.clone().run(clients.ec2.clone(), cancel.clone()));
        let metrics = Publisher::default();
        let metrics_task = tokio::spawn(metrics.clone().run(
            lb.clone(),
            clients.cloudwatch.clone(),
            MetricsOptions {
                interval: options.metrics_interval,
                load_balancer,
                target_group,
            },
            cancel.clone(),
        ));
        tracing::info!(lb = %lb.url(), aws = %gateway.endpoint(), slot = options.slot.index(), "local cloud services up");
        Ok(Services {
            hosts,
            lb,
            gateway,
            metrics,
            slot: options.slot,
            cancel,
            tasks: vec![hosts_task, lb_task, gateway_task, metrics_task],
        })
    }

    /// Stops the LB and the publisher, and every node (waits until no
    /// process is left in any of them).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// A summary for `status` (written to `status.json` by the daemon).
    pub fn snapshot(&self) -> Snapshot {
        let mut node_pids = BTreeMap::new();
        for node in self.hosts.nodes() {
            let pids = crate::node::pids_in_namespace(&node.namespace).len();
            node_pids.insert(node.instance_id.clone(), pids);
        }
        Snapshot {
            written: SystemTime::now(),
            slot: self.slot.index(),
            lb_url: self.lb.url(),
            aws_endpoint: self.gateway.endpoint(),
            nodes: self.hosts.nodes(),
            node_pids,
            node_errors: self.hosts.errors(),
            targets: self.lb.targets(),
            requests_total: self.lb.next_seq(),
            last_metrics: self.metrics.last(),
            last_poll_error: self.hosts.last_poll_error(),
            last_target_sync_error: self.lb.last_sync_error(),
        }
    }
}

/// What the services are doing now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub written: SystemTime,
    pub slot: u8,
    pub lb_url: String,
    pub aws_endpoint: String,
    pub nodes: Vec<NodeView>,
    /// Processes alive in each node's namespace.
    pub node_pids: BTreeMap<String, usize>,
    pub node_errors: BTreeMap<String, String>,
    pub targets: Vec<TargetView>,
    pub requests_total: u64,
    pub last_metrics: Option<Published>,
    pub last_poll_error: Option<String>,
    pub last_target_sync_error: Option<String>,
}
