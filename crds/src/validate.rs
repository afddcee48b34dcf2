//! Checks the type system cannot express: min ≤ max, cron parses, the
//! runbook exists, and so on.
//!
//! Every problem names the exact field (`spec.schedules[1].timezone`) so the
//! loader can point at its line, and all problems are reported at once: a
//! person fixing a spec should not have to play whack-a-mole.

use std::collections::BTreeSet;
use std::path::{Component, Path};

use crate::artifact::ArtifactSource;
use crate::duration::Duration;
use crate::schedule::Window;
use crate::spec::{Cluster, HostKeyPolicy, MetricSource};

/// Upper bound on any capacity number; a typo of 2000 for 20 should not
/// launch two thousand machines.
pub const MAX_NODES: u32 = 1000;

/// One semantic problem, located by field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn check(&mut self, ok: bool, path: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.add(path, message);
        }
    }
}

/// Whether `s` is an RFC 1123 DNS label, the rule for every name in a spec.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` can name a release directory: no separators, no dot names.
pub fn is_release_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && !s.ends_with(".tmp")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Validates `cluster`. `spec_dir` is the directory of the file it came
/// from; paths in the spec (runbook, env file) are relative to it. Pass
/// `None` to skip file-existence checks.
pub fn validate(cluster: &Cluster, spec_dir: Option<&Path>) -> Vec<FieldError> {
    let mut e = Errors(Vec::new());
    let spec = &cluster.spec;

    e.check(
        is_dns_label(&cluster.metadata.name),
        "metadata.name",
        format!(
            "`{}` is not a DNS label (lowercase letters, digits and `-`, at most 63 characters)",
            cluster.metadata.name
        ),
    );

    e.check(
        is_region(&spec.region),
        "spec.region",
        format!(
            "`{}` does not look like an AWS region (e.g. `eu-west-1`)",
            spec.region
        ),
    );

    // instances
    let inst = &spec.instances;
    e.check(
        !inst.launch_template.trim().is_empty(),
        "spec.instances.launchTemplate",
        "must not be empty",
    );
    let v = inst.launch_template_version.as_str();
    e.check(
        v == "$Default"
            || v == "$Latest"
            || (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())),
        "spec.instances.launchTemplateVersion",
        format!("`{v}` must be `$Default`, `$Latest` or a version number"),
    );
    e.check(
        !inst.subnets.is_empty(),
        "spec.instances.subnets",
        "list at least one subnet",
    );
    let mut seen = BTreeSet::new();
    for (i, s) in inst.subnets.iter().enumerate() {
        e.check(
            s.starts_with("subnet-"),
            format!("spec.instances.subnets[{i}]"),
            format!("`{s}` is not a subnet id (subnet-…)"),
        );
        e.check(
            seen.insert(s),
            format!("spec.instances.subnets[{i}]"),
            format!("`{s}` is listed twice"),
        );
    }
    for key in inst.tags.keys() {
        let lower = key.to_ascii_lowercase();
        e.check(
            !lower.starts_with("hangar:") && !lower.starts_with("aws:"),
            format!("spec.instances.tags.{key}"),
            "tag keys starting with `hangar:` or `aws:` are reserved",
        );
    }

    if let Some(life) = inst.max_lifetime {
        e.check(
            life.get() >= std::time::Duration::from_secs(600),
            "spec.instances.maxLifetime",
            "must be at least 10m (a node must live long enough to be replaced)",
        );
    }

    // load balancer
    let arn = &spec.load_balancer.target_group_arn;
    e.check(
        arn.starts_with("arn:") && arn.contains(":elasticloadbalancing:") && arn.contains(":targetgroup/"),
        "spec.loadBalancer.targetGroupArn",
        format!("`{arn}` is not a target group ARN (arn:aws:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID)"),
    );

    // capacity
    let cap = spec.capacity;
    e.check(cap.max >= 1, "spec.capacity.max", "must be at least 1");
    e.check(
        cap.max <= MAX_NODES,
        "spec.capacity.max",
        format!(
            "{} is above the limit of {MAX_NODES} nodes per cluster",
            cap.max
        ),
    );
    e.check(
        cap.min <= cap.max,
        "spec.capacity.min",
        format!("min ({}) is greater than max ({})", cap.min, cap.max),
    );

    // autoscaling
    if let Some(a) = &spec.autoscaling {
        let p = "spec.autoscaling";
        e.check(
            a.target_per_node.is_finite() && a.target_per_node > 0.0,
            format!("{p}.targetPerNode"),
            "must be a positive number of requests per minute",
        );
        e.check(
            a.tolerance.is_finite() && (0.0..1.0).contains(&a.tolerance),
            format!("{p}.tolerance"),
            "must be at least 0 and below 1 (0.1 = ±10 %)",
        );
        e.check(
            a.evaluation_interval >= Duration::from_secs(1),
            format!("{p}.evaluationInterval"),
            "must be at least 1s",
        );
        e.check(
            a.metric_max_age >= a.evaluation_interval,
            format!("{p}.metricMaxAge"),
            "must be at least evaluationInterval, or every reading would count as missing",
        );
        e.check(
            a.scale_up.max_step >= 1,
            format!("{p}.scaleUp.maxStep"),
            "must be at least 1",
        );
        e.check(
            a.scale_down.max_step >= 1,
            format!("{p}.scaleDown.maxStep"),
            "must be at least 1",
        );
        if let MetricSource::Cloudwatch(cw) = &a.metric {
            let period = cw.options().period;
            // GetMetricData accepts these periods and no others.
            let secs = period.get().as_secs();
            e.check(
                period.get().subsec_millis() == 0
                    && (matches!(secs, 1 | 5 | 10 | 30) || (secs > 0 && secs % 60 == 0)),
                format!("{p}.metric.cloudwatch"),
                format!(
                    "period {period}: CloudWatch accepts 1s, 5s, 10s, 30s or a multiple of 60s"
                ),
            );
            e.check(
                a.metric_max_age.get() >= period.get() * 2,
                format!("{p}.metricMaxAge"),
                format!("must be at least twice the metric period ({period}): the latest complete period is that old"),
            );
        }
        if let MetricSource::Prometheus(prom) = &a.metric {
            e.check(
                prom.url.starts_with("http://") || prom.url.starts_with("https://"),
                format!("{p}.metric.prometheus.url"),
                format!("`{}` must be an http:// or https:// URL", prom.url),
            );
            e.check(
                !prom.query.trim().is_empty(),
                format!("{p}.metric.prometheus.query"),
                "must not be empty",
            );
        }
    }

    // schedules
    let mut names = BTreeSet::new();
    for (i, s) in spec.schedules.iter().enumerate() {
        let p = format!("spec.schedules[{i}]");
        e.check(
            is_dns_label(&s.name),
            format!("{p}.name"),
            format!("`{}` is not a DNS label", s.name),
        );
        e.check(
            names.insert(&s.name),
            format!("{p}.name"),
            format!("schedule `{}` is defined twice", s.name),
        );
        if let Err(errs) = Window::parse(s) {
            for err in errs {
                e.add(format!("{p}.{}", err.field), err.message);
            }
        }
        let o = s.capacity;
        e.check(
            o.min.is_some() || o.max.is_some(),
            format!("{p}.capacity"),
            "set min, max or both",
        );
        let (min, max) = (o.min.unwrap_or(cap.min), o.max.unwrap_or(cap.max));
        e.check(
            max <= MAX_NODES,
            format!("{p}.capacity.max"),
            format!("{max} is above the limit of {MAX_NODES} nodes per cluster"),
        );
        e.check(
            min <= max,
            format!("{p}.capacity"),
            format!(
                "while `{}` is active the window would be min {min} > max {max}",
                s.name
            ),
        );
    }

    // ssh
    e.check(
        !spec.ssh.user.trim().is_empty(),
        "spec.ssh.user",
        "must not be empty",
    );
    e.check(spec.ssh.port != 0, "spec.ssh.port", "must not be 0");
    e.check(
        !spec.ssh.private_key_file.as_os_str().is_empty(),
        "spec.ssh.privateKeyFile",
        "must not be empty",
    );
    if spec.ssh.host_key_policy == HostKeyPolicy::KnownHosts {
        e.check(
            spec.ssh.known_hosts_file.is_some(),
            "spec.ssh.knownHostsFile",
            "required with hostKeyPolicy: known-hosts",
        );
    }
    e.check(
        !spec.ssh.connect_timeout.is_zero(),
        "spec.ssh.connectTimeout",
        "must be greater than 0s",
    );
    e.check(
        !spec.ssh.command_timeout.is_zero(),
        "spec.ssh.commandTimeout",
        "must be greater than 0s",
    );

    // provision
    let prov = &spec.provision;
    if let Some(dir) = spec_dir {
        let runbook = dir.join(&prov.runbook);
        e.check(
            runbook.is_file(),
            "spec.provision.runbook",
            format!(
                "runbook `{}` not found (paths are relative to the spec file)",
                runbook.display()
            ),
        );
        if let Some(env) = &prov.env_file {
            let env = dir.join(env);
            e.check(
                env.is_file(),
                "spec.provision.envFile",
                format!(
                    "env file `{}` not found (paths are relative to the spec file)",
                    env.display()
                ),
            );
        }
    }
    for (i, name) in prov.secrets.iter().enumerate() {
        e.check(
            prov.vars.contains_key(name),
            format!("spec.provision.secrets[{i}]"),
            format!("`{name}` is not one of provision.vars"),
        );
    }
    validate_secrets_from(&prov.secrets_from, &mut e);
    for name in prov.vars.keys() {
        e.check(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            format!("spec.provision.vars.{name}"),
            "variable names may only use letters, digits and `_`",
        );
    }

    // release
    let rel = &spec.release;
    let p = "spec.release";
    e.check(
        is_release_id(&rel.id),
        format!("{p}.id"),
        format!(
            "`{}` is not a release id (letters, digits, `.`, `_`, `-`; at most 128)",
            rel.id
        ),
    );
    if let Err(err) = rel.artifact.parse::<ArtifactSource>() {
        e.add(format!("{p}.artifact"), err.to_string());
    }
    e.check(
        rel.sha256.len() == 64 && rel.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
        format!("{p}.sha256"),
        "must be 64 hexadecimal digits (the output of `sha256sum`)",
    );
    e.check(
        rel.app_root.starts_with('/')
            && rel.app_root.trim_end_matches('/').len() > 1
            && !has_dot_dot(&rel.app_root),
        format!("{p}.appRoot"),
        format!(
            "`{}` must be an absolute path below / without `..`",
            rel.app_root
        ),
    );
    let mut shared = BTreeSet::new();
    for (i, sp) in rel.shared_paths.iter().enumerate() {
        let ok = !sp.is_empty() && !sp.starts_with('/') && !has_dot_dot(sp);
        e.check(
            ok,
            format!("{p}.sharedPaths[{i}]"),
            format!("`{sp}` must be a relative path inside the release, without `..`"),
        );
        e.check(
            shared.insert(sp.trim_end_matches('/')),
            format!("{p}.sharedPaths[{i}]"),
            format!("`{sp}` is listed twice"),
        );
    }
    e.check(
        rel.keep >= 2,
        format!("{p}.keep"),
        "must be at least 2 (the active release and the one to roll back to)",
    );
    let hc = &rel.health_check;
    e.check(
        hc.path.starts_with('/'),
        format!("{p}.healthCheck.path"),
        "must start with `/`",
    );
    e.check(
        hc.port != 0,
        format!("{p}.healthCheck.port"),
        "must not be 0",
    );
    e.check(
        !hc.timeout.is_zero(),
        format!("{p}.healthCheck.timeout"),
        "must be greater than 0s",
    );
    e.check(
        !hc.interval.is_zero(),
        format!("{p}.healthCheck.interval"),
        "must be greater than 0s",
    );
    e.check(
        hc.deadline >= hc.timeout,
        format!("{p}.healthCheck.deadline"),
        "must be at least the per-request timeout",
    );
    if let Some(w) = &rel.warmup {
        e.check(
            !w.paths.is_empty(),
            format!("{p}.warmup.paths"),
            "must name at least one path",
        );
        for (i, path) in w.paths.iter().enumerate() {
            e.check(
                path.starts_with('/'),
                format!("{p}.warmup.paths[{i}]"),
                "must start with `/`",
            );
        }
        e.check(
            w.requests >= 1,
            format!("{p}.warmup.requests"),
            "must be at least 1",
        );
        e.check(
            !w.deadline.is_zero(),
            format!("{p}.warmup.deadline"),
            "must be greater than 0s",
        );
    }
    e.check(
        rel.hooks.once.is_empty() || !rel.hooks.once_timeout.is_zero(),
        format!("{p}.hooks.onceTimeout"),
        "must be greater than 0s",
    );
    e.check(
        rel.rollout.max_unavailable + rel.rollout.max_surge >= 1,
        format!("{p}.rollout"),
        "maxUnavailable and maxSurge cannot both be 0: the rollout could never make progress",
    );
    if let Some(rb) = &rel.rollback {
        e.check(
            rb.error_rate_above.is_finite()
                && rb.error_rate_above > 0.0
                && rb.error_rate_above <= 1.0,
            format!("{p}.rollback.errorRateAbove"),
            "must be a fraction above 0 and at most 1 (0.05 = 5 %)",
        );
        e.check(
            rb.window >= Duration::from_secs(10),
            format!("{p}.rollback.window"),
            "must be at least 10s",
        );
    }

    e.check(
        !spec.drain.timeout.is_zero(),
        "spec.drain.timeout",
        "must be greater than 0s",
    );
    e.check(
        !spec.self_healing.unhealthy_after.is_zero(),
        "spec.selfHealing.unhealthyAfter",
        "must be greater than 0s",
    );
    if let Some(pool) = &spec.warm_pool {
        e.check(
            pool.size >= 1,
            "spec.warmPool.size",
            "must be at least 1 (leave warmPool out for no pool)",
        );
        e.check(
            pool.size <= MAX_NODES.saturating_sub(cap.max),
            "spec.warmPool.size",
            format!(
                "capacity.max + size must be at most {MAX_NODES} (max is {})",
                cap.max
            ),
        );
    }

    e.0
}

fn is_region(s: &str) -> bool {
    // Shape only (xx-word-N); the SDK has the authoritative list.
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

fn has_dot_dot(p: &str) -> bool {
    Path::new(p).components().any(|c| c == Component::ParentDir)
}

/// Whether `name` can be an environment variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `provision.secretsFrom`: each entry names exactly one source, in a form
/// the service accepts, and `env` only where a single value needs a name.
fn validate_secrets_from(sources: &[crate::spec::SecretSource], e: &mut Errors) {
    let mut names: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (i, src) in sources.iter().enumerate() {
        let at = format!("spec.provision.secretsFrom[{i}]");
        match (&src.ssm, &src.secrets_manager) {
            (Some(_), Some(_)) => {
                e.add(&at, "set one of `ssm` or `secretsManager`, not both");
                continue;
            }
            (None, None) => {
                e.add(&at, "needs `ssm: /path/` or `secretsManager: NAME_OR_ARN`");
                continue;
            }
            (Some(path), None) => {
                let ok = path.starts_with('/')
                    && path.len() <= 2048
                    && !path.contains("//")
                    && path
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b));
                e.check(
                    ok,
                    format!("{at}.ssm"),
                    format!(
                        "`{path}` is not an SSM parameter name or path: it must start with `/` \
                         and use only letters, digits and `/_.-` (end it with `/` for every \
                         parameter under the path)"
                    ),
                );
                if src.is_ssm_path() {
                    e.check(
                        src.env.is_none(),
                        format!("{at}.env"),
                        "not allowed with an SSM path: each variable is named by its \
                         parameter's last segment",
                    );
                }
            }
            (None, Some(id)) => {
                e.check(
                    !id.is_empty() && id.len() <= 2048 && !id.chars().any(char::is_whitespace),
                    format!("{at}.secretsManager"),
                    format!("`{id}` is not a secret name or ARN"),
                );
            }
        }
        if let Some(env) = &src.env {
            if !is_env_name(env) {
                e.add(
                    format!("{at}.env"),
                    format!("`{env}` is not a variable name (letters, digits and `_`, not starting with a digit)"),
                );
            } else if let Some(first) = names.insert(env, i) {
                e.add(
                    format!("{at}.env"),
                    format!("`{env}` is already set by secretsFrom[{first}]"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["web", "a", "web-2", "x".repeat(63).as_str()] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in [
            "",
            "Web",
            "-web",
            "web-",
            "we_b",
            "web.app",
            "x".repeat(64).as_str(),
        ] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn release_ids() {
        for ok in ["3f2a9c1", "v1.2.3", "build_42", "2026-11-22"] {
            assert!(is_release_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "x.tmp", "é"] {
            assert!(!is_release_id(bad), "{bad}");
        }
    }

    #[test]
    fn regions() {
        assert!(is_region("us-east-1"));
        assert!(is_region("ap-southeast-2"));
        assert!(is_region("us-gov-west-1"));
        assert!(!is_region("useast1"));
        assert!(!is_region("us-east"));
        assert!(!is_region("US-EAST-1"));
    }
}
