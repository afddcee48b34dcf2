//! GitOps: the specs live in a git repository served over SSH, and every
//! change is a commit — no file is edited on the operator's host.

use std::time::{Duration, Instant};

use hangar::runtime::http::SourceView;
use hangar::runtime::webhook::sign;
use hangar_local::artifact::ReleaseKind;
use hangar_local::git_server::GitServer;

use crate::support::{settled_on, Scenario};

const SECRET: &str = "e2e-webhook-secret";

/// A signed push notification, as GitHub sends it.
fn push(s: &Scenario, delivery: &str) -> u16 {
    let body = br#"{"ref":"refs/heads/main"}"#;
    let signature = sign(SECRET.as_bytes(), body);
    s.operator()
        .post(
            "/api/v1/sync",
            &[
                ("X-Hub-Signature-256", &signature),
                ("X-GitHub-Delivery", delivery),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .expect("the operator answers")
        .0
}

fn source(s: &Scenario) -> SourceView {
    serde_json::from_str(&s.operator().get("/api/v1/source").expect("source view"))
        .expect("source JSON")
}

/// Waits for the source view to satisfy `pred` (a process just started
/// has none until its first fetch is over).
fn wait_source(s: &Scenario, what: &str, pred: impl Fn(&SourceView) -> bool) -> SourceView {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = s
            .operator()
            .get("/api/v1/source")
            .and_then(|body| serde_json::from_str::<SourceView>(&body).ok());
        if let Some(v) = v.filter(|v| pred(v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn commits_drive_the_fleet_and_a_bad_commit_changes_nothing() {
    let mut s = Scenario::start();
    let mut server = GitServer::start(&s.dir().join("git")).expect("git server");
    let work = server
        .create_repo("infra", &s.dir().join("infra"))
        .expect("repository");
    let clusters = work.dir.join("clusters");
    let spec = s.spec().remove("spec.autoscaling").with_capacity(2, 2);
    spec.write(&clusters).expect("spec");
    let first = work.commit("web: two nodes on v1").expect("commit");

    // Polling is slow on purpose: every change below arrives by webhook.
    let url = format!("git+{}//clusters?ref=main", server.url("infra"));
    let env = |k: &str, v: &str| (k.to_string(), v.to_string());
    let git_env = [
        env("HANGAR_GIT_SSH_KEY", &server.key.display().to_string()),
        env(
            "HANGAR_GIT_KNOWN_HOSTS",
            &server.known_hosts.display().to_string(),
        ),
        env("HANGAR_GIT_POLL_INTERVAL", "1h"),
        env("HANGAR_WEBHOOK_SECRET", SECRET),
    ];
    s.start_operator_from(&url, &git_env);
    let st = s.wait_status(
        "web",
        "2 in service on v1",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    assert_eq!(
        st.commit.as_ref().map(|c| c.sha.as_str()),
        Some(first.as_str())
    );

    // A release is a commit; a forged or replayed notification fetches nothing.
    let v2 = s.cloud.upload_release("v2", ReleaseKind::Good).expect("v2");
    spec.clone()
        .with_release(&v2)
        .write(&clusters)
        .expect("spec");
    let second = work.commit("web: release v2").expect("commit");
    let synced = source(&s).last_sync;
    let (code, _) = s
        .operator()
        .post(
            "/api/v1/sync",
            &[("X-Hub-Signature-256", "sha256=00")],
            b"{}",
        )
        .expect("answer");
    assert_eq!(code, 401, "a bad signature is refused");
    assert_eq!(push(&s, "delivery-1"), 202);
    assert_eq!(push(&s, "delivery-1"), 409, "a replay is refused");
    // What a CI job does to wait for its deploy.
    let rollout = std::process::Command::new(crate::support::operator::hangar_bin())
        .args([
            "rollout",
            "status",
            "web",
            "--release",
            "v2",
            "--watch",
            "--timeout",
            "3m",
        ])
        .arg("--server")
        .arg(format!("http://{}", s.operator().listen))
        .output()
        .expect("hangar rollout status");
    let said = String::from_utf8_lossy(&rollout.stdout);
    assert_eq!(
        rollout.status.code(),
        Some(0),
        "{said}{}",
        String::from_utf8_lossy(&rollout.stderr)
    );
    assert!(
        said.lines()
            .last()
            .is_some_and(|l| l.contains("v2") && l.contains("2/2")),
        "{said}"
    );
    let st = s.status("web").expect("status");
    assert!(
        settled_on(&st, 2, "v2"),
        "rollout status exits 0 only once v2 is everywhere: {st:?}"
    );
    assert_eq!(
        st.commit.as_ref().map(|c| c.sha.as_str()),
        Some(second.as_str())
    );
    assert!(
        st.activities.iter().any(|a| a.kind == "commit"
            && a.message.contains(&second[..7])
            && a.message.contains("web: release v2")),
        "the activity history records the commit: {:?}",
        st.activities
    );
    assert!(source(&s).last_sync > synced);

    // A broken spec: reported with the commit, file and line; nothing moves.
    let good_text = std::fs::read_to_string(clusters.join("web.yaml")).expect("spec text");
    std::fs::write(
        clusters.join("web.yaml"),
        good_text.replace("    min: 2\n", "    min: -2\n"),
    )
    .expect("break the spec");
    let broken = work.commit("web: oops").expect("commit");
    assert_eq!(push(&s, "delivery-2"), 202);
    wait_source(&s, "the broken commit loaded", |v| {
        v.commit.as_ref().is_some_and(|c| c.sha == broken) && v.problems == 1
    });
    let problems = s.operator().problems().expect("problems");
    assert!(
        problems.iter().any(|p| p
            .text
            .starts_with(&format!("clusters/web.yaml@{}:", &broken[..7]))
            && p.path.starts_with("spec.capacity")),
        "{problems:?}"
    );
    let held = s.wait_status("web", "the cluster held", Duration::from_secs(30), |st| {
        st.conditions.iter().any(|c| c.message.contains("web.yaml"))
    });
    assert!(settled_on(&held, 2, "v2"), "nothing changed: {held:?}");
    assert_eq!(
        held.commit.as_ref().map(|c| c.sha.as_str()),
        Some(second.as_str()),
        "the cluster still runs what the last good commit said"
    );

    // The server goes away for a while: reported, the fleet untouched.
    server.stop();
    assert_eq!(push(&s, "delivery-3"), 202);
    wait_source(&s, "the fetch failure reported", |v| v.error.is_some());
    server.resume().expect("server back");

    // Revert: back to normal.
    std::fs::write(clusters.join("web.yaml"), &good_text).expect("revert");
    let reverted = work.commit("Revert \"web: oops\"").expect("commit");
    assert_eq!(push(&s, "delivery-4"), 202);
    let st = s.wait_status("web", "the revert applied", Duration::from_secs(60), |st| {
        st.commit.as_ref().is_some_and(|c| c.sha == reverted)
    });
    assert!(settled_on(&st, 2, "v2"), "{st:?}");
    let v = wait_source(&s, "the source healthy again", |v| {
        v.error.is_none() && v.problems == 0
    });
    assert_eq!(v.commit.map(|c| c.sha), Some(reverted.clone()));
    assert!(s.operator().problems().expect("problems").is_empty());
    let metrics = s.operator().metrics().expect("metrics");
    assert!(
        metrics.contains("hangar_git_last_sync_timestamp_seconds "),
        "{metrics}"
    );
    assert!(
        metrics.contains("hangar_webhooks_total{result=\"unauthorized\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hangar_webhooks_total{result=\"replayed\"} 1"),
        "{metrics}"
    );

    // A restart with no commit of its own (a fresh state directory, a
    // standby that never fetched) while the server is away waits for one:
    // "no specs yet" is not "every spec deleted".
    s.stop_operator();
    std::fs::remove_dir_all(s.state.join("git")).expect("forget the mirror");
    server.stop();
    s.start_operator_from(&url, &git_env);
    wait_source(&s, "the failed first fetch reported", |v| {
        v.error.is_some() && v.commit.is_none()
    });
    assert!(
        s.operator().get("/readyz").is_none(),
        "not ready without specs"
    );
    let waiting = s.status("web").expect("the status it had");
    assert!(!waiting.spec_removed, "{waiting:?}");
    assert!(settled_on(&waiting, 2, "v2"), "{waiting:?}");
    server.resume().expect("server back");
    assert_eq!(push(&s, "delivery-4b"), 202);
    wait_source(&s, "the commit fetched again", |v| {
        v.commit.as_ref().is_some_and(|c| c.sha == reverted)
    });
    let st = s.wait_status("web", "reconciled again", Duration::from_secs(30), |st| {
        st.updated_at > waiting.updated_at
    });
    assert!(!st.spec_removed && settled_on(&st, 2, "v2"), "{st:?}");

    // A commit that deletes the spec: `deletionPolicy: retain` (the
    // default) leaves the fleet running, unmanaged. (The directory stays:
    // a commit without it is refused, so a moved directory deletes nothing.)
    std::fs::remove_file(clusters.join("web.yaml")).expect("delete the spec");
    std::fs::write(clusters.join("README.md"), "Specs live here.\n").expect("readme");
    work.commit("web: no longer managed here").expect("commit");
    assert_eq!(push(&s, "delivery-5"), 202);
    let st = s.wait_status("web", "the spec removed", Duration::from_secs(30), |st| {
        st.spec_removed
    });
    assert!(settled_on(&st, 2, "v2"), "retained: {st:?}");
    s.watcher.assert_invariants();
}
