//! `hangar validate PATH...`

use std::path::PathBuf;
use std::process::ExitCode;

use hangar_crds::load::load_paths;

pub fn run(paths: &[PathBuf]) -> ExitCode {
    let report = load_paths(paths);
    for problem in &report.problems {
        println!("{problem}");
    }
    if report.problems.is_empty() {
        let n = report.clusters.len();
        eprintln!("{n} cluster{} valid", if n == 1 { "" } else { "s" });
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} problem{} found",
            report.problems.len(),
            if report.problems.len() == 1 { "" } else { "s" }
        );
        ExitCode::from(1)
    }
}
