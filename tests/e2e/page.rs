//! The status page in a real browser, against a live `hangar run`; and the
//! Grafana dashboard against that run's real `/metrics`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::browser::{screenshot, Browser};
use crate::support::{dashboard, in_service, settled_on, Scenario};

/// Where the screenshot goes: `target/e2e-artifacts/status-page.png`
/// (`HANGAR_E2E_ARTIFACTS` overrides the directory).
fn artifact_dir() -> PathBuf {
    std::env::var_os("HANGAR_E2E_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("e2e-artifacts")
        })
}

#[test]
fn the_status_page_shows_the_live_cluster_in_a_real_browser() {
    // The one reason to skip: no browser on this machine (infra/local/setup
    // installs both). Said loudly, never a silent pass.
    let missing: Vec<&str> = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .into_iter()
        .filter(|b| !std::path::Path::new(b).is_file())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED the_status_page_shows_the_live_cluster_in_a_real_browser: {} missing \
             (run infra/local/setup: apt chromium chromium-driver)",
            missing.join(", ")
        );
        return;
    }
    let mut s = Scenario::start();
    s.write_spec(&s.spec());
    s.start_operator();
    s.wait_status(
        "web",
        "2 nodes in service",
        Duration::from_secs(120),
        |st| settled_on(st, 2, "v1"),
    );
    // Traffic: 20 requests/s is 1,200/min, four nodes' worth at 300 a
    // node, so the chart shows a scale-out and the reading behind it.
    let load = s
        .cloud
        .start_load(20.0, Some(Duration::from_secs(40)))
        .expect("load");
    s.wait_status(
        "web",
        "4 nodes in service under load",
        Duration::from_secs(120),
        |st| settled_on(st, 4, "v1"),
    );
    std::thread::sleep(Duration::from_secs(3));

    let base = format!("http://{}", s.operator().listen);
    let browser = Browser::start((1280, 1800));
    // The page and the API are read a moment apart: retry until they
    // agree (a node changing phase in between), with a deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (page, api) = loop {
        browser.goto(&format!("{base}/clusters/web"));
        let page = browser.eval(
            r#"
            const pts = s => { const l = document.querySelector(`#chart-web polyline[data-series="${s}"]`);
                               return l ? l.points.numberOfItems : -1; };
            const box = document.querySelector('#chart-web').getBoundingClientRect();
            return {
              title: document.title,
              desired: pts('desired'), inService: pts('in-service'), traffic: pts('traffic'),
              chartWidth: box.width, chartHeight: box.height,
              nodes: [...document.querySelectorAll('#nodes-web tr[data-node]')]
                       .map(tr => [tr.dataset.node, tr.querySelector('[data-field=phase]').textContent]),
              desiredField: document.querySelector('#cluster-web [data-field=desired]').textContent,
              activities: document.querySelectorAll('#activity-web tbody tr').length,
              scripts: document.scripts.length,
            };"#,
        );
        let api = s.status("web").expect("status from the API");
        let api_nodes: BTreeMap<String, String> = api
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.phase.clone()))
            .collect();
        let page_nodes: BTreeMap<String, String> = page["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap_or("").into(),
                    r[1].as_str().unwrap_or("").into(),
                )
            })
            .collect();
        if page_nodes == api_nodes || Instant::now() > deadline {
            assert_eq!(page_nodes, api_nodes, "the node table is the API's");
            break (page, api);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(page["title"], "hangar: web");
    assert_eq!(page["scripts"], 0, "no script on the page");
    assert!(
        page["desired"].as_i64() >= Some(4),
        "the chart has points: {page}"
    );
    assert!(page["inService"].as_i64() >= Some(4), "{page}");
    assert!(
        page["traffic"].as_i64() >= Some(2),
        "traffic is drawn: {page}"
    );
    assert!(
        page["chartWidth"].as_f64() > Some(300.0),
        "the chart is laid out: {page}"
    );
    assert_eq!(page["desiredField"], api.memory.desired.to_string());
    assert!(page["activities"].as_i64() >= Some(4), "{page}");
    assert!(in_service(&api) >= 2, "{}", in_service(&api));

    // The index links the cluster.
    browser.goto(&format!("{base}/"));
    let index = browser.eval(
        "return [...document.querySelectorAll('#clusters tr[data-cluster]')].map(r => r.dataset.cluster);",
    );
    assert_eq!(index, serde_json::json!(["web"]));
    drop(browser);

    // The picture: kept as an artifact (and, with HANGAR_UPDATE_SCREENSHOT=1,
    // as the README's).
    let png = screenshot(
        &format!("{base}/clusters/web"),
        &artifact_dir().join("status-page.png"),
        (1100, 1250),
    );
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "{} bytes",
        bytes.len()
    );
    eprintln!("screenshot: {}", png.display());
    if std::env::var_os("HANGAR_UPDATE_SCREENSHOT").is_some() {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
        std::fs::copy(&png, &docs).expect("copy the screenshot to docs/");
    }

    // The dashboard's queries against this run's real scrape.
    let metrics = s.operator().metrics().expect("/metrics");
    let text = std::fs::read_to_string(dashboard::dashboard_path()).expect("dashboard");
    let (problems, used) = dashboard::problems(&text, &metrics);
    // Counters of events this run never had (no rollout, no SSH error, no
    // failed pass) have no series yet, so no family in the scrape;
    // operator/tests/dashboard.rs checks those names with one series each.
    let not_yet = [
        "hangar_rollouts_total",
        "hangar_ssh_errors_total",
        "hangar_reconcile_errors_total",
        // Counted when a decision moves the desired count; a cold start
        // to `min` is the first decision, not a move.
        "hangar_scaling_actions_total",
    ];
    let real: Vec<&String> = problems
        .iter()
        .filter(|p| {
            !not_yet
                .iter()
                .any(|m| p.ends_with(&format!("`{m}` is not exported")))
        })
        .collect();
    assert!(real.is_empty(), "{real:#?}\nscrape:\n{metrics}");
    let live = dashboard::exported(&metrics);
    let charted_live = used.iter().filter(|m| live.contains(*m)).count();
    assert!(charted_live >= 8, "{used:?} vs {live:?}");
    let report = load.wait();
    assert_eq!(report.errors, 0, "{report:?}");
    s.watcher.assert_invariants();
}
