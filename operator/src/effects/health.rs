//! HTTP health checks against a node, the way the load balancer will see it.
//!
//! A node passes when `GET http://<ip>:<port><path>` answers 2xx or 3xx. hangar
//! retries every `interval`, gives each request `timeout`, and gives up after
//! `deadline` — generous by default (10 minutes): a cold PHP/Rails boot can
//! be slow, and a too-short deadline is a classic cause of failed deploys.
//! The last failure (refused, timed out, HTTP 503 …) is reported.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Where and how to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthProbe {
    pub url: String,
    /// Per request.
    pub timeout: Duration,
    /// Between attempts.
    pub interval: Duration,
    /// Overall: no healthy answer by then means unhealthy.
    pub deadline: Duration,
}

impl HealthProbe {
    /// The spec's `release.healthCheck` against a node's address.
    pub fn for_node(ip: IpAddr, check: &hangar_crds::HealthCheck) -> Self {
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let path = if check.path.starts_with('/') {
            check.path.clone()
        } else {
            format!("/{}", check.path)
        };
        HealthProbe {
            url: format!("http://{host}:{}{path}", check.port),
            timeout: check.timeout.get(),
            interval: check.interval.get(),
            deadline: check.deadline.get(),
        }
    }
}

/// Why one attempt failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// Nothing answered (refused, unreachable, reset).
    Connect(String),
    TimedOut(Duration),
    /// An answer, but not 2xx or 3xx.
    Status(u16),
    Other(String),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Connect(e) => write!(f, "connection failed: {e}"),
            ProbeFailure::TimedOut(t) => write!(f, "no answer within {t:?}"),
            ProbeFailure::Status(s) => write!(f, "HTTP {s}"),
            ProbeFailure::Other(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{url} not healthy after {attempts} attempt(s) in {waited:?}; last failure: {last}")]
    Unhealthy {
        url: String,
        attempts: u32,
        waited: Duration,
        last: ProbeFailure,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A healthy answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Healthy {
    pub status: u16,
    pub attempts: u32,
    pub elapsed: Duration,
}

/// A client for probes: no proxy (the environment's proxy must never see
/// node traffic), no redirects (a 3xx is not healthy), no pooled
/// connections (each probe opens one, like the load balancer).
pub fn client() -> Result<reqwest::Client, HealthError> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| HealthError::Client(e.to_string()))
}

/// One attempt.
pub async fn probe_once(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<u16, ProbeFailure> {
    let answer = tokio::time::timeout(timeout, client.get(url).timeout(timeout).send()).await;
    match answer {
        Err(_) => Err(ProbeFailure::TimedOut(timeout)),
        Ok(Err(e)) if e.is_timeout() => Err(ProbeFailure::TimedOut(timeout)),
        Ok(Err(e)) if e.is_connect() => Err(ProbeFailure::Connect(root_cause(&e))),
        Ok(Err(e)) => Err(ProbeFailure::Other(root_cause(&e))),
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            // 2xx and 3xx, as the spec reference promises: an app whose
            // health path redirects (to a login page, say) is up.
            // Redirects are not followed.
            if resp.status().is_success() || resp.status().is_redirection() {
                Ok(status)
            } else {
                Err(ProbeFailure::Status(status))
            }
        }
    }
}

/// What a warm-up did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Warmed {
    /// Requests answered 2xx/3xx.
    pub answered: u32,
    pub elapsed: Duration,
}

/// Asks each of `paths` on `ip:port` until it answers 2xx/3xx, then
/// `requests - 1` more times, all within `deadline` (then it is an error
/// naming the path that did not answer).
pub async fn warm_up(
    ip: IpAddr,
    port: u16,
    paths: &[String],
    requests: u32,
    timeout: Duration,
    deadline: Duration,
) -> Result<Warmed, HealthError> {
    let client = client()?;
    let started = Instant::now();
    let mut answered = 0;
    for path in paths {
        let url = format!("http://{}{path}", SocketAddr::new(ip, port));
        let mut ok = 0;
        let mut last = None;
        while ok < requests.max(1) {
            if started.elapsed() >= deadline {
                return Err(HealthError::Unhealthy {
                    url,
                    attempts: ok,
                    waited: started.elapsed(),
                    last: last.unwrap_or(ProbeFailure::TimedOut(deadline)),
                });
            }
            match probe_once(&client, &url, timeout).await {
                Ok(_) => {
                    ok += 1;
                    answered += 1;
                }
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    Ok(Warmed {
        answered,
        elapsed: started.elapsed(),
    })
}

/// Probes until a 2xx or 3xx answer or the deadline.
pub async fn wait_healthy(probe: &HealthProbe) -> Result<Healthy, HealthError> {
    let client = client()?;
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt_started = Instant::now();
        match probe_once(&client, &probe.url, probe.timeout).await {
            Ok(status) => {
                return Ok(Healthy {
                    status,
                    attempts,
                    elapsed: started.elapsed(),
                })
            }
            Err(last) => {
                let next = attempt_started + probe.interval;
                if next.duration_since(started) >= probe.deadline {
                    tracing::info!(url = %probe.url, attempts, %last, "health check gave up");
                    return Err(HealthError::Unhealthy {
                        url: probe.url.clone(),
                        attempts,
                        waited: started.elapsed(),
                        last,
                    });
                }
                tracing::debug!(url = %probe.url, attempts, %last, "not healthy yet");
                tokio::time::sleep_until(next.into()).await;
            }
        }
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_url_comes_from_the_spec() {
        let hc = hangar_crds::HealthCheck {
            path: "health".into(),
            port: 8080,
            ..Default::default()
        };
        let p = HealthProbe::for_node("127.77.1.2".parse().unwrap(), &hc);
        assert_eq!(p.url, "http://127.77.1.2:8080/health");
        assert_eq!(p.deadline, Duration::from_secs(600));
    }

    /// A loopback server answering every request with `status`.
    async fn answering(status: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nLocation: /login\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}/health")
    }

    #[tokio::test]
    async fn any_2xx_or_3xx_answer_is_healthy_as_the_spec_reference_says() {
        let client = client().unwrap();
        let t = Duration::from_secs(2);
        for status in [200, 204, 301, 302, 304, 308] {
            let url = answering(status).await;
            assert_eq!(
                probe_once(&client, &url, t).await.ok(),
                Some(status),
                "{status}"
            );
        }
        for status in [404, 500, 503] {
            let url = answering(status).await;
            assert!(
                matches!(probe_once(&client, &url, t).await, Err(ProbeFailure::Status(s)) if s == status),
                "{status}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_node_reports_the_last_failure_by_the_deadline() {
        // Nothing listens on this loopback port.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let probe = HealthProbe {
            url: format!("http://127.0.0.1:{port}/health"),
            timeout: Duration::from_millis(200),
            interval: Duration::from_millis(20),
            deadline: Duration::from_millis(100),
        };
        let started = Instant::now();
        let err = wait_healthy(&probe).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        let HealthError::Unhealthy { attempts, last, .. } = err else {
            panic!("unexpected {err}")
        };
        assert!(attempts >= 2, "{attempts}");
        assert!(matches!(last, ProbeFailure::Connect(_)), "{last}");
    }
}
