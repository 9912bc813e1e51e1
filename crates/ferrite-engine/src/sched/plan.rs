//! What the scheduler decides for one step, as plain data: which sequences, how many of their
//! tokens, over which cache blocks. The runner reads it; nothing here knows about tensors.

use super::BlockId;

/// Identifies one sequence (one of a request's `n` samples) inside the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    pub num_new_tokens: usize,
    /// This chunk reaches the end of the sequence's tokens: its logits give the next token.
    pub samples: bool,
}

/// The plan of one step: data only, handed to the runner.
#[derive(Debug, Default)]
pub struct SchedulerPlan {
    pub seqs: Vec<ScheduledSeq>,
    pub num_batched_tokens: usize,
    /// Sequences preempted while planning this step.
    pub preempted: Vec<SeqId>,
    /// Sequences scheduled for the first time (they leave the queue).
    pub first_scheduled: Vec<SeqId>,
}

impl SchedulerPlan {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// One sequence's share of a step: tokens `num_computed_tokens .. num_computed_tokens +
/// token_ids.len()` of its full token list.
#[derive(Debug, Clone, Copy)]
pub struct ScheduledChunk<'a> {
    pub token_ids: &'a [u32],
    pub num_computed_tokens: usize,
    /// Must already cover every position up to the end of this chunk.
    pub block_table: &'a [BlockId],
    /// Logits for every token of the chunk (prompt logprobs), not only the last.
    pub all_logits: bool,
    /// The final hidden states the model also hands back, for an embedding's pooling.
    pub hidden: HiddenRows,
}

/// Which of a chunk's final-normed hidden states come back from the model (a pooling
/// sequence's; the chunk's logits row is computed either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HiddenRows {
    #[default]
    None,
    /// The chunk's first token's (it starts the prompt: CLS pooling).
    First,
    /// The chunk's last token's (it ends the prompt: last-token pooling).
    Last,
    /// Every token's (mean pooling).
    All,
}
