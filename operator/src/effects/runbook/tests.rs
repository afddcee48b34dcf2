use super::*;

fn parse(yaml: &str) -> Result<Runbook, RunbookError> {
    Runbook::parse(yaml, Path::new("runbooks/test.yaml"))
}

fn facts() -> Facts {
    Facts {
        instance_id: "i-1".into(),
        private_ip: "127.77.1.2".into(),
        app_root: "/srv/app".into(),
        health_path: "/health".into(),
        health_port: 80,
    }
}

#[test]
fn unknown_fields_are_rejected_naming_file_and_field() {
    let err = parse("steps:\n  - name: a\n    run: true\n    creates: /x\n    onlyif: true\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("runbooks/test.yaml"), "{err}");
    assert!(err.contains("onlyif"), "{err}");
}

#[test]
fn command_steps_need_a_guard() {
    let err = parse("steps:\n  - name: a\n    run: echo hi\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs a guard"), "{err}");
    assert!(err.contains("#1 `a`"), "{err}");
}

#[test]
fn step_shape_is_checked() {
    for (yaml, want) in [
        (
            "steps:\n  - name: a\n    run: x\n    unless: y\n    file: {path: /p, content: c}\n",
            "both",
        ),
        ("steps:\n  - name: a\n", "needs `run` or `file`"),
        (
            "steps:\n  - name: a\n    file: {path: /p, content: c, template: t}\n",
            "exactly one",
        ),
        (
            "steps:\n  - name: a\n    file: {path: /p, content: c, mode: '0999'}\n",
            "octal",
        ),
        (
            "steps:\n  - {name: a, run: x, unless: y}\n  - {name: a, run: x, unless: y}\n",
            "duplicate",
        ),
        (
            "steps:\n  - name: a\n    creates: /x\n    file: {path: /p, content: c}\n",
            "`creates` applies",
        ),
    ] {
        let err = parse(yaml).unwrap_err().to_string();
        assert!(err.contains(want), "{yaml}: {err}");
    }
}

#[test]
fn plan_renders_vars_facts_and_spec_overrides() {
    let rb = parse(
        "vars: {port: '8080', greeting: hi}\nsteps:\n  - name: conf\n    file:\n      path: '{{ release.app_root }}/conf'\n      template: |\n        listen {{ node.private_ip }}:{{ vars.port }} {{ vars.greeting }}\n      mode: '0640'\n  - name: start\n    run: start --port {{ vars.port }}\n    unless: pgrep server\n",
    )
    .unwrap();
    let spec_vars = BTreeMap::from([("port".to_string(), "9090".to_string())]);
    let plan = rb.plan(&spec_vars, &facts()).unwrap();
    let Action::File(f) = &plan.steps[0].action else {
        panic!("file step expected")
    };
    assert_eq!(f.path, "/srv/app/conf");
    assert_eq!(
        String::from_utf8_lossy(&f.content),
        "listen 127.77.1.2:9090 hi\n"
    );
    assert_eq!(f.mode, Some(0o640));
    let Action::Command { script } = &plan.steps[1].action else {
        panic!("command step expected")
    };
    assert_eq!(script, "start --port 9090");
    assert_eq!(plan.steps[1].guards.unless.as_deref(), Some("pgrep server"));
}

#[test]
fn undefined_variables_fail_before_anything_runs() {
    let rb = parse("steps:\n  - {name: a, run: 'echo {{ vars.nope }}', unless: 'true'}\n").unwrap();
    let err = rb.plan(&BTreeMap::new(), &facts()).unwrap_err().to_string();
    assert!(err.contains("#1 `a`") && err.contains("`run`"), "{err}");
}

#[test]
fn check_output_is_parsed() {
    assert_eq!(parse_check("run\n"), Some(CheckResult::Run));
    assert_eq!(
        parse_check("skip:creates\n"),
        Some(CheckResult::Skip("creates"))
    );
    assert_eq!(parse_check("absent"), Some(CheckResult::FileAbsent));
    assert_eq!(
        parse_check("file 640 root adm abc123\n"),
        Some(CheckResult::FilePresent {
            mode: 0o640,
            owner: "root".into(),
            group: "adm".into(),
            sha256: "abc123".into()
        })
    );
    assert_eq!(parse_check("garbage"), None);
    assert_eq!(parse_check(""), None);
}

#[test]
fn a_file_matches_only_with_same_content_mode_and_owner() {
    let want = PlannedFile {
        path: "/p".into(),
        content: b"x".to_vec(),
        sha256: "h".into(),
        mode: Some(0o600),
        owner: Some("root".into()),
        group: None,
    };
    let present = |mode, owner: &str, sha: &str| CheckResult::FilePresent {
        mode,
        owner: owner.into(),
        group: "any".into(),
        sha256: sha.into(),
    };
    assert!(file_matches(&want, &present(0o600, "root", "h")));
    assert!(!file_matches(&want, &present(0o644, "root", "h")));
    assert!(!file_matches(&want, &present(0o600, "www", "h")));
    assert!(!file_matches(&want, &present(0o600, "root", "other")));
    assert!(!file_matches(&want, &CheckResult::FileAbsent));
}

#[test]
fn scripts_quote_paths_and_wrap_become() {
    let f = PlannedFile {
        path: "/srv/my app/x".into(),
        content: b"secret".to_vec(),
        sha256: "h".into(),
        mode: Some(0o600),
        owner: Some("www-data".into()),
        group: Some("www-data".into()),
    };
    let w = write_script(&f);
    assert!(w.contains("cat > '/srv/my app/x.hangar-tmp'"), "{w}");
    assert!(w.contains("chmod 0600"), "{w}");
    assert!(w.contains("chown www-data:www-data"), "{w}");
    assert!(!w.contains("secret"), "content must travel on stdin");
    assert!(wrap("id", true, "deploy").starts_with("sudo -n -- sh -c "));
    assert_eq!(wrap("id", true, "root"), "sh -c id");
    assert_eq!(wrap("a b", false, "deploy"), "sh -c 'a b'");
}

#[test]
fn the_stock_runbooks_parse_and_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks");
    for name in ["static-http.yaml", "nginx-php-fpm.yaml", "laravel.yaml"] {
        let rb = Runbook::load(&root.join(name)).unwrap_or_else(|e| panic!("{e}"));
        let vars = BTreeMap::from([
            ("php_version".to_string(), "8.2".to_string()),
            ("fpm_max_children".to_string(), "24".to_string()),
            ("fpm_start_servers".to_string(), "6".to_string()),
            ("fpm_min_spare_servers".to_string(), "4".to_string()),
            ("fpm_max_spare_servers".to_string(), "12".to_string()),
            ("fpm_max_requests".to_string(), "500".to_string()),
            ("server_name".to_string(), "shop.example.com".to_string()),
        ]);
        let plan = rb.plan(&vars, &facts()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!plan.steps.is_empty());
    }
}

/// `laravel.yaml` is the nginx-php-fpm node plus workers and the
/// scheduler, kept self-contained (a spec names one runbook): its first
/// steps must stay exactly nginx-php-fpm's, and its vars start from the
/// same defaults, so a fix to one that misses the other fails here.
#[test]
fn the_laravel_runbook_begins_with_every_nginx_php_fpm_step_unchanged() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks");
    let web = Runbook::load(&root.join("nginx-php-fpm.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let laravel = Runbook::load(&root.join("laravel.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(laravel.steps.len() > web.steps.len());
    for (i, (w, l)) in web.steps.iter().zip(&laravel.steps).enumerate() {
        assert_eq!(
            w,
            l,
            "step #{} `{}` differs between nginx-php-fpm.yaml and laravel.yaml",
            i + 1,
            w.name
        );
    }
    for (k, v) in &web.vars {
        assert_eq!(laravel.vars.get(k), Some(v), "var {k}");
    }
}

/// The queue worker count renders into the target's `Wants=` and the
/// guard that checks exactly that many run.
#[test]
fn the_laravel_runbook_wants_exactly_queue_workers_workers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks");
    let rb = Runbook::load(&root.join("laravel.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let plan = |n: &str| {
        rb.plan(
            &BTreeMap::from([("queue_workers".to_string(), n.to_string())]),
            &facts(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let target = |p: &Plan| -> String {
        p.steps
            .iter()
            .find_map(|s| match &s.action {
                Action::File(f) if f.path.ends_with("app-workers.target") => {
                    Some(String::from_utf8_lossy(&f.content).into_owned())
                }
                _ => None,
            })
            .expect("the target")
    };
    let three = plan("3");
    assert!(
        target(&three)
            .contains("Wants=app-worker@1.service app-worker@2.service app-worker@3.service \n"),
        "{}",
        target(&three)
    );
    let running = three
        .steps
        .iter()
        .find(|s| s.name == "queue workers running")
        .unwrap();
    assert!(running
        .guards
        .unless
        .as_deref()
        .unwrap()
        .contains("= \"3 0\""));
    assert!(!target(&plan("0")).contains("app-worker@"));
}

#[test]
fn a_runaway_template_is_an_error_not_a_hang() {
    let book = parse(
        "steps:\n  - name: loops\n    file:\n      path: /tmp/x\n      template: \"{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}\"\n",
    )
    .expect("parses");
    let started = std::time::Instant::now();
    let err = book
        .plan(&BTreeMap::new(), &facts())
        .expect_err("out of fuel")
        .to_string();
    assert!(err.contains("file.template"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // An ordinary template fits the budget many times over.
    let book = parse(
        "steps:\n  - name: pool\n    file:\n      path: /tmp/x\n      template: \"{% for i in range(200) %}pm.max_children = {{ i }}\\n{% endfor %}\"\n",
    )
    .expect("parses");
    assert!(book.plan(&BTreeMap::new(), &facts()).is_ok());
}

/// The batched checks, run by a real `sh`: skipped steps and matching
/// files are reported and passed over, the first step with work to do is
/// reported last, later ones are not checked before it has acted.
#[test]
fn a_check_batch_stops_at_the_first_step_with_work_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    std::fs::write(at("done"), "").unwrap();
    std::fs::write(at("conf"), "same\n").unwrap();
    let command = |name: &str, guards: Guards| PlannedStep {
        name: name.into(),
        guards,
        action: Action::Command {
            script: "true".into(),
        },
        become_root: false,
        timeout: None,
    };
    let file = |name: &str, content: &[u8]| PlannedStep {
        name: name.into(),
        guards: Guards::default(),
        action: Action::File(PlannedFile {
            path: at(name),
            content: content.to_vec(),
            sha256: hex::encode(Sha256::digest(content)),
            mode: None,
            owner: None,
            group: None,
        }),
        become_root: false,
        timeout: None,
    };
    let creates_done = Guards {
        creates: Some(at("done")),
        ..Guards::default()
    };
    let never_done = Guards {
        unless: Some("false".into()),
        ..Guards::default()
    };
    let steps = [
        command("already done", creates_done),
        file("conf", b"same\n"),
        command("has work", never_done.clone()),
        command("not checked yet", never_done),
    ];
    let run = |steps: &[PlannedStep]| {
        let script = check_batch_script(steps, "nobody");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}\n{out:?}");
        parse_check_batch(&String::from_utf8_lossy(&out.stdout))
    };
    let checks = run(&steps);
    assert_eq!(checks.len(), 3, "{checks:?}");
    assert_eq!(checks[0], BatchCheck::Checked(CheckResult::Skip("creates")));
    let BatchCheck::Checked(conf) = &checks[1] else {
        panic!("{checks:?}")
    };
    let Action::File(want) = &steps[1].action else {
        unreachable!()
    };
    assert!(file_matches(want, conf), "{conf:?}");
    assert_eq!(checks[2], BatchCheck::Checked(CheckResult::Run));

    // A file that differs has work to do: the batch stops there too.
    let checks = run(&[file("conf", b"changed\n"), file("other", b"x")]);
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert!(
        matches!(
            &checks[0],
            BatchCheck::Checked(CheckResult::FilePresent { .. })
        ),
        "{checks:?}"
    );

    // Consecutive `become` steps share one sudo.
    let rooted = |name: &str| PlannedStep {
        become_root: true,
        ..command(
            name,
            Guards {
                creates: Some("/x".into()),
                ..Guards::default()
            },
        )
    };
    let script = check_batch_script(
        &[
            rooted("a"),
            rooted("b"),
            command(
                "c",
                Guards {
                    creates: Some("/y".into()),
                    ..Guards::default()
                },
            ),
            rooted("d"),
        ],
        "deploy",
    );
    assert_eq!(script.matches("sudo -n").count(), 2, "{script}");

    // A check that cannot run (`sudo` refused) ends the batch as a failure.
    assert_eq!(
        parse_check_batch("#hangar-check 0\nskip:creates\n#hangar-check 1 failed 1\n"),
        [
            BatchCheck::Checked(CheckResult::Skip("creates")),
            BatchCheck::Failed(1)
        ]
    );
}
