//! The gateway's admin API, for `infra/local/cloud` and scripts: unsigned
//! requests under `/_hangar/` (no S3 bucket can be called `_hangar`, and
//! every AWS SDK call is signed, so nothing else lands here).
//!
//! | request | answer |
//! |---|---|
//! | `GET /_hangar/calls` | [`super::ApiCalls`] as JSON: key → `service:Action` → counts |
//! | `POST /_hangar/calls/reset` | counters back to zero |
//! | `GET /_hangar/capacity` | subnet → `insufficient`/`unsupported` (others are available) |
//! | `POST /_hangar/capacity/SUBNET/STATE` | STATE: `available` (`on`), `insufficient` (`off`), `unsupported` |
//! | `GET /_hangar/blocks` | `[{"access_key_id", "service"}]` |
//! | `POST /_hangar/block/KEY/SERVICE`, `POST /_hangar/unblock/KEY/SERVICE` | SERVICE: a SigV4 signing name (`dynamodb`, `ec2`, `elasticloadbalancing`/`elbv2`, …) |
//! | `POST /_hangar/age/INSTANCE/SECONDS` | lists INSTANCE as launched SECONDS earlier ([`super::Gateway::age_instance`]; 0 undoes it) |
//! | `GET /_hangar/semantics` | the [`super::Semantics`] in force |

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde::Serialize;

use super::semantics::Capacity;
use super::Shared;

pub(super) const PREFIX: &str = "/_hangar/";

pub(super) fn handle(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let route: Vec<&str> = path
        .trim_start_matches(PREFIX)
        .trim_end_matches('/')
        .split('/')
        .collect();
    let write = method == Method::POST || method == Method::PUT;
    match (method == Method::GET, write, route.as_slice()) {
        (true, _, ["calls"]) => json(&shared.accounting.snapshot()),
        (_, true, ["calls", "reset"]) => {
            shared.accounting.reset();
            json(&serde_json::json!({"reset": true}))
        }
        (true, _, ["capacity"]) => json(&shared.capacities()),
        (_, true, ["capacity", subnet, state]) => match Capacity::parse(state) {
            Some(capacity) => {
                shared.set_capacity(subnet, capacity);
                json(&serde_json::json!({"subnet": subnet, "capacity": capacity}))
            }
            None => plain(
                StatusCode::BAD_REQUEST,
                &format!("capacity `{state}`: available|on, insufficient|off or unsupported"),
            ),
        },
        (true, _, ["blocks"]) => {
            #[derive(Serialize)]
            struct Block {
                access_key_id: String,
                service: String,
            }
            let blocks: Vec<Block> = shared
                .accounting
                .blocks()
                .into_iter()
                .map(|(access_key_id, service)| Block {
                    access_key_id,
                    service,
                })
                .collect();
            json(&blocks)
        }
        (_, true, [verb @ ("block" | "unblock"), key, service]) => {
            if *verb == "block" {
                shared.accounting.block(key, service);
            } else {
                shared.accounting.unblock(key, service);
            }
            let service = super::accounting::canonical_service(service);
            json(&serde_json::json!({"access_key_id": key, "service": service, "blocked": *verb == "block"}))
        }
        (_, true, ["age", instance, seconds]) => match seconds.parse::<u64>() {
            Ok(secs) => {
                shared.set_age(instance, Duration::from_secs(secs));
                json(&serde_json::json!({"instance": instance, "older_by_seconds": secs}))
            }
            Err(_) => plain(
                StatusCode::BAD_REQUEST,
                &format!("age `{seconds}`: a whole number of seconds"),
            ),
        },
        (true, _, ["semantics"]) => json(&shared.semantics),
        _ => plain(
            StatusCode::NOT_FOUND,
            "routes: GET calls, POST calls/reset, GET capacity, POST capacity/SUBNET/STATE, GET blocks, POST block/KEY/SERVICE, POST unblock/KEY/SERVICE, POST age/INSTANCE/SECONDS, GET semantics",
        ),
    }
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *resp.status_mut() = status;
    resp
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("gateway admin API at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gateway admin API: `{0}` is not http://HOST:PORT")]
    BadEndpoint(String),
    #[error("gateway admin API: malformed answer: {0:?}")]
    Malformed(String),
    #[error("gateway admin API: HTTP {status}: {body}")]
    Status { status: u16, body: String },
}

/// One blocking admin request (`method path` under `/_hangar/`) to the
/// gateway at `endpoint` (`http://127.77.0.1:4566`); the answer's body.
pub fn request(endpoint: &str, method: &str, path: &str) -> Result<String, AdminError> {
    let addr: SocketAddr = endpoint
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| AdminError::BadEndpoint(endpoint.to_string()))?;
    let io = |source| AdminError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let path = format!("{PREFIX}{}", path.trim_start_matches('/'));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| AdminError::Malformed(text.clone()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| AdminError::Malformed(head.to_string()))?;
    if !(200..300).contains(&status) {
        return Err(AdminError::Status {
            status,
            body: body.trim().to_string(),
        });
    }
    Ok(body.to_string())
}
