//! tests/gguf.rs's parity with the per-32 block formats' products on int8 dot products
//! (`FERRITE_SIMD=avx512-vnni`, which this test binary sets for its own process before any
//! kernel runs): the Q8_0 and Q4_0 fixtures served against their dequantized twins. (Q5_0's
//! products are checked against the dequantized matrix in `ops::blocks`' tests; no fixture
//! holds it.)

mod common;

use common::twin::*;
use ferrite_engine::model::loader::KQuants;
#[cfg(target_arch = "x86_64")]
use ferrite_engine::ops::simd::{self, SimdLevel};

/// Only f32 rounding separates the products from the twin's: parity's tolerance.
#[cfg(target_arch = "x86_64")]
const LOGIT_TOL: f32 = 1e-4;

#[test]
fn int8_products_serve_like_the_dequantized_weights() {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::detected() < SimdLevel::Avx512Vnni {
            println!("skipped: this CPU has no AVX-512 VNNI ({})", simd::detected().name());
            return;
        }
        std::env::set_var("FERRITE_SIMD", "avx512-vnni");
        assert_eq!(simd::level(), SimdLevel::Avx512Vnni, "FERRITE_SIMD names the VNNI level");
        for (file, prompts) in [
            ("llama_linear-q8_0", "llama_linear"),
            ("qwen3-q8_0", "qwen3"),
            ("llama_linear-q4_0", "llama_linear"),
            ("qwen3-q4_0", "qwen3"),
        ] {
            let (_, worst_abs, agree, total) = against_twin(file, prompts, KQuants::Rounded);
            assert!(
                worst_abs < LOGIT_TOL,
                "{file}: log-softmax max abs diff {worst_abs} from its dequantized twin"
            );
            assert_eq!(agree, total, "{file}: greedy tokens differ from the twin's");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("skipped: not an x86-64 CPU, no VNNI level");
}
