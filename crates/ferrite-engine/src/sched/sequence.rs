//! The scheduler's view of a sequence: its tokens, how many are computed, its blocks and where
//! it stands (priority, deadline, arrival). Nothing about sampling or text.

use std::time::Instant;

use super::block_manager::BlockHashes;
use super::{BlockId, HiddenRows, SeqId};
use crate::pooling::PoolingType;

/// The scheduler's view of a sequence: tokens and blocks, nothing about sampling or text.
#[derive(Debug)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt followed by the tokens generated so far.
    pub token_ids: Vec<u32>,
    pub num_prompt_tokens: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed_tokens: usize,
    pub block_table: Vec<BlockId>,
    pub(super) block_hashes: BlockHashes,
    /// Prompt tokens found in the prefix cache when first admitted.
    pub num_cached_prompt_tokens: Option<usize>,
    pub num_preemptions: usize,
    /// The logits of every prompt position are wanted (prompt logprobs), so the prompt is
    /// always computed, never taken from the prefix cache.
    pub needs_prompt_logits: bool,
    /// Lower runs first under [`SchedulingPolicy::Priority`].
    pub priority: i32,
    /// Earlier runs first under [`SchedulingPolicy::Deadline`].
    pub deadline: Option<Instant>,
    /// An embedding: the prompt is computed for these hidden rows, and nothing is sampled.
    pub pooling: Option<PoolingType>,
    /// The order sequences were added in (set by [`Scheduler::add`]).
    pub(super) arrival: u64,
}

impl Sequence {
    pub fn new(id: SeqId, prompt_token_ids: Vec<u32>) -> Self {
        Self {
            id,
            num_prompt_tokens: prompt_token_ids.len(),
            token_ids: prompt_token_ids,
            num_computed_tokens: 0,
            block_table: Vec::new(),
            block_hashes: BlockHashes::default(),
            num_cached_prompt_tokens: None,
            num_preemptions: 0,
            needs_prompt_logits: false,
            priority: 0,
            deadline: None,
            pooling: None,
            arrival: 0,
        }
    }

    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    pub(super) fn num_uncomputed(&self) -> usize {
        self.token_ids.len() - self.num_computed_tokens
    }

    /// More than the next token to compute: a prompt, or a recompute after preemption.
    pub(super) fn prefilling(&self) -> bool {
        self.num_uncomputed() > 1
    }

    /// Whether a chunk ending at `target` tokens gives the next token: it reaches the end of
    /// the tokens, and the sequence generates (a pooling one never samples).
    pub(super) fn samples_at(&self, target: usize) -> bool {
        target == self.token_ids.len() && self.pooling.is_none()
    }

    /// Whether every prompt position must be computed here, none read from the prefix cache:
    /// their logits (prompt logprobs) or hidden states (mean and CLS pooling) are wanted.
    pub(super) fn computes_whole_prompt(&self) -> bool {
        self.needs_prompt_logits || matches!(self.pooling, Some(PoolingType::Mean | PoolingType::Cls))
    }

    /// The hidden rows a chunk of `len` tokens from `num_computed_tokens` hands back.
    pub(super) fn hidden_rows(&self, len: usize) -> HiddenRows {
        let end = self.num_computed_tokens + len;
        match self.pooling {
            Some(PoolingType::Mean) => HiddenRows::All,
            Some(PoolingType::Cls) if self.num_computed_tokens == 0 => HiddenRows::First,
            Some(PoolingType::Last) if end == self.num_prompt_tokens => HiddenRows::Last,
            _ => HiddenRows::None,
        }
    }
}
