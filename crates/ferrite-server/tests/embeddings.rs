//! `POST /v1/embeddings` through the served path: the vectors of two tiny sentence-transformers
//! checkpoints (a bare Qwen3Model pooling its last token, normalised, with Matryoshka widths;
//! a bare, headless LlamaModel pooling the mean) equal `SentenceTransformer.encode`'s
//! (tests/fixtures/embed_*/reference.json, made by scripts/gen_embedding_fixtures.py) within
//! 1e-4, whether sent as text or ids, alone or in a batch of 64, in floats or base64.

mod common;

use axum::http::StatusCode;
use axum::Router;
use common::{call, roomy, state};
use ferrite_engine::EngineConfig;
use ferrite_server::app;
use serde_json::{json, Value};

struct Input {
    text: String,
    token_ids: Vec<u32>,
    embedding: Vec<f32>,
    /// Width → the vector truncated to it and normalised again (Matryoshka fixtures).
    truncated: Vec<(usize, Vec<f32>)>,
}

fn reference(name: &str) -> Vec<Input> {
    let path = common::fixture(name).join("reference.json");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Input {
            text: e["text"].as_str().unwrap().to_string(),
            token_ids: e["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect(),
            embedding: floats(&e["embedding"]),
            truncated: e
                .get("truncated")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(d, v)| (d.parse().unwrap(), floats(v)))
                .collect(),
        })
        .collect()
}

/// A small step budget: the long inputs are prefilled in several chunks.
fn chunked() -> EngineConfig {
    let mut c = roomy();
    c.scheduler.max_num_batched_tokens = 64;
    c
}

async fn embed(app: &Router, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(app, "POST", "/v1/embeddings", Some(body), None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// The `data[i].embedding` float lists of a 200 answer, checked for order and shape.
fn vectors(body: &Value) -> Vec<Vec<f32>> {
    assert_eq!(body["object"], "list", "{body}");
    assert_eq!(body["model"], "tiny");
    let data = body["data"].as_array().unwrap();
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!((d["object"].as_str(), d["index"].as_u64()), (Some("embedding"), Some(i as u64)));
            d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "widths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Every reference input as text in one request, then as token ids one at a time: each
/// vector within 1e-4 of sentence-transformers', the ids the same as its tokenizer's, the usage
/// their sum.
async fn matches_sentence_transformers(name: &str) {
    let inputs = reference(name);
    let app = app(state(name, chunked(), vec![]));
    for i in &inputs {
        let (s, b) = call(&app, "POST", "/tokenize", Some(json!({"prompt": i.text})), None).await;
        assert_eq!(s, StatusCode::OK);
        let ids: Vec<u32> = serde_json::from_slice::<Value>(&b).unwrap()["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, i.token_ids, "{name}: tokens of {:?}", i.text);
    }
    let texts: Vec<&str> = inputs.iter().map(|i| i.text.as_str()).collect();
    let (s, body) = embed(&app, json!({"model": "tiny", "input": texts})).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let got = vectors(&body);
    assert_eq!(got.len(), inputs.len());
    for (i, v) in inputs.iter().zip(&got) {
        let d = max_diff(v, &i.embedding);
        assert!(d < 1e-4, "{name}: {:?} differs from sentence-transformers by {d}", i.text);
    }
    let total: usize = inputs.iter().map(|i| i.token_ids.len()).sum();
    assert_eq!(body["usage"]["prompt_tokens"], total);
    assert_eq!(body["usage"]["total_tokens"], total);
    for i in &inputs {
        let (s, body) = embed(&app, json!({"model": "tiny", "input": i.token_ids})).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(max_diff(&vectors(&body)[0], &i.embedding) < 1e-4, "{name}: ids of {:?}", i.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_token_embeddings_match_sentence_transformers() {
    matches_sentence_transformers("embed_qwen3_last").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mean_embeddings_of_a_headless_model_match_sentence_transformers() {
    matches_sentence_transformers("embed_llama_mean").await;
}

/// `dimensions` on a Matryoshka model: each width sentence-transformers' truncated vector,
/// normalised; a width the model does not list is refused with the ones it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dimensions_truncate_matryoshka_models() {
    let inputs = reference("embed_qwen3_last");
    let app = app(state("embed_qwen3_last", roomy(), vec![]));
    for i in &inputs {
        assert_eq!(i.truncated.len(), 2, "the fixture lists two widths");
        for (d, want) in &i.truncated {
            let (s, body) = embed(&app, json!({"model": "tiny", "input": i.text, "dimensions": d})).await;
            assert_eq!(s, StatusCode::OK, "{body}");
            let got = &vectors(&body)[0];
            assert!(max_diff(got, want) < 1e-4, "width {d} of {:?}", i.text);
        }
    }
    let (s, body) = embed(&app, json!({"model": "tiny", "input": "x", "dimensions": 20})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "dimensions");
    assert!(body["error"]["message"].as_str().unwrap().contains("[16, 32]"), "{body}");
}

/// 64 inputs in one request (more than the engine runs at once): in order, each the vector
/// it has alone; base64 decodes to the same floats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_64_and_base64_give_the_vectors_of_each_input_alone() {
    let app = app(state("embed_qwen3_last", chunked(), vec![]));
    let texts: Vec<String> =
        (0..64).map(|i| format!("input number {i}: {}", "more words ".repeat(i % 9))).collect();
    let (s, batch) = embed(&app, json!({"model": "tiny", "input": texts})).await;
    assert_eq!(s, StatusCode::OK, "{batch}");
    let batch = vectors(&batch);
    assert_eq!(batch.len(), 64);
    for (i, t) in texts.iter().enumerate().step_by(7) {
        let (_, alone) = embed(&app, json!({"model": "tiny", "input": t})).await;
        assert!(max_diff(&vectors(&alone)[0], &batch[i]) < 1e-6, "input {i} alone and in the batch");
    }
    let (s, b64) = embed(&app, json!({"model": "tiny", "input": texts, "encoding_format": "base64"})).await;
    assert_eq!(s, StatusCode::OK, "{b64}");
    for (i, d) in b64["data"].as_array().unwrap().iter().enumerate() {
        let bytes = base64_decode(d["embedding"].as_str().unwrap());
        let floats: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(max_diff(&floats, &batch[i]) < 1e-6, "input {i}: base64 and floats differ");
    }
}

/// Standard base64 (RFC 4648), written out so the test does not share the server's decoder.
fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | ALPHABET.iter().position(|&a| a == c).expect("base64 alphabet") as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// Bad requests get a 400 naming the field; the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_are_refused_by_name() {
    let app = app(state("embed_llama_mean", roomy(), vec![]));
    let too_many = vec!["a"; 2049];
    let long = "word ".repeat(2000);
    let cases = [
        (json!({"model": "tiny", "input": ""}), "input", "empty string"),
        (json!({"model": "tiny", "input": []}), "input", "empty list"),
        (json!({"model": "tiny", "input": ["ok", ""]}), "input[1]", "empty string"),
        (json!({"model": "tiny", "input": too_many}), "input", "at most 2048"),
        (json!({"model": "tiny", "input": [1, 99999]}), "input", "outside the vocabulary"),
        (json!({"model": "tiny", "input": long}), "input", "max_model_len"),
        (json!({"model": "tiny", "input": "x", "encoding_format": "int8"}), "encoding_format", "\"int8\""),
        (json!({"model": "tiny", "input": "x", "dimensions": 8}), "dimensions", "not trained for truncated"),
        (json!({"input": "x"}), "model", "required"),
    ];
    for (body, param, words) in cases {
        let (s, answer) = embed(&app, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{body}: {message}");
    }
    let (s, _) = embed(&app, json!({"model": "other", "input": "x"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The headless model generates nothing, and says so.
    let (s, b) = call(
        &app,
        "POST",
        "/v1/completions",
        Some(json!({"model": "tiny", "prompt": "x", "max_tokens": 2})),
        None,
    )
    .await;
    let answer: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("/v1/embeddings"), "{answer}");
    let (s, _) = embed(&app, json!({"model": "tiny", "input": "still serving"})).await;
    assert_eq!(s, StatusCode::OK);
}

/// A generating model serves embeddings beside completions: both answered, the completion the
/// same as without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_run_beside_generation() {
    let app = app(state("embed_qwen3_last", chunked(), vec![]));
    let completion =
        json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});
    let (_, alone) = call(&app, "POST", "/v1/completions", Some(completion.clone()), None).await;
    let alone: Value = serde_json::from_slice(&alone).unwrap();
    let texts: Vec<String> = (0..16).map(|i| format!("{i} {}", "long input ".repeat(30))).collect();
    let (gen, emb) = tokio::join!(
        call(&app, "POST", "/v1/completions", Some(completion), None),
        embed(&app, json!({"model": "tiny", "input": texts}))
    );
    assert_eq!(emb.0, StatusCode::OK);
    assert_eq!(vectors(&emb.1).len(), 16);
    let beside: Value = serde_json::from_slice(&gen.1).unwrap();
    assert_eq!(beside["choices"][0]["text"], alone["choices"][0]["text"]);
}
