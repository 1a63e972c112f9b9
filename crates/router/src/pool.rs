//! The instances requests may go to, kept in memory: filled from
//! `Fleet::list_instances` at start and kept current from the fleet's change
//! stream (no database read per request), plus the choice of one instance per
//! request under the configured [`Policy`].

use crate::breaker::Breaker;
use crate::config::{Policy, RouterConfig};
use crate::latency::{now_us, Latency, RecentTtft};
use crate::tls::{EngineClientIdentity, UpstreamTls};
use crate::usage::{Counters, Usage};
use gpufleet_domain::{DeploymentId, InstanceId, InstanceStatus, ProjectId, ProviderName};
use gpufleet_store::InstanceRecord;
use hyper::http::uri::Authority;
use hyper::http::HeaderValue;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Points per instance on the hash ring: enough for an even spread over a
/// handful of instances, few enough to rebuild the ring on every change.
const VNODES: u64 = 64;

/// One instance's engine.
#[derive(Debug)]
pub struct Backend {
    pub id: InstanceId,
    pub model: String,
    /// The project that owns the instance: only its keys reach it.
    pub project: ProjectId,
    /// The deployment it is a replica of, if any.
    pub deployment: Option<DeploymentId>,
    /// `http://<ip>:<engine port>`
    pub base_url: String,
    /// `<ip>:<engine port>`, for request URIs.
    pub authority: Option<Authority>,
    pub in_flight: AtomicU64,
    pub breaker: Breaker,
    /// Time to first token, time between tokens, requests waiting.
    pub latency: Latency,
    pub usage: Arc<Counters>,
    /// `id`, ready for the `x-gpufleet-instance` response header.
    pub id_header: HeaderValue,
    /// `authority`, ready for the upstream `Host` header.
    pub host_header: Option<HeaderValue>,
    /// Mutual TLS to this engine (a cloud instance's); `None`: plain HTTP.
    pub tls: Option<UpstreamTls>,
    /// Key of this engine's idle connections: `authority` for plain ones,
    /// `tls://<authority>` for TLS ones (never mixed).
    pub conn_key: String,
    /// The engine certificate `tls` was made for.
    engine_cert_pem: Option<String>,
    /// When a routing event of each kind was last written on this
    /// instance's timeline (µs since the epoch), to write at most one a second.
    noted: [AtomicU64; 5],
}

impl Backend {
    pub fn new(
        id: InstanceId,
        model: &str,
        base_url: String,
        authority: Option<Authority>,
        breaker: Breaker,
        usage: Arc<Counters>,
    ) -> Self {
        let id_header =
            HeaderValue::from_str(&id.to_string()).expect("an instance id is a valid header value");
        let host_header = authority
            .as_ref()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let conn_key = authority
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_default();
        Self {
            id,
            model: model.to_string(),
            project: ProjectId::default_project(),
            deployment: None,
            base_url,
            authority,
            in_flight: AtomicU64::new(0),
            breaker,
            latency: Latency::default(),
            usage,
            id_header,
            host_header,
            tls: None,
            conn_key,
            engine_cert_pem: None,
            noted: Default::default(),
        }
    }

    /// Whether a routing event of kind `kind` may be written now (and
    /// take the slot).
    pub fn may_note(&self, kind: usize, now_us: u64) -> bool {
        let Some(slot) = self.noted.get(kind) else {
            return false;
        };
        let last = slot.load(Ordering::Relaxed);
        (last == 0 || now_us.saturating_sub(last) >= 1_000_000)
            && slot
                .compare_exchange(last, now_us.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Reach this engine over mutual TLS (`tls` made for `engine_cert_pem`).
    pub fn with_tls(mut self, tls: UpstreamTls, engine_cert_pem: String) -> Self {
        self.conn_key = format!("tls://{}", self.conn_key);
        self.tls = Some(tls);
        self.engine_cert_pem = Some(engine_cert_pem);
        self
    }
}

/// Requests in flight to one backend; decremented on drop, whatever happens
/// to the request (finished, failed, client gone).
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn new(b: Arc<Backend>) -> Self {
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(b)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A streamed request waiting for its first token on a backend; leaves
/// the backend's count when the token comes ([`Waiting::end`]) or the
/// request is dropped.
pub struct Waiting {
    backend: Arc<Backend>,
    since: u64,
    done: bool,
}

impl Waiting {
    pub fn new(backend: Arc<Backend>) -> Self {
        let since = now_us();
        backend.latency.begin_wait(since);
        Self {
            backend,
            since,
            done: false,
        }
    }

    pub fn end(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            self.backend.latency.end_wait(self.since);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.end();
    }
}

/// The ready instances of one model, with their hash ring.
#[derive(Debug, Default)]
pub struct ModelPool {
    pub backends: Vec<Arc<Backend>>,
    /// (point, index in `backends`), sorted by point.
    ring: Vec<(u64, usize)>,
}

impl ModelPool {
    pub fn new(mut backends: Vec<Arc<Backend>>) -> Self {
        backends.sort_by_key(|b| b.id);
        let mut ring = Vec::with_capacity(backends.len() * VNODES as usize);
        for (i, b) in backends.iter().enumerate() {
            let id = b.id.to_string();
            for v in 0..VNODES {
                ring.push((hash_parts(id.as_bytes(), v), i));
            }
        }
        ring.sort_unstable();
        Self { backends, ring }
    }

    /// Choose a backend not in `exclude` whose circuit lets a request
    /// through, and take that right. `None`: no candidate left.
    pub fn pick(
        &self,
        policy: Policy,
        session: Option<&str>,
        exclude: &[InstanceId],
        rr: &AtomicUsize,
        now: Instant,
    ) -> Option<Arc<Backend>> {
        let mut tried: Vec<InstanceId> = Vec::new();
        loop {
            let ok = |b: &Arc<Backend>| {
                !exclude.contains(&b.id) && !tried.contains(&b.id) && b.breaker.available(now)
            };
            let chosen = match (policy, session) {
                (Policy::SessionAffinity, Some(key)) => self.by_hash(key, ok),
                (Policy::RoundRobin, _) => {
                    let c: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| ok(b)).collect();
                    (!c.is_empty()).then(|| c[rr.fetch_add(1, Ordering::Relaxed) % c.len()].clone())
                }
                (Policy::LeastOutstanding, _) => {
                    let c: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| ok(b)).collect();
                    two_choices(&c, |b| b.in_flight.load(Ordering::Relaxed) as f64)
                }
                _ => {
                    let c: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| ok(b)).collect();
                    // An instance owed its half-open probe gets it: the
                    // latency-aware choice alone would never try again an
                    // instance whose last figures were bad.
                    match c.iter().find(|b| b.breaker.probe_due(now)) {
                        Some(b) if c.len() > 1 => Some((*b).clone()),
                        _ => {
                            let t = now_us();
                            two_choices(&c, |b| {
                                b.latency.cost(b.in_flight.load(Ordering::Relaxed), t)
                            })
                        }
                    }
                }
            }?;
            if chosen.breaker.acquire(now) {
                return Some(chosen);
            }
            // Lost a race for the half-open probe: try another.
            tried.push(chosen.id);
        }
    }

    /// The first acceptable backend clockwise from the key's point.
    fn by_hash(&self, key: &str, ok: impl Fn(&Arc<Backend>) -> bool) -> Option<Arc<Backend>> {
        if self.ring.is_empty() {
            return None;
        }
        let h = hash_parts(key.as_bytes(), u64::MAX);
        let start = self.ring.partition_point(|(p, _)| *p < h);
        let n = self.ring.len();
        let mut seen = vec![false; self.backends.len()];
        for k in 0..n {
            let (_, i) = self.ring[(start + k) % n];
            if seen[i] {
                continue;
            }
            seen[i] = true;
            if ok(&self.backends[i]) {
                return Some(self.backends[i].clone());
            }
        }
        None
    }
}

/// Of two random candidates, the one of lower `cost`.
fn two_choices(c: &[&Arc<Backend>], cost: impl Fn(&Backend) -> f64) -> Option<Arc<Backend>> {
    match c.len() {
        0 => None,
        1 => Some(c[0].clone()),
        n => {
            let i = rand::random_range(0..n);
            let mut j = rand::random_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (c[i], c[j]);
            Some(if cost(b) < cost(a) {
                b.clone()
            } else {
                a.clone()
            })
        }
    }
}

/// FNV-1a over `bytes` and `salt`, then a SplitMix64 finaliser: stable across
/// processes and versions (unlike std's randomly keyed hasher).
pub fn hash_parts(bytes: &[u8], salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes.iter().copied().chain(salt.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// What the router knows of one live instance.
struct Known {
    backend: Arc<Backend>,
    status: InstanceStatus,
    generation: i64,
}

/// Per project, per model (looked up by `&str` twice, no allocation).
type ByProject<T> = HashMap<String, HashMap<String, T>>;

/// Routable instances by project and model (a snapshot swapped on change),
/// and every live instance for in-flight counts.
pub struct Pools {
    table: RwLock<Arc<ByProject<Arc<ModelPool>>>>,
    known: Mutex<HashMap<InstanceId, Known>>,
    /// Models with instances on their way up (for "none ready yet" errors).
    starting: RwLock<Arc<ByProject<usize>>>,
    /// Recent times to first token per hedged model.
    recent: Mutex<HashMap<String, Arc<RecentTtft>>>,
    /// Notified whenever the routable instances change.
    pub changed: tokio::sync::Notify,
    pub rr: AtomicUsize,
    engine_port: u16,
    breaker_threshold: u32,
    breaker_cooldown: std::time::Duration,
    ewma_decay: std::time::Duration,
    usage: Arc<Usage>,
    /// The router's client identity for engines over mutual TLS.
    identity: Option<EngineClientIdentity>,
    /// Whether a provider's machines are off this host (their engines must
    /// be reached over mutual TLS, never in clear).
    remote: Box<dyn Fn(&ProviderName) -> bool + Send + Sync>,
}

fn is_gone(s: InstanceStatus) -> bool {
    matches!(
        s,
        InstanceStatus::Terminated | InstanceStatus::Archived | InstanceStatus::Failed
    )
}

impl Pools {
    pub fn new(config: &RouterConfig, engine_port: u16, usage: Arc<Usage>) -> Self {
        Self::with_tls(config, engine_port, usage, None, Box::new(|_| false))
    }

    /// Like [`Self::new`], reaching engines that report a certificate over
    /// mutual TLS with `identity`; instances of providers `remote` says are
    /// off this host are not routed to without such a certificate.
    pub fn with_tls(
        config: &RouterConfig,
        engine_port: u16,
        usage: Arc<Usage>,
        identity: Option<EngineClientIdentity>,
        remote: Box<dyn Fn(&ProviderName) -> bool + Send + Sync>,
    ) -> Self {
        Self {
            table: RwLock::new(Arc::new(HashMap::new())),
            known: Mutex::new(HashMap::new()),
            starting: RwLock::new(Arc::new(HashMap::new())),
            recent: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
            rr: AtomicUsize::new(0),
            engine_port,
            breaker_threshold: config.breaker_failure_threshold,
            breaker_cooldown: config.breaker_cooldown(),
            ewma_decay: std::time::Duration::from_millis(config.ewma_decay_ms.max(1)),
            usage,
            identity,
            remote,
        }
    }

    /// The recent times to first token of `model`'s instances.
    pub fn recent_ttft(&self, model: &str) -> Arc<RecentTtft> {
        let mut m = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = m.get(model) {
            return r.clone();
        }
        m.entry(model.to_string()).or_default().clone()
    }

    /// The ready instances of `project` serving `model`.
    pub fn model(&self, project: &str, model: &str) -> Option<Arc<ModelPool>> {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(project)
            .and_then(|m| m.get(model))
            .cloned()
    }

    /// Models of `project` with at least one ready instance, sorted.
    pub fn models(&self, project: &str) -> Vec<String> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut v: Vec<String> = t
            .get(project)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Instances of `project` serving `model` not ready yet (provisioning
    /// .. starting, unhealthy).
    pub fn starting(&self, project: &str, model: &str) -> usize {
        self.starting
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(project)
            .and_then(|m| m.get(model))
            .copied()
            .unwrap_or(0)
    }

    pub fn in_flight(&self, id: InstanceId) -> u64 {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|k| k.backend.in_flight.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Every live instance's backend (for figures).
    pub fn backends(&self) -> Vec<(Arc<Backend>, InstanceStatus)> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|k| (k.backend.clone(), k.status))
            .collect()
    }

    /// Take in one instance as stored; older generations than already seen
    /// are ignored. Returns whether anything changed.
    pub fn apply(&self, rec: &InstanceRecord) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let changed = self.apply_locked(&mut known, rec);
        if changed {
            self.rebuild(&known);
        }
        changed
    }

    /// Replace everything with `list` (start, or after missing changes).
    pub fn reset(&self, list: &[InstanceRecord]) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let listed: std::collections::HashSet<InstanceId> = list.iter().map(|r| r.id).collect();
        known.retain(|id, _| listed.contains(id));
        for rec in list {
            self.apply_locked(&mut known, rec);
        }
        self.rebuild(&known);
    }

    fn apply_locked(&self, known: &mut HashMap<InstanceId, Known>, rec: &InstanceRecord) -> bool {
        if let Some(k) = known.get(&rec.id) {
            if rec.generation < k.generation {
                return false;
            }
        }
        if is_gone(rec.status) {
            return known.remove(&rec.id).is_some();
        }
        // An engine off this host is reached over mutual TLS only: without
        // its certificate (not reported yet) or without the router's
        // identity, it gets no address, so it is never routed to.
        let routable = match &rec.engine_cert_pem {
            Some(_) => self.identity.is_some(),
            None => !(self.remote)(&rec.provider),
        };
        let scheme = if rec.engine_cert_pem.is_some() {
            "https"
        } else {
            "http"
        };
        let base_url = rec
            .ip
            .filter(|_| routable)
            .map(|ip| format!("{scheme}://{}", SocketAddr::new(ip, self.engine_port)))
            .unwrap_or_default();
        let model = rec.model.as_str();
        match known.get_mut(&rec.id) {
            Some(k)
                if k.backend.base_url == base_url
                    && k.backend.model == model
                    && k.backend.project == rec.project_id
                    && k.backend.deployment == rec.deployment_id
                    && k.backend.engine_cert_pem == rec.engine_cert_pem =>
            {
                let changed = k.status != rec.status;
                k.status = rec.status;
                k.generation = rec.generation;
                changed
            }
            _ => {
                // The TLS client of this engine, made once per backend.
                let tls = match (&rec.engine_cert_pem, &self.identity) {
                    (Some(cert), Some(identity)) => {
                        match crate::tls::client_config(cert, identity) {
                            Ok(t) => Some((t, cert.clone())),
                            Err(e) => {
                                tracing::warn!(instance_id = %rec.id, error = %e, "engine TLS certificate unusable; not routing to it");
                                None
                            }
                        }
                    }
                    (Some(_), None) => {
                        tracing::warn!(instance_id = %rec.id, "engine serves TLS but the router has no client identity; not routing to it");
                        None
                    }
                    (None, _) => {
                        if rec.ip.is_some() && !routable {
                            tracing::debug!(instance_id = %rec.id, "engine off this host without a TLS certificate yet; not routing to it");
                        }
                        None
                    }
                };
                let routable = routable && (rec.engine_cert_pem.is_none() || tls.is_some());
                let base_url = if routable { base_url } else { String::new() };
                let authority = rec.ip.filter(|_| routable).and_then(|ip| {
                    SocketAddr::new(ip, self.engine_port)
                        .to_string()
                        .parse()
                        .ok()
                });
                let mut backend = Backend::new(
                    rec.id,
                    model,
                    base_url,
                    authority,
                    Breaker::new(self.breaker_threshold, self.breaker_cooldown),
                    self.usage.instance(rec.id, model),
                );
                backend.latency = Latency::new(self.ewma_decay);
                backend.project = rec.project_id.clone();
                backend.deployment = rec.deployment_id;
                if let Some((t, cert)) = tls {
                    backend = backend.with_tls(t, cert);
                }
                let backend = Arc::new(backend);
                known.insert(
                    rec.id,
                    Known {
                        backend,
                        status: rec.status,
                        generation: rec.generation,
                    },
                );
                true
            }
        }
    }

    fn rebuild(&self, known: &HashMap<InstanceId, Known>) {
        let mut by_model: ByProject<Vec<Arc<Backend>>> = HashMap::new();
        let mut starting: ByProject<usize> = HashMap::new();
        for k in known.values() {
            let b = &k.backend;
            if k.status == InstanceStatus::Ready && !b.base_url.is_empty() {
                by_model
                    .entry(b.project.to_string())
                    .or_default()
                    .entry(b.model.clone())
                    .or_default()
                    .push(b.clone());
            } else if !matches!(
                k.status,
                InstanceStatus::Draining | InstanceStatus::Terminating
            ) {
                *starting
                    .entry(b.project.to_string())
                    .or_default()
                    .entry(b.model.clone())
                    .or_default() += 1;
            }
        }
        let table: ByProject<Arc<ModelPool>> = by_model
            .into_iter()
            .map(|(p, models)| {
                let models = models
                    .into_iter()
                    .map(|(m, b)| (m, Arc::new(ModelPool::new(b))))
                    .collect();
                (p, models)
            })
            .collect();
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        *self.starting.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(starting);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn backend(n: u128) -> Arc<Backend> {
        Arc::new(Backend::new(
            InstanceId::from_uuid(uuid::Uuid::from_u128(n)),
            "m",
            format!("http://127.0.0.{n}:8000"),
            format!("127.0.0.{n}:8000").parse().ok(),
            Breaker::new(1, Duration::from_secs(60)),
            Arc::new(Counters::default()),
        ))
    }

    fn pool(n: u128) -> ModelPool {
        ModelPool::new((1..=n).map(backend).collect())
    }

    const STABLE_HASH: u64 = 1_266_339_298_380_122_106;

    #[test]
    fn hashing_is_stable() {
        // Fixed values: a change here moves every session to another instance.
        assert_eq!(hash_parts(b"", 0), hash_parts(b"", 0));
        assert_eq!(hash_parts(b"session-1", u64::MAX), STABLE_HASH);
        assert_ne!(hash_parts(b"a", 0), hash_parts(b"b", 0));
        assert_ne!(hash_parts(b"a", 0), hash_parts(b"a", 1));
    }

    #[test]
    fn round_robin_visits_each_in_turn() {
        let p = pool(3);
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        let picks: Vec<InstanceId> = (0..6)
            .map(|_| p.pick(Policy::RoundRobin, None, &[], &rr, now).unwrap().id)
            .collect();
        assert_eq!(picks[0..3], picks[3..6]);
        let mut first: Vec<_> = picks[0..3].to_vec();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 3);
    }

    #[test]
    fn two_choices_prefers_the_less_loaded() {
        let p = pool(2);
        p.backends[0].in_flight.store(10, Ordering::Relaxed);
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        for _ in 0..50 {
            let b = p
                .pick(Policy::LeastOutstanding, None, &[], &rr, now)
                .unwrap();
            assert_eq!(b.id, p.backends[1].id);
        }
        // With many backends, the most loaded one is never picked.
        let p = pool(8);
        p.backends[3].in_flight.store(100, Ordering::Relaxed);
        for _ in 0..200 {
            let b = p
                .pick(Policy::LeastOutstanding, None, &[], &rr, now)
                .unwrap();
            assert_ne!(b.id, p.backends[3].id);
        }
    }

    #[test]
    fn peak_ewma_avoids_slow_and_stalled_instances_and_probes_ejected_ones() {
        let p = pool(3);
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        let t = now_us();
        for b in &p.backends {
            b.latency.ttft.observe(20_000.0, t, 10e6);
        }
        // One got a slow first token: it loses its share at once.
        p.backends[0].latency.ttft.observe(2_000_000.0, t, 10e6);
        // Another is loaded, though less than 100 × slower (the age of
        // waiting requests counts like the average: see the latency tests).
        p.backends[1].in_flight.store(50, Ordering::Relaxed);
        for _ in 0..100 {
            let b = p.pick(Policy::PeakEwma, None, &[], &rr, now).unwrap();
            assert_ne!(b.id, p.backends[0].id, "the slow one is never chosen");
        }
        // Equal figures: load decides, like least outstanding.
        p.backends[1].in_flight.store(0, Ordering::Relaxed);
        p.backends[0].latency.ttft.reset(20_000.0, t);
        p.backends[2].in_flight.store(5, Ordering::Relaxed);
        for _ in 0..100 {
            let b = p.pick(Policy::PeakEwma, None, &[], &rr, now).unwrap();
            assert_ne!(b.id, p.backends[2].id);
        }
        // An ejected instance whose cool-down has passed gets the probe,
        // however bad its figures.
        let b0 = &p.backends[0];
        assert!(b0.breaker.trip(now));
        b0.latency.ttft.observe(9_000_000.0, t, 10e6);
        let later = now + Duration::from_secs(61);
        let probe = p.pick(Policy::PeakEwma, None, &[], &rr, later).unwrap();
        assert_eq!(probe.id, b0.id);
        let next = p.pick(Policy::PeakEwma, None, &[], &rr, later).unwrap();
        assert_ne!(next.id, b0.id, "one probe at a time");
    }

    #[test]
    fn exclusions_and_open_circuits_are_skipped() {
        let p = pool(3);
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        p.backends[0].breaker.failure(now); // threshold 1: open
        let ex = [p.backends[1].id];
        for policy in [
            Policy::PeakEwma,
            Policy::LeastOutstanding,
            Policy::RoundRobin,
            Policy::SessionAffinity,
        ] {
            for s in 0..20 {
                let key = format!("s{s}");
                let b = p.pick(policy, Some(&key), &ex, &rr, now).unwrap();
                assert_eq!(b.id, p.backends[2].id, "{policy:?}");
            }
        }
        let all = [p.backends[1].id, p.backends[2].id];
        assert!(p
            .pick(Policy::LeastOutstanding, None, &all, &rr, now)
            .is_none());
    }

    #[test]
    fn affinity_is_sticky_and_moves_little_when_an_instance_leaves() {
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        let p4 = pool(4);
        let keys: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
        let before: Vec<InstanceId> = keys
            .iter()
            .map(|k| {
                p4.pick(Policy::SessionAffinity, Some(k), &[], &rr, now)
                    .unwrap()
                    .id
            })
            .collect();
        // Sticky: the same answer every time.
        for (k, want) in keys.iter().zip(&before) {
            let got = p4
                .pick(Policy::SessionAffinity, Some(k), &[], &rr, now)
                .unwrap();
            assert_eq!(got.id, *want);
        }
        // Spread: every instance gets a fair share.
        for b in &p4.backends {
            let n = before.iter().filter(|id| **id == b.id).count();
            assert!(
                (40..=180).contains(&n),
                "{n} of 400 keys on one of 4 instances"
            );
        }
        // Remove one: only its keys move.
        let p3 = ModelPool::new(p4.backends[..3].to_vec());
        let gone = p4.backends[3].id;
        for (k, was) in keys.iter().zip(&before) {
            let now_on = p3
                .pick(Policy::SessionAffinity, Some(k), &[], &rr, now)
                .unwrap()
                .id;
            if *was != gone {
                assert_eq!(now_on, *was, "key {k} moved although its instance stayed");
            }
        }
    }

    fn record(n: u128, provider: &str, cert: Option<String>) -> InstanceRecord {
        let now = chrono::Utc::now();
        InstanceRecord {
            id: InstanceId::from_uuid(uuid::Uuid::from_u128(n)),
            provider: provider.parse().unwrap(),
            zone: "z".into(),
            instance_type: "t".into(),
            model: "org/m".parse().unwrap(),
            status: InstanceStatus::Ready,
            status_reason: None,
            status_message: None,
            milestones: Default::default(),
            idempotency_key: "k".into(),
            provider_instance_id: None,
            ip: Some(format!("127.0.0.{n}").parse().unwrap()),
            generation: 1,
            provision_attempts: 0,
            next_attempt_at: None,
            startup_deadline_at: now,
            created_at: now,
            updated_at: now,
            status_changed_at: now,
            ready_at: Some(now),
            terminate_requested_at: None,
            terminated_at: None,
            cleanup_started_at: None,
            cleaned_up_at: None,
            last_heartbeat_seq: None,
            last_heartbeat_at: None,
            engine_status: None,
            engine_cert_pem: cert,
            deployment_id: None,
            engine_args: None,
            project_id: gpufleet_domain::ProjectId::default_project(),
            price_per_hour: None,
            billing_started_at: None,
            billing_ended_at: None,
        }
    }

    fn routed(p: &Pools) -> Vec<(InstanceId, String, bool)> {
        let mut v: Vec<_> = p
            .model("default", "org/m")
            .map(|m| {
                m.backends
                    .iter()
                    .map(|b| (b.id, b.conn_key.clone(), b.tls.is_some()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn a_project_reaches_its_own_instances_only() {
        let pools = Pools::new(&RouterConfig::default(), 8000, Arc::default());
        let mut a = record(1, "mock", None);
        a.project_id = "research".parse().unwrap();
        let b = record(2, "mock", None);
        let mut c = record(3, "mock", None);
        c.project_id = "research".parse().unwrap();
        c.status = InstanceStatus::Starting;
        pools.reset(&[a.clone(), b.clone(), c]);
        let ids = |p: &str| {
            pools
                .model(p, "org/m")
                .map(|m| m.backends.iter().map(|b| b.id).collect::<Vec<_>>())
        };
        assert_eq!(ids("research"), Some(vec![a.id]));
        assert_eq!(ids("default"), Some(vec![b.id]));
        assert_eq!(ids("other"), None);
        assert_eq!(pools.models("research"), vec!["org/m".to_string()]);
        assert!(pools.models("other").is_empty());
        assert_eq!(
            (
                pools.starting("research", "org/m"),
                pools.starting("default", "org/m")
            ),
            (1, 0)
        );
        // Moved to another project (a new generation): it follows.
        let mut moved = b;
        moved.generation += 1;
        moved.project_id = "research".parse().unwrap();
        assert!(pools.apply(&moved));
        assert_eq!(ids("default"), None);
        assert_eq!(ids("research").map(|v| v.len()), Some(2));
    }

    #[test]
    fn remote_engines_are_routed_to_over_tls_only() {
        let engine = rcgen::generate_simple_self_signed(vec!["gpufleet-engine".into()]).unwrap();
        let router = rcgen::generate_simple_self_signed(vec!["r".into()]).unwrap();
        let identity = EngineClientIdentity {
            cert_pem: router.cert.pem(),
            key_pem: router.signing_key.serialize_pem(),
        };
        let remote: Box<dyn Fn(&ProviderName) -> bool + Send + Sync> =
            Box::new(|p| p.as_str() == "scaleway");
        let pools = Pools::with_tls(
            &RouterConfig::default(),
            8000,
            Arc::new(Usage::default()),
            Some(identity),
            remote,
        );
        let local = record(1, "mock", None);
        let waiting = record(2, "scaleway", None);
        let mut with_cert = record(3, "scaleway", Some(engine.cert.pem()));
        pools.reset(&[local.clone(), waiting.clone(), with_cert.clone()]);
        let (l, r) = (local.id, with_cert.id);
        assert_eq!(
            routed(&pools),
            vec![
                (l, "127.0.0.1:8000".to_string(), false),
                (r, "tls://127.0.0.3:8000".to_string(), true),
            ],
            "a remote engine without its certificate is not routed to"
        );
        assert_eq!(pools.starting("default", "org/m"), 1);
        // Once its certificate is known, it is.
        let mut w = waiting.clone();
        w.generation = 2;
        w.engine_cert_pem = Some(engine.cert.pem());
        assert!(pools.apply(&w));
        assert_eq!(routed(&pools).len(), 3);
        // A new certificate (agent restarted) makes a new backend.
        let before = pools.model("default", "org/m").unwrap().backends[2].clone();
        let other = rcgen::generate_simple_self_signed(vec!["gpufleet-engine".into()]).unwrap();
        with_cert.generation = 2;
        with_cert.engine_cert_pem = Some(other.cert.pem());
        assert!(pools.apply(&with_cert));
        let after = pools.model("default", "org/m").unwrap().backends[2].clone();
        assert_eq!(after.id, before.id);
        assert!(!Arc::ptr_eq(&after, &before));

        // Without a client identity, engines with a certificate are skipped.
        let bare = Pools::with_tls(
            &RouterConfig::default(),
            8000,
            Arc::new(Usage::default()),
            None,
            Box::new(|_| false),
        );
        bare.reset(&[local, with_cert]);
        assert_eq!(
            routed(&bare),
            vec![(l, "127.0.0.1:8000".to_string(), false)]
        );
    }
}
