//! f16 and bf16 compute (on the CPU, or the GPU `FERRITE_TEST_DEVICE` names) through the
//! served path: the same model in half precision stays within what 11- and 8-bit mantissas
//! allow of its f32 distributions, and picks the same greedy tokens for as long as f32's
//! choice was clear by more than that tolerance.

mod common;

use common::*;
use ferrite_engine::{load, DType, LoadOptions};

#[test]
fn half_precision_tracks_f32() {
    check("llama");
}

/// The dense families beyond Llama: their norms, scalings, soft-caps and GELU in f16 and bf16
/// (Gemma's `(1 + w)`, Granite's multipliers). Not the mixtures: a half-precision router may
/// pick another expert where f32's top-k was close, a discrete change no tolerance on the
/// distributions can tell from a bug (seen: Mixtral's bf16 distribution moves by 5.7 at the step
/// a route flips).
#[test]
fn new_families_in_half_precision_track_f32() {
    for name in ["gemma2", "gemma3", "granite", "olmo2", "phi3"] {
        check(name);
    }
}

fn check(name: &str) {
    let dir = fixture(name);
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
        tracks(&reference, &half, rel_tol, &format!("{name} {dtype:?}"));
    }
}
