//! 64 streams at once (chat and completions, mixed lengths): each ends with `[DONE]`, has one
//! finish_reason per choice, its own id, the right usage, and at temperature 0 the same text
//! as when it ran alone. And a server that is shutting down answers 503 in OpenAI's shape.

mod common;

use std::collections::HashSet;

use common::{call, roomy, state};
use ferrite_engine::EngineConfig;
use ferrite_server::app;
use serde_json::{json, Value};

const STREAMS: usize = 64;

fn body(i: usize, stream: bool) -> (&'static str, Value) {
    let max_tokens = 3 + (i * 7) % 17;
    let mut b = if i.is_multiple_of(2) {
        json!({"model": "tiny", "messages": [{"role": "user", "content": format!("story number {i}")}],
               "max_tokens": max_tokens, "temperature": 0})
    } else {
        json!({"model": "tiny", "prompt": format!("Once upon a time {i}"), "max_tokens": max_tokens,
               "temperature": 0})
    };
    if stream {
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
    }
    (if i.is_multiple_of(2) { "/v1/chat/completions" } else { "/v1/completions" }, b)
}

/// (text, completion_tokens, finish_reason) of a JSON answer.
fn solo_result(v: &Value) -> (String, u64, String) {
    let c = &v["choices"][0];
    let text = c["text"].as_str().or_else(|| c["message"]["content"].as_str()).unwrap().to_string();
    (text, v["usage"]["completion_tokens"].as_u64().unwrap(), c["finish_reason"].as_str().unwrap().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_streams_at_once_each_equal_their_solo_run() {
    let config = EngineConfig {
        max_waiting_requests: 2 * STREAMS,
        scheduler: ferrite_engine::sched::SchedulerConfig { max_num_seqs: STREAMS, ..roomy().scheduler },
        ..roomy()
    };
    let app = app(state("llama", config, vec![]));
    let mut solo = Vec::new();
    for i in 0..STREAMS {
        let (path, b) = body(i, false);
        let (status, raw) = call(&app, "POST", path, Some(b), None).await;
        assert_eq!(status, 200);
        solo.push(solo_result(&serde_json::from_slice(&raw).unwrap()));
    }

    let calls = (0..STREAMS).map(|i| {
        let app = app.clone();
        async move {
            let (path, b) = body(i, true);
            call(&app, "POST", path, Some(b), None).await
        }
    });
    let answers = futures::future::join_all(calls).await;
    let mut ids = HashSet::new();
    for (i, (status, raw)) in answers.into_iter().enumerate() {
        assert_eq!(status, 200, "stream {i}");
        let text = String::from_utf8(raw).unwrap();
        let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "stream {i} must end with [DONE]: {text}");
        assert_eq!(data.iter().filter(|d| **d == "[DONE]").count(), 1, "stream {i}");
        let chunks: Vec<Value> =
            data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let id = chunks[0]["id"].as_str().unwrap().to_string();
        assert!(chunks.iter().all(|c| c["id"] == id.as_str()), "stream {i}: one id per stream");
        assert!(ids.insert(id), "stream {i}: ids are unique across requests");
        let mut streamed = String::new();
        let mut finishes = Vec::new();
        for c in chunks.iter().filter(|c| !c["choices"].as_array().unwrap().is_empty()) {
            let choice = &c["choices"][0];
            let piece = choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str()).unwrap_or("");
            streamed.push_str(piece);
            if !choice["finish_reason"].is_null() {
                finishes.push(choice["finish_reason"].as_str().unwrap().to_string());
            }
        }
        let usage = chunks.last().unwrap();
        assert!(usage["choices"].as_array().unwrap().is_empty(), "stream {i}: usage chunk last");
        let (solo_text, solo_tokens, solo_finish) = &solo[i];
        assert_eq!(finishes, vec![solo_finish.clone()], "stream {i}: one finish_reason");
        assert_eq!(&streamed, solo_text, "stream {i}: same text as alone");
        assert_eq!(usage["usage"]["completion_tokens"].as_u64().unwrap(), *solo_tokens, "stream {i}");
    }
}

#[tokio::test]
async fn a_server_shutting_down_answers_503() {
    let state = state("llama", roomy(), vec![]);
    let engine = state.models.loaded()[0].engine.clone();
    let app = app(state);
    engine.shutdown();
    let (status, raw) =
        call(&app, "POST", "/v1/completions", Some(json!({"model": "tiny", "prompt": "x"})), None).await;
    assert_eq!(status, 503);
    let v: Value = serde_json::from_slice(&raw).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("shut"), "{v}"); // shutting down, or shut down
    assert!(
        v["error"]["type"].is_string()
            && v["error"].get("param").is_some()
            && v["error"].get("code").is_some()
    );
}
