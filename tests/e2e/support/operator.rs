//! The `hangar` binary under test, run as a child process the way it runs
//! in production (`hangar run`), so killing it is a real crash.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hangar::runtime::status::ClusterStatus;

pub struct OperatorProcess {
    child: Child,
    pub listen: SocketAddr,
}

/// A free loopback port (bind, read, release).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

impl OperatorProcess {
    pub fn start(
        specs: &Path,
        state: &Path,
        owner: &str,
        env: &[(String, String)],
        log: &Path,
        listen: SocketAddr,
    ) -> OperatorProcess {
        OperatorProcess::start_with(specs, state, owner, env, log, listen, &[])
    }

    /// [`start`](Self::start) with more `hangar run` arguments (a lease).
    pub fn start_with(
        specs: &Path,
        state: &Path,
        owner: &str,
        env: &[(String, String)],
        log: &Path,
        listen: SocketAddr,
        args: &[String],
    ) -> OperatorProcess {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("operator log");
        let err = out.try_clone().expect("log handle");
        let child = Command::new(hangar_bin())
            .arg("run")
            .arg("--specs")
            .arg(specs)
            .arg("--state-dir")
            .arg(state)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--owner")
            .arg(owner)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HANGAR_LOG", "info,hangar=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn hangar run");
        OperatorProcess { child, listen }
    }

    /// `kill -9`: no chance to reach a safe point.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns its status.
    pub fn stop(mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    pub fn get(&self, path: &str) -> Option<String> {
        let url = format!("http://{}{path}", self.listen);
        let out = ureq_get(&url)?;
        Some(out)
    }

    /// POSTs `body` with `headers`; the answer's status code and body.
    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&self.listen, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.listen,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    }

    pub fn status(&self, cluster: &str) -> Option<ClusterStatus> {
        serde_json::from_str(&self.get(&format!("/api/v1/clusters/{cluster}"))?).ok()
    }

    pub fn metrics(&self) -> Option<String> {
        self.get("/metrics")
    }

    pub fn problems(&self) -> Option<Vec<hangar::runtime::http::ProblemView>> {
        serde_json::from_str(&self.get("/api/v1/problems")?).ok()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking GET on loopback, without pulling an HTTP client crate into
/// the tests: the status API is plain HTTP/1.1.
fn ureq_get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&host.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // axum answers small bodies with Content-Length, not chunked.
    Some(body.to_string())
}

pub fn log_tail(log: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The operator log's lines that contain any of `words` (for a failure
/// message about, say, launches across crashes).
pub fn log_lines(log: &PathBuf, words: &[&str]) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| words.iter().any(|w| l.contains(w)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `hangar` binary under test: the one cargo built with this test,
/// or `HANGAR_E2E_BIN` (a copy, so a long run is not disturbed by the
/// next build).
pub fn hangar_bin() -> std::path::PathBuf {
    std::env::var_os("HANGAR_E2E_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_hangar").into())
}
