//! A fault-injecting HTTP proxy on loopback, in front of moto.
//!
//! Point any AWS client (hangar in-process, or a separate `hangar` process
//! through `AWS_ENDPOINT_URL`) at [`FaultProxy::endpoint`] instead of moto's.
//! Requests are forwarded unchanged unless a [`Rule`] matches; then the
//! proxy answers itself with the service's own, protocol-correct error
//! (EC2 query/XML, ELBv2 query/XML, CloudWatch RPCv2-CBOR, S3 REST/XML), or
//! hangs, delays or drops the connection. The SDK cannot tell these from the
//! real thing, so they exercise the real retry classification and backoff.
//!
//! The service is read from the SigV4 credential scope of the
//! `Authorization` header (`…/us-east-1/ec2/aws4_request`), the operation
//! from the protocol (`Action=` for query protocols, the RPCv2 path for
//! CloudWatch, method + path shape for S3). Probabilistic rules draw from a
//! seeded generator so a failing run can be replayed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The AWS services hangar calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Ec2,
    Elbv2,
    CloudWatch,
    S3,
    /// SSM Parameter Store (JSON 1.1, `X-Amz-Target: AmazonSSM.*`).
    Ssm,
    /// Secrets Manager (JSON 1.1, `X-Amz-Target: secretsmanager.*`).
    SecretsManager,
    /// Unsigned or unknown (moto's own `/moto-api`, …): never faulted by a
    /// rule that names a service.
    Other,
}

impl Service {
    /// From the SigV4 signing name.
    fn from_signing_name(name: &str) -> Service {
        match name {
            "ec2" => Service::Ec2,
            "elasticloadbalancing" => Service::Elbv2,
            "monitoring" => Service::CloudWatch,
            "s3" => Service::S3,
            "ssm" => Service::Ssm,
            "secretsmanager" => Service::SecretsManager,
            _ => Service::Other,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Ec2 => "ec2",
            Service::Elbv2 => "elbv2",
            Service::CloudWatch => "cloudwatch",
            Service::S3 => "s3",
            Service::Ssm => "ssm",
            Service::SecretsManager => "secretsmanager",
            Service::Other => "other",
        })
    }
}

/// What the proxy does instead of forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The service's throttling error: EC2 `RequestLimitExceeded` (503),
    /// ELBv2 `Throttling` (400), CloudWatch `Throttling` (400, CBOR),
    /// S3 `SlowDown` (503).
    Throttle,
    /// HTTP 500 with the service's internal-error code.
    ServerError,
    /// HTTP 503 with the service's unavailable code.
    Unavailable,
    /// Accept the request and answer nothing for this long, then drop the
    /// connection: the client's attempt timeout should fire first.
    Hang(Duration),
    /// Forward, but only after this delay.
    Delay(Duration),
    /// Drop the connection without any response.
    Reset,
}

/// When to inject a [`Fault`]. Rules are tried in the order they were added;
/// the first that fires wins.
#[derive(Clone, Debug)]
pub struct Rule {
    pub service: Option<Service>,
    /// Operation name as the SDK calls it (`DescribeInstances`, `GetMetricData`…).
    pub operation: Option<String>,
    pub fault: Fault,
    /// Fire at most this many times; `None`: no limit.
    pub times: Option<u64>,
    /// Fraction of matching requests to hit (0.0..=1.0).
    pub probability: f64,
}

impl Rule {
    /// Every request, every time, until narrowed.
    pub fn new(fault: Fault) -> Rule {
        Rule {
            service: None,
            operation: None,
            fault,
            times: None,
            probability: 1.0,
        }
    }

    pub fn service(mut self, service: Service) -> Rule {
        self.service = Some(service);
        self
    }

    /// The operations hangar calls have distinct names across its four
    /// services, so this alone is usually specific enough.
    pub fn operation(mut self, operation: impl Into<String>) -> Rule {
        self.operation = Some(operation.into());
        self
    }

    pub fn times(mut self, times: u64) -> Rule {
        self.times = Some(times);
        self
    }

    pub fn probability(mut self, probability: f64) -> Rule {
        self.probability = probability.clamp(0.0, 1.0);
        self
    }

    fn matches(&self, call: &Call) -> bool {
        self.service.is_none_or(|s| s == call.service)
            && self
                .operation
                .as_deref()
                .is_none_or(|op| op == call.operation)
    }
}

/// Requests seen and faults injected for one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    pub requests: u64,
    pub injected: u64,
}

/// The identity of one request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub service: Service,
    pub operation: String,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    stats: BTreeMap<Call, OpStats>,
    rng: SplitMix64,
}

/// The proxy. Dropping it stops it and every connection it holds.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`
    /// (`http://127.0.0.1:PORT`, typically [`crate::moto::Moto::endpoint`]).
    /// `seed` makes probabilistic rules reproducible.
    pub async fn start(upstream: &str, seed: u64) -> std::io::Result<FaultProxy> {
        let upstream: Uri = upstream
            .parse()
            .map_err(|e| std::io::Error::other(format!("upstream {upstream:?}: {e}")))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(std::io::Error::other(format!(
                "upstream {upstream} must be http://HOST:PORT"
            )));
        }
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rng: SplitMix64(seed),
            ..State::default()
        }));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let shared = Arc::new(Shared {
            upstream,
            client,
            state: state.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(FaultProxy { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn add(&self, rule: Rule) {
        self.lock().rules.push(rule);
    }

    /// Removes every rule; traffic flows untouched again.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Counters for one operation.
    pub fn stats(&self, service: Service, operation: &str) -> OpStats {
        let call = Call {
            service,
            operation: operation.to_string(),
        };
        self.lock().stats.get(&call).copied().unwrap_or_default()
    }

    /// Counters for every operation seen.
    pub fn all_stats(&self) -> BTreeMap<Call, OpStats> {
        self.lock().stats.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task.
        self.task.abort();
    }
}

struct Shared {
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    state: Arc<Mutex<State>>,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Why a connection is dropped without a response.
#[derive(Debug)]
struct Dropped(&'static str);

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Dropped {}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Err(Dropped("request body unreadable")),
    };
    let call = identify(&parts, &body);
    let fault = decide(&shared.state, &call);

    match fault {
        None => forward(&shared, parts, body).await,
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            forward(&shared, parts, body).await
        }
        Some(Fault::Hang(duration)) => {
            tokio::time::sleep(duration).await;
            Err(Dropped("hung"))
        }
        Some(Fault::Reset) => Err(Dropped("reset")),
        Some(fault @ (Fault::Throttle | Fault::ServerError | Fault::Unavailable)) => {
            Ok(error_response(call.service, &fault))
        }
    }
}

/// Counts the request and picks the fault, if any, under one lock.
fn decide(state: &Mutex<State>, call: &Call) -> Option<Fault> {
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let State { rules, stats, rng } = &mut *state;
    let entry = stats.entry(call.clone()).or_default();
    entry.requests += 1;
    for rule in rules.iter_mut() {
        if !rule.matches(call) || rule.times == Some(0) {
            continue;
        }
        if rule.probability < 1.0 && rng.next_f64() >= rule.probability {
            continue;
        }
        if let Some(times) = rule.times.as_mut() {
            *times -= 1;
        }
        entry.injected += 1;
        return Some(rule.fault.clone());
    }
    None
}

async fn forward(
    shared: &Shared,
    mut parts: hyper::http::request::Parts,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let mut uri = hyper::http::uri::Parts::from(shared.upstream.clone());
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(_) => return Err(Dropped("bad request URI")),
    };
    // The Host header stays as the client signed it (moto ignores it).
    let upstream_req = Request::from_parts(parts, Full::new(body));
    let resp = match shared.client.request(upstream_req).await {
        Ok(resp) => resp,
        Err(_) => return Ok(plain(StatusCode::BAD_GATEWAY, "upstream unreachable")),
    };
    let (parts, body) = resp.into_parts();
    match body.collect().await {
        Ok(collected) => Ok(Response::from_parts(parts, Full::new(collected.to_bytes()))),
        Err(_) => Err(Dropped("upstream body broke")),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// Which service and operation a request is.
fn identify(parts: &hyper::http::request::Parts, body: &[u8]) -> Call {
    let service = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(signing_name)
        .map(Service::from_signing_name)
        .unwrap_or(Service::Other);
    let operation = match service {
        Service::Ec2 | Service::Elbv2 => query_action(parts.uri.query(), body),
        Service::CloudWatch => {
            rpc_v2_operation(parts.uri.path()).or_else(|| query_action(parts.uri.query(), body))
        }
        Service::S3 => Some(s3_operation(parts.method.as_str(), parts.uri.path())),
        Service::Ssm | Service::SecretsManager => json_target(&parts.headers),
        Service::Other => None,
    }
    .unwrap_or_else(|| parts.method.as_str().to_string());
    Call { service, operation }
}

/// `X-Amz-Target: AmazonSSM.GetParameter` → `GetParameter` (JSON 1.0/1.1).
pub(crate) fn json_target(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .map(str::to_string)
}

/// `AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/ec2/aws4_request, …` → `ec2`.
pub(crate) fn signing_name(authorization: &str) -> Option<&str> {
    let credential = authorization.split("Credential=").nth(1)?;
    let scope = credential.split([',', ' ']).next()?;
    let mut parts = scope.split('/');
    // AKID / date / region / service / aws4_request
    parts.nth(3)
}

pub(crate) fn query_action(query: Option<&str>, body: &[u8]) -> Option<String> {
    let from = |bytes: &[u8]| {
        form_urlencoded::parse(bytes)
            .find(|(k, _)| k == "Action")
            .map(|(_, v)| v.into_owned())
    };
    from(body).or_else(|| query.and_then(|q| from(q.as_bytes())))
}

/// `/service/GraniteServiceVersion20100801/operation/GetMetricData` → `GetMetricData`.
pub(crate) fn rpc_v2_operation(path: &str) -> Option<String> {
    let (_, op) = path.rsplit_once("/operation/")?;
    let op = op.trim_end_matches('/');
    (!op.is_empty() && !op.contains('/')).then(|| op.to_string())
}

/// Path-style S3: `/bucket` or `/bucket/key…`. Good enough for hangar,
/// which only reads objects.
pub(crate) fn s3_operation(method: &str, path: &str) -> String {
    let has_key = path
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, key)| !key.is_empty());
    match (method, has_key) {
        ("GET", true) => "GetObject",
        ("HEAD", true) => "HeadObject",
        ("PUT", true) => "PutObject",
        ("DELETE", true) => "DeleteObject",
        ("GET", false) => "ListObjects",
        ("PUT", false) => "CreateBucket",
        ("HEAD", false) => "HeadBucket",
        ("DELETE", false) => "DeleteBucket",
        (other, _) => other,
    }
    .to_string()
}

/// The service's own error for `fault`, in its wire protocol.
fn error_response(service: Service, fault: &Fault) -> Response<Full<Bytes>> {
    let (status, code, message) = match (service, fault) {
        (Service::Ec2, Fault::Throttle) => (503, "RequestLimitExceeded", "Request limit exceeded."),
        (Service::Elbv2 | Service::CloudWatch, Fault::Throttle) => {
            (400, "Throttling", "Rate exceeded")
        }
        (Service::S3, Fault::Throttle) => (503, "SlowDown", "Please reduce your request rate."),
        (Service::Ssm | Service::SecretsManager, Fault::Throttle) => {
            (400, "ThrottlingException", "Rate exceeded")
        }
        (Service::Other, Fault::Throttle) => (503, "Throttling", "Rate exceeded"),
        (Service::Ec2 | Service::S3, Fault::ServerError) => {
            (500, "InternalError", "An internal error has occurred")
        }
        (_, Fault::ServerError) => (500, "InternalFailure", "An internal error has occurred"),
        (Service::Ec2, _) => (503, "Unavailable", "The server is overloaded"),
        (_, _) => (503, "ServiceUnavailable", "Service is unavailable"),
    };
    aws_error(service, status, code, message)
}

/// The service's throttling error (EC2 `RequestLimitExceeded` 503, ELBv2
/// and CloudWatch `Throttling` 400, S3 `SlowDown` 503).
pub fn throttling_error(service: Service) -> Response<Full<Bytes>> {
    error_response(service, &Fault::Throttle)
}

/// An error answer in `service`'s wire protocol: EC2's
/// `<Response><Errors><Error>…`, ELBv2's `<ErrorResponse>`, CloudWatch's
/// RPCv2-CBOR map, S3's `<Error>`. `message` is escaped here.
pub fn aws_error(
    service: Service,
    status: u16,
    code: &str,
    message: &str,
) -> Response<Full<Bytes>> {
    let request_id = "00000000-0000-4000-8000-fa017fa017fa";
    let xml_message = xml_escape(message);
    let (content_type, body): (&str, Vec<u8>) = match service {
        Service::Ec2 => (
            "text/xml;charset=UTF-8",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{xml_message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
            )
            .into_bytes(),
        ),
        Service::Elbv2 => (
            "text/xml",
            format!(
                "<ErrorResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><Error><Type>{}</Type><Code>{code}</Code><Message>{xml_message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>",
                sender_or_receiver(status)
            )
            .into_bytes(),
        ),
        Service::CloudWatch => (
            "application/cbor",
            cbor_text_map(&[
                ("__type", &format!("com.amazonaws.cloudwatch#{code}")),
                ("message", message),
            ]),
        ),
        Service::Ssm | Service::SecretsManager => (
            "application/x-amz-json-1.1",
            serde_json::json!({ "__type": code, "message": message })
                .to_string()
                .into_bytes(),
        ),
        Service::S3 | Service::Other => (
            "application/xml",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{xml_message}</Message><RequestId>{request_id}</RequestId></Error>"
            )
            .into_bytes(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("x-amzn-requestid", HeaderValue::from_static(request_id));
    if service == Service::CloudWatch {
        headers.insert("smithy-protocol", HeaderValue::from_static("rpc-v2-cbor"));
        // CloudWatch is awsQueryCompatible: the SDK takes the error code
        // from this header.
        if let Ok(v) = HeaderValue::from_str(&format!("{code};{}", sender_or_receiver(status))) {
            headers.insert("x-amzn-query-error", v);
        }
    }
    resp
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn sender_or_receiver(status: u16) -> &'static str {
    if status < 500 {
        "Sender"
    } else {
        "Receiver"
    }
}

/// A definite-length CBOR map of text strings (all an RPCv2 error body needs).
fn cbor_text_map(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    cbor_head(&mut out, 5, entries.len() as u64);
    for (k, v) in entries {
        for s in [k, v] {
            cbor_head(&mut out, 3, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn cbor_head(out: &mut Vec<u8>, major: u8, len: u64) {
    let major = major << 5;
    match len {
        0..=23 => out.push(major | len as u8),
        24..=0xff => out.extend_from_slice(&[major | 24, len as u8]),
        0x100..=0xffff => {
            out.push(major | 25);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(major | 26);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

/// Small, seedable, dependency-free PRNG (SplitMix64) for reproducible
/// probabilistic faults.
#[derive(Debug, Default)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, auth: Option<&str>) -> hyper::http::request::Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        builder.body(()).expect("valid request").into_parts().0
    }

    fn auth(service: &str) -> String {
        format!("AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=abc")
    }

    #[test]
    fn identifies_service_and_operation_per_protocol() {
        let ec2 = identify(
            &parts("POST", "/", Some(&auth("ec2"))),
            b"Action=DescribeInstances&Version=2016-11-15",
        );
        assert_eq!(ec2.service, Service::Ec2);
        assert_eq!(ec2.operation, "DescribeInstances");

        let elb = identify(
            &parts("POST", "/", Some(&auth("elasticloadbalancing"))),
            b"Version=2015-12-01&Action=RegisterTargets",
        );
        assert_eq!(
            (elb.service, elb.operation.as_str()),
            (Service::Elbv2, "RegisterTargets")
        );

        let cw = identify(
            &parts(
                "POST",
                "/service/GraniteServiceVersion20100801/operation/GetMetricData",
                Some(&auth("monitoring")),
            ),
            b"\xa0",
        );
        assert_eq!(
            (cw.service, cw.operation.as_str()),
            (Service::CloudWatch, "GetMetricData")
        );

        let s3 = identify(&parts("GET", "/bucket/a/b.tgz", Some(&auth("s3"))), b"");
        assert_eq!(
            (s3.service, s3.operation.as_str()),
            (Service::S3, "GetObject")
        );

        let other = identify(&parts("POST", "/moto-api/reset", None), b"");
        assert_eq!(
            (other.service, other.operation.as_str()),
            (Service::Other, "POST")
        );
    }

    #[test]
    fn rules_fire_in_order_and_count_down() {
        let state = Mutex::new(State::default());
        state.lock().unwrap().rules.push(
            Rule::new(Fault::Throttle)
                .service(Service::Ec2)
                .operation("DescribeInstances")
                .times(2),
        );
        let describe = Call {
            service: Service::Ec2,
            operation: "DescribeInstances".into(),
        };
        let run = Call {
            service: Service::Ec2,
            operation: "RunInstances".into(),
        };
        assert_eq!(decide(&state, &run), None);
        assert_eq!(decide(&state, &describe), Some(Fault::Throttle));
        assert_eq!(decide(&state, &describe), Some(Fault::Throttle));
        assert_eq!(decide(&state, &describe), None);
        let stats = state.lock().unwrap().stats.get(&describe).copied();
        assert_eq!(
            stats,
            Some(OpStats {
                requests: 3,
                injected: 2
            })
        );
    }

    #[test]
    fn probability_is_reproducible_from_the_seed() {
        let draw = |seed| {
            let state = Mutex::new(State {
                rng: SplitMix64(seed),
                ..State::default()
            });
            state
                .lock()
                .unwrap()
                .rules
                .push(Rule::new(Fault::ServerError).probability(0.3));
            let call = Call {
                service: Service::Elbv2,
                operation: "DescribeTargetHealth".into(),
            };
            (0..1000)
                .map(|_| decide(&state, &call).is_some())
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let hits = a.iter().filter(|hit| **hit).count();
        assert!((200..400).contains(&hits), "{hits} hits for p=0.3");
    }

    #[test]
    fn cloudwatch_errors_are_cbor_with_the_query_error_header() {
        let resp = error_response(Service::CloudWatch, &Fault::Throttle);
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()["x-amzn-query-error"], "Throttling;Sender");
        assert_eq!(resp.headers()["smithy-protocol"], "rpc-v2-cbor");
        let mut expected = vec![0xa2, 0x66];
        expected.extend_from_slice(b"__type");
        expected.push(0x78);
        expected.push("com.amazonaws.cloudwatch#Throttling".len() as u8);
        expected.extend_from_slice(b"com.amazonaws.cloudwatch#Throttling");
        expected.push(0x67);
        expected.extend_from_slice(b"message");
        expected.push(0x6d);
        expected.extend_from_slice(b"Rate exceeded");
        assert_eq!(
            cbor_text_map(&[
                ("__type", "com.amazonaws.cloudwatch#Throttling"),
                ("message", "Rate exceeded")
            ]),
            expected
        );
    }
}
