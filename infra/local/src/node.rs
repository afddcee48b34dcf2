//! Real OpenSSH nodes on loopback addresses, each in its own mount and UTS
//! namespace.
//!
//! A node is what an EC2 instance looks like to hangar: an `sshd` listening
//! on the instance's private IP, with its own host key and its own `/srv`,
//! `/tmp`, `/var/tmp`, `/root` and `/run` (tmpfs mounts private to the
//! node), so runbooks and releases written by hangar land in a per-node
//! filesystem while every node shares the host's binaries (`/usr`, `python3`,
//! `tar`, …). The network namespace is the host's: all of 127.0.0.0/8 is
//! local, so a node at `127.77.128.5` needs no `ip addr` setup and services a
//! runbook starts there (an HTTP server on port 80) are reachable from tests.
//!
//! Prerequisites (checked by [`check_prerequisites`], each failure names the
//! fix): root (mount namespaces, port 22), `unshare`/`nsenter`
//! (`apt-get install -y util-linux`), `/usr/sbin/sshd`
//! (`apt-get install -y openssh-server`), `ssh-keygen`/`ssh-keyscan`
//! (`apt-get install -y openssh-client`).
//!
//! Lifecycle: [`Node::start`] runs
//! `unshare --mount --uts --propagation private` with a small script that
//! mounts the private tmpfs's (`/run`, `/tmp`), bind-mounts the node's
//! state directory at [`NODE_DIR`] and its "disk" (`<state_dir>/disk`:
//! `/srv`, `/var/tmp`, `/root`) over the host's, and execs `sshd` in daemon
//! mode. The disk outlives the node: a stopped instance started again
//! (StopInstances, StartInstances) finds its releases where it left them,
//! like an EBS root volume; terminating deletes the state directory. Sessions, and whatever
//! daemons they start, are plain processes in the node's mount namespace;
//! [`Node::stop`] (and `Drop`) kill every process whose `/proc/PID/ns/mnt`
//! is the node's, by PID, until none is left — killing only the listener
//! would leave sessions behind. The namespace id and listener PID are also
//! written to `<state_dir>/node.info`, so a process other than the one that
//! started a node (the local cloud's `down`) can find and kill it:
//! [`Node::attach`], [`kill_node`].
//!
//! Addresses: parallel test processes (nextest runs each test in its own
//! process) take addresses from an [`IpPool`] through flock'ed lock files;
//! a lease is released when its [`IpLease`] drops or its process dies.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::procfs::{pin_namespace, process_start};

/// Where a node's state directory is bind-mounted inside its namespace.
/// The sshd config refers to files there, so the state directory may live
/// anywhere on the host — even under `/tmp`, which the node hides.
pub const NODE_DIR: &str = "/run/hangar-node";

/// Absolute path: sshd refuses to start (and cannot re-exec on SIGHUP) otherwise.
pub const SSHD: &str = "/usr/sbin/sshd";

/// Directories every node has its own of (`/tmp` a fresh tmpfs, the rest
/// on its disk).
pub const PRIVATE_DIRS: [&str; 4] = ["/srv", "/tmp", "/var/tmp", "/root"];

/// How long a node may take to start or to pick up a new host key.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long stopping may take before it is reported as failed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("local nodes need {what}: {fix}")]
    Prerequisite { what: String, fix: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("node {name} ({addr}) not ready after {waited:?}: {reason}\n--- sshd log ---\n{log}")]
    NotReady {
        name: String,
        addr: SocketAddr,
        waited: Duration,
        reason: String,
        log: String,
    },
    #[error("node {name}: processes {pids:?} still alive {waited:?} after SIGKILL")]
    StopTimeout {
        name: String,
        pids: Vec<u32>,
        waited: Duration,
    },
    #[error("refusing to treat {ns} as a node namespace: it is the host's own mount namespace")]
    HostNamespace { ns: String },
    #[error("{path}: not a node state directory ({reason})")]
    BadState { path: PathBuf, reason: String },
    #[error("no free loopback address in {first}+{len}: all are leased (lock files in {dir})")]
    PoolExhausted {
        first: Ipv4Addr,
        len: u32,
        dir: PathBuf,
    },
    #[error("address {ip} is leased by another process (lock file {path})")]
    AddressTaken { ip: Ipv4Addr, path: PathBuf },
}

type Result<T, E = NodeError> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> NodeError {
    let context = context.into();
    move |source| NodeError::Io { context, source }
}

/// Checks what starting a node needs, naming the command that fixes each gap.
pub fn check_prerequisites() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(NodeError::Prerequisite {
            what: "root (mount namespaces, binding port 22)".into(),
            fix: "run as root, e.g. `sudo -E cargo test …`".into(),
        });
    }
    let tools = [
        (SSHD, "apt-get install -y openssh-server"),
        ("/usr/bin/ssh-keygen", "apt-get install -y openssh-client"),
        ("/usr/bin/ssh-keyscan", "apt-get install -y openssh-client"),
        ("/usr/bin/unshare", "apt-get install -y util-linux"),
        ("/usr/bin/nsenter", "apt-get install -y util-linux"),
    ];
    for (path, fix) in tools {
        if !Path::new(path).exists() {
            return Err(NodeError::Prerequisite {
                what: path.into(),
                fix: fix.into(),
            });
        }
    }
    Ok(())
}

/// What a node is started with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Hostname inside the node and the label in errors (`node-1`, an instance id).
    pub name: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// OpenSSH public key lines allowed to log in (as any user, root included).
    pub authorized_keys: Vec<String>,
    /// Host keys, sshd config, log and pid file live here; created if missing.
    /// Reusing a directory keeps the node's host key across restarts, like
    /// a rebooted instance.
    pub state_dir: PathBuf,
    /// The node's app never answers healthy ([`crate::seed::UNHEALTHY_AMI`]):
    /// its sessions get `PYTHONPATH` pointing at a `sitecustomize` that makes
    /// every `http.server` answer 503, so SSH, runbooks and releases work
    /// while the health check never passes — a broken image, not a broken
    /// release or node.
    pub unhealthy_app: bool,
}

impl NodeConfig {
    pub fn new(name: impl Into<String>, ip: Ipv4Addr, state_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            name: name.into(),
            ip,
            port: 22,
            authorized_keys: Vec::new(),
            state_dir: state_dir.into(),
            unhealthy_app: false,
        }
    }

    pub fn unhealthy_app(mut self, unhealthy: bool) -> Self {
        self.unhealthy_app = unhealthy;
        self
    }

    pub fn authorize(mut self, public_key_line: impl Into<String>) -> Self {
        self.authorized_keys.push(public_key_line.into());
        self
    }

    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
}

/// A running node. Dropping it kills every process in it.
#[derive(Debug)]
pub struct Node {
    name: String,
    ip: Ipv4Addr,
    port: u16,
    state_dir: PathBuf,
    /// `mnt:[inode]` as `/proc/PID/ns/mnt` reads.
    namespace: String,
    listener_pid: u32,
    /// An open `/proc/PID/ns/mnt`: keeps the namespace, and so its inode
    /// number, alive while this handle lives. The kernel reuses a freed
    /// namespace's number at once, and a scan by a reused number would
    /// find (and kill) another node's processes.
    _pin: Option<File>,
    /// False once stopped or detached: nothing left to kill on drop.
    owned: bool,
}

impl Node {
    /// Starts sshd in a fresh namespace and waits until it accepts connections.
    pub fn start(config: NodeConfig) -> Result<Node> {
        check_prerequisites()?;
        let dir = &config.state_dir;
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", dir.display())))?;
        let key = dir.join(HOST_KEY);
        if !key.exists() {
            generate_host_key(&key, &config.name)?;
        }
        write_file(
            &dir.join("authorized_keys"),
            &config
                .authorized_keys
                .iter()
                .map(|k| format!("{}\n", k.trim()))
                .collect::<String>(),
            0o600,
        )?;
        let mut sshd = sshd_config(config.ip, config.port);
        if config.unhealthy_app {
            let site = dir.join(UNHEALTHY_SITE);
            fs::create_dir_all(&site).map_err(io_err(format!("creating {}", site.display())))?;
            write_file(
                &site.join("sitecustomize.py"),
                UNHEALTHY_SITECUSTOMIZE,
                0o644,
            )?;
            sshd.push_str(&format!("SetEnv PYTHONPATH={NODE_DIR}/{UNHEALTHY_SITE}\n"));
        }
        write_file(&dir.join("sshd_config"), &sshd, 0o600)?;
        let pid_file = dir.join("sshd.pid");
        let _ = fs::remove_file(&pid_file);

        let started = Instant::now();
        let out = Command::new("/usr/bin/unshare")
            .args(["--mount", "--uts", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", START_SCRIPT])
            .env("HANGAR_NODE_NAME", &config.name)
            .env("HANGAR_NODE_STATE", dir)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("running unshare"))?;
        if !out.status.success() {
            return Err(NodeError::Command {
                command: format!("unshare … sshd (node {})", config.name),
                status: out.status.to_string(),
                stderr: format!(
                    "{}{}{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    read_tail(&dir.join("sshd.log")),
                    if String::from_utf8_lossy(&out.stderr).contains("Operation not permitted") {
                        " (mount namespaces need root with CAP_SYS_ADMIN: run as root, or give \
                         the container --privileged / --cap-add SYS_ADMIN)"
                    } else {
                        ""
                    }
                ),
            });
        }

        let addr = SocketAddr::from((config.ip, config.port));
        let not_ready = |reason: String| NodeError::NotReady {
            name: config.name.clone(),
            addr,
            waited: started.elapsed(),
            reason,
            log: read_tail(&dir.join("sshd.log")),
        };
        // sshd writes its pid file once it listens.
        let listener_pid = wait_for(READY_TIMEOUT, || {
            fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        })
        .ok_or_else(|| not_ready(format!("no pid file {}", pid_file.display())))?;
        let namespace = mount_namespace_of(listener_pid)
            .ok_or_else(|| not_ready(format!("sshd (pid {listener_pid}) exited")))?;
        let pin = pin_namespace(listener_pid, "mnt", &namespace)
            .ok_or_else(|| not_ready(format!("sshd (pid {listener_pid}) exited")))?;
        let mut node = Node {
            name: config.name.clone(),
            ip: config.ip,
            port: config.port,
            state_dir: dir.clone(),
            namespace,
            listener_pid,
            _pin: Some(pin),
            owned: true,
        };
        // Never kill by a namespace that turns out to be the host's.
        ensure_not_host_namespace(&node.namespace)?;
        node.write_info()?;
        if wait_for(READY_TIMEOUT, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .is_none()
        {
            let err = not_ready("port not accepting connections".into());
            let _ = node.stop();
            return Err(err);
        }
        Ok(node)
    }

    /// Re-attaches to a node started elsewhere (by another process) from
    /// its state directory, e.g. to stop it. The returned handle owns the
    /// node: dropping it kills it.
    pub fn attach(state_dir: impl Into<PathBuf>) -> Result<Node> {
        let state_dir = state_dir.into();
        let info = NodeInfo::read(&state_dir)?;
        ensure_not_host_namespace(&info.namespace)?;
        Ok(Node {
            _pin: pin_namespace(info.listener_pid, "mnt", &info.namespace),
            name: info.name,
            ip: info.ip,
            port: info.port,
            state_dir,
            namespace: info.namespace,
            listener_pid: info.listener_pid,
            owned: true,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `mnt:[inode]`: every process showing this in `/proc/PID/ns/mnt` is the node's.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The sshd listener (sessions are its children, but may outlive it).
    pub fn listener_pid(&self) -> u32 {
        self.listener_pid
    }

    /// Every process currently in the node: listener, sessions, daemons.
    pub fn pids(&self) -> Vec<u32> {
        pids_in_namespace(&self.namespace)
    }

    /// The host public key line (`ssh-ed25519 AAAA… name`).
    pub fn host_public_key(&self) -> Result<String> {
        let path = self.state_dir.join(format!("{HOST_KEY}.pub"));
        fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(io_err(format!("reading {}", path.display())))
    }

    /// A `known_hosts` line for this node (`[ip]:port` unless the port is 22).
    pub fn known_hosts_line(&self) -> Result<String> {
        let key = self.host_public_key()?;
        let mut parts = key.split_whitespace();
        let (algo, blob) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let host = if self.port == 22 {
            self.ip.to_string()
        } else {
            format!("[{}]:{}", self.ip, self.port)
        };
        Ok(format!("{host} {algo} {blob}"))
    }

    /// sshd's log (`-E`), for failure messages.
    pub fn sshd_log(&self) -> String {
        fs::read_to_string(self.state_dir.join("sshd.log")).unwrap_or_default()
    }

    /// Runs `sh -c cmd` inside the node's namespaces (its `/srv`, `/tmp`…),
    /// for test assertions. The process is part of the node until it exits.
    pub fn exec_inside(&self, cmd: &str) -> Result<Output> {
        let pid = self.anchor_pid()?;
        Command::new("/usr/bin/nsenter")
            .arg("-t")
            .arg(pid.to_string())
            .args(["-m", "-u", "--", "/bin/sh", "-c", cmd])
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("running nsenter"))
    }

    /// [`exec_inside`](Self::exec_inside), failing on a non-zero exit; returns stdout.
    pub fn exec_inside_ok(&self, cmd: &str) -> Result<String> {
        let out = self.exec_inside(cmd)?;
        if !out.status.success() {
            return Err(NodeError::Command {
                command: format!("{cmd} (inside {})", self.name),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Gives the node a new host key (as a reinstalled instance at the same
    /// address would have) and returns once sshd serves it.
    pub fn replace_host_key(&self) -> Result<String> {
        let key = self.state_dir.join(HOST_KEY);
        let _ = fs::remove_file(&key);
        let _ = fs::remove_file(self.state_dir.join(format!("{HOST_KEY}.pub")));
        generate_host_key(&key, &self.name)?;
        let new_key = self.host_public_key()?;
        let new_blob = new_key.split_whitespace().nth(1).unwrap_or("").to_string();
        // sshd re-execs itself on SIGHUP and re-reads its host keys.
        // SAFETY: plain kill(2) on a pid we recorded.
        if unsafe { libc::kill(self.listener_pid as i32, libc::SIGHUP) } != 0 {
            return Err(NodeError::Io {
                context: format!("SIGHUP to sshd {}", self.listener_pid),
                source: io::Error::last_os_error(),
            });
        }
        let started = Instant::now();
        let served = wait_for(READY_TIMEOUT, || {
            let out = Command::new("/usr/bin/ssh-keyscan")
                .args(["-T", "1", "-t", "ed25519", "-p"])
                .arg(self.port.to_string())
                .arg(self.ip.to_string())
                .stderr(Stdio::null())
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains(&new_blob)
                .then_some(())
        });
        if served.is_none() {
            return Err(NodeError::NotReady {
                name: self.name.clone(),
                addr: self.addr(),
                waited: started.elapsed(),
                reason: "new host key not served".into(),
                log: self.sshd_log(),
            });
        }
        Ok(new_key)
    }

    /// Kills every process in the node (listener, sessions, their daemons)
    /// and waits until none is left; the private mounts go once this
    /// handle, which pins the namespace, is dropped too.
    pub fn stop(&mut self) -> Result<()> {
        self.owned = false;
        kill_namespace(&self.name, &self.namespace)
    }

    /// Leaves the node running after this handle drops (a background local
    /// cloud); stop it later with [`Node::attach`] or [`kill_node`].
    pub fn detach(mut self) -> PathBuf {
        self.owned = false;
        self.state_dir.clone()
    }

    /// A process to `nsenter`: the listener, or any survivor if it died.
    fn anchor_pid(&self) -> Result<u32> {
        if mount_namespace_of(self.listener_pid).as_deref() == Some(self.namespace.as_str()) {
            return Ok(self.listener_pid);
        }
        self.pids()
            .first()
            .copied()
            .ok_or_else(|| NodeError::BadState {
                path: self.state_dir.clone(),
                reason: format!("no process left in node {}", self.name),
            })
    }

    fn write_info(&self) -> Result<()> {
        NodeInfo {
            name: self.name.clone(),
            ip: self.ip,
            port: self.port,
            namespace: self.namespace.clone(),
            listener_pid: self.listener_pid,
        }
        .write(&self.state_dir)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.stop() {
                eprintln!("hangar-local: stopping node {}: {e}", self.name);
            }
        }
    }
}

/// Kills the node recorded in `state_dir` (for `down` in another process).
/// A node that is already gone is not an error.
pub fn kill_node(state_dir: &Path) -> Result<()> {
    let info = NodeInfo::read(state_dir)?;
    // Unpinned (the listener is gone) the scan is by number alone, as it
    // was; a daemon left in the node still keeps that number its own.
    let _pin = pin_namespace(info.listener_pid, "mnt", &info.namespace);
    kill_namespace(&info.name, &info.namespace)
}

/// Every PID whose mount namespace is `namespace` (`mnt:[inode]`), or
/// whose PID namespace is `namespace` (`pid:[inode]`: a `debian` machine).
pub fn pids_in_namespace(namespace: &str) -> Vec<u32> {
    if namespace.starts_with("pid:[") {
        return crate::debian::machine::pids_in_pid_namespace(namespace);
    }
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && mount_namespace_of(pid).as_deref() == Some(namespace))
        .collect();
    pids.sort_unstable();
    pids
}

fn kill_namespace(name: &str, namespace: &str) -> Result<()> {
    ensure_not_host_namespace(namespace)?;
    let started = Instant::now();
    // An exiting process drops its namespace link before its sockets close,
    // so a killed listener can still accept for a moment after it has left
    // the namespace: wait for every killed process to finish as well.
    let mut killed: Vec<(u32, u64)> = Vec::new();
    loop {
        let pids = pids_in_namespace(namespace);
        // Kept while the killed process itself still runs: not gone, not a
        // zombie (its files are closed by then), its pid not reused.
        killed.retain(|&(pid, since)| process_start(pid) == Some(since));
        if pids.is_empty() && killed.is_empty() {
            return Ok(());
        }
        if started.elapsed() > STOP_TIMEOUT {
            let mut left: Vec<u32> = killed.iter().map(|&(pid, _)| pid).collect();
            left.extend(pids);
            left.sort_unstable();
            left.dedup();
            return Err(NodeError::StopTimeout {
                name: name.to_string(),
                pids: left,
                waited: started.elapsed(),
            });
        }
        for pid in pids {
            if let Some(since) = process_start(pid) {
                if !killed.iter().any(|&(p, _)| p == pid) {
                    killed.push((pid, since));
                }
            }
            // SAFETY: kill(2); the pid was just seen in the node's namespace.
            // ESRCH (already gone) is fine.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn ensure_not_host_namespace(namespace: &str) -> Result<()> {
    let own = fs::read_link("/proc/self/ns/mnt")
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let init = mount_namespace_of(1);
    if !namespace.starts_with("mnt:[")
        || own.as_deref() == Some(namespace)
        || init.as_deref() == Some(namespace)
    {
        return Err(NodeError::HostNamespace {
            ns: namespace.to_string(),
        });
    }
    Ok(())
}

fn mount_namespace_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Polls `probe` every few milliseconds until it yields or `timeout` passes.
fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

const HOST_KEY: &str = "ssh_host_ed25519_key";

/// Under the state dir: the `sitecustomize` of a node whose app never
/// answers healthy.
const UNHEALTHY_SITE: &str = "unhealthy-site";

/// Python imports `sitecustomize` from `PYTHONPATH` before Debian's own;
/// this one turns every status an `http.server` handler sends into a 503.
const UNHEALTHY_SITECUSTOMIZE: &str =
    "# hangar-local UNHEALTHY_AMI: every HTTP server here answers 503.
import http.server

_send_response = http.server.BaseHTTPRequestHandler.send_response


def _unhealthy(self, code, message=None):
    _send_response(self, 503, 'unhealthy image')


http.server.BaseHTTPRequestHandler.send_response = _unhealthy
";

/// Runs inside the fresh namespaces: private mounts, then sshd (daemon mode;
/// `unshare` returns once it has forked).
const START_SCRIPT: &str = r#"set -e
hostname "$HANGAR_NODE_NAME"
mount -t tmpfs -o mode=0755 hangar-node-run /run
mkdir -p /run/sshd /run/hangar-node
mount --bind "$HANGAR_NODE_STATE" /run/hangar-node
mkdir -p /tmp
mount -t tmpfs -o mode=0755 hangar-node /tmp
for d in srv var-tmp root; do
  mkdir -p "/run/hangar-node/disk/$d"
done
chmod 0755 /run/hangar-node/disk/srv
mkdir -p /srv /var/tmp /root
mount --bind /run/hangar-node/disk/srv /srv
mount --bind /run/hangar-node/disk/var-tmp /var/tmp
mount --bind /run/hangar-node/disk/root /root
chmod 1777 /tmp /var/tmp
chmod 0700 /root
cd /
exec /usr/sbin/sshd -f /run/hangar-node/sshd_config -E /run/hangar-node/sshd.log
"#;

fn sshd_config(ip: Ipv4Addr, port: u16) -> String {
    format!(
        "# Written by hangar-local; paths are inside the node's namespace.
ListenAddress {ip}:{port}
HostKey {NODE_DIR}/{HOST_KEY}
AuthorizedKeysFile {NODE_DIR}/authorized_keys
PidFile {NODE_DIR}/sshd.pid
# Keys live in a test's state dir, which may be group-writable.
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
# A benchmark opens many sessions at once.
MaxStartups 200
MaxSessions 200
LogLevel INFO
Subsystem sftp internal-sftp
"
    )
}

fn generate_host_key(path: &Path, name: &str) -> Result<()> {
    run_checked(
        Command::new("/usr/bin/ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C"])
            .arg(format!("hangar-node-{name}"))
            .arg("-f")
            .arg(path),
    )
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {cmd:?}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NodeError::Command {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.write_all(content.as_bytes())
        .map_err(io_err(format!("writing {}", path.display())))
}

fn read_tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// What `node.info` records, so another process can find the node.
struct NodeInfo {
    name: String,
    ip: Ipv4Addr,
    port: u16,
    namespace: String,
    listener_pid: u32,
}

impl NodeInfo {
    fn write(&self, dir: &Path) -> Result<()> {
        write_file(
            &dir.join("node.info"),
            &format!(
                "name={}\nip={}\nport={}\nnamespace={}\nlistener_pid={}\n",
                self.name, self.ip, self.port, self.namespace, self.listener_pid
            ),
            0o600,
        )
    }

    fn read(dir: &Path) -> Result<NodeInfo> {
        let path = dir.join("node.info");
        let bad = |reason: String| NodeError::BadState {
            path: path.clone(),
            reason,
        };
        let text = fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| bad(format!("missing {key}")))
        };
        Ok(NodeInfo {
            name: get("name")?,
            ip: get("ip")?.parse().map_err(|_| bad("bad ip".into()))?,
            port: get("port")?.parse().map_err(|_| bad("bad port".into()))?,
            namespace: get("namespace")?,
            listener_pid: get("listener_pid")?
                .parse()
                .map_err(|_| bad("bad listener_pid".into()))?,
        })
    }
}

/// A client key pair for logging in to nodes.
#[derive(Clone, Debug)]
pub struct ClientKey {
    pub private_key: PathBuf,
    /// The OpenSSH public key line, for [`NodeConfig::authorize`].
    pub public_key: String,
}

impl ClientKey {
    /// Generates `<dir>/<name>` (ed25519, no passphrase) and its `.pub`.
    pub fn generate(dir: &Path, name: &str) -> Result<ClientKey> {
        Self::generate_kind(dir, name, &["-t", "ed25519"])
    }

    /// An RSA (3072-bit) key, for testing RSA authentication.
    pub fn generate_rsa(dir: &Path, name: &str) -> Result<ClientKey> {
        Self::generate_kind(dir, name, &["-t", "rsa", "-b", "3072"])
    }

    fn generate_kind(dir: &Path, name: &str, kind: &[&str]) -> Result<ClientKey> {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let private_key = dir.join(name);
        let _ = fs::remove_file(&private_key);
        let _ = fs::remove_file(dir.join(format!("{name}.pub")));
        run_checked(
            Command::new("/usr/bin/ssh-keygen")
                .arg("-q")
                .args(kind)
                .args(["-N", "", "-C", name, "-f"])
                .arg(&private_key),
        )?;
        let pub_path = dir.join(format!("{name}.pub"));
        let public_key = fs::read_to_string(&pub_path)
            .map_err(io_err(format!("reading {}", pub_path.display())))?
            .trim()
            .to_string();
        Ok(ClientKey {
            private_key,
            public_key,
        })
    }
}

/// A range of loopback addresses handed out to concurrent processes.
#[derive(Clone, Debug)]
pub struct IpPool {
    pub first: Ipv4Addr,
    pub len: u32,
    /// Lock files (`<ip>.lock`) live here; shared by every user of any pool,
    /// so an exact [`IpPool::claim`] also sees leases taken from a range.
    pub lock_dir: PathBuf,
}

/// The default lock directory for every pool on this host.
pub const LEASE_DIR: &str = "/tmp/hangar-local-leases";

impl IpPool {
    /// Addresses for tests: `127.77.128.1`–`127.77.255.254`. The local
    /// cloud's VPC subnets stay below `127.77.128.0` so both never meet.
    pub fn tests() -> IpPool {
        IpPool {
            first: Ipv4Addr::new(127, 77, 128, 1),
            len: 128 * 256 - 2,
            lock_dir: PathBuf::from(LEASE_DIR),
        }
    }

    /// Leases a free address: not locked by anyone and nothing listening on
    /// `probe_ports` there (a leftover of a killed run keeps its address out).
    pub fn acquire(&self, probe_ports: &[u16]) -> Result<IpLease> {
        fs::create_dir_all(&self.lock_dir)
            .map_err(io_err(format!("creating {}", self.lock_dir.display())))?;
        // Start at a pid-dependent offset so parallel processes rarely contend.
        let start = std::process::id() % self.len.max(1);
        for i in 0..self.len {
            let offset = (start + i) % self.len;
            let ip = Ipv4Addr::from(u32::from(self.first) + offset);
            let last = ip.octets()[3];
            if last == 0 || last == 255 {
                continue;
            }
            if let Some(lease) = self.try_lock(ip)? {
                if probe_ports.iter().all(|&p| port_is_free(ip, p)) {
                    return Ok(lease);
                }
            }
        }
        Err(NodeError::PoolExhausted {
            first: self.first,
            len: self.len,
            dir: self.lock_dir.clone(),
        })
    }

    /// Leases exactly `ip` (the local cloud: an instance's private IP).
    pub fn claim(&self, ip: Ipv4Addr) -> Result<IpLease> {
        fs::create_dir_all(&self.lock_dir)
            .map_err(io_err(format!("creating {}", self.lock_dir.display())))?;
        self.try_lock(ip)?.ok_or_else(|| NodeError::AddressTaken {
            ip,
            path: self.lock_path(ip),
        })
    }

    fn lock_path(&self, ip: Ipv4Addr) -> PathBuf {
        self.lock_dir.join(format!("{ip}.lock"))
    }

    fn try_lock(&self, ip: Ipv4Addr) -> Result<Option<IpLease>> {
        let path = self.lock_path(ip);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // SAFETY: flock(2) on a descriptor we own; released on close or exit.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            Ok(Some(IpLease { ip, _lock: file }))
        } else {
            Ok(None)
        }
    }
}

fn port_is_free(ip: Ipv4Addr, port: u16) -> bool {
    TcpListener::bind((ip, port)).is_ok()
}

/// An address held for as long as this value (or its process) lives.
#[derive(Debug)]
pub struct IpLease {
    ip: Ipv4Addr,
    _lock: File,
}

impl IpLease {
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// A node together with its address lease and scratch directory: what a
/// test usually wants. Dropping it stops the node, then frees the address.
#[derive(Debug)]
pub struct TestNode {
    pub node: Node,
    _lease: IpLease,
}

impl TestNode {
    /// Starts a node on a leased address with state under `dir/<name>`.
    pub fn start(dir: &Path, name: &str, authorized_keys: &[&str]) -> Result<TestNode> {
        let lease = IpPool::tests().acquire(&[22, 80])?;
        let mut config = NodeConfig::new(name, lease.ip(), dir.join(name));
        for k in authorized_keys {
            config = config.authorize(*k);
        }
        let node = Node::start(config)?;
        Ok(TestNode {
            node,
            _lease: lease,
        })
    }
}

impl std::ops::Deref for TestNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl std::ops::DerefMut for TestNode {
    fn deref_mut(&mut self) -> &mut Node {
        &mut self.node
    }
}

/// Distinct namespaces of a set of nodes (for assertions that nodes are isolated).
pub fn distinct_namespaces<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> usize {
    nodes
        .into_iter()
        .map(|n| n.namespace().to_string())
        .collect::<BTreeSet<_>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unhealthy_site_hook_takes_over_every_http_server() {
        let dir = std::env::temp_dir().join(format!("hangar-unhealthy-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("sitecustomize.py"), UNHEALTHY_SITECUSTOMIZE).unwrap();
        let out = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import http.server; print(http.server.BaseHTTPRequestHandler.send_response.__name__)",
            ])
            .env("PYTHONPATH", &dir)
            .output()
            .unwrap();
        let _ = fs::remove_dir_all(&dir);
        // A broken hook only prints "Error in sitecustomize" and goes on.
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "_unhealthy");
    }

    #[test]
    fn sshd_config_listens_only_on_the_node_address() {
        let c = sshd_config(Ipv4Addr::new(127, 77, 130, 4), 2222);
        assert!(c.contains("ListenAddress 127.77.130.4:2222\n"));
        assert!(!c.contains("0.0.0.0"));
        assert!(c.contains(&format!("HostKey {NODE_DIR}/")));
    }

    #[test]
    fn host_namespace_is_never_a_node() {
        let own = fs::read_link("/proc/self/ns/mnt").unwrap();
        let own = own.to_string_lossy();
        assert!(matches!(
            ensure_not_host_namespace(&own),
            Err(NodeError::HostNamespace { .. })
        ));
        assert!(ensure_not_host_namespace("garbage").is_err());
    }

    #[test]
    fn a_lease_excludes_other_holders_until_dropped() {
        let dir = std::env::temp_dir().join(format!("hangar-lease-test-{}", std::process::id()));
        let pool = IpPool {
            first: Ipv4Addr::new(127, 77, 250, 1),
            len: 2,
            lock_dir: dir.clone(),
        };
        let a = pool.acquire(&[]).unwrap();
        let b = pool.acquire(&[]).unwrap();
        assert_ne!(a.ip(), b.ip());
        assert!(matches!(
            pool.acquire(&[]),
            Err(NodeError::PoolExhausted { .. })
        ));
        assert!(matches!(
            pool.claim(a.ip()),
            Err(NodeError::AddressTaken { .. })
        ));
        let ip = a.ip();
        drop(a);
        // Freed at once, unless a process another test thread is spawning
        // right now inherited the descriptor between fork and exec (it goes
        // with the exec): wait for that, bounded.
        let deadline = Instant::now() + Duration::from_secs(5);
        let again = loop {
            match pool.claim(ip) {
                Err(NodeError::AddressTaken { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => break other,
            }
        };
        assert_eq!(again.unwrap().ip(), ip);
        let _ = fs::remove_dir_all(dir);
    }

    /// Real nodes: isolated filesystems, sessions' daemons die with the node.
    #[test]
    fn nodes_are_isolated_and_stop_leaves_no_process() {
        let dir = std::env::temp_dir().join(format!("hangar-node-test-{}", std::process::id()));
        let started = Instant::now();
        let mut nodes: Vec<TestNode> = (0..5)
            .map(|i| TestNode::start(&dir, &format!("n{i}"), &[]).unwrap())
            .collect();
        eprintln!("5 nodes started in {:?}", started.elapsed());
        assert_eq!(distinct_namespaces(nodes.iter().map(|n| &n.node)), 5);
        nodes[0].exec_inside_ok("echo zero > /srv/who").unwrap();
        let other = nodes[1].exec_inside("cat /srv/who").unwrap();
        assert!(!other.status.success(), "/srv leaked between nodes");
        assert_eq!(nodes[0].exec_inside_ok("cat /srv/who").unwrap(), "zero\n");
        assert_eq!(nodes[2].exec_inside_ok("hostname").unwrap(), "n2\n");
        assert!(!Path::new("/srv/who").exists(), "/srv leaked to the host");
        // A daemon started inside outlives its starter; stop must still kill it.
        nodes[0]
            .exec_inside_ok("setsid sleep 600 </dev/null >/dev/null 2>&1 &")
            .unwrap();
        assert!(nodes[0].pids().len() >= 2);
        let ns = nodes[0].namespace().to_string();
        nodes[0].stop().unwrap();
        assert!(pids_in_namespace(&ns).is_empty());
        assert!(TcpStream::connect_timeout(&nodes[0].addr(), Duration::from_millis(200)).is_err());
        // attach + kill_node from the recorded state (what `down` does).
        let state = nodes[1].state_dir().to_path_buf();
        let ns1 = nodes[1].namespace().to_string();
        kill_node(&state).unwrap();
        assert!(pids_in_namespace(&ns1).is_empty());
        drop(nodes);
        let _ = fs::remove_dir_all(dir);
    }

    /// A stopped node's address refuses connections the moment `stop`
    /// returns: an exiting process loses its namespace link before its
    /// sockets close, so "no process in the namespace" alone is not enough.
    #[test]
    fn stop_returns_only_after_the_listener_is_closed() {
        let dir = std::env::temp_dir().join(format!("hangar-node-closed-{}", std::process::id()));
        for round in 0..40 {
            let mut node = TestNode::start(&dir, &format!("c{round}"), &[]).unwrap();
            node.stop().unwrap();
            assert!(
                TcpStream::connect_timeout(&node.addr(), Duration::from_millis(200)).is_err(),
                "round {round}: {} still accepts after stop",
                node.addr()
            );
        }
        let _ = fs::remove_dir_all(dir);
    }

    /// Stop then start (what StopInstances/StartInstances do to a lite
    /// node): no sshd in between, then the same host key and the same
    /// files under `/srv`, `/var/tmp`, `/root`; `/tmp` starts empty.
    #[test]
    fn a_stopped_node_started_again_keeps_its_disk() {
        let dir = std::env::temp_dir().join(format!("hangar-node-disk-{}", std::process::id()));
        let mut node = TestNode::start(&dir, "d0", &[]).unwrap();
        node.exec_inside_ok(
            "mkdir -p /srv/app/releases/v1 && echo v1 > /srv/app/releases/v1/id \
             && echo kept > /var/tmp/k && echo home > /root/h && echo gone > /tmp/t",
        )
        .unwrap();
        let key = node.host_public_key().unwrap();
        let addr = node.addr();
        node.stop().unwrap();
        assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
        let again = Node::start(NodeConfig::new("d0", node.ip(), dir.join("d0"))).unwrap();
        assert_eq!(again.host_public_key().unwrap(), key);
        assert_eq!(
            again
                .exec_inside_ok("cat /srv/app/releases/v1/id /var/tmp/k /root/h")
                .unwrap(),
            "v1\nkept\nhome\n"
        );
        assert!(!again.exec_inside("cat /tmp/t").unwrap().status.success());
        assert!(
            !Path::new("/srv/app/releases/v1").exists(),
            "/srv leaked to the host"
        );
        drop(again);
        drop(node);
        let _ = fs::remove_dir_all(dir);
    }
}
