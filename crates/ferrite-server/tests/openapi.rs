//! Responses checked against OpenAI's published OpenAPI spec (`../shared/specs/openapi.json`,
//! OpenAPI 3.1, so its schemas are JSON Schema 2020-12): completions, chat, streamed chat
//! chunks, the models list and the error object.

mod common;

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::Router;
use common::{call, roomy, state};
use ferrite_server::app;
use serde_json::{json, Value};

fn spec() -> Option<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/specs/openapi.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).expect("the spec is JSON")),
        Err(_) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED openapi checks: {} is absent", path.display());
            None
        }
    }
}

/// Some of the spec's schemas still use OpenAPI 3.0's `nullable: true`, which JSON Schema
/// ignores; rewrite each such schema as "this, or null" so null is accepted where OpenAI allows it.
fn nullable_to_any_of(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for child in map.values_mut() {
                nullable_to_any_of(child);
            }
            if map.remove("nullable") == Some(Value::Bool(true)) {
                let inner = Value::Object(std::mem::take(map));
                map.insert("anyOf".into(), json!([inner, {"type": "null"}]));
            }
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_to_any_of),
        _ => {}
    }
}

/// Checks `instance` against `components.schemas[name]`; panics with every violation.
fn check(spec: &Value, name: &str, instance: &Value) {
    assert!(spec["components"]["schemas"].get(name).is_some(), "the spec has no schema {name}");
    let mut components = spec["components"].clone();
    nullable_to_any_of(&mut components);
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": format!("#/components/schemas/{name}"),
        "components": components,
    });
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&schema)
        .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{name} violations:\n{}\ninstance: {instance}", errors.join("\n"));
}

fn router() -> Router {
    app(state("qwen3", roomy(), vec![]))
}

fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_follow_openais_schemas() {
    let Some(spec) = spec() else { return };
    let app = router();
    let (s, b) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    check(&spec, "ListModelsResponse", &json_of(&b));

    let completion =
        json!({"model": "tiny", "prompt": "Hello", "max_tokens": 6, "n": 2, "logprobs": 2, "temperature": 0});
    let (s, b) = call(&app, "POST", "/v1/completions", Some(completion), None).await;
    assert_eq!(s, StatusCode::OK);
    check(&spec, "CreateCompletionResponse", &json_of(&b));

    // An echoed prompt's first token has null logprobs, as OpenAI's API returns (and clients
    // such as lm-eval expect) although the spec's item type is `number`: everything else of the
    // body must follow the schema.
    let echoed =
        json!({"model": "tiny", "prompt": "Hello there", "max_tokens": 3, "echo": true, "logprobs": 1});
    let (s, b) = call(&app, "POST", "/v1/completions", Some(echoed), None).await;
    assert_eq!(s, StatusCode::OK);
    let mut body = json_of(&b);
    let lp = &mut body["choices"][0]["logprobs"];
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
    lp["token_logprobs"][0] = json!(0.0);
    lp["top_logprobs"][0] = json!({});
    check(&spec, "CreateCompletionResponse", &body);

    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let chat =
        json!({"model": "tiny", "messages": messages, "max_tokens": 6, "logprobs": true, "top_logprobs": 2});
    let (s, b) = call(&app, "POST", "/v1/chat/completions", Some(chat.clone()), None).await;
    assert_eq!(s, StatusCode::OK);
    check(&spec, "CreateChatCompletionResponse", &json_of(&b));

    let mut streamed = chat;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (_, b) = call(&app, "POST", "/v1/chat/completions", Some(streamed), None).await;
    let text = String::from_utf8(b).unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.len() > 2);
    for c in &chunks {
        check(&spec, "CreateChatCompletionStreamResponse", c);
    }

    let (s, b) = call(
        &app,
        "POST",
        "/v1/completions",
        Some(json!({"model": "tiny", "prompt": "x", "best_of": 3})),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    check(&spec, "ErrorResponse", &json_of(&b));
}
