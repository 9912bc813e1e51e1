//! CUDA graphs of decode steps: a small model's decode step is a few hundred short kernels, and
//! issuing them from the host costs more than running them (BENCHMARKS.md, session 8: 3.3–4 ms
//! per token for a 0.5B model whose weights take 0.33 ms to read). A graph replays the whole
//! forward pass with one launch.
//!
//! How (vLLM's decode graphs, captured lazily rather than all at start-up):
//! - A decode step (one new token and one logits row per sequence) is padded up to a capture
//!   size (1, 2, 4, 8, then multiples of 8; [`capture_sizes`]) with rows that write no K/V
//!   ([`HostInput::pad_to`]).
//! - Everything the pass reads that changes from step to step lives in device buffers owned by
//!   the graph: token ids, positions (RoPE rows are gathered from the model's device tables),
//!   the slot mapping and the attention plans' metadata ([`GraphUploads`]). Before a replay the
//!   host rewrites them in place; candle's own small parameter uploads (shapes, strides) come
//!   from its capture cache, whose contents never change.
//! - Launch geometry is baked into a graph, so attention plans are
//!   [bucketed](ferrite_kernels::plan::PlanShape::Bucketed) (table rows and partitions rounded
//!   up to powers of two, the same arithmetic) and a graph serves every step whose plans keep
//!   its geometry. A step that matches no graph of its size runs eagerly into the new graph's
//!   buffers (so it is the step's own result), and is then captured.
//! - The logits are copied into a buffer the graph owns; every allocation inside the graph is
//!   freed inside it, so replays never collide with what the previous replay left.
//!
//! A replay computes exactly what the eager pass over the same padded batch computes (the same
//! kernels with the same arguments); tests/cuda_graphs.rs checks it bit for bit. A failed
//! capture turns graphs off with a warning and the engine runs eagerly.

use std::time::Instant;

use candle_core::cuda_backend::cudarc::cublas::sys as cublas_sys;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaSlice, DevicePtr};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};

use crate::forward_input::{ForwardInput, HostInput};
use crate::kv_cache::KvCache;
use crate::model::arch::Model;
use crate::ops::paged_attention::{AttentionMetadata, GraphUploads, PAD_SLOT};
use crate::runner::{capture_sizes, GraphStats};

/// cuBLAS's workspace, set explicitly before the first capture (32 MiB, what NVIDIA advises
/// for Hopper): cuBLAS must not allocate its own while a stream is being captured.
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// The most graphs kept; the least recently replayed goes first. Each holds its pass's
/// intermediate buffers (CUDA lets graphs launched on one stream share that memory).
const MAX_GRAPHS: usize = 64;

/// A captured graph, movable to the engine thread.
struct Graph(CudaGraph);

// SAFETY: CUDA graph objects are not internally synchronized, but any thread may use one when
// accesses are serialized (CUDA's "graph thread safety" rules): a `Graph` is only reached
// through `&mut DecodeGraphs`, which one thread holds at a time (the engine thread's).
unsafe impl Send for Graph {}

/// One captured decode pass and the buffers it reads and writes.
struct Captured {
    num_seqs: usize,
    graph: Graph,
    token_ids: Tensor,
    position_ids: Tensor,
    /// `0..num_seqs`: a decode step's logits rows are its sequences, in order.
    logits_indices: Tensor,
    uploads: GraphUploads,
    /// `[num_seqs, vocab]` f32, rewritten by each replay.
    logits: Tensor,
    last_used: u64,
}

/// The decode graphs of one engine (its thread owns them: graphs are not thread safe).
pub struct DecodeGraphs {
    sizes: Vec<usize>,
    graphs: Vec<Captured>,
    /// Why graphs are off (a capture failed); the engine then runs eagerly.
    disabled: Option<String>,
    stats: GraphStats,
    clock: u64,
    /// The buffer set as cuBLAS's workspace (it must outlive every product that uses it).
    cublas_workspace: Option<CudaSlice<u8>>,
}

impl DecodeGraphs {
    pub fn new(max_num_seqs: usize) -> Self {
        Self {
            sizes: capture_sizes(max_num_seqs),
            graphs: Vec::new(),
            disabled: None,
            stats: GraphStats::default(),
            clock: 0,
            cublas_workspace: None,
        }
    }

    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    pub fn failure(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    /// Runs `host` through a graph of its size when it is a decode step the model can replay:
    /// the step's input (padded) and its logits, `[host's sequences, vocab]` f32. `None`: run it
    /// eagerly.
    pub fn forward(
        &mut self,
        model: &dyn Model,
        kv: &mut KvCache,
        host: &HostInput,
    ) -> candle_core::Result<Option<(ForwardInput, Tensor)>> {
        let Device::Cuda(dev) = model.device() else { return Ok(None) };
        let num_seqs = host.seqs.len();
        if self.disabled.is_some() || num_seqs == 0 || !host.is_decode() || !model.replayable(&host.positions)
        {
            return Ok(None);
        }
        let Some(&size) = self.sizes.iter().find(|&&s| s >= num_seqs) else { return Ok(None) };
        let mut padded = host.clone();
        padded.pad_to(size);
        // A replay runs no op's host-side checks: make the ones its kernels rely on here.
        check_in_cache(&padded, kv)?;
        let attention = padded.attention();
        self.clock += 1;
        for g in self.graphs.iter_mut().filter(|g| g.num_seqs == size) {
            if g.uploads.refill(dev, &attention)? {
                copy_from_host(&g.token_ids, &padded.token_ids)?;
                copy_from_host(&g.position_ids, &padded.positions)?;
                g.graph.0.launch().w()?;
                g.last_used = self.clock;
                self.stats.replays += 1;
                let logits = g.logits.narrow(0, 0, num_seqs)?;
                let input = graph_input(g, padded, attention);
                return Ok(Some((input, logits)));
            }
        }
        self.capture(model, kv, dev, padded, num_seqs).map(Some)
    }

    /// Runs the padded step eagerly into a new graph's buffers, then captures the same pass.
    /// The eager run is the step's result; a capture that fails leaves it so and turns graphs
    /// off.
    fn capture(
        &mut self,
        model: &dyn Model,
        kv: &mut KvCache,
        dev: &CudaDevice,
        padded: HostInput,
        real: usize,
    ) -> candle_core::Result<(ForwardInput, Tensor)> {
        let started = Instant::now();
        if let Err(e) = self.set_cublas_workspace(dev) {
            // Nothing ran yet: this step runs eagerly, graphs stay off.
            tracing::warn!(error = %e, "could not set cuBLAS's workspace: decode steps run eagerly");
            self.disabled = Some(e.to_string());
            let input = padded.upload(model.device())?;
            let logits = model.forward(&input, kv)?.narrow(0, 0, real)?;
            return Ok((input, logits));
        }
        let device = model.device();
        let num_seqs = padded.seqs.len();
        let uploads = GraphUploads::default();
        let attention = padded.attention().with_graph_uploads(&uploads);
        let input = ForwardInput {
            token_ids: Tensor::from_slice(&padded.token_ids, num_seqs, device)?,
            position_ids: Tensor::from_slice(&padded.positions, num_seqs, device)?,
            positions: padded.positions.clone(),
            attention,
            logits_indices: Tensor::from_slice(&padded.logits_indices, num_seqs, device)?,
            logits_rows: padded.logits_rows.clone(),
            all_logits: padded.all_logits.clone(),
            hidden_indices: None,
            hidden_rows: padded.hidden_rows.clone(),
        };
        let logits = Tensor::zeros((num_seqs, model.vocab_size()), DType::F32, device)?;
        let mut pass = || -> candle_core::Result<()> { logits.slice_set(&model.forward(&input, kv)?, 0, 0) };
        let graph = {
            // candle's small parameter uploads come from (and, in the eager run, go into) a
            // cache while this guard lives: the capture then finds each one there.
            let _cache = dev.enable_cuda_graph_htod_cache();
            // The step itself, eagerly: fills the graph's metadata buffers and candle's cache.
            pass()?;
            let stream = dev.cuda_stream();
            let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
            match stream.begin_capture(mode).w() {
                Err(e) => Err(e),
                Ok(()) => {
                    let captured = pass();
                    // Ends the capture whatever happened, so the stream leaves capture mode.
                    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
                    captured.and(ended)
                }
            }
        };
        let graph = match graph {
            Ok(Some(graph)) => graph,
            Ok(None) => return self.give_up("the capture recorded no work".into(), input, logits, real),
            Err(e) => return self.give_up(e.to_string(), input, logits, real),
        };
        let captured = Captured {
            num_seqs,
            graph: Graph(graph),
            token_ids: input.token_ids.clone(),
            position_ids: input.position_ids.clone(),
            logits_indices: input.logits_indices.clone(),
            uploads,
            logits: logits.clone(),
            last_used: self.clock,
        };
        self.keep(captured, started.elapsed().as_secs_f64(), dev);
        Ok((input, logits.narrow(0, 0, real)?))
    }

    /// Keeps a new graph, evicting the least recently replayed one past [`MAX_GRAPHS`].
    fn keep(&mut self, captured: Captured, capture_secs: f64, dev: &CudaDevice) {
        if self.graphs.len() >= MAX_GRAPHS {
            let oldest = (0..self.graphs.len()).min_by_key(|&i| self.graphs[i].last_used);
            if let Some(i) = oldest {
                self.graphs.swap_remove(i);
                self.stats.evictions += 1;
            }
        }
        self.stats.captures += 1;
        self.stats.capture_secs += capture_secs;
        tracing::info!(
            batch = captured.num_seqs,
            graphs = self.graphs.len() + 1,
            capture_ms = capture_secs * 1e3,
            graph_memory_mib = graph_memory_bytes(dev).map(|b| b as f64 / (1 << 20) as f64),
            "captured a CUDA graph of a decode step"
        );
        self.graphs.push(captured);
    }

    fn set_cublas_workspace(&mut self, dev: &CudaDevice) -> candle_core::Result<()> {
        if self.cublas_workspace.is_some() {
            return Ok(());
        }
        let stream = dev.cuda_stream();
        let workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES).w()?;
        let blas = dev.cublas_handle();
        {
            let (ptr, _sync) = workspace.device_ptr(&stream);
            // SAFETY: a live device allocation of CUBLAS_WORKSPACE_BYTES bytes (256-byte
            // aligned, as every allocation is), kept in `self` for as long as the engine runs
            // products on this handle.
            let status = unsafe {
                cublas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE_BYTES,
                )
            };
            if status != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                candle_core::bail!("cublasSetWorkspace: {status:?}");
            }
        }
        self.cublas_workspace = Some(workspace);
        Ok(())
    }

    fn give_up(
        &mut self,
        why: String,
        input: ForwardInput,
        logits: Tensor,
        real: usize,
    ) -> candle_core::Result<(ForwardInput, Tensor)> {
        tracing::warn!(error = %why, "CUDA graph capture failed: decode steps run eagerly from now on");
        self.disabled = Some(why);
        Ok((input, logits.narrow(0, 0, real)?))
    }
}

/// The step's input as the engine reads it after a replay: the graph's tensors, the step's
/// host-side rows.
fn graph_input(g: &Captured, padded: HostInput, attention: AttentionMetadata) -> ForwardInput {
    ForwardInput {
        token_ids: g.token_ids.clone(),
        position_ids: g.position_ids.clone(),
        positions: padded.positions,
        attention,
        logits_indices: g.logits_indices.clone(),
        logits_rows: padded.logits_rows,
        all_logits: padded.all_logits,
        hidden_indices: None,
        hidden_rows: padded.hidden_rows,
    }
}

/// Every block a sequence reads and every slot written is inside the cache (the attention and
/// cache-write ops check this on their eager path).
fn check_in_cache(host: &HostInput, kv: &KvCache) -> candle_core::Result<()> {
    let num_slots = kv.num_blocks * kv.block_size;
    if let Some(s) = host.slot_mapping.iter().find(|&&s| s != PAD_SLOT && s as usize >= num_slots) {
        candle_core::bail!("CUDA graph step: slot {s} is outside the cache ({num_slots} slots)");
    }
    for seq in &host.seqs {
        let blocks = seq.context_len.div_ceil(kv.block_size);
        if seq.block_table.len() < blocks {
            candle_core::bail!(
                "CUDA graph step: {} blocks hold no context of {}",
                seq.block_table.len(),
                seq.context_len
            );
        }
        if let Some(b) = seq.block_table[..blocks].iter().find(|&&b| b as usize >= kv.num_blocks) {
            candle_core::bail!("CUDA graph step: block {b} is outside the cache ({} blocks)", kv.num_blocks);
        }
    }
    Ok(())
}

/// Bytes the device holds for graphs' own allocations now (`None` where the driver does not
/// say).
fn graph_memory_bytes(dev: &CudaDevice) -> Option<u64> {
    let mut bytes = 0u64;
    let attr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT;
    // SAFETY: the attribute is a u64 the driver writes into `bytes`.
    let r = unsafe {
        sys::cuDeviceGetGraphMemAttribute(
            dev.cuda_stream().context().cu_device(),
            attr,
            (&mut bytes as *mut u64).cast(),
        )
    };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(bytes)
}

/// Overwrites a contiguous u32 tensor with `data` (same length), in stream order.
fn copy_from_host(t: &Tensor, data: &[u32]) -> candle_core::Result<()> {
    if t.elem_count() != data.len() {
        candle_core::bail!("copy_from_host: {} values into a tensor of {}", data.len(), t.elem_count());
    }
    t.inplace_op1(&CopyFromHost(data))
}

struct CopyFromHost<'a>(&'a [u32]);

impl InplaceOp1 for CopyFromHost<'_> {
    fn name(&self) -> &'static str {
        "copy-from-host"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::U32(v), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("copy_from_host: a contiguous u32 tensor");
        };
        v[start..end].copy_from_slice(self.0);
        Ok(())
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("copy_from_host: a contiguous u32 tensor");
        };
        let stream = storage.device.cuda_stream();
        let mut view = storage.as_cuda_slice_mut::<u32>()?.slice_mut(start..end);
        // The stream's own copy, not candle's (which may serve cached device data).
        stream.memcpy_htod(self.0, &mut view).w()
    }
}
