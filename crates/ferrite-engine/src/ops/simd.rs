//! Which SIMD level this CPU has, detected at run time so one binary runs everywhere and still
//! uses AVX2 or AVX-512 where present. Kernels compile their inner loop once per level with
//! `#[target_feature]` wrappers and pick one with [`level`].

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdLevel {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The widest level available (detection is cached by the standard library).
pub fn level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return SimdLevel::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Baseline
}
