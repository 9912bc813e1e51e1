//! Host-side plan of one paged-attention launch: which kernels, what grid, and the metadata
//! they read, packed into one `u32` buffer; and the packed picks of a sampling launch. Also the
//! shapes the kernels accept, so an unsupported call is an error here and is never launched. Pure Rust (no CUDA needed), so it
//! is unit-tested on any machine.
//!
//! The constants mirror the `constexpr`s of `kernels/*.cu(h)`; a test reads the sources to keep
//! the two in step.

use std::ops::Range;

/// Largest head_dim the attention kernels take (`MAX_HEAD_DIM` in kernels/common.cuh).
pub const MAX_HEAD_DIM: usize = 256;
/// Elements per vector load (`VEC` in kernels/common.cuh): head_dim must be a multiple of it,
/// and q and the caches must start at an element offset that is a multiple of it (16 bytes).
pub const VEC_ELEMS: usize = 8;
/// The most keys per decode partition, one thread block each (`PARTITION_KEYS`).
pub const DECODE_PARTITION_KEYS: usize = 512;
/// The fewest keys a decode partition is cut to (each partition costs a block's setup and a
/// share of the reduce kernel). A block walks its keys in a chain of dependent loads (16 keys
/// a step at head_dim 64): at batch 1 and a 136-key context, two 128-key partitions per KV
/// head took 31 us a layer on an H200 (ncu), so short contexts are cut finer.
pub const DECODE_MIN_PARTITION_KEYS: usize = 32;
/// Decode thread blocks a call should have before partitions stop shrinking: about one per SM
/// of an H100 (132). At 512 keys, one sequence of 8k keys with 2 KV heads made 32 blocks and
/// ran at ~40 GB/s.
pub const DECODE_TARGET_BLOCKS: usize = 128;
/// Query heads of one GQA group per decode thread block (`DECODE_HEADS`).
pub const DECODE_HEADS: usize = 8;
/// (query, head) rows per prefill thread block (`PREFILL_ROWS`).
pub const PREFILL_ROWS: usize = 16;
/// Keys per prefill K/V tile in shared memory (`PREFILL_KEYS`).
pub const PREFILL_KEYS: usize = 32;
/// (query, head) rows per tensor-core prefill block (`TC_ROWS`), keys per K/V tile
/// (`TC_KEYS`), and the largest head_dim it takes (`TC_MAX_HEAD_DIM`; a multiple of 16).
pub const PREFILL_TC_ROWS: usize = 64;
pub const PREFILL_TC_KEYS: usize = 64;
pub const PREFILL_TC_MAX_HEAD_DIM: usize = 128;
/// Threads per block of each kernel (`*_THREADS` in the .cu files).
pub const RESHAPE_THREADS: u32 = 256;
pub const DECODE_THREADS: u32 = 128;
pub const PREFILL_THREADS: u32 = 128;
pub const SAMPLE_THREADS: u32 = 1024;
pub const FUSED_THREADS: u32 = 256;
pub const GEMV_THREADS: u32 = 256;
/// The most rows of x one `gemv` launch takes (`GEMV_MAX_ROWS` in kernels/gemv.cu): products of
/// decode steps up to this many tokens skip cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;
pub const PREFILL_TC_THREADS: u32 = 128;
/// The slot of a row that only pads a batch to a captured CUDA graph's size (`PAD_SLOT` in
/// kernels/reshape_and_cache.cu): its K/V are not written anywhere.
pub const PAD_SLOT: u32 = u32::MAX;
/// Dynamic shared memory a launch gets without opting in to more.
pub const DEFAULT_SMEM_BYTES: usize = 48 * 1024;

/// `u32` words per pick of the sampling kernel (`PickRow` in kernels/sample.cu).
pub const PICK_WORDS: usize = 6;
/// Largest vocabulary the sampling kernel takes: it carries token indices through f32 once.
pub const MAX_SAMPLE_VOCAB: usize = 1 << 24;

/// One row's pick as the sampling kernel reads it (`PickRow`): the row, `1 / temperature` (0:
/// greedy), min_p, padding, then the f64 uniform's bits, low word first (both sides are little
/// endian).
pub fn pick_words(row: u32, inv_temperature: f32, min_p: f32, u: f64) -> [u32; PICK_WORDS] {
    let bits = u.to_bits();
    [row, inv_temperature.to_bits(), min_p.to_bits(), 0, bits as u32, (bits >> 32) as u32]
}

/// CUDA's limit on gridDim.y and gridDim.z.
const MAX_GRID_YZ: usize = 65_535;
/// CUDA's limit on gridDim.x (and what fits the kernels' `int` indices).
const MAX_INT: usize = i32::MAX as usize;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("head_dim {0} is not supported by the CUDA kernels (a multiple of 8, at most 256)")]
    HeadDim(usize),
    #[error("{num_heads} heads are not a multiple of {num_kv_heads} KV heads")]
    Heads { num_heads: usize, num_kv_heads: usize },
    #[error("sliding_window 0 leaves no key visible")]
    EmptyWindow,
    #[error("softcap {0} must be finite and non-zero")]
    Softcap(f32),
    #[error("{what} {value} exceeds the CUDA kernels' limit of {limit}")]
    TooLarge { what: &'static str, value: usize, limit: usize },
}

/// The scalar configuration every attention kernel receives by value. Mirrors `AttnConfig` in
/// kernels/common.cuh field for field (all 4-byte fields, so no padding on either side).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnConfig {
    pub num_heads: i32,
    pub num_kv_heads: i32,
    pub head_dim: i32,
    pub block_size: i32,
    /// Row length of the zero-padded block-table matrix.
    pub max_blocks_per_seq: i32,
    /// 0 when there is no window (C has no `Option`; `Some(0)` is rejected).
    pub sliding_window: i32,
    pub scale: f32,
    /// 0 when there is no soft-capping (`Some(0.0)` is rejected).
    pub softcap: f32,
}

/// Shapes and constants of one attention call, as the caller knows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnSpec {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub scale: f32,
    pub sliding_window: Option<usize>,
    pub softcap: Option<f32>,
    /// The caches are f16 or bf16 and the card has the shared memory of the tensor-core
    /// prefill kernel ([`prefill_tc_smem_bytes`]): prefill then runs on tensor cores where
    /// head_dim allows it ([`prefill_tc_takes`]).
    pub tensor_cores: bool,
}

/// How a plan's launch geometry is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanShape {
    /// Exactly what the batch needs.
    #[default]
    Exact,
    /// For a CUDA graph, which replays a launch with the geometry it was captured with:
    /// `max_blocks_per_seq` and a decode's `max_partitions` rounded up to powers of two, so
    /// that a graph serves many steps while contexts grow. Results are the same bits as
    /// [`Self::Exact`]: both only size the grid and the table rows, and the kernels skip
    /// partitions past a sequence's keys and never read table entries past its context.
    Bucketed,
}

/// What a replay of a captured launch depends on besides its metadata words: two plans with
/// the same geometry launch the same kernels with the same arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanGeometry {
    pub cfg: AttnConfig,
    pub pass: Pass,
    pub num_seqs: usize,
    pub num_words: usize,
}

/// One sequence of the flat batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqSpan<'a> {
    pub query_start: usize,
    pub query_len: usize,
    pub context_len: usize,
    /// Block ids holding positions `0..context_len` (longer is fine: the rest is not read).
    pub block_table: &'a [u32],
}

/// Which kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Every sequence has exactly one query: the flash-decoding kernels, grid
    /// `(num_heads, num_seqs, max_partitions)`, then the reduce kernel when `max_partitions > 1`;
    /// partitions of `partition_keys` keys ([`decode_partition_keys`]).
    Decode { max_partitions: usize, partition_keys: usize },
    /// Otherwise: the prefill kernel, grid `(num_work_items, num_kv_heads)`, work items of
    /// [`PREFILL_ROWS`] rows.
    Prefill { num_work_items: usize },
    /// The same on tensor cores (`paged_attention_prefill_tc`), work items of
    /// [`PREFILL_TC_ROWS`] rows.
    PrefillTc { num_work_items: usize },
}

/// Everything a launch needs besides the tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    pub cfg: AttnConfig,
    pub pass: Pass,
    pub num_seqs: usize,
    /// The metadata, uploaded in one copy per call: `seq_info` `[num_seqs, 3]` (query_start,
    /// query_len, context_len), then the block tables `[num_seqs, max_blocks_per_seq]`
    /// (zero-padded, never read past a context), then for prefill the work items
    /// `[num_work_items, 2]` (sequence, first row of `query_len * group` rows).
    pub words: Vec<u32>,
}

impl AttentionPlan {
    /// Plans the call. The caller has already checked what the CPU reference checks (ranges
    /// cover the tokens, `1 <= query_len <= context_len`, every table holds its context with
    /// block ids inside the cache); this adds the kernels' own limits.
    pub fn new(spec: &AttnSpec, seqs: &[SeqSpan<'_>]) -> Result<Self, PlanError> {
        Self::shaped(spec, seqs, PlanShape::Exact)
    }

    /// [`Self::new`] with the geometry sized as `shape` says.
    pub fn shaped(spec: &AttnSpec, seqs: &[SeqSpan<'_>], shape: PlanShape) -> Result<Self, PlanError> {
        let mut cfg = config(spec, seqs)?;
        if shape == PlanShape::Bucketed {
            let rounded = (cfg.max_blocks_per_seq as usize).next_power_of_two();
            cfg.max_blocks_per_seq = int(rounded, "blocks per sequence")?;
        }
        let group = spec.num_heads / spec.num_kv_heads;
        let decode = seqs.iter().all(|s| s.query_len == 1);
        let max_blocks = cfg.max_blocks_per_seq as usize;
        let mut words = Vec::with_capacity(seqs.len() * (3 + max_blocks));
        for s in seqs {
            words.extend([word(s.query_start, "query_start")?, word(s.query_len, "query_len")?]);
            words.push(word(s.context_len, "context_len")?);
        }
        for s in seqs {
            let used = &s.block_table[..blocks_used(s, spec.block_size)];
            words.extend_from_slice(used);
            words.extend(std::iter::repeat_n(0, max_blocks - used.len()));
        }
        let pass = if decode {
            let visible: Vec<usize> =
                seqs.iter().map(|s| visible_keys(s.context_len, spec.sliding_window)).collect();
            let head_blocks = decode_head_blocks(spec.num_heads, spec.num_kv_heads);
            let partition_keys = decode_partition_keys(&visible, head_blocks);
            let mut max_partitions = visible.iter().map(|v| v.div_ceil(partition_keys)).max().unwrap_or(0);
            if shape == PlanShape::Bucketed {
                max_partitions = max_partitions.next_power_of_two();
            }
            limit("decode partitions per sequence", max_partitions, MAX_GRID_YZ)?;
            limit("sequences in a decode batch", seqs.len(), MAX_GRID_YZ)?;
            Pass::Decode { max_partitions, partition_keys }
        } else {
            let tensor_cores = spec.tensor_cores && prefill_tc_takes(spec.head_dim);
            let step = if tensor_cores { PREFILL_TC_ROWS } else { PREFILL_ROWS };
            let before = words.len();
            for (i, s) in seqs.iter().enumerate() {
                let rows = s.query_len * group;
                limit("query rows (query_len * heads per KV head)", rows, MAX_INT)?;
                for first_row in (0..rows).step_by(step) {
                    words.extend([word(i, "sequence index")?, word(first_row, "row")?]);
                }
            }
            let num_work_items = (words.len() - before) / 2;
            limit("prefill thread blocks", num_work_items, MAX_INT)?;
            if tensor_cores {
                Pass::PrefillTc { num_work_items }
            } else {
                Pass::Prefill { num_work_items }
            }
        };
        Ok(Self { cfg, pass, num_seqs: seqs.len(), words })
    }

    /// What a captured launch of this plan depends on besides the words' values.
    pub fn geometry(&self) -> PlanGeometry {
        PlanGeometry { cfg: self.cfg, pass: self.pass, num_seqs: self.num_seqs, num_words: self.words.len() }
    }

    /// Range of `seq_info` in [`Self::words`].
    pub fn seq_info(&self) -> Range<usize> {
        0..3 * self.num_seqs
    }

    /// Range of the block tables in [`Self::words`].
    pub fn block_tables(&self) -> Range<usize> {
        let start = 3 * self.num_seqs;
        start..start + self.num_seqs * self.cfg.max_blocks_per_seq as usize
    }

    /// Range of the prefill work items in [`Self::words`] (empty for decode).
    pub fn work(&self) -> Range<usize> {
        self.block_tables().end..self.words.len()
    }
}

/// Checks the shapes against the kernels' limits and builds their scalar configuration.
fn config(spec: &AttnSpec, seqs: &[SeqSpan<'_>]) -> Result<AttnConfig, PlanError> {
    let hd = spec.head_dim;
    if hd == 0 || !hd.is_multiple_of(VEC_ELEMS) || hd > MAX_HEAD_DIM {
        return Err(PlanError::HeadDim(hd));
    }
    if spec.num_kv_heads == 0 || !spec.num_heads.is_multiple_of(spec.num_kv_heads) {
        return Err(PlanError::Heads { num_heads: spec.num_heads, num_kv_heads: spec.num_kv_heads });
    }
    let sliding_window = match spec.sliding_window {
        Some(0) => return Err(PlanError::EmptyWindow),
        Some(w) => int(w.min(MAX_INT), "sliding_window")?,
        None => 0,
    };
    let softcap = match spec.softcap {
        Some(c) if c == 0.0 || !c.is_finite() => return Err(PlanError::Softcap(c)),
        Some(c) => c,
        None => 0.0,
    };
    let max_blocks = seqs.iter().map(|s| blocks_used(s, spec.block_size)).max().unwrap_or(0);
    Ok(AttnConfig {
        num_heads: int(spec.num_heads, "num_heads")?,
        num_kv_heads: int(spec.num_kv_heads, "num_kv_heads")?,
        head_dim: int(hd, "head_dim")?,
        block_size: int(spec.block_size, "block_size")?,
        max_blocks_per_seq: int(max_blocks, "blocks per sequence")?,
        sliding_window,
        scale: spec.scale,
        softcap,
    })
}

/// Blocks that hold the sequence's context (the table may be longer).
fn blocks_used(s: &SeqSpan<'_>, block_size: usize) -> usize {
    s.context_len.div_ceil(block_size.max(1)).min(s.block_table.len())
}

/// Keys a decode query at position `context_len - 1` sees: the whole context, or the window.
pub fn visible_keys(context_len: usize, sliding_window: Option<usize>) -> usize {
    sliding_window.map_or(context_len, |w| w.min(context_len))
}

/// The partition size of a decode call whose sequences see `visible` keys each, with
/// `head_blocks` blocks per (sequence, partition): [`DECODE_PARTITION_KEYS`], halved while
/// the call has fewer than [`DECODE_TARGET_BLOCKS`] blocks and stays at or above
/// [`DECODE_MIN_PARTITION_KEYS`]. Large batches keep the largest partitions (no reduce pass
/// where one partition holds a whole context); a few long contexts are cut finer so that they
/// fill the card.
pub fn decode_partition_keys(visible: &[usize], head_blocks: usize) -> usize {
    let blocks = |keys: usize| head_blocks * visible.iter().map(|v| v.div_ceil(keys)).sum::<usize>();
    let mut keys = DECODE_PARTITION_KEYS;
    while keys / 2 >= DECODE_MIN_PARTITION_KEYS && blocks(keys) < DECODE_TARGET_BLOCKS {
        keys /= 2;
    }
    keys
}

/// Decode thread blocks per (sequence, partition): each KV head's group of query heads in
/// blocks of up to [`DECODE_HEADS`], so a block reads each K/V row once for all its heads.
pub fn decode_head_blocks(num_heads: usize, num_kv_heads: usize) -> usize {
    num_kv_heads * (num_heads / num_kv_heads).div_ceil(DECODE_HEADS)
}

/// Whether the tensor-core prefill kernel takes this head_dim (WMMA tiles are 16 wide).
pub fn prefill_tc_takes(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(16) && head_dim <= PREFILL_TC_MAX_HEAD_DIM
}

/// Dynamic shared memory of the tensor-core prefill kernel, as `kernels/
/// paged_attention_prefill_tc.cu` lays it out: Q rows, K and V tiles (16-bit, rows padded by
/// 8), scores (f32, padded by 4), probabilities (16-bit, padded by 8), the output accumulator
/// (f32, padded by 4) and one f32 per row. 113 KB at head_dim 128, 72 KB at 64.
pub fn prefill_tc_smem_bytes(head_dim: usize) -> usize {
    let (rows, keys) = (PREFILL_TC_ROWS, PREFILL_TC_KEYS);
    2 * ((rows + 2 * keys) * (head_dim + 8) + rows * (keys + 8))
        + 4 * (rows * (keys + 4) + rows * (head_dim + 4) + rows)
}

/// Dynamic shared memory of the prefill kernel: Q rows, K tile (rows padded by one float) and
/// V tile, all f32.
pub fn prefill_smem_bytes(head_dim: usize) -> usize {
    4 * (PREFILL_ROWS * head_dim + PREFILL_KEYS * (head_dim + 1) + PREFILL_KEYS * head_dim)
}

fn limit(what: &'static str, value: usize, limit: usize) -> Result<(), PlanError> {
    if value > limit {
        return Err(PlanError::TooLarge { what, value, limit });
    }
    Ok(())
}

/// The kernels index positions, heads and rows with 32-bit `int`.
fn int(value: usize, what: &'static str) -> Result<i32, PlanError> {
    i32::try_from(value).map_err(|_| PlanError::TooLarge { what, value, limit: MAX_INT })
}

/// Metadata words are u32, but the kernels read positions into `int`: stay below 2^31.
fn word(value: usize, what: &'static str) -> Result<u32, PlanError> {
    limit(what, value, MAX_INT)?;
    Ok(value as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> AttnSpec {
        AttnSpec {
            num_heads,
            num_kv_heads,
            head_dim,
            block_size: 4,
            scale: 0.5,
            sliding_window: None,
            softcap: None,
            tensor_cores: false,
        }
    }

    fn seq(query_start: usize, query_len: usize, context_len: usize, table: &[u32]) -> SeqSpan<'_> {
        SeqSpan { query_start, query_len, context_len, block_table: table }
    }

    #[test]
    fn decode_batch_packs_seq_info_then_padded_tables() {
        let (t0, t1) = ([7, 3], [5, 1, 2, 9]);
        let seqs = [seq(0, 1, 6, &t0), seq(1, 1, 9, &t1)];
        let plan = AttentionPlan::new(&spec(4, 2, 8), &seqs).unwrap();
        assert_eq!(plan.pass, Pass::Decode { max_partitions: 1, partition_keys: 32 });
        // Sequence 1 uses 3 of its 4 blocks (9 tokens, block_size 4); sequence 0 is padded.
        assert_eq!(plan.cfg.max_blocks_per_seq, 3);
        assert_eq!(plan.words, vec![0, 1, 6, 1, 1, 9, 7, 3, 0, 5, 1, 2]);
        assert_eq!((plan.seq_info(), plan.block_tables(), plan.work()), (0..6, 6..12, 12..12));
    }

    #[test]
    fn bucketed_plans_round_the_geometry_up_and_keep_the_words_each_sequence_reads() {
        let (t0, t1) = ([7, 3], [5, 1, 2, 9]);
        let seqs = [seq(0, 1, 6, &t0), seq(1, 1, 9, &t1)];
        let exact = AttentionPlan::new(&spec(4, 2, 8), &seqs).unwrap();
        let bucketed = AttentionPlan::shaped(&spec(4, 2, 8), &seqs, PlanShape::Bucketed).unwrap();
        // 3 blocks per row become 4: each table row gains one zero.
        assert_eq!(bucketed.cfg.max_blocks_per_seq, 4);
        assert_eq!(bucketed.words, vec![0, 1, 6, 1, 1, 9, 7, 3, 0, 0, 5, 1, 2, 0]);
        assert_eq!(bucketed.words[bucketed.seq_info()], exact.words[exact.seq_info()]);
        // 300 keys in partitions of 32 are 10 partitions, launched as 16; the partition size
        // is the exact plan's (it decides the arithmetic).
        let table: Vec<u32> = (0..100).collect();
        let seqs = [seq(0, 1, 300, &table)];
        let exact = AttentionPlan::new(&spec(4, 2, 8), &seqs).unwrap();
        let bucketed = AttentionPlan::shaped(&spec(4, 2, 8), &seqs, PlanShape::Bucketed).unwrap();
        assert_eq!(exact.pass, Pass::Decode { max_partitions: 10, partition_keys: 32 });
        assert_eq!(bucketed.pass, Pass::Decode { max_partitions: 16, partition_keys: 32 });
        assert_eq!(bucketed.cfg.max_blocks_per_seq, 128);
        // Contexts that grow inside the buckets keep the geometry a captured graph replays.
        let longer = [seq(0, 1, 380, &table)];
        let next = AttentionPlan::shaped(&spec(4, 2, 8), &longer, PlanShape::Bucketed).unwrap();
        assert_eq!(next.geometry(), bucketed.geometry());
        assert_ne!(next.words, bucketed.words);
    }

    #[test]
    fn prefill_work_covers_every_row_of_each_gqa_group() {
        let table = [0u32; 16];
        // 10 queries x 4 heads per KV head = 40 rows: blocks start at rows 0, 16, 32.
        let seqs = [seq(0, 10, 12, &table), seq(10, 1, 30, &table)];
        let plan = AttentionPlan::new(&spec(8, 2, 64), &seqs).unwrap();
        assert_eq!(plan.pass, Pass::Prefill { num_work_items: 4 });
        assert_eq!(&plan.words[plan.work()], &[0, 0, 0, 16, 0, 32, 1, 0]);
        // On tensor cores: 64-row items (and head_dims it cannot take keep the other kernel).
        let tc = AttnSpec { tensor_cores: true, ..spec(8, 2, 64) };
        let plan = AttentionPlan::new(&tc, &seqs).unwrap();
        assert_eq!(plan.pass, Pass::PrefillTc { num_work_items: 2 });
        assert_eq!(&plan.words[plan.work()], &[0, 0, 1, 0]);
        let seqs = [seq(0, 20, 20, &table)];
        let plan = AttentionPlan::new(&tc, &seqs).unwrap();
        assert_eq!(&plan.words[plan.work()], &[0, 0, 0, 64], "80 rows");
        for hd in [8, 24, 136, 256] {
            let plan = AttentionPlan::new(&AttnSpec { tensor_cores: true, ..spec(8, 2, hd) }, &seqs).unwrap();
            assert!(matches!(plan.pass, Pass::Prefill { .. }), "head_dim {hd}");
        }
        // Decode is the same kernel either way.
        let plan = AttentionPlan::new(&tc, &[seq(0, 1, 30, &table)]).unwrap();
        assert!(matches!(plan.pass, Pass::Decode { .. }));
    }

    #[test]
    fn tensor_core_prefill_shared_memory_fits_sm80_and_hopper() {
        assert_eq!(prefill_tc_smem_bytes(128), 112_896);
        assert_eq!(prefill_tc_smem_bytes(64), 71_936);
        // A100 allows 163 KB per block (opt-in), H100/H200 227 KB.
        assert!(prefill_tc_smem_bytes(PREFILL_TC_MAX_HEAD_DIM) <= 163 * 1024);
    }

    #[test]
    fn decode_blocks_serve_up_to_eight_heads_of_one_group() {
        assert_eq!(decode_head_blocks(32, 32), 32); // MHA: one head per block
        assert_eq!(decode_head_blocks(14, 2), 2); // Qwen2.5-0.5B: groups of 7
        assert_eq!(decode_head_blocks(32, 4), 4);
        assert_eq!(decode_head_blocks(64, 4), 8); // groups of 16: two blocks each
        assert_eq!(decode_head_blocks(12, 1), 2); // 8 + 4
    }

    #[test]
    fn decode_partitions_follow_the_visible_keys() {
        assert_eq!(visible_keys(8192, None), 8192);
        assert_eq!(visible_keys(8192, Some(1000)), 1000);
        assert_eq!(visible_keys(300, Some(4096)), 300);
        // Qwen2.5-0.5B: 14 heads over 2 KV heads, one block per KV head's group.
        let hb = decode_head_blocks(14, 2);
        assert_eq!(hb, 2);
        // One sequence of 8k keys: 32 blocks at 512 keys, 128 at 128 keys (the floor).
        assert_eq!(decode_partition_keys(&[8192], hb), 128);
        // Four of 4k: 64 blocks at 512, 128 at 256: stops there.
        assert_eq!(decode_partition_keys(&[4096; 4], hb), 256);
        // A large batch keeps whole 512-key partitions.
        assert_eq!(decode_partition_keys(&[512; 256], hb), 512);
        assert_eq!(decode_partition_keys(&[2048; 64], hb), 512);
        assert_eq!(decode_partition_keys(&[256; 64], hb), 512);
        // A short context alone is cut down to the floor (4 blocks of 32 keys per KV head).
        assert_eq!(decode_partition_keys(&[100], hb), DECODE_MIN_PARTITION_KEYS);
        assert_eq!(decode_partition_keys(&[], hb), DECODE_MIN_PARTITION_KEYS);
        // 16 sequences of 300 keys: 96 blocks at 128 keys, 160 at 64: stops at 64.
        assert_eq!(decode_partition_keys(&[300; 16], hb), 64);
    }

    #[test]
    fn unsupported_shapes_are_errors() {
        let table = [0u32; 4];
        let seqs = [seq(0, 1, 4, &table)];
        for hd in [0, 4, 12, 100, 264, 512] {
            assert_eq!(AttentionPlan::new(&spec(2, 1, hd), &seqs).unwrap_err(), PlanError::HeadDim(hd));
        }
        for hd in [8, 64, 72, 80, 96, 128, 136, 256] {
            assert!(AttentionPlan::new(&spec(2, 1, hd), &seqs).is_ok(), "head_dim {hd}");
        }
        assert!(matches!(AttentionPlan::new(&spec(3, 2, 64), &seqs), Err(PlanError::Heads { .. })));
        let window0 = AttnSpec { sliding_window: Some(0), ..spec(2, 1, 64) };
        assert_eq!(AttentionPlan::new(&window0, &seqs).unwrap_err(), PlanError::EmptyWindow);
        let cap0 = AttnSpec { softcap: Some(0.0), ..spec(2, 1, 64) };
        assert_eq!(AttentionPlan::new(&cap0, &seqs).unwrap_err(), PlanError::Softcap(0.0));
    }

    #[test]
    fn prefill_shared_memory_fits_every_sm80_plus_card() {
        assert!(prefill_smem_bytes(128) <= DEFAULT_SMEM_BYTES);
        // head_dim 256 needs the opt-in; L4 (sm_89) allows 99 KiB per block, the least of them.
        assert_eq!(prefill_smem_bytes(256), 82_048);
        assert!(prefill_smem_bytes(MAX_HEAD_DIM) <= 99 * 1024);
    }

    #[test]
    fn a_pick_packs_as_the_kernels_pick_row() {
        let words = pick_words(7, 0.5, 0.05, 0.25);
        assert_eq!(words[..4], [7, 0.5f32.to_bits(), 0.05f32.to_bits(), 0]);
        // The f64 at word 4 (byte 16: 8-byte aligned in a 24-byte struct), little endian.
        let u = f64::from_bits(u64::from(words[4]) | (u64::from(words[5]) << 32));
        assert_eq!(u, 0.25);
        let kernel = include_str!("../../../kernels/sample.cu");
        let fields =
            ["uint32_t row;", "float inv_temperature;", "float min_p;", "uint32_t pad;", "double u;"];
        let mut at = kernel.find("struct PickRow {").expect("kernels/sample.cu defines PickRow");
        for field in fields {
            let found =
                kernel[at..].find(field).unwrap_or_else(|| panic!("PickRow lacks `{field}` in order"));
            at += found;
        }
    }

    /// The constants above must equal the kernels' `constexpr`s.
    #[test]
    fn constants_mirror_the_kernel_sources() {
        let sources = [
            include_str!("../../../kernels/common.cuh"),
            include_str!("../../../kernels/reshape_and_cache.cu"),
            include_str!("../../../kernels/paged_attention_decode.cu"),
            include_str!("../../../kernels/paged_attention_prefill.cu"),
            include_str!("../../../kernels/sample.cu"),
            include_str!("../../../kernels/fused.cu"),
            include_str!("../../../kernels/paged_attention_prefill_tc.cu"),
            include_str!("../../../kernels/gemv.cu"),
        ]
        .concat();
        let expected = [
            format!("constexpr int MAX_HEAD_DIM = {MAX_HEAD_DIM};"),
            format!("constexpr uint32_t PAD_SLOT = 0x{PAD_SLOT:X}u;"),
            format!("constexpr int VEC = {VEC_ELEMS};"),
            format!("constexpr int PARTITION_KEYS = {DECODE_PARTITION_KEYS};"),
            format!("constexpr int DECODE_HEADS = {DECODE_HEADS};"),
            format!("constexpr int PREFILL_KEYS = {PREFILL_KEYS};"),
            format!("constexpr int RESHAPE_THREADS = {RESHAPE_THREADS};"),
            format!("constexpr int DECODE_THREADS = {DECODE_THREADS};"),
            format!("constexpr int PREFILL_THREADS = {PREFILL_THREADS};"),
            format!("constexpr int SAMPLE_THREADS = {SAMPLE_THREADS};"),
            format!("constexpr int FUSED_THREADS = {FUSED_THREADS};"),
            format!("constexpr int GEMV_THREADS = {GEMV_THREADS};"),
            format!("constexpr int GEMV_MAX_ROWS = {GEMV_MAX_ROWS};"),
            format!("constexpr int TC_THREADS = {PREFILL_TC_THREADS};"),
            format!("constexpr int TC_KEYS = {PREFILL_TC_KEYS};"),
            format!("constexpr int TC_MAX_HEAD_DIM = {PREFILL_TC_MAX_HEAD_DIM};"),
            "constexpr int TC_STRIP = 16;".to_string(),
            "constexpr int PAD_HALF = 8;".to_string(),
            "constexpr int PAD_FLOAT = 4;".to_string(),
            "constexpr int ROWS_PER_WARP = 4;".to_string(),
        ];
        for line in expected {
            assert!(sources.contains(&line), "kernels/ lack `{line}`");
        }
        assert_eq!(PREFILL_ROWS, (PREFILL_THREADS as usize / 32) * 4, "PREFILL_ROWS = warps * ROWS_PER_WARP");
        assert_eq!(PREFILL_TC_ROWS, (PREFILL_TC_THREADS as usize / 32) * 16, "TC_ROWS = warps * TC_STRIP");
    }
}
