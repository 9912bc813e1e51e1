//! f16 and bf16 compute (on the CPU, or the GPU `FERRITE_TEST_DEVICE` names): the same model in half precision stays close to its f32
//! logits (within what 8- and 11-bit mantissas allow) and agrees on the first greedy token.

mod common;

use common::*;
use ferrite_engine::loader::{load, LoadOptions};
use ferrite_engine::DType;

#[test]
fn half_precision_tracks_f32() {
    let dir = fixture("llama");
    let r = reference(&dir);
    let p = &r.prompts[3];
    let spread = |l: &[f32]| {
        let max = l.iter().copied().fold(f32::MIN, f32::max);
        let min = l.iter().copied().fold(f32::MAX, f32::min);
        max - min
    };
    let range = spread(&p.last_logits);
    for (dtype, rel_tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
        let opts = LoadOptions { dtype: Some(dtype), device: test_device(), ..Default::default() };
        let m = load(dir.to_str().unwrap(), &opts).unwrap();
        assert_eq!(m.model.kv_cache_spec().dtype, dtype);
        let out = run(&m, vec![greedy(&p.prompt_ids, 1)], &with_logits()).remove(0);
        let err = max_abs_diff(out.prompt_logits.as_ref().unwrap(), &p.last_logits);
        assert!(err < rel_tol * range, "{dtype:?}: max abs diff {err} vs logit range {range}");
        assert_eq!(out.token_ids[0], p.greedy_ids[0], "{dtype:?}: first greedy token");
    }
}
