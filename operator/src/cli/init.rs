//! `hangar init --from-stack NAME`: a starter Cluster spec from the
//! outputs of the prerequisites stack (`infra/aws/hangar-prerequisites.yaml`).
//!
//! Reads the stack with `DescribeStacks` (or, with `--from-outputs`, the
//! JSON `aws cloudformation describe-stacks --query 'Stacks[0].Outputs'`
//! prints), writes the spec — and the stock runbook beside it unless one is
//! named, in `runbooks/` beside the spec directory — and checks the result
//! with hangar's own loader before putting it in place: what `init` writes
//! is a spec `hangar validate` accepts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use sha2::Digest as _;

/// The stock runbook written beside a new spec when none is named.
const STOCK_RUNBOOK: &str = include_str!("../../../runbooks/static-http.yaml");

#[derive(Debug, Args)]
pub struct InitArgs {
    /// CloudFormation stack to read (name or id), in `--region` or the
    /// standard AWS configuration's region.
    #[arg(long, value_name = "STACK", required_unless_present = "from_outputs")]
    from_stack: Option<String>,
    /// Read the outputs from a file instead: the JSON list
    /// `aws cloudformation describe-stacks --stack-name S --query 'Stacks[0].Outputs'` prints.
    #[arg(long, value_name = "FILE", conflicts_with = "from_stack")]
    from_outputs: Option<PathBuf>,
    #[arg(long)]
    region: Option<String>,
    /// Where the spec goes: a file, or a directory (then `<cluster>.yaml` in it).
    #[arg(long, value_name = "PATH", default_value = "specs")]
    out: PathBuf,
    /// Cluster name (default: the stack's `ClusterName` output).
    #[arg(long)]
    name: Option<String>,
    /// Login user on the nodes (the AMI's default user: `admin` on Debian, `ubuntu` on Ubuntu).
    #[arg(long, default_value = "admin")]
    ssh_user: String,
    /// Private key of the stack's key pair, as the operator reads it.
    #[arg(long, value_name = "FILE", default_value = "/etc/hangar/keys/node-key")]
    ssh_key: PathBuf,
    /// Runbook the spec names, relative to the spec's directory (default:
    /// `../runbooks/static-http.yaml`, the stock one, written if missing).
    #[arg(long, value_name = "FILE")]
    runbook: Option<PathBuf>,
    /// Release id (the directory name under `releases/` on the nodes).
    #[arg(long, default_value = "v1")]
    release_id: String,
    /// The release tarball's URL (default: `s3://<ReleaseBucket>/releases/<release-id>.tar.gz`).
    #[arg(long, value_name = "URL")]
    artifact: Option<String>,
    /// The artifact's SHA-256 (64 hex digits)…
    #[arg(long, value_name = "HEX", required_unless_present = "artifact_file")]
    sha256: Option<String>,
    /// …or a local copy of it to hash.
    #[arg(long, value_name = "FILE", conflicts_with = "sha256")]
    artifact_file: Option<PathBuf>,
    /// Capacity window of the starter spec.
    #[arg(long, default_value_t = 2)]
    min: u32,
    #[arg(long, default_value_t = 6)]
    max: u32,
    /// Replace an existing spec file.
    #[arg(long)]
    force: bool,
}

/// The stack outputs a spec is made of.
#[derive(Debug, PartialEq, Eq)]
struct Outputs {
    region: String,
    subnets: Vec<String>,
    launch_template: String,
    target_group_arn: String,
    app_port: u16,
    health_path: String,
    bucket: Option<String>,
    cluster: Option<String>,
    owner: Option<String>,
}

impl Outputs {
    fn from_map(map: &BTreeMap<String, String>, region: Option<&str>) -> anyhow::Result<Outputs> {
        let need = |key: &str| {
            map.get(key)
                .filter(|v| !v.trim().is_empty())
                .cloned()
                .with_context(|| {
                    format!(
                        "the stack has no `{key}` output (is it infra/aws/hangar-prerequisites.yaml?)"
                    )
                })
        };
        let subnets: Vec<String> = need("SubnetIds")?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let app_port = match map.get("AppPort") {
            Some(p) => p
                .parse()
                .with_context(|| format!("output AppPort `{p}` is not a port"))?,
            None => 80,
        };
        Ok(Outputs {
            region: match region {
                Some(r) => r.to_string(),
                None => need("Region")?,
            },
            subnets,
            launch_template: need("LaunchTemplateId")?,
            target_group_arn: need("TargetGroupArn")?,
            app_port,
            health_path: map
                .get("HealthCheckPath")
                .cloned()
                .unwrap_or_else(|| "/health".into()),
            bucket: map.get("ReleaseBucket").cloned(),
            cluster: map.get("ClusterName").cloned(),
            owner: map.get("OwnerId").cloned(),
        })
    }
}

/// YAML scalar, quoted when plain style could change its meaning.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

struct Starter<'a> {
    name: &'a str,
    outputs: &'a Outputs,
    source: &'a str,
    ssh_user: &'a str,
    ssh_key: &'a Path,
    runbook: &'a Path,
    release_id: &'a str,
    artifact: &'a str,
    sha256: &'a str,
    min: u32,
    max: u32,
}

fn render(s: &Starter<'_>) -> String {
    let o = s.outputs;
    let subnets = o
        .subnets
        .iter()
        .map(|x| q(x))
        .collect::<Vec<_>>()
        .join(", ");
    let owner = o
        .owner
        .as_deref()
        .map(|id| format!("\n# Run the operator with `--owner {id}` (or `owner = \"{id}\"` in hangar.toml):\n# the stack's IAM policy lets it change only instances tagged hangar:owner={id}."))
        .unwrap_or_default();
    format!(
        r#"# yaml-language-server: $schema=https://raw.githubusercontent.com/hangar-dev/hangar/main/crds/schema/cluster.json
#
# Written by `hangar init` from {source}.
# Review it, then `hangar validate` and `hangar plan` before `hangar run`.{owner}
apiVersion: hangar/v1alpha1
kind: Cluster
metadata:
  name: {name}
spec:
  region: {region}
  instances:
    launchTemplate: {lt}
    subnets: [{subnets}]
  loadBalancer:
    targetGroupArn: {tg}
    drainTimeout: 2m
  capacity:
    min: {min}
    max: {max}
  autoscaling:
    # The ALB's requests per target, per minute; one node carries targetPerNode.
    metric:
      cloudwatch:
        requestCountPerTarget: {{}}
    targetPerNode: 1000
    evaluationInterval: 30s
    scaleUp: {{ stabilization: 0s, maxStep: 2 }}
    scaleDown: {{ stabilization: 5m, maxStep: 1 }}
  selfHealing:
    unhealthyAfter: 1m
  ssh:
    user: {user}
    # The private key of the stack's key pair.
    privateKeyFile: {key}
    hostKeyPolicy: tofu
  provision:
    runbook: {runbook}
  release:
    id: {release}
    artifact: {artifact}
    sha256: {sha}
    healthCheck:
      port: {port}
      path: {path}
"#,
        source = s.source,
        name = s.name,
        region = q(&o.region),
        lt = q(&o.launch_template),
        tg = q(&o.target_group_arn),
        min = s.min,
        max = s.max,
        user = q(s.ssh_user),
        key = q(&s.ssh_key.display().to_string()),
        runbook = q(&s.runbook.display().to_string()),
        release = q(s.release_id),
        artifact = q(s.artifact),
        sha = q(s.sha256),
        port = o.app_port,
        path = q(&o.health_path),
    )
}

fn sha256_of(file: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .with_context(|| format!("reading {}", file.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The outputs file `aws cloudformation describe-stacks --query 'Stacks[0].Outputs'` prints.
fn read_outputs_file(file: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Output {
        output_key: String,
        output_value: String,
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let list: Vec<Output> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected the JSON list of {{OutputKey, OutputValue}} that describe-stacks prints",
            file.display()
        )
    })?;
    Ok(list
        .into_iter()
        .map(|o| (o.output_key, o.output_value))
        .collect())
}

async fn read_stack(name: &str, region: Option<&str>) -> anyhow::Result<BTreeMap<String, String>> {
    let stack = hangar_cloud::aws::stacks::stack_outputs_from_env(region, name)
        .await
        .with_context(|| format!("reading stack {name}"))?;
    if !stack.complete() {
        bail!(
            "stack {} is {}: wait until it is CREATE_COMPLETE (or UPDATE_COMPLETE)",
            stack.name,
            stack.status
        );
    }
    Ok(stack.outputs)
}

pub fn run(args: InitArgs) -> anyhow::Result<ExitCode> {
    let (map, source) = match (&args.from_stack, &args.from_outputs) {
        (Some(stack), _) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let map = rt.block_on(read_stack(stack, args.region.as_deref()))?;
            (map, format!("the outputs of stack `{stack}`"))
        }
        (None, Some(file)) => (read_outputs_file(file)?, format!("{}", file.display())),
        (None, None) => bail!("--from-stack or --from-outputs is required"),
    };
    let outputs = Outputs::from_map(&map, args.region.as_deref())?;
    let name = args
        .name
        .clone()
        .or_else(|| outputs.cluster.clone())
        .unwrap_or_else(|| "web".into());
    let sha256 = match (&args.sha256, &args.artifact_file) {
        (Some(s), _) => s.to_lowercase(),
        (None, Some(f)) => sha256_of(f)?,
        (None, None) => bail!("--sha256 or --artifact-file is required"),
    };
    let artifact = match (&args.artifact, &outputs.bucket) {
        (Some(a), _) => a.clone(),
        (None, Some(bucket)) => format!("s3://{bucket}/releases/{}.tar.gz", args.release_id),
        (None, None) => bail!("the stack has no ReleaseBucket output: give --artifact URL"),
    };
    let file = if args
        .out
        .extension()
        .is_some_and(|e| e == "yaml" || e == "yml")
    {
        args.out.clone()
    } else {
        args.out.join(format!("{name}.yaml"))
    };
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    if file.exists() && !args.force {
        bail!("{} exists (--force replaces it)", file.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runbook = match &args.runbook {
        Some(r) => r.clone(),
        // Beside the spec directory, not in it: every YAML file in there
        // is read as a spec.
        None => {
            let r = PathBuf::from("../runbooks/static-http.yaml");
            let at = dir.join(&r);
            if !at.exists() {
                if let Some(parent) = at.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                std::fs::write(&at, STOCK_RUNBOOK)
                    .with_context(|| format!("writing {}", at.display()))?;
                eprintln!(
                    "wrote {} (the stock runbook; runbooks/nginx-php-fpm.yaml is the PHP one)",
                    at.display()
                );
            }
            r
        }
    };
    let text = render(&Starter {
        name: &name,
        outputs: &outputs,
        source: &source,
        ssh_user: &args.ssh_user,
        ssh_key: &args.ssh_key,
        runbook: &runbook,
        release_id: &args.release_id,
        artifact: &artifact,
        sha256: &sha256,
        min: args.min,
        max: args.max,
    });
    // hangar's own loader judges it, as if it were already in place.
    let report = hangar_crds::load::load_str(&text, &file);
    if !report.problems.is_empty() {
        for p in &report.problems {
            eprintln!("{p}");
        }
        bail!("the starter spec does not validate; nothing written");
    }
    let tmp = dir.join(format!(".{name}.yaml.tmp"));
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    println!("{}", file.display());
    if let Some(owner) = &outputs.owner {
        eprintln!("run the operator with --owner {owner}: the stack's IAM policy is scoped to it");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs() -> BTreeMap<String, String> {
        [
            ("Region", "eu-west-1"),
            ("SubnetIds", "subnet-a, subnet-b"),
            ("LaunchTemplateId", "lt-0abc"),
            (
                "TargetGroupArn",
                "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/hangar-web/1",
            ),
            ("AppPort", "8080"),
            ("HealthCheckPath", "/up"),
            ("ReleaseBucket", "acme-releases"),
            ("ClusterName", "shop"),
            ("OwnerId", "hangar-prod"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn the_starter_spec_carries_the_outputs_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("runbook.yaml"), STOCK_RUNBOOK).unwrap();
        // (the unit test keeps it beside the spec; `run` puts it outside the spec dir)
        let o = Outputs::from_map(&outputs(), None).unwrap();
        assert_eq!(o.subnets, ["subnet-a", "subnet-b"]);
        let text = render(&Starter {
            name: "shop",
            outputs: &o,
            source: "test",
            ssh_user: "admin",
            ssh_key: Path::new("/etc/hangar/keys/node-key"),
            runbook: Path::new("runbook.yaml"),
            release_id: "v1",
            artifact: "s3://acme-releases/releases/v1.tar.gz",
            sha256: &"ab".repeat(32),
            min: 2,
            max: 6,
        });
        let report = hangar_crds::load::load_str(&text, &dir.path().join("shop.yaml"));
        assert!(report.problems.is_empty(), "{:?}\n{text}", report.problems);
        let c = &report.clusters[0].cluster;
        assert_eq!(c.metadata.name, "shop");
        assert_eq!(c.spec.region, "eu-west-1");
        assert_eq!(c.spec.instances.launch_template, "lt-0abc");
        assert_eq!(c.spec.release.health_check.port, 8080);
        assert_eq!(c.spec.release.health_check.path, "/up");
        assert!(text.contains("--owner hangar-prod"));
    }

    #[test]
    fn a_stack_that_is_not_the_prerequisites_stack_is_refused_by_name() {
        let mut m = outputs();
        m.remove("TargetGroupArn");
        let e = Outputs::from_map(&m, None).unwrap_err().to_string();
        assert!(e.contains("TargetGroupArn"), "{e}");
    }
}
