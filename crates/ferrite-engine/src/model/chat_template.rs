//! Chat templates: the Jinja template in `tokenizer_config.json`, rendered with minijinja under
//! Hugging Face's conventions (`messages`, `tools`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, extra variables, `raise_exception`, Python string methods, a `tojson` that
//! writes what Python's `json.dumps` writes, `trim_blocks` and `lstrip_blocks`).

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value as JinjaValue};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::EngineError;

/// One message as the template sees it. Fields a message does not have are left out, so
/// `message.tool_calls is defined` means what it does in transformers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    /// `None` is rendered as `none` (an assistant turn that only calls tools).
    pub content: Option<String>,
    /// An assistant's calls: `{"id", "type": "function", "function": {"name", "arguments"}}`,
    /// `arguments` as a JSON object where it parses as one (what templates expect, and what
    /// vLLM passes), else as the string given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// A tool result's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: Some(content.to_string()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// What a chat request adds to its messages: the tools (OpenAI's `{"type": "function",
/// "function": {...}}` objects, as transformers takes them) and the template's extra variables
/// (`chat_template_kwargs`, e.g. `enable_thinking`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatExtras {
    pub tools: Option<Vec<Value>>,
    pub kwargs: Map<String, Value>,
}

/// The variables the renderer sets itself; `chat_template_kwargs` may not replace them.
pub const RESERVED_TEMPLATE_VARIABLES: [&str; 5] =
    ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token"];

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`, so `", "` and
/// `": "` between items and keys, keys in their given order, and no HTML escaping (minijinja's
/// own `tojson` writes compact, escaped JSON, which would change the prompt).
fn tojson(value: JinjaValue, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(out)
}

/// `value` as Python's `json.dumps` writes it (`ensure_ascii=False`).
pub fn python_json(value: &Value, indent: Option<usize>, sort_keys: bool, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width * level));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, level + 1);
                python_json(item, indent, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(fields) if !fields.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = fields.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, level + 1);
                out.push_str(&Value::String(key.clone()).to_string());
                out.push_str(": ");
                python_json(item, indent, sort_keys, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        // Scalars, `[]` and `{}` are written alike.
        other => out.push_str(&other.to_string()),
    }
}

impl ChatTemplate {
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        Ok(Self { env, source, bos_token, eos_token })
    }

    /// The template's text (what tool-call formats are recognised from).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, EngineError> {
        self.render_with(messages, add_generation_prompt, &ChatExtras::default())
    }

    /// As transformers' `apply_chat_template(messages, tools=..., **kwargs)`: `tools` is `none`
    /// when not given, and the extra variables sit beside the fixed ones.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extras: &ChatExtras,
    ) -> Result<String, EngineError> {
        let tmpl = self.env.get_template("chat").map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        if let Some(name) = extras.kwargs.keys().find(|k| RESERVED_TEMPLATE_VARIABLES.contains(&k.as_str())) {
            return Err(EngineError::ChatTemplate(format!(
                "the template variable `{name}` is set by the server"
            )));
        }
        let mut context: Map<String, Value> = extras.kwargs.clone();
        let fixed = [
            ("messages", serde_json::to_value(messages).unwrap_or_default()),
            ("tools", extras.tools.clone().map_or(Value::Null, Value::Array)),
            ("add_generation_prompt", Value::Bool(add_generation_prompt)),
            ("bos_token", Value::String(self.bos_token.clone().unwrap_or_default())),
            ("eos_token", Value::String(self.eos_token.clone().unwrap_or_default())),
        ];
        context.extend(fixed.into_iter().map(|(k, v)| (k.to_string(), v)));
        tmpl.render(JinjaValue::from_serialize(&context)).map_err(|e| {
            // raise_exception's message is the template author's explanation: show it plainly.
            let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.to_string());
            EngineError::ChatTemplate(detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_messages_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML.into(), Some("<s>".into()), None).unwrap();
        let out =
            t.render(&[Message::new("system", "Be brief."), Message::new("user", " hi ")], true).unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_prompt = t.render(&[Message::new("user", "x")], false).unwrap();
        assert!(!no_prompt.ends_with("assistant\n"));
    }

    #[test]
    fn raise_exception_surfaces_the_templates_message() {
        let t = ChatTemplate::new(CHATML.into(), None, None).unwrap();
        let e = t.render(&[Message::new("tool", "x")], true).unwrap_err().to_string();
        assert!(e.contains("unknown role tool"), "{e}");
    }

    /// Python's `json.dumps(v, ensure_ascii=False)` and `json.dumps(v, ensure_ascii=False,
    /// indent=2)` of the same value, written out by hand.
    #[test]
    fn tojson_writes_what_python_writes() {
        let v = serde_json::json!({"b": [1, 2.5, "x\"y\n"], "a": {}, "c": [], "é": null, "d": {"t": true}});
        let t = ChatTemplate::new("{{ v | tojson }}|{{ v | tojson(indent=2) }}".into(), None, None).unwrap();
        let extras =
            ChatExtras { tools: None, kwargs: serde_json::from_value(serde_json::json!({"v": v})).unwrap() };
        let out = t.render_with(&[], false, &extras).unwrap();
        let (flat, indented) = out.split_once('|').unwrap();
        assert_eq!(flat, r#"{"b": [1, 2.5, "x\"y\n"], "a": {}, "c": [], "é": null, "d": {"t": true}}"#);
        assert_eq!(
            indented,
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"x\\\"y\\n\"\n  ],\n  \"a\": {},\n  \"c\": [],\n  \"é\": null,\n  \"d\": {\n    \"t\": true\n  }\n}"
        );
    }

    #[test]
    fn tools_are_none_unless_given_and_kwargs_cannot_replace_the_fixed_variables() {
        let t = ChatTemplate::new("{{ tools is none }}/{{ enable_thinking }}".into(), None, None).unwrap();
        let kwargs: Map<String, Value> = serde_json::from_str(r#"{"enable_thinking": false}"#).unwrap();
        let out = t.render_with(&[], false, &ChatExtras { tools: None, kwargs }).unwrap();
        assert_eq!(out, "True/False", "as Jinja in Python prints them");
        let kwargs: Map<String, Value> = serde_json::from_str(r#"{"messages": []}"#).unwrap();
        let e = t.render_with(&[], false, &ChatExtras { tools: None, kwargs }).unwrap_err().to_string();
        assert!(e.contains("`messages`"), "{e}");
    }

    #[test]
    fn a_broken_template_is_an_error_at_load() {
        assert!(ChatTemplate::new("{% for %}".into(), None, None).is_err());
    }
}
