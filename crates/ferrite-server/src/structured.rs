//! Structured output, as clients ask for it: OpenAI's `response_format`, vLLM's
//! `structured_outputs` object and its older `guided_*` fields. At most one of them; it becomes
//! one [`GrammarSpec`], or an [`ApiError`] naming the field, what was wrong and the limit.
//! vLLM's structural tags (free text in which a trigger opens a tagged JSON part) become a Lark
//! grammar in llguidance's dialect, as `auto` tool calls with strict tools do.

use ferrite_engine::GrammarSpec;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// vLLM's structured-output fields (the older `guided_*` ones are what most clients still send).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StructuredFields {
    pub structured_outputs: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    /// Which library vLLM should use: ferrite has one (llguidance); accepted and ignored.
    pub guided_decoding_backend: Option<Value>,
}

/// A request's grammar and the field it came from (errors compiling it name that field).
#[derive(Debug, Clone, PartialEq)]
pub struct Asked {
    pub spec: GrammarSpec,
    pub param: &'static str,
}

/// The one grammar `response_format` or the vLLM fields ask for, if any; `max_bytes` bounds
/// its text (a schema, a regex, the choices, a grammar).
pub fn asked(
    response_format: Option<&Value>,
    fields: &StructuredFields,
    max_bytes: usize,
) -> Result<Option<Asked>, ApiError> {
    if fields.guided_decoding_backend.as_ref().is_some_and(|v| !v.is_null()) {
        tracing::debug!("guided_decoding_backend is ignored: ferrite's structured output is llguidance");
    }
    let mut found: Vec<Asked> = Vec::new();
    if let Some(format) = response_format.filter(|v| !v.is_null()) {
        if let Some(spec) = response_format_spec(format)? {
            found.push(Asked { spec, param: "response_format" });
        }
    }
    if let Some(s) = present(&fields.structured_outputs) {
        found.push(Asked { spec: structured_outputs_spec(s)?, param: "structured_outputs" });
    }
    let guided = [
        ("guided_json", present(&fields.guided_json).map(|v| json_schema("guided_json", v)).transpose()?),
        ("guided_regex", present(&fields.guided_regex).map(|v| regex("guided_regex", v)).transpose()?),
        ("guided_choice", present(&fields.guided_choice).map(|v| choice("guided_choice", v)).transpose()?),
        ("guided_grammar", present(&fields.guided_grammar).map(|v| lark("guided_grammar", v)).transpose()?),
    ];
    for (param, spec) in guided {
        found.extend(spec.map(|spec| Asked { spec, param }));
    }
    match found.len() {
        0 => Ok(None),
        1 => {
            let asked = found.remove(0);
            let bytes = spec_bytes(&asked.spec);
            if bytes > max_bytes {
                let message = format!(
                    "`{}` is {bytes} bytes of grammar; at most {max_bytes} are allowed (--max-grammar-bytes)",
                    asked.param
                );
                return Err(ApiError::invalid(Some(asked.param), message));
            }
            Ok(Some(asked))
        }
        _ => Err(ApiError::invalid(
            Some(found[1].param),
            format!(
                "give one structured-output field, not both `{}` and `{}`",
                found[0].param, found[1].param
            ),
        )),
    }
}

/// A field that is given and not `null`.
fn present(v: &Option<Value>) -> Option<&Value> {
    v.as_ref().filter(|v| !v.is_null())
}

/// The size of a grammar's text, as compiled.
fn spec_bytes(spec: &GrammarSpec) -> usize {
    match spec {
        GrammarSpec::JsonObject => 0,
        GrammarSpec::JsonSchema(schema) => schema.to_string().len(),
        GrammarSpec::Regex(text) | GrammarSpec::Lark(text) => text.len(),
        GrammarSpec::Choice(choices) => choices.iter().map(String::len).sum(),
    }
}

/// OpenAI's `response_format`: `text` (no grammar), `json_object`, or `json_schema`.
fn response_format_spec(format: &Value) -> Result<Option<GrammarSpec>, ApiError> {
    let param = "response_format";
    let Some(kind) = format.get("type").and_then(Value::as_str) else {
        return Err(ApiError::invalid(
            Some(param),
            "`response_format` must be an object with a `type`: \"text\", \"json_object\" or \"json_schema\"",
        ));
    };
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        // vLLM's: the structures and triggers sit beside `type`.
        "structural_tag" => structural_tag(param, format).map(Some),
        "json_schema" => {
            let Some(inner) = format.get("json_schema").filter(|v| v.is_object()) else {
                return Err(ApiError::invalid(
                    Some(param),
                    "`response_format.json_schema` (an object with `name` and `schema`) is required",
                ));
            };
            check_schema_name(inner.get("name"))?;
            match inner.get("schema") {
                // OpenAI's `schema` is optional: without one, any JSON object.
                None | Some(Value::Null) => Ok(Some(GrammarSpec::JsonObject)),
                Some(schema) => json_schema(param, schema).map(Some),
            }
        }
        other => Err(ApiError::invalid(
            Some(param),
            format!(
                "`response_format.type` must be \"text\", \"json_object\", \"json_schema\" or \"structural_tag\", got {other:?}"
            ),
        )),
    }
}

/// OpenAI's rule for `json_schema.name`: a-z, A-Z, 0-9, `_` and `-`, at most 64 characters.
fn check_schema_name(name: Option<&Value>) -> Result<(), ApiError> {
    let param = "response_format";
    let Some(name) = name.and_then(Value::as_str) else {
        return Err(ApiError::invalid(
            Some(param),
            "`response_format.json_schema.name` (a string) is required",
        ));
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "`response_format.json_schema.name` must be 1 to 64 of a-z, A-Z, 0-9, _ and -, got {name:?}"
            ),
        ));
    }
    Ok(())
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar` and
/// `json_object`.
fn structured_outputs_spec(s: &Value) -> Result<GrammarSpec, ApiError> {
    let param = "structured_outputs";
    let Some(fields) = s.as_object() else {
        return Err(ApiError::invalid(Some(param), "`structured_outputs` must be an object"));
    };
    const KINDS: [&str; 6] = ["json", "regex", "choice", "grammar", "json_object", "structural_tag"];
    // vLLM's switches that only tune a backend, and the whitespace ferrite bounds anyway.
    const IGNORED: [&str; 4] =
        ["disable_fallback", "disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"];
    let given: Vec<(&str, &Value)> =
        fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.as_str(), v)).collect();
    if let Some((unknown, _)) = given.iter().find(|(k, _)| !KINDS.contains(k) && !IGNORED.contains(k)) {
        let message = format!("unknown field `structured_outputs.{unknown}` (one of {})", KINDS.join(", "));
        return Err(ApiError::invalid(Some(param), message));
    }
    let kinds: Vec<&(&str, &Value)> = given.iter().filter(|(k, _)| KINDS.contains(k)).collect();
    let [(kind, value)] = kinds.as_slice() else {
        return Err(ApiError::invalid(
            Some(param),
            format!("`structured_outputs` needs exactly one of {}, got {}", KINDS.join(", "), kinds.len()),
        ));
    };
    match *kind {
        "json" => json_schema(param, value),
        "regex" => regex(param, value),
        "choice" => choice(param, value),
        "grammar" => lark(param, value),
        "structural_tag" => structural_tag(param, value),
        _ if **value == Value::Bool(true) => Ok(GrammarSpec::JsonObject),
        _ => Err(ApiError::invalid(Some(param), "`structured_outputs.json_object` must be true")),
    }
}

/// A JSON schema given as an object, or as a string holding one (vLLM accepts both).
fn json_schema(param: &str, v: &Value) -> Result<GrammarSpec, ApiError> {
    let schema = match v {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(Some(param), format!("`{param}`: the schema is not JSON: {e}")))?,
        other => other.clone(),
    };
    if !schema.is_object() {
        return Err(ApiError::invalid(Some(param), format!("`{param}`: a JSON schema must be an object")));
    }
    Ok(GrammarSpec::JsonSchema(schema))
}

fn text<'a>(param: &str, v: &'a Value, what: &str) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| ApiError::invalid(Some(param), format!("`{param}` must be a string ({what})")))
}

fn regex(param: &str, v: &Value) -> Result<GrammarSpec, ApiError> {
    Ok(GrammarSpec::Regex(text(param, v, "a regular expression")?.to_string()))
}

fn lark(param: &str, v: &Value) -> Result<GrammarSpec, ApiError> {
    Ok(GrammarSpec::Lark(text(param, v, "a Lark grammar")?.to_string()))
}

/// vLLM's structural tag, `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}` (an
/// object, or a string holding one): free text in which each trigger opens one of the
/// structures whose `begin` starts with it; that structure's `begin`, JSON its `schema` allows
/// (any JSON without one) and its `end` follow, then free text again.
fn structural_tag(param: &str, v: &Value) -> Result<GrammarSpec, ApiError> {
    let bad = |message: String| ApiError::invalid(Some(param), format!("`{param}`: {message}"));
    let v = match v {
        Value::String(text) => {
            serde_json::from_str(text).map_err(|e| bad(format!("the structural tag is not JSON: {e}")))?
        }
        other => other.clone(),
    };
    if v.get("format").is_some() {
        return Err(bad(
            "the `format` form of structural tags is not supported: send `structures` and `triggers`".into(),
        ));
    }
    let strings = |key: &str| -> Option<Vec<String>> {
        v.get(key)?
            .as_array()?
            .iter()
            .map(|t| t.as_str().filter(|t| !t.is_empty()).map(str::to_string))
            .collect()
    };
    let triggers = strings("triggers")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("`triggers` must be a non-empty list of non-empty strings".into()))?;
    // A trigger inside another would fire first and strand the other's structures.
    for (i, t) in triggers.iter().enumerate() {
        if let Some((_, longer)) =
            triggers.iter().enumerate().find(|&(j, u)| j != i && u.starts_with(t.as_str()))
        {
            return Err(bad(format!(
                "trigger {t:?} is a prefix of trigger {longer:?}: give triggers none of which starts another"
            )));
        }
    }
    let structures = v
        .get("structures")
        .and_then(Value::as_array)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("`structures` must be a non-empty list of {begin, schema, end}".into()))?;
    // Each trigger used: the alternatives it opens.
    let mut opened: Vec<(usize, Vec<String>)> = Vec::new();
    let mut bodies = String::new();
    for (i, structure) in structures.iter().enumerate() {
        let field = |key: &str| structure.get(key).and_then(Value::as_str);
        let (Some(begin), Some(end)) = (field("begin"), field("end")) else {
            return Err(bad(format!("`structures[{i}]` needs `begin` and `end` strings")));
        };
        let trigger = triggers.iter().position(|t| begin.starts_with(t.as_str())).ok_or_else(|| {
            bad(format!("`structures[{i}].begin` {begin:?} starts with none of the triggers {triggers:?}"))
        })?;
        let mut schema = match structure.get("schema") {
            None | Some(Value::Null) => serde_json::json!({}),
            Some(schema) if schema.is_object() => schema.clone(),
            Some(_) => {
                return Err(bad(format!("`structures[{i}].schema` must be a JSON schema (an object)")))
            }
        };
        ferrite_engine::grammar::bounded_json_whitespace(&mut schema);
        let rest = &begin[triggers[trigger].len()..];
        bodies.push_str(&format!("body_{i}: %json {schema}\n"));
        let alternative = format!("{} body_{i} {}", literal(rest), literal(end));
        match opened.iter_mut().find(|(t, _)| *t == trigger) {
            Some((_, alternatives)) => alternatives.push(alternative),
            None => opened.push((trigger, vec![alternative])),
        }
    }
    let mut lark = String::from("%llguidance {}\nstart: tag* TEXT\nTEXT: /(.|\\n)*/\n");
    let mut tags = Vec::new();
    for (t, alternatives) in &opened {
        lark.push_str(&format!("trigger_{t}[lazy]: TEXT {}\n", literal(&triggers[*t])));
        tags.push(format!("trigger_{t} ({})", alternatives.join(" | ")));
    }
    lark.push_str(&format!("tag: {}\n", tags.join(" | ")));
    lark.push_str(&bodies);
    Ok(GrammarSpec::Lark(lark))
}

/// `text` as a Lark string literal (JSON's escapes, and DEL escaped too: llguidance's lexer
/// takes no raw control character); nothing for an empty string.
fn literal(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        Value::String(text.to_string()).to_string().replace('\u{7f}', "\\u007f")
    }
}

fn choice(param: &str, v: &Value) -> Result<GrammarSpec, ApiError> {
    let choices: Option<Vec<String>> =
        v.as_array().and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect());
    match choices {
        Some(c) if !c.is_empty() => Ok(GrammarSpec::Choice(c)),
        _ => Err(ApiError::invalid(Some(param), format!("`{param}` must be a non-empty list of strings"))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> StructuredFields {
        serde_json::from_value(v).unwrap()
    }

    fn spec(format: Option<Value>, v: Value) -> Result<Option<Asked>, ApiError> {
        asked(format.as_ref(), &fields(v), 1024)
    }

    #[test]
    fn each_way_of_asking_gives_its_grammar_and_names_its_field() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let format =
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}});
        let got = spec(Some(format), json!({})).unwrap().unwrap();
        assert_eq!(got, Asked { spec: GrammarSpec::JsonSchema(schema.clone()), param: "response_format" });
        let json_object = spec(Some(json!({"type": "json_object"})), json!({})).unwrap().unwrap();
        assert_eq!(json_object.spec, GrammarSpec::JsonObject);
        assert_eq!(spec(Some(json!({"type": "text"})), json!({})).unwrap(), None);
        assert_eq!(spec(None, json!({})).unwrap(), None);

        let cases = [
            (json!({"structured_outputs": {"json": schema}}), GrammarSpec::JsonSchema(schema.clone())),
            (json!({"structured_outputs": {"regex": "a+"}}), GrammarSpec::Regex("a+".into())),
            (
                json!({"structured_outputs": {"choice": ["x", "y"]}}),
                GrammarSpec::Choice(vec!["x".into(), "y".into()]),
            ),
            (
                json!({"structured_outputs": {"grammar": "start: \"a\""}}),
                GrammarSpec::Lark("start: \"a\"".into()),
            ),
            (json!({"structured_outputs": {"json_object": true}}), GrammarSpec::JsonObject),
            (json!({"guided_json": schema.to_string()}), GrammarSpec::JsonSchema(schema.clone())),
            (json!({"guided_regex": "b"}), GrammarSpec::Regex("b".into())),
            (
                json!({"guided_choice": ["z"], "guided_decoding_backend": "xgrammar"}),
                GrammarSpec::Choice(vec!["z".into()]),
            ),
            (json!({"guided_grammar": "start: \"b\""}), GrammarSpec::Lark("start: \"b\"".into())),
        ];
        for (body, want) in cases {
            assert_eq!(spec(None, body.clone()).unwrap().unwrap().spec, want, "{body}");
        }
    }

    #[test]
    fn bad_or_conflicting_fields_are_refused_by_name() {
        let refused = |format: Option<Value>, v: Value, param: &str, needle: &str| {
            let e = spec(format, v.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}: {e:?}");
            assert!(e.message.contains(needle), "{v}: {:?} lacks {needle:?}", e.message);
        };
        let format = |v: Value| Some(v);
        refused(format(json!("json")), json!({}), "response_format", "must be an object with a `type`");
        refused(format(json!({"type": "yaml"})), json!({}), "response_format", "got \"yaml\"");
        refused(format(json!({"type": "json_schema"})), json!({}), "response_format", "is required");
        let unnamed = json!({"type": "json_schema", "json_schema": {"schema": {}}});
        refused(format(unnamed), json!({}), "response_format", "name` (a string) is required");
        let badly_named = json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}});
        refused(format(badly_named), json!({}), "response_format", "1 to 64 of");
        let not_object = json!({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}});
        refused(format(not_object), json!({}), "response_format", "must be an object");
        refused(
            None,
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "structured_outputs",
            "exactly one",
        );
        refused(None, json!({"structured_outputs": {"yaml": "a"}}), "structured_outputs", "unknown field");
        refused(
            None,
            json!({"structured_outputs": {"structural_tag": {}}}),
            "structured_outputs",
            "`triggers` must be a non-empty list",
        );
        let tag = |structures: Value| {
            Some(json!({"type": "structural_tag", "triggers": ["<function="], "structures": structures}))
        };
        refused(tag(json!([])), json!({}), "response_format", "`structures` must be a non-empty list");
        refused(
            tag(json!([{"begin": "<f>", "end": "</f>"}])),
            json!({}),
            "response_format",
            "starts with none of the triggers",
        );
        refused(
            tag(json!([{"begin": "<function=a>"}])),
            json!({}),
            "response_format",
            "needs `begin` and `end`",
        );
        refused(
            tag(json!([{"begin": "<function=a>", "end": "</function>", "schema": 3}])),
            json!({}),
            "response_format",
            "must be a JSON schema",
        );
        refused(
            None,
            json!({"structured_outputs": {"structural_tag": "{oops"}}),
            "structured_outputs",
            "not JSON",
        );
        refused(
            Some(json!({"type": "structural_tag", "format": {"type": "triggered_tags"}})),
            json!({}),
            "response_format",
            "`format` form of structural tags is not supported",
        );
        refused(
            Some(json!({"type": "structural_tag", "triggers": ["<f", "<function="],
                "structures": [{"begin": "<fx>", "end": "</f>"}]})),
            json!({}),
            "response_format",
            "is a prefix of trigger",
        );
        // DEL is escaped for llguidance's lexer; JSON's escapes stay.
        assert_eq!(literal("a\u{7f}\"b"), r#""a\u007f\"b""#);
        refused(None, json!({"guided_choice": []}), "guided_choice", "non-empty list of strings");
        refused(None, json!({"guided_regex": 5}), "guided_regex", "must be a string");
        refused(None, json!({"guided_json": "{oops"}), "guided_json", "not JSON");
        refused(
            format(json!({"type": "json_object"})),
            json!({"guided_regex": "a"}),
            "guided_regex",
            "not both `response_format` and `guided_regex`",
        );
        let big = "a".repeat(2000);
        refused(None, json!({"guided_regex": big}), "guided_regex", "at most 1024 are allowed");
    }
}
