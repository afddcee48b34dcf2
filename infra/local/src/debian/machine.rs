//! One `debian` node: a Debian 12 machine booted by `systemd-nspawn`.
//!
//! State directory (`<nodes_dir>/<instance id>/`):
//!
//! ```text
//! upper/ work/    the overlayfs upper and work dirs: the instance's disk.
//!                 Kept across stop/start and reboot, deleted at terminate.
//! root/           the overlay mount (lower = the cached image), nspawn's -D
//! machine.info    PIDs and names while it runs (for `down` and adoption)
//! console.log     what the machine printed on its console, every boot
//! ```
//!
//! [`Machine::start`] mounts the overlay, writes the per-instance
//! "user-data" into it (hostname, `/etc/hosts`, the deploy user's
//! `authorized_keys`, the apt proxy), creates the node's network namespace
//! and boots `systemd-nspawn --boot --register=no --keep-unit
//! --network-namespace-path=…` (with `/proc/sys/net` writable: the node's
//! own network sysctls); it returns once sshd answers on the
//! instance's IP. The image has no SSH host keys: the machine generates its
//! own at first boot and keeps them on its disk.
//!
//! [`Machine::stop`] powers the machine off (SIGRTMIN+4 to its init:
//! systemd stops its units) and, if it is still up after
//! [`POWEROFF_GRACE`], kills its init — which kills every process in its
//! PID namespace — and nspawn, by PID. Then the overlay is unmounted and
//! the namespace deleted; the disk stays. [`Machine::destroy`] also deletes
//! the disk. A reboot (RebootInstances, or `reboot` inside) ends the nspawn
//! process (exit 133); the host manager then boots it again on the same disk.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::image::Image;
use super::net::{Bridge, NodeNet};
use super::{io_err, DebianError, Result};
use crate::procfs::{pin_namespace, process_start};
use crate::slot::BridgedVpc;

pub const NSPAWN: &str = "/usr/bin/systemd-nspawn";

/// How long systemd inside gets to stop its units before the machine is killed.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(20);

/// After SIGKILL, how long until every process must be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The image's default user (uid/gid 1000, passwordless sudo).
pub const DEPLOY_USER: &str = "deploy";
const DEPLOY_UID: u32 = 1000;

/// What a machine is started with.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub instance_id: String,
    pub ip: Ipv4Addr,
    pub vpc: BridgedVpc,
    pub image: Image,
    /// `<nodes_dir>/<instance id>`; its `upper/` is the instance's disk.
    pub state_dir: PathBuf,
    /// OpenSSH public key lines the `deploy` user accepts.
    pub authorized_keys: Vec<String>,
    /// Written to the machine's apt configuration (`Acquire::http::Proxy`).
    pub apt_proxy: Option<SocketAddr>,
    pub boot_timeout: Duration,
}

/// A running machine. Dropping an owned handle stops it (the disk stays).
#[derive(Debug)]
pub struct Machine {
    name: String,
    ip: Ipv4Addr,
    state_dir: PathBuf,
    net: NodeNet,
    nspawn_pid: u32,
    /// Start time of nspawn, for the same reason as `leader_start`.
    nspawn_start: u64,
    leader_pid: u32,
    /// `/proc/PID/stat` start time of the leader: a recycled PID is not it.
    leader_start: u64,
    /// `pid:[inode]`: every process of the machine shows it.
    pid_namespace: String,
    /// Keeps `pid_namespace`'s number from being reused while this handle
    /// lives (see [`crate::procfs::pin_namespace`]).
    _pin: Option<std::fs::File>,
    /// nspawn, when this process started it (so it can be reaped).
    child: Mutex<Option<Child>>,
    exit: Mutex<Option<ExitStatus>>,
    owned: bool,
}

impl Machine {
    /// Boots a machine for the instance and waits until sshd answers on its IP.
    pub fn start(config: MachineConfig, bridge: &Bridge) -> Result<Machine> {
        super::check_prerequisites()?;
        let dir = &config.state_dir;
        for path in [dir, &config.image.path] {
            let s = path.to_string_lossy();
            if s.contains([',', ':', '\n']) || !path.is_absolute() {
                return Err(DebianError::Refused {
                    what: format!("use {s:?} in an overlay mount (absolute, no `,` or `:`)"),
                });
            }
        }
        let net = NodeNet::for_instance(config.vpc, &config.instance_id, config.ip)?;
        for sub in ["upper", "work", "root"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", dir.display())))?;
        let root = dir.join("root");
        // A leftover mount (a crashed run) is ours: it is this instance's path.
        if is_mount_point(&root) {
            unmount(&root)?;
        }
        mount_overlay(&config.image.path, dir, &root)?;
        let booted = write_user_data(&root, &config)
            .and_then(|()| net.create(bridge))
            .and_then(|()| spawn(&config, &net, &root));
        let mut machine = match booted {
            Ok(m) => m,
            Err(e) => {
                let _ = net.remove();
                let _ = unmount(&root);
                return Err(e);
            }
        };
        machine.write_info()?;
        if let Err(e) = machine.wait_ssh(config.boot_timeout) {
            let _ = machine.stop();
            return Err(e);
        }
        Ok(machine)
    }

    /// Re-attaches to a machine started by another process (a previous
    /// daemon, for adoption or `down`). The handle owns the machine.
    pub fn attach(state_dir: impl Into<PathBuf>) -> Result<Machine> {
        let state_dir = state_dir.into();
        let info = read_info(&state_dir)?;
        let get = |key: &str| {
            info.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| DebianError::BadState {
                    path: state_dir.join("machine.info"),
                    reason: format!("missing {key}"),
                })
        };
        let bad = |what: &str| DebianError::BadState {
            path: state_dir.join("machine.info"),
            reason: format!("bad {what}"),
        };
        let ip: Ipv4Addr = get("ip")?.parse().map_err(|_| bad("ip"))?;
        let mut machine = Machine {
            name: get("name")?,
            ip,
            net: NodeNet {
                netns: get("netns")?,
                veth: get("veth")?,
                ip,
            },
            nspawn_pid: get("nspawn_pid")?.parse().map_err(|_| bad("nspawn_pid"))?,
            nspawn_start: get("nspawn_start")?
                .parse()
                .map_err(|_| bad("nspawn_start"))?,
            leader_pid: get("leader_pid")?.parse().map_err(|_| bad("leader_pid"))?,
            leader_start: get("leader_start")?
                .parse()
                .map_err(|_| bad("leader_start"))?,
            pid_namespace: get("pid_namespace")?,
            _pin: None,
            state_dir,
            child: Mutex::new(None),
            exit: Mutex::new(None),
            owned: true,
        };
        machine._pin = pin_namespace(machine.leader_pid, "pid", &machine.pid_namespace);
        Ok(machine)
    }

    /// A handle that never stops the machine (for looking and `exec`).
    pub fn observe(state_dir: impl Into<PathBuf>) -> Result<Machine> {
        let mut m = Self::attach(state_dir)?;
        m.owned = false;
        Ok(m)
    }

    /// Whether `state_dir` records a machine (rather than a `lite` node).
    pub fn is_machine_dir(state_dir: &Path) -> bool {
        state_dir.join("machine.info").is_file() || state_dir.join("upper").is_dir()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The overlay mount: the machine's `/` as the host sees it.
    pub fn root(&self) -> PathBuf {
        self.state_dir.join("root")
    }

    pub fn net(&self) -> &NodeNet {
        &self.net
    }

    pub fn nspawn_pid(&self) -> u32 {
        self.nspawn_pid
    }

    /// The machine's init (systemd, PID 1 inside): `nsenter -t` target.
    pub fn leader_pid(&self) -> u32 {
        self.leader_pid
    }

    /// `pid:[inode]` of the machine's PID namespace.
    pub fn pid_namespace(&self) -> &str {
        &self.pid_namespace
    }

    /// Whether the machine still runs: its init is the one we booted and
    /// nspawn has not exited (a reboot or poweroff inside ends it).
    pub fn is_running(&self) -> bool {
        if let Ok(mut child) = self.child.lock() {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    if let Ok(mut exit) = self.exit.lock() {
                        *exit = Some(status);
                    }
                    *child = None;
                    return false;
                }
            }
        }
        process_start(self.leader_pid) == Some(self.leader_start)
            && process_start(self.nspawn_pid) == Some(self.nspawn_start)
    }

    /// nspawn's exit status once it ended, if this process started it
    /// (133: the machine rebooted).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit.lock().ok().and_then(|e| *e)
    }

    /// Every process of the machine (its PID namespace), init included.
    pub fn pids(&self) -> Vec<u32> {
        pids_in_pid_namespace(&self.pid_namespace)
    }

    /// Proportional set size of all its processes, in KiB: what the node
    /// costs in memory (shared pages counted once across machines).
    pub fn memory_kib(&self) -> u64 {
        self.pids().into_iter().map(pss_kib).sum()
    }

    /// Runs `sh -c cmd` as root inside the machine (all its namespaces,
    /// its root). The process belongs to the machine until it exits.
    pub fn exec(&self, cmd: &str) -> Result<Output> {
        if !self.is_running() {
            return Err(DebianError::BadState {
                path: self.state_dir.clone(),
                reason: format!("machine {} is not running", self.name),
            });
        }
        Command::new("/usr/bin/nsenter")
            .arg("-t")
            .arg(self.leader_pid.to_string())
            .args(["-m", "-u", "-i", "-n", "-p", "-r", "-w", "--"])
            .args(["/bin/sh", "-c", cmd])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("running nsenter"))
    }

    /// [`exec`](Self::exec), failing on a non-zero exit; returns stdout.
    pub fn exec_ok(&self, cmd: &str) -> Result<String> {
        let out = self.exec(cmd)?;
        if !out.status.success() {
            return Err(DebianError::Command {
                command: format!("{cmd} (inside {})", self.name),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The ed25519 host key the machine generated at its first boot, read
    /// from its own disk (`/etc/ssh/ssh_host_ed25519_key.pub` in its upper layer).
    pub fn host_public_key(&self) -> Result<String> {
        host_public_key(&self.state_dir)
    }

    /// A `known_hosts` line for the machine.
    pub fn known_hosts_line(&self) -> Result<String> {
        let key = self.host_public_key()?;
        let mut parts = key.split_whitespace();
        let (algo, blob) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        Ok(format!("{} {algo} {blob}", self.ip))
    }

    /// The last `lines` of its console (boot messages, for failures).
    pub fn console(&self, lines: usize) -> String {
        tail(&self.state_dir.join("console.log"), lines)
    }

    /// Asks systemd inside to reboot (SIGINT: ctrl-alt-del). nspawn then
    /// exits; the host manager boots the machine again.
    pub fn reboot(&self) -> Result<()> {
        self.signal_leader(libc::SIGINT)
    }

    fn signal_leader(&self, signal: i32) -> Result<()> {
        if process_start(self.leader_pid) != Some(self.leader_start) {
            return Ok(());
        }
        // SAFETY: kill(2) on the pid we recorded, checked by start time.
        if unsafe { libc::kill(self.leader_pid as i32, signal) } != 0 {
            return Err(DebianError::Io {
                context: format!(
                    "signal {signal} to machine {} (pid {})",
                    self.name, self.leader_pid
                ),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Powers the machine off (gracefully, then by SIGKILL), unmounts its
    /// root and deletes its network namespace. Its disk stays.
    pub fn stop(&mut self) -> Result<()> {
        self.owned = false;
        if self.is_running() {
            // SIGRTMIN+4: systemd's "poweroff".
            self.signal_leader(libc::SIGRTMIN() + 4)?;
            if !self.wait_gone(POWEROFF_GRACE) {
                tracing::warn!(machine = %self.name, "did not power off within {POWEROFF_GRACE:?}: killing it");
            }
        }
        self.kill()?;
        let root = self.root();
        if is_mount_point(&root) {
            unmount(&root)?;
        }
        self.net.remove()?;
        let _ = fs::remove_file(self.state_dir.join("machine.info"));
        Ok(())
    }

    /// Stops the machine and deletes its disk (TerminateInstances).
    pub fn destroy(mut self) -> Result<()> {
        self.stop()?;
        remove_state(&self.state_dir)
    }

    /// Leaves the machine running when this handle drops.
    pub fn detach(mut self) -> PathBuf {
        self.owned = false;
        self.state_dir.clone()
    }

    /// Whether nspawn and every machine process are gone within `timeout`.
    fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let nspawn_gone = !self.is_running() && self.nspawn_exited();
            if nspawn_gone && self.pids().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn nspawn_exited(&self) -> bool {
        if let Ok(mut child) = self.child.lock() {
            if let Some(c) = child.as_mut() {
                return match c.try_wait() {
                    Ok(Some(status)) => {
                        if let Ok(mut exit) = self.exit.lock() {
                            *exit = Some(status);
                        }
                        *child = None;
                        true
                    }
                    Ok(None) => false,
                    Err(_) => true,
                };
            }
        }
        // Not our child: gone (or a zombie of some other parent) by /proc.
        process_start(self.nspawn_pid) != Some(self.nspawn_start)
    }

    /// SIGKILL to the machine's init (the kernel then kills its whole PID
    /// namespace) and to nspawn, by PID; waits until all are gone.
    fn kill(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let mut pids = self.pids();
            if !self.nspawn_exited() {
                pids.push(self.nspawn_pid);
            }
            if pids.is_empty() {
                return Ok(());
            }
            if started.elapsed() > KILL_TIMEOUT {
                return Err(DebianError::StopTimeout {
                    name: self.name.clone(),
                    pids,
                    waited: started.elapsed(),
                });
            }
            if process_start(self.leader_pid) == Some(self.leader_start) {
                // SAFETY: kill(2) on the recorded init, checked by start time.
                unsafe { libc::kill(self.leader_pid as i32, libc::SIGKILL) };
            }
            for pid in pids {
                // SAFETY: each pid was just seen in the machine's PID
                // namespace, or is the nspawn we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_ssh(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let addr = SocketAddr::from((self.ip, 22));
        loop {
            if !self.is_running() {
                return Err(self.not_ready(
                    started,
                    format!("nspawn exited ({:?}) while booting", self.exit_status()),
                ));
            }
            if ssh_banner(addr).is_some() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(self.not_ready(started, "sshd does not answer on port 22".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn not_ready(&self, started: Instant, reason: String) -> DebianError {
        DebianError::NotReady {
            name: self.name.clone(),
            ip: self.ip,
            waited: started.elapsed(),
            reason,
            console: self.console(30),
        }
    }

    fn write_info(&self) -> Result<()> {
        let text = format!(
            "name={}\nip={}\nnetns={}\nveth={}\nnspawn_pid={}\nnspawn_start={}\nleader_pid={}\nleader_start={}\npid_namespace={}\n",
            self.name,
            self.ip,
            self.net.netns,
            self.net.veth,
            self.nspawn_pid,
            self.nspawn_start,
            self.leader_pid,
            self.leader_start,
            self.pid_namespace
        );
        let path = self.state_dir.join("machine.info");
        let tmp = self.state_dir.join(".machine.info.tmp");
        fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &path).map_err(io_err(format!("writing {}", path.display())))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.stop() {
                eprintln!("hangar-local: stopping machine {}: {e}", self.name);
            }
        }
    }
}

/// Reads the machine's host key from its disk (also when it is stopped).
pub fn host_public_key(state_dir: &Path) -> Result<String> {
    let path = state_dir.join("upper/etc/ssh/ssh_host_ed25519_key.pub");
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(io_err(format!("reading {}", path.display())))
}

/// `SSH-2.0-…` from `addr`, if sshd answers within a second.
fn ssh_banner(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).ok()?;
    let banner = String::from_utf8_lossy(&buf[..n]).into_owned();
    banner.starts_with("SSH-").then_some(banner)
}

fn spawn(config: &MachineConfig, net: &NodeNet, root: &Path) -> Result<Machine> {
    let console_path = config.state_dir.join("console.log");
    let mut console = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&console_path)
        .map_err(io_err(format!("opening {}", console_path.display())))?;
    let _ = writeln!(
        console,
        "--- hangar-local: booting {} ---",
        config.instance_id
    );
    let console_err = console
        .try_clone()
        .map_err(io_err(format!("opening {}", console_path.display())))?;
    let mut cmd = Command::new(NSPAWN);
    cmd.args(["--boot", "--register=no", "--keep-unit"])
        .arg(format!("--network-namespace-path={}", net.path().display()))
        .arg(format!("--directory={}", root.display()))
        .arg(format!("--machine={}", net.netns))
        .args([
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--console=read-only",
            // Its routes stay what the host set: nothing beyond the bridge.
            "--drop-capability=CAP_NET_ADMIN",
            // SIGTERM to nspawn powers the machine off rather than halting it.
            "--kill-signal=SIGRTMIN+4",
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        // /proc/sys/net writable, as it is with nspawn's own private
        // network (with `--network-namespace-path` nspawn 252 leaves it
        // read-only): the node's per-namespace sysctls (somaxconn,
        // tcp_max_syn_backlog) are its own to tune, as on a VM. The rest of
        // /proc/sys is the host kernel's and stays read-only, and without
        // CAP_NET_ADMIN the ones that could route (ip_forward) are refused.
        .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console_err);
    // SAFETY: setsid(2) is async-signal-safe; own session, so a Ctrl-C in
    // the terminal of a test or of `cloud up` never reaches the machine.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err("starting systemd-nspawn"))?;
    let nspawn_pid = child.id();
    let nspawn_start = process_start(nspawn_pid).unwrap_or(0);
    // The machine's init: nspawn's child that is PID 1 of a new namespace.
    let started = Instant::now();
    let leader = loop {
        if let Some(pid) = init_child_of(nspawn_pid) {
            if let (Some(start), Some(ns)) = (process_start(pid), pid_namespace_of(pid)) {
                break Some((pid, start, ns));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DebianError::NotReady {
                name: config.instance_id.clone(),
                ip: config.ip,
                waited: started.elapsed(),
                reason: format!("systemd-nspawn exited ({status})"),
                console: tail(&console_path, 30),
            });
        }
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let Some((leader_pid, leader_start, pid_namespace)) = leader else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(DebianError::NotReady {
            name: config.instance_id.clone(),
            ip: config.ip,
            waited: started.elapsed(),
            reason: "systemd-nspawn started no init".into(),
            console: tail(&console_path, 30),
        });
    };
    Ok(Machine {
        name: config.instance_id.clone(),
        ip: config.ip,
        state_dir: config.state_dir.clone(),
        net: net.clone(),
        nspawn_pid,
        nspawn_start,
        leader_pid,
        leader_start,
        _pin: pin_namespace(leader_pid, "pid", &pid_namespace),
        pid_namespace,
        child: Mutex::new(Some(child)),
        exit: Mutex::new(None),
        owned: true,
    })
}

/// nspawn's child that is PID 1 in its own PID namespace.
fn init_child_of(pid: u32) -> Option<u32> {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|&c| {
            fs::read_to_string(format!("/proc/{c}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .map(|ids| ids.split_whitespace().last() == Some("1"))
                })
                .unwrap_or(false)
        })
}

/// The per-instance files a cloud's user-data would write, put on the disk
/// before boot. Every path is checked for symlinks first: the tree is the
/// machine's, and a link planted inside must never make the host write
/// outside it.
fn write_user_data(root: &Path, config: &MachineConfig) -> Result<()> {
    let o = config.ip.octets();
    let hostname = format!("ip-{}-{}-{}-{}", o[0], o[1], o[2], o[3]);
    write_in_tree(root, "etc/hostname", &format!("{hostname}\n"), 0o644, None)?;
    write_in_tree(
        root,
        "etc/hosts",
        &format!("127.0.0.1\tlocalhost\n{}\t{hostname}\n", config.ip),
        0o644,
        None,
    )?;
    write_in_tree(
        root,
        "etc/hangar-instance",
        &format!(
            "instance_id={}\nprivate_ip={}\nimage={}\n",
            config.instance_id,
            config.ip,
            config.image.name()
        ),
        0o644,
        None,
    )?;
    let proxy = match config.apt_proxy {
        Some(addr) => format!(
            "// Written by hangar-local: the VPC reaches the archive only through the host.\n\
             Acquire::http::Proxy \"http://{addr}/\";\nAcquire::https::Proxy \"DIRECT\";\n"
        ),
        None => "// Written by hangar-local: no apt proxy in this cloud.\n".into(),
    };
    write_in_tree(
        root,
        "etc/apt/apt.conf.d/00hangar-proxy",
        &proxy,
        0o644,
        None,
    )?;
    let keys: String = config
        .authorized_keys
        .iter()
        .map(|k| format!("{}\n", k.trim()))
        .collect();
    let ssh_dir = format!("home/{DEPLOY_USER}/.ssh");
    ensure_dir_in_tree(root, &ssh_dir, 0o700, Some(DEPLOY_UID))?;
    write_in_tree(
        root,
        &format!("{ssh_dir}/authorized_keys"),
        &keys,
        0o600,
        Some(DEPLOY_UID),
    )
}

/// `root/rel`, refusing any symlink or `..` on the way.
fn checked_path(root: &Path, rel: &str) -> Result<PathBuf> {
    let mut path = root.to_path_buf();
    for component in Path::new(rel).components() {
        let Component::Normal(part) = component else {
            return Err(DebianError::Refused {
                what: format!("write {rel:?} (not a plain relative path)"),
            });
        };
        path.push(part);
        if let Ok(meta) = fs::symlink_metadata(&path) {
            if meta.file_type().is_symlink() {
                return Err(DebianError::Refused {
                    what: format!("write through symlink {}", path.display()),
                });
            }
        }
    }
    Ok(path)
}

fn ensure_dir_in_tree(root: &Path, rel: &str, mode: u32, owner: Option<u32>) -> Result<()> {
    let path = checked_path(root, rel)?;
    fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(&path, Some(uid), Some(uid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

fn write_in_tree(
    root: &Path,
    rel: &str,
    content: &str,
    mode: u32,
    owner: Option<u32>,
) -> Result<()> {
    let path = checked_path(root, rel)?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.write_all(content.as_bytes())
        .map_err(io_err(format!("writing {}", path.display())))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(&path, Some(uid), Some(uid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

fn mount_overlay(lower: &Path, dir: &Path, target: &Path) -> Result<()> {
    use std::ffi::CString;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        dir.join("upper").display(),
        dir.join("work").display()
    );
    let c = |s: &str| {
        CString::new(s).map_err(|_| DebianError::Refused {
            what: format!("mount with a NUL in {s:?}"),
        })
    };
    let source = c("hangar-machine")?;
    let fstype = c("overlay")?;
    let target_c = c(&target.to_string_lossy())?;
    let data_c = c(&data)?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(DebianError::Io {
            context: format!("mounting overlay {data} on {}", target.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Unmounts `target`, retrying while it is busy (processes of a killed
/// machine are still exiting), then lazily as a last resort.
pub fn unmount(target: &Path) -> Result<()> {
    use std::ffi::CString;
    let c =
        CString::new(target.to_string_lossy().as_bytes()).map_err(|_| DebianError::Refused {
            what: format!("unmount {}", target.display()),
        })?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: umount2(2) with a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) if !is_mount_point(target) => return Ok(()),
            Some(libc::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(libc::EBUSY) => {
                tracing::warn!(mount = %target.display(), "still busy after 5 s: detaching it");
                // SAFETY: as above.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                    return Ok(());
                }
                return Err(DebianError::Io {
                    context: format!("unmounting {}", target.display()),
                    source: std::io::Error::last_os_error(),
                });
            }
            _ => {
                return Err(DebianError::Io {
                    context: format!("unmounting {}", target.display()),
                    source: err,
                })
            }
        }
    }
}

/// Mount points in this process's mount namespace.
fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub fn is_mount_point(path: &Path) -> bool {
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mount_points().contains(&want)
}

/// Every mount point strictly under `dir` (deepest last).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut found: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m != &dir && m.starts_with(&dir))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// Removes a machine's state directory, refusing while anything is
/// mounted under it (never delete through a live overlay).
pub fn remove_state(dir: &Path) -> Result<()> {
    let mounted = mounts_under(dir);
    if !mounted.is_empty() {
        return Err(DebianError::Refused {
            what: format!("delete {} while {mounted:?} is mounted", dir.display()),
        });
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DebianError::Io {
            context: format!("removing {}", dir.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Processes whose command line or root directory lies under `dir`: the
/// nspawn processes of a cloud's machines and everything inside them (a
/// machine's processes have its overlay as their root), its apt proxy.
pub fn pids_naming(dir: &Path) -> Vec<u32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            let root_inside = fs::read_link(format!("/proc/{pid}/root"))
                .map(|r| r.starts_with(&dir))
                .unwrap_or(false);
            // By command line only our own daemons: a test's other children
            // (hangar with `--specs <state dir>/…`) are not ours to kill.
            let daemon = fs::read_link(format!("/proc/{pid}/exe"))
                .map(|exe| {
                    exe == Path::new(NSPAWN) || exe == Path::new(super::apt_proxy::APT_CACHER_NG)
                })
                .unwrap_or(false);
            root_inside
                || daemon
                    && fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|c| {
                            c.split(|&b| b == 0)
                                .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
                        })
                        .unwrap_or(false)
        })
        .collect();
    pids.sort_unstable();
    pids
}

fn pid_namespace_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Every PID whose PID namespace is `namespace` (`pid:[inode]`).
pub fn pids_in_pid_namespace(namespace: &str) -> Vec<u32> {
    let own = pid_namespace_of(std::process::id());
    if own.as_deref() == Some(namespace) || !namespace.starts_with("pid:[") {
        // Never the host's own namespace.
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid_namespace_of(pid).as_deref() == Some(namespace))
        .collect();
    pids.sort_unstable();
    pids
}

pub(crate) fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Pss:")
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
        })
        .unwrap_or(0)
}

fn read_info(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join("machine.info");
    let text = fs::read_to_string(&path).map_err(|e| DebianError::BadState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_never_follows_a_symlink_out_of_the_tree() {
        let dir = std::env::temp_dir().join(format!("hangar-machine-test-{}", std::process::id()));
        let root = dir.join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        let outside = dir.join("outside");
        fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/hostname")).unwrap();
        assert!(matches!(
            write_in_tree(&root, "etc/hostname", "evil\n", 0o644, None),
            Err(DebianError::Refused { .. })
        ));
        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
        std::os::unix::fs::symlink(&dir, root.join("home")).unwrap();
        assert!(write_in_tree(&root, "home/x/.ssh/authorized_keys", "k", 0o600, None).is_err());
        assert!(checked_path(&root, "../etc/passwd").is_err());
        write_in_tree(&root, "etc/hosts", "127.0.0.1 localhost\n", 0o644, None).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
