//! The model and engine flags `generate` and `serve` share, and the one function that turns
//! them into a running engine.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ferrite_engine::config::GenerationConfig;
use ferrite_engine::engine::{spawn_engine, EngineConfig, EngineHandle};
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::loader::{load, LoadOptions};
use ferrite_engine::metrics::{CacheInfo, EngineMetrics};
use ferrite_engine::scheduler::SchedulerConfig;
use ferrite_engine::tokenizer::Tokenizer;
use ferrite_engine::{DType, Device};
use ferrite_server::metrics::Metrics;
use ferrite_server::validate::SamplingDefaults;
use ferrite_server::AppState;

use crate::registry::{DtypeArg, Registry};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// A models.toml entry name, a local model directory, or a Hugging Face repo id
    /// (org/name[@revision]). Default: the registry's `default` entry.
    #[arg(long)]
    pub model: Option<String>,
    /// The model registry (default: ./models.toml, else the one built in).
    #[arg(long, env = "FERRITE_MODELS_FILE")]
    pub models_file: Option<std::path::PathBuf>,
    /// Weights' dtype (default: the registry entry's, else auto: f32 on CPU).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Longest prompt + output (default: the registry entry's, else the model's
    /// max_position_embeddings).
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
    /// A Jinja chat template file replacing the model's (and the registry's).
    #[arg(long)]
    pub chat_template: Option<std::path::PathBuf>,
    /// Price of the device per hour, for cost figures (default: the registry entry's, else 0).
    #[arg(long)]
    pub device_cost_per_hour: Option<f64>,
}

/// A loaded model behind a running engine thread.
pub struct Running {
    pub engine: EngineHandle,
    pub thread: JoinHandle<()>,
    pub tokenizer: Arc<Tokenizer>,
    pub generation_config: GenerationConfig,
    /// The served model name: the override, else the registry entry's name or --model as given.
    pub name: String,
    pub sampling_defaults: SamplingDefaults,
    pub device_cost_per_hour: f64,
    /// Holds the engine's metrics; the server adds its own and exposes it.
    pub metrics_registry: prometheus::Registry,
    pub metrics: Arc<EngineMetrics>,
}

impl Running {
    /// The server's state over this engine: for `serve`, and for `batch`'s in-process router.
    pub fn app_state(
        &self,
        api_keys: Vec<String>,
        body_read_timeout: std::time::Duration,
    ) -> Result<AppState> {
        let metrics = Metrics::new(self.metrics_registry.clone(), Some(self.metrics.clone()))
            .context("registering the HTTP metrics")?;
        Ok(AppState {
            engine: self.engine.clone(),
            tokenizer: self.tokenizer.clone(),
            served_model_name: self.name.clone(),
            api_keys: Arc::new(api_keys),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            defaults: Arc::new(self.sampling_defaults.clone()),
            metrics: Arc::new(metrics),
            body_read_timeout,
        })
    }
}

impl EngineArgs {
    /// Loads the model and starts the engine; `max_waiting_requests` bounds its queue and
    /// `served_model_name` (default: the entry name or --model as given) labels its metrics.
    pub fn start(&self, max_waiting_requests: usize, served_model_name: Option<&str>) -> Result<Running> {
        let device = match self.device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => bail!("--device cuda: this build has no CUDA support yet (CPU only)"),
        };
        let registry = Registry::load(self.models_file.as_deref())?;
        let resolved = registry.resolve(self.model.as_deref())?;
        let entry = resolved.entry.clone();
        let dtype = match self.dtype.or(entry.as_ref().and_then(|e| e.dtype)).unwrap_or(DtypeArg::Auto) {
            DtypeArg::Auto => None,
            DtypeArg::F32 => Some(DType::F32),
            DtypeArg::F16 => Some(DType::F16),
            DtypeArg::Bf16 => Some(DType::BF16),
        };
        let device_cost_per_hour =
            self.device_cost_per_hour.or(entry.as_ref().and_then(|e| e.device_cost_per_hour)).unwrap_or(0.0);
        if !(device_cost_per_hour >= 0.0 && device_cost_per_hour.is_finite()) {
            bail!("--device-cost-per-hour must be a number >= 0, got {device_cost_per_hour}");
        }
        if self.block_size == 0
            || !(self.kv_cache_gib > 0.0 && self.kv_cache_gib.is_finite())
            || self.max_num_batched_tokens == 0
            || self.max_num_seqs == 0
        {
            bail!(
                "--block-size, --kv-cache-gib, --max-num-batched-tokens and --max-num-seqs must be positive"
            );
        }
        let source = resolved.model_arg();
        let what = if entry.is_some() {
            format!("model `{}` ({source}, from {})", resolved.name, registry.origin)
        } else {
            format!("model `{source}`")
        };
        let load_started = Instant::now();
        // Downloads show hf-hub's own bars; this spinner covers reading the weights (terminal only).
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message(format!("loading {what}"));
        spinner.enable_steady_tick(std::time::Duration::from_millis(120));
        let loaded = load(&source, &LoadOptions { dtype, device });
        spinner.finish_and_clear();
        let mut m = loaded.with_context(|| format!("loading {what}"))?;
        let load_seconds = load_started.elapsed().as_secs_f64();
        let template = match &self.chat_template {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --chat-template {}", path.display()))?,
            ),
            None => entry.as_ref().and_then(|e| e.chat_template.clone()),
        };
        if let Some(t) = template {
            m.tokenizer
                .set_chat_template(t)
                .with_context(|| format!("the chat template override for {what}"))?;
        }
        let spec = m.model.kv_cache_spec();
        let num_blocks = match self.kv_cache_blocks {
            Some(n) => n,
            None => {
                let bytes = (self.kv_cache_gib * (1u64 << 30) as f64) as usize;
                KvCache::num_blocks_for_bytes(&spec, self.block_size, bytes)
            }
        };
        let max_model_len = self
            .max_model_len
            .or(entry.as_ref().and_then(|e| e.max_model_len))
            .unwrap_or(m.config.max_position_embeddings);
        let name = served_model_name.map(str::to_string).unwrap_or(resolved.name);
        let metrics_registry = prometheus::Registry::new();
        let cache = CacheInfo {
            block_size: self.block_size,
            num_blocks,
            dtype: format!("{:?}", m.dtype).to_lowercase(),
            enable_prefix_caching: !self.no_prefix_caching,
        };
        let metrics = Arc::new(
            EngineMetrics::new(&metrics_registry, &name, max_model_len, &cache, device_cost_per_hour)
                .context("registering the engine's metrics")?,
        );
        let config = EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                block_size: self.block_size,
                num_blocks,
                enable_prefix_caching: !self.no_prefix_caching,
            },
            max_model_len,
            max_waiting_requests,
            metrics: Some(metrics.clone()),
        };
        let eos = m.eos_token_ids();
        let tokenizer = Arc::new(m.tokenizer);
        let spawn_started = Instant::now();
        let (engine, thread) = spawn_engine(m.model, tokenizer.clone(), eos, config)?;
        let cache_seconds = spawn_started.elapsed().as_secs_f64();
        metrics.record_startup_phase("load_weights", load_seconds);
        metrics.record_startup_phase("allocate_kv_cache", cache_seconds);
        tracing::info!(
            model = %name,
            load_weights_s = load_seconds,
            allocate_kv_cache_s = cache_seconds,
            kv_blocks = num_blocks,
            max_concurrent_tokens = num_blocks * self.block_size,
            "engine ready"
        );
        Ok(Running {
            engine,
            thread,
            tokenizer,
            generation_config: m.generation_config,
            name,
            sampling_defaults: entry.map(|e| e.sampling).unwrap_or_default(),
            device_cost_per_hour,
            metrics_registry,
            metrics,
        })
    }
}
