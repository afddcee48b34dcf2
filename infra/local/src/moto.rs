//! The AWS API emulator: `infra/local/moto/server.py` (moto in server mode
//! plus the CloudWatch RPCv2-CBOR adapter) on a free loopback port.
//!
//! [`Moto::start`] waits for the server's `ready http://HOST:PORT` line
//! within a deadline; dropping the handle (or [`Moto::stop`]) stops the
//! process by its PID. The child is also spawned with `PR_SET_PDEATHSIG`
//! from a keeper thread that lives exactly as long as the handle, so a test
//! binary that dies without unwinding (abort, SIGKILL, `static` handles that
//! are never dropped) still takes its moto with it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Overrides the Python interpreter that runs moto (default: the repo's
/// `.venv/bin/python`).
pub const PYTHON_ENV: &str = "HANGAR_LOCAL_PYTHON";

/// How to create the venv moto runs in, for error messages.
pub const VENV_HINT: &str = "python3 -m venv .venv && .venv/bin/pip install -r infra/local/moto/requirements.txt (from the repository root)";

/// How much of moto's stderr is kept to explain a failed start.
const STDERR_TAIL: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("python interpreter {path} not found; create the venv with: {VENV_HINT} (or set {PYTHON_ENV})")]
    PythonMissing { path: PathBuf },
    #[error("moto launcher {path} not found")]
    ServerScriptMissing { path: PathBuf },
    #[error("could not start {python}: {source}")]
    Spawn {
        python: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("moto did not print its ready line within {waited:?}; stderr:\n{stderr}")]
    NotReady { waited: Duration, stderr: String },
    #[error("moto exited before it was ready ({status}); stderr:\n{stderr}")]
    Exited { status: String, stderr: String },
    #[error("moto printed an unexpected ready line: {line:?}")]
    BadReadyLine { line: String },
    #[error("moto API call {what} failed: {message}")]
    Api { what: &'static str, message: String },
}

/// Options for [`Moto::start_with`].
#[derive(Clone, Debug)]
pub struct MotoOptions {
    /// Interpreter; `None` means `$HANGAR_LOCAL_PYTHON`, else `<repo>/.venv/bin/python`.
    pub python: Option<PathBuf>,
    /// How long to wait for the `ready` line (moto's imports are slow on a
    /// loaded machine).
    pub ready_timeout: Duration,
    /// Pass `--verbose` (every request and CBOR translation on stderr).
    pub verbose: bool,
}

impl Default for MotoOptions {
    fn default() -> Self {
        MotoOptions {
            python: None,
            ready_timeout: Duration::from_secs(60),
            verbose: false,
        }
    }
}

/// A running moto server on 127.0.0.1. Stopped (by PID) when dropped.
pub struct Moto {
    endpoint: String,
    addr: SocketAddr,
    pid: u32,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Dropping this tells the keeper thread to stop the child.
    stop_tx: Option<mpsc::Sender<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Moto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moto")
            .field("endpoint", &self.endpoint)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Moto {
    /// Starts moto with default options.
    pub fn start() -> Result<Moto, MotoError> {
        Moto::start_with(MotoOptions::default())
    }

    pub fn start_with(options: MotoOptions) -> Result<Moto, MotoError> {
        let root = crate::repo_root();
        let python = options
            .python
            .clone()
            .or_else(|| std::env::var_os(PYTHON_ENV).map(PathBuf::from))
            .unwrap_or_else(|| root.join(".venv/bin/python"));
        if !python.exists() {
            return Err(MotoError::PythonMissing { path: python });
        }
        let script = root.join("infra/local/moto/server.py");
        if !script.exists() {
            return Err(MotoError::ServerScriptMissing { path: script });
        }

        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .current_dir(&root)
            // Accounts come from the `x-moto-account-id` header or the
            // default; an inherited override would break per-test isolation.
            .env_remove("MOTO_ACCOUNT_ID")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if options.verbose {
            cmd.arg("--verbose");
        }
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }

        let (spawned_tx, spawned_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let keeper = std::thread::Builder::new()
            .name("moto-keeper".into())
            .spawn(move || keep(cmd, spawned_tx, stop_rx))
            .map_err(|source| MotoError::Spawn {
                python: python.clone(),
                source,
            })?;
        let spawned = spawned_rx.recv().unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "moto keeper thread died before spawning",
            ))
        });
        let (pid, stdout, stderr_pipe) = match spawned {
            Ok(parts) => parts,
            Err(source) => {
                let _ = keeper.join();
                return Err(MotoError::Spawn { python, source });
            }
        };

        let stderr = Arc::new(Mutex::new(Vec::new()));
        drain_stderr(stderr_pipe, stderr.clone());
        let lines = read_lines(stdout);

        let mut moto = Moto {
            endpoint: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid,
            stderr,
            stop_tx: Some(stop_tx),
            keeper: Some(keeper),
        };
        let deadline = Instant::now() + options.ready_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    let Some(url) = line.trim().strip_prefix("ready ") else {
                        continue;
                    };
                    let addr = url
                        .strip_prefix("http://")
                        .and_then(|hostport| hostport.to_socket_addrs().ok())
                        .and_then(|mut addrs| addrs.next())
                        .ok_or_else(|| MotoError::BadReadyLine { line: line.clone() })?;
                    moto.endpoint = url.to_string();
                    moto.addr = addr;
                    return Ok(moto);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(MotoError::NotReady {
                        waited: options.ready_timeout,
                        stderr: moto.stderr_tail(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process is exiting. Stop it (and
                    // reap it) first so the status and stderr are complete.
                    moto.shutdown();
                    return Err(MotoError::Exited {
                        status: "stdout closed".into(),
                        stderr: moto.stderr_tail(),
                    });
                }
            }
        }
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL` / SDK endpoint overrides.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Forgets every resource in every account (`POST /moto-api/reset`).
    pub fn reset(&self) -> Result<(), MotoError> {
        let status = post_empty(self.addr, "/moto-api/reset").map_err(|e| MotoError::Api {
            what: "reset",
            message: e.to_string(),
        })?;
        if status != 200 {
            return Err(MotoError::Api {
                what: "reset",
                message: format!("HTTP {status}"),
            });
        }
        Ok(())
    }

    /// Stops the server (SIGTERM, then SIGKILL after a grace period) and
    /// waits for it to exit. Idempotent; `Drop` does the same.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// What moto wrote to stderr lately (for diagnostics).
    pub fn stderr_tail(&self) -> String {
        let buf = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn shutdown(&mut self) {
        drop(self.stop_tx.take());
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.shutdown();
    }
}

type Spawned = (u32, std::process::ChildStdout, std::process::ChildStderr);

/// Owns the child for its whole life: the thread that forked it is the one
/// `PR_SET_PDEATHSIG` watches, so it must not exit before the child does.
fn keep(
    mut cmd: Command,
    spawned: mpsc::Sender<std::io::Result<Spawned>>,
    stop: mpsc::Receiver<()>,
) {
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = spawned.send(Err(e));
            return;
        }
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        terminate(&mut child);
        let _ = spawned.send(Err(std::io::Error::other("child pipes missing")));
        return;
    };
    if spawned.send(Ok((child.id(), stdout, stderr))).is_err() {
        terminate(&mut child);
        return;
    }
    // Returns when the handle sends or is dropped.
    let _ = stop.recv();
    terminate(&mut child);
}

/// SIGTERM by PID, wait up to 5 s for a clean exit, then SIGKILL; always reaps.
fn terminate(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Forwards stdout lines; keeps draining after `ready` so moto never blocks
/// on a full pipe.
fn read_lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    // The receiver is gone after `ready`; keep draining.
                    let _ = tx.send(line.clone());
                }
            }
        }
    });
    rx
}

/// Keeps the last [`STDERR_TAIL`] bytes of stderr.
fn drain_stderr(mut stderr: std::process::ChildStderr, tail: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match stderr.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut buf = tail.lock().unwrap_or_else(|p| p.into_inner());
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > STDERR_TAIL {
                        let cut = buf.len() - STDERR_TAIL;
                        buf.drain(..cut);
                    }
                }
            }
        }
    });
}

/// A bodyless HTTP/1.1 POST; returns the status code.
fn post_empty(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut status_line = String::new();
    BufReader::new(stream).read_line(&mut status_line)?;
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("malformed HTTP status line {status_line:?}")))
}

// A shared per-binary `static` handle needs this.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Moto>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_python_names_the_venv_command() {
        let err = Moto::start_with(MotoOptions {
            python: Some(PathBuf::from("/nonexistent/python")),
            ..MotoOptions::default()
        })
        .expect_err("no interpreter there");
        let msg = err.to_string();
        assert!(matches!(err, MotoError::PythonMissing { .. }), "{msg}");
        assert!(msg.contains("python3 -m venv .venv"), "{msg}");
    }

    #[test]
    fn starts_resets_and_stops_by_pid() {
        let moto = match Moto::start() {
            Err(MotoError::PythonMissing { path }) => {
                eprintln!("skipping: {} missing ({VENV_HINT})", path.display());
                return;
            }
            other => other.expect("moto starts"),
        };
        assert!(moto.endpoint().starts_with("http://127.0.0.1:"));
        moto.reset().expect("reset answers 200");
        let pid = moto.pid();
        assert!(process_alive(pid));
        moto.stop();
        assert!(!process_alive(pid), "moto {pid} still running after stop()");
    }

    fn process_alive(pid: u32) -> bool {
        // A reaped child's /proc entry is gone.
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }
}
