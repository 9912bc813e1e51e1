//! Opening the device the engine runs on.

use candle_core::Device;

/// CUDA device `ordinal`, with cudarc's event tracking off.
///
/// candle opens a CUDA device on the per-thread default stream, so each host thread issues
/// its work on its own stream. With tracking on, cudarc creates two CUDA events with every
/// allocation and destroys them with it. They are for ordering a tensor's uses across streams
/// that cudarc creates itself, and ferrite creates none. So these events are never waited on
/// or recorded: they only cost two driver calls per allocation and two per free, and a step
/// allocates every intermediate tensor anew.
///
/// Work on different threads is ordered by explicit synchronization instead, which ferrite
/// already needs and does. `spawn_engine` synchronizes after loading and warm-up, before the
/// engine thread takes the model. Any new GPU work on another thread must do the same.
///
/// Tracking is off before any tensor is made on the device. Without the `cuda` feature this is
/// candle's error for a CUDA device.
pub fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: no tensor is shared between two streams without a synchronize in between.
        // Within a thread, its one stream orders every use and free; across threads (the model
        // and cache made on the loading thread, used on the engine thread), `spawn_engine`
        // synchronizes first. The events would order nothing more: cudarc waits on and records
        // them only for streams it creates, and ferrite creates none.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}
