//! `debian` nodes: real Debian 12 machines (systemd as PID 1, sshd, apt)
//! booted with `systemd-nspawn`, each with its own network namespace.
//!
//! `lite` nodes ([`crate::node`]) are sshd processes sharing the host's
//! binaries and network — fast, and enough for most of hangar's behaviour.
//! A `debian` node is what a runbook really meets on EC2: packages to
//! install, units to enable, a port 80 of its own, a disk that survives a
//! stop. The parts:
//!
//! - [`image`]: the base images, built once by `infra/local/images/build`
//!   (debootstrap) and cached by recipe hash under
//!   `/var/cache/hangar-local/images/`;
//! - [`machine`]: one node — an overlayfs root over the image (the
//!   instance's "EBS volume": kept across stop/start, deleted at
//!   terminate), per-instance "user-data" written before boot, nspawn
//!   started and stopped by PID;
//! - [`net`]: the cloud's bridge on the host (the VPC's gateway address)
//!   and a network namespace + veth pair per node, with addresses from the
//!   slot's [`crate::slot::BridgedVpc`] (198.18.0.0/15, never routed);
//! - [`apt_proxy`]: `apt-cacher-ng` on the bridge address, the only way
//!   out of the VPC (like a private subnet's proxy);
//! - [`harness`]: what tests need on top of [`crate::LocalCloud`].

pub mod apt_proxy;
pub mod harness;
pub mod image;
pub mod machine;
pub mod net;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use image::{Image, ImageVariant};
pub use machine::{Machine, MachineConfig};

use crate::slot::BridgedVpc;

/// Which kind of node a cloud's instances become.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum NodeKind {
    /// sshd in a mount namespace on the host (see [`crate::node`]).
    #[default]
    Lite,
    /// A systemd-nspawn Debian 12 machine from `image`.
    Debian { image: ImageVariant },
}

impl NodeKind {
    pub fn is_debian(self) -> bool {
        matches!(self, NodeKind::Debian { .. })
    }

    pub fn name(self) -> &'static str {
        match self {
            NodeKind::Lite => "lite",
            NodeKind::Debian { .. } => "debian",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error("debian nodes need {what}: {fix}")]
    Prerequisite { what: String, fix: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("image `{variant}`: {message}")]
    Image { variant: String, message: String },
    #[error("machine {name} ({ip}) not reachable over SSH after {waited:?}: {reason}\n--- console (last lines) ---\n{console}")]
    NotReady {
        name: String,
        ip: std::net::Ipv4Addr,
        waited: Duration,
        reason: String,
        console: String,
    },
    #[error("machine {name}: processes {pids:?} still alive {waited:?} after SIGKILL")]
    StopTimeout {
        name: String,
        pids: Vec<u32>,
        waited: Duration,
    },
    #[error("{path}: not a machine state directory ({reason})")]
    BadState { path: PathBuf, reason: String },
    #[error("refusing to {what}")]
    Refused { what: String },
    #[error("apt proxy on {addr}: {reason}\n--- log ---\n{log}")]
    AptProxy {
        addr: SocketAddr,
        reason: String,
        log: String,
    },
}

pub type Result<T, E = DebianError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DebianError {
    let context = context.into();
    move |source| DebianError::Io { context, source }
}

/// What the host manager needs to run a cloud's `debian` nodes.
#[derive(Clone, Debug)]
pub struct DebianOptions {
    pub image: Image,
    pub vpc: BridgedVpc,
    /// Cloud-level state (the apt proxy's config, log and pid file).
    pub state_dir: PathBuf,
    /// Boot to SSH; ~2 s on an idle machine, far more when ten boot at once
    /// on two cores.
    pub boot_timeout: Duration,
    /// Run `apt-cacher-ng` on the bridge (off: nodes reach no archive).
    pub apt_proxy: bool,
}

impl DebianOptions {
    pub fn new(image: Image, vpc: BridgedVpc, state_dir: impl Into<PathBuf>) -> DebianOptions {
        DebianOptions {
            image,
            vpc,
            state_dir: state_dir.into(),
            boot_timeout: Duration::from_secs(90),
            apt_proxy: true,
        }
    }

    /// Where nodes find the apt proxy: the bridge address, port 3142.
    pub fn apt_proxy_addr(&self) -> SocketAddr {
        SocketAddr::from((self.vpc.gateway(), apt_proxy::PORT))
    }
}

/// Checks the host tools `debian` nodes need, naming the fix.
pub fn check_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(DebianError::Prerequisite {
            what: "root (network namespaces, overlay mounts, systemd-nspawn)".into(),
            fix: "run as root".into(),
        });
    }
    let tools = [
        (machine::NSPAWN, "apt-get install -y systemd-container"),
        (net::IP, "apt-get install -y iproute2"),
        ("/usr/bin/nsenter", "apt-get install -y util-linux"),
        ("/usr/sbin/debootstrap", "apt-get install -y debootstrap"),
    ];
    for (path, fix) in tools {
        if !std::path::Path::new(path).exists() {
            return Err(DebianError::Prerequisite {
                what: path.into(),
                fix: format!("{fix} (or `sudo infra/local/setup`)"),
            });
        }
    }
    Ok(())
}

/// Runs a command, failing with its stderr on a non-zero exit.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {cmd:?}")))?;
    if !out.status.success() {
        return Err(DebianError::Command {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a cloud's `debian` nodes left behind on this host: the test for
/// "down leaves nothing" and what [`sweep`] removes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leftovers {
    /// `hangar-s<n>-…` in `ip netns list`.
    pub netns: Vec<String>,
    /// The bridge and `hg<n>-…` veths in `ip link`.
    pub links: Vec<String>,
    /// Mount points under the cloud's state directory.
    pub mounts: Vec<PathBuf>,
    /// Processes (nspawn, machines' inits, the apt proxy) whose command
    /// line names the cloud's state directory.
    pub pids: Vec<u32>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty()
            && self.links.is_empty()
            && self.mounts.is_empty()
            && self.pids.is_empty()
    }
}

/// Everything of slot `vpc` (and under `state_dir`) that is still there.
pub fn leftovers(vpc: BridgedVpc, state_dir: &std::path::Path) -> Leftovers {
    let prefix = vpc.netns_prefix();
    let veth = vpc.veth_prefix();
    let bridge = vpc.bridge_name();
    Leftovers {
        netns: net::netns_names()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect(),
        links: net::link_names()
            .into_iter()
            .filter(|l| *l == bridge || l.starts_with(&veth))
            .collect(),
        mounts: machine::mounts_under(state_dir),
        pids: machine::pids_naming(state_dir),
    }
}

/// Removes what [`leftovers`] finds: processes by PID (machines powered
/// off hard), mounts, namespaces, links — all by their exact names. For a
/// crashed run's leftovers and `cloud down`; returns what it found.
pub fn sweep(vpc: BridgedVpc, state_dir: &std::path::Path) -> Result<Leftovers> {
    // Processes and mounts are found *under* this directory: `/` or `/tmp`
    // would be everything.
    let canonical = state_dir
        .canonicalize()
        .unwrap_or_else(|_| state_dir.to_path_buf());
    if !canonical.is_absolute() || canonical.components().count() < 3 {
        return Err(DebianError::Refused {
            what: format!(
                "sweep {} (a cloud's state directory is at least two levels below /)",
                state_dir.display()
            ),
        });
    }
    let found = leftovers(vpc, state_dir);
    if found.is_empty() {
        return Ok(found);
    }
    for &pid in &found.pids {
        // SAFETY: kill(2) on a pid whose command line names our state dir.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !machine::pids_naming(state_dir).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for mount in machine::mounts_under(state_dir).iter().rev() {
        machine::unmount(mount)?;
    }
    for ns in &found.netns {
        net::delete_netns(ns)?;
    }
    for link in net::link_names() {
        if link.starts_with(&vpc.veth_prefix()) || link == vpc.bridge_name() {
            net::delete_link(&link)?;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_refuses_directories_that_would_match_the_whole_host() {
        let vpc = crate::slot::Slot::new(63).unwrap().bridged();
        for dir in ["/", "/tmp", "relative/dir"] {
            assert!(
                matches!(
                    sweep(vpc, std::path::Path::new(dir)),
                    Err(DebianError::Refused { .. })
                ),
                "{dir} accepted"
            );
        }
    }
}
