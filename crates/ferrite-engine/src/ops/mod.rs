//! Tensor ops that candle does not have: paged attention and its cache write, and sampling a
//! step's plain rows, each a CPU reference implementation and, with the `cuda` feature, its
//! CUDA kernel (kernels/, launched through ferrite-kernels) behind one Rust entry point. And the
//! CPU's f32 product with weights packed at load time (`packed`, used by `linear`).

pub mod activation;
pub mod fused;
pub mod linear;
pub mod math;
pub mod packed;
pub mod paged_attention;
pub mod sample;
pub mod simd;
