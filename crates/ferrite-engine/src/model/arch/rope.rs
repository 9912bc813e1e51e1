//! Rotary position embedding tables, with the scalings Llama-family configs use.
//!
//! Frequencies are computed in f32 the way transformers does (`1 / theta^(2i/d)`, then the
//! scaling), so angles at long positions round the same way as the reference.

use candle_core::{DType, Device, Tensor};

use crate::model::hf_config::{RopeConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rotary {
    /// `[rotary_dim / 2]` inverse frequencies after scaling.
    inv_freq: Vec<f32>,
    /// cos and sin are multiplied by this (YaRN's and LongRoPE's attention factor; 1 otherwise).
    attention_scaling: f32,
    /// cos and sin of every position below a bound, `[positions, rotary_dim / 2]` in the compute
    /// dtype on the model's device ([`Self::with_table`]): a step gathers its rows on the
    /// device from `position_ids` instead of uploading tables it built on the host, so a
    /// captured CUDA graph reads its positions from a buffer it can be refilled through.
    table: Option<(Tensor, Tensor)>,
}

impl Rotary {
    /// The rotation of the first `rotary_dim` dimensions of each head, for an engine whose
    /// sequences reach `context_len` tokens at most: the scalings that depend on the context
    /// (LongRoPE's factor sets, dynamic NTK's base) are fixed for it, so every token of every
    /// sequence is rotated alike (a cached block means the same to everyone who shares it).
    /// Within the pretrained context that is transformers' choice exactly; past it, transformers
    /// switches per forward call by the longest sequence in it, which no batch-invariant engine
    /// can follow (llama.cpp chooses by its context size too).
    pub fn new(cfg: &RopeConfig, rotary_dim: usize, context_len: usize) -> Self {
        let half = rotary_dim / 2;
        // transformers: base ** (arange(0, dim, 2) / dim) in f32.
        let powers = |theta: f32| -> Vec<f32> {
            (0..half).map(|i| theta.powf((2 * i) as f32 / rotary_dim as f32)).collect()
        };
        let base: Vec<f32> = powers(cfg.theta).iter().map(|p| 1.0 / p).collect();
        let mut attention_scaling = 1.0;
        let inv_freq = match cfg.scaling {
            RopeScaling::Default => base,
            RopeScaling::Factors(ref factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth
                // blend between (transformers `_compute_llama3_parameters`).
                let old_len = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                        let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                        if medium {
                            let smooth =
                                (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                attention_scaling = attention_factor;
                // transformers `_compute_yarn_parameters`: the dimensions whose wavelengths
                // fit `beta_fast` to `beta_slow` rotations into the original context get a
                // linear ramp from kept (extrapolated) to divided (interpolated).
                let dim = rotary_dim as f64;
                let theta = f64::from(cfg.theta);
                let correction_dim = |rotations: f64| {
                    dim * (original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let (low, high) = (low as f32, high as f32);
                powers(cfg.theta)
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let kept_share = 1.0 - ramp;
                        let (kept, divided) = (1.0 / p, 1.0 / (factor * p));
                        divided * (1.0 - kept_share) + kept * kept_share
                    })
                    .collect()
            }
            RopeScaling::LongRope {
                ref short_factor,
                ref long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                attention_scaling = attention_factor;
                let factors =
                    if context_len > original_max_position_embeddings { long_factor } else { short_factor };
                powers(cfg.theta).iter().zip(factors).map(|(p, e)| 1.0 / (e * p)).collect()
            }
            RopeScaling::DynamicNtk { factor, max_position_embeddings } => {
                // transformers `_compute_dynamic_ntk_parameters` at seq_len = the context: the
                // plain base up to max_position_embeddings, a larger one past it.
                let seq_len = context_len.max(max_position_embeddings) as f64;
                let (factor, dim) = (f64::from(factor), rotary_dim as f64);
                let grown = f64::from(cfg.theta)
                    * ((factor * seq_len / max_position_embeddings as f64) - (factor - 1.0))
                        .powf(dim / (dim - 2.0));
                powers(grown as f32).iter().map(|p| 1.0 / p).collect()
            }
        };
        Self { inv_freq, attention_scaling, table: None }
    }

    /// Precomputes the tables of positions `0..positions` on `device` (the same values and
    /// roundings as [`Self::cos_sin`] computes per step).
    pub fn with_table(
        mut self,
        positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let all: Vec<u32> = (0..positions as u32).collect();
        self.table = Some(self.computed(&all, dtype, device)?);
        Ok(self)
    }

    /// Whether the device table holds every one of `positions`.
    pub fn table_holds(&self, positions: &[u32]) -> bool {
        let len = self.table.as_ref().map_or(0, |(cos, _)| cos.dims()[0]);
        positions.iter().all(|&p| (p as usize) < len)
    }

    /// cos and sin `[positions.len(), rotary_dim / 2]` for the given absolute positions:
    /// gathered from the table by `position_ids` (the same positions on the device) where the
    /// table holds them all, else computed.
    pub fn cos_sin(
        &self,
        positions: &[u32],
        position_ids: &Tensor,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match &self.table {
            Some((cos, sin)) if self.table_holds(positions) => {
                Ok((cos.index_select(position_ids, 0)?, sin.index_select(position_ids, 0)?))
            }
            _ => self.computed(positions, dtype, device),
        }
    }

    fn computed(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            },
        };
        let plain = Rotary::new(&RopeConfig { theta: 10_000.0, scaling: RopeScaling::Default }, 16, 64);
        let scaled = Rotary::new(&cfg, 16, 64);
        // i = 0: wavelength 2π < 16 (= 64 / 4): unchanged.
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0]);
        // i = 7: wavelength 2π / 10000^(-14/16) ≈ 2012 > 64: divided by 8.
        assert!((scaled.inv_freq[7] - plain.inv_freq[7] / 8.0).abs() < 1e-12);
        // Somewhere between: strictly between the two.
        let mid = (0..8)
            .find(|&i| {
                scaled.inv_freq[i] != plain.inv_freq[i]
                    && (scaled.inv_freq[i] - plain.inv_freq[i] / 8.0).abs() > 1e-9
            })
            .expect("a blended frequency");
        assert!(
            scaled.inv_freq[mid] < plain.inv_freq[mid] && scaled.inv_freq[mid] > plain.inv_freq[mid] / 8.0
        );
    }

    #[test]
    fn tables_match_hand_computed_angles() {
        let r =
            Rotary::new(&RopeConfig { theta: 100.0, scaling: RopeScaling::Linear { factor: 2.0 } }, 4, 64);
        let ids = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        let (cos, sin) = r.cos_sin(&[0, 3], &ids, DType::F32, &Device::Cpu).unwrap();
        let cos = cos.to_vec2::<f32>().unwrap();
        let sin = sin.to_vec2::<f32>().unwrap();
        assert_eq!(cos[0], vec![1.0, 1.0]);
        // inv_freq = [1, 0.1] / 2; position 3 -> angles 1.5 and 0.15.
        assert!((cos[1][0] - 1.5f32.cos()).abs() < 1e-6 && (sin[1][1] - 0.15f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn gathered_rows_are_the_computed_rows() {
        let cfg = RopeConfig { theta: 10_000.0, scaling: RopeScaling::Default };
        let rotary = Rotary::new(&cfg, 8, 64);
        let table = rotary.clone().with_table(64, DType::F32, &Device::Cpu).unwrap();
        let positions = [5u32, 0, 63, 17];
        let ids = Tensor::new(&positions, &Device::Cpu).unwrap();
        let (c0, s0) = rotary.cos_sin(&positions, &ids, DType::F32, &Device::Cpu).unwrap();
        let (c1, s1) = table.cos_sin(&positions, &ids, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(c0.to_vec2::<f32>().unwrap(), c1.to_vec2::<f32>().unwrap());
        assert_eq!(s0.to_vec2::<f32>().unwrap(), s1.to_vec2::<f32>().unwrap());
        // A position past the table is computed, not gathered out of range.
        let far = [64u32, 1];
        let ids = Tensor::new(&far, &Device::Cpu).unwrap();
        let (c2, _) = table.cos_sin(&far, &ids, DType::F32, &Device::Cpu).unwrap();
        let (c3, _) = rotary.cos_sin(&far, &ids, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(c2.to_vec2::<f32>().unwrap(), c3.to_vec2::<f32>().unwrap());
    }
}
