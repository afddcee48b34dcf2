//! The prerequisites stack (`infra/aws/hangar-prerequisites.yaml`) passes
//! `cfn-lint` (from `.venv-tools`, made by `infra/local/setup`); a broken
//! copy does not, so the linter really looked. Deploying it into the local
//! cloud and running a cluster on it is `tests/e2e/walkthrough.rs`.

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cfn_lint(template: &std::path::Path) -> (bool, String) {
    let bin = repo().join(".venv-tools/bin/cfn-lint");
    assert!(
        bin.is_file(),
        "{} missing: run infra/local/setup",
        bin.display()
    );
    let out = Command::new(bin)
        .arg("--")
        .arg(template)
        .output()
        .expect("cfn-lint runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_prerequisites_template_passes_cfn_lint_and_a_broken_one_does_not() {
    let template = repo().join("infra/aws/hangar-prerequisites.yaml");
    let (ok, text) = cfn_lint(&template);
    assert!(ok, "cfn-lint:\n{text}");

    let good = std::fs::read_to_string(&template).expect("template");
    // A target group without its VPC, and an output naming a resource that
    // does not exist: both errors cfn-lint must report.
    let broken = good
        .replacen(
            "      VpcId: !If [CreateVpc, !Ref Vpc, !Ref ExistingVpcId]\n      HealthCheckProtocol",
            "      HealthCheckProtocol",
            1,
        )
        .replacen(
            "Value: !Ref LaunchTemplate\n",
            "Value: !Ref LaunchTemplat\n",
            1,
        );
    assert_ne!(broken, good);
    let dir = tempfile::tempdir().expect("tmp");
    let copy = dir.path().join("broken.yaml");
    std::fs::write(&copy, broken).expect("write");
    let (ok, text) = cfn_lint(&copy);
    assert!(!ok, "cfn-lint accepted a broken template:\n{text}");
    assert!(text.contains("LaunchTemplat"), "{text}");
}

#[test]
fn the_stack_outputs_are_what_hangar_init_reads() {
    let text = std::fs::read_to_string(repo().join("infra/aws/hangar-prerequisites.yaml"))
        .expect("template");
    let outputs = &text[text.find("\nOutputs:").expect("outputs")..];
    for key in [
        "Region",
        "SubnetIds",
        "LaunchTemplateId",
        "TargetGroupArn",
        "AppPort",
        "HealthCheckPath",
        "ReleaseBucket",
        "ClusterName",
        "OwnerId",
    ] {
        assert!(outputs.contains(&format!("\n  {key}:\n")), "output {key}");
    }
}
