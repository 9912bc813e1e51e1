//! Rotary position embedding tables, with the scalings Llama-family configs use.
//!
//! Frequencies are computed in f32 the way transformers does (`1 / theta^(2i/d)`, then the
//! scaling), so angles at long positions round the same way as the reference.

use candle_core::{DType, Device, Tensor};

use crate::model::hf_config::{RopeConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rotary {
    /// `[head_dim / 2]` inverse frequencies after scaling.
    inv_freq: Vec<f32>,
    /// cos and sin of every position below a bound, `[positions, head_dim / 2]` in the compute
    /// dtype on the model's device ([`Self::with_table`]): a step gathers its rows on the
    /// device from `position_ids` instead of uploading tables it built on the host, so a
    /// captured CUDA graph reads its positions from a buffer it can be refilled through.
    table: Option<(Tensor, Tensor)>,
}

impl Rotary {
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let base: Vec<f32> =
            (0..half).map(|i| 1.0 / cfg.theta.powf((2 * i) as f32 / head_dim as f32)).collect();
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
        };
        Self { inv_freq, table: None }
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

    /// cos and sin `[positions.len(), head_dim / 2]` for the given absolute positions:
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
                cos.push(angle.cos());
                sin.push(angle.sin());
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
        let plain = Rotary::new(&RopeConfig { theta: 10_000.0, scaling: RopeScaling::Default }, 16);
        let scaled = Rotary::new(&cfg, 16);
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
        let r = Rotary::new(&RopeConfig { theta: 100.0, scaling: RopeScaling::Linear { factor: 2.0 } }, 4);
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
        let rotary = Rotary::new(&cfg, 8);
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
