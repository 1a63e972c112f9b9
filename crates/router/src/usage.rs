//! Usage accounting per instance and per API key: requests, errors, prompt
//! and completion tokens. Counted in memory on the request path (atomics),
//! added to the database's running totals every `usage_flush_interval_ms`,
//! and rendered for Prometheus ([`UsageFigures::render_prometheus`]).

use gpufleet_domain::InstanceId;
use gpufleet_store::{ApiKeyId, Store, StoreError, UsageCounts, UsageDelta, UsageScope};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// Every subject's counters.
#[derive(Default)]
pub struct Usage {
    instances: Mutex<HashMap<InstanceId, Subject>>,
    keys: Mutex<HashMap<ApiKeyId, Subject>>,
    /// One flush at a time, so no delta is added twice.
    flushing: tokio::sync::Mutex<()>,
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

    /// Add what was counted since the last flush to the database's totals.
    /// Returns the models whose instances got requests since the last one.
    pub async fn flush(&self, store: &Store) -> Result<Vec<String>, StoreError> {
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
        let _one = self.flushing.lock().await;
        let inst = deltas(&self.instances, UsageScope::Instance);
        let keys = deltas(&self.keys, UsageScope::Key);
        let all: Vec<UsageDelta> = inst
            .iter()
            .map(|x| x.2.clone())
            .chain(keys.iter().map(|x| x.2.clone()))
            .collect();
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let mut models: Vec<String> = {
            let m = self.instances.lock().unwrap_or_else(|p| p.into_inner());
            inst.iter()
                .filter(|(_, _, d)| d.counts.requests > 0)
                .filter_map(|(k, _, _)| m.get(k).map(|s| s.label.clone()))
                .collect()
        };
        models.sort();
        models.dedup();
        store.add_usage(&all, chrono::Utc::now()).await?;
        mark(&self.instances, inst);
        mark(&self.keys, keys);
        Ok(models)
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
