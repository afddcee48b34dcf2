//! Loading specs: good ones load, each broken one yields precise lines, and
//! a broken file or document never hides a good one.

use std::path::{Path, PathBuf};

use hangar_crds::load::{load_dir, load_dir_reusing, load_file, load_paths, load_str};
use hangar_crds::schema::{cluster_schema_json, SCHEMA_PATH};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_root() -> PathBuf {
    crate_dir()
        .parent()
        .expect("crds/ has a parent")
        .to_path_buf()
}

/// `# expect: PATH | MESSAGE FRAGMENT [| line N]` headers of a fixture.
struct Expectation {
    path: String,
    fragment: String,
    line: Option<u64>,
}

fn expectations(file: &Path) -> Vec<Expectation> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|l| {
            let parts: Vec<&str> = l.split(" | ").collect();
            Expectation {
                path: parts[0].trim().to_string(),
                fragment: parts.get(1).unwrap_or(&"").trim().to_string(),
                line: parts
                    .get(2)
                    .and_then(|p| p.trim().strip_prefix("line "))
                    .map(|n| n.parse().unwrap()),
            }
        })
        .collect()
}

fn invalid_fixtures() -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(crate_dir().join("tests/invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the invalid corpus went missing");
    files
}

#[test]
fn every_broken_spec_is_rejected_with_the_precise_field_and_line() {
    for file in invalid_fixtures()
        .iter()
        .filter(|f| !f.ends_with("twin-a.yaml") && !f.ends_with("twin-b.yaml"))
    {
        let expected = expectations(file);
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` header",
            file.display()
        );
        let report = load_file(file);
        assert!(
            report.clusters.is_empty(),
            "{} loaded a cluster",
            file.display()
        );
        assert_eq!(
            report.problems.len(),
            expected.len(),
            "{}: expected {} problem(s), got:\n{}",
            file.display(),
            expected.len(),
            report
                .problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        for (problem, want) in report.problems.iter().zip(&expected) {
            let shown = problem.to_string();
            assert_eq!(problem.path, want.path, "{shown}");
            assert!(
                problem.message.contains(&want.fragment),
                "{shown} lacks {:?}",
                want.fragment
            );
            if let Some(line) = want.line {
                assert_eq!(problem.line, Some(line), "{shown}");
                assert!(problem.column.is_some(), "{shown} has no column");
            }
            assert!(
                shown.starts_with(&format!("{}:", file.display())),
                "{shown}"
            );
        }
    }
}

#[test]
fn a_directory_of_broken_specs_yields_one_line_per_problem() {
    let report = load_dir(&crate_dir().join("tests/invalid")).unwrap();
    assert!(report.clusters.is_empty());
    let expected: usize = invalid_fixtures()
        .iter()
        .map(|f| expectations(f).len())
        .sum();
    assert_eq!(report.problems.len(), expected);
    let twins: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.message.contains("`twin`"))
        .collect();
    assert_eq!(twins.len(), 2, "a duplicate name is reported on both files");
    assert!(twins[0].message.contains("twin-b.yaml") && twins[1].message.contains("twin-a.yaml"));
}

#[test]
fn valid_specs_and_the_examples_load_cleanly() {
    for dir in [
        crate_dir().join("tests/valid"),
        repo_root().join("examples"),
    ] {
        let report = load_dir(&dir).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(!report.clusters.is_empty(), "{} has no spec", dir.display());
    }
}

#[test]
fn a_reused_file_is_not_parsed_again_and_duplicates_are_still_caught() {
    let shop = std::fs::read_to_string(crate_dir().join("tests/valid/shop.yaml")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let specs = root.path().join("specs");
    std::fs::create_dir_all(root.path().join("runbooks")).unwrap();
    std::fs::create_dir(&specs).unwrap();
    std::fs::write(root.path().join("runbooks/provision.yaml"), "steps: []\n").unwrap();
    std::fs::write(specs.join("shop.yaml"), &shop).unwrap();
    std::fs::write(
        specs.join("cart.yaml"),
        shop.replace("name: shop", "name: cart"),
    )
    .unwrap();
    let first = load_dir(&specs).unwrap();
    assert!(first.problems.is_empty(), "{:?}", first.problems);
    let parsed_shop = first
        .clusters
        .iter()
        .find(|c| c.name() == "shop")
        .unwrap()
        .clone();

    // cart.yaml "reuses" the shop cluster: had it been parsed, it would be
    // `cart`; as it is not, two clusters claim `shop` and both are refused.
    let mut asked = Vec::new();
    let report = load_dir_reusing(&specs, |file, text| {
        asked.push((file.file_name().unwrap().to_owned(), text.len()));
        (file.ends_with("cart.yaml")).then(|| vec![parsed_shop.clone()])
    })
    .unwrap();
    assert_eq!(asked.len(), 2, "every file is offered: {asked:?}");
    assert!(report.clusters.is_empty(), "{:?}", report.clusters);
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(report.problems.iter().all(|p| p.path == "metadata.name"));
}

#[test]
fn defaults_are_filled_in() {
    let report = load_dir(&crate_dir().join("tests/valid")).unwrap();
    let spec = &report.clusters[0].cluster.spec;
    assert_eq!(spec.release.keep, 5);
    assert_eq!(spec.release.app_root, "/srv/app");
    assert_eq!(spec.release.health_check.path, "/health");
    assert_eq!(spec.release.rollout.max_surge, 1);
    assert_eq!(spec.load_balancer.drain_timeout.to_string(), "5m");
    let auto = spec.autoscaling.as_ref().unwrap();
    assert_eq!(auto.evaluation_interval.to_string(), "15s");
    assert_eq!(auto.tolerance, 0.1);
    assert_eq!(auto.scale_up.stabilization.to_string(), "0s");
    assert_eq!(auto.scale_down.stabilization.to_string(), "5m");
    assert_eq!(spec.ssh.port, 22);
    assert_eq!(spec.instances.launch_template_version, "$Default");
}

#[test]
fn one_bad_document_does_not_hide_its_neighbours() {
    let good = std::fs::read_to_string(crate_dir().join("tests/valid/shop.yaml")).unwrap();
    let bad = good
        .replace("name: shop", "name: broken")
        .replace("min: 2", "min: lots");
    let other = good.replace("name: shop", "name: other");
    let text = format!("{good}---\n{bad}---\n{other}");
    let file = crate_dir().join("tests/valid/multi.yaml");
    let report = load_str(&text, &file);
    let names: Vec<_> = report.clusters.iter().map(|c| c.name()).collect();
    assert_eq!(names, ["shop", "other"]);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(p.path, "spec.capacity.min");
    // The line is counted in the whole file, not in the document.
    let bad_line = text.lines().position(|l| l.contains("min: lots")).unwrap() as u64 + 1;
    assert_eq!(p.line, Some(bad_line));
    assert_eq!(
        report.clusters[1].line,
        text.lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| *l == "---")
            .unwrap() as u64
            + 1
    );
}

#[test]
fn unreadable_paths_are_problems_not_panics() {
    let report = load_paths(&[PathBuf::from("/nonexistent/spec.yaml")]);
    assert_eq!(report.problems.len(), 1);
    assert!(report.problems[0].message.contains("cannot read"));
    assert!(load_dir(Path::new("/nonexistent-dir")).is_err());
}

#[test]
fn huge_and_deeply_nested_input_is_bounded() {
    let file = crate_dir().join("tests/valid/x.yaml");
    let deep = format!("a: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    let report = load_str(&deep, &file);
    assert_eq!(report.problems.len(), 1);
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
                c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n\
                e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n";
    let report = load_str(bomb, &file);
    assert_eq!(
        report.problems.len(),
        1,
        "an alias bomb is one problem, not an OOM"
    );
}

#[test]
fn checked_in_schema_is_fresh() {
    let path = repo_root().join(SCHEMA_PATH);
    let fresh = cluster_schema_json();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{} is stale; regenerate it with `UPDATE_SCHEMA=1 cargo test -p hangar-crds --test specs`",
        path.display()
    );
}

#[test]
fn readme_spec_reference_is_fresh() {
    const START: &str = "<!-- spec-reference:start (generated by `UPDATE_README=1 cargo test -p hangar-crds --test specs`) -->\n";
    const END: &str = "<!-- spec-reference:end -->";
    let path = repo_root().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (Some(a), Some(b)) = (readme.find(START), readme.find(END)) else {
        panic!("README.md lacks the spec reference markers");
    };
    let fresh = hangar_crds::schema::reference_markdown();
    let current = &readme[a + START.len()..b];
    if current != fresh && std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}{fresh}{}", &readme[..a + START.len()], &readme[b..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        current == fresh,
        "README.md's spec reference is stale; regenerate with `UPDATE_README=1 cargo test -p hangar-crds --test specs`"
    );
}
