//! Streamed requests: nothing reaches the client before the first token,
//! so until then a stalled or failing instance is replaced silently; after
//! it, a stream that breaks off is continued on another instance.
//!
//! - **First token.** An attempt must bring its first token (not only
//!   headers or the role chunk: a hung vLLM answers those) within its
//!   instance's stall bound ([`Latency::stall_bound`]). Past it, the
//!   attempt is a stall: dropped (the engine cancels it), the instance's
//!   circuit opens at once, and another instance is tried.
//! - **Hedging** (per model): no first token after the model's recent p95
//!   → the same request goes to a second instance too; the first to bring
//!   a token wins and the other is dropped, so usage is counted once.
//! - **Mid-stream failover.** When the stream breaks off or goes silent
//!   past the gap bound, the router asks another instance to continue the
//!   generation: for chat, the conversation with the text so far as the
//!   final assistant message and vLLM's `continue_final_message`; for
//!   completions, the prompt followed by the text so far; with the tokens
//!   still owed as `max_tokens`. Its chunks are given the first answer's
//!   `id` and `created`, its role chunk is dropped and its usage is merged,
//!   so the client reads one stream.

use crate::error::RouterError;
use crate::keys::AuthedKey;
use crate::latency::{now_us, us};
use crate::pool::{Backend, InFlight, ModelPool, Waiting};
use crate::proxy::{
    event_usage, has_usage_object, insert_instance, split_events, usage_options, ClientUsage,
    CHAT_COMPLETIONS,
};
use crate::scan::{self, contains, has};
use crate::upstream::{Conn, UpstreamConns};
use crate::usage::{Counters, Meter, Tokens};
use crate::{Inner, RouterState};
use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::future::{select, Either};
use gpufleet_store::Outcome;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future as _;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// What a streamed request asks, owned by its stream.
pub(crate) struct Ask {
    pub state: RouterState,
    pub key: Arc<AuthedKey>,
    pub path: &'static str,
    /// The body sent upstream (`stream_options.include_usage` and
    /// `continuous_usage_stats` set).
    pub body: Bytes,
    pub model: String,
    pub session: Option<String>,
    /// The usage the client asked for (the rest is stripped on the way back).
    pub client_usage: ClientUsage,
    /// The request's accounting, done when the stream is dropped.
    pub meter: Meter,
}

/// Why an attempt failed before its first token.
enum Fail {
    /// No first token within the stall bound.
    Stall(Duration),
    Unreachable(String),
    Broken(String),
    /// A 5xx/429 answer, passed on as it is when no attempt is left.
    Answer(StatusCode, Option<HeaderValue>, Bytes),
}

/// One upstream attempt whose answer is being read.
struct Attempt {
    backend: Arc<Backend>,
    _in_flight: InFlight,
    waiting: Waiting,
    body: Incoming,
    conn: Option<Conn>,
    conns: Arc<UpstreamConns>,
    buf: BytesMut,
    ended: bool,
    sent_at: Instant,
    last_at: Instant,
    content_type: Option<HeaderValue>,
}

impl Attempt {
    /// The complete events that have arrived (at least one), or `None`
    /// at the end of the answer.
    fn poll_region(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, hyper::Error>> {
        if self.ended {
            return Poll::Ready(Ok(None));
        }
        loop {
            if let Some(c) = self.conn.as_mut() {
                if !c.drive(cx) {
                    self.conn = None;
                }
            }
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(d) = frame.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => {
                    self.ended = true;
                    if let Some(c) = self.conn.take() {
                        self.conns.put(&self.backend.conn_key, c);
                    }
                    if self.buf.is_empty() {
                        return Poll::Ready(Ok(None));
                    }
                    return Poll::Ready(Ok(Some(self.buf.split().freeze())));
                }
                Poll::Pending => break,
            }
        }
        match scan::LAST_EVENT_END.rfind(&self.buf) {
            Some(end) => Poll::Ready(Ok(Some(self.buf.split_to(end + 2).freeze()))),
            None => Poll::Pending,
        }
    }

    async fn next_region(&mut self) -> Result<Option<Bytes>, hyper::Error> {
        std::future::poll_fn(|cx| self.poll_region(cx)).await
    }
}

/// Whether a region holds more than a chat stream's opening role chunk
/// (a token, a finish, usage, an error or the end).
fn has_token(region: &[u8]) -> bool {
    split_events(region).any(|ev| {
        let role_only = has(ev, &scan::ROLE_KEY)
            && (has(ev, &scan::EMPTY_CONTENT) || !has(ev, &scan::CONTENT_KEY))
            && !has(ev, &scan::FINISHED)
            && !has(ev, &scan::TOOL_CALLS_KEY);
        !role_only && !ev.iter().all(u8::is_ascii_whitespace)
    })
}

/// The request to `b`, with the body `body`.
pub(crate) fn request(
    b: &Backend,
    path: &'static str,
    body: &Bytes,
) -> impl Fn() -> hyper::Request<Full<Bytes>> + use<> {
    let host = b.host_header.clone();
    let body = body.clone();
    move || {
        let mut r = hyper::Request::new(Full::new(body.clone()));
        *r.method_mut() = hyper::Method::POST;
        *r.uri_mut() = hyper::Uri::from_static(path);
        let h = r.headers_mut();
        if let Some(v) = &host {
            h.insert(header::HOST, v.clone());
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// Send `body` to `b` and read until its first token, within its stall
/// bound. On success: the attempt and the regions read so far.
async fn try_backend(
    inner: &Inner,
    conns: &Arc<UpstreamConns>,
    b: Arc<Backend>,
    path: &'static str,
    body: &Bytes,
) -> Result<(Attempt, Vec<Bytes>), Fail> {
    let cfg = &inner.config;
    let bound = if cfg.stall_detection {
        b.latency.stall_bound(
            cfg.stall_factor,
            Duration::from_millis(cfg.stall_floor_ms),
            Duration::from_millis(cfg.stall_ceiling_ms),
        )
    } else {
        cfg.first_byte_timeout()
    };
    let in_flight = InFlight::new(b.clone());
    let waiting = Waiting::new(b.clone());
    b.usage.request();
    let sent_at = Instant::now();
    let work = async {
        let Some(authority) = b.authority.clone() else {
            return Err(Fail::Unreachable("instance without an address".into()));
        };
        let make = request(&b, path, body);
        let (resp, conn) = conns
            .send(
                &b.conn_key,
                authority.as_str(),
                b.tls.as_ref(),
                cfg.connect_timeout(),
                make,
            )
            .await
            .map_err(|e| {
                if e.is_connect() {
                    Fail::Unreachable(e.to_string())
                } else {
                    Fail::Broken(e.to_string())
                }
            })?;
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
        let mut attempt = Attempt {
            backend: b.clone(),
            _in_flight: in_flight,
            waiting,
            body: resp.into_body(),
            conn: Some(conn),
            conns: conns.clone(),
            buf: BytesMut::new(),
            ended: false,
            sent_at,
            last_at: sent_at,
            content_type,
        };
        if !status.is_success() {
            let mut all = BytesMut::new();
            while let Ok(Some(r)) = attempt.next_region().await {
                all.extend_from_slice(&r);
            }
            return Err(Fail::Answer(
                status,
                attempt.content_type.clone(),
                all.freeze(),
            ));
        }
        let mut head = Vec::new();
        loop {
            match attempt.next_region().await {
                Err(e) => return Err(Fail::Broken(e.to_string())),
                Ok(None) => return Ok((attempt, head)),
                Ok(Some(r)) => {
                    let token = has_token(&r);
                    head.push(r);
                    if token {
                        return Ok((attempt, head));
                    }
                }
            }
        }
    };
    match tokio::time::timeout(bound, work).await {
        Err(_) => Err(Fail::Stall(bound)),
        Ok(r) => r,
    }
}

/// A routing event worth a line on the instance's timeline, written in
/// the background (at most one per instance and kind per second).
#[derive(Clone, Copy)]
pub(crate) enum Note {
    Ejected = 0,
    Readmitted = 1,
    Failover = 2,
    Hedge = 3,
    Stall = 4,
}

impl Note {
    fn action(self) -> &'static str {
        match self {
            Note::Ejected => "router.ejected",
            Note::Readmitted => "router.readmitted",
            Note::Failover => "router.stream_failover",
            Note::Hedge => "router.hedge",
            Note::Stall => "router.stall",
        }
    }
}

pub(crate) fn note(
    inner: &Inner,
    b: &Backend,
    kind: Note,
    outcome: Outcome,
    message: String,
    meta: Value,
) {
    if !b.may_note(kind as usize, now_us()) {
        return;
    }
    let fleet = inner.fleet.clone();
    let id = b.id;
    tokio::spawn(async move {
        if let Err(e) = fleet
            .note_routing(id, kind.action(), outcome, message, meta)
            .await
        {
            tracing::warn!(instance_id = %id, error = %e, "could not write a routing event on the timeline");
        }
    });
}

/// `b` failed an attempt: count it, and open its circuit (at once for a
/// stall, after the threshold otherwise).
fn failed(inner: &Inner, b: &Backend, why: &Fail) {
    let now = Instant::now();
    let (opened, reason) = match why {
        Fail::Stall(bound) => {
            Counters::bump(&b.usage.stalls);
            b.latency.observe_ttft(*bound, now_us());
            let why = format!("no first token within {} ms", bound.as_millis());
            note(
                inner,
                b,
                Note::Stall,
                Outcome::Failed,
                format!("a request stalled ({why}); it was tried on another instance"),
                json!({"bound_ms": bound.as_millis() as u64}),
            );
            (b.breaker.trip(now), why)
        }
        Fail::Unreachable(e) | Fail::Broken(e) => (b.breaker.failure(now), e.clone()),
        Fail::Answer(status, ..) if *status == StatusCode::TOO_MANY_REQUESTS => {
            // Busy, not broken.
            b.usage.error();
            b.breaker.success();
            return;
        }
        Fail::Answer(status, ..) => (b.breaker.failure(now), format!("answered {status}")),
    };
    b.usage.error();
    tracing::warn!(instance_id = %b.id, error = %reason, circuit_opened = opened, "upstream attempt failed");
    if opened {
        ejected(inner, b, &reason);
    }
}

pub(crate) fn ejected(inner: &Inner, b: &Backend, reason: &str) {
    Counters::bump(&b.usage.ejections);
    note(
        inner,
        b,
        Note::Ejected,
        Outcome::Failed,
        format!(
            "left the router's choice for {} s: {reason}",
            inner.config.breaker_cooldown().as_secs_f64()
        ),
        json!({"reason": reason}),
    );
}

/// `b` answered: close its circuit. True when that brought it back.
pub(crate) fn answered(inner: &Inner, b: &Backend) -> bool {
    let back = b.breaker.success();
    if back {
        note(
            inner,
            b,
            Note::Readmitted,
            Outcome::Success,
            "answered again; back in the router's choice".into(),
            Value::Null,
        );
    }
    back
}

/// A successful first token on `a`: record its timing.
fn first_token(inner: &Inner, a: &mut Attempt, model: &str) {
    let ttft = a.sent_at.elapsed();
    a.waiting.end();
    a.last_at = Instant::now();
    if answered(inner, &a.backend) {
        // Back from an open circuit: the stall that opened it is history.
        a.backend.latency.ttft.reset(us(ttft) as f64, now_us());
    } else {
        a.backend.latency.observe_ttft(ttft, now_us());
    }
    if inner.config.hedges(model) {
        inner.pools.recent_ttft(model).record(ttft);
    }
}

/// Choose and try instances until one brings a first token (hedging when
/// the model is hedged). `tried` collects every instance used.
async fn start(
    inner: &Inner,
    pool: &ModelPool,
    ask: &Ask,
    body: &Bytes,
    tried: &mut Vec<gpufleet_domain::InstanceId>,
    attempts: u32,
) -> Result<(Attempt, Vec<Bytes>), Option<Fail>> {
    let cfg = &inner.config;
    let conns = &inner.upstream;
    let mut last = None;
    for _ in 0..attempts {
        let Some(b) = pool.pick(
            cfg.policy,
            ask.session.as_deref(),
            tried,
            &inner.pools.rr,
            Instant::now(),
        ) else {
            break;
        };
        tried.push(b.id);
        let primary = try_backend(inner, conns, b.clone(), ask.path, body);
        let result = if cfg.hedges(&ask.model) {
            hedged(inner, pool, ask, body, tried, b.clone(), primary).await
        } else {
            primary.await.map_err(|f| (b.clone(), f))
        };
        match result {
            Ok((mut a, head)) => {
                first_token(inner, &mut a, &ask.model);
                return Ok((a, head));
            }
            Err((b, f)) => {
                failed(inner, &b, &f);
                last = Some(f);
            }
        }
    }
    Err(last)
}

type Started = Result<(Attempt, Vec<Bytes>), (Arc<Backend>, Fail)>;

/// `primary` (to `b`), and past the hedging delay a copy to another
/// instance: the first first token wins; the loser is dropped.
async fn hedged(
    inner: &Inner,
    pool: &ModelPool,
    ask: &Ask,
    body: &Bytes,
    tried: &mut Vec<gpufleet_domain::InstanceId>,
    b: Arc<Backend>,
    primary: impl std::future::Future<Output = Result<(Attempt, Vec<Bytes>), Fail>>,
) -> Started {
    let cfg = &inner.config;
    let min = Duration::from_millis(cfg.hedge_min_delay_ms);
    let delay = inner
        .pools
        .recent_ttft(&ask.model)
        .quantile(0.95)
        .unwrap_or_else(|| Duration::from_micros((b.latency.ttft_us() * 2.0) as u64))
        .max(min);
    let mut primary = pin!(primary);
    let primary = match select(primary.as_mut(), pin!(tokio::time::sleep(delay))).await {
        Either::Left((r, _)) => return r.map_err(|f| (b, f)),
        Either::Right(((), _)) => primary,
    };
    let Some(h) = pool.pick(
        cfg.policy,
        ask.session.as_deref(),
        tried,
        &inner.pools.rr,
        Instant::now(),
    ) else {
        return primary.await.map_err(|f| (b, f));
    };
    tried.push(h.id);
    Counters::bump(&h.usage.hedges);
    let hedge = pin!(try_backend(
        inner,
        &inner.upstream,
        h.clone(),
        ask.path,
        body
    ));
    let hedge_note = |winner: &Backend, loser: &Backend| {
        note(
            inner,
            &h,
            Note::Hedge,
            Outcome::Info,
            format!(
                "hedged a request after {} ms without a first token on {}; {} answered first",
                delay.as_millis(),
                b.id,
                winner.id
            ),
            json!({"primary": b.id, "hedge": h.id, "winner": winner.id, "loser": loser.id}),
        );
    };
    match select(primary, hedge).await {
        Either::Left((Ok(r), _)) => {
            hedge_note(&b, &h);
            Ok(r)
        }
        Either::Right((Ok(r), _)) => {
            hedge_note(&h, &b);
            Ok(r)
        }
        Either::Left((Err(f), hedge)) => {
            failed(inner, &b, &f);
            hedge.await.map_err(|f| (h.clone(), f))
        }
        Either::Right((Err(f), primary)) => {
            failed(inner, &h, &f);
            primary.await.map_err(|f| (b.clone(), f))
        }
    }
}

/// Find an instance that brings a first token, and the relay of its
/// stream; or the answer to give when none does.
async fn begin(ask: Ask, pool: Arc<ModelPool>) -> Result<Relay, Result<Response, RouterError>> {
    let inner = &*ask.state.inner;
    let cfg = &inner.config;
    let mut tried = Vec::new();
    let body = ask.body.clone();
    match start(inner, &pool, &ask, &body, &mut tried, cfg.retries + 1).await {
        Ok((attempt, head)) => {
            let mut ask = ask;
            ask.meter.served_by(&attempt.backend);
            Ok(Relay {
                ask,
                pool,
                attempt,
                queue: head.into(),
                sent: Vec::new(),
                continuing: None,
                tried,
                failovers: 0,
                done: false,
                deadline: Box::pin(tokio::time::sleep(Duration::ZERO)),
                seen: None,
                prompt_charged: false,
            })
        }
        Err(None) => Err(Err(RouterError::AllCircuitsOpen {
            model: ask.model.clone(),
        })),
        Err(Some(f)) => {
            let mut ask = ask;
            ask.meter.failed();
            let model = ask.model.clone();
            Err(match f {
                Fail::Stall(_) => Err(RouterError::Timeout { model }),
                Fail::Unreachable(_) => Err(RouterError::Unreachable { model }),
                Fail::Broken(_) => Err(RouterError::UpstreamBroken { model }),
                Fail::Answer(status, ct, bytes) => {
                    let mut r = Response::new(Body::from(bytes));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        ct.unwrap_or(HeaderValue::from_static("application/json")),
                    );
                    Ok(r)
                }
            })
        }
    }
}

/// Answer a streamed request.
pub(crate) async fn forward(ask: Ask, pool: Arc<ModelPool>) -> Result<Response, RouterError> {
    let relay = match begin(ask, pool).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let content_type = relay.attempt.content_type.clone();
    let first = relay.attempt.backend.clone();
    let mut out = Response::new(Body::from_stream(futures::stream::unfold(
        relay,
        |mut r| async move { r.next().await.map(|item| (item, r)) },
    )));
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("text/event-stream")),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    insert_instance(h, &first);
    Ok(out)
}

/// Answer a non-streaming request that was sent upstream as a stream (see
/// [`as_stream`]), so it too is retried on a stall before its first token
/// and continued elsewhere when it breaks off: the stream is read to its
/// end and put together as the one answer the client asked for.
pub(crate) async fn forward_whole(ask: Ask, pool: Arc<ModelPool>) -> Result<Response, RouterError> {
    let path = ask.path;
    let model = ask.model.clone();
    let mut relay = match begin(ask, pool).await {
        Ok(r) => r,
        Err(answer) => return answer,
    };
    let mut events = Vec::new();
    while let Some(item) = relay.next().await {
        match item {
            Ok(b) => events.push(b),
            Err(e) => {
                tracing::warn!(model = %model, error = %e, "a whole answer broke off and could not be continued");
                return Err(RouterError::UpstreamBroken { model });
            }
        }
    }
    let (status, body) = assemble(path, &events);
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The instance that gave the last part of the answer.
    insert_instance(r.headers_mut(), &relay.attempt.backend);
    Ok(r)
}

/// A non-streaming request's body as a streamed one (with usage), or
/// `None` when the answer could not be put together faithfully from a
/// stream (several choices, tools, log-probabilities, echo).
pub(crate) fn as_stream(body: &[u8]) -> Option<Bytes> {
    const SIGNS: [&[u8]; 9] = [
        b"\"tools\"",
        b"\"functions\"",
        b"logprobs\"",
        b"\"echo\"",
        b"\"best_of\"",
        b"\"n\"",
        b"\"stream\"",
        b"\"stream_options\"",
        b"\"suffix\"",
    ];
    let start = body.iter().position(|c| !c.is_ascii_whitespace())?;
    if body[start] == b'{' && !SIGNS.iter().any(|s| contains(body, s)) {
        // The usual request: insert the members rather than parse it all.
        const MEMBERS: &[u8] = b"\"stream\":true,\"stream_options\":{\"include_usage\":true,\"continuous_usage_stats\":true},";
        let mut out = BytesMut::with_capacity(body.len() + MEMBERS.len());
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(MEMBERS);
        out.extend_from_slice(&body[start + 1..]);
        return Some(out.freeze());
    }
    let mut v: Map<String, Value> = serde_json::from_slice(body).ok()?;
    let truthy = |k: &str| match v.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(_) => true,
    };
    if [
        "tools",
        "functions",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
        "echo",
        "suffix",
    ]
    .iter()
    .any(|k| truthy(k))
        || v.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1)
        || v.get("best_of")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 1)
    {
        return None;
    }
    v.insert("stream".into(), true.into());
    v.insert("stream_options".into(), usage_options());
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// The `data:` of a one-line event, without a copy (`None` for others).
fn event_data(ev: &[u8]) -> Option<&[u8]> {
    let ev = ev.strip_prefix(b"data:")?;
    let ev = ev.trim_ascii();
    (!ev.contains(&b'\n')).then_some(ev)
}

#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    created: Option<u64>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    usage: Option<ChunkUsage>,
    error: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
    stop_reason: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reasoning_content: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct ChunkUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

/// The whole answer put together from a stream's events, in the shape a
/// non-streaming request gets (or the error the stream carried).
fn assemble(path: &str, events: &[Bytes]) -> (StatusCode, Bytes) {
    let chat = path == CHAT_COMPLETIONS;
    let mut id = String::new();
    let mut created = 0;
    let mut model = String::new();
    let mut text = String::new();
    let mut reasoning: Option<String> = None;
    let mut finish: Option<String> = None;
    let mut stop_reason = Value::Null;
    let mut usage: Option<ChunkUsage> = None;
    for ev in events.iter().flat_map(|r| split_events(r)) {
        let Some(data) = event_data(ev) else { continue };
        let Ok(c) = serde_json::from_slice::<Chunk>(data) else {
            continue;
        };
        if c.error.is_some() {
            let v: Value = serde_json::from_slice(data).unwrap_or(Value::Null);
            let status = v
                .pointer("/error/code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, Bytes::copy_from_slice(data));
        }
        if id.is_empty() {
            id = c.id.as_deref().unwrap_or_default().to_string();
            created = c.created.unwrap_or(0);
            model = c.model.as_deref().unwrap_or_default().to_string();
        }
        if c.usage.is_some() {
            usage = c.usage;
        }
        for ch in c.choices {
            let piece = if chat {
                ch.delta.as_ref().and_then(|d| d.content.as_deref())
            } else {
                ch.text.as_deref()
            };
            if let Some(p) = piece {
                text.push_str(p);
            }
            if let Some(r) = ch
                .delta
                .as_ref()
                .and_then(|d| d.reasoning_content.as_deref())
            {
                reasoning.get_or_insert_with(String::new).push_str(r);
            }
            if let Some(f) = ch.finish_reason {
                finish = Some(f.into_owned());
                stop_reason = ch.stop_reason.unwrap_or(Value::Null);
            }
        }
    }
    let choice = if chat {
        let mut message = json!({"role": "assistant", "content": text, "tool_calls": []});
        if let Some(r) = reasoning {
            message["reasoning_content"] = r.into();
        }
        json!({"index": 0, "message": message, "logprobs": null,
               "finish_reason": finish, "stop_reason": stop_reason})
    } else {
        json!({"index": 0, "text": text, "logprobs": null,
               "finish_reason": finish, "stop_reason": stop_reason})
    };
    let whole = json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage,
    });
    (StatusCode::OK, Bytes::from(whole.to_string()))
}

/// A continuation in progress: what its chunks are rewritten with.
struct Continuing {
    id: Value,
    created: Value,
    /// Tokens relayed before it.
    relayed: u64,
}

/// The stream on its way to the client.
struct Relay {
    ask: Ask,
    pool: Arc<ModelPool>,
    attempt: Attempt,
    /// Regions read and not yet passed on.
    queue: VecDeque<Bytes>,
    /// Every region passed on so far (kept only while a failover may
    /// need the text).
    sent: Vec<Bytes>,
    continuing: Option<Continuing>,
    tried: Vec<gpufleet_domain::InstanceId>,
    failovers: u32,
    done: bool,
    /// Fires when the stream may have gone silent too long (see `next`).
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The current attempt's usage so far, as its engine last reported it
    /// (every chunk carries it with `continuous_usage_stats`).
    seen: Option<Tokens>,
    /// Whether the key was charged the prompt already (by an earlier
    /// attempt: a continuation reads it again, at our expense).
    prompt_charged: bool,
}

/// The drop guard of a stream: however it ends (its client gone
/// mid-stream included), what the current attempt generated is counted.
impl Drop for Relay {
    fn drop(&mut self) {
        self.close_attempt(None);
    }
}

impl Relay {
    async fn next(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(r) = self.queue.pop_front() {
                let out = self.emit(r);
                if out.is_empty() {
                    continue;
                }
                return Some(Ok(out));
            }
            let inner = &*self.ask.state.inner;
            let cfg = &inner.config;
            let gap = if cfg.stall_detection {
                self.attempt.backend.latency.gap_bound(
                    cfg.stall_factor,
                    Duration::from_millis(cfg.stall_gap_floor_ms),
                    cfg.idle_timeout(),
                )
            } else {
                cfg.idle_timeout()
            };
            // One timer for the whole stream, moved only when it fires
            // before the silence is long enough (not once per event).
            let got = {
                let Relay {
                    attempt, deadline, ..
                } = self;
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = attempt.poll_region(cx) {
                        return Poll::Ready(Some(r));
                    }
                    loop {
                        match deadline.as_mut().poll(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(()) => {
                                let due = attempt.last_at + gap;
                                if Instant::now() >= due {
                                    return Poll::Ready(None);
                                }
                                deadline.as_mut().reset(due.into());
                            }
                        }
                    }
                })
                .await
            };
            let why = match got.ok_or(()) {
                Ok(Ok(Some(r))) => {
                    let now = Instant::now();
                    let b = &self.attempt.backend;
                    b.latency.observe_itl(now - self.attempt.last_at, now_us());
                    self.attempt.last_at = now;
                    self.queue.push_back(r);
                    continue;
                }
                Ok(Ok(None)) => {
                    self.done = true;
                    self.close_attempt(None);
                    return None;
                }
                Ok(Err(e)) => Fail::Broken(format!("the stream broke off: {e}")),
                Err(_) => Fail::Stall(gap),
            };
            let b = self.attempt.backend.clone();
            let mid = match &why {
                Fail::Stall(g) => format!("no token for {} ms mid-stream", g.as_millis()),
                Fail::Broken(e) => e.clone(),
                _ => String::new(),
            };
            // Mid-stream: a stall opens the circuit at once, like one
            // before the first token.
            let opened = match why {
                Fail::Stall(_) => {
                    Counters::bump(&b.usage.stalls);
                    note(
                        inner,
                        &b,
                        Note::Stall,
                        Outcome::Failed,
                        format!("a stream stalled ({mid})"),
                        Value::Null,
                    );
                    b.breaker.trip(Instant::now())
                }
                _ => b.breaker.failure(Instant::now()),
            };
            b.usage.error();
            if opened {
                ejected(inner, &b, &mid);
            }
            tracing::warn!(instance_id = %b.id, error = %mid, "stream from instance failed");
            // Boxed: the rare failover keeps its large state off the
            // per-event future.
            match Box::pin(self.failover(&mid)).await {
                Ok(true) => continue,
                Ok(false) => {
                    // The answer was complete already: end it properly.
                    self.done = true;
                    self.close_attempt(None);
                    return Some(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
                }
                Err(e) => {
                    self.done = true;
                    self.close_attempt(None);
                    self.ask.key.usage.error();
                    self.ask.meter.failed();
                    return Some(Err(std::io::Error::other(e)));
                }
            }
        }
    }

    /// Pass a region on: usage counted (and merged or stripped), a
    /// continuation's chunks rewritten, the text kept for a failover.
    fn emit(&mut self, region: Bytes) -> Bytes {
        let out = match &self.continuing {
            None => self.scan(region),
            Some(_) => self.rewrite(&region),
        };
        if self.ask.state.inner.config.stream_failover && !out.is_empty() {
            self.sent.push(out.clone());
        }
        out
    }

    /// The current attempt is over (ended, broke off, or the client went
    /// away): count what it generated, as its engine last reported it, on
    /// its instance and for the key (the prompt once per request; a
    /// continuation's re-read of the text so far is ours). Without any
    /// report, `generated` completion tokens if known.
    fn close_attempt(&mut self, generated: Option<u64>) {
        let raw = match (self.seen.take(), generated) {
            (Some(t), _) => t,
            (None, Some(n)) => Tokens {
                prompt: 0,
                completion: n,
            },
            (None, None) => return,
        };
        let b = self.attempt.backend.clone();
        b.usage.tokens(raw);
        let relayed = self.continuing.as_ref().map_or(0, |c| c.relayed);
        let for_key = Tokens {
            prompt: if self.prompt_charged {
                0
            } else {
                raw.prompt.saturating_sub(relayed)
            },
            completion: raw.completion,
        };
        if raw.prompt > 0 {
            self.prompt_charged = true;
        }
        self.ask.meter.tokens(&b, for_key);
    }

    /// The first answer's regions: the usage so far noted, and stripped
    /// where the client did not ask for it.
    fn scan(&mut self, region: Bytes) -> Bytes {
        if !has_usage_object(&region) {
            return region;
        }
        let mode = self.ask.client_usage;
        if mode == ClientUsage::Every {
            for ev in split_events(&region) {
                if let Some((t, _, _)) = event_usage(ev) {
                    self.seen = Some(t);
                }
            }
            return region;
        }
        let mut kept = BytesMut::with_capacity(region.len());
        for ev in split_events(&region) {
            let Some((t, only, cut)) = event_usage(ev) else {
                kept.extend_from_slice(ev);
                continue;
            };
            self.seen = Some(t);
            if only {
                if mode == ClientUsage::Last {
                    kept.extend_from_slice(ev);
                }
                continue;
            }
            kept.extend_from_slice(&ev[..cut.start]);
            kept.extend_from_slice(&ev[cut.end..]);
        }
        kept.freeze()
    }

    /// A continuation's region: role chunk dropped, `id`/`created` of the
    /// first answer, usage merged with what was relayed before.
    fn rewrite(&mut self, region: &[u8]) -> Bytes {
        let Some(c) = &self.continuing else {
            return Bytes::copy_from_slice(region);
        };
        let mut out = BytesMut::new();
        for ev in split_events(region) {
            let Some(mut v) = event_json(ev) else {
                out.extend_from_slice(ev);
                continue;
            };
            let choices = v.get("choices").and_then(Value::as_array);
            let role_only = choices.is_some_and(|cs| {
                cs.iter().all(|ch| {
                    ch.pointer("/delta/role").is_some()
                        && ch
                            .pointer("/delta/content")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                        && ch.get("finish_reason").is_none_or(Value::is_null)
                })
            }) && choices.is_some_and(|cs| !cs.is_empty());
            if role_only {
                continue;
            }
            v["id"] = c.id.clone();
            v["created"] = c.created.clone();
            if let Some(u) = v.get("usage").filter(|u| u.is_object()).cloned() {
                let prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
                let completion = u["completion_tokens"].as_u64().unwrap_or(0);
                // This instance read the text so far as prompt; counted
                // when the attempt is over.
                self.seen = Some(Tokens { prompt, completion });
                let merged = Tokens {
                    prompt: prompt.saturating_sub(c.relayed),
                    completion: completion + c.relayed,
                };
                let only = v
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
                let keep = match self.ask.client_usage {
                    ClientUsage::Every => true,
                    ClientUsage::Last => only,
                    ClientUsage::None => false,
                };
                if keep {
                    v["usage"] = json!({
                        "prompt_tokens": merged.prompt,
                        "completion_tokens": merged.completion,
                        "total_tokens": merged.prompt + merged.completion,
                    });
                } else if only {
                    continue;
                } else if let Some(o) = v.as_object_mut() {
                    o.remove("usage");
                }
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(v.to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
        }
        out.freeze()
    }

    /// Continue the generation on another instance. `Ok(false)`: nothing
    /// to continue (the answer had finished).
    async fn failover(&mut self, why: &str) -> Result<bool, String> {
        let state = self.ask.state.clone();
        let inner = &*state.inner;
        let cfg = &inner.config;
        if !cfg.stream_failover {
            return Err(why.to_string());
        }
        if self.failovers >= cfg.max_stream_failovers {
            return Err(format!("{why} (after {} continuations)", self.failovers));
        }
        let so_far = SoFar::read(&self.sent);
        if so_far.finished {
            return Ok(false);
        }
        let Some(body) = continuation(&self.ask.body, self.ask.path, &so_far) else {
            return Err(format!(
                "{why} (this request cannot be continued elsewhere)"
            ));
        };
        self.failovers += 1;
        let from = self.attempt.backend.clone();
        Counters::bump(&from.usage.failovers);
        // What the broken attempt generated, counted on it (as its engine
        // last reported it, else the tokens it relayed).
        let before = self.continuing.as_ref().map_or(0, |c| c.relayed);
        self.close_attempt(Some(so_far.tokens.saturating_sub(before)));
        let body = Bytes::from(body);
        let pool = self.pool.clone();
        let (attempt, head) = start(
            inner,
            &pool,
            &self.ask,
            &body,
            &mut self.tried,
            cfg.retries + 1,
        )
        .await
        .map_err(|_| format!("{why} (no other instance could continue it)"))?;
        note(
            inner,
            &from,
            Note::Failover,
            Outcome::Failed,
            format!(
                "a stream broke off here after {} tokens ({why}); continued on {}",
                so_far.tokens, attempt.backend.id
            ),
            json!({"continued_on": attempt.backend.id, "tokens": so_far.tokens, "reason": why}),
        );
        tracing::info!(from = %from.id, to = %attempt.backend.id, tokens = so_far.tokens, "stream continued on another instance");
        self.attempt = attempt;
        self.ask.meter.served_by(&self.attempt.backend);
        self.continuing = Some(Continuing {
            id: so_far.id,
            created: so_far.created,
            relayed: so_far.tokens,
        });
        self.queue.extend(head);
        Ok(true)
    }
}

/// The JSON of one `data:` event (`None` for `[DONE]` and the like).
fn event_json(ev: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(ev).ok()?;
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(&data).ok().filter(Value::is_object)
}

/// What the client has been sent so far.
struct SoFar {
    text: String,
    tokens: u64,
    id: Value,
    created: Value,
    finished: bool,
}

impl SoFar {
    fn read(sent: &[Bytes]) -> SoFar {
        let mut s = SoFar {
            text: String::new(),
            tokens: 0,
            id: Value::Null,
            created: Value::Null,
            finished: false,
        };
        for ev in sent.iter().flat_map(|r| split_events(r)) {
            if contains(ev, b"[DONE]") && event_json(ev).is_none() {
                s.finished = true;
                continue;
            }
            let Some(v) = event_json(ev) else { continue };
            if s.id.is_null() {
                s.id = v.get("id").cloned().unwrap_or(Value::Null);
                s.created = v.get("created").cloned().unwrap_or(Value::Null);
            }
            for ch in v
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let piece = ch
                    .pointer("/delta/content")
                    .or_else(|| ch.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !piece.is_empty() {
                    s.text.push_str(piece);
                    s.tokens += 1;
                }
                if ch.get("finish_reason").is_some_and(|f| !f.is_null()) {
                    s.finished = true;
                }
            }
        }
        s
    }
}

/// The request that continues `so_far`, or `None` when this request
/// cannot be continued faithfully (several choices, tools, echo, token
/// prompts, nothing owed).
fn continuation(body: &[u8], path: &str, so_far: &SoFar) -> Option<Vec<u8>> {
    let mut v: Map<String, Value> = serde_json::from_slice(body).ok()?;
    if v.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1)
        || v.get("best_of")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 1)
        || v.get("echo").and_then(Value::as_bool) == Some(true)
    {
        return None;
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = v.get(field).and_then(Value::as_u64) {
            let left = n.checked_sub(so_far.tokens).filter(|l| *l > 0)?;
            v.insert(field.into(), left.into());
        }
    }
    if path == CHAT_COMPLETIONS {
        let tools = v
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
        if tools || v.get("functions").is_some() {
            return None;
        }
        let messages = v.get_mut("messages")?.as_array_mut()?;
        messages.push(json!({"role": "assistant", "content": so_far.text}));
        v.insert("continue_final_message".into(), true.into());
        v.insert("add_generation_prompt".into(), false.into());
    } else {
        let prompt = match v.get("prompt")? {
            Value::String(p) => p.clone(),
            Value::Array(ps) if ps.len() == 1 => ps[0].as_str()?.to_string(),
            _ => return None,
        };
        v.insert("prompt".into(), format!("{prompt}{}", so_far.text).into());
    }
    v.insert("stream".into(), true.into());
    v.insert("stream_options".into(), usage_options());
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(events: &[&str]) -> Vec<Bytes> {
        vec![Bytes::from(
            events
                .iter()
                .map(|e| format!("data: {e}\n\n"))
                .collect::<String>(),
        )]
    }

    #[test]
    fn whole_requests_go_upstream_as_streams_when_they_can() {
        let b = as_stream(br#"{"model":"m","messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        let b = as_stream(br#"{"model":"m","stream":false,"n":1,"logprobs":false,"messages":[]}"#)
            .unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (v["stream"].clone(), v["n"].clone()),
            (json!(true), json!(1))
        );
        for body in [
            &br#"{"model":"m","n":2,"messages":[]}"#[..],
            br#"{"model":"m","logprobs":true,"top_logprobs":2,"messages":[]}"#,
            br#"{"model":"m","tools":[{"type":"function"}],"messages":[]}"#,
            br#"{"model":"m","prompt":"x","echo":true}"#,
            br#"{"model":"m","prompt":"x","logprobs":3}"#,
        ] {
            assert!(
                as_stream(body).is_none(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_stream_makes_a_whole_answer() {
        let events = sent(&[
            r#"{"id":"c1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"the"},"finish_reason":null}]}"#,
            r#"{"id":"c1","created":7,"model":"m","choices":[{"index":0,"delta":{"content":" fleet"},"finish_reason":"length","stop_reason":null}]}"#,
            r#"{"id":"c1","created":7,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
            "[DONE]",
        ]);
        let (status, body) = assemble(CHAT_COMPLETIONS, &events);
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["choices"][0]["message"]["content"], "the fleet");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 5);
        let events = sent(&[r#"{"id":"x","choices":[{"index":0,"text":" a"}]}"#]);
        let (_, body) = assemble("/v1/completions", &events);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (v["object"].clone(), v["choices"][0]["text"].clone()),
            (json!("text_completion"), json!(" a"))
        );
        let (status, _) = assemble(
            CHAT_COMPLETIONS,
            &sent(&[r#"{"error":{"message":"boom","code":400}}"#]),
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn role_chunks_are_not_tokens() {
        assert!(!has_token(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n"
        ));
        assert!(has_token(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":null}]}\n\n"
        ));
        assert!(has_token(b"data: {\"choices\":[{\"text\":\" a\"}]}\n\n"));
        assert!(has_token(b"data: [DONE]\n\n"));
    }

    #[test]
    fn reads_the_text_so_far() {
        let s = SoFar::read(&sent(&[
            r#"{"id":"c1","created":7,"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"id":"c1","created":7,"choices":[{"delta":{"content":"the"}}]}"#,
            r#"{"id":"c1","created":7,"choices":[{"delta":{"content":" fleet"}}]}"#,
        ]));
        assert_eq!(
            (s.text.as_str(), s.tokens, s.finished),
            ("the fleet", 2, false)
        );
        assert_eq!((s.id, s.created), (json!("c1"), json!(7)));
        let done = SoFar::read(&sent(&[
            r#"{"id":"c1","choices":[{"delta":{"content":"x"},"finish_reason":"length"}]}"#,
        ]));
        assert!(done.finished);
    }

    #[test]
    fn continuations_of_chat_and_completions() {
        let so_far = SoFar {
            text: "the fleet".into(),
            tokens: 2,
            id: json!("c"),
            created: json!(1),
            finished: false,
        };
        let chat = br#"{"model":"m","stream":true,"max_tokens":5,"seed":3,"messages":[{"role":"user","content":"hi"}]}"#;
        let c: Value =
            serde_json::from_slice(&continuation(chat, CHAT_COMPLETIONS, &so_far).unwrap())
                .unwrap();
        assert_eq!(c["max_tokens"], 3);
        assert_eq!(c["seed"], 3);
        assert_eq!(c["continue_final_message"], true);
        assert_eq!(c["add_generation_prompt"], false);
        assert_eq!(
            c["messages"][1],
            json!({"role": "assistant", "content": "the fleet"})
        );
        let cmpl = br#"{"model":"m","stream":true,"prompt":["once"],"max_tokens":9}"#;
        let c: Value =
            serde_json::from_slice(&continuation(cmpl, "/v1/completions", &so_far).unwrap())
                .unwrap();
        assert_eq!(c["prompt"], "oncethe fleet");
        assert_eq!(c["max_tokens"], 7);
        // What cannot be continued faithfully is not.
        for body in [
            &br#"{"model":"m","n":2,"messages":[]}"#[..],
            br#"{"model":"m","max_tokens":2,"messages":[]}"#,
            br#"{"model":"m","tools":[{"type":"function"}],"messages":[]}"#,
        ] {
            assert!(continuation(body, CHAT_COMPLETIONS, &so_far).is_none());
        }
    }
}
