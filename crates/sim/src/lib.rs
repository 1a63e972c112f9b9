//! `gpufleet sim`: a GPU-less inference engine that speaks enough of vLLM's
//! HTTP surface for gpufleet to treat it as the real thing.
//!
//! - `GET /health`: 503 until the model is "loaded" (`--model-load-delay-ms`), then 200.
//! - `GET /v1/models`: the served model, in OpenAI's list shape (once loaded).
//! - `GET /metrics`: Prometheus text with vLLM's metric names, labelled `model_name`.
//! - `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI-compatible,
//!   non-streaming and streaming (SSE ending with `data: [DONE]`), generating
//!   words at the configured time-to-first-token and inter-token latency, with
//!   at most `--max-num-seqs` requests running and at most `--max-waiting`
//!   waiting (beyond: 429). Latencies are normal around their mean (with a
//!   standard deviation) and grow with the load (`--load-factor`); text is
//!   random words or the prompt echoed (`--mode`); a share of requests can
//!   fail on purpose (`--failure-rate`, `--failure-kinds`: `server_error`
//!   500, `rate_limit` 429, `stall`).
//! - `GET /admin/config`, `PATCH /admin/config`: read and change every knob
//!   while the simulator runs (see [`knobs::Knobs`]).
//!
//! The binary calls [`run`]; tests use [`SimServer::bind`] on port 0 and read
//! [`SimServer::local_addr`].

mod admin;
mod error;
mod handlers;
mod hist;
pub mod knobs;
mod metrics;
mod openai;
mod scheduler;
mod state;
mod text;
mod tls;

use std::future::Future;
use std::future::IntoFuture;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::state::SimState;

/// Arguments of `gpufleet sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// IP address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// TCP port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name of the served model, as clients must spell it in requests.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// Time the model takes to "load"; `/health` answers 503 until then.
    #[arg(long, default_value_t = 0)]
    pub model_load_delay_ms: u64,
    /// Time to first token of each request, once it runs.
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Time between two generated tokens.
    #[arg(long, default_value_t = 5)]
    pub itl_ms: u64,
    /// Requests generating at once; further requests wait for a free slot.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
    /// Seed of the generated text, so runs are reproducible.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Standard deviation of the time to first token.
    #[arg(long, default_value_t = 0)]
    pub ttft_stddev_ms: u64,
    /// Standard deviation of the inter-token latency.
    #[arg(long, default_value_t = 0)]
    pub itl_stddev_ms: u64,
    /// Latencies grow with load: × (1 + factor × running / max-num-seqs).
    #[arg(long, default_value_t = 1.0)]
    pub load_factor: f64,
    /// Requests that may wait for a slot; beyond, 429.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: u32,
    /// Share of requests (0–1) that fail with one of --failure-kinds.
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Kinds of injected failures (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "server_error,rate_limit"
    )]
    pub failure_kinds: Vec<knobs::FailureKind>,
    /// How long a `stall` failure holds a request.
    #[arg(long, default_value_t = 30_000)]
    pub stall_ms: u64,
    /// Generated text: random words, or the prompt echoed back.
    #[arg(long, value_enum, default_value = "random")]
    pub mode: knobs::TextMode,
    /// Tokens generated when a request sets no `max_tokens`.
    #[arg(long, default_value_t = openai::DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: u32,
    /// Serve HTTPS with this PEM private key (as vLLM's `--ssl-keyfile`).
    #[arg(long)]
    pub ssl_keyfile: Option<PathBuf>,
    /// PEM certificate chain served with `--ssl-keyfile`.
    #[arg(long)]
    pub ssl_certfile: Option<PathBuf>,
    /// PEM certificates client certificates are checked against.
    #[arg(long)]
    pub ssl_ca_certs: Option<PathBuf>,
    /// Client certificates, as Python's `ssl`: 0 none, 1 optional (checked
    /// when given), 2 required.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub ssl_cert_reqs: u8,
}

impl SimArgs {
    /// Defaults as on the command line, for a given model, on 127.0.0.1:0.
    pub fn for_tests(model: impl Into<String>) -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            model: model.into(),
            model_load_delay_ms: 0,
            ttft_ms: 0,
            itl_ms: 5,
            max_num_seqs: 256,
            seed: 0,
            ttft_stddev_ms: 0,
            itl_stddev_ms: 0,
            load_factor: 1.0,
            max_waiting: 1024,
            failure_rate: 0.0,
            failure_kinds: vec![
                knobs::FailureKind::ServerError,
                knobs::FailureKind::RateLimit,
            ],
            stall_ms: 30_000,
            mode: knobs::TextMode::Random,
            default_max_tokens: openai::DEFAULT_MAX_TOKENS,
            ssl_keyfile: None,
            ssl_certfile: None,
            ssl_ca_certs: None,
            ssl_cert_reqs: 0,
        }
    }

    /// The run-time knobs these arguments start with.
    pub fn knobs(&self) -> knobs::Knobs {
        knobs::Knobs {
            ttft_ms: self.ttft_ms as f64,
            ttft_stddev_ms: self.ttft_stddev_ms as f64,
            itl_ms: self.itl_ms as f64,
            itl_stddev_ms: self.itl_stddev_ms as f64,
            load_factor: self.load_factor,
            max_num_seqs: self.max_num_seqs.max(1),
            max_waiting: self.max_waiting,
            failure_rate: self.failure_rate,
            failure_kinds: self.failure_kinds.clone(),
            stall_ms: self.stall_ms,
            mode: self.mode,
            default_max_tokens: self.default_max_tokens,
            model_load_delay_ms: self.model_load_delay_ms,
        }
    }
}

/// Why the simulator could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid argument: {0}")]
    InvalidArgs(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// How long in-flight requests may go on after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A bound, not yet serving simulator.
pub struct SimServer {
    listener: TcpListener,
    state: Arc<SimState>,
    /// HTTPS (`--ssl-*`); `None`: plain HTTP.
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl SimServer {
    /// Validates the arguments and binds the listener. The model starts
    /// "loading" now.
    pub async fn bind(args: SimArgs) -> Result<Self, SimError> {
        if args.model.trim().is_empty() {
            return Err(SimError::InvalidArgs("--model must not be empty".into()));
        }
        let addr = SocketAddr::new(args.host, args.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Bind { addr, source })?;
        args.knobs()
            .validate()
            .map_err(|e| SimError::InvalidArgs(e.to_string()))?;
        let tls = tls::server_config(&args)?;
        let state = Arc::new(SimState::new(&args));
        Ok(Self {
            listener,
            state,
            tls,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TCP listener always has a local address; fall back to
        // the unspecified one rather than panic.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish
    /// for a short grace period.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), SimError> {
        let addr = self.local_addr();
        let state = self.state.clone();
        tracing::info!(
            %addr,
            model = %state.model,
            load_delay_ms = state.knobs().model_load_delay_ms,
            max_num_seqs = state.scheduler.max_num_seqs(),
            "simulator listening"
        );
        spawn_load_announcement(state.clone());

        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut graceful_rx = stop_rx.clone();
        let graceful = async move {
            let _ = graceful_rx.wait_for(|stop| *stop).await;
        };
        let server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
            match self.tls {
                Some(config) => {
                    let listener = tls::TlsListener::new(self.listener, config);
                    Box::pin(
                        axum::serve(listener, handlers::router(state))
                            .with_graceful_shutdown(graceful)
                            .into_future(),
                    )
                }
                None => {
                    // No Nagle delay on the many small writes of a stream.
                    let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    Box::pin(
                        axum::serve(listener, handlers::router(state))
                            .with_graceful_shutdown(graceful)
                            .into_future(),
                    )
                }
            };
        let deadline = async move {
            if stop_rx.wait_for(|stop| *stop).await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                futures::future::pending::<()>().await;
            }
        };
        tokio::select! {
            res = server => res.map_err(SimError::Serve)?,
            () = deadline => tracing::warn!("in-flight requests still running after the shutdown grace period; dropping them"),
        }
        tracing::info!(%addr, "simulator stopped");
        Ok(())
    }
}

fn spawn_load_announcement(state: Arc<SimState>) {
    tokio::spawn(async move {
        tokio::time::sleep_until(state.ready_at()).await;
        tracing::info!(model = %state.model, "model loaded; ready to serve");
    });
}

/// Runs the simulator until `shutdown` completes.
pub async fn run(
    args: SimArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SimError> {
    SimServer::bind(args).await?.serve(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimArgs,
    }

    #[test]
    fn command_line_defaults_parse_and_match_the_test_defaults() {
        let cli = <Cli as clap::Parser>::try_parse_from(["sim"]).expect("defaults parse");
        assert_eq!(cli.args.knobs(), SimArgs::for_tests("x").knobs());
        let cli = <Cli as clap::Parser>::try_parse_from([
            "sim",
            "--failure-kinds",
            "stall,rate_limit",
            "--mode",
            "echo",
            "--failure-rate",
            "0.5",
        ])
        .expect("knobs parse");
        let k = cli.args.knobs();
        assert_eq!(
            k.failure_kinds,
            vec![knobs::FailureKind::Stall, knobs::FailureKind::RateLimit]
        );
        assert_eq!(k.mode, knobs::TextMode::Echo);
        k.validate().expect("valid");
    }
}
