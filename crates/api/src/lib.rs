//! gpufleet's HTTP edge: the only crate that knows HTTP and the public JSON
//! shapes ([`views`]).
//!
//! Handlers are thin: parse and validate the request (names, ids, ranges),
//! call the [`Fleet`], convert the result to a view. Every failure is an
//! [`ApiError`] rendered as `{"error": {"code", "message", "field"?}}`.
//!
//! Routes:
//! - `/healthz` (no auth), `/readyz` (no auth: the database answers)
//! - `/metrics` (no auth, like a node exporter): Prometheus text format
//! - `/api/v1/...` (admin bearer token): instances, deployments, catalog, models, the SSE
//!   stream, task statuses, spend, the OpenAPI document
//! - `/internal/v1/agent/...` (agent bootstrap secret, then agent token)

pub mod accounts;
mod agent;
pub mod api_keys;
pub mod audit;
pub mod auth;
mod catalog;
mod deployments;
pub mod downloads;
mod error;
mod events;
mod extract;
mod instances;
mod observability;
pub mod oidc;
pub mod oidc_routes;
mod openapi;
pub mod spend;
mod system;
pub mod views;

pub use error::ApiError;
pub use extract::{AGENT_BODY_LIMIT_BYTES, BODY_LIMIT_BYTES};
pub use openapi::ApiDoc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{middleware, Extension, Router};
use gpufleet_control::{AgentService, Catalogs, ControlPlane, Fleet, History, Tasks};
use gpufleet_proto::paths;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

/// What the handlers need.
pub struct ApiState {
    /// Commands on instances.
    pub fleet: Fleet,
    /// Commands on deployments.
    pub deployments: gpufleet_control::Deployments,
    /// The agent routes' service.
    pub agents: AgentService,
    pub catalogs: Catalogs,
    pub history: History,
    /// Spend reports.
    pub spend: gpufleet_control::Spend,
    /// The reconcilers' statuses.
    pub tasks: Tasks,
    pub telemetry: Arc<gpufleet_control::telemetry::Telemetry>,
    /// The token `/api/` callers present as `Authorization: Bearer <token>`.
    /// An empty token admits nobody.
    pub admin_token: String,
    /// Users, projects, roles, sessions, tokens, the audit log.
    pub accounts: gpufleet_control::Accounts,
    /// Session cookies carry `Secure` (the public URL is https).
    pub secure_cookies: bool,
    /// Whether users may sign in with a password.
    pub password_sign_in: bool,
    /// Single sign-on, when configured.
    pub sso: Option<std::sync::Arc<oidc_routes::Sso>>,
    /// More metric families for `/metrics` in the Prometheus text format
    /// (e.g. the OpenAI router's usage), appended to the control plane's own.
    pub extra_metrics: Option<ExtraMetrics>,
    /// The agent binary cloud machines download (`GET /downloads/gpufleet`).
    pub agent_binary: Option<downloads::AgentBinary>,
    /// When set, `/metrics` answers only `Authorization: Bearer` with this
    /// token (or the admin token); open otherwise.
    pub metrics_token: Option<String>,
}

/// A source of extra `/metrics` text (Prometheus text format 0.0.4).
pub type ExtraMetrics = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

impl ApiState {
    /// Whether `sent` is the admin token (an empty one admits nobody).
    /// Digests are compared, so not even the token's length shows in the
    /// timing.
    pub fn is_admin_token(&self, sent: &str) -> bool {
        use gpufleet_control::secrets::{constant_time_eq, digest};
        !self.admin_token.is_empty() && constant_time_eq(&digest(sent), &digest(&self.admin_token))
    }

    pub fn new(control: &ControlPlane, admin_token: impl Into<String>) -> Self {
        Self {
            fleet: control.fleet.clone(),
            deployments: control.deployments.clone(),
            agents: control.agents.clone(),
            catalogs: control.catalogs.clone(),
            history: control.history.clone(),
            spend: control.spend.clone(),
            tasks: control.tasks.clone(),
            telemetry: control.telemetry.clone(),
            admin_token: admin_token.into(),
            accounts: control.accounts.clone(),
            secure_cookies: false,
            password_sign_in: true,
            sso: None,
            extra_metrics: None,
            agent_binary: None,
            metrics_token: None,
        }
    }

    /// Serve `binary` at `GET /downloads/gpufleet`.
    pub fn with_agent_binary(mut self, binary: downloads::AgentBinary) -> Self {
        self.agent_binary = Some(binary);
        self
    }

    /// How users sign in: session length, passwords on or off, `Secure`
    /// cookies (an https public URL), single sign-on.
    pub fn with_sign_in(
        mut self,
        session_ttl: std::time::Duration,
        password_sign_in: bool,
        secure_cookies: bool,
        oidc: Option<oidc::OidcConfig>,
    ) -> Self {
        self.accounts = self.accounts.with_session_ttl(session_ttl);
        self.password_sign_in = password_sign_in;
        self.secure_cookies = secure_cookies;
        self.sso = oidc.map(|c| {
            let http = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .unwrap_or_default();
            oidc_routes::Sso::new(c, http)
        });
        self
    }

    /// Require `token` (or the admin token) of `/metrics` scrapers; `None`
    /// leaves it open.
    pub fn with_metrics_token(mut self, token: Option<String>) -> Self {
        self.metrics_token = token.filter(|t| !t.is_empty());
        self
    }

    /// Append `source`'s families to `/metrics` (text format only).
    pub fn with_extra_metrics(mut self, source: ExtraMetrics) -> Self {
        self.extra_metrics = Some(source);
        self
    }
}

pub(crate) type SharedState = Arc<ApiState>;

/// Cancelled when the server begins shutting down, so that endless responses
/// (SSE streams) end and graceful shutdown can complete. Set by [`serve`].
#[derive(Clone)]
pub(crate) struct StreamsShutdown(pub CancellationToken);

/// The whole HTTP surface.
pub fn router(state: ApiState) -> Router {
    let state: SharedState = Arc::new(state);

    let api = Router::new()
        .route("/instances", post(instances::create).get(instances::list))
        .route(
            "/instances/{id}",
            get(instances::get).delete(instances::terminate),
        )
        .route("/instances/{id}/archive", post(instances::archive))
        .route("/instances/{id}/events", get(instances::timeline))
        .route("/instances/{id}/metrics", get(instances::metrics))
        .route(
            "/deployments",
            post(deployments::create).get(deployments::list),
        )
        .route(
            "/deployments/{id}",
            get(deployments::get)
                .patch(deployments::patch)
                .delete(deployments::delete),
        )
        .route("/deployments/{id}/events", get(deployments::timeline))
        .route("/providers", get(catalog::providers))
        .route(
            "/providers/{name}/instance-types",
            get(catalog::instance_types),
        )
        .route("/models", get(catalog::models))
        .route("/events", get(events::stream))
        .route("/system/tasks", get(system::tasks))
        .route("/openapi.json", get(openapi::document))
        .route("/metrics/fleet", get(observability::fleet))
        .route("/prometheus/targets", get(observability::targets))
        .route("/api-keys", post(api_keys::create).get(api_keys::list))
        .route(
            "/api-keys/{id}",
            axum::routing::delete(api_keys::revoke).patch(api_keys::patch),
        )
        .route("/usage", get(api_keys::usage))
        .route("/spend", get(spend::report))
        .route("/audit", get(audit::list))
        .route("/auth/me", get(accounts::me))
        .route("/auth/logout", post(accounts::logout))
        .route(
            "/tokens",
            post(accounts::create_token).get(accounts::list_tokens),
        )
        .route(
            "/tokens/{id}",
            axum::routing::delete(accounts::revoke_token),
        )
        .route(
            "/users",
            post(accounts::create_user).get(accounts::list_users),
        )
        .route(
            "/projects",
            post(accounts::create_project).get(accounts::list_projects),
        )
        .route("/projects/{id}", get(accounts::get_project))
        .route("/projects/{id}/members", get(accounts::list_members))
        .route(
            "/projects/{id}/members/{user_id}",
            axum::routing::put(accounts::grant).delete(accounts::revoke),
        )
        // route_layer: unknown /api/ paths are 404, not 401. The audit
        // layer is outside authentication, so refusals are recorded too.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), audit::record));

    // Signing in needs no credentials.
    let public = Router::new()
        .route("/auth/login", post(accounts::login))
        .route("/auth/providers", get(accounts::providers));
    let api = api.merge(public);

    let agent = Router::new()
        .route(paths::REGISTER, post(agent::register))
        .route(paths::HEARTBEAT, post(agent::heartbeat))
        .route(paths::EVENTS, post(agent::events))
        .route(paths::ENGINE_ENV, post(agent::engine_env))
        .route(paths::ENGINE_CERT, post(agent::engine_cert))
        .layer(DefaultBodyLimit::max(AGENT_BODY_LIMIT_BYTES));

    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(observability::prometheus))
        .route(downloads::AGENT_BINARY_PATH, get(downloads::agent_binary))
        .route(oidc_routes::LOGIN_PATH, get(oidc_routes::login))
        .route(oidc_routes::CALLBACK_PATH, get(oidc_routes::callback))
        .nest("/api/v1", api)
        .merge(agent)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(middleware::from_fn(observability::track))
        .layer(Extension(observability::HttpMetrics::new()))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Serve `router` on `listener` until `shutdown` completes, then stop
/// accepting, end open event streams, and wait for in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, router, None, shutdown).await
}

/// A request handler consulted before the router, for a hot path that
/// should skip routing and the layers (the OpenAI-compatible proxy).
pub trait FirstHandler: Send + Sync + 'static {
    /// Whether this handler answers `req` (from its head alone).
    fn takes(&self, req: &axum::extract::Request) -> bool;
    /// Answer a request it [takes](Self::takes).
    fn call(&self, req: axum::extract::Request) -> BoxedResponse;
}

/// The answer of a [`FirstHandler`].
pub type BoxedResponse =
    std::pin::Pin<Box<dyn Future<Output = axum::response::Response> + Send + 'static>>;

/// [`serve`], with `first` offered every request before `router`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    first: Option<Arc<dyn FirstHandler>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let streams = CancellationToken::new();
    let router = router.layer(Extension(StreamsShutdown(streams.clone())));
    let signal = async move {
        shutdown.await;
        tracing::info!("HTTP server shutting down");
        streams.cancel();
    };
    // No Nagle delay on small writes (SSE events, streamed completions).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    // The peer's address reaches the handlers (`ConnectInfo`: the audit
    // log's source address).
    match first {
        None => {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(signal)
            .await
        }
        Some(first) => {
            let service = FirstThen {
                first,
                rest: router,
                peer: None,
            };
            axum::serve(listener, MakeFirstThen(service))
                .with_graceful_shutdown(signal)
                .await
        }
    }
}

/// Makes a [`FirstThen`] per connection, knowing the peer's address.
#[derive(Clone)]
struct MakeFirstThen(FirstThen);

impl<'a, L> tower::Service<axum::serve::IncomingStream<'a, L>> for MakeFirstThen
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    type Response = FirstThen;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<FirstThen, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, stream: axum::serve::IncomingStream<'a, L>) -> Self::Future {
        let mut service = self.0.clone();
        service.peer = Some(*stream.remote_addr());
        std::future::ready(Ok(service))
    }
}

/// A [`FirstHandler`], then the router for what it hands back.
#[derive(Clone)]
struct FirstThen {
    first: Arc<dyn FirstHandler>,
    rest: Router,
    /// The connection's peer, handed to the router's requests only (the
    /// first handler's hot path allocates nothing for it).
    peer: Option<std::net::SocketAddr>,
}

type FirstThenFuture = futures::future::Either<
    futures::future::Map<
        BoxedResponse,
        fn(axum::response::Response) -> Result<axum::response::Response, std::convert::Infallible>,
    >,
    axum::routing::future::RouteFuture<std::convert::Infallible>,
>;

impl tower::Service<axum::extract::Request> for FirstThen {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = FirstThenFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: axum::extract::Request) -> Self::Future {
        use futures::FutureExt as _;
        if self.first.takes(&req) {
            futures::future::Either::Left(self.first.call(req).map(Ok as fn(_) -> _))
        } else {
            if let Some(peer) = self.peer {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
            }
            futures::future::Either::Right(tower::Service::call(&mut self.rest, req))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first handler answers what it takes; everything else reaches the
    /// router, fallbacks included.
    #[tokio::test]
    async fn the_first_handler_takes_its_requests_and_hands_back_the_rest() {
        let router = Router::new().route("/rest", get(|| async { "from the router" }));
        struct First;
        impl FirstHandler for First {
            fn takes(&self, req: &axum::extract::Request) -> bool {
                req.uri().path() == "/first"
            }
            fn call(&self, _req: axum::extract::Request) -> BoxedResponse {
                Box::pin(async {
                    axum::response::IntoResponse::into_response("from the first handler")
                })
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let server = tokio::spawn(serve_with(
            listener,
            router,
            Some(Arc::new(First)),
            async move { s.cancelled().await },
        ));
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("http://{addr}{path}")).send();
        let r = get("/first").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "from the first handler");
        let r = get("/rest").await.unwrap();
        assert_eq!(r.text().await.unwrap(), "from the router");
        assert_eq!(get("/nowhere").await.unwrap().status(), 404);
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
