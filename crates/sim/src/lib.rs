//! `gpufleet sim`: a GPU-less inference engine that speaks enough of vLLM's
//! HTTP surface for gpufleet to treat it as the real thing.
//!
//! - `GET /health`: 503 until the model is "loaded" (`--model-load-delay-ms`), then 200.
//! - `GET /v1/models`: the served model, in OpenAI's list shape (once loaded).
//! - `GET /metrics`: Prometheus text with vLLM's metric names, labelled `model_name`.
//! - `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI-compatible,
//!   non-streaming and streaming (SSE ending with `data: [DONE]`), generating
//!   words at the configured time-to-first-token and inter-token latency, with
//!   at most `--max-num-seqs` requests running and the rest waiting.
//!
//! The binary calls [`run`]; tests use [`SimServer::bind`] on port 0 and read
//! [`SimServer::local_addr`].

mod error;
mod handlers;
mod metrics;
mod openai;
mod scheduler;
mod state;
mod text;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
        let state = Arc::new(SimState::new(&args));
        Ok(Self { listener, state })
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
            load_delay_ms = state.load_delay.as_millis() as u64,
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
        let server = axum::serve(self.listener, handlers::router(state)).with_graceful_shutdown(
            async move {
                let _ = graceful_rx.wait_for(|stop| *stop).await;
            },
        );
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
        tokio::time::sleep_until(state.ready_at).await;
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
