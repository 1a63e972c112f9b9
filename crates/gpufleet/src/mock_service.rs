//! `gpufleet mock-provider`: the Mock provider as a service of its own, so
//! that several control-plane replicas (each `up` with `[mock] url = ...`)
//! share one set of Mock machines. It serves the routes of
//! `gpufleet_providers::remote` over the Mock provider of
//! `<data_dir>/mock`, the same machines `up` would run itself.

use crate::config::{UpConfig, UpOverrides};
use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gpufleet_domain::ProviderInstanceId;
use gpufleet_providers::mock::MockProvider;
use gpufleet_providers::remote::wire;
use gpufleet_providers::{CreateRequest, Provider, ProviderError, Resource};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct MockProviderArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7600")]
    pub listen: SocketAddr,
    /// Data directory; machines live in `<data-dir>/mock` [default: ./.gpufleet or $GPUFLEET_DATA_DIR].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A gpufleet TOML file; its `[mock]` section sets the IP pool and delays.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

type Shared = Arc<MockProvider>;

pub async fn run(args: MockProviderArgs) -> anyhow::Result<()> {
    let flags = UpOverrides {
        listen: None,
        data_dir: args.data_dir.clone(),
        database_url: None,
        public_url: None,
    };
    let config = UpConfig::load(args.config.as_deref(), |k| std::env::var(k).ok(), &flags)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let data_dir = config.data_dir.canonicalize()?;
    let agent_program = std::env::current_exe().context("cannot find this program's path")?;
    let mock = MockProvider::open(
        config
            .mock
            .to_mock_config(data_dir.join("mock"), agent_program),
    )
    .context("cannot open the Mock provider")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "gpufleet mock-provider listening on http://{addr}")?;
        out.flush()?;
    }
    tracing::info!(%addr, data_dir = %data_dir.display(), "mock provider service up");
    let app = router(mock.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            crate::signals::shutdown_signal().await;
        })
        .await?;
    mock.shutdown().await;
    tracing::info!("stopped; mock machines keep running and are re-adopted at the next start");
    Ok(())
}

fn router(mock: Shared) -> Router {
    Router::new()
        .route("/provider/v1/info", get(info))
        .route("/provider/v1/catalog", get(catalog))
        .route("/provider/v1/machines", post(create))
        .route("/provider/v1/machines/search", post(list))
        .route(
            "/provider/v1/machines/{id}",
            get(get_machine).delete(terminate),
        )
        .route("/provider/v1/resources/search", post(list_resources))
        .route("/provider/v1/resources/delete", post(delete_resource))
        .with_state(mock)
}

struct Failure(ProviderError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(wire::WireError::status(&self.0))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(wire::WireError::from(&self.0))).into_response()
    }
}

type Answer<T> = Result<Json<T>, Failure>;

async fn info(State(m): State<Shared>) -> Json<wire::Info> {
    Json(wire::Info {
        name: m.name().to_string(),
        machines_on_this_host: m.machines_on_this_host(),
        engine: m.engine(),
    })
}

async fn catalog(State(m): State<Shared>) -> Answer<gpufleet_providers::Catalog> {
    m.catalog().await.map(Json).map_err(Failure)
}

async fn create(
    State(m): State<Shared>,
    Json(req): Json<CreateRequest>,
) -> Answer<gpufleet_providers::Machine> {
    m.create(&req).await.map(Json).map_err(Failure)
}

async fn get_machine(
    State(m): State<Shared>,
    Path(id): Path<String>,
) -> Answer<gpufleet_providers::Machine> {
    m.get(&ProviderInstanceId::new(id))
        .await
        .map(Json)
        .map_err(Failure)
}

async fn terminate(State(m): State<Shared>, Path(id): Path<String>) -> Result<StatusCode, Failure> {
    m.terminate(&ProviderInstanceId::new(id))
        .await
        .map(|()| StatusCode::NO_CONTENT)
        .map_err(Failure)
}

async fn list(
    State(m): State<Shared>,
    Json(s): Json<wire::Search>,
) -> Answer<Vec<gpufleet_providers::Machine>> {
    m.list(&s.tags).await.map(Json).map_err(Failure)
}

async fn list_resources(
    State(m): State<Shared>,
    Json(s): Json<wire::Search>,
) -> Answer<Vec<Resource>> {
    m.list_resources(&s.tags).await.map(Json).map_err(Failure)
}

async fn delete_resource(
    State(m): State<Shared>,
    Json(r): Json<Resource>,
) -> Result<StatusCode, Failure> {
    m.delete_resource(&r)
        .await
        .map(|()| StatusCode::NO_CONTENT)
        .map_err(Failure)
}
