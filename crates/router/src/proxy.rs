//! The request path: key check, instance choice, forwarding with retries,
//! and the pass-through of the answer (whole, or event by event for streams)
//! with its usage counted.

use crate::error::RouterError;
use crate::keys::AuthedKey;
use crate::limits::RateHeaders;
use crate::pool::{Backend, InFlight};
use crate::scan::{self, has, USAGE_KEY};
use crate::upstream::{Conn, UpstreamConns};
use crate::usage::{Meter, Tokens};
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
        .models(key.project.as_str())
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
    let mut rate = None;
    let mut resp = match forward_as(state, &key, path, req, &mut rate).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if let Some(h) = &rate {
        insert_rate_headers(resp.headers_mut(), h);
    }
    if resp.status().is_client_error() || resp.status().is_server_error() {
        key.usage.error();
        tracing::debug!(api_key_id = %key.id, api_key_name = %key.name, status = %resp.status(), "request failed");
    }
    resp
}

/// OpenAI's `x-ratelimit-*` headers: limit, remaining and reset of
/// requests and tokens (the limits the key has).
pub(crate) fn insert_rate_headers(h: &mut HeaderMap, r: &RateHeaders) {
    const NAMES: [[HeaderName; 3]; 2] = [
        [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
        ],
        [
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ],
    ];
    for (names, figures) in NAMES.iter().zip([r.requests, r.tokens]) {
        let Some((limit, remaining, reset_ms)) = figures else {
            continue;
        };
        h.insert(names[0].clone(), HeaderValue::from(limit));
        h.insert(names[1].clone(), HeaderValue::from(remaining));
        if let Ok(v) = HeaderValue::from_str(&crate::limits::duration_text(reset_ms)) {
            h.insert(names[2].clone(), v);
        }
    }
}

/// The fields of a request body the router looks at.
#[derive(Deserialize)]
struct Peek {
    model: Option<String>,
    stream: Option<bool>,
    user: Option<String>,
    stream_options: Option<StreamOptions>,
    /// Numbers, read as such only for the token estimate (whatever else is
    /// sent is the engine's to refuse).
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

/// Which usage a streaming client asked for (the engine is always asked
/// for it in every chunk; what the client did not ask for is stripped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientUsage {
    /// None: per-chunk usage and the usage-only last chunk are stripped.
    None,
    /// `include_usage`: the usage-only last chunk is kept.
    Last,
    /// `include_usage` and `continuous_usage_stats`: passed through as is.
    Every,
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
    rate: &mut Option<RateHeaders>,
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
    // The key's limits: admitted (its estimate reserved until the request
    // ends, however it ends) or refused here.
    let reservation = match &key.limiter {
        None => None,
        Some(l) => {
            let completion = [&peek.max_tokens, &peek.max_completion_tokens]
                .into_iter()
                .find_map(|v| v.as_ref().and_then(serde_json::Value::as_u64))
                .unwrap_or(crate::limits::DEFAULT_COMPLETION_ESTIMATE);
            let t = Tokens {
                prompt: body.len() as u64 / 4,
                completion,
            };
            let est = crate::limits::Estimate {
                tokens: t.prompt + t.completion,
                cost: inner.usage.prices().cost(&model, t),
            };
            match l.admit(est, crate::limits::now_ms()) {
                Ok((r, headers)) => {
                    *rate = Some(headers);
                    Some(r)
                }
                Err(refusal) => {
                    *rate = refusal.headers().copied();
                    tracing::debug!(api_key_id = %key.id, reason = %refusal, "request refused by the key's limits");
                    return Err(RouterError::Limited {
                        key: key.name.clone(),
                        refusal,
                    });
                }
            }
        }
    };
    let meter = Meter::new(inner.usage.clone(), key.clone(), reservation);
    let stream = peek.stream.unwrap_or(false);
    let asked = peek.stream_options.as_ref();
    let client_usage = match (
        asked.and_then(|o| o.include_usage).unwrap_or(false),
        asked
            .and_then(|o| o.continuous_usage_stats)
            .unwrap_or(false),
    ) {
        (false, _) => ClientUsage::None,
        (true, false) => ClientUsage::Last,
        (true, true) => ClientUsage::Every,
    };
    // Ask the engine for the usage in every chunk (so a stream cut short
    // is counted exactly); strip what the client did not ask for.
    if stream && client_usage != ClientUsage::Every {
        body = with_usage_options(&body)?;
    }
    let session = session_header.or(peek.user);

    let project = key.project.as_str();
    let pool = match inner.pools.model(project, &model) {
        Some(p) => Some(p),
        // A deployment's model waits for a replica (scale from zero).
        None => crate::hold::hold(inner, &key.project, &model).await?,
    };
    // Only what the key's own project has decides the answer: a model
    // served in another project is as unknown as one served nowhere.
    let pool = pool.ok_or_else(|| {
        let starting = inner.pools.starting(project, &model);
        if starting > 0 {
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
            client_usage: ClientUsage::Every,
            meter,
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
            client_usage,
            meter,
        };
        return crate::stream::forward(ask, pool).await;
    }
    let mut meter = meter;
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
        // If the client goes away now, the request is counted on `b` with
        // what is known (the meter is dropped with this future).
        meter.served_by(&b);
        match reader.read_all(resp, cfg.idle_timeout()).await {
            Ok(bytes) => {
                if status.is_success() {
                    if let Some(t) = usage_of(&bytes) {
                        b.usage.tokens(t);
                        meter.tokens(&b, t);
                    }
                } else {
                    b.usage.error();
                    meter.failed();
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
    meter.failed();
    match last {
        None => Err(RouterError::AllCircuitsOpen { model }),
        Some(Last::Error(e)) => Err(e),
        Some(Last::Answer(status, ct, bytes, b)) => {
            meter.served_by(&b);
            Ok(whole(status, ct, bytes, &b))
        }
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

/// The body with `stream_options.include_usage` and vLLM's
/// `continuous_usage_stats` set (the usage so far in every chunk). `body`
/// is a JSON object with at least a `model` member.
fn with_usage_options(body: &[u8]) -> Result<Bytes, RouterError> {
    const MEMBER: &[u8] =
        b"\"stream_options\":{\"include_usage\":true,\"continuous_usage_stats\":true},";
    let start = body.iter().position(|c| !c.is_ascii_whitespace());
    let mentions = scan::contains(body, b"\"stream_options\"");
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
            o.insert("continuous_usage_stats".into(), true.into());
        }
        _ => {
            v.insert("stream_options".into(), usage_options());
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| RouterError::bad(None, e.to_string()))
}

/// `stream_options` asking for the usage in every chunk.
pub(crate) fn usage_options() -> serde_json::Value {
    json!({"include_usage": true, "continuous_usage_stats": true})
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
    let mut rest = ev;
    while let Some(pos) = USAGE_KEY.find(rest) {
        let after = &rest[pos + USAGE_KEY.needle().len()..];
        let mut it = after.iter().skip_while(|c| c.is_ascii_whitespace());
        if it.next() == Some(&b':') && it.find(|c| !c.is_ascii_whitespace()) == Some(&b'{') {
            return true;
        }
        rest = after;
    }
    false
}

/// The usage of one SSE event (with continuous usage stats, the counts so
/// far), whether the event is nothing but usage (no choices), and the
/// bytes to cut to strip the usage from it (the member and a comma).
pub(crate) fn event_usage(ev: &[u8]) -> Option<(Tokens, bool, std::ops::Range<usize>)> {
    let key_len = USAGE_KEY.needle().len();
    let mut from = 0;
    let (key_at, open) = loop {
        let pos = from + USAGE_KEY.find(&ev[from..])?;
        let mut i = pos + key_len;
        while ev.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if ev.get(i) == Some(&b':') {
            i += 1;
            while ev.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            if ev.get(i) == Some(&b'{') {
                break (pos, i);
            }
        }
        from = pos + key_len;
    };
    // The matching brace (the usage holds numbers and small objects).
    let (mut depth, mut in_str, mut escaped) = (0u32, false, false);
    let mut close = None;
    for (j, &c) in ev.iter().enumerate().skip(open) {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(j);
                    break;
                }
            }
            _ => {}
        }
    }
    let close = close?;
    let u: UsageJson = serde_json::from_slice(&ev[open..=close]).ok()?;
    // Cut `,"usage":{..}` (or `"usage":{..},` when it comes first).
    let mut start = key_at;
    while start > 0 && ev[start - 1].is_ascii_whitespace() {
        start -= 1;
    }
    let mut end = close + 1;
    if start > 0 && ev[start - 1] == b',' {
        start -= 1;
    } else {
        while ev.get(end).is_some_and(u8::is_ascii_whitespace) {
            end += 1;
        }
        if ev.get(end) == Some(&b',') {
            end += 1;
        }
    }
    let only = has(ev, &scan::NO_CHOICES) || has(ev, &scan::NO_CHOICES_SPACED);
    Some((tokens(u), only, start..end))
}

/// Events of a region of complete events, each with its closing blank line.
pub(crate) fn split_events(region: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = region;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = scan::EVENT_END.find(rest).map_or(rest.len(), |p| p + 2);
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
        let (t, only, _) = event_usage(ev).unwrap();
        assert_eq!((t.prompt, t.completion, only), (3, 7, true));
        // A token chunk with the usage so far: stripped, it is what it
        // would have been without.
        let ev = b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"}\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n";
        let (t, only, cut) = event_usage(ev).unwrap();
        assert_eq!((t.prompt, t.completion, only), (3, 1, false));
        let mut stripped = ev[..cut.start].to_vec();
        stripped.extend_from_slice(&ev[cut.end..]);
        assert_eq!(
            std::str::from_utf8(&stripped).unwrap(),
            "data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"}\"}}]}\n\n"
        );
        let ev = b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":0,\"total_tokens\":1}, \"choices\":[{\"text\":\"a\"}]}\n\n";
        let (_, _, cut) = event_usage(ev).unwrap();
        let mut stripped = ev[..cut.start].to_vec();
        stripped.extend_from_slice(&ev[cut.end..]);
        assert_eq!(
            std::str::from_utf8(&stripped).unwrap(),
            "data: { \"choices\":[{\"text\":\"a\"}]}\n\n"
        );
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
    fn usage_options_are_added_and_kept() {
        let b =
            with_usage_options(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v["stream_options"],
            json!({"x": 1, "include_usage": true, "continuous_usage_stats": true})
        );
        let b = with_usage_options(br#" {"model":"m","stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"], usage_options());
        assert_eq!(v["model"], "m");
        let b = with_usage_options(br#"{"model":"m","stream_options":{"include_usage":false}}"#)
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
