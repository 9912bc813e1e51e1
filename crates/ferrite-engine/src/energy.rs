//! How much energy the device used, where the machine lets us read it: Intel/AMD RAPL on the
//! CPU, NVML on an NVIDIA GPU (sampled on a thread where the counter refreshes slower than
//! steps end). The engine charges each step's joules to its requests as it does device time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Cumulative energy of the device, where the machine lets us read it.
pub trait EnergyMeter: Send {
    /// Joules since an arbitrary origin (monotonic apart from counter wrap, handled inside).
    fn joules(&mut self) -> Option<f64>;
}

/// Intel/AMD RAPL through `/sys/class/powercap`: the package domains' `energy_uj`, summed,
/// unwrapped at `max_energy_range_uj`.
pub struct Rapl {
    domains: Vec<(PathBuf, u64, u64)>,
    total_uj: f64,
}

impl Rapl {
    /// Every readable top-level package domain under `root` (normally /sys/class/powercap);
    /// `None` when there is none (a VM, or no permission): energy is then unavailable.
    pub fn open(root: &Path) -> Option<Self> {
        let mut domains = Vec::new();
        for entry in std::fs::read_dir(root).ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            // intel-rapl:0, intel-rapl:1 (packages); intel-rapl:0:0 are sub-domains of those.
            if !name.starts_with("intel-rapl:") || name.matches(':').count() != 1 {
                continue;
            }
            let dir = entry.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok()?.trim().parse::<u64>().ok();
            if let (Some(now), Some(max)) = (read("energy_uj"), read("max_energy_range_uj")) {
                domains.push((dir.join("energy_uj"), now, max));
            }
        }
        (!domains.is_empty()).then_some(Self { domains, total_uj: 0.0 })
    }
}

impl EnergyMeter for Rapl {
    fn joules(&mut self) -> Option<f64> {
        for (path, last, max) in &mut self.domains {
            let now: u64 = std::fs::read_to_string(&*path).ok()?.trim().parse().ok()?;
            let delta = if now >= *last { now - *last } else { now + (*max - *last) };
            self.total_uj += delta as f64;
            *last = now;
        }
        Some(self.total_uj / 1e6)
    }
}

/// The meter for this machine: RAPL on CPU where readable, else none (never an invented number).
/// NVIDIA GPUs (Volta and newer): NVML's total energy counter of the card the model runs on,
/// millijoules since the driver loaded. NVML is loaded at run time (libnvidia-ml.so.1 comes
/// with the driver); without it, or on an older card, there is no meter.
pub struct NvmlEnergy {
    nvml: nvml_wrapper::Nvml,
    /// NVML's index of the card, found once by the PCI bus id CUDA gives it (NVML and CUDA
    /// number cards differently; the lookup by bus id is slow, the one by index is not), else
    /// the CUDA ordinal.
    index: u32,
}

impl NvmlEnergy {
    /// The meter of CUDA device `ordinal`, if NVML is there and the card counts energy.
    pub fn open(ordinal: usize) -> Option<Self> {
        let nvml = nvml_wrapper::Nvml::init().ok()?;
        let index = match cuda_pci_bus_id(ordinal) {
            Some(id) => nvml.device_by_pci_bus_id(id.as_str()).ok()?.index().ok()?,
            None => u32::try_from(ordinal).ok()?,
        };
        let mut meter = Self { nvml, index };
        meter.joules()?;
        Some(meter)
    }
}

impl EnergyMeter for NvmlEnergy {
    fn joules(&mut self) -> Option<f64> {
        let device = self.nvml.device_by_index(self.index).ok()?;
        Some(device.total_energy_consumption().ok()? as f64 / 1000.0)
    }
}

/// A meter read on a thread of its own every `period`, for meters too slow to read on the
/// engine thread once per step (NVML's energy counter took ~4 ms a read on a lent H200, more
/// than a small model's whole step). Between changes of the counter it is carried forward at
/// the power of the last interval between changes, for at most max(3 periods, 2 s); what it
/// returns never goes down, so the steps' shares add up to what the card's counter measured, to
/// within one carry.
pub struct SampledMeter {
    clock: Arc<Mutex<EnergyClock>>,
    /// The last value returned: readings may come in below a carried-forward estimate.
    last: f64,
}

/// The meter's last reading and the power of the interval before it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnergyClock {
    at: Instant,
    joules: f64,
    watts: f64,
    /// The longest a reading is carried forward: past it (the meter stopped answering) the
    /// counter stands still rather than charge energy nobody measured.
    max_carry: Duration,
}

impl EnergyClock {
    pub fn new(at: Instant, joules: f64, max_carry: Duration) -> Self {
        EnergyClock { at, joules, watts: 0.0, max_carry }
    }

    /// A new reading. The power is the average since the counter last changed (0 if it went
    /// back). A reading equal to the last one changes nothing: a card's counter refreshes on
    /// its own cadence, which may be slower than ours, and an unchanged value means "not yet
    /// refreshed", not "no power", so the estimate keeps being carried from the last change.
    pub fn update(&mut self, at: Instant, joules: f64) {
        if joules == self.joules {
            return;
        }
        let dt = at.saturating_duration_since(self.at).as_secs_f64();
        if dt > 0.0 {
            self.watts = ((joules - self.joules) / dt).max(0.0);
        }
        (self.at, self.joules) = (at, joules);
    }

    /// The counter at `t`, carried forward from the last change at the last power, for at
    /// most `max_carry`.
    pub fn joules_at(&self, t: Instant) -> f64 {
        self.joules + self.watts * t.saturating_duration_since(self.at).min(self.max_carry).as_secs_f64()
    }
}

impl SampledMeter {
    /// Reads `meter` now (`None` if it cannot be read), then every `period` on a thread that
    /// ends once this handle is dropped.
    pub fn spawn(mut meter: Box<dyn EnergyMeter>, period: Duration) -> Option<Self> {
        let first = meter.joules()?;
        let max_carry = (3 * period).max(MIN_MAX_CARRY);
        let clock = Arc::new(Mutex::new(EnergyClock::new(Instant::now(), first, max_carry)));
        let weak = Arc::downgrade(&clock);
        std::thread::Builder::new()
            .name("ferrite-energy".into())
            .spawn(move || loop {
                std::thread::sleep(period);
                let Some(clock) = weak.upgrade() else { return };
                if let Some(j) = meter.joules() {
                    clock.lock().unwrap_or_else(|p| p.into_inner()).update(Instant::now(), j);
                }
            })
            .ok()?;
        Some(SampledMeter { clock, last: first })
    }

    /// A meter over `clock` without a sampling thread (for tests).
    #[cfg(test)]
    fn from_clock(clock: Arc<Mutex<EnergyClock>>) -> Self {
        let last = clock.lock().unwrap_or_else(|p| p.into_inner()).joules;
        SampledMeter { clock, last }
    }

    fn joules_at(&mut self, t: Instant) -> f64 {
        let estimate = self.clock.lock().unwrap_or_else(|p| p.into_inner()).joules_at(t);
        self.last = self.last.max(estimate);
        self.last
    }
}

impl EnergyMeter for SampledMeter {
    fn joules(&mut self) -> Option<f64> {
        Some(self.joules_at(Instant::now()))
    }
}

/// The PCI bus id CUDA gives device `ordinal` ("0000:65:00.0"), which NVML looks cards up by.
#[cfg(feature = "cuda")]
fn cuda_pci_bus_id(ordinal: usize) -> Option<String> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    result::init().ok()?;
    let device = result::device::get(i32::try_from(ordinal).ok()?).ok()?;
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: the buffer's length is passed; CUDA writes a NUL-terminated string into it.
    unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, device) }.result().ok()?;
    // SAFETY: NUL-terminated within the buffer (CUDA's contract, 13 characters plus NUL).
    let id = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(id.to_string_lossy().into_owned())
}

#[cfg(not(feature = "cuda"))]
fn cuda_pci_bus_id(_ordinal: usize) -> Option<String> {
    None
}

/// How often NVML's counter is read (by [`SampledMeter`]'s thread).
const NVML_PERIOD: Duration = Duration::from_millis(100);

/// The shortest a [`SampledMeter`] carries a reading forward: longer than a counter's own
/// refresh interval (NVML's may be slower than our reads), so steps between two refreshes are
/// charged at the last power instead of nothing.
const MIN_MAX_CARRY: Duration = Duration::from_secs(2);

/// The meter for where the model runs: NVML for a CUDA device, RAPL for the CPU, else none
/// (energy is then reported as unavailable, never estimated).
pub fn default_energy_meter(device: &candle_core::Device) -> Option<Box<dyn EnergyMeter>> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => NvmlEnergy::open(gpu_id)
            .and_then(|m| SampledMeter::spawn(Box::new(m), NVML_PERIOD))
            .map(|m| Box::new(m) as Box<dyn EnergyMeter>),
        candle_core::DeviceLocation::Cpu => {
            Rapl::open(Path::new("/sys/class/powercap")).map(|r| Box::new(r) as Box<dyn EnergyMeter>)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_nvml_a_gpu_has_no_energy_meter_rather_than_an_invented_one() {
        if nvml_wrapper::Nvml::init().is_ok() {
            use std::io::Write;
            return writeln!(std::io::stderr(), "skipped: NVML is present here").unwrap_or(());
        }
        assert!(NvmlEnergy::open(0).is_none());
    }

    #[test]
    fn the_energy_clock_carries_the_last_power_forward() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = EnergyClock::new(t0, 100.0, s(3));
        assert_eq!(c.joules_at(t0 + s(5)), 100.0, "no power known before a second reading");
        c.update(t0 + s(1), 150.0);
        assert!((c.joules_at(t0 + Duration::from_millis(1500)) - 175.0).abs() < 1e-9);
        assert_eq!(c.joules_at(t0 + s(60)), 300.0, "carried 3 s at most: the meter went quiet");
        c.update(t0 + s(2), 140.0); // a counter that went back: no negative power
        assert_eq!(c.joules_at(t0 + s(3)), 140.0);
    }

    #[test]
    fn a_counter_that_refreshes_slower_than_it_is_read_is_carried_between_refreshes() {
        // Read every 100 ms; the card's counter moves once a second, by 50 J (50 W).
        let t0 = Instant::now();
        let ms = |x: u64| t0 + Duration::from_millis(x);
        let mut c = EnergyClock::new(t0, 0.0, Duration::from_secs(2));
        c.update(ms(1000), 50.0);
        for t in (1100..2000).step_by(100) {
            c.update(ms(t), 50.0); // not refreshed yet: must not read as 0 W
        }
        assert!((c.joules_at(ms(1500)) - 75.0).abs() < 1e-9, "{}", c.joules_at(ms(1500)));
        c.update(ms(2000), 100.0);
        assert!((c.joules_at(ms(2250)) - 112.5).abs() < 1e-9, "50 W over the whole second");
        assert_eq!(c.joules_at(ms(9000)), 200.0, "carried 2 s at most");
    }

    #[test]
    fn a_sampled_meter_never_goes_down_and_its_steps_add_up_to_the_counter() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let clock = Arc::new(Mutex::new(EnergyClock::new(t0, 0.0, Duration::from_secs(10))));
        let mut m = SampledMeter::from_clock(clock.clone());
        clock.lock().unwrap().update(s(1.0), 100.0); // 100 W
        let mut readings = vec![m.joules_at(s(1.0)), m.joules_at(s(2.0))];
        assert_eq!(readings, [100.0, 200.0], "carried forward at 100 W");
        clock.lock().unwrap().update(s(2.0), 150.0); // the card really used 50 J: 50 W
        readings.push(m.joules_at(s(2.5))); // 175 estimated: held at 200
        readings.push(m.joules_at(s(3.5))); // 225
        assert_eq!(readings[2..], [200.0, 225.0]);
        clock.lock().unwrap().update(s(4.0), 250.0);
        readings.push(m.joules_at(s(4.0)));
        let steps: f64 = readings.windows(2).map(|w| w[1] - w[0]).sum();
        assert!(readings.windows(2).all(|w| w[1] >= w[0]), "{readings:?}");
        assert_eq!(readings[0] + steps, 250.0, "the steps add up to the card's counter");
    }

    struct FakeMeter(Option<f64>);
    impl EnergyMeter for FakeMeter {
        fn joules(&mut self) -> Option<f64> {
            self.0
        }
    }

    #[test]
    fn a_sampled_meter_starts_from_a_first_reading_or_not_at_all() {
        let mut m = SampledMeter::spawn(Box::new(FakeMeter(Some(42.0))), Duration::from_secs(3600)).unwrap();
        assert_eq!(m.joules(), Some(42.0));
        assert!(SampledMeter::spawn(Box::new(FakeMeter(None)), Duration::from_secs(3600)).is_none());
    }

    #[test]
    fn rapl_sums_packages_and_unwraps_the_counter() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("intel-rapl:0");
        let sub = dir.path().join("intel-rapl:0:0");
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::create_dir_all(&sub).unwrap();
        let write = |d: &Path, e: u64| {
            std::fs::write(d.join("energy_uj"), format!("{e}\n")).unwrap();
            std::fs::write(d.join("max_energy_range_uj"), "1000000\n").unwrap();
        };
        write(&pkg, 900_000);
        write(&sub, 5);
        let mut r = Rapl::open(dir.path()).unwrap();
        assert_eq!(r.joules(), Some(0.0));
        write(&pkg, 950_000);
        assert!((r.joules().unwrap() - 0.05).abs() < 1e-12);
        write(&pkg, 50_000); // wrapped past 1 J
        assert!((r.joules().unwrap() - 0.15).abs() < 1e-12);
        assert!(Rapl::open(&dir.path().join("absent")).is_none());
    }
}
