//! The VPC's way to the Debian archive: `apt-cacher-ng` on the bridge
//! address, started by the cloud and stopped by PID.
//!
//! It runs with a config of its own (not `/etc/apt-cacher-ng`, whose
//! backends remap requests to mirrors this machine may not reach): it
//! fetches exactly the URL a node's apt asks for, from deb.debian.org. Its
//! cache, `/var/cache/hangar-local/apt-cacher-ng/`, outlives the cloud so a
//! second run's `apt-get update` is answered locally; two apt-cacher-ng
//! processes must never share one cache, so the directory is taken with an
//! `flock` (inherited by the daemon, held as long as it lives) and a cloud
//! that finds it taken uses a private cache in its own state directory.

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{io_err, DebianError, Result};

pub const APT_CACHER_NG: &str = "/usr/sbin/apt-cacher-ng";

/// apt-cacher-ng's usual port.
pub const PORT: u16 = 3142;

/// The shared cache (see the module docs).
pub const SHARED_CACHE: &str = "/var/cache/hangar-local/apt-cacher-ng";

/// A running proxy. Dropping it stops it.
#[derive(Debug)]
pub struct AptProxy {
    addr: SocketAddr,
    dir: PathBuf,
    cache: PathBuf,
    child: Option<Child>,
    _cache_lock: Option<File>,
}

impl AptProxy {
    /// Starts apt-cacher-ng on `addr` (the bridge must hold the address),
    /// with its config, log and pid file in `dir`; waits until it accepts.
    pub fn start(addr: SocketAddr, dir: &Path) -> Result<AptProxy> {
        if !Path::new(APT_CACHER_NG).exists() {
            return Err(DebianError::Prerequisite {
                what: APT_CACHER_NG.into(),
                fix: "apt-get install -y apt-cacher-ng (or `sudo infra/local/setup`)".into(),
            });
        }
        stop_recorded(dir);
        let etc = dir.join("etc");
        let log = dir.join("log");
        for d in [&etc, &log] {
            fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let (cache, lock) = match take_shared_cache() {
            Some(lock) => (PathBuf::from(SHARED_CACHE), Some(lock)),
            None => {
                let private = dir.join("cache");
                tracing::info!(cache = %private.display(), "the shared apt cache is in use by another cloud: using a private one");
                (private, None)
            }
        };
        fs::create_dir_all(&cache).map_err(io_err(format!("creating {}", cache.display())))?;
        let conf = format!(
            "# Written by hangar-local for one cloud's apt proxy.\n\
             CacheDir: {}\nLogDir: {}\nSupportDir: /usr/lib/apt-cacher-ng\n\
             ExThreshold: 30\nReportPage: acng-report.html\n",
            cache.display(),
            log.display()
        );
        let conf_path = etc.join("acng.conf");
        fs::write(&conf_path, conf).map_err(io_err(format!("writing {}", conf_path.display())))?;
        let mut cmd = Command::new(APT_CACHER_NG);
        cmd.arg("-c")
            .arg(&etc)
            .arg("ForeGround=1")
            .arg(format!("BindAddress={}", addr.ip()))
            .arg(format!("Port={}", addr.port()))
            .arg(format!("SocketPath={}", dir.join("socket").display()))
            .arg(format!("PidFile={}", dir.join("pid").display()))
            .stdin(Stdio::null())
            .stdout(log_file(&log.join("stdout.log"))?)
            .stderr(log_file(&log.join("stdout.log"))?);
        let lock_fd = lock.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Own session: no terminal signal reaches it.
                libc::setsid();
                // The daemon holds the shared cache's lock as long as it lives.
                if let Some(fd) = lock_fd {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(io_err("starting apt-cacher-ng"))?;
        let pid_file = dir.join("pid");
        let _ = fs::write(dir.join("proxy.pid"), child.id().to_string());
        let mut proxy = AptProxy {
            addr,
            dir: dir.to_path_buf(),
            cache,
            child: Some(child),
            _cache_lock: lock,
        };
        let started = Instant::now();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(proxy);
            }
            let exited = proxy
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || started.elapsed() > Duration::from_secs(10) {
                let log_text = fs::read_to_string(log.join("stdout.log")).unwrap_or_default();
                let reason = match exited {
                    Some(status) => format!("apt-cacher-ng exited ({status})"),
                    None => format!("not accepting after 10 s (pid file {})", pid_file.display()),
                };
                proxy.stop();
                return Err(DebianError::AptProxy {
                    addr,
                    reason,
                    log: log_text,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where packages are cached.
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// Stops the daemon by PID and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(self.dir.join("proxy.pid"));
    }
}

impl Drop for AptProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(format!("opening {}", path.display())))
}

/// The shared cache's lock, if no other proxy holds it.
fn take_shared_cache() -> Option<File> {
    fs::create_dir_all(SHARED_CACHE).ok()?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(Path::new(SHARED_CACHE).join(".lock"))
        .ok()?;
    // SAFETY: flock(2) on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(file)
}

/// Kills a proxy a crashed run of the same cloud left (recorded PID, checked
/// against its command line naming `dir`).
pub fn stop_recorded(dir: &Path) {
    let Some(pid) = fs::read_to_string(dir.join("proxy.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    let ours = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        .unwrap_or(false);
    if ours {
        // SAFETY: kill(2) on a pid whose command line names our directory.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = fs::remove_file(dir.join("proxy.pid"));
}
