//! Opening the device the engine runs on.

use candle_core::Device;

use crate::error::EngineError;

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

/// A device as a user names it: `auto` (a GPU when this build has CUDA and one is present,
/// else the CPU), `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got `{s}`")),
        }
    }
}

impl DeviceChoice {
    /// The device, and a line saying which and why (`auto` falls back to the CPU, saying why).
    pub fn open(self) -> Result<(Device, String), EngineError> {
        match self {
            Self::Cpu => Ok((Device::Cpu, "CPU (asked for)".into())),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(EngineError::Device(format!(
                        "cuda:{n}: this build has no `cuda` feature (scripts/cuda-build.sh makes one)"
                    )));
                }
                let device = open_cuda(n).map_err(|e| EngineError::Device(format!("cuda:{n}: {e}")))?;
                Ok((device, format!("CUDA device {n}")))
            }
            Self::Auto if !cfg!(feature = "cuda") => Ok((Device::Cpu, "CPU (this build has no CUDA)".into())),
            Self::Auto => match open_cuda(0) {
                Ok(device) => Ok((device, "CUDA device 0 (auto)".into())),
                Err(e) => {
                    let why = e.to_string();
                    let why = why.lines().next().unwrap_or_default();
                    Ok((Device::Cpu, format!("CPU (no usable GPU: {why})")))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("cuda:N") && err.contains(bad), "{err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_auto_is_the_cpu_and_cuda_is_a_clear_error() {
        let (device, note) = DeviceChoice::Auto.open().unwrap();
        assert!(device.is_cpu() && note.contains("no CUDA"), "{note}");
        let err = DeviceChoice::Cuda(1).open().unwrap_err().to_string();
        assert!(err.contains("cuda:1") && err.contains("`cuda` feature"), "{err}");
    }
}
