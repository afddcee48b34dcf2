//! The cluster chart as server-rendered SVG: no script, no library, no
//! build step. Nodes (desired and in service, as steps) on the left axis
//! over the capacity window's band; the traffic reading on the right axis.

use std::fmt::Write as _;

use crate::runtime::history::Series;

const W: f64 = 760.0;
const H: f64 = 240.0;
const LEFT: f64 = 40.0;
const RIGHT: f64 = 64.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// The chart of `series` between `from` and `to` (Unix seconds).
pub fn render(cluster: &str, series: &Series, from: u32, to: u32) -> String {
    let to = to.max(from + 1);
    let points: Vec<_> = series
        .points
        .iter()
        .filter(|p| p.t >= from && p.t <= to)
        .collect();
    let x = |t: u32| {
        LEFT + (f64::from(t.saturating_sub(from)) / f64::from(to - from)) * (W - LEFT - RIGHT)
    };
    let top_nodes = points
        .iter()
        .map(|p| p.desired.max(p.in_service))
        .chain(series.windows.iter().map(|w| w.max))
        .max()
        .unwrap_or(1)
        .max(1);
    let top_nodes = f64::from(top_nodes) * 1.1 + 0.5;
    let y_nodes = |n: u16| TOP + (1.0 - f64::from(n) / top_nodes) * (H - TOP - BOTTOM);
    let top_rpm = points
        .iter()
        .filter_map(|p| p.traffic())
        .fold(0.0_f64, f64::max);
    let top_rpm = if top_rpm > 0.0 { top_rpm * 1.1 } else { 1.0 };
    let y_rpm = |r: f64| TOP + (1.0 - r / top_rpm) * (H - TOP - BOTTOM);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" id="chart-{c}" data-cluster="{c}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="nodes and traffic of {c}">"#,
        c = super::esc(cluster)
    );
    // The window band, one rectangle per stretch with the same window.
    let mut band = String::new();
    let mut edges: Vec<u32> = vec![from];
    edges.extend(
        series
            .windows
            .iter()
            .map(|w| w.t)
            .filter(|t| *t > from && *t < to),
    );
    edges.push(to);
    for pair in edges.windows(2) {
        if let Some((min, max)) = series.window_at(pair[0]) {
            let (x0, x1) = (x(pair[0]), x(pair[1]));
            let _ = write!(
                band,
                r#"<rect class="window" x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}"><title>window [{min}, {max}]</title></rect>"#,
                y_nodes(max),
                (x1 - x0).max(0.0),
                (y_nodes(min) - y_nodes(max)).max(0.0)
            );
        }
    }
    svg.push_str(&band);
    // Axes and grid: node counts on the left, requests/min on the right.
    let step = ((top_nodes / 5.0).ceil() as u32).max(1);
    for i in 0..=(top_nodes as u32 / step) {
        let n = u16::try_from(i * step).unwrap_or(u16::MAX);
        let y = y_nodes(n);
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"/><text class="axis" x="{:.1}" y="{:.1}" text-anchor="end">{n}</text>"#,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0
        );
    }
    for i in 0..=4 {
        let r = top_rpm * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r#"<text class="axis rpm" x="{:.1}" y="{:.1}">{}</text>"#,
            W - RIGHT + 6.0,
            y_rpm(r) + 4.0,
            short(r)
        );
    }
    for i in 0..=4u32 {
        let t = from + (to - from) / 4 * i;
        let format = if to - from < 3600 {
            "%H:%M:%S"
        } else {
            "%H:%M"
        };
        let label = chrono::DateTime::from_timestamp(i64::from(t), 0)
            .map(|d| d.format(format).to_string())
            .unwrap_or_default();
        let _ = write!(
            svg,
            r#"<text class="axis" x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            x(t),
            H - 8.0
        );
    }
    // Series: steps for counts, a line for traffic.
    let steps = |value: &dyn Fn(&crate::runtime::history::Point) -> u16| {
        let mut out = String::new();
        let mut prev: Option<f64> = None;
        for p in &points {
            let (px, py) = (x(p.t), y_nodes(value(p)));
            if let Some(prev_y) = prev {
                let _ = write!(out, "{px:.1},{prev_y:.1} ");
            }
            let _ = write!(out, "{px:.1},{py:.1} ");
            prev = Some(py);
        }
        out
    };
    let traffic: String = points
        .iter()
        .filter_map(|p| Some((x(p.t), y_rpm(p.traffic()?))))
        .map(|(px, py)| format!("{px:.1},{py:.1} "))
        .collect();
    let count = |s: &str| s.split_whitespace().count();
    for (name, pts) in [
        ("traffic", traffic),
        ("desired", steps(&|p| p.desired)),
        ("in-service", steps(&|p| p.in_service)),
    ] {
        let _ = write!(
            svg,
            r#"<polyline class="series {name}" data-series="{name}" data-points="{}" points="{}"/>"#,
            count(&pts),
            pts.trim_end()
        );
    }
    // The latest point, labelled.
    if let Some(last) = points.last() {
        let _ = write!(
            svg,
            r#"<circle class="dot desired" cx="{:.1}" cy="{:.1}" r="3"><title>desired {}</title></circle>"#,
            x(last.t),
            y_nodes(last.desired),
            last.desired
        );
    }
    if points.is_empty() {
        let _ = write!(
            svg,
            r#"<text class="empty" x="{:.1}" y="{:.1}" text-anchor="middle">no evaluation recorded yet</text>"#,
            W / 2.0,
            H / 2.0
        );
    }
    svg.push_str("</svg>");
    svg
}

/// `1.2k`, `35`, `0.5`: axis labels that fit.
fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::history::Point;

    #[test]
    fn draws_steps_for_counts_and_a_line_for_traffic() {
        let mut s = Series::default();
        for (i, (d, n, rpm)) in [
            (2, 0, f32::NAN),
            (2, 2, 600.0),
            (4, 2, 1200.0),
            (4, 4, 1200.0),
        ]
        .into_iter()
        .enumerate()
        {
            s.push(Point {
                t: 1000 + 15 * i as u32,
                desired: d,
                in_service: n,
                rpm,
            });
        }
        let svg = render("web", &s, 1000, 1060);
        let attr = |series: &str| {
            let at = svg
                .find(&format!(r#"data-series="{series}" data-points=""#))
                .unwrap();
            let rest = &svg[at..];
            let start = rest.find("data-points=\"").unwrap() + 13;
            rest[start..start + rest[start..].find('"').unwrap()]
                .parse::<usize>()
                .unwrap()
        };
        assert_eq!(attr("traffic"), 3, "the point without a reading is skipped");
        assert_eq!(attr("desired"), 7, "4 points drawn as steps");
        assert_eq!(attr("in-service"), 7);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(!svg.contains("NaN"), "{svg}");
        let empty = render("web", &Series::default(), 1000, 1060);
        assert!(empty.contains("no evaluation recorded yet"));
    }
}
