//! Server-sent events as OpenAI streams them: every chunk has the same `id` and `created`;
//! chat's first chunk per choice carries `role: assistant`; exactly one chunk per choice has a
//! non-null `finish_reason`; with `include_usage` a last chunk with `choices: []` and `usage`;
//! then `data: [DONE]` and nothing after. Comments keep the connection alive while a request
//! waits in the queue. A client that leaves drops the receiver, which ends the pump task and
//! drops the engine streams: the engine aborts the requests at its next step.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferrite_engine::{RequestEvent, RequestStream, TokenOutput, Tokenizer};
use futures::channel::mpsc::{unbounded, UnboundedSender};
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::logprobs::{chat_entry, CompletionLogprobs};
use crate::openai::Usage;
use crate::reasoning::AnswerReader;
use crate::response::{chat_logprobs, AnswerShape, ChunkChoice, Delta, Endpoint, ResponseMeta, UsageSum};
use crate::tools::Piece;

struct Chunks {
    endpoint: Endpoint,
    meta: ResponseMeta,
    tx: UnboundedSender<Result<Event, Infallible>>,
}

impl Chunks {
    /// `false` when the client is gone.
    fn send(&self, data: String) -> bool {
        self.tx.unbounded_send(Ok(Event::default().data(data))).is_ok()
    }

    fn chunk(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<Usage>) -> bool {
        let body = self.meta.body(self.endpoint.chunk_object(), choices, usage);
        self.send(serde_json::to_string(&body).unwrap_or_default())
    }

    fn choice(&self, c: ChoiceChunk<'_>) -> bool {
        let ChoiceChunk { index, text, role, finish, stop, logprobs } = c;
        let finish_reason = finish;
        let stop_reason = finish.map(|_| stop);
        let choice = match self.endpoint {
            Endpoint::Completion => ChunkChoice::Text { index, text, logprobs, finish_reason, stop_reason },
            Endpoint::Chat => {
                let delta = Delta {
                    role: role.then_some("assistant"),
                    content: (role || !text.is_empty()).then_some(text),
                    tool_calls: None,
                    reasoning_content: None,
                };
                ChunkChoice::Chat { index, delta, logprobs, finish_reason, stop_reason }
            }
        };
        self.chunk(vec![choice], None)
    }
}

/// What one chunk of a read chat choice carries.
enum Part {
    Thinking(String),
    Content(String),
    Call(Value),
}

impl Chunks {
    /// A chat choice's pieces from one token as chunks: its thinking, its content, each call's
    /// opening and each arguments fragment a chunk of its own (as OpenAI streams calls); the
    /// token's logprobs on the first, the finish reason on the last. False when the client has
    /// gone.
    fn pieces(
        &self,
        index: usize,
        pieces: Vec<Piece>,
        logprobs: Value,
        finish: Option<&'static str>,
        stop: Value,
    ) -> bool {
        let mut parts: Vec<Part> = Vec::new();
        let (mut thinking, mut content) = (String::new(), String::new());
        for piece in pieces {
            match piece {
                Piece::Reasoning(text) => thinking.push_str(&text),
                Piece::Content(text) => content.push_str(&text),
                Piece::Call { index, id, name } => {
                    if !content.is_empty() {
                        parts.push(Part::Content(std::mem::take(&mut content)));
                    }
                    parts.push(Part::Call(json!({"index": index, "id": id, "type": "function",
                        "function": {"name": name, "arguments": ""}})));
                }
                Piece::Arguments { index, fragment } => {
                    parts.push(Part::Call(json!({"index": index, "function": {"arguments": fragment}})))
                }
            }
        }
        if !content.is_empty() {
            parts.push(Part::Content(content));
        }
        if !thinking.is_empty() {
            // A token's thinking comes before anything it adds to the answer.
            parts.insert(0, Part::Thinking(thinking));
        }
        if parts.is_empty() {
            if finish.is_none() && logprobs.is_null() {
                return true;
            }
            parts.push(Part::Content(String::new()));
        }
        let last = parts.len() - 1;
        let mut logprobs = Some(logprobs);
        parts.iter().enumerate().all(|(i, part)| {
            let mut delta = Delta { role: None, content: None, tool_calls: None, reasoning_content: None };
            match part {
                Part::Thinking(text) => delta.reasoning_content = Some(text),
                Part::Content(text) => delta.content = (!text.is_empty()).then_some(text.as_str()),
                Part::Call(call) => delta.tool_calls = Some(vec![call.clone()]),
            }
            let logprobs = logprobs.take().unwrap_or(Value::Null);
            let finish_reason = if i == last { finish } else { None };
            let stop_reason = finish_reason.map(|_| stop.clone());
            self.chunk(vec![ChunkChoice::Chat { index, delta, logprobs, finish_reason, stop_reason }], None)
        })
    }
}

/// One choice's share of a chunk.
struct ChoiceChunk<'a> {
    index: usize,
    text: &'a str,
    /// Chat's opening chunk: `delta.role = "assistant"`.
    role: bool,
    finish: Option<&'static str>,
    /// With `finish`: vLLM's `stop_reason`.
    stop: Value,
    logprobs: Value,
}

impl<'a> ChoiceChunk<'a> {
    fn text(index: usize, text: &'a str) -> Self {
        Self { index, text, role: false, finish: None, stop: Value::Null, logprobs: Value::Null }
    }
}

/// The echo chunk of prompt `p`, one per choice; false when the client has gone.
fn send_echo(out: &Chunks, shape: &AnswerShape, p: usize, logprobs: Value, sent_chars: &mut [usize]) -> bool {
    let Some(text) = shape.echo.as_ref().map(|e| e[p].as_str()) else { return true };
    (0..shape.n).all(|i| {
        let index = p * shape.n + i;
        sent_chars[index] = text.chars().count();
        out.choice(ChoiceChunk { logprobs: logprobs.clone(), ..ChoiceChunk::text(index, text) })
    })
}

pub fn sse_response(
    streams: Vec<RequestStream>,
    shape: AnswerShape,
    meta: ResponseMeta,
    tokenizer: Arc<Tokenizer>,
) -> Response {
    let (tx, rx) = unbounded();
    let chunks = Chunks { endpoint: shape.endpoint, meta, tx };
    // The pump is part of the body, not a task of its own: when the client goes away and the
    // server drops the body, the pump and its engine streams go with it at once, so the
    // requests are aborted (and their blocks freed) at the engine's next step, not at their
    // next token.
    let pump = pump(streams, shape, chunks, tokenizer).into_stream().filter_map(|()| async { None });
    let body = futures::stream::select(rx, pump);
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

async fn pump(streams: Vec<RequestStream>, shape: AnswerShape, out: Chunks, tokenizer: Arc<Tokenizer>) {
    let n = shape.n;
    if out.endpoint == Endpoint::Chat {
        for index in 0..streams.len() * n {
            if !out.choice(ChoiceChunk { role: true, ..ChoiceChunk::text(index, "") }) {
                return;
            }
        }
    }
    let mut state = PumpState {
        sent_chars: vec![0usize; streams.len() * n],
        echo_pending: vec![shape.echo.is_some(); streams.len()],
        readers: (0..streams.len() * n).map(|_| shape.reader()).collect(),
    };
    // An echoed prompt goes first; with logprobs it waits for its scores, which come with the
    // prompt's first token.
    if !shape.logprobs {
        for p in 0..streams.len() {
            if state.echo_pending[p] && !state.echo(&out, &shape, p, Value::Null) {
                return;
            }
        }
    }
    // One merged stream of (prompt index, event); each ends after its Finished or Error.
    let tagged = streams.into_iter().enumerate().map(|(p, s)| {
        futures::stream::unfold(Some(s), |state| async move {
            let mut s = state?;
            let ev = s.next().await?;
            let last = matches!(ev, RequestEvent::Finished(_) | RequestEvent::Error(_));
            Some((ev, if last { None } else { Some(s) }))
        })
        .map(move |ev| (p, ev))
        .boxed()
    });
    let mut merged = futures::stream::select_all(tagged);
    let mut usage = UsageSum::default();
    while let Some((p, ev)) = merged.next().await {
        let alive = match ev {
            RequestEvent::Token(t) => state.token(&out, &shape, &tokenizer, p, &t),
            RequestEvent::Stopped { index, text, finish } => {
                let stop = shape.stop_reason(finish.1.as_ref());
                let choice = p * shape.n + index;
                (!state.echo_pending[p] || state.echo(&out, &shape, p, Value::Null))
                    && state.emit(&out, choice, &text, Some(finish.0.as_str()), stop, Value::Null)
            }
            RequestEvent::Embedding { .. } => true, // only embedding requests get one
            RequestEvent::Finished(u) => {
                usage.add(&u);
                true
            }
            RequestEvent::Error(e) => {
                let err = ApiError::internal(e);
                let body =
                    json!({"error": {"message": err.message, "type": err.kind, "param": null, "code": null}});
                out.send(body.to_string());
                out.send("[DONE]".into());
                return;
            }
        };
        if !alive {
            return; // the client left: dropping the streams aborts the requests
        }
    }
    finish(&out, &shape, &usage);
}

/// Where each choice of a stream is.
struct PumpState {
    /// Characters sent so far per choice (completions' text_offset).
    sent_chars: Vec<usize>,
    /// Per prompt: its echo is still to be sent.
    echo_pending: Vec<bool>,
    /// Chat with tools or reasoning: per choice, the reader of its text.
    readers: Vec<Option<AnswerReader>>,
}

impl PumpState {
    /// Prompt `p`'s echo chunks; false when the client has gone.
    fn echo(&mut self, out: &Chunks, shape: &AnswerShape, p: usize, logprobs: Value) -> bool {
        self.echo_pending[p] = false;
        send_echo(out, shape, p, logprobs, &mut self.sent_chars)
    }

    /// One token of prompt `p` as a chunk (after its prompt's echo, when one is pending);
    /// false when the client has gone.
    fn token(
        &mut self,
        out: &Chunks,
        shape: &AnswerShape,
        tokenizer: &Tokenizer,
        p: usize,
        t: &TokenOutput,
    ) -> bool {
        if self.echo_pending[p] {
            let lp = t
                .prompt_logprobs
                .as_deref()
                .map_or(Value::Null, |lp| CompletionLogprobs::echoed_prompt(tokenizer, lp).to_json());
            if !self.echo(out, shape, p, lp) {
                return false;
            }
        }
        let index = p * shape.n + t.index;
        let finish = t.finish.as_ref().map(|(r, _)| r.as_str());
        let stop = shape.stop_reason(t.finish.as_ref().and_then(|(_, stop)| stop.as_ref()));
        let logprobs = match (shape.logprobs, out.endpoint) {
            (false, _) => Value::Null,
            (true, Endpoint::Chat) => chat_logprobs(vec![chat_entry(tokenizer, t)]),
            (true, Endpoint::Completion) => {
                let mut lp = CompletionLogprobs::default();
                lp.push(tokenizer, t, self.sent_chars[index]);
                lp.to_json()
            }
        };
        if t.text.is_empty() && finish.is_none() && !shape.logprobs && self.readers[index].is_none() {
            return true;
        }
        self.emit(out, index, &t.text, finish, stop, logprobs)
    }

    /// Choice `index`'s new `text` (through its reader, where it has one) as chunks, with its
    /// finish reason if it ended; false when the client has gone.
    fn emit(
        &mut self,
        out: &Chunks,
        index: usize,
        text: &str,
        finish: Option<&'static str>,
        stop: Value,
        logprobs: Value,
    ) -> bool {
        self.sent_chars[index] += text.chars().count();
        if let Some(reader) = self.readers[index].as_mut() {
            let mut pieces = reader.push(text);
            let finish = finish.map(|reason| {
                pieces.extend(reader.finish());
                reader.finish_reason(reason)
            });
            return out.pieces(index, pieces, logprobs, finish, stop);
        }
        out.choice(ChoiceChunk { finish, stop, logprobs, ..ChoiceChunk::text(index, text) })
    }
}

/// The end of a stream: its log line, the usage chunk when asked for, `[DONE]`.
fn finish(out: &Chunks, shape: &AnswerShape, usage: &UsageSum) {
    // The access line (written when the response head went out) cannot know these yet.
    let access = usage.access();
    tracing::info!(
        request_id = %shape.request_id,
        duration_ms = shape.started.elapsed().as_secs_f64() * 1000.0,
        prompt_tokens = access.prompt_tokens,
        completion_tokens = access.completion_tokens,
        ttft_ms = access.ttft_seconds.map(|t| t * 1000.0),
        cost_usd = access.cost_usd,
        budgets = %access.budgets,
        "stream finished"
    );
    if shape.include_usage {
        out.chunk(Vec::new(), Some(usage.to_openai()));
    }
    out.send("[DONE]".into());
}
