//! ferrite's inference engine: loads Hugging Face checkpoints and runs them over a paged KV
//! cache, one flat batch of tokens per step. No HTTP here; the server and the binary sit on top.

#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod block_allocator;
pub mod block_manager;
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

pub use candle_core::{DType, Device};
pub use engine::{spawn_engine, EngineConfig};
pub use error::{EngineError, LoadError};
pub use handle::{EngineHandle, EngineInfo, RequestStream};
