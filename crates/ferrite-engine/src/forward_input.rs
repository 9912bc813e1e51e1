//! The flat batch of one step: every scheduled token of every sequence in one list, with the
//! positions, cache slots and per-sequence ranges the model and attention op need.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::block_allocator::BlockId;
use crate::ops::paged_attention::{AttentionMetadata, SeqAttention};

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
}

/// Model input for one step.
#[derive(Debug)]
pub struct ForwardInput {
    /// `[num_tokens]` u32.
    pub token_ids: Tensor,
    /// Absolute position of each token, host side (RoPE tables are built from it).
    pub positions: Vec<u32>,
    pub attention: AttentionMetadata,
    /// u32 rows of the flat batch the model computes logits for: each chunk's last token, or
    /// all of its tokens when it asks for `all_logits`.
    pub logits_indices: Tensor,
    /// Per chunk, its rows in the logits the model returns; the last one samples.
    pub logits_rows: Vec<Range<usize>>,
    /// Per chunk, whether it asked for `all_logits` (its rows are then one per token, even
    /// when it has a single token).
    pub all_logits: Vec<bool>,
}

impl ForwardInput {
    pub fn build(
        chunks: &[ScheduledChunk<'_>],
        block_size: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let num_tokens: usize = chunks.iter().map(|c| c.token_ids.len()).sum();
        let mut token_ids = Vec::with_capacity(num_tokens);
        let mut positions = Vec::with_capacity(num_tokens);
        let mut slot_mapping = Vec::with_capacity(num_tokens);
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut logits_indices = Vec::with_capacity(chunks.len());
        let mut logits_rows = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let query_start = token_ids.len();
            let context_len = chunk.num_computed_tokens + chunk.token_ids.len();
            if chunk.token_ids.is_empty() || chunk.block_table.len() * block_size < context_len {
                candle_core::bail!(
                    "scheduled chunk of {} tokens at {} does not fit its {} blocks",
                    chunk.token_ids.len(),
                    chunk.num_computed_tokens,
                    chunk.block_table.len()
                );
            }
            token_ids.extend_from_slice(chunk.token_ids);
            for pos in chunk.num_computed_tokens..context_len {
                positions.push(pos as u32);
                let block = chunk.block_table[pos / block_size].0 as usize;
                slot_mapping.push((block * block_size + pos % block_size) as u32);
            }
            seqs.push(SeqAttention {
                query_start,
                query_len: chunk.token_ids.len(),
                context_len,
                block_table: chunk.block_table.iter().map(|b| b.0).collect(),
            });
            let first = logits_indices.len();
            if chunk.all_logits {
                logits_indices.extend(query_start as u32..token_ids.len() as u32);
            } else {
                logits_indices.push((token_ids.len() - 1) as u32);
            }
            logits_rows.push(first..logits_indices.len());
        }
        let all_logits = chunks.iter().map(|c| c.all_logits).collect();
        let num_rows = logits_indices.len();
        Ok(Self {
            token_ids: Tensor::from_vec(token_ids, num_tokens, device)?,
            positions,
            attention: AttentionMetadata::new(slot_mapping, seqs, block_size),
            logits_indices: Tensor::from_vec(logits_indices, num_rows, device)?,
            logits_rows,
            all_logits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_block_tables() {
        let a = [BlockId(5), BlockId(2)];
        let b = [BlockId(0)];
        let chunks = [
            ScheduledChunk {
                token_ids: &[1, 2, 3],
                num_computed_tokens: 2,
                block_table: &a,
                all_logits: false,
            },
            ScheduledChunk { token_ids: &[9], num_computed_tokens: 0, block_table: &b, all_logits: false },
        ];
        let input = ForwardInput::build(&chunks, 4, &Device::Cpu).unwrap();
        assert_eq!(input.positions, vec![2, 3, 4, 0]);
        // positions 2,3 -> block 5 offsets 2,3; position 4 -> block 2 offset 0.
        assert_eq!(input.attention.slot_mapping(), [22, 23, 8, 0]);
        assert_eq!(input.logits_indices.to_vec1::<u32>().unwrap(), vec![2, 3]);
        assert_eq!(input.logits_rows, vec![0..1, 1..2]);
        assert_eq!(input.attention.seqs()[0].context_len, 5);
        assert_eq!(input.attention.seqs()[1].query_start, 3);
    }

    #[test]
    fn chunk_beyond_its_blocks_is_refused() {
        let a = [BlockId(0)];
        let chunks = [ScheduledChunk {
            token_ids: &[1, 2],
            num_computed_tokens: 3,
            block_table: &a,
            all_logits: false,
        }];
        assert!(ForwardInput::build(&chunks, 4, &Device::Cpu).is_err());
    }

    #[test]
    fn a_chunk_asking_for_all_logits_gets_a_row_per_token() {
        let (a, b, c) = ([BlockId(0)], [BlockId(1)], [BlockId(2)]);
        let chunks = [
            ScheduledChunk { token_ids: &[1, 2], num_computed_tokens: 0, block_table: &a, all_logits: false },
            ScheduledChunk {
                token_ids: &[3, 4, 5],
                num_computed_tokens: 1,
                block_table: &b,
                all_logits: true,
            },
            ScheduledChunk { token_ids: &[6], num_computed_tokens: 0, block_table: &c, all_logits: false },
        ];
        let input = ForwardInput::build(&chunks, 4, &Device::Cpu).unwrap();
        assert_eq!(input.logits_indices.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(input.logits_rows, vec![0..1, 1..4, 4..5]);
        assert_eq!(input.all_logits, vec![false, true, false]);
    }
}
