//! An in-memory EC2 + ELBv2 + CloudWatch, for the control-plane benchmark
//! only. moto spends ~70 ms of its own CPU per DescribeInstances at 50
//! instances, so a 10,000-instance fleet cannot be measured against it;
//! this keeps the same API shape hangar sees from AWS and counts every call
//! the way `hangar_cloud::aws` does (by service and operation, one call per
//! page), so the numbers translate to AWS request budgets.
//!
//! It is not a cloud simulator: instances never change state on their own,
//! targets are healthy at once, nothing drains, and traffic is a constant
//! rate per target. Ownership is enforced like the AWS implementation does
//! (a mutation naming a foreign instance is refused whole).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hangar::runtime::reconcile::CloudProvider;
use hangar_cloud::metric_batch::AlbAnswer;
use hangar_cloud::{
    tags, AlbBatch, AlbMetric, AlbQuery, ApiCalls, Artifacts, Cloud, CloudError, Compute,
    Datapoint, Instance, InstanceState, LaunchRequest, LoadBalancer, MetricBatcher, Metrics, Phase,
    TargetHealth, TargetState, VerifiedArtifact,
};
use hangar_crds::ArtifactSource;

/// EC2's DescribeInstances page maximum (`MaxResults`); hangar asks for it.
pub const PAGE: usize = 1000;

/// Everything the fake account holds.
#[derive(Default)]
struct Account {
    /// Insertion order, like EC2's listing order.
    instances: Vec<Instance>,
    by_id: HashMap<String, usize>,
    target_groups: HashMap<String, BTreeMap<String, TargetState>>,
    /// Target groups whose load balancer CloudWatch dimension was already
    /// looked up (the AWS implementation caches it after one
    /// DescribeTargetGroups).
    described_groups: HashSet<String>,
    next_id: u64,
}

/// One fake account and region, shared by every cluster.
pub struct MemoryCloud {
    owner: String,
    account: Mutex<Account>,
    /// Requests per minute each registered target receives (the traffic).
    per_target_rpm: f64,
    pub calls: Arc<ApiCalls>,
    metric_batcher: Arc<MetricBatcher>,
}

impl MemoryCloud {
    pub fn new(owner: &str, per_target_rpm: f64) -> Arc<MemoryCloud> {
        Arc::new(MemoryCloud {
            owner: owner.to_string(),
            account: Mutex::default(),
            per_target_rpm,
            calls: Arc::new(ApiCalls::default()),
            metric_batcher: Arc::default(),
        })
    }

    fn account(&self) -> MutexGuard<'_, Account> {
        self.account.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bundle the operator uses.
    pub fn cloud(self: &Arc<Self>) -> Cloud {
        Cloud {
            compute: self.clone(),
            load_balancer: self.clone(),
            metrics: Arc::new(MemoryMetrics(self.clone())),
            artifacts: self.clone(),
            secrets: self.clone(),
        }
    }

    /// Puts an instance in the account as if hangar had launched it long
    /// ago (no API call is counted: this is the benchmark's setup).
    pub fn seed_instance(&self, instance: Instance) {
        let mut acc = self.account();
        let idx = acc.instances.len();
        acc.by_id.insert(instance.id.clone(), idx);
        acc.instances.push(instance);
    }

    /// Registers seeded instances as healthy targets (setup, not counted).
    pub fn seed_targets(&self, target_group_arn: &str, ids: &[String]) {
        let mut acc = self.account();
        let group = acc
            .target_groups
            .entry(target_group_arn.to_string())
            .or_default();
        for id in ids {
            group.insert(id.clone(), TargetState::Healthy);
        }
    }

    /// A fresh instance id, EC2-shaped (`i-` and 17 hex digits).
    pub fn new_id(&self) -> String {
        let mut acc = self.account();
        acc.next_id += 1;
        format!("i-{:017x}", acc.next_id)
    }

    fn owned<'a>(&self, acc: &'a Account, id: &str) -> Option<&'a Instance> {
        acc.by_id
            .get(id)
            .map(|&i| &acc.instances[i])
            .filter(|i| i.tags.get(tags::OWNER).map(String::as_str) == Some(self.owner.as_str()))
    }

    /// Refuses the whole call unless every id is an owned instance.
    fn check_owned(&self, acc: &Account, ids: &[String]) -> Result<(), CloudError> {
        for id in ids {
            if self.owned(acc, id).is_none() {
                return Err(CloudError::NotOwned {
                    resource: id.clone(),
                    owner: self.owner.clone(),
                });
            }
        }
        Ok(())
    }

    fn retag(&self, id: &str, new: &[(&str, &str)]) -> Result<(), CloudError> {
        self.calls.record("ec2", "CreateTags", true);
        let mut acc = self.account();
        self.check_owned(&acc, &[id.to_string()])?;
        let idx = acc.by_id[id];
        let inst = &mut acc.instances[idx];
        for (k, v) in new {
            inst.tags.insert((*k).to_string(), (*v).to_string());
            match *k {
                tags::PHASE => inst.phase = v.parse().ok(),
                tags::RELEASE => inst.release = Some((*v).to_string()),
                _ => {}
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Compute for MemoryCloud {
    fn owner(&self) -> &str {
        &self.owner
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<Vec<Instance>, CloudError> {
        self.calls.record("ec2", "RunInstances", true);
        let mut out = Vec::new();
        for _ in 0..req.count {
            let mut tags = req.extra_tags.clone();
            tags.insert(tags::CLUSTER.into(), req.cluster.clone());
            tags.insert(tags::OWNER.into(), self.owner.clone());
            tags.insert(tags::PHASE.into(), Phase::Launching.to_string());
            tags.insert(tags::RELEASE.into(), req.release.clone());
            let instance = Instance {
                id: self.new_id(),
                cluster: req.cluster.clone(),
                phase: Some(Phase::Launching),
                release: Some(req.release.clone()),
                state: InstanceState::Pending,
                private_ip: None,
                public_ip: None,
                subnet_id: Some(req.subnet.clone()),
                availability_zone: None,
                launched_at: Some(Utc::now()),
                protected: false,
                client_token: Some(req.client_token.clone()),
                tags,
            };
            self.seed_instance(instance.clone());
            out.push(instance);
        }
        Ok(out)
    }

    /// DescribeInstances with the owner (and optionally cluster) tag filter
    /// applied server side, `MaxResults` = 1,000: one call per page, and
    /// one call even when nothing matches.
    async fn list(&self, cluster: Option<&str>) -> Result<Vec<Instance>, CloudError> {
        let acc = self.account();
        let matching: Vec<Instance> = acc
            .instances
            .iter()
            .filter(|i| i.tags.get(tags::OWNER).map(String::as_str) == Some(self.owner.as_str()))
            .filter(|i| cluster.is_none_or(|c| i.cluster == c))
            .filter(|i| i.state != InstanceState::Terminated)
            .cloned()
            .collect();
        drop(acc);
        let pages = matching.len().div_ceil(PAGE).max(1);
        for _ in 0..pages {
            self.calls.record("ec2", "DescribeInstances", true);
        }
        Ok(matching)
    }

    async fn set_phase(
        &self,
        id: &str,
        phase: Phase,
        release: Option<&str>,
    ) -> Result<(), CloudError> {
        let mut new = vec![(tags::PHASE, phase.as_str())];
        if let Some(r) = release {
            new.push((tags::RELEASE, r));
        }
        self.retag(id, &new)
    }

    async fn set_config(&self, id: &str, config: &str) -> Result<(), CloudError> {
        self.retag(id, &[(tags::CONFIG, config)])
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), CloudError> {
        // The AWS implementation checks ownership with a DescribeInstances
        // by id first.
        self.calls.record("ec2", "DescribeInstances", true);
        self.calls.record("ec2", "TerminateInstances", true);
        let mut acc = self.account();
        self.check_owned(&acc, ids)?;
        for id in ids {
            let idx = acc.by_id[id.as_str()];
            acc.instances[idx].state = InstanceState::ShuttingDown;
        }
        Ok(())
    }
}

#[async_trait]
impl LoadBalancer for MemoryCloud {
    async fn register(&self, target_group_arn: &str, ids: &[String]) -> Result<(), CloudError> {
        self.calls.record("ec2", "DescribeInstances", true);
        self.calls.record("elbv2", "RegisterTargets", true);
        let mut acc = self.account();
        self.check_owned(&acc, ids)?;
        let group = acc
            .target_groups
            .entry(target_group_arn.to_string())
            .or_default();
        for id in ids {
            group.insert(id.clone(), TargetState::Healthy);
        }
        Ok(())
    }

    async fn deregister(&self, target_group_arn: &str, ids: &[String]) -> Result<(), CloudError> {
        self.calls.record("ec2", "DescribeInstances", true);
        self.calls.record("elbv2", "DeregisterTargets", true);
        let mut acc = self.account();
        self.check_owned(&acc, ids)?;
        if let Some(group) = acc.target_groups.get_mut(target_group_arn) {
            for id in ids {
                group.remove(id);
            }
        }
        Ok(())
    }

    async fn target_health(&self, target_group_arn: &str) -> Result<Vec<TargetHealth>, CloudError> {
        self.calls.record("elbv2", "DescribeTargetHealth", true);
        let acc = self.account();
        let group =
            acc.target_groups
                .get(target_group_arn)
                .ok_or_else(|| CloudError::NotFound {
                    what: format!("target group {target_group_arn}"),
                    code: Some("TargetGroupNotFound".into()),
                })?;
        Ok(group
            .iter()
            .map(|(id, state)| TargetHealth {
                id: id.clone(),
                port: Some(80),
                state: *state,
                reason: None,
            })
            .collect())
    }

    async fn deregistration_delay(&self, _: &str) -> Result<Duration, CloudError> {
        self.calls
            .record("elbv2", "DescribeTargetGroupAttributes", true);
        Ok(Duration::from_secs(0))
    }
}

/// How long a `GetMetricData` takes here: a fast real one (CloudWatch
/// answers in tens of milliseconds). Answered instantly, no two reads would
/// ever be in flight together and the batching under test would never act.
const GET_METRIC_DATA_LATENCY: Duration = Duration::from_millis(20);

/// The metrics side of a [`MemoryCloud`]: reads go through the same
/// [`MetricBatcher`] the AWS implementation uses, so concurrent evaluations
/// share `GetMetricData` calls here as they do there.
#[derive(Clone)]
struct MemoryMetrics(Arc<MemoryCloud>);

#[async_trait]
impl Metrics for MemoryMetrics {
    async fn alb_sums(
        &self,
        target_group_arn: &str,
        metric: AlbMetric,
        period: Duration,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Datapoint>, CloudError> {
        let query = AlbQuery::new(target_group_arn, metric, period, start, end);
        self.0.metric_batcher.alb_sums(self, query).await
    }

    async fn prometheus(&self, _: &str, _: &str) -> Result<Option<f64>, CloudError> {
        self.0.calls.record("prometheus", "query", true);
        Ok(None)
    }
}

#[async_trait]
impl AlbBatch for MemoryMetrics {
    /// One GetMetricData call per batch (a page: 5 periods of 500 queries
    /// fit easily); the first read of a target group also costs the
    /// DescribeTargetGroups the AWS implementation makes to find the load
    /// balancer dimension.
    async fn alb_sums_batch(&self, queries: &[AlbQuery]) -> Vec<AlbAnswer> {
        self.0.calls.record("cloudwatch", "GetMetricData", true);
        tokio::time::sleep(GET_METRIC_DATA_LATENCY).await;
        queries.iter().map(|q| Ok(self.0.sums(q))).collect()
    }
}

impl MemoryCloud {
    /// A constant rate per registered target.
    fn sums(&self, q: &AlbQuery) -> Vec<Datapoint> {
        let targets = {
            let mut acc = self.account();
            if acc.described_groups.insert(q.target_group_arn.clone()) {
                self.calls.record("elbv2", "DescribeTargetGroups", true);
            }
            acc.target_groups
                .get(&q.target_group_arn)
                .map_or(0, |g| g.len())
        };
        let secs = q.period.as_secs().max(1) as i64;
        let per_period = self.per_target_rpm * secs as f64 / 60.0;
        let value = match q.metric {
            AlbMetric::RequestCountPerTarget => per_period,
            AlbMetric::RequestCount => per_period * targets as f64,
            AlbMetric::Target5xxCount => 0.0,
        };
        let mut t = q.start.timestamp() - q.start.timestamp().rem_euclid(secs);
        let mut points = Vec::new();
        while t < q.end.timestamp() {
            if let Some(start) = DateTime::from_timestamp(t, 0) {
                points.push(Datapoint { start, value });
            }
            t += secs;
        }
        points
    }
}

#[async_trait]
impl Artifacts for MemoryCloud {
    /// A steady fleet never ships a release; reaching this is a bug the
    /// benchmark reports (the call is counted).
    async fn fetch(
        &self,
        source: &ArtifactSource,
        _sha256: &str,
    ) -> Result<VerifiedArtifact, CloudError> {
        self.calls.record("s3", "GetObject", false);
        Err(CloudError::Artifact {
            artifact: format!("{source:?}"),
            message: "the benchmark cloud holds no artifacts".into(),
        })
    }
}

#[async_trait]
impl hangar_cloud::Secrets for MemoryCloud {
    /// The benchmark's specs name no `secretsFrom`; reaching this is a bug
    /// the benchmark reports (the call is counted).
    async fn parameters_by_path(
        &self,
        path: &str,
    ) -> Result<Vec<hangar_cloud::secrets::Parameter>, CloudError> {
        self.calls.record("ssm", "GetParametersByPath", false);
        Err(CloudError::NotFound {
            what: format!("SSM parameters under {path}"),
            code: None,
        })
    }

    async fn parameter(&self, name: &str) -> Result<hangar_cloud::secrets::Parameter, CloudError> {
        self.calls.record("ssm", "GetParameter", false);
        Err(CloudError::NotFound {
            what: format!("SSM parameter {name}"),
            code: None,
        })
    }

    async fn secret_string(&self, id: &str) -> Result<hangar_cloud::SecretValue, CloudError> {
        self.calls.record("secretsmanager", "GetSecretValue", false);
        Err(CloudError::NotFound {
            what: format!("secret {id}"),
            code: None,
        })
    }
}

/// The same in-memory cloud for every region.
pub struct MemoryClouds(pub Arc<MemoryCloud>);

#[async_trait]
impl CloudProvider for MemoryClouds {
    async fn cloud(&self, _region: &str) -> Result<Cloud, CloudError> {
        Ok(self.0.cloud())
    }
}
