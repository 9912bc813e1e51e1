//! Unit tests of `block_manager`, beside it so that file stays about what it does.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn manager(num_blocks: usize, block_size: usize) -> BlockManager {
    BlockManager::new(CacheConfig { num_blocks, block_size, enable_prefix_caching: true }).unwrap()
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
        let mut hashes = BlockHashes::default();
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
    let config = CacheConfig { num_blocks: 4, block_size: 4, enable_prefix_caching: false };
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
    let config = CacheConfig { num_blocks: 4, block_size: 0, enable_prefix_caching: true };
    assert_eq!(BlockManager::new(config).unwrap_err(), BlockConfigError::ZeroBlockSize);
}

const BS: usize = 4;
const NUM_BLOCKS: usize = 24;

/// One simulated sequence of [`random_operations_keep_the_invariants`].
struct Sim {
    seq: Seq,
    max_len: usize,
    num_computed_tokens: usize,
    running: bool,
}

/// (Re)admission: the sequence starts from its cached prefix, whose every block must hold
/// exactly the tokens it stands for (`content`, the shadow of what each block was computed for).
fn readmit(m: &mut BlockManager, s: &mut Sim, content: &[Option<Vec<u32>>]) {
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
}

/// Many admissions, chunked steps, decodes, preemptions and aborts over a small cache with
/// look-alike prompts. Beside the invariants, a shadow of the KV content (the token prefix
/// each full block was computed for) checks that every hit holds exactly the prompt's tokens.
#[test]
fn random_operations_keep_the_invariants() {
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
                readmit(&mut m, s, &content);
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
