//! GPU memory planning: how many KV cache blocks a card can hold next to the model.
//!
//! After the weights are loaded, one maximal step (`max_num_batched_tokens` prompt tokens) runs
//! over a cache just big enough for it, and the step's peak activation memory is read from the
//! CUDA memory pool's high-water mark of reserved memory. The cache then gets what is left of
//! `gpu_memory_utilization` of the card once the weights and CUDA context, the peak activations
//! and what the step allocated outside the pool (cuBLAS workspaces, modules) are taken out.
//! A model that does not fit fails here with the numbers, never with an out-of-memory crash
//! mid-request.
//!
//! The arithmetic ([`plan_from`]) is plain and tested on any machine; the measurement
//! ([`measure`]) needs the `cuda` feature and a GPU.

use candle_core::Device;

use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::model::arch::Model;
use crate::{forward_input::ForwardInput, sched::ScheduledChunk};

/// What one profiling step measured, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub total: usize,
    /// In use before the step: weights, the CUDA context, the profiling cache.
    pub used_before: usize,
    /// The step's activations at their peak (the pool's reserved high-water mark minus what it
    /// reserved before).
    pub peak_activation: usize,
    /// Allocated by the step outside the memory pool and still held (cuBLAS workspaces, loaded
    /// kernels).
    pub other: usize,
    /// The profiling cache, part of `used_before`, freed before the real cache is made.
    pub profile_cache: usize,
}

/// The resulting KV cache size and how it was reached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    pub measured: Measured,
    pub utilization: f64,
    pub kv_cache_bytes: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl MemoryPlan {
    pub fn max_concurrent_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.measured;
        write!(
            f,
            "card {} × {:.2} = {}; weights and context {}, peak activations {}, other {}; KV cache {} = {} blocks of {} tokens ({} tokens at once)",
            gib(m.total),
            self.utilization,
            gib((m.total as f64 * self.utilization) as usize),
            gib(m.used_before - m.profile_cache),
            gib(m.peak_activation),
            gib(m.other),
            gib(self.kv_cache_bytes),
            self.num_blocks,
            self.block_size,
            self.max_concurrent_tokens()
        )
    }
}

fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The KV cache that fits `utilization` of the card after what `m` measured. Errors, with the
/// numbers, when less than `min_blocks` (one longest sequence) would fit.
pub fn plan_from(
    m: Measured,
    utilization: f64,
    spec: &KvCacheSpec,
    block_size: usize,
    min_blocks: usize,
) -> Result<MemoryPlan, String> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(format!("--gpu-memory-utilization must be in (0, 1], got {utilization}"));
    }
    let budget = (m.total as f64 * utilization) as usize;
    let needed = (m.used_before - m.profile_cache) + m.peak_activation + m.other;
    let block_bytes = spec.bytes_per_token() * block_size;
    let kv_cache_bytes = budget.saturating_sub(needed);
    let num_blocks = kv_cache_bytes / block_bytes;
    let plan = MemoryPlan { measured: m, utilization, kv_cache_bytes, num_blocks, block_size };
    if num_blocks < min_blocks {
        return Err(format!(
            "the model does not fit: {plan}; one sequence of the longest length needs {min_blocks} blocks of {} — raise --gpu-memory-utilization, lower --max-model-len or --max-num-batched-tokens, or use a smaller dtype",
            gib(block_bytes)
        ));
    }
    Ok(plan)
}

/// Runs one maximal step of `num_tokens` prompt tokens on `model` and measures the memory it
/// takes (CUDA only).
pub fn measure(model: &dyn Model, block_size: usize, num_tokens: usize) -> candle_core::Result<Measured> {
    let device = model.device().clone();
    let Device::Cuda(_) = &device else {
        candle_core::bail!("GPU memory planning runs on a CUDA device, not {device:?}");
    };
    let spec = model.kv_cache_spec();
    let num_blocks = num_tokens.div_ceil(block_size);
    let mut kv = KvCache::new(spec, block_size, num_blocks, &device)?;
    let profile_cache = num_blocks * block_size * spec.bytes_per_token();
    let tokens = vec![0u32; num_tokens];
    let table: Vec<_> = (0..num_blocks as u32).map(crate::sched::BlockId).collect();
    let chunk = ScheduledChunk {
        token_ids: &tokens,
        num_computed_tokens: 0,
        block_table: &table,
        all_logits: false,
        hidden: Default::default(),
    };
    let input = ForwardInput::build(&[chunk], block_size, &device)?;
    device.synchronize()?;
    let before = cuda::snapshot(&device)?;
    cuda::reset_peak(&device)?;
    model.forward(&input, &mut kv)?;
    device.synchronize()?;
    let after = cuda::snapshot(&device)?;
    let peak = cuda::peak(&device)?;
    Ok(Measured {
        total: before.total,
        used_before: before.total - before.free,
        peak_activation: peak.saturating_sub(before.pool_reserved),
        // Device memory that left the free list during the step, other than what the pool
        // still reserves for itself.
        other: (before.free.saturating_sub(after.free))
            .saturating_sub(after.pool_reserved.saturating_sub(before.pool_reserved)),
        profile_cache,
    })
}

/// Makes the CUDA memory pool keep what a step frees, for the next step. Its default release
/// threshold is 0: at every synchronization (one per step, when the logits come back) it hands
/// freed memory back to the driver, and the next step maps it again, milliseconds per step.
/// The memory plan already counts the peak activations, so holding them costs nothing extra.
/// Nothing to do on the CPU.
pub fn keep_freed_memory(device: &Device) -> candle_core::Result<()> {
    match device {
        Device::Cuda(_) => cuda::set_release_threshold(device, u64::MAX),
        _ => Ok(()),
    }
}

/// Hands what the CUDA memory pool keeps back to the device, once an engine has stopped and
/// dropped its tensors: another model loaded in this process plans its memory from what the
/// device reports free. Nothing to do on the CPU.
pub fn release_freed_memory(device: &Device) -> candle_core::Result<()> {
    match device {
        Device::Cuda(_) => {
            device.synchronize()?;
            cuda::trim(device)
        }
        _ => Ok(()),
    }
}

/// Device memory and the CUDA memory pool at one moment, in bytes.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // only a CUDA build takes one
struct Snapshot {
    free: usize,
    total: usize,
    pool_reserved: usize,
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::Device;

    use super::Snapshot;

    fn pool(device: &Device) -> candle_core::Result<sys::CUmemoryPool> {
        let cuda = device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out pointer to a pool handle.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, stream.context().cu_device()) }
            .result()
            .map_err(candle_core::Error::wrap)?;
        Ok(pool)
    }

    fn attribute(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> candle_core::Result<usize> {
        let mut value = 0u64;
        // SAFETY: these attributes are cuuint64_t, written through the pointer.
        unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast()) }
            .result()
            .map_err(candle_core::Error::wrap)?;
        Ok(value as usize)
    }

    pub fn snapshot(device: &Device) -> candle_core::Result<Snapshot> {
        let pool = pool(device)?;
        let (free, total) = result::mem_get_info().map_err(candle_core::Error::wrap)?;
        Ok(Snapshot {
            free,
            total,
            pool_reserved: attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        })
    }

    /// Sets one of the pool's cuuint64_t attributes.
    fn set_attribute(device: &Device, attr: sys::CUmemPool_attribute, value: u64) -> candle_core::Result<()> {
        let pool = pool(device)?;
        let mut value = value;
        // SAFETY: the attributes set here are cuuint64_t, read through the pointer.
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut value as *mut u64).cast()) }
            .result()
            .map_err(candle_core::Error::wrap)
    }

    /// Resets the pool's high-water mark of reserved memory to what it reserves now (this
    /// attribute may only be set to 0).
    pub fn reset_peak(device: &Device) -> candle_core::Result<()> {
        set_attribute(device, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0)
    }

    pub fn set_release_threshold(device: &Device, bytes: u64) -> candle_core::Result<()> {
        set_attribute(device, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, bytes)
    }

    /// Releases every byte the pool reserves and no allocation uses.
    pub fn trim(device: &Device) -> candle_core::Result<()> {
        let pool = pool(device)?;
        // SAFETY: a valid pool handle; trimming never touches memory still allocated.
        unsafe { sys::cuMemPoolTrimTo(pool, 0) }.result().map_err(candle_core::Error::wrap)
    }

    /// The most the pool reserved since the reset: what the step really took from the card,
    /// fragmentation included (the in-use high-water mark would miss that).
    pub fn peak(device: &Device) -> candle_core::Result<usize> {
        attribute(pool(device)?, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::Device;

    use super::Snapshot;

    fn unavailable<T>() -> candle_core::Result<T> {
        candle_core::bail!("this build has no CUDA support (build with --features cuda)")
    }

    pub fn snapshot(_: &Device) -> candle_core::Result<Snapshot> {
        unavailable()
    }

    pub fn reset_peak(_: &Device) -> candle_core::Result<()> {
        unavailable()
    }

    pub fn peak(_: &Device) -> candle_core::Result<usize> {
        unavailable()
    }

    pub fn set_release_threshold(_: &Device, _: u64) -> candle_core::Result<()> {
        unavailable()
    }

    pub fn trim(_: &Device) -> candle_core::Result<()> {
        unavailable()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    const GIB: usize = 1 << 30;

    fn spec() -> KvCacheSpec {
        // 2 * 24 layers * 2 heads * 64 * 2 bytes = 12 KiB per token.
        KvCacheSpec { num_layers: 24, num_kv_heads: 2, head_dim: 64, dtype: DType::BF16 }
    }

    fn measured(used_before: usize, peak: usize) -> Measured {
        Measured {
            total: 80 * GIB,
            used_before,
            peak_activation: peak,
            other: GIB / 2,
            profile_cache: GIB / 4,
        }
    }

    #[test]
    fn the_cache_gets_the_budget_left_after_weights_activations_and_workspaces() {
        let m = measured(2 * GIB, 3 * GIB);
        let plan = plan_from(m, 0.9, &spec(), 16, 1).unwrap();
        let budget = (80.0 * 0.9 * GIB as f64) as usize;
        // The profiling cache is freed before the real one is allocated: it is not charged.
        let left = budget - (2 * GIB - GIB / 4) - 3 * GIB - GIB / 2;
        assert_eq!(plan.kv_cache_bytes, left);
        let block = spec().bytes_per_token() * 16;
        assert_eq!(plan.num_blocks, left / block);
        assert!(plan.num_blocks * block <= left && left - plan.num_blocks * block < block);
        assert_eq!(plan.max_concurrent_tokens(), plan.num_blocks * 16);
        let shown = plan.to_string();
        assert!(shown.contains("80.00 GiB × 0.90") && shown.contains("peak activations 3.00 GiB"), "{shown}");
    }

    #[test]
    fn a_model_that_does_not_fit_is_an_error_with_the_numbers() {
        let err = plan_from(measured(70 * GIB, 5 * GIB), 0.9, &spec(), 16, 8).unwrap_err();
        assert!(err.contains("does not fit") && err.contains("peak activations 5.00 GiB"), "{err}");
        assert!(err.contains("needs 8 blocks"), "{err}");
        // Enough room for fewer blocks than one longest sequence needs is still an error.
        let m = measured(2 * GIB, 3 * GIB);
        let fits = plan_from(m, 0.9, &spec(), 16, 1).unwrap().num_blocks;
        assert!(plan_from(m, 0.9, &spec(), 16, fits + 1).is_err());
        assert!(plan_from(m, 0.9, &spec(), 16, fits).is_ok());
    }

    #[test]
    fn utilization_outside_zero_to_one_is_refused() {
        for u in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(plan_from(measured(GIB, GIB), u, &spec(), 16, 1).unwrap_err().contains("utilization"));
        }
    }

    #[test]
    fn measuring_needs_a_cuda_device() {
        struct Cpu;
        impl Model for Cpu {
            fn kv_cache_spec(&self) -> KvCacheSpec {
                spec()
            }
            fn vocab_size(&self) -> usize {
                8
            }
            fn weight_bytes(&self) -> usize {
                0
            }
            fn device(&self) -> &Device {
                &Device::Cpu
            }
            fn forward_with_hidden(
                &self,
                _: &ForwardInput,
                _: &mut KvCache,
            ) -> candle_core::Result<(candle_core::Tensor, Option<candle_core::Tensor>)> {
                unreachable!("not run on the CPU")
            }
        }
        let err = measure(&Cpu, 16, 64).unwrap_err().to_string();
        assert!(err.contains("CUDA device"), "{err}");
    }
}
