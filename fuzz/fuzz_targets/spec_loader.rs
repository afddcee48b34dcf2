//! The spec loader on arbitrary text: YAML → validated Cluster specs or
//! problem lines, never a panic, and bounded however big or deep the
//! input (libFuzzer's -rss_limit_mb and -timeout enforce the bound).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let report = hangar_crds::load::load_str(text, Path::new("/fuzz/specs/spec.yaml"));
    // What `hangar validate` prints must not panic either.
    for problem in &report.problems {
        let _ = problem.to_string();
    }
    for cluster in &report.clusters {
        let _ = cluster.runbook_path();
        let _ = cluster.env_file_path();
    }
});
