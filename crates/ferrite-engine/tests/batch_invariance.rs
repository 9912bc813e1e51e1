//! A sequence's result does not depend on the company it keeps or on how its prompt is cut,
//! through the served path: the same logprobs of every token at every step, bit for bit, and
//! the same greedy tokens alone, inside a flat batch of 8 sequences of different lengths, with
//! its prefill split into chunks of 1, 7 and 64 tokens, and chunked beside a decoding
//! neighbour. (On the CPU every product is one FMA chain per output in a fixed order, whatever
//! the step's shape: `ops::packed`, and attention per (token, head) in `ops::paged_attention`.)

mod common;

use common::*;
use ferrite_engine::{load, EngineConfig, LoadOptions};

fn check(name: &str) {
    let dir = fixture(name);
    let engine = |config: EngineConfig| {
        TestEngine::start(load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap(), config)
    };
    let r = reference(&dir);
    // The longest prompt (300+ tokens: crosses blocks and, for mistral, the sliding window).
    let target = &r.prompts.iter().max_by_key(|p| p.prompt_ids.len()).unwrap().prompt_ids;
    assert!(target.len() > 300, "{name}: expected a 300+ token prompt");
    let request = || full(greedy(target, 12));
    let alone = engine(test_config()).generate_one(request());
    let same = |got: &Generated, how: &str| {
        assert_eq!(alone.token_ids, got.token_ids, "{name}: tokens alone vs {how}");
        assert!(bits(&alone) == bits(got), "{name}: logprobs alone vs {how} differ");
    };

    // In a batch with 7 others of different lengths (slices of the long prompt, rotated).
    let mut batch = vec![request()];
    for (i, len) in [1usize, 5, 17, 33, 64, 120, 250].into_iter().enumerate() {
        let mut ids = target[..len].to_vec();
        ids.rotate_left(i % len);
        batch.push(full(greedy(&ids, 3 + i * 4)));
    }
    same(&engine(test_config()).generate(batch)[0], "in a batch of 8");

    // Chunked prefill: a token budget that cuts the prompt into chunks of 1, 7 and 64 tokens.
    for chunk in [1usize, 7, 64] {
        same(&engine(budget(chunk)).generate_one(request()), &format!("prefill chunks of {chunk}"));
    }
    // And the mixed case: the prompt in chunks beside a sequence that is already decoding,
    // under a shared budget of 20 tokens.
    let batch = vec![greedy(&target[..9], 30), request()];
    same(&engine(budget(20)).generate(batch)[1], "chunks beside a decode");
}

#[test]
fn mistral_with_sliding_window_is_batch_invariant() {
    check("mistral");
}

#[test]
fn qwen3_is_batch_invariant() {
    check("qwen3");
}

#[test]
fn llama_is_batch_invariant() {
    check("llama");
}

/// Alternating windows and soft-caps (Gemma 2), per-layer RoPE (Gemma 3), post-norms (OLMo 2),
/// multipliers (Granite), partial rotation and fused projections (Phi-3), and experts (a
/// token's output must not depend on which other tokens share its experts in the step).
#[test]
fn new_families_are_batch_invariant() {
    for name in ["gemma2", "gemma3", "granite", "olmo2", "phi3", "qwen3_moe", "mixtral"] {
        check(name);
    }
}
