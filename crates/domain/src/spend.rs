//! Spend arithmetic: what GPU machines cost over a time range, in buckets.
//!
//! Pure: times are Unix milliseconds (`i64`), the store's convention. The
//! cost of one instance over `[a, b)` is the overlap of its billable
//! interval `[billing_started_at, billing_ended_at or now)` with `[a, b)`,
//! in milliseconds, × its price per hour / 3,600,000 ms: exact to the
//! millisecond, with a single rounding (the float multiplication).
//!
//! A report covers `[from, to)` (at most [`MAX_RANGE_MS`]) in buckets of a
//! [`SpendStep`] aligned to UTC (hours, or days starting at 00:00 UTC), at
//! most [`MAX_BUCKETS`] of them; the first and last buckets are cut to the
//! range.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Milliseconds in an hour.
pub const HOUR_MS: i64 = 3_600_000;
/// Milliseconds in a day.
pub const DAY_MS: i64 = 24 * HOUR_MS;
/// The longest range a report may cover: 400 days.
pub const MAX_RANGE_MS: i64 = 400 * DAY_MS;
/// The most buckets one report's series may have.
pub const MAX_BUCKETS: usize = 1_500;

/// The bucket width of a spend series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum SpendStep {
    /// One UTC hour.
    #[serde(rename = "1h")]
    Hour,
    /// One UTC day (00:00 to 24:00 UTC).
    #[serde(rename = "1d")]
    Day,
}

impl SpendStep {
    pub const ALL: [SpendStep; 2] = [SpendStep::Hour, SpendStep::Day];

    pub fn millis(self) -> i64 {
        match self {
            Self::Hour => HOUR_MS,
            Self::Day => DAY_MS,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "1h",
            Self::Day => "1d",
        }
    }

    /// The start of the bucket `t` is in.
    pub fn floor(self, t: i64) -> i64 {
        t - t.rem_euclid(self.millis())
    }
}

impl fmt::Display for SpendStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SpendStep {
    type Err = SpendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| SpendError::BadStep(s.to_string()))
    }
}

/// What a report's groups are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Project,
    Deployment,
    Model,
    Provider,
}

impl GroupBy {
    pub const ALL: [GroupBy; 4] = [
        GroupBy::Project,
        GroupBy::Deployment,
        GroupBy::Model,
        GroupBy::Provider,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::Deployment => "deployment",
            Self::Model => "model",
            Self::Provider => "provider",
        }
    }
}

impl fmt::Display for GroupBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GroupBy {
    type Err = SpendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| SpendError::BadGroupBy(s.to_string()))
    }
}

/// A spend query that breaks the limits. [`SpendError::field`] names the
/// query field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpendError {
    #[error("invalid step {0:?}: expected 1h or 1d")]
    BadStep(String),
    #[error("invalid group_by {0:?}: expected project, deployment, model or provider")]
    BadGroupBy(String),
    #[error("to must be after from (from {from_ms} ms, to {to_ms} ms)")]
    EmptyRange { from_ms: i64, to_ms: i64 },
    #[error("the range is longer than 400 days ({ms} ms)")]
    RangeTooLong { ms: i64 },
    #[error("step {step} gives {buckets} buckets over this range; at most {MAX_BUCKETS} (use a larger step or a shorter range)")]
    TooManyBuckets { step: SpendStep, buckets: usize },
}

impl SpendError {
    /// The query field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            Self::BadStep(_) | Self::TooManyBuckets { .. } => "step",
            Self::BadGroupBy(_) => "group_by",
            Self::EmptyRange { .. } => "to",
            Self::RangeTooLong { .. } => "from",
        }
    }
}

/// A checked range `[from, to)` cut into buckets of `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    from: i64,
    to: i64,
    step: SpendStep,
}

impl Buckets {
    /// Check the range and the step; `None` picks the finest step giving at
    /// most [`MAX_BUCKETS`] buckets.
    pub fn new(from: i64, to: i64, step: Option<SpendStep>) -> Result<Buckets, SpendError> {
        if to <= from {
            return Err(SpendError::EmptyRange {
                from_ms: from,
                to_ms: to,
            });
        }
        if to - from > MAX_RANGE_MS {
            return Err(SpendError::RangeTooLong { ms: to - from });
        }
        let fits = |step: SpendStep| {
            let b = Buckets { from, to, step };
            (b.len() <= MAX_BUCKETS).then_some(b)
        };
        match step {
            Some(step) => fits(step).ok_or(SpendError::TooManyBuckets {
                step,
                buckets: Buckets { from, to, step }.len(),
            }),
            None => Ok(fits(SpendStep::Hour).unwrap_or(Buckets {
                from,
                to,
                step: SpendStep::Day,
            })),
        }
    }

    pub fn from(&self) -> i64 {
        self.from
    }
    pub fn to(&self) -> i64 {
        self.to
    }
    pub fn step(&self) -> SpendStep {
        self.step
    }

    /// How many buckets: from the one `from` is in to the one `to − 1` is in.
    pub fn len(&self) -> usize {
        let first = self.step.floor(self.from);
        let last = self.step.floor(self.to - 1);
        ((last - first) / self.step.millis() + 1) as usize
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Each bucket's start (aligned: the first may be before `from`).
    pub fn starts(&self) -> Vec<i64> {
        let first = self.step.floor(self.from);
        (0..self.len() as i64)
            .map(|i| first + i * self.step.millis())
            .collect()
    }

    /// The milliseconds of `[start, end)` inside the range, per bucket:
    /// `(bucket index, ms)` for each bucket it overlaps, in order.
    pub fn split(&self, start: i64, end: i64) -> Vec<(usize, i64)> {
        let s = start.max(self.from);
        let e = end.min(self.to);
        if e <= s {
            return Vec::new();
        }
        let step = self.step.millis();
        let first = self.step.floor(self.from);
        let mut out = Vec::new();
        let mut t = s;
        while t < e {
            let bucket_end = self.step.floor(t) + step;
            let piece_end = bucket_end.min(e);
            out.push((((t - first) / step) as usize, piece_end - t));
            t = piece_end;
        }
        out
    }
}

/// Milliseconds of `[start, end)` inside `[from, to)` (0 when apart).
pub fn overlap_ms(start: i64, end: i64, from: i64, to: i64) -> i64 {
    (end.min(to) - start.max(from)).max(0)
}

/// What `ms` milliseconds cost at `price_per_hour`.
pub fn cost_of(ms: i64, price_per_hour: f64) -> f64 {
    ms as f64 * price_per_hour / HOUR_MS as f64
}

/// One instance's billable interval and price.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Billable {
    /// When the provider made the machine (ms).
    pub start: i64,
    /// When the provider said it is gone (ms); `None`: still billable.
    pub end: Option<i64>,
    /// `None`: unknown price (costs 0).
    pub price_per_hour: Option<f64>,
}

impl Billable {
    /// The interval's end, `now` while it is open (never before its start).
    pub fn end_or(&self, now: i64) -> i64 {
        self.end.unwrap_or(now).max(self.start)
    }

    /// Billable milliseconds inside `[from, to)`, an open interval ending at `now`.
    pub fn ms_in(&self, from: i64, to: i64, now: i64) -> i64 {
        overlap_ms(self.start, self.end_or(now), from, to)
    }

    /// Cost inside `[from, to)`.
    pub fn cost_in(&self, from: i64, to: i64, now: i64) -> f64 {
        cost_of(
            self.ms_in(from, to, now),
            self.price_per_hour.unwrap_or(0.0),
        )
    }

    /// Cost per bucket of `buckets` (one entry per bucket).
    pub fn cost_series(&self, buckets: &Buckets, now: i64) -> Vec<f64> {
        let mut out = vec![0.0; buckets.len()];
        let price = self.price_per_hour.unwrap_or(0.0);
        for (i, ms) in buckets.split(self.start, self.end_or(now)) {
            out[i] += cost_of(ms, price);
        }
        out
    }
}

/// Cost per million tokens: `cost / tokens × 1e6`; `None` without tokens.
pub fn cost_per_million_tokens(cost: f64, tokens: u64) -> Option<f64> {
    (tokens > 0).then(|| cost / tokens as f64 * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    /// 2025-01-31T00:00:00Z.
    const T0: i64 = 1_738_281_600_000;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn steps_and_groups_parse_exactly() {
        assert_eq!("1h".parse::<SpendStep>(), Ok(SpendStep::Hour));
        assert_eq!("1d".parse::<SpendStep>(), Ok(SpendStep::Day));
        for bad in ["", "1H", "60m", "2h", " 1h"] {
            assert_eq!(bad.parse::<SpendStep>().unwrap_err().field(), "step");
        }
        for g in GroupBy::ALL {
            assert_eq!(g.as_str().parse::<GroupBy>(), Ok(g));
        }
        assert_eq!("Model".parse::<GroupBy>().unwrap_err().field(), "group_by");
        assert_eq!(serde_json::to_value(SpendStep::Day).unwrap(), "1d");
        assert_eq!(serde_json::to_value(GroupBy::Provider).unwrap(), "provider");
    }

    #[test]
    fn a_machine_started_and_stopped_mid_hour() {
        // 10:20 to 11:05 at 2.40/h: 45 min = 1.80.
        let b = Billable {
            start: T0 + 10 * HOUR_MS + 20 * MIN,
            end: Some(T0 + 11 * HOUR_MS + 5 * MIN),
            price_per_hour: Some(2.4),
        };
        let day = (T0, T0 + DAY_MS);
        close(b.cost_in(day.0, day.1, T0 + 2 * DAY_MS), 1.8);
        // Hourly buckets: 40 min in 10:00, 5 min in 11:00.
        let buckets =
            Buckets::new(T0 + 9 * HOUR_MS, T0 + 12 * HOUR_MS, Some(SpendStep::Hour)).unwrap();
        assert_eq!(buckets.len(), 3);
        assert_eq!(
            buckets.starts(),
            vec![T0 + 9 * HOUR_MS, T0 + 10 * HOUR_MS, T0 + 11 * HOUR_MS]
        );
        let s = b.cost_series(&buckets, T0 + 2 * DAY_MS);
        close(s[0], 0.0);
        close(s[1], 1.6);
        close(s[2], 0.2);
        // A range that cuts the interval: 10:30 to 10:50 = 20 min = 0.80.
        close(
            b.cost_in(
                T0 + 10 * HOUR_MS + 30 * MIN,
                T0 + 10 * HOUR_MS + 50 * MIN,
                i64::MAX,
            ),
            0.8,
        );
    }

    #[test]
    fn exact_to_the_millisecond() {
        // 1 ms at 3600/h costs 0.001; 1,234,567 ms at 1.0/h.
        let b = Billable {
            start: T0 + 1,
            end: Some(T0 + 2),
            price_per_hour: Some(3600.0),
        };
        close(b.cost_in(T0, T0 + HOUR_MS, 0), 0.001);
        let b = Billable {
            start: T0 + 999,
            end: Some(T0 + 999 + 1_234_567),
            price_per_hour: Some(1.0),
        };
        close(b.cost_in(T0, T0 + DAY_MS, 0), 1_234_567.0 / 3_600_000.0);
        // The range's own edge, to the millisecond.
        close(b.cost_in(T0 + 1000, T0 + 1001, 0), 1.0 / 3_600_000.0);
    }

    #[test]
    fn across_day_buckets_with_a_range_starting_mid_day() {
        // 23:30 on day 0 to 01:15 on day 2 at 1.00/h; range from 06:00 on day 0.
        let b = Billable {
            start: T0 + 23 * HOUR_MS + 30 * MIN,
            end: Some(T0 + 2 * DAY_MS + HOUR_MS + 15 * MIN),
            price_per_hour: Some(1.0),
        };
        let buckets =
            Buckets::new(T0 + 6 * HOUR_MS, T0 + 3 * DAY_MS, Some(SpendStep::Day)).unwrap();
        assert_eq!(buckets.starts(), vec![T0, T0 + DAY_MS, T0 + 2 * DAY_MS]);
        let s = b.cost_series(&buckets, i64::MAX);
        close(s[0], 0.5);
        close(s[1], 24.0);
        close(s[2], 1.25);
        close(b.cost_in(buckets.from(), buckets.to(), i64::MAX), 25.75);
        // A range ending mid-bucket cuts the last bucket.
        let cut = Buckets::new(T0, T0 + DAY_MS + 12 * HOUR_MS, Some(SpendStep::Day)).unwrap();
        let s = b.cost_series(&cut, i64::MAX);
        assert_eq!(s.len(), 2);
        close(s[1], 12.0);
    }

    #[test]
    fn an_open_interval_ends_now() {
        // Started 10:50, still running at 12:20 ("now"), range to 13:00.
        let b = Billable {
            start: T0 + 10 * HOUR_MS + 50 * MIN,
            end: None,
            price_per_hour: Some(6.0),
        };
        let now = T0 + 12 * HOUR_MS + 20 * MIN;
        let buckets = Buckets::new(T0 + 10 * HOUR_MS, T0 + 13 * HOUR_MS, None).unwrap();
        assert_eq!(buckets.step(), SpendStep::Hour);
        let s = b.cost_series(&buckets, now);
        close(s[0], 1.0);
        close(s[1], 6.0);
        close(s[2], 2.0);
        close(b.cost_in(buckets.from(), buckets.to(), now), 9.0);
        // "now" before its start (clock skew): nothing.
        close(b.cost_in(T0, T0 + DAY_MS, T0 + 10 * HOUR_MS), 0.0);
    }

    #[test]
    fn zero_length_unpriced_and_outside_cost_nothing() {
        let zero = Billable {
            start: T0 + HOUR_MS,
            end: Some(T0 + HOUR_MS),
            price_per_hour: Some(5.0),
        };
        let buckets = Buckets::new(T0, T0 + DAY_MS, Some(SpendStep::Hour)).unwrap();
        assert_eq!(zero.cost_in(T0, T0 + DAY_MS, 0), 0.0);
        assert!(zero.cost_series(&buckets, 0).iter().all(|c| *c == 0.0));
        let unpriced = Billable {
            start: T0,
            end: None,
            price_per_hour: None,
        };
        assert_eq!(unpriced.cost_in(T0, T0 + DAY_MS, T0 + DAY_MS), 0.0);
        assert_eq!(unpriced.ms_in(T0, T0 + DAY_MS, T0 + DAY_MS), DAY_MS);
        let before = Billable {
            start: T0 - 2 * HOUR_MS,
            end: Some(T0),
            price_per_hour: Some(1.0),
        };
        assert_eq!(before.cost_in(T0, T0 + DAY_MS, 0), 0.0);
        assert!(buckets.split(T0 - 2 * HOUR_MS, T0).is_empty());
    }

    #[test]
    fn bucket_sums_equal_the_total() {
        let b = Billable {
            start: T0 + 17 * MIN + 3_211,
            end: Some(T0 + 3 * DAY_MS + 5 * HOUR_MS + 1),
            price_per_hour: Some(3.17),
        };
        let buckets = Buckets::new(T0 + 5 * MIN, T0 + 4 * DAY_MS, Some(SpendStep::Hour)).unwrap();
        let sum: i64 = buckets
            .split(b.start, b.end_or(0))
            .iter()
            .map(|(_, ms)| ms)
            .sum();
        assert_eq!(sum, b.ms_in(buckets.from(), buckets.to(), 0));
        let total: f64 = b.cost_series(&buckets, 0).iter().sum();
        assert!((total - b.cost_in(buckets.from(), buckets.to(), 0)).abs() < 1e-9);
    }

    #[test]
    fn ranges_and_bucket_caps_are_checked_naming_the_field() {
        let e = Buckets::new(T0, T0, None).unwrap_err();
        assert_eq!(e.field(), "to");
        let e = Buckets::new(T0, T0 - 1, None).unwrap_err();
        assert_eq!(e.field(), "to");
        let e = Buckets::new(T0, T0 + MAX_RANGE_MS + 1, None).unwrap_err();
        assert_eq!(e.field(), "from");
        assert!(Buckets::new(T0, T0 + MAX_RANGE_MS, Some(SpendStep::Day)).is_ok());
        // 400 days hourly is 9,600 buckets: refused, naming step.
        let e = Buckets::new(T0, T0 + MAX_RANGE_MS, Some(SpendStep::Hour)).unwrap_err();
        assert_eq!(e.field(), "step");
        // Without a step: hourly while it fits, else daily.
        assert_eq!(
            Buckets::new(T0, T0 + 62 * DAY_MS, None).unwrap().step(),
            SpendStep::Hour
        );
        assert_eq!(
            Buckets::new(T0, T0 + 63 * DAY_MS, None).unwrap().step(),
            SpendStep::Day
        );
        // A range inside one hour is one bucket; one crossing an edge, two.
        assert_eq!(Buckets::new(T0 + MIN, T0 + 2 * MIN, None).unwrap().len(), 1);
        assert_eq!(
            Buckets::new(T0 + HOUR_MS - 1, T0 + HOUR_MS + 1, None)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn cost_per_million_tokens_needs_tokens() {
        assert_eq!(cost_per_million_tokens(3.0, 0), None);
        close(cost_per_million_tokens(3.0, 1_500_000).unwrap(), 2.0);
    }
}
