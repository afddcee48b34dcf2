//! What the status page charts: per cluster, one point per evaluation
//! (desired count, nodes in service, the traffic reading) for the last
//! 24 hours, and the capacity window's changes.
//!
//! Kept in memory only, fed from every status the [`Board`] receives: a
//! restarted operator starts a fresh chart (the decisions' memory that
//! matters lives in the status files). Bounded by time (24 h) and by rate
//! (at most one point a second), so a cluster costs at most
//! `24 h / evaluationInterval` points of 12 bytes: 5,760 at 15 s, ~68 KiB.
//!
//! [`Board`]: crate::runtime::http::Board

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};

use crate::runtime::status::ClusterStatus;

/// How far back points are kept.
pub const RETENTION_SECS: i64 = 24 * 3600;
/// A cluster without evaluations (no autoscaling) still gets a point this often.
const HEARTBEAT_SECS: i64 = 60;
/// Never two points closer than this.
const MIN_SPACING_SECS: i64 = 1;

/// One point: 12 bytes, so a day of 15 s evaluations is ~68 KiB a cluster.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// Seconds since the Unix epoch.
    pub t: u32,
    pub desired: u16,
    pub in_service: u16,
    /// Requests per minute the planner read; NaN when there was none.
    pub rpm: f32,
}

impl Point {
    pub fn at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(i64::from(self.t), 0).unwrap_or_default()
    }

    pub fn traffic(&self) -> Option<f64> {
        (!self.rpm.is_nan()).then_some(f64::from(self.rpm))
    }
}

/// The capacity window from `t` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowChange {
    pub t: u32,
    pub min: u16,
    pub max: u16,
}

/// One cluster's chart data, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub points: VecDeque<Point>,
    /// Window changes; the first one is in force before the oldest point.
    pub windows: VecDeque<WindowChange>,
    last_eval: Option<DateTime<Utc>>,
}

impl Series {
    /// Appends `p` (a point older than the last is ignored) and forgets
    /// what is past the retention.
    pub fn push(&mut self, p: Point) {
        if self.points.back().is_some_and(|last| p.t < last.t) {
            return;
        }
        if self.points.len() == self.points.capacity() {
            // Grow by a fixed step, not by doubling: at 1,000 clusters a
            // doubled buffer would hold up to twice the day it needs.
            self.points.reserve_exact(256);
        }
        self.points.push_back(p);
        let horizon = i64::from(p.t) - RETENTION_SECS;
        while self
            .points
            .front()
            .is_some_and(|o| i64::from(o.t) < horizon)
        {
            self.points.pop_front();
        }
        // Keep the window in force at the oldest point, drop older ones.
        while self.windows.len() > 1
            && self
                .windows
                .get(1)
                .is_some_and(|w| i64::from(w.t) <= horizon)
        {
            self.windows.pop_front();
        }
    }

    fn note_window(&mut self, t: u32, min: u16, max: u16) {
        match self.windows.back() {
            Some(w) if w.min == min && w.max == max => {}
            _ => self.windows.push_back(WindowChange { t, min, max }),
        }
    }

    /// The window in force at `t` (none before the first one known).
    pub fn window_at(&self, t: u32) -> Option<(u16, u16)> {
        self.windows
            .iter()
            .rev()
            .find(|w| w.t <= t)
            .map(|w| (w.min, w.max))
    }

    /// The oldest point's time.
    pub fn since(&self) -> Option<u32> {
        self.points.front().map(|p| p.t)
    }

    /// Bytes this series holds on the heap (for the benchmark's accounting).
    pub fn heap_bytes(&self) -> usize {
        self.points.capacity() * std::mem::size_of::<Point>()
            + self.windows.capacity() * std::mem::size_of::<WindowChange>()
    }
}

/// Every cluster's series; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct HistoryStore {
    series: Arc<RwLock<HashMap<String, Arc<Mutex<Series>>>>>,
}

fn clamp16(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

impl HistoryStore {
    /// Takes a point from a cluster's new status when it holds a new
    /// evaluation, a change of the counts, or a minute passed.
    pub fn observe(&self, status: &ClusterStatus) {
        let Some(at) = status.updated_at else { return };
        let Ok(t) = u32::try_from(at.timestamp()) else {
            return;
        };
        let m = &status.memory;
        let point = Point {
            t,
            desired: clamp16(m.desired),
            in_service: clamp16(status.phases.get("in-service").copied().unwrap_or(0)),
            rpm: m
                .last_metric
                .map_or(f32::NAN, |r| r.requests_per_minute as f32),
        };
        let series = self.series_of(&status.name);
        let mut s = series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = &m.window {
            s.note_window(t, clamp16(w.min), clamp16(w.max));
        }
        let take = match s.points.back() {
            None => true,
            Some(last) => {
                let since = i64::from(t) - i64::from(last.t);
                let evaluated = m.last_eval_at.is_some() && m.last_eval_at != s.last_eval;
                let moved = last.desired != point.desired || last.in_service != point.in_service;
                since >= MIN_SPACING_SECS && (evaluated || moved || since >= HEARTBEAT_SECS)
            }
        };
        if take {
            s.last_eval = m.last_eval_at;
            s.push(point);
        }
    }

    /// Appends a point as is (the benchmark fills a day with it).
    pub fn record(&self, cluster: &str, point: Point) {
        let series = self.series_of(cluster);
        series.lock().unwrap_or_else(|e| e.into_inner()).push(point);
    }

    fn series_of(&self, cluster: &str) -> Arc<Mutex<Series>> {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
        {
            return s.clone();
        }
        self.series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cluster.to_string())
            .or_default()
            .clone()
    }

    /// A copy of one cluster's series.
    pub fn get(&self, cluster: &str) -> Option<Series> {
        let map = self.series.read().unwrap_or_else(|e| e.into_inner());
        let s = map.get(cluster)?;
        let copy = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(copy)
    }

    pub fn forget(&self, cluster: &str) {
        self.series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(cluster);
    }

    /// Points and heap bytes over every cluster.
    pub fn size(&self) -> (usize, usize) {
        let map = self.series.read().unwrap_or_else(|e| e.into_inner());
        map.values().fold((0, 0), |(n, b), s| {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            (n + s.points.len(), b + s.heap_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::core::planner::{EffectiveCapacity, Reading};

    fn status(
        at: DateTime<Utc>,
        desired: u32,
        serving: u32,
        eval: Option<DateTime<Utc>>,
    ) -> ClusterStatus {
        let mut s = ClusterStatus::new("web");
        s.updated_at = Some(at);
        s.memory.desired = desired;
        s.memory.last_eval_at = eval;
        s.memory.window = Some(EffectiveCapacity {
            min: 2,
            max: 6,
            schedule: None,
        });
        s.memory.last_metric = eval.map(|e| Reading {
            requests_per_minute: 1200.0,
            observed_at: e,
        });
        s.phases.insert("in-service".into(), serving);
        s
    }

    #[test]
    fn one_point_per_evaluation_and_per_change_not_per_pass() {
        let h = HistoryStore::default();
        let t0 = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        let s = |secs: i64, d, n, eval: Option<i64>| {
            status(
                t0 + chrono::Duration::seconds(secs),
                d,
                n,
                eval.map(|e| t0 + chrono::Duration::seconds(e)),
            )
        };
        h.observe(&s(0, 2, 0, None)); // first look: a point
        h.observe(&s(0, 2, 0, None)); // same second: none
        h.observe(&s(5, 2, 0, None)); // nothing new: none
        h.observe(&s(8, 2, 1, None)); // a node came into service
        h.observe(&s(15, 2, 2, Some(15))); // an evaluation (and a change)
        h.observe(&s(20, 2, 2, Some(15))); // the same evaluation
        h.observe(&s(30, 4, 2, Some(30))); // the next one
        h.observe(&s(90, 4, 2, Some(30))); // a minute without one: heartbeat
        let series = h.get("web").unwrap();
        let times: Vec<u32> = series
            .points
            .iter()
            .map(|p| p.t - t0.timestamp() as u32)
            .collect();
        assert_eq!(times, [0, 8, 15, 30, 90]);
        assert!(series.points[0].traffic().is_none());
        assert_eq!(series.points[2].traffic(), Some(1200.0));
        assert_eq!(series.window_at(series.points[3].t), Some((2, 6)));
    }

    #[test]
    fn a_day_is_kept_and_no_more() {
        let h = HistoryStore::default();
        let t0 = 1_800_000_000u32;
        for i in 0..(2 * 5760) {
            h.record(
                "web",
                Point {
                    t: t0 + i * 15,
                    desired: 2,
                    in_service: 2,
                    rpm: 1.0,
                },
            );
        }
        let s = h.get("web").unwrap();
        assert_eq!(
            s.points.len(),
            5761,
            "24 h of 15 s points, both ends included"
        );
        assert!(
            s.heap_bytes() < 5761 * 12 + 256 * 12 + 64,
            "{}",
            s.heap_bytes()
        );
        h.forget("web");
        assert!(h.get("web").is_none());
    }
}
