//! Structured output through the served path, on the tiny random llama fixture: its output is
//! noise, so whatever is valid is valid because of the grammar alone. Each answer is checked by
//! an independent validator (the `jsonschema` crate, a regex, the choice list).

mod common;

use axum::http::StatusCode;
use axum::Router;
use common::{call, roomy, state};
use ferrite_server::app;
use futures::future::join_all;
use serde_json::{json, Value};

fn router() -> Router {
    app(state("llama", roomy(), vec![]))
}

async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (s, b) = call(app, "POST", path, Some(body), None).await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Reply in JSON."}],
        "max_tokens": 600});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn json_schema_format(schema: &Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": true}})
}

/// Schemas whose every value is bounded (strings by length or pattern, numbers by range, arrays
/// by count), so that noise must reach the end: the grammar's completion, not `max_tokens`.
fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "enum",
            json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
            "required": ["color"], "additionalProperties": false}),
        ),
        (
            "bounded integers",
            json!({"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "delta": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["age", "delta"], "additionalProperties": false}),
        ),
        (
            "array with min and max items",
            json!({"type": "object", "properties": {
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4}},
            "required": ["flags"], "additionalProperties": false}),
        ),
        (
            "nested objects",
            json!({"type": "object", "properties": {
            "user": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 8},
                "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["zip"], "additionalProperties": false}},
                "required": ["name", "address"], "additionalProperties": false}},
            "required": ["user"], "additionalProperties": false}),
        ),
        (
            "anyOf",
            json!({"type": "object", "properties": {
            "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 4}]}},
            "required": ["id"], "additionalProperties": false}),
        ),
        (
            "$ref and $defs",
            json!({"type": "object", "$defs": {"point": {"type": "object",
            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["x", "y"], "additionalProperties": false}},
            "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
            "required": ["from", "to"], "additionalProperties": false}),
        ),
        (
            "pattern",
            json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
            "required": ["code"], "additionalProperties": false}),
        ),
        (
            "top-level array",
            json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 1, "maxItems": 5}),
        ),
    ]
}

/// `content` parses as JSON and `schema` accepts it.
fn assert_valid(name: &str, schema: &Value, content: &str) {
    let value: Value =
        serde_json::from_str(content).unwrap_or_else(|e| panic!("{name}: {content:?} is not JSON: {e}"));
    let validator = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}: {content} breaks its schema: {errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_follows_every_schema_at_every_temperature_and_stops() {
    let app = router();
    let mut cases = Vec::new();
    for (name, schema) in schemas() {
        for (temperature, seed) in [(0.0, 0), (1.0, 11), (1.3, 12)] {
            cases.push((name, schema.clone(), temperature, seed));
        }
    }
    // All at once: constrained samples with different grammars share every step.
    let answers = join_all(cases.iter().map(|(_, schema, temperature, seed)| {
        let body = chat(
            json!({"response_format": json_schema_format(schema), "temperature": temperature, "seed": seed}),
        );
        post(&app, "/v1/chat/completions", body)
    }))
    .await;
    for ((name, schema, temperature, _), (status, v)) in cases.iter().zip(answers) {
        assert_eq!(status, StatusCode::OK, "{name}: {v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{name} at {temperature}: {v}");
        assert_valid(name, schema, choice["message"]["content"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_equals_whole_and_every_sample_of_n_is_valid() {
    let app = router();
    let (name, schema) = &schemas()[3];
    let body =
        chat(json!({"response_format": json_schema_format(schema), "temperature": 1.0, "seed": 5, "n": 3}));
    let (status, whole) = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for c in choices {
        assert_eq!(c["finish_reason"], "stop", "{whole}");
        assert_valid(name, schema, c["message"]["content"].as_str().unwrap());
    }
    let mut streaming = body;
    streaming["stream"] = json!(true);
    let (status, raw) = call(&app, "POST", "/v1/chat/completions", Some(streaming), None).await;
    assert_eq!(status, StatusCode::OK);
    let mut streamed = [String::new(), String::new(), String::new()];
    let text = String::from_utf8(raw).unwrap();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            if let Some(piece) = c["delta"]["content"].as_str() {
                streamed[c["index"].as_u64().unwrap() as usize].push_str(piece);
            }
        }
    }
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(streamed[i], c["message"]["content"].as_str().unwrap(), "sample {i}");
    }
}

/// Free requests give the same tokens alone and beside 16 constrained ones, each under its own
/// grammar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_neighbours_never_change_a_free_output() {
    let app = router();
    let free: Vec<Value> = (0..4)
        .map(|i| {
            let temperature = if i % 2 == 0 { 0.0 } else { 1.0 };
            json!({"model": "tiny", "prompt": format!("once upon a time {i}"), "max_tokens": 24,
                "ignore_eos": true, "temperature": temperature, "seed": i})
        })
        .collect();
    let mut alone = Vec::new();
    for body in &free {
        let (status, v) = post(&app, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        alone.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let constrained: Vec<Value> = (0..16)
        .map(|i| {
            let schema = json!({"type": "object", "properties": {format!("k{i}"): {"type": "integer", "minimum": 0, "maximum": i * 10}},
                "required": [format!("k{i}")], "additionalProperties": false});
            chat(json!({"response_format": json_schema_format(&schema), "temperature": 1.0, "seed": i}))
        })
        .collect();
    let all = constrained.iter().map(|b| post(&app, "/v1/chat/completions", b.clone()));
    let frees = free.iter().map(|b| post(&app, "/v1/completions", b.clone()));
    let (constrained_answers, free_answers) = tokio::join!(join_all(all), join_all(frees));
    for (i, (status, v)) in constrained_answers.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK, "{v}");
        let content: Value =
            serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
        let n = content[format!("k{i}")].as_i64().unwrap_or_else(|| panic!("{content}"));
        assert!((0..=i as i64 * 10).contains(&n), "{content}");
    }
    for (i, (status, v)) in free_answers.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), alone[i], "free request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_choice_and_grammar_by_every_name() {
    let app = router();
    let choices = ["alpha", "beta gamma", "δέλτα"];
    let regex = "[a-c]{3}-[0-9]{2,4}";
    let check_regex = |t: &str| {
        let (letters, digits) = t.split_once('-').unwrap_or_else(|| panic!("{t:?}"));
        letters.len() == 3
            && letters.chars().all(|c| ('a'..='c').contains(&c))
            && (2..=4).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
    };
    let lark = r#"start: "yes" | "no" | "n" /[0-9]/"#;
    let check_lark = |t: &str| {
        t == "yes" || t == "no" || (t.len() == 2 && t.starts_with('n') && t.as_bytes()[1].is_ascii_digit())
    };
    let check_choice = |t: &str| choices.contains(&t);
    type Check<'a> = &'a dyn Fn(&str) -> bool;
    let cases: Vec<(Value, Check)> = vec![
        (json!({"guided_regex": regex}), &check_regex),
        (json!({"structured_outputs": {"regex": regex}}), &check_regex),
        (json!({"guided_choice": choices}), &check_choice),
        (json!({"structured_outputs": {"choice": choices}}), &check_choice),
        (json!({"guided_grammar": lark}), &check_lark),
        (json!({"structured_outputs": {"grammar": lark}}), &check_lark),
    ];
    for (fields, check) in cases {
        for seed in 0..4 {
            for path in ["/v1/completions", "/v1/chat/completions"] {
                let mut body = if path == "/v1/completions" {
                    json!({"model": "tiny", "prompt": "say", "max_tokens": 64})
                } else {
                    chat(json!({}))
                };
                body["temperature"] = json!(1.3);
                body["seed"] = json!(seed);
                for (k, v) in fields.as_object().unwrap() {
                    body[k] = v.clone();
                }
                let (status, v) = post(&app, path, body).await;
                assert_eq!(status, StatusCode::OK, "{fields}: {v}");
                let c = &v["choices"][0];
                let text = c["text"].as_str().or(c["message"]["content"].as_str()).unwrap();
                assert!(check(text), "{fields} on {path}: {text:?}");
                assert_eq!(c["finish_reason"], "stop", "{fields}: {v}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_mode_and_a_short_max_tokens() {
    let app = router();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = chat(json!({"response_format": {"type": "json_object"}, "temperature": 0.0}));
        if path == "/v1/completions" {
            body = json!({"model": "tiny", "prompt": "{", "max_tokens": 600, "temperature": 0.0,
                "response_format": {"type": "json_object"}});
        }
        let (status, v) = post(&app, path, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let c = &v["choices"][0];
        let text = c["text"].as_str().or(c["message"]["content"].as_str()).unwrap();
        if c["finish_reason"] == "stop" {
            let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(parsed.is_object(), "{text}");
        } else {
            assert_eq!(c["finish_reason"], "length", "{v}");
        }
        // max_tokens ends a grammar early as it ends anything: "length", a prefix of JSON.
        body["max_tokens"] = json!(1);
        let (status, v) = post(&app, path, body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        let c = &v["choices"][0];
        let text = c["text"].as_str().or(c["message"]["content"].as_str()).unwrap();
        assert!(text.trim_start().starts_with('{'), "{text:?}");
    }
}

/// Logprobs are those of the masked distribution: at the first token of a choice between two
/// words, the top alternatives that are allowed carry all the probability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_come_from_the_masked_distribution() {
    let app = router();
    let body = chat(json!({"guided_choice": ["yes", "no"], "logprobs": true, "top_logprobs": 5,
        "temperature": 1.0, "seed": 3}));
    let (status, v) = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let first = &v["choices"][0]["logprobs"]["content"][0];
    let total: f64 = first["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["logprob"].as_f64())
        .map(f64::exp)
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "the allowed first tokens' probabilities sum to {total}: {first}");
    assert!(first["logprob"].as_f64().unwrap() > -20.0, "{first}");
}

/// Preemption (a cache too small for the batch), chunked prefill and the prefix cache leave a
/// constrained sample's tokens as they are alone: its matcher lives with its output, which a
/// recompute keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_and_chunked_prefill_keep_constrained_outputs() {
    let (name, schema) = &schemas()[1];
    let bodies: Vec<Value> = (0..8)
        .map(|seed| {
            chat(json!({"response_format": json_schema_format(schema), "temperature": 1.0, "seed": seed,
                "max_tokens": 200}))
        })
        .collect();
    let roomy_app = router();
    let mut alone = Vec::new();
    for body in &bodies {
        let (status, v) = post(&roomy_app, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        alone.push(v["choices"][0]["message"]["content"].as_str().unwrap().to_string());
    }
    let mut tight = roomy();
    tight.scheduler.max_num_batched_tokens = 8; // every prompt in chunks
    tight.cache.num_blocks = 16; // 15 for one request at its longest
    let tight_app = app(state("llama", tight, vec![]));
    let answers = join_all(bodies.iter().map(|b| post(&tight_app, "/v1/chat/completions", b.clone()))).await;
    for (i, (status, v)) in answers.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK, "{v}");
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_valid(name, schema, content);
        assert_eq!(content, alone[i], "request {i} under preemption");
    }
    let (_, metrics) = call(&tight_app, "GET", "/metrics", None, None).await;
    let metrics = String::from_utf8(metrics).unwrap();
    let preemptions: f64 = metrics
        .lines()
        .find(|l| l.starts_with("ferrite:num_preemptions_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no preemption counter in {metrics}"));
    assert!(preemptions > 0.0, "the cache was roomy enough: no preemption happened");
}

/// vLLM's structural tag: free text in which `<function=` opens a tagged call whose JSON must
/// match that function's schema, then free text again. Checked token by token against the
/// masks of the grammar each way of asking compiles to, then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structural_tags_constrain_each_tagged_part() {
    use ferrite_server::structured::{asked, StructuredFields};
    let state = state("llama", roomy(), vec![]);
    let model = state.models.loaded()[0].clone();
    let weather = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"], "additionalProperties": false});
    let tag = json!({"triggers": ["<function="], "structures": [
        {"begin": "<function=get_weather>", "schema": weather, "end": "</function>"},
        {"begin": "<function=ping>", "end": "</function>"}]});
    let mut format = tag.clone();
    format["type"] = json!("structural_tag");
    let from_format = asked(Some(&format), &StructuredFields::default(), 1 << 16).unwrap().unwrap();
    let fields: StructuredFields =
        serde_json::from_value(json!({"structured_outputs": {"structural_tag": tag.to_string()}})).unwrap();
    let from_fields = asked(None, &fields, 1 << 16).unwrap().unwrap();
    assert_eq!(from_format.spec, from_fields.spec);
    let grammar = model.engine.compile_grammar(&from_format.spec).unwrap();
    let allowed = |text: &str| {
        let mut g = grammar.start();
        model.tokenizer.encode(text, false).unwrap().into_iter().all(|id| {
            let ok = g.mask_row(&[0.0; 448])[id as usize] == 0.0;
            g.commit(id);
            ok
        })
    };
    assert!(allowed("Plain text, {braces} and <tags> are free."));
    assert!(allowed("Checking. <function=get_weather>{\"city\": \"Oslo\"}</function> Then more text."));
    assert!(allowed("<function=ping>[1, {\"any\": null}]</function><function=ping>true</function>"));
    for invalid in [
        "<function=get_weather>{\"town\": \"Oslo\"}",
        "<function=get_weather>{\"city\": \"Llanfairpwll\"}",
        "<function=get_weather>{\"city\": \"Oslo\"}</funky>",
        "<function=unknown>",
        "<function=ping>not json",
    ] {
        assert!(!allowed(invalid), "{invalid:?} got through");
    }
    let app = app(state);
    let (status, answer) =
        post(&app, "/v1/chat/completions", chat(json!({"response_format": format, "max_tokens": 20}))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}
