//! Handlers: authenticate, parse, validate, submit to the engine, answer (JSON or SSE).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrite_engine::engine::RequestStream;
use ferrite_engine::request::{FinishReason, RequestEvent};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::openai::{ChatRequest, CompletionRequest, PromptTokensDetails, Usage};
use crate::stream::{sse_response, Endpoint};
use crate::validate::{self, Checked, Limits};
use crate::AppState;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A response id unique within this process.
pub(crate) fn response_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}-{nanos:x}{:04x}", NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.api_keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(k) if state.api_keys.iter().any(|key| key == k) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let param = e.to_string().split('`').nth(1).map(str::to_string);
        ApiError { param, ..ApiError::invalid(None, format!("invalid request body: {e}")) }
    })
}

pub async fn health(State(state): State<AppState>) -> StatusCode {
    if state.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "ferrite",
        "max_model_len": state.engine.info().max_model_len,
    })
}

pub async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(json!({"object": "list", "data": [model_card(&state)]})))
}

pub async fn get_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    if id != state.served_model_name {
        return Err(ApiError::model_not_found(&id, &state.served_model_name));
    }
    Ok(Json(model_card(&state)))
}

fn limits(state: &AppState) -> Limits<'_> {
    let info = state.engine.info();
    // A sequence can never outgrow the KV cache either: the default max_tokens respects both.
    let max_model_len = info.max_model_len.min(info.num_blocks * info.block_size);
    Limits { served_model_name: &state.served_model_name, max_model_len }
}

/// Submits every prompt; on a refusal the ones already queued are dropped (aborted).
fn submit(state: &AppState, checked: &mut Checked) -> Result<Vec<RequestStream>, ApiError> {
    checked.requests.drain(..).map(|r| state.engine.submit(r).map_err(ApiError::from)).collect()
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let req: CompletionRequest = parse(&body)?;
    let mut checked = validate::completion(&req, &state.tokenizer, &limits(&state))?;
    answer(&state, &mut checked, Endpoint::Completion).await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let req: ChatRequest = parse(&body)?;
    let mut checked = validate::chat(&req, &state.tokenizer, &limits(&state))?;
    answer(&state, &mut checked, Endpoint::Chat).await
}

async fn answer(state: &AppState, checked: &mut Checked, endpoint: Endpoint) -> Result<Response, ApiError> {
    let (n, stream, include_usage) = (checked.n, checked.stream, checked.include_usage);
    let streams = submit(state, checked)?;
    let id = response_id(endpoint.id_prefix());
    let meta = ResponseMeta { id, created: unix_now(), model: state.served_model_name.clone() };
    if stream {
        return Ok(sse_response(streams, n, include_usage, endpoint, meta));
    }
    let mut choices = Vec::new();
    let mut usage = UsageSum::default();
    for (p, mut s) in streams.into_iter().enumerate() {
        let mut texts = vec![String::new(); n];
        let mut finish: Vec<Option<FinishReason>> = vec![None; n];
        loop {
            match s.next().await {
                Some(RequestEvent::Token(t)) => {
                    texts[t.index].push_str(&t.text);
                    if let Some((reason, _)) = t.finish {
                        finish[t.index] = Some(reason);
                    }
                }
                Some(RequestEvent::Finished(u)) => {
                    usage.add(&u);
                    break;
                }
                Some(RequestEvent::Error(e)) => return Err(ApiError::internal(e)),
                None => return Err(ApiError::internal("the engine stopped before the request finished")),
            }
        }
        for (i, (text, reason)) in texts.into_iter().zip(finish).enumerate() {
            let index = p * n + i;
            let reason = reason.map(FinishReason::as_str);
            choices.push(match endpoint {
                Endpoint::Completion => {
                    json!({"index": index, "text": text, "logprobs": null, "finish_reason": reason})
                }
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": reason,
                }),
            });
        }
    }
    let body = json!({
        "id": meta.id,
        "object": endpoint.object(),
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage.to_openai(),
    });
    Ok(Json(body).into_response())
}

pub(crate) struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// Token counts over every prompt and sample of one HTTP request.
#[derive(Default)]
pub(crate) struct UsageSum {
    prompt: usize,
    completion: usize,
    cached: usize,
}

impl UsageSum {
    pub fn add(&mut self, u: &ferrite_engine::request::Usage) {
        self.prompt += u.prompt_tokens;
        self.completion += u.completion_tokens;
        self.cached += u.cached_tokens;
    }

    pub fn to_openai(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt,
            completion_tokens: self.completion,
            total_tokens: self.prompt + self.completion,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: self.cached }),
        }
    }
}
