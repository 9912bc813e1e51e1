//! The paged KV cache: for every layer a K and a V tensor of
//! `[num_blocks, block_size, num_kv_heads, head_dim]`. Which block belongs to which sequence is
//! the block allocator's business; this only owns the memory.

use candle_core::{DType, Device, Tensor};

use crate::ops::paged_attention::alloc_cache;

/// The cache's facts, fixed once by [`crate::EngineBuilder`]'s plan: the scheduler's block
/// manager, the cache's tensors, [`crate::EngineInfo`] and the metrics all read them from the
/// one `CacheConfig` in [`crate::EngineConfig`] (vLLM's `CacheConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Tokens per block (at least 1).
    pub block_size: usize,
    /// Blocks in every layer's cache. The builder replaces it with what memory allows.
    pub num_blocks: usize,
    /// Share full blocks between sequences with the same token prefix.
    pub enable_prefix_caching: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { block_size: 16, num_blocks: 512, enable_prefix_caching: true }
    }
}

impl CacheConfig {
    /// Tokens the whole cache holds.
    pub fn num_tokens(&self) -> usize {
        self.num_blocks.saturating_mul(self.block_size)
    }
}

/// What a model needs its cache to look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvCacheSpec {
    /// Bytes one cached token takes over all layers (K and V).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

#[derive(Debug)]
pub struct KvCache {
    pub spec: KvCacheSpec,
    pub block_size: usize,
    pub num_blocks: usize,
    /// Per layer: (K, V).
    pub layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new(
        spec: KvCacheSpec,
        block_size: usize,
        num_blocks: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let layers = (0..spec.num_layers)
            .map(|_| {
                alloc_cache(num_blocks, block_size, spec.num_kv_heads, spec.head_dim, spec.dtype, device)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { spec, block_size, num_blocks, layers })
    }

    /// As many blocks as fit in `bytes` (at least one).
    pub fn num_blocks_for_bytes(spec: &KvCacheSpec, block_size: usize, bytes: usize) -> usize {
        (bytes / (spec.bytes_per_token() * block_size)).max(1)
    }
}
