//! The model and engine flags `generate` and `serve` share, and the one function that turns
//! them into a running engine.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ferrite_engine::config::GenerationConfig;
use ferrite_engine::engine::{spawn_engine, EngineConfig, EngineHandle};
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::loader::{load, LoadOptions};
use ferrite_engine::scheduler::SchedulerConfig;
use ferrite_engine::tokenizer::Tokenizer;
use ferrite_engine::{DType, Device};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// A local model directory or a Hugging Face repo id (org/name[@revision]).
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Longest prompt + output (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Memory for the KV cache, GiB.
    #[arg(long, default_value_t = 1.0)]
    pub kv_cache_gib: f64,
    /// KV cache size in blocks (overrides --kv-cache-gib).
    #[arg(long)]
    pub kv_cache_blocks: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Most tokens in one step (decode tokens first, then prompt chunks: chunked prefill).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Do not reuse KV blocks of identical prompt prefixes.
    #[arg(long)]
    pub no_prefix_caching: bool,
}

/// A loaded model behind a running engine thread.
pub struct Running {
    pub engine: EngineHandle,
    pub thread: JoinHandle<()>,
    pub tokenizer: Arc<Tokenizer>,
    pub generation_config: GenerationConfig,
}

impl EngineArgs {
    /// Loads the model and starts the engine; `max_waiting_requests` bounds its queue.
    pub fn start(&self, max_waiting_requests: usize) -> Result<Running> {
        let device = match self.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => bail!("--device cuda: this build has no CUDA support yet (CPU only)"),
        };
        let dtype = match self.dtype {
            DtypeArg::Auto => None,
            DtypeArg::F32 => Some(DType::F32),
            DtypeArg::F16 => Some(DType::F16),
            DtypeArg::Bf16 => Some(DType::BF16),
        };
        if self.block_size == 0
            || self.kv_cache_gib <= 0.0
            || self.max_num_batched_tokens == 0
            || self.max_num_seqs == 0
        {
            bail!(
                "--block-size, --kv-cache-gib, --max-num-batched-tokens and --max-num-seqs must be positive"
            );
        }
        let m = load(&self.model, &LoadOptions { dtype, device })
            .with_context(|| format!("loading model `{}`", self.model))?;
        let spec = m.model.kv_cache_spec();
        let num_blocks = match self.kv_cache_blocks {
            Some(n) => n,
            None => {
                let bytes = (self.kv_cache_gib * (1u64 << 30) as f64) as usize;
                KvCache::num_blocks_for_bytes(&spec, self.block_size, bytes)
            }
        };
        let config = EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                block_size: self.block_size,
                num_blocks,
                enable_prefix_caching: !self.no_prefix_caching,
            },
            max_model_len: self.max_model_len.unwrap_or(m.config.max_position_embeddings),
            max_waiting_requests,
        };
        let eos = m.eos_token_ids();
        let tokenizer = Arc::new(m.tokenizer);
        let (engine, thread) = spawn_engine(m.model, tokenizer.clone(), eos, config)?;
        Ok(Running { engine, thread, tokenizer, generation_config: m.generation_config })
    }
}
