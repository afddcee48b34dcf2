//! Checks `infra/grafana/hangar.json` against a `/metrics` scrape: the
//! dashboard is well-formed and every query names a metric hangar exports.
//! Shared by `operator/tests/dashboard.rs` (a fresh operator's scrape) and
//! the status-page scenario (a live `hangar run`'s).

use std::collections::BTreeSet;
use std::path::PathBuf;

pub fn dashboard_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../infra/grafana/hangar.json")
}

/// Sample names a scrape can contain: each `# TYPE` family's names
/// (`_total` for counters, `_bucket`/`_sum`/`_count` for histograms).
pub fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{family}_total"));
                names.insert(format!("{family}_created"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count", "_created"] {
                    names.insert(format!("{family}{s}"));
                }
            }
            _ => {
                names.insert(family.to_string());
            }
        }
    }
    names
}

/// The `hangar_*` identifiers in a PromQL expression.
pub fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = expr[i..].find("hangar_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '(' | '[' | '{' => stack.push(c),
            ')' | ']' | '}' => {
                let open = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if stack.pop() != Some(open) {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && !quoted
}

/// Everything wrong with the dashboard, given what `metrics` exports;
/// also returns the metrics the dashboard's queries use.
pub fn problems(dashboard: &str, metrics: &str) -> (Vec<String>, BTreeSet<String>) {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let d: serde_json::Value = match serde_json::from_str(dashboard) {
        Ok(d) => d,
        Err(e) => return (vec![format!("not JSON: {e}")], used),
    };
    let exported = exported(metrics);
    if exported.is_empty() {
        problems.push("the scrape has no # TYPE line".into());
    }
    for key in ["uid", "title", "panels", "schemaVersion"] {
        if d.get(key).is_none() {
            problems.push(format!("no `{key}`"));
        }
    }
    let mut ids = BTreeSet::new();
    let panels = d["panels"].as_array().cloned().unwrap_or_default();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let Some(id) = p["id"].as_u64() else {
            problems.push(format!("panel `{title}` has no id"));
            continue;
        };
        if !ids.insert(id) {
            problems.push(format!("panel id {id} twice"));
        }
        for k in ["x", "y", "w", "h"] {
            if p["gridPos"][k].as_u64().is_none() {
                problems.push(format!("panel `{title}`: gridPos.{k} missing"));
            }
        }
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel `{title}` has no query"));
        }
        for t in &targets {
            let Some(expr) = t["expr"].as_str() else {
                problems.push(format!("panel `{title}`: a target without expr"));
                continue;
            };
            if !balanced(expr) {
                problems.push(format!("panel `{title}`: unbalanced `{expr}`"));
            }
            if t["datasource"]["uid"] != "${datasource}" {
                problems.push(format!("panel `{title}`: target not on ${{datasource}}"));
            }
            let names = metric_names(expr);
            if names.is_empty() {
                problems.push(format!("panel `{title}`: `{expr}` names no hangar metric"));
            }
            for n in names {
                if !exported.contains(&n) {
                    problems.push(format!("panel `{title}`: `{n}` is not exported"));
                }
                used.insert(n);
            }
        }
    }
    (problems, used)
}
