//! ferrite's own CUDA kernels: the sources live in `kernels/` at the workspace root, build.rs
//! compiles each `.cu` to PTX with nvcc (feature `cuda`), and this crate embeds the PTX and
//! launches the kernels on candle's CUDA device.
//!
//! - [`plan`]: host-side launch geometry and the shape limits of the kernels (pure Rust, always
//!   built, tested without a GPU).
//! - `ptx` (feature `cuda`): the embedded PTX modules and their kernel names.
//! - `launch` (feature `cuda`): thin `unsafe` launch wrappers over cudarc.

pub mod plan;

#[cfg(feature = "cuda")]
pub mod launch;
#[cfg(feature = "cuda")]
pub mod ptx;
