//! A real browser for the status page: headless Chromium driven over
//! WebDriver (`chromedriver`, Debian's `chromium-driver`), and Chromium's
//! own `--screenshot` for the picture. Both started with the flags this
//! machine's closed network needs and a fresh profile; every process is
//! stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The flags every Chromium here runs with (no network of its own: no
/// QUIC, no component or sync traffic, no first-run work).
pub fn chromium_flags(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a session.
    pub fn start(window: (u32, u32)) -> Browser {
        let port = super::operator::free_port().port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (infra/local/setup installs chromium-driver)");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
            rt,
            _profile: profile,
        };
        // Ready when /status answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if b.call("GET", "/status", None).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut args = chromium_flags(b._profile.path());
        args.push(format!("--window-size={},{}", window.0, window.1));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let answer = b.call("POST", "/session", Some(caps)).expect("new session");
        b.session = answer["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url),
        };
        let req = req
            .header("content-type", "application/json")
            .body(body.unwrap_or(json!({})).to_string())
            .timeout(Duration::from_secs(60));
        self.rt.block_on(async move {
            let resp = req.send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
            if status.is_success() {
                Ok(v["value"].clone())
            } else {
                Err(format!("{status}: {text}"))
            }
        })
    }

    pub fn goto(&self, url: &str) {
        self.call(
            "POST",
            &format!("/session/{}/url", self.session),
            Some(json!({ "url": url })),
        )
        .expect("navigate");
    }

    /// Runs `script` (a function body) in the page; its return value.
    pub fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(json!({ "script": script, "args": [] })),
        )
        .expect("execute script")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// `chromium --headless --screenshot=OUT URL`, waited for with a deadline.
pub fn screenshot(url: &str, out: &Path, window: (u32, u32)) -> PathBuf {
    let profile = tempfile::tempdir().expect("profile dir");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).expect("artifact dir");
    }
    let _ = std::fs::remove_file(out);
    let mut child = Command::new("/usr/bin/chromium")
        .args(chromium_flags(profile.path()))
        .arg(format!("--window-size={},{}", window.0, window.1))
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium (infra/local/setup installs it)");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium --screenshot did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out.to_path_buf()
}
