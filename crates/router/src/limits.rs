//! Per-key limits: requests per minute, tokens per minute and a monthly
//! budget (`api_keys.rpm`, `.tpm`, `.monthly_budget`).
//!
//! - **Requests per minute**: at most `rpm` requests admitted in any
//!   trailing 60 s. Admissions are counted in 100 ms buckets under the
//!   key's lock (so a burst from many connections admits exactly `rpm`); a
//!   bucket leaves the window only once all of it is older than 60 s, so
//!   the bound holds for every trailing window (a request may wait up to
//!   100 ms longer than strictly needed).
//! - **Tokens per minute**: a request reserves an estimate (the body's
//!   bytes / 4, an upper bound of the prompt's, plus `max_tokens` /
//!   `max_completion_tokens`, or 256) and is admitted only while tokens used
//!   in the trailing 60 s + reserved + its estimate ≤ `tpm`. When it ends the
//!   reservation is settled to the real count (a [`Reservation`]).
//! - **Monthly budget**: what the key was charged this calendar month
//!   (UTC) as the database has it from every replica (read again after each
//!   usage flush: the recent hours' rows, with the earlier hours' sums kept,
//!   see [`ClosedCharges`]), plus what this process charged and
//!   has not flushed yet, plus the cost of the reservations in flight;
//!   refused once that reaches the budget.
//!
//! - **Across replicas** (PostgreSQL): each replica's router writes its
//!   keys' trailing-minute counts (its [`RateShare`]s) about every second
//!   and reads the others' back; a request is admitted only while this
//!   replica's count plus the others' stays under the limit. The others'
//!   counts are up to one sync interval old, so several replicas together
//!   may admit what they were sent within that interval beyond the limit,
//!   never a multiple of it.
//!
//! Keys without limits have no [`KeyLimiter`]: they take no lock here.

use gpufleet_domain::KeyLimits;
use gpufleet_store::{ApiKeyId, RateShare};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// The trailing window of rpm and tpm.
pub const WINDOW_MS: u64 = 60_000;
/// Width of one bucket of a window.
const BUCKET_MS: u64 = 100;
/// What a request reserves for its completion without `max_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// Milliseconds on a monotonic clock (since the first call).
pub fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The start of the calendar month (UTC) of `t`.
pub fn month_start(t: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    use chrono::{Datelike, TimeZone};
    chrono::Utc
        .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(t)
}

/// This month's charges per key as read from the store in two parts, so
/// that the read after every usage flush sums two hours' rows rather than
/// the whole month's: the hours before [`recent_from`] ("closed": no flush
/// writes there unless it was more than an hour late), summed again only
/// when that hour moves or after [`CLOSED_MAX_AGE`], and the recent hours,
/// summed on every read and added by [`ClosedCharges::with_recent`].
#[derive(Debug, Default)]
pub struct ClosedCharges {
    /// The split (ms) the sums were read up to, and when.
    read: Option<(i64, Instant)>,
    sums: HashMap<ApiKeyId, f64>,
}

/// How long the closed hours' sums are trusted (a flush held back by a
/// database outage of over an hour lands there).
pub const CLOSED_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// The first hour read on every flush: the previous hour (a flush just
/// after the hour turns still writes the hour before), not before the
/// month's start.
pub fn recent_from(now: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    (gpufleet_store::hour_of(now) - chrono::Duration::hours(1)).max(month_start(now))
}

impl ClosedCharges {
    /// Whether the closed hours must be summed again for `split`.
    pub fn stale(&self, split: chrono::DateTime<chrono::Utc>, now: Instant) -> bool {
        self.read.is_none_or(|(at, when)| {
            at != split.timestamp_millis() || now.duration_since(when) >= CLOSED_MAX_AGE
        })
    }

    /// The closed hours' sums, up to `split`, read at `now`.
    pub fn set(
        &mut self,
        split: chrono::DateTime<chrono::Utc>,
        sums: HashMap<ApiKeyId, f64>,
        now: Instant,
    ) {
        self.read = Some((split.timestamp_millis(), now));
        self.sums = sums;
    }

    /// The month's charges: the closed hours' and `recent`'s.
    pub fn with_recent(&self, mut recent: HashMap<ApiKeyId, f64>) -> HashMap<ApiKeyId, f64> {
        for (k, c) in &self.sums {
            *recent.entry(*k).or_default() += c;
        }
        recent
    }
}

/// Counts in a trailing window, in buckets of [`BUCKET_MS`].
#[derive(Debug, Default)]
struct Window {
    /// (bucket index, count), oldest first; only buckets with counts.
    buckets: VecDeque<(u64, u64)>,
    sum: u64,
}

impl Window {
    /// When the bucket `b` has left the window entirely.
    fn expiry(b: u64) -> u64 {
        (b + 1) * BUCKET_MS + WINDOW_MS
    }

    fn prune(&mut self, now: u64) {
        while let Some(&(b, n)) = self.buckets.front() {
            if Self::expiry(b) > now {
                break;
            }
            self.sum -= n;
            self.buckets.pop_front();
        }
    }

    fn add(&mut self, now: u64, n: u64) {
        if n == 0 {
            return;
        }
        let b = now / BUCKET_MS;
        match self.buckets.back_mut() {
            Some((last, c)) if *last == b => *c += n,
            _ => self.buckets.push_back((b, n)),
        }
        self.sum += n;
    }

    /// Milliseconds until the window is empty again.
    fn reset_in(&self, now: u64) -> u64 {
        self.buckets
            .back()
            .map_or(0, |&(b, _)| Self::expiry(b).saturating_sub(now))
    }

    /// Milliseconds until at most `target` is counted (`None`: never,
    /// the rest being reservations).
    fn down_to_in(&self, now: u64, target: u64) -> u64 {
        let mut sum = self.sum;
        for &(b, n) in &self.buckets {
            if sum <= target {
                break;
            }
            sum -= n;
            if sum <= target {
                return Self::expiry(b).saturating_sub(now);
            }
        }
        0
    }
}

/// A key's remaining requests and tokens, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    /// (limit, remaining, reset in ms) of requests.
    pub requests: Option<(u64, u64, u64)>,
    /// Same for tokens.
    pub tokens: Option<(u64, u64, u64)>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("rate limit reached for requests: {limit} per minute; retry in {}", duration_text(*retry_after_ms))]
    Requests {
        limit: u64,
        retry_after_ms: u64,
        headers: RateHeaders,
    },
    #[error("rate limit reached for tokens: {limit} per minute, {used} used or reserved, this request needs up to {requested}; retry in {}", duration_text(*retry_after_ms))]
    Tokens {
        limit: u64,
        used: u64,
        requested: u64,
        retry_after_ms: u64,
        headers: RateHeaders,
    },
    #[error("request too large for the tokens per minute limit: it may use up to {requested} tokens, the limit is {limit} per minute; send a smaller request or set max_tokens lower")]
    TooLarge {
        limit: u64,
        requested: u64,
        headers: RateHeaders,
    },
    #[error("has spent {spent:.4} of its monthly budget of {budget} EUR; it can make requests again next month or once the budget is raised")]
    Budget { spent: f64, budget: f64 },
}

impl Refusal {
    pub fn headers(&self) -> Option<&RateHeaders> {
        match self {
            Refusal::Requests { headers, .. }
            | Refusal::Tokens { headers, .. }
            | Refusal::TooLarge { headers, .. } => Some(headers),
            Refusal::Budget { .. } => None,
        }
    }

    /// Seconds to wait before retrying (`Retry-After`).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Requests { retry_after_ms, .. } | Refusal::Tokens { retry_after_ms, .. } => {
                Some(retry_after_ms.div_ceil(1000).max(1))
            }
            Refusal::TooLarge { .. } => Some(WINDOW_MS / 1000),
            Refusal::Budget { .. } => None,
        }
    }
}

/// `1.2s`, `250ms`: OpenAI's way of writing a reset time.
pub fn duration_text(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    }
}

#[derive(Debug)]
struct State {
    limits: KeyLimits,
    requests: Window,
    tokens: Window,
    reserved_tokens: u64,
    reserved_cost: f64,
    /// Charged this month as the database had it at the last refresh.
    stored: f64,
    /// Charged by this process and not yet flushed to the database.
    unflushed: f64,
    /// The other replicas' counts in their trailing minute, as last read.
    others: RateShare,
}

impl State {
    /// Tokens used or reserved in the trailing minute, here and elsewhere.
    fn used_tokens(&self) -> u64 {
        self.tokens.sum + self.reserved_tokens + self.others.tokens
    }

    /// What this replica used in its trailing minute (for the others).
    fn share(&mut self, now: u64) -> RateShare {
        self.requests.prune(now);
        self.tokens.prune(now);
        RateShare {
            requests: if self.limits.rpm.is_some() {
                self.requests.sum
            } else {
                0
            },
            tokens: if self.limits.tpm.is_some() {
                self.tokens.sum + self.reserved_tokens
            } else {
                0
            },
        }
    }

    fn spent(&self) -> f64 {
        self.stored + self.unflushed.max(0.0) + self.reserved_cost
    }

    fn headers(&self, now: u64) -> RateHeaders {
        RateHeaders {
            requests: self.limits.rpm.map(|rpm| {
                (
                    rpm,
                    rpm.saturating_sub(self.requests.sum + self.others.requests),
                    self.requests.reset_in(now),
                )
            }),
            tokens: self.limits.tpm.map(|tpm| {
                (
                    tpm,
                    tpm.saturating_sub(self.used_tokens()),
                    self.tokens.reset_in(now),
                )
            }),
        }
    }
}

/// One key's windows, reservations and budget. Shared by every request of
/// the key (and kept across key cache refreshes, so the windows go on).
#[derive(Debug)]
pub struct KeyLimiter {
    id: ApiKeyId,
    state: Mutex<State>,
}

/// What one request may use, reserved until it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    pub tokens: u64,
    pub cost: f64,
}

impl KeyLimiter {
    fn new(id: ApiKeyId, limits: KeyLimits, stored: f64, others: RateShare) -> Self {
        Self {
            id,
            state: Mutex::new(State {
                limits,
                requests: Window::default(),
                tokens: Window::default(),
                reserved_tokens: 0,
                reserved_cost: 0.0,
                stored,
                unflushed: 0.0,
                others,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        locked(&self.state)
    }

    pub fn limits(&self) -> KeyLimits {
        self.lock().limits
    }

    /// Admit a request that may use `est` (at `now`, [`now_ms`]), or say
    /// why not. Admitted, it counts in the requests window and its estimate
    /// is reserved until the [`Reservation`] is settled or dropped.
    pub fn admit(
        self: &Arc<Self>,
        est: Estimate,
        now: u64,
    ) -> Result<(Reservation, RateHeaders), Refusal> {
        let mut s = self.lock();
        s.requests.prune(now);
        s.tokens.prune(now);
        if let Some(budget) = s.limits.monthly_budget {
            let spent = s.spent();
            if spent >= budget {
                return Err(Refusal::Budget { spent, budget });
            }
        }
        if let Some(rpm) = s.limits.rpm {
            if s.requests.sum + s.others.requests >= rpm {
                // The others' counts are not ours to age: once they alone
                // fill the window, retry after the next sync.
                let target = (rpm - 1).saturating_sub(s.others.requests);
                let retry_after_ms = s.requests.down_to_in(now, target).max(1);
                return Err(Refusal::Requests {
                    limit: rpm,
                    retry_after_ms,
                    headers: s.headers(now),
                });
            }
        }
        if let Some(tpm) = s.limits.tpm {
            if est.tokens > tpm {
                return Err(Refusal::TooLarge {
                    limit: tpm,
                    requested: est.tokens,
                    headers: s.headers(now),
                });
            }
            let used = s.used_tokens();
            if used + est.tokens > tpm {
                // Reservations end with their requests: when the used
                // tokens alone leave room, a retry may fit.
                let target = tpm.saturating_sub(est.tokens + s.reserved_tokens + s.others.tokens);
                let retry_after_ms = s.tokens.down_to_in(now, target).max(1);
                return Err(Refusal::Tokens {
                    limit: tpm,
                    used,
                    requested: est.tokens,
                    retry_after_ms,
                    headers: s.headers(now),
                });
            }
        }
        s.requests.add(now, 1);
        s.reserved_tokens += est.tokens;
        s.reserved_cost += est.cost;
        let headers = s.headers(now);
        drop(s);
        Ok((
            Reservation {
                limiter: self.clone(),
                est,
                settled: false,
            },
            headers,
        ))
    }

    fn settle(&self, est: Estimate, tokens: u64, cost: f64, now: u64) {
        let mut s = self.lock();
        s.reserved_tokens = s.reserved_tokens.saturating_sub(est.tokens);
        s.reserved_cost = (s.reserved_cost - est.cost).max(0.0);
        s.tokens.prune(now);
        s.tokens.add(now, tokens);
        s.unflushed += cost;
    }

    /// Charges of this key were flushed (`flushed`), and the database now
    /// says it was charged `stored` this month (both at once, so nothing is
    /// counted twice or missed).
    fn refreshed(&self, flushed: f64, stored: f64) {
        let mut s = self.lock();
        s.unflushed = (s.unflushed - flushed).max(0.0);
        s.stored = stored;
    }

    /// Spent this month as this process knows it (stored + unflushed +
    /// reserved).
    pub fn spent(&self) -> f64 {
        self.lock().spent()
    }
}

/// A request's reservation; settled to the real count by
/// [`Reservation::settle`], or released (nothing used) when dropped.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<KeyLimiter>,
    est: Estimate,
    settled: bool,
}

impl Reservation {
    /// The request used `tokens` (prompt and completion) costing `cost`.
    pub fn settle(mut self, tokens: u64, cost: f64) {
        self.settled = true;
        self.limiter.settle(self.est, tokens, cost, now_ms());
    }

    pub fn estimate(&self) -> Estimate {
        self.est
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.limiter.settle(self.est, 0, 0.0, now_ms());
        }
    }
}

/// Every limited key's [`KeyLimiter`], and this month's charges as last read.
#[derive(Default)]
pub struct Limits {
    by_key: Mutex<HashMap<ApiKeyId, Arc<KeyLimiter>>>,
    /// Charges per key this month (from `key_charges_since`), and which
    /// month (its start, ms) they are of.
    charges: Mutex<(i64, HashMap<ApiKeyId, f64>)>,
    /// Charges flushed since the last refresh, per key.
    flushed: Mutex<HashMap<ApiKeyId, f64>>,
    /// The other replicas' shares per key, as last read.
    others: Mutex<HashMap<ApiKeyId, RateShare>>,
    /// This replica's shares as last written, and when ([`now_ms`]).
    written: Mutex<HashMap<ApiKeyId, (RateShare, u64)>>,
}

/// An unchanged share is written again after this long, so that readers,
/// who ignore shares older than a minute, keep counting it.
const SHARE_REWRITE_MS: u64 = 10_000;

/// A lock that a panicked holder did not poison for good.
pub(crate) fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Limits {
    /// The current limiters (taken out of the lock).
    fn limiters(&self) -> Vec<Arc<KeyLimiter>> {
        locked(&self.by_key).values().cloned().collect()
    }

    /// The limiter of key `id` with `limits` (kept across calls, its limits
    /// updated); `None` for a key without limits.
    pub fn limiter(&self, id: ApiKeyId, limits: KeyLimits) -> Option<Arc<KeyLimiter>> {
        let mut by_key = locked(&self.by_key);
        if limits.is_unlimited() {
            by_key.remove(&id);
            return None;
        }
        if let Some(l) = by_key.get(&id) {
            l.lock().limits = limits;
            return Some(l.clone());
        }
        let stored = {
            let c = locked(&self.charges);
            let this_month = month_start(chrono::Utc::now()).timestamp_millis();
            if c.0 == this_month {
                c.1.get(&id).copied().unwrap_or(0.0)
            } else {
                0.0
            }
        };
        let others = locked(&self.others).get(&id).copied().unwrap_or_default();
        let l = Arc::new(KeyLimiter::new(id, limits, stored, others));
        by_key.insert(id, l.clone());
        Some(l)
    }

    /// Charges of keys just written to the database (by a usage flush).
    pub fn flushed(&self, costs: impl IntoIterator<Item = (ApiKeyId, f64)>) {
        let mut f = locked(&self.flushed);
        for (k, c) in costs {
            *f.entry(k).or_default() += c;
        }
    }

    /// The database's charges per key for the month starting at `month`.
    pub fn refreshed(&self, month: chrono::DateTime<chrono::Utc>, charges: HashMap<ApiKeyId, f64>) {
        let flushed = std::mem::take(&mut *locked(&self.flushed));
        for l in self.limiters() {
            l.refreshed(
                flushed.get(&l.id).copied().unwrap_or(0.0),
                charges.get(&l.id).copied().unwrap_or(0.0),
            );
        }
        *locked(&self.charges) = (month.timestamp_millis(), charges);
    }

    /// This replica's shares that changed since they were last written
    /// (or were written long ago); a key no longer limited here gets a
    /// zero share. Write them, then call [`Self::shares_written`].
    pub fn shares_to_write(&self, now: u64) -> Vec<(ApiKeyId, RateShare)> {
        let written = locked(&self.written);
        let mut out = Vec::new();
        let mut current = std::collections::HashSet::new();
        for l in self.limiters() {
            let share = l.lock().share(now);
            current.insert(l.id);
            let stale = match written.get(&l.id) {
                Some((w, at)) => *w != share || now.saturating_sub(*at) >= SHARE_REWRITE_MS,
                None => !share.is_zero(),
            };
            if stale {
                out.push((l.id, share));
            }
        }
        for id in written.keys() {
            if !current.contains(id) {
                out.push((*id, RateShare::default()));
            }
        }
        out
    }

    /// `shares` were written at `now`.
    pub fn shares_written(&self, shares: &[(ApiKeyId, RateShare)], now: u64) {
        let mut written = locked(&self.written);
        for (id, share) in shares {
            if share.is_zero() {
                written.remove(id);
            } else {
                written.insert(*id, (*share, now));
            }
        }
    }

    /// The other replicas' shares per key, just read.
    pub fn set_others(&self, others: HashMap<ApiKeyId, RateShare>) {
        for l in self.limiters() {
            l.lock().others = others.get(&l.id).copied().unwrap_or_default();
        }
        *locked(&self.others) = others;
    }

    /// Whether any key has a limiter (else no charges need reading).
    pub fn any(&self) -> bool {
        !locked(&self.by_key).is_empty()
    }

    /// Whether this month's charges should be read: some key has limits,
    /// or none were read this month yet (a limiter made later starts from
    /// them).
    pub fn wants_charges(&self) -> bool {
        let this_month = month_start(chrono::Utc::now()).timestamp_millis();
        self.any() || locked(&self.charges).0 != this_month
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_charges_are_read_again_when_the_hour_moves_or_they_age() {
        use chrono::TimeZone;
        let at = |d, h, m| chrono::Utc.with_ymd_and_hms(2026, 12, d, h, m, 0).unwrap();
        // The previous hour, never before the month's start.
        assert_eq!(recent_from(at(6, 15, 42)), at(6, 14, 0));
        assert_eq!(recent_from(at(1, 0, 30)), at(1, 0, 0));
        assert_eq!(recent_from(at(1, 1, 5)), at(1, 0, 0));
        let t0 = Instant::now();
        let mut c = ClosedCharges::default();
        assert!(c.stale(at(6, 14, 0), t0));
        let (a, b) = (ApiKeyId::new(), ApiKeyId::new());
        c.set(at(6, 14, 0), HashMap::from([(a, 2.0)]), t0);
        assert!(!c.stale(at(6, 14, 0), t0 + std::time::Duration::from_secs(599)));
        assert!(c.stale(at(6, 15, 0), t0));
        assert!(c.stale(at(6, 14, 0), t0 + CLOSED_MAX_AGE));
        let month = c.with_recent(HashMap::from([(a, 0.5), (b, 1.0)]));
        assert_eq!(month, HashMap::from([(a, 2.5), (b, 1.0)]));
    }

    fn limiter(limits: KeyLimits) -> Arc<KeyLimiter> {
        Limits::default()
            .limiter(ApiKeyId::new(), limits)
            .expect("limited")
    }

    fn est(tokens: u64) -> Estimate {
        Estimate { tokens, cost: 0.0 }
    }

    #[test]
    fn other_replicas_shares_count_against_the_limits() {
        let limits = Limits::default();
        let id = ApiKeyId::new();
        let kl = KeyLimits {
            rpm: Some(5),
            tpm: Some(1_000),
            ..Default::default()
        };
        // Read before this replica saw the key: a new limiter starts from them.
        limits.set_others(HashMap::from([(
            id,
            RateShare {
                requests: 3,
                tokens: 600,
            },
        )]));
        let l = limits.limiter(id, kl).unwrap();
        let t0 = 1_000_000;
        let (r1, h) = l.admit(est(100), t0).unwrap();
        assert_eq!(h.requests, Some((5, 1, 60_100)));
        assert_eq!(h.tokens.map(|t| t.1), Some(300));
        // 600 elsewhere + 100 reserved here + 400 > 1,000.
        let e = l.admit(est(400), t0 + 1).unwrap_err();
        assert!(
            matches!(
                e,
                Refusal::Tokens {
                    used: 700,
                    requested: 400,
                    ..
                }
            ),
            "{e:?}"
        );
        let (r2, _) = l.admit(est(100), t0 + 2).unwrap();
        // 3 elsewhere + 2 here: the fifth request of the minute was the last.
        let e = l.admit(est(0), t0 + 3).unwrap_err();
        let Refusal::Requests {
            limit: 5, headers, ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(headers.requests.map(|r| r.1), Some(0));

        // This replica's share: its own counts only, written when changed.
        let shares = limits.shares_to_write(t0 + 10);
        assert_eq!(
            shares,
            vec![(
                id,
                RateShare {
                    requests: 2,
                    tokens: 200
                }
            )]
        );
        limits.shares_written(&shares, t0 + 10);
        assert!(limits.shares_to_write(t0 + 20).is_empty());
        // Unchanged, it is written again before readers would drop it.
        assert_eq!(limits.shares_to_write(t0 + 10 + SHARE_REWRITE_MS).len(), 1);

        // The others' window moved on: their share went down, a request fits.
        limits.set_others(HashMap::new());
        let (r3, _) = l.admit(est(0), t0 + 30).unwrap();
        drop((r1, r2, r3));

        // A key no longer limited here gets a zero share (its row goes).
        limits.limiter(id, KeyLimits::default());
        assert_eq!(
            limits.shares_to_write(t0 + 40),
            vec![(id, RateShare::default())]
        );
    }

    #[test]
    fn unlimited_keys_have_no_limiter() {
        let l = Limits::default();
        assert!(l.limiter(ApiKeyId::new(), KeyLimits::default()).is_none());
        assert!(!l.any());
    }

    #[test]
    fn requests_per_minute_over_a_sliding_window() {
        let l = limiter(KeyLimits {
            rpm: Some(3),
            ..Default::default()
        });
        let t0 = 1_000_000;
        let mut held = Vec::new();
        for (i, at) in [t0, t0 + 10_000, t0 + 20_000].into_iter().enumerate() {
            let (r, h) = l.admit(est(0), at).unwrap();
            assert_eq!(h.requests.map(|r| r.1), Some(2 - i as u64));
            held.push(r);
        }
        // Settling does not give a request back.
        held.clear();
        let e = l.admit(est(0), t0 + 30_000).unwrap_err();
        let Refusal::Requests {
            limit,
            retry_after_ms,
            headers,
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(limit, 3);
        // The first leaves the window 60 s (and its bucket) after it came.
        assert_eq!(retry_after_ms, 30_100);
        assert_eq!(headers.requests.map(|r| r.1), Some(0));
        assert!(l.admit(est(0), t0 + 60_000).is_err(), "still in its bucket");
        let (_r, h) = l.admit(est(0), t0 + 60_100).unwrap();
        assert_eq!(h.requests, Some((3, 0, 60_000 + 100)));
        assert!(l.admit(est(0), t0 + 60_200).is_err());
        // In any trailing 60 s: at most 3.
        assert!(l.admit(est(0), t0 + 70_100).is_ok());
    }

    #[test]
    fn a_burst_from_many_threads_admits_exactly_rpm() {
        let l = limiter(KeyLimits {
            rpm: Some(100),
            ..Default::default()
        });
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    for _ in 0..20 {
                        if l.admit(est(0), now_ms()).is_ok() {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 100);
    }

    #[test]
    fn tokens_reserve_then_settle_to_the_real_count() {
        let l = limiter(KeyLimits {
            tpm: Some(1_000),
            ..Default::default()
        });
        let t = 5_000_000;
        let (a, h) = l.admit(est(600), t).unwrap();
        assert_eq!(h.tokens.map(|x| x.1), Some(400));
        // 600 reserved + 500 > 1000.
        let e = l.admit(est(500), t + 1).unwrap_err();
        assert!(
            matches!(
                e,
                Refusal::Tokens {
                    used: 600,
                    requested: 500,
                    ..
                }
            ),
            "{e:?}"
        );
        // A request that can never fit says so.
        assert!(matches!(
            l.admit(est(1_001), t).unwrap_err(),
            Refusal::TooLarge { .. }
        ));
        // Settled lower than reserved: room again.
        a.settle(100, 0.0);
        let (b, h) = l.admit(est(500), now_ms()).unwrap();
        assert_eq!(h.tokens.map(|x| x.1), Some(400));
        // Dropped unsettled: nothing used.
        drop(b);
        let s = l.lock();
        assert_eq!((s.reserved_tokens, s.tokens.sum), (0, 100));
    }

    #[test]
    fn used_tokens_leave_the_window_after_a_minute() {
        let l = limiter(KeyLimits {
            tpm: Some(100),
            ..Default::default()
        });
        let mut s = l.lock();
        s.tokens.add(10_000, 90);
        drop(s);
        let e = l.admit(est(20), 20_000).unwrap_err();
        let Refusal::Tokens { retry_after_ms, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(retry_after_ms, 10_100 + 60_000 - 20_000);
        assert!(l.admit(est(20), 70_100).is_ok());
    }

    #[test]
    fn the_budget_counts_stored_unflushed_and_reserved_charges() {
        let limits = Limits::default();
        let id = ApiKeyId::new();
        let month = month_start(chrono::Utc::now());
        limits.refreshed(month, HashMap::from([(id, 0.5)]));
        let l = limits
            .limiter(
                id,
                KeyLimits {
                    monthly_budget: Some(1.0),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(l.spent(), 0.5, "what the database had this month");
        let big = Estimate {
            tokens: 10,
            cost: 0.3,
        };
        let (a, _) = l.admit(big, now_ms()).unwrap();
        let (b, _) = l.admit(big, now_ms()).unwrap();
        // 0.5 + 0.6 reserved ≥ 1.0.
        let e = l.admit(big, now_ms()).unwrap_err();
        assert!(
            matches!(e, Refusal::Budget { budget, .. } if budget == 1.0),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("of its monthly budget of 1 EUR"),
            "{e}"
        );
        a.settle(10, 0.1);
        drop(b);
        assert!((l.spent() - 0.6).abs() < 1e-9);
        // Flushed, then read back from the database with another replica's.
        limits.flushed([(id, 0.1)]);
        limits.refreshed(month, HashMap::from([(id, 0.95)]));
        assert!((l.spent() - 0.95).abs() < 1e-9);
        limits.refreshed(month, HashMap::from([(id, 1.2)]));
        assert!(matches!(
            l.admit(est(1), now_ms()).unwrap_err(),
            Refusal::Budget { .. }
        ));
        // Raised budget: admitted again; a limiter is kept per key.
        let again = limits
            .limiter(
                id,
                KeyLimits {
                    monthly_budget: Some(2.0),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(Arc::ptr_eq(&again, &l));
        assert!(l.admit(est(1), now_ms()).is_ok());
    }

    #[test]
    fn reset_times_read_like_openai_s() {
        assert_eq!(duration_text(250), "250ms");
        assert_eq!(duration_text(1_234), "1.2s");
        assert_eq!(duration_text(60_000), "60.0s");
        assert_eq!(
            month_start("2026-12-06T11:00:00Z".parse().unwrap()),
            "2026-12-01T00:00:00Z"
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap()
        );
    }
}
