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
pub const ENV_VARS: [&str; 19] = [
    "HANGAR_SPECS",
    "HANGAR_SECRETS_REFRESH_INTERVAL",
    "HANGAR_TEMPLATE_VERSION_TTL",
    "HANGAR_TARGET_GROUP_CHECK_INTERVAL",
    "HANGAR_GIT_POLL_INTERVAL",
    "HANGAR_GIT_SSH_KEY",
    "HANGAR_GIT_KNOWN_HOSTS",
    "HANGAR_GIT_ALLOWED_SIGNERS",
    "HANGAR_GIT_HTTPS_TOKEN_FILE",
    "HANGAR_WEBHOOK_SECRET_FILE",
    "HANGAR_STATE_DIR",
    "HANGAR_LISTEN",
    "HANGAR_OWNER",
    "HANGAR_CONCURRENCY",
    "HANGAR_LEASE",
    "HANGAR_LEASE_DURATION",
    "HANGAR_LEASE_RENEW_DEADLINE",
    "HANGAR_LEASE_RETRY_PERIOD",
    "HANGAR_LEASE_HOLDER",
];

/// Which lease keeps two operators of one owner id apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseBackend {
    /// `flock` in the state directory: one operator per host (default).
    Flock,
    /// `dynamodb:TABLE`: a lease item in a DynamoDB table (region and
    /// credentials from the AWS chain), for a leader and standbys on any
    /// number of hosts.
    DynamoDb { table: String },
}

impl std::str::FromStr for LeaseBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "flock" => Ok(LeaseBackend::Flock),
            Some(("dynamodb", table)) if valid_table(table) => Ok(LeaseBackend::DynamoDb {
                table: table.to_string(),
            }),
            Some(("dynamodb", table)) => Err(format!(
                "lease `{s}`: table name `{table}` must be 3-255 letters, digits, `_`, `-` or `.`"
            )),
            _ => Err(format!("lease `{s}`: expected `flock` or `dynamodb:TABLE`")),
        }
    }
}

impl std::fmt::Display for LeaseBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseBackend::Flock => f.write_str("flock"),
            LeaseBackend::DynamoDb { table } => write!(f, "dynamodb:{table}"),
        }
    }
}

/// DynamoDB's table name rule.
fn valid_table(t: &str) -> bool {
    (3..=255).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The lease keys of the settings (flat in the file: `lease`,
/// `lease_duration`, …). Defaults are client-go's leader election's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSettings {
    /// `flock` or `dynamodb:TABLE`.
    #[serde(default = "default_lease")]
    pub lease: String,
    /// How long a standby must see the lease unrenewed before taking over.
    #[serde(default = "default_lease_duration")]
    pub lease_duration: hangar_crds::Duration,
    /// How long after its last successful renewal the leader keeps acting.
    #[serde(default = "default_renew_deadline")]
    pub lease_renew_deadline: hangar_crds::Duration,
    /// How often the leader renews and a standby looks.
    #[serde(default = "default_retry_period")]
    pub lease_retry_period: hangar_crds::Duration,
    /// This process's identity in the lease; default `<host>-<pid>-<random>`.
    #[serde(default)]
    pub lease_holder: Option<String>,
}

fn default_lease() -> String {
    "flock".into()
}
fn default_lease_duration() -> hangar_crds::Duration {
    hangar_crds::Duration::from_secs(15)
}
fn default_renew_deadline() -> hangar_crds::Duration {
    hangar_crds::Duration::from_secs(10)
}
fn default_retry_period() -> hangar_crds::Duration {
    hangar_crds::Duration::from_secs(2)
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            lease: default_lease(),
            lease_duration: default_lease_duration(),
            lease_renew_deadline: default_renew_deadline(),
            lease_retry_period: default_retry_period(),
            lease_holder: None,
        }
    }
}

impl LeaseSettings {
    pub fn backend(&self) -> Result<LeaseBackend, SettingsError> {
        self.lease.parse().map_err(SettingsError::Invalid)
    }

    pub fn timing(&self) -> crate::core::lease::Timing {
        crate::core::lease::Timing {
            lease: self.lease_duration.get(),
            renew_deadline: self.lease_renew_deadline.get(),
            retry: self.lease_retry_period.get(),
        }
    }

    /// The holder id: as set, or `<host>-<pid>-<8 random hex digits>` (a
    /// restarted process is a new holder, and waits like any other).
    pub fn holder(&self) -> String {
        if let Some(h) = &self.lease_holder {
            return h.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".into());
        format!(
            "{host}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    }
}

/// How specs are read from a git source (`specs = "git+…"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitSettings {
    /// How often the source is fetched; default 30s (a webhook call
    /// fetches at once).
    #[serde(default = "default_git_poll")]
    pub git_poll_interval: hangar_crds::Duration,
    /// Private key for `git+ssh://` sources.
    #[serde(default)]
    pub git_ssh_key: Option<PathBuf>,
    /// known_hosts for `git+ssh://`: given, only hosts in it are accepted;
    /// absent, the first key is pinned and a changed one refused.
    #[serde(default)]
    pub git_known_hosts: Option<PathBuf>,
    /// Accept only commits signed by a key in this `allowed_signers` file.
    #[serde(default)]
    pub git_allowed_signers: Option<PathBuf>,
    /// File holding a token for `git+https://` sources.
    #[serde(default)]
    pub git_https_token_file: Option<PathBuf>,
    /// File holding the webhook's shared secret (or the environment
    /// variable `HANGAR_WEBHOOK_SECRET`); without one `POST /api/v1/sync`
    /// is off.
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
}

fn default_secrets_refresh() -> hangar_crds::Duration {
    hangar_crds::Duration::from_secs(60)
}

fn default_template_version_ttl() -> hangar_crds::Duration {
    hangar_crds::Duration::from_secs(60)
}

fn default_target_group_check() -> hangar_crds::Duration {
    hangar_crds::Duration::from_secs(30)
}

fn default_git_poll() -> hangar_crds::Duration {
    hangar_crds::Duration::from_secs(30)
}

impl Default for GitSettings {
    fn default() -> Self {
        GitSettings {
            git_poll_interval: default_git_poll(),
            git_ssh_key: None,
            git_known_hosts: None,
            git_allowed_signers: None,
            git_https_token_file: None,
            webhook_secret_file: None,
        }
    }
}

/// Where specs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecSource {
    Dir(PathBuf),
    Git(crate::effects::git::GitSource),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Directory of `Cluster` specs to reconcile, or a git source
    /// (`git+ssh://host/repo.git//dir?ref=main`).
    pub specs: String,
    #[serde(flatten)]
    pub git: GitSettings,
    /// How often `provision.secretsFrom` values are read again (a rotation
    /// reaches the nodes within it); default 60s.
    #[serde(default = "default_secrets_refresh")]
    pub secrets_refresh_interval: hangar_crds::Duration,
    /// How long a launch template's `$Latest`/`$Default`, once resolved to
    /// a version number, is believed before it is read again: a new
    /// template version starts an instance refresh within it; default 60s.
    #[serde(default = "default_template_version_ttl")]
    pub template_version_ttl: hangar_crds::Duration,
    /// How often each cluster's target group is read to find in-service
    /// nodes it no longer lists (one `DescribeTargetHealth` per cluster);
    /// default 30s.
    #[serde(default = "default_target_group_check")]
    pub target_group_check_interval: hangar_crds::Duration,
    /// Where status, pinned host keys, the artifact cache and the lease live.
    pub state_dir: PathBuf,
    /// Address of the HTTP server (metrics, health, status API).
    pub listen: SocketAddr,
    /// Operator id stamped on instances as `hangar:owner`; an operator only
    /// ever touches instances carrying its own id.
    pub owner: String,
    /// Clusters reconciled at the same time.
    pub concurrency: usize,
    /// Which lease keeps operators of this owner id apart, and its timing.
    #[serde(flatten)]
    pub lease: LeaseSettings,
}

/// The same keys, all optional, as found in the file (unknown keys are an
/// error there: a typo must not silently keep a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // parsed only to reject what the merged view would ignore
struct FileSettings {
    specs: Option<String>,
    secrets_refresh_interval: Option<hangar_crds::Duration>,
    template_version_ttl: Option<hangar_crds::Duration>,
    target_group_check_interval: Option<hangar_crds::Duration>,
    git_poll_interval: Option<hangar_crds::Duration>,
    git_ssh_key: Option<PathBuf>,
    git_known_hosts: Option<PathBuf>,
    git_allowed_signers: Option<PathBuf>,
    git_https_token_file: Option<PathBuf>,
    webhook_secret_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    listen: Option<String>,
    owner: Option<String>,
    concurrency: Option<usize>,
    lease: Option<String>,
    lease_duration: Option<hangar_crds::Duration>,
    lease_renew_deadline: Option<hangar_crds::Duration>,
    lease_retry_period: Option<hangar_crds::Duration>,
    lease_holder: Option<String>,
}

/// Values given on the command line; `None` means "not given".
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub specs: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub owner: Option<String>,
    pub concurrency: Option<usize>,
    pub lease: Option<String>,
    pub lease_duration: Option<hangar_crds::Duration>,
    pub lease_renew_deadline: Option<hangar_crds::Duration>,
    pub lease_retry_period: Option<hangar_crds::Duration>,
    pub lease_holder: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings file {}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("settings: {0}")]
    Invalid(String),
}

impl Settings {
    /// The spec source `specs` names.
    pub fn spec_source(&self) -> Result<SpecSource, SettingsError> {
        if crate::effects::git::GitSource::is_git(&self.specs) {
            crate::effects::git::GitSource::parse(&self.specs)
                .map(SpecSource::Git)
                .map_err(|e| SettingsError::Invalid(e.to_string()))
        } else {
            Ok(SpecSource::Dir(PathBuf::from(&self.specs)))
        }
    }

    /// `specs` as logs show it (no credentials).
    pub fn specs_display(&self) -> String {
        match self.spec_source() {
            Ok(SpecSource::Git(g)) => g.display(),
            _ => self.specs.clone(),
        }
    }

    /// The spec directory, for commands that read specs offline.
    pub fn specs_dir(&self) -> Result<PathBuf, SettingsError> {
        match self.spec_source()? {
            SpecSource::Dir(d) => Ok(d),
            SpecSource::Git(_) => Err(SettingsError::Invalid(format!(
                "specs `{}` is a git source; this command reads a directory (check the repository out and pass its directory)",
                self.specs_display()
            ))),
        }
    }

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
        builder = set(builder, "specs", flags.specs.clone())
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
            .and_then(|b| set(b, "lease", flags.lease.clone()))
            .and_then(|b| {
                set(
                    b,
                    "lease_duration",
                    flags.lease_duration.map(|d| d.to_string()),
                )
            })
            .and_then(|b| {
                set(
                    b,
                    "lease_renew_deadline",
                    flags.lease_renew_deadline.map(|d| d.to_string()),
                )
            })
            .and_then(|b| {
                set(
                    b,
                    "lease_retry_period",
                    flags.lease_retry_period.map(|d| d.to_string()),
                )
            })
            .and_then(|b| set(b, "lease_holder", flags.lease_holder.clone()))
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
        self.spec_source()?;
        if self.secrets_refresh_interval.get() < std::time::Duration::from_secs(1) {
            return Err(SettingsError::Invalid(
                "secrets_refresh_interval must be at least 1s".into(),
            ));
        }
        if self.template_version_ttl.get() < std::time::Duration::from_secs(1) {
            return Err(SettingsError::Invalid(
                "template_version_ttl must be at least 1s".into(),
            ));
        }
        if self.target_group_check_interval.get() < std::time::Duration::from_secs(1) {
            return Err(SettingsError::Invalid(
                "target_group_check_interval must be at least 1s".into(),
            ));
        }
        if self.git.git_poll_interval.get() < std::time::Duration::from_secs(1) {
            return Err(SettingsError::Invalid(
                "git_poll_interval must be at least 1s".into(),
            ));
        }
        self.lease.backend()?;
        self.lease
            .timing()
            .check()
            .map_err(SettingsError::Invalid)?;
        if let Some(h) = &self.lease.lease_holder {
            let ok = !h.is_empty() && h.len() <= 256 && h.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(SettingsError::Invalid(format!(
                    "lease holder `{h}` must be 1-256 printable characters without spaces"
                )));
            }
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
        assert_eq!(s.target_group_check_interval.get().as_secs(), 30);
    }

    #[test]
    fn the_target_group_check_interval_is_read_and_a_sub_second_one_refused() {
        let s = Settings::load_with_env(
            None,
            env(&[("HANGAR_TARGET_GROUP_CHECK_INTERVAL", "2s")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(s.target_group_check_interval.get().as_secs(), 2);
        let err = Settings::load_with_env(
            None,
            env(&[("HANGAR_TARGET_GROUP_CHECK_INTERVAL", "100ms")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("target_group_check_interval"),
            "{err}"
        );
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
        assert_eq!(s.specs, "/flag/specs");
        assert_eq!(s.owner, "from-env");
        assert_eq!(s.concurrency, 3);
        assert_eq!(s.listen.to_string(), "127.0.0.1:9999");
    }

    #[test]
    fn a_git_source_and_its_settings_are_read_and_a_bad_source_refused() {
        let flags = Overrides {
            specs: Some("git+ssh://git@h/infra.git//clusters?ref=prod".into()),
            ..Overrides::default()
        };
        let e = env(&[
            ("HANGAR_GIT_POLL_INTERVAL", "5m"),
            ("HANGAR_GIT_KNOWN_HOSTS", "/etc/hangar/known_hosts"),
            ("HANGAR_SECRETS_REFRESH_INTERVAL", "10s"),
            ("HANGAR_TEMPLATE_VERSION_TTL", "5s"),
        ]);
        let s = Settings::load_with_env(None, e, &flags).unwrap();
        assert_eq!(s.template_version_ttl.get().as_secs(), 5);
        match s.spec_source().unwrap() {
            SpecSource::Git(g) => {
                assert_eq!((g.dir.as_str(), g.reference.as_str()), ("clusters", "prod"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.git.git_poll_interval.get().as_secs(), 300);
        assert_eq!(
            s.git.git_known_hosts.as_deref(),
            Some(Path::new("/etc/hangar/known_hosts"))
        );
        assert_eq!(s.secrets_refresh_interval.get().as_secs(), 10);
        let offline = s.specs_dir().unwrap_err().to_string();
        assert!(offline.contains("is a git source"), "{offline}");

        let bad = Overrides {
            specs: Some("git+ftp://h/r.git".into()),
            ..Overrides::default()
        };
        let e = Settings::load_with_env(None, env(&[]), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("transport `ftp`"), "{e}");
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
    fn the_lease_defaults_to_flock_with_client_go_timing_and_can_be_set_anywhere() {
        let s = Settings::load_with_env(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(s.lease.backend().unwrap(), LeaseBackend::Flock);
        let t = s.lease.timing();
        assert_eq!(
            (t.lease, t.renew_deadline, t.retry),
            (
                std::time::Duration::from_secs(15),
                std::time::Duration::from_secs(10),
                std::time::Duration::from_secs(2)
            )
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hangar.toml");
        std::fs::write(
            &file,
            "lease = \"dynamodb:from-file\"\nlease_duration = \"30s\"\nlease_renew_deadline = \"20s\"\n",
        )
        .unwrap();
        let s = Settings::load_with_env(
            Some(&file),
            env(&[
                ("HANGAR_LEASE_RETRY_PERIOD", "3s"),
                ("HANGAR_LEASE_HOLDER", "host-a"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            s.lease.backend().unwrap(),
            LeaseBackend::DynamoDb {
                table: "from-file".into()
            }
        );
        assert_eq!(s.lease.timing().lease, std::time::Duration::from_secs(30));
        assert_eq!(s.lease.timing().retry, std::time::Duration::from_secs(3));
        assert_eq!(s.lease.holder(), "host-a");
        let flags = Overrides {
            lease: Some("dynamodb:hangar-lease".into()),
            lease_duration: Some("4s".parse().unwrap()),
            lease_renew_deadline: Some("3s".parse().unwrap()),
            lease_retry_period: Some("500ms".parse().unwrap()),
            ..Overrides::default()
        };
        let s = Settings::load_with_env(Some(&file), env(&[]), &flags).unwrap();
        assert_eq!(s.lease.lease, "dynamodb:hangar-lease");
        assert_eq!(
            s.lease.timing().retry,
            std::time::Duration::from_millis(500)
        );
        let random = s.lease.holder();
        assert!(random.contains(&std::process::id().to_string()), "{random}");
        assert_ne!(random, s.lease.holder(), "a fresh holder per call");
    }

    #[test]
    fn bad_lease_settings_are_refused_with_the_reason() {
        for (key, value, want) in [
            (
                "HANGAR_LEASE",
                "etcd:x",
                "expected `flock` or `dynamodb:TABLE`",
            ),
            ("HANGAR_LEASE", "dynamodb:a b", "table name"),
            ("HANGAR_LEASE_RENEW_DEADLINE", "20s", "renew deadline"),
            ("HANGAR_LEASE_RETRY_PERIOD", "12s", "retry period"),
            ("HANGAR_LEASE_DURATION", "soon", "invalid duration"),
        ] {
            let err = Settings::load_with_env(None, env(&[(key, value)]), &Overrides::default())
                .unwrap_err();
            assert!(err.to_string().contains(want), "{key}={value}: {err}");
        }
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
