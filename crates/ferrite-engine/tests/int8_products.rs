//! tests/gguf.rs's parity with the block formats' products on VNNI's int8 dot products alone
//! (`FERRITE_SIMD=avx512-vnni`, set for this test binary's own process): the Q8_0 and Q4_0
//! fixtures served against their dequantized twins. The default level on an AMX CPU runs
//! prompts on AMX tiles (tests/gguf.rs), and `fma_products.rs` pins the f32 FMA path. (Q5_0's
//! products are checked against the dequantized matrix in `ops::blocks`' tests; no fixture
//! holds it.)

mod common;

/// Only f32 rounding separates the products from the twin's: parity's tolerance.
#[cfg(target_arch = "x86_64")]
const LOGIT_TOL: f32 = 1e-4;
/// int8 activations' bound on the first token's logits (relative RMS): 4.9–6.7 % measured on
/// the four fixtures (random weights, whose near-ties two layers amplify), with a margin.
#[cfg(target_arch = "x86_64")]
const INT8_TOL: f32 = 0.10;

#[test]
fn int8_products_serve_like_the_dequantized_weights() {
    #[cfg(target_arch = "x86_64")]
    common::twin::block_products_serve_like_twins("avx512-vnni", LOGIT_TOL);
    #[cfg(not(target_arch = "x86_64"))]
    println!("skipped: not an x86-64 CPU, no VNNI level");
}

/// `--int8-activations` through the served path, at the same level: each block of 32
/// activations rounded to int8 moves the Q8_0 and Q4_0 fixtures' first-token logits off their
/// dequantized twins' by more than f32 rounding (the option reaches the products) but within
/// [`INT8_TOL`]; on the K-quant fixtures (under `--exact-k-quants`) no farther than candle's
/// kernels, which round x to 8 bits per 256 as llama.cpp does; and a prompt's tokens and every
/// logprob are the same bits alone and among the others.
#[test]
fn int8_activations_serve_near_the_twins_and_batch_invariant() {
    #[cfg(target_arch = "x86_64")]
    {
        use common::twin::*;
        use common::*;
        use ferrite_engine::model::loader::{Activations, KQuants};
        if !pin_level("avx512-vnni") {
            return;
        }
        for (file, prompts) in BLOCK_FIXTURES {
            let (worst, worst_abs, _, _) = against_twin(file, prompts, KQuants::Rounded, Activations::Int8);
            assert!(worst_abs > LOGIT_TOL, "{file}: int8 activations changed nothing ({worst_abs})");
            assert!(worst < INT8_TOL, "{file}: logits {:.2} % (RMS) off the twin's", worst * 100.0);
        }
        // On the K-quant fixtures, against candle's kernels, which round x per 256 to 8 bits
        // (llama.cpp's Q8_K): rounding per 32 lands no farther from the twin.
        for file in ["kquant-q4_k_m", "kquant-q5_k_m"] {
            let (ours, _, _, _) = against_twin(file, "llama_linear", KQuants::Exact, Activations::Int8);
            let (candle, _, _, _) = against_twin(file, "llama_linear", KQuants::Rounded, Activations::Exact);
            assert!(
                ours <= candle,
                "{file}: {:.2} % off the twin, candle's rounding {:.2} %",
                ours * 100.0,
                candle * 100.0
            );
        }
        let opts = ferrite_engine::LoadOptions {
            dtype: Some(ferrite_engine::DType::F32),
            device: test_device(),
            activations: Activations::Int8,
            ..Default::default()
        };
        let m = ferrite_engine::load(gguf("llama_linear-q8_0.gguf").to_str().unwrap(), &opts).unwrap();
        let engine = TestEngine::start(m, test_config());
        let requests = || -> Vec<_> {
            reference(&fixture("llama_linear"))
                .prompts
                .iter()
                .map(|p| full(greedy(&p.prompt_ids, 8)))
                .collect()
        };
        let together = engine.generate(requests());
        for (i, request) in requests().into_iter().enumerate() {
            let alone = engine.generate_one(request);
            assert_eq!(alone.token_ids, together[i].token_ids, "prompt {i}: tokens alone vs among others");
            assert_eq!(bits(&alone), bits(&together[i]), "prompt {i}: logprobs alone vs among others");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("skipped: not an x86-64 CPU, no VNNI level");
}
