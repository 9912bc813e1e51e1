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
/// `--tool-call-parser` flag, or what the chat template shows); `auto` needs one. `mark` is
/// the id of `[TOOL_CALLS]` where the vocabulary holds it as one token (strict `auto` calls in
/// Mistral's format name it).
pub fn asked(
    tools: Option<&Vec<Value>>,
    tool_choice: Option<&Value>,
    parallel_tool_calls: Option<&Value>,
    parser: Option<Parser>,
    mark: Option<u32>,
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
        None => auto(parser, parallel, &functions, mark)?,
        Some(Value::String(s)) => match s.as_str() {
            "none" => (None, None),
            "auto" => auto(parser, parallel, &functions, mark)?,
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
    mark: Option<u32>,
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
    let grammar = if functions.iter().any(|f| f.strict) {
        strict_grammar(parser, functions, parallel, mark)?
    } else {
        None
    };
    Ok((Some(Mode::Auto { parser, parallel }), grammar))
}

/// One call object in `parser`'s format for each function: `{"name": …, key: arguments}`.
fn call_schemas(functions: &[Function], arguments_key: &str) -> Value {
    let mut schema = json!({"anyOf": call_objects(functions, arguments_key)});
    ferrite_engine::grammar::bounded_json_whitespace(&mut schema);
    schema
}

/// Each function's call object: its own schema for the arguments when strict, else any object.
fn call_objects(functions: &[Function], arguments_key: &str) -> Vec<Value> {
    functions
        .iter()
        .map(|f| {
            let arguments = if f.strict { f.parameters.clone() } else { json!({"type": "object"}) };
            json!({"type": "object", "properties": {"name": {"const": f.name}, arguments_key: arguments},
                "required": ["name", arguments_key], "additionalProperties": false})
        })
        .collect()
}

/// The Lark grammar (llguidance's dialect) of an `auto` answer with strict tools; `mark` is
/// the id of `[TOOL_CALLS]` where the vocabulary holds it as one token (Mistral's).
fn strict_grammar(
    parser: Parser,
    functions: &[Function],
    parallel: bool,
    mark: Option<u32>,
) -> Result<Option<GrammarSpec>, ApiError> {
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
        // Free text, or text then the `[TOOL_CALLS]` token (by its id: a special token is no
        // text) and a JSON array of calls, which ends the answer.
        Parser::Mistral => {
            let Some(mark) = mark else {
                return Err(invalid(
                    "tools",
                    "`strict` tools with `tool_choice` \"auto\" are enforced for the mistral call format only where \
                     `[TOOL_CALLS]` is one token of the vocabulary, and it is not here: send `strict: false`, or \
                     `tool_choice` \"required\" or a named function (both enforce the schemas)",
                ));
            };
            let mut calls = json!({"type": "array", "minItems": 1, "items": {"anyOf": call_objects(functions, "arguments")}});
            if !parallel {
                calls["maxItems"] = json!(1);
            }
            ferrite_engine::grammar::bounded_json_whitespace(&mut calls);
            // The text may not spell the mark out of ordinary tokens (the reader reads text).
            format!(
                "%llguidance {{}}\nstart: TEXT | TEXT? <[{mark}]> calls\n\
                 TEXT: /(.|\\n)*/ & ~/(.|\\n)*\\[TOOL_CALLS\\](.|\\n)*/\ncalls: %json {calls}\n"
            )
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

mod reader;

pub use reader::{assemble, Assembled, CallReader, Piece, ToolCall, MISTRAL_MARK};

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
            asked(tools, Some(&choice), None, Some(Parser::Hermes), None).unwrap_err()
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
        let e = asked(Some(&tools), None, None, None, None).unwrap_err();
        assert!(e.message.contains("--tool-call-parser"), "{}", e.message);
        // `none` and no tools at all ask for nothing to be read.
        assert_eq!(asked(None, None, None, None, None).unwrap(), None);
        assert_eq!(asked(Some(&tools), Some(&json!("none")), None, None, None).unwrap().unwrap().mode, None);
        let forced =
            asked(Some(&tools), Some(&json!("required")), Some(&json!(false)), None, None).unwrap().unwrap();
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
