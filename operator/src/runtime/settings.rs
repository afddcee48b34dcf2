//! Operator settings: where specs and state live, where to listen, who we are.
//!
//! Precedence, lowest to highest: built-in defaults, the TOML file given
//! with `--config`, `HANGAR_*` environment variables, command-line flags.
//! AWS settings are deliberately absent: they come from the standard AWS
//! chain (`AWS_REGION`, `AWS_ENDPOINT_URL`, profiles, instance roles).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

/// Environment variables read, each the upper-cased key with `HANGAR_`.
pub const ENV_VARS: [&str; 5] = [
    "HANGAR_SPECS",
    "HANGAR_STATE_DIR",
    "HANGAR_LISTEN",
    "HANGAR_OWNER",
    "HANGAR_CONCURRENCY",
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Directory of `Cluster` specs to reconcile.
    pub specs: PathBuf,
    /// Where status, pinned host keys, the artifact cache and the lease live.
    pub state_dir: PathBuf,
    /// Address of the HTTP server (metrics, health, status API).
    pub listen: SocketAddr,
    /// Operator id stamped on instances as `hangar:owner`; an operator only
    /// ever touches instances carrying its own id.
    pub owner: String,
    /// Clusters reconciled at the same time.
    pub concurrency: usize,
}

/// The same keys, all optional, as found in the file (unknown keys are an
/// error there: a typo must not silently keep a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed only to reject what the merged view would ignore
struct FileSettings {
    specs: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    listen: Option<String>,
    owner: Option<String>,
    concurrency: Option<usize>,
}

/// Values given on the command line; `None` means "not given".
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub specs: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub owner: Option<String>,
    pub concurrency: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("settings: {0}")]
    Invalid(String),
}

impl Settings {
    /// Loads settings from the process environment.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Settings, SettingsError> {
        let env: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| ENV_VARS.contains(&k.as_str()))
            .collect();
        Settings::load_with_env(file, env, flags)
    }

    /// Like [`Settings::load`], with the environment passed in (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: HashMap<String, String>,
        flags: &Overrides,
    ) -> Result<Settings, SettingsError> {
        let mut builder = Config::builder()
            .set_default("specs", "/etc/hangar/specs")
            .and_then(|b| b.set_default("state_dir", "/var/lib/hangar"))
            .and_then(|b| b.set_default("listen", "127.0.0.1:9090"))
            .and_then(|b| b.set_default("owner", "hangar"))
            .and_then(|b| b.set_default("concurrency", 8))
            .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| SettingsError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            toml_check(&text).map_err(|message| SettingsError::File {
                path: path.to_path_buf(),
                message,
            })?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| ENV_VARS.contains(&k.as_str()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("HANGAR")
                .prefix_separator("_")
                .try_parsing(true)
                .source(Some(env)),
        );
        let set = |b: config::ConfigBuilder<config::builder::DefaultState>,
                   key: &str,
                   v: Option<String>| { b.set_override_option(key, v) };
        builder = set(
            builder,
            "specs",
            flags.specs.as_ref().map(|p| p.display().to_string()),
        )
        .and_then(|b| {
            set(
                b,
                "state_dir",
                flags.state_dir.as_ref().map(|p| p.display().to_string()),
            )
        })
        .and_then(|b| set(b, "listen", flags.listen.map(|a| a.to_string())))
        .and_then(|b| set(b, "owner", flags.owner.clone()))
        .and_then(|b| b.set_override_option("concurrency", flags.concurrency.map(|c| c as u64)))
        .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), SettingsError> {
        let owner_ok = !self.owner.is_empty()
            && self.owner.len() <= 128
            && self
                .owner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !owner_ok {
            return Err(SettingsError::Invalid(format!(
                "owner `{}` must be 1-128 letters, digits, `-`, `_` or `.` (it becomes the hangar:owner tag)",
                self.owner
            )));
        }
        if self.concurrency == 0 {
            return Err(SettingsError::Invalid(
                "concurrency must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Parses the file strictly on its own, so unknown keys and bad types are
/// reported against the file rather than lost in the merge.
fn toml_check(text: &str) -> Result<(), String> {
    Config::builder()
        .add_source(File::from_str(text, FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<FileSettings>())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_when_nothing_is_given() {
        let s = Settings::load_with_env(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(s.owner, "hangar");
        assert_eq!(s.concurrency, 8);
    }

    #[test]
    fn flags_win_over_env_and_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hangar.toml");
        std::fs::write(
            &file,
            "owner = \"from-file\"\nconcurrency = 3\nspecs = \"/file/specs\"\n",
        )
        .unwrap();
        let e = env(&[
            ("HANGAR_OWNER", "from-env"),
            ("HANGAR_SPECS", "/env/specs"),
            ("HANGAR_LISTEN", "127.0.0.1:9999"),
        ]);
        let flags = Overrides {
            specs: Some("/flag/specs".into()),
            ..Overrides::default()
        };
        let s = Settings::load_with_env(Some(&file), e, &flags).unwrap();
        assert_eq!(s.specs, PathBuf::from("/flag/specs"));
        assert_eq!(s.owner, "from-env");
        assert_eq!(s.concurrency, 3);
        assert_eq!(s.listen.to_string(), "127.0.0.1:9999");
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hangar.toml");
        std::fs::write(&file, "ownr = \"x\"\n").unwrap();
        let err =
            Settings::load_with_env(Some(&file), env(&[]), &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().contains("hangar.toml") && err.to_string().contains("ownr"),
            "{err}"
        );

        let err = Settings::load_with_env(
            None,
            env(&[("HANGAR_OWNER", "bad owner!")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("owner"), "{err}");
        let err = Settings::load_with_env(
            None,
            env(&[("HANGAR_LISTEN", "nowhere")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("listen") || err.to_string().contains("address"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_example_file_loads() {
        let file =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/systemd/hangar.toml");
        let s = Settings::load_with_env(Some(&file), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(s.owner, "hangar-prod");
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/hangar"));
    }
}
