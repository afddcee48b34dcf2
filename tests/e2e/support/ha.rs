//! Several `hangar run` processes for one owner id sharing a DynamoDB lease
//! on the local cloud: a leader and standbys. Each process is its own
//! "host" — its own state directory, HTTP port and log — and signs its AWS
//! calls with its own access key, so the gateway counts (and can block)
//! each one apart. A restarted operator is a new process with a new key:
//! its counts are its own.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar::runtime::lease::{LeaderView, RoleName};
use hangar::runtime::status::ClusterStatus;
use hangar_local::ApiCalls;

use super::operator::{free_port, log_tail, OperatorProcess};
use super::{Scenario, OWNER};

/// The lease timing a scenario runs its operators with.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    pub lease: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl LeaseTiming {
    /// Short enough for twenty failovers in a few minutes, long enough
    /// for the emulator's answers under load.
    pub fn fast() -> LeaseTiming {
        LeaseTiming {
            lease: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry: Duration::from_millis(500),
        }
    }

    /// For the kill storm: twenty-one takeovers in about a minute and a
    /// half. The emulator answers a renewal in milliseconds, so 1.5 s of
    /// renew deadline is still a wide margin.
    pub fn brisk() -> LeaseTiming {
        LeaseTiming {
            lease: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry: Duration::from_millis(400),
        }
    }

    /// hangar's (and client-go's) defaults: 15 s, 10 s, 2 s.
    pub fn defaults() -> LeaseTiming {
        LeaseTiming {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }

    /// What the issue promises: a standby takes over within lease + 5 s.
    pub fn takeover_bound(&self) -> Duration {
        self.lease + Duration::from_secs(5)
    }

    fn args(&self, defaults: bool) -> Vec<String> {
        let mut args = vec!["--lease".to_string(), "dynamodb:hangar-lease".to_string()];
        if !defaults {
            for (flag, d) in [
                ("--lease-duration", self.lease),
                ("--lease-renew-deadline", self.renew_deadline),
                ("--lease-retry-period", self.retry),
            ] {
                args.push(flag.to_string());
                args.push(format!("{}ms", d.as_millis()));
            }
        }
        args
    }
}

/// One operator process of the pair.
pub struct HaOperator {
    /// Also its AWS access key id and lease holder id.
    pub name: String,
    pub process: OperatorProcess,
    pub log: PathBuf,
    /// SIGSTOPped by the scenario: not asked (it could not answer).
    paused: bool,
}

impl HaOperator {
    /// SIGSTOP.
    pub fn pause(&mut self) {
        self.process.signal(libc::SIGSTOP);
        self.paused = true;
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        self.process.signal(libc::SIGCONT);
        self.paused = false;
    }

    /// `GET path` with a short timeout: a leader poll must not wait on a
    /// busy process.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        if self.paused {
            return None;
        }
        let addr = self.process.listen;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_string();
        Some((code, body))
    }

    pub fn leader_view(&self) -> Option<LeaderView> {
        match self.get("/api/v1/leader")? {
            (200, body) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    pub fn leads(&self) -> bool {
        self.leader_view()
            .is_some_and(|v| v.role == RoleName::Leader)
    }

    pub fn is_standby(&self) -> bool {
        self.leader_view()
            .is_some_and(|v| v.role == RoleName::Standby)
    }

    pub fn status(&self, cluster: &str) -> Option<ClusterStatus> {
        self.process.status(cluster)
    }

    pub fn metrics(&self) -> Option<String> {
        self.process.metrics()
    }

    /// `GET /readyz`: the status code and body.
    pub fn readyz(&self) -> Option<(u16, String)> {
        self.get("/readyz")
    }
}

/// Operators of one owner id, started and killed by the scenario.
pub struct HaOperators {
    timing: LeaseTiming,
    defaults: bool,
    next: u32,
    pub ops: Vec<HaOperator>,
    /// Every process ever started, by name, for the final accounting.
    pub started: Vec<String>,
}

impl HaOperators {
    pub fn new(timing: LeaseTiming) -> HaOperators {
        HaOperators {
            timing,
            defaults: false,
            next: 1,
            ops: Vec::new(),
            started: Vec::new(),
        }
    }

    /// With no lease flags at all: the defaults must be 15 s / 10 s / 2 s.
    pub fn with_defaults() -> HaOperators {
        HaOperators {
            defaults: true,
            ..HaOperators::new(LeaseTiming::defaults())
        }
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// Starts one more operator process (`op-N`); returns its index.
    pub fn start(&mut self, s: &Scenario) -> usize {
        let name = format!("op-{}", self.next);
        self.next += 1;
        let dir = s.dir().join(&name);
        let state = dir.join("state");
        std::fs::create_dir_all(&state).expect("operator state dir");
        let log = dir.join("hangar.log");
        let mut env = s.cloud.env_as(&name);
        env.push(("HANGAR_LEASE_HOLDER".into(), name.clone()));
        let process = OperatorProcess::start_with(
            &s.specs,
            &state,
            OWNER,
            &env,
            &log,
            free_port(),
            &self.timing.args(self.defaults),
        );
        self.started.push(name.clone());
        self.ops.push(HaOperator {
            name,
            process,
            log,
            paused: false,
        });
        self.ops.len() - 1
    }

    /// The index of the operator that says it leads, if exactly one does.
    pub fn leader(&self) -> Option<usize> {
        let leading: Vec<usize> = (0..self.ops.len())
            .filter(|&i| self.ops[i].leads())
            .collect();
        match leading.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Waits until one operator leads; its index and how long it took.
    pub fn wait_leader(&self, timeout: Duration) -> (usize, Duration) {
        let started = Instant::now();
        loop {
            if let Some(i) = self.leader() {
                return (i, started.elapsed());
            }
            if started.elapsed() > timeout {
                panic!("no operator led within {timeout:?}\n{}", self.logs(40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `i` says it is a standby.
    pub fn wait_standby(&self, i: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        while !self.ops[i].is_standby() {
            if started.elapsed() > timeout {
                panic!(
                    "{} did not become a standby within {timeout:?}\n{}",
                    self.ops[i].name,
                    log_tail(&self.ops[i].log, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    }

    /// `kill -9` operator `i` and forget it; returns its name.
    pub fn kill(&mut self, i: usize) -> String {
        let op = self.ops.remove(i);
        let name = op.name.clone();
        op.process.kill();
        name
    }

    /// The leader's status of `cluster` once it satisfies `pred`.
    pub fn wait_status(
        &self,
        cluster: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&ClusterStatus) -> bool,
    ) -> ClusterStatus {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < timeout {
            if let Some(i) = self.leader() {
                if let Some(st) = self.ops[i].status(cluster) {
                    if pred(&st) {
                        return st;
                    }
                    last = Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}\nlast status: {}\n{}",
            last.map(|s| serde_json::to_string_pretty(&s).unwrap_or_default())
                .unwrap_or_else(|| "none".into()),
            self.logs(60)
        );
    }

    /// The last lines of every live operator's log.
    pub fn logs(&self, lines: usize) -> String {
        self.ops
            .iter()
            .map(|o| format!("--- {} ---\n{}", o.name, log_tail(&o.log, lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The read-only actions: everything else is a change.
fn read_only(action: &str) -> bool {
    [
        "Describe", "Get", "List", "Head", "Query", "Scan", "BatchGet",
    ]
    .iter()
    .any(|p| action.starts_with(p))
}

/// Mutating calls one access key made, by `service:Action`, as the gateway
/// counted them (whatever became of them).
pub fn mutating_calls(calls: &ApiCalls, key: &str) -> std::collections::BTreeMap<String, u64> {
    calls
        .by_key
        .get(key)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.split_once(':').is_some_and(|(_, a)| !read_only(a)))
        .map(|(k, c)| (k.clone(), c.calls))
        .collect()
}

/// `(p50, p95, max)` of `samples`.
pub fn percentiles(samples: &[Duration]) -> (Duration, Duration, Duration) {
    let mut v = samples.to_vec();
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v.get(i).copied().unwrap_or_default()
    };
    (at(0.5), at(0.95), v.last().copied().unwrap_or_default())
}
