//! Reasoning models through the served path (`--reasoning-parser`): the thinking is answered
//! as `reasoning_content`, the answer as `content`, and a grammar holds for the answer only.
//! The model is the qwen3 fixture with two of its unused special tokens respelled `<think>` and
//! `</think>` (as in Qwen3's vocabulary, single tokens that are not skipped); its output is
//! noise, and `logit_bias` on the markers makes it think, or not, on cue.

mod common;

use axum::http::StatusCode;
use axum::Router;
use common::{call, respelled_fixture, roomy, served};
use ferrite_server::app;
use ferrite_server::reasoning::ReasoningParser;
use serde_json::{json, Value};

/// `<|bos|>` (unused: the qwen family adds no BOS) and `<|pad|>`.
const OPEN: u32 = 0;
const END: u32 = 4;

/// The qwen3 fixture with `<think>` = 0 and `</think>` = 4, in a temporary folder.
fn thinking_fixture() -> tempfile::TempDir {
    let dir = respelled_fixture("qwen3", &[(OPEN, "<think>", false), (END, "</think>", false)]);
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["bos_token"] = Value::Null;
    config["pad_token"] = Value::Null;
    std::fs::write(&config_path, config.to_string()).unwrap();
    dir
}

/// ChatML whose generation prompt opens the thinking (DeepSeek-R1's way) or not (Qwen3's).
fn template(opens: bool) -> String {
    let prompt = if opens { "<|im_start|>assistant\n<think>\n" } else { "<|im_start|>assistant\n" };
    format!(
        "{{% for m in messages %}}<|im_start|>{{{{ m.role }}}}\n{{{{ m.content }}}}<|im_end|>\n{{% endfor %}}{{% if add_generation_prompt %}}{prompt}{{% endif %}}"
    )
}

fn router(dir: &tempfile::TempDir, opens: bool) -> Router {
    let served = served(dir.path().to_str().unwrap(), roomy(), Some(template(opens)));
    app(ferrite_server::AppState::single(ferrite_server::Served {
        reasoning_parser: Some(ReasoningParser::Qwen3),
        ..served
    }))
}

async fn post(app: &Router, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(app, "POST", "/v1/chat/completions", Some(body), None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Think, then answer."}],
        "max_tokens": 300, "temperature": 1.0, "seed": 9, "response_format": {"type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"], "additionalProperties": false}}}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The streamed answer's (reasoning, content, finish).
async fn streamed(app: &Router, mut body: Value) -> (Option<String>, String, String) {
    body["stream"] = json!(true);
    let (status, raw) = call(app, "POST", "/v1/chat/completions", Some(body), None).await;
    assert_eq!(status, StatusCode::OK);
    let (mut reasoning, mut content, mut finish) = (None::<String>, String::new(), String::new());
    for data in String::from_utf8(raw).unwrap().lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let c = &chunk["choices"][0];
        if let Some(t) = c["delta"]["reasoning_content"].as_str() {
            assert!(content.is_empty(), "thinking comes before the answer");
            reasoning.get_or_insert_with(String::new).push_str(t);
        }
        content.push_str(c["delta"]["content"].as_str().unwrap_or_default());
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (reasoning, content, finish)
}

fn whole(answer: &Value) -> (Option<String>, String, String) {
    let c = &answer["choices"][0];
    let m = &c["message"];
    (
        m["reasoning_content"].as_str().map(str::to_string),
        m["content"].as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

fn assert_answer_valid(content: &str) {
    let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content:?}"));
    assert!(v["ok"].is_boolean() && v.as_object().unwrap().len() == 1, "{v}");
}

/// The prompt opened the thinking: noise thinks freely until `</think>` (made likely by a
/// bias), then the grammar holds from the answer's first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_holds_after_the_thinking_the_prompt_opened() {
    let dir = thinking_fixture();
    let app = router(&dir, true);
    let body = chat(json!({"logit_bias": {END.to_string(): 3.0}}));
    let (status, answer) = post(&app, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (reasoning, content, finish) = whole(&answer);
    let reasoning = reasoning.unwrap_or_else(|| panic!("no reasoning_content: {answer}"));
    assert!(!reasoning.is_empty() && !reasoning.contains("</think>"), "{answer}");
    assert!(!reasoning.trim_start().starts_with('{'), "the thinking was free, not JSON: {reasoning:?}");
    assert_answer_valid(&content);
    assert_eq!(finish, "stop");
    assert_eq!(streamed(&app, body).await, whole(&answer));
}

/// The prompt left it open: the first token may open a thinking or begin the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_may_open_a_thinking_or_answer_at_once() {
    let dir = thinking_fixture();
    let app = router(&dir, false);
    // Equal biases: at the first token `</think>` is not allowed (the grammar is), so `<think>`
    // wins; while thinking, `</think>` soon does.
    let thinks = chat(json!({"logit_bias": {OPEN.to_string(): 6.0, END.to_string(): 6.0}}));
    let (status, answer) = post(&app, thinks.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (reasoning, content, _) = whole(&answer);
    assert!(reasoning.is_some(), "the biased first token opened a thinking: {answer}");
    assert_answer_valid(&content);
    assert_eq!(streamed(&app, thinks).await, whole(&answer));

    let (status, answer) = post(&app, chat(json!({"logit_bias": {OPEN.to_string(): -100.0}}))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (reasoning, content, finish) = whole(&answer);
    assert_eq!(reasoning, None, "no thinking, no reasoning_content: {answer}");
    assert_answer_valid(&content);
    assert_eq!(finish, "stop");
}

/// Through `/v1/responses` the thinking is a `reasoning` item before the message: the same
/// thinking and answer text chat gives the same conversation (greedy), whole and streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_answer_a_thinking_as_a_reasoning_item() {
    let dir = thinking_fixture();
    let app = router(&dir, true);
    let question = "Think, then answer.";
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": question}],
        "max_tokens": 20, "temperature": 0});
    let (status, answer) = post(&app, chat).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (reasoning, content, _) = whole(&answer);
    let reasoning = reasoning.unwrap_or_else(|| panic!("the prompt opened a thinking: {answer}"));
    let body = json!({"model": "tiny", "input": question, "max_output_tokens": 20, "temperature": 0});
    let (status, raw) = call(&app, "POST", "/v1/responses", Some(body.clone()), None).await;
    let r: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(status, StatusCode::OK, "{r}");
    let output = r["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "reasoning", "{r}");
    assert_eq!(output[0]["content"][0]["text"].as_str(), Some(reasoning.as_str()), "{r}");
    let message = output.iter().find(|i| i["type"] == "message").unwrap_or_else(|| panic!("no message: {r}"));
    assert_eq!(message["content"][0]["text"].as_str(), Some(content.as_str()), "{r}");
    // Streamed: the same items, each sent whole once the text is read.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, raw) = call(&app, "POST", "/v1/responses", Some(streamed), None).await;
    let text = String::from_utf8(raw).unwrap();
    let last = text.lines().filter_map(|l| l.strip_prefix("data: ")).next_back().unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    // Item ids differ between two responses; their kinds and contents must not.
    let kinds_and_contents = |items: &Value| -> Vec<Value> {
        items.as_array().unwrap().iter().map(|i| json!([i["type"], i["content"]])).collect()
    };
    assert_eq!(kinds_and_contents(&last["response"]["output"]), kinds_and_contents(&r["output"]));
    let kinds: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "response.output_item.done").count(),
        output.len(),
        "{kinds:?}"
    );
}
