//! The HTTP API through `app(state)` with `oneshot` (no socket), on the tiny llama fixture:
//! OpenAI's response shapes, streaming rules, errors with `param`, API keys.

mod common;

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::{call, roomy, state};
use ferrite_engine::model::tokenizer::TokenizerConfig;
use ferrite_engine::{CacheConfig, EngineConfig, SchedulerConfig, Tokenizer};
use ferrite_server::app;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

fn fixture() -> PathBuf {
    common::fixture("llama")
}

fn router(api_keys: Vec<String>) -> Router {
    app(state("llama", roomy(), api_keys))
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(app, "POST", path, Some(body), None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

fn assert_error(v: &Value, param: Option<&str>, needle: &str) {
    let e = &v["error"];
    assert!(e["message"].as_str().unwrap().contains(needle), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert_eq!(e["param"].as_str(), param, "{v}");
    assert!(e.as_object().unwrap().contains_key("code"), "{v}");
}

fn greedy(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "temperature": 0, "max_tokens": 12, "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_health() {
    let app = router(vec![]);
    let (s, b) = call(&app, "GET", "/health", None, None).await;
    assert_eq!((s, b.len()), (StatusCode::OK, 0));
    let (s, b) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["object"], "model");
    let (s, b) = call(&app, "GET", "/v1/models/other", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&serde_json::from_slice(&b).unwrap(), Some("model"), "other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_matches_the_reference_and_streams_the_same_text() {
    let app = router(vec![]);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let p = &r["prompts"][2];
    let ids: Vec<u32> =
        p["greedy_ids"].as_array().unwrap()[..12].iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let (s, v) = post(&app, "/v1/completions", greedy(json!({"prompt": p["prompt_text"]}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], p["n_prompt_tokens"]);
    assert_eq!(v["usage"]["total_tokens"], v["usage"]["prompt_tokens"].as_u64().unwrap() + 12);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    // Same ids as a prompt of token ids: the reference's greedy continuation.
    let (_, by_ids) = post(&app, "/v1/completions", greedy(json!({"prompt": p["prompt_ids"]}))).await;
    assert_eq!(by_ids["choices"][0]["text"], text);
    let config = TokenizerConfig::from_file(&fixture().join("tokenizer_config.json")).unwrap();
    let tokenizer = Tokenizer::load(&fixture().join("tokenizer.json"), config).unwrap();
    assert_eq!(text, tokenizer.decode(&ids, true).unwrap(), "the reference's 12 greedy tokens, as text");

    let body = greedy(
        json!({"prompt": p["prompt_text"], "stream": true, "stream_options": {"include_usage": true}}),
    );
    let (s, raw) = call(&app, "POST", "/v1/completions", Some(body), None).await;
    assert_eq!(s, StatusCode::OK);
    let data = sse_data(&raw);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id && c["created"] == chunks[0]["created"]));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let body = &chunks[..chunks.len() - 1];
    let finishes: Vec<&Value> =
        body.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finishes, vec![&json!("length")], "exactly one finish_reason");
    let streamed: String = body.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_with_n_and_streaming_roles() {
    let app = router(vec![]);
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]);
    let (s, v) = post(&app, "/v1/chat/completions", greedy(json!({"messages": messages, "n": 2}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 24, "usage counts both choices");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(v["choices"][1]["message"]["content"], text, "greedy samples agree");

    let (_, raw) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(greedy(json!({"messages": messages, "stream": true}))),
        None,
    )
    .await;
    let data = sse_data(&raw);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(streamed, text);
    assert_eq!(chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count(), 1);
}

/// A bad body, the status it gets, the `param` its error names and a word of its message.
type BadCase = (&'static str, Value, StatusCode, Option<&'static str>, &'static str);

fn bad_completions() -> Vec<BadCase> {
    vec![
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}),
            StatusCode::NOT_FOUND,
            Some("model"),
            "nope",
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "best_of": 2}),
            StatusCode::BAD_REQUEST,
            Some("best_of"),
            "best_of",
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "suffix": "y"}),
            StatusCode::BAD_REQUEST,
            Some("suffix"),
            "suffix",
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 5000}),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            "1024",
        ),
        // A count near u64::MAX must not wrap into something that fits.
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 18446744073709551614u64}),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            "exceeds max_model_len 1024",
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "top_p": 1.5}),
            StatusCode::BAD_REQUEST,
            Some("top_p"),
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "n": 0}),
            StatusCode::BAD_REQUEST,
            Some("n"),
            "`n`",
        ),
        ("/v1/completions", json!({"model": "tiny"}), StatusCode::BAD_REQUEST, Some("prompt"), "prompt"),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "guided_regex": "(unclosed"}),
            StatusCode::BAD_REQUEST,
            Some("guided_regex"),
            "does not compile",
        ),
    ]
}

fn bad_chats() -> Vec<BadCase> {
    vec![
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            StatusCode::BAD_REQUEST,
            Some("tools[0]"),
            "`tools[0].function` (an object with a `name`) is required",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}}}),
            StatusCode::BAD_REQUEST,
            Some("response_format"),
            "does not compile",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            StatusCode::BAD_REQUEST,
            Some("messages[0].role"),
            "wizard",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let app = router(vec![]);
    let (s, b) = call(&app, "POST", "/v1/completions", None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(serde_json::from_slice::<Value>(&b).unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));
    let cases = bad_completions().into_iter().chain(bad_chats());
    for (path, body, status, param, needle) in cases {
        let (s, v) = post(&app, path, body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert_error(&v, param, needle);
    }
    // The server still serves.
    let (s, _) = post(&app, "/v1/completions", greedy(json!({"prompt": "ok"}))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_enforced() {
    let app = router(vec!["secret".into()]);
    let (s, b) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(serde_json::from_slice::<Value>(&b).unwrap()["error"]["code"], "invalid_api_key");
    let (s, _) = call(&app, "GET", "/v1/models", None, Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&app, "GET", "/v1/models", None, Some("secret")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(s, StatusCode::OK, "health needs no key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_echo() {
    let app = router(vec![]);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let p = &r["prompts"][3];
    let expected: Vec<f64> =
        p["greedy_logprobs"].as_array().unwrap()[..12].iter().map(|v| v.as_f64().unwrap()).collect();

    let (s, v) =
        post(&app, "/v1/completions", greedy(json!({"prompt": p["prompt_text"], "logprobs": 3}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let got: Vec<f64> =
        lp["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(got.len(), 12);
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-4, "{got:?} vs {expected:?}");
    }
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 12);
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    for top in lp["top_logprobs"].as_array().unwrap() {
        let n = top.as_object().unwrap().len();
        assert!((1..=3).contains(&n), "{top}");
    }

    let messages = json!([{"role": "user", "content": "Tell me"}]);
    let body = greedy(json!({"messages": messages, "logprobs": true, "top_logprobs": 2}));
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 12);
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(e["logprob"], top[0]["logprob"], "{e}");
        assert!(e["bytes"].is_array());
    }
    let (s, v) =
        post(&app, "/v1/chat/completions", greedy(json!({"messages": messages, "top_logprobs": 2}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, Some("top_logprobs"), "logprobs");

    let (_, plain) = post(&app, "/v1/completions", greedy(json!({"prompt": p["prompt_text"]}))).await;
    let (_, echoed) =
        post(&app, "/v1/completions", greedy(json!({"prompt": p["prompt_text"], "echo": true}))).await;
    let prompt_text = p["prompt_text"].as_str().unwrap();
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("{prompt_text}{}", plain["choices"][0]["text"].as_str().unwrap())
    );

    // Streamed logprobs: one token per chunk, the same values.
    let body = greedy(json!({"prompt": p["prompt_text"], "logprobs": 1, "stream": true}));
    let (_, raw) = call(&app, "POST", "/v1/completions", Some(body), None).await;
    let data = sse_data(&raw);
    let streamed: Vec<f64> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .flat_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned().unwrap_or_default())
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(streamed, got);
}

/// `echo` with `logprobs` scores the prompt: a prompt made of a reference prompt and its greedy
/// continuation gets, for the continuation, the logprobs transformers gave it; the first token
/// has nulls, as in OpenAI's legacy API; every choice carries the prompt's scores; streamed
/// equals non-streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_logprobs_scores_the_prompt() {
    let app = router(vec![]);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let p = &r["prompts"][3];
    let ids = |v: &Value| -> Vec<u64> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect() };
    let (prompt_ids, greedy_ids) = (ids(&p["prompt_ids"]), ids(&p["greedy_ids"]));
    let prompt: Vec<u64> = prompt_ids.iter().chain(&greedy_ids[..8]).copied().collect();
    let expected: Vec<f64> =
        p["greedy_logprobs"].as_array().unwrap()[..8].iter().map(|v| v.as_f64().unwrap()).collect();
    let body = greedy(json!({"prompt": prompt, "echo": true, "logprobs": 2, "max_tokens": 3, "n": 2}));
    let (s, v) = post(&app, "/v1/completions", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for c in choices {
        let lp = &c["logprobs"];
        let logprobs = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(logprobs.len(), prompt.len() + 3, "prompt tokens, then generated ones");
        assert!(logprobs[0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
        for (k, want) in expected.iter().enumerate() {
            let got = logprobs[prompt_ids.len() + k].as_f64().unwrap();
            assert!((got - want).abs() < 1e-3, "continuation token {k}: {got} vs transformers {want}");
        }
        for top in &lp["top_logprobs"].as_array().unwrap()[1..] {
            assert!((1..=2).contains(&top.as_object().unwrap().len()), "{top}");
        }
        let offsets = ids(&lp["text_offset"]);
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
        assert_eq!(lp["tokens"].as_array().unwrap().len(), logprobs.len());
    }
    assert_eq!(v["usage"]["prompt_tokens"], json!(prompt.len()));

    let mut streamed_body = body;
    streamed_body["stream"] = json!(true);
    let (_, raw) = call(&app, "POST", "/v1/completions", Some(streamed_body), None).await;
    let mut per_choice: Vec<Vec<Value>> = vec![vec![]; 2];
    for d in sse_data(&raw).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(d).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            per_choice[i].extend(c["logprobs"]["token_logprobs"].as_array().cloned().unwrap_or_default());
        }
    }
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(&per_choice[i], c["logprobs"]["token_logprobs"].as_array().unwrap(), "choice {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_detokenize_and_version() {
    let app = router(vec![]);
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let p = &r["prompts"][4];
    let (s, v) = post(&app, "/tokenize", json!({"model": "tiny", "prompt": p["prompt_text"]})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["tokens"], p["prompt_ids"]);
    assert_eq!(v["count"], p["n_prompt_tokens"]);
    assert_eq!(v["max_model_len"], 1024);
    let chat = &r["chat"][0];
    let (_, v) = post(&app, "/tokenize", json!({"messages": chat["messages"]})).await;
    assert_eq!(v["tokens"], chat["prompt_ids"]);
    assert_eq!(v["prompt"], chat["rendered"]);
    let (_, v) = post(&app, "/detokenize", json!({"tokens": p["prompt_ids"]})).await;
    assert!(v["prompt"].as_str().unwrap().ends_with(p["prompt_text"].as_str().unwrap()), "{v}");
    let (s, v) = post(&app, "/detokenize", json!({"tokens": [999999]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, Some("tokens"), "999999");
    let (s, v) = post(&app, "/tokenize", json!({"prompt": "a", "messages": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, b) = call(&app, "GET", "/version", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&b).unwrap()["version"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_for_routes_limits_and_a_full_queue() {
    let app = router(vec![]);
    let (s, b) = call(&app, "GET", "/v1/nothing", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&serde_json::from_slice(&b).unwrap(), None, "no such route");
    let (s, b) = call(&app, "GET", "/v1/completions", None, None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(&serde_json::from_slice(&b).unwrap(), None, "method");
    for (body, param, needle) in [
        (json!({"model": "tiny", "prompt": "x", "temperature": 3}), "temperature", "[0, 2]"),
        (json!({"model": "tiny", "prompt": "x", "stop": vec!["a"; 17]}), "stop", "16"),
        (json!({"model": "tiny", "prompt": "x", "max_tokens": -1}), "max_tokens", "-1"),
        (json!({"model": "tiny", "prompt": "x", "echo": "yes"}), "echo", "expected a boolean"),
        (json!({"model": "tiny", "prompt": "x", "temperature": "hot"}), "temperature", "hot"),
        // This server schedules first come, first served.
        (json!({"model": "tiny", "prompt": "x", "priority": 3}), "priority", "--scheduling-policy priority"),
        (json!({"model": "tiny", "prompt": "x", "priority": 1.5}), "priority", "1.5"),
    ] {
        let (s, v) = post(&app, "/v1/completions", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // A wrong type deep in a chat body is named by its path.
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": 5}]});
    let (s, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "messages[1].content", "{v}");

    // 413 past the body limit, in OpenAI's shape.
    let config = EngineConfig {
        scheduler: SchedulerConfig { max_num_batched_tokens: 64, max_num_seqs: 1, ..Default::default() },
        cache: CacheConfig { num_blocks: 128, enable_prefix_caching: false, ..Default::default() },
        max_model_len: 1024,
        max_waiting_requests: 1,
        ..Default::default()
    };
    let state = state("llama", config, vec![]);
    let engine = state.models.loaded()[0].engine.clone();
    let small = ferrite_server::app_with_body_limit(state, 256);
    let big = json!({"model": "tiny", "prompt": "x".repeat(1000)});
    let (s, b) = call(&small, "POST", "/v1/completions", Some(big), None).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(serde_json::from_slice::<Value>(&b).unwrap()["error"]["message"].is_string());

    // 429 with Retry-After: one request running (max_num_seqs 1), one waiting (the queue's 1).
    let engine_request = |max_tokens| ferrite_engine::Request {
        request_id: "direct".into(),
        prompt_token_ids: vec![1, 5, 9],
        sampling: ferrite_engine::sampler::SamplingParams { ignore_eos: true, ..Default::default() },
        detokenize: Default::default(),
        max_tokens,
        n: 1,
        prompt_logprobs: None,
        grammar: None,
        arrival: std::time::Instant::now(),
        priority: 0,
        deadlines: Default::default(),
    };
    let mut running = engine.submit(engine_request(900)).unwrap();
    assert!(matches!(running.next().await, Some(ferrite_engine::RequestEvent::Token(_))));
    let _waiting = engine.submit(engine_request(4)).unwrap();
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from(json!({"model": "tiny", "prompt": "x", "max_tokens": 2}).to_string()))
        .unwrap();
    let resp = small.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
}

/// vLLM's `stop_reason` on each choice: the stop string or stop token id that ended it, `null`
/// for an EOS token or the length; in a stream, on the chunk that carries the finish reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reason_names_the_stop_string_or_token() {
    let app = app(state("qwen3", roomy(), vec![]));
    let completion = |extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16,
            "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let post = |body: serde_json::Value| {
        let app = app.clone();
        async move {
            let (s, b) = call(&app, "POST", "/v1/completions", Some(body), None).await;
            assert_eq!(s, StatusCode::OK);
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            v["choices"][0].clone()
        }
    };
    let free = post(completion(serde_json::json!({}))).await;
    assert_eq!(
        (free["finish_reason"].as_str(), free["stop_reason"].is_null()),
        (Some("length"), true),
        "{free}"
    );
    // A stop string from the middle of the free text (two ASCII letters, so whole characters).
    let text: Vec<char> = free["text"].as_str().unwrap().chars().collect();
    let at = (3..text.len().saturating_sub(1))
        .find(|&i| text[i].is_ascii_alphabetic() && text[i + 1].is_ascii_alphabetic())
        .expect("two letters in a row in the free text");
    let stop: String = text[at..at + 2].iter().collect();
    let stopped = post(completion(serde_json::json!({"stop": [stop]}))).await;
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
    assert_eq!(stopped["stop_reason"], serde_json::json!(stop), "{stopped}");
    let cut = stopped["text"].as_str().unwrap();
    assert!(free["text"].as_str().unwrap().starts_with(&format!("{cut}{stop}")), "{stopped} vs {free}");
    // A stop token (forced by a bias) is named by its id; EOS (3) is not named.
    let token =
        post(completion(serde_json::json!({"logit_bias": {"100": 100}, "stop_token_ids": [100]}))).await;
    assert_eq!((token["finish_reason"].as_str(), token["stop_reason"].as_u64()), (Some("stop"), Some(100)));
    let eos = post(completion(serde_json::json!({"logit_bias": {"3": 100}}))).await;
    assert_eq!((eos["finish_reason"].as_str(), eos["stop_reason"].is_null()), (Some("stop"), true), "{eos}");
    // Streamed, completions and chat: on the last choice chunk only.
    for (path, body) in [
        ("/v1/completions", completion(serde_json::json!({"stop": [stop], "stream": true}))),
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "stream": true, "logit_bias": {"100": 100}, "stop_token_ids": [100]}),
        ),
    ] {
        let (_, b) = call(&app, "POST", path, Some(body), None).await;
        let chunks: Vec<serde_json::Value> = String::from_utf8(b)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let with: Vec<&serde_json::Value> =
            chunks.iter().filter(|c| c["choices"][0].get("stop_reason").is_some()).collect();
        assert_eq!(with.len(), 1, "{path}: {chunks:?}");
        assert!(!with[0]["choices"][0]["finish_reason"].is_null(), "{path}");
        let want = if path == "/v1/completions" { serde_json::json!(stop) } else { serde_json::json!(100) };
        assert_eq!(with[0]["choices"][0]["stop_reason"], want, "{path}");
    }
}

/// `max_cost_usd` (issue 25): a cap below one step's cost ends every sample on its first token
/// with finish reason length and stop reason "cost" (asked first, before the engine has timed
/// a step: later its prompt alone would be refused, see tests/budgets.rs); a cap far above the
/// run changes nothing; a cap that is not a positive amount is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_cap_stops_generation_and_names_the_cost() {
    let app = app(state("qwen3", roomy(), vec![]));
    let body = |cap: Option<f64>| {
        let mut b = serde_json::json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12,
            "temperature": 0, "n": 2});
        if let Some(c) = cap {
            b["max_cost_usd"] = serde_json::json!(c);
        }
        b
    };
    let post = |b: serde_json::Value| {
        let app = app.clone();
        async move {
            let (s, raw) = call(&app, "POST", "/v1/completions", Some(b), None).await;
            (s, serde_json::from_slice::<serde_json::Value>(&raw).unwrap())
        }
    };
    let (s, capped) = post(body(Some(1e-15))).await;
    assert_eq!(s, StatusCode::OK, "{capped}");
    let (_, free) = post(body(None)).await;
    for c in capped["choices"].as_array().unwrap() {
        assert_eq!(
            (c["finish_reason"].as_str(), c["stop_reason"].as_str()),
            (Some("length"), Some("cost")),
            "{c}"
        );
    }
    assert_eq!(capped["usage"]["completion_tokens"], 2, "one token per sample: {capped}");
    let first = capped["choices"][0]["text"].as_str().unwrap();
    assert!(
        free["choices"][0]["text"].as_str().unwrap().starts_with(first),
        "what was made is the free run's start"
    );
    let (_, roomy_cap) = post(body(Some(1.0))).await;
    assert_eq!(roomy_cap["choices"], free["choices"], "a cap that is never reached changes nothing");
    for bad in [0.0, -1.0] {
        let (s, e) = post(body(Some(bad))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(e["error"]["param"], "max_cost_usd", "{e}");
    }
}
