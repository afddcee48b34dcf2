//! `hangar plan --offline --format markdown` as the real binary: a heading
//! per valid cluster, problems with file:line:col, exit 1 when any spec is
//! broken (so a PR check fails while the comment still shows the plan).

use std::process::Command;

#[test]
fn markdown_plan_of_a_good_and_a_broken_spec() {
    let dir = tempfile::tempdir().unwrap();
    let runbooks = tempfile::tempdir().unwrap();
    let runbook = runbooks.path().join("runbook.yaml");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/web.yaml");
    let web = std::fs::read_to_string(examples)
        .unwrap()
        .replace("../runbooks/nginx-php-fpm.yaml", runbook.to_str().unwrap());
    std::fs::write(&runbook, "steps: []\n").unwrap();
    std::fs::write(dir.path().join("web.yaml"), &web).unwrap();
    let broken = web
        .replace("name: web", "name: api")
        .replace("sha256: 9f86", "sha256: zz86");
    std::fs::write(dir.path().join("api.yaml"), broken).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["plan", "--at", "2025-05-01T09:00:00Z", "--current", "web=4"])
        .args(["--format", "markdown", "--specs"])
        .arg(dir.path())
        .output()
        .unwrap();
    let md = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{md}");
    assert!(md.starts_with("## hangar plan\n"), "{md}");
    assert!(md.contains("1 cluster · 1 problem"), "{md}");
    let api = dir.path().join("api.yaml");
    assert!(
        md.contains(&format!(
            "- `{}:49:5` `spec.release.sha256`: ",
            api.display()
        )),
        "{md}"
    );
    assert!(md.contains("### `web`"), "{md}");
    assert!(!md.contains("### `api`"), "{md}");
    // 09:00 UTC on a Thursday: the morning peak (07:30 Dublin + 3h) is open.
    assert!(md.contains("| `morning-peak` | min 6, max - "), "{md}");
    assert!(md.contains("| Nodes | 4 → 6 |"), "{md}");
    assert!(md.contains("- launch 2\n"), "{md}");
}
