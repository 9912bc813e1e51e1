//! `/metrics` after a known workload: counters equal what was served, histogram counts equal
//! request counts, gauges return to idle, device seconds add up, cost = device seconds × price,
//! `promtool check metrics` accepts the exposition, and the Grafana dashboard only names metrics
//! that exist.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use common::{call, roomy, state, PRICE_PER_HOUR};
use ferrite_server::app;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// series (name + labels as exposed) → value.
fn scrape_text(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

async fn scrape(app: &Router) -> (String, BTreeMap<String, f64>) {
    let (status, body) = call(app, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let series = scrape_text(&text);
    (text, series)
}

/// The value of the one series of `name` whose labels contain every `labels` pair.
fn value(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let v = value_if_any(m, name, labels);
    v.unwrap_or_else(|| panic!("no series {name} {labels:?}"))
}

/// Like [`value`], but a series not exposed yet (a label set never used) is `None`.
fn value_if_any(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = m
        .iter()
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k, ""));
            n == name && labels.iter().all(|(l, v)| rest.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .collect();
    assert!(hits.len() <= 1, "{name} {labels:?}: several series {hits:?}");
    hits.first().copied()
}

/// How much a series grew; one that did not exist before counts from 0.
fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    value(after, name, labels) - value_if_any(before, name, labels).unwrap_or(0.0)
}

/// Served totals, from the responses.
#[derive(Default, Debug)]
struct Served {
    requests: usize,
    prompt: f64,
    completion: f64,
    device_seconds: f64,
    by_reason: BTreeMap<String, f64>,
}

impl Served {
    fn add(&mut self, usage: &Value, reasons: &[&str]) {
        self.requests += 1;
        self.prompt += usage["prompt_tokens"].as_f64().unwrap();
        self.completion += usage["completion_tokens"].as_f64().unwrap();
        let device = usage["device_seconds"].as_f64().unwrap();
        assert!(device > 0.0, "{usage}");
        self.device_seconds += device;
        let cost = usage["cost_usd"].as_f64().unwrap();
        assert!((cost - device * PRICE_PER_HOUR / 3600.0).abs() < 1e-15, "cost {cost} for {device} s");
        // One reason per request: the last sample's (all samples agree in this workload).
        *self.by_reason.entry(reasons[0].to_string()).or_default() += 1.0;
    }
}

#[tokio::test]
async fn metrics_account_for_a_known_workload() {
    let app = app(state("llama", roomy(), vec![]));
    let (_, before) = scrape(&app).await;
    let served = serve_known_workload(&app).await;
    let (_, after) = scrape(&app).await;
    check_known_workload(&before, &after, &served);
    abort_mid_stream(&app, &after).await;
}

/// Completions and streamed chats of known lengths, a bad request and an unknown route.
async fn serve_known_workload(app: &Router) -> Served {
    let mut served = Served::default();
    // Completions of known lengths, some with n = 2; JSON answers carry the cost headers.
    for (i, n) in [(3usize, 1usize), (5, 1), (8, 2), (13, 1)] {
        let prompt: Vec<u32> = (1..=i as u32).map(|t| t * 7 + i as u32).collect();
        let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 4 + i, "n": n,
                          "temperature": 0, "ignore_eos": true});
        let request = Request::post("/v1/completions")
            .header("content-type", "application/json")
            .header("x-request-id", format!("known-{i}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(request).await.unwrap();
        assert_eq!(resp.status(), 200);
        let headers = resp.headers().clone();
        assert_eq!(headers["x-request-id"], format!("known-{i}").as_str());
        let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let usage = &v["usage"];
        assert_eq!(usage["completion_tokens"], json!((4 + i) * n));
        let header_cost: f64 = headers["x-ferrite-cost-usd"].to_str().unwrap().parse().unwrap();
        assert!((header_cost - usage["cost_usd"].as_f64().unwrap()).abs() < 1e-9);
        assert!(headers.contains_key("x-ferrite-device-seconds"));
        assert!(headers.contains_key("x-ferrite-energy-joules"));
        served.add(usage, &["length"]);
    }
    // Streamed chat: usage (with cost) arrives in the last chunk.
    for i in 0..2 {
        let body = json!({"model": "tiny", "messages": [{"role": "user", "content": format!("hello {i}")}],
                          "max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": true,
                          "stream_options": {"include_usage": true}});
        let (status, raw) = call(app, "POST", "/v1/chat/completions", Some(body), None).await;
        assert_eq!(status, 200);
        let text = String::from_utf8(raw).unwrap();
        let usage_chunk = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|c| c["usage"].is_object())
            .expect("a usage chunk");
        served.add(&usage_chunk["usage"], &["length"]);
    }
    // A bad request and an unknown route count in the HTTP metrics only.
    let (status, _) = call(app, "POST", "/v1/completions", Some(json!({"model": "tiny"})), None).await;
    assert_eq!(status, 400);
    let (status, _) = call(app, "GET", "/nope", None, None).await;
    assert_eq!(status, 404);

    served
}

/// What the metrics moved by between `before` and `after` is what `served` says was served.
fn check_known_workload(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, served: &Served) {
    let d = |name: &str, labels: &[(&str, &str)]| delta(before, after, name, labels);
    let requests = served.requests as f64;
    assert_eq!(d("ferrite:prompt_tokens_total", &[]), served.prompt);
    assert_eq!(d("ferrite:generation_tokens_total", &[]), served.completion);
    assert_eq!(
        d("ferrite:request_success_total", &[("finished_reason", "length")]),
        served.by_reason["length"]
    );
    assert_eq!(d("ferrite:request_success_total", &[("finished_reason", "stop")]), 0.0);
    assert_eq!(d("ferrite:request_success_total", &[("finished_reason", "abort")]), 0.0);
    for h in [
        "e2e_request_latency_seconds",
        "time_to_first_token_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_inference_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
        "request_params_n",
        "request_params_max_tokens",
        "request_time_per_output_token_seconds",
        "request_cost_usd",
    ] {
        assert_eq!(d(&format!("ferrite:{h}_count"), &[]), requests, "{h}");
    }
    assert_eq!(d("ferrite:request_prompt_tokens_sum", &[]), served.prompt);
    assert_eq!(d("ferrite:request_generation_tokens_sum", &[]), served.completion);
    assert_eq!(d("ferrite:request_params_n_sum", &[]), 7.0);
    // One inter-token gap per generated token after each sample's first.
    let samples = 7.0; // 1 + 1 + 2 + 1 completion samples, 2 chats
    assert_eq!(d("ferrite:inter_token_latency_seconds_count", &[]), served.completion - samples);
    let device_total = d("ferrite:device_seconds_total", &[]);
    assert!(
        (device_total - served.device_seconds).abs() < 1e-9 * served.device_seconds.max(1.0),
        "{device_total}"
    );
    let cost_total = d("ferrite:cost_usd_total", &[]);
    assert!((cost_total - served.device_seconds * PRICE_PER_HOUR / 3600.0).abs() < 1e-12);
    assert!(d("ferrite:iteration_tokens_count", &[]) > 0.0);
    // Idle again.
    assert_eq!(value(after, "ferrite:num_requests_running", &[]), 0.0);
    assert_eq!(value(after, "ferrite:num_requests_waiting", &[]), 0.0);
    assert_eq!(value(after, "ferrite:kv_cache_usage_perc", &[]), 0.0);
    // HTTP, by matched route pattern.
    let http = |route: &str, status: &str| {
        d("ferrite:http_requests_total", &[("method", "POST"), ("route", route), ("status", status)])
    };
    assert_eq!(http("/v1/completions", "200"), 4.0);
    assert_eq!(http("/v1/completions", "400"), 1.0);
    assert_eq!(http("/v1/chat/completions", "200"), 2.0);
    assert_eq!(
        value(after, "ferrite:http_requests_total", &[("route", "unmatched"), ("status", "404")]),
        1.0
    );
    assert!(value(after, "ferrite:cost_per_million_tokens", &[("token_type", "generation")]) > 0.0);
}

/// A client that leaves mid-stream: aborted, counted as such, its blocks freed.
async fn abort_mid_stream(app: &Router, after: &BTreeMap<String, f64>) {
    let body = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true,
                      "stream": true});
    let request = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(request).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    let (_, end) = scrape(app).await;
    assert_eq!(delta(after, &end, "ferrite:request_success_total", &[("finished_reason", "abort")]), 1.0);
    assert_eq!(delta(after, &end, "ferrite:e2e_request_latency_seconds_count", &[]), 1.0);
    assert_eq!(value(&end, "ferrite:num_requests_running", &[]), 0.0);
    assert_eq!(value(&end, "ferrite:kv_cache_usage_perc", &[]), 0.0);
    assert!(delta(after, &end, "ferrite:device_seconds_total", &[]) > 0.0);
}

/// Every metric name the exposition declares.
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let app = app(state("llama", roomy(), vec![]));
    let body = json!({"model": "tiny", "prompt": "hi", "max_tokens": 3});
    assert_eq!(call(&app, "POST", "/v1/completions", Some(body), None).await.0, 200);
    let (text, _) = scrape(&app).await;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(std::env::var_os("CI").is_none(), "promtool is not installed; .ci/run installs it");
        writeln!(std::io::stderr(), "SKIP promtool check: promtool is not on PATH (apt install prometheus)")
            .unwrap();
        return;
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The `ferrite:` prefix mirrors vLLM's `vllm:` (the point: dashboards carry over), and
    // promtool's lint reserves colons for recording rules. That one lint is expected on every
    // family; anything else (a parse error, a counter without `_total`, a histogram with it,
    // a missing HELP) fails.
    let colon = "metric names should not contain ':'";
    let problems: Vec<&str> =
        report.lines().filter(|l| !l.trim().is_empty() && !l.ends_with(colon)).collect();
    assert!(problems.is_empty(), "promtool check metrics:\n{}\n\n{text}", problems.join("\n"));
    let families = exposed_names(&text).len();
    assert_eq!(report.lines().filter(|l| l.ends_with(colon)).count(), families, "{report}");
    assert!(out.status.success() || out.status.code() == Some(3), "promtool exit {:?}: {report}", out.status);
}

#[tokio::test]
async fn the_dashboard_names_only_exposed_metrics() {
    let app = app(state("llama", roomy(), vec![]));
    // Touch the labelled series so every family shows.
    let body = json!({"model": "tiny", "prompt": "hi", "max_tokens": 3});
    assert_eq!(call(&app, "POST", "/v1/completions", Some(body), None).await.0, 200);
    let (text, _) = scrape(&app).await;
    let names = exposed_names(&text);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/ferrite.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                        _ => collect(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        for (i, _) in e.match_indices("ferrite:") {
            let name: String =
                e[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
            used.insert(name);
        }
    }
    assert!(used.len() >= 15, "{used:?}");
    for name in &used {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| names.contains(*f)))
            .unwrap_or(name);
        assert!(names.contains(family), "the dashboard uses {name}, which /metrics does not expose");
    }
}
