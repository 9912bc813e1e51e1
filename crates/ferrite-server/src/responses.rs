//! `POST /v1/responses`, the Responses API without server-side state: `input` as a string or
//! message items, `instructions`, `max_output_tokens`, `temperature`/`top_p`, `text.format`
//! (text, json_object, json_schema), and `stream` with the API's event sequence. The request
//! becomes a chat request (the same template, checks and engine path); what needs state
//! (`store: true`, `previous_response_id`, `conversation`, `background`) or is not built yet
//! (`tools`, non-text content, `reasoning`, `include`, `top_logprobs`) is a 400 naming it.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use ferrite_engine::{FinishReason, RequestEvent, RequestStream};
use futures::channel::mpsc::{unbounded, UnboundedSender};
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::metrics::Arrival;
use crate::openai::{ChatMessage, ChatRequest, Content, SamplingFields};
use crate::response::{response_id, unix_now, UsageSum};
use crate::routes::{limits, off_workers, parse, ReadBody};
use crate::validate;
use crate::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub stream: Option<bool>,
    pub text: Option<Value>,
    pub metadata: Option<Value>,
    pub user: Option<String>,
    pub tool_choice: Option<Value>,
    pub truncation: Option<Value>,
    // Refused (by name) where given: state this server does not keep, or not built yet.
    pub store: Option<bool>,
    pub previous_response_id: Option<Value>,
    pub conversation: Option<Value>,
    pub background: Option<bool>,
    pub tools: Option<Vec<Value>>,
    pub reasoning: Option<Value>,
    pub include: Option<Vec<Value>>,
    pub top_logprobs: Option<usize>,
}

/// What the response object echoes of the request.
#[derive(Debug, Clone)]
struct Echo {
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<usize>,
    temperature: f32,
    top_p: f32,
    text: Value,
    metadata: Value,
    user: Option<String>,
}

/// The answer so far: one assistant message of output text.
struct Answer {
    id: String,
    message_id: String,
    created_at: u64,
    text: String,
    finish: Option<FinishReason>,
    usage: UsageSum,
}

pub async fn responses(
    State(state): State<AppState>,
    arrival: Option<Extension<Arrival>>,
    body: Result<ReadBody, ApiError>,
) -> Result<Response, ApiError> {
    let req: ResponsesRequest = parse(&body?.0)?;
    refuse_unsupported(&req)?;
    let echo = Echo {
        model: state.served_model_name.clone(),
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        text: req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        metadata: req.metadata.clone().unwrap_or_else(|| json!({})),
        user: req.user.clone(),
    };
    let stream = req.stream.unwrap_or(false);
    let chat = to_chat(req)?;
    let mut checked = off_workers(&state, move |s| validate::chat(&chat, &s.tokenizer, &limits(s))).await?;
    let mut request = checked.requests.pop().ok_or_else(|| ApiError::internal("no request was built"))?;
    if let Some(Extension(Arrival(at))) = arrival {
        request.arrival = at;
    }
    let events = state.engine.submit(request)?;
    let answer = Answer {
        id: response_id("resp").replacen('-', "_", 1),
        message_id: response_id("msg").replacen('-', "_", 1),
        created_at: unix_now(),
        text: String::new(),
        finish: None,
        usage: UsageSum::default(),
    };
    if stream {
        return Ok(sse(events, answer, echo));
    }
    let mut events = events;
    let mut answer = answer;
    loop {
        match events.next().await {
            Some(RequestEvent::Token(t)) => {
                answer.text.push_str(&t.text);
                if let Some((reason, _)) = t.finish {
                    answer.finish = Some(reason);
                }
            }
            Some(RequestEvent::Finished(u)) => {
                answer.usage.add(&u);
                break;
            }
            Some(RequestEvent::Error(e)) => return Err(ApiError::internal(e)),
            Some(RequestEvent::Embedding { .. }) => {
                return Err(ApiError::internal("a generation request was answered with an embedding"))
            }
            None => return Err(ApiError::internal("the engine stopped before the response finished")),
        }
    }
    Ok(answer.usage.answer(answer.object(&echo, Status::Done)))
}

/// The first field given that needs state this server does not keep, or is not built yet.
fn refuse_unsupported(req: &ResponsesRequest) -> Result<(), ApiError> {
    let refuse = |param: &str, why: &str| Err(ApiError::invalid(Some(param), why.to_string()));
    if req.store == Some(true) {
        return refuse("store", "`store: true` is not supported: this server keeps no responses (send `store: false`, or leave it out)");
    }
    for (param, given) in
        [("previous_response_id", &req.previous_response_id), ("conversation", &req.conversation)]
    {
        if given.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse(param, &format!("`{param}` is not supported: this server keeps no responses; send the whole conversation as `input` items"));
        }
    }
    if req.background == Some(true) {
        return refuse(
            "background",
            "`background: true` is not supported: responses are answered in the request",
        );
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return refuse(
            "tools",
            "`tools` are not supported on /v1/responses yet; use /v1/chat/completions, which supports them",
        );
    }
    if let Some(choice) = req.tool_choice.as_ref().filter(|c| !c.is_null()) {
        if !matches!(choice.as_str(), Some("none" | "auto")) {
            return refuse("tool_choice", "`tool_choice` other than \"none\" or \"auto\" needs `tools`, which /v1/responses does not support yet");
        }
    }
    if req.reasoning.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse("reasoning", "`reasoning` is not supported on /v1/responses yet");
    }
    if req.include.as_ref().is_some_and(|i| !i.is_empty()) {
        return refuse("include", "`include` is not supported: there is nothing extra to include");
    }
    if req.max_output_tokens == Some(0) {
        return refuse("max_output_tokens", "max_output_tokens must be at least 1, got 0");
    }
    if req.top_logprobs.is_some_and(|n| n > 0) {
        return refuse(
            "top_logprobs",
            "`top_logprobs` is not supported on /v1/responses yet; use /v1/chat/completions",
        );
    }
    if let Some(t) = req.truncation.as_ref().filter(|t| !t.is_null()) {
        if t.as_str() != Some("disabled") {
            return refuse(
                "truncation",
                "only `truncation: \"disabled\"` is supported: an input past the context is a 400",
            );
        }
    }
    Ok(())
}

/// The chat request this response asks for: `instructions` as a system message first, then
/// the input's messages; `text.format` as `response_format`.
fn to_chat(req: ResponsesRequest) -> Result<ChatRequest, ApiError> {
    let mut messages = Vec::new();
    if let Some(instructions) = req.instructions {
        messages.push(message("system", instructions));
    }
    match req.input {
        None | Some(Value::Null) => return Err(ApiError::invalid(Some("input"), "`input` is required")),
        Some(Value::String(text)) => messages.push(message("user", text)),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                messages.push(input_message(i, item)?);
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(Some("input"), "`input` must be a string or a list of items"))
        }
    }
    let response_format = match req.text.as_ref().and_then(|t| t.get("format")) {
        None | Some(Value::Null) => None,
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(json!({"type": "json_object"})),
            Some("json_schema") => {
                let mut spec = format.clone();
                if let Some(o) = spec.as_object_mut() {
                    o.remove("type");
                }
                Some(json!({"type": "json_schema", "json_schema": spec}))
            }
            _ => {
                return Err(ApiError::invalid(
                    Some("text.format.type"),
                    "`text.format.type` must be \"text\", \"json_object\" or \"json_schema\"",
                ))
            }
        },
    };
    Ok(ChatRequest {
        model: req.model,
        messages: Some(messages),
        max_completion_tokens: req.max_output_tokens,
        sampling: SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            user: req.user,
            ..Default::default()
        },
        response_format,
        ..Default::default()
    })
}

fn message(role: &str, text: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: Some(Content::Text(text)),
        tool_calls: None,
        tool_call_id: None,
        name: None,
    }
}

/// Input item `i`: a message (`{"role", "content"}`, `type` "message" or absent) whose content
/// is a string or text parts. Other items (function calls and their outputs, reasoning,
/// references) and other parts (images, files, audio) are refused by their place.
fn input_message(i: usize, item: &Value) -> Result<ChatMessage, ApiError> {
    let at = |field: &str| format!("input[{i}]{field}");
    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
    if kind != "message" {
        return Err(ApiError::invalid(
            Some(&at(".type")),
            format!(
                "input item type `{kind}` is not supported (only messages: no tools on /v1/responses yet)"
            ),
        ));
    }
    let role = match item.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant" | "system")) => r,
        Some("developer") => "system",
        other => {
            return Err(ApiError::invalid(
                Some(&at(".role")),
                format!("role must be user, assistant, system or developer, got {other:?}"),
            ))
        }
    };
    let text = match item.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            Some(&at(&format!(".content[{j}]"))),
                            format!("content part {:?} is not supported (text only)", kind.unwrap_or("?")),
                        ))
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                Some(&at(".content")),
                "a message needs `content`: a string or text parts",
            ))
        }
    };
    Ok(message(role, text))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Status {
    /// Still generating (the stream's first events).
    InProgress,
    /// Finished: completed, or incomplete where `max_output_tokens` cut it.
    Done,
}

impl Answer {
    fn incomplete(&self) -> bool {
        self.finish == Some(FinishReason::Length)
    }

    fn message_status(&self, status: Status) -> &'static str {
        match status {
            Status::InProgress => "in_progress",
            Status::Done if self.incomplete() => "incomplete",
            Status::Done => "completed",
        }
    }

    fn part(&self) -> Value {
        json!({"type": "output_text", "text": self.text, "annotations": [], "logprobs": []})
    }

    fn item(&self, status: Status) -> Value {
        let content = if status == Status::Done { vec![self.part()] } else { Vec::new() };
        json!({
            "type": "message",
            "id": self.message_id,
            "status": self.message_status(status),
            "role": "assistant",
            "content": content,
        })
    }

    /// The response object, as the API returns it and as its stream events carry it.
    fn object(&self, echo: &Echo, status: Status) -> Value {
        let done = status == Status::Done;
        let usage = self.usage.to_openai();
        let mut object = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.message_status(status),
            "completed_at": (done && !self.incomplete()).then(unix_now),
            "error": null,
            "incomplete_details": (done && self.incomplete()).then(|| json!({"reason": "max_output_tokens"})),
            "instructions": echo.instructions,
            "max_output_tokens": echo.max_output_tokens,
            "model": echo.model,
            "output": if done { vec![self.item(status)] } else { Vec::new() },
            "parallel_tool_calls": false,
            "previous_response_id": null,
            "reasoning": null,
            "store": false,
            "temperature": echo.temperature,
            "text": echo.text,
            "tool_choice": "none",
            "tools": [],
            "top_p": echo.top_p,
            "truncation": "disabled",
            "metadata": echo.metadata,
        });
        if let Some(user) = &echo.user {
            object["user"] = json!(user);
        }
        if done {
            // Every computed full block goes to the prefix cache unasked; nothing is billed
            // as a cache write, hence 0.
            object["usage"] = json!({
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
                    "cache_write_tokens": 0,
                },
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
                "device_seconds": usage.device_seconds,
                "cost_usd": usage.cost_usd,
                "energy_joules": usage.energy_joules,
            });
        }
        object
    }
}

/// The stream's events, each `event: <type>` with the JSON that names its type again and
/// counts its place (`sequence_number`).
struct Events {
    tx: UnboundedSender<Result<Event, Infallible>>,
    next: u64,
}

impl Events {
    /// False when the client has gone.
    fn send(&mut self, kind: &str, mut data: Value) -> bool {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.next);
        self.next += 1;
        self.tx.unbounded_send(Ok(Event::default().event(kind).data(data.to_string()))).is_ok()
    }
}

fn sse(events: RequestStream, answer: Answer, echo: Echo) -> Response {
    let (tx, rx) = unbounded();
    // As the chat stream's pump: part of the body, so a client that leaves drops the request.
    let pump =
        pump(events, answer, echo, Events { tx, next: 0 }).into_stream().filter_map(|()| async { None });
    Sse::new(futures::stream::select(rx, pump)).keep_alive(KeepAlive::default()).into_response()
}

async fn pump(mut events: RequestStream, mut answer: Answer, echo: Echo, mut out: Events) {
    let (item_id, at) = (answer.message_id.clone(), json!({"output_index": 0, "content_index": 0}));
    let located = |mut v: Value| {
        v["item_id"] = json!(item_id);
        v["output_index"] = at["output_index"].clone();
        v["content_index"] = at["content_index"].clone();
        v
    };
    let opened = out.send("response.created", json!({"response": answer.object(&echo, Status::InProgress)}))
        && out.send("response.in_progress", json!({"response": answer.object(&echo, Status::InProgress)}))
        && out.send(
            "response.output_item.added",
            json!({"output_index": 0, "item": answer.item(Status::InProgress)}),
        )
        && out.send(
            "response.content_part.added",
            located(json!({"part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})),
        );
    if !opened {
        return;
    }
    loop {
        match events.next().await {
            Some(RequestEvent::Token(t)) => {
                if let Some((reason, _)) = t.finish {
                    answer.finish = Some(reason);
                }
                if !t.text.is_empty() {
                    answer.text.push_str(&t.text);
                    if !out
                        .send("response.output_text.delta", located(json!({"delta": t.text, "logprobs": []})))
                    {
                        return;
                    }
                }
            }
            Some(RequestEvent::Finished(u)) => {
                answer.usage.add(&u);
                break;
            }
            Some(RequestEvent::Embedding { .. }) | Some(RequestEvent::Error(_)) | None => {
                let why = "the engine failed while generating this response";
                let mut failed = answer.object(&echo, Status::InProgress);
                failed["status"] = json!("failed");
                failed["error"] = json!({"code": "server_error", "message": why});
                out.send("response.failed", json!({"response": failed}));
                return;
            }
        }
    }
    let closing = out
        .send("response.output_text.done", located(json!({"text": answer.text, "logprobs": []})))
        && out.send("response.content_part.done", located(json!({"part": answer.part()})))
        && out
            .send("response.output_item.done", json!({"output_index": 0, "item": answer.item(Status::Done)}));
    if closing {
        let kind = if answer.incomplete() { "response.incomplete" } else { "response.completed" };
        out.send(kind, json!({"response": answer.object(&echo, Status::Done)}));
    }
}
