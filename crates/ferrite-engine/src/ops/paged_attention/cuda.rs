//! The CUDA path of both ops: the same host-side checks as the CPU reference, the kernels' own
//! limits (`ferrite_kernels::plan`), dtype dispatch, then the launches (`ferrite_kernels::launch`).
//! The step's metadata is uploaded once, by the first layer, and reused by the others.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CudaStorage, DType, Layout, Shape};
use ferrite_kernels::launch::{self, AttentionTensors, KernelDType};
use ferrite_kernels::plan::{AttentionPlan, AttnSpec, PlanShape, SeqSpan, VEC_ELEMS};

use super::cache::WriteSlots;
use super::cpu::{Dims, PagedAttention};
use super::{attention_dtype_error, bail, write_dtype_error};

const _: () = assert!(super::PAD_SLOT == ferrite_kernels::plan::PAD_SLOT);

/// An [`super::AttentionMetadata`]'s uploads: the slot mapping, and one launch plan with
/// its packed metadata per attention shape (a model whose layers differ, say in sliding
/// window, has several). 24 layers made 48 small host-to-device copies a step before. A
/// step's own uploads, or a captured graph's (shared, refilled in place each replay).
#[derive(Default)]
pub(super) struct Uploads {
    uploaded: Arc<Mutex<Uploaded>>,
    shape: PlanShape,
}

#[derive(Default)]
struct Uploaded {
    slots: Option<(DeviceId, Arc<CudaSlice<u32>>)>,
    plans: Vec<(DeviceId, AttnSpec, Arc<PlanOnDevice>)>,
}

/// A launch plan and its metadata words on the device.
pub(super) struct PlanOnDevice {
    plan: AttentionPlan,
    words: CudaSlice<u32>,
}

impl Clone for Uploads {
    /// A clone uploads again when it is used (it could be used on another device), unless
    /// it shares a graph's buffers.
    fn clone(&self) -> Self {
        match self.shape {
            PlanShape::Exact => Self::default(),
            PlanShape::Bucketed => Self { uploaded: self.uploaded.clone(), shape: self.shape },
        }
    }
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let u = lock(&self.uploaded);
        f.debug_struct("Uploads")
            .field("slots", &u.slots.is_some())
            .field("plans", &u.plans.len())
            .field("shape", &self.shape)
            .finish()
    }
}

fn lock(u: &Mutex<Uploaded>) -> std::sync::MutexGuard<'_, Uploaded> {
    u.lock().unwrap_or_else(|p| p.into_inner())
}

/// Host data to the device on `dev`'s stream, bypassing candle's upload cache (which, while
/// a graph is prepared, hands out shared buffers keyed by their contents: these are
/// rewritten in place).
fn upload(dev: &CudaDevice, data: &[u32]) -> candle_core::Result<CudaSlice<u32>> {
    use candle_core::cuda_backend::WrapErr;
    // No zero-byte copies on CUDA: an empty batch (never launched) gets one unused word.
    if data.is_empty() {
        return dev.alloc_zeros::<u32>(1);
    }
    dev.cuda_stream().clone_htod(data).w()
}

impl Uploads {
    pub(super) fn graph(shared: &GraphUploads) -> Self {
        Self { uploaded: shared.0.clone(), shape: PlanShape::Bucketed }
    }

    /// The slot mapping on `dev`, uploaded by the first call.
    fn slots(&self, dev: &CudaDevice, slot_mapping: &[u32]) -> candle_core::Result<Arc<CudaSlice<u32>>> {
        let mut u = lock(&self.uploaded);
        match &u.slots {
            Some((id, slots)) if *id == dev.id() => Ok(slots.clone()),
            _ => {
                let slots = Arc::new(upload(dev, slot_mapping)?);
                u.slots = Some((dev.id(), slots.clone()));
                Ok(slots)
            }
        }
    }

    /// The plan for `spec` on `dev` with its words uploaded, made by `plan` the first time.
    fn plan(
        &self,
        dev: &CudaDevice,
        spec: &AttnSpec,
        plan: impl FnOnce(PlanShape) -> candle_core::Result<AttentionPlan>,
    ) -> candle_core::Result<Arc<PlanOnDevice>> {
        let mut u = lock(&self.uploaded);
        if let Some((_, _, p)) = u.plans.iter().find(|(id, s, _)| *id == dev.id() && s == spec) {
            return Ok(p.clone());
        }
        let plan = plan(self.shape)?;
        let words = upload(dev, &plan.words)?;
        let on_device = Arc::new(PlanOnDevice { plan, words });
        u.plans.push((dev.id(), *spec, on_device.clone()));
        Ok(on_device)
    }
}

/// The device copies of the attention metadata a captured CUDA graph reads: filled by the
/// eager run before the capture (the capture then finds them and bakes their addresses
/// in), rewritten in place before each replay by [`Self::refill`].
#[derive(Clone, Default)]
pub struct GraphUploads(Arc<Mutex<Uploaded>>);

impl GraphUploads {
    /// Writes `meta`'s slot mapping and launch plans into the buffers the graph reads, if
    /// they keep the geometry it was captured with (the same batch size, table row length,
    /// partitions and kernels for every attention shape the graph holds); otherwise writes
    /// nothing and returns false. `meta` must come from the same kind of step (decode) as
    /// the capture's.
    pub fn refill(&self, dev: &CudaDevice, meta: &super::AttentionMetadata) -> candle_core::Result<bool> {
        use candle_core::cuda_backend::WrapErr;
        let mut u = lock(&self.0);
        let Some((_, slots)) = &u.slots else { return Ok(false) };
        if slots.len() != meta.slot_mapping.len().max(1) {
            return Ok(false);
        }
        let seqs = spans(&meta.seqs);
        let mut plans = Vec::with_capacity(u.plans.len());
        for (_, spec, old) in &u.plans {
            let plan = AttentionPlan::shaped(spec, &seqs, PlanShape::Bucketed)
                .map_err(|e| bail(format!("paged_attention (CUDA graph): {e}")))?;
            if plan.geometry() != old.plan.geometry() {
                return Ok(false);
            }
            plans.push(plan);
        }
        let stream = dev.cuda_stream();
        let in_use = || bail("a CUDA graph's metadata is still referenced by a running step".into());
        let (_, slots) = u.slots.as_mut().expect("invariant: checked above");
        let slots = Arc::get_mut(slots).ok_or_else(in_use)?;
        if !meta.slot_mapping.is_empty() {
            stream.memcpy_htod(&meta.slot_mapping, slots).w()?;
        }
        for ((_, _, old), plan) in u.plans.iter_mut().zip(plans) {
            let old = Arc::get_mut(old).ok_or_else(in_use)?;
            if !plan.words.is_empty() {
                stream.memcpy_htod(&plan.words, &mut old.words).w()?;
            }
            old.plan = plan;
        }
        Ok(true)
    }
}

fn spans(seqs: &[super::SeqAttention]) -> Vec<SeqSpan<'_>> {
    seqs.iter()
        .map(|s| SeqSpan {
            query_start: s.query_start,
            query_len: s.query_len,
            context_len: s.context_len,
            block_table: &s.block_table,
        })
        .collect()
}

impl WriteSlots<'_> {
    pub(super) fn cuda_write(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        match (cache.dtype(), src.dtype()) {
            (DType::F32, DType::F32) => self.cuda_write_as::<f32>(cache, cache_l, src, src_l),
            (DType::F16, DType::F16) => self.cuda_write_as::<half::f16>(cache, cache_l, src, src_l),
            (DType::BF16, DType::BF16) => self.cuda_write_as::<half::bf16>(cache, cache_l, src, src_l),
            (c, s) => Err(write_dtype_error(c, s)),
        }
    }

    fn cuda_write_as<T: KernelDType + CudaDType>(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let w = self.check(cache_l, src_l)?;
        if self.slot_mapping.is_empty() {
            return Ok(());
        }
        let dev = cache.device.clone();
        let slots = self.meta.uploads.slots(&dev, self.slot_mapping)?;
        let src = src.as_cuda_slice::<T>()?.slice(w.src);
        let mut cache = cache.as_cuda_slice_mut::<T>()?.slice_mut(w.cache);
        // SAFETY: `check` verified every slot is below the cache's slot count.
        unsafe { launch::reshape_and_cache(&dev, &src, &mut cache, &slots, w.row_elems) }
    }
}

impl PagedAttention<'_> {
    pub(super) fn cuda_run(
        &self,
        inputs: [(&CudaStorage, &Layout); 3],
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let [(q, lq), (k, lk), (v, lv)] = inputs;
        let d = self.check(lq, lk, lv)?;
        let storage = match (q.dtype(), k.dtype(), v.dtype()) {
            (DType::F32, DType::F32, DType::F32) => self.cuda_run_as::<f32>(d, inputs)?,
            (DType::F16, DType::F16, DType::F16) => self.cuda_run_as::<half::f16>(d, inputs)?,
            (DType::BF16, DType::BF16, DType::BF16) => self.cuda_run_as::<half::bf16>(d, inputs)?,
            (q, k, v) => return Err(attention_dtype_error(q, k, v)),
        };
        Ok((storage, Shape::from_dims(&[d.num_tokens, d.num_heads, d.head_dim])))
    }

    fn cuda_run_as<T: KernelDType + CudaDType>(
        &self,
        d: Dims,
        [(q, lq), (k, lk), (v, lv)]: [(&CudaStorage, &Layout); 3],
    ) -> candle_core::Result<CudaStorage> {
        let dev = q.device.clone();
        // Tensor cores for prefill where the storage type is 16-bit and the card has the
        // kernel's shared memory (asked only for a prefill: a decode step, every layer of
        // it, needs no driver query).
        let half = T::SUFFIX != "f32";
        let prefill = self.meta.seqs.iter().any(|s| s.query_len != 1);
        let tensor_cores = half && prefill && launch::tensor_core_prefill_fits(&dev, d.head_dim)?;
        let spec = self.spec(d, tensor_cores);
        let plan = self.meta.uploads.plan(&dev, &spec, |shape| self.cuda_plan(&spec, shape))?;
        let tensors = AttentionTensors {
            q: aligned_view::<T>(q, lq, "q")?,
            k_cache: aligned_view::<T>(k, lk, "K cache")?,
            v_cache: aligned_view::<T>(v, lv, "V cache")?,
        };
        // No zero-byte allocations on CUDA: an empty batch gets one unused element.
        let len = (d.num_tokens * d.num_heads * d.head_dim).max(1);
        // SAFETY: the kernels write every (token, head) row: the checked sequences cover
        // every token, and the plan gives every head of every query a block.
        let mut out = unsafe { dev.alloc::<T>(len) }?;
        if cfg!(debug_assertions) {
            poison(&dev, &mut out)?;
        }
        // SAFETY: `check` verified the metadata against these tensors (ranges cover the
        // tokens, 1 <= query_len <= context_len, tables hold each context with block ids
        // inside the cache, head counts and head_dim match); `aligned_view` the alignment.
        unsafe { launch::paged_attention(&dev, &plan.plan, &plan.words, &tensors, &mut out) }?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    fn spec(&self, d: Dims, tensor_cores: bool) -> AttnSpec {
        AttnSpec {
            num_heads: d.num_heads,
            num_kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
            block_size: d.block_size,
            scale: self.params.scale,
            sliding_window: self.params.sliding_window,
            softcap: self.params.softcap,
            tensor_cores,
        }
    }

    /// The launch plan, or an error for shapes the kernels do not take (never launched).
    fn cuda_plan(&self, spec: &AttnSpec, shape: PlanShape) -> candle_core::Result<AttentionPlan> {
        AttentionPlan::shaped(spec, &spans(&self.meta.seqs), shape)
            .map_err(|e| bail(format!("paged_attention (CUDA): {e}")))
    }
}

/// The tensor's elements as a device view; its start must be 16-byte aligned for the
/// kernels' vector loads (allocations are; `paged_attention` realigns q).
fn aligned_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let view = super::super::contiguous_cuda_view(s, l, &format!("paged_attention: {what}"))?;
    let start = l.start_offset();
    if !start.is_multiple_of(VEC_ELEMS) {
        return Err(bail(format!(
            "paged_attention (CUDA): {what} starts at element {start}, not a multiple of {VEC_ELEMS} (16-byte loads)"
        )));
    }
    Ok(view)
}

/// Fills `out` with NaN (all-ones bytes are a NaN in f32, f16 and bf16). Debug builds do it
/// before the kernels run, so an output element they miss shows in the tests.
fn poison<T>(dev: &CudaDevice, out: &mut CudaSlice<T>) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, DevicePtrMut};
    use candle_core::cuda_backend::WrapErr;
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().w()?;
    let bytes = out.num_bytes();
    let (ptr, _record) = out.device_ptr_mut(&stream);
    // SAFETY: `ptr` is a live allocation of `bytes` bytes on this stream, and any byte
    // pattern is a valid float.
    unsafe { result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.w()
}
