//! Budgets over HTTP (issue 25): a deadline stops a completion with its text, streamed or not,
//! from the body or a gateway's header; a first-token budget the engine predicts it cannot meet
//! is a 429 at once, with the estimate and a `Retry-After`; a prompt that alone passes its cost
//! cap is a 400 naming the estimate; malformed budgets name their field or header; and
//! `/metrics` counts each outcome.

mod common;

use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use common::{call, roomy, state};
use ferrite_server::app;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// POSTs `body` to `path` with extra `headers`; the status, response headers and body.
async fn post(
    app: &Router,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut req = Request::builder().method("POST").uri(path).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app.clone().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let (status, head) = (resp.status(), resp.headers().clone());
    (status, head, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}

/// Extra request headers, `(name, value)`.
type Headers<'a> = Vec<(&'a str, &'a str)>;

fn json_of(raw: &[u8]) -> Value {
    serde_json::from_slice(raw).unwrap_or(Value::Null)
}

fn completion(max_tokens: usize, extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The text of an SSE completion stream, its last choice chunk, and whether it ended properly.
fn streamed(raw: &[u8]) -> (String, Value, Option<Value>) {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "the stream ends with [DONE]");
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let mut all = String::new();
    let mut last = Value::Null;
    let mut usage = None;
    for c in chunks {
        if let Some(choice) = c["choices"].as_array().and_then(|a| a.first()) {
            all.push_str(choice["text"].as_str().unwrap_or(""));
            last = choice.clone();
        }
        if !c["usage"].is_null() {
            usage = Some(c["usage"].clone());
        }
    }
    (all, last, usage)
}

async fn metric(app: &Router, kind: &str, outcome: &str) -> u64 {
    let (_, body) = call(app, "GET", "/metrics", None, None).await;
    let text = String::from_utf8(body).unwrap();
    let series = format!("kind=\"{kind}\",model_name=\"tiny\",outcome=\"{outcome}\"}}");
    let line = text
        .lines()
        .find(|l| l.starts_with("ferrite:request_budget_outcome_total{") && l.contains(&series))
        .unwrap_or_else(|| panic!("no series {series} in /metrics"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A deadline a third of the way through a long completion stops it there, with finish reason
/// length and stop reason "deadline", its text the start of the unbudgeted one; the same from
/// the gateway's header on a stream, which ends with its usage and [DONE].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_stops_a_completion_with_its_text() {
    let app = app(state("qwen3", roomy(), vec![]));
    let started = Instant::now();
    let (s, _, raw) = post(&app, "/v1/completions", &completion(900, json!({})), &[]).await;
    let whole_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(s, StatusCode::OK);
    let free = json_of(&raw);
    let free_text = free["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(free["usage"]["completion_tokens"], 900);

    let body = completion(900, json!({"deadline_ms": whole_ms / 3.0}));
    let (s, _, raw) = post(&app, "/v1/completions", &body, &[]).await;
    let cut = json_of(&raw);
    assert_eq!(s, StatusCode::OK, "{cut}");
    let choice = &cut["choices"][0];
    assert_eq!(
        (choice["finish_reason"].as_str(), choice["stop_reason"].as_str()),
        (Some("length"), Some("deadline"))
    );
    assert!(cut["usage"]["completion_tokens"].as_u64().unwrap() < 900, "the deadline cut nothing");
    assert!(free_text.starts_with(choice["text"].as_str().unwrap()), "a deadline changed the text");

    let body = completion(900, json!({"stream": true, "stream_options": {"include_usage": true}}));
    let deadline = format!("{}", whole_ms / 3.0);
    let (s, _, raw) = post(&app, "/v1/completions", &body, &[("x-ferrite-deadline-ms", &deadline)]).await;
    assert_eq!(s, StatusCode::OK);
    let (text, last, usage) = streamed(&raw);
    assert_eq!(
        (last["finish_reason"].as_str(), last["stop_reason"].as_str()),
        (Some("length"), Some("deadline"))
    );
    assert!(free_text.starts_with(&text), "a deadline changed the streamed text");
    let usage = usage.expect("a usage chunk");
    assert!(usage["completion_tokens"].as_u64().unwrap() < 900);
    assert_eq!(metric(&app, "deadline", "cut").await, 2);
}

/// A first-token budget of a microsecond: once the engine has timed a few steps it is refused
/// at once, from the body or the header, with a 429 naming the field, the estimate and the
/// budget, and a `Retry-After`; a roomy one is served as if it were not there, its answer
/// carrying the prediction it was admitted on; `/metrics` counts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_first_token_budget_is_a_429_with_the_estimate() {
    let app = app(state("qwen3", roomy(), vec![]));
    let (_, _, free) = post(&app, "/v1/completions", &completion(8, json!({})), &[]).await;
    let free = json_of(&free);
    let tiny = json!({"ttft_deadline_ms": 0.001});
    for (body, headers) in [
        (completion(4, tiny), vec![]),
        (completion(4, json!({})), vec![("x-ferrite-ttft-deadline-ms", "0.001")]),
    ] {
        let (s, head, raw) = post(&app, "/v1/completions", &body, &headers).await;
        let e = json_of(&raw);
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{e}");
        assert_eq!(e["error"]["param"], "ttft_deadline_ms", "{e}");
        assert_eq!(e["error"]["code"], "deadline_infeasible", "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains("predicted") && message.contains("0.001 ms"), "{message}");
        let retry: u64 = head["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1);
    }
    // The Responses endpoint takes the same budgets, from its body or a header.
    let input = json!({"model": "tiny", "input": "Once upon a time", "max_output_tokens": 4});
    let (s, _, raw) = post(&app, "/v1/responses", &input, &[("x-ferrite-ttft-deadline-ms", "0.001")]).await;
    assert_eq!(
        (s, json_of(&raw)["error"]["param"].clone()),
        (StatusCode::TOO_MANY_REQUESTS, json!("ttft_deadline_ms"))
    );
    let mut with_body = input.clone();
    with_body["ttft_deadline_ms"] = json!(0.001);
    let (s, _, _) = post(&app, "/v1/responses", &with_body, &[]).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(metric(&app, "ttft_deadline", "rejected").await, 4);

    let roomy = completion(8, json!({"ttft_deadline_ms": 60_000, "deadline_ms": 600_000}));
    let (s, head, raw) = post(&app, "/v1/completions", &roomy, &[]).await;
    let met = json_of(&raw);
    assert_eq!(s, StatusCode::OK, "{met}");
    let estimate: f64 = head["x-ferrite-ttft-estimate-ms"].to_str().unwrap().parse().unwrap();
    assert!(estimate > 0.0 && estimate < 60_000.0, "the prediction it was admitted on: {estimate}");
    assert_eq!(met["choices"][0]["text"], free["choices"][0]["text"], "a budget changed the text");
    assert!(met["choices"][0]["stop_reason"].is_null(), "{met}");
    assert_eq!(metric(&app, "ttft_deadline", "met").await, 1);
    assert_eq!(metric(&app, "deadline", "met").await, 1);
}

/// Once the engine knows what a prompt token costs, a cap below the prompt's own cost is a 400
/// that names the estimate; the header's cap counts as the body's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_alone_passes_its_cost_cap_is_refused() {
    let app = app(state("qwen3", roomy(), vec![]));
    post(&app, "/v1/completions", &completion(8, json!({})), &[]).await;
    for (body, headers) in [
        (completion(4, json!({"max_cost_usd": 1e-15})), vec![]),
        (completion(4, json!({})), vec![("x-ferrite-max-cost-usd", "1e-15")]),
    ] {
        let (s, _, raw) = post(&app, "/v1/completions", &body, &headers).await;
        let e = json_of(&raw);
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(e["error"]["param"], "max_cost_usd", "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains("prompt alone") && message.contains("estimated to cost"), "{message}");
    }
    assert_eq!(metric(&app, "cost", "rejected").await, 2);
}

/// Budgets that are not a positive number of milliseconds (or dollars) are refused by name,
/// in the body and in a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_budgets_name_their_field() {
    let app = app(state("qwen3", roomy(), vec![]));
    let cases: [(Value, Headers, &str); 5] = [
        (completion(4, json!({"deadline_ms": 0})), vec![], "deadline_ms"),
        (completion(4, json!({"ttft_deadline_ms": -5})), vec![], "ttft_deadline_ms"),
        (completion(4, json!({})), vec![("x-ferrite-deadline-ms", "soon")], "x-ferrite-deadline-ms"),
        (
            completion(4, json!({})),
            vec![("x-ferrite-ttft-deadline-ms", "1e12")],
            "x-ferrite-ttft-deadline-ms",
        ),
        (completion(4, json!({})), vec![("x-ferrite-max-cost-usd", "0")], "x-ferrite-max-cost-usd"),
    ];
    for (body, headers, param) in cases {
        let (s, _, raw) = post(&app, "/v1/completions", &body, &headers).await;
        let e = json_of(&raw);
        assert_eq!(s, StatusCode::BAD_REQUEST, "{param}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    // The chat endpoint reads them the same way.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "deadline_ms": -1});
    let (s, _, raw) = post(&app, "/v1/chat/completions", &chat, &[]).await;
    assert_eq!((s, json_of(&raw)["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("deadline_ms")));
}

/// A key's budgets (`--api-keys-file`) apply to its requests that set none: an impossible
/// first-token budget on one key refuses its requests, unless the request gives its own;
/// another key is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_budgets_apply_to_its_requests_that_set_none() {
    let keys = vec!["sk-agent".to_string(), "sk-free".to_string()];
    let mut state = state("qwen3", roomy(), keys);
    let agent =
        ferrite_server::budgets::BudgetDefaults { ttft_deadline_ms: Some(0.001), ..Default::default() };
    state.key_budgets = std::sync::Arc::new([("sk-agent".to_string(), agent)].into_iter().collect());
    let app = app(state);
    let bearer = |k: &str| format!("Bearer {k}");
    let (s, _, _) =
        post(&app, "/v1/completions", &completion(8, json!({})), &[("authorization", &bearer("sk-free"))])
            .await;
    assert_eq!(s, StatusCode::OK);
    let cases = [
        ("sk-agent", completion(4, json!({})), StatusCode::TOO_MANY_REQUESTS),
        ("sk-agent", completion(4, json!({"ttft_deadline_ms": 60_000})), StatusCode::OK),
        ("sk-free", completion(4, json!({})), StatusCode::OK),
    ];
    for (key, body, want) in cases {
        let (s, _, raw) = post(&app, "/v1/completions", &body, &[("authorization", &bearer(key))]).await;
        let answer = json_of(&raw);
        assert_eq!(s, want, "{key} {body}: {answer}");
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer["error"]["param"], "ttft_deadline_ms", "{answer}");
        }
    }
    // The chat endpoint reads the key's budgets too.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (s, _, _) =
        post(&app, "/v1/chat/completions", &chat, &[("authorization", &bearer("sk-agent"))]).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}
