//! `y = x Wᵀ + b` for the decoder's projections. On the CPU, computing in f32, the weight is
//! packed once, when the layer is built, in its own dtype (f32, bf16 or f16), and every product
//! (one decode token up to a prefill chunk) runs through [`PackedMatrix`]'s register tiles in
//! f32. Elsewhere (CUDA, or f16/bf16 compute) it is candle's matmul. A GGUF block-format
//! weight (Q8_0, Q4_K, …) stays in its blocks and multiplies through [`QuantizedMatrix`].

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};

use super::blocks::BlockPanels;
use super::packed::{Bf16Products, PackedMatrix};
use super::quantized::{CpuProducts, QuantizedMatrix};

/// The weight as the device's product wants it.
#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]` as stored in the checkpoint.
    Dense(Tensor),
    /// On the CPU computing in f32: panels of f32, bf16 or f16.
    Packed(Arc<PackedMatrix>),
    /// In a GGUF block format.
    Quantized(Arc<QuantizedMatrix>),
    /// On the CPU, in our panels (Q8_0, Q5_0, Q4_0, and the K-quants where asked).
    Blocks(Arc<BlockPanels>),
    /// Parts whose rows could not be laid into one matrix (block formats that differ, as a
    /// Q4_K_M file's q, k and v do): each multiplies on its own and the outputs are joined.
    Parts(Vec<Weight>),
}

impl Weight {
    fn num_bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => tensor_bytes(w),
            Weight::Packed(p) => p.num_bytes(),
            Weight::Quantized(q) => q.num_bytes(),
            Weight::Blocks(b) => b.num_bytes(),
            Weight::Parts(parts) => parts.iter().map(Weight::num_bytes).sum(),
        }
    }

    fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(w) if gemv_takes(x, w) => gemv(x, w),
            Weight::Dense(w) => x.matmul(&w.t()?),
            Weight::Packed(p) => x.contiguous()?.apply_op1_no_bwd(&PanelMatmul(&**p)),
            Weight::Quantized(q) => q.matmul(x),
            Weight::Blocks(b) => x.contiguous()?.apply_op1_no_bwd(&PanelMatmul(&**b)),
            Weight::Parts(parts) => {
                let outs = parts.iter().map(|w| w.product(x)).collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&outs, 1)
            }
        }
    }
}

/// A linear layer: `weight` `[out, in]` as stored in the checkpoint, optional `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// `compute`: the dtype of the inputs, outputs and bias. On the CPU computing in f32, an
    /// f32, bf16 or f16 weight is packed here as it is (a copy; the tensor is dropped unless
    /// the caller keeps it). Otherwise the weight must be in `compute`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, compute: DType) -> candle_core::Result<Self> {
        let packs = matches!(weight.device(), Device::Cpu) && compute == DType::F32;
        let weight = if packs {
            let (n, k) = weight.dims2()?;
            let weight = weight.contiguous()?;
            let (storage, layout) = weight.storage_and_layout();
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("invariant: a contiguous tensor has contiguous offsets");
            };
            let packed = match &*storage {
                Storage::Cpu(CpuStorage::F32(all)) => PackedMatrix::pack(&all[start..end], n, k),
                Storage::Cpu(CpuStorage::BF16(all)) => PackedMatrix::pack(&all[start..end], n, k),
                Storage::Cpu(CpuStorage::F16(all)) => PackedMatrix::pack(&all[start..end], n, k),
                other => candle_core::bail!(
                    "linear: a CPU weight computing in f32 is stored as f32, bf16 or f16, not {:?}",
                    other.dtype()
                ),
            };
            Weight::Packed(Arc::new(packed))
        } else if weight.dtype() != compute {
            candle_core::bail!(
                "linear: a {:?} weight on {:?} computes in its own dtype, not {compute:?}",
                weight.dtype(),
                weight.device().location()
            );
        } else {
            Weight::Dense(weight)
        };
        Ok(Self { weight, bias })
    }

    /// This layer as `products` says bf16 weights multiply: its bf16 panels paired for
    /// AVX-512 BF16's dot products where [`Bf16Products::Dots`] asks and the CPU has them
    /// ([`PackedMatrix::for_products`]); otherwise as it is.
    pub fn for_bf16_products(self, products: Bf16Products) -> Self {
        match self.weight {
            Weight::Packed(p) if products == Bf16Products::Dots => {
                let packed = Arc::unwrap_or_clone(p).for_products(products);
                Self { weight: Weight::Packed(Arc::new(packed)), ..self }
            }
            _ => self,
        }
    }

    /// A layer whose weight stays in a GGUF block format (on the CPU, Q8_0, Q5_0 and Q4_0 in
    /// our panels, and the K-quants too where `products` asks for exact K-quant products); `bias`
    /// in the compute dtype.
    pub fn quantized(
        weight: Arc<QuantizedMatrix>,
        bias: Option<Tensor>,
        products: CpuProducts,
    ) -> candle_core::Result<Self> {
        let weight = match BlockPanels::from_quantized(&weight, products.k_quants)? {
            Some(panels) => Weight::Blocks(Arc::new(panels.with_activations(products.activations))),
            None => Weight::Quantized(weight),
        };
        Ok(Self { weight, bias })
    }

    /// Rows `ids` of the weight as f32 `[ids.len(), in]`, read from its CPU panels (the lookups
    /// of an embedding tied to this head); `None` unless it has panels.
    pub fn panel_rows(&self, ids: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (k, rows) = match &self.weight {
            Weight::Packed(p) => (p.dims().1, p.gather_rows(&ids.to_vec1::<u32>()?)),
            Weight::Blocks(b) => (b.dims().1, b.gather_rows(&ids.to_vec1::<u32>()?)),
            _ => return Ok(None),
        };
        let rows = rows.map_err(candle_core::Error::Msg)?;
        Ok(Some(Tensor::from_vec(rows, (ids.dim(0)?, k), &Device::Cpu)?))
    }

    /// The weight's int8 panels, where it has them.
    pub fn blocks(&self) -> Option<&BlockPanels> {
        match &self.weight {
            Weight::Blocks(b) => Some(b),
            _ => None,
        }
    }

    /// Whether its products take bf16 activations (its bf16 panels paired for `vdpbf16ps`).
    pub fn takes_bf16_activations(&self) -> bool {
        self.packed().is_some_and(PackedMatrix::takes_bf16_activations)
    }

    /// The weight's panels, where it is packed (on the CPU computing in f32).
    pub fn packed(&self) -> Option<&PackedMatrix> {
        match &self.weight {
            Weight::Packed(p) => Some(p),
            _ => None,
        }
    }

    /// The weight's blocks, where it is one block-format matrix.
    pub fn quantized_weight(&self) -> Option<&Arc<QuantizedMatrix>> {
        match &self.weight {
            Weight::Quantized(q) => Some(q),
            _ => None,
        }
    }

    /// Bytes the weight and bias occupy as held.
    pub fn num_bytes(&self) -> usize {
        self.weight.num_bytes() + self.bias.as_ref().map_or(0, tensor_bytes)
    }

    /// The weight as a `[out, in]` tensor (unpacked again, to f32, on the CPU); `None` for a
    /// block-format one (which is never widened whole).
    fn dense_weight(&self) -> Option<candle_core::Result<Tensor>> {
        match &self.weight {
            Weight::Dense(w) => Some(Ok(w.clone())),
            Weight::Packed(p) => Some(Tensor::from_vec(p.unpack(), p.dims(), &Device::Cpu)),
            Weight::Quantized(_) | Weight::Blocks(_) | Weight::Parts(_) => None,
        }
    }

    /// One layer computing `parts` side by side: their weights' rows (and biases) stacked in
    /// order, so `forward` gives `[tokens, sum of their outputs]` in one product. The parts
    /// must share their input size, dtype and device, and all have a bias or none.
    pub fn stacked(parts: &[Linear]) -> candle_core::Result<Self> {
        let packed: Option<Vec<&PackedMatrix>> = parts.iter().map(Linear::packed).collect();
        let quantized: Option<Vec<&QuantizedMatrix>> =
            parts.iter().map(|p| p.quantized_weight().map(|q| &**q)).collect();
        let dense: Option<Vec<candle_core::Result<Tensor>>> =
            parts.iter().map(Linear::dense_weight).collect();
        let blocks: Option<Vec<&BlockPanels>> = parts.iter().map(Linear::blocks).collect();
        let weight = if let Some(m) = packed.as_deref().and_then(PackedMatrix::stack) {
            Weight::Packed(Arc::new(m))
        } else if let Some(m) = blocks.as_deref().and_then(BlockPanels::stack) {
            Weight::Blocks(Arc::new(m))
        } else if let Some(m) = quantized.as_deref().map(QuantizedMatrix::stack).transpose()?.flatten() {
            Weight::Quantized(Arc::new(m))
        } else if let Some(weights) = dense {
            // Dense weights are in their compute dtype; packed parts get here only when their
            // element types differ, and come back as f32 (each exactly).
            let all = Tensor::cat(&weights.into_iter().collect::<candle_core::Result<Vec<_>>>()?, 0)?;
            let compute = all.dtype();
            Self::new(all, None, compute)?.weight
        } else {
            Weight::Parts(parts.iter().map(|p| p.weight.clone()).collect())
        };
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            n => candle_core::bail!("stacked linear: {n} of {} parts have a bias", parts.len()),
        };
        Ok(Self { weight, bias })
    }

    /// x: `[tokens, in]` → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.forward_unbiased(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The product alone, for a caller that adds [`Self::bias`] in a fused op of its own.
    pub fn forward_unbiased(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.weight.product(x)
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// The most rows [`gemv`] takes (`GEMV_MAX_ROWS` of the kernel).
pub const GEMV_MAX_ROWS: usize = 8;

/// Whether `x Wᵀ` runs as [`gemv`]: on a GPU, in f16 or bf16, a decode step's few rows (cuBLAS
/// spent 5-8 us of device time on each product of one row on an H200, 3-4 times what reading
/// the weight takes), contiguous and 16-byte aligned rows of a multiple of 8 elements.
fn gemv_takes(x: &Tensor, w: &Tensor) -> bool {
    let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
    x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.dtype() == w.dtype()
        && x.rank() == 2
        && (1..=GEMV_MAX_ROWS).contains(&x.dims()[0])
        && x.dims()[1].is_multiple_of(8)
        && w.rank() == 2
        && w.dims()[1] == x.dims()[1]
        && aligned(x)
        && aligned(w)
}

/// `x Wᵀ` for `x` `[m, k]` (m at most [`GEMV_MAX_ROWS`]) and `w` `[n, k]`, accumulated in f32
/// and rounded once: a warp per output feature on CUDA (`kernels/gemv.cu`), a plain loop on the
/// CPU (the reference the CUDA tests compare with).
pub fn gemv(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(w, &Gemv)
}

struct Gemv;

/// `(m, n, k)` of a `gemv` call, checked.
fn gemv_dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let ((m, k), (n, wk)) = (x.shape().dims2()?, w.shape().dims2()?);
    if k != wk
        || !(1..=GEMV_MAX_ROWS).contains(&m)
        || x.contiguous_offsets().is_none()
        || w.contiguous_offsets().is_none()
    {
        candle_core::bail!(
            "gemv: x {:?} and w {:?} must be contiguous [m <= {GEMV_MAX_ROWS}, k] and [n, k]",
            x.dims(),
            w.dims()
        );
    }
    Ok((m, n, k))
}

impl candle_core::CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gemv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::WithDType;
        fn run<T: WithDType>(x: &[T], w: &[T], (m, n, k): (usize, usize, usize)) -> Vec<T> {
            let mut y = Vec::with_capacity(m * n);
            for r in 0..m {
                for c in 0..n {
                    let dot: f32 =
                        (0..k).map(|i| x[r * k + i].to_f64() as f32 * w[c * k + i].to_f64() as f32).sum();
                    y.push(T::from_f64(f64::from(dot)));
                }
            }
            y
        }
        let d = gemv_dims(xl, wl)?;
        let (xo, wo) = (xl.contiguous_offsets(), wl.contiguous_offsets());
        let ((x0, x1), (w0, w1)) = (xo.expect("checked"), wo.expect("checked"));
        let y = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(run(&x[x0..x1], &w[w0..w1], d)),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => CpuStorage::F16(run(&x[x0..x1], &w[w0..w1], d)),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => CpuStorage::BF16(run(&x[x0..x1], &w[w0..w1], d)),
            (x, w) => candle_core::bail!("gemv: {:?} x with {:?} w", x.dtype(), w.dtype()),
        };
        Ok((y, Shape::from_dims(&[d.0, d.1])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use ferrite_kernels::launch::KernelDType;
        fn run<T: KernelDType + candle_core::cuda_backend::CudaDType>(
            xs: &candle_core::CudaStorage,
            xl: &Layout,
            ws: &candle_core::CudaStorage,
            wl: &Layout,
            d: (usize, usize, usize),
        ) -> candle_core::Result<candle_core::CudaStorage> {
            let dev = xs.device.clone();
            let x = super::contiguous_cuda_view::<T>(xs, xl, "gemv: x")?;
            let w = super::contiguous_cuda_view::<T>(ws, wl, "gemv: w")?;
            // SAFETY: the kernel writes every element of y (one per row and output feature).
            let mut y = unsafe { dev.alloc::<T>(d.0 * d.1) }?;
            ferrite_kernels::launch::gemv(&dev, &x, &w, d, &mut y)?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(y, dev))
        }
        const _: () = assert!(GEMV_MAX_ROWS == ferrite_kernels::plan::GEMV_MAX_ROWS);
        let d = gemv_dims(xl, wl)?;
        let y = match (xs.dtype(), ws.dtype()) {
            (DType::F32, DType::F32) => run::<f32>(xs, xl, ws, wl, d)?,
            (DType::F16, DType::F16) => run::<half::f16>(xs, xl, ws, wl, d)?,
            (DType::BF16, DType::BF16) => run::<half::bf16>(xs, xl, ws, wl, d)?,
            (x, w) => candle_core::bail!("gemv: {x:?} x with {w:?} w"),
        };
        Ok((y, Shape::from_dims(&[d.0, d.1])))
    }
}

/// Bytes a tensor's elements occupy.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// A weight the CPU multiplies from its own panels: f32/bf16/f16 ([`PackedMatrix`]) or int8
/// with a scale per 32 ([`BlockPanels`]).
trait HostPanels {
    /// `(n, k)`: output and input sizes.
    fn dims(&self) -> (usize, usize);
    /// `x`: `[m, k]` row-major → `[m, n]`.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32>;
}

impl HostPanels for PackedMatrix {
    fn dims(&self) -> (usize, usize) {
        PackedMatrix::dims(self)
    }
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        PackedMatrix::matmul(self, x, m)
    }
}

impl HostPanels for BlockPanels {
    fn dims(&self) -> (usize, usize) {
        BlockPanels::dims(self)
    }
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        BlockPanels::matmul(self, x, m)
    }
}

/// `x Wᵀ` for a weight in CPU panels.
struct PanelMatmul<'a, P>(&'a P);

impl<P: HostPanels> CustomOp1 for PanelMatmul<'_, P> {
    fn name(&self) -> &'static str {
        "panel-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        let (m, xk) = layout.shape().dims2()?;
        if xk != k {
            candle_core::bail!("linear: input {:?} does not match weight [{n}, {k}]", layout.shape());
        }
        let CpuStorage::F32(x) = storage else {
            candle_core::bail!("linear: CPU panel weights take f32 inputs, got {:?}", storage.dtype());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("linear: the input must be contiguous");
        };
        let out = self.0.matmul(&x[start..end], m);
        Ok((CpuStorage::F32(out), Shape::from_dims(&[m, n])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive f64 triple loop, through the packed CPU product: token counts of decode
    /// and prefill, sizes that are not multiples of a panel, K under and over one chunk.
    #[test]
    fn gemv_reference_matches_matmul() {
        let dev = Device::Cpu;
        for (m, k, n) in [(1, 16, 5), (3, 64, 40), (8, 24, 7)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let got = gemv(&x, &w).unwrap().to_vec2::<f32>().unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "({m}, {k}, {n}): {g} vs {w}");
            }
        }
        let x = Tensor::zeros((9, 8), DType::F32, &dev).unwrap();
        assert!(gemv(&x, &Tensor::zeros((2, 8), DType::F32, &dev).unwrap()).is_err(), "9 rows");
        // The CPU never takes it: its products are packed.
        assert!(!gemv_takes(&x.narrow(0, 0, 1).unwrap(), &Tensor::zeros((2, 8), DType::F32, &dev).unwrap()));
    }

    #[test]
    fn matches_naive_matmul_with_bias() {
        let dev = Device::Cpu;
        for (k, out_dim) in [(77, 70), (301, 9)] {
            let w = Tensor::randn(0f32, 1.0, (out_dim, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, out_dim, &dev).unwrap();
            let lin = Linear::new(w.clone(), Some(b.clone()), DType::F32).unwrap();
            let wv = w.to_vec2::<f32>().unwrap();
            let bv = b.to_vec1::<f32>().unwrap();
            for tokens in [1, 3, 8, 13, 64, 129] {
                let x = Tensor::randn(0f32, 1.0, (tokens, k), &dev).unwrap();
                let xv = x.to_vec2::<f32>().unwrap();
                let y = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for t in 0..tokens {
                    for o in 0..out_dim {
                        let expected: f64 =
                            (0..k).map(|i| f64::from(xv[t][i]) * f64::from(wv[o][i])).sum::<f64>()
                                + f64::from(bv[o]);
                        assert!(
                            (f64::from(y[t][o]) - expected).abs() < 1e-4 * (k as f64).sqrt(),
                            "k {k}, tokens {tokens}, [{t}][{o}]: {} vs {expected}",
                            y[t][o]
                        );
                    }
                }
            }
        }
    }

    /// A bf16 or f16 weight computing in f32 is packed as it is and gives the bits of its
    /// widened f32 copy; computing in its own dtype it stays dense; a mismatch is an error.
    #[test]
    fn half_weights_pack_for_f32_compute() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 70), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 40, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 70), &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let half = w.to_dtype(dtype).unwrap();
            let lin = Linear::new(half.clone(), Some(b.clone()), DType::F32).unwrap();
            assert!(lin.packed().is_some(), "{dtype:?}");
            let widened =
                Linear::new(half.to_dtype(DType::F32).unwrap(), Some(b.clone()), DType::F32).unwrap();
            assert_eq!(
                lin.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
                widened.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
                "{dtype:?}"
            );
            let dense = Linear::new(half, None, dtype).unwrap();
            assert!(dense.packed().is_none(), "{dtype:?} compute stays dense");
        }
        let err = Linear::new(w, None, DType::BF16).unwrap_err();
        assert!(err.to_string().contains("a F32 weight on Cpu computes in its own dtype, not BF16"), "{err}");
    }

    #[test]
    fn stacked_layers_equal_their_parts_side_by_side() {
        let dev = Device::Cpu;
        let part = |out: usize| {
            let w = Tensor::randn(0f32, 1.0, (out, 24), &dev).unwrap();
            Linear::new(w, Some(Tensor::randn(0f32, 1.0, out, &dev).unwrap()), DType::F32).unwrap()
        };
        // Whole panels laid end to end, and a part ending mid-panel (repacked from rows).
        for sizes in [[16, 32, 8], [16, 8, 8]] {
            let parts = sizes.map(part);
            let both = Linear::stacked(&parts).unwrap();
            let x = Tensor::randn(0f32, 1.0, (3, 24), &dev).unwrap();
            let want =
                Tensor::cat(&parts.iter().map(|p| p.forward(&x).unwrap()).collect::<Vec<_>>(), 1).unwrap();
            let got = both.forward(&x).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{sizes:?}: {diff}");
        }
        let parts = [part(16), part(8)];
        let unbiased =
            Linear::new(Tensor::zeros((4, 24), DType::F32, &dev).unwrap(), None, DType::F32).unwrap();
        let err = Linear::stacked(&[parts[0].clone(), unbiased]).unwrap_err();
        assert!(err.to_string().contains("1 of 2 parts have a bias"), "{err}");
    }
}
