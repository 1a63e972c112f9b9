//! Watching the fleet: fleet figures (`/api/v1/metrics/fleet`), the
//! Prometheus exposition (`/metrics`, no auth, like a node exporter's), the
//! Prometheus HTTP service-discovery list of agents
//! (`/api/v1/prometheus/targets`), and the HTTP request metrics layer.

use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::views::{ErrorBody, FleetMetricsView, ScrapeTargetGroup};
use crate::SharedState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use gpufleet_control::telemetry::{to_prometheus_text, HistogramFamily};
use gpufleet_domain::metrics::{MAX_WINDOW_MS, MIN_WINDOW_MS};
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: String,
    /// The route template (`/api/v1/instances/{id}`), never the raw path.
    route: String,
    status: u16,
}

fn http_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// HTTP request durations by method, route and status.
#[derive(Debug)]
pub(crate) struct HttpMetrics {
    registry: Registry,
    durations: HistogramFamily<HttpLabels>,
}

impl HttpMetrics {
    pub(crate) fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let durations: HistogramFamily<HttpLabels> = Family::new_with_constructor(http_histogram);
        registry.register_with_unit(
            "gpufleet_http_request_duration",
            "HTTP requests served, by method, route template and status",
            Unit::Seconds,
            durations.clone(),
        );
        Arc::new(Self {
            registry,
            durations,
        })
    }
}

/// Middleware: time every request (SSE streams: until the headers are sent).
pub(crate) async fn track(
    Extension(metrics): Extension<Arc<HttpMetrics>>,
    req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics
        .durations
        .get_or_create(&HttpLabels {
            method,
            route: gpufleet_control::telemetry::label(&route),
            status: resp.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The control plane's metrics for Prometheus: open, like a node exporter,
/// unless a metrics token is configured (`[auth] metrics_token` or
/// `GPUFLEET_METRICS_TOKEN`); then the scraper sends it (or the admin
/// token) as a bearer token. The labels name instances, models and
/// projects. The classic text format by default; OpenMetrics when the
/// scraper asks for it in `Accept`.
#[utoipa::path(
    get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4 (or OpenMetrics 1.0 when `Accept` names `application/openmetrics-text`)",
         content((String = "text/plain"), (String = "application/openmetrics-text"))),
        (status = 401, description = "A metrics token is configured and was not sent", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody),
        (status = 503, description = "The metrics could not be encoded", body = ErrorBody),
    )
)]
pub async fn prometheus(
    State(state): State<SharedState>,
    Extension(http): Extension<Arc<HttpMetrics>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(expected) = &state.metrics_token {
        use gpufleet_control::secrets::{constant_time_eq, digest};
        // Digests first, so that not even the token's length shows in the timing.
        let allowed = crate::auth::bearer(&headers).is_some_and(|sent| {
            constant_time_eq(&digest(sent), &digest(expected)) || state.is_admin_token(sent)
        });
        if !allowed {
            return Err(ApiError::unauthorized(
                "/metrics needs the metrics token: send Authorization: Bearer <token> \
                 (Prometheus: authorization.credentials in the scrape config)",
            ));
        }
    }
    let mut text = String::with_capacity(16 * 1024);
    state
        .telemetry
        .encode_metrics(state.fleet.store(), &mut text)
        .await?;
    encode_registry(&mut text, &http.registry).map_err(|_| ApiError::internal())?;
    encode_eof(&mut text).map_err(|_| ApiError::internal())?;
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let (body, content_type) = if wants_openmetrics {
        (text, OPENMETRICS)
    } else {
        let mut body = to_prometheus_text(&text);
        // Extra sources speak the classic text format only.
        if let Some(extra) = &state.extra_metrics {
            body.push_str(&extra());
        }
        (body, PROMETHEUS_TEXT)
    };
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response())
}

/// Query of `GET /api/v1/metrics/fleet`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FleetParams {
    /// How far back the series go, e.g. `15m`, `1h`, `7d` (5 minutes to 30
    /// days; default 1h).
    #[param(pattern = "^[0-9]{1,9}[smhd]$", example = "1h")]
    pub window: Option<String>,
    /// Only this project's instances (default: every project the caller
    /// has a role in; everything for the admin token).
    pub project: Option<gpufleet_domain::ProjectId>,
}

/// `<digits><s|m|h|d>` (nothing around it) in milliseconds.
fn parse_window(raw: &str) -> Option<i64> {
    let t = raw;
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() || digits.len() > 9 {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms)
}

/// The fleet now (GPUs by status, mean GPU utilisation, VRAM used/total,
/// power draw, price per hour of what is running) and over the window, of
/// the projects the caller may read.
#[utoipa::path(
    get, path = "/api/v1/metrics/fleet", tag = "metrics",
    params(FleetParams),
    responses(
        (status = 200, description = "Fleet figures", body = FleetMetricsView),
        (status = 400, description = "Malformed `window` (or one outside 5 minutes to 30 days) or `project`", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn fleet(
    State(state): State<SharedState>,
    caller: crate::auth::Caller,
    ApiQuery(params): ApiQuery<FleetParams>,
) -> Result<Json<FleetMetricsView>, ApiError> {
    let window_ms = match params.window.as_deref() {
        None => 3_600_000,
        // Out of range is checked here too, so that every bad window is
        // answered about `window` (not about the `from`/`to` it turns into).
        Some(raw) => parse_window(raw)
            .filter(|ms| (MIN_WINDOW_MS..=MAX_WINDOW_MS).contains(ms))
            .ok_or_else(|| {
                ApiError::invalid(
                    "window",
                    format!(
                        "invalid window: {raw:?} is not a duration of {} to {} minutes \
                         such as 15m, 1h or 7d",
                        MIN_WINDOW_MS / 60_000,
                        MAX_WINDOW_MS / 60_000
                    ),
                )
            })?,
    };
    // What the caller may read: every project (the admin token) or theirs;
    // another project asked for by name shows nothing.
    let projects = caller.project_filter(params.project);
    let figures = state.history.fleet_metrics(window_ms, projects).await?;
    Ok(Json(FleetMetricsView::from(&figures)))
}

/// Prometheus HTTP service discovery: the agents of ready instances
/// (`ip:agent_port`), labelled with instance id, provider, instance type and
/// model. Use as an `http_sd_configs` URL with the admin token.
#[utoipa::path(
    get, path = "/api/v1/prometheus/targets", tag = "metrics",
    responses(
        (status = 200, description = "Target groups", body = Vec<ScrapeTargetGroup>),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not the admin token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn targets(
    State(state): State<SharedState>,
    caller: crate::auth::Caller,
) -> Result<Json<Vec<ScrapeTargetGroup>>, ApiError> {
    caller.require_admin()?;
    let targets = state.history.scrape_targets().await?;
    Ok(Json(targets.iter().map(ScrapeTargetGroup::from).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("1h"), Some(3_600_000));
        assert_eq!(parse_window("15m"), Some(900_000));
        assert_eq!(parse_window("7d"), Some(604_800_000));
        for bad in ["", "h", "1", "1.5h", "-1h", "1w", " 1h", "1h "] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
    }
}
