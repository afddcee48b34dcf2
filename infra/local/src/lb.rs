//! The load balancer's data plane: what an ALB does with the target group
//! moto only stores.
//!
//! - **Targets**: every [`LbOptions::target_poll`] the target group is read
//!   from moto (`DescribeTargetHealth`); a listed target is *registered*, its
//!   address is the instance's private IP (from the host manager's
//!   [`Directory`]) on the target's port. Registrations made through the
//!   [`crate::gateway`] (hangar's `AWS_ENDPOINT_URL`) take effect before the
//!   call returns ([`Lb::note_registered`], [`Lb::note_deregistered`]); the
//!   poll catches up with calls made to moto directly.
//! - **Health**: the LB checks every registered target itself, like an ALB
//!   (moto calls every target healthy at once): `GET <path>` of the target
//!   group's health check every `HealthCheckIntervalSeconds`, within
//!   `HealthCheckTimeoutSeconds`, success per the group's matcher. A new or
//!   re-registered target starts `initial` and gets traffic after its first
//!   pass ("After your target is registered, it must pass one health check
//!   to be considered healthy"); an `unhealthy` one after the group's
//!   `HealthyThresholdCount` consecutive passes; one that is not unhealthy
//!   turns so after `UnhealthyThresholdCount` failures. All of these are
//!   read from the target group (and re-read when it changes);
//!   [`HealthCheckOptions`] may override them (tests check every 200 ms,
//!   which an ALB cannot).
//! - **Routing**: round-robin over registered *and* healthy targets; `502`
//!   when there is none (a real ALB answers 503 without registered targets
//!   and fails open — routes to all — when all are unhealthy; here nothing
//!   unhealthy ever gets a request, so tests can rely on it).
//! - **Deregistration**: a target that leaves the group gets no new
//!   request; requests in flight complete, unless they outlive the target
//!   group's `deregistration_delay.timeout_seconds`, after which they are
//!   cut off (`502`), as an ALB closes them.
//! - **Accounting**: every request is logged (target, status, release) for
//!   tests, and counted per interval for [`crate::metrics`].
//!
//! Each proxied request opens a fresh connection to its target (no pooled
//! keep-alive), so a target restarting its server can never fail a request
//! on a stale pooled connection. Responses carry `X-Hangar-Target: <id>`.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::aws::error_chain;
use crate::hosts::Directory;

/// Largest request or response body the LB buffers.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// How often the target group's settings (delay, health path) are re-read.
const SETTINGS_REFRESH: Duration = Duration::from_secs(5);

/// The response header naming the instance that served a request.
pub const TARGET_HEADER: &str = "x-hangar-target";

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("LB: cannot listen on {addr}: {source} (another local cloud on this slot? `infra/local/cloud status`)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("LB: reading target group {arn}: {message}")]
    TargetGroup { arn: String, message: String },
}

/// ALB-style health checking, done by the LB itself. `None` takes the
/// target group's own setting (as an ALB does); a value overrides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckOptions {
    /// Overrides `HealthCheckIntervalSeconds`.
    pub interval: Option<Duration>,
    /// Overrides `HealthCheckTimeoutSeconds`.
    pub timeout: Option<Duration>,
    /// Overrides `HealthyThresholdCount`: consecutive passes before a
    /// target gets traffic.
    pub healthy_threshold: Option<u32>,
    /// Overrides `UnhealthyThresholdCount`: consecutive failures before a
    /// healthy target stops getting traffic.
    pub unhealthy_threshold: Option<u32>,
}

impl Default for HealthCheckOptions {
    /// Checks every second, faster than an ALB's 5 s minimum, so the demo
    /// stays lively; thresholds from the target group.
    fn default() -> Self {
        HealthCheckOptions {
            interval: Some(Duration::from_secs(1)),
            timeout: Some(Duration::from_secs(1)),
            healthy_threshold: None,
            unhealthy_threshold: None,
        }
    }
}

/// The health-check settings in force: the group's, less the overrides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EffectiveHealth {
    interval: Duration,
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

#[derive(Clone, Debug)]
pub struct LbOptions {
    pub listen: SocketAddr,
    pub target_group_arn: String,
    /// How often registrations are read from the target group. This is how
    /// late the LB may notice a deregistration, so keep it short.
    pub target_poll: Duration,
    pub health: HealthCheckOptions,
    /// Longest a target may take to answer (an ALB's idle timeout: 60 s);
    /// `504` after it.
    pub request_timeout: Duration,
    /// Connect timeout towards targets; `502` after it.
    pub connect_timeout: Duration,
    /// Requests kept in the log (oldest dropped first).
    pub log_capacity: usize,
}

impl LbOptions {
    pub fn new(listen: SocketAddr, target_group_arn: impl Into<String>) -> LbOptions {
        LbOptions {
            listen,
            target_group_arn: target_group_arn.into(),
            target_poll: Duration::from_millis(100),
            health: HealthCheckOptions::default(),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            log_capacity: 200_000,
        }
    }
}

/// A target's health as the LB's own checks see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// Registered, not yet passed a check (nor failed
    /// `unhealthy_threshold` of them).
    Initial,
    Healthy,
    Unhealthy,
}

/// A target as the LB sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetView {
    pub instance_id: String,
    pub port: u16,
    /// `None` until the instance's private IP is known.
    pub addr: Option<SocketAddr>,
    /// Listed in the target group. `false`: deregistered, draining its
    /// in-flight requests.
    pub registered: bool,
    pub health: Health,
    pub last_check_error: Option<String>,
    pub in_flight: usize,
    /// Requests sent to it so far.
    pub served: u64,
}

impl TargetView {
    /// Whether new requests may go to it.
    pub fn routable(&self) -> bool {
        self.registered && self.health == Health::Healthy && self.addr.is_some()
    }
}

/// One request the LB answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Increases by one per request, in the order requests arrived.
    pub seq: u64,
    pub started: SystemTime,
    pub duration: Duration,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Instance id of the target chosen; `None` when none was.
    pub target: Option<String>,
    pub target_addr: Option<SocketAddr>,
    pub status: u16,
    /// The target's `X-Release` header (the static-http runbook sets it).
    pub release: Option<String>,
    /// Why the LB answered by itself (no healthy target, connection refused…).
    pub error: Option<String>,
}

impl RequestRecord {
    /// Answered by a target with a non-5xx status.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status < 500
    }
}

/// Request counts of one metrics interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests for which a target was chosen (an ALB's `RequestCount`).
    pub requests: u64,
    pub target_2xx: u64,
    pub target_3xx: u64,
    pub target_4xx: u64,
    pub target_5xx: u64,
    /// Answers the LB generated itself (502/504).
    pub elb_5xx: u64,
    /// Sum and count of healthy-target samples (one per target poll), for
    /// the interval's mean healthy target count.
    pub healthy_sum: u64,
    pub unhealthy_sum: u64,
    pub samples: u64,
}

impl Counters {
    /// Mean number of healthy registered targets over the interval.
    pub fn mean_healthy(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.healthy_sum as f64 / self.samples as f64
        }
    }

    pub fn mean_unhealthy(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.unhealthy_sum as f64 / self.samples as f64
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TargetKey {
    id: String,
    port: u16,
}

struct TargetState {
    addr: Option<SocketAddr>,
    registered: bool,
    health: Health,
    ok_streak: u32,
    fail_streak: u32,
    last_error: Option<String>,
    in_flight: usize,
    served: u64,
    deregistered_at: Option<Instant>,
    /// Set to `true` when the deregistration delay cuts in-flight requests off.
    abort: watch::Sender<bool>,
    checker: Option<JoinHandle<()>>,
}

impl TargetState {
    fn routable(&self) -> bool {
        self.registered && self.health == Health::Healthy && self.addr.is_some()
    }
}

/// The target group's settings the LB follows.
#[derive(Clone, Debug)]
struct GroupSettings {
    /// The traffic port (targets registered without one use it).
    port: u16,
    health_path: String,
    /// `None`: the traffic port.
    health_port: Option<u16>,
    matcher: String,
    deregistration_delay: Duration,
    interval: Duration,
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

struct Shared {
    options: LbOptions,
    local_addr: SocketAddr,
    targets: Mutex<BTreeMap<TargetKey, TargetState>>,
    /// Bumped (under the `targets` lock) by every registration change the
    /// gateway reports, so a listing read before it is recognised as stale.
    epoch: AtomicU64,
    settings: Mutex<GroupSettings>,
    next: AtomicUsize,
    seq: AtomicU64,
    log: Mutex<VecDeque<RequestRecord>>,
    counters: Mutex<Counters>,
    last_sync_error: Mutex<Option<String>>,
    syncs: AtomicU64,
    directory: watch::Receiver<Directory>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// moto, for re-reading the target group.
    elb: aws_sdk_elasticloadbalancingv2::Client,
    /// Targets that finished draining, with when they were deregistered:
    /// an ALB still reports them `draining` until the delay has passed.
    drained: Mutex<BTreeMap<TargetKey, Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Handle to a running LB; cheap to clone.
#[derive(Clone)]
pub struct Lb {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lb")
            .field("addr", &self.shared.local_addr)
            .finish()
    }
}

impl Lb {
    /// Binds the listener, reads the target group, and runs until `cancel`
    /// (the returned task ends when everything has stopped).
    pub async fn start(
        options: LbOptions,
        elb: aws_sdk_elasticloadbalancingv2::Client,
        directory: watch::Receiver<Directory>,
        cancel: CancellationToken,
    ) -> Result<(Lb, JoinHandle<()>), LbError> {
        let settings = read_settings(&elb, &options.target_group_arn).await?;
        let listener = TcpListener::bind(options.listen)
            .await
            .map_err(|source| LbError::Bind {
                addr: options.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| LbError::Bind {
            addr: options.listen,
            source,
        })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(options.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        let shared = Arc::new(Shared {
            options,
            local_addr,
            targets: Mutex::new(BTreeMap::new()),
            epoch: AtomicU64::new(0),
            settings: Mutex::new(settings),
            next: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            log: Mutex::new(VecDeque::new()),
            counters: Mutex::new(Counters::default()),
            last_sync_error: Mutex::new(None),
            syncs: AtomicU64::new(0),
            directory,
            client,
            elb: elb.clone(),
            drained: Mutex::new(BTreeMap::new()),
        });
        let lb = Lb { shared };
        let accept = tokio::spawn(lb.clone().accept(listener, cancel.clone()));
        let sync = tokio::spawn(lb.clone().sync(elb, cancel));
        let task = tokio::spawn(async move {
            let _ = accept.await;
            let _ = sync.await;
        });
        Ok((lb, task))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.local_addr)
    }

    /// Every target the LB knows: registered ones and deregistered ones
    /// still draining.
    pub fn targets(&self) -> Vec<TargetView> {
        lock(&self.shared.targets)
            .iter()
            .map(|(key, t)| TargetView {
                instance_id: key.id.clone(),
                port: key.port,
                addr: t.addr,
                registered: t.registered,
                health: t.health,
                last_check_error: t.last_error.clone(),
                in_flight: t.in_flight,
                served: t.served,
            })
            .collect()
    }

    /// Requests in flight to `instance_id` (any port).
    pub fn in_flight(&self, instance_id: &str) -> usize {
        lock(&self.shared.targets)
            .iter()
            .filter(|(k, _)| k.id == instance_id)
            .map(|(_, t)| t.in_flight)
            .sum()
    }

    /// Targets that may get new requests now.
    pub fn routable(&self) -> Vec<String> {
        lock(&self.shared.targets)
            .iter()
            .filter(|(_, t)| t.routable())
            .map(|(k, _)| k.id.clone())
            .collect()
    }

    /// The request log, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.log).iter().cloned().collect()
    }

    /// Requests with `seq >= from` (pair with [`next_seq`](Self::next_seq)).
    pub fn requests_since(&self, from: u64) -> Vec<RequestRecord> {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.seq >= from)
            .cloned()
            .collect()
    }

    /// The `seq` the next request will get.
    pub fn next_seq(&self) -> u64 {
        self.shared.seq.load(Ordering::SeqCst)
    }

    /// Completed reads of the target group (tests wait for "one more").
    pub fn syncs(&self) -> u64 {
        self.shared.syncs.load(Ordering::SeqCst)
    }

    pub fn last_sync_error(&self) -> Option<String> {
        lock(&self.shared.last_sync_error).clone()
    }

    /// The counts since the last call (for the metrics publisher).
    pub fn take_counters(&self) -> Counters {
        let mut counters = std::mem::take(&mut *lock(&self.shared.counters));
        if counters.samples == 0 {
            // No target-group read finished in the interval (a slow moto):
            // the healthy count now is the best estimate.
            let targets = lock(&self.shared.targets);
            counters.healthy_sum = targets.values().filter(|t| t.routable()).count() as u64;
            counters.unhealthy_sum = targets
                .values()
                .filter(|t| t.registered && t.health == Health::Unhealthy)
                .count() as u64;
            counters.samples = 1;
        }
        counters
    }

    async fn accept(self, listener: TcpListener, cancel: CancellationToken) {
        let mut connections = JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "LB accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let lb = self.clone();
            connections.spawn(async move {
                let service = service_fn(move |req| {
                    let lb = lb.clone();
                    async move { Ok::<_, Infallible>(lb.handle(req, peer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        // Dropping the set aborts open connections.
        connections.shutdown().await;
    }

    /// Picks a routable target round-robin and counts the request against it.
    fn pick(&self) -> Option<Lease> {
        let mut targets = lock(&self.shared.targets);
        let mut candidates: Vec<(&TargetKey, &mut TargetState)> =
            targets.iter_mut().filter(|(_, t)| t.routable()).collect();
        if candidates.is_empty() {
            return None;
        }
        let i = self.shared.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        let (key, target) = &mut candidates[i];
        let addr = target.addr?;
        target.in_flight += 1;
        target.served += 1;
        Some(Lease {
            lb: self.clone(),
            key: (*key).clone(),
            addr,
            abort: target.abort.subscribe(),
        })
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let started = SystemTime::now();
        let t0 = Instant::now();
        let seq = self.shared.seq.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let mut record = RequestRecord {
            seq,
            started,
            duration: Duration::ZERO,
            method: parts.method.to_string(),
            path: path.clone(),
            target: None,
            target_addr: None,
            status: 0,
            release: None,
            error: None,
        };
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return self.finish(
                    record,
                    t0,
                    elb_answer(
                        StatusCode::BAD_REQUEST,
                        &format!("reading the request body: {e}"),
                    ),
                    true,
                );
            }
        };

        let Some(lease) = self.pick() else {
            let resp = elb_answer(StatusCode::BAD_GATEWAY, "no healthy target");
            return self.finish(record, t0, resp, true);
        };
        record.target = Some(lease.key.id.clone());
        record.target_addr = Some(lease.addr);
        lock(&self.shared.counters).requests += 1;

        let mut upstream = Request::builder()
            .method(parts.method.clone())
            .uri(format!("http://{}{}", lease.addr, path));
        if let Some(headers) = upstream.headers_mut() {
            copy_end_to_end(&parts.headers, headers);
            append_forwarded(headers, peer, self.shared.local_addr.port());
        }
        let upstream = match upstream.body(Full::new(body)) {
            Ok(r) => r,
            Err(e) => {
                let resp = elb_answer(StatusCode::BAD_REQUEST, &format!("bad request: {e}"));
                return self.finish(record, t0, resp, true);
            }
        };

        let client = self.shared.client.clone();
        let exchange = async move {
            let resp = client
                .request(upstream)
                .await
                .map_err(|e| error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the response: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts, body))
        };
        let timeout = self.shared.options.request_timeout;
        let outcome = tokio::select! {
            r = tokio::time::timeout(timeout, exchange) => r.map_err(|_| None).and_then(|r| r.map_err(Some)),
            _ = lease.aborted() => Err(Some("deregistration delay expired with the request in flight".to_string())),
        };
        drop(lease);
        match outcome {
            Ok((parts, body)) => {
                record.release = parts
                    .headers
                    .get("x-release")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let mut resp = Response::new(Full::new(body));
                *resp.status_mut() = parts.status;
                copy_end_to_end(&parts.headers, resp.headers_mut());
                if let Some(id) = &record.target {
                    if let Ok(v) = HeaderValue::from_str(id) {
                        resp.headers_mut().insert(TARGET_HEADER, v);
                    }
                }
                self.finish(record, t0, resp, false)
            }
            Err(None) => {
                let msg = format!("target did not answer within {timeout:?}");
                self.finish(
                    record,
                    t0,
                    elb_answer(StatusCode::GATEWAY_TIMEOUT, &msg),
                    true,
                )
            }
            Err(Some(msg)) => {
                self.finish(record, t0, elb_answer(StatusCode::BAD_GATEWAY, &msg), true)
            }
        }
    }

    /// Counts and logs the answer.
    fn finish(
        &self,
        mut record: RequestRecord,
        t0: Instant,
        resp: Response<Full<Bytes>>,
        by_elb: bool,
    ) -> Response<Full<Bytes>> {
        record.duration = t0.elapsed();
        record.status = resp.status().as_u16();
        {
            let mut c = lock(&self.shared.counters);
            if by_elb {
                if record.status >= 500 {
                    c.elb_5xx += 1;
                }
            } else {
                match record.status {
                    200..=299 => c.target_2xx += 1,
                    300..=399 => c.target_3xx += 1,
                    400..=499 => c.target_4xx += 1,
                    500..=599 => c.target_5xx += 1,
                    _ => {}
                }
            }
        }
        if by_elb {
            record.error = Some(
                resp.headers()
                    .get("x-hangar-lb-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("answered by the LB")
                    .to_string(),
            );
        }
        let capacity = self.shared.options.log_capacity.max(1);
        let mut log = lock(&self.shared.log);
        while log.len() >= capacity {
            log.pop_front();
        }
        log.push_back(record);
        resp
    }

    /// Reads registrations until `cancel`.
    async fn sync(self, elb: aws_sdk_elasticloadbalancingv2::Client, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.shared.options.target_poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut settings_read = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if settings_read.elapsed() >= SETTINGS_REFRESH {
                settings_read = Instant::now();
                match read_settings(&elb, &self.shared.options.target_group_arn).await {
                    Ok(s) => *lock(&self.shared.settings) = s,
                    Err(e) => tracing::warn!(error = %e, "re-reading the target group failed"),
                }
            }
            let arn = &self.shared.options.target_group_arn;
            let epoch = self.shared.epoch.load(Ordering::SeqCst);
            let listed = match elb
                .describe_target_health()
                .target_group_arn(arn)
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    let message = error_chain(&e);
                    let mut last = lock(&self.shared.last_sync_error);
                    if last.as_deref() != Some(&message) {
                        tracing::warn!(%message, "reading target health failed; routing on the last known targets");
                    }
                    *last = Some(message);
                    continue;
                }
            };
            *lock(&self.shared.last_sync_error) = None;
            let registered: Vec<TargetKey> = listed
                .target_health_descriptions()
                .iter()
                .filter(|d| {
                    // `unused`: e.g. a stopped instance; `draining`: on its way out.
                    !matches!(
                        d.target_health()
                            .and_then(|h| h.state())
                            .map(|s| s.as_str()),
                        Some("unused" | "draining" | "unavailable")
                    )
                })
                .filter_map(|d| {
                    let t = d.target()?;
                    Some(TargetKey {
                        id: t.id()?.to_string(),
                        port: t.port().and_then(|p| u16::try_from(p).ok())?,
                    })
                })
                .collect();
            self.apply(&registered, epoch);
            self.shared.syncs.fetch_add(1, Ordering::SeqCst);
        }
        for (_, t) in std::mem::take(&mut *lock(&self.shared.targets)) {
            if let Some(checker) = t.checker {
                checker.abort();
            }
        }
    }

    /// Brings the target table in line with a listing of the target group
    /// read while the registration epoch was `epoch`. A listing that raced a
    /// registration change the gateway reported is stale: only drain
    /// bookkeeping runs then, and the next read catches up.
    fn apply(&self, registered: &[TargetKey], epoch: u64) {
        let directory = self.shared.directory.borrow().clone();
        let now = Instant::now();
        let mut targets = lock(&self.shared.targets);
        if self.shared.epoch.load(Ordering::SeqCst) == epoch {
            for key in registered {
                self.register_in(&mut targets, &directory, key);
            }
            let gone: Vec<TargetKey> = targets
                .iter()
                .filter(|(k, t)| t.registered && !registered.contains(k))
                .map(|(k, _)| k.clone())
                .collect();
            for key in gone {
                deregister_in(&mut targets, &key, now);
            }
        } else {
            // Addresses still follow the directory.
            for (key, t) in targets.iter_mut() {
                t.addr = addr_of(&directory, key);
            }
        }
        self.drain_pass(&mut targets, now);
        let healthy = targets.values().filter(|t| t.routable()).count() as u64;
        let unhealthy = targets
            .values()
            .filter(|t| t.registered && t.health == Health::Unhealthy)
            .count() as u64;
        drop(targets);
        let mut c = lock(&self.shared.counters);
        c.healthy_sum += healthy;
        c.unhealthy_sum += unhealthy;
        c.samples += 1;
    }

    /// Adds a target, or re-registers a draining one (it starts over, like
    /// a new target); keeps its address current.
    fn register_in(
        &self,
        targets: &mut BTreeMap<TargetKey, TargetState>,
        directory: &Directory,
        key: &TargetKey,
    ) {
        let addr = addr_of(directory, key);
        lock(&self.shared.drained).remove(key);
        match targets.get_mut(key) {
            Some(t) => {
                t.addr = addr;
                if !t.registered {
                    tracing::info!(target = %key.id, "re-registered");
                    t.registered = true;
                    t.deregistered_at = None;
                    t.health = Health::Initial;
                    t.ok_streak = 0;
                    t.fail_streak = 0;
                }
            }
            None => {
                tracing::info!(target = %key.id, port = key.port, "registered");
                let (abort, _) = watch::channel(false);
                let checker = tokio::spawn(self.clone().check(key.clone()));
                targets.insert(
                    key.clone(),
                    TargetState {
                        addr,
                        registered: true,
                        health: Health::Initial,
                        ok_streak: 0,
                        fail_streak: 0,
                        last_error: None,
                        in_flight: 0,
                        served: 0,
                        deregistered_at: None,
                        abort,
                        checker: Some(checker),
                    },
                );
            }
        }
    }

    /// Forgets drained targets (deregistered, nothing in flight — an ALB
    /// completes deregistration at once then) and cuts off requests that
    /// outlive the deregistration delay.
    fn drain_pass(&self, targets: &mut BTreeMap<TargetKey, TargetState>, now: Instant) {
        let delay = lock(&self.shared.settings).deregistration_delay;
        let mut drained = Vec::new();
        for (key, t) in targets.iter_mut() {
            if let Some(since) = t.deregistered_at {
                if t.in_flight == 0 {
                    drained.push(key.clone());
                } else if now.duration_since(since) >= delay {
                    t.abort.send_replace(true);
                }
            }
        }
        let mut lingering = lock(&self.shared.drained);
        lingering.retain(|_, since| now.duration_since(*since) < delay);
        for key in drained {
            if let Some(t) = targets.remove(&key) {
                tracing::info!(target = %key.id, "drained");
                if let Some(checker) = t.checker {
                    checker.abort();
                }
                if let Some(since) = t.deregistered_at {
                    lingering.insert(key, since);
                }
            }
        }
    }

    /// The gateway saw `RegisterTargets` succeed: the targets are
    /// registered from now on (health checks start at once).
    pub fn note_registered(&self, target_group_arn: &str, targets: &[(String, Option<u16>)]) {
        if target_group_arn != self.shared.options.target_group_arn {
            return;
        }
        let port = lock(&self.shared.settings).port;
        let directory = self.shared.directory.borrow().clone();
        let mut table = lock(&self.shared.targets);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (id, p) in targets {
            let key = TargetKey {
                id: id.clone(),
                port: p.unwrap_or(port),
            };
            self.register_in(&mut table, &directory, &key);
        }
    }

    /// The gateway saw `DeregisterTargets` succeed: no new request goes to
    /// these targets from now on; requests in flight finish (draining).
    pub fn note_deregistered(&self, target_group_arn: &str, targets: &[(String, Option<u16>)]) {
        if target_group_arn != self.shared.options.target_group_arn {
            return;
        }
        let port = lock(&self.shared.settings).port;
        let now = Instant::now();
        let mut table = lock(&self.shared.targets);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (id, p) in targets {
            let key = TargetKey {
                id: id.clone(),
                port: p.unwrap_or(port),
            };
            deregister_in(&mut table, &key, now);
        }
        self.drain_pass(&mut table, now);
    }

    /// The target group this LB serves.
    pub fn target_group_arn(&self) -> &str {
        &self.shared.options.target_group_arn
    }

    /// Drained targets still inside their deregistration delay, as
    /// `(instance id, port)`: an ALB keeps showing them `draining`.
    pub fn lingering(&self) -> Vec<(String, u16)> {
        let delay = lock(&self.shared.settings).deregistration_delay;
        let now = Instant::now();
        let mut drained = lock(&self.shared.drained);
        drained.retain(|_, since| now.duration_since(*since) < delay);
        drained.keys().map(|k| (k.id.clone(), k.port)).collect()
    }

    /// The target group's deregistration delay in force.
    pub fn deregistration_delay(&self) -> Duration {
        lock(&self.shared.settings).deregistration_delay
    }

    /// Re-reads the target group's settings now (the gateway calls this
    /// when a `ModifyTargetGroup*` call succeeded).
    pub async fn reload_settings(&self) -> Result<(), LbError> {
        let settings =
            read_settings(&self.shared.elb, &self.shared.options.target_group_arn).await?;
        *lock(&self.shared.settings) = settings;
        Ok(())
    }

    fn health(&self) -> EffectiveHealth {
        let o = self.shared.options.health;
        let s = lock(&self.shared.settings);
        EffectiveHealth {
            interval: o.interval.unwrap_or(s.interval),
            timeout: o.timeout.unwrap_or(s.timeout),
            healthy_threshold: o.healthy_threshold.unwrap_or(s.healthy_threshold).max(1),
            unhealthy_threshold: o
                .unhealthy_threshold
                .unwrap_or(s.unhealthy_threshold)
                .max(1),
        }
    }

    /// Health-checks one target until it is removed.
    async fn check(self, key: TargetKey) {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(HttpConnector::new());
        loop {
            let opts = self.health();
            let addr = lock(&self.shared.targets).get(&key).and_then(|t| t.addr);
            let settings = lock(&self.shared.settings).clone();
            let result = match addr {
                None => Err("instance has no known private IP".to_string()),
                Some(addr) => {
                    let port = settings.health_port.unwrap_or(addr.port());
                    let url = format!("http://{}:{port}{}", addr.ip(), settings.health_path);
                    probe(&client, &url, opts.timeout, &settings.matcher).await
                }
            };
            self.record_check(&key, result);
            tokio::time::sleep(opts.interval).await;
        }
    }

    fn record_check(&self, key: &TargetKey, result: Result<(), String>) {
        let opts = self.health();
        let mut targets = lock(&self.shared.targets);
        let Some(t) = targets.get_mut(key) else {
            return;
        };
        match result {
            Ok(()) => {
                t.ok_streak += 1;
                t.fail_streak = 0;
                t.last_error = None;
                // An ALB: "After your target is registered, it must pass one
                // health check to be considered healthy"; the threshold is
                // for an unhealthy target.
                let needed = match t.health {
                    Health::Initial => 1,
                    Health::Healthy | Health::Unhealthy => opts.healthy_threshold,
                };
                if t.health != Health::Healthy && t.ok_streak >= needed {
                    tracing::info!(target = %key.id, "healthy");
                    t.health = Health::Healthy;
                }
            }
            Err(e) => {
                t.fail_streak += 1;
                t.ok_streak = 0;
                if t.health != Health::Unhealthy && t.fail_streak >= opts.unhealthy_threshold {
                    tracing::info!(target = %key.id, error = %e, "unhealthy");
                    t.health = Health::Unhealthy;
                }
                t.last_error = Some(e);
            }
        }
    }
}

fn addr_of(directory: &Directory, key: &TargetKey) -> Option<SocketAddr> {
    directory
        .get(&key.id)
        .and_then(|i| i.private_ip)
        .map(|ip| SocketAddr::from((ip, key.port)))
}

fn deregister_in(targets: &mut BTreeMap<TargetKey, TargetState>, key: &TargetKey, now: Instant) {
    if let Some(t) = targets.get_mut(key) {
        if t.registered {
            tracing::info!(target = %key.id, in_flight = t.in_flight, "deregistered: draining");
            t.registered = false;
            t.deregistered_at = Some(now);
        }
    }
}

/// A request's claim on a target: counted in flight until dropped.
struct Lease {
    lb: Lb,
    key: TargetKey,
    addr: SocketAddr,
    abort: watch::Receiver<bool>,
}

impl Lease {
    /// Resolves when the deregistration delay cuts this request off.
    async fn aborted(&self) {
        let mut rx = self.abort.clone();
        if rx.wait_for(|cut| *cut).await.is_err() {
            // Target removed: nothing will ever cut this request off.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.lb.shared.targets).get_mut(&self.key) {
            t.in_flight = t.in_flight.saturating_sub(1);
        }
    }
}

async fn read_settings(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arn: &str,
) -> Result<GroupSettings, LbError> {
    let err = |message: String| LbError::TargetGroup {
        arn: arn.to_string(),
        message,
    };
    let groups = elb
        .describe_target_groups()
        .target_group_arns(arn)
        .send()
        .await
        .map_err(|e| err(error_chain(&e)))?;
    let group = groups
        .target_groups()
        .first()
        .ok_or_else(|| err("not found".into()))?;
    let attributes = elb
        .describe_target_group_attributes()
        .target_group_arn(arn)
        .send()
        .await
        .map_err(|e| err(error_chain(&e)))?;
    let delay = attributes
        .attributes()
        .iter()
        .find(|a| a.key() == Some("deregistration_delay.timeout_seconds"))
        .and_then(|a| a.value())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(300);
    Ok(GroupSettings {
        port: group
            .port()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(80),
        health_path: group.health_check_path().unwrap_or("/").to_string(),
        health_port: group
            .health_check_port()
            .and_then(|p| p.parse::<u16>().ok()),
        matcher: group
            .matcher()
            .and_then(|m| m.http_code())
            .unwrap_or("200")
            .to_string(),
        deregistration_delay: Duration::from_secs(delay),
        // An ALB's defaults for an HTTP instance target group.
        interval: secs(group.health_check_interval_seconds(), 30),
        timeout: secs(group.health_check_timeout_seconds(), 5),
        healthy_threshold: count(group.healthy_threshold_count(), 5),
        unhealthy_threshold: count(group.unhealthy_threshold_count(), 2),
    })
}

fn secs(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(
        value
            .and_then(|v| u64::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(default),
    )
}

fn count(value: Option<i32>, default: u32) -> u32 {
    value
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// One health check: `GET url` within `timeout`, status per `matcher`.
async fn probe(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    timeout: Duration,
    matcher: &str,
) -> Result<(), String> {
    let req = Request::get(url)
        .header("user-agent", "hangar-local-lb-health-checker")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| error_chain(&e))?;
        let status = resp.status().as_u16();
        // Drain the body so the server sees a complete exchange.
        let _ = resp.into_body().collect().await;
        Ok::<u16, String>(status)
    };
    let status = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if matches_code(matcher, status) {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {status} (healthy: {matcher})"))
    }
}

/// An ALB matcher: `200`, `200-299`, `200,302`.
fn matches_code(matcher: &str, status: u16) -> bool {
    matcher.split(',').any(|part| {
        let part = part.trim();
        match part.split_once('-') {
            Some((lo, hi)) => match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&status),
                _ => false,
            },
            None => part.parse::<u16>() == Ok(status),
        }
    })
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    // Headers the `Connection` header names are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        if !is_hop_by_hop(name) && !named.iter().any(|n| n == name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

fn append_forwarded(headers: &mut HeaderMap, peer: SocketAddr, port: u16) {
    let ip = peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(&port.to_string()) {
        headers.insert("x-forwarded-port", v);
    }
}

/// An answer the LB makes itself (no target, target failed).
fn elb_answer(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!(
        "{} {}: {why}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert("server", HeaderValue::from_static("hangar-local-lb"));
    if let Ok(v) = HeaderValue::from_str(why) {
        resp.headers_mut().insert("x-hangar-lb-error", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_follow_alb_syntax() {
        assert!(matches_code("200", 200));
        assert!(!matches_code("200", 204));
        assert!(matches_code("200-399", 302));
        assert!(!matches_code("200-399", 404));
        assert!(matches_code("200, 302", 302));
        assert!(!matches_code("garbage", 200));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        from.insert(
            "connection",
            HeaderValue::from_static("close, x-secret-hop"),
        );
        from.insert("x-secret-hop", HeaderValue::from_static("1"));
        from.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        from.insert("x-release", HeaderValue::from_static("v1"));
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert_eq!(to.len(), 1);
        assert_eq!(to.get("x-release").unwrap(), "v1");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        append_forwarded(&mut h, "127.0.0.9:5555".parse().unwrap(), 80);
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.9");
        assert_eq!(h.get("x-forwarded-port").unwrap(), "80");
    }

    #[test]
    fn mean_healthy_is_averaged_over_samples() {
        let c = Counters {
            healthy_sum: 9,
            samples: 3,
            ..Counters::default()
        };
        assert_eq!(c.mean_healthy(), 3.0);
        assert_eq!(Counters::default().mean_healthy(), 0.0);
    }
}
