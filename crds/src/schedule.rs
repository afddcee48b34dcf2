//! Schedule windows: "from this cron instant until that one, in this zone".
//!
//! Parsing lives here, next to the spec, so validation and the planner read
//! a schedule the same way. Evaluation is pure: the caller passes `now`.

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use crate::duration::Duration;
use crate::spec::Schedule;

/// A parsed, ready-to-evaluate schedule window.
#[derive(Clone, Debug)]
pub struct Window {
    opens: Cron,
    closes: Close,
    tz: Tz,
}

#[derive(Clone, Debug)]
enum Close {
    At(Box<Cron>),
    After(Duration),
}

/// What is wrong with one field of a schedule (`field` is `cron`, `until`
/// or `timezone`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleError {
    pub field: &'static str,
    pub message: String,
}

/// Parses a classic five-field cron expression (minute hour day month weekday).
///
/// Seconds and years are refused: a six-field expression would silently shift
/// every field by one for people used to crontab.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "`{expr}` has {fields} fields; expected 5 (minute hour day-of-month month day-of-week)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("`{expr}` is not a valid cron expression: {e}"))
}

impl Window {
    pub fn parse(schedule: &Schedule) -> Result<Window, Vec<ScheduleError>> {
        let mut errors = Vec::new();
        let opens = parse_cron(&schedule.cron)
            .map_err(|message| {
                errors.push(ScheduleError {
                    field: "cron",
                    message,
                })
            })
            .ok();
        let closes = match schedule.until.parse::<Duration>() {
            Ok(d) if d.is_zero() => {
                errors.push(ScheduleError {
                    field: "until",
                    message: "a zero duration would close the window as it opens".into(),
                });
                None
            }
            Ok(d) => Some(Close::After(d)),
            Err(_) => match parse_cron(&schedule.until) {
                Ok(c) => Some(Close::At(Box::new(c))),
                Err(e) => {
                    errors.push(ScheduleError {
                        field: "until",
                        message: format!("expected a duration (`9h`) or a cron expression: {e}"),
                    });
                    None
                }
            },
        };
        let tz = schedule
            .timezone
            .parse::<Tz>()
            .map_err(|_| {
                errors.push(ScheduleError {
                    field: "timezone",
                    message: format!(
                        "`{}` is not an IANA time zone (e.g. `Europe/Dublin`, `America/New_York`, `UTC`)",
                        schedule.timezone
                    ),
                })
            })
            .ok();
        match (opens, closes, tz) {
            (Some(opens), Some(closes), Some(tz)) if errors.is_empty() => {
                Ok(Window { opens, closes, tz })
            }
            _ => Err(errors),
        }
    }

    /// When the window that contains `now` opened, or `None` if it is closed.
    ///
    /// Both cron expressions are read as wall-clock times in the window's
    /// zone, so "22:00 Europe/Dublin" stays 22:00 across DST changes.
    pub fn open_since(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local_now = now.with_timezone(&self.tz);
        let opened = self.opens.find_previous_occurrence(&local_now, true).ok()?;
        match &self.closes {
            Close::After(d) => {
                let closes_at =
                    opened.with_timezone(&Utc) + chrono::Duration::from_std(d.get()).ok()?;
                (now < closes_at).then(|| opened.with_timezone(&Utc))
            }
            Close::At(close) => {
                // Open iff the window opened after it last closed. A close
                // exactly at `now` wins: windows are half-open [open, close).
                match close.find_previous_occurrence(&local_now, true) {
                    Ok(closed) if closed >= opened => None,
                    _ => Some(opened.with_timezone(&Utc)),
                }
            }
        }
    }

    pub fn timezone(&self) -> Tz {
        self.tz
    }
}

/// Convenience for tests and the CLI: a UTC instant from wall-clock time in `tz`.
pub fn local_time(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> Option<DateTime<Utc>> {
    tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::CapacityOverride;

    fn schedule(cron: &str, until: &str, tz: &str) -> Schedule {
        Schedule {
            name: "night".into(),
            cron: cron.into(),
            until: until.into(),
            timezone: tz.into(),
            capacity: CapacityOverride {
                min: Some(1),
                max: Some(3),
            },
        }
    }

    fn window(cron: &str, until: &str, tz: &str) -> Window {
        Window::parse(&schedule(cron, until, tz)).expect("valid schedule")
    }

    #[test]
    fn overnight_window_with_cron_close() {
        let w = window("0 22 * * *", "0 7 * * *", "Europe/Dublin");
        let tz: Tz = "Europe/Dublin".parse().unwrap();
        let at = |d, h, m| local_time(tz, 2026, 1, d, h, m).unwrap();
        assert_eq!(w.open_since(at(10, 21, 59)), None);
        assert_eq!(w.open_since(at(10, 22, 0)), Some(at(10, 22, 0)));
        assert_eq!(w.open_since(at(11, 3, 0)), Some(at(10, 22, 0)));
        assert_eq!(w.open_since(at(11, 6, 59)), Some(at(10, 22, 0)));
        assert_eq!(w.open_since(at(11, 7, 0)), None);
        assert_eq!(w.open_since(at(11, 12, 0)), None);
    }

    #[test]
    fn duration_close() {
        let w = window("0 8 * * 1-5", "2h", "UTC");
        let at = |d, h, m| local_time(Tz::UTC, 2026, 11, d, h, m).unwrap();
        // 2026-11-23 is a Monday.
        assert!(w.open_since(at(23, 8, 0)).is_some());
        assert!(w.open_since(at(23, 9, 59)).is_some());
        assert!(w.open_since(at(23, 10, 0)).is_none());
        // Saturday: no opening that day.
        assert!(w.open_since(at(28, 9, 0)).is_none());
    }

    #[test]
    fn wall_clock_survives_dst_spring_forward() {
        // Europe/Dublin springs forward on 2026-03-29 at 01:00 UTC.
        let w = window("0 22 * * *", "0 7 * * *", "Europe/Dublin");
        let tz: Tz = "Europe/Dublin".parse().unwrap();
        // 06:30 local on the morning after the change is still night…
        let before_close = local_time(tz, 2026, 3, 29, 6, 30).unwrap();
        assert!(w.open_since(before_close).is_some());
        // …and 07:00 local (06:00 UTC now, not 07:00 UTC) closes it.
        let close = local_time(tz, 2026, 3, 29, 7, 0).unwrap();
        assert_eq!(close, Utc.with_ymd_and_hms(2026, 3, 29, 6, 0, 0).unwrap());
        assert!(w.open_since(close).is_none());
    }

    #[test]
    fn wall_clock_survives_dst_fall_back() {
        // America/New_York falls back on 2026-11-01 at 02:00 local.
        let w = window("30 1 * * *", "0 3 * * *", "America/New_York");
        let tz: Tz = "America/New_York".parse().unwrap();
        let during = Utc.with_ymd_and_hms(2026, 11, 1, 6, 45, 0).unwrap(); // 01:45 EST (second pass)
        assert!(w.open_since(during).is_some());
        let after = local_time(tz, 2026, 11, 1, 3, 0).unwrap();
        assert!(w.open_since(after).is_none());
    }

    #[test]
    fn rejects_bad_fields_each_by_name() {
        let errs = Window::parse(&schedule("0 22 * *", "soon", "Mars/Olympus")).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field).collect();
        assert_eq!(fields, ["cron", "until", "timezone"]);
        assert!(errs[0].message.contains("4 fields"), "{}", errs[0].message);
    }

    #[test]
    fn refuses_six_field_cron() {
        assert!(parse_cron("0 0 22 * * *").unwrap_err().contains("6 fields"));
    }
}
