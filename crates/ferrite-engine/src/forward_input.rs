//! The flat batch of one step: every scheduled token of every sequence in one list, with the
//! positions, cache slots and per-sequence ranges the model and attention op need.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::ops::paged_attention::{AttentionMetadata, SeqAttention, PAD_SLOT};
use crate::sched::{HiddenRows, ScheduledChunk};

/// Model input for one step.
#[derive(Debug)]
pub struct ForwardInput {
    /// `[num_tokens]` u32.
    pub token_ids: Tensor,
    /// Absolute position of each token, host side (RoPE tables are built from it).
    pub positions: Vec<u32>,
    /// The same positions on the model's device, `[num_tokens]` u32 (RoPE rows are gathered
    /// by them where the model holds its tables on the device).
    pub position_ids: Tensor,
    pub attention: AttentionMetadata,
    /// u32 rows of the flat batch the model computes logits for: each chunk's last token, or
    /// all of its tokens when it asks for `all_logits`.
    pub logits_indices: Tensor,
    /// Per chunk, its rows in the logits the model returns; the last one samples.
    pub logits_rows: Vec<Range<usize>>,
    /// Per chunk, whether it asked for `all_logits` (its rows are then one per token, even
    /// when it has a single token).
    pub all_logits: Vec<bool>,
    /// u32 rows of the flat batch whose final-normed hidden states the model also returns
    /// (pooling sequences'); `None` when no chunk asked for any.
    pub hidden_indices: Option<Tensor>,
    /// Per chunk, its rows in those hidden states (empty for most).
    pub hidden_rows: Vec<Range<usize>>,
}

impl ForwardInput {
    pub fn build(
        chunks: &[ScheduledChunk<'_>],
        block_size: usize,
        device: &Device,
    ) -> candle_core::Result<Self> {
        HostInput::build(chunks, block_size)?.upload(device)
    }
}

/// A step's input on the host: what [`ForwardInput`] holds, before its tensors are made.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInput {
    pub token_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<u32>,
    pub seqs: Vec<SeqAttention>,
    pub logits_indices: Vec<u32>,
    pub logits_rows: Vec<Range<usize>>,
    pub all_logits: Vec<bool>,
    pub hidden_indices: Vec<u32>,
    pub hidden_rows: Vec<Range<usize>>,
    pub block_size: usize,
}

impl HostInput {
    pub fn build(chunks: &[ScheduledChunk<'_>], block_size: usize) -> candle_core::Result<Self> {
        let num_tokens: usize = chunks.iter().map(|c| c.token_ids.len()).sum();
        let mut token_ids = Vec::with_capacity(num_tokens);
        let mut positions = Vec::with_capacity(num_tokens);
        let mut slot_mapping = Vec::with_capacity(num_tokens);
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut logits_indices = Vec::with_capacity(chunks.len());
        let mut logits_rows = Vec::with_capacity(chunks.len());
        let mut hidden_indices = Vec::new();
        let mut hidden_rows = Vec::with_capacity(chunks.len());
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
            let (first, end) = (hidden_indices.len(), token_ids.len() as u32);
            match chunk.hidden {
                HiddenRows::None => {}
                HiddenRows::First => hidden_indices.push(query_start as u32),
                HiddenRows::Last => hidden_indices.push(end - 1),
                HiddenRows::All => hidden_indices.extend(query_start as u32..end),
            }
            hidden_rows.push(first..hidden_indices.len());
        }
        let all_logits = chunks.iter().map(|c| c.all_logits).collect();
        Ok(Self {
            token_ids,
            positions,
            slot_mapping,
            seqs,
            logits_indices,
            logits_rows,
            all_logits,
            hidden_indices,
            hidden_rows,
            block_size,
        })
    }

    /// Whether every sequence has exactly one new token and wants only its last logits (a
    /// decode step: one token, one logits row per sequence, in order, no hidden states).
    pub fn is_decode(&self) -> bool {
        self.seqs.iter().all(|s| s.query_len == 1)
            && !self.all_logits.iter().any(|&a| a)
            && self.hidden_indices.is_empty()
    }

    /// Appends decode rows up to `num_seqs` sequences, each one token (id 0, position 0) at
    /// [`PAD_SLOT`] attending one key in block 0: a captured graph's size. Nothing is written
    /// for them and nobody reads their logits rows.
    pub fn pad_to(&mut self, num_seqs: usize) {
        while self.seqs.len() < num_seqs {
            let row = self.token_ids.len();
            self.token_ids.push(0);
            self.positions.push(0);
            self.slot_mapping.push(PAD_SLOT);
            self.seqs.push(SeqAttention {
                query_start: row,
                query_len: 1,
                context_len: 1,
                block_table: vec![0],
            });
            let first = self.logits_indices.len();
            self.logits_indices.push(row as u32);
            self.logits_rows.push(first..first + 1);
            self.all_logits.push(false);
            let end = self.hidden_indices.len();
            self.hidden_rows.push(end..end);
        }
    }

    /// The metadata the attention op reads.
    pub fn attention(&self) -> AttentionMetadata {
        AttentionMetadata::new(self.slot_mapping.clone(), self.seqs.clone(), self.block_size)
    }

    pub fn upload(self, device: &Device) -> candle_core::Result<ForwardInput> {
        let (num_tokens, num_rows) = (self.token_ids.len(), self.logits_indices.len());
        let num_hidden = self.hidden_indices.len();
        let hidden_indices = (num_hidden > 0)
            .then(|| Tensor::from_vec(self.hidden_indices, num_hidden, device))
            .transpose()?;
        let attention = AttentionMetadata::new(self.slot_mapping, self.seqs, self.block_size);
        Ok(ForwardInput {
            token_ids: Tensor::from_vec(self.token_ids, num_tokens, device)?,
            position_ids: Tensor::from_slice(&self.positions, num_tokens, device)?,
            positions: self.positions,
            attention,
            logits_indices: Tensor::from_vec(self.logits_indices, num_rows, device)?,
            logits_rows: self.logits_rows,
            all_logits: self.all_logits,
            hidden_indices,
            hidden_rows: self.hidden_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::BlockId;

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
                hidden: Default::default(),
            },
            ScheduledChunk {
                token_ids: &[9],
                num_computed_tokens: 0,
                block_table: &b,
                all_logits: false,
                hidden: Default::default(),
            },
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
            hidden: Default::default(),
        }];
        assert!(ForwardInput::build(&chunks, 4, &Device::Cpu).is_err());
    }

    #[test]
    fn a_chunk_asking_for_all_logits_gets_a_row_per_token() {
        let (a, b, c) = ([BlockId(0)], [BlockId(1)], [BlockId(2)]);
        let chunks = [
            ScheduledChunk {
                token_ids: &[1, 2],
                num_computed_tokens: 0,
                block_table: &a,
                all_logits: false,
                hidden: Default::default(),
            },
            ScheduledChunk {
                token_ids: &[3, 4, 5],
                num_computed_tokens: 1,
                block_table: &b,
                all_logits: true,
                hidden: Default::default(),
            },
            ScheduledChunk {
                token_ids: &[6],
                num_computed_tokens: 0,
                block_table: &c,
                all_logits: false,
                hidden: Default::default(),
            },
        ];
        let input = ForwardInput::build(&chunks, 4, &Device::Cpu).unwrap();
        assert_eq!(input.logits_indices.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(input.logits_rows, vec![0..1, 1..4, 4..5]);
        assert_eq!(input.all_logits, vec![false, true, false]);
    }

    #[test]
    fn padding_adds_decode_rows_that_write_nowhere() {
        let a = [BlockId(3)];
        let chunks = [ScheduledChunk {
            token_ids: &[7],
            num_computed_tokens: 2,
            block_table: &a,
            all_logits: false,
            hidden: Default::default(),
        }];
        let mut host = HostInput::build(&chunks, 4).unwrap();
        assert!(host.is_decode());
        host.pad_to(3);
        assert_eq!(host.token_ids, vec![7, 0, 0]);
        assert_eq!(host.positions, vec![2, 0, 0]);
        assert_eq!(host.slot_mapping, vec![14, PAD_SLOT, PAD_SLOT]);
        assert_eq!(host.logits_indices, vec![0, 1, 2]);
        assert_eq!(host.logits_rows, vec![0..1, 1..2, 2..3]);
        assert_eq!((host.seqs[2].query_start, host.seqs[2].context_len), (2, 1));
        assert!(host.is_decode());
        let input = host.upload(&Device::Cpu).unwrap();
        assert_eq!(input.position_ids.to_vec1::<u32>().unwrap(), vec![2, 0, 0]);
        // A chunk of two tokens, or one asking for all its logits, is not a decode step.
        let two = [ScheduledChunk {
            token_ids: &[7, 8],
            num_computed_tokens: 0,
            block_table: &a,
            all_logits: false,
            hidden: Default::default(),
        }];
        assert!(!HostInput::build(&two, 4).unwrap().is_decode());
        let all = [ScheduledChunk {
            token_ids: &[7],
            num_computed_tokens: 0,
            block_table: &a,
            all_logits: true,
            hidden: Default::default(),
        }];
        assert!(!HostInput::build(&all, 4).unwrap().is_decode());
    }
}
