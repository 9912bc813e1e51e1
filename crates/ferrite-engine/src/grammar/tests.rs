use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::*;
use crate::model::tokenizer::TokenizerConfig;
use crate::sampler::{SamplingParams, SequenceSampler};

fn tokenizer() -> Arc<Tokenizer> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let config = TokenizerConfig::from_file(&dir.join("tokenizer_config.json")).unwrap();
    Arc::new(Tokenizer::load(&dir.join("tokenizer.json"), config).unwrap())
}

fn grammars(vocab_size: usize) -> (Grammars, Arc<Tokenizer>, u32) {
    let tok = tokenizer();
    let eos = tok.eos_token_id().unwrap();
    (Grammars::new(tok.clone(), vocab_size, &[eos], GrammarConfig::default()).unwrap(), tok, eos)
}

/// The allowed token ids of `g`'s next step.
fn allowed(g: &mut SeqGrammar, vocab_size: usize) -> Vec<u32> {
    let row = g.mask_row(&vec![0.0; vocab_size]);
    (0..vocab_size as u32).filter(|&id| row[id as usize] == 0.0).collect()
}

/// Samples from random logits (the fixture models' output is noise too) under `spec`, until
/// the grammar is complete or EOS is drawn; returns the text.
fn generate(spec: &GrammarSpec, temperature: f32, seed: u64) -> String {
    let (grammars, tok, eos) = grammars(448);
    let grammar = grammars.compile(spec).unwrap();
    let params = SamplingParams { temperature, seed: Some(seed), ..SamplingParams::default() };
    let mut sampler = SequenceSampler::new(params, &[1], &[eos]).with_grammar(grammar.start());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..400 {
        let logits: Vec<f32> = (0..448).map(|_| rng.random_range(-4.0..4.0)).collect();
        let token = sampler.sample(&logits).token_id;
        let g = sampler.grammar().unwrap();
        assert!(g.failure().is_none(), "{:?}", g.failure());
        if token == eos || g.is_complete() {
            if token != eos {
                ids.push(token);
            }
            return tok.decode(&ids, true).unwrap();
        }
        ids.push(token);
    }
    panic!("no end after 400 tokens: {:?}", tok.decode(&ids, true));
}

#[test]
fn a_choice_allows_only_prefixes_of_its_strings_and_then_ends() {
    let (grammars, tok, eos) = grammars(448);
    let choices = ["yes".to_string(), "no way".to_string()];
    let mut g = grammars.compile(&GrammarSpec::Choice(choices.to_vec())).unwrap().start();
    let first = allowed(&mut g, 448);
    assert!(!first.is_empty());
    for id in &first {
        let text = tok.decode(&[*id], false).unwrap();
        assert!(choices.iter().any(|c| c.starts_with(&text)), "token {id} ({text:?}) is allowed first");
    }
    assert!(!first.contains(&eos), "nothing matched yet: EOS is not allowed");
    for id in tok.encode("yes", false).unwrap() {
        assert!(allowed(&mut g, 448).contains(&id));
        g.commit(id);
    }
    assert!(g.is_complete() || allowed(&mut g, 448) == vec![eos], "after \"yes\" only the end may follow");
}

#[test]
fn noise_under_a_json_schema_is_valid_json_that_follows_it() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false,
    });
    for (temperature, seed) in [(0.0, 1), (1.0, 2), (1.3, 3)] {
        let text = generate(&GrammarSpec::JsonSchema(schema.clone()), temperature, seed);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 6, "{text}");
        assert!((0..=120).contains(&v["age"].as_i64().unwrap()), "{text}");
        let tags = v["tags"].as_array().unwrap();
        assert!((1..=3).contains(&tags.len()) && tags.iter().all(|t| t == "a" || t == "b"), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
}

#[test]
fn noise_under_a_regex_matches_it_whole() {
    let text = generate(&GrammarSpec::Regex("[a-c]{2,4}-[0-9]{3}".into()), 1.0, 7);
    let (letters, digits) = text.split_once('-').unwrap_or_else(|| panic!("{text:?}"));
    assert!((2..=4).contains(&letters.len()) && letters.chars().all(|c| ('a'..='c').contains(&c)), "{text}");
    assert!(digits.len() == 3 && digits.chars().all(|c| c.is_ascii_digit()), "{text}");
}

#[test]
fn ids_past_the_tokenizer_are_never_allowed() {
    let (grammars, _, _) = grammars(448 + 64);
    let mut g = grammars.compile(&GrammarSpec::JsonObject).unwrap().start();
    let ids = allowed(&mut g, 448 + 64);
    assert!(!ids.is_empty() && ids.iter().all(|&id| id < 448), "{ids:?}");
}

#[test]
fn bad_grammars_are_errors_that_say_why() {
    let (grammars, _, _) = grammars(448);
    let err = |spec: GrammarSpec| grammars.compile(&spec).unwrap_err().to_string();
    assert!(err(GrammarSpec::JsonSchema(json!(true))).contains("must be a JSON object, got a boolean"));
    assert!(err(GrammarSpec::Choice(vec![])).contains("at least one"));
    assert!(!err(GrammarSpec::Regex("(unclosed".into())).is_empty());
    assert!(!err(GrammarSpec::Lark("start: undefined_rule".into())).is_empty());
    let e =
        err(GrammarSpec::JsonSchema(json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}})));
    assert!(e.contains("x"), "{e}");
}

#[test]
fn a_grammar_compiled_twice_comes_from_the_cache() {
    let (grammars, _, _) = grammars(448);
    let spec = GrammarSpec::Regex("ab+".into());
    let a = grammars.compile(&spec).unwrap();
    let b = grammars.compile(&spec).unwrap();
    assert!(Arc::ptr_eq(&a.template, &b.template));
    let other = grammars.compile(&GrammarSpec::Regex("ab*".into())).unwrap();
    assert!(!Arc::ptr_eq(&a.template, &other.template));
}

#[test]
fn the_cache_keeps_only_its_capacity() {
    let tok = tokenizer();
    let eos = tok.eos_token_id().unwrap();
    let grammars = Grammars::new(tok, 448, &[eos], GrammarConfig { cache_entries: 2 }).unwrap();
    for rx in ["a", "b", "c"] {
        grammars.compile(&GrammarSpec::Regex(rx.into())).unwrap();
    }
    assert_eq!(grammars.lock().len(), 2);
    assert!(!grammars.lock().contains("regex:a"), "the least recently used entry went first");
}

/// After a reasoning model's thinking: free while thinking, the grammar after its end token;
/// at the first token the opening token or what the grammar allows.
#[test]
fn a_grammar_after_thinking_holds_only_once_the_thinking_ends() {
    let (grammars, tok, _) = grammars(448);
    let grammar = grammars.compile(&GrammarSpec::Choice(vec!["yes".into()])).unwrap();
    let (open, end) = (400, 401);
    let free: Vec<u32> = (0..448).collect();
    let plain = allowed(&mut grammar.start(), 448);
    assert!(plain.len() < 10, "a choice allows few tokens: {plain:?}");

    // The prompt opened the thinking: anything goes until `end`, then only the grammar.
    let mut g = grammar.after_thinking(Thinking { open, end, started: true }).start();
    for token in [5, 77, open, 300] {
        assert_eq!(allowed(&mut g, 448), free);
        g.commit(token);
        assert!(g.is_thinking() && !g.is_complete());
    }
    g.commit(end);
    assert!(!g.is_thinking());
    assert_eq!(allowed(&mut g, 448), plain, "after the end token the grammar starts from its beginning");

    // Not started: the first token may open the thinking, or begin the answer.
    let mut g = grammar.after_thinking(Thinking { open, end, started: false }).start();
    let first = allowed(&mut g, 448);
    assert_eq!(first.len(), plain.len() + 1);
    assert!(first.contains(&open) && plain.iter().all(|t| first.contains(t)));
    g.commit(open);
    assert!(g.is_thinking());
    let mut g = grammar.after_thinking(Thinking { open, end, started: false }).start();
    let yes = tok.encode("yes", false).unwrap();
    for &t in &yes {
        g.commit(t);
    }
    assert!(g.is_complete() && !g.is_thinking(), "answered at once: the grammar held from the first token");
}
