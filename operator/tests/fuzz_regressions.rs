//! Runbooks the `runbook` fuzz target (fuzz/) found, and hand-made ones at
//! the parser's bounds, kept so each stays fixed: parsing, validating and
//! planning any of them is an error or a plan, never a panic, and fast.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar::effects::runbook::{Facts, Runbook};

fn corpus() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions/runbooks");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fuzz_regressions/runbooks exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_regression_runbook_is_an_error_or_a_plan() {
    let files = corpus();
    assert!(!files.is_empty(), "the regression corpus went missing");
    let vars = BTreeMap::from([("php_version".to_string(), "8.2".to_string())]);
    let facts = Facts {
        instance_id: "i-0123456789abcdef0".into(),
        private_ip: "127.0.0.2".into(),
        app_root: "/srv/app".into(),
        health_path: "/health".into(),
        health_port: 80,
    };
    for file in files {
        let bytes = std::fs::read(&file).expect("readable regression input");
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        let started = Instant::now();
        if let Ok(runbook) = Runbook::parse(&text, &file) {
            let _ = runbook.validate();
            let _ = runbook.plan(&vars, &facts);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} took {:?}",
            file.display(),
            started.elapsed()
        );
    }
}
