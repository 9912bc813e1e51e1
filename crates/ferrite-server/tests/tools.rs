//! Tool calling through the served path, on the tiny random llama fixture (its output is
//! noise: a valid call is valid because of the grammar, or because a forced format was read
//! back): forced calls (`required`, named, `parallel_tool_calls: false`), `none`, a result
//! turn, `auto` reading the Hermes format, streamed calls equal to whole ones, clear errors,
//! and the chat template's rendering of tools against what transformers renders.

mod common;

use axum::http::StatusCode;
use axum::Router;
use common::{call, fixture, respelled_fixture, roomy, state, state_with_template};
use ferrite_server::app;
use serde_json::{json, Value};

fn hermes_template() -> String {
    std::fs::read_to_string(fixture("chat_tools/hermes.jinja")).unwrap()
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(app, "POST", path, Some(body), None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// Two functions whose every argument is bounded, so noise must finish a call.
fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "strict": true,
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools(), "max_tokens": 400});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A call's arguments parse and validate against its function's schema.
fn assert_valid_call(call: &Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    let name = call["function"]["name"].as_str().unwrap();
    let tool = tools().as_array().unwrap().iter().find(|t| t["function"]["name"] == name).cloned();
    let tool = tool.unwrap_or_else(|| panic!("{name} is not a tool"));
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {call}"));
    let validator = jsonschema::validator_for(&tool["function"]["parameters"]).unwrap();
    assert!(validator.is_valid(&arguments), "{name}: {arguments} does not match its schema");
}

/// One choice as read back: its content, its calls as (name, arguments), its finish reason.
type Answer = (String, Vec<(String, String)>, String);

/// A streamed chat answer reassembled per choice.
async fn streamed(app: &Router, mut body: Value) -> Vec<Answer> {
    body["stream"] = json!(true);
    let (status, raw) = call(app, "POST", "/v1/chat/completions", Some(body), None).await;
    assert_eq!(status, StatusCode::OK);
    let mut out: Vec<Answer> = Vec::new();
    let text = String::from_utf8(raw).unwrap();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if out.len() <= i {
                out.resize(i + 1, Default::default());
            }
            let (content, calls, finish) = &mut out[i];
            if let Some(piece) = c["delta"]["content"].as_str() {
                content.push_str(piece);
            }
            for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let k = d["index"].as_u64().unwrap() as usize;
                if let Some(name) = d["function"]["name"].as_str() {
                    assert_eq!(k, calls.len(), "a call opens with the next index: {data}");
                    assert!(
                        d["id"].as_str().unwrap().starts_with("call_") && d["type"] == "function",
                        "{data}"
                    );
                    calls.push((name.to_string(), String::new()));
                }
                calls[k].1.push_str(d["function"]["arguments"].as_str().unwrap_or_default());
            }
            if let Some(f) = c["finish_reason"].as_str() {
                assert!(finish.is_empty(), "one finish_reason per choice");
                *finish = f.to_string();
            }
        }
    }
    out
}

/// The whole answer's choices in the shape [`streamed`] returns.
fn whole(body: &Value) -> Vec<Answer> {
    body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let m = &c["message"];
            let calls = m["tool_calls"].as_array().into_iter().flatten();
            let calls = calls
                .map(|t| {
                    assert_valid_call(t);
                    let f = &t["function"];
                    (f["name"].as_str().unwrap().to_string(), f["arguments"].as_str().unwrap().to_string())
                })
                .collect();
            (
                m["content"].as_str().unwrap_or_default().to_string(),
                calls,
                c["finish_reason"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_calls_are_valid_at_every_temperature_and_stream_the_same() {
    let app = app(state("llama", roomy(), vec![]));
    for (temperature, seed) in [(0.0, 0), (1.0, 7), (1.3, 11)] {
        let body = chat(json!({"tool_choice": "required", "parallel_tool_calls": false,
            "temperature": temperature, "seed": seed, "n": 2}));
        let (status, answer) = post(&app, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        for c in answer["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "tool_calls", "{answer}");
            assert_eq!(
                c["message"]["content"],
                Value::Null,
                "no markup or text beside forced calls: {answer}"
            );
            assert_eq!(c["message"]["tool_calls"].as_array().unwrap().len(), 1, "parallel_tool_calls false");
        }
        let whole = whole(&answer);
        assert_eq!(streamed(&app, body).await, whole, "temperature {temperature}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_function_is_called_with_valid_arguments_and_finishes_with_stop() {
    let app = app(state("llama", roomy(), vec![]));
    let body = chat(json!({"tool_choice": {"type": "function", "function": {"name": "add"}},
        "temperature": 1.0, "seed": 3}));
    let (status, answer) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "OpenAI answers a named choice with stop: {answer}");
    assert_eq!(choice["message"]["content"], Value::Null);
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "add");
    assert_eq!(streamed(&app, body).await, whole(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_reads_no_calls_and_a_result_turn_is_accepted() {
    let app = app(state("llama", roomy(), vec![]));
    let (status, answer) =
        post(&app, "/v1/chat/completions", chat(json!({"tool_choice": "none", "max_tokens": 8}))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let choice = &answer["choices"][0];
    assert!(
        choice["message"]["content"].is_string() && choice["message"].get("tool_calls").is_none(),
        "{answer}"
    );
    assert_ne!(choice["finish_reason"], "tool_calls");

    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}
    ]);
    let app = app_with_hermes();
    let (status, answer) = post(
        &app,
        "/v1/chat/completions",
        chat(json!({"messages": history, "tool_choice": "none", "max_tokens": 4})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap() > 100, "the tools and the turn were rendered");
}

fn app_with_hermes() -> Router {
    app(state_with_template("llama", roomy(), vec![], Some(hermes_template())))
}

/// `auto` reads the model's own format. Noise never writes a `<tool_call>` block by chance, so
/// a regex makes it write one (as a model that chose to call would), and the Hermes reader must
/// find the call in it, leaving no markup in `content`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_reads_hermes_blocks_whole_and_streamed() {
    let app = app_with_hermes();
    // Not strict: a strict tool brings its own grammar, which a regex cannot join.
    let mut tools = tools();
    tools[1]["function"]["strict"] = json!(false);
    let regex = r#"Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}", "unit": "celsius"\}\}\n</tool_call>"#;
    let body = chat(
        json!({"structured_outputs": {"regex": regex}, "temperature": 1.0, "seed": 2, "max_tokens": 200,
            "tools": tools}),
    );
    let (status, answer) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    assert_eq!(
        choice["message"]["content"], "Checking.",
        "text before the call stays, markup goes: {answer}"
    );
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{answer}");
    assert_valid_call(&calls[0]);
    assert_eq!(streamed(&app, body).await, whole(&answer));

    // Without a call the text is the content, untouched.
    let (status, plain) = post(
        &app,
        "/v1/chat/completions",
        chat(
            json!({"structured_outputs": {"regex": "[a-z]{3} [a-z]{2}"}, "max_tokens": 200, "tools": tools}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
    assert_eq!(plain["choices"][0]["message"]["content"].as_str().unwrap().len(), 6, "{plain}");
}

/// `auto` with a `strict` tool: the text is free until `<tool_call>` opens a call, which must
/// then name a tool and, for the strict one, match its schema. Checked token by token against
/// the masks of the grammar the request compiles to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_tools_in_auto_mode_constrain_each_call() {
    use ferrite_server::tools::{asked, Parser};
    let state = state_with_template("llama", roomy(), vec![], Some(hermes_template()));
    let tools = tools().as_array().unwrap().clone();
    let spec = asked(Some(&tools), None, None, Some(Parser::Hermes), None).unwrap().unwrap().grammar.unwrap();
    let grammar = state.models.loaded()[0].engine.compile_grammar(&spec).unwrap();
    // Whether every token of `text`, in turn, is allowed.
    let allowed = |text: &str| {
        let mut g = grammar.start();
        state.models.loaded()[0].tokenizer.encode(text, false).unwrap().into_iter().all(|id| {
            let ok = g.mask_row(&[0.0; 448])[id as usize] == 0.0;
            g.commit(id);
            ok
        })
    };
    let valid = "Let me add. <tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 22}}\n</tool_call> Done.";
    assert!(allowed(valid));
    assert!(allowed("No call at all, just text {with braces}."));
    // get_weather is not strict: any object will do for it.
    assert!(allowed(
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"anything\": [true]}}\n</tool_call>"
    ));
    for invalid in [
        "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"c\": 2}}",
        "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 100, \"b\": 2}}",
        "<tool_call>\n{\"name\": \"subtract\"",
        "<tool_call>\nnot json",
    ] {
        assert!(!allowed(invalid), "{invalid:?} got through");
    }
    // The Llama 3 format: text not starting with `{`, or calls separated by "; ".
    let spec =
        asked(Some(&tools), None, None, Some(Parser::Llama3Json), None).unwrap().unwrap().grammar.unwrap();
    let llama = state.models.loaded()[0].engine.compile_grammar(&spec).unwrap();
    let allowed = |text: &str| {
        let mut g = llama.start();
        state.models.loaded()[0].tokenizer.encode(text, false).unwrap().into_iter().all(|id| {
            let ok = g.mask_row(&[0.0; 448])[id as usize] == 0.0;
            g.commit(id);
            ok
        })
    };
    assert!(allowed("{\"name\": \"add\", \"parameters\": {\"a\": 1, \"b\": 2}}; {\"name\": \"get_weather\", \"parameters\": {}}"));
    assert!(allowed("Plain text."));
    assert!(!allowed("{\"name\": \"add\", \"parameters\": {\"a\": 1, \"c\": 2}}"));
    // Served, and refused beside a structured-output field.
    let app = app(state);
    let (status, answer) = post(&app, "/v1/chat/completions", chat(json!({"max_tokens": 20}))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) =
        post(&app, "/v1/chat/completions", chat(json!({"response_format": {"type": "json_object"}}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_requests_get_400s_naming_the_field() {
    let app = app(state("llama", roomy(), vec![]));
    let cases = [
        // The fixture's own template shows no call format: auto cannot read calls.
        (chat(json!({})), "tool_choice", "--tool-call-parser"),
        (
            chat(json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}})),
            "tool_choice",
            "\"nope\"",
        ),
        (chat(json!({"tool_choice": "required", "tools": null})), "tool_choice", "needs `tools`"),
        (
            chat(json!({"tools": [{"type": "function", "function": {"name": "has space"}}]})),
            "tools[0]",
            "a-z",
        ),
        (
            chat(json!({"tool_choice": "required", "parallel_tool_calls": "yes"})),
            "parallel_tool_calls",
            "boolean",
        ),
        (
            chat(json!({"tool_choice": "required", "response_format": {"type": "json_object"}})),
            "tool_choice",
            "cannot be combined",
        ),
        (
            chat(json!({"tool_choice": "none", "messages": [{"role": "user", "content": "x",
                "tool_calls": [{"function": {"name": "f"}}]}]})),
            "messages[0].tool_calls",
            "only assistant",
        ),
        (
            chat(json!({"tool_choice": "none", "chat_template_kwargs": {"messages": []}})),
            "chat_template_kwargs",
            "set by the server",
        ),
    ];
    for (body, param, says) in cases {
        let (status, answer) = post(&app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["error"]["param"], param, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(says), "{answer}");
    }
    let (status, _) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "the server keeps serving");
}

/// Our rendering of tools, tool calls, tool results and template variables equals
/// transformers' for a Qwen2.5-style and a Llama-3.1-style template
/// (`scripts/gen_tool_templates.py` wrote the expected text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_render_tools_as_transformers_does() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("chat_tools/cases.json")).unwrap()).unwrap();
    let mut apps = std::collections::HashMap::new();
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let template = case["template"].as_str().unwrap();
        let app = apps.entry(template.to_string()).or_insert_with(|| {
            let text = std::fs::read_to_string(fixture(&format!("chat_tools/{template}"))).unwrap();
            app(state_with_template("qwen3", roomy(), vec![], Some(text)))
        });
        let mut body = case["request"].clone();
        body["model"] = json!("tiny");
        let (status, answer) = post(app, "/tokenize", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["prompt"], case["expected"], "{template} / {}", case["case"]);
        checked += 1;
    }
    assert_eq!(checked, 10);
}

/// The llama fixture with its special token 3 spelled `[TOOL_CALLS]`, as Mistral's
/// vocabularies hold it, in a temporary folder.
fn mistral_mark_fixture() -> (tempfile::TempDir, u32) {
    const MARK: u32 = 3;
    let dir = respelled_fixture("llama", &[(MARK, "[TOOL_CALLS]", true)]);
    (dir, MARK)
}

/// `auto` with a `strict` tool in Mistral's format: free text, or text, the `[TOOL_CALLS]`
/// token (by id: a special token is no text) and a JSON array of valid calls. Checked token by
/// token against the compiled masks; a vocabulary without the token is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_tools_in_auto_mode_for_mistral_name_its_call_token() {
    use ferrite_server::tools::{asked, Parser};
    let (dir, mark) = mistral_mark_fixture();
    let state = state(dir.path().to_str().unwrap(), roomy(), vec![]);
    let model = state.models.loaded()[0].clone();
    assert_eq!(model.tokenizer.token_id("[TOOL_CALLS]"), Some(mark));
    let tools = tools().as_array().unwrap().clone();
    let spec =
        asked(Some(&tools), None, None, Some(Parser::Mistral), Some(mark)).unwrap().unwrap().grammar.unwrap();
    let grammar = model.engine.compile_grammar(&spec).unwrap();
    // Whether each token, in turn, is allowed: `text` then (with `calls`) the mark and `calls`.
    let allowed = |text: &str, calls: Option<&str>| {
        let mut ids = model.tokenizer.encode(text, false).unwrap();
        if let Some(calls) = calls {
            ids.push(mark);
            ids.extend(model.tokenizer.encode(calls, false).unwrap());
        }
        let mut g = grammar.start();
        ids.into_iter().all(|id| {
            let ok = g.mask_row(&[0.0; 448])[id as usize] == 0.0;
            g.commit(id);
            ok
        })
    };
    assert!(allowed("Just an answer, [with brackets] {and braces}.", None));
    assert!(allowed("Let me add.", Some("[{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 22}}]")));
    assert!(allowed("", Some("[{\"name\": \"get_weather\", \"arguments\": {\"any\": true}}, {\"name\": \"add\", \"arguments\": {\"a\": 0, \"b\": 0}}]")));
    for invalid in [
        "[{\"name\": \"add\", \"arguments\": {\"a\": 1, \"c\": 2}}]",
        "[{\"name\": \"add\", \"arguments\": {\"a\": 100, \"b\": 2}}]",
        "[{\"name\": \"subtract\"",
        "[]",
        "not json",
    ] {
        assert!(!allowed("Text.", Some(invalid)), "{invalid:?} got through");
    }
    // The mark spelled out of ordinary tokens is refused: the reader would take it for one.
    let mut spelled = model.tokenizer.encode("Hi [TOOL_CALLS", false).unwrap();
    spelled.extend(model.tokenizer.encode("] x", false).unwrap());
    assert!(!spelled.contains(&mark));
    let mut g = grammar.start();
    let through = spelled.iter().all(|&id| {
        let ok = g.mask_row(&[0.0; 448])[id as usize] == 0.0;
        g.commit(id);
        ok
    });
    assert!(!through, "the mark spelled as text got through");
    // A vocabulary without the mark as one token is refused by name.
    let e = asked(Some(&tools), None, None, Some(Parser::Mistral), None).unwrap_err();
    assert!(e.message.contains("one token of the vocabulary"), "{e:?}");

    // Served: pushed to open a call at once, the noise model must then finish valid calls,
    // which are read as tool calls.
    let served = ferrite_server::Served {
        tool_call_parser: Some(Parser::Mistral),
        ..common::served(dir.path().to_str().unwrap(), roomy(), None)
    };
    let app = app(ferrite_server::AppState::single(served));
    // Hiding special tokens would hide the mark from the reader.
    let (status, answer) =
        post(&app, "/v1/chat/completions", chat(json!({"skip_special_tokens": true}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["error"]["param"], "skip_special_tokens");
    for seed in 0..3 {
        // The strict, bounded tool alone: noise must then finish its calls.
        let body = chat(json!({"max_tokens": 400, "temperature": 1.0, "seed": seed,
            "logit_bias": {mark.to_string(): 100}, "tools": [tools[1]]}));
        let (status, answer) = post(&app, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{answer}");
        for call in calls {
            let name = call["function"]["name"].as_str().unwrap();
            let arguments: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(name, "add", "{answer}");
            assert!(arguments.is_object(), "{call}");
            assert_valid_call(call);
        }
    }
}
