//! Handlers: authenticate, parse, validate, submit to the engine, answer (JSON or SSE).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use ferrite_engine::RequestStream;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::budgets::{HeaderBudgets, KeyBudgets};
use crate::error::ApiError;
use crate::metrics::{Arrival, RequestId};
use crate::models::{held, Lease, Served};
use crate::openai::{ChatRequest, CompletionRequest};
use crate::response::{self, response_id, unix_now, AnswerShape, Endpoint, ResponseMeta};
use crate::stream::sse_response;
use crate::validate::{self, Checked, Limits, RequestLimits, SamplingDefaults};
use crate::AppState;

/// The API key check, as a layer in front of the API routes: a request without a valid key is
/// answered 401 before its body is read.
pub async fn require_key(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    if let Some(key) = authorize(&state, request.headers())? {
        if let Some(budgets) = state.key_budgets.get(key) {
            request.extensions_mut().insert(KeyBudgets(*budgets));
        }
    }
    Ok(next.run(request).await)
}

/// The key the request carries, when keys are required; 401 without a valid one.
fn authorize<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<Option<&'a str>, ApiError> {
    if state.api_keys.is_empty() {
        return Ok(None);
    }
    // `Authorization: Bearer <key>`; the scheme is case-insensitive (RFC 7235).
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let matched =
        given.and_then(|k| state.api_keys.iter().find(|key| constant_time_eq(key.as_bytes(), k.as_bytes())));
    matched.map(|k| Some(k.as_str())).ok_or_else(ApiError::unauthorized)
}

/// Equality whose time does not depend on where the first difference is (only on the length),
/// so a key cannot be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Any path the router does not know.
pub async fn not_found() -> ApiError {
    ApiError::with_status(StatusCode::NOT_FOUND, "no such route")
}

/// A known path with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::with_status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
}

/// The request body, read within the server's body timeout (408 past it, so a client that
/// sends half a body does not hold a connection forever) and size limit (413).
pub(crate) struct ReadBody(pub(crate) Bytes);

impl axum::extract::FromRequest<AppState> for ReadBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.body_read_timeout;
        match tokio::time::timeout(limit, Bytes::from_request(req, state)).await {
            Err(_) => Err(ApiError::with_status(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {} s", limit.as_secs_f64()),
            )),
            Ok(Err(r)) => Err(ApiError::with_status(r.status(), r.body_text())),
            Ok(Ok(bytes)) => Ok(ReadBody(bytes)),
        }
    }
}

/// The body as `T`; a wrong type names the field where it sits (`messages[0].content`), a
/// missing one names the missing field.
pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut path = e.path().to_string();
        let mut text = e.into_inner().to_string();
        if path == "." {
            // Fields of a `#[serde(flatten)]` part (the sampling fields) lose their path: read
            // that part alone to name the field.
            if let Ok(v) = serde_json::from_slice::<Value>(body) {
                if let Err(inner) = serde_path_to_error::deserialize::<_, crate::openai::SamplingFields>(v) {
                    if inner.path().to_string() != "." {
                        path = inner.path().to_string();
                        text = inner.into_inner().to_string();
                    }
                }
            }
        }
        let missing = text.strip_prefix("missing field `").and_then(|r| r.split('`').next());
        let param = match (path.as_str(), missing) {
            (".", Some(field)) => Some(field.to_string()),
            (".", None) => None,
            (p, Some(field)) => Some(format!("{p}.{field}")),
            (p, None) => Some(p.to_string()),
        };
        let message = match &param {
            Some(p) if missing.is_none() => format!("invalid request body: `{p}`: {text}"),
            _ => format!("invalid request body: {text}"),
        };
        ApiError { param, ..ApiError::invalid(None, message) }
    })?;
    // Nothing may follow the value: `{..} garbage` or `{..}{..}` is not one request (a proxy
    // or firewall in front would read it differently).
    de.end()
        .map_err(|e| ApiError::invalid(None, format!("invalid request body: after the JSON value: {e}")))?;
    Ok(value)
}

/// 200 while every loaded model's engine runs.
pub async fn health(State(state): State<AppState>) -> StatusCode {
    if state.models.loaded().iter().all(|m| m.engine.is_alive()) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A model as `/v1/models` lists it: `max_model_len` and `created` once it is loaded, and
/// whether it is now (`loaded`: a model loads on its first request under
/// `--max-loaded-models`).
fn model_card(name: &str, served: Option<&Served>) -> Value {
    let mut card = json!({"id": name, "object": "model", "owned_by": "ferrite", "loaded": served.is_some()});
    match served {
        Some(s) => {
            card["created"] = json!(s.created);
            card["max_model_len"] = json!(s.engine.info().max_model_len);
        }
        None => card["created"] = json!(0),
    }
    card
}

pub async fn list_models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> =
        state.models.cards().iter().map(|(name, served)| model_card(name, served.as_deref())).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let cards = state.models.cards();
    match cards.iter().find(|(name, _)| *name == id) {
        Some((name, served)) => Ok(Json(model_card(name, served.as_deref()))),
        None => {
            let names: Vec<_> = cards.iter().map(|(n, _)| n.as_str()).collect();
            Err(ApiError::model_not_found(&id, &names))
        }
    }
}

/// The model's defaults, with the request's key's budgets above them where it has some.
fn defaults_for(model: &Served, key: Option<Extension<KeyBudgets>>) -> Arc<SamplingDefaults> {
    match key {
        Some(Extension(KeyBudgets(b))) => Arc::new(b.over(&model.defaults)),
        None => model.defaults.clone(),
    }
}

pub(crate) fn limits<'a>(model: &'a Served, request: RequestLimits) -> Limits<'a> {
    let info = model.engine.info();
    // A sequence can never outgrow the KV cache either: the default max_tokens respects both.
    let max_model_len = info.max_model_len.min(info.cache.num_tokens());
    Limits {
        served_model_name: &model.name,
        max_model_len,
        defaults: &model.defaults,
        request,
        engine: Some(&model.engine),
        tool_call_parser: model.tool_call_parser,
        reasoning_parser: model.reasoning_parser,
    }
}

/// Runs `check` (which tokenizes: up to a whole body's worth of text) on the blocking pool, so
/// that a long prompt never holds an async worker that other requests and `/health` need.
pub(crate) async fn off_workers<T: Send + 'static>(
    model: &Lease,
    check: impl FnOnce(&Served) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let model = model.clone();
    tokio::task::spawn_blocking(move || check(&model))
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("request validation failed: {e}"))))
}

/// Runs `check` off the async workers (as [`off_workers`]) with `model`'s limits, the request's
/// key's budgets above the model's defaults.
pub(crate) async fn validated<T: Send + 'static>(
    state: &AppState,
    model: &Lease,
    key: Option<Extension<KeyBudgets>>,
    check: impl FnOnce(&Served, &Limits<'_>) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let defaults = defaults_for(model, key);
    let request_limits = state.request_limits;
    off_workers(model, move |m| check(m, &Limits { defaults: &defaults, ..limits(m, request_limits) })).await
}

/// Submits every prompt; on a refusal the ones already queued are dropped (aborted).
fn submit(model: &Served, checked: &mut Checked) -> Result<Vec<RequestStream>, ApiError> {
    checked.requests.drain(..).map(|r| model.engine.submit(r).map_err(ApiError::from)).collect()
}

/// `model` is required where OpenAI requires it: checked before a model is loaded for it.
pub(crate) fn required(model: &Option<String>) -> Result<Option<&str>, ApiError> {
    match model {
        None => Err(ApiError::invalid(Some("model"), "`model` is required")),
        Some(m) => Ok(Some(m)),
    }
}

pub async fn completions(
    State(state): State<AppState>,
    arrival: Option<Extension<Arrival>>,
    request_id: Option<Extension<RequestId>>,
    key: Option<Extension<KeyBudgets>>,
    headers: HeaderMap,
    body: Result<ReadBody, ApiError>,
) -> Result<Response, ApiError> {
    let budgets = HeaderBudgets::from_headers(&headers)?;
    let req: CompletionRequest = parse(&body?.0)?;
    let model = state.models.acquire(required(&req.model)?).await?;
    let mut checked =
        validated(&state, &model, key, move |m, l| validate::completion(&req, &m.tokenizer, l)).await?;
    checked.requests.iter_mut().for_each(|r| budgets.apply(r));
    answer(model, &mut checked, Endpoint::Completion, arrival, request_id).await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    arrival: Option<Extension<Arrival>>,
    request_id: Option<Extension<RequestId>>,
    key: Option<Extension<KeyBudgets>>,
    headers: HeaderMap,
    body: Result<ReadBody, ApiError>,
) -> Result<Response, ApiError> {
    let budgets = HeaderBudgets::from_headers(&headers)?;
    let req: ChatRequest = parse(&body?.0)?;
    let model = state.models.acquire(required(&req.model)?).await?;
    let mut checked =
        validated(&state, &model, key, move |m, l| validate::chat(&req, &m.tokenizer, l)).await?;
    checked.requests.iter_mut().for_each(|r| budgets.apply(r));
    answer(model, &mut checked, Endpoint::Chat, arrival, request_id).await
}

/// Submits the checked requests and answers: a stream of chunks, or the whole answer.
async fn answer(
    model: Lease,
    checked: &mut Checked,
    endpoint: Endpoint,
    arrival: Option<Extension<Arrival>>,
    request_id: Option<Extension<RequestId>>,
) -> Result<Response, ApiError> {
    // TTFT and end-to-end latency count from the request's arrival, parsing and tokenizing
    // included.
    if let Some(Extension(Arrival(at))) = arrival {
        checked.requests.iter_mut().for_each(|r| r.arrival = at);
    }
    let shape = AnswerShape {
        request_id: request_id.map(|Extension(RequestId(id))| id).unwrap_or_default(),
        started: checked.requests.first().map_or_else(std::time::Instant::now, |r| r.arrival),
        endpoint,
        n: checked.n,
        include_usage: checked.include_usage,
        logprobs: checked.logprobs.is_some(),
        echo: checked.echo.take(),
        tools: checked.tools.take(),
        thinking: checked.thinking,
        eos_token_ids: model.engine.info().eos_token_ids.clone(),
    };
    let stream = checked.stream;
    let streams = submit(&model, checked)?;
    // The engine's prediction of the first token (for requests with a first-token budget), so
    // a client or a benchmark can hold it against what came.
    let estimate = streams.iter().filter_map(RequestStream::first_token_estimate).max();
    let id = response_id(endpoint.id_prefix());
    let meta = ResponseMeta { id, created: unix_now(), model: model.name.clone() };
    let mut response = if stream {
        let tokenizer = model.tokenizer.clone();
        held(sse_response(streams, shape, meta, tokenizer), model)
    } else {
        response::collect(streams, shape, meta, model.tokenizer.clone()).await?
    };
    if let Some(e) = estimate {
        let ms = format!("{:.3}", e.as_secs_f64() * 1e3);
        if let Ok(v) = axum::http::HeaderValue::from_str(&ms) {
            response.headers_mut().insert(TTFT_ESTIMATE_HEADER, v);
        }
    }
    Ok(response)
}

/// The first token's predicted milliseconds from arrival, on answers to requests with a
/// first-token budget.
pub const TTFT_ESTIMATE_HEADER: &str = "x-ferrite-ttft-estimate-ms";

pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// vLLM's `/tokenize`: `{"prompt": text}` or `{"messages": [...]}` (rendered through the chat
/// template; the rendered text is returned too).
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<ReadBody, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let req: crate::openai::TokenizeRequest = parse(&body?.0)?;
    let model = state.models.acquire(req.model.as_deref()).await?;
    let request_limits = state.request_limits;
    let (ids, rendered) = off_workers(&model, move |m| tokenized(m, request_limits, &req)).await?;
    let mut body =
        json!({"count": ids.len(), "max_model_len": model.engine.info().max_model_len, "tokens": ids});
    if let Some(text) = rendered {
        body["prompt"] = json!(text);
    }
    Ok(Json(body))
}

/// `/tokenize`'s ids, and the rendered chat text when it was given messages.
fn tokenized(
    model: &Served,
    request_limits: RequestLimits,
    req: &crate::openai::TokenizeRequest,
) -> Result<(Vec<u32>, Option<String>), ApiError> {
    match (&req.prompt, &req.messages) {
        (Some(p), None) => {
            validate::check_text_bytes("prompt", p.len(), &model.tokenizer, &limits(model, request_limits))?;
            let ids = model
                .tokenizer
                .encode(p, req.add_special_tokens.unwrap_or(true))
                .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
            Ok((ids, None))
        }
        (None, Some(messages)) => {
            let chat = crate::openai::ChatRequest {
                model: Some(model.name.clone()),
                messages: Some(messages.clone()),
                tools: req.tools.clone(),
                // Rendering only: no call is read, so no call format is needed.
                tool_choice: req.tools.as_ref().map(|_| Value::String("none".into())),
                chat_template_kwargs: req.chat_template_kwargs.clone(),
                max_tokens: Some(1),
                ..Default::default()
            };
            let checked = validate::chat(&chat, &model.tokenizer, &limits(model, request_limits))?;
            let ids = checked.requests.into_iter().next().map(|r| r.prompt_token_ids).unwrap_or_default();
            let text = model.tokenizer.decode(&ids, false).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((ids, Some(text)))
        }
        _ => Err(ApiError::invalid(None, "give exactly one of `prompt` and `messages`")),
    }
}

/// vLLM's `/detokenize`: `{"tokens": [...]}` → `{"prompt": text}`.
pub async fn detokenize(
    State(state): State<AppState>,
    body: Result<ReadBody, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let req: crate::openai::DetokenizeRequest = parse(&body?.0)?;
    let model = state.models.acquire(req.model.as_deref()).await?;
    let vocab = model.tokenizer.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            Some("tokens"),
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    let text = model.tokenizer.decode(&req.tokens, false).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}
