//! The CPU's linear weights in their own dtype under f32 compute (`CpuWeights`): a bf16
//! checkpoint kept bf16 gives exactly the logits of its widened f32 copy, and an f32 checkpoint
//! rounded to bf16 or f16 stays within what those mantissas allow of transformers' f32 logits.

mod common;

use common::*;
use ferrite_engine::loader::{load, CpuWeights, LoadOptions};
use ferrite_engine::DType;

fn options(cpu_weights: CpuWeights) -> LoadOptions {
    LoadOptions { dtype: Some(DType::F32), device: ferrite_engine::Device::Cpu, cpu_weights }
}

#[test]
fn a_bf16_checkpoint_kept_bf16_matches_its_widened_copy_bit_for_bit() {
    let dir = fixture("qwen2_bf16");
    let r = reference(&dir);
    let stored = load(dir.to_str().unwrap(), &options(CpuWeights::AsStored)).unwrap();
    let widened = load(dir.to_str().unwrap(), &options(CpuWeights::Cast(DType::F32))).unwrap();
    // Held in bf16: the projections take half the bytes (the norms and biases stay f32).
    let (half, full) = (stored.model.weight_bytes(), widened.model.weight_bytes());
    assert!(half * 10 < full * 6, "as stored {half} B against widened {full} B");
    for (i, p) in r.prompts.iter().enumerate() {
        let requests = || vec![greedy(&p.prompt_ids, p.greedy_ids.len())];
        let a = run(&stored, requests(), &with_logits()).remove(0);
        let b = run(&widened, requests(), &with_logits()).remove(0);
        assert_eq!(a.prompt_logits, b.prompt_logits, "prompt {i}: logits");
        assert_eq!(a.token_ids, b.token_ids, "prompt {i}: tokens");
        assert_eq!(a.token_ids, p.greedy_ids, "prompt {i}: transformers' greedy tokens");
    }
}

#[test]
fn an_f32_checkpoint_rounded_to_half_weights_tracks_f32() {
    for name in ["llama", "qwen2"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let p = &r.prompts[3];
        let range = {
            let l = &p.last_logits;
            l.iter().copied().fold(f32::MIN, f32::max) - l.iter().copied().fold(f32::MAX, f32::min)
        };
        for (dtype, rel_tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
            let m = load(dir.to_str().unwrap(), &options(CpuWeights::Cast(dtype))).unwrap();
            // The KV cache and activations stay f32.
            assert_eq!(m.model.kv_cache_spec().dtype, DType::F32);
            let out = run(&m, vec![greedy(&p.prompt_ids, 1)], &with_logits()).remove(0);
            let err = max_abs_diff(out.prompt_logits.as_ref().unwrap(), &p.last_logits);
            assert!(err < rel_tol * range, "{name} {dtype:?}: max abs diff {err} vs logit range {range}");
            // Rounding does change them: the weights are really held in the smaller dtype.
            assert!(err > 1e-5, "{name} {dtype:?}: logits equal f32's ({err}); were the weights rounded?");
            assert_eq!(out.token_ids[0], p.greedy_ids[0], "{name} {dtype:?}: first greedy token");
        }
    }
}
