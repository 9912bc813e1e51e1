//! Inputs from a careless or hostile client (issue 18): each is refused with an error that
//! names what was wrong, costs bounded work, and leaves the server serving.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use common::{call, roomy, state};
use ferrite_server::app;
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

fn router() -> Router {
    app(state("llama", roomy(), vec![]))
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn raw_post(path: &str, body: &str) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    send(app, raw_post(path, &body.to_string())).await
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn bytes_after_the_json_value_are_refused() {
    let app = router();
    let valid = r#"{"model": "tiny", "prompt": "hi", "max_tokens": 2}"#;
    for body in [format!("{valid} }}}} garbage"), format!(r#"{valid}{{"max_tokens": -1}}"#)] {
        let (status, v) = send(&app, raw_post("/v1/completions", &body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("after the JSON value"), "{v}");
    }
    // Trailing whitespace is still one value.
    let (status, _) = send(&app, raw_post("/v1/completions", &format!("{valid} \n"))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn fields_ferrite_does_not_implement_are_refused_by_name() {
    let app = router();
    let chat_fields = [
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!("auto")),
        ("continue_final_message", json!(true)),
    ];
    for (field, value) in chat_fields {
        let (status, v) = post(&app, "/v1/chat/completions", chat(json!({field: value}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {v}");
        assert_eq!(v["error"]["param"], field, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("not supported"), "{v}");
    }

    // Tool fields that ask for nothing, and template variables the template does not use.
    let asks_nothing = json!({"tool_choice": "none", "parallel_tool_calls": false,
        "chat_template_kwargs": {"enable_thinking": false}});
    let (status, v) = post(&app, "/v1/chat/completions", chat(asks_nothing)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // `null` is as good as absent (some clients send every field).
    let (status, v) =
        post(&app, "/v1/chat/completions", chat(json!({"tool_choice": null, "guided_json": null}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // min_tokens above max_tokens can never be honoured.
    let (status, v) = post(&app, "/v1/chat/completions", chat(json!({"min_tokens": 5}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "min_tokens", "{v}");
}

#[tokio::test]
async fn stop_strings_are_bounded_in_bytes() {
    let app = router();
    let long = "x".repeat(3000);
    let (status, v) = post(&app, "/v1/chat/completions", chat(json!({"stop": [long, long]}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "stop");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("6000") && message.contains("4096"), "{message}");
    // At the limit is fine.
    let (status, v) = post(&app, "/v1/chat/completions", chat(json!({"stop": ["y".repeat(4096)]}))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn text_too_long_for_the_context_is_refused_before_tokenizing() {
    let app = router();
    let huge = "Once upon a time ".repeat(200_000); // 3.4 MB; max_model_len is 1024 tokens
    for (path, body, param) in [
        ("/v1/completions", json!({"model": "tiny", "prompt": huge, "max_tokens": 1}), "prompt"),
        ("/v1/completions", json!({"model": "tiny", "prompt": ["hi", huge], "max_tokens": 1}), "prompt"),
        ("/v1/chat/completions", chat(json!({"messages": [{"role": "user", "content": huge}]})), "messages"),
        ("/tokenize", json!({"prompt": huge}), "prompt"),
    ] {
        let (status, v) = post(&app, path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {}", v["error"]);
        assert_eq!(v["error"]["param"], param, "{path}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("bytes of text") && message.contains("max_model_len (1024)"), "{message}");
    }
    let (status, _) =
        post(&app, "/v1/completions", json!({"model": "tiny", "prompt": "hi", "max_tokens": 1})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn made_up_methods_do_not_become_metric_labels() {
    let app = router();
    for i in 0..20 {
        let req =
            Request::builder().method(format!("BREW{i}").as_str()).uri("/v1/completions").body(Body::empty());
        let resp = app.clone().oneshot(req.unwrap()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
    let (_, body) = call(&app, "GET", "/metrics", None, None).await;
    let text = String::from_utf8(body).unwrap();
    assert!(!text.contains("BREW"), "a client-made method is a label");
    let line = text
        .lines()
        .find(|l| l.starts_with("ferrite:http_requests_total{") && l.contains(r#"method="other""#))
        .expect("unknown methods counted as `other`");
    assert!(line.ends_with(" 20"), "{line}");
}

#[tokio::test]
async fn request_ids_that_could_forge_a_log_line_are_replaced() {
    let app = router();
    let ask = |id: &str| Request::get("/health").header("x-request-id", id).body(Body::empty()).unwrap();
    let resp = app.clone().oneshot(ask("trace-42.a:b_c")).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-42.a:b_c");
    for forged in [r#"forged} status=200 user=admin x=""#, "a b", &"x".repeat(129)] {
        let resp = app.clone().oneshot(ask(forged)).await.unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_ne!(id, forged);
        assert!(id.starts_with("req-") && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{id}");
    }
}

/// A body that sends one byte and then nothing, forever.
fn endless_body() -> Body {
    let chunks =
        futures::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{")) })
            .chain(futures::stream::pending());
    Body::from_stream(chunks)
}

#[tokio::test]
async fn the_key_is_checked_before_the_body_is_read() {
    let mut s = state("llama", roomy(), vec!["sekret".into()]);
    s.body_read_timeout = Duration::from_secs(3600);
    let app = app(s);
    // Reading the body first would wait for the hour-long body timeout: the guard fails fast.
    let req =
        Request::post("/v1/completions").header("content-type", "application/json").body(endless_body());
    let resp = tokio::time::timeout(Duration::from_secs(60), app.clone().oneshot(req.unwrap()))
        .await
        .expect("answered without reading the body")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // The scheme is case-insensitive (RFC 7235); a wrong key is still refused.
    for (header, want) in [
        ("bearer sekret", StatusCode::OK),
        ("BEARER sekret", StatusCode::OK),
        ("Bearer  sekret ", StatusCode::OK),
        ("Bearer wrong", StatusCode::UNAUTHORIZED),
        ("Basic sekret", StatusCode::UNAUTHORIZED),
        ("sekret", StatusCode::UNAUTHORIZED),
    ] {
        let req = Request::get("/v1/models").header("authorization", header).body(Body::empty()).unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), want, "{header}");
    }
    // Probes stay open.
    let (status, _) = call(&app, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

/// The request limits are the operator's (flags): past each, a 400 naming the field and the
/// limit; at it, an answer.
#[tokio::test]
async fn request_limits_are_the_operators_and_each_names_its_value() {
    let limits = ferrite_server::validate::RequestLimits {
        max_n: 2,
        max_stop_strings: 2,
        max_stop_bytes: 8,
        max_logit_bias: 2,
        max_grammar_bytes: 10,
    };
    let app = app(ferrite_server::AppState { request_limits: limits, ..state("llama", roomy(), vec![]) });
    let bias = |k: usize| Value::Object((0..k).map(|i| (i.to_string(), json!(1))).collect());
    let refused = [
        (json!({"n": 3}), "n", "between 1 and 2, got 3"),
        (json!({"stop": ["a", "b", "c"]}), "stop", "at most 2 stop strings are allowed, got 3"),
        (json!({"stop": ["abcde", "fghij"]}), "stop", "10 bytes together; at most 8"),
        (json!({"logit_bias": bias(3)}), "logit_bias", "at most 2 entries, got 3"),
        (json!({"guided_regex": "[a-z]{1,99}"}), "guided_regex", "11 bytes of grammar; at most 10"),
    ];
    for (extra, param, says) in refused {
        let (status, v) = post(&app, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{extra}: {v}");
    }
    let at_the_limit =
        json!({"n": 2, "stop": ["abcd", "efgh"], "logit_bias": bias(2), "guided_regex": "[a-z]{1,9}"});
    let (status, v) = post(&app, "/v1/chat/completions", chat(at_the_limit)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
}
