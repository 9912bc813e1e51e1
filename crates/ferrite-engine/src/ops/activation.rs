//! The MLP's `act(gate) · up`, read straight from the stacked `gate_up` product. SiLU, the
//! common case, is fused: on the CPU in f32 one pass with a vectorizable SiLU (candle's calls
//! libm's `expf` per element, and narrowing, activating and multiplying make three passes and
//! two temporaries); on CUDA one kernel (`kernels/fused.cu`). The GELUs are candle's ops.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::math::exp_nonpositive;

/// `x · σ(x)`, with σ from one `e^{-|x|}`: no calls or branches, so loops over it vectorize.
/// Within 4 f32 epsilons of the true value, relative; 0 below -87 (true value under 1e-35).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let sigma = if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    x * sigma
}

/// The activation on an MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU by its tanh approximation (`gelu_pytorch_tanh`, `gelu_new`): Gemma.
    GeluTanh,
    /// Exact GELU, by the error function (`gelu`).
    GeluErf,
}

/// gate_up: `[tokens, 2 · intermediate]`, gate then up → `act(gate) · up`, `[tokens,
/// intermediate]`.
pub fn gated(gate_up: &Tensor, intermediate: usize, act: Activation) -> candle_core::Result<Tensor> {
    let gelu = match act {
        Activation::Silu => return silu_mul(gate_up, intermediate),
        Activation::GeluTanh => Tensor::gelu,
        Activation::GeluErf => Tensor::gelu_erf,
    };
    let (_, width) = gate_up.dims2()?;
    if width != 2 * intermediate {
        candle_core::bail!("gated: gate_up {:?} is not [tokens, 2 x {intermediate}]", gate_up.shape());
    }
    gelu(&gate_up.narrow(1, 0, intermediate)?)? * gate_up.narrow(1, intermediate, intermediate)?
}

/// gate_up: `[tokens, 2 · intermediate]`, gate then up → `[tokens, intermediate]`.
pub fn silu_mul(gate_up: &Tensor, intermediate: usize) -> candle_core::Result<Tensor> {
    let (_, width) = gate_up.dims2()?;
    if width != 2 * intermediate {
        candle_core::bail!("silu_mul: gate_up {:?} is not [tokens, 2 x {intermediate}]", gate_up.shape());
    }
    let fused = match gate_up.device() {
        Device::Cpu => gate_up.dtype() == DType::F32,
        Device::Cuda(_) => matches!(gate_up.dtype(), DType::F32 | DType::F16 | DType::BF16),
        _ => false,
    };
    if fused {
        return gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul);
    }
    let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, intermediate)?)?;
    gate * gate_up.narrow(1, intermediate, intermediate)?
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (tokens, width) = layout.shape().dims2()?;
        let (CpuStorage::F32(all), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("silu_mul: takes a contiguous f32 input");
        };
        let half = width / 2;
        let mut out = vec![0f32; tokens * half];
        if half > 0 {
            out.par_chunks_mut(half).zip(all[start..end].par_chunks(width)).for_each(|(o, row)| {
                let (gate, up) = row.split_at(half);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from_dims(&[tokens, half])))
    }

    /// `kernels/fused.cu`'s `silu_mul`: one launch instead of candle's SiLU and product over
    /// two strided halves (each with a host-to-device copy of its strides).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::CudaDType;
        use ferrite_kernels::launch::{self, KernelDType};

        fn run<T: KernelDType + CudaDType>(
            s: &candle_core::CudaStorage,
            (start, end): (usize, usize),
            half: usize,
        ) -> candle_core::Result<candle_core::CudaStorage> {
            let dev = s.device.clone();
            let input = s.as_cuda_slice::<T>()?.slice(start..end);
            // SAFETY: the kernel writes every output element.
            let mut out = unsafe { dev.alloc::<T>(((end - start) / 2).max(1)) }?;
            if end > start {
                launch::silu_mul(&dev, &input, half, &mut out)?;
            }
            Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
        }
        let (tokens, width) = layout.shape().dims2()?;
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("silu_mul: takes a contiguous input");
        };
        let half = width / 2;
        let out = match storage.dtype() {
            DType::F32 => run::<f32>(storage, range, half)?,
            DType::F16 => run::<half::f16>(storage, range, half)?,
            DType::BF16 => run::<half::bf16>(storage, range, half)?,
            other => candle_core::bail!("silu_mul: takes f32, f16 or bf16, got {other:?}"),
        };
        Ok((out, Shape::from_dims(&[tokens, half])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f64 `x / (1 + e^-x)`, over the range activations take and past exp's cut-off.
    #[test]
    fn silu_matches_f64_reference() {
        let mut x = -100f32;
        while x <= 100.0 {
            let want = f64::from(x) / (1.0 + (-f64::from(x)).exp());
            let got = f64::from(silu(x));
            // Relative, except below exp's cut-off at -87, where SiLU gives 0 for a true value
            // under 1e-35.
            let tol = 4.0 * f64::from(f32::EPSILON) * want.abs() + 1e-35;
            assert!((got - want).abs() <= tol, "silu({x}): {got} vs {want}");
            x += 1.0 / 64.0;
        }
        assert!(silu(f32::NAN).is_nan());
        assert_eq!(silu(f32::INFINITY), f32::INFINITY);
        // -inf · σ(-inf) = -inf · 0, NaN as in PyTorch and candle.
        assert!(silu(f32::NEG_INFINITY).is_nan());
    }

    #[test]
    fn fused_op_equals_candle_ops_and_checks_the_width() {
        let dev = Device::Cpu;
        let gate_up = (Tensor::randn(0f32, 3.0, (5, 14), &dev).unwrap()).contiguous().unwrap();
        let got = silu_mul(&gate_up, 7).unwrap().to_vec2::<f32>().unwrap();
        let rows = gate_up.to_vec2::<f32>().unwrap();
        for (t, row) in rows.iter().enumerate() {
            for i in 0..7 {
                let (g, u) = (f64::from(row[i]), f64::from(row[7 + i]));
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((f64::from(got[t][i]) - want).abs() <= 1e-5 * want.abs().max(1.0), "[{t}][{i}]");
            }
        }
        // A view that starts inside its storage (rows 1..4) reads its own rows.
        let view = gate_up.narrow(0, 1, 3).unwrap();
        assert_eq!(silu_mul(&view, 7).unwrap().to_vec2::<f32>().unwrap(), got[1..4].to_vec());
        let err = silu_mul(&gate_up, 6).unwrap_err();
        assert!(err.to_string().contains("not [tokens, 2 x 6]"), "{err}");
    }

    /// The GELUs against f64 references: the tanh form as PyTorch's `approximate="tanh"`
    /// writes it, and the exact one by the error function (erf from its series, which converges
    /// fast over the range tested).
    #[test]
    fn gelus_match_f64_references() {
        let erf = |x: f64| -> f64 {
            // erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let tanh_form = |x: f64| {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let exact = |x: f64| 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2));
        let xs: Vec<f32> = (-40..=40).map(|i| i as f32 / 8.0).collect();
        let n = xs.len();
        let mut row = xs.clone();
        row.extend(std::iter::repeat_n(1.5f32, n));
        let gate_up = Tensor::from_vec(row, (1, 2 * n), &Device::Cpu).unwrap();
        for (act, f) in
            [(Activation::GeluTanh, &tanh_form as &dyn Fn(f64) -> f64), (Activation::GeluErf, &exact)]
        {
            let got = gated(&gate_up, n, act).unwrap().to_vec2::<f32>().unwrap();
            for (x, g) in xs.iter().zip(&got[0]) {
                let want = f(f64::from(*x)) * 1.5;
                assert!((f64::from(*g) - want).abs() < 1e-5, "{act:?}({x}): {g} vs {want}");
            }
        }
    }
}
