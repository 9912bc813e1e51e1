//! `POST /v1/responses`, the Responses API without server-side state: `input` as a string or
//! message, function-call and function-call-output items, `instructions`, `max_output_tokens`,
//! `temperature`/`top_p`, `text.format` (text, json_object, json_schema), function `tools` with
//! `tool_choice`, and `stream` with the API's event sequence. The request becomes a chat request
//! (the same template, checks, grammar and engine path, and the same reading of calls and
//! thinking); what needs state (`store: true`, `previous_response_id`, `conversation`,
//! `background`) or is not built yet (non-text content, `reasoning`, `include`,
//! `top_logprobs`) is a 400 naming it.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use ferrite_engine::{FinishReason, RequestEvent, RequestStream};
use futures::channel::mpsc::{unbounded, UnboundedSender};
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::budgets::{HeaderBudgets, KeyBudgets};
use crate::error::ApiError;
use crate::metrics::Arrival;
use crate::models::held;
use crate::openai::{ChatMessage, ChatRequest, Content, SamplingFields};
use crate::reasoning::AnswerReader;
use crate::response::{response_id, unix_now, UsageSum};
use crate::routes::{parse, required, validated, ReadBody};
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
    pub parallel_tool_calls: Option<Value>,
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
    // ferrite's budgets, as on chat and completions.
    pub priority: Option<i32>,
    pub max_cost_usd: Option<f64>,
    pub deadline_ms: Option<f64>,
    pub ttft_deadline_ms: Option<f64>,
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
    tools: Value,
    tool_choice: Value,
}

/// The answer so far: one assistant message of output text.
struct Answer {
    id: String,
    message_id: String,
    created_at: u64,
    text: String,
    finish: Option<FinishReason>,
    usage: UsageSum,
    /// How the text is read (as chat reads it): whether the prompt opened a thinking, and the
    /// tool-call format. Neither: the text is the message.
    thinking: Option<bool>,
    tools: Option<crate::tools::Mode>,
    /// The output items, once the text is whole ([`Answer::settle`]).
    items: Vec<Value>,
}

pub async fn responses(
    State(state): State<AppState>,
    arrival: Option<Extension<Arrival>>,
    key: Option<Extension<KeyBudgets>>,
    headers: HeaderMap,
    body: Result<ReadBody, ApiError>,
) -> Result<Response, ApiError> {
    let budgets = HeaderBudgets::from_headers(&headers)?;
    let req: ResponsesRequest = parse(&body?.0)?;
    refuse_unsupported(&req)?;
    let model = state.models.acquire(required(&req.model)?).await?;
    let echo = Echo {
        model: model.name.clone(),
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        text: req.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        metadata: req.metadata.clone().unwrap_or_else(|| json!({})),
        user: req.user.clone(),
        tools: json!(req.tools.iter().flatten().map(echoed_tool).collect::<Vec<_>>()),
        tool_choice: req.tool_choice.clone().filter(|c| !c.is_null()).unwrap_or_else(|| json!("auto")),
    };
    let stream = req.stream.unwrap_or(false);
    let chat = to_chat(req)?;
    let mut checked = validated(&state, &model, key, move |m, l| validate::chat(&chat, &m.tokenizer, l))
        .await
        .map_err(in_responses_terms)?;
    let mut request = checked.requests.pop().ok_or_else(|| ApiError::internal("no request was built"))?;
    budgets.apply(&mut request);
    if let Some(Extension(Arrival(at))) = arrival {
        request.arrival = at;
    }
    let events = model.engine.submit(request).map_err(|e| in_responses_terms(e.into()))?;
    let answer = Answer {
        id: item_id("resp"),
        message_id: item_id("msg"),
        created_at: unix_now(),
        text: String::new(),
        finish: None,
        usage: UsageSum::default(),
        thinking: checked.thinking,
        tools: checked.tools.take(),
        items: Vec::new(),
    };
    if stream {
        return Ok(held(sse(events, answer, echo), model));
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
            Some(RequestEvent::Stopped { text, finish: (reason, _), .. }) => {
                answer.text.push_str(&text);
                answer.finish = Some(reason);
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
    answer.settle();
    Ok(answer.usage.answer(answer.object(&echo, Status::Done)))
}

/// A chat check's error in this API's names: `max_output_tokens` for chat's `max_tokens`,
/// `input` for its `messages`, `text.format` for its `response_format`.
fn in_responses_terms(mut e: ApiError) -> ApiError {
    e.param = e.param.map(|p| match p.as_str() {
        "max_tokens" | "max_completion_tokens" => "max_output_tokens".into(),
        "response_format" => "text.format".into(),
        _ => match p.strip_prefix("messages") {
            Some(rest) => format!("input{rest}"),
            None => p,
        },
    });
    e
}

/// A function tool as the response echoes it: every field the API's object has.
fn echoed_tool(tool: &Value) -> Value {
    let field = |k: &str| tool.get(k).cloned().unwrap_or(Value::Null);
    json!({"type": "function", "name": field("name"), "description": field("description"),
        "parameters": field("parameters"), "strict": field("strict")})
}

/// An id of the API's kind: `resp_…`, `msg_…`, `fc_…`, `rs_…`.
fn item_id(prefix: &str) -> String {
    response_id(prefix).replacen('-', "_", 1)
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
                push_item(&mut messages, i, item)?;
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
            priority: req.priority,
            max_cost_usd: req.max_cost_usd,
            deadline_ms: req.deadline_ms,
            ttft_deadline_ms: req.ttft_deadline_ms,
            ..Default::default()
        },
        response_format,
        tools: req.tools.map(|t| t.iter().enumerate().map(chat_tool).collect()).transpose()?,
        tool_choice: req.tool_choice.map(chat_tool_choice).transpose()?,
        parallel_tool_calls: req.parallel_tool_calls,
        ..Default::default()
    })
}

/// A Responses function tool (`{"type": "function", "name", "description", "parameters",
/// "strict"}`) in chat's shape (the same under `function`).
fn chat_tool((i, tool): (usize, &Value)) -> Result<Value, ApiError> {
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("?");
        return Err(ApiError::invalid(
            Some(&format!("tools[{i}].type")),
            format!("tool type `{kind}` is not supported (function tools only)"),
        ));
    }
    let mut function = tool.clone();
    if let Some(o) = function.as_object_mut() {
        o.remove("type");
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice`: "none", "auto", "required", or `{"type": "function", "name"}` in chat's shape.
fn chat_tool_choice(choice: Value) -> Result<Value, ApiError> {
    match (&choice, choice.get("type").and_then(Value::as_str), choice.get("name")) {
        (Value::Null | Value::String(_), _, _) => Ok(choice),
        (_, Some("function"), Some(name)) => Ok(json!({"type": "function", "function": {"name": name}})),
        _ => Err(ApiError::invalid(
            Some("tool_choice"),
            "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

/// Input item `i` as chat messages: a message; a `function_call` (joining the assistant turn
/// before it, where that turn holds calls already, as one turn with several calls); a
/// `function_call_output` (a `tool` message answering its call).
fn push_item(messages: &mut Vec<ChatMessage>, i: usize, item: &Value) -> Result<(), ApiError> {
    let at = |field: &str| format!("input[{i}]{field}");
    let text_of = |field: &str| -> Result<String, ApiError> {
        match item.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => {
                Err(ApiError::invalid(Some(&at(&format!(".{field}"))), format!("`{field}` must be a string")))
            }
        }
    };
    match item.get("type").and_then(Value::as_str) {
        Some("function_call") => {
            let call = json!({"id": text_of("call_id")?, "type": "function",
                "function": {"name": text_of("name")?, "arguments": text_of("arguments")?}});
            match messages.last_mut() {
                Some(ChatMessage { role, tool_calls: Some(calls), .. }) if role == "assistant" => {
                    calls.push(call)
                }
                _ => messages.push(ChatMessage {
                    role: "assistant".into(),
                    content: None,
                    tool_calls: Some(vec![call]),
                    tool_call_id: None,
                    name: None,
                }),
            }
        }
        Some("function_call_output") => messages.push(ChatMessage {
            role: "tool".into(),
            content: Some(Content::Text(text_of("output")?)),
            tool_calls: None,
            tool_call_id: Some(text_of("call_id")?),
            name: None,
        }),
        _ => messages.push(input_message(i, item)?),
    }
    Ok(())
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

    /// Whether the text is the message as it comes (no thinking or calls to read out of it),
    /// so a stream can send it delta by delta.
    fn plain(&self) -> bool {
        self.thinking.is_none() && self.tools.is_none()
    }

    /// The message item of `text` (content only when done).
    fn message_item(&self, text: &str, status: Status) -> Value {
        let content = match status {
            Status::Done => {
                vec![json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})]
            }
            Status::InProgress => Vec::new(),
        };
        json!({
            "type": "message",
            "id": self.message_id,
            "status": self.message_status(status),
            "role": "assistant",
            "content": content,
        })
    }

    /// The whole text's output items, read as chat reads it: a reasoning item for a thinking,
    /// the message (unless the answer is only calls), a function_call item per call.
    fn settle(&mut self) {
        let Some(mut reader) = AnswerReader::new(self.thinking, self.tools.as_ref()) else {
            self.items = vec![self.message_item(&self.text, Status::Done)];
            return;
        };
        let mut pieces = reader.push(&self.text);
        pieces.extend(reader.finish());
        let answer = crate::tools::assemble(pieces);
        let mut items = Vec::new();
        if let Some(thought) = answer.reasoning.filter(|r| !r.is_empty()) {
            items.push(json!({"type": "reasoning", "id": item_id("rs"), "summary": [],
                "content": [{"type": "reasoning_text", "text": thought}]}));
        }
        let content = answer.content.unwrap_or_default();
        if !content.is_empty() || answer.calls.is_empty() {
            items.push(self.message_item(&content, Status::Done));
        }
        for call in answer.calls {
            items.push(json!({"type": "function_call", "id": item_id("fc"), "call_id": call.id,
                "name": call.name, "arguments": call.arguments, "status": "completed"}));
        }
        self.items = items;
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
            "output": if done { self.items.clone() } else { Vec::new() },
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": null,
            "store": false,
            "temperature": echo.temperature,
            "text": echo.text,
            "tool_choice": echo.tool_choice,
            "tools": echo.tools,
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

/// New text of the answer, sent as a delta when the message is plain text, and how it ended
/// if it did; false when the client has gone.
fn text_delta(
    answer: &mut Answer,
    out: &mut Events,
    plain: bool,
    text: String,
    finish: Option<FinishReason>,
) -> bool {
    if finish.is_some() {
        answer.finish = finish;
    }
    answer.text.push_str(&text);
    let delta = located(&answer.message_id, 0, json!({"delta": text, "logprobs": []}));
    !plain || text.is_empty() || out.send("response.output_text.delta", delta)
}

async fn pump(mut events: RequestStream, mut answer: Answer, echo: Echo, mut out: Events) {
    // Plain text is the message as it comes: sent delta by delta. Text to be read for a
    // thinking or calls is read whole, then sent item by item.
    let plain = answer.plain();
    let empty = answer.message_item("", Status::InProgress);
    let opened = out.send("response.created", json!({"response": answer.object(&echo, Status::InProgress)}))
        && out.send("response.in_progress", json!({"response": answer.object(&echo, Status::InProgress)}))
        && (!plain || open_message(&mut out, 0, &empty));
    if !opened {
        return;
    }
    loop {
        match events.next().await {
            Some(RequestEvent::Token(t)) => {
                if !text_delta(&mut answer, &mut out, plain, t.text, t.finish.map(|(reason, _)| reason)) {
                    return;
                }
            }
            Some(RequestEvent::Stopped { text, finish: (reason, _), .. }) => {
                if !text_delta(&mut answer, &mut out, plain, text, Some(reason)) {
                    return;
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
    answer.settle();
    for (k, item) in answer.items.iter().enumerate() {
        // A plain answer's one message is open already, its text sent.
        if !send_item(&mut out, k, item, !(plain && k == 0)) {
            return;
        }
    }
    let kind = if answer.incomplete() { "response.incomplete" } else { "response.completed" };
    out.send(kind, json!({"response": answer.object(&echo, Status::Done)}));
}

/// `v` with the place of the text it is about.
fn located(item_id: &str, output_index: usize, mut v: Value) -> Value {
    v["item_id"] = json!(item_id);
    v["output_index"] = json!(output_index);
    v["content_index"] = json!(0);
    v
}

/// Opens message item `k` (in progress, no content yet) and its one text part.
fn open_message(out: &mut Events, k: usize, item: &Value) -> bool {
    let id = item["id"].as_str().unwrap_or_default();
    out.send("response.output_item.added", json!({"output_index": k, "item": item}))
        && out.send(
            "response.content_part.added",
            located(
                id,
                k,
                json!({"part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            ),
        )
}

/// The events of finished output item `k`: opened with all its text or arguments first where
/// `open` (else its text was streamed already), then closed.
fn send_item(out: &mut Events, k: usize, item: &Value, open: bool) -> bool {
    let id = item["id"].as_str().unwrap_or_default().to_string();
    let sent = match item["type"].as_str() {
        Some("message") => {
            let part = &item["content"][0];
            let text = part["text"].as_str().unwrap_or_default();
            let mut opening = item.clone();
            opening["status"] = json!("in_progress");
            opening["content"] = json!([]);
            (!open
                || open_message(out, k, &opening)
                    && (text.is_empty()
                        || out.send(
                            "response.output_text.delta",
                            located(&id, k, json!({"delta": text, "logprobs": []})),
                        )))
                && out
                    .send("response.output_text.done", located(&id, k, json!({"text": text, "logprobs": []})))
                && out.send("response.content_part.done", located(&id, k, json!({"part": part})))
        }
        Some("function_call") => {
            let mut opening = item.clone();
            opening["status"] = json!("in_progress");
            opening["arguments"] = json!("");
            let arguments = &item["arguments"];
            out.send("response.output_item.added", json!({"output_index": k, "item": opening}))
                && out.send(
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": k, "delta": arguments}),
                )
                && out.send(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": k, "name": item["name"], "arguments": arguments}),
                )
        }
        _ => out.send("response.output_item.added", json!({"output_index": k, "item": item})),
    };
    sent && out.send("response.output_item.done", json!({"output_index": k, "item": item}))
}
