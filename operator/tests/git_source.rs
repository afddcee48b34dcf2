//! The git spec source against a real git server (OpenSSH's sshd serving
//! bare repositories on 127.0.0.1): what a commit loads, what it refuses,
//! and what survives a server that goes away, a host key that changes, a
//! force-push and a restart.

use std::path::Path;
use std::sync::Arc;

use hangar::effects::git::{GitError, GitOptions, GitSource, Limits, Mirror};
use hangar::runtime::git_sync::{Applied, GitSync};
use hangar::runtime::http::Board;
use hangar::runtime::telemetry::Telemetry;
use hangar_local::git_server::{allowed_signer, keygen, GitServer, WorkTree};

fn spec(name: &str, min: u32) -> String {
    format!(
        r#"apiVersion: hangar/v1alpha1
kind: Cluster
metadata: {{ name: {name} }}
spec:
  region: eu-west-1
  instances: {{ launchTemplate: lt-1, subnets: [subnet-1] }}
  loadBalancer: {{ targetGroupArn: "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1" }}
  capacity: {{ min: {min}, max: 5 }}
  ssh: {{ user: deploy, privateKeyFile: /k }}
  provision: {{ runbook: ../runbooks/web.yaml }}
  release: {{ id: v1, artifact: "s3://b/k", sha256: "{sha}" }}
"#,
        sha = "a".repeat(64)
    )
}

struct Fx {
    dir: tempfile::TempDir,
    server: GitServer,
    work: WorkTree,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let server = GitServer::start(&dir.path().join("server")).unwrap();
        let work = server
            .create_repo("infra", &dir.path().join("work"))
            .unwrap();
        work.write("runbooks/web.yaml", "steps: []\n").unwrap();
        work.write("clusters/web.yaml", &spec("web", 1)).unwrap();
        work.write("clusters/api.yaml", &spec("api", 1)).unwrap();
        work.commit("two clusters").unwrap();
        Fx { dir, server, work }
    }

    fn source(&self, reference: &str) -> GitSource {
        GitSource::parse(&format!(
            "git+{}//clusters?ref={reference}",
            self.server.url("infra")
        ))
        .unwrap()
    }

    fn options(&self) -> GitOptions {
        GitOptions {
            ssh_key: Some(self.server.key.clone()),
            known_hosts: Some(self.server.known_hosts.clone()),
            ..GitOptions::default()
        }
    }

    async fn sync_with(&self, state: &str, options: GitOptions) -> GitSync {
        let root = self.dir.path().join(state).join("git");
        let mirror = Mirror::open(self.source("main"), root.join("mirror.git"), options)
            .await
            .unwrap();
        GitSync::new(
            mirror,
            root,
            std::time::Duration::from_secs(30),
            Arc::new(Board::default()),
            Telemetry::new(),
        )
    }

    async fn sync(&self) -> GitSync {
        self.sync_with("state", self.options()).await
    }
}

fn min_of(applied: &Applied, name: &str) -> u32 {
    applied
        .specs
        .get(name)
        .unwrap()
        .loaded
        .cluster
        .spec
        .capacity
        .min
}

#[tokio::test]
async fn a_commit_loads_whole_and_names_itself() {
    let fx = Fx::new();
    let mut sync = fx.sync().await;
    let applied = sync.sync().await.unwrap().expect("the first commit loads");
    assert_eq!(applied.commit.sha, fx.work.head().unwrap());
    assert_eq!(applied.commit.subject, "two clusters");
    assert_eq!(applied.commit.author, "Hangar Test <test@hangar.invalid>");
    assert_eq!(
        applied.specs.clusters.keys().collect::<Vec<_>>(),
        ["api", "web"]
    );
    assert!(
        applied.specs.problems.is_empty(),
        "{:?}",
        applied.specs.problems
    );
    // Every cluster carries the commit, and the spec paths go through
    // `current`, so they are the same at every commit.
    let web = applied.specs.get("web").unwrap();
    assert_eq!(web.commit.as_ref().unwrap().sha, applied.commit.sha);
    assert!(
        web.loaded.file.ends_with("git/current/clusters/web.yaml"),
        "{:?}",
        web.loaded.file
    );

    // Nothing new: nothing published.
    assert!(sync.sync().await.unwrap().is_none());

    // A new commit: one set, all of it from that commit.
    fx.work.write("clusters/web.yaml", &spec("web", 3)).unwrap();
    fx.work.remove("clusters/api.yaml").unwrap();
    let second = fx.work.commit("web: min 3, api gone").unwrap();
    let applied = sync.sync().await.unwrap().expect("the second commit loads");
    assert_eq!(applied.commit.sha, second);
    assert_eq!(min_of(&applied, "web"), 3);
    assert!(
        applied.specs.get("api").is_none(),
        "a deleted spec is gone from the set"
    );
}

#[tokio::test]
async fn an_invalid_spec_at_a_commit_is_reported_with_the_commit_and_its_place() {
    let fx = Fx::new();
    let mut sync = fx.sync().await;
    sync.sync().await.unwrap().unwrap();
    fx.work
        .write(
            "clusters/web.yaml",
            &spec("web", 1).replace("max: 5", "max: -5"),
        )
        .unwrap();
    let bad = fx.work.commit("web: broken").unwrap();
    let applied = sync.sync().await.unwrap().unwrap();
    assert!(applied.specs.get("web").is_none());
    assert!(
        applied.specs.get("api").is_some(),
        "the other cluster moves on"
    );
    let views = applied.specs.problem_views();
    assert_eq!(views.len(), 1, "{views:?}");
    let text = &views[0].text;
    assert!(
        text.starts_with(&format!("clusters/web.yaml@{}:", &bad[..7])),
        "names the file in the repository and the commit: {text}"
    );
    assert!(text.contains("spec.capacity.max"), "{text}");
}

#[tokio::test]
async fn what_cannot_load_leaves_the_last_good_commit_in_place() {
    let fx = Fx::new();
    let options = GitOptions {
        limits: Limits {
            repo_bytes: 64 << 20,
            file_bytes: 4096,
        },
        ..fx.options()
    };
    let mut sync = fx.sync_with("state", options).await;
    let good = sync.sync().await.unwrap().unwrap().commit.sha.clone();

    // A file over the limit.
    fx.work
        .write("clusters/big.yaml", &"# x\n".repeat(2000))
        .unwrap();
    let big = fx.work.commit("a big file").unwrap();
    match sync.sync().await {
        Err(GitError::Rejected { sha, reason }) => {
            assert_eq!(sha, big);
            assert!(
                reason.contains("clusters/big.yaml is 8000 bytes"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Asked again, the refused commit is not examined again.
    assert!(sync.sync().await.unwrap().is_none());

    // A commit without the spec directory.
    fx.work.remove("clusters/big.yaml").unwrap();
    fx.work.remove("clusters/web.yaml").unwrap();
    fx.work.remove("clusters/api.yaml").unwrap();
    fx.work.commit("no clusters directory").unwrap();
    match sync.sync().await {
        Err(GitError::Rejected { reason, .. }) => {
            assert!(reason.contains("clusters"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // `current` still is the good commit, and a restart loads it.
    let mut restarted = fx.sync_with("state", fx.options()).await;
    let restored = restarted.restore().expect("the last good commit");
    assert_eq!(restored.commit.sha, good);
    assert_eq!(restored.specs.clusters.len(), 2);
}

#[tokio::test]
async fn a_server_away_a_bad_key_or_a_changed_host_key_fails_the_fetch_and_nothing_else() {
    let mut fx = Fx::new();
    let mut sync = fx.sync().await;
    let good = sync.sync().await.unwrap().unwrap();

    // A key the server does not know: refused, reported, nothing loaded.
    let stranger = fx.dir.path().join("stranger");
    keygen(&stranger, "stranger").unwrap();
    let mut refused = fx
        .sync_with(
            "stranger-state",
            GitOptions {
                ssh_key: Some(stranger),
                ..fx.options()
            },
        )
        .await;
    let e = refused.sync().await.unwrap_err().to_string();
    assert!(e.contains("Permission denied"), "{e}");

    fx.server.stop();
    fx.work.write("clusters/web.yaml", &spec("web", 2)).unwrap();
    let e = sync.sync().await.unwrap_err();
    assert!(matches!(e, GitError::Command { step: "fetch", .. }), "{e}");

    // The key changes and known_hosts does not: refused, like a node's.
    fx.server.change_host_key(false).unwrap();
    let e = sync.sync().await.unwrap_err().to_string();
    assert!(
        e.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || e.contains("Host key verification failed"),
        "{e}"
    );

    // Pinned on first use without a known_hosts file, then held to it.
    let tofu = GitOptions {
        known_hosts: None,
        ..fx.options()
    };
    let mut pinned = fx.sync_with("tofu", tofu).await;
    assert!(
        pinned.sync().await.unwrap().is_some(),
        "first use pins the key"
    );
    fx.server.change_host_key(true).unwrap();
    let e = pinned.sync().await.unwrap_err().to_string();
    assert!(
        e.contains("Host key verification failed") || e.contains("HAS CHANGED"),
        "{e}"
    );

    // Back with the key hangar knows: on it goes from the last good.
    assert!(
        sync.sync().await.unwrap().is_none(),
        "nothing new was pushed"
    );
    let restored = fx.sync_with("state", fx.options()).await.restore().unwrap();
    assert_eq!(restored.commit.sha, good.commit.sha);
}

#[tokio::test]
async fn a_force_pushed_branch_is_followed_and_said_so() {
    let fx = Fx::new();
    let mut sync = fx.sync().await;
    sync.sync().await.unwrap().unwrap();
    fx.work.write("clusters/web.yaml", &spec("web", 2)).unwrap();
    let dropped = fx.work.commit("web: 2").unwrap();
    assert_eq!(sync.sync().await.unwrap().unwrap().commit.sha, dropped);
    fx.work.write("clusters/web.yaml", &spec("web", 4)).unwrap();
    let rewritten = fx.work.rewrite_last("web: 4 instead").unwrap();
    let applied = sync.sync().await.unwrap().unwrap();
    assert_eq!(applied.commit.sha, rewritten);
    assert_eq!(min_of(&applied, "web"), 4);
    let origin = applied.specs.origin.as_ref().unwrap();
    assert_eq!(origin.rewritten.as_deref(), Some(dropped.as_str()));
}

#[tokio::test]
async fn with_allowed_signers_only_signed_commits_load() {
    let fx = Fx::new();
    let signer = fx.dir.path().join("signer");
    keygen(&signer, "release-manager").unwrap();
    let allowed = fx.dir.path().join("allowed_signers");
    std::fs::write(
        &allowed,
        allowed_signer(&signer, "test@hangar.invalid").unwrap(),
    )
    .unwrap();
    let options = GitOptions {
        allowed_signers: Some(allowed),
        ..fx.options()
    };
    let mut sync = fx.sync_with("state", options).await;
    match sync.sync().await {
        Err(GitError::Rejected { reason, .. }) => {
            assert!(reason.contains("not signed by a key in"), "{reason}")
        }
        other => panic!("an unsigned commit must not load: {other:?}"),
    }
    // Signed by a key that is not allowed: refused too.
    let stranger = fx.dir.path().join("stranger");
    keygen(&stranger, "stranger").unwrap();
    fx.work.write("clusters/web.yaml", &spec("web", 2)).unwrap();
    fx.work
        .commit_signed("signed, by a stranger", &stranger)
        .unwrap();
    assert!(matches!(sync.sync().await, Err(GitError::Rejected { .. })));

    fx.work.write("clusters/web.yaml", &spec("web", 3)).unwrap();
    let signed = fx.work.commit_signed("signed", &signer).unwrap();
    let applied = sync.sync().await.unwrap().expect("a signed commit loads");
    assert_eq!(applied.commit.sha, signed);
    assert_eq!(min_of(&applied, "web"), 3);
}

#[tokio::test]
async fn a_file_source_and_a_tag_resolve_like_a_branch() {
    let fx = Fx::new();
    let tagged = fx.work.head().unwrap();
    let tag = std::process::Command::new("git")
        .current_dir(&fx.work.dir)
        .args(["tag", "v1"])
        .status()
        .unwrap();
    assert!(tag.success());
    let pushed = std::process::Command::new("git")
        .current_dir(&fx.work.dir)
        .args(["push", "--quiet", "origin", "v1"])
        .status()
        .unwrap();
    assert!(pushed.success());
    fx.work.write("clusters/web.yaml", &spec("web", 5)).unwrap();
    fx.work.commit("after the tag").unwrap();

    let source = GitSource::parse(&format!(
        "git+file://{}//clusters?ref=v1",
        fx.server.repo_path("infra").display()
    ))
    .unwrap();
    let root = fx.dir.path().join("file-state/git");
    let mirror = Mirror::open(source, root.join("mirror.git"), GitOptions::default())
        .await
        .unwrap();
    let mut sync = GitSync::new(
        mirror,
        root,
        std::time::Duration::from_secs(30),
        Arc::new(Board::default()),
        Telemetry::new(),
    );
    let applied = sync.sync().await.unwrap().unwrap();
    assert_eq!(applied.commit.sha, tagged);
    assert_eq!(min_of(&applied, "web"), 1);
    assert!(Path::new(&fx.dir.path().join("file-state/git/current")).exists());
}
