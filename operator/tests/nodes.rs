//! SSH runbooks and release shipping against real OpenSSH nodes
//! (`hangar_local::node`): sshd on loopback addresses, each node in its own
//! mount namespace with a private `/srv`. Needs root, `unshare` and sshd
//! (the harness names the fix when one is missing).
//!
//! Every node is stopped (every process in it killed by PID) when its
//! `TestNode` drops — also when an assertion panics.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar::effects::release::{self, Artifact, ReleaseConfig, ReleaseError};
use hangar::effects::runbook::{self, Facts, Outcome, Runbook};
use hangar::effects::ssh::{
    Credentials, HostKeyError, HostKeyVerifier, Redactor, SshError, SshPool, SshSettings, Target,
};
use hangar_local::node::{ClientKey, TestNode};
use sha2::{Digest, Sha256};

const APP_ROOT: &str = "/srv/app";

struct Fixture {
    dir: tempfile::TempDir,
    key: ClientKey,
    nodes: Vec<TestNode>,
}

impl Fixture {
    fn new(nodes: usize) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ClientKey::generate(&dir.path().join("keys"), "client").expect("client key");
        let nodes = (0..nodes)
            .map(|i| {
                TestNode::start(dir.path(), &format!("node{i}"), &[&key.public_key])
                    .unwrap_or_else(|e| panic!("starting node: {e}"))
            })
            .collect();
        Fixture { dir, key, nodes }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("hangar-state")
    }

    fn settings(&self) -> SshSettings {
        let mut s = SshSettings::new(
            Credentials::from_key_file("root", &self.key.private_key).expect("key"),
            HostKeyVerifier::tofu(&self.state_dir()),
        );
        s.connect_timeout = Duration::from_secs(5);
        s.command_timeout = Duration::from_secs(60);
        s
    }

    fn pool(&self) -> SshPool {
        SshPool::new(self.settings(), Redactor::default())
    }

    fn target(&self, i: usize) -> Target {
        target_of(&self.nodes[i])
    }

    fn facts(&self, i: usize) -> Facts {
        Facts {
            instance_id: format!("i-node{i}"),
            private_ip: self.nodes[i].ip().to_string(),
            app_root: APP_ROOT.into(),
            health_path: "/health".into(),
            health_port: 80,
        }
    }

    /// A release tarball: `public/index.html` says the id; `health` decides
    /// whether `public/health` exists; `fail_5xx` adds the FAIL_5XX marker.
    fn tarball(&self, id: &str, health: bool, fail_5xx: bool) -> Artifact {
        let src = self.dir.path().join("src").join(id);
        std::fs::create_dir_all(src.join("public")).unwrap();
        std::fs::create_dir_all(src.join("storage/logs")).unwrap();
        std::fs::write(src.join("public/index.html"), format!("release {id}\n")).unwrap();
        std::fs::write(
            src.join("storage/logs/seed.log"),
            "seeded by first release\n",
        )
        .unwrap();
        if health {
            std::fs::write(src.join("public/health"), "ok\n").unwrap();
        }
        if fail_5xx {
            std::fs::write(src.join("FAIL_5XX"), "").unwrap();
        }
        let out = self.dir.path().join(format!("{id}.tar.gz"));
        let status = std::process::Command::new("tar")
            .arg("-czf")
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let sha = hex::encode(Sha256::digest(std::fs::read(&out).unwrap()));
        Artifact::new(out, sha)
    }
}

fn target_of(node: &TestNode) -> Target {
    Target::new(
        format!("i-{}", node.name()),
        IpAddr::V4(node.ip()),
        node.port(),
    )
}

fn static_http() -> Runbook {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/static-http.yaml");
    Runbook::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn release_config(keep: u32) -> ReleaseConfig {
    ReleaseConfig {
        shared_paths: vec!["storage/logs".into()],
        keep,
        ..ReleaseConfig::new(APP_ROOT)
    }
}

/// GET from the node's HTTP server: (status, body, X-Release).
async fn http_get(node: &TestNode, path: &str) -> (u16, String, String) {
    let client = hangar::effects::health::client().unwrap();
    let resp = client
        .get(format!("http://{}:80{path}", node.ip()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", node.ip()));
    let status = resp.status().as_u16();
    let release = resp
        .headers()
        .get("x-release")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, resp.text().await.unwrap_or_default(), release)
}

async fn provision(fx: &Fixture, i: usize, pool: &SshPool) -> runbook::RunbookReport {
    let plan = static_http().plan(&BTreeMap::new(), &fx.facts(i)).unwrap();
    let session = pool.session(&fx.target(i)).await.unwrap();
    runbook::apply(&session, &plan).await
}

/// Polls `probe` until it holds or the deadline passes (no blind sleeps).
async fn eventually(what: &str, deadline: Duration, mut probe: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !probe() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_provision_then_rerun_changes_nothing() {
    let fx = Fixture::new(1);
    let pool = fx.pool();

    let first = provision(&fx, 0, &pool).await;
    assert!(first.succeeded(), "{first}");
    assert_eq!(first.changed(), first.planned, "{first}");
    let node = &fx.nodes[0];
    node.exec_inside_ok("test -d /srv/app/releases && test -d /srv/app/shared")
        .unwrap();
    // The server runs, bound to the node's IP, and no release is active yet.
    let (status, _, _) = http_get(node, "/health").await;
    assert_eq!(status, 404);
    // Nothing leaked to the host's /srv.
    assert!(!Path::new("/srv/app").exists());

    let again = provision(&fx, 0, &pool).await;
    assert!(again.succeeded(), "{again}");
    assert_eq!(again.changed(), 0, "{again}");
    assert_eq!(again.unchanged(), again.planned, "{again}");
    assert!(again.to_string().contains("nothing changed"), "{again}");
    // The server was not restarted (same pid).
    let pid1 = node
        .exec_inside_ok("cat /run/hangar-static-http.pid")
        .unwrap();
    let third = provision(&fx, 0, &pool).await;
    assert_eq!(third.changed(), 0, "{third}");
    assert_eq!(
        node.exec_inside_ok("cat /run/hangar-static-http.pid")
            .unwrap(),
        pid1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_stops_the_runbook() {
    let fx = Fixture::new(1);
    let rb = Runbook::parse(
        r#"
name: failing
steps:
  - name: first
    run: touch /srv/first
    creates: /srv/first
  - name: broken
    run: echo "disk on fire" >&2; exit 3
    unless: "false"
  - name: never
    run: touch /srv/never
    creates: /srv/never
"#,
        Path::new("inline.yaml"),
    )
    .unwrap();
    let plan = rb.plan(&BTreeMap::new(), &fx.facts(0)).unwrap();
    let pool = fx.pool();
    let session = pool.session(&fx.target(0)).await.unwrap();
    let report = runbook::apply(&session, &plan).await;
    assert!(!report.succeeded());
    assert_eq!(report.steps.len(), 2, "{report}");
    assert_eq!(report.steps[0].outcome, Outcome::Changed);
    let failed = report.failure().expect("a failure");
    assert_eq!(failed.name, "broken");
    let Outcome::Failed { error } = &failed.outcome else {
        unreachable!()
    };
    assert!(
        error.contains("exit 3") && error.contains("disk on fire"),
        "{error}"
    );
    let node = &fx.nodes[0];
    node.exec_inside_ok("test -e /srv/first").unwrap();
    assert!(!node
        .exec_inside("test -e /srv/never")
        .unwrap()
        .status
        .success());
    let err = report.into_result().unwrap_err().to_string();
    assert!(err.contains("broken"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_ship_activate_and_prune_to_keep() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    assert!(provision(&fx, 0, &pool).await.succeeded());
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(3);
    let node = &fx.nodes[0];

    for (n, id) in ["r1", "r2", "r3", "r4"].iter().enumerate() {
        let artifact = fx.tarball(id, true, false);
        let shipped = release::ship(&session, &config, id, &artifact)
            .await
            .unwrap();
        assert!(shipped.uploaded);
        let again = release::ship(&session, &config, id, &artifact)
            .await
            .unwrap();
        assert!(!again.uploaded, "a complete release is not shipped twice");
        let report = release::activate(&session, &config, id).await.unwrap();
        assert_eq!(report.id, *id);
        let (status, body, served) = http_get(node, "/").await;
        assert_eq!(
            (status, body.as_str(), served.as_str()),
            (200, &*format!("release {id}\n"), *id)
        );
        assert_eq!(http_get(node, "/health").await.0, 200);
        if n == 0 {
            // The app writes into a shared path…
            node.exec_inside_ok("echo kept > /srv/app/current/storage/logs/app.log")
                .unwrap();
        }
    }
    // …and it survives every later release; the seed never overwrites it.
    assert_eq!(
        node.exec_inside_ok("cat /srv/app/current/storage/logs/app.log")
            .unwrap(),
        "kept\n"
    );
    assert_eq!(
        node.exec_inside_ok("readlink /srv/app/releases/r4/storage/logs")
            .unwrap(),
        "/srv/app/shared/storage/logs\n"
    );
    let state = release::read_state(&session, &config).await.unwrap();
    assert_eq!(state.active.as_deref(), Some("r4"));
    assert_eq!(state.previous.as_deref(), Some("r3"));
    assert_eq!(state.releases, vec!["r2", "r3", "r4"]);
    assert!(state.staging.is_empty());
    assert!(!node
        .exec_inside("test -e /srv/app/releases/r1")
        .unwrap()
        .status
        .success());
    assert_eq!(
        node.exec_inside_ok("readlink /srv/app/current").unwrap(),
        "/srv/app/releases/r4\n"
    );
}

/// A release id is a name, not a content: republished with another
/// artifact (a rebuilt tarball under the same id), the node gets the new
/// one — never a fleet silently mixing two builds under one id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_id_republished_with_another_artifact_is_shipped_again() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    assert!(provision(&fx, 0, &pool).await.succeeded());
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(3);
    let node = &fx.nodes[0];
    let first = fx.tarball("first-build", true, false);
    release::ship(&session, &config, "r1", &first)
        .await
        .unwrap();
    release::activate(&session, &config, "r1").await.unwrap();
    assert_eq!(http_get(node, "/").await.1, "release first-build\n");

    let rebuilt = fx.tarball("second-build", true, false);
    assert_ne!(first.sha256, rebuilt.sha256);
    let shipped = release::ship(&session, &config, "r1", &rebuilt)
        .await
        .unwrap();
    assert!(
        shipped.uploaded,
        "the name alone must not reuse releases/r1"
    );
    release::activate(&session, &config, "r1").await.unwrap();
    assert_eq!(http_get(node, "/").await.1, "release second-build\n");
    let again = release::ship(&session, &config, "r1", &rebuilt)
        .await
        .unwrap();
    assert!(!again.uploaded, "the same artifact is not shipped twice");
    let state = release::read_state(&session, &config).await.unwrap();
    assert_eq!(state.releases, vec!["r1"]);
    assert!(state.staging.is_empty(), "{:?}", state.staging);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_before_activate_hook_keeps_the_old_release_serving() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    assert!(provision(&fx, 0, &pool).await.succeeded());
    let session = pool.session(&fx.target(0)).await.unwrap();
    let node = &fx.nodes[0];
    let good = release_config(5);
    release::deploy(&session, &good, "good", &fx.tarball("good", true, false))
        .await
        .unwrap();

    let bad = ReleaseConfig {
        before_activate: vec![
            "test \"$RELEASE_ID\" = bad && test \"$PWD\" = /srv/app/releases/bad".into(),
            "echo migration exploded >&2; exit 7".into(),
        ],
        ..release_config(5)
    };
    let err = release::deploy(&session, &bad, "bad", &fx.tarball("bad", true, false))
        .await
        .unwrap_err();
    match &err {
        ReleaseError::HookFailed {
            hook,
            status,
            output,
            ..
        } => {
            assert!(hook.contains("exit 7"), "{err}");
            assert_eq!(status, "exit 7");
            assert!(output.contains("migration exploded"), "{err}");
        }
        other => panic!("expected HookFailed, got {other}"),
    }
    let (status, body, served) = http_get(node, "/").await;
    assert_eq!((status, served.as_str()), (200, "good"), "{body}");
    let state = release::read_state(&session, &good).await.unwrap();
    assert_eq!(state.active.as_deref(), Some("good"));
    // The bad release was shipped (complete), just never activated.
    assert!(state.releases.contains(&"bad".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_mismatch_is_refused_and_nothing_is_activated() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(5);
    release::deploy(&session, &config, "r1", &fx.tarball("r1", true, false))
        .await
        .unwrap();
    let real = fx.tarball("r2", true, false);
    let wrong = Artifact::new(real.path.clone(), "0".repeat(64));
    let err = release::deploy(&session, &config, "r2", &wrong)
        .await
        .unwrap_err();
    match &err {
        ReleaseError::ChecksumMismatch { actual, .. } => assert_eq!(*actual, real.sha256),
        other => panic!("expected ChecksumMismatch, got {other}"),
    }
    let state = release::read_state(&session, &config).await.unwrap();
    assert_eq!(state.active.as_deref(), Some("r1"));
    assert_eq!(state.releases, vec!["r1"]);
    assert!(state.staging.is_empty(), "{state:?}");
    assert!(matches!(
        release::activate(&session, &config, "r2").await,
        Err(ReleaseError::NotShipped { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_upload_leaves_nothing_and_a_retry_is_clean() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(5);
    let node = &fx.nodes[0];
    // A few MB of incompressible data, so the tarball arrives in many packets.
    let src = fx.dir.path().join("src/big/public");
    std::fs::create_dir_all(&src).unwrap();
    let mut noise = vec![0u8; 4 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(src.join("blob"), &noise).unwrap();
    std::fs::write(src.join("health"), "ok\n").unwrap();
    let artifact = fx.tarball("big", true, false);
    let bytes = std::fs::read(&artifact.path).unwrap();

    // The artifact is read from a FIFO the test feeds: half of it, then the
    // test kills the node's ssh session processes, then closes the pipe.
    let fifo = fx.dir.path().join("artifact.fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let piped = Artifact::new(fifo.clone(), artifact.sha256.clone());
    let half = bytes[..bytes.len() / 2].to_vec();
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            f.write_all(&half).unwrap();
            f
        }
    });
    let ship = tokio::spawn({
        let config = config.clone();
        async move {
            let r = release::ship(&session, &config, "big", &piped).await;
            drop(session);
            r
        }
    });
    // Mid-transfer: the staging tree has started to fill.
    eventually("the upload to start", Duration::from_secs(10), || {
        node.exec_inside("test -e /srv/app/releases/big.tmp/tree/public")
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .await;
    let sessions: Vec<u32> = node
        .pids()
        .into_iter()
        .filter(|&p| p != node.listener_pid())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == "sshd")
                .unwrap_or(false)
        })
        .collect();
    assert!(!sessions.is_empty(), "no ssh session process found");
    for p in &sessions {
        kill_pid(*p);
    }
    let f = writer.join().unwrap();
    drop(f);
    let result = tokio::time::timeout(Duration::from_secs(30), ship)
        .await
        .expect("ship returns after the drop")
        .unwrap();
    let err = result.expect_err("a dropped connection must fail the ship");
    assert!(
        matches!(err, ReleaseError::Ssh(SshError::Disconnected { .. })),
        "{err}"
    );
    // Nothing activatable was left behind.
    assert!(!node
        .exec_inside("test -e /srv/app/releases/big")
        .unwrap()
        .status
        .success());

    // Retry on the same pool: it reconnects and ships cleanly.
    let session = pool.session(&fx.target(0)).await.unwrap();
    let report = release::deploy(&session, &config, "big", &artifact)
        .await
        .unwrap();
    assert_eq!(report.id, "big");
    let state = release::read_state(&session, &config).await.unwrap();
    assert_eq!(state.active.as_deref(), Some("big"));
    assert!(state.staging.is_empty(), "{state:?}");
    let remote = node
        .exec_inside_ok("sha256sum < /srv/app/releases/big/public/blob")
        .unwrap();
    assert!(
        remote.starts_with(&hex::encode(Sha256::digest(&noise))),
        "{remote}"
    );
}

/// SIGKILL by PID (processes of the test's own node only).
fn kill_pid(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_swaps_back_and_a_new_operator_reads_the_state() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    assert!(provision(&fx, 0, &pool).await.succeeded());
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(5);
    let node = &fx.nodes[0];
    assert!(matches!(
        release::rollback(&session, &config).await,
        Err(ReleaseError::NoPrevious { .. })
    ));
    release::deploy(&session, &config, "v1", &fx.tarball("v1", true, false))
        .await
        .unwrap();
    // v2 passes its health check but answers 500 elsewhere.
    release::deploy(&session, &config, "v2", &fx.tarball("v2", true, true))
        .await
        .unwrap();
    assert_eq!(http_get(node, "/").await.0, 500);
    assert_eq!(http_get(node, "/health").await.0, 200);

    assert_eq!(release::rollback(&session, &config).await.unwrap(), "v1");
    let (status, _, served) = http_get(node, "/").await;
    assert_eq!((status, served.as_str()), (200, "v1"));
    drop(session);

    // A restarted operator: new pool, same pinned host keys.
    let fresh = fx.pool();
    let session = fresh.session(&fx.target(0)).await.unwrap();
    let state = release::read_state(&session, &config).await.unwrap();
    assert_eq!(state.active.as_deref(), Some("v1"));
    assert_eq!(state.previous.as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_refused_under_tofu_and_known_hosts() {
    let fx = Fixture::new(2);
    // TOFU: first contact pins, a changed key is refused.
    let pool = fx.pool();
    pool.session(&fx.target(0))
        .await
        .unwrap()
        .run_checked("true")
        .await
        .unwrap();
    let pin = fx.state_dir().join("host-keys/i-node0.pub");
    assert!(std::fs::read_to_string(&pin)
        .unwrap()
        .starts_with("ssh-ed25519 "));
    fx.nodes[0].replace_host_key().unwrap();
    let err = fx
        .pool()
        .session(&fx.target(0))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, SshError::HostKey(HostKeyError::Changed { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("HOST KEY CHANGED"), "{err}");

    // known-hosts: listed key accepted, changed key refused, unlisted host refused.
    let known = fx.dir.path().join("known_hosts");
    std::fs::write(
        &known,
        format!("{}\n", fx.nodes[1].known_hosts_line().unwrap()),
    )
    .unwrap();
    let settings = SshSettings {
        host_keys: HostKeyVerifier::known_hosts(&known),
        ..fx.settings()
    };
    let kh = SshPool::new(settings.clone(), Redactor::default());
    kh.session(&fx.target(1))
        .await
        .unwrap()
        .run_checked("true")
        .await
        .unwrap();
    let err = kh
        .session(&fx.target(0))
        .await
        .err()
        .expect("unknown host refused");
    assert!(
        matches!(err, SshError::HostKey(HostKeyError::Unknown { .. })),
        "{err}"
    );
    fx.nodes[1].replace_host_key().unwrap();
    let err = SshPool::new(settings, Redactor::default())
        .session(&fx.target(1))
        .await
        .err()
        .expect("changed key refused");
    assert!(
        matches!(err, SshError::HostKey(HostKeyError::Changed { .. })),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_failure_is_a_clean_error_and_rsa_keys_work() {
    let fx = Fixture::new(1);
    let stranger = ClientKey::generate(&fx.dir.path().join("keys"), "stranger").unwrap();
    let settings = SshSettings {
        credentials: Credentials::from_key_file("root", &stranger.private_key).unwrap(),
        ..fx.settings()
    };
    let err = SshPool::new(settings, Redactor::default())
        .session(&fx.target(0))
        .await
        .err()
        .expect("auth must fail");
    match &err {
        SshError::AuthFailed { user, tried, .. } => {
            assert_eq!(user, "root");
            assert!(tried.contains("stranger"), "{err}");
        }
        other => panic!("expected AuthFailed, got {other}"),
    }

    // An RSA key the node trusts.
    let rsa = ClientKey::generate_rsa(&fx.dir.path().join("keys"), "rsa").unwrap();
    fx.nodes[0]
        .exec_inside_ok(&format!(
            "echo '{}' >> /run/hangar-node/authorized_keys",
            rsa.public_key
        ))
        .unwrap();
    let settings = SshSettings {
        credentials: Credentials::from_key_file("root", &rsa.private_key).unwrap(),
        ..fx.settings()
    };
    let out = SshPool::new(settings, Redactor::default())
        .session(&fx.target(0))
        .await
        .unwrap()
        .run_checked("echo rsa-ok")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "rsa-ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_have_timeouts_capped_output_and_a_node_cap() {
    let fx = Fixture::new(2);
    let mut settings = fx.settings();
    settings.max_output = 1000;
    settings.max_concurrent_nodes = 1;
    let pool = SshPool::new(settings, Redactor::default());
    let session = pool.session(&fx.target(0)).await.unwrap();
    let out = session
        .run("head -c 5000 /dev/zero; echo err >&2; exit 4")
        .await
        .unwrap();
    assert_eq!(out.status, hangar::effects::ssh::ExitStatus::Code(4));
    assert_eq!((out.stdout.len(), out.stdout_dropped), (1000, 4000));
    assert_eq!(out.stderr, b"err\n");
    let started = Instant::now();
    let err = session
        .exec(
            "sleep 30",
            hangar::effects::ssh::Stdin::Null,
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::CommandTimeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // hangar asks sshd to KILL the command (OpenSSH honours that for
    // non-root logins only) and frees the channel: the connection stays usable.
    session.run_checked("true").await.unwrap();
    // With a cap of one node, a second node waits until the first is released.
    let pending =
        tokio::time::timeout(Duration::from_millis(300), pool.session(&fx.target(1))).await;
    assert!(pending.is_err(), "the cap let a second node in");
    drop(session);
    let second = tokio::time::timeout(Duration::from_secs(5), pool.session(&fx.target(1)))
        .await
        .expect("released slot is reused")
        .unwrap();
    second.run_checked("true").await.unwrap();
}

/// Captures everything `tracing` logs while it is installed.
#[derive(Clone, Default)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn secrets_never_reach_logs_reports_or_errors() {
    const SECRET: &str = "pa55-Sw0rdfish-42";
    const ENV_SECRET: &str = "base64:Zm9vYmFyYmF6";
    let sink = LogSink::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer({
            let sink = sink.clone();
            move || sink.clone()
        })
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seen = String::new();
    rt.block_on(async {
        let fx = Fixture::new(1);
        let vars = BTreeMap::from([
            ("db_password".to_string(), SECRET.to_string()),
            ("php_version".to_string(), "8.2".to_string()),
        ]);
        let env_file = format!("APP_KEY={ENV_SECRET}\nAPP_ENV=production\n");
        let redactor =
            Redactor::from_vars(&vars, &["db_password".to_string()]).with_env_file(&env_file);
        let pool = SshPool::new(fx.settings(), redactor);
        let session = pool.session(&fx.target(0)).await.unwrap();
        let rb = Runbook::parse(
            r#"
steps:
  - name: config with a password
    file:
      path: /srv/db.conf
      mode: "0600"
      template: "password={{ vars.db_password }}\n"
  - name: a command that leaks the password
    run: echo "connecting with {{ vars.db_password }}" >&2; exit 1
    unless: "false"
"#,
            Path::new("inline.yaml"),
        )
        .unwrap();
        let plan = rb.plan(&vars, &fx.facts(0)).unwrap();
        let report = runbook::apply(&session, &plan).await;
        assert!(!report.succeeded());
        seen.push_str(&format!("{report}\n{report:?}\n"));
        seen.push_str(&report.into_result().unwrap_err().to_string());
        // The secret did reach the node (so the checks below can fail).
        assert_eq!(
            fx.nodes[0].exec_inside_ok("cat /srv/db.conf").unwrap(),
            format!("password={SECRET}\n")
        );

        let config = ReleaseConfig {
            before_activate: vec!["cat /srv/app/shared/.env >&2; exit 9".into()],
            ..release_config(5)
        };
        assert!(
            release::place_env_file(&session, &config, env_file.as_bytes())
                .await
                .unwrap()
        );
        assert!(
            !release::place_env_file(&session, &config, env_file.as_bytes())
                .await
                .unwrap()
        );
        assert_eq!(
            fx.nodes[0]
                .exec_inside_ok("stat -c %a /srv/app/shared/.env")
                .unwrap(),
            "600\n"
        );
        let err = release::deploy(&session, &config, "r1", &fx.tarball("r1", true, false))
            .await
            .unwrap_err();
        assert!(matches!(err, ReleaseError::HookFailed { .. }), "{err}");
        seen.push_str(&format!("{err}\n{err:?}\n"));
        let err = session
            .run_checked(&format!("echo {SECRET}; echo {SECRET} >&2; false"))
            .await
            .unwrap_err();
        seen.push_str(&format!("{err}\n{err:?}\n"));
    });
    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    assert!(logs.contains("runbook"), "logs were captured: {logs}");
    assert!(seen.contains(hangar::effects::ssh::MASK), "{seen}");
    for secret in [SECRET, ENV_SECRET] {
        assert!(!seen.contains(secret), "secret in errors/reports:\n{seen}");
        assert!(!logs.contains(secret), "secret in logs:\n{logs}");
    }
}

/// `release.hooks.once` on a real node: the run survives the caller going
/// away (a cancel, a lost connection, an operator crash), two callers at
/// once share one run, a finished run is never started again, and a
/// failure is kept with its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_hooks_run_once_per_release_whoever_asks_and_however_often() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    assert!(provision(&fx, 0, &pool).await.succeeded());
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(5);
    let node = &fx.nodes[0];
    release::deploy(&session, &config, "v1", &fx.tarball("v1", true, false))
        .await
        .unwrap();
    release::ship(&session, &config, "v2", &fx.tarball("v2", true, false))
        .await
        .unwrap();
    let migrate = vec![
        "test \"$RELEASE_ID\" = v2 && test \"$PWD\" = /srv/app/releases/v2".into(),
        "echo start >> \"$SHARED_PATH/migrations\"; sleep 2; echo end >> \"$SHARED_PATH/migrations\""
            .into(),
    ];
    let hour = Duration::from_secs(3600);
    let runs = || {
        node.exec_inside_ok("cat /srv/app/shared/migrations 2>/dev/null || true")
            .unwrap()
    };

    // The caller goes away while the hooks run: they go on.
    let cancel = tokio_util::sync::CancellationToken::new();
    let leave_once_started = async {
        let until = Instant::now() + Duration::from_secs(10);
        while runs().is_empty() {
            assert!(Instant::now() < until, "the once hooks never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cancel.cancel();
    };
    let (first, ()) = tokio::join!(
        release::run_once(&session, &config, "v2", &migrate, hour, &cancel),
        leave_once_started
    );
    assert!(matches!(first, Err(ReleaseError::Cancelled)), "{first:?}");
    assert_eq!(runs(), "start\n", "still running after the caller left");

    // Two operators ask at once (a restart racing a slow one): one run.
    let never = tokio_util::sync::CancellationToken::new();
    let a = release::run_once(&session, &config, "v2", &migrate, hour, &never);
    let b = release::run_once(&session, &config, "v2", &migrate, hour, &never);
    let (a, b) = tokio::join!(a, b);
    for r in [a, b] {
        assert!(matches!(r, Ok(release::OnceRun::Ran { .. })), "{r:?}");
    }
    assert_eq!(runs(), "start\nend\n");
    let again = release::run_once(&session, &config, "v2", &migrate, hour, &never)
        .await
        .unwrap();
    assert_eq!(again, release::OnceRun::AlreadyDone);
    assert_eq!(runs(), "start\nend\n", "never run a second time");
    // Shipped, hooks run, never activated: v1 still serves.
    assert_eq!(http_get(node, "/").await.2, "v1");

    // A failure is kept: asking again reports it and runs nothing.
    release::ship(&session, &config, "v3", &fx.tarball("v3", true, false))
        .await
        .unwrap();
    let failing = vec![
        "echo ran >> \"$SHARED_PATH/failures\"".into(),
        "echo 'SQLSTATE[42S01]: table exists' >&2; exit 3".into(),
        "echo never >> \"$SHARED_PATH/failures\"".into(),
    ];
    for _ in 0..2 {
        let err = release::run_once(&session, &config, "v3", &failing, hour, &never)
            .await
            .unwrap_err();
        match &err {
            ReleaseError::HookFailed { status, output, .. } => {
                assert_eq!(status, "exit status 3", "{err}");
                assert!(output.contains("table exists"), "{err}");
            }
            other => panic!("expected HookFailed, got {other}"),
        }
    }
    assert_eq!(
        node.exec_inside_ok("cat /srv/app/shared/failures").unwrap(),
        "ran\n"
    );

    // A release that is not on the node cannot run its hooks.
    let err = release::run_once(&session, &config, "v9", &migrate, hour, &never)
        .await
        .unwrap_err();
    assert!(matches!(err, ReleaseError::NotShipped { .. }), "{err}");
}

/// `release.warmup` against a real HTTP server: every path answered the
/// asked number of times; a path that never answers is named when the
/// deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_asks_each_path_until_answered_and_names_the_one_that_never_is() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    assert!(provision(&fx, 0, &pool).await.succeeded());
    let session = pool.session(&fx.target(0)).await.unwrap();
    release::deploy(
        &session,
        &release_config(5),
        "v1",
        &fx.tarball("v1", true, false),
    )
    .await
    .unwrap();
    let ip = IpAddr::V4(fx.nodes[0].ip());
    let second = Duration::from_secs(1);
    let paths = vec!["/".to_string(), "/health".to_string()];
    let warmed = hangar::effects::health::warm_up(ip, 80, &paths, 3, second, 10 * second)
        .await
        .unwrap();
    assert_eq!(warmed.answered, 6);
    let err = hangar::effects::health::warm_up(ip, 80, &["/missing".into()], 1, second, second)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/missing"), "{err}");
}
