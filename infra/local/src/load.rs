//! A fixed-rate HTTP load generator (open loop): request `i` is sent at
//! `start + i / rps` whether or not earlier ones have answered, so a slow
//! cluster sees the same arrival rate a real one would — unlike `wrk`,
//! which cannot hold a rate. Used by `infra/local/cloud load` and by tests
//! that need steady traffic through the LB.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Uri;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::lb::TARGET_HEADER;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("`{url}` is not an http:// URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("--rps must be positive and finite (got {0})")]
    BadRate(f64),
}

/// The PHP fixture's header listing the distinct release ids of the files
/// that served a request (`infra/local/fixtures/php-app`).
pub const RELEASES_SEEN_HEADER: &str = "x-releases-seen";

/// Whether an `X-Releases-Seen` value names more than one release.
pub fn is_mixed(seen: &str) -> bool {
    seen.split(',').filter(|r| !r.trim().is_empty()).count() > 1
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Every request is `GET url`.
    pub url: String,
    /// Requests per second.
    pub rps: f64,
    /// How long to send; `None` until stopped.
    pub duration: Option<Duration>,
    /// Per request; a request that takes longer counts as an error.
    pub timeout: Duration,
    /// Requests in flight at most; a request due while this many are
    /// outstanding is not sent and counts as `dropped`.
    pub max_outstanding: usize,
}

impl LoadOptions {
    pub fn new(url: impl Into<String>, rps: f64) -> LoadOptions {
        LoadOptions {
            url: url.into(),
            rps,
            duration: None,
            timeout: Duration::from_secs(10),
            max_outstanding: 2000,
        }
    }
}

/// What the generator saw so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Requests sent (answered or not).
    pub sent: u64,
    /// Answered 2xx/3xx.
    pub ok: u64,
    /// Answered 4xx/5xx, timed out, or failed to connect.
    pub errors: u64,
    /// Due while `max_outstanding` were in flight: never sent.
    pub dropped: u64,
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that got no HTTP answer (refused, reset, timed out).
    pub transport_errors: u64,
    /// Answers by serving instance (`X-Hangar-Target`).
    pub by_target: BTreeMap<String, u64>,
    /// Answers by release (`X-Release`).
    pub by_release: BTreeMap<String, u64>,
    /// Answers by `X-Releases-Seen`: the releases whose files served the
    /// request (the PHP fixture; `v1,v2` would be a response mixing two).
    #[serde(default)]
    pub by_releases_seen: BTreeMap<String, u64>,
    /// Answers whose `X-Releases-Seen` names more than one release.
    #[serde(default)]
    pub mixed: u64,
    pub in_flight: u64,
    pub elapsed: Duration,
    pub latency_p50: Duration,
    pub latency_p99: Duration,
    pub latency_max: Duration,
}

#[derive(Default)]
struct Tally {
    report: LoadReport,
    latencies: Vec<Duration>,
}

impl Tally {
    fn snapshot(&self, started: Instant, in_flight: usize) -> LoadReport {
        let mut report = self.report.clone();
        report.elapsed = started.elapsed();
        report.in_flight = in_flight as u64;
        let mut lat = self.latencies.clone();
        lat.sort_unstable();
        let pick = |q: f64| {
            if lat.is_empty() {
                Duration::ZERO
            } else {
                lat[((lat.len() - 1) as f64 * q).round() as usize]
            }
        };
        report.latency_p50 = pick(0.5);
        report.latency_p99 = pick(0.99);
        report.latency_max = lat.last().copied().unwrap_or_default();
        report
    }
}

/// A running generator. Spawned on the current tokio runtime.
pub struct LoadGenerator {
    cancel: CancellationToken,
    tally: Arc<Mutex<Tally>>,
    in_flight: Arc<AtomicUsize>,
    started: Instant,
    done: mpsc::Receiver<LoadReport>,
}

impl LoadGenerator {
    /// Starts sending on the current tokio runtime (or `handle`'s).
    pub fn start(
        options: LoadOptions,
        handle: &tokio::runtime::Handle,
    ) -> Result<LoadGenerator, LoadError> {
        let uri: Uri = options
            .url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| LoadError::BadUrl {
                url: options.url.clone(),
                reason: e.to_string(),
            })?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(LoadError::BadUrl {
                url: options.url.clone(),
                reason: "needs http://HOST[:PORT]/…".into(),
            });
        }
        if !(options.rps.is_finite() && options.rps > 0.0) {
            return Err(LoadError::BadRate(options.rps));
        }
        let cancel = CancellationToken::new();
        let tally = Arc::new(Mutex::new(Tally::default()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let (done_tx, done) = mpsc::channel();
        handle.spawn(drive(
            uri,
            options,
            cancel.clone(),
            tally.clone(),
            in_flight.clone(),
            started,
            done_tx,
        ));
        Ok(LoadGenerator {
            cancel,
            tally,
            in_flight,
            started,
            done,
        })
    }

    /// The counts so far.
    pub fn report(&self) -> LoadReport {
        lock(&self.tally).snapshot(self.started, self.in_flight.load(Ordering::SeqCst))
    }

    /// Stops sending, waits for requests in flight (up to their timeout)
    /// and returns the final report. Blocking.
    pub fn stop(self) -> LoadReport {
        self.cancel.cancel();
        self.wait()
    }

    /// Waits until the configured duration has passed and every request
    /// has answered. Blocking.
    pub fn wait(self) -> LoadReport {
        match self.done.recv() {
            Ok(report) => report,
            // The runtime went away under us: report what we have.
            Err(_) => self.report(),
        }
    }
}

impl Drop for LoadGenerator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn drive(
    uri: Uri,
    options: LoadOptions,
    cancel: CancellationToken,
    tally: Arc<Mutex<Tally>>,
    in_flight: Arc<AtomicUsize>,
    started: Instant,
    done: mpsc::Sender<LoadReport>,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let period = Duration::from_secs_f64(1.0 / options.rps);
    let end = options.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(period);
    // Catch up after a stall: the rate is the point.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = async { match end { Some(end) => tokio::time::sleep_until(end).await, None => std::future::pending().await } } => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            _ = tick.tick() => {}
        }
        if in_flight.load(Ordering::SeqCst) >= options.max_outstanding {
            lock(&tally).report.dropped += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::SeqCst);
        lock(&tally).report.sent += 1;
        let client = client.clone();
        let uri = uri.clone();
        let tally = tally.clone();
        let in_flight = in_flight.clone();
        let timeout = options.timeout;
        tasks.spawn(async move {
            let t0 = Instant::now();
            let result = tokio::time::timeout(timeout, async {
                let resp = client.get(uri).await?;
                let status = resp.status().as_u16();
                let header = |name: &str| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let target = header(TARGET_HEADER);
                let release = header("x-release");
                let seen = header(RELEASES_SEEN_HEADER);
                let _ = resp.into_body().collect().await;
                Ok::<_, hyper_util::client::legacy::Error>((status, target, release, seen))
            })
            .await;
            let latency = t0.elapsed();
            {
                let mut t = lock(&tally);
                match result {
                    Ok(Ok((status, target, release, seen))) => {
                        *t.report.by_status.entry(status).or_default() += 1;
                        if status < 400 {
                            t.report.ok += 1;
                        } else {
                            t.report.errors += 1;
                        }
                        if let Some(target) = target {
                            *t.report.by_target.entry(target).or_default() += 1;
                        }
                        if let Some(release) = release {
                            *t.report.by_release.entry(release).or_default() += 1;
                        }
                        if let Some(seen) = seen {
                            if is_mixed(&seen) {
                                t.report.mixed += 1;
                            }
                            *t.report.by_releases_seen.entry(seen).or_default() += 1;
                        }
                        t.latencies.push(latency);
                    }
                    Ok(Err(_)) | Err(_) => {
                        t.report.errors += 1;
                        t.report.transport_errors += 1;
                    }
                }
            }
            in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    let report = lock(&tally).snapshot(started, 0);
    let _ = done.send(report);
}

#[cfg(test)]
mod tests {
    use super::is_mixed;

    #[test]
    fn one_release_is_not_a_mix_two_are() {
        assert!(!is_mixed("v1"));
        assert!(!is_mixed("v1,"));
        assert!(is_mixed("v1,v2"));
        assert!(is_mixed("v1, v2"));
    }
}
