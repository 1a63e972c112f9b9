//! The OpenAI request shapes the simulator understands, their validation,
//! and the response / stream-chunk shapes it answers with.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::text::count_tokens;

pub const DEFAULT_MAX_TOKENS: u32 = 16;
/// Upper bound of `max_tokens`, so a request cannot ask for an endless stream.
pub const MAX_TOKENS_LIMIT: u32 = 32_768;

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    /// vLLM's: usage (so far) in every chunk, not only the last.
    #[serde(default)]
    continuous_usage_stats: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    model: String,
    prompt: Prompt,
    max_tokens: Option<u32>,
    seed: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<ChatMessage>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    seed: Option<i64>,
    /// vLLM's extension: the final (assistant) message is an answer to
    /// continue, not a turn to answer.
    continue_final_message: Option<bool>,
    /// vLLM's extension: open a new assistant turn (default true).
    add_generation_prompt: Option<bool>,
}

/// Which endpoint a request came to; decides the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// A validated generation request, whichever endpoint it came from.
#[derive(Debug)]
pub struct GenRequest {
    pub model: String,
    pub prompt_tokens: u32,
    /// The prompt (completions) or the last message's text (chat), for echo mode.
    pub prompt_text: String,
    pub max_tokens: u32,
    /// Whether the request set `max_tokens` (else the simulator's default applies).
    pub max_tokens_given: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats` with `include_usage` (vLLM's):
    /// every chunk carries the usage so far.
    pub continuous_usage: bool,
    /// The request's `seed`: with one, the text depends only on it and on
    /// the position of each token in the whole context, so a continuation
    /// of a partial answer (chat's `continue_final_message`, or a
    /// completion prompt extended with the partial text) produces exactly
    /// the tokens the first answer would have produced next.
    pub seed: Option<u64>,
    /// Tokens of context before the first generated one.
    pub context_tokens: u32,
    /// Whether the first generated token needs a leading space (it
    /// continues text that does not end in whitespace).
    pub leading_space: bool,
}

fn content_text(c: &Option<Content>) -> String {
    match c {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => parts
            .iter()
            .filter_map(|p| p.text.as_deref())
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Whether generated text joined to `before` needs a space between them.
fn needs_space(before: &str) -> bool {
    before.chars().last().is_some_and(|c| !c.is_whitespace())
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

fn check_max_tokens(max_tokens: Option<u32>) -> Result<u32, ApiError> {
    match max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) {
        0 => Err(ApiError::bad_param(
            "max_tokens",
            "max_tokens must be at least 1",
        )),
        n if n > MAX_TOKENS_LIMIT => Err(ApiError::bad_param(
            "max_tokens",
            format!("max_tokens must be at most {MAX_TOKENS_LIMIT}"),
        )),
        n => Ok(n),
    }
}

impl GenRequest {
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Self, ApiError> {
        match endpoint {
            Endpoint::Completions => {
                let b: CompletionBody = parse_json(body)?;
                let prompt_tokens = match &b.prompt {
                    Prompt::One(p) => count_tokens(p),
                    Prompt::Many(ps) if ps.len() == 1 => count_tokens(&ps[0]),
                    Prompt::Many(_) => {
                        return Err(ApiError::bad_param(
                            "prompt",
                            "exactly one prompt is supported",
                        ))
                    }
                };
                let prompt_text = match b.prompt {
                    Prompt::One(p) => p,
                    Prompt::Many(mut ps) => ps.pop().unwrap_or_default(),
                };
                Ok(Self {
                    model: b.model,
                    prompt_tokens,
                    leading_space: needs_space(&prompt_text),
                    prompt_text,
                    max_tokens_given: b.max_tokens.is_some(),
                    max_tokens: check_max_tokens(b.max_tokens)?,
                    stream: b.stream.unwrap_or(false),
                    include_usage: b.stream_options.as_ref().is_some_and(|o| o.include_usage),
                    continuous_usage: b
                        .stream_options
                        .as_ref()
                        .is_some_and(|o| o.include_usage && o.continuous_usage_stats),
                    seed: b.seed.map(|s| s as u64),
                    context_tokens: prompt_tokens,
                })
            }
            Endpoint::Chat => {
                let b: ChatBody = parse_json(body)?;
                if b.messages.is_empty() {
                    return Err(ApiError::bad_param(
                        "messages",
                        "messages must not be empty",
                    ));
                }
                let prompt_tokens = b
                    .messages
                    .iter()
                    .map(|m| match &m.content {
                        None => 0,
                        Some(Content::Text(t)) => count_tokens(t),
                        Some(Content::Parts(parts)) => parts
                            .iter()
                            .filter_map(|p| p.text.as_deref())
                            .map(count_tokens)
                            .sum(),
                    })
                    .fold(0u32, u32::saturating_add);
                let prompt_text = b
                    .messages
                    .last()
                    .map(|m| content_text(&m.content))
                    .unwrap_or_default();
                let continuing = b.continue_final_message.unwrap_or(false);
                if continuing && b.add_generation_prompt.unwrap_or(false) {
                    return Err(ApiError::bad_param(
                        "continue_final_message",
                        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                    ));
                }
                if continuing && b.messages.last().is_some_and(|m| m.role != "assistant") {
                    return Err(ApiError::bad_param(
                        "continue_final_message",
                        "continue_final_message needs the final message to be the assistant's",
                    ));
                }
                let max_tokens = b.max_completion_tokens.or(b.max_tokens);
                Ok(Self {
                    model: b.model,
                    prompt_tokens,
                    leading_space: continuing && needs_space(&prompt_text),
                    prompt_text,
                    max_tokens_given: max_tokens.is_some(),
                    max_tokens: check_max_tokens(max_tokens)?,
                    stream: b.stream.unwrap_or(false),
                    include_usage: b.stream_options.as_ref().is_some_and(|o| o.include_usage),
                    continuous_usage: b
                        .stream_options
                        .as_ref()
                        .is_some_and(|o| o.include_usage && o.continuous_usage_stats),
                    seed: b.seed.map(|s| s as u64),
                    context_tokens: prompt_tokens,
                })
            }
        }
    }
}

/// Identity and timestamps shared by every chunk of one response.
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseMeta {
    pub fn new(endpoint: Endpoint, model: &str) -> Self {
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created,
            model: model.to_string(),
            endpoint,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

pub fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": u64::from(prompt_tokens) + u64::from(completion_tokens),
    })
}

/// The whole answer of a non-streaming request.
pub fn full_response(
    meta: &ResponseMeta,
    text: &str,
    prompt_tokens: u32,
    completion_tokens: u32,
    finish_reason: &str,
) -> Value {
    let choice = match meta.endpoint {
        Endpoint::Completions => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason,
        }),
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason,
        }),
    };
    let mut v = meta.envelope(false, json!([choice]));
    v["usage"] = usage(prompt_tokens, completion_tokens);
    v
}

/// The first chunk of a chat stream announces the assistant role.
pub fn role_chunk(meta: &ResponseMeta) -> Option<Value> {
    (meta.endpoint == Endpoint::Chat).then(|| {
        meta.envelope(
            true,
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
        )
    })
}

/// A chunk carrying one token.
pub fn token_chunk(meta: &ResponseMeta, token: &str) -> Value {
    let choice = match meta.endpoint {
        Endpoint::Completions => {
            json!({"index": 0, "text": token, "logprobs": null, "finish_reason": null})
        }
        Endpoint::Chat => {
            json!({"index": 0, "delta": {"content": token}, "logprobs": null, "finish_reason": null})
        }
    };
    meta.envelope(true, json!([choice]))
}

/// The chunk that closes the choice with its finish reason.
pub fn finish_chunk(meta: &ResponseMeta, finish_reason: &str) -> Value {
    let choice = match meta.endpoint {
        Endpoint::Completions => {
            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish_reason})
        }
        Endpoint::Chat => {
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason})
        }
    };
    meta.envelope(true, json!([choice]))
}

/// With `stream_options.include_usage`: a last chunk with no choices and the usage.
pub fn usage_chunk(meta: &ResponseMeta, prompt_tokens: u32, completion_tokens: u32) -> Value {
    let mut v = meta.envelope(true, json!([]));
    v["usage"] = usage(prompt_tokens, completion_tokens);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_completions() {
        let r = GenRequest::parse(Endpoint::Completions, br#"{"model":"m","prompt":"a b c"}"#)
            .expect("valid");
        assert_eq!(
            (r.prompt_tokens, r.max_tokens, r.stream),
            (3, DEFAULT_MAX_TOKENS, false)
        );
    }

    #[test]
    fn parses_chat_with_parts() {
        let body = br#"{"model":"m","max_tokens":4,"stream":true,"messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi there you"}]}]}"#;
        let r = GenRequest::parse(Endpoint::Chat, body).expect("valid");
        assert_eq!((r.prompt_tokens, r.max_tokens, r.stream), (5, 4, true));
    }

    #[test]
    fn rejects_malformed() {
        for (ep, body) in [
            (Endpoint::Completions, &b"not json"[..]),
            (Endpoint::Completions, br#"{"prompt":"x"}"#),
            (
                Endpoint::Completions,
                br#"{"model":"m","prompt":"x","max_tokens":0}"#,
            ),
            (
                Endpoint::Completions,
                br#"{"model":"m","prompt":"x","max_tokens":-1}"#,
            ),
            (Endpoint::Chat, br#"{"model":"m","messages":[]}"#),
            (Endpoint::Chat, br#"{"model":"m","messages":"hi"}"#),
        ] {
            assert!(
                GenRequest::parse(ep, body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
