//! Fused steps of a decoder layer: each is one kernel where candle takes several launches.
//!
//! - [`qkv_rope`]: bias, split and rotate the stacked q/k/v projection (candle: a bias add, three
//!   strided copies and two RoPE launches).
//! - [`add_rms_norm`]: the residual add and the next RMSNorm (two launches).
//!
//! A GPU decode step at batch 1 is bound by the host's kernel launches, not by the kernels, so
//! launches are what these save. Each op's CPU implementation is its reference: a plain loop
//! that follows the unfused ops' roundings (tests compare it with them, and
//! tests/cuda_ops.rs compares `kernels/fused.cu` with it).
//!
//! The models call [`split_rotate`] and [`residual_norm`], which choose by device as candle's
//! ops do inside: the fused kernel on CUDA; on the CPU candle's unfused ops, measured and
//! tuned there (the same ops in the same order as before the fusion, so the same bits).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Module, Shape, Tensor, WithDType};
use candle_nn::RmsNorm;

#[cfg(feature = "cuda")]
use super::contiguous_cuda_view;
use super::contiguous_elems as elems;

fn bail(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

fn to_f32<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}

/// Rounds an f32 to `T` (exact for f32; nearest even for f16 and bf16, as candle stores them).
fn round<T: WithDType>(x: f32) -> T {
    T::from_f64(f64::from(x))
}

/// The heads of a stacked q/k/v projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvHeads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// `qkv` `[tokens, (num_heads + 2 · num_kv_heads) · head_dim]` (q heads, then k, then v, as
/// the stacked projection gives them), plus `bias` (one such row) when given → `(q, k, v)`,
/// contiguous: q `[tokens, num_heads, head_dim]`, k and v `[tokens, num_kv_heads, head_dim]`,
/// q and k rotated by `cos` and `sin` (`[tokens, head_dim / 2]`; rotate-half, as
/// `candle_nn::rotary_emb::rope_thd`). All in one dtype.
pub fn qkv_rope(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    heads: QkvHeads,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let QkvHeads { num_heads, num_kv_heads, head_dim } = heads;
    let tokens = qkv.dim(0)?;
    let planar = qkv.apply_op3_no_bwd(cos, sin, &QkvRope { bias, heads })?;
    let (q_len, kv_len) = (tokens * num_heads * head_dim, tokens * num_kv_heads * head_dim);
    let q = planar.narrow(0, 0, q_len)?.reshape((tokens, num_heads, head_dim))?;
    let k = planar.narrow(0, q_len, kv_len)?.reshape((tokens, num_kv_heads, head_dim))?;
    let v = planar.narrow(0, q_len + kv_len, kv_len)?.reshape((tokens, num_kv_heads, head_dim))?;
    Ok((q, k, v))
}

struct QkvRope<'a> {
    bias: Option<&'a Tensor>,
    heads: QkvHeads,
}

/// RMSNorms on q and k before the rotation: `(q_norm, k_norm)`.
#[derive(Clone, Copy)]
pub enum QkNorms<'a> {
    /// Over each head (Qwen3, Gemma 3): weights `[head_dim]`.
    PerHead(&'a RmsNorm, &'a RmsNorm),
    /// Over all of q's heads at once, and all of k's (OLMo 2): weights `[heads · head_dim]`.
    Whole(&'a RmsNorm, &'a RmsNorm),
}

/// What turns a stacked q/k/v product into rotated heads.
pub struct QkvParts<'a> {
    pub heads: QkvHeads,
    /// The projection's bias (Qwen2), added here.
    pub bias: Option<&'a Tensor>,
    pub qk_norms: Option<QkNorms<'a>>,
}

/// The unbiased product `qkv` `[tokens, (heads + 2 · kv_heads) · head_dim]` → `(q, k, v)` as
/// [`qkv_rope`] gives them, q and k normed first where `parts` has norms. `cos`/`sin` are
/// `[tokens, rotary_dim / 2]`: where `rotary_dim` < head_dim (Phi's partial rotary factor) only
/// each head's first `rotary_dim` dimensions turn. One launch on CUDA without norms and with a
/// whole-head rotation; otherwise candle's ops (bias add, split, norms, `rope_thd`).
pub fn split_rotate(
    qkv: &Tensor,
    parts: &QkvParts<'_>,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let rotary_dim = 2 * cos.dim(1)?;
    let whole_heads = rotary_dim == parts.heads.head_dim;
    if qkv.device().is_cuda() && parts.qk_norms.is_none() && whole_heads {
        return qkv_rope(qkv, parts.bias, cos, sin, parts.heads);
    }
    let QkvHeads { num_heads, num_kv_heads, head_dim } = parts.heads;
    let t = qkv.dim(0)?;
    let qkv = match parts.bias {
        Some(b) => qkv.broadcast_add(b)?,
        None => qkv.clone(),
    };
    let (q_dim, kv_dim) = (num_heads * head_dim, num_kv_heads * head_dim);
    let (mut q, mut k) = (qkv.narrow(1, 0, q_dim)?, qkv.narrow(1, q_dim, kv_dim)?);
    if let Some(QkNorms::Whole(qn, kn)) = parts.qk_norms {
        q = qn.forward(&q.contiguous()?)?;
        k = kn.forward(&k.contiguous()?)?;
    }
    let mut q = q.reshape((t, num_heads, head_dim))?;
    let mut k = k.reshape((t, num_kv_heads, head_dim))?;
    let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?.reshape((t, num_kv_heads, head_dim))?;
    if let Some(QkNorms::PerHead(qn, kn)) = parts.qk_norms {
        q = qn.forward(&q)?;
        k = kn.forward(&k)?;
    }
    // rope_thd wants [batch, tokens, heads, dim]: the flat batch is one "batch" whose rows
    // carry their own positions through the gathered cos/sin rows.
    let rotate = |x: &Tensor| -> candle_core::Result<Tensor> {
        let turn = |x: &Tensor| -> candle_core::Result<Tensor> {
            candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)
        };
        if whole_heads {
            return turn(x);
        }
        let kept = x.narrow(2, rotary_dim, head_dim - rotary_dim)?;
        Tensor::cat(&[&turn(&x.narrow(2, 0, rotary_dim)?)?, &kept], 2)?.contiguous()
    };
    Ok((rotate(&q)?, rotate(&k)?, v))
}

/// The residual add and the RMSNorm after it: `(x + y, norm(x + y))` (`eps` is the norm's).
/// One launch on CUDA ([`add_rms_norm`]); candle's add and RmsNorm on the CPU.
pub fn residual_norm(
    x: &Tensor,
    y: &Tensor,
    norm: &RmsNorm,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    if x.device().is_cuda() {
        return add_rms_norm(x, y, norm.weight(), eps);
    }
    let sum = (x + y)?;
    let normed = norm.forward(&sum)?;
    Ok((sum, normed))
}

/// The checked sizes of one [`QkvRope`] call.
struct QkvDims {
    tokens: usize,
    row: usize,
    half: usize,
}

impl QkvRope<'_> {
    fn check(&self, qkv: &Layout, cos: &Layout, sin: &Layout) -> candle_core::Result<QkvDims> {
        let QkvHeads { num_heads, num_kv_heads, head_dim } = self.heads;
        let row = (num_heads + 2 * num_kv_heads) * head_dim;
        let half = head_dim / 2;
        let &[tokens, width] = qkv.dims() else {
            return Err(bail(format!("qkv_rope: qkv must be [tokens, {row}], got {:?}", qkv.dims())));
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) || num_heads == 0 || num_kv_heads == 0 || width != row
        {
            return Err(bail(format!("qkv_rope: qkv {:?} for heads {:?}", qkv.dims(), self.heads)));
        }
        for (what, l) in [("cos", cos), ("sin", sin)] {
            if l.dims() != [tokens, half] {
                return Err(bail(format!("qkv_rope: {what} must be [{tokens}, {half}], got {:?}", l.dims())));
            }
        }
        if let Some(b) = self.bias {
            if b.dims() != [row] {
                return Err(bail(format!("qkv_rope: bias must be [{row}], got {:?}", b.dims())));
            }
        }
        Ok(QkvDims { tokens, row, half })
    }

    /// The bias, if any, must have qkv's dtype.
    fn check_bias_dtype(&self, qkv: candle_core::DType) -> candle_core::Result<()> {
        match self.bias {
            Some(b) if b.dtype() != qkv => {
                Err(bail(format!("qkv_rope: bias is {:?}, qkv {qkv:?}: they must match", b.dtype())))
            }
            _ => Ok(()),
        }
    }

    fn out_shape(d: &QkvDims) -> Shape {
        Shape::from_dims(&[d.tokens * d.row])
    }

    /// The reference: per token, bias (rounded, as a biased product is stored), then rotate
    /// q and k heads in f32 and round once.
    fn cpu<T: WithDType>(&self, d: &QkvDims, qkv: &[T], bias: Option<&[T]>, cos: &[T], sin: &[T]) -> Vec<T> {
        let QkvHeads { num_heads, num_kv_heads, head_dim } = self.heads;
        let QkvDims { tokens, row, half } = *d;
        let mut out = vec![T::zero(); tokens * row];
        let (q_len, kv_len) = (tokens * num_heads * head_dim, tokens * num_kv_heads * head_dim);
        let (q_out, rest) = out.split_at_mut(q_len);
        let (k_out, v_out) = rest.split_at_mut(kv_len);
        for t in 0..tokens {
            let src = &qkv[t * row..(t + 1) * row];
            let load = |c: usize| match bias {
                Some(b) => to_f32(round::<T>(to_f32(src[c]) + to_f32(b[c]))),
                None => to_f32(src[c]),
            };
            let (cs, sn) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            for head in 0..num_heads + num_kv_heads {
                let dst = if head < num_heads {
                    &mut q_out[(t * num_heads + head) * head_dim..][..head_dim]
                } else {
                    &mut k_out[(t * num_kv_heads + head - num_heads) * head_dim..][..head_dim]
                };
                for j in 0..half {
                    let c = head * head_dim + j;
                    let (x0, x1) = (load(c), load(c + half));
                    let (c_, s_) = (to_f32(cs[j]), to_f32(sn[j]));
                    dst[j] = round(x0 * c_ - x1 * s_);
                    dst[j + half] = round(x1 * c_ + x0 * s_);
                }
            }
            let v_start = (num_heads + num_kv_heads) * head_dim;
            let v_row = num_kv_heads * head_dim;
            for (i, o) in v_out[t * v_row..(t + 1) * v_row].iter_mut().enumerate() {
                *o = round(load(v_start + i));
            }
        }
        out
    }
}

impl CustomOp3 for QkvRope<'_> {
    fn name(&self) -> &'static str {
        "qkv-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.check(l1, l2, l3)?;
        self.check_bias_dtype(s1.dtype())?;
        let bias = match self.bias {
            Some(b) => Some(b.flatten_all()?.to_device(&candle_core::Device::Cpu)?),
            None => None,
        };
        fn run<T: WithDType>(
            op: &QkvRope<'_>,
            d: &QkvDims,
            [(a, la), (c, lc), (s, ls)]: [(&[T], &Layout); 3],
            bias: Option<&Tensor>,
        ) -> candle_core::Result<Vec<T>> {
            let bias = bias.map(|b| b.to_vec1::<T>()).transpose()?;
            let (qkv, cos, sin) = (
                elems(a, la, "qkv_rope: qkv")?,
                elems(c, lc, "qkv_rope: cos")?,
                elems(s, ls, "qkv_rope: sin")?,
            );
            Ok(op.cpu(d, qkv, bias.as_deref(), cos, sin))
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(a), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(run(self, &d, [(a, l1), (c, l2), (s, l3)], bias.as_ref())?)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                CpuStorage::BF16(run(self, &d, [(a, l1), (c, l2), (s, l3)], bias.as_ref())?)
            }
            (CpuStorage::F16(a), CpuStorage::F16(c), CpuStorage::F16(s)) => {
                CpuStorage::F16(run(self, &d, [(a, l1), (c, l2), (s, l3)], bias.as_ref())?)
            }
            _ => return Err(dtype_error("qkv_rope", [s1.dtype(), s2.dtype(), s3.dtype()])),
        };
        Ok((out, Self::out_shape(&d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::DType;
        let d = self.check(l1, l2, l3)?;
        self.check_bias_dtype(s1.dtype())?;
        let storage = match (s1.dtype(), s2.dtype(), s3.dtype()) {
            (DType::F32, DType::F32, DType::F32) => self.cuda::<f32>(&d, [(s1, l1), (s2, l2), (s3, l3)])?,
            (DType::F16, DType::F16, DType::F16) => {
                self.cuda::<half::f16>(&d, [(s1, l1), (s2, l2), (s3, l3)])?
            }
            (DType::BF16, DType::BF16, DType::BF16) => {
                self.cuda::<half::bf16>(&d, [(s1, l1), (s2, l2), (s3, l3)])?
            }
            (a, b, c) => return Err(dtype_error("qkv_rope", [a, b, c])),
        };
        Ok((storage, Self::out_shape(&d)))
    }
}

#[cfg(feature = "cuda")]
impl QkvRope<'_> {
    fn cuda<T: ferrite_kernels::launch::KernelDType + candle_core::cuda_backend::CudaDType>(
        &self,
        d: &QkvDims,
        [(a, la), (c, lc), (s, ls)]: [(&candle_core::CudaStorage, &Layout); 3],
    ) -> candle_core::Result<candle_core::CudaStorage> {
        use ferrite_kernels::launch;
        let bias_guard = self.bias.map(|b| b.storage_and_layout());
        let bias = match &bias_guard {
            Some((st, l)) => match &**st {
                candle_core::Storage::Cuda(b) if b.device.id() == a.device.id() => {
                    Some(contiguous_cuda_view::<T>(b, l, "qkv_rope: bias")?)
                }
                _ => return Err(bail("qkv_rope: the bias is not on the qkv's device".into())),
            },
            None => None,
        };
        let dev = a.device.clone();
        // SAFETY: the kernel writes every element (every head of every token).
        let mut out = unsafe { dev.alloc::<T>((d.tokens * d.row).max(1)) }?;
        let heads = launch::QkvHeads {
            num_tokens: d.tokens,
            num_heads: self.heads.num_heads,
            num_kv_heads: self.heads.num_kv_heads,
            head_dim: self.heads.head_dim,
        };
        if d.tokens > 0 {
            let (qkv, cos, sin) = (
                contiguous_cuda_view::<T>(a, la, "qkv_rope: qkv")?,
                contiguous_cuda_view::<T>(c, lc, "qkv_rope: cos")?,
                contiguous_cuda_view::<T>(s, ls, "qkv_rope: sin")?,
            );
            launch::qkv_rope(&dev, &qkv, bias.as_ref(), &cos, &sin, heads, &mut out)?;
        }
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
    }
}

fn dtype_error(op: &str, dtypes: [candle_core::DType; 3]) -> candle_core::Error {
    bail(format!("{op}: inputs must share one float dtype (f32, f16 or bf16), got {dtypes:?}"))
}

/// `x + y` and the RMSNorm of that sum times `weight`, for `x`, `y` `[tokens, hidden]` and
/// `weight` `[hidden]`: `(sum, normed)`, both contiguous `[tokens, hidden]`. The sum is
/// rounded to the dtype before it is normalized, as `(x + y)` then an RMSNorm would be.
pub fn add_rms_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (tokens, hidden) = x.dims2()?;
    let planar = x.apply_op3_no_bwd(y, weight, &AddRmsNorm { eps })?;
    let both = planar.reshape((2, tokens, hidden))?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    /// `(tokens, hidden)`, once x and y are `[tokens, hidden]` and weight `[hidden]`.
    fn check(x: &Layout, y: &Layout, w: &Layout) -> candle_core::Result<(usize, usize)> {
        let &[tokens, hidden] = x.dims() else {
            return Err(bail(format!("add_rms_norm: x must be [tokens, hidden], got {:?}", x.dims())));
        };
        if y.dims() != x.dims() || w.dims() != [hidden] || hidden == 0 {
            return Err(bail(format!(
                "add_rms_norm: x {:?}, y {:?} and weight {:?} do not match",
                x.dims(),
                y.dims(),
                w.dims()
            )));
        }
        Ok((tokens, hidden))
    }

    fn cpu<T: WithDType>(&self, hidden: usize, x: &[T], y: &[T], w: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); 2 * x.len()];
        let (sums, normed) = out.split_at_mut(x.len());
        for (((s_row, n_row), x_row), y_row) in
            sums.chunks_mut(hidden).zip(normed.chunks_mut(hidden)).zip(x.chunks(hidden)).zip(y.chunks(hidden))
        {
            let mut squares = 0f32;
            for ((s, &a), &b) in s_row.iter_mut().zip(x_row).zip(y_row) {
                *s = round(to_f32(a) + to_f32(b));
                squares += to_f32(*s) * to_f32(*s);
            }
            let scale = 1.0 / (squares / hidden as f32 + self.eps).sqrt();
            for ((n, &s), &g) in n_row.iter_mut().zip(s_row.iter()).zip(w) {
                *n = round(to_f32(s) * scale * to_f32(g));
            }
        }
        out
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (tokens, hidden) = Self::check(l1, l2, l3)?;
        fn run<T: WithDType>(
            op: &AddRmsNorm,
            hidden: usize,
            [(x, lx), (y, ly), (w, lw)]: [(&[T], &Layout); 3],
        ) -> candle_core::Result<Vec<T>> {
            Ok(op.cpu(
                hidden,
                elems(x, lx, "add_rms_norm: x")?,
                elems(y, ly, "add_rms_norm: y")?,
                elems(w, lw, "add_rms_norm: weight")?,
            ))
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(w)) => {
                CpuStorage::F32(run(self, hidden, [(x, l1), (y, l2), (w, l3)])?)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(y), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(run(self, hidden, [(x, l1), (y, l2), (w, l3)])?)
            }
            (CpuStorage::F16(x), CpuStorage::F16(y), CpuStorage::F16(w)) => {
                CpuStorage::F16(run(self, hidden, [(x, l1), (y, l2), (w, l3)])?)
            }
            _ => return Err(dtype_error("add_rms_norm", [s1.dtype(), s2.dtype(), s3.dtype()])),
        };
        Ok((out, Shape::from_dims(&[2 * tokens * hidden])))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::DType;
        let (tokens, hidden) = Self::check(l1, l2, l3)?;
        let inputs = [(s1, l1), (s2, l2), (s3, l3)];
        let storage = match (s1.dtype(), s2.dtype(), s3.dtype()) {
            (DType::F32, DType::F32, DType::F32) => self.cuda::<f32>(tokens * hidden, inputs)?,
            (DType::F16, DType::F16, DType::F16) => self.cuda::<half::f16>(tokens * hidden, inputs)?,
            (DType::BF16, DType::BF16, DType::BF16) => self.cuda::<half::bf16>(tokens * hidden, inputs)?,
            (a, b, c) => return Err(dtype_error("add_rms_norm", [a, b, c])),
        };
        Ok((storage, Shape::from_dims(&[2 * tokens * hidden])))
    }
}

#[cfg(feature = "cuda")]
impl AddRmsNorm {
    fn cuda<T: ferrite_kernels::launch::KernelDType + candle_core::cuda_backend::CudaDType>(
        &self,
        elems: usize,
        [(x, lx), (y, ly), (w, lw)]: [(&candle_core::CudaStorage, &Layout); 3],
    ) -> candle_core::Result<candle_core::CudaStorage> {
        let dev = x.device.clone();
        // SAFETY: the kernel writes both halves of every row.
        let mut out = unsafe { dev.alloc::<T>((2 * elems).max(1)) }?;
        if elems > 0 {
            let (xv, yv, wv) = (
                contiguous_cuda_view::<T>(x, lx, "add_rms_norm: x")?,
                contiguous_cuda_view::<T>(y, ly, "add_rms_norm: y")?,
                contiguous_cuda_view::<T>(w, lw, "add_rms_norm: weight")?,
            );
            ferrite_kernels::launch::add_rms_norm(&dev, &xv, &yv, &wv, self.eps, &mut out)?;
        }
        Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The unfused ops: bias add, split by narrowing, candle's RoPE.
    fn unfused_qkv(
        qkv: &Tensor,
        bias: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        h: QkvHeads,
    ) -> (Tensor, Tensor, Tensor) {
        let t = qkv.dim(0).unwrap();
        let qkv = match bias {
            Some(b) => qkv.broadcast_add(b).unwrap(),
            None => qkv.clone(),
        };
        let (qd, kvd) = (h.num_heads * h.head_dim, h.num_kv_heads * h.head_dim);
        let q = qkv.narrow(1, 0, qd).unwrap().reshape((1, t, h.num_heads, h.head_dim)).unwrap();
        let k = qkv.narrow(1, qd, kvd).unwrap().reshape((1, t, h.num_kv_heads, h.head_dim)).unwrap();
        let v = qkv.narrow(1, qd + kvd, kvd).unwrap().reshape((t, h.num_kv_heads, h.head_dim)).unwrap();
        let q =
            candle_nn::rotary_emb::rope_thd(&q.contiguous().unwrap(), cos, sin).unwrap().squeeze(0).unwrap();
        let k =
            candle_nn::rotary_emb::rope_thd(&k.contiguous().unwrap(), cos, sin).unwrap().squeeze(0).unwrap();
        (q, k, v)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn qkv_rope_matches_bias_add_split_and_candles_rope() {
        for (tokens, heads, kv_heads, head_dim, biased) in
            [(1, 4, 2, 8, true), (5, 14, 2, 64, true), (3, 3, 3, 16, false), (0, 2, 1, 8, true)]
        {
            let h = QkvHeads { num_heads: heads, num_kv_heads: kv_heads, head_dim };
            let row = (heads + 2 * kv_heads) * head_dim;
            let qkv = random(&[tokens, row], 1);
            let bias = biased.then(|| random(&[row], 2));
            let angles = random(&[tokens, head_dim / 2], 3).affine(3.0, 0.0).unwrap();
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let (q, k, v) = qkv_rope(&qkv, bias.as_ref(), &cos, &sin, h).unwrap();
            if tokens == 0 {
                // candle's RoPE panics on an empty batch; the fused op gives empty heads.
                assert_eq!(
                    (q.dims(), k.dims(), v.dims()),
                    (&[0, heads, head_dim][..], &[0, kv_heads, head_dim][..], &[0, kv_heads, head_dim][..])
                );
                continue;
            }
            let (rq, rk, rv) = unfused_qkv(&qkv, bias.as_ref(), &cos, &sin, h);
            for (got, want) in [(&q, &rq), (&k, &rk), (&v, &rv)] {
                assert!(got.is_contiguous());
                assert!(max_diff(got, want) < 1e-6, "{h:?}: {}", max_diff(got, want));
            }
            // bf16: the same within a rounding of the result.
            let b16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let (q16, k16, _) =
                qkv_rope(&b16(&qkv), bias.as_ref().map(b16).as_ref(), &b16(&cos), &b16(&sin), h).unwrap();
            let (rq16, rk16, _) =
                unfused_qkv(&b16(&qkv), bias.as_ref().map(b16).as_ref(), &b16(&cos), &b16(&sin), h);
            assert!(max_diff(&q16, &rq16) < 0.05 && max_diff(&k16, &rk16) < 0.05, "{h:?} bf16");
        }
    }

    #[test]
    fn add_rms_norm_matches_add_then_rms_norm() {
        for (tokens, hidden) in [(1, 8), (7, 896), (0, 16)] {
            let (x, y, w) =
                (random(&[tokens, hidden], 4), random(&[tokens, hidden], 5), random(&[hidden], 6));
            let (sum, normed) = add_rms_norm(&x, &y, &w, 1e-6).unwrap();
            let want_sum = (&x + &y).unwrap();
            let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-6).unwrap();
            assert_eq!(max_diff(&sum, &want_sum), 0.0);
            assert!(max_diff(&normed, &want) < 1e-5, "{}", max_diff(&normed, &want));
            assert!(sum.is_contiguous() && normed.is_contiguous());
        }
    }

    #[test]
    fn mismatched_shapes_and_dtypes_are_errors_naming_them() {
        let h = QkvHeads { num_heads: 2, num_kv_heads: 1, head_dim: 8 };
        let (cos, sin) = (random(&[3, 4], 1), random(&[3, 4], 2));
        let err = qkv_rope(&random(&[3, 30], 3), None, &cos, &sin, h).unwrap_err();
        assert!(err.to_string().contains("qkv [3, 30]"), "{err}");
        let err = qkv_rope(&random(&[2, 32], 3), None, &cos, &sin, h).unwrap_err();
        assert!(err.to_string().contains("cos must be [2, 4]"), "{err}");
        let err = qkv_rope(&random(&[3, 32], 3), Some(&random(&[31], 4)), &cos, &sin, h).unwrap_err();
        assert!(err.to_string().contains("bias must be [32]"), "{err}");
        let half = random(&[3, 32], 3).to_dtype(DType::BF16).unwrap();
        let err = qkv_rope(&half, None, &cos, &sin, h).unwrap_err();
        assert!(err.to_string().contains("share one float dtype"), "{err}");
        let err = qkv_rope(
            &random(&[3, 32], 3),
            Some(&random(&[32], 4).to_dtype(DType::F16).unwrap()),
            &cos,
            &sin,
            h,
        )
        .unwrap_err();
        assert!(err.to_string().contains("bias is F16, qkv F32"), "{err}");
        let err = add_rms_norm(&random(&[2, 8], 1), &random(&[2, 9], 2), &random(&[8], 3), 1e-6).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
    }
}
