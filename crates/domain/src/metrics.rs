//! Metric history limits every client shares (API, CLI, store, dashboards).
//!
//! Pure: times are Unix milliseconds (`i64`), the store's convention, so this
//! module needs no clock and no date crate.
//!
//! - A query covers a window of [`MIN_WINDOW_MS`] to [`MAX_WINDOW_MS`], in
//!   buckets of one of the [`ALLOWED_STEPS`], at most [`MAX_POINTS`] of them.
//! - History is kept in three [`Tier`]s: raw samples, 1-minute and 1-hour
//!   rollups, each for as long as [`RetentionConfig`] says.
//! - [`Tier::for_query`] picks the tier a query reads from.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

const SECOND_MS: i64 = 1_000;
const MINUTE_MS: i64 = 60 * SECOND_MS;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The shortest window a metrics query may ask for: 5 minutes.
pub const MIN_WINDOW_MS: i64 = 5 * MINUTE_MS;
/// The longest window a metrics query may ask for: 30 days.
pub const MAX_WINDOW_MS: i64 = 30 * DAY_MS;
/// The most buckets one series may have.
pub const MAX_POINTS: i64 = 1_500;

/// Every step a query may use, in milliseconds, ascending. Each step of a
/// minute or more is a whole number of minutes, and each of an hour or more
/// a whole number of hours, so buckets of a step line up with the rollups.
pub const ALLOWED_STEPS_MS: [i64; 16] = [
    5 * SECOND_MS,
    10 * SECOND_MS,
    15 * SECOND_MS,
    30 * SECOND_MS,
    MINUTE_MS,
    2 * MINUTE_MS,
    5 * MINUTE_MS,
    10 * MINUTE_MS,
    15 * MINUTE_MS,
    30 * MINUTE_MS,
    HOUR_MS,
    2 * HOUR_MS,
    3 * HOUR_MS,
    6 * HOUR_MS,
    12 * HOUR_MS,
    DAY_MS,
];

/// A metrics query that breaks the shared limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// Not `<number><unit>` with unit `s`, `m`, `h` or `d`.
    #[error("invalid step {0:?}: expected a duration like 5s, 1m or 1h")]
    BadStep(String),
    /// A well-formed duration that is not one of [`ALLOWED_STEPS_MS`].
    #[error("step {0} is not allowed; allowed steps: {allowed}", allowed = allowed_steps_text())]
    StepNotAllowed(String),
    #[error("window must end after it starts (from {from_ms} ms, to {to_ms} ms)")]
    EmptyWindow { from_ms: i64, to_ms: i64 },
    #[error(
        "window of {window_ms} ms is shorter than the minimum of {MIN_WINDOW_MS} ms (5 minutes)"
    )]
    WindowTooShort { window_ms: i64 },
    #[error("window of {window_ms} ms is longer than the maximum of {MAX_WINDOW_MS} ms (30 days)")]
    WindowTooLong { window_ms: i64 },
    /// The window holds more than [`MAX_POINTS`] buckets of this step.
    #[error("{points} points of step {step} exceed the maximum of {MAX_POINTS}; use a step of at least {min_step}")]
    TooManyPoints {
        points: i64,
        step: Step,
        min_step: Step,
    },
}

fn allowed_steps_text() -> String {
    ALLOWED_STEPS_MS
        .iter()
        .map(|ms| Step(*ms).to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A bucket width, one of [`ALLOWED_STEPS_MS`]. Written and parsed as
/// `5s`, `1m`, `1h`, `1d` (serde uses the same text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Step(i64);

impl Step {
    pub const ALL: [Step; 16] = {
        let mut all = [Step(0); 16];
        let mut i = 0;
        while i < ALLOWED_STEPS_MS.len() {
            all[i] = Step(ALLOWED_STEPS_MS[i]);
            i += 1;
        }
        all
    };
    /// The finest step: 5 seconds.
    pub const MIN: Step = Step(ALLOWED_STEPS_MS[0]);
    pub const MINUTE: Step = Step(MINUTE_MS);
    pub const HOUR: Step = Step(HOUR_MS);

    /// The step of `ms` milliseconds, if it is an allowed one.
    pub fn from_millis(ms: i64) -> Option<Step> {
        ALLOWED_STEPS_MS.contains(&ms).then_some(Step(ms))
    }

    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// The start of the bucket holding `at_ms`: `floor(at_ms / step) * step`.
    pub fn align(self, at_ms: i64) -> i64 {
        at_ms.div_euclid(self.0) * self.0
    }

    /// How many buckets of this step a window `[from_ms, to_ms)` touches.
    pub fn points(self, from_ms: i64, to_ms: i64) -> i64 {
        if to_ms <= from_ms {
            return 0;
        }
        (self.align(to_ms - 1) - self.align(from_ms)) / self.0 + 1
    }

    /// The finest allowed step that keeps a window of `window_ms` within
    /// [`MAX_POINTS`] (the coarsest step if none does).
    pub fn for_window(window_ms: i64) -> Step {
        Step::ALL
            .into_iter()
            // `<`: an unaligned window touches one bucket more.
            .find(|s| window_ms.max(0) / s.0 < MAX_POINTS)
            .unwrap_or(Step(ALLOWED_STEPS_MS[ALLOWED_STEPS_MS.len() - 1]))
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms % DAY_MS == 0 {
            write!(f, "{}d", ms / DAY_MS)
        } else if ms % HOUR_MS == 0 {
            write!(f, "{}h", ms / HOUR_MS)
        } else if ms % MINUTE_MS == 0 {
            write!(f, "{}m", ms / MINUTE_MS)
        } else if ms % SECOND_MS == 0 {
            write!(f, "{}s", ms / SECOND_MS)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// Parse a step: `<digits><unit>`, unit `s`, `m`, `h` or `d`; it must be one
/// of [`ALLOWED_STEPS_MS`] (`60s` and `1m` are the same step).
pub fn parse_step(s: &str) -> Result<Step, MetricsError> {
    let bad = || MetricsError::BadStep(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() || digits.len() > 9 {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "s" => SECOND_MS,
        "m" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    Step::from_millis(ms).ok_or_else(|| MetricsError::StepNotAllowed(t.to_string()))
}

impl FromStr for Step {
    type Err = MetricsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_step(s)
    }
}

impl Serialize for Step {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_step(&s).map_err(serde::de::Error::custom)
    }
}

/// Check a query window `[from_ms, to_ms)` and step against the shared limits.
pub fn validate_window(from_ms: i64, to_ms: i64, step: Step) -> Result<(), MetricsError> {
    if to_ms <= from_ms {
        return Err(MetricsError::EmptyWindow { from_ms, to_ms });
    }
    let window_ms = to_ms.saturating_sub(from_ms);
    if window_ms < MIN_WINDOW_MS {
        return Err(MetricsError::WindowTooShort { window_ms });
    }
    if window_ms > MAX_WINDOW_MS {
        return Err(MetricsError::WindowTooLong { window_ms });
    }
    let points = step.points(from_ms, to_ms);
    if points > MAX_POINTS {
        return Err(MetricsError::TooManyPoints {
            points,
            step,
            min_step: Step::for_window(window_ms),
        });
    }
    Ok(())
}

/// Where history is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// One row per heartbeat.
    Raw,
    /// One row per instance (and GPU) per minute.
    Minute,
    /// One row per instance (and GPU) per hour.
    Hour,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Raw, Tier::Minute, Tier::Hour];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Raw => "raw",
            Tier::Minute => "minute",
            Tier::Hour => "hour",
        }
    }

    /// Width of one row's bucket: `None` for raw samples.
    pub fn bucket_ms(self) -> Option<i64> {
        match self {
            Tier::Raw => None,
            Tier::Minute => Some(MINUTE_MS),
            Tier::Hour => Some(HOUR_MS),
        }
    }

    /// The next coarser tier (`None` for hour).
    pub fn coarser(self) -> Option<Tier> {
        match self {
            Tier::Raw => Some(Tier::Minute),
            Tier::Minute => Some(Tier::Hour),
            Tier::Hour => None,
        }
    }

    /// The tier a query of `step` starting at `from_ms` reads, at `now_ms`:
    /// raw below a 1-minute step, minute rollups below a 1-hour step, hour
    /// rollups otherwise; then coarser while `from_ms` is older than what the
    /// chosen tier keeps. Hour is the last resort.
    pub fn for_query(step: Step, from_ms: i64, now_ms: i64, retention: &RetentionConfig) -> Tier {
        let mut tier = if step.as_millis() < MINUTE_MS {
            Tier::Raw
        } else if step.as_millis() < HOUR_MS {
            Tier::Minute
        } else {
            Tier::Hour
        };
        while from_ms < retention.cutoff_ms(tier, now_ms) {
            match tier.coarser() {
                Some(c) => tier = c,
                None => break,
            }
        }
        tier
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long each tier is kept. Serde: any field left out takes its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Raw samples, in hours (default 24).
    pub raw_hours: u32,
    /// 1-minute rollups, in days (default 7).
    pub minute_days: u32,
    /// 1-hour rollups, in days (default 90).
    pub hour_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            raw_hours: 24,
            minute_days: 7,
            hour_days: 90,
        }
    }
}

impl RetentionConfig {
    /// How long `tier` is kept, in milliseconds.
    pub fn keep_ms(&self, tier: Tier) -> i64 {
        match tier {
            Tier::Raw => i64::from(self.raw_hours) * HOUR_MS,
            Tier::Minute => i64::from(self.minute_days) * DAY_MS,
            Tier::Hour => i64::from(self.hour_days) * DAY_MS,
        }
    }

    /// Rows of `tier` older than this (Unix ms) are past retention at `now_ms`.
    pub fn cutoff_ms(&self, tier: Tier, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.keep_ms(tier))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn parses_and_prints_steps() {
        assert_eq!(parse_step("5s").unwrap().as_millis(), 5_000);
        assert_eq!(parse_step("1m").unwrap(), Step::MINUTE);
        assert_eq!(parse_step("60s").unwrap(), Step::MINUTE);
        assert_eq!(parse_step("1h").unwrap(), Step::HOUR);
        assert_eq!(parse_step(" 1d ").unwrap().as_millis(), DAY_MS);
        for s in Step::ALL {
            assert_eq!(parse_step(&s.to_string()).unwrap(), s);
        }
        assert_eq!(Step::MIN.to_string(), "5s");
        assert_eq!(Step::HOUR.to_string(), "1h");
        for bad in [
            "",
            "5",
            "s",
            "-5s",
            "5 s",
            "5x",
            "1.5m",
            "99999999999999h",
            "5S",
        ] {
            assert!(
                matches!(parse_step(bad), Err(MetricsError::BadStep(_))),
                "{bad}"
            );
        }
        for odd in ["7s", "0s", "4h", "2d"] {
            assert!(
                matches!(parse_step(odd), Err(MetricsError::StepNotAllowed(_))),
                "{odd}"
            );
        }
        assert!(MetricsError::StepNotAllowed("7s".into())
            .to_string()
            .contains("5s, 10s"));
    }

    #[test]
    fn steps_are_ascending_and_line_up_with_rollups() {
        assert!(ALLOWED_STEPS_MS.windows(2).all(|w| w[0] < w[1]));
        for ms in ALLOWED_STEPS_MS {
            if ms >= HOUR_MS {
                assert_eq!(ms % HOUR_MS, 0);
            } else if ms >= MINUTE_MS {
                assert_eq!(ms % MINUTE_MS, 0);
            }
        }
    }

    #[test]
    fn step_serde_is_text() {
        let s: Step = serde_json::from_str("\"5m\"").unwrap();
        assert_eq!(s.as_millis(), 5 * MINUTE_MS);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"5m\"");
        assert!(serde_json::from_str::<Step>("\"7m\"").is_err());
    }

    #[test]
    fn alignment_and_points() {
        let m = Step::MINUTE;
        assert_eq!(m.align(125_000), 120_000);
        assert_eq!(m.align(-1), -60_000);
        assert_eq!(m.points(0, 60_000), 1);
        assert_eq!(m.points(0, 60_001), 2);
        assert_eq!(m.points(30_000, 90_000), 2);
        assert_eq!(m.points(5, 5), 0);
    }

    #[test]
    fn windows_are_validated() {
        let s = Step::MINUTE;
        assert!(validate_window(NOW - HOUR_MS, NOW, s).is_ok());
        assert!(validate_window(NOW - MIN_WINDOW_MS, NOW, Step::MIN).is_ok());
        assert!(matches!(
            validate_window(NOW, NOW, s),
            Err(MetricsError::EmptyWindow { .. })
        ));
        assert!(matches!(
            validate_window(NOW - MIN_WINDOW_MS + 1, NOW, Step::MIN),
            Err(MetricsError::WindowTooShort { .. })
        ));
        assert!(matches!(
            validate_window(NOW - MAX_WINDOW_MS - 1, NOW, Step::HOUR),
            Err(MetricsError::WindowTooLong { .. })
        ));
        // 24 h at 5 s = 17,280 points.
        match validate_window(NOW - DAY_MS, NOW, Step::MIN) {
            Err(MetricsError::TooManyPoints { min_step, .. }) => {
                assert!(validate_window(NOW - DAY_MS, NOW, min_step).is_ok());
                assert_eq!(min_step.to_string(), "1m");
            }
            other => panic!("{other:?}"),
        }
        assert!(validate_window(NOW - MAX_WINDOW_MS, NOW, Step::for_window(MAX_WINDOW_MS)).is_ok());
        assert_eq!(Step::for_window(HOUR_MS), Step::MIN);
    }

    #[test]
    fn tier_follows_step() {
        let r = RetentionConfig::default();
        let recent = NOW - HOUR_MS;
        assert_eq!(Tier::for_query(Step::MIN, recent, NOW, &r), Tier::Raw);
        assert_eq!(
            Tier::for_query(parse_step("30s").unwrap(), recent, NOW, &r),
            Tier::Raw
        );
        assert_eq!(Tier::for_query(Step::MINUTE, recent, NOW, &r), Tier::Minute);
        assert_eq!(
            Tier::for_query(parse_step("30m").unwrap(), recent, NOW, &r),
            Tier::Minute
        );
        assert_eq!(Tier::for_query(Step::HOUR, recent, NOW, &r), Tier::Hour);
    }

    #[test]
    fn tier_falls_back_past_retention() {
        let r = RetentionConfig::default();
        // Raw kept 24 h: a 5 s query from 25 h ago reads minute rollups.
        assert_eq!(
            Tier::for_query(Step::MIN, NOW - 25 * HOUR_MS, NOW, &r),
            Tier::Minute
        );
        assert_eq!(
            Tier::for_query(Step::MIN, NOW - 24 * HOUR_MS, NOW, &r),
            Tier::Raw
        );
        // Minute kept 7 days.
        assert_eq!(
            Tier::for_query(Step::MIN, NOW - 8 * DAY_MS, NOW, &r),
            Tier::Hour
        );
        assert_eq!(
            Tier::for_query(Step::MINUTE, NOW - 8 * DAY_MS, NOW, &r),
            Tier::Hour
        );
        // Hour is the last resort, even past its own retention.
        assert_eq!(
            Tier::for_query(Step::MIN, NOW - 365 * DAY_MS, NOW, &r),
            Tier::Hour
        );
        let short = RetentionConfig {
            raw_hours: 1,
            ..RetentionConfig::default()
        };
        assert_eq!(
            Tier::for_query(Step::MIN, NOW - 2 * HOUR_MS, NOW, &short),
            Tier::Minute
        );
    }

    #[test]
    fn retention_defaults_and_serde() {
        let r = RetentionConfig::default();
        assert_eq!((r.raw_hours, r.minute_days, r.hour_days), (24, 7, 90));
        let partial: RetentionConfig = serde_json::from_str(r#"{"raw_hours": 48}"#).unwrap();
        assert_eq!(partial.raw_hours, 48);
        assert_eq!(partial.minute_days, 7);
        assert!(serde_json::from_str::<RetentionConfig>(r#"{"raw_days": 1}"#).is_err());
        assert_eq!(r.keep_ms(Tier::Raw), DAY_MS);
        assert_eq!(r.cutoff_ms(Tier::Hour, NOW), NOW - 90 * DAY_MS);
        assert_eq!(r.cutoff_ms(Tier::Raw, i64::MIN), i64::MIN);
        assert_eq!(Tier::Minute.bucket_ms(), Some(MINUTE_MS));
        assert_eq!(Tier::Raw.bucket_ms(), None);
        assert_eq!(serde_json::to_string(&Tier::Hour).unwrap(), "\"hour\"");
    }
}
