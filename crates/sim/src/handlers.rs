//! HTTP routes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{stream, Stream, StreamExt};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::knobs::{FailureKind, TextMode};
use crate::openai::{self, Endpoint, GenRequest, ResponseMeta};
use crate::scheduler::Ticket;
use crate::state::SimState;
use crate::text;

pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route(
            "/admin/config",
            get(crate::admin::get_config).patch(crate::admin::patch_config),
        )
        .with_state(state)
}

async fn health(State(state): State<Arc<SimState>>) -> StatusCode {
    if state.is_loaded() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn models(State(state): State<Arc<SimState>>) -> Result<Json<Value>, ApiError> {
    if !state.is_loaded() {
        return Err(ApiError::loading());
    }
    Ok(Json(json!({
        "object": "list",
        "data": [{
            "id": state.model,
            "object": "model",
            "created": 0,
            "owned_by": "gpufleet-sim",
            "root": state.model,
            "parent": null,
        }],
    })))
}

async fn metrics(State(state): State<Arc<SimState>>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(&state),
    )
        .into_response()
}

async fn completions(
    State(state): State<Arc<SimState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    generate(state, Endpoint::Completions, &body).await
}

async fn chat_completions(
    State(state): State<Arc<SimState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    generate(state, Endpoint::Chat, &body).await
}

async fn generate(
    state: Arc<SimState>,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let req = GenRequest::parse(endpoint, body)?;
    if req.model != state.model {
        return Err(ApiError::model_not_found(&req.model));
    }
    if !state.is_loaded() {
        return Err(ApiError::loading());
    }
    let knobs = state.knobs();
    let draw = knobs.draw_failure(&mut rand::rng());
    match draw {
        Some(FailureKind::ServerError) => {
            state
                .counters
                .injected_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::internal("Injected failure (server_error)."));
        }
        Some(FailureKind::RateLimit) => {
            state
                .counters
                .injected_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::rate_limited("Injected failure (rate_limit)."));
        }
        Some(FailureKind::Stall) => {
            state
                .counters
                .injected_failures
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(knobs.stall_ms)).await;
        }
        Some(FailureKind::StallMidStream) => {
            state
                .counters
                .injected_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        None => {}
    }
    let ticket = state.scheduler.enter(knobs.max_waiting).map_err(|_| {
        state
            .counters
            .rejected_queue_full
            .fetch_add(1, Ordering::Relaxed);
        ApiError::rate_limited("The waiting queue is full; retry later.")
    })?;
    let max_tokens = if req.max_tokens_given {
        req.max_tokens
    } else {
        knobs.default_max_tokens
    };
    let plan = text::Plan {
        prompt_tokens: req.prompt_tokens,
        max_tokens,
        echo: (knobs.mode == TextMode::Echo).then(|| {
            req.prompt_text
                .split_whitespace()
                .map(str::to_string)
                .collect()
        }),
        arrived,
        seed: req.seed,
        context_tokens: req.context_tokens,
        leading_space: req.leading_space && knobs.mode == TextMode::Random,
        stall_after: None,
        knobs,
    };
    let mut plan = plan;
    if draw == Some(FailureKind::StallMidStream) {
        plan.stall_after = Some(plan.planned_tokens() / 2);
    }
    let meta = ResponseMeta::new(endpoint, &state.model);
    if req.stream {
        return Ok(stream_response(
            state,
            ticket,
            plan,
            Usage {
                last: req.include_usage,
                every: req.continuous_usage,
            },
            meta,
        )
        .into_response());
    }
    // Non-streaming: wait for a slot here; if the client goes away, axum
    // drops this future and the guards give the slot back.
    let slot = ticket
        .run()
        .await
        .ok_or_else(|| ApiError::internal("scheduler closed"))?;
    let prompt_tokens = plan.prompt_tokens;
    let tokens: Vec<text::Token> = text::generate(state.clone(), slot, plan).collect().await;
    let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
    let completion_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    let finish = if completion_tokens < max_tokens {
        "stop"
    } else {
        "length"
    };
    Ok(Json(openai::full_response(
        &meta,
        &text,
        prompt_tokens,
        completion_tokens,
        finish,
    ))
    .into_response())
}

fn data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// Which chunks of a stream carry the usage.
#[derive(Clone, Copy)]
struct Usage {
    /// `include_usage`: a last chunk with no choices and the usage.
    last: bool,
    /// `continuous_usage_stats` (vLLM's): every chunk carries the usage so
    /// far (prompt tokens, completion tokens generated until then, total).
    every: bool,
}

/// SSE in OpenAI's chunk shapes, ending with `data: [DONE]`. The request
/// waits for a slot inside the stream, so a client that disconnects while
/// waiting or generating is dropped from the counts at once.
fn stream_response(
    state: Arc<SimState>,
    ticket: Ticket,
    plan: text::Plan,
    usage: Usage,
    meta: ResponseMeta,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let meta = Arc::new(meta);
    let (prompt_tokens, max_tokens) = (plan.prompt_tokens, plan.max_tokens);
    let produced = Arc::new(AtomicU32::new(0));
    let tokens = {
        let state = state.clone();
        stream::once(async move { ticket.run().await.map(|slot| (state, slot, plan)) }).flat_map(
            |admitted| match admitted {
                Some((state, slot, plan)) => text::generate(state, slot, plan).left_stream(),
                None => stream::empty().right_stream(),
            },
        )
    };
    let so_far = move |mut v: Value, n: u32| {
        if usage.every {
            v["usage"] = openai::usage(prompt_tokens, n);
        }
        v
    };
    let role = openai::role_chunk(&meta).map(|v| data(&so_far(v, 0)));
    let body = {
        let meta = meta.clone();
        let produced = produced.clone();
        tokens.map(move |t| {
            let n = produced.fetch_add(1, Ordering::Relaxed) + 1;
            data(&so_far(openai::token_chunk(&meta, &t.text), n))
        })
    };
    let tail = stream::once(async move {
        let n = produced.load(Ordering::Relaxed);
        let finish = if n < max_tokens { "stop" } else { "length" };
        let mut tail = vec![data(&so_far(openai::finish_chunk(&meta, finish), n))];
        if usage.last {
            tail.push(data(&openai::usage_chunk(&meta, prompt_tokens, n)));
        }
        tail.push(Ok(Event::default().data("[DONE]")));
        stream::iter(tail)
    })
    .flatten();
    Sse::new(stream::iter(role).chain(body).chain(tail))
}
