//! Shared by the server's tests: an engine on a fixture model behind the router, and one call.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use ferrite_engine::{
    CacheConfig, DeviceChoice, EngineBuilder, EngineConfig, KvCacheSize, MetricsSpec, ModelSpec,
    SchedulerConfig,
};
use ferrite_server::{AppState, Served};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// Fixture `name` copied into a temporary folder, with added tokens respelled: each
/// `(id, text, special)` gives token `id` the spelling `text` (in the vocabulary too).
pub fn respelled_fixture(name: &str, tokens: &[(u32, &str, bool)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("tokenizer.json");
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for &(id, text, special) in tokens {
        let added = tok["added_tokens"].as_array_mut().unwrap().iter_mut().find(|t| t["id"] == id).unwrap();
        let old = added["content"].as_str().unwrap().to_string();
        added["content"] = serde_json::json!(text);
        added["special"] = serde_json::json!(special);
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        vocab.remove(&old);
        vocab.insert(text.to_string(), serde_json::json!(id));
    }
    std::fs::write(&path, tok.to_string()).unwrap();
    dir
}

/// Room for every test request at once.
pub fn roomy() -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig { max_num_batched_tokens: 512, max_num_seqs: 32, ..Default::default() },
        cache: CacheConfig { num_blocks: 256, ..Default::default() },
        max_model_len: 1024,
        max_waiting_requests: 64,
        ..EngineConfig::default()
    }
}

/// The device price the test engines report costs at, $/hour.
pub const PRICE_PER_HOUR: f64 = 3.6;

/// The fixture `name` loaded behind a running engine with metrics, served as model "tiny".
pub fn state(name: &str, config: EngineConfig, api_keys: Vec<String>) -> AppState {
    state_with_template(name, config, api_keys, None)
}

/// As [`state`], with `chat_template` replacing the fixture's.
pub fn state_with_template(
    name: &str,
    config: EngineConfig,
    api_keys: Vec<String>,
    chat_template: Option<String>,
) -> AppState {
    AppState { api_keys: Arc::new(api_keys), ..AppState::single(served(name, config, chat_template)) }
}

/// The fixture `name` loaded behind a running engine with metrics, as model "tiny".
pub fn served(name: &str, config: EngineConfig, chat_template: Option<String>) -> Served {
    served_as("tiny", name, config, chat_template)
}

/// The fixture `name` loaded behind a running engine with metrics, as model `model`.
pub fn served_as(
    model_name: &str,
    name: &str,
    config: EngineConfig,
    chat_template: Option<String>,
) -> Served {
    let model = ModelSpec {
        device: DeviceChoice::Cpu,
        max_model_len: Some(config.max_model_len),
        chat_template,
        ..ModelSpec::new(fixture(name).to_str().unwrap())
    };
    let registry = prometheus::Registry::new();
    let spec = MetricsSpec { registry: &registry, model_name, device_cost_per_hour: PRICE_PER_HOUR };
    let kv_cache = KvCacheSize::Blocks(config.cache.num_blocks);
    let started = EngineBuilder::new(config, kv_cache).load(&model, Some(spec)).unwrap();
    Served {
        engine: started.handle,
        tokenizer: started.tokenizer,
        name: model_name.into(),
        created: 1,
        defaults: Default::default(),
        tool_call_parser: None,
        reasoning_parser: None,
        metrics: Some((started.metrics.unwrap(), registry)),
    }
}

/// One request through the router; the status and the raw body.
pub async fn call(
    app: &Router,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec())
}
