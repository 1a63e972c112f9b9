//! Fault injection, availability per commercial type, per-token rate limiting
//! and the request log.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Stock of a commercial type, as `GET products/servers/availability` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    Available,
    Scarce,
    Shortage,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Available => "available",
            Availability::Scarce => "scarce",
            Availability::Shortage => "shortage",
        }
    }
}

/// Per-token token bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// What a matching rule does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultAction {
    /// Answer this status and body (and headers) instead of doing the request.
    Respond {
        status: u16,
        body: Value,
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
    /// 429 `too_many_requests` with `Retry-After` and `X-Ratelimit-*`.
    TooManyRequests { retry_after_secs: u64 },
    /// 500/502/503/504 with an `internal_error` body, without doing the request.
    ServerError { status: u16 },
    /// 403 `quotas_exceeded` naming `resource`.
    QuotasExceeded {
        resource: String,
        #[serde(default)]
        quota: u64,
    },
    /// 412 `out_of_stock`.
    OutOfStock,
    /// Do the request, then close the connection without an answer.
    LoseAnswer,
    /// Do the request, then answer 504 `gateway timeout`.
    PerformThen504,
    /// Wait this long before handling (not terminal: other rules still apply).
    Latency { ms: u64 },
    /// On a `poweron` (or `reboot`): the server never leaves `starting`.
    StuckStarting,
}

impl FaultAction {
    fn terminal(&self) -> bool {
        !matches!(
            self,
            FaultAction::Latency { .. } | FaultAction::StuckStarting
        )
    }
}

/// A fault rule: `method` (any when `None`), `path` pattern (`*` = one path
/// segment, a trailing `**` = the rest, e.g. `/instance/v1/zones/*/servers`),
/// optional `commercial_type` (of the body's `commercial_type`, or of the
/// server named in the path), and when it fires: for the next `times`
/// matching calls (all when `None`), each with `probability` (1 when `None`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    #[serde(default)]
    pub commercial_type: Option<String>,
    #[serde(default)]
    pub times: Option<u32>,
    #[serde(default)]
    pub probability: Option<f64>,
    pub action: FaultAction,
}

impl FaultRule {
    pub fn new(method: &str, path: &str, action: FaultAction) -> Self {
        FaultRule {
            method: Some(method.to_string()),
            path: path.to_string(),
            commercial_type: None,
            times: None,
            probability: None,
            action,
        }
    }
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = Some(p);
        self
    }
    pub fn commercial_type(mut self, t: &str) -> Self {
        self.commercial_type = Some(t.to_string());
        self
    }
}

pub fn path_matches(pattern: &str, path: &str) -> bool {
    if pattern == "*" || pattern == "**" {
        return true;
    }
    let pat: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    for (i, p) in pat.iter().enumerate() {
        if *p == "**" {
            return true;
        }
        match segs.get(i) {
            Some(s) if *p == "*" || p == s => {}
            _ => return false,
        }
    }
    pat.len() == segs.len()
}

const MAX_LOG: usize = 100_000;

#[derive(Debug, Clone, Serialize)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    /// The route template, e.g. `/instance/v1/zones/{zone}/servers/{id}`.
    pub route: String,
    /// 0 when the answer was lost on purpose.
    pub status: u16,
    pub commercial_type: Option<String>,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleEntry {
    pub id: u64,
    pub rule: FaultRule,
    pub fired: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    rules: Vec<RuleEntry>,
    availability: HashMap<String, Availability>,
    locked: std::collections::BTreeSet<String>,
    log: Vec<LoggedRequest>,
    counts: BTreeMap<String, u64>,
    buckets: HashMap<String, Bucket>,
}

/// Fault rules, availability, locks, rate limiting and the request log.
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct Faults {
    inner: Arc<Mutex<Inner>>,
    rate_limit: Option<RateLimit>,
    started: Instant,
}

/// The faults that fired for one request.
#[derive(Debug, Default, Clone)]
pub(crate) struct Fired {
    pub latency: Duration,
    pub stuck_starting: bool,
    pub terminal: Option<FaultAction>,
}

impl Faults {
    pub(crate) fn new(rate_limit: Option<RateLimit>) -> Self {
        Faults {
            inner: Arc::new(Mutex::new(Inner::default())),
            rate_limit,
            started: Instant::now(),
        }
    }

    /// Adds a rule; returns its id.
    pub fn add(&self, rule: FaultRule) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.rules.push(RuleEntry { id, rule, fired: 0 });
        id
    }

    pub fn remove(&self, id: u64) -> bool {
        let mut inner = self.inner.lock().unwrap();
        let before = inner.rules.len();
        inner.rules.retain(|r| r.id != id);
        before != inner.rules.len()
    }

    /// Removes every rule (availability and locks stay).
    pub fn clear(&self) {
        self.inner.lock().unwrap().rules.clear();
    }

    pub fn rules(&self) -> Vec<RuleEntry> {
        self.inner.lock().unwrap().rules.clone()
    }

    /// Sets a type's availability in every zone (default: `available`).
    /// `shortage` makes `poweron` answer `out_of_stock`.
    pub fn set_availability(&self, commercial_type: &str, availability: Availability) {
        self.inner
            .lock()
            .unwrap()
            .availability
            .insert(commercial_type.to_string(), availability);
    }

    pub fn availability(&self, commercial_type: &str) -> Availability {
        self.inner
            .lock()
            .unwrap()
            .availability
            .get(commercial_type)
            .copied()
            .unwrap_or(Availability::Available)
    }

    /// Records a lock (see `Emulator::lock_server`, which also updates the server).
    pub(crate) fn lock_server(&self, id: &str, locked: bool) {
        let mut inner = self.inner.lock().unwrap();
        if locked {
            inner.locked.insert(id.to_string());
        } else {
            inner.locked.remove(id);
        }
    }

    pub(crate) fn is_locked(&self, id: &str) -> bool {
        self.inner.lock().unwrap().locked.contains(id)
    }

    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.inner.lock().unwrap().counts.clone()
    }

    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.inner.lock().unwrap().log.clone()
    }

    /// Empties the request log and counts.
    pub fn reset_log(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.log.clear();
        inner.counts.clear();
    }

    pub(crate) fn record(
        &self,
        method: &str,
        path: &str,
        route: &str,
        status: u16,
        commercial_type: Option<String>,
    ) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        let mut inner = self.inner.lock().unwrap();
        *inner.counts.entry(format!("{method} {route}")).or_default() += 1;
        // Counts are kept whole; the log keeps the latest entries only.
        if inner.log.len() >= MAX_LOG {
            inner.log.drain(..MAX_LOG / 10);
        }
        inner.log.push(LoggedRequest {
            method: method.into(),
            path: path.into(),
            route: route.into(),
            status,
            commercial_type,
            at_ms,
        });
    }

    /// Which rules fire for this request (consumes their `times`).
    pub(crate) fn fire(&self, method: &str, path: &str, commercial_type: Option<&str>) -> Fired {
        let mut inner = self.inner.lock().unwrap();
        let mut fired = Fired::default();
        let mut exhausted = Vec::new();
        for entry in inner.rules.iter_mut() {
            let r = &entry.rule;
            if let Some(m) = &r.method {
                if !m.eq_ignore_ascii_case(method) {
                    continue;
                }
            }
            if !path_matches(&r.path, path) {
                continue;
            }
            if let Some(t) = &r.commercial_type {
                if commercial_type != Some(t.as_str()) {
                    continue;
                }
            }
            if let Some(p) = r.probability {
                if rand::random::<f64>() >= p {
                    continue;
                }
            }
            entry.fired += 1;
            if let Some(n) = entry.rule.times {
                if entry.fired >= u64::from(n) {
                    exhausted.push(entry.id);
                }
            }
            match &entry.rule.action {
                FaultAction::Latency { ms } => fired.latency += Duration::from_millis(*ms),
                FaultAction::StuckStarting => fired.stuck_starting = true,
                a => {
                    debug_assert!(a.terminal());
                    fired.terminal = Some(a.clone());
                    break;
                }
            }
        }
        inner.rules.retain(|r| !exhausted.contains(&r.id));
        fired
    }

    /// Token bucket per token: `Ok((limit, remaining, seconds until full))`
    /// or `Err(seconds until a token)`.
    pub(crate) fn take_token(&self, token: &str) -> Option<Result<(u32, u32, u64), u64>> {
        let rl = self.rate_limit.as_ref()?;
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        let b = inner.buckets.entry(token.to_string()).or_insert(Bucket {
            tokens: f64::from(rl.burst),
            at: now,
        });
        let elapsed = now.duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rl.requests_per_second).min(f64::from(rl.burst));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            let reset = ((f64::from(rl.burst) - b.tokens) / rl.requests_per_second).ceil() as u64;
            Some(Ok((rl.burst, b.tokens.floor() as u32, reset)))
        } else {
            let wait = (1.0 - b.tokens) / rl.requests_per_second;
            Some(Err(wait.ceil().max(1.0) as u64))
        }
    }

    pub(crate) fn rate_limit(&self) -> Option<&RateLimit> {
        self.rate_limit.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(path_matches(
            "/instance/v1/zones/*/servers",
            "/instance/v1/zones/fr-par-1/servers"
        ));
        assert!(!path_matches(
            "/instance/v1/zones/*/servers",
            "/instance/v1/zones/fr-par-1/servers/x"
        ));
        assert!(path_matches(
            "/instance/v1/**",
            "/instance/v1/zones/fr-par-1/servers/x"
        ));
        assert!(path_matches("*", "/anything"));
    }
}
