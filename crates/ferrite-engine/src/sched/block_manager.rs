//! KV block manager with automatic prefix caching: hands out block ids for sequences' block
//! tables, lets sequences whose prompts start alike share their full blocks, and evicts cached
//! blocks least-recently-used when it runs out. Holds no tensors and no request ids: a sequence
//! owns its block table (`Vec<BlockId>`) and a [`BlockHashes`], and passes them in.
//!
//! The ideas follow vLLM v1's `KVCacheManager` / `BlockPool`: a full block is named by a hash
//! chained over its parent's hash and its own token ids, so one hash stands for the whole prefix
//! up to the block's end; a freed block that has a hash stays findable until it is evicted; a
//! table is released tail first, so eviction takes the ends of prefixes before their beginnings.
//!
//! Every block is in exactly one place:
//! - in use: ref count > 0 (the number of tables holding it), with or without a hash;
//! - free: ref count 0, no hash, on the free list (handed out first);
//! - evictable: ref count 0, hash registered, in the LRU (handed out when the free list is empty,
//!   dropping its hash).
//!
//! Unlike vLLM, a matching 64-bit hash is never enough to hand out a block: each cached entry
//! keeps its token ids and the [`PrefixId`] of its parent entry, and a hit must match both, so
//! a collision is a miss, never wrong KV.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::kv_cache::CacheConfig;
use crate::sched::{BlockError, BlockId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockConfigError {
    #[error("block_size must be at least 1 token, got 0")]
    ZeroBlockSize,
    #[error("num_blocks {num_blocks} is more than block ids can address (at most {max})")]
    TooManyBlocks { num_blocks: usize, max: u64 },
}

/// Chained hash of one full block: FNV-1a 64 over the parent block's hash (none for a
/// sequence's first block) and the block's token ids. Stands for the whole prefix up to the
/// block's end, up to 64-bit collisions (which lookups check for; see [`PrefixId`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// One registration in the prefix cache, never reused (unlike a [`BlockId`] or a 64-bit hash).
///
/// A cache entry records its parent's `PrefixId`, and a lookup accepts an entry only when that
/// parent is the entry it matched just before and the token ids are equal. By induction from
/// the first block, a hit chain holds exactly the prompt's tokens: a hash collision, or an entry
/// left behind after its parent was evicted, ends the hit instead of handing out wrong KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixId(u64);

/// What a sequence keeps beside its block table for prefix caching, created empty with the
/// sequence and passed to [`BlockManager::lookup_prefix`] and [`BlockManager::cache_full_blocks`].
///
/// Invariants: it belongs to one sequence of one manager (hashes depend on the block size), and
/// that sequence's token ids only grow, so the hash of full block `i` never changes and is
/// computed once. Kept across preemption: a readmitted sequence reuses its hashes.
#[derive(Debug, Clone, Default)]
pub struct BlockHashes {
    /// `hashes[i]`: chained hash of the sequence's full block `i`.
    hashes: Vec<BlockHash>,
    /// `prefix_ids[i]`: the cache entry that holds the prefix up to the end of block `i` (the
    /// sequence's own block, or an identical one cached before it). Covers the leading blocks
    /// registered so far; always `<= hashes.len()` long.
    prefix_ids: Vec<PrefixId>,
}

impl BlockHashes {
    /// Full blocks hashed so far.
    #[cfg(test)]
    pub fn num_hashed_blocks(&self) -> usize {
        self.hashes.len()
    }

    /// Leading blocks known to the prefix cache (hit by a lookup or registered since).
    #[cfg(test)]
    pub fn num_cached_blocks(&self) -> usize {
        self.prefix_ids.len()
    }

    /// Hashes the full blocks of `token_ids` that are not hashed yet.
    fn hash_full_blocks(&mut self, token_ids: &[u32], block_size: usize) {
        for block in token_ids.chunks_exact(block_size).skip(self.hashes.len()) {
            let parent = self.hashes.last().copied();
            self.hashes.push(hash_block(parent, block));
        }
    }
}

/// The cached blocks a new sequence can start from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixHit {
    /// The first blocks of the sequence's table, one reference taken on each.
    pub blocks: Vec<BlockId>,
    /// `blocks.len() * block_size`: the sequence's `num_computed_tokens` to start from.
    pub num_cached_tokens: usize,
}

/// One full block registered in the prefix cache, under its [`BlockHash`].
#[derive(Debug)]
struct CacheEntry {
    block: BlockId,
    id: PrefixId,
    parent: Option<PrefixId>,
    token_ids: Box<[u32]>,
}

impl CacheEntry {
    /// Whether this entry holds exactly `token_ids` after the prefix `parent`.
    fn matches(&self, parent: Option<PrefixId>, token_ids: &[u32]) -> bool {
        self.parent == parent && *self.token_ids == *token_ids
    }
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    /// Number of block tables holding the block.
    ref_count: u32,
    /// Set exactly while the block is registered: `cached[hash].block` is this block.
    hash: Option<BlockHash>,
    /// Set exactly while the block is evictable: its key in `evictable`.
    evictable_tick: Option<u64>,
}

/// KV block ids, ref counts and the prefix cache. See the module docs for the invariants.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    enable_prefix_caching: bool,
    /// Indexed by `BlockId.0`.
    blocks: Vec<BlockMeta>,
    /// Unused blocks without a hash, handed out front first.
    free: VecDeque<BlockId>,
    /// Unused blocks with a hash, by the tick at which they were freed: the first is the least
    /// recently used and is evicted first.
    evictable: BTreeMap<u64, BlockId>,
    next_tick: u64,
    cached: HashMap<BlockHash, CacheEntry>,
    next_prefix_id: u64,
    prefix_cache_queried_tokens: u64,
    prefix_cache_hit_tokens: u64,
}

impl BlockManager {
    pub fn new(config: CacheConfig) -> Result<Self, BlockConfigError> {
        let CacheConfig { num_blocks, block_size, enable_prefix_caching } = config;
        if block_size == 0 {
            return Err(BlockConfigError::ZeroBlockSize);
        }
        let num_ids = u32::try_from(num_blocks)
            .map_err(|_| BlockConfigError::TooManyBlocks { num_blocks, max: u64::from(u32::MAX) })?;
        Ok(Self {
            block_size,
            enable_prefix_caching,
            blocks: vec![BlockMeta::default(); num_blocks],
            free: (0..num_ids).map(BlockId).collect(),
            evictable: BTreeMap::new(),
            next_tick: 0,
            cached: HashMap::new(),
            next_prefix_id: 0,
            prefix_cache_queried_tokens: 0,
            prefix_cache_hit_tokens: 0,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now: free ones plus evictable cached ones.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn can_allocate(&self, num_blocks: usize) -> bool {
        num_blocks <= self.num_free_blocks()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn num_blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Fraction of blocks in use, 0 to 1; evictable cached blocks count as free.
    pub fn usage(&self) -> f64 {
        match self.num_total_blocks() {
            0 => 0.0,
            total => (total - self.num_free_blocks()) as f64 / total as f64,
        }
    }

    /// Number of tables holding `id` (0 for an unknown id).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks.get(id.0 as usize).map_or(0, |m| m.ref_count)
    }

    /// Full blocks registered in the prefix cache, in use or evictable.
    #[cfg(test)]
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Prompt tokens looked up since the start (`prefix_cache_queries_total`).
    pub fn prefix_cache_queried_tokens(&self) -> u64 {
        self.prefix_cache_queried_tokens
    }

    /// Of those, tokens found cached (`prefix_cache_hits_total`).
    pub fn prefix_cache_hit_tokens(&self) -> u64 {
        self.prefix_cache_hit_tokens
    }

    /// The longest run of cached full blocks that matches the start of `token_ids`, one
    /// reference taken on each (an evictable block leaves the LRU). Call it when a sequence is
    /// (re)admitted with an empty table; the caller starts its table with `blocks` and its
    /// `num_computed_tokens` at `num_cached_tokens`. Resets what `hashes` knows to be cached.
    ///
    /// Never covers the whole of `token_ids`: the last token is always left to compute, so the
    /// step produces its logits. Returns nothing when prefix caching is disabled.
    pub fn lookup_prefix(&mut self, hashes: &mut BlockHashes, token_ids: &[u32]) -> PrefixHit {
        hashes.prefix_ids.clear();
        if !self.enable_prefix_caching {
            return PrefixHit::default();
        }
        let bs = self.block_size;
        hashes.hash_full_blocks(token_ids, bs);
        let max_hit_blocks = token_ids.len().saturating_sub(1) / bs;
        let mut blocks = Vec::new();
        for (i, hash) in hashes.hashes.iter().take(max_hit_blocks).enumerate() {
            let parent = hashes.prefix_ids.last().copied();
            match self.cached.get(hash) {
                Some(entry) if entry.matches(parent, &token_ids[i * bs..(i + 1) * bs]) => {
                    hashes.prefix_ids.push(entry.id);
                    blocks.push(entry.block);
                }
                _ => break,
            }
        }
        for &id in &blocks {
            self.acquire(id);
        }
        let num_cached_tokens = blocks.len() * bs;
        self.prefix_cache_queried_tokens += token_ids.len() as u64;
        self.prefix_cache_hit_tokens += num_cached_tokens as u64;
        PrefixHit { blocks, num_cached_tokens }
    }

    /// Grows `table` so it holds `num_total_tokens` tokens, all or nothing: new blocks come
    /// from the free list, then by evicting the least recently used cached block.
    pub fn allocate_slots(
        &mut self,
        table: &mut Vec<BlockId>,
        num_total_tokens: usize,
    ) -> Result<(), BlockError> {
        let num_new_blocks = self.num_blocks_for(num_total_tokens).saturating_sub(table.len());
        if !self.can_allocate(num_new_blocks) {
            return Err(BlockError::OutOfBlocks {
                requested: num_new_blocks,
                free: self.num_free_blocks(),
                total: self.num_total_blocks(),
            });
        }
        table.reserve(num_new_blocks);
        for _ in 0..num_new_blocks {
            let id = self.pop_free_block().expect("invariant: enough free blocks were counted above");
            self.blocks[id.0 as usize].ref_count = 1;
            table.push(id);
        }
        Ok(())
    }

    /// Registers the full blocks of `computed_token_ids` (the sequence's tokens whose KV is in
    /// `table` now, i.e. `token_ids[..num_computed_tokens]`) that `hashes` does not know to be
    /// cached yet. Call after each step. A block identical to one already cached (same hash,
    /// tokens and parent) is not registered: the existing entry stays, and the sequence's copy
    /// goes back to the free list when freed. Does nothing when prefix caching is disabled.
    pub fn cache_full_blocks(
        &mut self,
        table: &[BlockId],
        hashes: &mut BlockHashes,
        computed_token_ids: &[u32],
    ) {
        if !self.enable_prefix_caching {
            return;
        }
        let bs = self.block_size;
        let num_full_blocks = (computed_token_ids.len() / bs).min(table.len());
        hashes.hash_full_blocks(&computed_token_ids[..num_full_blocks * bs], bs);
        while hashes.prefix_ids.len() < num_full_blocks {
            let i = hashes.prefix_ids.len();
            let parent = hashes.prefix_ids.last().copied();
            let tokens = &computed_token_ids[i * bs..(i + 1) * bs];
            match self.register(table[i], hashes.hashes[i], parent, tokens) {
                Some(id) => hashes.prefix_ids.push(id),
                // Retried next step: the block in the way may be free by then.
                None => break,
            }
        }
    }

    /// Drops one reference on each block of `table`, tail first, and empties it. A block left
    /// without references becomes evictable if it has a hash (still findable, and the tail
    /// blocks are the least recently used), or free otherwise. All or nothing: fails without
    /// changing anything if a block is not allocated.
    pub fn free(&mut self, table: &mut Vec<BlockId>) -> Result<(), BlockError> {
        if let Some(&bad) = table.iter().find(|&&id| self.ref_count(id) == 0) {
            return Err(BlockError::NotAllocated(bad));
        }
        for &id in table.iter().rev() {
            let meta = &mut self.blocks[id.0 as usize];
            // `checked_sub`: a table never holds a block twice, but if one did, stay consistent.
            let Some(count) = meta.ref_count.checked_sub(1) else { continue };
            meta.ref_count = count;
            if count > 0 {
                continue;
            }
            if meta.hash.is_some() {
                meta.evictable_tick = Some(self.next_tick);
                self.evictable.insert(self.next_tick, id);
                self.next_tick += 1;
            } else {
                self.free.push_back(id);
            }
        }
        table.clear();
        Ok(())
    }

    /// One more reference on an allocated or evictable block.
    fn acquire(&mut self, id: BlockId) {
        let meta = &mut self.blocks[id.0 as usize];
        meta.ref_count += 1;
        if let Some(tick) = meta.evictable_tick.take() {
            self.evictable.remove(&tick);
        }
    }

    /// Takes a block with no references and no hash: a free one, or else the least recently
    /// used evictable one, whose hash is dropped.
    fn pop_free_block(&mut self) -> Option<BlockId> {
        if let Some(id) = self.free.pop_front() {
            return Some(id);
        }
        let (_, id) = self.evictable.pop_first()?;
        let meta = &mut self.blocks[id.0 as usize];
        meta.evictable_tick = None;
        if let Some(hash) = meta.hash.take() {
            self.cached.remove(&hash);
        }
        Some(id)
    }

    /// Registers `id` (in use, holding `token_ids` after the prefix `parent`) under `hash`.
    /// Returns the entry that now holds this prefix: the new one, or an identical entry that was
    /// there before; `None` when a different block in use holds the hash.
    fn register(
        &mut self,
        id: BlockId,
        hash: BlockHash,
        parent: Option<PrefixId>,
        token_ids: &[u32],
    ) -> Option<PrefixId> {
        if let Some(entry) = self.cached.get(&hash) {
            if entry.matches(parent, token_ids) {
                return Some(entry.id);
            }
            // Same hash, other prefix: a 64-bit collision, or an entry whose parent was evicted
            // (unreachable since). Replace it unless it is in use.
            let other = entry.block;
            if self.blocks[other.0 as usize].ref_count > 0 {
                return None;
            }
            self.uncache(other);
        }
        let meta = &mut self.blocks[id.0 as usize];
        if meta.hash.is_some() {
            // Registered under another hash: not reachable through our tables' bookkeeping.
            return None;
        }
        meta.hash = Some(hash);
        let entry_id = PrefixId(self.next_prefix_id);
        self.next_prefix_id += 1;
        self.cached.insert(hash, CacheEntry { block: id, id: entry_id, parent, token_ids: token_ids.into() });
        Some(entry_id)
    }

    /// Moves an evictable block to the free list, dropping its hash.
    fn uncache(&mut self, id: BlockId) {
        let meta = &mut self.blocks[id.0 as usize];
        if let Some(tick) = meta.evictable_tick.take() {
            self.evictable.remove(&tick);
            self.free.push_back(id);
        }
        if let Some(hash) = meta.hash.take() {
            self.cached.remove(&hash);
        }
    }
}

/// FNV-1a 64 of `parent`'s hash (if any) then `token_ids`, little-endian. Written out rather
/// than `std::hash::DefaultHasher` so the value is fixed across Rust releases.
fn hash_block(parent: Option<BlockHash>, token_ids: &[u32]) -> BlockHash {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET_BASIS;
    let mut eat = |bytes: &[u8]| {
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
        }
    };
    if let Some(BlockHash(p)) = parent {
        eat(&p.to_le_bytes());
    }
    for t in token_ids {
        eat(&t.to_le_bytes());
    }
    BlockHash(hash)
}

#[cfg(test)]
mod tests;
