//! The nodes' health endpoint for the probe measurement: one HTTP server on
//! 127.0.0.1 answering `GET /health` with 200 for every node, in a child
//! process so its CPU is not charged to the operator. `GET /count` says how
//! many health requests it answered.

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::routing::get;
use axum::Router;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The child process; killed when dropped.
pub struct HealthServer {
    child: Child,
    pub port: u16,
    client: reqwest::Client,
}

impl HealthServer {
    /// Starts `<this binary> --serve-health` and reads the port it bound.
    pub fn spawn() -> Result<HealthServer, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-health")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or("no stdout from the health server")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .ok_or_else(|| format!("health server said {line:?}"))?
            .parse()?;
        Ok(HealthServer {
            child,
            port,
            client: reqwest::Client::builder().no_proxy().build()?,
        })
    }

    /// Health requests answered so far.
    pub async fn answered(&self) -> Result<u64, BoxError> {
        let url = format!("http://127.0.0.1:{}/count", self.port);
        Ok(self
            .client
            .get(url)
            .send()
            .await?
            .text()
            .await?
            .trim()
            .parse()?)
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's main: serve until the parent closes our stdin (or dies).
pub fn serve_forever() -> Result<(), BoxError> {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let answered = Arc::new(AtomicU64::new(0));
        let counter = answered.clone();
        let app = Router::new()
            .route(
                "/health",
                get(move || {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async { "ok\n" }
                }),
            )
            .route(
                "/count",
                get(move || {
                    let n = answered.load(Ordering::Relaxed);
                    async move { format!("{n}\n") }
                }),
            );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        println!("PORT {}", listener.local_addr()?.port());
        axum::serve(listener, app).await?;
        Ok::<(), BoxError>(())
    })
}
