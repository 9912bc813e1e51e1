//! Several models behind one router: routing by `model`, `/v1/models`, metrics per model, and
//! on-demand loading with least-recently-used unloading under a count or memory limit.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use common::{call, roomy, served, served_as};
use ferrite_server::metrics::Metrics;
use ferrite_server::{app, AppState, Loaded, ModelEntry, ModelPool, PoolLimits};
use serde_json::{json, Value};

/// How many engines a test's loaders have running now, and the most at once.
#[derive(Default)]
struct Census {
    live: AtomicUsize,
    most: AtomicUsize,
    loads: Mutex<Vec<String>>,
}

/// `fixture` served as `name`, loaded (and counted) each time the pool asks.
fn entry(name: &str, fixture: &str, census: &Arc<Census>, bytes: u64) -> ModelEntry {
    let (name_owned, fixture, census) = (name.to_string(), fixture.to_string(), census.clone());
    ModelEntry {
        name: name.to_string(),
        estimated_bytes: None,
        load: Arc::new(move || {
            let s = served_as(&name_owned, &fixture, roomy(), None);
            let live = census.live.fetch_add(1, Ordering::SeqCst) + 1;
            census.most.fetch_max(live, Ordering::SeqCst);
            census.loads.lock().unwrap().push(name_owned.clone());
            let (engine, census) = (s.engine.clone(), census.clone());
            let stop = Box::new(move || {
                engine.shutdown();
                census.live.fetch_sub(1, Ordering::SeqCst);
            });
            Ok(Loaded { served: s, bytes, stop })
        }),
    }
}

fn router(entries: Vec<ModelEntry>, limits: PoolLimits, preload: &[usize]) -> (Router, Arc<ModelPool>) {
    let preloaded = preload.iter().map(|&i| (i, (entries[i].load)().unwrap())).collect();
    let metrics = Arc::new(Metrics::http_only());
    let pool = ModelPool::new(entries, limits, preloaded, metrics.registry()).unwrap();
    (app(AppState::over(pool.clone(), metrics)), pool)
}

async fn complete(app: &Router, model: &str, prompt: &str) -> (StatusCode, Value) {
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let (s, b) = call(app, "POST", "/v1/completions", Some(body), None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// [`complete`] on a task of its own.
fn in_background(
    app: &Router,
    model: &'static str,
    prompt: &'static str,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let app = app.clone();
    tokio::spawn(async move { complete(&app, model, prompt).await })
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("no text in {v}")).to_string()
}

/// What each fixture writes for `prompt` served alone.
async fn alone(fixture: &str, prompt: &str) -> String {
    let one = app(AppState::single(served(fixture, roomy(), None)));
    let (s, v) = complete(&one, "tiny", prompt).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    text(&v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_models_route_by_name_and_are_listed_and_measured_apart() {
    let census = Arc::new(Census::default());
    let entries = vec![entry("a", "llama", &census, 1), entry("b", "qwen3", &census, 1)];
    let (app, _pool) = router(entries, PoolLimits::default(), &[0, 1]);
    let prompt = "Hello there";
    let (want_a, want_b) = (alone("llama", prompt).await, alone("qwen3", prompt).await);
    assert_ne!(
        want_a, want_b,
        "the two fixtures must write different text for the routing check to mean anything"
    );
    let (s, a) = complete(&app, "a", prompt).await;
    assert_eq!((s, text(&a), a["model"].as_str()), (StatusCode::OK, want_a, Some("a")));
    let (s, b) = complete(&app, "b", prompt).await;
    assert_eq!((s, text(&b), b["model"].as_str()), (StatusCode::OK, want_b, Some("b")));

    let (s, body) = call(&app, "GET", "/v1/models", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let list: Value = serde_json::from_slice(&body).unwrap();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["loaded"] == true && m["max_model_len"] == 1024));

    let (s, body) =
        call(&app, "POST", "/v1/completions", Some(json!({"model": "c", "prompt": "x"})), None).await;
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(err["error"]["message"], "The model `c` does not exist; this server serves `a`, `b`");

    let (_, body) = call(&app, "GET", "/metrics", None, None).await;
    let metrics = String::from_utf8(body).unwrap();
    for model in ["a", "b"] {
        let line =
            format!("ferrite:request_success_total{{finished_reason=\"length\",model_name=\"{model}\"}} 1");
        assert!(metrics.contains(&line), "no `{line}` in\n{metrics}");
        assert!(metrics.contains(&format!("ferrite:model_loaded{{model_name=\"{model}\"}} 1")));
    }
    // One HELP and TYPE per metric, however many models report it.
    assert_eq!(metrics.matches("# TYPE ferrite:request_success_total ").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_at_a_time_every_request_is_answered_by_its_model() {
    let census = Arc::new(Census::default());
    let entries = vec![entry("a", "llama", &census, 1), entry("b", "qwen3", &census, 1)];
    let limits = PoolLimits { max_loaded: Some(1), ..PoolLimits::default() };
    let (app, _pool) = router(entries, limits, &[0]);
    let prompts: [&'static str; 4] = ["Once upon", "The cat", "In a far land", "Numbers: 1 2"];
    let mut want = std::collections::HashMap::new();
    for p in prompts {
        want.insert(("a", p), alone("llama", p).await);
        want.insert(("b", p), alone("qwen3", p).await);
    }
    // Both models asked for at once, over and over: each switch unloads the other.
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (i, &p) in prompts.iter().enumerate() {
            let model = if (i + round) % 2 == 0 { "a" } else { "b" };
            let app = app.clone();
            tasks.push(tokio::spawn(async move { (model, p, complete(&app, model, p).await) }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        let (model, p, (s, v)) = t.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{model}: {v}");
        assert_eq!(v["model"], model);
        assert_eq!(text(&v), want[&(model, p)], "{model} on {p:?}");
    }
    assert_eq!(census.most.load(Ordering::SeqCst), 1, "two models were loaded at once");
    let loads = census.loads.lock().unwrap().clone();
    assert!(loads.len() >= 2 && loads.contains(&"b".to_string()), "loads: {loads:?}");

    let (_, body) = call(&app, "GET", "/metrics", None, None).await;
    let metrics = String::from_utf8(body).unwrap();
    let loaded: Vec<&str> = metrics.lines().filter(|l| l.starts_with("ferrite:model_loaded{")).collect();
    assert_eq!(loaded.iter().filter(|l| l.ends_with(" 1")).count(), 1, "{loaded:?}");
    assert!(metrics.contains("ferrite:model_unloads_total{model_name=\"a\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_keeps_its_model_until_its_body_is_done() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let census = Arc::new(Census::default());
    let entries = vec![entry("a", "llama", &census, 1), entry("b", "qwen3", &census, 1)];
    let limits = PoolLimits { max_loaded: Some(1), ..PoolLimits::default() };
    let (app, _pool) = router(entries, limits, &[0]);
    let body = json!({"model": "a", "prompt": "Once", "max_tokens": 50, "stream": true,
        "temperature": 0, "ignore_eos": true});
    let request = axum::http::Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.into_body();
    let first = stream.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    // The handler has returned; its body still holds `a`, so `b` waits.
    let b = in_background(&app, "b", "The cat");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "`b` was loaded while a stream on `a` was still being read");
    let rest = stream.collect().await.unwrap().to_bytes();
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "the stream was cut: {rest}");
    let (s, v) = b.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(census.most.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_that_can_never_fit_is_refused_with_its_numbers() {
    let census = Arc::new(Census::default());
    let gib = 1u64 << 30;
    let mut big = entry("big", "qwen3", &census, 3 * gib);
    big.estimated_bytes = Some(3 * gib);
    // Estimated small, found large once loaded.
    let sneaky = entry("sneaky", "qwen3", &census, 5 * gib / 2);
    let entries = vec![entry("a", "llama", &census, gib / 2), big, sneaky];
    let limits = PoolLimits { max_bytes: Some(2 * gib), ..PoolLimits::default() };
    let (app, _pool) = router(entries, limits, &[0]);

    let (s, v) = complete(&app, "big", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["param"], "model");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("3.00 GiB") && message.contains("2.00 GiB"), "{message}");
    assert!(census.loads.lock().unwrap().iter().all(|m| m != "big"), "it was loaded anyway");

    let (s, v) = complete(&app, "sneaky", "x").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("2.50 GiB") && message.contains("2.00 GiB"), "{message}");
    // Now known: refused at once, without loading again.
    let (s, _) = complete(&app, "sneaky", "x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(census.loads.lock().unwrap().iter().filter(|m| *m == "sneaky").count(), 1);
    // The model that fits still answers.
    let (s, v) = complete(&app, "a", "x").await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_load_answers_its_waiters_and_the_next_request_tries_again() {
    let census = Arc::new(Census::default());
    let tries = Arc::new(AtomicUsize::new(0));
    let good = entry("flaky", "qwen3", &census, 1).load;
    let counted = tries.clone();
    let flaky = ModelEntry {
        name: "flaky".into(),
        estimated_bytes: None,
        load: Arc::new(move || match counted.fetch_add(1, Ordering::SeqCst) {
            0 => Err("no such folder: /nowhere".into()),
            _ => good(),
        }),
    };
    let (app, _pool) = router(vec![entry("a", "llama", &census, 1), flaky], PoolLimits::default(), &[0]);
    let (s, v) = complete(&app, "flaky", "x").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["message"], "model `flaky` failed to load: no such folder: /nowhere");
    let (s, v) = complete(&app, "flaky", "x").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(tries.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_for_a_busy_model_is_bounded_in_time_and_number() {
    let census = Arc::new(Census::default());
    let entries = vec![entry("a", "llama", &census, 1), entry("b", "qwen3", &census, 1)];
    let limits = PoolLimits {
        max_loaded: Some(1),
        load_timeout: Duration::from_millis(300),
        max_waiting: 1,
        ..PoolLimits::default()
    };
    let (app, pool) = router(entries, limits, &[0]);
    // `a` busy (a request holding it) for longer than the timeout.
    let busy = pool.acquire(Some("a")).await.unwrap();
    let first = in_background(&app, "b", "x");
    tokio::time::sleep(Duration::from_millis(30)).await;
    // One waits already: a second is refused at once.
    let (s, v) = complete(&app, "b", "y").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let (s, v) = first.await.unwrap();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("was not ready within 0.3 s"), "{v}");
    // Once `a` is idle, `b` loads in its place.
    drop(busy);
    let (s, v) = complete(&app, "b", "x").await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// `inner`, after `delay` each time the pool asks for it.
fn slow(mut e: ModelEntry, delay: Duration) -> ModelEntry {
    let inner = e.load.clone();
    e.load = Arc::new(move || {
        std::thread::sleep(delay);
        inner()
    });
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_that_panics_is_an_error_and_frees_its_place() {
    let census = Arc::new(Census::default());
    let broken = ModelEntry {
        name: "broken".into(),
        estimated_bytes: None,
        load: Arc::new(|| panic!("weights torn")),
    };
    let entries = vec![entry("a", "llama", &census, 1), broken, entry("b", "qwen3", &census, 1)];
    let limits = PoolLimits { max_loaded: Some(1), ..PoolLimits::default() };
    let (app, _pool) = router(entries, limits, &[0]);
    let (s, v) = complete(&app, "broken", "x").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("it panicked: weights torn"), "{v}");
    // Its place is free again: the others load in turn.
    for model in ["b", "a"] {
        let (s, v) = complete(&app, model, "x").await;
        assert_eq!(s, StatusCode::OK, "{model}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_goes_to_requests_in_the_order_they_came() {
    let census = Arc::new(Census::default());
    let entries = vec![
        entry("a", "llama", &census, 1),
        entry("b", "qwen3", &census, 1),
        entry("c", "qwen2", &census, 1),
    ];
    let limits = PoolLimits { max_loaded: Some(1), ..PoolLimits::default() };
    let (app, pool) = router(entries, limits, &[0]);
    let busy = pool.acquire(Some("a")).await.unwrap();
    let mut waiting = Vec::new();
    for model in ["b", "c"] {
        waiting.push(in_background(&app, model, "x"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(busy);
    for w in waiting {
        let (s, v) = w.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    assert_eq!(*census.loads.lock().unwrap(), ["a", "b", "c"], "room must go to `b`, asked for first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_refused_for_a_full_queue_starts_nothing() {
    let census = Arc::new(Census::default());
    let entries = vec![
        entry("a", "llama", &census, 1),
        slow(entry("b", "qwen3", &census, 1), Duration::from_millis(400)),
        entry("c", "qwen2", &census, 1),
    ];
    let limits = PoolLimits { max_waiting: 1, ..PoolLimits::default() };
    let (app, _pool) = router(entries, limits, &[0]);
    let first = in_background(&app, "b", "x");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, v) = complete(&app, "c", "x").await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert!(!census.loads.lock().unwrap().contains(&"c".to_string()), "a refused request loaded `c`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_waiting_on_a_failed_load_gets_its_error_and_none_retries_it() {
    let tries = Arc::new(AtomicUsize::new(0));
    let counted = tries.clone();
    let failing = ModelEntry {
        name: "failing".into(),
        estimated_bytes: None,
        load: Arc::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            Err("disk gone".into())
        }),
    };
    let census = Arc::new(Census::default());
    let (app, _pool) = router(vec![entry("a", "llama", &census, 1), failing], PoolLimits::default(), &[0]);
    let asks: Vec<_> = (0..3).map(|_| in_background(&app, "failing", "x")).collect();
    for a in asks {
        let (s, v) = a.await.unwrap();
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["error"]["message"], "model `failing` failed to load: disk gone");
    }
    assert_eq!(tries.load(Ordering::SeqCst), 1, "a waiter loaded it again");
}
