//! The spec directory, as the operator sees it: the valid clusters, the
//! problems, what changed since the last look, and a file watcher that
//! says when to look again.
//!
//! Each cluster also carries two hashes: the spec's (status shows which spec
//! it reflects) and the provisioning config's (runbook + vars + env file):
//! when the latter changes, nodes are re-provisioned in a rolling way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar_crds::load::{load_dir_reusing, LoadError};
use hangar_crds::{LoadedCluster, Problem};
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::effects::git::CommitInfo;
use crate::runtime::http::ProblemView;

/// One valid cluster spec and what it depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSpecEntry {
    pub loaded: LoadedCluster,
    /// sha256 of the spec (hex, 16 chars).
    pub spec_hash: String,
    /// sha256 of runbook + vars + env file (hex, 12 chars): the
    /// `hangar:config` tag value.
    pub config_hash: String,
    /// The commit it was read at, when specs come from git.
    pub commit: Option<Arc<CommitInfo>>,
}

impl ClusterSpecEntry {
    pub fn name(&self) -> &str {
        self.loaded.name()
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecSet {
    pub clusters: BTreeMap<String, ClusterSpecEntry>,
    pub problems: Vec<Problem>,
    /// sha256 of every file that loaded without a problem, so that
    /// [`SpecSet::reload`] can tell which ones it need not parse again.
    files: HashMap<PathBuf, [u8; 32]>,
    /// The commit, when the set was read from a git source.
    pub origin: Option<Origin>,
}

/// The commit a set was read at, and where its tree is checked out.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub commit: Arc<CommitInfo>,
    /// `<stateDir>/git/current`: file paths below it are shown relative.
    pub root: PathBuf,
    /// The commit before, when the branch was force-pushed past it.
    pub rewritten: Option<String>,
}

impl SpecSet {
    /// Loads the directory. Files a spec refers to that cannot be read are
    /// problems of that spec (it is left out), like any other.
    pub fn load(dir: &Path) -> Result<SpecSet, LoadError> {
        SpecSet::default().reload(dir)
    }

    /// Loads the directory again, reusing this set's parsed clusters for
    /// every file whose bytes did not change (the resync re-reads every
    /// spec; parsing a thousand of them cost ~0.6 s of CPU). The files a
    /// spec refers to (runbook, env file) are read every time: they feed
    /// the config hash, and one gone missing is a problem like before.
    pub fn reload(&self, dir: &Path) -> Result<SpecSet, LoadError> {
        let mut by_file: HashMap<&Path, Vec<&ClusterSpecEntry>> = HashMap::new();
        for entry in self.clusters.values() {
            by_file
                .entry(entry.loaded.file.as_path())
                .or_default()
                .push(entry);
        }
        let mut files = HashMap::new();
        let report = load_dir_reusing(dir, |file, text| {
            let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            files.insert(file.to_path_buf(), digest);
            if self.files.get(file) != Some(&digest) {
                return None;
            }
            let entries = by_file.get(file).map(Vec::as_slice).unwrap_or_default();
            Some(entries.iter().map(|e| e.loaded.clone()).collect())
        })?;
        let mut set = SpecSet {
            clusters: BTreeMap::new(),
            problems: report.problems,
            files,
            origin: None,
        };
        for loaded in report.clusters {
            match config_hash(&loaded) {
                Ok(config_hash) => {
                    let spec_hash = match self.clusters.get(loaded.name()) {
                        Some(old) if Arc::ptr_eq(&old.loaded.cluster, &loaded.cluster) => {
                            old.spec_hash.clone()
                        }
                        _ => spec_hash(&loaded),
                    };
                    set.clusters.insert(
                        loaded.name().to_string(),
                        ClusterSpecEntry {
                            loaded,
                            spec_hash,
                            config_hash,
                            commit: None,
                        },
                    );
                }
                Err((path, e)) => set.problems.push(Problem {
                    file: loaded.file.clone(),
                    line: Some(loaded.line),
                    column: None,
                    path: "spec.provision".into(),
                    message: format!("cannot read {}: {e}", path.display()),
                }),
            }
        }
        // Only a file without a problem may be reused as it is.
        for problem in &set.problems {
            set.files.remove(&problem.file);
        }
        Ok(set)
    }

    /// The set as read at `origin`'s commit: every cluster carries it.
    pub fn at(mut self, origin: Origin) -> SpecSet {
        for entry in self.clusters.values_mut() {
            entry.commit = Some(origin.commit.clone());
        }
        self.origin = Some(origin);
        self
    }

    /// The problems as people read them: at a commit, a file is named by
    /// its path in the repository and the commit
    /// (`clusters/web.yaml@1a2b3c4:3:5: …`).
    pub fn problem_views(&self) -> Vec<ProblemView> {
        self.problems
            .iter()
            .map(|p| match &self.origin {
                Some(origin) => match p.file.strip_prefix(&origin.root) {
                    Ok(rel) => ProblemView::from(&Problem {
                        file: PathBuf::from(format!("{}@{}", rel.display(), origin.commit.short())),
                        ..p.clone()
                    }),
                    Err(_) => ProblemView::from(p),
                },
                None => ProblemView::from(p),
            })
            .collect()
    }

    /// Names of clusters added, removed or changed between `self` and `newer`.
    pub fn changed(&self, newer: &SpecSet) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (name, entry) in &newer.clusters {
            let same = self.clusters.get(name).is_some_and(|old| {
                old.spec_hash == entry.spec_hash
                    && old.config_hash == entry.config_hash
                    && old.commit.as_ref().map(|c| &c.sha) == entry.commit.as_ref().map(|c| &c.sha)
            });
            if !same {
                names.push(name.clone());
            }
        }
        names.extend(
            self.clusters
                .keys()
                .filter(|n| !newer.clusters.contains_key(*n))
                .cloned(),
        );
        names.sort();
        names
    }

    pub fn get(&self, name: &str) -> Option<&ClusterSpecEntry> {
        self.clusters.get(name)
    }
}

fn hex_prefix(digest: &[u8], chars: usize) -> String {
    let mut s = hex::encode(digest);
    s.truncate(chars);
    s
}

fn spec_hash(loaded: &LoadedCluster) -> String {
    let json = serde_json::to_vec(loaded.cluster.as_ref()).unwrap_or_default();
    hex_prefix(&Sha256::digest(&json), 16)
}

fn config_hash(loaded: &LoadedCluster) -> Result<String, (PathBuf, std::io::Error)> {
    let mut h = Sha256::new();
    let runbook = loaded.runbook_path();
    h.update(std::fs::read(&runbook).map_err(|e| (runbook, e))?);
    h.update([0]);
    for (k, v) in &loaded.cluster.spec.provision.vars {
        h.update(k.as_bytes());
        h.update([b'=']);
        h.update(v.as_bytes());
        h.update([0]);
    }
    if let Some(env) = loaded.env_file_path() {
        h.update(std::fs::read(&env).map_err(|e| (env, e))?);
    }
    // What the runbook is run with also includes where releases live.
    h.update(loaded.cluster.spec.release.app_root.as_bytes());
    Ok(hex_prefix(&h.finalize(), 12))
}

/// Watches `dir` (recursively) and sends `()` on every change. The runtime
/// debounces; a missed event is caught by the periodic resync anyway.
pub fn watch(dir: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            if !e.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_spec(dir: &Path, file: &str, name: &str, min: u32) {
        let text = format!(
            r#"apiVersion: hangar/v1alpha1
kind: Cluster
metadata: {{ name: {name} }}
spec:
  region: eu-west-1
  instances: {{ launchTemplate: lt-1, subnets: [subnet-1] }}
  loadBalancer: {{ targetGroupArn: "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1" }}
  capacity: {{ min: {min}, max: 5 }}
  ssh: {{ user: deploy, privateKeyFile: /k }}
  provision: {{ runbook: runbook.yaml }}
  release: {{ id: v1, artifact: "s3://b/k", sha256: "{sha}" }}
"#,
            sha = "a".repeat(64)
        );
        std::fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn detects_added_changed_removed_and_config_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("specs")).unwrap();
        let specs = dir.path().join("specs");
        std::fs::write(specs.join("runbook.yaml"), "steps: []\n").unwrap();
        write_spec(&specs, "web.yaml", "web", 1);
        write_spec(&specs, "api.yaml", "api", 1);
        let a = SpecSet::load(&specs).unwrap();
        assert_eq!(a.clusters.len(), 2);

        write_spec(&specs, "web.yaml", "web", 2);
        std::fs::remove_file(specs.join("api.yaml")).unwrap();
        write_spec(&specs, "jobs.yaml", "jobs", 1);
        let b = SpecSet::load(&specs).unwrap();
        assert_eq!(a.changed(&b), ["api", "jobs", "web"]);
        assert_eq!(b.changed(&b), Vec::<String>::new());

        let before = b.get("web").unwrap().config_hash.clone();
        std::fs::write(specs.join("runbook.yaml"), "steps: [] # changed\n").unwrap();
        let c = SpecSet::load(&specs).unwrap();
        assert_ne!(
            c.get("web").unwrap().config_hash,
            before,
            "a runbook edit changes the config hash"
        );
        assert_eq!(b.changed(&c), ["jobs", "web"]);
    }

    #[test]
    fn a_reload_sees_edits_and_what_specs_refer_to_though_it_reuses_unchanged_files() {
        let dir = tempfile::tempdir().unwrap();
        let specs = dir.path();
        write_spec(specs, "web.yaml", "web", 1);
        write_spec(specs, "api.yaml", "api", 1);
        // No runbook yet: both are rejected, and neither may be reused.
        let a = SpecSet::load(specs).unwrap();
        assert!(a.clusters.is_empty(), "{:?}", a.clusters);
        assert!(a.files.is_empty(), "{:?}", a.files);

        // The runbook lands after the specs: the same bytes now load.
        std::fs::write(specs.join("runbook.yaml"), "steps: []\n").unwrap();
        let b = a.reload(specs).unwrap();
        assert_eq!(b.clusters.keys().collect::<Vec<_>>(), ["api", "web"]);
        // Only problem-free files are remembered (not the runbook, which
        // lies in the spec directory but is no spec).
        assert_eq!(b.files.len(), 2, "{:?}", b.files);
        assert_eq!(
            b.reload(specs).unwrap(),
            b,
            "nothing changed, nothing differs"
        );

        // An edit of the same length is seen (content, not size or mtime).
        write_spec(specs, "web.yaml", "web", 2);
        let c = b.reload(specs).unwrap();
        assert_eq!(c.get("web").unwrap().loaded.cluster.spec.capacity.min, 2);
        assert_eq!(b.changed(&c), ["web"]);
        assert_eq!(c.get("api"), b.get("api"));

        // The runbook vanishes: the unchanged specs become problems again.
        std::fs::remove_file(specs.join("runbook.yaml")).unwrap();
        let d = c.reload(specs).unwrap();
        assert!(d.clusters.is_empty(), "{:?}", d.clusters);
        assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
        assert!(
            d.problems.iter().all(|p| p.path == "spec.provision"),
            "{:?}",
            d.problems
        );

        std::fs::write(specs.join("runbook.yaml"), "steps: []\n").unwrap();
        std::fs::remove_file(specs.join("api.yaml")).unwrap();
        let e = d.reload(specs).unwrap();
        assert_eq!(e.clusters.keys().collect::<Vec<_>>(), ["web"]);
    }

    #[tokio::test]
    async fn the_watcher_reports_edits() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _w = watch(dir.path(), tx).unwrap();
        std::fs::write(dir.path().join("x.yaml"), "a: 1\n").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("a change event within 5s")
            .expect("channel open");
    }
}
