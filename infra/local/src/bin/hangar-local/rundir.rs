//! The run directory (`infra/local/run/` by default): everything a running
//! stack writes, so `status`/`down` in another shell can find it.
//!
//! ```text
//! run/
//!   env                 export lines for `source`
//!   specs/cluster.yaml  a ready-to-use spec
//!   id_ed25519(.pub)    the key every node accepts
//!   stack.json          slot, endpoints, PIDs, seeded resource ids
//!   status.json         the daemon's view, rewritten every second
//!   moto.pid            written by moto's launcher
//!   nodes/<id>/         node state (host key, sshd config and log)
//!   logs/               moto.log, moto.out, serve.log (kept by `down`)
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use hangar_local::lb::HealthCheckOptions;
use hangar_local::seed::Seeded;
use hangar_local::services::Snapshot;
use serde::{Deserialize, Serialize};

pub fn default_root() -> PathBuf {
    hangar_local::repo_root().join("infra/local/run")
}

pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> Result<RunDir> {
        // Absolute: the env file and spec hand these paths to other programs.
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .context("reading the current directory")?
                .join(root)
        };
        Ok(RunDir { root })
    }

    pub fn env(&self) -> PathBuf {
        self.root.join("env")
    }
    pub fn specs(&self) -> PathBuf {
        self.root.join("specs")
    }
    pub fn spec(&self) -> PathBuf {
        self.specs().join("cluster.yaml")
    }
    pub fn stack(&self) -> PathBuf {
        self.root.join("stack.json")
    }
    pub fn status(&self) -> PathBuf {
        self.root.join("status.json")
    }
    pub fn moto_pid(&self) -> PathBuf {
        self.root.join("moto.pid")
    }
    pub fn nodes(&self) -> PathBuf {
        self.root.join("nodes")
    }
    /// Cloud-level state of `debian` nodes (the apt proxy).
    pub fn debian(&self) -> PathBuf {
        self.root.join("debian")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn moto_log(&self) -> PathBuf {
        self.logs().join("moto.log")
    }
    pub fn moto_out(&self) -> PathBuf {
        self.logs().join("moto.out")
    }
    pub fn serve_log(&self) -> PathBuf {
        self.logs().join("serve.log")
    }

    pub fn read_stack(&self) -> Result<Option<Stack>> {
        read_json(&self.stack())
    }

    /// The daemon's and moto's PIDs from `stack.json`, even one an older
    /// or newer `hangar-local` wrote (so `down` always works).
    pub fn stack_pids(&self) -> (Option<u32>, Option<u32>) {
        let value: Option<serde_json::Value> = read_json(&self.stack()).ok().flatten();
        let pid = |key: &str| {
            value
                .as_ref()
                .and_then(|v| v.get(key))
                .and_then(|p| p.as_u64())
                .and_then(|p| u32::try_from(p).ok())
        };
        (pid("serve_pid"), pid("moto_pid"))
    }

    pub fn write_stack(&self, stack: &Stack) -> Result<()> {
        write_json(&self.stack(), stack)
    }

    pub fn read_status(&self) -> Result<Option<DaemonStatus>> {
        read_json(&self.status())
    }

    /// Removes everything but the logs.
    pub fn clean(&self) -> Result<()> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == self.logs() {
                continue;
            }
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }
}

/// What `up` started; read by `status`, `down` and the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stack {
    pub slot: u8,
    /// moto itself.
    pub endpoint: String,
    /// The AWS gateway in front of it (`AWS_ENDPOINT_URL`), run by the daemon.
    pub aws_endpoint: String,
    pub region: String,
    pub moto_pid: u32,
    pub serve_pid: Option<u32>,
    pub lb_url: String,
    pub key: PathBuf,
    pub public_key: String,
    pub seeded: Seeded,
    pub metrics_interval: Duration,
    pub health: HealthCheckOptions,
    pub host_poll: Duration,
    pub target_poll: Duration,
    pub started: SystemTime,
    /// The AWS behaviours the gateway emulates (absent in an older stack.json: AWS's).
    #[serde(default)]
    pub semantics: hangar_local::gateway::Semantics,
    /// `lite` or `debian` (with its image); absent in older stack files.
    #[serde(default)]
    pub nodes: hangar_local::NodeKind,
    /// The app of release v1 and the spec: `static` or `php`.
    #[serde(default = "static_app")]
    pub app: String,
}

fn static_app() -> String {
    "static".into()
}

/// `status.json`: the daemon's PID and its services' snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub snapshot: Snapshot,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Atomic write (temp file + rename): readers never see half a file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value)?;
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Whether `pid` is a live (not zombie) process whose command line
/// contains `needle` — never trust a PID file alone, PIDs get reused.
pub fn alive(pid: u32, needle: &str) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S …`: the state follows the last `)`.
    let zombie = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        .unwrap_or(true);
    if zombie {
        return false;
    }
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
        })
        .unwrap_or(false)
}

/// SIGTERM, wait up to `grace`, then SIGKILL; returns whether it was running.
pub fn stop_pid(pid: u32, needle: &str, grace: Duration) -> bool {
    if !alive(pid, needle) {
        return false;
    }
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) on a PID we just verified is ours (command line).
    unsafe { libc::kill(raw, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !alive(pid, needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid, needle) {
        // SAFETY: as above.
        unsafe { libc::kill(raw, libc::SIGKILL) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(pid, needle) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    true
}

/// The last `n` lines of a log, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
