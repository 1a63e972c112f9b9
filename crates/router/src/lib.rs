//! gpufleet's OpenAI-compatible router.
//!
//! `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`,
//! authenticated with API keys (`Authorization: Bearer gfk_...`), sent to a
//! `ready` instance serving the requested model.
//!
//! - **Backends** live in memory ([`pool`]): listed from the [`Fleet`] at
//!   start, then kept current from its change stream. A `draining` instance
//!   leaves the pool at once; its requests in flight go on, and the router
//!   tells the terminator how many are left ([`TrafficSource`]).
//! - **Choice** ([`Policy`]): latency-aware power of two choices (peak
//!   EWMA of time to first token, with the age of requests still waiting
//!   for one, times requests in flight; [`latency`]) by default; least
//!   outstanding, round robin, or consistent hashing of `X-Session-ID` /
//!   `user`. An instance owed its half-open probe gets it.
//! - **Streams** (`stream`): nothing reaches the client before the first
//!   token, so a stall before it (past a bound from the instance's own
//!   figures) is retried elsewhere and opens the instance's circuit; hedging
//!   per model; a stream that breaks off mid-way is continued on another
//!   instance and spliced in. Non-streaming requests are asked of the engine
//!   as streams and put back together when that is faithful (one choice, no
//!   tools or log-probabilities) and another instance could take over, so
//!   they get the same; the others pass through whole, with connect and
//!   first-byte timeouts.
//! - **Failures**: another instance is tried after a connection failure, a
//!   stall, or a 5xx/429 that came before any byte reached the client; a
//!   per-instance circuit breaker ([`breaker`]). Every stall, ejection,
//!   hedge and failover is counted per instance and written on its timeline.
//!   A client that goes away drops the upstream request, which cancels it in
//!   the engine.
//! - **Projects**: a key reaches only the instances of its own project
//!   (pools by project and model); `/v1/models` lists its project's models.
//! - **Limits** per key ([`limits`]): requests and tokens per minute and a
//!   monthly budget, refused with 429 in OpenAI's shape; `x-ratelimit-*`
//!   headers on every answer to a limited key.
//! - **Usage** per instance, per key and per (hour, key, instance) with its
//!   charge ([`usage`], [`TokenPrices`]), flushed to the store and rendered
//!   for Prometheus. Engines are asked for the usage in every chunk
//!   (`continuous_usage_stats`), so a stream its client leaves is counted
//!   with what was generated.

pub mod breaker;
pub mod config;
mod error;
mod hold;
mod keys;
pub mod latency;
pub mod limits;
pub mod pool;
mod proxy;
mod scan;
mod stream;
pub mod tls;
mod upstream;
pub mod usage;

pub use config::{Policy, RouterConfig};
pub use error::RouterError;
pub use tls::EngineClientIdentity;
pub use usage::{SubjectUsage, TokenPrices, UsageFigures};

use axum::routing::{get, post};
use gpufleet_control::{Catalogs, Fleet, TrafficSource};
use gpufleet_domain::InstanceId;
use gpufleet_store::InstanceFilter;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// The router's state. Cheap to clone.
#[derive(Clone)]
pub struct RouterState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub fleet: Fleet,
    pub config: RouterConfig,
    pub pools: Arc<pool::Pools>,
    pub keys: keys::KeyCache,
    pub usage: Arc<usage::Usage>,
    pub limits: Arc<limits::Limits>,
    /// Upstream connections (keep-alive, per instance).
    pub upstream: Arc<upstream::UpstreamConns>,
    /// Requests held for models with no ready replica yet ([`hold`]).
    pub holding: hold::Holding,
    /// The month's charges before the recent hours, for budgets.
    pub closed_charges: std::sync::Mutex<limits::ClosedCharges>,
}

impl Inner {
    fn closed_charges(&self) -> std::sync::MutexGuard<'_, limits::ClosedCharges> {
        limits::locked(&self.closed_charges)
    }
}

/// Requests in flight per instance, for draining.
struct Traffic(Arc<pool::Pools>);

impl TrafficSource for Traffic {
    fn in_flight(&self, id: InstanceId) -> u64 {
        self.0.in_flight(id)
    }
}

impl RouterState {
    /// Load the instances, follow the fleet's changes, flush usage
    /// periodically (and once more when `shutdown` is cancelled), and make
    /// draining wait for this router's requests in flight. Engines of
    /// machines off this host are reached over mutual TLS with
    /// `engine_identity` (without it, they are not routed to).
    pub async fn start(
        fleet: Fleet,
        catalogs: &Catalogs,
        config: RouterConfig,
        engine_identity: Option<EngineClientIdentity>,
        shutdown: CancellationToken,
    ) -> Result<RouterState, RouterError> {
        let usage = Arc::new(usage::Usage::with_prices(Arc::new(
            TokenPrices::from_models(catalogs.models()),
        )));
        let limits = Arc::new(limits::Limits::default());
        // Providers are fixed for the process's life.
        let remote: std::collections::HashSet<_> = catalogs
            .provider_names()
            .into_iter()
            .filter(|p| catalogs.provider_is_remote(p))
            .collect();
        let pools = Arc::new(pool::Pools::with_tls(
            &config,
            fleet.config().engine.port,
            usage.clone(),
            engine_identity,
            Box::new(move |p| remote.contains(p)),
        ));
        // Subscribe before listing, so no change falls between the two.
        let changes = fleet.subscribe();
        pools.reset(&fleet.list_instances(&all_live()).await?);
        let state = RouterState {
            inner: Arc::new(Inner {
                keys: keys::KeyCache::new(
                    fleet.store().clone(),
                    config.api_key_cache_ttl(),
                    usage.clone(),
                    limits.clone(),
                ),
                fleet: fleet.clone(),
                config,
                pools: pools.clone(),
                usage,
                limits,
                upstream: Arc::default(),
                holding: hold::Holding::default(),
                closed_charges: Default::default(),
            }),
        };
        fleet.set_traffic_source(Arc::new(Traffic(pools)));
        tokio::spawn(follow(state.clone(), changes, shutdown.clone()));
        tokio::spawn(follow_keys(
            state.clone(),
            fleet.subscribe_keys(),
            shutdown.clone(),
        ));
        if state.inner.fleet.store().backend() == gpufleet_store::Backend::Postgres {
            // Other replicas may share the database: limits count their usage.
            let replica = format!("{}:{:016x}", std::process::id(), rand::random::<u64>());
            tokio::spawn(share_rates_periodically(
                state.clone(),
                replica,
                shutdown.clone(),
            ));
        }
        tokio::spawn(flush_usage_periodically(state.clone(), shutdown));
        Ok(state)
    }

    pub fn config(&self) -> &RouterConfig {
        &self.inner.config
    }

    /// What keys are charged per token of each model; install measured
    /// prices with [`TokenPrices::set_fallback`].
    pub fn token_prices(&self) -> &Arc<TokenPrices> {
        self.inner.usage.prices()
    }

    /// Usage counted since this process started, per instance and per key.
    pub fn usage(&self) -> UsageFigures {
        self.inner.usage.figures()
    }

    /// Prometheus text of the router: the usage counters of [`Self::usage`],
    /// plus `gpufleet_router_in_flight` and `gpufleet_router_circuit_open`
    /// per live instance. For the control plane's `/metrics`.
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut out = self.usage().render_prometheus();
        let mut backends = self.inner.pools.backends();
        backends.sort_by_key(|(b, _)| b.id);
        let _ = writeln!(out, "# HELP gpufleet_router_in_flight Requests in flight through the router (per instance).");
        let _ = writeln!(out, "# TYPE gpufleet_router_in_flight gauge");
        for (b, _) in &backends {
            let _ = writeln!(
                out,
                "gpufleet_router_in_flight{{instance_id=\"{}\",model=\"{}\"}} {}",
                b.id,
                b.model,
                b.in_flight.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP gpufleet_router_circuit_open 1 while the instance's circuit breaker keeps requests away.");
        let _ = writeln!(out, "# TYPE gpufleet_router_circuit_open gauge");
        for (b, _) in &backends {
            let open = !matches!(b.breaker.phase(), breaker::Phase::Closed);
            let _ = writeln!(
                out,
                "gpufleet_router_circuit_open{{instance_id=\"{}\",model=\"{}\"}} {}",
                b.id,
                b.model,
                u8::from(open)
            );
        }
        out
    }

    /// Requests in flight to an instance through this router.
    pub fn in_flight(&self, id: InstanceId) -> u64 {
        self.inner.pools.in_flight(id)
    }

    /// Add the usage counted since the last flush to the database.
    /// Models that got requests move their deployments' `demand_at`
    /// forward (what scale to zero measures idleness by). Then the keys'
    /// charges this month are read back (every replica's), for budgets.
    pub async fn flush_usage(&self) -> Result<(), RouterError> {
        let inner = &self.inner;
        let store = inner.fleet.store();
        let flushed = inner.usage.flush(store).await?;
        inner.limits.flushed(flushed.key_costs);
        let now = chrono::Utc::now();
        for (project, model) in flushed.models {
            store
                .note_project_model_demand(&project, &model, now)
                .await?;
        }
        if inner.limits.wants_charges() {
            let month = limits::month_start(now);
            let split = limits::recent_from(now);
            if inner.closed_charges().stale(split, Instant::now()) {
                let closed = if split > month {
                    store.key_charges_between(month, Some(split)).await?
                } else {
                    Default::default()
                };
                inner.closed_charges().set(split, closed, Instant::now());
            }
            let recent = store.key_charges_between(split, None).await?;
            let charges = inner.closed_charges().with_recent(recent);
            inner.limits.refreshed(month, charges);
        }
        Ok(())
    }
}

impl RouterState {
    /// Write this replica's share of its limited keys' trailing-minute
    /// usage (what changed) as `replica`, and read the other replicas'.
    pub async fn share_rates(&self, replica: &str) -> Result<(), RouterError> {
        let inner = &self.inner;
        let store = inner.fleet.store();
        let now = limits::now_ms();
        let shares = inner.limits.shares_to_write(now);
        if !shares.is_empty() {
            store.put_rate_shares(replica, &shares).await?;
            inner.limits.shares_written(&shares, now);
        }
        let others = store.other_rate_shares(replica).await?;
        inner.limits.set_others(others);
        Ok(())
    }
}

async fn share_rates_periodically(
    state: RouterState,
    replica: String,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(state.inner.config.rate_share_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = state.share_rates(&replica).await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "sharing rate-limit counts with the other replicas failed; retrying at the next tick"
            );
        }
    }
}

fn all_live() -> InstanceFilter {
    InstanceFilter {
        statuses: vec![],
        include_archived: false,
        provider: None,
        projects: None,
        limit: None,
    }
}

/// Keep the pools current from the fleet's changes; re-list after missing some.
/// Forget cached API keys as they are revoked, on any replica.
async fn follow_keys(
    state: RouterState,
    mut changes: tokio::sync::broadcast::Receiver<gpufleet_control::KeyChange>,
    shutdown: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            () = shutdown.cancelled() => return,
            c = changes.recv() => c,
        };
        match change {
            Ok(c) => state.inner.keys.forget(&c),
            Err(RecvError::Lagged(_)) => state.inner.keys.forget(&gpufleet_control::KeyChange::All),
            Err(RecvError::Closed) => return,
        }
    }
}

async fn follow(
    state: RouterState,
    mut changes: tokio::sync::broadcast::Receiver<gpufleet_control::InstanceChange>,
    shutdown: CancellationToken,
) {
    let pools = &state.inner.pools;
    loop {
        let change = tokio::select! {
            () = shutdown.cancelled() => return,
            c = changes.recv() => c,
        };
        match change {
            Ok(c) => {
                if pools.apply(&c.instance) {
                    tracing::debug!(instance_id = %c.instance.id, status = %c.instance.status, "router backends changed");
                    forget_gone_hosts(&state);
                }
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "router missed instance changes; re-listing");
                match state.inner.fleet.list_instances(&all_live()).await {
                    Ok(list) => {
                        pools.reset(&list);
                        forget_gone_hosts(&state);
                    }
                    Err(e) => tracing::warn!(error = %e, "router could not re-list instances"),
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Close the idle stream connections of instances no longer routed to.
fn forget_gone_hosts(state: &RouterState) {
    let live: std::collections::HashSet<String> = state
        .inner
        .pools
        .backends()
        .into_iter()
        .filter(|(b, _)| b.authority.is_some())
        .map(|(b, _)| b.conn_key.clone())
        .collect();
    state
        .inner
        .upstream
        .retain_hosts(&|host| live.contains(host));
}

async fn flush_usage_periodically(state: RouterState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(state.inner.config.usage_flush_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            () = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        if let Err(e) = state.flush_usage().await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "usage flush failed; retrying at the next one"
            );
        }
        if last {
            return;
        }
    }
}

impl RouterState {
    /// Whether [`Self::hot_path`] answers `req`: `POST /v1/chat/completions`
    /// and `POST /v1/completions`.
    pub fn hot_path_takes(&self, req: &axum::extract::Request) -> bool {
        req.method() == axum::http::Method::POST
            && matches!(
                req.uri().path(),
                proxy::CHAT_COMPLETIONS | proxy::COMPLETIONS
            )
    }

    /// Answer a request [`Self::hot_path_takes`] straight from the proxy,
    /// without routing or layers: the same handlers as [`router`]'s, which
    /// still serves these routes where no hot path is installed.
    pub fn hot_path(
        &self,
        req: axum::extract::Request,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = axum::response::Response> + Send>> {
        let state = axum::extract::State(self.clone());
        if req.uri().path() == proxy::COMPLETIONS {
            Box::pin(proxy::completions(state, req))
        } else {
            Box::pin(proxy::chat_completions(state, req))
        }
    }
}

/// The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions`,
/// `POST /v1/completions`.
pub fn router(state: RouterState) -> axum::Router {
    axum::Router::new()
        .route("/v1/models", get(proxy::models))
        .route(proxy::CHAT_COMPLETIONS, post(proxy::chat_completions))
        .route(proxy::COMPLETIONS, post(proxy::completions))
        .with_state(state)
}
