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
        let before = session.execs();
        let report = release::activate(&session, &config, id).await.unwrap();
        assert_eq!(report.id, *id);
        assert_eq!(
            report.replaced,
            n.checked_sub(1).map(|p| format!("r{}", p + 1))
        );
        // One round trip swaps and reports the state prune decides from;
        // the prune itself is a second only when there is something to delete.
        let pruning = n == 3;
        assert_eq!(
            report.pruned,
            if pruning {
                vec!["r1".to_string()]
            } else {
                vec![]
            }
        );
        assert_eq!(session.execs() - before, 1 + usize::from(pruning));
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

/// A warm node started on the release it was stopped on is not activated
/// again (its hooks ran then); one that lacks it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_active_activates_only_a_release_that_is_not_current() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    assert!(provision(&fx, 0, &pool).await.succeeded());
    let session = pool.session(&fx.target(0)).await.unwrap();
    let node = &fx.nodes[0];
    let config = ReleaseConfig {
        after_activate: vec!["echo \"$RELEASE_ID\" >> /srv/app/shared/activations".into()],
        ..release_config(5)
    };
    let hooks_ran = || {
        node.exec_inside_ok("cat /srv/app/shared/activations")
            .unwrap_or_default()
    };
    for id in ["r1", "r2"] {
        release::ship(&session, &config, id, &fx.tarball(id, true, false))
            .await
            .unwrap();
    }
    let first = release::ensure_active(&session, &config, "r1")
        .await
        .unwrap();
    assert_eq!(first.map(|r| r.id).as_deref(), Some("r1"));
    assert_eq!(hooks_ran(), "r1\n");
    let again = release::ensure_active(&session, &config, "r1")
        .await
        .unwrap();
    assert!(again.is_none(), "r1 is current: nothing to do");
    assert_eq!(hooks_ran(), "r1\n", "no hook ran the second time");
    let next = release::ensure_active(&session, &config, "r2")
        .await
        .unwrap();
    assert_eq!(next.and_then(|r| r.replaced).as_deref(), Some("r1"));
    assert_eq!(hooks_ran(), "r1\nr2\n");
    assert_eq!(http_get(node, "/").await.2, "r2");
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
    // Mid-transfer: the staging tree has started to fill, and the first
    // half has been taken from the pipe (the rest is never written).
    eventually("the upload to start", Duration::from_secs(10), || {
        node.exec_inside("test -e /srv/app/releases/big.tmp/tree/public")
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .await;
    let f = writer.join().unwrap();
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

impl LogSink {
    /// Every trace line of this thread goes into the sink while the guard lives.
    fn capture() -> (LogSink, tracing::subscriber::DefaultGuard) {
        let sink = LogSink::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer({
                let sink = sink.clone();
                move || sink.clone()
            })
            .with_ansi(false)
            .finish();
        (sink, tracing::subscriber::set_default(subscriber))
    }
}

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
    let (sink, _guard) = LogSink::capture();
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

// ---------------------------------------------------------------------
// Delta releases: only what changed travels; the tree is verified on the
// node against the artifact's manifest before anything is activated.
// ---------------------------------------------------------------------

use hangar::effects::release::{delta, manifest, NodeView, ShipMethod};

/// A release tree built on the host with real files (modes, mtimes,
/// symlinks, hard links), packed with GNU tar like a CI job would.
fn tree_tarball(fx: &Fixture, name: &str, build: impl FnOnce(&Path)) -> Artifact {
    let src = fx.dir.path().join("trees").join(name);
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    build(&src);
    let out = fx.dir.path().join(format!("{name}.tar.gz"));
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

fn sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes a file stamped 2024-01-01, as a reproducible build would (the
/// same file in two builds then has the same mtime).
fn write(root: &Path, path: &str, content: &[u8]) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    let stamp = std::time::UNIX_EPOCH + Duration::from_secs(1_704_067_200);
    std::fs::File::options()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_modified(stamp))
        .unwrap();
}

/// Deterministic filler: `n` bytes that differ per `seed`.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The tree `tar` made of r1 of the corpus: a vendor directory of 300
/// files that never changes, and one of every kind of entry the next
/// release changes.
fn corpus_r1(root: &Path) {
    for i in 0..300 {
        write(
            root,
            &format!("vendor/pkg{}/File{i}.php", i % 12),
            &noise(i, 2048),
        );
    }
    write(root, "app/same.php", b"<?php // unchanged\n");
    write(root, "app/edit.php", b"<?php echo 'v1';\n");
    write(root, "app/same-size.php", b"<?php echo 'AAAA';\n");
    write(root, "app/gone.php", b"<?php // deleted in r2\n");
    write(root, "app/moved.php", b"<?php // moves to lib/ in r2\n");
    write(root, "app/chmod.sh", b"#!/bin/sh\necho chmod\n");
    write(root, "app/touched.txt", b"same bytes, new mtime\n");
    write(root, "dir-to-file/inner.txt", b"inner\n");
    write(root, "file-to-dir", b"a file first\n");
    write(root, "file-to-link", b"a file first\n");
    write(root, "name with spaces/é ü.txt", b"utf-8 and spaces\n");
    let long = format!("deep/{}/{}.txt", "d".repeat(90), "f".repeat(60));
    write(root, &long, b"a path longer than ustar's 100 bytes\n");
    write(root, "storage/logs/seed.log", b"seeded by r1\n");
    write(root, "public/health", b"ok\n");
    write(root, "hard/a.bin", &noise(7, 4096));
    std::fs::create_dir_all(root.join("empty-goes")).unwrap();
    std::fs::create_dir_all(root.join("empty-stays")).unwrap();
    std::os::unix::fs::symlink("app", root.join("link-moves")).unwrap();
    std::os::unix::fs::symlink("app/same.php", root.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    std::fs::hard_link(root.join("hard/a.bin"), root.join("hard/b.bin")).unwrap();
    sh(&format!(
        "cd '{}' && chmod 644 app/chmod.sh && chmod 600 app/same.php && chmod 4755 public/health \
         && chmod 700 empty-stays && touch -h -d @1704067200 app/touched.txt",
        root.display()
    ));
}

/// r2: edits (one of the same size), an addition, a deletion, a move, a
/// chmod, a touch, kinds swapped (dir↔file, file→symlink, symlink→file),
/// a retargeted symlink, directories added, removed and re-moded, a hard
/// link pair changed, and a change below a shared path.
fn corpus_r2(root: &Path) {
    corpus_r1(root);
    write(root, "app/edit.php", b"<?php echo 'version two';\n");
    write(root, "app/same-size.php", b"<?php echo 'BBBB';\n");
    write(root, "app/new.php", b"<?php // new in r2\n");
    sh(&format!(
        "cd '{}' && rm app/gone.php && mkdir -p lib && mv app/moved.php lib/moved.php \
         && chmod 755 app/chmod.sh && touch -h -d @1735689600 app/touched.txt \
         && rm -r dir-to-file && echo now-a-file > dir-to-file \
         && rm file-to-dir && mkdir file-to-dir && echo inside > file-to-dir/x \
         && rm file-to-link && ln -s public/health file-to-link \
         && rm link-to-file && echo was-a-link > link-to-file \
         && rm link-moves && ln -s lib link-moves \
         && rmdir empty-goes && mkdir -m 750 empty-new && chmod 750 app \
         && rm hard/b.bin && printf changed >> hard/a.bin && ln hard/a.bin hard/b.bin \
         && echo r2 wants this >> storage/logs/seed.log",
        root.display()
    ));
}

/// r3: back and forth from r2, a whole directory gone, another added.
fn corpus_r3(root: &Path) {
    corpus_r2(root);
    write(root, "app/edit.php", b"<?php echo 'v1';\n");
    write(root, "extra/big.bin", &noise(99, 64 * 1024));
    sh(&format!(
        "cd '{}' && rm -r 'name with spaces' && chmod 755 app && chmod 644 app/chmod.sh",
        root.display()
    ));
}

/// The r1 corpus with 3 MB more, 1 MB of which depends on `seed`.
fn with_big(seed: u64) -> impl FnOnce(&Path) {
    move |root: &Path| {
        corpus_r1(root);
        write(root, "big/stays.bin", &noise(1, 2 << 20));
        write(root, "big/changes.bin", &noise(seed, 1 << 20));
    }
}

/// Processes of the node whose command line contains `needle`.
fn node_procs(node: &TestNode, needle: &str) -> Vec<u32> {
    node.pids()
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// What the node verifies, listed: equal listings are equal trees.
fn listing(node: &TestNode, dir: &str) -> String {
    node.exec_inside_ok(&delta::tree_listing_script(dir))
        .unwrap_or_else(|e| panic!("listing {dir}: {e}"))
}

/// Ships `id` as a fresh node would get it: whole (no manifest to diff against).
async fn ship_whole(
    session: &hangar::effects::ssh::Session,
    node: &TestNode,
    id: &str,
    a: &Artifact,
) {
    node.exec_inside_ok("rm -rf /srv/app/.hangar/manifests")
        .unwrap();
    let r = release::ship(session, &release_config(5), id, a)
        .await
        .unwrap();
    assert_eq!(r.method, ShipMethod::Whole, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_ship_builds_the_same_tree_as_a_full_ship_for_every_kind_of_change() {
    let fx = Fixture::new(2);
    let pool = fx.pool();
    let (delta_node, full_node) = (&fx.nodes[0], &fx.nodes[1]);
    let on_delta = pool.session(&fx.target(0)).await.unwrap();
    let on_full = pool.session(&fx.target(1)).await.unwrap();
    // keep 2: activating r3 prunes r1 (see the end).
    let config = release_config(2);
    let releases = [
        ("r1", tree_tarball(&fx, "r1", corpus_r1)),
        ("r2", tree_tarball(&fx, "r2", corpus_r2)),
        ("r3", tree_tarball(&fx, "r3", corpus_r3)),
    ];
    for (n, (id, artifact)) in releases.iter().enumerate() {
        let report = release::ship(&on_delta, &config, id, artifact)
            .await
            .unwrap();
        release::activate(&on_delta, &config, id).await.unwrap();
        ship_whole(&on_full, full_node, id, artifact).await;
        release::activate(&on_full, &config, id).await.unwrap();
        if n == 0 {
            assert_eq!(report.method, ShipMethod::Whole, "{report:?}");
            continue;
        }
        let ShipMethod::Delta {
            base,
            files_sent,
            files_reused,
            files_hashed,
            ..
        } = &report.method
        else {
            panic!("{id} was not shipped as a delta: {report:?}");
        };
        assert_eq!(base, releases[n - 1].0);
        assert!(*files_reused >= 300, "{report:?}");
        assert!(*files_sent <= 12, "{report:?}");
        // Linked files are verified by their stat stamps, not read: only
        // what was sent or copied on the node is hashed.
        eprintln!("{id}: {report:?}");
        assert!(
            *files_hashed >= *files_sent && *files_hashed <= *files_sent + 6,
            "{report:?}"
        );
        assert!(
            report.bytes < std::fs::metadata(&artifact.path).unwrap().len() / 4,
            "{report:?}"
        );
        let dir = format!("{APP_ROOT}/releases/{id}");
        let (got, want) = (listing(delta_node, &dir), listing(full_node, &dir));
        assert!(got.lines().count() > 300, "{got}");
        assert_eq!(got, want, "{id}: the delta tree differs from the full one");
        // Unchanged files share the previous release's inode.
        let prev = format!("{APP_ROOT}/releases/{}", releases[n - 1].0);
        let inodes = delta_node
            .exec_inside_ok(&format!(
                "stat -c %i {prev}/vendor/pkg0/File0.php {dir}/vendor/pkg0/File0.php"
            ))
            .unwrap();
        let inodes: Vec<&str> = inodes.lines().collect();
        assert_eq!(inodes[0], inodes[1], "not linked: {inodes:?}");
    }
    // Shared paths behave as with a full ship: a link into shared/, whose
    // content the first release seeded and no later one overwrote.
    for node in [delta_node, full_node] {
        assert_eq!(
            node.exec_inside_ok(&format!(
                "readlink {APP_ROOT}/releases/r3/storage/logs && cat {APP_ROOT}/current/storage/logs/seed.log"
            ))
            .unwrap(),
            format!("{APP_ROOT}/shared/storage/logs\nseeded by r1\n")
        );
    }
    let state = release::read_state(&on_delta, &config).await.unwrap();
    assert!(state.staging.is_empty(), "{state:?}");
    assert_eq!(state.active.as_deref(), Some("r3"));
    // Pruning r1 unlinked inodes r3 shares, which changed their ctime; the
    // prune renewed r3's stamps under the lock (they held before it), so a
    // delta from r3 still hashes only what it receives.
    assert_eq!(state.releases, vec!["r2", "r3"], "{state:?}");
    let r4 = tree_tarball(&fx, "r4", corpus_r2);
    let report = release::ship(&on_delta, &config, "r4", &r4).await.unwrap();
    let ShipMethod::Delta {
        files_sent,
        files_hashed,
        ..
    } = report.method
    else {
        panic!("r4 was not shipped as a delta: {report:?}");
    };
    assert!(files_hashed <= files_sent + 6, "{report:?}");
    ship_whole(&on_full, full_node, "r4", &r4).await;
    let dir = format!("{APP_ROOT}/releases/r4");
    assert_eq!(listing(delta_node, &dir), listing(full_node, &dir));
}

/// Returns the manifest text a node keeps for `id`.
fn kept_manifest(node: &TestNode, id: &str) -> String {
    node.exec_inside_ok(&format!("cat {APP_ROOT}/.hangar/manifests/{id}"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_release_changed_on_the_node_is_caught_and_the_new_one_ships_whole() {
    let fx = Fixture::new(2);
    let pool = fx.pool();
    let (node, reference) = (&fx.nodes[0], &fx.nodes[1]);
    let session = pool.session(&fx.target(0)).await.unwrap();
    let on_ref = pool.session(&fx.target(1)).await.unwrap();
    let config = release_config(5);
    let r1 = tree_tarball(&fx, "r1", corpus_r1);
    let r2 = tree_tarball(&fx, "r2", corpus_r2);
    let r3 = tree_tarball(&fx, "r3", corpus_r3);
    for (id, a) in [("r2", &r2), ("r3", &r3)] {
        ship_whole(&on_ref, reference, id, a).await;
    }
    let want = |id: &str| listing(reference, &format!("{APP_ROOT}/releases/{id}"));

    // 1. One byte of r1 is rewritten in place, its size, mtime and inode
    //    kept: only the ctime tells, and the stat stamp must not hold.
    release::deploy(&session, &config, "r1", &r1).await.unwrap();
    let f = format!("{APP_ROOT}/releases/r1/vendor/pkg3/File3.php");
    let stat = format!("stat -c '%i %s %Y' {f}");
    let before = node.exec_inside_ok(&stat).unwrap();
    node.exec_inside_ok(&format!(
        "m=$(stat -c %Y {f}) && dd if={f} bs=1 count=1 2>/dev/null | tr '\\000-\\377' '\\001-\\377\\000' > /tmp/byte \
         && dd if=/tmp/byte of={f} bs=1 conv=notrunc 2>/dev/null && touch -d @$m {f} && rm /tmp/byte"
    ))
    .unwrap();
    assert_eq!(node.exec_inside_ok(&stat).unwrap(), before);
    let report = release::ship(&session, &config, "r2", &r2).await.unwrap();
    assert_shipped_whole(&report, "differs vendor/pkg3/File3.php", node, &want("r2"));
    release::activate(&session, &config, "r2").await.unwrap();

    // 2. A delta r3 shares inodes with r2; an in-place edit of the active
    //    release then changes both, and the next delta must not trust it.
    let report = release::ship(&session, &config, "r3", &r3).await.unwrap();
    assert!(
        matches!(report.method, ShipMethod::Delta { .. }),
        "{report:?}"
    );
    release::activate(&session, &config, "r3").await.unwrap();
    node.exec_inside_ok(&format!(
        "printf y >> {APP_ROOT}/current/vendor/pkg5/File5.php"
    ))
    .unwrap();
    assert!(
        node.exec_inside_ok(&format!("cat {APP_ROOT}/releases/r2/vendor/pkg5/File5.php"))
            .unwrap()
            .ends_with('y'),
        "an in-place edit of a linked file changes the previous release too"
    );
    node.exec_inside_ok(&format!("rm -rf {APP_ROOT}/releases/r2"))
        .unwrap();
    // r2 again (removed above), now diffed against the edited r3.
    let report = release::ship(&session, &config, "r2", &r2).await.unwrap();
    assert_shipped_whole(&report, "vendor/pkg5/File5.php", node, &want("r2"));

    // 3. A directory of the base swapped for a symlink to a copy of itself
    //    (every file identical): never linked through, shipped whole.
    release::activate(&session, &config, "r2").await.unwrap();
    node.exec_inside_ok(&format!(
        "cd {APP_ROOT}/releases/r2 && cp -a vendor /srv/elsewhere && rm -rf vendor && ln -s /srv/elsewhere vendor \
         && rm -rf {APP_ROOT}/releases/r3"
    ))
    .unwrap();
    let report = release::ship(&session, &config, "r3", &r3).await.unwrap();
    assert_shipped_whole(&report, "symlink", node, &want("r3"));

    // 4. The manifest kept for the base is garbage: no delta, whole ship,
    //    and the next release has a good manifest to diff against again.
    release::activate(&session, &config, "r3").await.unwrap();
    node.exec_inside_ok(&format!(
        "rm -rf {APP_ROOT}/releases/r2 && echo garbage > {APP_ROOT}/.hangar/manifests/r3"
    ))
    .unwrap();
    let report = release::ship(&session, &config, "r2", &r2).await.unwrap();
    assert_shipped_whole(&report, "unreadable", node, &want("r2"));
    assert!(kept_manifest(node, "r2").starts_with(manifest::HEADER));
}

/// The release went whole, the delta refused for a reason naming `why`,
/// and the node's tree is the reference one (`want`, a [`listing`]).
#[track_caller]
fn assert_shipped_whole(report: &release::ShipReport, why: &str, node: &TestNode, want: &str) {
    assert_eq!(report.method, ShipMethod::Whole, "{report:?}");
    let skipped = report.delta_skipped.as_deref().unwrap_or("");
    assert!(
        skipped.contains(why),
        "the reason names {why:?}: {report:?}"
    );
    let dir = format!("{APP_ROOT}/releases/{}", report.id);
    assert_eq!(listing(node, &dir), want, "{dir}");
}

/// The delta's payload for shipping `new` onto a node whose current
/// release has the manifest `base_text` (what `release::ship` sends).
fn payload_for(new: &Artifact, base_text: &str) -> (delta::Payload, String) {
    let view = NodeView {
        app_root: APP_ROOT.into(),
        shared_paths: vec!["storage/logs".into()],
        umask: None,
    };
    let new_m = manifest::derive(&new.path, &new.sha256)
        .unwrap()
        .for_node(&view);
    let base_m = manifest::Manifest::parse(base_text).unwrap();
    let plan = delta::Plan::between(&base_m, &new_m).unwrap();
    let text = new_m.to_text();
    let gz = delta::gzip(text.as_bytes(), 6).unwrap();
    let payload = delta::build_payload(&new.path, &gz, plan).unwrap();
    (payload, hex::encode(Sha256::digest(text.as_bytes())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_delta_leaves_nothing_activated_and_a_retry_is_clean() {
    let fx = Fixture::new(2);
    let pool = fx.pool();
    let node = &fx.nodes[0];
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(5);
    // r2 changes 1 MB of incompressible data among 3 MB: the payload
    // arrives in many packets, and the test feeds it in two halves.
    let r1 = tree_tarball(&fx, "r1big", with_big(10));
    let r2 = tree_tarball(&fx, "r2big", with_big(11));
    release::deploy(&session, &config, "r1", &r1).await.unwrap();
    let base_text = kept_manifest(node, "r1");
    let (payload, new_sha) = payload_for(&r2, &base_text);
    assert!(payload.stdin.len() > 1 << 20, "{}", payload.stdin.len());

    // The delta script, fed from a FIFO: the first half of the payload,
    // then the node's ssh session processes are killed.
    let fifo = fx.dir.path().join("delta.fifo");
    sh(&format!("mkfifo '{}'", fifo.display()));
    let half = payload.stdin[..payload.stdin.len() / 2].to_vec();
    let writer = std::thread::spawn({
        let fifo = fifo.clone();
        move || {
            let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            f.write_all(&half).unwrap();
            f
        }
    });
    let script = delta::delta_script(
        &config,
        "r2",
        &r2.sha256,
        "r1",
        &hex::encode(Sha256::digest(base_text.as_bytes())),
        &new_sha,
        "openssl",
    );
    let run = tokio::spawn(async move {
        let mut f = tokio::fs::File::open(&fifo).await.unwrap();
        let r = session
            .exec(
                &script,
                hangar::effects::ssh::Stdin::Reader(&mut f),
                Duration::from_secs(30),
            )
            .await;
        drop(session);
        r
    });
    // Mid-delta: the links are made, the changes are being extracted
    // (`tar` waits for the second half).
    eventually(
        "the delta to reach its extraction",
        Duration::from_secs(10),
        || {
            node.exec_inside("test -e /srv/app/releases/r2.tmp/tree/vendor/pkg0/File0.php")
                .map(|o| o.status.success())
                .unwrap_or(false)
        },
    )
    .await;
    for p in node
        .pids()
        .into_iter()
        .filter(|&p| p != node.listener_pid())
    {
        if std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sshd") {
            kill_pid(p);
        }
    }
    drop(writer.join().unwrap());
    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the exec returns after the drop")
        .unwrap();
    assert!(
        matches!(result, Err(SshError::Disconnected { .. }))
            || result.as_ref().is_ok_and(|o| !o.success()),
        "{result:?}"
    );
    // Whatever the orphaned script did, nothing was activated and no
    // release directory appeared.
    eventually(
        "the orphaned script to end",
        Duration::from_secs(20),
        || node_procs(node, "hangar-delta").is_empty(),
    )
    .await;
    assert!(!node
        .exec_inside("test -e /srv/app/releases/r2")
        .unwrap()
        .status
        .success());
    assert_eq!(
        node.exec_inside_ok("readlink /srv/app/current").unwrap(),
        "/srv/app/releases/r1\n"
    );

    // The retry (a new connection, as after a restart) is a clean delta.
    let session = pool.session(&fx.target(0)).await.unwrap();
    let report = release::ship(&session, &config, "r2", &r2).await.unwrap();
    assert!(
        matches!(report.method, ShipMethod::Delta { .. }),
        "{report:?}"
    );
    release::activate(&session, &config, "r2").await.unwrap();
    let state = release::read_state(&session, &config).await.unwrap();
    assert!(state.staging.is_empty(), "{state:?}");
    let reference = &fx.nodes[1];
    let on_ref = pool.session(&fx.target(1)).await.unwrap();
    ship_whole(&on_ref, reference, "r2", &r2).await;
    assert_eq!(
        listing(node, "/srv/app/releases/r2"),
        listing(reference, "/srv/app/releases/r2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_back_after_a_delta_is_a_swap_to_the_untouched_previous_tree() {
    let fx = Fixture::new(1);
    let pool = fx.pool();
    let node = &fx.nodes[0];
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(5);
    let r1 = tree_tarball(&fx, "r1", corpus_r1);
    let r2 = tree_tarball(&fx, "r2", corpus_r2);
    release::deploy(&session, &config, "r1", &r1).await.unwrap();
    let r1_tree = listing(node, "/srv/app/releases/r1");
    let report = release::ship(&session, &config, "r2", &r2).await.unwrap();
    assert!(
        matches!(report.method, ShipMethod::Delta { .. }),
        "{report:?}"
    );
    release::activate(&session, &config, "r2").await.unwrap();
    let r2_tree = listing(node, "/srv/app/releases/r2");
    let shipped_before = node.exec_inside_ok("cat /srv/app/.hangar/shipped").unwrap();

    assert_eq!(release::rollback(&session, &config).await.unwrap(), "r1");
    assert_eq!(
        node.exec_inside_ok("readlink /srv/app/current").unwrap(),
        "/srv/app/releases/r1\n"
    );
    // The links r2 took from r1 did not change r1, and nothing was shipped.
    assert_eq!(listing(node, "/srv/app/releases/r1"), r1_tree);
    assert_eq!(listing(node, "/srv/app/releases/r2"), r2_tree);
    assert_eq!(
        node.exec_inside_ok("cat /srv/app/.hangar/shipped").unwrap(),
        shipped_before
    );
    // Forward again: r2 is still complete, so shipping it is a no-op.
    let again = release::ship(&session, &config, "r2", &r2).await.unwrap();
    assert_eq!(again.method, ShipMethod::AlreadyThere);
    release::activate(&session, &config, "r2").await.unwrap();
    assert_eq!(listing(node, "/srv/app/current/"), r2_tree);
}

/// Set for [`ship_child`]: what the child process ships, tab-separated
/// (key, pin directory, address, port, release id, artifact, sha256).
const SHIP_CHILD: &str = "HANGAR_TEST_SHIP_CHILD";

/// Not a test of its own: the operator process that
/// [`an_operator_killed_mid_delta_converges`] starts and kills with SIGKILL.
#[test]
#[ignore = "run as a child process by an_operator_killed_mid_delta_converges"]
fn ship_child() {
    let Ok(args) = std::env::var(SHIP_CHILD) else {
        return;
    };
    let a: Vec<&str> = args.split('\t').collect();
    let mut settings = SshSettings::new(
        Credentials::from_key_file("root", Path::new(a[0])).unwrap(),
        HostKeyVerifier::tofu(Path::new(a[1])),
    );
    settings.command_timeout = Duration::from_secs(60);
    let target = Target::new("i-node0", a[2].parse().unwrap(), a[3].parse().unwrap());
    let artifact = Artifact::new(a[5], a[6]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = SshPool::new(settings, Redactor::default());
        let session = pool.session(&target).await.unwrap();
        let config = release_config(5);
        release::ship(&session, &config, a[4], &artifact)
            .await
            .unwrap();
        release::activate(&session, &config, a[4]).await.unwrap();
    });
}

/// Kills the child by PID if the test panics first.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_mid_delta_converges() {
    let fx = Fixture::new(2);
    let pool = fx.pool();
    let (node, reference) = (&fx.nodes[0], &fx.nodes[1]);
    let session = pool.session(&fx.target(0)).await.unwrap();
    let config = release_config(5);
    let r1 = tree_tarball(&fx, "r1big", with_big(20));
    let r2 = tree_tarball(&fx, "r2big", with_big(21));
    release::deploy(&session, &config, "r1", &r1).await.unwrap();
    let on_ref = pool.session(&fx.target(1)).await.unwrap();
    for (id, a) in [("r1", &r1), ("r2", &r2)] {
        ship_whole(&on_ref, reference, id, a).await;
    }
    let want_r1 = listing(reference, "/srv/app/releases/r1");
    let want_r2 = listing(reference, "/srv/app/releases/r2");
    let seed: u64 = std::env::var("HANGAR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    let mut x = seed | 1;
    let args = [
        fx.key.private_key.display().to_string(),
        fx.state_dir().display().to_string(),
        node.ip().to_string(),
        node.port().to_string(),
        "r2".into(),
        r2.path.display().to_string(),
        r2.sha256.clone(),
    ]
    .join("\t");
    let child = |attempt: usize| {
        Child(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "ship_child",
                    "--ignored",
                    "--test-threads=1",
                    "-q",
                ])
                .env(SHIP_CHILD, &args)
                .stdout(std::process::Stdio::null())
                .stderr(
                    std::fs::File::create(fx.dir.path().join(format!("child{attempt}.log")))
                        .unwrap(),
                )
                .spawn()
                .unwrap(),
        )
    };
    let back_to_r1 = || async {
        assert_eq!(release::rollback(&session, &config).await.unwrap(), "r1");
        node.exec_inside_ok(
            "rm -rf /srv/app/releases/r2 /srv/app/.hangar/artifacts/r2 /srv/app/.hangar/manifests/r2",
        )
        .unwrap();
    };
    // Undisturbed, the child takes `whole` from start to exit.
    let started = Instant::now();
    let mut c = child(0);
    let status = c.0.wait().unwrap();
    let whole = started.elapsed();
    assert!(status.success(), "the child failed: see child0.log");
    assert_eq!(listing(node, "/srv/app/current/"), want_r2);
    back_to_r1().await;

    let (mut mid_delta, mut finished) = (0, 0);
    for attempt in 1..=8 {
        let mut c = child(attempt);
        // The first kill lands once the node is building the tree; the
        // others at a random moment of the child's life.
        if attempt == 1 {
            eventually("the delta to start", Duration::from_secs(30), || {
                node.exec_inside("test -d /srv/app/releases/r2.tmp")
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            })
            .await;
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ms = x % (whole.as_millis() as u64 * 11 / 10).max(1);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let staging = node
            .exec_inside("test -d /srv/app/releases/r2.tmp")
            .unwrap()
            .status
            .success();
        let done = c.0.try_wait().unwrap().is_some_and(|s| s.success());
        let _ = c.0.kill();
        let _ = c.0.wait();
        mid_delta += usize::from(staging && !done);
        finished += usize::from(done);
        // A node script may outlive its operator: let it end.
        eventually(
            "the orphaned script to end",
            Duration::from_secs(60),
            || node_procs(node, ".hangar/lock").is_empty(),
        )
        .await;
        // Whatever `current` points to is a complete, exact release; a
        // releases/r2 that exists is exact.
        let current = node.exec_inside_ok("readlink /srv/app/current").unwrap();
        let want = match current.trim() {
            "/srv/app/releases/r1" => &want_r1,
            "/srv/app/releases/r2" => &want_r2,
            other => panic!("seed {seed}, attempt {attempt}: current → {other}"),
        };
        assert_eq!(
            &listing(node, "/srv/app/current/"),
            want,
            "seed {seed}, attempt {attempt}"
        );
        if node
            .exec_inside("test -d /srv/app/releases/r2")
            .unwrap()
            .status
            .success()
        {
            assert_eq!(
                listing(node, "/srv/app/releases/r2"),
                want_r2,
                "seed {seed}, attempt {attempt}"
            );
        }
        if current.trim().ends_with("r2") {
            // It got there: back to r1 so the next attempt is a delta again.
            back_to_r1().await;
        }
    }
    eprintln!(
        "seed {seed}: undisturbed child {whole:?}; 8 kills, {mid_delta} while the node built the tree, {finished} after the child finished"
    );
    assert!(mid_delta >= 1, "seed {seed}: no kill landed mid-delta");
    // A restarted operator converges: a clean delta, exact, nothing left
    // over — or nothing to ship, when the last kill came after the child
    // had shipped r2 but before it activated it.
    let shipped = node
        .exec_inside("test -d /srv/app/releases/r2")
        .unwrap()
        .status
        .success();
    let fresh = fx.pool();
    let session = fresh.session(&fx.target(0)).await.unwrap();
    let report = release::ship(&session, &config, "r2", &r2).await.unwrap();
    if shipped {
        assert_eq!(report.method, ShipMethod::AlreadyThere, "seed {seed}");
    } else {
        assert!(
            matches!(report.method, ShipMethod::Delta { .. }),
            "seed {seed}: {report:?}"
        );
    }
    release::activate(&session, &config, "r2").await.unwrap();
    assert_eq!(listing(node, "/srv/app/current/"), want_r2);
    assert_eq!(listing(node, "/srv/app/releases/r1"), want_r1);
    let state = release::read_state(&session, &config).await.unwrap();
    assert!(state.staging.is_empty(), "{state:?}");
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

/// `provision.secretsFrom`: the secrets land in `shared/.env` with the env
/// file's lines (a secret replaces a line of its name), mode 0600; a
/// rotated value rewrites the file; a failing hook that prints the file
/// shows no value in its error or the logs.
#[test]
fn secrets_from_aws_land_in_the_env_file_and_never_in_errors_or_logs() {
    use hangar::effects::env_file::{self, SecretEnv};
    use hangar_cloud::SecretValue;
    const DB: &str = "r0tated-Db-Pa55 \"x\"";
    const KEY: &str = "sk_live_Zm9vYmFy";
    let (sink, _guard) = LogSink::capture();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let secret_env = |db: &str| {
        SecretEnv::new(BTreeMap::from([
            ("DB_PASSWORD".to_string(), SecretValue::new(db)),
            ("STRIPE_KEY".to_string(), SecretValue::new(KEY)),
        ]))
    };
    let mut seen = String::new();
    rt.block_on(async {
        let fx = Fixture::new(1);
        let base = b"APP_ENV=production\nDB_PASSWORD=placeholder\n";
        let first = secret_env("first-value-1");
        let pool = SshPool::new(fx.settings(), Redactor::default().with(first.values()));
        let session = pool.session(&fx.target(0)).await.unwrap();
        let config = release_config(5);
        let contents = env_file::render(Some(base), Some(&first));
        assert!(release::place_env_file(&session, &config, &contents)
            .await
            .unwrap());
        let node = &fx.nodes[0];
        assert_eq!(
            node.exec_inside_ok("stat -c '%a %U' /srv/app/shared/.env")
                .unwrap(),
            "600 root\n"
        );
        let read_back = node
            .exec_inside_ok(". /srv/app/shared/.env; printf '%s|%s|%s' \"$APP_ENV\" \"$DB_PASSWORD\" \"$STRIPE_KEY\"")
            .unwrap();
        assert_eq!(read_back, format!("production|first-value-1|{KEY}"));

        // Rotation: a new value, a new file.
        let rotated = secret_env(DB);
        assert_ne!(first.digest, rotated.digest);
        let pool = SshPool::new(fx.settings(), Redactor::default().with(rotated.values()));
        let session = pool.session(&fx.target(0)).await.unwrap();
        let contents = env_file::render(Some(base), Some(&rotated));
        assert!(release::place_env_file(&session, &config, &contents)
            .await
            .unwrap());
        assert!(!release::place_env_file(&session, &config, &contents)
            .await
            .unwrap());
        let read_back = node
            .exec_inside_ok(". /srv/app/shared/.env; printf '%s' \"$DB_PASSWORD\"")
            .unwrap();
        assert_eq!(read_back, DB);

        // A failing hook that prints the file.
        let config = ReleaseConfig {
            before_activate: vec!["cat /srv/app/shared/.env >&2; exit 9".into()],
            ..release_config(5)
        };
        let err = release::deploy(&session, &config, "r1", &fx.tarball("r1", true, false))
            .await
            .unwrap_err();
        assert!(matches!(err, ReleaseError::HookFailed { .. }), "{err}");
        seen.push_str(&format!("{err}\n{err:?}\n"));
        assert!(seen.contains("APP_ENV=production"), "the file was printed: {seen}");
    });
    let logs = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    assert!(seen.contains(hangar::effects::ssh::MASK), "{seen}");
    for secret in [DB, KEY, "r0tated-Db-Pa55"] {
        assert!(!seen.contains(secret), "secret in errors:\n{seen}");
        assert!(!logs.contains(secret), "secret in logs:\n{logs}");
    }
}
