//! Secrets from AWS: values read from SSM Parameter Store reach every
//! node's `shared/.env`, a rotation reaches serving nodes without a
//! release, and a secret hangar cannot read holds the cluster as it is.

use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;
use hangar::runtime::status::ConditionType;
use hangar_local::spec::Yaml;

use crate::support::{settled_on, Scenario};

fn put(s: &Scenario, value: &str) {
    let ssm = aws_sdk_ssm::Client::new(&s.cloud.sdk_config());
    let value = value.to_string();
    s.cloud.block_on(async move {
        ssm.put_parameter()
            .name("/e2e/web/DB_PASSWORD")
            .value(value)
            .r#type(ParameterType::SecureString)
            .overwrite(true)
            .send()
            .await
            .expect("put parameter");
    });
}

/// Each node's `.env` line for the secret (and its mode).
fn env_on_nodes(s: &Scenario) -> Vec<String> {
    s.instances("web")
        .iter()
        .filter(|i| matches!(i.state, hangar_cloud::InstanceState::Running))
        .map(|i| {
            s.cloud
                .exec_inside(
                    &i.id,
                    "stat -c %a /srv/app/shared/.env && grep '^DB_PASSWORD=' /srv/app/shared/.env",
                )
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().replace('\n', " "))
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn secrets_reach_the_nodes_a_rotation_rolls_and_an_unreadable_one_holds() {
    let mut s = Scenario::start();
    put(&s, "first-value");
    let spec = s.spec().remove("spec.autoscaling").with_capacity(2, 2).set(
        "spec.provision.secretsFrom",
        Yaml::list([Yaml::map([("ssm", "/e2e/web/")])]),
    );
    s.write_spec(&spec);
    // Read again every 2 s instead of every minute: the rotation and the
    // revoked access below are seen within seconds.
    let specs = s.specs.display().to_string();
    s.start_operator_from(
        &specs,
        &[("HANGAR_SECRETS_REFRESH_INTERVAL".into(), "2s".into())],
    );
    s.wait_status(
        "web",
        "2 in service with the secret",
        Duration::from_secs(120),
        |st| {
            settled_on(st, 2, "v1")
                && env_on_nodes(&s)
                    .iter()
                    .filter(|l| l.contains("first-value"))
                    .count()
                    == 2
        },
    );
    assert!(
        env_on_nodes(&s).iter().all(|l| l.starts_with("600 ")),
        "{:?}",
        env_on_nodes(&s)
    );
    let launched = s.watcher.report().launched.len();

    // Rotated in AWS: pushed to the serving nodes, no release, no launch.
    put(&s, "rotated-value");
    s.wait_status(
        "web",
        "the rotation on every node",
        Duration::from_secs(180),
        |st| {
            settled_on(st, 2, "v1")
                && env_on_nodes(&s)
                    .iter()
                    .filter(|l| l.contains("rotated-value"))
                    .count()
                    == 2
        },
    );
    assert_eq!(
        s.watcher.report().launched.len(),
        launched,
        "nothing launched"
    );

    // Access taken away: reported by source, nodes kept as they are.
    s.cloud.gateway().deny_secret("ssm", "/e2e/web/");
    let held = s.wait_status("web", "the cluster held", Duration::from_secs(120), |st| {
        st.condition(ConditionType::Degraded)
            .is_some_and(|c| c.status && c.reason == "SecretsUnreadable")
    });
    let degraded = held.condition(ConditionType::Degraded).expect("condition");
    assert!(degraded.message.contains("/e2e/web/"), "{degraded:?}");
    assert!(
        !degraded.message.contains("rotated-value"),
        "never a value: {degraded:?}"
    );
    assert!(settled_on(&held, 2, "v1"), "{held:?}");
    assert!(
        env_on_nodes(&s).iter().all(|l| l.contains("rotated-value")),
        "the nodes keep what they had"
    );
    let log = std::fs::read_to_string(&s.log).unwrap_or_default();
    assert!(
        !log.contains("first-value") && !log.contains("rotated-value"),
        "a secret value reached the operator's log"
    );
    s.cloud.gateway().allow_secret("ssm", "/e2e/web/");
    s.wait_status("web", "the hold lifted", Duration::from_secs(120), |st| {
        !st.condition(ConditionType::Degraded)
            .is_some_and(|c| c.status)
    });
    s.watcher.assert_invariants();
}
