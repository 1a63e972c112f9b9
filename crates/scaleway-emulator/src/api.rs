//! The HTTP side: routes, the gate every API request passes (auth, rate
//! limit, faults, request log), paging, and the accept loop (which can drop a
//! connection without answering, for the "lost answer" fault).

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::errors::{ApiError, ApiResult};
use crate::faults::FaultAction;
use crate::AppState;

/// Put in every request's extensions: cancelling it drops the connection.
#[derive(Clone)]
pub struct ConnKill(pub CancellationToken);

/// Set on a request an injected `stuck_starting` fault fired for.
#[derive(Clone, Copy)]
pub struct StuckStarting;

pub fn router(app: AppState) -> Router {
    let api = Router::new()
        .merge(crate::instance::routes())
        .merge(crate::block::routes())
        .merge(crate::marketplace::routes())
        .route_layer(middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app.clone());
    Router::new()
        .merge(api)
        .nest("/emulator/v1", crate::admin::routes().with_state(app))
}

pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => break,
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let kill = CancellationToken::new();
            let k2 = kill.clone();
            let svc = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnKill(k2.clone()));
                    let app = app.clone();
                    async move {
                        Ok::<_, Infallible>(app.oneshot(req.map(Body::new)).await.into_response())
                    }
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = kill.cancelled() => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// The commercial type a request is about: its JSON body's `commercial_type`,
/// or the type of the server named in its path.
fn commercial_type_of(app: &AppState, path: &str, body: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(t) = v.get("commercial_type").and_then(Value::as_str) {
            return Some(t.to_string());
        }
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segs.len() >= 6 && segs[0] == "instance" && segs[4] == "servers" {
        let st = app.state.lock().unwrap();
        return st.servers.get(segs[5]).map(|s| s.commercial_type.clone());
    }
    None
}

async fn gate(
    State(app): State<AppState>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let route = matched
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let kill = req.extensions().get::<ConnKill>().cloned();

    let token = req
        .headers()
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if !path.starts_with("/marketplace/") {
        let denied = match token.as_deref() {
            None | Some("") => Some(ApiError::denied_authentication("invalid_argument")),
            Some(t) if t != app.config.secret_key => {
                Some(ApiError::denied_authentication("not_found"))
            }
            Some(_) => None,
        };
        if let Some(e) = denied {
            app.faults.record(&method, &path, &route, 401, None);
            return e.into_response();
        }
    }

    let mut rl_headers = None;
    if let Some(res) = app
        .faults
        .take_token(token.as_deref().unwrap_or("anonymous"))
    {
        match res {
            Ok(figures) => rl_headers = Some(figures),
            Err(wait) => {
                let limit = app.faults.rate_limit().map(|r| r.burst).unwrap_or(0);
                app.faults.record(&method, &path, &route, 429, None);
                return ApiError::too_many_requests(limit, 1, wait).into_response();
            }
        }
    }

    let (parts, body) = req.into_parts();
    let bytes: Bytes = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return ApiError::invalid_request("could not read the body").into_response(),
    };
    let ctype = commercial_type_of(&app, &path, &bytes);
    let fired = app.faults.fire(&method, &path, ctype.as_deref());
    if !fired.latency.is_zero() {
        tokio::time::sleep(fired.latency).await;
    }
    let mut req = Request::from_parts(parts, Body::from(bytes));
    if fired.stuck_starting {
        req.extensions_mut().insert(StuckStarting);
    }

    let early = match &fired.terminal {
        Some(FaultAction::Respond {
            status,
            body,
            headers,
        }) => {
            let mut e = ApiError::new(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body.clone(),
            );
            e.headers = headers.clone();
            Some(e)
        }
        Some(FaultAction::TooManyRequests { retry_after_secs }) => {
            let limit = app.faults.rate_limit().map(|r| r.burst).unwrap_or(0);
            Some(ApiError::too_many_requests(limit, 1, *retry_after_secs))
        }
        Some(FaultAction::ServerError { status }) => Some(ApiError::internal(
            StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        )),
        Some(FaultAction::QuotasExceeded { resource, quota }) => {
            Some(ApiError::quotas_exceeded(resource, *quota, *quota))
        }
        Some(FaultAction::OutOfStock) => Some(ApiError::out_of_stock("server")),
        _ => None,
    };
    if let Some(e) = early {
        app.faults
            .record(&method, &path, &route, e.status.as_u16(), ctype);
        return e.into_response();
    }

    let mut resp = next.run(req).await;
    match fired.terminal {
        Some(FaultAction::LoseAnswer) => {
            app.faults.record(&method, &path, &route, 0, ctype);
            match kill {
                Some(k) => {
                    k.0.cancel();
                    std::future::pending::<()>().await;
                    unreachable!()
                }
                None => return ApiError::internal(StatusCode::GATEWAY_TIMEOUT).into_response(),
            }
        }
        Some(FaultAction::PerformThen504) => {
            app.faults.record(&method, &path, &route, 504, ctype);
            return ApiError::internal(StatusCode::GATEWAY_TIMEOUT).into_response();
        }
        _ => {}
    }
    app.faults
        .record(&method, &path, &route, resp.status().as_u16(), ctype);
    if let Some((limit, remaining, reset)) = rl_headers {
        let h = resp.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from(limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(reset));
    }
    resp
}

/// Query string as pairs (repeated keys kept).
pub type QueryPairs = Vec<(String, String)>;

pub fn query_get<'a>(q: &'a QueryPairs, key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// `page` (from 1) and `per_page` (default 50, at most 100), as the Instance API.
pub fn page_params(q: &QueryPairs, size_key: &str) -> ApiResult<(usize, usize)> {
    let page = match query_get(q, "page") {
        Some(p) => p.parse::<usize>().ok().filter(|p| *p >= 1).ok_or_else(|| {
            ApiError::invalid_argument("page", "constraint", "must be greater or equal to 1")
        })?,
        None => 1,
    };
    let per_page = match query_get(q, size_key) {
        Some(p) => p
            .parse::<usize>()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .ok_or_else(|| {
                ApiError::invalid_argument(size_key, "constraint", "must be between 1 and 100")
            })?,
        None => 50,
    };
    Ok((page, per_page))
}

pub fn paginate<T: Clone>(items: &[T], page: usize, per_page: usize) -> Vec<T> {
    items
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .cloned()
        .collect()
}

/// The Instance API's paging headers, as recorded:
/// `Link: </products/servers?page=2&per_page=50&>; rel="next",</products/servers?page=3&per_page=50&>; rel="last"`
/// (a path relative to the zone) and `X-Total-Count`.
pub fn paging_headers(
    rel_path: &str,
    q: &QueryPairs,
    page: usize,
    per_page: usize,
    total: usize,
) -> HeaderMap {
    let last = total.div_ceil(per_page);
    let extra: String = q
        .iter()
        .filter(|(k, _)| k != "page" && k != "per_page")
        .map(|(k, v)| format!("{}={}&", k, encode(v)))
        .collect();
    let link = |p: usize, rel: &str| {
        format!("<{rel_path}?page={p}&per_page={per_page}&{extra}>; rel=\"{rel}\"")
    };
    let mut links = Vec::new();
    if page > 1 {
        links.push(link(1, "first"));
        links.push(link(page - 1, "previous"));
    }
    if page < last {
        links.push(link(page + 1, "next"));
    }
    links.push(link(last, "last"));
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::try_from(links.join(",")) {
        h.insert("link", v);
    }
    h.insert("x-total-count", HeaderValue::from(total));
    h
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Tags filter of the Instance API: every listed tag must be on the resource.
pub fn has_all_tags(tags: &[String], filter: Option<&str>) -> bool {
    match filter {
        None | Some("") => true,
        Some(f) => f
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .all(|t| tags.iter().any(|x| x == t)),
    }
}

pub fn check_zone(app: &AppState, zone: &str) -> ApiResult<()> {
    if app.config.zones.iter().any(|z| z == zone) {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(
            "zone",
            "constraint",
            &format!(
                "unknown zone {zone}, expected one of {}",
                app.config.zones.join(", ")
            ),
        ))
    }
}

pub fn json_with(status: StatusCode, headers: HeaderMap, body: Value) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut().extend(headers);
    r
}

#[allow(dead_code)]
pub type Counts = BTreeMap<String, u64>;
