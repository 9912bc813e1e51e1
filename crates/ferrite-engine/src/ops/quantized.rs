//! Linear weights kept in a GGUF block format (Q8_0, Q4_0, the K-quants, …) as the file stores
//! them, multiplied by candle's quantized kernels (`QTensor` as a custom op: on the CPU the
//! activation rows are quantized to the weight's dot-product partner format and multiplied
//! block by block; on CUDA its mmvq/mmq kernels). Rows of an embedding are dequantized as they
//! are looked up, so a quantized token embedding (tied to the head or not) is held once, in its
//! block format.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Tensor};

use super::packed::Bf16Products;

/// A `[n, k]` matrix in one GGUF block format; `k` is a whole number of blocks, so every row is
/// a run of whole blocks (`row_bytes` each).
pub struct QuantizedMatrix {
    tensor: Arc<QTensor>,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedMatrix [{}, {}] {}", self.n, self.k, self.dtype_name())
    }
}

/// Whether `dtype` is a block format (not a plain float one).
pub fn is_block_format(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The lower-case name llama.cpp gives a format (`q8_0`, `q4_k`, …).
pub fn format_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}").to_lowercase()
}

impl QuantizedMatrix {
    /// A rank-2 tensor in a block format whose rows are whole blocks.
    pub fn new(tensor: Arc<QTensor>) -> candle_core::Result<Self> {
        let (n, k) = tensor.shape().dims2()?;
        let dtype = tensor.dtype();
        if !is_block_format(dtype) {
            candle_core::bail!("a quantized matrix holds a block format, not {dtype:?}");
        }
        if !k.is_multiple_of(dtype.block_size()) {
            candle_core::bail!(
                "a {dtype:?} matrix's rows ({k}) must be whole blocks of {}",
                dtype.block_size()
            );
        }
        Ok(Self { tensor, n, k })
    }

    /// `(n, k)`: output and input sizes.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    pub fn dtype(&self) -> GgmlDType {
        self.tensor.dtype()
    }

    pub fn dtype_name(&self) -> String {
        format_name(self.dtype())
    }

    /// Bytes the blocks occupy.
    pub fn num_bytes(&self) -> usize {
        self.tensor.storage_size_in_bytes()
    }

    /// x: `[m, k]` → `[m, n]`, in x's dtype (candle's kernels take f32: another dtype is
    /// widened for the product and rounded back).
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, xk) = x.dims2()?;
        if xk != self.k {
            candle_core::bail!("linear: input {:?} does not match weight [{}, {}]", x.dims(), self.n, self.k);
        }
        let dtype = x.dtype();
        let x = if dtype == DType::F32 { x.contiguous()? } else { x.to_dtype(DType::F32)?.contiguous()? };
        let y = if x.device().is_cpu() {
            self.cpu_product(&x)?
        } else {
            x.apply_op1_no_bwd(self.tensor.as_ref())?
        };
        if dtype == DType::F32 {
            Ok(y)
        } else {
            y.to_dtype(dtype)
        }
    }

    /// On the CPU, each row's product the same bits whatever the row count (batch invariance:
    /// a sequence's tokens do not depend on its neighbours, or on whether a prefill or a decode
    /// step computed them). candle picks its x86 kernel by the row count in two places: a
    /// Q6_K row alone takes the compact one-row kernel, two or more rows the tiled one (another
    /// float summation order), so a lone row is multiplied as two; and on CPUs with AMX, Q4_K
    /// products of 32 or more rows take AMX tiles, so rows go 31 at a time.
    /// (`tests/gguf.rs` checks every fixture format for invariance, and would see a candle
    /// release that moves these lines.)
    fn cpu_product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        const BELOW_AMX: usize = 31;
        let m = x.dim(0)?;
        let op = self.tensor.as_ref();
        match self.dtype() {
            GgmlDType::Q6K if m == 1 => Tensor::cat(&[x, x], 0)?.apply_op1_no_bwd(op)?.narrow(0, 0, 1),
            GgmlDType::Q4K if m > BELOW_AMX => {
                let parts = (0..m)
                    .step_by(BELOW_AMX)
                    .map(|r| x.narrow(0, r, BELOW_AMX.min(m - r))?.apply_op1_no_bwd(op))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            }
            _ => x.apply_op1_no_bwd(op),
        }
    }

    pub fn is_cpu(&self) -> bool {
        self.tensor.device().is_cpu()
    }

    /// The blocks' bytes as the file stores them.
    pub fn raw_bytes(&self) -> candle_core::Result<std::borrow::Cow<'_, [u8]>> {
        self.tensor.data()
    }

    /// The whole matrix as f32 `[n, k]`, on its device.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        self.tensor.dequantize(&self.tensor.device())
    }

    /// Rows `ids` as f32 `[ids.len(), k]` (an embedding lookup), on the matrix's device.
    pub fn gather_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let host = ids.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>()?;
        if let Some(id) = host.iter().find(|&&id| id as usize >= self.n) {
            candle_core::bail!("token id {id} is outside the vocabulary ({} rows)", self.n);
        }
        self.tensor.embedding(ids)
    }

    /// The parts' rows one after another, as one matrix; `None` unless they share `k`, the
    /// device and the block format (rows are independent runs of blocks, so this is their bytes
    /// laid end to end).
    pub fn stack(parts: &[&QuantizedMatrix]) -> candle_core::Result<Option<Self>> {
        let Some(first) = parts.first() else { return Ok(None) };
        let same = parts.iter().all(|p| {
            p.k == first.k
                && p.dtype() == first.dtype()
                && p.tensor.device().same_device(&first.tensor.device())
        });
        if !same {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.num_bytes()).sum());
        for p in parts {
            bytes.extend_from_slice(&p.tensor.data()?);
        }
        let n = parts.iter().map(|p| p.n).sum::<usize>();
        let storage = QStorage::from_data(Cow::Owned(bytes), &first.tensor.device(), first.dtype())?;
        Ok(Some(Self::new(Arc::new(QTensor::new(storage, (n, first.k))?))?))
    }
}

/// How the CPU multiplies K-quant weights (Q4_K, Q5_K, Q6_K; `--exact-k-quants`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KQuants {
    /// candle's kernels, which round x to 8 bits per block before integer dot products (as
    /// llama.cpp does): ~0.7 % RMS off each product, and the faster decode.
    #[default]
    Rounded,
    /// Our panels (`ops::blocks`): the dequantized weights' outputs up to f32 rounding (on
    /// CPUs with VNNI or AMX, in int8 limbs that keep each x to about 2⁻²³ of its block's
    /// largest), at the file's size (+3 % for Q4_K/Q5_K); decode 15–25 % slower than
    /// `Rounded` on a model of K-quants throughout, offline about 0.6× (BENCHMARKS.md,
    /// sessions 21 and 23).
    Exact,
}

/// How the CPU's int8 products (`ops::blocks`, at the VNNI and AMX levels) take their
/// activations (`--int8-activations`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// Each x kept to about 2⁻²³ of its block's largest, in three int8 limbs: the dequantized
    /// weights' outputs up to f32 rounding.
    #[default]
    Exact,
    /// Each block of 32 x rounded to int8 on one scale (`max|x| / 127`, as llama.cpp's Q8_0
    /// activations are), so one integer product where exact takes three: each x off by up to
    /// half a step, 0.4 % of its block's largest (BENCHMARKS.md, session 24, for the speed).
    Int8,
}

/// How the CPU multiplies one model's block-format and bf16 weights (its load options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuProducts {
    pub k_quants: KQuants,
    pub activations: Activations,
    /// How bf16 weights multiply.
    pub bf16: Bf16Products,
}

/// A block format to quantize plain weights into at load (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    Q8_0,
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Quantize {
    pub fn ggml(self) -> GgmlDType {
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
            Quantize::Q4K => GgmlDType::Q4K,
            Quantize::Q5K => GgmlDType::Q5K,
            Quantize::Q6K => GgmlDType::Q6K,
        }
    }

    /// The format for a matrix of rows of `k`: this one, or where K-quant blocks (256) do not
    /// divide the rows, the 32-element format llama.cpp's quantizer falls back to (Q4_K → Q5_0,
    /// Q5_K → Q5_1, Q6_K → Q8_0: a little more precision, never less).
    pub fn format_for(self, k: usize) -> Option<GgmlDType> {
        let own = self.ggml();
        if k.is_multiple_of(own.block_size()) {
            return Some(own);
        }
        let fallback = match self {
            Quantize::Q4K => GgmlDType::Q5_0,
            Quantize::Q5K => GgmlDType::Q5_1,
            Quantize::Q6K => GgmlDType::Q8_0,
            Quantize::Q8_0 | Quantize::Q4_0 => return None,
        };
        k.is_multiple_of(fallback.block_size()).then_some(fallback)
    }
}

/// `w` `[n, k]` (any float dtype, any device) quantized to `kind` (or its fallback) on w's
/// device.
pub fn quantize_matrix(w: &Tensor, kind: Quantize) -> candle_core::Result<QuantizedMatrix> {
    let (_, k) = w.dims2()?;
    let Some(format) = kind.format_for(k) else {
        candle_core::bail!("--quantize {kind:?}: rows of {k} elements are not whole blocks of 32");
    };
    let f32 = w.to_dtype(DType::F32)?;
    let q = QTensor::quantize_onto(&f32, format, w.device())?;
    QuantizedMatrix::new(Arc::new(q))
}

/// Reorders the rows of a block-format `[rows, k]` tensor's bytes: row `i` of the result is row
/// `source(i)` of `data` (a row is `row_bytes` bytes). For undoing llama.cpp's q/k permutation
/// without dequantizing.
pub fn permute_rows(data: &[u8], rows: usize, source: impl Fn(usize) -> usize) -> Vec<u8> {
    let row_bytes = data.len() / rows.max(1);
    let mut out = Vec::with_capacity(data.len());
    for i in 0..rows {
        let s = source(i);
        out.extend_from_slice(&data[s * row_bytes..(s + 1) * row_bytes]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quantized(n: usize, k: usize, dtype: GgmlDType, seed: u64) -> (Tensor, QuantizedMatrix) {
        let dev = Device::Cpu;
        // Deterministic values without a RNG dependency: a scrambled sine.
        let values: Vec<f32> =
            (0..n * k).map(|i| ((i as f64 * 0.618 + seed as f64).sin() * 1.5) as f32).collect();
        let w = Tensor::from_vec(values, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        (w, QuantizedMatrix::new(Arc::new(q)).unwrap())
    }

    /// The product against the dequantized weight's plain f64 product: candle's CPU kernels
    /// quantize x to 8 bits per block (Q8_0 / Q8_K), an error of at most ~1/127 of each block's
    /// largest |x| per element, so the bound is relative to ‖x‖·‖w‖ of the row.
    #[test]
    fn product_matches_the_dequantized_weight() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let (n, k) = (40, 512);
            let (_, q) = quantized(n, k, dtype, 3);
            let w = q.tensor.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
            for m in [1, 3, 17] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let xv = x.to_vec2::<f32>().unwrap();
                let y = q.matmul(&x).unwrap().to_vec2::<f32>().unwrap();
                for r in 0..m {
                    for c in 0..n {
                        let want: f64 = (0..k).map(|i| f64::from(xv[r][i]) * f64::from(w[c][i])).sum();
                        let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
                        let bound = 2e-2 * norm(&xv[r]) * norm(&w[c]);
                        let got = f64::from(y[r][c]);
                        assert!((got - want).abs() <= bound, "{dtype:?} m {m} [{r}][{c}]: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn gathered_rows_are_the_dequantized_rows() {
        let (_, q) = quantized(12, 64, GgmlDType::Q8_0, 1);
        let w = q.tensor.dequantize(&Device::Cpu).unwrap();
        let ids = Tensor::new(&[3u32, 0, 11, 3], &Device::Cpu).unwrap();
        let got = q.gather_rows(&ids).unwrap();
        let want = w.index_select(&ids, 0).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let err = q.gather_rows(&Tensor::new(&[12u32], &Device::Cpu).unwrap()).unwrap_err();
        assert!(err.to_string().contains("token id 12 is outside the vocabulary (12 rows)"), "{err}");
    }

    #[test]
    fn stacked_matrices_give_their_parts_side_by_side() {
        let (_, a) = quantized(8, 64, GgmlDType::Q8_0, 1);
        let (_, b) = quantized(5, 64, GgmlDType::Q8_0, 2);
        let both = QuantizedMatrix::stack(&[&a, &b]).unwrap().expect("same format and k");
        assert_eq!(both.dims(), (13, 64));
        let x = Tensor::randn(0f32, 1.0, (2, 64), &Device::Cpu).unwrap();
        let want = Tensor::cat(&[a.matmul(&x).unwrap(), b.matmul(&x).unwrap()], 1).unwrap();
        assert_eq!(both.matmul(&x).unwrap().to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let (_, c) = quantized(8, 64, GgmlDType::Q4_0, 1);
        assert!(QuantizedMatrix::stack(&[&a, &c]).unwrap().is_none(), "formats differ");
    }

    /// `--quantize` keeps its format where K-quant blocks fit the rows and falls back as
    /// llama.cpp does where they do not; the result multiplies like its own dequantization.
    #[test]
    fn quantizing_at_load_picks_the_format_the_rows_allow() {
        assert_eq!(Quantize::Q4K.format_for(512), Some(GgmlDType::Q4K));
        assert_eq!(Quantize::Q4K.format_for(576), Some(GgmlDType::Q5_0));
        assert_eq!(Quantize::Q6K.format_for(64), Some(GgmlDType::Q8_0));
        assert_eq!(Quantize::Q8_0.format_for(48), None);
        let w = Tensor::randn(0f32, 1.0, (8, 576), &Device::Cpu).unwrap();
        let q = quantize_matrix(&w, Quantize::Q4K).unwrap();
        assert_eq!((q.dtype(), q.dims()), (GgmlDType::Q5_0, (8, 576)));
        // Q5_0 of unit normals: a step is the block's max |w| / 16; rounding moves a weight by
        // half a step, but the top code (15 of -16..15) clips the side opposite the block's
        // largest magnitude, by up to a whole step.
        let back = q.tensor.dequantize(&Device::Cpu).unwrap();
        let err = (back - &w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let amax = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= amax / 16.0 + 1e-6, "{err} vs {amax}");
        let err = quantize_matrix(&Tensor::zeros((2, 48), DType::F32, &Device::Cpu).unwrap(), Quantize::Q8_0)
            .unwrap_err();
        assert!(err.to_string().contains("rows of 48 elements are not whole blocks of 32"), "{err}");
    }

    #[test]
    fn permuted_rows_move_whole_rows() {
        let data: Vec<u8> = (0..12).collect();
        assert_eq!(permute_rows(&data, 3, |i| 2 - i), vec![8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]);
    }
}
