//! The summary statistics `vllm bench` reports, defined as numpy defines them.

/// Arithmetic mean; 0 for no values.
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Population standard deviation (numpy's default, ddof = 0); 0 for no values.
pub fn std_dev(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt()
}

/// The `p`-th percentile with linear interpolation between closest ranks (numpy's default);
/// 0 for no values.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = p.clamp(0.0, 100.0) / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (rank - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_numpy() {
        // numpy: np.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = [3, 7.6, 9.76]; np.std = 3.1623
        let v = [4.0, 1.0, 10.0, 3.0, 2.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert!((percentile(&v, 90.0) - 7.6).abs() < 1e-12);
        assert!((percentile(&v, 99.0) - 9.76).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(mean(&v), 4.0);
        assert!((std_dev(&v) - 10f64.sqrt()).abs() < 1e-12);
        assert_eq!((mean(&[]), std_dev(&[]), percentile(&[], 50.0)), (0.0, 0.0, 0.0));
    }
}
