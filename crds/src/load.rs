//! Reading specs from files and directories.
//!
//! The contract: every valid cluster is returned, every problem is returned
//! as one precise line, and one broken file (or document) never hides the
//! good ones. Only a spec directory that cannot be read at all is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::{DuplicateKeyPolicy, Options};

use crate::source_map::{self, Loc};
use crate::spec::Cluster;
use crate::validate::validate;

/// Spec files are small; anything larger is a mistake (or an attack).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// One thing wrong with one spec, printed as `FILE:LINE:COL: field.path: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// Field path such as `spec.schedules[0].cron`; empty for file-level problems.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A valid cluster and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedCluster {
    /// Shared: an operator that reloads its specs keeps one copy of each
    /// unchanged cluster, not one per reload in flight.
    pub cluster: Arc<Cluster>,
    pub file: PathBuf,
    /// Line of the document's first line in `file`.
    pub line: u64,
}

impl LoadedCluster {
    pub fn name(&self) -> &str {
        &self.cluster.metadata.name
    }

    /// The directory relative paths in the spec (runbook, env file) start from.
    pub fn spec_dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }

    /// `spec.provision.runbook`, resolved against the spec's directory.
    pub fn runbook_path(&self) -> PathBuf {
        self.spec_dir().join(&self.cluster.spec.provision.runbook)
    }

    /// `spec.provision.envFile`, resolved against the spec's directory.
    pub fn env_file_path(&self) -> Option<PathBuf> {
        self.cluster
            .spec
            .provision
            .env_file
            .as_ref()
            .map(|p| self.spec_dir().join(p))
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub clusters: Vec<LoadedCluster>,
    pub problems: Vec<Problem>,
}

impl LoadReport {
    fn problem(
        &mut self,
        file: &Path,
        loc: Option<Loc>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            file: file.to_path_buf(),
            line: loc.map(|l| l.line),
            column: loc.map(|l| l.column),
            path: path.into(),
            message: message.into(),
        });
    }

    fn merge(&mut self, other: LoadReport) {
        self.clusters.extend(other.clusters);
        self.problems.extend(other.problems);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read spec directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Loads every `*.yaml` / `*.yml` below `dir` (hidden entries skipped).
pub fn load_dir(dir: &Path) -> Result<LoadReport, LoadError> {
    load_dir_reusing(dir, |_, _| None)
}

/// [`load_dir`], asking `reuse` first with each file's text: clusters it
/// returns stand for the file, which is not parsed again. An operator that
/// re-reads a thousand unchanged specs every resync skips the parser this
/// way. `reuse` must only return what parsing that same text gave, and
/// only for a file that had no problem: a spec rejected for a missing
/// runbook must be looked at again once the runbook is there.
pub fn load_dir_reusing(
    dir: &Path,
    mut reuse: impl FnMut(&Path, &str) -> Option<Vec<LoadedCluster>>,
) -> Result<LoadReport, LoadError> {
    let files = spec_files(dir).map_err(|source| LoadError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut report = LoadReport::default();
    for file in files {
        match read_spec_file(&file) {
            Ok(text) => match reuse(&file, &text) {
                Some(clusters) => report.clusters.extend(clusters),
                None => report.merge(load_str(&text, &file)),
            },
            Err(unreadable) => report.merge(unreadable),
        }
    }
    reject_duplicates(&mut report);
    Ok(report)
}

/// Loads files and directories as `hangar validate` receives them; an
/// unreadable path is a problem line, not an error.
pub fn load_paths(paths: &[PathBuf]) -> LoadReport {
    let mut report = LoadReport::default();
    for path in paths {
        if path.is_dir() {
            match spec_files(path) {
                Ok(files) => files.iter().for_each(|f| report.merge(load_file(f))),
                Err(e) => report.problem(path, None, "", format!("cannot read directory: {e}")),
            }
        } else {
            report.merge(load_file(path));
        }
    }
    reject_duplicates(&mut report);
    report
}

pub fn load_file(file: &Path) -> LoadReport {
    match read_spec_file(file) {
        Ok(text) => load_str(&text, file),
        Err(unreadable) => unreadable,
    }
}

/// The file's text, or the problem that stops it being read (including a
/// size past [`MAX_FILE_BYTES`], checked before reading it).
fn read_spec_file(file: &Path) -> Result<String, LoadReport> {
    let mut report = LoadReport::default();
    match std::fs::metadata(file) {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            report.problem(
                file,
                None,
                "",
                format!(
                    "file is {} bytes; spec files are limited to {MAX_FILE_BYTES}",
                    m.len()
                ),
            );
            Err(report)
        }
        Ok(_) => std::fs::read_to_string(file).map_err(|e| {
            report.problem(file, None, "", format!("cannot read: {e}"));
            report
        }),
        Err(e) => {
            report.problem(file, None, "", format!("cannot read: {e}"));
            Err(report)
        }
    }
}

/// Parses and validates `text` as if read from `file` (which also anchors
/// relative paths in the spec).
pub fn load_str(text: &str, file: &Path) -> LoadReport {
    let mut report = LoadReport::default();
    let docs = match source_map::scan(text) {
        Ok(docs) => docs,
        Err(e) => {
            report.problem(file, e.loc, "", format!("invalid YAML: {}", e.message));
            return report;
        }
    };
    let spec_dir = file.parent().unwrap_or(Path::new("."));
    for doc in docs.iter().filter(|d| d.has_content()) {
        let slice = &text[doc.start..doc.end];
        let line_offset = doc.first_line as u64 - 1;
        let mut track = serde_path_to_error::Track::new();
        let parsed =
            serde_saphyr::with_deserializer_from_str_with_options(slice, options(), |de| {
                Cluster::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
            });
        match parsed {
            Ok(cluster) => {
                let errors = validate(&cluster, Some(spec_dir));
                if errors.is_empty() {
                    report.clusters.push(LoadedCluster {
                        cluster: Arc::new(cluster),
                        file: file.to_path_buf(),
                        line: doc.first_line as u64,
                    });
                }
                for err in errors {
                    report.problem(file, doc.locate(&err.path), err.path, err.message);
                }
            }
            Err(e) => {
                let path = track.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let message = plain_message(&e);
                // A missing field has no position of its own: point at the
                // mapping that lacks it and name the field in the path.
                let (path, loc) = match missing_field(&message) {
                    Some(field) => (source_map::child(&path, field), doc.locate(&path)),
                    None => {
                        let at = e.location().map(|l| Loc {
                            line: l.line() + line_offset,
                            column: l.column(),
                        });
                        (path, at)
                    }
                };
                let (path, message) = explain(path, message);
                report.problem(file, loc, path, message);
            }
        }
    }
    report
}

fn options() -> Options {
    let mut o = Options::default();
    o.duplicate_keys = DuplicateKeyPolicy::Error;
    o.with_snippet = false;
    o
}

/// The parser's message without its own location suffix (we print ours).
fn plain_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.trim().to_string()
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// Rewrites parser messages that speak Rust or the library's API into the
/// spec's own terms.
fn explain(path: String, message: String) -> (String, String) {
    if missing_field(&message).is_some() {
        return (path, "required field is missing".to_string());
    }
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        let parent = path.strip_suffix(".?").unwrap_or(&path);
        return (
            source_map::child(parent, key),
            format!("`{key}` is set twice"),
        );
    }
    let number = match message.as_str() {
        "invalid u16" => Some(format!("expected a whole number from 0 to {}", u16::MAX)),
        "invalid u32" => Some(format!("expected a whole number from 0 to {}", u32::MAX)),
        "invalid u64" => Some("expected a whole number of at least 0".to_string()),
        "invalid f64" => Some("expected a number".to_string()),
        _ => None,
    };
    (path, number.unwrap_or(message))
}

fn reject_duplicates(report: &mut LoadReport) {
    let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in report.clusters.iter().enumerate() {
        by_name.entry(c.name().to_string()).or_default().push(i);
    }
    let mut drop = Vec::new();
    for (name, idxs) in by_name.into_iter().filter(|(_, v)| v.len() > 1) {
        for &i in &idxs {
            let others: Vec<String> = idxs
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| {
                    format!(
                        "{}:{}",
                        report.clusters[j].file.display(),
                        report.clusters[j].line
                    )
                })
                .collect();
            let c = &report.clusters[i];
            report.problems.push(Problem {
                file: c.file.clone(),
                line: Some(c.line),
                column: None,
                path: "metadata.name".into(),
                message: format!(
                    "cluster `{name}` is also defined in {}; neither is reconciled until one is renamed or removed",
                    others.join(", ")
                ),
            });
            drop.push(i);
        }
    }
    drop.sort_unstable();
    for i in drop.into_iter().rev() {
        report.clusters.remove(i);
    }
}

/// Every spec file below `dir`, sorted for stable output.
fn spec_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ty = entry.file_type()?;
            if ty.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
