//! Parse, don't validate: an OpenAI request body becomes engine requests or an [`ApiError`]
//! naming the field, the limit and the value. The limits that are the API's (OpenAI's ranges,
//! `n`, stop strings) are checked here; the engine's own (context, vocabulary, sampling ranges)
//! are checked once, by `EngineHandle::submit`, whose typed error names the field.

use std::time::Instant;

use ferrite_engine::{
    ChatExtras, DetokenizerParams, EngineHandle, Grammar, GrammarSpec, Message, Request, SamplingParams,
    Tokenizer,
};
use serde_json::Value;

use crate::error::ApiError;
use crate::openai::{ChatMessage, ChatRequest, CompletionRequest, Content, Prompt, SamplingFields, Stop};
use crate::{structured, tools};

/// The bounds on one request's fields that the API sets (each a `ferrite serve` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most samples one request may ask for (`n`).
    pub max_n: usize,
    /// Most stop strings one request may give.
    pub max_stop_strings: usize,
    /// Most bytes all of one request's stop strings may take together (each step of each
    /// sample searches for them).
    pub max_stop_bytes: usize,
    /// Most `logit_bias` entries (each is applied to every step's logits).
    pub max_logit_bias: usize,
    /// Most bytes of a structured-output grammar's text (a JSON schema, a regex, the choices,
    /// a Lark grammar): compiling is bounded by llguidance's fuel, and this bounds the input.
    pub max_grammar_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_n: 128,
            max_stop_strings: 16,
            max_stop_bytes: 4096,
            max_logit_bias: 1024,
            max_grammar_bytes: 128 * 1024,
        }
    }
}
/// OpenAI's temperature range.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// OpenAI's default `max_tokens` for legacy completions.
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// What validation needs to know about the server.
pub struct Limits<'a> {
    pub served_model_name: &'a str,
    pub max_model_len: usize,
    pub defaults: &'a SamplingDefaults,
    pub request: RequestLimits,
    /// Compiles structured-output grammars; `None`: structured output is refused.
    pub engine: Option<&'a EngineHandle>,
    /// The format tool calls are read in (`--tool-call-parser`); `None`: the chat template's.
    pub tool_call_parser: Option<tools::Parser>,
    /// `--reasoning-parser`: chat answers are read for a thinking.
    pub reasoning_parser: Option<crate::reasoning::ReasoningParser>,
}

/// Values for the fields a request leaves out, from the model's registry entry (models.toml);
/// `None` keeps OpenAI's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Caps the output when the request gives no `max_tokens` (chat: still at most the rest of
    /// the context).
    pub max_tokens: Option<usize>,
    /// Budgets for requests that set none (models.toml's `budgets`): a batch model can run at
    /// a low priority, an interactive one with a first-token deadline. A header still tightens
    /// them.
    pub priority: Option<i32>,
    pub deadline_ms: Option<f64>,
    pub ttft_deadline_ms: Option<f64>,
    pub max_cost_usd: Option<f64>,
}

/// A checked request: one engine request per prompt, and how to answer.
#[derive(Debug)]
pub struct Checked {
    pub requests: Vec<Request>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Report per-token logprobs (with this many alternatives each).
    pub logprobs: Option<usize>,
    /// Completions `echo`: each prompt's text, to put before its choices' text.
    pub echo: Option<Vec<String>>,
    /// Chat with tools: how each choice's text is read for calls.
    pub tools: Option<tools::Mode>,
    /// A reasoning model's chat: whether the prompt opened the thinking.
    pub thinking: Option<bool>,
}

fn check_model(model: &Option<String>, limits: &Limits<'_>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid(Some("model"), "`model` is required")),
        Some(m) if m != limits.served_model_name => {
            Err(ApiError::model_not_found(m, &[limits.served_model_name]))
        }
        Some(_) => Ok(()),
    }
}

/// The grammar the request's structured-output field asks for, compiled (on this thread: the
/// caller keeps validation off the async workers).
fn grammar(
    response_format: Option<&serde_json::Value>,
    f: &SamplingFields,
    limits: &Limits<'_>,
) -> Result<Option<Grammar>, ApiError> {
    let Some(asked) = structured::asked(response_format, &f.structured, limits.request.max_grammar_bytes)?
    else {
        return Ok(None);
    };
    compile(&asked.spec, asked.param, limits).map(Some)
}

/// `spec` compiled; errors name `param`.
fn compile(spec: &GrammarSpec, param: &str, limits: &Limits<'_>) -> Result<Grammar, ApiError> {
    let Some(engine) = limits.engine else {
        return Err(ApiError::invalid(Some(param), "structured output is not available here"));
    };
    engine
        .compile_grammar(spec)
        .map_err(|e| ApiError::invalid(Some(param), format!("`{param}` does not compile: {e}")))
}

/// Text longer than `max_model_len` tokens can ever hold is refused before tokenizing it.
pub(crate) fn check_text_bytes(
    param: &str,
    bytes: usize,
    tokenizer: &Tokenizer,
    limits: &Limits<'_>,
) -> Result<(), ApiError> {
    let most = tokenizer.max_text_bytes(limits.max_model_len);
    if bytes > most {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "`{param}` is {bytes} bytes of text, more than {most} bytes can encode to max_model_len ({}) tokens",
                limits.max_model_len
            ),
        ));
    }
    Ok(())
}

fn refuse_if(present: bool, param: &str, message: &str) -> Result<(), ApiError> {
    if present {
        Err(ApiError::invalid(Some(param), message))
    } else {
        Ok(())
    }
}

/// Sampling, stopping and detokenizing options shared by both endpoints.
fn options(
    f: &SamplingFields,
    top_logprobs: usize,
    limits: &Limits<'_>,
) -> Result<(SamplingParams, DetokenizerParams, usize), ApiError> {
    let (defaults, bounds) = (limits.defaults, limits.request);
    let n = f.n.unwrap_or(1);
    let max_n = bounds.max_n;
    if n == 0 || n > max_n {
        return Err(ApiError::invalid(Some("n"), format!("`n` must be between 1 and {max_n}, got {n}")));
    }
    if let Some(t) = f.temperature {
        if !(0.0..=MAX_TEMPERATURE).contains(&t) {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("`temperature` must be in [0, {MAX_TEMPERATURE}], got {t}"),
            ));
        }
    }
    let seed = match f.seed {
        Some(s) if s < 0 => {
            return Err(ApiError::invalid(Some("seed"), format!("`seed` must be >= 0, got {s}")))
        }
        s => s.map(|s| s as u64),
    };
    let top_k = match f.top_k {
        None => defaults.top_k,
        Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("`top_k` must be -1 (off) or >= 1, got {k}"),
            ))
        }
    };
    let logit_bias = logit_bias(f, bounds.max_logit_bias)?;
    let sampling = SamplingParams {
        temperature: f.temperature.or(defaults.temperature).unwrap_or(1.0),
        top_k,
        top_p: f.top_p.or(defaults.top_p).unwrap_or(1.0),
        min_p: f.min_p.or(defaults.min_p).unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.or(defaults.repetition_penalty).unwrap_or(1.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        logit_bias,
        seed,
        top_logprobs,
        min_tokens: f.min_tokens.unwrap_or(0),
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        max_cost_usd: f.max_cost_usd.or(defaults.max_cost_usd),
    };
    let stop = stop_strings(f, &bounds)?;
    let detokenize = DetokenizerParams {
        skip_special_tokens: f.skip_special_tokens.unwrap_or(true),
        stop,
        include_stop_str_in_output: f.include_stop_str_in_output.unwrap_or(false),
    };
    Ok((sampling, detokenize, n))
}

/// `logit_bias` as token ids, at most `max` entries.
fn logit_bias(f: &SamplingFields, max: usize) -> Result<std::collections::BTreeMap<u32, f32>, ApiError> {
    let entries = f.logit_bias.as_ref().map_or(0, |b| b.len());
    if entries > max {
        let message = format!("`logit_bias` may have at most {max} entries, got {entries}");
        return Err(ApiError::invalid(Some("logit_bias"), message));
    }
    let mut logit_bias = std::collections::BTreeMap::new();
    for (k, v) in f.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(Some("logit_bias"), format!("`logit_bias` keys must be token ids, got {k:?}"))
        })?;
        logit_bias.insert(id, *v);
    }
    Ok(logit_bias)
}

/// The stop strings, within the count and byte limits.
fn stop_strings(f: &SamplingFields, bounds: &RequestLimits) -> Result<Vec<String>, ApiError> {
    let stop = match &f.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    let (max_strings, max_bytes) = (bounds.max_stop_strings, bounds.max_stop_bytes);
    if stop.len() > max_strings {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("at most {max_strings} stop strings are allowed, got {}", stop.len()),
        ));
    }
    let stop_bytes: usize = stop.iter().map(String::len).sum();
    if stop_bytes > max_bytes {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("the stop strings take {stop_bytes} bytes together; at most {max_bytes} are allowed"),
        ));
    }
    Ok(stop)
}

fn build(
    prompts: Vec<Vec<u32>>,
    max_tokens: impl Fn(usize) -> usize,
    f: &SamplingFields,
    top_logprobs: usize,
    limits: &Limits<'_>,
) -> Result<Checked, ApiError> {
    let (sampling, detokenize, n) = options(f, top_logprobs, limits)?;
    let deadlines = crate::budgets::from_fields(f, limits.defaults)?;
    let requests = prompts
        .into_iter()
        .enumerate()
        .map(|(i, ids)| Request {
            request_id: format!("{i}"),
            max_tokens: max_tokens(ids.len()),
            prompt_token_ids: ids,
            sampling: sampling.clone(),
            detokenize: detokenize.clone(),
            n,
            prompt_logprobs: None,
            grammar: None,
            arrival: Instant::now(),
            priority: f.priority.or(limits.defaults.priority).unwrap_or(0),
            deadlines,
        })
        .collect();
    Ok(Checked {
        requests,
        n,
        stream: f.stream.unwrap_or(false),
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs: None,
        echo: None,
        tools: None,
        thinking: None,
    })
}

pub fn completion(
    req: &CompletionRequest,
    tokenizer: &Tokenizer,
    limits: &Limits<'_>,
) -> Result<Checked, ApiError> {
    check_model(&req.model, limits)?;
    refuse_if(req.best_of.is_some(), "best_of", "`best_of` is not supported; use `n`")?;
    refuse_if(req.suffix.is_some(), "suffix", "`suffix` (insertion) is not supported")?;
    let grammar = grammar(req.response_format.as_ref(), &req.sampling, limits)?;
    let logprobs = match &req.logprobs {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(k) if k as usize <= ferrite_engine::sampler::MAX_TOP_LOGPROBS => Some(k as usize),
            _ => {
                return Err(ApiError::invalid(
                    Some("logprobs"),
                    format!(
                        "`logprobs` must be an integer from 0 to {}, got {v}",
                        ferrite_engine::sampler::MAX_TOP_LOGPROBS
                    ),
                ))
            }
        },
    };
    let echo = req.echo == Some(true);
    let encode = |t: &str| {
        check_text_bytes("prompt", t.len(), tokenizer, limits)?;
        tokenizer.encode(t, true).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))
    };
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        None => return Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(Prompt::Text(t)) => vec![encode(t)?],
        Some(Prompt::Texts(ts)) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Some(Prompt::Tokens(ids)) => vec![ids.clone()],
        Some(Prompt::TokenLists(l)) => l.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "`prompt` is an empty list"));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(ApiError::invalid(Some("prompt"), format!("prompt {i} is empty (0 tokens)")));
    }
    let max_tokens = req.max_tokens.or(limits.defaults.max_tokens).unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS);
    let echo_texts = if echo {
        let texts: Result<Vec<String>, ApiError> = prompts
            .iter()
            .map(|ids| {
                tokenizer.decode(ids, true).map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))
            })
            .collect();
        Some(texts?)
    } else {
        None
    };
    let mut checked = build(prompts, |_| max_tokens, &req.sampling, logprobs.unwrap_or(0), limits)?;
    checked.requests.iter_mut().for_each(|r| r.grammar = grammar.clone());
    if echo {
        // The echoed prompt carries its own logprobs, as OpenAI's legacy completions do.
        checked.requests.iter_mut().for_each(|r| r.prompt_logprobs = logprobs);
    }
    checked.logprobs = logprobs;
    checked.echo = echo_texts;
    Ok(checked)
}

fn message_text(i: usize, content: &Option<Content>) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            Some(&param),
                            format!("content part {j} of type {kind:?} is not supported (only text parts)"),
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

/// The chat messages, checked, plus the rendered prompt's ids.
pub fn chat(req: &ChatRequest, tokenizer: &Tokenizer, limits: &Limits<'_>) -> Result<Checked, ApiError> {
    check_model(&req.model, limits)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(Some("top_logprobs"), "`top_logprobs` needs `logprobs: true`"))
        }
        _ => None,
    };
    if let Some(field) = req.first_unsupported() {
        return Err(ApiError::invalid(Some(field), format!("`{field}` is not supported")));
    }
    let parser = limits
        .tool_call_parser
        .or_else(|| tokenizer.chat_template().and_then(|t| tools::Parser::detect(t.source())));
    // Mistral's call mark, where the vocabulary holds it whole (strict `auto` calls name it).
    let mark = tokenizer.token_id(tools::MISTRAL_MARK);
    let tools = tools::asked(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls.as_ref(),
        parser,
        mark,
    )?;
    let mut grammar = grammar(req.response_format.as_ref(), &req.sampling, limits)?;
    if let Some(spec) = tools.as_ref().and_then(|t| t.grammar.as_ref()) {
        if grammar.is_some() {
            return Err(ApiError::invalid(
                Some("tool_choice"),
                "the tools already constrain the answer (a forced call: `tool_choice` \"required\" or a named \
                 function, or `strict` tools): they cannot be combined with a structured-output field",
            ));
        }
        let bytes = match spec {
            GrammarSpec::JsonSchema(schema) => schema.to_string().len(),
            GrammarSpec::Lark(text) => text.len(),
            _ => 0,
        };
        let most = limits.request.max_grammar_bytes;
        if bytes > most {
            return Err(ApiError::invalid(
                Some("tools"),
                format!("the tools' schemas are {bytes} bytes of grammar; at most {most} are allowed (--max-grammar-bytes)"),
            ));
        }
        grammar = Some(compile(spec, "tools", limits)?);
    }
    let messages =
        req.messages.as_ref().ok_or_else(|| ApiError::invalid(Some("messages"), "`messages` is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "`messages` must not be empty"));
    }
    let rendered: Vec<Message> =
        messages.iter().enumerate().map(|(i, m)| chat_message(i, m)).collect::<Result<_, _>>()?;
    let extras = ChatExtras {
        tools: tools.as_ref().map(|t| t.rendered.clone()),
        kwargs: template_kwargs(req.chat_template_kwargs.as_ref())?,
    };
    let json_bytes = |v: &Value| v.to_string().len();
    let text_bytes: usize = rendered
        .iter()
        .map(|m| {
            m.content.as_ref().map_or(0, String::len)
                + m.tool_calls.iter().flatten().map(json_bytes).sum::<usize>()
        })
        .sum::<usize>()
        + extras.tools.iter().flatten().map(json_bytes).sum::<usize>();
    check_text_bytes("messages", text_bytes, tokenizer, limits)?;
    let (prompt, ids) = tokenizer
        .encode_chat_with(&rendered, &extras)
        .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let thinking = limits.reasoning_parser.map(|_| crate::reasoning::opens_thinking(&prompt));
    if let (Some(started), Some(g)) = (thinking, grammar.as_mut()) {
        // The grammar holds for the answer, after the thinking, where the markers are tokens
        // of their own (as in Qwen3's and DeepSeek-R1's vocabularies); otherwise from the start.
        let open = tokenizer.token_id(crate::reasoning::OPEN);
        let end = tokenizer.token_id(crate::reasoning::CLOSE);
        if let (Some(open), Some(end)) = (open, end) {
            *g = g.after_thinking(ferrite_engine::Thinking { open, end, started });
        }
    }
    let max_model_len = limits.max_model_len;
    let asked = req.max_completion_tokens.or(req.max_tokens);
    let default_cap = limits.defaults.max_tokens.unwrap_or(usize::MAX);
    // Without a limit, generate up to the model's length (vLLM's default), or the registry's cap.
    let max_tokens = move |prompt_len: usize| {
        asked.unwrap_or(max_model_len.saturating_sub(prompt_len).clamp(1, default_cap))
    };
    let mut checked = build(vec![ids], max_tokens, &req.sampling, logprobs.unwrap_or(0), limits)?;
    let mode = tools.and_then(|t| t.mode);
    // Mistral's `[TOOL_CALLS]`, Llama's `<|python_tag|>` and some models' `<think>` are special
    // tokens: keep them in the text the readers see, unless the request says otherwise.
    let marks_are_special = matches!(
        mode,
        Some(tools::Mode::Auto { parser: tools::Parser::Mistral | tools::Parser::Llama3Json, .. })
    );
    if matches!(mode, Some(tools::Mode::Auto { parser: tools::Parser::Mistral, .. }))
        && req.sampling.skip_special_tokens == Some(true)
    {
        return Err(ApiError::invalid(
            Some("skip_special_tokens"),
            "`skip_special_tokens: true` would hide the `[TOOL_CALLS]` token that opens a call in this model's format: leave it out with `tools`",
        ));
    }
    let marks_are_special = marks_are_special || thinking.is_some();
    for r in &mut checked.requests {
        r.grammar = grammar.clone();
        if marks_are_special && req.sampling.skip_special_tokens.is_none() {
            r.detokenize.skip_special_tokens = false;
        }
    }
    checked.logprobs = logprobs;
    checked.tools = mode;
    checked.thinking = thinking;
    Ok(checked)
}

/// One request message as the template sees it: text content (`None` for an assistant turn
/// that only calls tools), its calls with `arguments` parsed into objects, the tool result's id.
fn chat_message(i: usize, m: &ChatMessage) -> Result<Message, ApiError> {
    if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
        return Err(ApiError::invalid(
            Some(&format!("messages[{i}].role")),
            format!("unknown role {:?} (system, developer, user, assistant, tool)", m.role),
        ));
    }
    let calls = m.tool_calls.as_ref().filter(|c| !c.is_empty());
    if calls.is_some() && m.role != "assistant" {
        return Err(ApiError::invalid(
            Some(&format!("messages[{i}].tool_calls")),
            format!("only assistant messages carry `tool_calls`, not {:?}", m.role),
        ));
    }
    let tool_calls = calls
        .map(|calls| {
            calls.iter().enumerate().map(|(j, c)| history_call(i, j, c)).collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let content = match (&m.content, &tool_calls) {
        (None, Some(_)) => None,
        (content, _) => Some(message_text(i, content)?),
    };
    Ok(Message {
        role: m.role.clone(),
        content,
        tool_calls,
        tool_call_id: m.tool_call_id.clone(),
        name: m.name.clone(),
    })
}

/// A call in the history, normalised for templates: `arguments` as an object where the
/// string given parses as one (as vLLM hands them over).
fn history_call(i: usize, j: usize, call: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{i}].tool_calls[{j}]");
    let function = call.get("function").filter(|f| f.is_object());
    let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
    let (Some(function), Some(name)) = (function, name) else {
        return Err(ApiError::invalid(Some(&param), format!("`{param}.function.name` is required")));
    };
    let arguments = match function.get("arguments") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(parsed @ Value::Object(_)) => parsed,
            _ => Value::String(text.clone()),
        },
        Some(other) => other.clone(),
    };
    let mut normal =
        serde_json::json!({"type": "function", "function": {"name": name, "arguments": arguments}});
    if let Some(id) = call.get("id").filter(|v| !v.is_null()) {
        normal["id"] = id.clone();
    }
    Ok(normal)
}

/// `chat_template_kwargs`: an object whose keys do not replace what the server sets.
fn template_kwargs(kwargs: Option<&Value>) -> Result<serde_json::Map<String, Value>, ApiError> {
    let param = Some("chat_template_kwargs");
    match kwargs {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(Value::Object(map)) => {
            let reserved = ferrite_engine::model::chat_template::RESERVED_TEMPLATE_VARIABLES;
            if let Some(key) = map.keys().find(|k| reserved.contains(&k.as_str())) {
                return Err(ApiError::invalid(
                    param,
                    format!("`chat_template_kwargs.{key}` is set by the server ({})", reserved.join(", ")),
                ));
            }
            Ok(map.clone())
        }
        Some(_) => Err(ApiError::invalid(param, "`chat_template_kwargs` must be an object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_engine::model::tokenizer::TokenizerConfig;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
        let config = TokenizerConfig::from_file(&dir.join("tokenizer_config.json")).unwrap();
        Tokenizer::load(&dir.join("tokenizer.json"), config).unwrap()
    }

    #[test]
    fn registry_defaults_fill_only_the_fields_a_request_leaves_out() {
        let tok = tokenizer();
        let defaults = SamplingDefaults {
            temperature: Some(0.3),
            top_p: Some(0.8),
            top_k: Some(5),
            min_p: Some(0.05),
            repetition_penalty: Some(1.1),
            max_tokens: Some(7),
            priority: Some(10),
            deadline_ms: Some(2000.0),
            ttft_deadline_ms: None,
            max_cost_usd: Some(0.5),
        };
        let limits = Limits {
            served_model_name: "m",
            max_model_len: 64,
            defaults: &defaults,
            request: Default::default(),
            engine: None,
            tool_call_parser: None,
            reasoning_parser: None,
        };
        let parse = |v: serde_json::Value| serde_json::from_value::<CompletionRequest>(v).unwrap();

        let bare =
            completion(&parse(serde_json::json!({"model": "m", "prompt": "hi"})), &tok, &limits).unwrap();
        let r = &bare.requests[0];
        assert_eq!((r.sampling.temperature, r.sampling.top_p, r.sampling.top_k), (0.3, 0.8, Some(5)));
        assert_eq!((r.sampling.min_p, r.sampling.repetition_penalty, r.max_tokens), (0.05, 1.1, 7));
        let two_seconds = Some(std::time::Duration::from_secs(2));
        assert_eq!((r.priority, r.deadlines.total, r.deadlines.first_token), (10, two_seconds, None));
        assert_eq!(r.sampling.max_cost_usd, Some(0.5));

        let given = serde_json::json!({"model": "m", "prompt": "hi", "temperature": 1.5, "top_p": 1.0,
            "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "max_tokens": 3, "priority": 0,
            "deadline_ms": 9000, "max_cost_usd": 2.0});
        let r = &completion(&parse(given), &tok, &limits).unwrap().requests[0];
        let nine_seconds = Some(std::time::Duration::from_secs(9));
        assert_eq!((r.priority, r.deadlines.total, r.sampling.max_cost_usd), (0, nine_seconds, Some(2.0)));
        assert_eq!((r.sampling.temperature, r.sampling.top_p, r.sampling.top_k), (1.5, 1.0, None));
        assert_eq!((r.sampling.min_p, r.sampling.repetition_penalty, r.max_tokens), (0.0, 1.0, 3));

        // Chat without max_tokens: the registry's cap, never past the context.
        let chat_req = |max_model_len| {
            let req: ChatRequest = serde_json::from_value(
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .unwrap();
            let limits = Limits {
                served_model_name: "m",
                max_model_len,
                defaults: &defaults,
                request: Default::default(),
                engine: None,
                tool_call_parser: None,
                reasoning_parser: None,
            };
            let checked = chat(&req, &tok, &limits).unwrap();
            let r = &checked.requests[0];
            (r.prompt_token_ids.len(), r.max_tokens)
        };
        assert_eq!(chat_req(64).1, 7);
        let (prompt, _) = chat_req(64);
        let (_, max_tokens) = chat_req(prompt);
        assert_eq!(max_tokens, 1, "prompt of {prompt} tokens with no room left still asks for one token");
        assert_eq!(chat_req(prompt + 4).1, 4);
    }
}
