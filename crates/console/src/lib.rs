//! The gpufleet web console: the files of `console/dist`, built by Vite and
//! embedded at compile time (see `build.rs`), served by an axum [`Router`].
//!
//! - `/` and every unknown path outside the API prefixes answer `index.html`
//!   (a client-side app with hash routing: deep links keep working);
//! - `/assets/*` are content-hashed by Vite and cached for a year;
//! - `index.html` is revalidated on every load (`no-cache` plus an `ETag`);
//! - unknown paths under `/api`, `/internal` and `/v1` get the API's JSON
//!   404, never the HTML page.
//!
//! The router has no fallback of its own (a catch-all route instead), so it
//! can be merged with the API router, which has one: more specific API routes
//! win by path.

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// Path inside `console/dist`, e.g. `assets/index-abc123.js`.
    pub path: &'static str,
    pub bytes: &'static [u8],
    pub content_type: &'static str,
    /// Strong validator: a hash of the bytes, quoted.
    pub etag: &'static str,
}

mod generated {
    use super::Asset;
    include!(concat!(env!("OUT_DIR"), "/assets.rs"));
}

pub use generated::{ASSETS, DIST_HASH, SOURCE_HASH};

/// Path prefixes that belong to the API (and the agents and the OpenAI
/// router): never answered with the console's page.
pub const RESERVED_PREFIXES: &[&str] = &["api", "internal", "v1"];

/// `Cache-Control` of the hashed, immutable files.
pub const CACHE_IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// `Cache-Control` of `index.html` and the other unhashed files.
pub const CACHE_REVALIDATE: &str = "no-cache";

/// What the page may load: only this origin (the favicon is a data: URL).
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// The embedded file at `path` (relative, without a leading `/`).
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// The console's routes: `GET /` and `GET /{*path}`. Merge it with the API
/// router (`api.merge(gpufleet_console::router())`).
pub fn router() -> Router {
    Router::new()
        .route("/", get(|headers: HeaderMap| async move { serve("", &headers) }))
        .route(
            "/{*path}",
            get(|Path(path): Path<String>, headers: HeaderMap| async move { serve(&path, &headers) }),
        )
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let path = path.trim_start_matches('/');
    let first = path.split('/').next().unwrap_or("");
    if RESERVED_PREFIXES.contains(&first) {
        return not_found(path);
    }
    if let Some(a) = asset(path).filter(|a| a.path != "index.html") {
        let cache = if a.path.starts_with("assets/") {
            CACHE_IMMUTABLE
        } else {
            CACHE_REVALIDATE
        };
        return respond(a, cache, headers);
    }
    // A missing hashed file is an old page asking for an old build: a 404,
    // not HTML that the browser would try to run as a script.
    if first == "assets" {
        return not_found(path);
    }
    match asset("index.html") {
        Some(index) => respond(index, CACHE_REVALIDATE, headers),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "The gpufleet console was not built into this binary (console/dist was empty).\n",
        )
            .into_response(),
    }
}

fn respond(a: &'static Asset, cache: &'static str, headers: &HeaderMap) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == a.etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = Response::new(Body::from(a.bytes));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(a.content_type),
        );
        r
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::ETAG, HeaderValue::from_static(a.etag));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if a.content_type.starts_with("text/html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    resp
}

/// The API's error shape, so API clients never receive HTML.
fn not_found(path: &str) -> Response {
    let mut message = String::from("no route for /");
    for c in path.chars() {
        match c {
            '"' => message.push_str("\\\""),
            '\\' => message.push_str("\\\\"),
            c if c.is_control() => message.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => message.push(c),
        }
    }
    let body = format!(r#"{{"error":{{"code":"not_found","message":"{message}"}}}}"#);
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
