//! ferrite's inference engine: loads Hugging Face checkpoints and runs them over a paged KV
//! cache, one flat batch of tokens per step. No HTTP here; the server and the binary sit on top.
//!
//! The data path, module by module:
//!
//! ```text
//! loader ── hub, config, tokenizer + chat_template, models/ (one Model trait; llama.rs) ──▶ LoadedModel
//! builder    EngineBuilder { EngineConfig, KvCacheSize }: memory plan (memory) ─▶ spawn_engine
//! handle     EngineHandle::submit(Request): the one check (RequestError) ─▶ RequestStream
//! ══ the engine thread (engine.rs) owns everything below; one step: ══════════════════════
//!   scheduler.schedule()  ─▶ SchedulerPlan (data only; block_manager, block_allocator)
//!   forward_input         ─▶ HostInput: tokens, positions, slot_mapping, block tables
//!   runner.forward        eager, or a replayed CUDA graph (cuda_graph) ─▶ model.forward
//!                         (ops/: linear + packed, fused, activation, paged_attention/)
//!   runner.sample         plain rows on the logits' device (sampler::device), the rest on
//!                         the host (sampler), prompt rows scored
//!   output.update         detokenizer, stop rule, usage and cost ─▶ RequestEvent per request
//! metrics (Prometheus, vLLM's names) and energy (RAPL, NVML) are read at those boundaries.
//! ```

#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod block_allocator;
pub mod block_manager;
pub mod builder;
pub mod chat_template;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_graph;
pub mod detokenizer;
pub mod device;
pub mod energy;
pub mod engine;
pub mod error;
pub mod forward_input;
pub mod handle;
pub mod hub;
pub mod kv_cache;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod ops;
mod output;
pub mod request;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;

pub use builder::{EngineBuilder, KvCacheSize, MetricsSpec, StartedEngine};
pub use candle_core::{DType, Device};
pub use engine::{spawn_engine, EngineConfig};
pub use error::{EngineError, LoadError};
pub use handle::{EngineHandle, EngineInfo, RequestStream};
