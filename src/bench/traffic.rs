//! When `bench serve` sends its requests: at a fixed rate (Poisson, or gamma-distributed gaps
//! with `--burstiness`) or on a ramp from one rate to another (`--ramp-up-strategy`), as
//! `vllm bench serve` does.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

/// Send times (seconds after the start): gamma-distributed gaps with mean 1/rate, rescaled so
/// the last request goes out at N/rate; all zero for an infinite rate.
pub fn arrival_times(n: usize, rate: f64, burstiness: f64, seed: u64) -> Result<Vec<f64>> {
    if rate.is_infinite() {
        return Ok(vec![0.0; n]);
    }
    if rate <= 0.0 || burstiness <= 0.0 {
        bail!("--request-rate and --burstiness must be positive");
    }
    let gamma = Gamma::new(burstiness, 1.0 / (rate * burstiness)).context("--burstiness")?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            t += gamma.sample(&mut rng);
            t
        })
        .collect();
    if let Some(&last) = times.last() {
        if last > 0.0 {
            let scale = n as f64 / rate / last;
            times.iter_mut().for_each(|x| *x *= scale);
        }
    }
    Ok(times)
}

/// How `--ramp-up-strategy` moves the rate from request to request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RampStrategy {
    /// start + (end - start) · i / (n - 1) requests per second at request i of n.
    Linear,
    /// start · (end / start)^(i / (n - 1)).
    Exponential,
}

/// A rate ramp: the strategy and its two ends, requests per second.
#[derive(Debug, Clone, Copy)]
pub struct Ramp {
    pub strategy: RampStrategy,
    pub start_rps: f64,
    pub end_rps: f64,
}

impl Ramp {
    /// The ramp the flags ask for, checked (`request_rate` is `--request-rate`, which a ramp
    /// replaces); `None` without `--ramp-up-strategy`.
    pub fn from_flags(
        strategy: Option<RampStrategy>,
        start_rps: Option<f64>,
        end_rps: Option<f64>,
        request_rate: f64,
    ) -> Result<Option<Self>> {
        let Some(strategy) = strategy else {
            if start_rps.is_some() || end_rps.is_some() {
                bail!("--ramp-up-start-rps and --ramp-up-end-rps need --ramp-up-strategy linear|exponential");
            }
            return Ok(None);
        };
        let (Some(start_rps), Some(end_rps)) = (start_rps, end_rps) else {
            bail!("--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps");
        };
        if !request_rate.is_infinite() {
            bail!("--request-rate and --ramp-up-strategy both set the rate: give one");
        }
        for (flag, v) in [("--ramp-up-start-rps", start_rps), ("--ramp-up-end-rps", end_rps)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{flag} must be a positive number of requests per second, got {v}");
            }
        }
        Ok(Some(Self { strategy, start_rps, end_rps }))
    }

    /// The rate at request `i` of `n`.
    fn rate(&self, i: usize, n: usize) -> f64 {
        let progress = if n > 1 { i as f64 / (n - 1) as f64 } else { 0.0 };
        match self.strategy {
            RampStrategy::Linear => self.start_rps + (self.end_rps - self.start_rps) * progress,
            RampStrategy::Exponential => self.start_rps * (self.end_rps / self.start_rps).powf(progress),
        }
    }

    /// Send times: the first request at 0, each next one a gamma-distributed gap after it with
    /// the mean 1/rate of the request before (as vLLM sleeps after each request it yields).
    pub fn arrival_times(&self, n: usize, burstiness: f64, seed: u64) -> Result<Vec<f64>> {
        if burstiness <= 0.0 {
            bail!("--burstiness must be positive");
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut times = Vec::with_capacity(n);
        let mut t = 0.0;
        for i in 0..n {
            times.push(t);
            let gamma =
                Gamma::new(burstiness, 1.0 / (self.rate(i, n) * burstiness)).context("--burstiness")?;
            t += gamma.sample(&mut rng);
        }
        Ok(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::{mean, std_dev};

    /// A linear ramp from 2 to 20 requests/s: the first request at 0, gaps shrinking on
    /// average from 1/2 s towards 1/20 s; an exponential one between the same ends.
    #[test]
    fn ramps_move_the_rate_from_start_to_end() {
        let gaps = |t: &[f64]| -> Vec<f64> { t.windows(2).map(|w| w[1] - w[0]).collect() };
        for strategy in [RampStrategy::Linear, RampStrategy::Exponential] {
            let ramp = Ramp { strategy, start_rps: 2.0, end_rps: 20.0 };
            assert_eq!(ramp.rate(0, 101), 2.0);
            assert!((ramp.rate(100, 101) - 20.0).abs() < 1e-9);
            let t = ramp.arrival_times(2001, 1.0, 5).unwrap();
            assert_eq!(t[0], 0.0);
            let g = gaps(&t);
            let (early, late) = (mean(&g[..200]), mean(&g[1800..]));
            assert!(early > 3.0 * late, "{strategy:?}: early gaps {early}, late {late}");
        }
        // Halfway, linear is at the arithmetic mean of the ends, exponential at the geometric.
        let lin = Ramp { strategy: RampStrategy::Linear, start_rps: 2.0, end_rps: 18.0 };
        let exp = Ramp { strategy: RampStrategy::Exponential, start_rps: 2.0, end_rps: 18.0 };
        assert!((lin.rate(50, 101) - 10.0).abs() < 1e-9);
        assert!((exp.rate(50, 101) - 6.0).abs() < 1e-9);
    }

    #[test]
    fn arrivals_have_the_asked_rate_and_end_at_n_over_rate() {
        let t = arrival_times(200, 10.0, 1.0, 3).unwrap();
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        assert!((t[199] - 20.0).abs() < 1e-9, "{}", t[199]);
        assert_eq!(arrival_times(5, f64::INFINITY, 1.0, 0).unwrap(), vec![0.0; 5]);
        // Burstier traffic has more variable gaps than Poisson at the same mean.
        let cv = |t: &[f64]| {
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            std_dev(&gaps) / mean(&gaps)
        };
        assert!(
            cv(&arrival_times(2000, 10.0, 0.25, 1).unwrap())
                > cv(&arrival_times(2000, 10.0, 4.0, 1).unwrap())
        );
    }
}
