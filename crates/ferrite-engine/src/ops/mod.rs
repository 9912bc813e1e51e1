//! Tensor ops that candle does not have: paged attention and its cache write, each a CPU
//! reference implementation behind one Rust entry point (CUDA kernels join them later).

pub mod linear;
pub mod paged_attention;
pub mod simd;
