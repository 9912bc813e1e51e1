//! f16 and bf16 compute (on the CPU, or the GPU `FERRITE_TEST_DEVICE` names) through the
//! served path: the same model in half precision stays within what 11- and 8-bit mantissas
//! allow of its f32 distributions, and picks the same greedy tokens for as long as f32's
//! choice was clear by more than that tolerance.

mod common;

use common::*;
use ferrite_engine::{load, DType, LoadOptions};

#[test]
fn half_precision_tracks_f32() {
    let dir = fixture("llama");
    let r = reference(&dir);
    let run_all = |dtype: DType| {
        let opts = LoadOptions { dtype: Some(dtype), device: test_device(), ..Default::default() };
        let m = load(dir.to_str().unwrap(), &opts).unwrap();
        assert_eq!(m.model.kv_cache_spec().dtype, dtype);
        let engine = TestEngine::start(m, test_config());
        let requests = r.prompts.iter().map(|p| full(greedy(&p.prompt_ids, p.greedy_ids.len()))).collect();
        engine.generate(requests)
    };
    let reference = run_all(DType::F32);
    for (dtype, rel_tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
        let half = run_all(dtype);
        tracks(&reference, &half, rel_tol, &format!("{dtype:?}"));
    }
}
