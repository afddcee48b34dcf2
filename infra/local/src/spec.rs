//! Cluster specs for the local cloud: a ready-to-use `Cluster` pointing at
//! the seeded resources, which tests adjust field by field.
//!
//! The spec is built as an ordered YAML tree (not via `hangar-crds`, which
//! this crate must not depend on) so the file reads like one a person
//! wrote, and any field — including ones added to the spec later — can be
//! set or removed by its dotted path:
//!
//! ```no_run
//! # fn demo(cloud: &hangar_local::LocalCloud, dir: &std::path::Path) -> std::io::Result<()> {
//! let path = cloud
//!     .spec()
//!     .set("spec.capacity.min", 3)
//!     .set("spec.autoscaling.scaleDown.stabilization", "10s")
//!     .remove("spec.autoscaling")
//!     .write(dir)?;
//! # Ok(()) }
//! ```

use std::path::{Component, Path, PathBuf};

use crate::artifact::Artifact;

/// A YAML value, maps in insertion order.
#[derive(Clone, Debug, PartialEq)]
pub enum Yaml {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Yaml>),
    Map(Vec<(String, Yaml)>),
}

impl Yaml {
    pub fn map<K: Into<String>, V: Into<Yaml>>(entries: impl IntoIterator<Item = (K, V)>) -> Yaml {
        Yaml::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    pub fn list<V: Into<Yaml>>(items: impl IntoIterator<Item = V>) -> Yaml {
        Yaml::List(items.into_iter().map(Into::into).collect())
    }

    /// An empty map (`{}`), e.g. `requestCountPerTarget: {}`.
    pub fn empty_map() -> Yaml {
        Yaml::Map(Vec::new())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }

    fn entry_mut(&mut self, key: &str) -> Option<&mut Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn entry(&self, key: &str) -> Option<&Yaml> {
        match self {
            Yaml::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Yaml {
            fn from(v: $t) -> Yaml {
                Yaml::Int(i64::from(v))
            }
        }
    )*};
}
from_int!(i32, i64, u8, u16, u32);

impl From<u64> for Yaml {
    fn from(v: u64) -> Yaml {
        i64::try_from(v)
            .map(Yaml::Int)
            .unwrap_or(Yaml::Float(v as f64))
    }
}

impl From<f64> for Yaml {
    fn from(v: f64) -> Yaml {
        Yaml::Float(v)
    }
}

impl From<bool> for Yaml {
    fn from(v: bool) -> Yaml {
        Yaml::Bool(v)
    }
}

impl From<&str> for Yaml {
    fn from(v: &str) -> Yaml {
        Yaml::Str(v.to_string())
    }
}

impl From<String> for Yaml {
    fn from(v: String) -> Yaml {
        Yaml::Str(v)
    }
}

impl From<&String> for Yaml {
    fn from(v: &String) -> Yaml {
        Yaml::Str(v.clone())
    }
}

impl From<&Path> for Yaml {
    fn from(v: &Path) -> Yaml {
        Yaml::Str(v.display().to_string())
    }
}

impl From<Vec<Yaml>> for Yaml {
    fn from(v: Vec<Yaml>) -> Yaml {
        Yaml::List(v)
    }
}

/// What a local cloud's default spec points at.
#[derive(Clone, Debug)]
pub struct SpecInputs {
    pub name: String,
    pub region: String,
    pub launch_template_id: String,
    pub subnet_ids: Vec<String>,
    pub target_group_arn: String,
    pub private_key: PathBuf,
    pub runbook: PathBuf,
    pub release: Artifact,
    /// `crds/schema/cluster.json`, for the editor modeline.
    pub schema: PathBuf,
    /// Says where the spec came from, in its header comment.
    pub origin: String,
}

/// A `Cluster` spec being prepared; every setter consumes and returns it.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    root: Yaml,
    schema: PathBuf,
    comments: Vec<String>,
}

impl ClusterSpec {
    /// The local cloud's default cluster: `capacity {min 2, max 6}`,
    /// autoscaling on `RequestCountPerTarget` over 10 s periods with a
    /// target of 300 requests/minute per node (so `load --rps 20` — 1200
    /// a minute — asks for 4 nodes), evaluated every 5 s, scale-in after
    /// 30 s of lower traffic; root over SSH with TOFU host keys; the
    /// static-http runbook; the given release; 20 s drain.
    pub fn local_default(inputs: &SpecInputs) -> ClusterSpec {
        let root = Yaml::map([
            ("apiVersion", Yaml::from("hangar/v1alpha1")),
            ("kind", "Cluster".into()),
            ("metadata", Yaml::map([("name", inputs.name.as_str())])),
            (
                "spec",
                Yaml::map([
                    ("region", Yaml::from(&inputs.region)),
                    (
                        "instances",
                        Yaml::map([
                            ("launchTemplate", Yaml::from(&inputs.launch_template_id)),
                            ("subnets", Yaml::list(inputs.subnet_ids.iter())),
                        ]),
                    ),
                    (
                        "loadBalancer",
                        Yaml::map([
                            ("targetGroupArn", &inputs.target_group_arn),
                            ("drainTimeout", &"20s".to_string()),
                        ]),
                    ),
                    ("capacity", Yaml::map([("min", 2), ("max", 6)])),
                    (
                        "autoscaling",
                        Yaml::map([
                            (
                                "metric",
                                Yaml::map([(
                                    "cloudwatch",
                                    Yaml::map([(
                                        "requestCountPerTarget",
                                        Yaml::map([("period", "10s")]),
                                    )]),
                                )]),
                            ),
                            ("targetPerNode", Yaml::from(300)),
                            ("evaluationInterval", "5s".into()),
                            (
                                "scaleUp",
                                Yaml::map([
                                    ("stabilization", Yaml::from("0s")),
                                    ("maxStep", 4.into()),
                                ]),
                            ),
                            (
                                "scaleDown",
                                Yaml::map([
                                    ("stabilization", Yaml::from("30s")),
                                    ("maxStep", 1.into()),
                                ]),
                            ),
                        ]),
                    ),
                    (
                        "ssh",
                        Yaml::map([
                            ("user", Yaml::from("root")),
                            ("privateKeyFile", inputs.private_key.as_path().into()),
                            ("hostKeyPolicy", "tofu".into()),
                            ("connectTimeout", "5s".into()),
                        ]),
                    ),
                    (
                        "provision",
                        Yaml::map([("runbook", inputs.runbook.as_path())]),
                    ),
                    ("release", release_yaml(&inputs.release)),
                ]),
            ),
        ]);
        ClusterSpec {
            root,
            schema: inputs.schema.clone(),
            comments: vec![
                format!("Generated by {} for hangar's local cloud.", inputs.origin),
                "Region, launch template, subnets and target group are the emulated".into(),
                "account's (moto); nodes are real sshd processes on 127.0.0.0/8.".into(),
            ],
        }
    }

    /// Sets the value at a dotted path (`spec.capacity.min`), creating maps
    /// along the way and replacing whatever was there.
    pub fn set(mut self, path: &str, value: impl Into<Yaml>) -> ClusterSpec {
        let mut node = &mut self.root;
        let mut keys = path.split('.').peekable();
        while let Some(key) = keys.next() {
            if !matches!(node, Yaml::Map(_)) {
                *node = Yaml::empty_map();
            }
            if node.entry(key).is_none() {
                if let Yaml::Map(entries) = node {
                    entries.push((key.to_string(), Yaml::empty_map()));
                }
            }
            let Some(child) = node.entry_mut(key) else {
                return self;
            };
            if keys.peek().is_none() {
                *child = value.into();
                return self;
            }
            node = child;
        }
        self
    }

    /// Removes the value at a dotted path (no-op when absent).
    pub fn remove(mut self, path: &str) -> ClusterSpec {
        let (parent, last) = match path.rsplit_once('.') {
            Some((p, l)) => (Some(p), l),
            None => (None, path),
        };
        let mut node = Some(&mut self.root);
        if let Some(parent) = parent {
            for key in parent.split('.') {
                node = node.and_then(|n| n.entry_mut(key));
            }
        }
        if let Some(Yaml::Map(entries)) = node {
            entries.retain(|(k, _)| k != last);
        }
        self
    }

    /// The value at a dotted path.
    pub fn get(&self, path: &str) -> Option<&Yaml> {
        path.split('.')
            .try_fold(&self.root, |node, key| node.entry(key))
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.get("metadata.name")
            .and_then(Yaml::as_str)
            .unwrap_or("cluster")
    }

    pub fn with_name(self, name: &str) -> ClusterSpec {
        self.set("metadata.name", name)
    }

    /// Points `spec.release` at `artifact` (keeping its other settings).
    pub fn with_release(self, artifact: &Artifact) -> ClusterSpec {
        self.set("spec.release.id", &artifact.id)
            .set("spec.release.artifact", &artifact.url)
            .set("spec.release.sha256", &artifact.sha256)
    }

    pub fn with_capacity(self, min: u32, max: u32) -> ClusterSpec {
        self.set("spec.capacity.min", min)
            .set("spec.capacity.max", max)
    }

    /// Adds a line to the header comment.
    pub fn comment(mut self, line: impl Into<String>) -> ClusterSpec {
        self.comments.push(line.into());
        self
    }

    /// The spec as YAML text, modeline first. `spec_dir` is where it will
    /// live (the modeline's schema path is relative to it when possible).
    pub fn to_yaml(&self, spec_dir: &Path) -> String {
        let schema = relative_to(&self.schema, spec_dir).unwrap_or_else(|| self.schema.clone());
        let mut out = format!("# yaml-language-server: $schema={}\n#\n", schema.display());
        for line in &self.comments {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        if let Yaml::Map(entries) = &self.root {
            emit_map(&mut out, 0, entries);
        }
        out
    }

    /// Writes `<dir>/<name>.yaml` (creating `dir`) and returns its path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("{}.yaml", self.name()));
        self.write_to(&path)?;
        Ok(path)
    }

    /// Writes the spec to `path` atomically (a watching operator never
    /// reads half a file), creating its directory.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Hidden and not `.yaml`: a directory watcher ignores it.
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, self.to_yaml(dir))?;
        std::fs::rename(&tmp, path)
    }
}

fn release_yaml(artifact: &Artifact) -> Yaml {
    Yaml::map([
        ("id", Yaml::from(&artifact.id)),
        ("artifact", Yaml::from(&artifact.url)),
        ("sha256", Yaml::from(&artifact.sha256)),
        (
            "healthCheck",
            Yaml::map([
                ("path", Yaml::from("/health")),
                ("port", 80.into()),
                ("timeout", "2s".into()),
                ("interval", "1s".into()),
                ("deadline", "2m".into()),
            ]),
        ),
    ])
}

fn emit_map(out: &mut String, indent: usize, entries: &[(String, Yaml)]) {
    let pad = " ".repeat(indent);
    for (key, value) in entries {
        let key = scalar_str(key);
        match value {
            Yaml::Map(inner) if !inner.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                emit_map(out, indent + 2, inner);
            }
            Yaml::List(items) if !items.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                emit_list(out, indent + 2, items);
            }
            other => out.push_str(&format!("{pad}{key}: {}\n", inline(other))),
        }
    }
}

fn emit_list(out: &mut String, indent: usize, items: &[Yaml]) {
    let pad = " ".repeat(indent);
    for item in items {
        match item {
            Yaml::Map(inner) if !inner.is_empty() => {
                // The first key goes on the dash line.
                let mut block = String::new();
                emit_map(&mut block, indent + 2, inner);
                let block = block.replacen(&" ".repeat(indent + 2), &format!("{pad}- "), 1);
                out.push_str(&block);
            }
            Yaml::List(inner) if !inner.is_empty() => {
                out.push_str(&format!("{pad}-\n"));
                emit_list(out, indent + 2, inner);
            }
            other => out.push_str(&format!("{pad}- {}\n", inline(other))),
        }
    }
}

/// A value on one line (scalars, `{}` and `[]`).
fn inline(value: &Yaml) -> String {
    match value {
        Yaml::Str(s) => scalar_str(s),
        Yaml::Int(i) => i.to_string(),
        Yaml::Float(f) if f.is_finite() => f.to_string(),
        Yaml::Float(_) => ".nan".into(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Map(_) => "{}".into(),
        Yaml::List(_) => "[]".into(),
    }
}

/// A string as a YAML scalar: plain when that cannot be misread, else
/// double-quoted (JSON escaping is valid YAML).
fn scalar_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '/' || c == '$')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-' | '$' | '+'))
        // Anything a YAML 1.1 or 1.2 reader could take for a number or a
        // date (`1_000`, `0x1f`, `2024-01-01`, `1e5`) is quoted.
        && !s
            .chars()
            .all(|c| c.is_ascii_digit() || "_.+-:eExXoObB".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "nan" | "inf"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

/// `target` relative to `base` (both absolute), e.g. `../../crds/schema/cluster.json`.
pub fn relative_to(target: &Path, base: &Path) -> Option<PathBuf> {
    if !target.is_absolute() || !base.is_absolute() {
        return None;
    }
    let t: Vec<Component> = target.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common <= 1 {
        // Only `/` in common: an absolute path reads better.
        return None;
    }
    let mut rel = PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c.as_os_str());
    }
    Some(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::ReleaseKind;

    fn inputs() -> SpecInputs {
        SpecInputs {
            name: "web".into(),
            region: "us-east-1".into(),
            launch_template_id: "lt-0123".into(),
            subnet_ids: vec!["subnet-a".into(), "subnet-b".into()],
            target_group_arn:
                "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/abc".into(),
            private_key: "/work/run/id_ed25519".into(),
            runbook: "/work/runbooks/static-http.yaml".into(),
            release: Artifact {
                id: "v1".into(),
                url: "s3://bucket/releases/v1.tar.gz".into(),
                sha256: "ab".repeat(32),
                kind: ReleaseKind::Good,
            },
            schema: "/work/crds/schema/cluster.json".into(),
            origin: "a test".into(),
        }
    }

    #[test]
    fn default_spec_reads_like_a_hand_written_one() {
        let yaml = ClusterSpec::local_default(&inputs()).to_yaml(Path::new("/work/run/specs"));
        assert!(
            yaml.starts_with("# yaml-language-server: $schema=../../crds/schema/cluster.json\n")
        );
        for line in [
            "apiVersion: hangar/v1alpha1\n",
            "  name: web\n",
            "    subnets:\n      - subnet-a\n      - subnet-b\n",
            "    targetGroupArn: \"arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/abc\"\n",
            "        requestCountPerTarget:\n          period: 10s\n",
            "    privateKeyFile: /work/run/id_ed25519\n",
            "    artifact: \"s3://bucket/releases/v1.tar.gz\"\n",
            "  capacity:\n    min: 2\n    max: 6\n",
        ] {
            assert!(yaml.contains(line), "missing {line:?} in\n{yaml}");
        }
    }

    #[test]
    fn paths_set_replace_and_remove() {
        let spec = ClusterSpec::local_default(&inputs())
            .set("spec.capacity.min", 3)
            .set("spec.autoscaling.scaleDown.stabilization", "10s")
            .set(
                "spec.schedules",
                Yaml::list([Yaml::map([
                    ("name", Yaml::from("night")),
                    ("until", "2h".into()),
                ])]),
            )
            .set("spec.deletionPolicy", "delete")
            .remove("spec.release.healthCheck")
            .with_name("api");
        assert_eq!(spec.get("spec.capacity.min"), Some(&Yaml::Int(3)));
        assert_eq!(spec.name(), "api");
        assert!(spec.get("spec.release.healthCheck").is_none());
        assert!(spec.get("spec.release.id").is_some());
        let yaml = spec.to_yaml(Path::new("/elsewhere"));
        assert!(
            yaml.contains("  schedules:\n    - name: night\n      until: 2h\n"),
            "{yaml}"
        );
        assert!(yaml.contains("      stabilization: 10s\n"), "{yaml}");
    }

    #[test]
    fn ambiguous_strings_are_quoted() {
        assert_eq!(scalar_str("v1"), "v1");
        assert_eq!(scalar_str("10s"), "10s");
        assert_eq!(scalar_str("$Default"), "$Default");
        assert_eq!(scalar_str("1.5"), "\"1.5\"");
        assert_eq!(scalar_str("yes"), "\"yes\"");
        assert_eq!(scalar_str("a: b"), "\"a: b\"");
        assert_eq!(scalar_str(""), "\"\"");
        assert_eq!(scalar_str("0123"), "\"0123\"");
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(
                Path::new("/r/crds/schema/c.json"),
                Path::new("/r/infra/local/run/specs")
            ),
            Some(PathBuf::from("../../../../crds/schema/c.json"))
        );
        assert_eq!(relative_to(Path::new("/a/x"), Path::new("/b/y")), None);
    }
}
