//! The self-healing probe's HTTP client: one kept-alive HTTP/1.1
//! connection per node, reused from round to round.
//!
//! Why not `reqwest`: at 10,000 nodes a round through it cost ~140 µs of
//! CPU per probe, most of it setting up a new TCP connection and the
//! client's per-request machinery (BENCHMARKS.md, section 2). A probe here
//! is one `write` and one or two `read`s on a connection that already
//! exists. It still detects what the probe is for:
//! - a node whose app died: the kept connection reads EOF or a reset, the
//!   probe retries once on a fresh connection, which is refused;
//! - a node that hangs: nothing answers within the timeout (a hung answer
//!   on a kept connection is never retried: that would double the wait);
//! - a wrong answer: any status but 2xx/3xx, as for the bring-up check.
//!
//! A connection is put back only when its answer was complete and the
//! server did not ask to close it (`Connection: close`, HTTP/1.0, a body
//! without a length); any doubt closes it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::effects::health::ProbeFailure;

/// Longest response head (status line + headers) a probe reads.
const MAX_HEAD: usize = 16 * 1024;
/// Longest body a probe reads; a longer one closes the connection.
const MAX_BODY: usize = 64 * 1024;

/// Where one node is probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// The request bytes (`GET <path> HTTP/1.1`, `Host`), built once.
    request: Arc<[u8]>,
    pub timeout: Duration,
}

impl Target {
    pub fn new(ip: IpAddr, check: &hangar_crds::HealthCheck) -> Target {
        let addr = SocketAddr::new(ip, check.port);
        let path = if check.path.starts_with('/') {
            check.path.clone()
        } else {
            format!("/{}", check.path)
        };
        let host = match ip {
            IpAddr::V4(v4) => format!("{v4}:{}", check.port),
            IpAddr::V6(v6) => format!("[{v6}]:{}", check.port),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: hangar-probe\r\nAccept: */*\r\n\r\n"
        );
        Target {
            addr,
            request: request.into_bytes().into(),
            timeout: check.timeout.get(),
        }
    }
}

/// Kept-alive connections by node id, shared by every probe round.
#[derive(Clone)]
pub struct Connections {
    idle: Arc<Mutex<HashMap<String, (SocketAddr, TcpStream)>>>,
    /// Most connections kept idle: each is a file descriptor.
    max_idle: usize,
}

/// What one probe did, for tests and the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probed {
    pub status: u16,
    /// The answer came on a connection kept from an earlier probe.
    pub reused: bool,
}

impl Connections {
    pub fn new(max_idle: usize) -> Connections {
        Connections {
            idle: Arc::default(),
            max_idle,
        }
    }

    /// Connections kept now.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    /// Closes the connections of nodes not in `keep`.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|node, _| keep(node));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (SocketAddr, TcpStream)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One probe of `node`, within `target.timeout` overall.
    pub async fn probe(&self, node: &str, target: &Target) -> Result<Probed, ProbeFailure> {
        let deadline = Instant::now() + target.timeout;
        let kept = self
            .lock()
            .remove(node)
            .filter(|(addr, _)| *addr == target.addr)
            .map(|(_, c)| c);
        if let Some(mut conn) = kept {
            match exchange(&mut conn, target, deadline).await {
                Ok(answer) => return self.finish(node, target, conn, answer, true),
                // The node closed the kept connection (idle timeout,
                // restart): say nothing yet, ask once on a fresh one.
                Err(Failure::Closed) => {}
                Err(Failure::Probe(f)) => return Err(f),
            }
        }
        let connect = tokio::time::timeout_at(deadline, TcpStream::connect(target.addr)).await;
        let mut conn = match connect {
            Err(_) => return Err(ProbeFailure::TimedOut(target.timeout)),
            Ok(Err(e)) => return Err(ProbeFailure::Connect(e.to_string())),
            Ok(Ok(c)) => c,
        };
        let _ = conn.set_nodelay(true);
        match exchange(&mut conn, target, deadline).await {
            Ok(answer) => self.finish(node, target, conn, answer, false),
            Err(Failure::Closed) => Err(ProbeFailure::Connect(
                "connection closed before an answer".into(),
            )),
            Err(Failure::Probe(f)) => Err(f),
        }
    }

    fn finish(
        &self,
        node: &str,
        target: &Target,
        conn: TcpStream,
        answer: Answer,
        reused: bool,
    ) -> Result<Probed, ProbeFailure> {
        if answer.keep_alive {
            let mut idle = self.lock();
            if idle.len() < self.max_idle || idle.contains_key(node) {
                idle.insert(node.to_string(), (target.addr, conn));
            }
        }
        // 2xx and 3xx, as the spec reference promises (see `health`).
        if (200..400).contains(&answer.status) {
            Ok(Probed {
                status: answer.status,
                reused,
            })
        } else {
            Err(ProbeFailure::Status(answer.status))
        }
    }
}

/// A complete answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    keep_alive: bool,
}

enum Failure {
    /// The connection ended before any byte of an answer.
    Closed,
    Probe(ProbeFailure),
}

/// Sends the request and reads one whole answer by `deadline`.
async fn exchange(
    conn: &mut TcpStream,
    target: &Target,
    deadline: Instant,
) -> Result<Answer, Failure> {
    let timed_out = || Failure::Probe(ProbeFailure::TimedOut(target.timeout));
    match tokio::time::timeout_at(deadline, conn.write_all(&target.request)).await {
        Err(_) => return Err(timed_out()),
        Ok(Err(_)) => return Err(Failure::Closed),
        Ok(Ok(())) => {}
    }
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    // The head.
    let (status, keep_alive, framing, head_len) = loop {
        let n = match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(_)) | Ok(Ok(0)) if buf.is_empty() => return Err(Failure::Closed),
            Ok(Err(e)) => return Err(Failure::Probe(ProbeFailure::Other(e.to_string()))),
            Ok(Ok(0)) => {
                return Err(Failure::Probe(ProbeFailure::Other(
                    "connection closed inside the answer's head".into(),
                )))
            }
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf) {
            Ok(Some(head)) => break head,
            Ok(None) if buf.len() < MAX_HEAD => continue,
            Ok(None) => return Err(bad("answer head too long")),
            Err(e) => return Err(bad(&e)),
        }
    };
    let mut body = buf.split_off(head_len);
    // The body: read to its end so the connection can carry the next probe.
    let complete = match framing {
        Framing::Length(n) if n > MAX_BODY => false,
        Framing::Length(n) => {
            while body.len() < n {
                let got = read_more(conn, &mut body, &mut chunk, deadline).await;
                if !got.map_err(|_| timed_out())? {
                    break;
                }
            }
            body.len() == n
        }
        Framing::Chunked => loop {
            match chunked_end(&body) {
                Ok(Some(end)) => break end == body.len(),
                Ok(None) if body.len() < MAX_BODY => {
                    if !read_more(conn, &mut body, &mut chunk, deadline)
                        .await
                        .map_err(|_| timed_out())?
                    {
                        break false;
                    }
                }
                Ok(None) | Err(()) => break false,
            }
        },
        Framing::UntilClose => false,
    };
    Ok(Answer {
        status,
        keep_alive: keep_alive && complete,
    })
}

fn bad(why: &str) -> Failure {
    Failure::Probe(ProbeFailure::Other(format!("not an HTTP answer: {why}")))
}

/// Reads more bytes into `into`; `Ok(false)` at EOF or on an error (the
/// answer is then incomplete), `Err` on the deadline.
async fn read_more(
    conn: &mut TcpStream,
    into: &mut Vec<u8>,
    chunk: &mut [u8],
    deadline: Instant,
) -> Result<bool, ()> {
    match tokio::time::timeout_at(deadline, conn.read(chunk)).await {
        Err(_) => Err(()),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(false),
        Ok(Ok(n)) => {
            into.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// `(status, keep-alive, framing, head length)` once the head is complete.
#[allow(clippy::type_complexity)]
fn parse_head(buf: &[u8]) -> Result<Option<(u16, bool, Framing, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let status = resp.code.ok_or("no status code")?;
    let mut keep_alive = resp.version == Some(1);
    let mut framing = Framing::UntilClose;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("connection") {
            if value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep_alive = false;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value
                .rsplit(',')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
            {
                framing = Framing::Chunked;
            } else {
                keep_alive = false;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            match value.parse() {
                Ok(n) => framing = Framing::Length(n),
                Err(_) => return Err(format!("bad Content-Length {value:?}")),
            }
        }
    }
    // Answers that never have a body (RFC 9112, section 6.3).
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    if (100..200).contains(&status) {
        // An interim answer; the probe does not wait for the final one.
        keep_alive = false;
    }
    Ok(Some((status, keep_alive, framing, len)))
}

/// Where a chunked body ends (after the last chunk and the trailers), or
/// `None` while incomplete.
fn chunked_end(body: &[u8]) -> Result<Option<usize>, ()> {
    let mut at = 0;
    loop {
        let Some(line_end) = find_crlf(&body[at..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&body[at..at + line_end]).map_err(|_| ())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ())?;
        at += line_end + 2;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                let Some(end) = find_crlf(&body[at..]) else {
                    return Ok(None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if size > MAX_BODY {
            return Err(());
        }
        if body.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_framed_as_http_1_1_says() {
        let h = |s: &str| parse_head(s.as_bytes()).unwrap().unwrap();
        assert_eq!(
            h("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"),
            (200, true, Framing::Length(3), 38)
        );
        let (_, ka, f, _) = h("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(ka);
        assert_eq!(f, Framing::Chunked);
        let (_, ka, _, _) = h("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!ka);
        let (_, ka, f, _) = h("HTTP/1.0 200 OK\r\n\r\n");
        assert!(!ka);
        assert_eq!(f, Framing::UntilClose);
        let (s, _, f, _) = h("HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n");
        assert_eq!((s, f), (304, Framing::Length(0)));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        assert!(parse_head(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_end_after_the_last_chunk_and_trailers() {
        assert_eq!(chunked_end(b"3\r\nok\n\r\n0\r\n\r\n"), Ok(Some(13)));
        assert_eq!(
            chunked_end(b"3;x=y\r\nok\n\r\n0\r\nT: 1\r\n\r\n"),
            Ok(Some(23))
        );
        assert_eq!(chunked_end(b"3\r\nok\n\r\n0\r\n"), Ok(None));
        assert_eq!(chunked_end(b"3\r\nok"), Ok(None));
        assert_eq!(chunked_end(b"zz\r\n"), Err(()));
    }
}
