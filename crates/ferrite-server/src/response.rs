//! OpenAI's response shapes, typed, and built once from engine events: the whole answer of
//! `/v1/completions` and `/v1/chat/completions` ([`collect`]), the chunks their streams send
//! (`stream` writes them), and the usage summed over every prompt and sample of a request.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrite_engine::{FinishReason, RequestEvent, RequestStream, StopReason, Tokenizer};
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::logprobs::{chat_entry, CompletionLogprobs};
use crate::metrics::AccessUsage;
use crate::openai::{PromptTokensDetails, Usage};
use crate::reasoning::AnswerReader;

/// Which API answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completion,
    Chat,
}

impl Endpoint {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completion => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }

    pub fn object(self) -> &'static str {
        match self {
            Endpoint::Completion => "text_completion",
            Endpoint::Chat => "chat.completion",
        }
    }

    pub fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Completion => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        }
    }
}

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

/// How the answer is written, beyond the engine requests.
pub(crate) struct AnswerShape {
    /// For the log line a stream writes when it ends.
    pub request_id: String,
    pub started: Instant,
    pub endpoint: Endpoint,
    pub n: usize,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Completions `echo`: per prompt, its text before the choices' text.
    pub echo: Option<Vec<String>>,
    /// Chat with tools: how each choice's text is read for calls.
    pub tools: Option<crate::tools::Mode>,
    /// A reasoning model's chat: whether the prompt opened the thinking.
    pub thinking: Option<bool>,
    /// The model's end-of-sequence tokens: a stop on one of them has no `stop_reason`.
    pub eos_token_ids: Vec<u32>,
}

impl AnswerShape {
    /// vLLM's `stop_reason`: the stop string or stop token id that ended a choice; `null` when
    /// it ended otherwise (an EOS token, the length).
    pub fn stop_reason(&self, stop: Option<&StopReason>) -> Value {
        match stop {
            Some(StopReason::Text(text)) => json!(text),
            Some(StopReason::Cost) => json!("cost"),
            Some(StopReason::Deadline) => json!("deadline"),
            Some(StopReason::FirstTokenDeadline) => json!("ttft_deadline"),
            Some(StopReason::Token(id)) if !self.eos_token_ids.contains(id) => json!(id),
            _ => Value::Null,
        }
    }

    /// The reader of a chat choice's text, unless it is plain content.
    pub fn reader(&self) -> Option<AnswerReader> {
        match self.endpoint {
            Endpoint::Chat => AnswerReader::new(self.thinking, self.tools.as_ref()),
            Endpoint::Completion => None,
        }
    }
}

/// What every body and chunk of one response repeats.
pub(crate) struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// A whole answer, or one chunk of a stream (`choices` may be empty: the usage chunk).
#[derive(Serialize)]
pub(crate) struct Body<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    /// Always in a whole answer; in a stream only on the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl ResponseMeta {
    pub fn body<C>(&self, object: &'static str, choices: Vec<C>, usage: Option<Usage>) -> Body<'_, C> {
        Body { id: &self.id, object, created: self.created, model: &self.model, choices, usage }
    }
}

/// One choice of a whole answer.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum Choice {
    Text {
        index: usize,
        text: String,
        logprobs: Value,
        finish_reason: Option<&'static str>,
        stop_reason: Value,
    },
    Chat {
        index: usize,
        message: Message,
        logprobs: Value,
        finish_reason: Option<&'static str>,
        stop_reason: Value,
    },
}

#[derive(Serialize)]
pub(crate) struct Message {
    role: &'static str,
    /// `null` when the answer is only tool calls.
    content: Option<String>,
    refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
    /// A reasoning model's thinking (vLLM's field).
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
}

/// One choice's share of a stream chunk.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum ChunkChoice<'a> {
    Text {
        index: usize,
        text: &'a str,
        logprobs: Value,
        finish_reason: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stop_reason: Option<Value>,
    },
    Chat {
        index: usize,
        delta: Delta<'a>,
        logprobs: Value,
        finish_reason: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stop_reason: Option<Value>,
    },
}

/// What a chat chunk adds: the role on a choice's opening chunk, then text or tool calls (a
/// call's first delta has its `index`, `id`, `type` and `function.name`; later ones add to its
/// `function.arguments`).
#[derive(Serialize)]
pub(crate) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
}

/// Chat's logprobs object around its `content` entries.
pub(crate) fn chat_logprobs(content: Vec<Value>) -> Value {
    json!({"content": content, "refusal": null})
}

/// Token counts over every prompt and sample of one HTTP request.
#[derive(Default)]
pub(crate) struct UsageSum {
    prompt: usize,
    completion: usize,
    cached: usize,
    device_seconds: f64,
    cost_usd: f64,
    /// `None` once any part had no energy reading.
    energy_joules: Option<f64>,
    parts: usize,
    /// The earliest first token after arrival, over the parts.
    ttft: Option<f64>,
    /// How each part's budgets ended, as `kind=outcome` (comma-separated).
    budgets: String,
}

impl UsageSum {
    pub fn add(&mut self, u: &ferrite_engine::Usage) {
        self.prompt += u.prompt_tokens;
        self.completion += u.completion_tokens;
        self.cached += u.cached_tokens;
        self.device_seconds += u.device_seconds;
        self.cost_usd += u.cost_usd;
        self.energy_joules = match (self.parts, self.energy_joules, u.energy_joules) {
            (0, _, e) => e,
            (_, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.parts += 1;
        for (kind, outcome) in &u.budgets {
            if !self.budgets.is_empty() {
                self.budgets.push(',');
            }
            self.budgets.push_str(&format!("{}={}", kind.as_str(), outcome.as_str()));
        }
        if let Some(first) = u.first_token {
            let t = first.saturating_duration_since(u.arrival).as_secs_f64();
            self.ttft = Some(self.ttft.map_or(t, |x: f64| x.min(t)));
        }
    }

    pub fn to_openai(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt,
            completion_tokens: self.completion,
            total_tokens: self.prompt + self.completion,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: self.cached }),
            device_seconds: self.device_seconds,
            cost_usd: self.cost_usd,
            energy_joules: self.energy_joules,
        }
    }

    /// The same figures as response headers and for the access log.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            ("x-ferrite-device-seconds", format!("{:.6}", self.device_seconds)),
            ("x-ferrite-cost-usd", format!("{:.9}", self.cost_usd)),
            (
                "x-ferrite-energy-joules",
                self.energy_joules.map_or("unavailable".into(), |j| format!("{j:.3}")),
            ),
        ]
    }

    /// `body` as the JSON answer, with these figures as headers and for the access log.
    pub fn answer(&self, body: impl Serialize) -> Response {
        let mut response = Json(body).into_response();
        for (name, value) in self.headers() {
            if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, v);
            }
        }
        response.extensions_mut().insert(self.access());
        response
    }

    pub fn access(&self) -> AccessUsage {
        AccessUsage {
            prompt_tokens: self.prompt,
            completion_tokens: self.completion,
            ttft_seconds: self.ttft,
            cost_usd: self.cost_usd,
            budgets: self.budgets.clone(),
        }
    }
}

/// One prompt's `n` choices as they fill from its events.
struct PromptAnswer {
    texts: Vec<String>,
    finish: Vec<Option<(FinishReason, Option<StopReason>)>>,
    completion_lp: Vec<CompletionLogprobs>,
    chat_lp: Vec<Vec<Value>>,
}

impl PromptAnswer {
    fn new(n: usize, prefix: String) -> Self {
        Self {
            texts: vec![prefix; n],
            finish: vec![None; n],
            completion_lp: vec![CompletionLogprobs::default(); n],
            chat_lp: vec![Vec::new(); n],
        }
    }

    /// Reads `stream` to its end; its usage is added to `usage`.
    async fn read(
        &mut self,
        stream: &mut RequestStream,
        shape: &AnswerShape,
        tokenizer: &Tokenizer,
        usage: &mut UsageSum,
    ) -> Result<(), ApiError> {
        loop {
            match stream.next().await {
                Some(RequestEvent::Token(t)) => {
                    let i = t.index;
                    if let Some(prompt) = t.prompt_logprobs.as_deref().filter(|_| shape.logprobs) {
                        let echoed = CompletionLogprobs::echoed_prompt(tokenizer, prompt);
                        self.completion_lp.iter_mut().for_each(|lp| *lp = echoed.clone());
                    }
                    if shape.logprobs {
                        match shape.endpoint {
                            Endpoint::Completion => {
                                self.completion_lp[i].push(tokenizer, &t, self.texts[i].chars().count())
                            }
                            Endpoint::Chat => self.chat_lp[i].push(chat_entry(tokenizer, &t)),
                        }
                    }
                    self.texts[i].push_str(&t.text);
                    if t.finish.is_some() {
                        self.finish[i] = t.finish;
                    }
                }
                Some(RequestEvent::Stopped { index, text, finish }) => {
                    self.texts[index].push_str(&text);
                    self.finish[index] = Some(finish);
                }
                Some(RequestEvent::Finished(u)) => {
                    usage.add(&u);
                    return Ok(());
                }
                Some(RequestEvent::Error(e)) => return Err(ApiError::internal(e)),
                Some(RequestEvent::Embedding { .. }) => {
                    return Err(ApiError::internal("a generation request was answered with an embedding"))
                }
                None => return Err(ApiError::internal("the engine stopped before the request finished")),
            }
        }
    }

    /// Its choices, numbered from `first_index`.
    fn choices(self, shape: &AnswerShape, first_index: usize) -> impl Iterator<Item = Choice> + '_ {
        let PromptAnswer { texts, finish, completion_lp, chat_lp } = self;
        let parts = texts.into_iter().zip(finish).zip(completion_lp.into_iter().zip(chat_lp));
        parts.enumerate().map(move |(i, ((text, reason), (completion_lp, chat_lp)))| {
            let index = first_index + i;
            let stop_reason = shape.stop_reason(reason.as_ref().and_then(|(_, stop)| stop.as_ref()));
            let finish_reason = reason.map(|(r, _)| r.as_str());
            match shape.endpoint {
                Endpoint::Completion => {
                    let logprobs = if shape.logprobs { completion_lp.to_json() } else { Value::Null };
                    Choice::Text { index, text, logprobs, finish_reason, stop_reason }
                }
                Endpoint::Chat => {
                    let logprobs = if shape.logprobs { chat_logprobs(chat_lp) } else { Value::Null };
                    let (message, finish_reason) = match shape.reader() {
                        None => {
                            let message = Message {
                                role: "assistant",
                                content: Some(text),
                                refusal: None,
                                tool_calls: None,
                                reasoning_content: None,
                            };
                            (message, finish_reason)
                        }
                        Some(mut reader) => {
                            // The reader a stream uses, given the whole text at once.
                            let mut pieces = reader.push(&text);
                            pieces.extend(reader.finish());
                            let answer = crate::tools::assemble(pieces);
                            let calls = &answer.calls;
                            let tool_calls =
                                (!calls.is_empty()).then(|| calls.iter().map(|c| c.to_json()).collect());
                            let message = Message {
                                role: "assistant",
                                content: answer.content,
                                refusal: None,
                                tool_calls,
                                reasoning_content: answer.reasoning,
                            };
                            (message, finish_reason.map(|r| reader.finish_reason(r)))
                        }
                    };
                    Choice::Chat { index, message, logprobs, finish_reason, stop_reason }
                }
            }
        })
    }
}

/// The whole (non-streamed) answer: every prompt's stream read to its end, then one body with
/// the summed usage, its cost figures also as headers and for the access log.
pub(crate) async fn collect(
    streams: Vec<RequestStream>,
    shape: AnswerShape,
    meta: ResponseMeta,
    tokenizer: Arc<Tokenizer>,
) -> Result<Response, ApiError> {
    let mut choices = Vec::new();
    let mut usage = UsageSum::default();
    for (p, mut stream) in streams.into_iter().enumerate() {
        let prefix = shape.echo.as_ref().map(|e| e[p].clone()).unwrap_or_default();
        let mut answer = PromptAnswer::new(shape.n, prefix);
        answer.read(&mut stream, &shape, &tokenizer, &mut usage).await?;
        choices.extend(answer.choices(&shape, p * shape.n));
    }
    let body = meta.body(shape.endpoint.object(), choices, Some(usage.to_openai()));
    Ok(usage.answer(body))
}
