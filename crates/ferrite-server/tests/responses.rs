//! `POST /v1/responses`: the same text as the chat endpoint for the same conversation (one
//! template, one engine path), whole and streamed (the stream's events in the API's order, its
//! deltas adding up to the whole text), structured output through `text.format`, and what
//! needs server-side state or is not built yet refused by name.

mod common;

use axum::http::StatusCode;
use axum::Router;
use common::{call, roomy, state};
use ferrite_server::app;
use serde_json::{json, Value};

fn router() -> Router {
    app(state("qwen3", roomy(), vec![]))
}

/// The qwen3 fixture under a Hermes-style template that renders tools, calls and their results
/// (tests/fixtures/chat_tools, as the chat tool tests use).
fn tool_router() -> Router {
    let template = std::fs::read_to_string(common::fixture("chat_tools/hermes.jinja")).unwrap();
    app(common::state_with_template("qwen3", roomy(), vec![], Some(template)))
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Vec<u8>) {
    call(app, "POST", path, Some(body), None).await
}

fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap()
}

/// The text of a response object's one message.
fn output_text(r: &Value) -> &str {
    assert_eq!(r["output"].as_array().map(Vec::len), Some(1), "{r}");
    let item = &r["output"][0];
    assert_eq!((item["type"].as_str(), item["role"].as_str()), (Some("message"), Some("assistant")), "{r}");
    item["content"][0]["text"].as_str().unwrap()
}

/// `instructions` + a string `input` answer what chat answers for a system and a user message;
/// message items (developer, assistant turns, text parts) likewise; a cut by
/// `max_output_tokens` is `incomplete`, and the usage matches chat's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_answer_what_chat_answers() {
    let app = router();
    let chat = json!({"model": "tiny", "temperature": 0, "max_tokens": 12, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]});
    let (s, b) = post(&app, "/v1/chat/completions", chat).await;
    assert_eq!(s, StatusCode::OK);
    let chat = json_of(&b);
    let want = chat["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(chat["choices"][0]["finish_reason"], "length", "the random model runs to the limit");

    let plain = json!({"model": "tiny", "instructions": "Be brief.", "input": "Hello there",
        "temperature": 0, "max_output_tokens": 12});
    let items = json!({"model": "tiny", "temperature": 0, "max_output_tokens": 12, "input": [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello "},
            {"type": "input_text", "text": "there"}]}]});
    for body in [plain, items] {
        let (s, b) = post(&app, "/v1/responses", body.clone()).await;
        let r = json_of(&b);
        assert_eq!(s, StatusCode::OK, "{r}");
        assert_eq!(output_text(&r), want, "{body}");
        assert_eq!((r["object"].as_str(), r["status"].as_str()), (Some("response"), Some("incomplete")));
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        assert!(r["id"].as_str().unwrap().starts_with("resp_"), "{r}");
        assert_eq!(r["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
        assert_eq!(r["usage"]["output_tokens"], 12);
        assert_eq!(r["usage"]["total_tokens"], chat["usage"]["total_tokens"]);
        assert_eq!(r["model"], "tiny");
    }
}

/// The streamed events: created, in_progress, the item and its part opened, text deltas, then
/// the text, part and item closed and the final response, each numbered in order; the deltas
/// add up to the whole answer's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_sends_the_apis_events_in_order() {
    let app = router();
    let body =
        json!({"model": "tiny", "input": "Once upon a time", "temperature": 0, "max_output_tokens": 10});
    let (_, whole) = post(&app, "/v1/responses", body.clone()).await;
    let whole = json_of(&whole);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (s, b) = post(&app, "/v1/responses", streamed).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b).unwrap();
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty() && !b.starts_with(':')) {
        let name = block.lines().find_map(|l| l.strip_prefix("event: ")).expect("an event name");
        let data: Value =
            serde_json::from_str(block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
        assert_eq!(data["type"], name, "the data names its event");
        assert_eq!(data["sequence_number"], events.len(), "numbered in order");
        events.push(data);
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let deltas = kinds.iter().filter(|k| **k == "response.output_text.delta").count();
    assert!(deltas > 0, "{kinds:?}");
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]);
    assert_eq!(kinds, expected);
    let joined: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(joined, output_text(&whole));
    let last = &events.last().unwrap()["response"];
    assert_eq!(output_text(last), output_text(&whole));
    assert_eq!(last["usage"]["output_tokens"], 10);
    assert_eq!(events[0]["response"]["status"], "in_progress");
}

/// `text.format` json_schema constrains the answer as chat's `response_format` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_format_json_schema_constrains_the_answer() {
    let app = router();
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"], "additionalProperties": false});
    let body = json!({"model": "tiny", "input": "Pick a number", "max_output_tokens": 600, "temperature": 0.7,
        "text": {"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": true}}});
    let (s, b) = post(&app, "/v1/responses", body).await;
    let r = json_of(&b);
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "completed", "{r}");
    let parsed: Value = serde_json::from_str(output_text(&r)).unwrap();
    let n = parsed["n"].as_i64().unwrap();
    assert!((0..=9).contains(&n) && parsed.as_object().unwrap().len() == 1, "{parsed}");
    assert_eq!(r["text"]["format"]["type"], "json_schema");
}

fn pick_tool() -> Value {
    json!([{"type": "function", "name": "pick", "description": "Pick a number.", "strict": true,
        "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"], "additionalProperties": false}}])
}

/// A forced function tool: the output is a `function_call` item whose arguments obey the
/// schema, whole and streamed (the arguments' events, then the item done); the call and its
/// output sent back as input items render as chat's assistant and tool turns, and the answer
/// to them is a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_tools_call_and_take_their_output_back() {
    let app = tool_router();
    let asked = json!({"model": "tiny", "input": "Pick a number", "tools": pick_tool(), "temperature": 0,
        "tool_choice": {"type": "function", "name": "pick"}, "max_output_tokens": 560});
    let (s, b) = post(&app, "/v1/responses", asked.clone()).await;
    let r = json_of(&b);
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["status"], "completed", "{r}");
    let calls: Vec<&Value> =
        r["output"].as_array().unwrap().iter().filter(|i| i["type"] == "function_call").collect();
    assert_eq!(calls.len(), 1, "{r}");
    let call = calls[0];
    assert_eq!(call["name"], "pick");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!((0..=9).contains(&args["n"].as_i64().unwrap()), "{args}");
    assert_eq!(r["tools"][0]["name"], "pick", "the tools are echoed");

    let mut streamed = asked;
    streamed["stream"] = json!(true);
    let (_, b) = post(&app, "/v1/responses", streamed).await;
    let text = String::from_utf8(b).unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let done =
        events.iter().find(|e| e["type"] == "response.function_call_arguments.done").expect("arguments done");
    assert_eq!(done["arguments"], call["arguments"], "greedy: the stream calls as the whole answer did");
    let delta: String = events
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(delta, call["arguments"].as_str().unwrap());
    assert_eq!(events.last().unwrap()["type"], "response.completed");

    let answered = json!({"model": "tiny", "tools": pick_tool(), "tool_choice": "none", "max_output_tokens": 4,
        "input": [{"role": "user", "content": "Pick a number"},
            {"type": "function_call", "call_id": call["call_id"], "name": "pick", "arguments": call["arguments"]},
            {"type": "function_call_output", "call_id": call["call_id"], "output": "{\"ok\": true}"}]});
    let (s, b) = post(&app, "/v1/responses", answered).await;
    let r2 = json_of(&b);
    assert_eq!(s, StatusCode::OK, "{r2}");
    assert_eq!(r2["output"][0]["type"], "message", "{r2}");
    assert!(
        r2["usage"]["input_tokens"].as_u64().unwrap() > r["usage"]["input_tokens"].as_u64().unwrap() + 10,
        "the call and its output are in the prompt: {r2}"
    );
}

/// What needs state or is not built yet is a 400 naming the field; the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_ferrite_does_not_do_is_refused_by_name() {
    let app = router();
    let base = json!({"model": "tiny", "input": "Hi", "max_output_tokens": 2});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("store", json!(true)), "store"),
        (with("previous_response_id", json!("resp_1")), "previous_response_id"),
        (with("conversation", json!("conv_1")), "conversation"),
        (with("background", json!(true)), "background"),
        (with("tools", json!([{"type": "web_search"}])), "tools[0].type"),
        (with("tool_choice", json!({"type": "file_search"})), "tool_choice"),
        (with("reasoning", json!({"effort": "low"})), "reasoning"),
        (with("include", json!(["message.output_text.logprobs"])), "include"),
        (with("input", json!([{"type": "item_reference", "id": "x"}])), "input[0].type"),
        (
            with("input", json!([{"type": "function_call_output", "call_id": "c", "output": 1}])),
            "input[0].output",
        ),
        (
            with("input", json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])),
            "input[0].content[0]",
        ),
        (with("input", json!([{"role": "tool", "content": "x"}])), "input[0].role"),
        (with("text", json!({"format": {"type": "yaml"}})), "text.format.type"),
        (with("input", Value::Null), "input"),
        (with("max_output_tokens", json!(0)), "max_output_tokens"),
        (with("max_output_tokens", json!(5000)), "max_output_tokens"),
    ];
    for (body, param) in cases {
        let (s, b) = post(&app, "/v1/responses", body.clone()).await;
        let answer = json_of(&b);
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
    }
    let (s, _) = post(&app, "/v1/responses", with("store", json!(false))).await;
    assert_eq!(s, StatusCode::OK, "store: false is what this server does");
}
