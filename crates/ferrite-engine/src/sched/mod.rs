//! Planning a step: which tokens of which sequences run next, over which cache blocks. Plain
//! data and bookkeeping; no tensors. The runner turns a [`SchedulerPlan`] into model input.
//!
//! - `scheduler`: token budget, admission, chunked prefill, preemption by recompute.
//! - `sequence`: the scheduler's view of one sequence (tokens, blocks, place).
//! - `plan`: what one step decides ([`SchedulerPlan`], [`ScheduledChunk`], [`SeqId`]).
//! - `step_cost`: a step's wall time learned from the steps run, to size prompt chunks to an
//!   inter-token latency target.
//! - `backlog`: the queued prompt work, published after each step, from which a submitting
//!   thread predicts a new request's first token (to refuse one that cannot meet its budget).
//! - `block_manager`: block tables with prefix caching and LRU eviction, over
//!   `block_allocator`'s reference-counted free list.

mod backlog;
mod block_allocator;
mod block_manager;
mod plan;
mod scheduler;
mod sequence;
mod step_cost;

pub use backlog::Backlog;
pub use block_allocator::{BlockAllocator, BlockError, BlockId};
pub use plan::{HiddenRows, ScheduledChunk, ScheduledSeq, SchedulerPlan, SeqId};
pub use scheduler::{Place, Scheduler, SchedulerConfig, SchedulerStats, SchedulingPolicy};
pub use sequence::Sequence;
pub use step_cost::{Estimate, StepCost, MIN_PREFILL_CHUNK};
