//! Structured output's host costs: compiling a 50-property JSON schema (the cache missed every
//! time), and one sample's step under it (mask + commit), on the llama fixture's 448-token
//! vocabulary. A mask costs more with a larger vocabulary (llguidance walks the token trie), so
//! the step figure is a floor for real models, not their cost.
//!
//! `cargo bench -p ferrite-engine --bench grammar`

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use ferrite_engine::grammar::{GrammarConfig, GrammarSpec, Grammars};
use ferrite_engine::model::tokenizer::TokenizerConfig;
use ferrite_engine::Tokenizer;
use serde_json::{json, Value};

fn grammars() -> (Grammars, Arc<Tokenizer>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let config = TokenizerConfig::from_file(&dir.join("tokenizer_config.json")).expect("fixture");
    let tok = Arc::new(Tokenizer::load(&dir.join("tokenizer.json"), config).expect("fixture"));
    let eos = tok.eos_token_id().expect("fixture has EOS");
    // One entry: the two schemas below evict each other, so every compile is a miss.
    (Grammars::new(tok.clone(), 448, &[eos], GrammarConfig { cache_entries: 1 }).expect("trie"), tok)
}

/// 50 properties of mixed types, all required.
fn schema(salt: usize) -> Value {
    let properties: serde_json::Map<String, Value> = (0..50)
        .map(|i| {
            let kind = match i % 5 {
                0 => json!({"type": "string", "maxLength": 20}),
                1 => json!({"type": "integer", "minimum": 0, "maximum": 1000 + salt}),
                2 => json!({"type": "boolean"}),
                3 => json!({"enum": ["a", "b", "c"]}),
                _ => json!({"type": "array", "items": {"type": "number"}, "maxItems": 4}),
            };
            (format!("field_{i}"), kind)
        })
        .collect();
    let required: Vec<String> = properties.keys().cloned().collect();
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

fn bench(c: &mut Criterion) {
    let (grammars, tok) = grammars();
    let specs = [GrammarSpec::JsonSchema(schema(0)), GrammarSpec::JsonSchema(schema(1))];
    let mut k = 0;
    c.bench_function("compile/json-50-properties", |b| {
        b.iter(|| {
            k += 1;
            black_box(grammars.compile(&specs[k % 2]).expect("compiles"))
        })
    });
    // One step: the mask, then the commit of the text's next token, along a valid answer.
    let grammar = grammars
        .compile(&GrammarSpec::JsonSchema(json!({"type": "object",
        "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}})))
        .expect("compiles");
    let answer = r#"{"name": "a fairly long name for a benchmark", "tags": ["one", "two", "three", "four"]}"#;
    let ids = tok.encode(answer, false).expect("encodes");
    let row = vec![0.0f32; 448];
    c.bench_function("step/mask+commit", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut g = grammar.start();
                let started = std::time::Instant::now();
                for &id in ids.iter().take((iters - done) as usize) {
                    black_box(g.mask_row(&row));
                    g.commit(id);
                    done += 1;
                }
                total += started.elapsed();
            }
            total
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
