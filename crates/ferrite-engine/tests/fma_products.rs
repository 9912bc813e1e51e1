//! tests/gguf.rs's parity with the block formats' products in f32 FMAs (`FERRITE_SIMD=avx512`,
//! set for this test binary's own process), which a CPU with VNNI or AMX no longer takes by
//! default: the Q8_0 and Q4_0 fixtures served against their dequantized twins.

mod common;

/// Only f32 rounding separates the products from the twin's: parity's tolerance.
#[cfg(target_arch = "x86_64")]
const LOGIT_TOL: f32 = 1e-4;

#[test]
fn fma_products_serve_like_the_dequantized_weights() {
    #[cfg(target_arch = "x86_64")]
    common::twin::block_products_serve_like_twins("avx512", LOGIT_TOL);
    #[cfg(not(target_arch = "x86_64"))]
    println!("skipped: not an x86-64 CPU, no AVX-512 level");
}
