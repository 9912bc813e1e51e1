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

use crate::block_allocator::{BlockError, BlockId};

/// Sizes and switches of the block manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockManagerConfig {
    /// Blocks in every layer's KV cache.
    pub num_blocks: usize,
    /// Tokens per block (at least 1).
    pub block_size: usize,
    /// Share full blocks between sequences with the same token prefix.
    pub enable_prefix_caching: bool,
}

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
    pub fn new() -> Self {
        Self::default()
    }

    /// Full blocks hashed so far.
    pub fn num_hashed_blocks(&self) -> usize {
        self.hashes.len()
    }

    /// Leading blocks known to the prefix cache (hit by a lookup or registered since).
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
    pub fn new(config: BlockManagerConfig) -> Result<Self, BlockConfigError> {
        let BlockManagerConfig { num_blocks, block_size, enable_prefix_caching } = config;
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
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn manager(num_blocks: usize, block_size: usize) -> BlockManager {
        BlockManager::new(BlockManagerConfig { num_blocks, block_size, enable_prefix_caching: true }).unwrap()
    }

    fn ids(raw: &[u32]) -> Vec<BlockId> {
        raw.iter().copied().map(BlockId).collect()
    }

    /// A sequence as the scheduler would keep it.
    #[derive(Default)]
    struct Seq {
        tokens: Vec<u32>,
        table: Vec<BlockId>,
        hashes: BlockHashes,
    }

    /// A new sequence starting from its cached prefix, with no other slots yet.
    fn lookup(m: &mut BlockManager, tokens: &[u32]) -> (Seq, PrefixHit) {
        let mut seq = Seq { tokens: tokens.to_vec(), ..Seq::default() };
        let hit = m.lookup_prefix(&mut seq.hashes, tokens);
        seq.table = hit.blocks.clone();
        (seq, hit)
    }

    /// Admits a prompt: prefix lookup, then slots for the whole prompt.
    fn admit(m: &mut BlockManager, tokens: &[u32]) -> (Seq, PrefixHit) {
        let (mut seq, hit) = lookup(m, tokens);
        m.allocate_slots(&mut seq.table, tokens.len()).unwrap();
        (seq, hit)
    }

    /// Marks every token of `seq` computed.
    fn compute_all(m: &mut BlockManager, seq: &mut Seq) {
        m.allocate_slots(&mut seq.table, seq.tokens.len()).unwrap();
        m.cache_full_blocks(&seq.table, &mut seq.hashes, &seq.tokens);
    }

    /// Every block in exactly one place; ref counts equal the number of tables holding the
    /// block; hashes and cache entries point at each other.
    fn check_invariants(m: &BlockManager, tables: &[&[BlockId]]) {
        let n = m.num_total_blocks();
        let mut holders = vec![0u32; n];
        for table in tables {
            for b in *table {
                holders[b.0 as usize] += 1;
            }
            let mut sorted = table.to_vec();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), table.len(), "a table holds a block twice: {table:?}");
        }
        let mut places = vec![0u32; n];
        for &b in &m.free {
            let meta = &m.blocks[b.0 as usize];
            assert!(meta.ref_count == 0 && meta.hash.is_none() && meta.evictable_tick.is_none(), "{b:?}");
            places[b.0 as usize] += 1;
        }
        for (&tick, &b) in &m.evictable {
            let meta = &m.blocks[b.0 as usize];
            assert!(meta.ref_count == 0 && meta.hash.is_some(), "{b:?}");
            assert_eq!(meta.evictable_tick, Some(tick));
            places[b.0 as usize] += 1;
        }
        for (i, meta) in m.blocks.iter().enumerate() {
            assert_eq!(meta.ref_count, holders[i], "ref count of block {i}");
            if meta.ref_count > 0 {
                assert!(meta.evictable_tick.is_none());
                places[i] += 1;
            }
            if let Some(hash) = meta.hash {
                assert_eq!(m.cached[&hash].block, BlockId(i as u32));
            }
        }
        assert!(places.iter().all(|&p| p == 1), "blocks in 0 or 2 places: {places:?}");
        assert_eq!(m.blocks.iter().filter(|b| b.hash.is_some()).count(), m.cached.len());
        let used = holders.iter().filter(|&&h| h > 0).count();
        assert_eq!(m.free.len() + m.evictable.len() + used, n);
    }

    #[test]
    fn shared_prefix_is_hit_block_by_block() {
        let mut m = manager(10, 4);
        let (mut a, hit) = admit(&mut m, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(hit, PrefixHit::default());
        assert_eq!(a.table, ids(&[0, 1, 2]));
        compute_all(&mut m, &mut a);
        // Blocks 0 and 1 are full; block 2 holds tokens 9, 10 only.
        assert_eq!(m.num_cached_blocks(), 2);
        assert_eq!((a.hashes.num_hashed_blocks(), a.hashes.num_cached_blocks()), (2, 2));

        let (b, hit) = admit(&mut m, &[1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97]);
        assert_eq!(hit, PrefixHit { blocks: ids(&[0, 1]), num_cached_tokens: 8 });
        assert_eq!(b.table, ids(&[0, 1, 3]));
        let (c, hit) = admit(&mut m, &[1, 2, 3, 4, 5, 6, 7, 0, 9]);
        assert_eq!(hit, PrefixHit { blocks: ids(&[0]), num_cached_tokens: 4 });
        assert_eq!(c.table, ids(&[0, 4, 5]));

        assert_eq!((m.ref_count(BlockId(0)), m.ref_count(BlockId(1))), (3, 2));
        assert_eq!(m.num_free_blocks(), 4);
        assert!((m.usage() - 0.6).abs() < 1e-12);
        assert_eq!(m.prefix_cache_queried_tokens(), 10 + 11 + 9);
        assert_eq!(m.prefix_cache_hit_tokens(), 8 + 4);
        check_invariants(&m, &[&a.table, &b.table, &c.table]);
    }

    #[test]
    fn only_full_blocks_are_shared() {
        let mut m = manager(10, 4);
        let (mut a, _) = admit(&mut m, &[1, 2, 3, 4, 5, 6]);
        compute_all(&mut m, &mut a);
        assert_eq!(m.num_cached_blocks(), 1, "tokens 5, 6 are a partial block");

        // Tokens 5, 6 match too, but A's second block is not full: only block 0 is shared.
        let (b, hit) = admit(&mut m, &[1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(hit, PrefixHit { blocks: ids(&[0]), num_cached_tokens: 4 });

        // A samples 7 (not computed yet): still nothing new to register.
        a.tokens.push(7);
        m.cache_full_blocks(&a.table, &mut a.hashes, &a.tokens[..6]);
        assert_eq!(m.num_cached_blocks(), 1);
        // 7 computed, 8 sampled and computed: block 1 is full now and registered.
        a.tokens.push(8);
        compute_all(&mut m, &mut a);
        assert_eq!(m.num_cached_blocks(), 2);
        assert_eq!(a.table, ids(&[0, 1]));

        let (d, hit) = admit(&mut m, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(hit, PrefixHit { blocks: ids(&[0, 1]), num_cached_tokens: 8 });
        check_invariants(&m, &[&a.table, &b.table, &d.table]);
    }

    #[test]
    fn whole_prompt_cached_leaves_the_last_block_to_compute() {
        let mut m = manager(10, 4);
        let prompt: Vec<u32> = (1..=8).collect();
        let (mut a, _) = admit(&mut m, &prompt);
        compute_all(&mut m, &mut a);
        assert_eq!(m.num_cached_blocks(), 2);

        // Both blocks are cached, but the last token must be computed for its logits.
        let (mut b, hit) = admit(&mut m, &prompt);
        assert_eq!(hit, PrefixHit { blocks: ids(&[0]), num_cached_tokens: 4 });
        assert_eq!(b.table, ids(&[0, 2]));
        // B recomputes block 1 into block 2: identical to A's block 1, so not registered again.
        compute_all(&mut m, &mut b);
        assert_eq!(m.num_cached_blocks(), 2);
        assert_eq!(b.hashes.num_cached_blocks(), 2);

        // One token more and both blocks are a hit.
        let (c, hit) = admit(&mut m, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(hit, PrefixHit { blocks: ids(&[0, 1]), num_cached_tokens: 8 });
        // Shorter than a block: nothing to share.
        let (d, hit) = admit(&mut m, &[1, 2, 3]);
        assert_eq!(hit, PrefixHit::default());
        check_invariants(&m, &[&a.table, &b.table, &c.table, &d.table]);

        for mut s in [a, b, c, d] {
            m.free(&mut s.table).unwrap();
        }
        // B's copy (block 2) had no hash: back on the free list; A's blocks stay cached.
        assert_eq!(m.free.iter().filter(|&&id| id == BlockId(2)).count(), 1);
        assert_eq!(m.num_cached_blocks(), 2);
        check_invariants(&m, &[]);
    }

    #[test]
    fn eviction_takes_the_tail_of_a_prefix_before_its_head() {
        let mut m = manager(4, 2);
        let prompt = [1, 2, 3, 4, 5];
        let (mut a, _) = admit(&mut m, &prompt);
        compute_all(&mut m, &mut a);
        assert_eq!(a.table, ids(&[0, 1, 2]));
        m.free(&mut a.table).unwrap();
        assert!(a.table.is_empty());
        // Block 2 (partial, no hash) is free; blocks 1 then 0 are evictable, in that order.
        assert_eq!(m.free, [BlockId(3), BlockId(2)]);
        assert_eq!(m.evictable.values().copied().collect::<Vec<_>>(), ids(&[1, 0]));
        assert_eq!((m.num_free_blocks(), m.usage()), (4, 0.0));

        // Three blocks: the two free ones, then the least recently used cached one (block 1).
        let (b, _) = admit(&mut m, &[7; 6]);
        assert_eq!(b.table, ids(&[3, 2, 1]));
        assert_eq!(m.num_cached_blocks(), 1);
        let (c, hit) = lookup(&mut m, &prompt);
        assert_eq!(hit, PrefixHit { blocks: ids(&[0]), num_cached_tokens: 2 });
        check_invariants(&m, &[&b.table, &c.table]);
    }

    #[test]
    fn eviction_follows_last_use() {
        let mut m = manager(4, 2);
        let (mut p, _) = admit(&mut m, &[1, 2, 3]);
        compute_all(&mut m, &mut p);
        let (mut q, _) = admit(&mut m, &[5, 6, 7]);
        compute_all(&mut m, &mut q);
        assert_eq!((p.table.clone(), q.table.clone()), (ids(&[0, 1]), ids(&[2, 3])));
        m.free(&mut p.table).unwrap(); // block 0 evictable first
        m.free(&mut q.table).unwrap(); // then block 2

        // P comes back: its block 0 is used again, so Q's block 2 is now the oldest.
        let (mut p, hit) = admit(&mut m, &[1, 2, 3]);
        assert_eq!(hit.blocks, ids(&[0]));
        m.free(&mut p.table).unwrap();
        assert_eq!(m.evictable.values().copied().collect::<Vec<_>>(), ids(&[2, 0]));

        let (r, _) = admit(&mut m, &[9; 6]);
        assert_eq!(r.table, ids(&[3, 1, 2]));
        let (q, hit) = lookup(&mut m, &[5, 6, 7]);
        assert_eq!(hit, PrefixHit::default(), "Q's block was evicted");
        let (p, hit) = lookup(&mut m, &[1, 2, 3]);
        assert_eq!(hit.blocks, ids(&[0]));
        check_invariants(&m, &[&r.table, &q.table, &p.table]);
    }

    #[test]
    fn same_hash_with_other_tokens_or_parent_is_a_miss() {
        let mut m = manager(8, 2);
        let prompt = [1, 2, 3, 4, 5];
        let (mut a, _) = admit(&mut m, &prompt);
        compute_all(&mut m, &mut a);
        let h1 = a.hashes.hashes[1];
        let lookup = |m: &mut BlockManager| {
            let mut hashes = BlockHashes::new();
            let mut hit = m.lookup_prefix(&mut hashes, &prompt);
            let blocks = hit.blocks.clone();
            m.free(&mut hit.blocks).unwrap();
            blocks
        };
        assert_eq!(lookup(&mut m), ids(&[0, 1]));

        // An entry under the right hash but holding other tokens (a 64-bit collision).
        m.cached.get_mut(&h1).unwrap().token_ids = vec![3, 99].into();
        assert_eq!(lookup(&mut m), ids(&[0]));
        m.cached.get_mut(&h1).unwrap().token_ids = vec![3, 4].into();
        assert_eq!(lookup(&mut m), ids(&[0, 1]));
        // Same tokens, but cached after another prefix (the parent's hash collided).
        m.cached.get_mut(&h1).unwrap().parent = Some(PrefixId(12345));
        assert_eq!(lookup(&mut m), ids(&[0]));

        // B computes its own block 1: the hash is taken by A's block, in use, so B's is not
        // registered; once A is gone, B's replaces it.
        let (mut b, hit) = admit(&mut m, &prompt);
        assert_eq!(hit.blocks, ids(&[0]));
        assert_eq!(b.table, ids(&[0, 3, 4]));
        compute_all(&mut m, &mut b);
        assert_eq!(b.hashes.num_cached_blocks(), 1);
        assert_eq!(m.cached[&h1].block, BlockId(1));
        m.free(&mut a.table).unwrap();
        compute_all(&mut m, &mut b);
        assert_eq!(b.hashes.num_cached_blocks(), 2);
        assert_eq!(m.cached[&h1].block, BlockId(3));
        assert_eq!(m.num_cached_blocks(), 2);
        assert_eq!(lookup(&mut m), ids(&[0, 3]));
        check_invariants(&m, &[&b.table]);
    }

    #[test]
    fn identical_blocks_at_different_depths_hash_differently() {
        assert_eq!(hash_block(None, &[]), BlockHash(0xcbf2_9ce4_8422_2325));
        let first = hash_block(None, &[3, 4]);
        let second = hash_block(Some(hash_block(None, &[1, 2])), &[3, 4]);
        assert_ne!(first, second);
        assert_eq!(second, hash_block(Some(hash_block(None, &[1, 2])), &[3, 4]), "deterministic");
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let mut m = manager(3, 4);
        let mut a = Vec::new();
        m.allocate_slots(&mut a, 8).unwrap();
        assert_eq!(a, ids(&[0, 1]));
        let mut b = Vec::new();
        assert_eq!(
            m.allocate_slots(&mut b, 12),
            Err(BlockError::OutOfBlocks { requested: 3, free: 1, total: 3 })
        );
        assert!(b.is_empty());
        assert_eq!(m.num_free_blocks(), 1);
        m.allocate_slots(&mut a, 12).unwrap();
        m.allocate_slots(&mut a, 12).unwrap(); // already holds 12 tokens: nothing to do
        assert_eq!(a, ids(&[0, 1, 2]));
        assert_eq!(
            m.allocate_slots(&mut a, 13),
            Err(BlockError::OutOfBlocks { requested: 1, free: 0, total: 3 })
        );
        assert_eq!(a.len(), 3);
        check_invariants(&m, &[&a]);
    }

    #[test]
    fn failed_allocation_evicts_nothing() {
        let mut m = manager(3, 4);
        let (mut a, _) = admit(&mut m, &[1, 2, 3, 4, 5, 6, 7, 8]);
        compute_all(&mut m, &mut a);
        m.allocate_slots(&mut a.table, 9).unwrap();
        m.free(&mut a.table).unwrap();
        // Two cached blocks are evictable, one is free: three can be handed out, not four.
        assert!(m.can_allocate(3) && !m.can_allocate(4));
        let mut b = Vec::new();
        assert_eq!(
            m.allocate_slots(&mut b, 16),
            Err(BlockError::OutOfBlocks { requested: 4, free: 3, total: 3 })
        );
        assert_eq!(m.num_cached_blocks(), 2);
        check_invariants(&m, &[]);
    }

    #[test]
    fn parallel_samples_share_the_prompt_and_free_cleanly() {
        let mut m = manager(12, 4);
        let prompt: Vec<u32> = (1..=10).collect();
        // Sample 0 computes the prompt; samples 1 and 2 are admitted after it is cached.
        let (mut s0, _) = admit(&mut m, &prompt);
        compute_all(&mut m, &mut s0);
        let (mut s1, hit1) = admit(&mut m, &prompt);
        let (mut s2, hit2) = admit(&mut m, &prompt);
        for hit in [&hit1, &hit2] {
            assert_eq!(*hit, PrefixHit { blocks: ids(&[0, 1]), num_cached_tokens: 8 });
        }
        assert_eq!((s1.table.clone(), s2.table.clone()), (ids(&[0, 1, 3]), ids(&[0, 1, 4])));
        assert_eq!((m.ref_count(BlockId(0)), m.ref_count(BlockId(1))), (3, 3));

        // Each sample generates its own 3 tokens: a fourth block each, and block 2 of each
        // ([9, 10, x, x]) differs, so all three are registered.
        for (k, s) in [&mut s0, &mut s1, &mut s2].into_iter().enumerate() {
            s.tokens.extend([100 + k as u32; 3]);
            compute_all(&mut m, s);
        }
        assert_eq!((s0.table[3], s1.table[3], s2.table[3]), (BlockId(5), BlockId(6), BlockId(7)));
        assert_eq!(m.num_cached_blocks(), 5);
        assert_eq!(m.num_free_blocks(), 4);
        check_invariants(&m, &[&s0.table, &s1.table, &s2.table]);

        for s in [&mut s0, &mut s1, &mut s2] {
            m.free(&mut s.table).unwrap();
        }
        assert_eq!((m.num_free_blocks(), m.usage()), (12, 0.0));
        assert!((0..12).all(|i| m.ref_count(BlockId(i)) == 0));
        assert_eq!(m.free(&mut vec![BlockId(0)]), Err(BlockError::NotAllocated(BlockId(0))));
        let mut table = vec![BlockId(1)];
        m.allocate_slots(&mut table, 8).unwrap();
        assert_eq!(m.free(&mut vec![table[1], BlockId(99)]), Err(BlockError::NotAllocated(BlockId(99))));
        assert_eq!(m.ref_count(table[1]), 1, "a failed free changes nothing");
        check_invariants(&m, &[&table[1..]]);
    }

    #[test]
    fn disabled_caching_shares_and_hashes_nothing() {
        let config = BlockManagerConfig { num_blocks: 4, block_size: 4, enable_prefix_caching: false };
        let mut m = BlockManager::new(config).unwrap();
        let prompt: Vec<u32> = (1..=9).collect();
        let (mut a, hit) = admit(&mut m, &prompt);
        assert_eq!(hit, PrefixHit::default());
        compute_all(&mut m, &mut a);
        assert_eq!((m.num_cached_blocks(), a.hashes.num_hashed_blocks()), (0, 0));
        m.free(&mut a.table).unwrap();
        let (b, hit) = admit(&mut m, &prompt);
        assert_eq!(hit, PrefixHit::default());
        assert_eq!((m.prefix_cache_queried_tokens(), m.prefix_cache_hit_tokens()), (0, 0));
        assert!(m.evictable.is_empty());
        check_invariants(&m, &[&b.table]);
    }

    #[test]
    fn bad_config_is_refused() {
        let config = BlockManagerConfig { num_blocks: 4, block_size: 0, enable_prefix_caching: true };
        assert_eq!(BlockManager::new(config).unwrap_err(), BlockConfigError::ZeroBlockSize);
    }

    /// Many admissions, chunked steps, decodes, preemptions and aborts over a small cache with
    /// look-alike prompts. Beside the invariants, a shadow of the KV content (the token prefix
    /// each full block was computed for) checks that every hit holds exactly the prompt's tokens.
    #[test]
    fn random_operations_keep_the_invariants() {
        const BS: usize = 4;
        const NUM_BLOCKS: usize = 24;
        struct Sim {
            seq: Seq,
            max_len: usize,
            num_computed_tokens: usize,
            running: bool,
        }
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut m = manager(NUM_BLOCKS, BS);
        let mut content: Vec<Option<Vec<u32>>> = vec![None; NUM_BLOCKS];
        let bases: [Vec<u32>; 3] = [(0..24).collect(), (0..24).map(|t| t % 3).collect(), vec![7; 24]];
        let mut sims: Vec<Sim> = Vec::new();
        let (mut preemptions, mut finished) = (0, 0);
        for _ in 0..5000 {
            let roll = rng.random_range(0..100);
            if roll < 20 && sims.len() < 8 {
                let base = &bases[rng.random_range(0..bases.len())];
                let mut tokens = base[..rng.random_range(0..=base.len())].to_vec();
                tokens.extend((0..rng.random_range(1..=6)).map(|_| rng.random_range(0..3)));
                let max_len = tokens.len() + rng.random_range(0..=10);
                let seq = Seq { tokens, ..Seq::default() };
                sims.push(Sim { seq, max_len, num_computed_tokens: 0, running: false });
            } else if roll < 92 && !sims.is_empty() {
                let i = rng.random_range(0..sims.len());
                let s = &mut sims[i];
                if !s.running {
                    // (Re)admission: start from the cached prefix.
                    let hit = m.lookup_prefix(&mut s.seq.hashes, &s.seq.tokens);
                    assert_eq!(hit.num_cached_tokens, hit.blocks.len() * BS);
                    assert!(hit.num_cached_tokens < s.seq.tokens.len());
                    for (j, b) in hit.blocks.iter().enumerate() {
                        let expected = &s.seq.tokens[..(j + 1) * BS];
                        assert_eq!(content[b.0 as usize].as_deref(), Some(expected), "hit block {j}");
                    }
                    s.seq.table = hit.blocks;
                    s.num_computed_tokens = hit.num_cached_tokens;
                    s.running = true;
                } else {
                    if s.num_computed_tokens == s.seq.tokens.len() {
                        if s.seq.tokens.len() >= s.max_len {
                            m.free(&mut s.seq.table).unwrap();
                            sims.swap_remove(i);
                            finished += 1;
                            check_invariants(&m, &sims.iter().map(|s| &s.seq.table[..]).collect::<Vec<_>>());
                            continue;
                        }
                        s.seq.tokens.push(rng.random_range(0..3)); // decode: sample a token
                    }
                    let n = rng.random_range(1..=6).min(s.seq.tokens.len() - s.num_computed_tokens);
                    let old_len = s.seq.table.len();
                    let before = s.num_computed_tokens;
                    if m.allocate_slots(&mut s.seq.table, before + n).is_err() {
                        // Preempt (recompute): back to waiting, hashes kept.
                        m.free(&mut s.seq.table).unwrap();
                        s.running = false;
                        s.num_computed_tokens = 0;
                        preemptions += 1;
                    } else {
                        for b in &s.seq.table[old_len..] {
                            content[b.0 as usize] = None;
                        }
                        s.num_computed_tokens += n;
                        for j in before / BS..s.num_computed_tokens / BS {
                            content[s.seq.table[j].0 as usize] = Some(s.seq.tokens[..(j + 1) * BS].to_vec());
                        }
                        let computed = &s.seq.tokens[..s.num_computed_tokens];
                        m.cache_full_blocks(&s.seq.table, &mut s.seq.hashes, computed);
                    }
                }
            } else if !sims.is_empty() {
                // Abort.
                let i = rng.random_range(0..sims.len());
                m.free(&mut sims[i].seq.table).unwrap();
                sims.swap_remove(i);
            }
            check_invariants(&m, &sims.iter().map(|s| &s.seq.table[..]).collect::<Vec<_>>());
        }
        for s in &mut sims {
            m.free(&mut s.seq.table).unwrap();
        }
        check_invariants(&m, &[]);
        assert_eq!(m.num_free_blocks(), NUM_BLOCKS);
        // The run did exercise sharing, pressure and completion.
        assert!(m.prefix_cache_hit_tokens() > 0 && preemptions > 0 && finished > 0);
    }
}
