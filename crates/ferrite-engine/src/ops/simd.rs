//! Which SIMD level this CPU has, detected at run time so one binary runs everywhere and still
//! uses AVX2 or AVX-512 where present. Kernels compile their inner loop once per level with
//! `#[target_feature]` wrappers and pick one with [`level`].
//!
//! `FERRITE_SIMD=baseline|avx2|avx512|avx512-vnni` names the level (never above what the CPU
//! has), so the variants can be compared in one binary on one machine and a suspected kernel
//! ruled out. Unnamed, it is the widest the CPU has but [`SimdLevel::Avx512Vnni`], which a
//! user opts into until it has been measured against the FMA path on every workload.
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
    /// AVX-512F with BW and VNNI: the per-32 block formats' products (Q8_0, Q5_0, Q4_0) run on
    /// int8 dot products (`ops::blocks::lanes`); everything else as on [`SimdLevel::Avx512`].
    /// Only when `FERRITE_SIMD` names it, for now: on this machine it reads 4- and 5-bit
    /// weights near the memory's pace at one token, 1.4–2.2× the f32 FMAs', and batches run
    /// about even; a fuller A/B should make it the default (BENCHMARKS.md, session 22).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
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
        }
    }

    /// Every level this build knows, narrowest first.
    pub fn all() -> &'static [SimdLevel] {
        #[cfg(target_arch = "x86_64")]
        return &[SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512, SimdLevel::Avx512Vnni];
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
                return SimdLevel::Avx512Vnni;
            }
            return SimdLevel::Avx512;
        }
        if avx2 {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Baseline
}

/// The level this process's kernels use: the one `FERRITE_SIMD` names (no wider than
/// [`detected`]), else [`unnamed`]. Decided once; an unknown `FERRITE_SIMD` value is reported
/// on stderr and ignored.
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("FERRITE_SIMD").ok();
        capped(detected(), cap.as_deref()).unwrap_or_else(|message| {
            eprintln!("warning: {message}; using {}", unnamed(detected()).name());
            unnamed(detected())
        })
    })
}

/// The level a CPU that has `detected` runs unless told: all of it but the VNNI level.
fn unnamed(detected: SimdLevel) -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    if detected == SimdLevel::Avx512Vnni {
        return SimdLevel::Avx512;
    }
    detected
}

/// The level a `FERRITE_SIMD` value names, no wider than `detected`.
fn capped(detected: SimdLevel, cap: Option<&str>) -> Result<SimdLevel, String> {
    let Some(cap) = cap.map(str::trim).filter(|c| !c.is_empty()) else {
        return Ok(unnamed(detected));
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
        assert_eq!(capped(top, None), Ok(unnamed(top)));
        assert_eq!(capped(top, Some("")), Ok(unnamed(top)));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(unnamed(SimdLevel::Avx512Vnni), SimdLevel::Avx512, "the VNNI level is asked for");
        assert_eq!(capped(top, Some("BASELINE")), Ok(SimdLevel::Baseline));
        assert_eq!(capped(SimdLevel::Baseline, Some(top.name())), Ok(SimdLevel::Baseline));
        let err = capped(top, Some("sse9")).expect_err("unknown name");
        assert!(err.contains("\"sse9\"") && err.contains("baseline"), "{err}");
    }
}
