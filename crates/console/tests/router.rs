//! The console router on its own and merged with an API-shaped router (a
//! nested `/api/v1`, a `/healthz` route and a fallback, like gpufleet-api's).

use axum::body::{to_bytes, Body};
use axum::http::{header, Method, Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use gpufleet_console::{router, ASSETS, CACHE_IMMUTABLE, CACHE_REVALIDATE, DIST_HASH, SOURCE_HASH};
use tower::ServiceExt;

fn api_like() -> Router {
    let api = Router::new().route(
        "/instances",
        get(|| async { Json(serde_json::json!({"instances": []})) }),
    );
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/api/v1", api)
        .fallback(|| async { (StatusCode::NOT_FOUND, "api fallback") })
}

fn app() -> Router {
    api_like().merge(router())
}

async fn call(app: Router, method: Method, uri: &str, etag: Option<&str>) -> Response {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(e) = etag {
        req = req.header(header::IF_NONE_MATCH, e);
    }
    app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
}

async fn get_(uri: &str) -> Response {
    call(app(), Method::GET, uri, None).await
}

fn header_of(r: &Response, name: header::HeaderName) -> &str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

async fn text(r: Response) -> String {
    String::from_utf8(to_bytes(r.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap()
}

fn script() -> &'static gpufleet_console::Asset {
    ASSETS
        .iter()
        .find(|a| a.path.starts_with("assets/") && a.path.ends_with(".js"))
        .expect("a built script in console/dist/assets")
}

#[tokio::test]
async fn index_is_served_at_the_root_and_revalidated() {
    let r = get_("/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header_of(&r, header::CONTENT_TYPE),
        "text/html; charset=utf-8"
    );
    assert_eq!(header_of(&r, header::CACHE_CONTROL), CACHE_REVALIDATE);
    assert!(header_of(&r, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'"));
    assert_eq!(header_of(&r, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    let etag = header_of(&r, header::ETAG).to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let body = text(r).await;
    assert!(body.contains(r#"<div id="app">"#), "{body}");
    assert!(
        body.contains(script().path),
        "index.html loads {}",
        script().path
    );

    let again = call(app(), Method::GET, "/", Some(&etag)).await;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert!(text(again).await.is_empty());

    let head = call(app(), Method::HEAD, "/", None).await;
    assert_eq!(head.status(), StatusCode::OK);
}

#[tokio::test]
async fn hashed_assets_have_their_type_and_are_cached_for_good() {
    let js = script();
    let r = get_(&format!("/{}", js.path)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header_of(&r, header::CONTENT_TYPE),
        "text/javascript; charset=utf-8"
    );
    assert_eq!(header_of(&r, header::CACHE_CONTROL), CACHE_IMMUTABLE);
    assert_eq!(
        to_bytes(r.into_body(), usize::MAX).await.unwrap().len(),
        js.bytes.len()
    );

    let css = ASSETS
        .iter()
        .find(|a| a.path.ends_with(".css"))
        .expect("a stylesheet");
    let r = get_(&format!("/{}", css.path)).await;
    assert_eq!(
        header_of(&r, header::CONTENT_TYPE),
        "text/css; charset=utf-8"
    );

    let r = get_("/assets/index-gone.js").await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a missing hashed file is not answered with HTML"
    );
}

#[tokio::test]
async fn unknown_pages_fall_back_to_the_app() {
    for path in [
        "/instances",
        "/instances/i-0123/detail",
        "/observability",
        "/index.html",
    ] {
        let r = get_(path).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(
            header_of(&r, header::CONTENT_TYPE),
            "text/html; charset=utf-8",
            "{path}"
        );
        assert!(text(r).await.contains(r#"<div id="app">"#), "{path}");
    }
}

#[tokio::test]
async fn api_routes_win_and_api_prefixes_never_get_html() {
    let r = get_("/api/v1/instances").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(text(r).await, r#"{"instances":[]}"#);
    assert_eq!(text(get_("/healthz").await).await, "ok");

    for path in [
        "/api/v1/nope",
        "/api",
        "/internal/v1/agent/nope",
        "/v1/models",
        "/v1/chat/completions",
    ] {
        let r = get_(path).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(
            !header_of(&r, header::CONTENT_TYPE).starts_with("text/html"),
            "{path} answered HTML"
        );
    }
    let r = get_("/v1/models").await;
    let body: serde_json::Value = serde_json::from_str(&text(r).await).expect("JSON error body");
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["message"], "no route for /v1/models");
}

#[tokio::test]
async fn non_get_methods_are_not_served() {
    let r = call(app(), Method::POST, "/instances", None).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[test]
fn the_embedded_console_is_built_from_the_current_sources() {
    assert!(
        DIST_HASH.is_some(),
        "console/dist/.source-hash is missing: run `npm run build` in console/"
    );
    if let Some(sources) = SOURCE_HASH {
        assert_eq!(
            DIST_HASH,
            Some(sources),
            "console/dist is older than console/src: run `npm run build` in console/ (or build with npm installed)"
        );
    }
    assert!(
        ASSETS.iter().all(|a| !a.path.starts_with('.')),
        "dot files are not served"
    );
    let total: usize = ASSETS.iter().map(|a| a.bytes.len()).sum();
    assert!(total < 1_000_000, "the console stays small: {total} bytes");
}
