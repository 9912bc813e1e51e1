//! Launch wrappers for the kernels in `kernels/`, on candle's CUDA device and stream (the PTX
//! modules are loaded once per device through candle's custom-module cache).
//!
//! They are `unsafe`: a kernel trusts the metadata it reads on the device (slots, block ids),
//! which only the caller can check on the host. Everything that can be checked from here
//! (lengths, grid limits) is, and is an error rather than a launch.

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;
use std::sync::Arc;

use crate::plan::{
    decode_head_blocks, prefill_smem_bytes, prefill_tc_smem_bytes, prefill_tc_takes, AttentionPlan,
    AttnConfig, Pass, DECODE_PARTITION_KEYS, DECODE_THREADS, DEFAULT_SMEM_BYTES, FUSED_THREADS,
    GEMV_MAX_ROWS, GEMV_THREADS, MAX_SAMPLE_VOCAB, PICK_WORDS, PREFILL_TC_THREADS, PREFILL_THREADS,
    RESHAPE_THREADS, SAMPLE_THREADS, VEC_ELEMS,
};
use crate::ptx::{self, Module};

// SAFETY: `AttnConfig` is `#[repr(C)]` with only 4-byte integer and float fields, laid out as
// the C++ `AttnConfig` it mirrors, so it can be passed by value as a kernel argument.
unsafe impl DeviceRepr for AttnConfig {}

/// The storage types the kernels are instantiated for, with their kernel-name suffix.
pub trait KernelDType: DeviceRepr + Copy + 'static {
    const SUFFIX: &'static str;
}

impl KernelDType for f32 {
    const SUFFIX: &'static str = "f32";
}
impl KernelDType for half::f16 {
    const SUFFIX: &'static str = "f16";
}
impl KernelDType for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

fn bail(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// The kernel `<name>_<dtype>` of `module`, loaded once per device by candle's module cache.
fn kernel<T: KernelDType>(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    let func = dev.get_or_load_custom_func(&format!("{name}_{}", T::SUFFIX), module.name, module.ptx)?;
    Ok(func.into_cuda_function())
}

fn grid_dim(value: usize, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| bail(format!("{what} {value} does not fit a CUDA grid dimension")))
}

/// Blocks of `per_block` covering `value` elements along gridDim.y or .z (at most 65,535).
fn grid_yz(value: usize, per_block: usize, what: &str) -> Result<u32> {
    let blocks = value.div_ceil(per_block);
    if blocks > 65_535 {
        return Err(bail(format!("{what} {value} needs {blocks} blocks of {per_block}, over CUDA's 65,535")));
    }
    Ok(blocks as u32)
}

/// Copies row `t` of `src` (`[num_tokens, row_elems]`) to row `slot_mapping[t]` of `cache`
/// (`[num_slots, row_elems]`). Grid `(num_tokens)`, [`RESHAPE_THREADS`] threads per block.
///
/// # Safety
/// Every value of `slot_mapping` is below `cache.len() / row_elems`.
pub unsafe fn reshape_and_cache<T: KernelDType>(
    dev: &CudaDevice,
    src: &CudaView<'_, T>,
    cache: &mut CudaViewMut<'_, T>,
    slot_mapping: &CudaSlice<u32>,
    row_elems: usize,
) -> Result<()> {
    let num_tokens = slot_mapping.len();
    if src.len() != num_tokens * row_elems || row_elems == 0 || !cache.len().is_multiple_of(row_elems) {
        return Err(bail(format!(
            "reshape_and_cache: {} source elements for {num_tokens} slots of {row_elems}, cache of {}",
            src.len(),
            cache.len()
        )));
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let row = i32::try_from(row_elems)
        .map_err(|_| bail(format!("reshape_and_cache: row of {row_elems} elements")))?;
    let cfg = LaunchConfig {
        grid_dim: (grid_dim(num_tokens, "tokens")?, 1, 1),
        block_dim: (RESHAPE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = kernel::<T>(dev, ptx::RESHAPE_AND_CACHE_MODULE, ptx::RESHAPE_AND_CACHE)?;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    args.arg(src).arg(cache).arg(slot_mapping).arg(&row);
    // SAFETY: lengths checked above; slots in range by the caller's contract.
    unsafe { args.launch(cfg) }.w()?;
    Ok(())
}

/// Samples one row of `logits` (`[rows, vocab]` f32) per pick (`picks`: [`PICK_WORDS`] words
/// each, from [`crate::plan::pick_words`]) into `out` (`[picks, 2]`: token id, logprob bits).
/// Grid `(picks)`, [`SAMPLE_THREADS`] threads per block.
///
/// # Safety
/// Every pick's row is below `logits.len() / vocab`.
pub unsafe fn sample_rows(
    dev: &CudaDevice,
    logits: &CudaView<'_, f32>,
    picks: &CudaSlice<u32>,
    out: &mut CudaSlice<u32>,
    vocab: usize,
) -> Result<()> {
    let num_picks = picks.len() / PICK_WORDS;
    if vocab == 0
        || vocab >= MAX_SAMPLE_VOCAB
        || !logits.len().is_multiple_of(vocab)
        || picks.len() != num_picks * PICK_WORDS
        || out.len() != num_picks * 2
    {
        return Err(bail(format!(
            "sample_rows: {} logits in rows of {vocab} (below {MAX_SAMPLE_VOCAB}), {} pick words, {} outputs",
            logits.len(),
            picks.len(),
            out.len()
        )));
    }
    if num_picks == 0 {
        return Ok(());
    }
    let vocab = vocab as i32; // below MAX_SAMPLE_VOCAB
    let cfg = LaunchConfig {
        grid_dim: (grid_dim(num_picks, "picks")?, 1, 1),
        block_dim: (SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = dev.get_or_load_custom_func(
        &format!("{}_f32", ptx::SAMPLE_ROWS),
        ptx::SAMPLE_MODULE.name,
        ptx::SAMPLE_MODULE.ptx,
    )?;
    let func = func.into_cuda_function();
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    args.arg(logits).arg(picks).arg(out).arg(&vocab);
    // SAFETY: lengths checked above; rows in range by the caller's contract.
    unsafe { args.launch(cfg) }.w()?;
    Ok(())
}

/// One block of [`FUSED_THREADS`] per token row.
fn per_token(num_tokens: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_dim(num_tokens, "tokens")?, 1, 1),
        block_dim: (FUSED_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn int_arg(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| bail(format!("{what} {value} does not fit a kernel's int")))
}

/// The heads of one [`qkv_rope`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvHeads {
    pub num_tokens: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl QkvHeads {
    /// Elements of one stacked row (q, k and v heads).
    pub fn row_elems(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }
}

/// Biases (when `bias` is given), splits and rotates the stacked projection `qkv`
/// (`[num_tokens, row_elems]`) into `out`, planar: q `[num_tokens, num_heads, head_dim]`, then
/// k and v `[num_tokens, num_kv_heads, head_dim]`, q and k rotated by `cos`, `sin`
/// (`[num_tokens, head_dim / 2]`). Every element of `out` is written.
pub fn qkv_rope<T: KernelDType>(
    dev: &CudaDevice,
    qkv: &CudaView<'_, T>,
    bias: Option<&CudaView<'_, T>>,
    cos: &CudaView<'_, T>,
    sin: &CudaView<'_, T>,
    heads: QkvHeads,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let QkvHeads { num_tokens, num_heads, num_kv_heads, head_dim } = heads;
    let row = heads.row_elems();
    let half = head_dim / 2;
    if head_dim == 0
        || !head_dim.is_multiple_of(2)
        || qkv.len() != num_tokens * row
        || bias.is_some_and(|b| b.len() != row)
        || cos.len() != num_tokens * half
        || sin.len() != num_tokens * half
        || out.len() != num_tokens * row
    {
        return Err(bail(format!(
            "qkv_rope: {heads:?} with {} qkv, {:?} bias, {} cos, {} sin, {} out elements",
            qkv.len(),
            bias.map(|b| b.len()),
            cos.len(),
            sin.len(),
            out.len()
        )));
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let has_bias = i32::from(bias.is_some());
    let ints = [
        int_arg(num_tokens, "tokens")?,
        int_arg(num_heads, "heads")?,
        int_arg(num_kv_heads, "KV heads")?,
        int_arg(head_dim, "head_dim")?,
    ];
    int_arg(num_tokens * row, "qkv elements")?;
    let func = kernel::<T>(dev, ptx::FUSED_MODULE, ptx::QKV_ROPE)?;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    // Without a bias the kernel never reads its pointer: pass qkv's.
    args.arg(out).arg(qkv).arg(bias.unwrap_or(qkv)).arg(cos).arg(sin).arg(&has_bias);
    for i in &ints {
        args.arg(i);
    }
    // SAFETY: every length checked above against the shape the kernel indexes.
    unsafe { args.launch(per_token(num_tokens)?) }.w()?;
    Ok(())
}

/// `y = x · wᵀ` for `x` `[m, k]` (m at most [`GEMV_MAX_ROWS`]), `w` `[n, k]`, `y` `[m, n]`,
/// accumulated in f32: one warp per output feature. `k` a multiple of [`VEC_ELEMS`], `x` and
/// `w` 16-byte aligned.
pub fn gemv<T: KernelDType>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    w: &CudaView<'_, T>,
    (m, n, k): (usize, usize, usize),
    y: &mut CudaSlice<T>,
) -> Result<()> {
    if !(1..=GEMV_MAX_ROWS).contains(&m)
        || k == 0
        || !k.is_multiple_of(VEC_ELEMS)
        || x.len() != m * k
        || w.len() != n * k
        || y.len() != m * n
    {
        return Err(bail(format!(
            "gemv: {m} rows (1..={GEMV_MAX_ROWS}) of {k} (a multiple of {VEC_ELEMS}) into {n}, with {} x, {} w, {} y elements",
            x.len(),
            w.len(),
            y.len()
        )));
    }
    let stream = dev.cuda_stream();
    for (what, ptr) in [("x", x.device_ptr(&stream).0), ("w", w.device_ptr(&stream).0)] {
        if ptr % 16 != 0 {
            return Err(bail(format!("gemv: {what} is not 16-byte aligned")));
        }
    }
    if n == 0 {
        return Ok(());
    }
    let ints = [int_arg(m, "rows")?, int_arg(n, "out features")?, int_arg(k, "in features")?];
    int_arg(n * k, "weight elements")?;
    let func = kernel::<T>(dev, ptx::GEMV_MODULE, ptx::GEMV)?;
    let mut args = stream.launch_builder(&func);
    args.arg(y).arg(x).arg(w);
    for i in &ints {
        args.arg(i);
    }
    let warps = (GEMV_THREADS / 32) as usize;
    let cfg = LaunchConfig {
        grid_dim: (grid_dim(n.div_ceil(warps), "gemv blocks")?, 1, 1),
        block_dim: (GEMV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every length and the alignment checked above against what the kernel reads.
    unsafe { args.launch(cfg) }.w()?;
    Ok(())
}

/// `out[t, i] = SiLU(gate_up[t, i]) · gate_up[t, width + i]` for `gate_up` `[num_tokens, 2 ·
/// width]`, `out` `[num_tokens, width]`. Grid `(num_tokens, ceil(width / FUSED_THREADS))`.
pub fn silu_mul<T: KernelDType>(
    dev: &CudaDevice,
    gate_up: &CudaView<'_, T>,
    width: usize,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    if width == 0 || !gate_up.len().is_multiple_of(2 * width) || out.len() * 2 != gate_up.len() {
        return Err(bail(format!(
            "silu_mul: {} gate_up and {} out elements for width {width}",
            gate_up.len(),
            out.len()
        )));
    }
    let num_tokens = out.len() / width;
    if num_tokens == 0 {
        return Ok(());
    }
    int_arg(gate_up.len(), "gate_up elements")?;
    let width = int_arg(width, "width")?;
    let func = kernel::<T>(dev, ptx::FUSED_MODULE, ptx::SILU_MUL)?;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    let col_blocks = grid_yz(out.len() / num_tokens, FUSED_THREADS as usize, "silu_mul width")?;
    args.arg(out).arg(gate_up).arg(&width);
    let cfg = LaunchConfig {
        grid_dim: (grid_dim(num_tokens, "tokens")?, col_blocks, 1),
        block_dim: (FUSED_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: lengths checked above.
    unsafe { args.launch(cfg) }.w()?;
    Ok(())
}

/// `out` planar `[2, num_tokens, hidden]`: `x + y`, then the RMSNorm of that sum times
/// `weight` (`[hidden]`), for `x`, `y` `[num_tokens, hidden]`.
pub fn add_rms_norm<T: KernelDType>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    y: &CudaView<'_, T>,
    weight: &CudaView<'_, T>,
    eps: f32,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let hidden = weight.len();
    if hidden == 0 || !x.len().is_multiple_of(hidden) || y.len() != x.len() || out.len() != 2 * x.len() {
        return Err(bail(format!(
            "add_rms_norm: {} x, {} y, {hidden} weight and {} out elements",
            x.len(),
            y.len(),
            out.len()
        )));
    }
    let num_tokens = x.len() / hidden;
    if num_tokens == 0 {
        return Ok(());
    }
    int_arg(out.len(), "output elements")?;
    let (tokens, width) = (int_arg(num_tokens, "tokens")?, int_arg(hidden, "hidden")?);
    let func = kernel::<T>(dev, ptx::FUSED_MODULE, ptx::ADD_RMS_NORM)?;
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(&func);
    args.arg(out).arg(x).arg(y).arg(weight).arg(&tokens).arg(&width).arg(&eps);
    // SAFETY: lengths checked above.
    unsafe { args.launch(per_token(num_tokens)?) }.w()?;
    Ok(())
}

/// Whether `dev` gives a block the shared memory of the tensor-core prefill kernel at
/// `head_dim` (opt-in: 227 KB on an H100, 163 KB on an A100, 99 KB on an L4).
pub fn tensor_core_prefill_fits(dev: &CudaDevice, head_dim: usize) -> Result<bool> {
    let max = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    Ok(prefill_tc_smem_bytes(head_dim) <= max as usize)
}

/// The tensors of one attention call, as contiguous device views.
pub struct AttentionTensors<'a, T> {
    /// `[num_tokens, num_heads, head_dim]`
    pub q: CudaView<'a, T>,
    /// `[num_blocks, block_size, num_kv_heads, head_dim]` each.
    pub k_cache: CudaView<'a, T>,
    pub v_cache: CudaView<'a, T>,
}

/// Runs paged attention as `plan` says into `out` (`[num_tokens, num_heads, head_dim]`,
/// every element written); `meta` holds `plan.words` on the device (uploaded once per step and
/// shared by the layers).
///
/// # Safety
/// `meta` holds `plan.words`. The plan was built from metadata the caller checked against these
/// tensors: the sequences' query ranges cover the tokens of `q` and `out`,
/// `1 <= query_len <= context_len`, the block
/// tables hold each context with ids below `num_blocks`; `head_dim`, `num_heads` and
/// `num_kv_heads` in `plan.cfg` are those of the tensors; `q` and the caches start 16-byte
/// aligned ([`crate::plan::VEC_ELEMS`] elements).
pub unsafe fn paged_attention<T: KernelDType>(
    dev: &CudaDevice,
    plan: &AttentionPlan,
    meta: &CudaSlice<u32>,
    tensors: &AttentionTensors<'_, T>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    if plan.num_seqs == 0 {
        return Ok(());
    }
    if meta.len() != plan.words.len() {
        return Err(bail(format!(
            "paged_attention: {} metadata words on the device for a plan of {}",
            meta.len(),
            plan.words.len()
        )));
    }
    let call = Call { dev, stream: dev.cuda_stream(), plan, tensors, meta };
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match plan.pass {
            Pass::Decode { max_partitions, partition_keys } => {
                call.decode(max_partitions, partition_keys, out)
            }
            Pass::Prefill { num_work_items } => call.prefill(num_work_items, out),
            Pass::PrefillTc { num_work_items } => call.prefill_tc(num_work_items, out),
        }
    }
}

/// One attention call with its metadata on the device.
struct Call<'a, T> {
    dev: &'a CudaDevice,
    /// candle's stream of `dev`: every launch goes on it, ordered with candle's own work.
    stream: Arc<CudaStream>,
    plan: &'a AttentionPlan,
    tensors: &'a AttentionTensors<'a, T>,
    meta: &'a CudaSlice<u32>,
}

impl<T: KernelDType> Call<'_, T> {
    fn cfg(&self) -> &AttnConfig {
        &self.plan.cfg
    }

    /// Flash-decoding: grid `(decode_head_blocks, num_seqs, max_partitions)` (a block serves up
    /// to [`crate::plan::DECODE_HEADS`] query heads of one KV head), then the reduce kernel on
    /// `(num_heads, num_seqs)` when some sequence has more than one partition.
    unsafe fn decode(
        &self,
        max_partitions: usize,
        partition_keys: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let cfg = self.cfg();
        let (heads, seqs) = (cfg.num_heads as usize, self.plan.num_seqs);
        // Partial results, only when there is a second pass to read them; uninitialized: the
        // first kernel writes every partition the reduce kernel reads.
        let parts = if max_partitions > 1 { seqs * heads * max_partitions } else { 1 };
        // SAFETY: plain f32 buffers, written before they are read (above).
        let (mut part_out, mut part_max, mut part_sum) = unsafe {
            (
                self.dev.alloc::<f32>(parts * cfg.head_dim as usize)?,
                self.dev.alloc::<f32>(parts)?,
                self.dev.alloc::<f32>(parts)?,
            )
        };
        let max_parts =
            i32::try_from(max_partitions).map_err(|_| bail(format!("{max_partitions} partitions")))?;
        if !(1..=DECODE_PARTITION_KEYS).contains(&partition_keys) {
            return Err(bail(format!(
                "decode partitions of {partition_keys} keys (1..={DECODE_PARTITION_KEYS})"
            )));
        }
        let part_keys = partition_keys as i32;
        let seq_info = self.meta.slice(self.plan.seq_info());
        let tables = self.meta.slice(self.plan.block_tables());
        let blocks = decode_head_blocks(heads, cfg.num_kv_heads as usize);
        let grid = (
            grid_dim(blocks, "head blocks")?,
            grid_dim(seqs, "sequences")?,
            grid_dim(max_partitions, "partitions")?,
        );
        let t = self.tensors;

        let func = kernel::<T>(self.dev, ptx::PAGED_ATTENTION_DECODE_MODULE, ptx::PAGED_ATTENTION_DECODE)?;
        let mut args = self.stream.launch_builder(&func);
        args.arg(&mut *out).arg(&mut part_out).arg(&mut part_max).arg(&mut part_sum);
        args.arg(&t.q)
            .arg(&t.k_cache)
            .arg(&t.v_cache)
            .arg(&seq_info)
            .arg(&tables)
            .arg(cfg)
            .arg(&max_parts)
            .arg(&part_keys);
        let launch = LaunchConfig { grid_dim: grid, block_dim: (DECODE_THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the caller's contract (metadata checked against the tensors).
        unsafe { args.launch(launch) }.w()?;
        if max_partitions <= 1 {
            return Ok(());
        }

        let func =
            kernel::<T>(self.dev, ptx::PAGED_ATTENTION_DECODE_MODULE, ptx::PAGED_ATTENTION_DECODE_REDUCE)?;
        let mut args = self.stream.launch_builder(&func);
        args.arg(&mut *out)
            .arg(&part_out)
            .arg(&part_max)
            .arg(&part_sum)
            .arg(&seq_info)
            .arg(cfg)
            .arg(&max_parts)
            .arg(&part_keys);
        let launch = LaunchConfig {
            grid_dim: (grid_dim(heads, "heads")?, grid.1, 1),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads the partitions the first kernel wrote, indexed as it indexed them.
        unsafe { args.launch(launch) }.w()?;
        Ok(())
    }

    /// Prefill on CUDA cores: dynamic shared memory for the Q rows and one K/V tile (above the
    /// default 48 KiB for large head_dim, which needs an opt-in).
    unsafe fn prefill(&self, num_work_items: usize, out: &mut CudaSlice<T>) -> Result<()> {
        let smem = prefill_smem_bytes(self.cfg().head_dim as usize);
        let func = kernel::<T>(self.dev, ptx::PAGED_ATTENTION_PREFILL_MODULE, ptx::PAGED_ATTENTION_PREFILL)?;
        // SAFETY: forwarded from this function's caller's contract.
        unsafe { self.launch_prefill(&func, PREFILL_THREADS, smem, num_work_items, out) }
    }

    /// Prefill on tensor cores (f16 and bf16 only).
    unsafe fn prefill_tc(&self, num_work_items: usize, out: &mut CudaSlice<T>) -> Result<()> {
        let head_dim = self.cfg().head_dim as usize;
        if T::SUFFIX == "f32" || !prefill_tc_takes(head_dim) {
            return Err(bail(format!(
                "paged_attention: the tensor-core prefill kernel takes f16 or bf16 caches and head_dim a multiple of 16 up to 128, got {} and {head_dim}",
                T::SUFFIX
            )));
        }
        let smem = prefill_tc_smem_bytes(head_dim);
        let func =
            kernel::<T>(self.dev, ptx::PAGED_ATTENTION_PREFILL_TC_MODULE, ptx::PAGED_ATTENTION_PREFILL_TC)?;
        // SAFETY: forwarded from this function's caller's contract.
        unsafe { self.launch_prefill(&func, PREFILL_TC_THREADS, smem, num_work_items, out) }
    }

    /// Launches a prefill kernel (both take the same arguments): grid `(num_work_items,
    /// num_kv_heads)`, `threads` per block, `smem` bytes of dynamic shared memory.
    unsafe fn launch_prefill(
        &self,
        func: &CudaFunction,
        threads: u32,
        smem: usize,
        num_work_items: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let cfg = self.cfg();
        if smem > DEFAULT_SMEM_BYTES {
            self.opt_in_shared_memory(func, smem)?;
        }
        let seq_info = self.meta.slice(self.plan.seq_info());
        let tables = self.meta.slice(self.plan.block_tables());
        let work = self.meta.slice(self.plan.work());
        let t = self.tensors;
        let mut args = self.stream.launch_builder(func);
        args.arg(&mut *out).arg(&t.q).arg(&t.k_cache).arg(&t.v_cache);
        args.arg(&seq_info).arg(&tables).arg(&work).arg(cfg);
        let launch = LaunchConfig {
            grid_dim: (
                grid_dim(num_work_items, "work items")?,
                grid_dim(cfg.num_kv_heads as usize, "KV heads")?,
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the caller's contract (metadata checked against the tensors).
        unsafe { args.launch(launch) }.w()?;
        Ok(())
    }

    /// Raises the function's dynamic shared memory limit to `bytes`, after checking the card
    /// allows that much per block (every sm_80+ card allows the 82 KB head_dim 256 needs).
    fn opt_in_shared_memory(&self, func: &CudaFunction, bytes: usize) -> Result<()> {
        let max = self
            .stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .w()?;
        if bytes > max as usize {
            return Err(bail(format!(
                "paged_attention: head_dim {} needs {bytes} bytes of shared memory per block, this GPU allows {max}",
                self.cfg().head_dim
            )));
        }
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .w()?;
        Ok(())
    }
}
