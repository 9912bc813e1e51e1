//! Reading calls out of a choice's text: the [`CallReader`] splits what the model writes, token
//! by token, into content, reasoning and calls in the model's own format, and [`assemble`]
//! joins the pieces into one answer. The whole answer and the stream use the same reader.

use serde_json::{json, Value};

use super::{Mode, Parser};

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
/// Mistral's call mark (a special token in its vocabularies).
pub const MISTRAL_MARK: &str = "[TOOL_CALLS]";

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
