//! Fuzzing everything a request body reaches before (and through) the engine: JSON parsing into
//! the API's types, validation, chat-template rendering, tokenization, and the engine itself
//! for the bodies that get through. Bodies are drawn three ways: objects of the API's field
//! names holding arbitrary JSON (wrong types, extremes, unicode, nesting), valid bodies with
//! their bytes mutated, and raw bytes.
//!
//! Every answer must come within [`DEADLINE`], be no 5xx, and be JSON (an OpenAI error with a
//! message for a 4xx; a stream ends with `[DONE]`); afterwards the engine holds no request and
//! no KV block. CI runs [`DEFAULT_CASES`] per endpoint; `FERRITE_FUZZ_CASES=N` runs more (see
//! BENCHMARKS.md for the long runs).

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::{roomy, state};
use ferrite_server::app;
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

/// Cases per endpoint in a plain `cargo test`.
const DEFAULT_CASES: u32 = 300;
/// The longest any one answer may take (a 1 MB body included).
const DEADLINE: Duration = Duration::from_secs(2);

const ENDPOINTS: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];

const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "logprobs",
    "top_logprobs",
    "echo",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "prompt_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "user",
    "suffix",
    "best_of",
    "add_generation_prompt",
    "add_special_tokens",
    "tokens",
    "role",
    "content",
    "name",
];

/// Any JSON value: extremes, odd strings, nesting.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0i64), Just(1), Just(-1), Just(2), Just(16), Just(1024), Just(i64::MAX)]
            .prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
        prop_oneof![
            Just("tiny"),
            Just(""),
            Just("<|im_start|>"),
            Just("{{ raise_exception('x') }}"),
            Just("{% for x in range(99999999) %}"),
            Just("\u{0}\u{feff}\u{10ffff}"),
            Just("user"),
            Just("assistant"),
            Just("system"),
            Just("text"),
            Just("json_object"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// A plausible body: some of the API's fields, each holding anything; often a valid core.
fn structured() -> impl Strategy<Value = Vec<u8>> {
    let fields = prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..8);
    (fields, any::<u8>()).prop_map(|(fields, core)| {
        let mut body = Map::new();
        match core % 3 {
            0 => {
                body.insert("model".into(), json!("tiny"));
                body.insert("messages".into(), json!([{"role": "user", "content": "hi"}]));
            }
            1 => {
                body.insert("model".into(), json!("tiny"));
                body.insert("prompt".into(), json!("Once upon"));
            }
            _ => {}
        }
        body.insert("max_tokens".into(), json!(4));
        for (k, v) in fields {
            body.insert(k.to_string(), v);
        }
        serde_json::to_vec(&Value::Object(body)).unwrap()
    })
}

/// A valid body with bytes flipped, inserted or cut.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        Just(
            r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"n":2,"logprobs":true,"top_logprobs":2}"#
        ),
        Just(r#"{"model":"tiny","prompt":["a","b"],"max_tokens":3,"echo":true,"logprobs":1,"stream":true}"#),
        Just(r#"{"model":"tiny","prompt":[1,2,3],"max_tokens":2,"stop":["x","y"],"seed":7}"#),
        Just(r#"{"model":"tiny","prompt":"hi","tokens":[1,2,3]}"#),
    ];
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6);
    (valid, edits).prop_map(|(valid, edits)| {
        let mut bytes = valid.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => {
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        bytes
    })
}

/// A megabyte of prompt: refused (or answered) quickly, never tokenized at length.
fn huge() -> impl Strategy<Value = Vec<u8>> {
    (prop::sample::select(vec!["a", "hello ", "<|im_start|>", "\u{1F600}"]), any::<bool>()).prop_map(
        |(unit, chat)| {
            let text = unit.repeat((1 << 20) / unit.len());
            let body = if chat {
                json!({"model": "tiny", "messages": [{"role": "user", "content": text}]})
            } else {
                json!({"model": "tiny", "prompt": text})
            };
            serde_json::to_vec(&body).unwrap()
        },
    )
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => structured(),
        3 => mutated(),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => huge(),
    ]
}

/// One body to one endpoint: the status and the whole answer, or a failure.
async fn check(app: &Router, path: &str, body: Vec<u8>, seen: &Seen) -> Result<(), TestCaseError> {
    let req = Request::post(path).header("content-type", "application/json").body(Body::from(body)).unwrap();
    let answer = async {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.map(|b| b.to_bytes()))
    };
    let started = Instant::now();
    let (status, bytes) = tokio::time::timeout(DEADLINE, answer)
        .await
        .map_err(|_| TestCaseError::fail(format!("no answer within {DEADLINE:?}")))?;
    let bytes = bytes.map_err(|e| TestCaseError::fail(format!("the body broke off: {e}")))?;
    let text = String::from_utf8_lossy(&bytes);
    seen.lock().unwrap().entry(status.as_u16()).and_modify(|n| *n += 1).or_insert(1);
    prop_assert!(!status.is_server_error(), "{status} after {:?}: {text}", started.elapsed());
    if text.starts_with("data: ") || text.starts_with(':') {
        prop_assert!(text.trim_end().ends_with("data: [DONE]"), "a stream without [DONE]: {text}");
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| TestCaseError::fail(format!("{status}: not JSON ({e}): {text}")))?;
    if status != StatusCode::OK {
        let message = v["error"]["message"].as_str().unwrap_or_default();
        prop_assert!(!message.is_empty(), "{status} without an error message: {v}");
    }
    Ok(())
}

/// How many answers of each status: that the fuzzer reaches the engine (200s), not only the
/// parser.
type Seen = std::sync::Mutex<std::collections::BTreeMap<u16, u64>>;

fn cases() -> u32 {
    std::env::var("FERRITE_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_CASES)
}

#[test]
fn no_body_panics_hangs_or_gets_a_5xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let state = state("qwen3", roomy(), vec![]);
    let engine = state.models.loaded()[0].engine.clone();
    let app = app(state);
    let started = Instant::now();
    let seen = Seen::default();
    for path in ENDPOINTS {
        let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
        let mut runner = TestRunner::new(config);
        let _guard = runtime.enter();
        runner
            .run(&body(), |body| runtime.block_on(check(&app, path, body, &seen)))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let stats = engine.stats();
    assert_eq!((stats.num_running, stats.num_waiting, stats.num_used_blocks), (0, 0, 0), "{stats:?}");
    let executions = u64::from(cases()) * ENDPOINTS.len() as u64;
    let seen = seen.into_inner().unwrap();
    println!("fuzz: {executions} bodies in {:.1} s; statuses {seen:?}", started.elapsed().as_secs_f64());
    assert!(
        seen.get(&200).is_some_and(|&n| n > u64::from(cases()) / 20),
        "too few bodies got through: {seen:?}"
    );
}
