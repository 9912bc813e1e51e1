//! ferrite's inference engine: loads Hugging Face checkpoints and runs them over a paged KV
//! cache, one flat batch of tokens per step. No HTTP here; the server and the binary sit on top.
//!
//! The data path, module by module:
//!
//! ```text
//! model/     hub ─▶ hf_config + tokenizer + chat_template ─▶ arch/ (one Model trait; llama.rs)
//!            loader::load ─▶ LoadedModel
//! builder    EngineBuilder { EngineConfig { scheduler, cache: CacheConfig, .. }, KvCacheSize }
//!            .load(ModelSpec): DeviceChoice::open ─▶ loader::load ─▶ the memory plan (memory)
//!            fixes CacheConfig.num_blocks ─▶ spawn_engine
//! handle     EngineHandle::submit(Request): the one check (RequestError) ─▶ RequestStream
//! ══ the engine thread (engine.rs) owns everything below; one step: ══════════════════════
//!   sched/   scheduler.schedule() ─▶ SchedulerPlan + ScheduledChunk (plan.rs, data only);
//!            block_manager (prefix cache, LRU) over block_allocator
//!   forward_input  ─▶ HostInput: tokens, positions, slot_mapping, block tables
//!   runner.forward eager, or a replayed CUDA graph (cuda_graph) ─▶ Model::forward_with_hidden over
//!                  kv_cache (ops/: linear + packed, fused, activation, paged_attention/)
//!   runner.sample  plain rows on the logits' device (sampler::device), the rest on the host
//!                  (sampler/: params, softmax), prompt rows scored; constrained rows masked
//!                  by their grammar (grammar/: llguidance, masks computed during forward)
//!   output.update  detokenizer, stop rule, usage and cost ─▶ RequestEvent per request
//!   output.pool    an embedding's hidden rows pooled (pooling: modes, Matryoshka) ─▶ its vector
//! metrics (Prometheus, vLLM's names) and energy (RAPL, NVML) are read at those boundaries.
//! ```
//!
//! The face is the root: [`EngineBuilder`] → [`EngineHandle`] → [`Request`] /
//! [`RequestEvent`], with [`SamplingParams`], [`DetokenizerParams`] and the errors. `model`
//! loads and tokenizes; `metrics` is what a server exports. `sched`, `sampler`, `runner`,
//! `forward_input`, `kv_cache` and `ops` are public only so benches and tests can drive one
//! stage alone: they are the engine's insides, not an API.

#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod budgets;
mod builder;
#[cfg(feature = "cuda")]
mod cuda_graph;
mod detokenizer;
pub mod device;
mod energy;
mod engine;
mod error;
pub mod forward_input;
pub mod grammar;
mod handle;
pub mod kv_cache;
mod memory;
pub mod metrics;
pub mod model;
pub mod ops;
mod output;
pub mod pooling;
mod request;
pub mod runner;
pub mod sampler;
pub mod sched;

pub use budgets::{BudgetKind, BudgetOutcome};
pub use builder::{EngineBuilder, KvCacheSize, MetricsSpec, ModelSpec, StartedEngine};
pub use candle_core::{DType, Device};
pub use detokenizer::DetokenizerParams;
pub use device::DeviceChoice;
pub use engine::{spawn_engine, EngineConfig};
pub use error::{EngineError, LoadError};
pub use grammar::{Grammar, GrammarError, GrammarSpec, Grammars, Thinking};
pub use handle::{EngineHandle, EngineInfo, RequestStream};
pub use kv_cache::CacheConfig;
pub use model::chat_template::{ChatExtras, Message};
pub use model::loader::{load, LoadOptions, LoadedModel};
pub use model::tokenizer::Tokenizer;
pub use pooling::{Pooling, PoolingType};
pub use request::{
    Deadlines, EmbedRequest, FinishReason, PromptLogprob, Request, RequestError, RequestEvent, StopReason,
    SubmitError, TokenOutput, Usage,
};
pub use sampler::SamplingParams;
pub use sched::{SchedulerConfig, SchedulingPolicy};
