//! Opening the device the engine runs on.

use candle_core::Device;

/// CUDA device `ordinal`, set up for ferrite's one-stream use.
///
/// candle gives each CUDA device one stream of its own, which puts cudarc in its multi-stream
/// mode: every tensor then carries CUDA events, created with it, waited on and recorded at
/// each kernel argument, to order work across streams. All of ferrite's GPU work (candle's
/// ops, its own kernels in ferrite-kernels, copies) goes on that one stream, in issue order,
/// so the events order nothing. They cost driver calls on every launch, and a GPU decode step
/// at small batches is bound by the host's launches. Tracking is turned off before any tensor
/// is made on the device. Without the `cuda` feature this is candle's error for a CUDA device.
pub fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: one stream, candle's: every launch and copy of ferrite goes on
        // `cuda.cuda_stream()`, so stream order alone orders each tensor's uses and its free
        // (a free is stream-ordered too), and no tensor is used on another stream.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}
