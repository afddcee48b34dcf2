//! `hangar release` as the real binary on temp spec files: the sha256 is
//! computed from a `file://` artifact, the rest of the file stays byte for
//! byte, bad input exits 1 (2 for an unreadable artifact) and leaves the
//! file untouched.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SPEC: &str = "\
# The shop. Reviewed in PRs; `hangar release` edits only the release.
apiVersion: hangar/v1alpha1
kind: Cluster
metadata:
  name: shop
spec:
  region: us-east-1
  instances:
    launchTemplate: lt-0123456789abcdef0
    subnets: [subnet-aaaa1111]     # one AZ for now
  loadBalancer:
    targetGroupArn: arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/shop/0123456789abcdef
  capacity: { min: 1, max: 3 }
  ssh:
    user: deploy
    privateKeyFile: /etc/hangar/id_ed25519
  provision:
    runbook: runbook.yaml
  release:
    id: \"v1\"   # build 1
    artifact: s3://releases/shop-v1.tar.gz
    sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    keep: 3
";

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new(spec: &str) -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("runbook.yaml"), "steps: []\n").unwrap();
        let file = dir.path().join("shop.yaml");
        std::fs::write(&file, spec).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        Dir { dir }
    }

    fn spec(&self) -> PathBuf {
        self.dir.path().join("shop.yaml")
    }

    fn release(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_hangar"))
            .arg("release")
            .args(args)
            .arg("--specs")
            .arg(self.dir.path())
            .env_remove("HANGAR_SPECS")
            .output()
            .unwrap()
    }
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn artifact(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("shop-v2.tar.gz");
    std::fs::write(&path, b"not really a tarball, but bytes to hash\n").unwrap();
    // sha256sum of the bytes above, computed independently.
    let sum = Command::new("sha256sum").arg(&path).output().unwrap();
    let sha = text(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (path, sha)
}

#[test]
fn computes_the_sha256_and_changes_nothing_else() {
    let d = Dir::new(SPEC);
    let (path, sha) = artifact(d.dir.path());
    let url = format!("file://{}", path.display());
    let out = d.release(&["shop", "--id", "v2", "--artifact", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let edited = std::fs::read_to_string(d.spec()).unwrap();
    let expected = SPEC
        .replace("id: \"v1\"   # build 1", "id: \"v2\"   # build 1")
        .replace("s3://releases/shop-v1.tar.gz", &url)
        .replace(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            &sha,
        );
    assert_eq!(edited, expected);
    let mode = std::fs::metadata(d.spec()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the file's mode is kept");
    assert!(
        text(&out.stdout).contains("release v2"),
        "{}",
        text(&out.stdout)
    );
    // No temporary file is left beside it.
    let names: Vec<String> = std::fs::read_dir(d.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    // And the result validates.
    let v = Command::new(env!("CARGO_BIN_EXE_hangar"))
        .arg("validate")
        .arg(d.spec())
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", text(&v.stdout));
}

#[test]
fn a_plain_path_becomes_a_file_url_and_a_given_sha256_is_used_as_is() {
    let d = Dir::new(SPEC);
    let (path, _) = artifact(d.dir.path());
    let given = "AB".repeat(32);
    let out = d.release(&[
        "shop",
        "--id",
        "v2",
        "--artifact",
        path.to_str().unwrap(),
        "--sha256",
        &given,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let edited = std::fs::read_to_string(d.spec()).unwrap();
    let canonical = std::fs::canonicalize(&path).unwrap();
    assert!(
        edited.contains(&format!("artifact: file://{}\n", canonical.display())),
        "{edited}"
    );
    assert!(
        edited.contains(&format!("sha256: {}\n", "ab".repeat(32))),
        "{edited}"
    );
}

#[test]
fn bad_input_exits_1_and_leaves_the_file_alone() {
    let d = Dir::new(SPEC);
    let sha = "ab".repeat(32);
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "web",
                "--id",
                "v2",
                "--artifact",
                "s3://b/k",
                "--sha256",
                &sha,
            ],
            "no valid cluster named `web`",
        ),
        (
            &[
                "shop",
                "--id",
                "v2",
                "--artifact",
                "s3://b/k",
                "--sha256",
                "abc",
            ],
            "--sha256: `abc` is not a sha256",
        ),
        (
            &[
                "shop",
                "--id",
                "v2",
                "--artifact",
                "http://x/a.tgz",
                "--sha256",
                &sha,
            ],
            "plain http:// is refused",
        ),
        (
            &[
                "shop",
                "--id",
                "v 2/../x",
                "--artifact",
                "s3://b/k",
                "--sha256",
                &sha,
            ],
            "spec.release.id",
        ),
    ];
    for (args, said) in cases {
        let out = d.release(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(said),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(d.spec()).unwrap(), SPEC);
    }
}

#[test]
fn an_unreadable_artifact_exits_2() {
    let d = Dir::new(SPEC);
    let out = d.release(&[
        "shop",
        "--id",
        "v2",
        "--artifact",
        "file:///nonexistent/a.tar.gz",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot read the artifact file:///nonexistent/a.tar.gz"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(d.spec()).unwrap(), SPEC);
}

#[test]
fn a_flow_style_release_is_refused_with_file_and_line() {
    let spec = SPEC.replace(
        "  release:\n    id: \"v1\"   # build 1\n    artifact: s3://releases/shop-v1.tar.gz\n    sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n    keep: 3\n",
        "  release: { id: v1, artifact: s3://releases/shop-v1.tar.gz, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 }\n",
    );
    let d = Dir::new(&spec);
    let sha = "ab".repeat(32);
    let out = d.release(&[
        "shop",
        "--id",
        "v2",
        "--artifact",
        "s3://b/k",
        "--sha256",
        &sha,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("shop.yaml: line 19: spec.release: written in flow style"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(d.spec()).unwrap(), spec);
}

/// An `s3://` artifact is read through the cloud (the local cloud's S3,
/// as the AWS chain in the environment names it) and hashed.
#[test]
fn an_s3_artifact_is_hashed_as_the_operator_would_fetch_it() {
    let cloud = hangar_local::LocalCloud::start(hangar_local::LocalCloudOptions::default())
        .expect("local cloud starts (run infra/local/setup first)");
    let v2 = cloud
        .upload_release("v2", hangar_local::ReleaseKind::Good)
        .expect("upload v2");
    let d = Dir::new(&SPEC.replace("us-east-1", cloud.region()));
    let out = Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args([
            "release",
            "shop",
            "--id",
            "v2",
            "--artifact",
            &v2.url,
            "--specs",
        ])
        .arg(d.dir.path())
        .env_remove("HANGAR_SPECS")
        .envs(cloud.env())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let edited = std::fs::read_to_string(d.spec()).unwrap();
    assert!(
        edited.contains(&format!("sha256: {}\n", v2.sha256)),
        "{edited}"
    );
    assert!(
        edited.contains(&format!("artifact: {}\n", v2.url)),
        "{edited}"
    );
}
