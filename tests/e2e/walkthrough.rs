//! The README's "From the demo to your AWS account", run as written
//! against the local cloud: the AWS CLI (from `.venv-tools`) and `hangar`
//! on `PATH`, the cloud's endpoint in the environment. Lines marked
//! `# real AWS` are skipped; the variables they set come from the cloud.
//! The stack is given the local cloud's VPC and subnets: instances in a
//! VPC the stack makes itself (10.20.0.0/16 by default) get no node here —
//! the host manager only runs nodes at the local cloud's own addresses,
//! and this machine sends no traffic to private ranges — so that variant
//! is deployed and turned into a spec, but not run.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::operator::{free_port, hangar_bin, log_tail};
use hangar_cloud::Compute as _;

use crate::support::watcher::Watcher;
use crate::support::Scenario;

/// The stack's default owner id, which the walkthrough runs hangar with.
const STACK_OWNER: &str = "hangar-prod";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The walkthrough's shell lines, in order, without the `# real AWS` ones
/// (a `\` continuation belongs to its line).
fn walkthrough_script() -> (String, usize) {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("walkthrough start marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walkthrough end marker");
    let mut script = String::new();
    let mut skipped = 0;
    let mut in_block = false;
    let mut pending = String::new();
    for raw in readme[start..end].lines() {
        let line = raw.trim_start();
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        pending.push_str(line);
        pending.push('\n');
        if line.ends_with('\\') {
            continue;
        }
        let command = std::mem::take(&mut pending);
        if command.trim_end().ends_with("# real AWS") {
            skipped += 1;
        } else {
            script.push_str(&command);
        }
    }
    (script, skipped)
}

#[test]
fn the_readme_walkthrough_brings_a_cluster_into_service_on_the_stack() {
    let tools = repo().join(".venv-tools/bin");
    assert!(
        tools.join("aws").is_file() && tools.join("cfn-lint").is_file(),
        "run infra/local/setup (it makes .venv-tools)"
    );
    let s = Scenario::start();
    let mut watcher = Watcher::start(&s.cloud, STACK_OWNER);
    let work = tempfile::tempdir().expect("work dir");
    let dir = work.path();
    std::os::unix::fs::symlink(repo().join("infra"), dir.join("infra")).expect("infra link");
    let listen = free_port();
    let hangar_dir = hangar_bin().parent().expect("bin dir").to_path_buf();
    let path = format!(
        "{}:{}:{}",
        tools.display(),
        hangar_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let seeded = s.cloud.seeded().clone();
    let mut env: Vec<(String, String)> = s.cloud.env();
    env.extend(
        [
            ("PATH", path),
            ("HOME", dir.display().to_string()),
            ("AMI", hangar_local::seed::AMI.to_string()),
            ("VPC", seeded.vpc_id.clone()),
            ("SUBNETS", seeded.subnet_ids.join(",")),
            ("NODE_USER", "root".into()),
            ("NODE_KEY", s.cloud.key_path().display().to_string()),
            ("HANGAR_LISTEN", listen.to_string()),
            ("HANGAR_LOG", "info,hangar=debug".into()),
            ("NO_COLOR", "1".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    // `hangar run` goes to the background; the script waits for two
    // nodes in service (by `hangar status`, with a deadline), then goes on.
    let (script, skipped) = walkthrough_script();
    assert!(
        skipped >= 8,
        "the real-AWS-only lines are marked ({skipped})"
    );
    let run_line = script
        .lines()
        .find(|l| l.starts_with("hangar run "))
        .expect("the walkthrough runs hangar")
        .to_string();
    let wait = r#"
deadline=$((SECONDS + 180))
until hangar status web --output json 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["phases"].get("in-service",0) >= 2 and all(n["task"] is None for n in s["nodes"]) else 1)'; do
  if [ $SECONDS -ge $deadline ]; then echo "walkthrough: no 2 nodes in service after 180 s" >&2; exit 3; fi
  sleep 1
done
"#;
    let script = script.replacen(
        &run_line,
        &format!("{run_line} >hangar.log 2>&1 &\necho $! >hangar.pid\n{wait}"),
        1,
    );
    let full = format!("set -euo pipefail\n{script}");
    std::fs::write(dir.join("walkthrough.sh"), &full).expect("script");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg("walkthrough.sh")
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("bash");
    let pid: Option<i32> = std::fs::read_to_string(dir.join("hangar.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    let stop = |pid: Option<i32>| {
        if let Some(pid) = pid {
            // SAFETY: kill(2) on the PID the script recorded for its own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            // SAFETY: kill(pid, 0) only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        stop(pid);
        panic!(
            "the walkthrough failed ({}):\n--- script\n{full}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- hangar.log\n{}",
            out.status,
            log_tail(&dir.join("hangar.log"), 60)
        );
    }
    eprintln!(
        "walkthrough ran in {:.0?} ({skipped} real-AWS lines skipped)",
        started.elapsed()
    );

    // What it built: a target group ARN printed by `out`, a spec init wrote,
    // plan and status output naming the cluster.
    assert!(stdout.contains(":targetgroup/hangar-web/"), "{stdout}");
    assert!(stdout.contains("specs/web.yaml"), "{stdout}");
    assert!(
        stdout.contains("web:"),
        "hangar plan names the cluster: {stdout}"
    );
    assert!(
        stdout.contains("cluster web"),
        "hangar status web: {stdout}"
    );
    let spec = std::fs::read_to_string(dir.join("specs/web.yaml")).expect("spec");
    assert!(spec.contains(&seeded.subnet_ids[0]), "{spec}");
    assert!(
        !spec.contains(&seeded.launch_template_id),
        "the stack's template, not the seeded one"
    );

    // The nodes run from the stack's launch template, in service in the
    // stack's target group.
    let stack_tg = spec
        .lines()
        .find_map(|l| l.trim().strip_prefix("targetGroupArn: "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("target group in the spec");
    let health = s.cloud.block_on(async {
        s.cloud
            .moto_clients()
            .elb
            .describe_target_health()
            .target_group_arn(&stack_tg)
            .send()
            .await
    });
    let health = health.expect("target health");
    let registered: Vec<_> = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target()?.id().map(str::to_string))
        .collect();
    let reader = hangar_cloud::aws::AwsCloud::new(
        &s.cloud.moto_clients().sdk,
        STACK_OWNER,
        dir.join("reader-cache"),
    )
    .expect("reader");
    let ours: Vec<String> = s
        .cloud
        .block_on(async { reader.list(Some("web")).await })
        .expect("list")
        .into_iter()
        .filter(|i| i.state == hangar_cloud::InstanceState::Running)
        .map(|i| i.id)
        .collect();
    stop(pid);
    assert_eq!(registered.len(), 2, "{registered:?}");
    for id in &registered {
        assert!(
            ours.contains(id),
            "{id} is one of hangar's instances: {ours:?}"
        );
    }
    watcher.assert_invariants();
    watcher.stop();

    // The stack's own-VPC variant: created and turned into a valid spec.
    let own = Command::new("bash")
        .arg("-c")
        .arg(
            r#"set -euo pipefail
export STACK=hangar-own-vpc VPC= SUBNETS=
cat > own-params.json <<JSON
[{"ParameterKey": "ImageId", "ParameterValue": "$AMI"},
 {"ParameterKey": "KeyName", "ParameterValue": "hangar-node-key"},
 {"ParameterKey": "ClusterName", "ParameterValue": "shop"}]
JSON
aws cloudformation create-stack --stack-name "$STACK" --capabilities CAPABILITY_IAM \
  --template-body file://infra/aws/hangar-prerequisites.yaml --parameters file://own-params.json >/dev/null
aws cloudformation wait stack-create-complete --stack-name "$STACK"
aws cloudformation describe-stacks --stack-name "$STACK" --query 'Stacks[0].Outputs' --output json > own-outputs.json
hangar init --from-outputs own-outputs.json --out own-specs --ssh-user admin --ssh-key /k --sha256 "$(sha256sum app-v1.tar.gz | cut -d' ' -f1)"
hangar validate own-specs
aws ec2 describe-subnets --subnet-ids $(python3 -c 'import json; print(" ".join(o["OutputValue"] for o in json.load(open("own-outputs.json")) if o["OutputKey"] == "SubnetIds").replace(",", " "))') --query 'Subnets[].CidrBlock' --output text
"#,
        )
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("bash");
    let own_out = String::from_utf8_lossy(&own.stdout);
    assert!(
        own.status.success(),
        "own-VPC stack: {own_out}\n{}",
        String::from_utf8_lossy(&own.stderr)
    );
    assert!(own_out.contains("own-specs/shop.yaml"), "{own_out}");
    assert!(
        own_out.contains("10.20.1.0/24") && own_out.contains("10.20.2.0/24"),
        "subnets of the stack's own VPC: {own_out}"
    );
}
