//! Inputs the `spec_loader` fuzz target (fuzz/) found, and hand-made ones
//! at the loader's bounds, kept so each stays fixed: loading any of them
//! returns problems (or clusters), never panics, and stays fast.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar_crds::load::load_str;

fn corpus() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/fuzz_regressions exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_regression_loads_without_panicking() {
    let files = corpus();
    assert!(!files.is_empty(), "the regression corpus went missing");
    for file in files {
        let bytes = std::fs::read(&file).expect("readable regression input");
        // The fuzz target skips non-UTF-8 input; so does the loader's caller.
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        let started = Instant::now();
        let report = load_str(&text, &file);
        for p in &report.problems {
            let _ = p.to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} took {:?}",
            file.display(),
            started.elapsed()
        );
    }
}
