//! A sequence's result does not depend on the company it keeps or on how its prompt is cut:
//! the same logits, bit for bit, and greedy tokens alone, inside a flat batch of 8 sequences of
//! different lengths, and with its prefill split into chunks of 1, 7 and 64 tokens. (On the CPU
//! every product is one FMA chain per output in a fixed order, whatever the step's shape:
//! `ops::packed`, and attention per (token, head) in `ops::paged_attention`.)

mod common;

use common::*;
use ferrite_engine::generate::StepLimits;
use ferrite_engine::loader::{load, LoadOptions};

/// Exact: any difference is a kernel whose result depends on the step's shape.
const TOL: f32 = 0.0;

fn check(name: &str) {
    let dir = fixture(name);
    let m = load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let r = reference(&dir);
    // The longest prompt (300+ tokens: crosses blocks and, for mistral, the sliding window).
    let target = r.prompts.iter().max_by_key(|p| p.prompt_ids.len()).unwrap();
    assert!(target.prompt_ids.len() > 300, "{name}: expected a 300+ token prompt");
    let max_tokens = 12;
    let alone = run(&m, vec![greedy(&target.prompt_ids, max_tokens)], &with_logits()).remove(0);

    // In a batch with 7 others of different lengths (other prompts, and slices of the long one).
    let mut batch = vec![greedy(&target.prompt_ids, max_tokens)];
    for (i, len) in [1usize, 5, 17, 33, 64, 120, 250].into_iter().enumerate() {
        let mut ids = target.prompt_ids[..len.min(target.prompt_ids.len())].to_vec();
        ids.rotate_left(i % len.max(1));
        batch.push(greedy(&ids, 3 + i * 4));
    }
    let together = run(&m, batch, &with_logits());
    let err =
        max_abs_diff(alone.prompt_logits.as_ref().unwrap(), together[0].prompt_logits.as_ref().unwrap());
    assert!(err <= TOL, "{name}: logits alone vs in a batch of 8 differ by {err}");
    assert_eq!(alone.token_ids, together[0].token_ids, "{name}: tokens alone vs batched");

    // Chunked prefill: a budget that cuts the prompt into chunks of 1, 7 and 64 tokens.
    for chunk in [1usize, 7, 64] {
        let limits = StepLimits { max_prefill_chunk_tokens: chunk, ..with_logits() };
        let out = run(&m, vec![greedy(&target.prompt_ids, max_tokens)], &limits).remove(0);
        let err = max_abs_diff(alone.prompt_logits.as_ref().unwrap(), out.prompt_logits.as_ref().unwrap());
        assert!(err <= TOL, "{name}: logits with prefill chunks of {chunk} differ by {err}");
        assert_eq!(alone.token_ids, out.token_ids, "{name}: tokens with prefill chunks of {chunk}");
    }
    // And the mixed case: chunked prompts next to decoding sequences under a shared budget.
    let limits = StepLimits { max_prefill_chunk_tokens: 7, max_num_batched_tokens: 20, ..with_logits() };
    let batch = vec![greedy(&target.prompt_ids, max_tokens), greedy(&target.prompt_ids[..9], 30)];
    let out = run(&m, batch, &limits);
    let err = max_abs_diff(alone.prompt_logits.as_ref().unwrap(), out[0].prompt_logits.as_ref().unwrap());
    assert!(err <= TOL, "{name}: logits in a mixed chunked batch differ by {err}");
    assert_eq!(alone.token_ids, out[0].token_ids);
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
