//! The request path: key check, instance choice, forwarding with retries,
//! and the pass-through of the answer (whole, or event by event for streams)
//! with its usage counted.

use crate::error::RouterError;
use crate::keys::AuthedKey;
use crate::pool::{Backend, InFlight};
use crate::upstream::{Conn, UpstreamConns};
use crate::usage::Tokens;
use crate::{Inner, RouterState};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{Bytes, BytesMut};
use hyper::body::Body as _;
use hyper::body::Incoming;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::json;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Response header naming the instance that served the request.
pub const INSTANCE_HEADER: HeaderName = HeaderName::from_static("x-gpufleet-instance");
/// The paths of the two completion endpoints, here and upstream alike.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";
pub const COMPLETIONS: &str = "/v1/completions";
/// Request header whose value pins a session to an instance.
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("x-session-id");

/// The `Authorization: Bearer <key>` value, if well-formed.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn authenticate(inner: &Inner, headers: &HeaderMap) -> Result<Arc<AuthedKey>, RouterError> {
    let secret = bearer(headers).ok_or(RouterError::MissingKey)?;
    inner.keys.verify(secret).await
}

/// `GET /v1/models`: models with at least one ready instance that the key may use.
pub(crate) async fn models(State(state): State<RouterState>, headers: HeaderMap) -> Response {
    let inner = &state.inner;
    let key = match authenticate(inner, &headers).await {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let data: Vec<serde_json::Value> = inner
        .pools
        .models()
        .into_iter()
        .filter(|m| key.allows(m))
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "gpufleet"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) async fn chat_completions(State(state): State<RouterState>, req: Request) -> Response {
    forward(&state, CHAT_COMPLETIONS, req).await
}

pub(crate) async fn completions(State(state): State<RouterState>, req: Request) -> Response {
    forward(&state, COMPLETIONS, req).await
}

async fn forward(state: &RouterState, path: &'static str, req: Request) -> Response {
    let inner = &*state.inner;
    let key = match authenticate(inner, req.headers()).await {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    key.usage.request();
    let resp = match forward_as(state, &key, path, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if resp.status().is_client_error() || resp.status().is_server_error() {
        key.usage.error();
        tracing::debug!(api_key_id = %key.id, api_key_name = %key.name, status = %resp.status(), "request failed");
    }
    resp
}

/// The fields of a request body the router looks at.
#[derive(Deserialize)]
struct Peek {
    model: Option<String>,
    stream: Option<bool>,
    user: Option<String>,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// How the last failed attempt failed.
enum Last {
    Error(RouterError),
    /// A 5xx/429 answer, passed on as it is when no attempt is left.
    Answer(StatusCode, Option<HeaderValue>, Bytes, Arc<Backend>),
}

async fn forward_as(
    state: &RouterState,
    key: &Arc<AuthedKey>,
    path: &'static str,
    req: Request,
) -> Result<Response, RouterError> {
    let inner = &*state.inner;
    let cfg = &inner.config;
    let limit = cfg.max_body_bytes;
    let session_header = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return Err(RouterError::TooLarge { limit });
    }
    let mut body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| RouterError::TooLarge { limit })?;
    let peek: Peek = serde_json::from_slice(&body)
        .map_err(|e| RouterError::bad(None, format!("the body is not a valid request: {e}")))?;
    let model = peek
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| RouterError::bad(Some("model"), "`model` is required"))?;
    if !key.allows(&model) {
        return Err(RouterError::ModelNotAllowed { model });
    }
    let stream = peek.stream.unwrap_or(false);
    let client_wants_usage = peek
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    // Ask the engine for the final usage chunk; drop it again on the way back.
    let strip_usage = stream && !client_wants_usage;
    if strip_usage {
        body = with_include_usage(&body)?;
    }
    let session = session_header.or(peek.user);

    let pool = match inner.pools.model(&model) {
        Some(p) => Some(p),
        // A deployment's model waits for a replica (scale from zero).
        None => crate::hold::hold(inner, &model).await?,
    };
    let pool = pool.ok_or_else(|| {
        let starting = inner.pools.starting(&model);
        if starting > 0
            || inner
                .catalogs
                .models()
                .iter()
                .any(|m| m.name.as_str() == model)
        {
            RouterError::NoReadyInstance {
                model: model.clone(),
                starting,
            }
        } else {
            RouterError::UnknownModel {
                model: model.clone(),
            }
        }
    })?;

    // A whole answer is asked for as a stream when it can be put back
    // together faithfully: it then gets stall detection and failover too.
    // With one ready instance there is nowhere else to go: pass through.
    let whole_as_stream = if stream || !cfg.whole_as_stream || pool.backends.len() < 2 {
        None
    } else {
        crate::stream::as_stream(&body)
    };
    if let Some(streamed) = whole_as_stream {
        let ask = crate::stream::Ask {
            state: state.clone(),
            key: key.clone(),
            path,
            body: streamed,
            model,
            session,
            strip_usage: false,
        };
        return crate::stream::forward_whole(ask, pool).await;
    }
    if stream {
        let ask = crate::stream::Ask {
            state: state.clone(),
            key: key.clone(),
            path,
            body,
            model,
            session,
            strip_usage,
        };
        return crate::stream::forward(ask, pool).await;
    }
    let mut tried = Vec::new();
    let mut last: Option<Last> = None;
    for _ in 0..=cfg.retries {
        let Some(b) = pool.pick(
            cfg.policy,
            session.as_deref(),
            &tried,
            &inner.pools.rr,
            Instant::now(),
        ) else {
            break;
        };
        tried.push(b.id);
        let guard = InFlight::new(b.clone());
        b.usage.request();
        let Some(authority) = b.authority.clone() else {
            attempt_failed(inner, &b, &"instance without an address");
            continue;
        };
        // On a connection this task drives (see `upstream`); idle ones are
        // kept under the backend's key (plain and TLS never mixed).
        let host = b.conn_key.as_str();
        let make = crate::stream::request(&b, path, &body);
        let send = inner.upstream.send(
            host,
            authority.as_str(),
            b.tls.as_ref(),
            cfg.connect_timeout(),
            make,
        );
        let (resp, conn) = match tokio::time::timeout(cfg.first_byte_timeout(), send).await {
            Err(_) => {
                attempt_failed(inner, &b, &"no answer before the first-byte timeout");
                last = Some(Last::Error(RouterError::Timeout {
                    model: model.clone(),
                }));
                continue;
            }
            Ok(Err(e)) => {
                attempt_failed(inner, &b, &e);
                last = Some(Last::Error(if e.is_connect() {
                    RouterError::Unreachable {
                        model: model.clone(),
                    }
                } else {
                    RouterError::UpstreamBroken {
                        model: model.clone(),
                    }
                }));
                continue;
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        // The connection is driven by whoever reads the body: `read_all`
        // for a whole answer, the `Tap` for a streamed one.
        let reader = Reader {
            conn,
            conns: &inner.upstream,
            host,
        };
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            if status.is_server_error() {
                attempt_failed(inner, &b, &format!("answered {status}"));
            } else {
                // Busy, not broken.
                b.usage.error();
                let _ = crate::stream::answered(inner, &b);
                tracing::debug!(instance_id = %b.id, "instance busy (429); trying another");
            }
            let bytes = reader
                .read_all(resp, cfg.idle_timeout())
                .await
                .unwrap_or_default();
            last = Some(Last::Answer(status, content_type, bytes, b.clone()));
            continue;
        }
        let _ = crate::stream::answered(inner, &b);
        match reader.read_all(resp, cfg.idle_timeout()).await {
            Ok(bytes) => {
                if status.is_success() {
                    if let Some(t) = usage_of(&bytes) {
                        b.usage.tokens(t);
                        key.usage.tokens(t);
                    }
                } else {
                    b.usage.error();
                }
                drop(guard);
                return Ok(whole(status, content_type, bytes, &b));
            }
            Err(e) => {
                // Nothing reached the client yet: another instance may do.
                b.usage.error();
                tracing::warn!(instance_id = %b.id, error = %e, "upstream body failed; trying another instance");
                last = Some(Last::Error(e.into_router_error(&model)));
            }
        }
    }
    match last {
        None => Err(RouterError::AllCircuitsOpen { model }),
        Some(Last::Error(e)) => Err(e),
        Some(Last::Answer(status, ct, bytes, b)) => Ok(whole(status, ct, bytes, &b)),
    }
}

fn attempt_failed(inner: &Inner, b: &Backend, why: &dyn std::fmt::Display) {
    b.usage.error();
    let opened = b.breaker.failure(Instant::now());
    tracing::warn!(instance_id = %b.id, error = %why, circuit_opened = opened, "upstream attempt failed");
    if opened {
        crate::stream::ejected(inner, b, &why.to_string());
    }
}

pub(crate) fn insert_instance(h: &mut HeaderMap, b: &Backend) {
    h.insert(INSTANCE_HEADER, b.id_header.clone());
}

fn whole_raw(status: StatusCode, ct: Option<HeaderValue>, bytes: Bytes) -> Response {
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        ct.unwrap_or(HeaderValue::from_static("application/json")),
    );
    r
}

fn whole(status: StatusCode, ct: Option<HeaderValue>, bytes: Bytes, b: &Backend) -> Response {
    let mut r = whole_raw(status, ct, bytes);
    insert_instance(r.headers_mut(), b);
    r
}

/// The body with `stream_options.include_usage` set. `body` is a JSON
/// object with at least a `model` member.
fn with_include_usage(body: &[u8]) -> Result<Bytes, RouterError> {
    const MEMBER: &[u8] = b"\"stream_options\":{\"include_usage\":true},";
    let start = body.iter().position(|c| !c.is_ascii_whitespace());
    let mentions = body.windows(16).any(|w| w == b"\"stream_options\"");
    if let (Some(i), false) = (start, mentions) {
        if body[i] == b'{' {
            // The common case: no stream_options at all. Insert the member
            // first rather than parse and re-serialise the whole body.
            let mut out = BytesMut::with_capacity(body.len() + MEMBER.len());
            out.extend_from_slice(&body[..=i]);
            out.extend_from_slice(MEMBER);
            out.extend_from_slice(&body[i + 1..]);
            return Ok(out.freeze());
        }
    }
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| RouterError::bad(None, format!("the body is not a JSON object: {e}")))?;
    match v.get_mut("stream_options") {
        Some(serde_json::Value::Object(o)) => {
            o.insert("include_usage".into(), true.into());
        }
        _ => {
            v.insert("stream_options".into(), json!({"include_usage": true}));
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| RouterError::bad(None, e.to_string()))
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the body stalled past the idle timeout")]
    Idle,
    #[error("the body broke off")]
    Broken(#[source] hyper::Error),
}

impl BodyError {
    fn into_router_error(self, model: &str) -> RouterError {
        match self {
            BodyError::Idle => RouterError::Timeout {
                model: model.to_string(),
            },
            BodyError::Broken(_) => RouterError::UpstreamBroken {
                model: model.to_string(),
            },
        }
    }
}

/// Reads an answer's body, driving its connection, which goes back to the
/// pool once the body has ended cleanly.
struct Reader<'a> {
    conn: Conn,
    conns: &'a UpstreamConns,
    host: &'a str,
}

impl Reader<'_> {
    async fn read_all(
        self,
        resp: hyper::Response<Incoming>,
        idle: Duration,
    ) -> Result<Bytes, BodyError> {
        let mut conn = Some(self.conn);
        let mut body = resp.into_body();
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        loop {
            let next = std::future::poll_fn(|cx| {
                if conn.as_mut().is_some_and(|c| !c.drive(cx)) {
                    // Ended: the body reports how.
                    conn = None;
                }
                Pin::new(&mut body).poll_frame(cx)
            });
            let frame = match tokio::time::timeout(idle, next).await {
                Err(_) => return Err(BodyError::Idle),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(BodyError::Broken(e)),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(c) = frame.into_data() else { continue };
            match first.take() {
                // The usual case, one chunk: no copy.
                None if buf.is_empty() => first = Some(c),
                prev => {
                    if let Some(p) = prev {
                        buf.extend_from_slice(&p);
                    }
                    buf.extend_from_slice(&c);
                }
            }
        }
        if let Some(c) = conn {
            self.conns.put(self.host, c);
        }
        Ok(match first {
            Some(b) => b,
            None => buf.freeze(),
        })
    }
}

#[derive(Deserialize)]
struct UsageJson {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct WithUsage {
    usage: Option<UsageJson>,
    choices: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ChoicesLen {
    #[serde(default)]
    choices: Vec<IgnoredAny>,
}

fn tokens(u: UsageJson) -> Tokens {
    Tokens {
        prompt: u.prompt_tokens.unwrap_or(0),
        completion: u.completion_tokens.unwrap_or(0),
    }
}

/// The `usage` of a whole response.
fn usage_of(body: &[u8]) -> Option<Tokens> {
    let w: WithUsage = serde_json::from_slice(body).ok()?;
    let _ = w.choices;
    w.usage.map(tokens)
}

/// Whether `ev` carries a non-null `"usage"` object (cheap pre-check).
pub(crate) fn has_usage_object(ev: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"\"usage\"";
    let mut rest = ev;
    while let Some(pos) = rest.windows(NEEDLE.len()).position(|w| w == NEEDLE) {
        let after = &rest[pos + NEEDLE.len()..];
        let mut it = after.iter().skip_while(|c| c.is_ascii_whitespace());
        if it.next() == Some(&b':') && it.find(|c| !c.is_ascii_whitespace()) == Some(&b'{') {
            return true;
        }
        rest = after;
    }
    false
}

/// The usage of one SSE event, and whether the event is nothing but usage
/// (no choices).
pub(crate) fn event_usage(ev: &[u8]) -> Option<(Tokens, bool)> {
    if !has_usage_object(ev) {
        return None;
    }
    let text = std::str::from_utf8(ev).ok()?;
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n");
    let w: WithUsage = serde_json::from_str(&data).ok()?;
    let usage = w.usage?;
    let only = serde_json::from_str::<ChoicesLen>(&data)
        .map(|c| c.choices.is_empty())
        .unwrap_or(false);
    Some((tokens(usage), only))
}

/// Events of a region of complete events, each with its closing blank line.
pub(crate) fn split_events(region: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = region;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .windows(2)
            .position(|w| w == b"\n\n")
            .map(|p| p + 2)
            .unwrap_or(rest.len());
        let (ev, r) = rest.split_at(end);
        rest = r;
        Some(ev)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_usage_in_events() {
        let ev = b"data: {\"id\":\"x\",\"choices\":[],\"usage\": {\"prompt_tokens\":3,\"completion_tokens\":7,\"total_tokens\":10}}\n\n";
        let (t, only) = event_usage(ev).unwrap();
        assert_eq!((t.prompt, t.completion, only), (3, 7, true));
        let ev = b"data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n";
        assert!(event_usage(ev).is_none());
        let ev = b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"usage\\\"\"}}]}\n\n";
        assert!(event_usage(ev).is_none());
        assert!(event_usage(b"data: [DONE]\n\n").is_none());
    }

    #[test]
    fn whole_response_usage() {
        let body = br#"{"id":"x","choices":[{"text":"hi"}],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}"#;
        assert_eq!(
            usage_of(body),
            Some(Tokens {
                prompt: 2,
                completion: 1
            })
        );
        assert_eq!(usage_of(b"{}"), None);
    }

    #[test]
    fn include_usage_is_added_and_kept() {
        let b =
            with_include_usage(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"], json!({"x": 1, "include_usage": true}));
        let b = with_include_usage(br#" {"model":"m","stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let b = with_include_usage(br#"{"model":"m","stream_options":{"include_usage":false}}"#)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn splits_events() {
        let r = b"data: a\n\ndata: b\n\n";
        let v: Vec<&[u8]> = split_events(r).collect();
        assert_eq!(v, vec![&b"data: a\n\n"[..], &b"data: b\n\n"[..]]);
    }
}
