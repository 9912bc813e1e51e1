//! Tensor ops that candle does not have: paged attention and its cache write, and the fused
//! layer steps (`fused`), each a CPU reference implementation and, with the `cuda` feature,
//! its CUDA kernel (kernels/, launched through ferrite-kernels) behind one Rust entry point.
//! And the CPU's f32 product with weights packed at load time (`packed`, used by `linear`), and
//! GGUF block-format weights multiplied in their blocks (`quantized`; on the CPU, formats of one
//! scale per 32 as int8 panels, `blocks`).
//! (Sampling on the logits' device is `sampler::device`.)

use candle_core::Layout;

pub mod activation;
pub mod blocks;
pub mod fused;
pub mod linear;
pub mod math;
pub mod packed;
pub mod paged_attention;
pub mod quantized;
pub mod simd;

/// A contiguous CPU tensor's elements, or an error naming it (`what`).
fn contiguous_elems<'a, T>(all: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous, got {:?}", l.dims())))?;
    Ok(&all[start..end])
}

/// A contiguous CUDA tensor's elements, or an error naming it (`what`).
#[cfg(feature = "cuda")]
fn contiguous_cuda_view<'a, T: candle_core::cuda_backend::CudaDType>(
    st: &'a candle_core::CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what} must be contiguous, got {:?}", l.dims())))?;
    Ok(st.as_cuda_slice::<T>()?.slice(start..end))
}
