//! The local cloud's AWS endpoint (`AWS_ENDPOINT_URL`): moto, with the
//! promises and failure modes of AWS that moto lacks.
//!
//! Every request is forwarded to moto, except where AWS behaves otherwise
//! (each behaviour is a field of [`Semantics`], on by default):
//! - [`ec2`]: `RunInstances` with a `ClientToken` launches once (repeats
//!   answer with the first reservation, other parameters are
//!   `IdempotentParameterMismatch`); per-subnet capacity errors
//!   ([`Capacity`]); `DescribeInstances` shows new instances, tag changes
//!   and state changes (start, stop, terminate) only after a lag
//!   ([`consistency`]); an instance can be made
//!   older than it is ([`Gateway::age_instance`]: its `launchTime` as
//!   listed), the one clock a test cannot wait out;
//! - [`elb`]: target health and draining as the LB data plane sees them;
//! - [`throttle`]: AWS's token buckets per access key and API family,
//!   answered with the service's own throttling error;
//! - [`accounting`]: calls, throttles and errors per access key and action,
//!   and blocking one service for one key (its connections are reset);
//! - [`secrets`]: SSM and Secrets Manager reads a role may be denied;
//! - [`admin`]: an HTTP API for all of that under `/_hangar/`.
//!
//! The caller is read from the SigV4 `Authorization` header
//! (`Credential=AKID/date/region/service/aws4_request`), the action from
//! the protocol. The local cloud's own services (seeding, host manager, the
//! LB's reads) talk to moto directly, so nothing here delays or throttles
//! them.

pub mod accounting;
pub mod admin;
pub mod consistency;
mod ec2;
mod elb;
mod secrets;
pub mod semantics;
pub mod throttle;
pub mod xml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

pub use accounting::{ApiCalls, CallCounts};
pub use semantics::{Bucket, Capacity, Lag, Semantics, ThrottleLimits};

use crate::faults::{self, Service};
use crate::lb::Lb;
use accounting::{Accounting, Outcome};
use consistency::Consistency;
use throttle::{BucketId, Throttle};
use xml::Document;

/// Largest request the gateway buffers (release artifacts go to S3 through it).
const MAX_BODY: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("AWS gateway: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("AWS gateway: moto endpoint `{0}` is not an http:// URL")]
    BadUpstream(String),
}

/// A running gateway; cheap to clone. Its methods are the test controls.
#[derive(Clone)]
pub struct Gateway {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.addr).finish()
    }
}

pub(crate) struct Shared {
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    lb: Lb,
    semantics: Semantics,
    accounting: Accounting,
    throttle: Option<Throttle>,
    capacity: Mutex<BTreeMap<String, Capacity>>,
    /// Client token → its launch (see [`ec2::run_instances`]).
    tokens: Mutex<HashMap<String, Arc<ec2::TokenEntry>>>,
    consistency: Mutex<Consistency>,
    /// Tag writes one at a time, so "the tags before" are exact.
    tag_writes: tokio::sync::Mutex<()>,
    /// Parameters and secrets the caller's "role" may not read.
    denials: Mutex<Vec<secrets::Denial>>,
    /// Instance id → how much earlier than moto's its `launchTime` is listed.
    ages: Mutex<HashMap<String, std::time::Duration>>,
}

impl Gateway {
    /// Listens on `listen` and forwards to moto at `moto_endpoint` until `cancel`.
    pub async fn start(
        listen: SocketAddr,
        moto_endpoint: &str,
        lb: Lb,
        semantics: Semantics,
        cancel: CancellationToken,
    ) -> Result<(Gateway, JoinHandle<()>), GatewayError> {
        let upstream: Uri = moto_endpoint
            .parse()
            .map_err(|_| GatewayError::BadUpstream(moto_endpoint.to_string()))?;
        if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
            return Err(GatewayError::BadUpstream(moto_endpoint.to_string()));
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| GatewayError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: listen,
            source,
        })?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        let shared = Arc::new(Shared {
            upstream,
            client: Client::builder(TokioExecutor::new()).build_http(),
            lb,
            throttle: semantics.throttling.map(Throttle::new),
            consistency: Mutex::new(Consistency::new(semantics.listing_lag, seed)),
            semantics,
            accounting: Accounting::default(),
            capacity: Mutex::new(BTreeMap::new()),
            tokens: Mutex::new(HashMap::new()),
            tag_writes: tokio::sync::Mutex::new(()),
            denials: Mutex::new(Vec::new()),
            ages: Mutex::new(HashMap::new()),
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let stream = tokio::select! {
                    _ = cancel.cancelled() => break,
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, "gateway accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let shared = accept_shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { handle(&shared, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            connections.shutdown().await;
        });
        Ok((Gateway { addr, shared }, task))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR:PORT`: what `AWS_ENDPOINT_URL` points at.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn semantics(&self) -> &Semantics {
        &self.shared.semantics
    }

    /// What `RunInstances` into `subnet` answers from now on.
    pub fn set_subnet_capacity(&self, subnet: &str, capacity: Capacity) {
        self.shared.set_capacity(subnet, capacity);
    }

    /// Subnets not [`Capacity::Available`].
    pub fn subnet_capacities(&self) -> BTreeMap<String, Capacity> {
        self.shared.capacities()
    }

    /// Calls so far, per access key id and action.
    pub fn api_calls(&self) -> ApiCalls {
        self.shared.accounting.snapshot()
    }

    pub fn reset_api_calls(&self) {
        self.shared.accounting.reset();
    }

    /// From now on `DescribeInstances` lists `instance_id` as launched `by`
    /// earlier than it was: a node a day old, for `maxLifetime`, without
    /// waiting a day (moto takes its launch time from the clock, and EC2
    /// never lets it be set). Replaces an earlier age; zero undoes it.
    pub fn age_instance(&self, instance_id: &str, by: std::time::Duration) {
        self.shared.set_age(instance_id, by);
    }

    /// Resets the connection of every `service` call (a SigV4 signing name:
    /// `dynamodb`, `ec2`, `elasticloadbalancing`/`elbv2`, `s3`,
    /// `monitoring`/`cloudwatch`) signed with `access_key_id`, until
    /// [`unblock`](Self::unblock): a network partition for that caller.
    pub fn block(&self, access_key_id: &str, service: &str) {
        self.shared.accounting.block(access_key_id, service);
    }

    pub fn unblock(&self, access_key_id: &str, service: &str) {
        self.shared.accounting.unblock(access_key_id, service);
    }

    /// From now on every read of `resource` through `service` (`ssm`: a
    /// parameter name, or a path ending in `/` for everything under it;
    /// `secretsmanager`: a secret's name or ARN as the caller names it)
    /// answers `AccessDeniedException`, as for a role whose policy does not
    /// name it. Until [`allow_secret`](Self::allow_secret).
    pub fn deny_secret(&self, service: &str, resource: &str) {
        let mut d = self
            .shared
            .denials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        d.push(secrets::Denial {
            service: service.to_string(),
            resource: resource.to_string(),
        });
    }

    pub fn allow_secret(&self, service: &str, resource: &str) {
        let mut d = self
            .shared
            .denials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        d.retain(|x| !(x.service == service && x.resource == resource));
    }
}

/// Who is calling what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Caller {
    /// From the SigV4 credential; `anonymous` when unsigned.
    pub access_key_id: String,
    /// The SigV4 signing name (`ec2`, `elasticloadbalancing`, `dynamodb`…);
    /// `unsigned` when there is none.
    pub service: String,
    pub action: String,
}

impl Caller {
    fn identify(parts: &hyper::http::request::Parts, body: &[u8]) -> Caller {
        let credential = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.split("Credential=").nth(1))
            .and_then(|c| c.split([',', ' ']).next())
            .unwrap_or("");
        let mut scope = credential.split('/');
        let access_key_id = scope
            .next()
            .filter(|k| !k.is_empty())
            .unwrap_or("anonymous")
            .to_string();
        let service = scope.nth(2).unwrap_or("unsigned").to_string();
        let target = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.rsplit('.').next())
            .map(str::to_string);
        let action = match service.as_str() {
            "s3" => Some(faults::s3_operation(
                parts.method.as_str(),
                parts.uri.path(),
            )),
            "monitoring" => faults::rpc_v2_operation(parts.uri.path())
                .or_else(|| faults::query_action(parts.uri.query(), body)),
            _ => target.or_else(|| faults::query_action(parts.uri.query(), body)),
        }
        .unwrap_or_else(|| parts.method.as_str().to_string());
        Caller {
            access_key_id,
            service,
            action,
        }
    }

    /// The service as [`crate::faults`] names it, for protocol-correct errors.
    fn wire(&self) -> Service {
        match self.service.as_str() {
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

/// Why a connection is dropped without an answer.
#[derive(Debug)]
struct Dropped(&'static str);

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Dropped {}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
    if req.uri().path().starts_with(admin::PREFIX) && !req.headers().contains_key(AUTHORIZATION) {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        return Ok(admin::handle(shared, &method, &path));
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body: {e}"),
            ))
        }
    };
    let caller = Caller::identify(&parts, &body);
    let record = |outcome| {
        shared.accounting.record(
            &caller.access_key_id,
            &caller.service,
            &caller.action,
            outcome,
        )
    };
    if shared
        .accounting
        .is_blocked(&caller.access_key_id, &caller.service)
    {
        record(Outcome::Blocked);
        // Dropping the connection unanswered is what a partition looks like.
        return Err(Dropped("blocked"));
    }
    if let Some(throttle) = &shared.throttle {
        let buckets = BucketId::for_call(&caller.service, &caller.action);
        if let Err(bucket) = throttle.admit(&caller.access_key_id, buckets, Instant::now()) {
            tracing::debug!(key = %caller.access_key_id, action = %caller.action, ?bucket, "throttled");
            record(Outcome::Throttled);
            return Ok(faults::throttling_error(caller.wire()));
        }
    }
    let resp = match (caller.service.as_str(), caller.action.as_str()) {
        ("ec2", "RunInstances") => ec2::run_instances(shared, parts, body).await,
        ("ec2", "DescribeInstances") => ec2::describe_instances(shared, parts, body).await,
        ("ec2", action @ ("CreateTags" | "DeleteTags")) => {
            ec2::write_tags(shared, parts, body, action).await
        }
        ("ec2", "StartInstances" | "StopInstances" | "TerminateInstances") => {
            ec2::change_state(shared, parts, body).await
        }
        ("elasticloadbalancing", _) => elb::handle(shared, parts, body).await,
        ("ssm" | "secretsmanager", _) => secrets::handle(shared, &caller, parts, body).await,
        _ => shared.pass(parts, body).await,
    };
    record(Outcome::Answered(resp.status().as_u16()));
    Ok(resp)
}

impl Shared {
    fn set_age(&self, instance_id: &str, by: std::time::Duration) {
        let mut ages = self.ages.lock().unwrap_or_else(|p| p.into_inner());
        if by.is_zero() {
            ages.remove(instance_id);
        } else {
            ages.insert(instance_id.to_string(), by);
        }
    }

    /// What listings do not show yet (a panicked holder left it usable:
    /// every change it records is whole).
    fn consistency(&self) -> std::sync::MutexGuard<'_, Consistency> {
        self.consistency.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ages(&self) -> HashMap<String, std::time::Duration> {
        self.ages.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_capacity(&self, subnet: &str, capacity: Capacity) {
        let mut map = self.capacity.lock().unwrap_or_else(|p| p.into_inner());
        if capacity == Capacity::Available {
            map.remove(subnet);
        } else {
            map.insert(subnet.to_string(), capacity);
        }
    }

    fn capacities(&self) -> BTreeMap<String, Capacity> {
        self.capacity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends the caller's request to moto; its whole answer, or the
    /// gateway's own 502 when moto cannot be reached.
    async fn send(
        &self,
        parts: &hyper::http::request::Parts,
        body: Bytes,
    ) -> Result<(hyper::http::response::Parts, Bytes), Response<Full<Bytes>>> {
        let mut upstream_uri = hyper::http::uri::Parts::from(self.upstream.clone());
        upstream_uri.path_and_query = parts.uri.path_and_query().cloned();
        let Ok(uri) = Uri::from_parts(upstream_uri) else {
            return Err(plain(StatusCode::BAD_REQUEST, "bad request URI"));
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = upstream_headers(&parts.headers);
        self.exchange(req).await
    }

    /// [`send`](Self::send), answered as it came.
    async fn pass(&self, parts: hyper::http::request::Parts, body: Bytes) -> Response<Full<Bytes>> {
        match self.send(&parts, body).await {
            Ok((parts, body)) => Response::from_parts(parts, Full::new(body)),
            Err(resp) => resp,
        }
    }

    async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(hyper::http::response::Parts, Bytes), Response<Full<Bytes>>> {
        let resp = self.client.request(req).await.map_err(|e| {
            plain(
                StatusCode::BAD_GATEWAY,
                &format!("moto unreachable: {}", crate::aws::error_chain(&e)),
            )
        })?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| {
                plain(
                    StatusCode::BAD_GATEWAY,
                    &format!("moto's answer broke: {e}"),
                )
            })?
            .to_bytes();
        Ok((parts, body))
    }

    /// The gateway's own EC2 query to moto (signed like the caller's
    /// request, so moto picks the same region), parsed.
    async fn internal(&self, like: &HeaderMap, form: &ec2::Form) -> Result<Document, String> {
        let mut req = Request::new(Full::new(ec2::encode_form(form)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.upstream.clone();
        if let Some(auth) = like.get(AUTHORIZATION) {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        req.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        let (parts, body) = self
            .exchange(req)
            .await
            .map_err(|r| format!("HTTP {}", r.status()))?;
        let text = std::str::from_utf8(&body).map_err(|e| e.to_string())?;
        if !parts.status.is_success() {
            return Err(format!(
                "HTTP {}: {}",
                parts.status,
                text.chars().take(300).collect::<String>()
            ));
        }
        Document::parse(text).map_err(|e| e.to_string())
    }
}

/// The caller's headers for moto: the body may have been rewritten, so its
/// length is hyper's to set again.
fn upstream_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    out.remove(CONTENT_LENGTH);
    out.remove(TRANSFER_ENCODING);
    out
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(text.to_string())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> hyper::http::request::Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn auth(key: &str, service: &str) -> String {
        format!("AWS4-HMAC-SHA256 Credential={key}/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=abc")
    }

    #[test]
    fn callers_are_read_from_the_credential_scope_and_protocol() {
        let ec2 = Caller::identify(
            &parts("POST", "/", &[("authorization", &auth("AKID1", "ec2"))]),
            b"Action=RunInstances&Version=2016-11-15",
        );
        assert_eq!(
            ec2,
            Caller {
                access_key_id: "AKID1".into(),
                service: "ec2".into(),
                action: "RunInstances".into()
            }
        );
        let ddb = Caller::identify(
            &parts(
                "POST",
                "/",
                &[
                    ("authorization", &auth("AKID2", "dynamodb")),
                    ("x-amz-target", "DynamoDB_20120810.PutItem"),
                ],
            ),
            b"{}",
        );
        assert_eq!(
            (ddb.service.as_str(), ddb.action.as_str()),
            ("dynamodb", "PutItem")
        );
        let s3 = Caller::identify(
            &parts("PUT", "/bucket/key", &[("authorization", &auth("K", "s3"))]),
            b"",
        );
        assert_eq!(s3.action, "PutObject");
        let cw = Caller::identify(
            &parts(
                "POST",
                "/service/GraniteServiceVersion20100801/operation/PutMetricData",
                &[("authorization", &auth("K", "monitoring"))],
            ),
            b"\xa0",
        );
        assert_eq!(cw.action, "PutMetricData");
        let none = Caller::identify(&parts("GET", "/moto-api/", &[]), b"");
        assert_eq!(
            (none.access_key_id.as_str(), none.service.as_str()),
            ("anonymous", "unsigned")
        );
    }
}
