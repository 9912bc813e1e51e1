//! What the engine's criterion benches share.

use candle_core::{DType, Device};

/// The device and dtype a bench runs on: `FERRITE_BENCH_DEVICE=cuda` (a `--features cuda` build
/// on a GPU machine: bf16), else the CPU in f32.
pub fn device() -> (Device, DType) {
    match std::env::var("FERRITE_BENCH_DEVICE").as_deref() {
        Ok("cuda") => match ferrite_engine::device::open_cuda(0) {
            Ok(dev) => (dev, DType::BF16),
            Err(e) => panic!("FERRITE_BENCH_DEVICE=cuda, but CUDA device 0 is unavailable: {e}"),
        },
        Ok("cpu") | Err(_) => (Device::Cpu, DType::F32),
        Ok(other) => panic!("FERRITE_BENCH_DEVICE={other:?}: expected cpu or cuda"),
    }
}
