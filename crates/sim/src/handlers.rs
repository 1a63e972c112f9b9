//! HTTP routes.

use std::convert::Infallible;
use std::sync::Arc;

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
use crate::openai::{self, Endpoint, GenRequest, ResponseMeta};
use crate::state::SimState;
use crate::text;

pub fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
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
    let req = GenRequest::parse(endpoint, body)?;
    if req.model != state.model {
        return Err(ApiError::model_not_found(&req.model));
    }
    if !state.is_loaded() {
        return Err(ApiError::loading());
    }
    let meta = ResponseMeta::new(endpoint, &state.model);
    if req.stream {
        return Ok(stream_response(state, req, meta).into_response());
    }
    // Non-streaming: wait for a slot here; if the client goes away, axum
    // drops this future and the guards give the slot back.
    let slot = state
        .scheduler
        .admit()
        .await
        .ok_or_else(|| ApiError::internal("scheduler closed"))?;
    let tokens: Vec<text::Token> =
        text::generate(state.clone(), slot, req.prompt_tokens, req.max_tokens)
            .collect()
            .await;
    let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
    let completion_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    Ok(Json(openai::full_response(
        &meta,
        &text,
        req.prompt_tokens,
        completion_tokens,
    ))
    .into_response())
}

fn data(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// SSE in OpenAI's chunk shapes, ending with `data: [DONE]`. The request
/// waits for a slot inside the stream, so a client that disconnects while
/// waiting or generating is dropped from the counts at once.
fn stream_response(
    state: Arc<SimState>,
    req: GenRequest,
    meta: ResponseMeta,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let meta = Arc::new(meta);
    let (prompt_tokens, max_tokens, include_usage) =
        (req.prompt_tokens, req.max_tokens, req.include_usage);
    let tokens = {
        let state = state.clone();
        stream::once(async move { state.scheduler.admit().await.map(|slot| (state, slot)) })
            .flat_map(move |admitted| match admitted {
                Some((state, slot)) => {
                    text::generate(state, slot, prompt_tokens, max_tokens).left_stream()
                }
                None => stream::empty().right_stream(),
            })
    };
    let role = openai::role_chunk(&meta).map(|v| data(&v));
    let body = {
        let meta = meta.clone();
        tokens.map(move |t| data(&openai::token_chunk(&meta, &t.text)))
    };
    let tail = stream::iter({
        let mut tail = vec![data(&openai::finish_chunk(&meta))];
        if include_usage {
            tail.push(data(&openai::usage_chunk(&meta, prompt_tokens, max_tokens)));
        }
        tail.push(Ok(Event::default().data("[DONE]")));
        tail
    });
    Sse::new(stream::iter(role).chain(body).chain(tail))
}
