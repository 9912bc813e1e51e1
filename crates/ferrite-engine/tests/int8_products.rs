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

#[test]
fn int8_products_serve_like_the_dequantized_weights() {
    #[cfg(target_arch = "x86_64")]
    common::twin::block_products_serve_like_twins("avx512-vnni", LOGIT_TOL);
    #[cfg(not(target_arch = "x86_64"))]
    println!("skipped: not an x86-64 CPU, no VNNI level");
}
