//! The status page `hangar run` serves at `/`: HTML rendered here, the
//! chart as inline SVG ([`chart`]), no script and no build step. Read-only,
//! and built from exactly what `/api/v1` serves (the public status view)
//! plus the chart's [`history`](crate::runtime::history): no secret and no
//! spec path beyond it. Every string from a spec or a node is escaped.
//!
//! - `/` — every cluster: a summary table, and each cluster in full when
//!   there are at most [`FULL_UP_TO`] (otherwise a link per cluster);
//! - `/clusters/{name}` — one cluster in full; `?hours=N` (1–24) sets the
//!   chart's span (default 6).

pub mod chart;

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::runtime::history::{HistoryStore, Series};
use crate::runtime::http::ProblemView;
use crate::runtime::status::{ClusterStatus, ConditionType};

/// `/` shows clusters in full up to this many.
pub const FULL_UP_TO: usize = 5;
/// The chart's default span.
pub const DEFAULT_HOURS: u32 = 6;
/// The chart's shortest span.
const MIN_SPAN_SECS: u32 = 60;

/// HTML-escapes text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f8fa}
header{background:#1b1f24;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:18px;margin:0}header a{color:#9ecbff}
main{padding:16px 20px;max-width:1100px}
section.cluster{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px 16px;margin:0 0 16px}
h2{margin:4px 0 8px;font-size:17px}h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
.facts{display:flex;flex-wrap:wrap;gap:6px 22px;margin:4px 0 8px}
.facts b{font-weight:600}
.ok{color:#1a7f37}.bad{color:#cf222e}.warn{color:#9a6700}.muted{color:#57606a}
.bar{display:inline-block;width:160px;height:10px;background:#eaeef2;border-radius:5px;vertical-align:middle;overflow:hidden}
.bar span{display:block;height:100%;background:#2da44e}
svg.chart{background:#fff;max-width:100%;height:auto}
svg .grid{stroke:#eaeef2}svg .axis{font-size:11px;fill:#57606a}
svg .window{fill:#ddf4ff}
svg .series{fill:none;stroke-width:2}
svg .desired{stroke:#0969da}svg .in-service{stroke:#1a7f37;stroke-dasharray:5 3}
svg .traffic{stroke:#bf8700;stroke-width:1.5}
svg .dot{fill:#0969da}svg .empty{fill:#57606a}
.legend span{margin-right:14px}.legend i{display:inline-block;width:14px;height:3px;vertical-align:middle;margin-right:4px}
code{font-size:12px}
"#;

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="10">
<title>{title}</title><style>{STYLE}</style></head>
<body><header><h1>hangar</h1><a href="/">clusters</a><a href="/api/v1/clusters">API</a><a href="/metrics">metrics</a></header>
<main>{body}</main></body></html>
"#,
        title = esc(title)
    )
}

fn time(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let text = if (now - t).num_hours() < 20 {
        t.format("%H:%M:%S").to_string()
    } else {
        t.format("%Y-%m-%d %H:%M").to_string()
    };
    format!(
        r#"<time datetime="{}" title="{}">{text}</time>"#,
        t.to_rfc3339(),
        t.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

fn in_service(s: &ClusterStatus) -> u32 {
    s.phases.get("in-service").copied().unwrap_or(0)
}

fn condition_cell(s: &ClusterStatus) -> String {
    let mut out = Vec::new();
    for c in &s.conditions {
        let class = match (c.kind, c.status) {
            (ConditionType::Ready, true) => "ok",
            (ConditionType::Degraded, true) => "bad",
            (ConditionType::Progressing, true) => "warn",
            _ => continue,
        };
        out.push(format!(
            r#"<span class="{class}" title="{}">{:?}</span>"#,
            esc(&format!("{} — {}", c.reason, c.message)),
            c.kind
        ));
    }
    if out.is_empty() {
        r#"<span class="muted">-</span>"#.to_string()
    } else {
        out.join(" ")
    }
}

fn window_text(s: &ClusterStatus) -> String {
    match &s.memory.window {
        Some(w) => match &w.schedule {
            Some(name) => format!("[{}, {}] ({})", w.min, w.max, esc(name)),
            None => format!("[{}, {}]", w.min, w.max),
        },
        None => "-".into(),
    }
}

/// `/`: every cluster.
pub fn index(
    clusters: &[ClusterStatus],
    problems: &[ProblemView],
    history: &HistoryStore,
    now: DateTime<Utc>,
) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        r#"<table id="clusters"><thead><tr><th>cluster</th><th>region</th><th>in service / desired</th><th>window</th><th>release</th><th>conditions</th><th>updated</th></tr></thead><tbody>"#
    );
    for s in clusters {
        let _ = write!(
            body,
            r#"<tr data-cluster="{n}"><td><a href="/clusters/{n}">{n}</a>{removed}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&s.region),
            in_service(s),
            s.memory.desired,
            window_text(s),
            esc(&s.memory.release.target),
            condition_cell(s),
            s.updated_at.map(|t| time(t, now)).unwrap_or_default(),
            n = esc(&s.name),
            removed = if s.spec_removed {
                r#" <span class="warn">spec removed</span>"#
            } else {
                ""
            },
        );
    }
    if clusters.is_empty() {
        body.push_str(r#"<tr><td colspan="7" class="muted">no cluster yet</td></tr>"#);
    }
    body.push_str("</tbody></table>");
    if !problems.is_empty() {
        body.push_str(r#"<h3 class="bad">spec problems</h3><ul id="problems">"#);
        for p in problems {
            let _ = write!(body, "<li><code>{}</code></li>", esc(&p.text));
        }
        body.push_str("</ul>");
    }
    if clusters.len() <= FULL_UP_TO {
        for s in clusters {
            let series = history.get(&s.name).unwrap_or_default();
            body.push_str(&cluster_section(s, &series, DEFAULT_HOURS, now));
        }
    }
    page("hangar", &body)
}

/// `/clusters/{name}`.
pub fn cluster(s: &ClusterStatus, series: &Series, hours: u32, now: DateTime<Utc>) -> String {
    page(
        &format!("hangar: {}", s.name),
        &cluster_section(s, series, hours.clamp(1, 24), now),
    )
}

fn cluster_section(s: &ClusterStatus, series: &Series, hours: u32, now: DateTime<Utc>) -> String {
    let m = &s.memory;
    let name = esc(&s.name);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<section class="cluster" id="cluster-{name}" data-cluster="{name}"><h2><a href="/clusters/{name}">{name}</a> <span class="muted">{}</span> {}</h2>"#,
        esc(&s.region),
        condition_cell(s)
    );
    let traffic = m
        .last_metric
        .map(|r| format!("{:.0} requests/min", r.requests_per_minute))
        .unwrap_or_else(|| "no reading".into());
    let _ = write!(
        out,
        r#"<div class="facts"><span>window <b data-field="window">{}</b></span><span>desired <b data-field="desired">{}</b></span><span>in service <b data-field="in-service">{}</b></span><span>traffic <b>{}</b></span></div>"#,
        window_text(s),
        m.desired,
        in_service(s),
        esc(&traffic)
    );
    if let Some(c) = &s.commit {
        let _ = write!(
            out,
            r#"<div>spec from commit <code data-field="commit" title="{}">{}</code> {} <span class="muted">{}</span></div>"#,
            esc(&c.sha),
            esc(c.short()),
            esc(&c.subject),
            esc(&c.author)
        );
    }
    if let Some(d) = &m.last_decision {
        let _ = write!(
            out,
            r#"<div>decision at {}: <span data-field="reason">{}</span></div>"#,
            time(d.at, now),
            esc(&d.reason)
        );
    }
    // The chart: the last `hours`, or since the oldest point when that is
    // later (a fresh operator's first minutes fill the chart), at least 1 min.
    let to = u32::try_from(now.timestamp()).unwrap_or(u32::MAX);
    let from = to
        .saturating_sub(hours * 3600)
        .max(series.since().unwrap_or(0))
        .min(to.saturating_sub(MIN_SPAN_SECS));
    let span = if to - from >= 3600 {
        format!("{:.1} h", f64::from(to - from) / 3600.0)
    } else {
        format!("{} min", (to - from).div_ceil(60))
    };
    let _ = write!(
        out,
        r#"<h3>last {span} <span class="muted">({} points; <a href="/clusters/{name}?hours=24">24 h</a>)</span></h3><div class="legend"><span><i style="background:#0969da"></i>desired</span><span><i style="background:#1a7f37"></i>in service</span><span><i style="background:#ddf4ff;height:10px"></i>window</span><span><i style="background:#bf8700"></i>traffic (requests/min, right axis)</span></div>"#,
        series.points.iter().filter(|p| p.t >= from).count()
    );
    out.push_str(&chart::render(&s.name, series, from, to));
    // Release and rollout.
    let r = &m.release;
    let serving = in_service(s);
    let pct = if serving > 0 {
        (f64::from(r.on_target.min(serving)) / f64::from(serving) * 100.0).round()
    } else {
        0.0
    };
    let _ = write!(
        out,
        r#"<h3>release</h3><div class="facts" id="release-{name}"><span>desired <b>{}</b></span><span>target <b>{}</b></span><span>last good <b>{}</b></span><span>rollout <span class="bar"><span style="width:{pct}%"></span></span> {} of {serving} on target, {} outdated</span>{}{}</div>"#,
        esc(&r.desired),
        esc(&r.target),
        esc(r.last_good.as_deref().unwrap_or("-")),
        r.on_target,
        r.outdated,
        if r.failed.is_empty() {
            String::new()
        } else {
            format!(
                r#"<span class="bad">failed: {}</span>"#,
                esc(&r.failed.join(", "))
            )
        },
        match &r.rolling_back_from {
            Some(from) => format!(
                r#"<span class="bad">rolling back from {}</span>"#,
                esc(from)
            ),
            None => String::new(),
        }
    );
    // Conditions.
    out.push_str(r#"<h3>conditions</h3><table class="conditions"><thead><tr><th>type</th><th>status</th><th>reason</th><th>message</th><th>since</th></tr></thead><tbody>"#);
    for c in &s.conditions {
        let _ = write!(
            out,
            "<tr><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.kind,
            c.status,
            esc(&c.reason),
            esc(&c.message),
            time(c.since, now)
        );
    }
    out.push_str("</tbody></table>");
    // Nodes.
    let _ = write!(
        out,
        r#"<h3>nodes</h3><table class="nodes" id="nodes-{name}"><thead><tr><th>node</th><th>phase</th><th>state</th><th>release</th><th>address</th><th>subnet</th><th>task</th><th>launched</th><th>last error</th></tr></thead><tbody>"#
    );
    for n in &s.nodes {
        let _ = write!(
            out,
            r#"<tr data-node="{id}"><td>{id}{}</td><td data-field="phase">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td data-field="task">{}</td><td>{}</td><td class="bad">{}</td></tr>"#,
            if n.protected { " (protected)" } else { "" },
            esc(&n.phase),
            esc(&n.state),
            esc(n.release.as_deref().unwrap_or("-")),
            esc(n.address.as_deref().unwrap_or("-")),
            esc(n.subnet.as_deref().unwrap_or("-")),
            esc(n.task.as_deref().unwrap_or("-")),
            n.launched_at.map(|t| time(t, now)).unwrap_or_default(),
            esc(n.last_error.as_deref().unwrap_or("")),
            id = esc(&n.id),
        );
    }
    if s.nodes.is_empty() {
        out.push_str(r#"<tr><td colspan="9" class="muted">no node</td></tr>"#);
    }
    out.push_str("</tbody></table>");
    // Activity, newest first, with the planner's reasons.
    let _ = write!(
        out,
        r#"<h3>activity</h3><table class="activity" id="activity-{name}"><thead><tr><th>at</th><th>what</th><th>node</th><th>message</th></tr></thead><tbody>"#
    );
    for a in &s.activities {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            time(a.at, now),
            esc(&a.kind),
            esc(a.node.as_deref().unwrap_or("")),
            esc(&a.message)
        );
    }
    if s.activities.is_empty() {
        out.push_str(r#"<tr><td colspan="4" class="muted">nothing yet</td></tr>"#);
    }
    out.push_str("</tbody></table></section>");
    out
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::runtime::status::NodeStatus;

    #[test]
    fn everything_from_specs_and_nodes_is_escaped() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        let mut s = ClusterStatus::new("web");
        s.updated_at = Some(now);
        s.nodes.push(NodeStatus {
            id: "i-1".into(),
            phase: "in-service".into(),
            last_error: Some("<script>alert(1)</script>".into()),
            ..NodeStatus::default()
        });
        s.record(
            now,
            "error",
            Some("i-1"),
            "boom <img src=x onerror=alert(1)>",
        );
        s.commit = Some(crate::effects::git::CommitInfo {
            sha: "1a2b3c4d5e".into(),
            author: "Mallory <m@x>".into(),
            time: "2026-11-23T11:00:00Z".into(),
            subject: "<script>alert(2)</script>".into(),
        });
        let html = cluster(&s, &Series::default(), 6, now);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(
            html.contains(r#"<code data-field="commit" title="1a2b3c4d5e">1a2b3c4</code>"#),
            "{html}"
        );
        assert!(html.contains("Mallory &lt;m@x&gt;"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(html.contains(r#"<tr data-node="i-1">"#));
    }

    #[test]
    fn the_index_lists_every_cluster_and_shows_few_in_full() {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        let history = HistoryStore::default();
        let few: Vec<ClusterStatus> = ["a", "b"].iter().map(|n| ClusterStatus::new(n)).collect();
        let html = index(&few, &[], &history, now);
        assert!(html.contains(r#"<tr data-cluster="a">"#));
        assert!(html.contains(r#"id="cluster-b""#));
        let many: Vec<ClusterStatus> = (0..FULL_UP_TO + 1)
            .map(|i| ClusterStatus::new(&format!("c{i}")))
            .collect();
        let html = index(&many, &[], &history, now);
        assert!(html.contains(r#"<tr data-cluster="c5">"#));
        assert!(
            !html.contains("<section"),
            "too many clusters for full sections"
        );
    }
}
