//! Usage accounting per instance and per API key: requests, errors, prompt
//! and completion tokens. Counted in memory on the request path (atomics),
//! added to the database's running totals every `usage_flush_interval_ms`,
//! and rendered for Prometheus ([`UsageFigures::render_prometheus`]).
//!
//! Each request's [`Meter`] also counts it per (hour, key, instance) — a
//! sparse map, in shards, holding only the pairs used since the last flush
//! — which the flush adds to `usage_hourly` with what the key is charged
//! ([`TokenPrices`]), and settles the key's limits when the request ends,
//! however it ends (answered, failed, or its client gone).

use crate::keys::AuthedKey;
use crate::limits::Reservation;
use crate::pool::Backend;
use gpufleet_domain::{InstanceId, ProjectId};
use gpufleet_store::{
    hour_of, ApiKeyId, HourlyUsage, Store, StoreError, UsageCounts, UsageDelta, UsageScope,
};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// What keys are charged per million tokens of each model: the configured
/// `prompt_price_per_million` / `completion_price_per_million`, else a
/// fallback installed with [`TokenPrices::set_fallback`] (meant for the
/// model's measured cost per million tokens, from GPU spend over tokens),
/// else 0.
#[derive(Debug, Default)]
pub struct TokenPrices {
    /// (prompt, completion) per million tokens, as configured.
    configured: HashMap<String, (Option<f64>, Option<f64>)>,
    /// Per million tokens (prompt and completion alike), by model.
    fallback: RwLock<HashMap<String, f64>>,
}

impl TokenPrices {
    /// The prices configured in `[[control.models]]`.
    pub fn from_models(models: &[gpufleet_control::config::ModelSpec]) -> Self {
        Self {
            configured: models
                .iter()
                .filter(|m| {
                    m.prompt_price_per_million.is_some() || m.completion_price_per_million.is_some()
                })
                .map(|m| {
                    (
                        m.name.to_string(),
                        (m.prompt_price_per_million, m.completion_price_per_million),
                    )
                })
                .collect(),
            fallback: RwLock::default(),
        }
    }

    /// The hook for a measured price: `model`'s cost per million tokens
    /// (`None` forgets it), used where no price is configured. Takes effect
    /// for charges computed from then on.
    pub fn set_fallback(&self, model: &str, per_million: Option<f64>) {
        let mut f = self.fallback.write().unwrap_or_else(|p| p.into_inner());
        match per_million.filter(|p| p.is_finite() && *p >= 0.0) {
            Some(p) => {
                f.insert(model.to_string(), p);
            }
            None => {
                f.remove(model);
            }
        }
    }

    /// (prompt, completion) per million tokens of `model`.
    pub fn per_million(&self, model: &str) -> (f64, f64) {
        let (p, c) = self.configured.get(model).copied().unwrap_or((None, None));
        if let (Some(p), Some(c)) = (p, c) {
            return (p, c);
        }
        let fb = self
            .fallback
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .copied()
            .unwrap_or(0.0);
        (p.unwrap_or(fb), c.unwrap_or(fb))
    }

    /// What `t` tokens of `model` cost.
    pub fn cost(&self, model: &str, t: Tokens) -> f64 {
        if t.prompt == 0 && t.completion == 0 {
            return 0.0;
        }
        let (p, c) = self.per_million(model);
        (t.prompt as f64 * p + t.completion as f64 * c) / 1e6
    }
}

/// One subject's counters since the process started.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub stalls: AtomicU64,
    pub ejections: AtomicU64,
    pub hedges: AtomicU64,
    pub failovers: AtomicU64,
}

impl Counters {
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    pub fn tokens(&self, t: Tokens) {
        self.prompt_tokens.fetch_add(t.prompt, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(t.completion, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> UsageCounts {
        UsageCounts {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            prompt_tokens: self.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            stalls: self.stalls.load(Ordering::Relaxed),
            ejections: self.ejections.load(Ordering::Relaxed),
            hedges: self.hedges.load(Ordering::Relaxed),
            failovers: self.failovers.load(Ordering::Relaxed),
        }
    }
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tokens of one response (its `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
}

struct Subject {
    /// Model (instances) or key name (keys).
    label: String,
    counters: Arc<Counters>,
    /// What the database has already been given.
    flushed: UsageCounts,
}

/// Shards of the (hour, key, instance) map (a power of two).
const PAIR_SHARDS: usize = 16;

/// (start of the hour in ms, key, instance).
type PairKey = (i64, Option<ApiKeyId>, InstanceId);

/// Counts of one (hour, key, instance) since the last flush.
struct Pair {
    /// The instance (its project, model and deployment).
    backend: Arc<Backend>,
    requests: u64,
    errors: u64,
    tokens: Tokens,
}

/// Every subject's counters.
#[derive(Default)]
pub struct Usage {
    instances: Mutex<HashMap<InstanceId, Subject>>,
    keys: Mutex<HashMap<ApiKeyId, Subject>>,
    /// Per (hour, key, instance), since the last flush; sharded by instance.
    pairs: [Mutex<HashMap<PairKey, Pair>>; PAIR_SHARDS],
    prices: Arc<TokenPrices>,
    /// One flush at a time, so no delta is added twice.
    flushing: tokio::sync::Mutex<()>,
}

/// What a flush wrote.
#[derive(Debug, Default)]
pub struct Flushed {
    /// (project, model) whose instances got requests.
    pub models: Vec<(ProjectId, String)>,
    /// What each key was charged in the rows written.
    pub key_costs: HashMap<ApiKeyId, f64>,
}

fn counters_of<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, Subject>>,
    k: K,
    label: &str,
) -> Arc<Counters> {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(k)
        .or_insert_with(|| Subject {
            label: label.to_string(),
            counters: Arc::new(Counters::default()),
            flushed: UsageCounts::default(),
        })
        .counters
        .clone()
}

fn minus(a: UsageCounts, b: UsageCounts) -> UsageCounts {
    UsageCounts {
        requests: a.requests.saturating_sub(b.requests),
        errors: a.errors.saturating_sub(b.errors),
        prompt_tokens: a.prompt_tokens.saturating_sub(b.prompt_tokens),
        completion_tokens: a.completion_tokens.saturating_sub(b.completion_tokens),
        stalls: a.stalls.saturating_sub(b.stalls),
        ejections: a.ejections.saturating_sub(b.ejections),
        hedges: a.hedges.saturating_sub(b.hedges),
        failovers: a.failovers.saturating_sub(b.failovers),
    }
}

impl Usage {
    pub fn with_prices(prices: Arc<TokenPrices>) -> Self {
        Self {
            prices,
            ..Self::default()
        }
    }

    pub fn prices(&self) -> &Arc<TokenPrices> {
        &self.prices
    }

    /// Count one request's part on `backend` for the pair (hour, key, instance).
    fn record_pair(
        &self,
        hour: i64,
        key: Option<ApiKeyId>,
        backend: &Arc<Backend>,
        requests: u64,
        errors: u64,
        t: Tokens,
    ) {
        let shard = (backend.id.as_uuid().as_u128() as usize) & (PAIR_SHARDS - 1);
        let mut m = self.pairs[shard].lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry((hour, key, backend.id)).or_insert_with(|| Pair {
            backend: backend.clone(),
            requests: 0,
            errors: 0,
            tokens: Tokens::default(),
        });
        e.requests += requests;
        e.errors += errors;
        e.tokens.prompt += t.prompt;
        e.tokens.completion += t.completion;
    }

    /// Add the (hour, key, instance) counts since the last flush to
    /// `usage_hourly`, with their charges. On failure they are kept for
    /// the next flush.
    async fn flush_pairs(&self, store: &Store) -> Result<Flushed, StoreError> {
        // Drained, not swapped: each shard keeps its table, so the requests
        // after a flush do not allocate it again.
        let taken: Vec<(PairKey, Pair)> = self
            .pairs
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain()
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut out = Flushed::default();
        let mut rows = Vec::new();
        for ((hour, key, instance), p) in &taken {
            let Ok(model) = p.backend.model.parse() else {
                continue;
            };
            let cost = self.prices.cost(&p.backend.model, p.tokens);
            if let Some(k) = key {
                *out.key_costs.entry(*k).or_default() += cost;
            }
            if p.requests > 0 {
                out.models
                    .push((p.backend.project.clone(), p.backend.model.clone()));
            }
            rows.push(HourlyUsage {
                hour: chrono::DateTime::from_timestamp_millis(*hour).unwrap_or_default(),
                key_id: *key,
                instance_id: *instance,
                project_id: p.backend.project.clone(),
                model,
                deployment_id: p.backend.deployment,
                requests: p.requests,
                errors: p.errors,
                prompt_tokens: p.tokens.prompt,
                completion_tokens: p.tokens.completion,
                cost,
            });
        }
        if let Err(e) = store.add_hourly_usage(&rows).await {
            // Put them back (with what came since) for the next flush.
            for ((hour, key, _), p) in taken {
                self.record_pair(hour, key, &p.backend, p.requests, p.errors, p.tokens);
            }
            return Err(e);
        }
        out.models.sort();
        out.models.dedup();
        Ok(out)
    }

    pub fn instance(&self, id: InstanceId, model: &str) -> Arc<Counters> {
        counters_of(&self.instances, id, model)
    }

    pub fn key(&self, id: ApiKeyId, name: &str) -> Arc<Counters> {
        counters_of(&self.keys, id, name)
    }

    /// Counts since start.
    pub fn figures(&self) -> UsageFigures {
        fn list<K: ToString>(map: &Mutex<HashMap<K, Subject>>) -> Vec<SubjectUsage> {
            let mut v: Vec<SubjectUsage> = map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, s)| SubjectUsage {
                    id: k.to_string(),
                    label: s.label.clone(),
                    counts: s.counters.snapshot(),
                })
                .collect();
            v.sort_by(|a, b| a.id.cmp(&b.id));
            v
        }
        UsageFigures {
            instances: list(&self.instances),
            keys: list(&self.keys),
        }
    }

    /// Add what was counted since the last flush to the database's totals
    /// (`usage_counters`, `usage_hourly`). Returns the models whose
    /// instances got requests since the last one, and what keys were charged.
    pub async fn flush(&self, store: &Store) -> Result<Flushed, StoreError> {
        let _one = self.flushing.lock().await;
        self.flush_counters(store).await?;
        self.flush_pairs(store).await
    }

    async fn flush_counters(&self, store: &Store) -> Result<(), StoreError> {
        fn deltas<K: ToString + Clone + std::hash::Hash + Eq>(
            map: &Mutex<HashMap<K, Subject>>,
            scope: UsageScope,
        ) -> Vec<(K, UsageCounts, UsageDelta)> {
            map.lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(|(k, s)| {
                    let now = s.counters.snapshot();
                    let d = minus(now, s.flushed);
                    (!d.is_zero()).then(|| {
                        (
                            k.clone(),
                            now,
                            UsageDelta {
                                scope,
                                subject: k.to_string(),
                                counts: d,
                            },
                        )
                    })
                })
                .collect()
        }
        fn mark<K: std::hash::Hash + Eq>(
            map: &Mutex<HashMap<K, Subject>>,
            done: Vec<(K, UsageCounts, UsageDelta)>,
        ) {
            let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
            for (k, now, _) in done {
                if let Some(s) = m.get_mut(&k) {
                    s.flushed = now;
                }
            }
        }
        let inst = deltas(&self.instances, UsageScope::Instance);
        let keys = deltas(&self.keys, UsageScope::Key);
        let all: Vec<UsageDelta> = inst
            .iter()
            .map(|x| x.2.clone())
            .chain(keys.iter().map(|x| x.2.clone()))
            .collect();
        if all.is_empty() {
            return Ok(());
        }
        store.add_usage(&all, chrono::Utc::now()).await?;
        mark(&self.instances, inst);
        mark(&self.keys, keys);
        Ok(())
    }
}

/// One request's accounting, done when it is dropped, however the request
/// ends (answered, failed, or its client gone mid-stream): the tokens each
/// instance generated for it, counted per (hour, key, instance), and the
/// key's reservation settled to the real count and charge.
pub(crate) struct Meter {
    usage: Arc<Usage>,
    key: Arc<AuthedKey>,
    reservation: Option<Reservation>,
    /// The instances that served parts of the answer (the last one last)
    /// with the tokens the key is charged for on each.
    first: Option<(Arc<Backend>, Tokens)>,
    more: Vec<(Arc<Backend>, Tokens)>,
    failed: bool,
}

impl Meter {
    pub fn new(usage: Arc<Usage>, key: Arc<AuthedKey>, reservation: Option<Reservation>) -> Self {
        Self {
            usage,
            key,
            reservation,
            first: None,
            more: Vec::new(),
            failed: false,
        }
    }

    fn last_mut(&mut self) -> Option<&mut (Arc<Backend>, Tokens)> {
        match self.more.last_mut() {
            Some(l) => Some(l),
            None => self.first.as_mut(),
        }
    }

    /// `b` serves (the rest of) the answer.
    pub fn served_by(&mut self, b: &Arc<Backend>) {
        if self.last_mut().is_some_and(|(l, _)| Arc::ptr_eq(l, b)) {
            return;
        }
        let part = (b.clone(), Tokens::default());
        if self.first.is_none() {
            self.first = Some(part);
        } else {
            self.more.push(part);
        }
    }

    /// `b` generated `t` for the key (counted on the key now).
    pub fn tokens(&mut self, b: &Arc<Backend>, t: Tokens) {
        self.key.usage.tokens(t);
        self.served_by(b);
        if let Some((_, sum)) = self.last_mut() {
            sum.prompt += t.prompt;
            sum.completion += t.completion;
        }
    }

    /// The request failed (its answer was an error, or broke off).
    pub fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        let hour = hour_of(chrono::Utc::now()).timestamp_millis();
        let first = self.first.take();
        let more = std::mem::take(&mut self.more);
        let n = usize::from(first.is_some()) + more.len();
        let parts = first.into_iter().chain(more);
        let mut total = Tokens::default();
        let mut cost = 0.0;
        let budget = self.reservation.is_some();
        for (i, (b, t)) in parts.enumerate() {
            let last = i + 1 == n;
            self.usage.record_pair(
                hour,
                Some(self.key.id),
                &b,
                u64::from(last),
                u64::from(last && self.failed),
                t,
            );
            total.prompt += t.prompt;
            total.completion += t.completion;
            if budget {
                cost += self.usage.prices.cost(&b.model, t);
            }
        }
        if let Some(r) = self.reservation.take() {
            r.settle(total.prompt + total.completion, cost);
        }
    }
}

/// One subject's counts since this process started.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubjectUsage {
    /// Instance id or API key id.
    pub id: String,
    /// The instance's model, or the key's name.
    pub label: String,
    pub counts: UsageCounts,
}

/// Counts since this process started, per instance and per key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageFigures {
    pub instances: Vec<SubjectUsage>,
    pub keys: Vec<SubjectUsage>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl UsageFigures {
    /// Prometheus text exposition: `gpufleet_router_instance_*_total`
    /// (labels `instance_id`, `model`) and `gpufleet_router_key_*_total`
    /// (labels `api_key_id`, `api_key_name`).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        type Family = (&'static str, &'static str, fn(&UsageCounts) -> u64);
        let families: [Family; 4] = [
            ("requests", "Requests sent", |c| c.requests),
            ("errors", "Requests that failed", |c| c.errors),
            ("prompt_tokens", "Prompt tokens", |c| c.prompt_tokens),
            ("completion_tokens", "Completion tokens", |c| {
                c.completion_tokens
            }),
        ];
        // Routing events happen to instances only.
        let routing: [Family; 4] = [
            (
                "stalls",
                "Requests with no first token within the instance's stall bound",
                |c| c.stalls,
            ),
            ("ejections", "Times the instance's circuit opened", |c| {
                c.ejections
            }),
            ("hedges", "Hedged copies of requests sent", |c| c.hedges),
            (
                "failovers",
                "Streams that broke off here and were continued on another instance",
                |c| c.failovers,
            ),
        ];
        for (scope, list, id_label, name_label) in [
            ("instance", &self.instances, "instance_id", "model"),
            ("key", &self.keys, "api_key_id", "api_key_name"),
        ] {
            let extra: &[Family] = if scope == "instance" { &routing } else { &[] };
            for &(name, help, get) in families.iter().chain(extra) {
                let metric = format!("gpufleet_router_{scope}_{name}_total");
                let _ = writeln!(out, "# HELP {metric} {help} (per {scope}).");
                let _ = writeln!(out, "# TYPE {metric} counter");
                for s in list {
                    let _ = writeln!(
                        out,
                        "{metric}{{{id_label}=\"{}\",{name_label}=\"{}\"}} {}",
                        escape(&s.id),
                        escape(&s.label),
                        get(&s.counts)
                    );
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_configured_else_the_fallback_else_zero() {
        let mut m = gpufleet_control::config::ModelSpec::defaults();
        m[0].prompt_price_per_million = Some(1.0);
        m[0].completion_price_per_million = Some(3.0);
        m[1].completion_price_per_million = Some(2.0);
        let p = TokenPrices::from_models(&m);
        let (a, b, c) = (m[0].name.as_str(), m[1].name.as_str(), m[2].name.as_str());
        let t = Tokens {
            prompt: 1_000_000,
            completion: 500_000,
        };
        assert_eq!(p.cost(a, t), 2.5);
        assert_eq!(p.cost(b, t), 1.0, "no prompt price, no fallback: 0");
        assert_eq!(p.cost(c, t), 0.0);
        p.set_fallback(b, Some(0.4));
        p.set_fallback(c, Some(0.4));
        p.set_fallback(a, Some(100.0));
        assert_eq!(p.per_million(b), (0.4, 2.0));
        assert_eq!(p.per_million(c), (0.4, 0.4));
        assert_eq!(p.cost(a, t), 2.5, "configured prices win");
        p.set_fallback(c, None);
        assert_eq!(p.cost(c, t), 0.0);
    }

    /// Usage whose first default model costs `prompt` / `completion` per
    /// million tokens; that model's name.
    fn priced_usage(prompt: f64, completion: f64) -> (Arc<Usage>, String) {
        let mut models = gpufleet_control::config::ModelSpec::defaults();
        models[0].prompt_price_per_million = Some(prompt);
        models[0].completion_price_per_million = Some(completion);
        let prices = TokenPrices::from_models(&models);
        (
            Arc::new(Usage::with_prices(Arc::new(prices))),
            models[0].name.to_string(),
        )
    }

    #[test]
    fn a_meter_counts_per_key_and_instance_and_settles_the_reservation() {
        use crate::limits::{Estimate, Limits};
        let (u, model) = priced_usage(0.0, 1_000.0);
        let limits = Limits::default();
        let id = ApiKeyId::new();
        let limiter = limits
            .limiter(
                id,
                gpufleet_domain::KeyLimits {
                    tpm: Some(10_000),
                    monthly_budget: Some(100.0),
                    ..Default::default()
                },
            )
            .unwrap();
        let key = Arc::new(AuthedKey {
            id,
            name: "k".into(),
            models: None,
            usage: u.key(id, "k"),
            project: ProjectId::default_project(),
            limiter: Some(limiter.clone()),
        });
        let backend = |n: u128| {
            Arc::new(Backend::new(
                InstanceId::from_uuid(uuid::Uuid::from_u128(n)),
                &model,
                String::new(),
                None,
                crate::breaker::Breaker::new(1, std::time::Duration::from_secs(1)),
                u.instance(InstanceId::from_uuid(uuid::Uuid::from_u128(n)), &model),
            ))
        };
        let (b1, b2) = (backend(1), backend(2));
        let (r, _) = limiter
            .admit(
                Estimate {
                    tokens: 1_000,
                    cost: 1.0,
                },
                crate::limits::now_ms(),
            )
            .unwrap();
        {
            let mut m = Meter::new(u.clone(), key.clone(), Some(r));
            m.served_by(&b1);
            m.tokens(
                &b1,
                Tokens {
                    prompt: 10,
                    completion: 5,
                },
            );
            m.tokens(
                &b2,
                Tokens {
                    prompt: 0,
                    completion: 7,
                },
            );
            m.failed();
            assert!(limiter.spent() >= 1.0, "reserved while in flight");
        }
        // Settled: 12 completion tokens at 1000 per million.
        assert!(
            (limiter.spent() - 0.012).abs() < 1e-9,
            "{}",
            limiter.spent()
        );
        assert_eq!(key.usage.snapshot().completion_tokens, 12);
        let pairs: Vec<(InstanceId, u64, u64, Tokens)> = u
            .pairs
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap()
                    .iter()
                    .map(|((_, k, i), p)| {
                        assert_eq!(*k, Some(id));
                        (*i, p.requests, p.errors, p.tokens)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut pairs = pairs;
        pairs.sort_by_key(|p| p.0);
        assert_eq!(
            pairs,
            vec![
                (
                    b1.id,
                    0,
                    0,
                    Tokens {
                        prompt: 10,
                        completion: 5
                    }
                ),
                (
                    b2.id,
                    1,
                    1,
                    Tokens {
                        prompt: 0,
                        completion: 7
                    }
                ),
            ],
            "the request is counted where it ended"
        );
    }

    #[tokio::test]
    async fn a_flush_writes_usage_per_hour_key_and_instance_with_its_charge() {
        let store = Store::connect("sqlite::memory:").await.unwrap();
        let (u, model) = priced_usage(1.0, 2.0);
        let id = ApiKeyId::new();
        let key = Arc::new(AuthedKey {
            id,
            name: "k".into(),
            models: None,
            usage: u.key(id, "k"),
            project: ProjectId::default_project(),
            limiter: None,
        });
        let iid = InstanceId::new();
        let mut b = Backend::new(
            iid,
            &model,
            String::new(),
            None,
            crate::breaker::Breaker::new(1, std::time::Duration::from_secs(1)),
            u.instance(iid, &model),
        );
        b.project = "research".parse().unwrap();
        let b = Arc::new(b);
        for _ in 0..2 {
            let mut m = Meter::new(u.clone(), key.clone(), None);
            m.tokens(
                &b,
                Tokens {
                    prompt: 500_000,
                    completion: 250_000,
                },
            );
        }
        let flushed = u.flush(&store).await.unwrap();
        assert_eq!(
            flushed.models,
            vec![("research".parse().unwrap(), model.clone())]
        );
        assert_eq!(flushed.key_costs.get(&id).copied(), Some(2.0));
        let now = chrono::Utc::now();
        let rows = store
            .hourly_usage(
                now - chrono::Duration::hours(1),
                now + chrono::Duration::hours(1),
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (
                r.key_id,
                r.instance_id,
                r.project_id.as_str(),
                r.model.as_str()
            ),
            (Some(id), iid, "research", model.as_str())
        );
        assert_eq!(
            (
                r.requests,
                r.errors,
                r.prompt_tokens,
                r.completion_tokens,
                r.cost
            ),
            (2, 0, 1_000_000, 500_000, 2.0)
        );
        // Nothing new: nothing written again.
        let again = u.flush(&store).await.unwrap();
        assert!(again.key_costs.is_empty());
        let charges = store
            .key_charges_since(crate::limits::month_start(now))
            .await
            .unwrap();
        assert_eq!(charges.get(&id).copied(), Some(2.0));
    }

    #[test]
    fn figures_and_prometheus_text() {
        let u = Usage::default();
        let id = InstanceId::new();
        let c = u.instance(id, "m/x");
        c.request();
        c.request();
        c.error();
        c.tokens(Tokens {
            prompt: 3,
            completion: 5,
        });
        // Same subject, same counters.
        u.instance(id, "m/x").request();
        let k = u.key(ApiKeyId::new(), "ci \"bot\"");
        k.request();
        let f = u.figures();
        assert_eq!(f.instances.len(), 1);
        assert_eq!(
            f.instances[0].counts,
            UsageCounts {
                requests: 3,
                errors: 1,
                prompt_tokens: 3,
                completion_tokens: 5,
                ..Default::default()
            }
        );
        let text = f.render_prometheus();
        assert!(text.contains(&format!(
            "gpufleet_router_instance_requests_total{{instance_id=\"{id}\",model=\"m/x\"}} 3"
        )));
        assert!(text.contains("# TYPE gpufleet_router_key_errors_total counter"));
        assert!(text.contains("api_key_name=\"ci \\\"bot\\\"\"} 1"));
    }
}
