//! Tool calling, as OpenAI clients ask for it: `tools`, `tool_choice` and
//! `parallel_tool_calls` become the tools the chat template renders, a grammar where the choice
//! forces a call (`required`, or a named function: the model can then only write a valid call
//! whose arguments match the function's schema), and a [`CallReader`] that splits each choice's
//! text into content and calls. The whole answer and the stream use the same reader, so the
//! calls a stream reassembles are the calls the whole answer holds.

use ferrite_engine::GrammarSpec;
use serde_json::{json, Value};

use crate::error::ApiError;

/// Most tools one request may give (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// The formats models write calls in, in `auto` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parser {
    /// Hermes, Qwen2.5, Qwen3: `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks.
    Hermes,
    /// Llama 3.1+: the whole answer is `{"name": …, "parameters": {…}}` (calls separated by
    /// `;`), optionally after `<|python_tag|>`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`, or
    /// `name[ARGS]{…}` per call.
    Mistral,
}

impl Parser {
    pub const NAMES: [&'static str; 3] = ["hermes", "llama3_json", "mistral"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            "mistral" => Some(Self::Mistral),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
        }
    }

    /// The format a chat template writes calls in, recognised by its markers.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<tool_call>") {
            Some(Self::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(Self::Mistral)
        } else if template.contains("<|python_tag|>")
            || (template.contains("ipython") && template.contains("\"parameters\""))
        {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }
}

/// How an answer's calls are read.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// The model chooses; calls are parsed from its text in `parser`'s format. With
    /// `parallel` false, only the first call is kept.
    Auto { parser: Parser, parallel: bool },
    /// Grammar-forced: a JSON array of `{"name", "parameters"}` objects, at least one.
    Required,
    /// Grammar-forced: the arguments object of this function.
    Named(String),
}

/// What a request's tool fields ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The tool objects, for the chat template.
    pub rendered: Vec<Value>,
    /// `None`: `tool_choice: "none"`, the text is not read for calls.
    pub mode: Option<Mode>,
    /// The grammar of a forced call.
    pub grammar: Option<GrammarSpec>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param), message)
}

/// One function tool: its name, its parameters' schema (`{"type": "object"}` if none), and
/// whether it is `strict`.
fn function(i: usize, tool: &Value) -> Result<Function, ApiError> {
    let param = format!("tools[{i}]");
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(&param, format!("`{param}.type` must be \"function\"")));
    }
    let Some(f) = tool.get("function").filter(|f| f.is_object()) else {
        return Err(invalid(&param, format!("`{param}.function` (an object with a `name`) is required")));
    };
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
        return Err(invalid(
            &param,
            format!("`{param}.function.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {name:?}"),
        ));
    }
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object"}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => {
            return Err(invalid(
                &param,
                format!("`{param}.function.parameters` must be a JSON schema object"),
            ))
        }
    };
    let strict = match f.get("strict") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid(&param, format!("`{param}.function.strict` must be a boolean"))),
    };
    Ok(Function { name: name.to_string(), parameters, strict })
}

/// A checked function tool.
struct Function {
    name: String,
    parameters: Value,
    strict: bool,
}

/// The tool fields of a chat request, checked. `parser` is the server's call format (the
/// `--tool-call-parser` flag, or what the chat template shows); `auto` needs one.
pub fn asked(
    tools: Option<&Vec<Value>>,
    tool_choice: Option<&Value>,
    parallel_tool_calls: Option<&Value>,
    parser: Option<Parser>,
) -> Result<Option<Tools>, ApiError> {
    let tools = tools.filter(|t| !t.is_empty());
    let choice = tool_choice.filter(|c| !c.is_null());
    let parallel = match parallel_tool_calls.filter(|p| !p.is_null()) {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("parallel_tool_calls", "`parallel_tool_calls` must be a boolean")),
    };
    let Some(tools) = tools else {
        return match choice {
            None => Ok(None),
            Some(Value::String(s)) if s == "none" => Ok(None),
            Some(_) => Err(invalid("tool_choice", "`tool_choice` needs `tools`")),
        };
    };
    if tools.len() > MAX_TOOLS {
        return Err(invalid("tools", format!("at most {MAX_TOOLS} tools are allowed, got {}", tools.len())));
    }
    let functions: Vec<Function> =
        tools.iter().enumerate().map(|(i, t)| function(i, t)).collect::<Result<_, _>>()?;
    for (i, f) in functions.iter().enumerate() {
        if functions[..i].iter().any(|g| g.name == f.name) {
            return Err(invalid(&format!("tools[{i}]"), format!("two tools are named {:?}", f.name)));
        }
    }
    let (mode, grammar) = match choice {
        None => auto(parser, parallel, &functions)?,
        Some(Value::String(s)) => match s.as_str() {
            "none" => (None, None),
            "auto" => auto(parser, parallel, &functions)?,
            "required" => (Some(Mode::Required), Some(required_grammar(&functions, parallel))),
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!(
                        "`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}, got {other:?}"
                    ),
                ))
            }
        },
        Some(named) => {
            let name = named
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| named.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    invalid("tool_choice", "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": …}}")
                })?;
            let Some(Function { parameters, .. }) = functions.iter().find(|f| f.name == name) else {
                let known: Vec<&str> = functions.iter().map(|f| f.name.as_str()).collect();
                return Err(invalid(
                    "tool_choice",
                    format!("`tool_choice` names {name:?}, which is not among the tools ({})", known.join(", ")),
                ));
            };
            (Some(Mode::Named(name.to_string())), Some(GrammarSpec::JsonSchema(parameters.clone())))
        }
    };
    Ok(Some(Tools { rendered: tools.clone(), mode, grammar }))
}

/// `auto`: calls read in `parser`'s format. When a tool is `strict`, a grammar holds too: the
/// text is free until a call opens, and each call must then name a tool and match its schema
/// (the strict tools' schemas; any object for the others).
fn auto(
    parser: Option<Parser>,
    parallel: bool,
    functions: &[Function],
) -> Result<(Option<Mode>, Option<GrammarSpec>), ApiError> {
    let Some(parser) = parser else {
        return Err(invalid(
            "tool_choice",
            format!(
                "`tool_choice` \"auto\" (the default with `tools`) needs to know how this model writes calls, \
                 and its chat template shows no format ferrite knows: start the server with \
                 --tool-call-parser ({}), or send `tool_choice` \"required\" or a named function",
                Parser::NAMES.join(", ")
            ),
        ));
    };
    let grammar = if functions.iter().any(|f| f.strict) { strict_grammar(parser, functions)? } else { None };
    Ok((Some(Mode::Auto { parser, parallel }), grammar))
}

/// One call object in `parser`'s format for each function: `{"name": …, key: arguments}`.
fn call_schemas(functions: &[Function], arguments_key: &str) -> Value {
    let calls: Vec<Value> = functions
        .iter()
        .map(|f| {
            let arguments = if f.strict { f.parameters.clone() } else { json!({"type": "object"}) };
            json!({"type": "object", "properties": {"name": {"const": f.name}, arguments_key: arguments},
                "required": ["name", arguments_key], "additionalProperties": false})
        })
        .collect();
    let mut schema = json!({"anyOf": calls});
    ferrite_engine::grammar::bounded_json_whitespace(&mut schema);
    schema
}

/// The Lark grammar (llguidance's dialect) of an `auto` answer with strict tools.
fn strict_grammar(parser: Parser, functions: &[Function]) -> Result<Option<GrammarSpec>, ApiError> {
    let lark = match parser {
        // Free text, where each `<tool_call>` opens a call that must be valid; text may follow.
        Parser::Hermes => format!(
            "%llguidance {{}}\nstart: call* TEXT\nTEXT: /(.|\\n)*/\nopening[lazy]: TEXT \"<tool_call>\"\n\
             call: opening \"\\n\" body \"\\n</tool_call>\"\nbody: %json {}\n",
            call_schemas(functions, "arguments")
        ),
        // Text that does not start with `{`, or calls separated by `;`.
        Parser::Llama3Json => format!(
            "%llguidance {{}}\nstart: TEXT | call (\"; \" call)*\nTEXT: /[^{{](.|\\n)*/\ncall: %json {}\n",
            call_schemas(functions, "parameters")
        ),
        // `[TOOL_CALLS]` is a special token in Mistral's vocabularies, which a text grammar
        // cannot name portably.
        Parser::Mistral => {
            return Err(invalid(
                "tools",
                "`strict` tools with `tool_choice` \"auto\" are not enforced for the mistral call format: \
                 send `strict: false`, or `tool_choice` \"required\" or a named function (both enforce the schemas)",
            ))
        }
    };
    Ok(Some(GrammarSpec::Lark(lark)))
}

/// `required`: a JSON array of calls to the given functions, each `{"name", "parameters"}`
/// with the function's own schema; at most one without parallel calls.
fn required_grammar(functions: &[Function], parallel: bool) -> GrammarSpec {
    let calls: Vec<Value> = functions
        .iter()
        .map(|f| {
            json!({"type": "object", "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                "required": ["name", "parameters"], "additionalProperties": false})
        })
        .collect();
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    GrammarSpec::JsonSchema(schema)
}

/// A piece of a choice's answer, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// A reasoning model's thinking (see [`crate::reasoning`]).
    Reasoning(String),
    Content(String),
    /// A call begins: its index among the choice's calls, id and function name.
    Call {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments (a JSON text, in fragments).
    Arguments {
        index: usize,
        fragment: String,
    },
}

/// A call as OpenAI returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// A call id unique within this process: `call_` and 24 hex digits.
fn call_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("call_{:016x}{:08x}", nanos as u64, NEXT.fetch_add(1, Ordering::Relaxed) as u32)
}

/// Where an `auto` reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing read yet that says whether the answer is text or a call (llama3_json).
    Undecided,
    Text,
    /// Inside a call's markup; `held` has what follows the opening marker.
    Call,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";

/// Reads one choice's text, token by token, into [`Piece`]s.
pub struct CallReader {
    mode: Mode,
    phase: Phase,
    /// Text not yet given out: a possible start of a marker, a call's markup, or (required)
    /// the JSON read so far.
    held: String,
    /// Whitespace-only content waiting for more: dropped if the answer turns out to be calls.
    blank: String,
    calls: usize,
    /// `required`: the JSON scanner's state over `held`.
    scan: JsonScan,
}

/// Enough of a JSON lexer to find where each element of a top-level array ends.
#[derive(Debug, Default)]
struct JsonScan {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Byte offset in `held` of the element being read.
    element_start: Option<usize>,
    /// Bytes of `held` scanned.
    scanned: usize,
}

impl CallReader {
    pub fn new(mode: Mode) -> Self {
        let phase = match mode {
            Mode::Auto { parser: Parser::Llama3Json, .. } => Phase::Undecided,
            _ => Phase::Text,
        };
        Self { mode, phase, held: String::new(), blank: String::new(), calls: 0, scan: JsonScan::default() }
    }

    /// Calls read so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The finish reason to report: a choice that called tools ends with `tool_calls` (not
    /// for a named function, as OpenAI answers it), otherwise as the engine said.
    pub fn finish_reason(&self, engine: &'static str) -> &'static str {
        match self.mode {
            Mode::Named(_) => engine,
            _ if self.calls > 0 && engine == "stop" => "tool_calls",
            _ => engine,
        }
    }

    /// The pieces `text` (the next token's text) completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        match self.mode.clone() {
            Mode::Named(name) => {
                if self.calls == 0 {
                    out.push(Piece::Call { index: 0, id: call_id(), name });
                    self.calls = 1;
                }
                if !text.is_empty() {
                    out.push(Piece::Arguments { index: 0, fragment: text.to_string() });
                }
            }
            Mode::Required => {
                self.held.push_str(text);
                self.scan_required(&mut out);
            }
            Mode::Auto { parser, parallel } => {
                self.held.push_str(text);
                match parser {
                    Parser::Hermes => self.read_hermes(parallel, &mut out),
                    Parser::Llama3Json => self.read_llama(&mut out),
                    Parser::Mistral => self.read_mistral(&mut out),
                }
            }
        }
        out
    }

    /// The pieces left when the text ends.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        match (self.mode.clone(), self.phase) {
            (Mode::Named(_), _) => {
                if self.calls == 0 {
                    out.extend(self.push(""));
                }
            }
            (Mode::Required, _) => {
                // Cut short (by max_tokens) before one whole call: the text is all there is.
                if self.calls == 0 {
                    self.content(held, &mut out);
                }
            }
            (Mode::Auto { .. }, Phase::Undecided | Phase::Text) => self.content(held, &mut out),
            (Mode::Auto { parser, parallel }, Phase::Call) => {
                let calls = match parser {
                    Parser::Hermes => parse_call(held.trim()).map(|c| vec![c]),
                    Parser::Llama3Json => parse_llama(&held),
                    Parser::Mistral => parse_mistral(&held),
                };
                match calls {
                    Some(calls) if !calls.is_empty() => {
                        for (name, arguments) in calls {
                            self.call(name, arguments, parallel, &mut out);
                        }
                    }
                    _ => {
                        let marker = match parser {
                            Parser::Hermes => HERMES_OPEN,
                            Parser::Mistral => MISTRAL_MARK,
                            Parser::Llama3Json => "",
                        };
                        self.content(format!("{marker}{held}"), &mut out);
                    }
                }
            }
        }
        if self.calls == 0 && !self.blank.is_empty() {
            out.push(Piece::Content(std::mem::take(&mut self.blank)));
        }
        out
    }

    /// Content. Trailing whitespace waits for what follows: it is given out before more
    /// content, dropped before a call (the newlines between text and calls), and kept at the
    /// end of an answer without calls. So however the text is split into tokens, the pieces
    /// add up to the same answer.
    fn content(&mut self, text: String, out: &mut Vec<Piece>) {
        let body = text.trim_end();
        if body.is_empty() {
            self.blank.push_str(&text);
            return;
        }
        let mut given = std::mem::take(&mut self.blank);
        given.push_str(body);
        self.blank = text[body.len()..].to_string();
        out.push(Piece::Content(given));
    }

    /// A parsed call, unless it is a second one and calls may not be parallel.
    fn call(&mut self, name: String, arguments: String, parallel: bool, out: &mut Vec<Piece>) {
        if !parallel && self.calls > 0 {
            tracing::debug!(name, "a further tool call is dropped: parallel_tool_calls is false");
            return;
        }
        self.blank.clear();
        let index = self.calls;
        self.calls += 1;
        out.push(Piece::Call { index, id: call_id(), name });
        out.push(Piece::Arguments { index, fragment: arguments });
    }

    /// Hermes: content up to `<tool_call>` (holding back what may be its start), then each
    /// block once its `</tool_call>` arrives.
    fn read_hermes(&mut self, parallel: bool, out: &mut Vec<Piece>) {
        loop {
            match self.phase {
                Phase::Call => {
                    let Some(end) = self.held.find(HERMES_CLOSE) else { return };
                    let block = self.held[..end].to_string();
                    self.held.drain(..end + HERMES_CLOSE.len());
                    self.phase = Phase::Text;
                    match parse_call(block.trim()) {
                        Some((name, arguments)) => self.call(name, arguments, parallel, out),
                        None => self.content(format!("{HERMES_OPEN}{block}{HERMES_CLOSE}"), out),
                    }
                }
                _ => {
                    if let Some(start) = self.held.find(HERMES_OPEN) {
                        let before = self.held[..start].to_string();
                        self.held.drain(..start + HERMES_OPEN.len());
                        self.content(before, out);
                        self.phase = Phase::Call;
                    } else {
                        let keep = crate::reasoning::partial_suffix(&self.held, HERMES_OPEN);
                        let text: String = self.held.drain(..self.held.len() - keep).collect();
                        self.content(text, out);
                        return;
                    }
                }
            }
        }
    }

    /// Llama 3: an answer that starts with `{` or `<|python_tag|>` is read whole as calls at
    /// the end; any other is content.
    fn read_llama(&mut self, out: &mut Vec<Piece>) {
        match self.phase {
            Phase::Undecided => {
                let start = self.held.trim_start();
                if start.is_empty() || (PYTHON_TAG.starts_with(start) && start != PYTHON_TAG) {
                    return;
                }
                if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
                    self.phase = Phase::Call;
                } else {
                    self.phase = Phase::Text;
                    let text = std::mem::take(&mut self.held);
                    self.content(text, out);
                }
            }
            Phase::Text => {
                let text = std::mem::take(&mut self.held);
                self.content(text, out);
            }
            Phase::Call => {}
        }
    }

    /// Mistral: content up to `[TOOL_CALLS]`, then everything after it read as calls at the end.
    fn read_mistral(&mut self, out: &mut Vec<Piece>) {
        if self.phase == Phase::Call {
            return;
        }
        if let Some(start) = self.held.find(MISTRAL_MARK) {
            let before = self.held[..start].to_string();
            self.held.drain(..start + MISTRAL_MARK.len());
            self.content(before, out);
            self.phase = Phase::Call;
        } else {
            let keep = crate::reasoning::partial_suffix(&self.held, MISTRAL_MARK);
            let text: String = self.held.drain(..self.held.len() - keep).collect();
            self.content(text, out);
        }
    }

    /// `required`: each element of the array, once it closes.
    fn scan_required(&mut self, out: &mut Vec<Piece>) {
        let bytes = self.held.as_bytes();
        let mut found = Vec::new();
        let s = &mut self.scan;
        for (at, &b) in bytes.iter().enumerate().skip(s.scanned) {
            if s.in_string {
                match (s.escaped, b) {
                    (true, _) => s.escaped = false,
                    (false, b'\\') => s.escaped = true,
                    (false, b'"') => s.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => s.in_string = true,
                b'{' | b'[' => {
                    if s.depth == 1 {
                        s.element_start = Some(at);
                    }
                    s.depth += 1;
                }
                b'}' | b']' => {
                    s.depth = s.depth.saturating_sub(1);
                    if s.depth == 1 {
                        if let Some(start) = s.element_start.take() {
                            found.push((start, at + 1));
                        }
                    }
                }
                _ => {}
            }
        }
        s.scanned = bytes.len();
        for (start, end) in found {
            let element: Option<Value> = serde_json::from_str(&self.held[start..end]).ok();
            let call = element.as_ref().and_then(|e| {
                let name = e.get("name")?.as_str()?.to_string();
                Some((name, arguments_text(e.get("parameters")?)))
            });
            if let Some((name, arguments)) = call {
                self.call(name, arguments, true, out);
            }
        }
    }
}

/// Arguments as the API returns them: a JSON text (a string the model wrote as a string is
/// taken to be that text).
fn arguments_text(arguments: &Value) -> String {
    match arguments {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `{"name": …, "arguments" | "parameters": {…}}`.
fn call_of(v: &Value) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments =
        v.get("arguments").or_else(|| v.get("parameters")).map_or("{}".to_string(), arguments_text);
    Some((name, arguments))
}

fn parse_call(text: &str) -> Option<(String, String)> {
    call_of(&serde_json::from_str(text).ok()?)
}

/// One or more `{"name", "parameters"}` objects, separated by `;` or whitespace.
fn parse_llama(text: &str) -> Option<Vec<(String, String)>> {
    let text = text.trim_start();
    let text = text.strip_prefix(PYTHON_TAG).unwrap_or(text);
    let mut calls = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = values.next()?.ok()?;
        calls.push(call_of(&value)?);
        rest = rest[values.byte_offset()..].trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    Some(calls)
}

/// A JSON array of calls, or `name[ARGS]{…}` (several joined by `[TOOL_CALLS]`).
fn parse_mistral(text: &str) -> Option<Vec<(String, String)>> {
    let text = text.trim();
    if text.starts_with('[') {
        let calls: Vec<Value> = serde_json::from_str(text).ok()?;
        return calls.iter().map(call_of).collect();
    }
    text.split(MISTRAL_MARK)
        .map(|part| {
            let (name, arguments) = part.trim().split_once("[ARGS]")?;
            let arguments: Value = serde_json::from_str(arguments.trim()).ok()?;
            Some((name.trim().to_string(), arguments_text(&arguments)))
        })
        .collect()
}

/// A choice's answer read whole.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assembled {
    /// `None` when the answer only called tools.
    pub content: Option<String>,
    /// `None` without a thinking.
    pub reasoning: Option<String>,
    pub calls: Vec<ToolCall>,
}

pub fn assemble(pieces: impl IntoIterator<Item = Piece>) -> Assembled {
    let mut content = String::new();
    let mut reasoning: Option<String> = None;
    let mut calls: Vec<ToolCall> = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Reasoning(text) => reasoning.get_or_insert_with(String::new).push_str(&text),
            Piece::Content(text) => content.push_str(&text),
            Piece::Call { id, name, .. } => calls.push(ToolCall { id, name, arguments: String::new() }),
            Piece::Arguments { index, fragment } => calls[index].arguments.push_str(&fragment),
        }
    }
    let content = if calls.is_empty() || !content.is_empty() { Some(content) } else { None };
    Assembled { content, reasoning, calls }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `tokens` one at a time, then finishes; the assembled answer and the reason.
    fn read(mode: Mode, tokens: &[&str]) -> (Option<String>, Vec<(String, String)>, &'static str) {
        let mut reader = CallReader::new(mode);
        let mut pieces: Vec<Piece> = tokens.iter().flat_map(|t| reader.push(t)).collect();
        pieces.extend(reader.finish());
        let Assembled { content, calls, .. } = assemble(pieces);
        let calls = calls.into_iter().map(|c| (c.name, c.arguments)).collect();
        (content, calls, reader.finish_reason("stop"))
    }

    fn split(text: &str, every: usize) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        chars.chunks(every).map(|c| c.iter().collect()).collect()
    }

    fn hermes(parallel: bool) -> Mode {
        Mode::Auto { parser: Parser::Hermes, parallel }
    }

    #[test]
    fn hermes_blocks_become_calls_however_the_text_is_split() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"<tool_call>\"}}\n</tool_call>";
        for every in [1, 2, 3, 7, 1000] {
            let tokens = split(text, every);
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let (content, calls, reason) = read(hermes(true), &tokens);
            assert_eq!(content.as_deref(), Some("Let me look."), "split every {every}");
            assert_eq!(
                calls,
                vec![
                    ("get_weather".into(), r#"{"city":"Paris"}"#.into()),
                    ("search".into(), r#"{"q":"<tool_call>"}"#.into())
                ]
            );
            assert_eq!(reason, "tool_calls");
        }
        let (_, calls, _) = read(hermes(false), &[text]);
        assert_eq!(calls.len(), 1, "parallel_tool_calls false keeps the first call");
    }

    #[test]
    fn hermes_text_without_calls_and_broken_blocks_stay_content() {
        let (content, calls, reason) = read(hermes(true), &["a <tool", "_c", "all>{not json}</tool_call> b"]);
        assert_eq!(content.as_deref(), Some("a <tool_call>{not json}</tool_call> b"));
        assert!(calls.is_empty());
        assert_eq!(reason, "stop");
        let (content, _, _) = read(hermes(true), &["x <tool_c"]);
        assert_eq!(
            content.as_deref(),
            Some("x <tool_c"),
            "a held-back partial marker is given out at the end"
        );
        // An unclosed block that parses is still a call (a model may stop before the tag).
        let (content, calls, _) = read(hermes(true), &["<tool_call>{\"name\": \"f\", \"arguments\": {}}"]);
        assert_eq!((content, calls), (None, vec![("f".into(), "{}".into())]));
    }

    #[test]
    fn llama_answers_that_are_json_are_calls_and_others_are_content() {
        let (content, calls, _) = read(
            Mode::Auto { parser: Parser::Llama3Json, parallel: true },
            &[
                "<|python",
                "_tag|>{\"name\": \"f\", \"parameters\": {\"a\": 1}}; ",
                "{\"name\": \"g\", \"parameters\": {}}",
            ],
        );
        assert_eq!(content, None);
        assert_eq!(calls, vec![("f".into(), r#"{"a":1}"#.into()), ("g".into(), "{}".into())]);
        let (content, calls, reason) =
            read(Mode::Auto { parser: Parser::Llama3Json, parallel: true }, &[" ", "Hello {there}"]);
        assert_eq!((content.as_deref(), calls.len(), reason), (Some(" Hello {there}"), 0, "stop"));
        let (content, calls, _) =
            read(Mode::Auto { parser: Parser::Llama3Json, parallel: true }, &["{\"no\": \"name\"}"]);
        assert_eq!((content.as_deref(), calls.len()), (Some("{\"no\": \"name\"}"), 0));
    }

    #[test]
    fn mistral_arrays_and_args_forms_are_calls() {
        let mode = Mode::Auto { parser: Parser::Mistral, parallel: true };
        let (content, calls, _) =
            read(mode.clone(), &["Sure. [TOOL_", "CALLS][{\"name\": \"f\", \"arguments\": {\"x\": true}}]"]);
        assert_eq!(content.as_deref(), Some("Sure."), "whitespace before the calls is dropped");
        assert_eq!(calls, vec![("f".into(), r#"{"x":true}"#.into())]);
        let (_, calls, _) = read(mode, &["[TOOL_CALLS]f[ARGS]{\"x\": 1}[TOOL_CALLS]g[ARGS]{}"]);
        assert_eq!(calls, vec![("f".into(), r#"{"x":1}"#.into()), ("g".into(), "{}".into())]);
    }

    #[test]
    fn required_reads_each_element_as_it_closes_and_named_streams_the_arguments() {
        let text = r#"[{"name": "f", "parameters": {"s": "a}]\"b"}}, {"name": "g", "parameters": {}}]"#;
        let mut reader = CallReader::new(Mode::Required);
        let mut seen = Vec::new();
        for (i, token) in split(text, 4).iter().enumerate() {
            if reader.push(token).iter().any(|p| matches!(p, Piece::Call { .. })) {
                seen.push(i);
            }
        }
        assert_eq!(seen.len(), 2, "each call is given out when its element closes, not at the end");
        let (content, calls, reason) =
            read(Mode::Required, &split(text, 4).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(content, None);
        assert_eq!(calls, vec![("f".into(), r#"{"s":"a}]\"b"}"#.into()), ("g".into(), "{}".into())]);
        assert_eq!(reason, "tool_calls");
        // Cut before one whole call: the text is the content.
        let (content, calls, _) = read(Mode::Required, &["[{\"name\": \"f\", \"para"]);
        assert_eq!((content.as_deref(), calls.len()), (Some("[{\"name\": \"f\", \"para"), 0));

        let (content, calls, reason) = read(Mode::Named("f".into()), &["{\"a\"", ": 1}"]);
        assert_eq!((content, calls, reason), (None, vec![("f".into(), "{\"a\": 1}".into())], "stop"));
    }

    #[test]
    fn tool_fields_are_checked_by_name() {
        let tools =
            vec![json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})];
        let err = |tools: Option<&Vec<Value>>, choice: Value| {
            asked(tools, Some(&choice), None, Some(Parser::Hermes)).unwrap_err()
        };
        let e = err(None, json!("required"));
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let e = err(Some(&tools), json!({"type": "function", "function": {"name": "g"}}));
        assert!(e.message.contains("\"g\"") && e.message.contains("(f)"), "{}", e.message);
        let e = err(Some(&tools), json!("sometimes"));
        assert!(e.message.contains("\"sometimes\""), "{}", e.message);
        let bad_name = vec![json!({"type": "function", "function": {"name": "a b"}})];
        assert_eq!(err(Some(&bad_name), json!("auto")).param.as_deref(), Some("tools[0]"));
        let twice = vec![tools[0].clone(), tools[0].clone()];
        assert!(err(Some(&twice), json!("auto")).message.contains("two tools"));
        let e = asked(Some(&tools), None, None, None).unwrap_err();
        assert!(e.message.contains("--tool-call-parser"), "{}", e.message);
        // `none` and no tools at all ask for nothing to be read.
        assert_eq!(asked(None, None, None, None).unwrap(), None);
        assert_eq!(asked(Some(&tools), Some(&json!("none")), None, None).unwrap().unwrap().mode, None);
        let forced =
            asked(Some(&tools), Some(&json!("required")), Some(&json!(false)), None).unwrap().unwrap();
        let Some(GrammarSpec::JsonSchema(schema)) = forced.grammar else { panic!("required has a grammar") };
        assert_eq!(schema["maxItems"], 1);
    }

    #[test]
    fn formats_are_recognised_from_templates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_tools");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(Parser::detect(&read("hermes.jinja")), Some(Parser::Hermes));
        assert_eq!(Parser::detect(&read("llama3_json.jinja")), Some(Parser::Llama3Json));
        assert_eq!(Parser::detect("{{ messages[0].content }}"), None);
    }
}
