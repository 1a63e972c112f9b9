//! `gpufleet up`: the control plane, the HTTP API and the Mock provider in one
//! process.
//!
//! Start-up order: data dir → admin token → store → Mock provider → listener
//! (so port 0 works and the agents' control URL is known) → fleet and its
//! reconcilers → API. Shutdown (SIGINT/SIGTERM) runs the other way: stop
//! accepting, stop the reconcilers after the activation in hand, shut the Mock
//! provider's supervisor down (its machines keep running and are re-adopted by
//! the next `up`), flush the usage counters, stop the heartbeat writer (what
//! is queued is written, staged samples moved), close the store.

use crate::cloud;
use crate::config::{UpConfig, UpOverrides};
use crate::signals;
use crate::token;
use anyhow::Context;
use gpufleet_control::ControlPlane;
use gpufleet_providers::mock::MockProvider;
use gpufleet_providers::ProviderRegistry;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Arguments of `gpufleet up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Data directory (database, admin token, mock machines) [default: ./.gpufleet or $GPUFLEET_DATA_DIR].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080 or $GPUFLEET_LISTEN]; port 0 picks one.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Database URL [default: sqlite://<data-dir>/gpufleet.db?mode=rwc or $GPUFLEET_DATABASE_URL].
    #[arg(long)]
    pub database: Option<String>,
    /// TOML config file (see gpufleet.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The address cloud machines reach this control plane at, e.g.
    /// https://fleet.example.com [default: $GPUFLEET_PUBLIC_URL]. With
    /// https://, `up` serves TLS there (see [tls] in gpufleet.example.toml).
    #[arg(long)]
    pub public_url: Option<String>,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let flags = UpOverrides {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        database_url: args.database.clone(),
        public_url: args.public_url.clone(),
    };
    let mut config = UpConfig::load(args.config.as_deref(), |k| std::env::var(k).ok(), &flags)?;

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    config.data_dir = config.data_dir.canonicalize().with_context(|| {
        format!(
            "cannot resolve data directory {}",
            config.data_dir.display()
        )
    })?;

    let token_path = config.admin_token_path();
    let (admin_token, token_source) =
        token::resolve(std::env::var("GPUFLEET_ADMIN_TOKEN").ok(), &token_path)?;

    let db_url = config.database_url();
    // SQLite serves one replica: a second `up` on the same file is refused
    // (several replicas need PostgreSQL).
    let _sqlite_lock = match gpufleet_store::Store::sqlite_file(&db_url) {
        Some(file) => Some(crate::replica_lock::lock_sqlite(&file)?),
        None => None,
    };
    let store = gpufleet_store::Store::connect(&db_url)
        .await
        .with_context(|| format!("cannot open the database {}", redact_url(&db_url)))?;

    let mut providers = ProviderRegistry::new();
    let mock = if config.mock.url.is_empty() {
        let agent_program = std::env::current_exe().context("cannot find this program's path")?;
        let mock_config = config
            .mock
            .to_mock_config(config.data_dir.join("mock"), agent_program);
        let mock = MockProvider::open(mock_config).with_context(|| {
            format!(
                "cannot open the Mock provider in {}; to run several replicas, run \
                 `gpufleet mock-provider` once and set [mock] url in each replica's config",
                config.data_dir.join("mock").display()
            )
        })?;
        providers.register(mock.clone());
        Some(mock)
    } else {
        let remote = gpufleet_providers::remote::RemoteProvider::connect(&config.mock.url)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the Mock provider service at {} ([mock] url); start it with \
                     `gpufleet mock-provider`",
                    config.mock.url
                )
            })?;
        providers.register(std::sync::Arc::new(remote));
        None
    };
    let agent_binary = cloud::register(&config, &mut providers).await?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    if config.control.agent_control_url.is_empty() {
        config.control.agent_control_url = format!("http://{}", reachable(addr));
    }

    config.control.engine.secret_env = engine_secrets(&config.control.engine.hf_token_file)?;
    let public_tls = config
        .tls
        .resolve(&config.public_url, &config.data_dir)
        .context("cannot set up TLS for the public URL")?;
    config.control.public_url = config.public_url.clone();
    config.control.public_ca_pem = public_tls.as_ref().and_then(|t| t.pin_pem.clone());
    // The router's client identity: engines of machines off this host serve
    // mutual TLS and accept it alone (with their agent's).
    let (client_cert, client_key) = crate::tls::router_client_identity(&config.data_dir)
        .context("cannot set up the router's client identity for engines")?;
    config.control.engine_client_ca_pem = Some(client_cert.clone());

    let control = ControlPlane::build(store.clone(), providers, config.control.clone())
        .await
        .context("cannot start the control plane")?;
    let cancel = CancellationToken::new();
    control
        .follow_replicas(cancel.child_token())
        .await
        .context("cannot listen for the other replicas' changes")?;
    let reconcilers = control.start(cancel.child_token());
    let openai = gpufleet_router::RouterState::start(
        control.fleet.clone(),
        &control.catalogs,
        config.router.clone(),
        Some(gpufleet_router::EngineClientIdentity {
            cert_pem: client_cert,
            key_pem: client_key,
        }),
        cancel.child_token(),
    )
    .await
    .context("cannot start the OpenAI-compatible router")?;
    // Keys of models without configured token prices are charged the
    // model's measured cost per million tokens (its GPUs' spend over the
    // tokens they served, trailing 24 h).
    tokio::spawn(measured_token_prices(
        control.spend.clone(),
        openai.token_prices().clone(),
        cancel.child_token(),
    ));

    let router_metrics = openai.clone();
    let router = gpufleet_api::router({
        let state = gpufleet_api::ApiState::new(&control, admin_token)
            .with_extra_metrics(std::sync::Arc::new(move || {
                router_metrics.render_prometheus()
            }))
            .with_sign_in(
                std::time::Duration::from_secs(config.auth.session_ttl_hours * 3600),
                config.auth.password_sign_in,
                config.public_url.starts_with("https://"),
                config.auth.oidc.clone(),
            )
            .with_metrics_token(
                config
                    .auth
                    .metrics_token
                    .as_ref()
                    .map(|t| t.expose().to_string()),
            );
        match agent_binary {
            Some(binary) => state.with_agent_binary(binary),
            None => state,
        }
    })
    .merge(gpufleet_console::router());
    // The OpenAI-compatible endpoint: /v1/models, /v1/chat/completions, /v1/completions.
    let router = router.merge(gpufleet_router::router(openai.clone()));
    // Completions skip routing and the API's layers (tracing, metrics):
    // the proxy's own per-request work is all they need.
    let first = std::sync::Arc::new(HotPath(openai.clone()));
    let tls_server = match public_tls.as_ref().filter(|t| t.serves()) {
        Some(tls) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let stop = cancel.clone();
            let handle =
                crate::tls::serve(tls, router.clone(), async move { stop.cancelled().await })
                    .await?;
            tracing::info!(listen = %tls.listen, public_url = %config.public_url, pinned = tls.pin_pem.is_some(), "HTTPS listener for the public URL");
            Some(handle)
        }
        None => None,
    };
    let server_stop = cancel.clone();
    let mut server = tokio::spawn(async move {
        gpufleet_api::serve_with(listener, router, Some(first), async move {
            server_stop.cancelled().await
        })
        .await
    });

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "gpufleet listening on http://{addr}")?;
        writeln!(out, "admin token {token_source}")?;
        out.flush()?;
    }
    tracing::info!(%addr, data_dir = %config.data_dir.display(), database = %redact_url(&db_url),
        replica = control.replica_name(),
        agent_control_url = %config.control.agent_control_url, "gpufleet up");

    let early_exit = tokio::select! {
        sig = signals::shutdown_signal() => {
            tracing::info!(signal = sig, "shutting down");
            None
        }
        res = &mut server => Some(res),
    };
    cancel.cancel();

    let deadline = Duration::from_secs(config.shutdown_timeout_secs.max(1));
    let shutdown = async {
        let server_result = match early_exit {
            Some(res) => res,
            None => server.await,
        };
        let _ = reconcilers.await;
        if let Some(tls_server) = tls_server {
            let _ = tls_server.await;
        }
        if let Some(mock) = &mock {
            mock.shutdown().await;
        }
        if let Err(e) = openai.flush_usage().await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "last usage flush failed"
            );
        }
        control.agents.stop_ingest().await;
        store.close().await;
        server_result
    };
    match tokio::time::timeout(deadline, shutdown).await {
        Ok(Ok(Ok(()))) => {
            tracing::info!(
                "stopped; mock machines keep running and are re-adopted by the next `gpufleet up`"
            );
            Ok(())
        }
        Ok(Ok(Err(e))) => Err(anyhow::Error::new(e).context("the HTTP server failed")),
        Ok(Err(join)) => Err(anyhow::anyhow!("the HTTP server task panicked: {join}")),
        Err(_) => {
            tracing::warn!(
                deadline_secs = deadline.as_secs(),
                "shutdown took too long; exiting anyway"
            );
            Ok(())
        }
    }
}

/// The engines' secret environment: `HF_TOKEN` from the environment, else
/// from `hf_token_file`. Only the name is ever logged.
fn engine_secrets(hf_token_file: &str) -> anyhow::Result<gpufleet_control::SecretEnv> {
    let token = match std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
    {
        Some(t) => Some(t),
        None if !hf_token_file.is_empty() => Some(
            std::fs::read_to_string(hf_token_file)
                .with_context(|| format!("cannot read hf_token_file {hf_token_file}"))?,
        ),
        None => None,
    };
    let mut env = std::collections::BTreeMap::new();
    if let Some(t) = token
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
    {
        tracing::info!("engines receive HF_TOKEN over their agents' authenticated channel");
        env.insert("HF_TOKEN".to_string(), t);
    }
    Ok(gpufleet_control::SecretEnv(env))
}

/// An address agents can connect to: the unspecified address becomes loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// The URL without a password, for logs.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The OpenAI proxy's completions, ahead of the API's routing and layers.
struct HotPath(gpufleet_router::RouterState);

impl gpufleet_api::FirstHandler for HotPath {
    fn takes(&self, req: &axum::extract::Request) -> bool {
        self.0.hot_path_takes(req)
    }

    fn call(&self, req: axum::extract::Request) -> gpufleet_api::BoxedResponse {
        self.0.hot_path(req)
    }
}

/// How often the measured token prices are read again.
const MEASURED_PRICES_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Install each model's measured cost per million tokens (trailing 24 h)
/// as the router's fallback token price, every [`MEASURED_PRICES_EVERY`].
async fn measured_token_prices(
    spend: gpufleet_control::spend::Spend,
    prices: std::sync::Arc<gpufleet_router::TokenPrices>,
    stop: CancellationToken,
) {
    let mut known: std::collections::BTreeSet<String> = Default::default();
    let mut tick = tokio::time::interval(MEASURED_PRICES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match spend
            .model_costs(chrono::Duration::hours(24), chrono::Utc::now())
            .await
        {
            Ok(costs) => install_measured_prices(&prices, &mut known, &costs),
            Err(e) => tracing::warn!(
                error = &e as &dyn std::error::Error,
                "cannot measure the models' cost per million tokens; keeping the last"
            ),
        }
    }
}

/// Install one measurement: each measured model's cost per million tokens
/// becomes its fallback price; a model in `known` (measured last time) and
/// not measured now loses its fallback. `known` becomes the models measured.
fn install_measured_prices(
    prices: &gpufleet_router::TokenPrices,
    known: &mut std::collections::BTreeSet<String>,
    costs: &std::collections::BTreeMap<gpufleet_domain::ModelName, f64>,
) {
    let now: std::collections::BTreeSet<String> = costs.keys().map(|m| m.to_string()).collect();
    for gone in known.difference(&now) {
        prices.set_fallback(gone, None);
    }
    for (model, per_million) in costs {
        prices.set_fallback(model.as_str(), Some(*per_million));
    }
    *known = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_prices_are_installed_then_withdrawn() {
        use gpufleet_router::usage::Tokens;
        let prices = gpufleet_router::TokenPrices::default();
        let mut known = Default::default();
        let million = Tokens {
            prompt: 400_000,
            completion: 600_000,
        };
        let model = |m: &str| m.parse::<gpufleet_domain::ModelName>().unwrap();
        let costs = [(model("org/a"), 2.0), (model("org/b"), 0.5)].into();
        install_measured_prices(&prices, &mut known, &costs);
        assert_eq!(prices.cost("org/a", million), 2.0);
        assert_eq!(prices.cost("org/b", million), 0.5);
        // b served no tokens in the window: its measured price goes.
        let costs = [(model("org/a"), 3.0)].into();
        install_measured_prices(&prices, &mut known, &costs);
        assert_eq!(prices.cost("org/a", million), 3.0);
        assert_eq!(prices.cost("org/b", million), 0.0);
        assert_eq!(known.len(), 1);
    }

    #[test]
    fn agents_reach_an_unspecified_listener_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:80".parse().unwrap()).to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(
            reachable("127.0.0.2:80".parse().unwrap()).to_string(),
            "127.0.0.2:80"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("sqlite:///x.db"), "sqlite:///x.db");
    }
}
