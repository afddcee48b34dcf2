//! SSH connections to nodes: a pool that reuses one connection per node,
//! caps how many nodes are worked on at once, and runs commands with
//! timeouts, separate stdout/stderr and size-capped output.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{cipher, ChannelMsg, Disconnect, Preferred, Sig};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::host_keys::{HostId, HostKeyError, HostKeyVerifier};
use super::redact::Redactor;

/// Like Kamal's default: at most this many nodes in flight at once.
pub const DEFAULT_MAX_CONCURRENT_NODES: usize = 30;

/// Per stream; enough for any diagnostic, small enough for thousands of nodes.
pub const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;

/// Stdin is sent in chunks this large: russh's `data(reader)` copies 8 KiB
/// at a time, which halves upload throughput.
pub const UPLOAD_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("cannot use private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{node}: connecting timed out after {after:?}")]
    ConnectTimeout { node: String, after: Duration },
    #[error("{node}: cannot connect: {reason}")]
    Connect { node: String, reason: String },
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    #[error(
        "{node}: authentication as `{user}` failed (tried {tried}); \
         is the matching public key in the node's authorized_keys for `{user}`?"
    )]
    AuthFailed {
        node: String,
        user: String,
        tried: String,
    },
    #[error("{node}: `{command}` timed out after {after:?}")]
    CommandTimeout {
        node: String,
        command: String,
        after: Duration,
    },
    #[error("{node}: `{command}` failed ({status}): {stderr}")]
    CommandFailed {
        node: String,
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{node}: connection lost during `{command}`: {reason}")]
    Disconnected {
        node: String,
        command: String,
        reason: String,
    },
    #[error("{node}: reading stdin for `{command}`: {reason}")]
    Stdin {
        node: String,
        command: String,
        reason: String,
    },
    /// The leadership term this work runs under ended: nothing was sent.
    #[error("{node}: `{command}` not run: {reason}")]
    NotLeader {
        node: String,
        command: String,
        reason: String,
    },
}

impl SshError {
    /// Whether retrying later (on a new connection) can help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SshError::ConnectTimeout { .. }
                | SshError::Connect { .. }
                | SshError::Disconnected { .. }
                | SshError::CommandTimeout { .. }
                | SshError::NotLeader { .. }
        )
    }
}

/// How a remote command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    Signal(String),
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// A finished remote command. Output is raw (not redacted): callers that
/// log or report it go through the session's [`Redactor`].
#[derive(Clone, Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    /// The first `max_output` bytes.
    pub stdout: Vec<u8>,
    /// The last `max_output` bytes (the end of stderr says what went wrong).
    pub stderr: Vec<u8>,
    /// Bytes dropped from stdout / stderr by the size cap.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub elapsed: Duration,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Who hangar logs in as, and with what.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    key: Option<(PathBuf, Arc<PrivateKey>)>,
    /// Also offer the ssh-agent's keys (`SSH_AUTH_SOCK`).
    pub use_agent: bool,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("key", &self.key.as_ref().map(|(p, _)| p))
            .field("use_agent", &self.use_agent)
            .finish()
    }
}

impl Credentials {
    /// A private key file (OpenSSH format, ed25519 or RSA, unencrypted);
    /// the agent is offered too when `SSH_AUTH_SOCK` is set. An encrypted
    /// key is fine when the agent holds it.
    pub fn from_key_file(user: impl Into<String>, path: &Path) -> Result<Self, SshError> {
        let use_agent = std::env::var_os("SSH_AUTH_SOCK").is_some();
        let key = match russh::keys::load_secret_key(path, None) {
            Ok(k) => Some((path.to_path_buf(), Arc::new(k))),
            Err(russh::keys::Error::KeyIsEncrypted) if use_agent => None,
            Err(e) => {
                return Err(SshError::Key {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        };
        Ok(Credentials {
            user: user.into(),
            key,
            use_agent,
        })
    }

    /// Only the ssh-agent at `SSH_AUTH_SOCK`.
    pub fn agent(user: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            key: None,
            use_agent: true,
        }
    }
}

/// Everything a pool needs to reach nodes.
#[derive(Clone, Debug)]
pub struct SshSettings {
    pub credentials: Credentials,
    pub host_keys: HostKeyVerifier,
    pub connect_timeout: Duration,
    /// Default for commands that don't set their own.
    pub command_timeout: Duration,
    pub max_output: usize,
    pub max_concurrent_nodes: usize,
    /// Cipher preference. AES-GCM first: with AES-NI it costs a fraction of
    /// ChaCha20-Poly1305 on both ends, which is what bounds a release fan-out.
    pub ciphers: Vec<cipher::Name>,
}

impl SshSettings {
    pub fn new(credentials: Credentials, host_keys: HostKeyVerifier) -> Self {
        SshSettings {
            credentials,
            host_keys,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(600),
            max_output: DEFAULT_MAX_OUTPUT,
            max_concurrent_nodes: DEFAULT_MAX_CONCURRENT_NODES,
            ciphers: vec![
                cipher::AES_128_GCM,
                cipher::AES_256_GCM,
                cipher::CHACHA20_POLY1305,
                cipher::AES_256_CTR,
                cipher::AES_128_CTR,
            ],
        }
    }

    /// Settings from a cluster spec's `ssh` block; TOFU pins live under
    /// `state_dir/host-keys`.
    pub fn from_spec(ssh: &hangar_crds::Ssh, state_dir: &Path) -> Result<Self, SshError> {
        let host_keys = match ssh.host_key_policy {
            hangar_crds::HostKeyPolicy::Tofu => HostKeyVerifier::tofu(state_dir),
            hangar_crds::HostKeyPolicy::KnownHosts => {
                let file = ssh.known_hosts_file.clone().ok_or_else(|| {
                    SshError::HostKey(HostKeyError::Store {
                        path: PathBuf::new(),
                        reason: "hostKeyPolicy known-hosts needs ssh.knownHostsFile".into(),
                    })
                })?;
                HostKeyVerifier::known_hosts(file)
            }
        };
        let mut s = SshSettings::new(
            Credentials::from_key_file(&ssh.user, &ssh.private_key_file)?,
            host_keys,
        );
        s.connect_timeout = ssh.connect_timeout.get();
        s.command_timeout = ssh.command_timeout.get();
        Ok(s)
    }
}

/// A node to connect to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub instance_id: String,
    pub ip: IpAddr,
    pub port: u16,
}

impl Target {
    pub fn new(instance_id: impl Into<String>, ip: IpAddr, port: u16) -> Self {
        Target {
            instance_id: instance_id.into(),
            ip,
            port,
        }
    }

    pub fn host_id(&self) -> HostId {
        HostId {
            instance_id: self.instance_id.clone(),
            host: self.ip.to_string(),
            port: self.port,
        }
    }
}

type Conn = Arc<Handle<ClientHandler>>;

/// Connections to nodes, reused across sessions, with a cap on how many
/// nodes are in flight. Cheap to clone.
#[derive(Clone)]
pub struct SshPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: SshSettings,
    redactor: Redactor,
    limit: Arc<Semaphore>,
    idle: Mutex<HashMap<Target, Conn>>,
    config: Arc<client::Config>,
}

impl SshPool {
    pub fn new(settings: SshSettings, redactor: Redactor) -> Self {
        let config = client::Config {
            preferred: Preferred {
                cipher: settings.ciphers.clone().into(),
                compression: (&[russh::compression::NONE][..]).into(),
                ..Preferred::default()
            },
            // Runbook steps are many tiny round trips: no Nagle delays.
            nodelay: true,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            window_size: 8 * 1024 * 1024,
            maximum_packet_size: 65535,
            ..client::Config::default()
        };
        SshPool {
            inner: Arc::new(PoolInner {
                limit: Arc::new(Semaphore::new(settings.max_concurrent_nodes.max(1))),
                settings,
                redactor,
                idle: Mutex::new(HashMap::new()),
                config: Arc::new(config),
            }),
        }
    }

    pub fn settings(&self) -> &SshSettings {
        &self.inner.settings
    }

    pub fn redactor(&self) -> &Redactor {
        &self.inner.redactor
    }

    /// A session on `target`: waits for a slot under the concurrency cap,
    /// then reuses the node's open connection or opens (and verifies) one.
    /// The slot is held until the session drops.
    pub async fn session(&self, target: &Target) -> Result<Session, SshError> {
        let permit = self
            .inner
            .limit
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SshError::Connect {
                node: target.host_id().to_string(),
                reason: "ssh pool closed".into(),
            })?;
        let conn = self.connection(target).await?;
        Ok(Session {
            pool: self.clone(),
            target: target.clone(),
            conn: tokio::sync::Mutex::new(conn),
            execs: AtomicUsize::new(0),
            _permit: permit,
        })
    }

    /// Whether something accepts TCP at the node's SSH port within
    /// `within` (or a pooled connection to it is open): a cheap knock for a
    /// booting node. A full connection attempt against a machine not up yet
    /// can sit in the kernel's SYN retries for seconds after sshd started;
    /// a short knock repeated often notices sshd within a fraction of that.
    pub async fn answers(&self, target: &Target, within: Duration) -> bool {
        if self.idle().get(target).is_some_and(|c| !c.is_closed()) {
            return true;
        }
        let addr = std::net::SocketAddr::new(target.ip, target.port);
        matches!(
            tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        )
    }

    /// Closes and forgets the connection to a node (terminated, or its host
    /// key must be checked afresh).
    pub async fn forget(&self, target: &Target) {
        let conn = self.idle().remove(target);
        if let Some(conn) = conn {
            let _ = conn
                .disconnect(Disconnect::ByApplication, "bye", "en")
                .await;
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Conn>> {
        // A panic while holding this lock leaves a plain map: still usable.
        self.inner.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connection(&self, target: &Target) -> Result<Conn, SshError> {
        let cached = self.idle().get(target).cloned();
        if let Some(conn) = cached {
            if !conn.is_closed() {
                return Ok(conn);
            }
        }
        let conn = Arc::new(self.connect(target).await?);
        self.idle().insert(target.clone(), conn.clone());
        Ok(conn)
    }

    async fn connect(&self, target: &Target) -> Result<Handle<ClientHandler>, SshError> {
        let node = target.host_id();
        let settings = &self.inner.settings;
        let rejection = Arc::new(Mutex::new(None));
        let handler = ClientHandler {
            verifier: settings.host_keys.clone(),
            node: node.clone(),
            rejection: rejection.clone(),
        };
        let started = Instant::now();
        let attempt = async {
            let connected =
                client::connect(self.inner.config.clone(), (target.ip, target.port), handler).await;
            let mut handle = match connected {
                Ok(h) => h,
                Err(e) => {
                    let rejected = rejection.lock().unwrap_or_else(|e| e.into_inner()).take();
                    return Err(match rejected {
                        Some(host_key_error) => SshError::HostKey(host_key_error),
                        None => SshError::Connect {
                            node: node.to_string(),
                            reason: e.to_string(),
                        },
                    });
                }
            };
            authenticate(&mut handle, &settings.credentials, &node).await?;
            Ok(handle)
        };
        match tokio::time::timeout(settings.connect_timeout, attempt).await {
            Ok(result) => {
                if result.is_ok() {
                    tracing::debug!(node = %node, elapsed = ?started.elapsed(), "ssh connected");
                }
                result
            }
            Err(_) => Err(SshError::ConnectTimeout {
                node: node.to_string(),
                after: settings.connect_timeout,
            }),
        }
    }
}

async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    creds: &Credentials,
    node: &HostId,
) -> Result<(), SshError> {
    let mut tried = Vec::new();
    let connection_lost = |e: russh::Error| SshError::Connect {
        node: node.to_string(),
        reason: format!("during authentication: {e}"),
    };
    if let Some((path, key)) = &creds.key {
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(connection_lost)?
            .flatten();
        let result = handle
            .authenticate_publickey(
                creds.user.clone(),
                PrivateKeyWithHashAlg::new(key.clone(), hash),
            )
            .await
            .map_err(connection_lost)?;
        if result.success() {
            return Ok(());
        }
        tried.push(format!("key {}", path.display()));
    }
    if creds.use_agent {
        match AgentClient::connect_env().await {
            Ok(mut agent) => {
                let identities = agent.request_identities().await.unwrap_or_default();
                let count = identities.len();
                for identity in identities {
                    let AgentIdentity::PublicKey { key, .. } = identity else {
                        continue;
                    };
                    let hash = handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(connection_lost)?
                        .flatten();
                    if let Ok(r) = handle
                        .authenticate_publickey_with(creds.user.clone(), key, hash, &mut agent)
                        .await
                    {
                        if r.success() {
                            return Ok(());
                        }
                    }
                }
                tried.push(format!("{count} ssh-agent key(s)"));
            }
            Err(e) => tried.push(format!("ssh-agent (unreachable: {e})")),
        }
    }
    if tried.is_empty() {
        tried.push("no key".into());
    }
    Err(SshError::AuthFailed {
        node: node.to_string(),
        user: creds.user.clone(),
        tried: tried.join(", "),
    })
}

/// russh callbacks: only host-key verification matters to hangar.
struct ClientHandler {
    verifier: HostKeyVerifier,
    node: HostId,
    /// Why a key was refused, for a typed error instead of "Unknown server key".
    rejection: Arc<Mutex<Option<HostKeyError>>>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.verifier.verify(&self.node, key),
            PublicKeyOrCertificate::Certificate(_) => Err(HostKeyError::Certificate {
                host: self.node.to_string(),
            }),
        };
        match verdict {
            Ok(_) => Ok(true),
            Err(e) => {
                tracing::error!(node = %self.node, error = %e, "host key refused");
                *self.rejection.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                Ok(false)
            }
        }
    }
}

/// What a command reads on stdin.
pub enum Stdin<'a> {
    Null,
    Bytes(&'a [u8]),
    /// Streamed in [`UPLOAD_CHUNK`] pieces.
    Reader(&'a mut (dyn AsyncRead + Unpin + Send)),
}

/// One node, leased from the pool: commands run on its (shared) connection.
pub struct Session {
    pool: SshPool,
    target: Target,
    conn: tokio::sync::Mutex<Conn>,
    /// Commands sent on this lease: round trips are what a fleet-wide
    /// step costs, so tests and benches count them.
    execs: AtomicUsize,
    _permit: OwnedSemaphorePermit,
}

impl Session {
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn node(&self) -> HostId {
        self.target.host_id()
    }

    pub fn user(&self) -> &str {
        &self.pool.inner.settings.credentials.user
    }

    pub fn redactor(&self) -> &Redactor {
        &self.pool.inner.redactor
    }

    pub fn default_timeout(&self) -> Duration {
        self.pool.inner.settings.command_timeout
    }

    /// How many commands this session has sent to the node.
    pub fn execs(&self) -> usize {
        self.execs.load(Ordering::Relaxed)
    }

    /// Runs `command` (by the login shell) with the default timeout.
    pub async fn run(&self, command: &str) -> Result<CommandOutput, SshError> {
        self.exec(command, Stdin::Null, self.default_timeout())
            .await
    }

    /// Like [`run`](Self::run), but a non-zero exit is an error carrying
    /// the (redacted) tail of stderr.
    pub async fn run_checked(&self, command: &str) -> Result<CommandOutput, SshError> {
        let out = self.run(command).await?;
        self.check(command, out)
    }

    /// Turns a non-zero exit into [`SshError::CommandFailed`].
    pub fn check(&self, command: &str, out: CommandOutput) -> Result<CommandOutput, SshError> {
        if out.success() {
            return Ok(out);
        }
        Err(SshError::CommandFailed {
            node: self.node().to_string(),
            command: self.redactor().redact(command),
            status: out.status.clone(),
            stderr: tail(&self.redactor().redact_bytes(&out.stderr), 2000),
        })
    }

    /// Runs `command` with `stdin` and a timeout. Opening the channel
    /// reconnects once if the pooled connection has died; the command
    /// itself is never retried (it may not be safe to run twice).
    pub async fn exec(
        &self,
        command: &str,
        stdin: Stdin<'_>,
        timeout: Duration,
    ) -> Result<CommandOutput, SshError> {
        let started = Instant::now();
        let shown = || self.redactor().redact(command);
        // Before anything reaches the node: a term that ended changes nothing.
        if let Err(reason) = crate::effects::gate::check() {
            return Err(SshError::NotLeader {
                node: self.node().to_string(),
                command: shown(),
                reason,
            });
        }
        let channel = self.open_channel(command).await?;
        self.execs.fetch_add(1, Ordering::Relaxed);
        let (mut read, write) = channel.split();
        let run = async {
            write
                .exec(true, command)
                .await
                .map_err(|e| self.disconnected(command, e.to_string()))?;
            let write = &write;
            let max = self.pool.inner.settings.max_output;
            let send = async {
                match stdin {
                    Stdin::Null => {}
                    Stdin::Bytes(bytes) => {
                        for chunk in bytes.chunks(UPLOAD_CHUNK) {
                            write.data_bytes(chunk.to_vec()).await.map_err(|e| {
                                self.disconnected(command, format!("sending stdin: {e}"))
                            })?;
                        }
                    }
                    Stdin::Reader(reader) => loop {
                        let mut buf = vec![0u8; UPLOAD_CHUNK];
                        let n = read_full(reader, &mut buf)
                            .await
                            .map_err(|e| SshError::Stdin {
                                node: self.node().to_string(),
                                command: shown(),
                                reason: e.to_string(),
                            })?;
                        if n == 0 {
                            break;
                        }
                        buf.truncate(n);
                        write.data_bytes(buf).await.map_err(|e| {
                            self.disconnected(command, format!("sending stdin: {e}"))
                        })?;
                    },
                }
                write
                    .eof()
                    .await
                    .map_err(|e| self.disconnected(command, format!("sending eof: {e}")))
            };
            let recv = async {
                let mut stdout = Capture::head(max);
                let mut stderr = Capture::tail(max);
                let mut status = None;
                while let Some(msg) = read.wait().await {
                    match msg {
                        ChannelMsg::Data { data } => stdout.push(&data),
                        ChannelMsg::ExtendedData { data, ext: 1 } => stderr.push(&data),
                        ChannelMsg::ExitStatus { exit_status } => {
                            status = Some(ExitStatus::Code(exit_status))
                        }
                        ChannelMsg::ExitSignal { signal_name, .. } => {
                            status = Some(ExitStatus::Signal(signal_label(&signal_name)))
                        }
                        _ => {}
                    }
                }
                (status, stdout, stderr)
            };
            // The command may finish (or die) before reading all of stdin:
            // its end ends the exchange, whatever the sender is doing.
            tokio::pin!(send);
            tokio::pin!(recv);
            let mut send_result = None;
            let (status, stdout, stderr) = loop {
                tokio::select! {
                    r = &mut send, if send_result.is_none() => send_result = Some(r),
                    done = &mut recv => break done,
                }
            };
            let Some(status) = status else {
                let reason = match send_result {
                    Some(Err(e)) => e.to_string(),
                    _ => "channel closed without an exit status".into(),
                };
                return Err(self.disconnected(command, reason));
            };
            if let Some(Err(e @ SshError::Stdin { .. })) = send_result {
                return Err(e);
            }
            Ok(CommandOutput {
                status,
                stdout_dropped: stdout.dropped,
                stderr_dropped: stderr.dropped,
                stdout: stdout.into_bytes(),
                stderr: stderr.into_bytes(),
                elapsed: started.elapsed(),
            })
        };
        let result = tokio::time::timeout(timeout, run).await;
        match result {
            Ok(result) => result,
            Err(_) => {
                // Ask sshd to KILL the command, then free the channel.
                // OpenSSH refuses signal requests for root logins
                // ("session signalling requires privilege separation"):
                // there the command runs on until it exits by itself.
                let _ = write.signal(Sig::KILL).await;
                let _ = write.close().await;
                Err(SshError::CommandTimeout {
                    node: self.node().to_string(),
                    command: shown(),
                    after: timeout,
                })
            }
        }
    }

    /// Disconnects this node's connection (also for other sessions on it).
    pub async fn close(self) {
        self.pool.forget(&self.target).await;
    }

    async fn open_channel(&self, command: &str) -> Result<russh::Channel<client::Msg>, SshError> {
        let mut conn = self.conn.lock().await;
        match conn.channel_open_session().await {
            Ok(ch) => Ok(ch),
            Err(first) => {
                if !conn.is_closed() {
                    return Err(self.disconnected(command, format!("opening channel: {first}")));
                }
                tracing::info!(node = %self.node(), "ssh connection lost; reconnecting");
                self.pool.idle().remove(&self.target);
                *conn = self.pool.connection(&self.target).await?;
                conn.channel_open_session()
                    .await
                    .map_err(|e| self.disconnected(command, format!("opening channel: {e}")))
            }
        }
    }

    fn disconnected(&self, command: &str, reason: String) -> SshError {
        SshError::Disconnected {
            node: self.node().to_string(),
            command: self.redactor().redact(command),
            reason: self.redactor().redact(&reason),
        }
    }
}

/// Reads until `buf` is full or EOF: fewer, larger packets.
async fn read_full(
    reader: &mut (dyn AsyncRead + Unpin + Send),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

fn signal_label(sig: &Sig) -> String {
    match sig {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

/// The last `max` characters of `s` (on a char boundary).
pub fn tail(s: &str, max: usize) -> String {
    let s = s.trim_end();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// Output collection with a size cap, keeping the head or the tail.
struct Capture {
    buf: Vec<u8>,
    max: usize,
    keep_tail: bool,
    dropped: u64,
}

impl Capture {
    fn head(max: usize) -> Self {
        Capture {
            buf: Vec::new(),
            max,
            keep_tail: false,
            dropped: 0,
        }
    }

    fn tail(max: usize) -> Self {
        Capture {
            keep_tail: true,
            ..Capture::head(max)
        }
    }

    fn push(&mut self, data: &[u8]) {
        if self.keep_tail {
            self.buf.extend_from_slice(data);
            if self.buf.len() > self.max {
                let excess = self.buf.len() - self.max;
                self.buf.drain(..excess);
                self.dropped += excess as u64;
            }
        } else {
            let room = self.max.saturating_sub(self.buf.len());
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            self.dropped += (data.len() - take) as u64;
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_head_or_tail_within_cap() {
        let mut head = Capture::head(4);
        head.push(b"abc");
        head.push(b"defg");
        assert_eq!(head.buf, b"abcd");
        assert_eq!(head.dropped, 3);
        let mut t = Capture::tail(4);
        t.push(b"abc");
        t.push(b"defg");
        assert_eq!(t.buf, b"defg");
        assert_eq!(t.dropped, 3);
    }

    #[test]
    fn tail_cuts_on_char_boundaries() {
        assert_eq!(tail("short", 10), "short");
        assert_eq!(tail("ééééé", 3), "…é");
    }
}
