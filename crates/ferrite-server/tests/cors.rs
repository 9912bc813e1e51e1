//! Cross-origin requests as the Fetch standard has browsers make them, through the router:
//! the preflight (`OPTIONS` with `Access-Control-Request-*`, never carrying the API key) and
//! the request itself, under `--allowed-origins` lists, `*`, credentials, and the default
//! (no cross-origin access at all).

mod common;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use common::*;
use ferrite_server::cors::CorsPolicy;
use ferrite_server::{app_with_cors, DEFAULT_MAX_BODY_BYTES};
use serde_json::json;
use tower::ServiceExt;

const PAGE: &str = "https://chat.example";
const KEY: &str = "sk-cors";

fn app(policy: CorsPolicy) -> Router {
    let state = state("qwen3", roomy(), vec![KEY.into()]);
    app_with_cors(state, DEFAULT_MAX_BODY_BYTES, policy.layer().unwrap())
}

fn origins(list: &[&str]) -> CorsPolicy {
    CorsPolicy { allowed_origins: list.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// What a browser sends before a JSON POST with a bearer key from `origin`.
async fn preflight(app: &Router, origin: &str) -> (StatusCode, HeaderMap) {
    let req = Request::builder()
        .method("OPTIONS")
        .uri("/v1/chat/completions")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization,content-type")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    (resp.status(), resp.headers().clone())
}

/// The request itself, with its key, from `origin`.
async fn post(app: &Router, origin: &str) -> (StatusCode, HeaderMap) {
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("origin", origin)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    (resp.status(), resp.headers().clone())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

/// The list of a comma-separated header, lower-cased.
fn listed(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .flat_map(|v| {
            v.to_str().unwrap().split(',').map(|s| s.trim().to_ascii_lowercase()).collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listed_origin_passes_the_preflight_without_a_key_and_reads_the_answer() {
    let app = app(origins(&["http://localhost:3000", PAGE]));
    let (status, h) = preflight(&app, PAGE).await;
    assert!(status.is_success(), "preflight: {status}");
    assert_eq!(header(&h, "access-control-allow-origin"), Some(PAGE));
    assert!(listed(&h, "access-control-allow-methods").contains(&"post".to_string()), "{h:?}");
    // `Authorization` must be named: a `*` would not cover it.
    let allowed = listed(&h, "access-control-allow-headers");
    assert!(allowed.contains(&"authorization".into()) && allowed.contains(&"content-type".into()), "{h:?}");
    assert!(listed(&h, "vary").contains(&"origin".into()), "a per-origin answer must vary by origin: {h:?}");
    assert_eq!(header(&h, "access-control-max-age"), Some("600"));
    assert_eq!(header(&h, "access-control-allow-credentials"), None);

    let (status, h) = post(&app, PAGE).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&h, "access-control-allow-origin"), Some(PAGE));
    assert!(listed(&h, "vary").contains(&"origin".into()), "{h:?}");
    // The key is still required on the request itself.
    let (status, _) = call(&app, "POST", "/v1/chat/completions", Some(json!({})), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_not_listed_gets_no_allowance() {
    let app = app(origins(&[PAGE]));
    let (_, h) = preflight(&app, "https://evil.example").await;
    assert_eq!(header(&h, "access-control-allow-origin"), None, "{h:?}");
    let (status, h) = post(&app, "https://evil.example").await;
    // The server answers (CORS is the browser's check), without letting the page read it.
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&h, "access-control-allow-origin"), None, "{h:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn any_origin_is_a_star_but_credentials_echo_the_origin() {
    let (_, h) = preflight(&app(origins(&["*"])), PAGE).await;
    assert_eq!(header(&h, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&h, "access-control-allow-credentials"), None);

    let with_credentials = CorsPolicy { allow_credentials: true, ..origins(&["*"]) };
    let app = app(with_credentials);
    let (_, h) = preflight(&app, PAGE).await;
    // No `*` counts on a credentialed request: the origin, methods and headers are echoed.
    assert_eq!(header(&h, "access-control-allow-origin"), Some(PAGE));
    assert_eq!(header(&h, "access-control-allow-credentials"), Some("true"));
    assert!(!listed(&h, "access-control-allow-methods").contains(&"*".into()), "{h:?}");
    assert!(listed(&h, "access-control-allow-headers").contains(&"authorization".into()), "{h:?}");
    let (_, h) = post(&app, PAGE).await;
    assert_eq!(header(&h, "access-control-allow-origin"), Some(PAGE));
    assert_eq!(header(&h, "access-control-allow-credentials"), Some("true"));
}

#[tokio::test(flavor = "multi_thread")]
async fn restricted_methods_and_headers_are_what_the_preflight_lists() {
    let policy = CorsPolicy {
        allowed_methods: vec!["get".into(), "POST".into()],
        allowed_headers: vec!["content-type".into(), "authorization".into(), "x-request-id".into()],
        ..origins(&[PAGE])
    };
    let (_, h) = preflight(&app(policy), PAGE).await;
    let mut methods = listed(&h, "access-control-allow-methods");
    methods.sort();
    assert_eq!(methods, vec!["get", "post"]);
    let mut headers = listed(&h, "access-control-allow-headers");
    headers.sort();
    assert_eq!(headers, vec!["authorization", "content-type", "x-request-id"]);
}

/// The default: no CORS headers, and an `OPTIONS` is a method the routes do not take.
#[tokio::test(flavor = "multi_thread")]
async fn without_allowed_origins_there_is_no_cross_origin_access() {
    let app = app(CorsPolicy::default());
    let (status, h) = preflight(&app, PAGE).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&h, "access-control-allow-origin"), None);
    let (status, h) = post(&app, PAGE).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&h, "access-control-allow-origin"), None);
}
