//! [`Compute`] on EC2: RunInstances with tags at launch, tag-filtered
//! DescribeInstances, CreateTags, StopInstances, StartInstances and
//! TerminateInstances on owned instances.

use std::collections::BTreeMap;
use std::net::IpAddr;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    Filter, Instance as Ec2Instance, InstanceStateName, InstanceType, LaunchTemplateSpecification,
    ResourceType, Tag, TagSpecification,
};

use super::errors::from_sdk;
use super::limiter::Budget;
use super::ownership::dedup;
use super::AwsCloud;
use crate::compute::{Compute, LaunchRequest};
use crate::error::CloudError;
use crate::model::{tags, Instance, InstanceState, Phase};

/// EC2's page size maximum: a fleet of 10,000 is listed in 10 calls.
const LIST_PAGE: i32 = 1000;
/// Ids per TerminateInstances; the resource bucket holds 1000.
const TERMINATE_BATCH: usize = 1000;
/// Every state but `terminated`.
const LIVE_STATES: [&str; 5] = ["pending", "running", "shutting-down", "stopping", "stopped"];
/// How long a resolved `$Latest`/`$Default` is trusted by default: a new template
/// version is noticed within this, at one Describe per template.
pub(crate) const TEMPLATE_VERSION_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// AWS's tag limits.
const MAX_TAGS: usize = 50;
const MAX_KEY: usize = 128;
const MAX_VALUE: usize = 256;

#[async_trait]
impl Compute for AwsCloud {
    fn owner(&self) -> &str {
        &self.inner.owner
    }

    async fn launch(&self, req: &LaunchRequest) -> Result<Vec<Instance>, CloudError> {
        validate_launch(req)?;
        // The lease is checked, but the epoch is not stamped at launch: a
        // launch is retried with its ClientToken by whichever leader holds
        // the intent, and EC2 answers a token sent with other parameters
        // (an epoch tag of a later term) with IdempotentParameterMismatch —
        // a second launch. The instance gets the epoch with its first
        // phase write.
        self.authorize("RunInstances")?;
        let tags = launch_tags(req, self.owner())?;
        let mut template = LaunchTemplateSpecification::builder();
        template = if req.launch_template.starts_with("lt-") {
            template.launch_template_id(&req.launch_template)
        } else {
            template.launch_template_name(&req.launch_template)
        };
        if !req.launch_template_version.is_empty() {
            template = template.version(&req.launch_template_version);
        }
        let ec2_tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let tag_specs = [ResourceType::Instance, ResourceType::Volume].map(|rt| {
            TagSpecification::builder()
                .resource_type(rt)
                .set_tags(Some(ec2_tags.clone()))
                .build()
        });
        // min = max: all or nothing, so a capacity shortage is an error the
        // operator sees (and can retry in another subnet) rather than a
        // silently smaller batch.
        let count = i32::try_from(req.count).map_err(|_| invalid("count is too large"))?;
        self.inner.limiter.run_instances(req.count).await;
        let out = self
            .inner
            .ec2
            .run_instances()
            .launch_template(template.build())
            .set_instance_type(req.instance_type.as_deref().map(InstanceType::from))
            .subnet_id(&req.subnet)
            .min_count(count)
            .max_count(count)
            .client_token(&req.client_token)
            .set_tag_specifications(Some(tag_specs.to_vec()))
            .send()
            .await
            .map_err(|e| {
                from_sdk(
                    "ec2",
                    || {
                        format!(
                            "launch template {} / subnet {}",
                            req.launch_template, req.subnet
                        )
                    },
                    e,
                )
            })?;
        let launched: Vec<Instance> = out
            .instances()
            .iter()
            .filter_map(|i| {
                let mut instance = instance_from_ec2(i)?;
                // The response may omit tags; they were set atomically with
                // the launch, so report what was requested.
                for (k, v) in &tags {
                    instance.tags.entry(k.clone()).or_insert_with(|| v.clone());
                }
                instance
                    .client_token
                    .get_or_insert_with(|| req.client_token.clone());
                Some(with_hangar_fields(instance))
            })
            .collect();
        self.trust_owned(launched.iter().map(|i| i.id.as_str()));
        tracing::info!(
            cluster = %req.cluster,
            subnet = %req.subnet,
            ids = ?launched.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            "launched instances"
        );
        Ok(launched)
    }

    async fn resolve_template_version(
        &self,
        template: &str,
        version: &str,
    ) -> Result<String, CloudError> {
        if version.bytes().all(|b| b.is_ascii_digit()) && !version.is_empty() {
            return Ok(version.to_string());
        }
        let key = (template.to_string(), version.to_string());
        if let Some((at, v)) = self
            .inner
            .template_versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if at.elapsed() < self.inner.template_version_ttl {
                return Ok(v.clone());
            }
        }
        self.inner.limiter.request(Budget::Ec2Describe).await;
        let ask = self.inner.ec2.describe_launch_templates();
        let ask = if template.starts_with("lt-") {
            ask.launch_template_ids(template)
        } else {
            ask.launch_template_names(template)
        };
        let out = ask
            .send()
            .await
            .map_err(|e| from_sdk("ec2", || format!("launch template {template}"), e))?;
        let found = out.launch_templates().first().and_then(|t| match version {
            "$Latest" => t.latest_version_number(),
            _ => t.default_version_number(),
        });
        let Some(number) = found else {
            return Err(invalid(&format!(
                "launch template {template}: no {version} version"
            )));
        };
        let number = number.to_string();
        self.inner
            .template_versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (std::time::Instant::now(), number.clone()));
        Ok(number)
    }

    async fn list(&self, cluster: Option<&str>) -> Result<Vec<Instance>, CloudError> {
        let mut filters = vec![
            filter(&format!("tag:{}", tags::OWNER), [self.owner()]),
            filter("instance-state-name", LIVE_STATES),
        ];
        if let Some(cluster) = cluster {
            filters.push(filter(&format!("tag:{}", tags::CLUSTER), [cluster]));
        }
        let mut instances = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.inner.limiter.request(Budget::Ec2Describe).await;
            let out = self
                .inner
                .ec2
                .describe_instances()
                .set_filters(Some(filters.clone()))
                .max_results(LIST_PAGE)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| {
                    from_sdk("ec2", || format!("instances of owner {}", self.owner()), e)
                })?;
            instances.extend(
                out.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .filter_map(instance_from_ec2)
                    .map(with_hangar_fields)
                    // The filters already say so; never trust a page that
                    // disagrees.
                    .filter(|i| i.tags.get(tags::OWNER).map(String::as_str) == Some(self.owner()))
                    .filter(|i| cluster.is_none_or(|c| i.cluster == c))
                    .filter(|i| i.state != InstanceState::Terminated),
            );
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        self.observe_epochs(&instances);
        Ok(instances)
    }

    async fn set_phase(
        &self,
        id: &str,
        phase: Phase,
        release: Option<&str>,
    ) -> Result<(), CloudError> {
        let epoch = self.authorize("CreateTags")?.map(|e| e.to_string());
        let mut new_tags = vec![(tags::PHASE, phase.as_str())];
        if let Some(release) = release {
            new_tags.push((tags::RELEASE, release));
        }
        if let Some(epoch) = &epoch {
            new_tags.push((tags::EPOCH, epoch.as_str()));
        }
        self.tag_owned(id, &new_tags).await?;
        tracing::debug!(instance = id, %phase, release, "phase set");
        Ok(())
    }

    async fn set_config(&self, id: &str, config: &str) -> Result<(), CloudError> {
        self.tag_owned(id, &[(tags::CONFIG, config)]).await
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), CloudError> {
        let ids = dedup(ids);
        if ids.is_empty() {
            return Ok(());
        }
        // Every id is checked before any is terminated: one foreign id
        // refuses the whole call.
        self.verify_owned(&ids).await?;
        for chunk in ids.chunks(TERMINATE_BATCH) {
            self.inner
                .limiter
                .terminate(u32::try_from(chunk.len()).unwrap_or(u32::MAX))
                .await;
            self.inner
                .ec2
                .terminate_instances()
                .set_instance_ids(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| from_sdk("ec2", || format!("instance {}", chunk.join(", ")), e))?;
        }
        self.forget_owned(&ids);
        tracing::info!(ids = ?ids, "terminated instances");
        Ok(())
    }

    async fn stop(&self, id: &str) -> Result<(), CloudError> {
        self.verify_owned(&[id.to_string()]).await?;
        self.inner
            .ec2
            .stop_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| from_sdk("ec2", || format!("instance {id}"), e))?;
        tracing::info!(id, "stopped instance");
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), CloudError> {
        self.verify_owned(&[id.to_string()]).await?;
        self.inner
            .ec2
            .start_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| from_sdk("ec2", || format!("instance {id}"), e))?;
        tracing::info!(id, "started instance");
        Ok(())
    }
}

impl AwsCloud {
    /// CreateTags on one instance, after checking it is ours and alive.
    async fn tag_owned(&self, id: &str, new_tags: &[(&str, &str)]) -> Result<(), CloudError> {
        for (k, v) in new_tags {
            check_value(k, v)?;
        }
        let owned = self.verify_owned(&[id.to_string()]).await?;
        if owned
            .iter()
            .any(|i| state_of(i) == InstanceState::Terminated)
        {
            return Err(CloudError::NotFound {
                what: format!("instance {id} (terminated)"),
                code: Some(crate::error::TERMINATED.into()),
            });
        }
        let ec2_tags = new_tags
            .iter()
            .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
            .collect();
        self.inner.limiter.request(Budget::Ec2CreateTags).await;
        self.inner
            .ec2
            .create_tags()
            .resources(id)
            .set_tags(Some(ec2_tags))
            .send()
            .await
            .map_err(|e| from_sdk("ec2", || format!("instance {id}"), e))?;
        Ok(())
    }
}

/// The tags every launched instance and volume gets, hangar's last so
/// they cannot be overridden. The same for every retry of a token.
fn launch_tags(req: &LaunchRequest, owner: &str) -> Result<BTreeMap<String, String>, CloudError> {
    let mut all = BTreeMap::new();
    for (k, v) in &req.extra_tags {
        let lower = k.to_ascii_lowercase();
        if lower.starts_with("hangar:") || lower.starts_with("aws:") {
            return Err(invalid(&format!(
                "extra tag `{k}`: the `hangar:` and `aws:` prefixes are reserved"
            )));
        }
        if k.is_empty() || k.len() > MAX_KEY {
            return Err(invalid(&format!(
                "extra tag key `{k}` must be 1-{MAX_KEY} characters"
            )));
        }
        check_value(k, v)?;
        all.insert(k.clone(), v.clone());
    }
    for (k, v) in [
        (tags::CLUSTER, req.cluster.as_str()),
        (tags::OWNER, owner),
        (tags::PHASE, Phase::Launching.as_str()),
        (tags::RELEASE, req.release.as_str()),
    ] {
        check_value(k, v)?;
        all.insert(k.to_string(), v.to_string());
    }
    if !req.launch_settings.is_empty() {
        check_value(tags::LAUNCH, &req.launch_settings)?;
        all.insert(tags::LAUNCH.to_string(), req.launch_settings.clone());
    }
    if all.len() > MAX_TAGS {
        return Err(invalid(&format!(
            "{} tags; AWS allows {MAX_TAGS} per resource",
            all.len()
        )));
    }
    Ok(all)
}

fn validate_launch(req: &LaunchRequest) -> Result<(), CloudError> {
    if req.count == 0 {
        return Err(invalid("count must be at least 1"));
    }
    if req.cluster.is_empty() {
        return Err(invalid("cluster must not be empty"));
    }
    if req.subnet.is_empty() {
        return Err(invalid("a subnet is required"));
    }
    if req.launch_template.is_empty() {
        return Err(invalid("a launch template is required"));
    }
    let token_ok = !req.client_token.is_empty()
        && req.client_token.len() <= 64
        && req.client_token.bytes().all(|b| b.is_ascii_graphic());
    if !token_ok {
        return Err(invalid(
            "client token must be 1-64 printable ASCII characters",
        ));
    }
    Ok(())
}

fn check_value(key: &str, value: &str) -> Result<(), CloudError> {
    if value.len() > MAX_VALUE {
        return Err(invalid(&format!(
            "tag `{key}`: value longer than {MAX_VALUE} characters"
        )));
    }
    Ok(())
}

fn invalid(message: &str) -> CloudError {
    CloudError::InvalidInput {
        code: None,
        message: message.to_string(),
    }
}

fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(str::to_string).collect()))
        .build()
}

fn state_of(i: &Ec2Instance) -> InstanceState {
    match i.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::ShuttingDown) => InstanceState::ShuttingDown,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        // `pending`, and states a newer API might add: the instance exists
        // but is not usable yet.
        _ => InstanceState::Pending,
    }
}

/// EC2's view of an instance, before hangar's tags are interpreted.
fn instance_from_ec2(i: &Ec2Instance) -> Option<Instance> {
    let id = i.instance_id()?.to_string();
    let tags: BTreeMap<String, String> = i
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect();
    let ip = |s: Option<&str>| s.and_then(|s| s.parse::<IpAddr>().ok());
    Some(Instance {
        id,
        cluster: String::new(),
        phase: None,
        release: None,
        state: state_of(i),
        private_ip: ip(i.private_ip_address()),
        public_ip: ip(i.public_ip_address()),
        subnet_id: i.subnet_id().map(str::to_string),
        availability_zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .map(str::to_string),
        launched_at: i
            .launch_time()
            .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
        protected: false,
        client_token: i
            .client_token()
            .filter(|t| !t.is_empty())
            .map(str::to_string),
        tags,
    })
}

/// Fills the fields hangar derives from its tags.
fn with_hangar_fields(mut instance: Instance) -> Instance {
    instance.cluster = instance
        .tags
        .get(tags::CLUSTER)
        .cloned()
        .unwrap_or_default();
    instance.phase = instance
        .tags
        .get(tags::PHASE)
        .and_then(|p| p.parse::<Phase>().ok());
    instance.release = instance.tags.get(tags::RELEASE).cloned();
    instance.protected = instance
        .tags
        .get(tags::PROTECTED)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    instance
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{InstanceState as Ec2State, Placement};

    use super::*;

    fn request() -> LaunchRequest {
        LaunchRequest {
            cluster: "web".into(),
            release: "r1".into(),
            count: 2,
            launch_template: "lt-0abc".into(),
            launch_template_version: "$Default".into(),
            instance_type: None,
            subnet: "subnet-1".into(),
            extra_tags: BTreeMap::from([("team".into(), "payments".into())]),
            client_token: "web-r1-1".into(),
            launch_settings: "ls1".into(),
        }
    }

    #[test]
    fn hangar_tags_are_set_and_cannot_be_overridden() {
        let tags = launch_tags(&request(), "op-1").unwrap();
        assert!(!tags.contains_key("hangar:epoch"), "never at launch");
        assert_eq!(tags["hangar:cluster"], "web");
        assert_eq!(tags["hangar:owner"], "op-1");
        assert_eq!(tags["hangar:phase"], "launching");
        assert_eq!(tags["hangar:release"], "r1");
        assert_eq!(tags["hangar:launch"], "ls1");
        assert_eq!(tags["team"], "payments");
        for reserved in ["hangar:owner", "Hangar:Phase", "aws:foo"] {
            let mut req = request();
            req.extra_tags.insert(reserved.into(), "x".into());
            assert!(
                matches!(
                    launch_tags(&req, "op-1"),
                    Err(CloudError::InvalidInput { .. })
                ),
                "{reserved}"
            );
        }
    }

    #[test]
    fn launch_requests_are_validated_before_any_call() {
        let bad: [fn(&mut LaunchRequest); 5] = [
            |r| r.count = 0,
            |r| r.subnet.clear(),
            |r| r.client_token.clear(),
            |r| r.client_token = "x".repeat(65),
            |r| r.launch_template.clear(),
        ];
        for (n, mutate) in bad.iter().enumerate() {
            let mut req = request();
            mutate(&mut req);
            assert!(validate_launch(&req).is_err(), "case {n}");
        }
        assert!(validate_launch(&request()).is_ok());
    }

    #[test]
    fn ec2_instances_map_into_the_model() {
        let ec2 = Ec2Instance::builder()
            .instance_id("i-1")
            .state(Ec2State::builder().name(InstanceStateName::Running).build())
            .private_ip_address("127.77.1.4")
            .subnet_id("subnet-1")
            .placement(Placement::builder().availability_zone("us-east-1a").build())
            .tags(Tag::builder().key("hangar:cluster").value("web").build())
            .tags(
                Tag::builder()
                    .key("hangar:phase")
                    .value("in-service")
                    .build(),
            )
            .tags(Tag::builder().key("hangar:release").value("r2").build())
            .tags(Tag::builder().key("hangar:protected").value("True").build())
            .build();
        let i = with_hangar_fields(instance_from_ec2(&ec2).unwrap());
        assert_eq!(i.id, "i-1");
        assert_eq!(i.cluster, "web");
        assert_eq!(i.phase, Some(Phase::InService));
        assert_eq!(i.release.as_deref(), Some("r2"));
        assert_eq!(i.state, InstanceState::Running);
        assert_eq!(i.private_ip, Some("127.77.1.4".parse().unwrap()));
        assert_eq!(i.availability_zone.as_deref(), Some("us-east-1a"));
        assert!(i.protected);

        let odd = Ec2Instance::builder()
            .instance_id("i-2")
            .tags(Tag::builder().key("hangar:phase").value("bogus").build())
            .build();
        let i = with_hangar_fields(instance_from_ec2(&odd).unwrap());
        assert_eq!(i.phase, None, "an unreadable phase is None, not an error");
        assert_eq!(i.state, InstanceState::Pending);
    }
}
