//! Which SIMD level this CPU has, detected at run time so one binary runs everywhere and still
//! uses AVX2 or AVX-512 where present. Kernels compile their inner loop once per level with
//! `#[target_feature]` wrappers and pick one with [`level`].
//!
//! `FERRITE_SIMD=baseline|avx2|avx512|avx512-vnni|amx` names the level (never above what the
//! CPU has), so the variants can be compared in one binary on one machine and a suspected
//! kernel ruled out. Unnamed, it is the widest the CPU has.
//! Each process takes one level for all its products, so its outputs are batch-invariant.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Baseline,
    /// AVX2 with FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F (with AVX2, FMA and F16C).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512F with BW and VNNI: the block formats' products (Q8_0, Q5_0, Q4_0, and the
    /// K-quants where asked for exact products) run on int8 dot products
    /// (`ops::blocks::lanes`); everything else as on [`SimdLevel::Avx512`]. On this machine it
    /// reads 4- and 5-bit weights near the memory's pace at one token, 1.4–2.2× the f32 FMAs',
    /// and batches run about even (BENCHMARKS.md, sessions 22–23).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// [`SimdLevel::Avx512Vnni`] with AMX's int8 tiles (Linux, which must grant the process
    /// their state): the same integer sums and so the same bits, the products of 8 or more
    /// tokens on the tile unit (`ops::blocks::lanes::amx`): offline 1.1–1.3× the FMA path,
    /// prefill 0.9–1.4× (BENCHMARKS.md, session 23).
    #[cfg(target_arch = "x86_64")]
    Amx,
}

impl SimdLevel {
    /// The name `FERRITE_SIMD` takes, and logs and bench results show.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Baseline => "baseline",
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512Vnni => "avx512-vnni",
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Amx => "amx",
        }
    }

    /// Every level this build knows, narrowest first.
    pub fn all() -> &'static [SimdLevel] {
        #[cfg(target_arch = "x86_64")]
        return &[
            SimdLevel::Baseline,
            SimdLevel::Avx2,
            SimdLevel::Avx512,
            SimdLevel::Avx512Vnni,
            SimdLevel::Amx,
        ];
        #[cfg(not(target_arch = "x86_64"))]
        &[SimdLevel::Baseline]
    }
}

/// The widest level this CPU runs.
pub fn detected() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
            if std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                return if amx() { SimdLevel::Amx } else { SimdLevel::Avx512Vnni };
            }
            return SimdLevel::Avx512;
        }
        if avx2 {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Baseline
}

/// Whether this CPU has AMX tiles with int8 products and the OS lets this process use them:
/// CPUID leaf 7 (EDX bits 24 and 25), the OS saving tile state (XCR0 bits 17 and 18), and
/// Linux granting it (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process).
#[cfg(target_arch = "x86_64")]
fn amx() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7 only where leaf 0 lists it.
        let has_tiles = __cpuid(0).eax >= 7 && (__cpuid_count(7, 0).edx >> 24) & 3 == 3;
        // SAFETY: XGETBV is read only where CPUID says the OS enabled it (OSXSAVE).
        let os_saves = has_tiles
            && unsafe { (__cpuid(1).ecx >> 27) & 1 == 1 && (std::arch::x86_64::_xgetbv(0) >> 17) & 3 == 3 };
        os_saves && grant_tiles()
    })
}

/// Asks Linux for this process's AMX tile state.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn grant_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a system call with two integer arguments; it changes only this process's
    // permissions.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn grant_tiles() -> bool {
    false
}

/// The level this process's kernels use: the one `FERRITE_SIMD` names (no wider than
/// [`detected`]), else the widest it has. Decided once; an unknown `FERRITE_SIMD` value is reported
/// on stderr and ignored.
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("FERRITE_SIMD").ok();
        capped(detected(), cap.as_deref()).unwrap_or_else(|message| {
            eprintln!("warning: {message}; using {}", detected().name());
            detected()
        })
    })
}

/// The level a `FERRITE_SIMD` value names, no wider than `detected`.
fn capped(detected: SimdLevel, cap: Option<&str>) -> Result<SimdLevel, String> {
    let Some(cap) = cap.map(str::trim).filter(|c| !c.is_empty()) else {
        return Ok(detected);
    };
    let names: Vec<&str> = SimdLevel::all().iter().map(|l| l.name()).collect();
    match SimdLevel::all().iter().find(|l| l.name().eq_ignore_ascii_case(cap)) {
        Some(&wanted) => Ok(wanted.min(detected)),
        None => Err(format!("FERRITE_SIMD={cap:?} is not one of {}", names.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_never_raises_the_level_and_bad_names_are_named() {
        let top = *SimdLevel::all().last().expect("at least baseline");
        assert_eq!(capped(top, Some(top.name())), Ok(top));
        assert_eq!(capped(top, None), Ok(top));
        assert_eq!(capped(top, Some("")), Ok(top));
        assert_eq!(capped(top, Some("BASELINE")), Ok(SimdLevel::Baseline));
        assert_eq!(capped(SimdLevel::Baseline, Some(top.name())), Ok(SimdLevel::Baseline));
        let err = capped(top, Some("sse9")).expect_err("unknown name");
        assert!(err.contains("\"sse9\"") && err.contains("baseline"), "{err}");
    }
}
