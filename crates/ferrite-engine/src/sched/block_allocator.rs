//! KV cache block ids: a free list with reference counts.
//!
//! Holds no tensors. The scheduler's block manager (prefix caching, eviction) grows on top of
//! this: a block whose count returns to zero goes back on the free list, and
//! [`BlockAllocator::fork`] shares a block between sequences (n > 1 samples, cached prefixes).

use std::collections::VecDeque;

/// Index of one block in every layer's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("out of KV cache blocks: {requested} requested, {free} free of {total}")]
    OutOfBlocks { requested: usize, free: usize, total: usize },
    #[error("block {0:?} is not allocated")]
    NotAllocated(BlockId),
}

#[derive(Debug)]
pub struct BlockAllocator {
    free: VecDeque<BlockId>,
    ref_counts: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        let num_blocks = u32::try_from(num_blocks).expect("invariant: fewer than 2^32 KV blocks");
        Self { free: (0..num_blocks).map(BlockId).collect(), ref_counts: vec![0; num_blocks as usize] }
    }

    pub fn num_total_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Takes one free block (ref count 1).
    pub fn allocate(&mut self) -> Result<BlockId, BlockError> {
        let id = self.free.pop_front().ok_or(BlockError::OutOfBlocks {
            requested: 1,
            free: 0,
            total: self.num_total_blocks(),
        })?;
        self.ref_counts[id.0 as usize] = 1;
        Ok(id)
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate_n(&mut self, n: usize) -> Result<Vec<BlockId>, BlockError> {
        if n > self.free.len() {
            return Err(BlockError::OutOfBlocks {
                requested: n,
                free: self.free.len(),
                total: self.num_total_blocks(),
            });
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// Shares an allocated block: one more owner.
    pub fn fork(&mut self, id: BlockId) -> Result<(), BlockError> {
        let count = self.count_mut(id)?;
        *count += 1;
        Ok(())
    }

    /// Drops one owner; the block is free again when none is left.
    pub fn free(&mut self, id: BlockId) -> Result<(), BlockError> {
        let count = self.count_mut(id)?;
        *count -= 1;
        if *count == 0 {
            self.free.push_back(id);
        }
        Ok(())
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.ref_counts.get(id.0 as usize).copied().unwrap_or(0)
    }

    fn count_mut(&mut self, id: BlockId) -> Result<&mut u32, BlockError> {
        match self.ref_counts.get_mut(id.0 as usize) {
            Some(c) if *c > 0 => Ok(c),
            _ => Err(BlockError::NotAllocated(id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_free_and_share() {
        let mut a = BlockAllocator::new(3);
        let blocks = a.allocate_n(2).unwrap();
        assert_eq!(blocks, vec![BlockId(0), BlockId(1)]);
        assert_eq!(a.num_free_blocks(), 1);
        a.fork(blocks[0]).unwrap();
        assert_eq!(a.ref_count(blocks[0]), 2);
        a.free(blocks[0]).unwrap();
        assert_eq!(a.num_free_blocks(), 1, "still one owner left");
        a.free(blocks[0]).unwrap();
        assert_eq!(a.num_free_blocks(), 2);
        assert_eq!(a.free(blocks[0]), Err(BlockError::NotAllocated(BlockId(0))));
        assert_eq!(a.fork(BlockId(7)), Err(BlockError::NotAllocated(BlockId(7))));
    }

    #[test]
    fn allocate_n_is_all_or_nothing() {
        let mut a = BlockAllocator::new(2);
        let _held = a.allocate().unwrap();
        assert_eq!(a.allocate_n(2), Err(BlockError::OutOfBlocks { requested: 2, free: 1, total: 2 }));
        assert_eq!(a.num_free_blocks(), 1);
        assert!(a.allocate().is_ok());
        assert!(a.allocate().is_err());
    }
}
