//! From a model source to a running engine: the device ([`DeviceChoice`]), the model loaded
//! on it ([`ModelSpec`]: dtype, chat template, context length), the KV cache's size (planned
//! from a GPU's memory, a CPU's byte budget, or a block count), the engine's metrics, the
//! thread. The plan made here is the one owner of the cache's facts ([`crate::CacheConfig`]:
//! `block_size`, `num_blocks`): the scheduler, the cache, the metrics and
//! [`crate::EngineInfo`] read them from the config it hands on.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device};

use crate::device::DeviceChoice;
use crate::engine::{spawn_engine, EngineConfig};
use crate::error::{EngineError, Result};
use crate::handle::EngineHandle;
use crate::kv_cache::KvCache;
use crate::memory;
use crate::metrics::EngineMetrics;
use crate::model::arch::CpuWeights;
use crate::model::hf_config::GenerationConfig;
use crate::model::loader::{load, Activations, Bf16Products, KQuants, LoadOptions, LoadedModel, Quantize};
use crate::model::tokenizer::Tokenizer;

/// How big the KV cache is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheSize {
    /// Exactly this many blocks.
    Blocks(usize),
    /// As many blocks as fit in this many bytes (a CPU's budget).
    Bytes(usize),
    /// On CUDA: this share of the card's memory, less what the weights and one maximal step's
    /// activations take (vLLM's `gpu_memory_utilization`), profiled at start-up.
    DeviceShare(f64),
    /// `DeviceShare(gpu_share)` when the model is on a GPU, else `Bytes(cpu_bytes)`: for a
    /// caller that leaves the device to [`DeviceChoice::Auto`].
    ByDevice { gpu_share: f64, cpu_bytes: usize },
}

/// What [`EngineBuilder::load`] loads, where, and how.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    /// A local model directory or a Hugging Face repo id (`org/name[@revision]`).
    pub source: String,
    pub device: DeviceChoice,
    /// The compute dtype (activations, KV cache). `None`: bf16 on CUDA; on the CPU f32, with
    /// the linear weights as `cpu_weights` says.
    pub dtype: Option<DType>,
    /// On the CPU computing in f32: the linear weights' dtype (an error anywhere else, unless
    /// left as stored).
    pub cpu_weights: CpuWeights,
    /// Quantize the linear weights into this block format at load (`--quantize`).
    pub quantize: Option<Quantize>,
    /// How K-quant weights multiply on the CPU (`--exact-k-quants`).
    pub k_quants: KQuants,
    /// How the CPU's int8 products take their activations (`--int8-activations`).
    pub activations: Activations,
    /// How bf16 weights multiply on the CPU (`--bf16-activations`).
    pub bf16_products: Bf16Products,
    /// Another model's tokenizer (a folder, repo id or GGUF file; `--tokenizer`).
    pub tokenizer: Option<String>,
    /// A Jinja chat template replacing the model's.
    pub chat_template: Option<String>,
    /// Longest prompt + output; `None`: the model's `max_position_embeddings`. Replaces the
    /// config's `max_model_len`.
    pub max_model_len: Option<usize>,
}

impl ModelSpec {
    pub fn new(source: impl Into<String>) -> Self {
        Self { source: source.into(), ..Self::default() }
    }

    /// The loader's options on `device`: the dtype resolved, the weights' dtype checked.
    fn load_options(&self, device: Device) -> Result<LoadOptions> {
        let dtype = match self.dtype {
            None if device.is_cuda() => Some(DType::BF16),
            dtype => dtype,
        };
        let computes_in_f32 = device.is_cpu() && dtype.is_none_or(|d| d == DType::F32);
        if self.cpu_weights != CpuWeights::AsStored && !computes_in_f32 {
            return Err(EngineError::Config(format!(
                "a weight dtype (--weight-dtype) applies on the CPU computing in f32, but this model computes in {} on {}: there the weights are held in the compute dtype",
                dtype.map_or("f32".to_string(), |d| format!("{d:?}").to_lowercase()),
                if device.is_cpu() { "the CPU" } else { "CUDA" }
            )));
        }
        Ok(LoadOptions {
            dtype,
            device,
            cpu_weights: self.cpu_weights,
            quantize: self.quantize,
            k_quants: self.k_quants,
            activations: self.activations,
            bf16_products: self.bf16_products,
            tokenizer: self.tokenizer.clone(),
            max_model_len: self.max_model_len,
        })
    }
}

/// Where the engine reports, under which model name, at what price per device hour.
pub struct MetricsSpec<'a> {
    pub registry: &'a prometheus::Registry,
    pub model_name: &'a str,
    pub device_cost_per_hour: f64,
}

/// What a running engine comes with.
pub struct StartedEngine {
    pub handle: EngineHandle,
    pub thread: JoinHandle<()>,
    pub tokenizer: Arc<Tokenizer>,
    pub generation_config: GenerationConfig,
    pub metrics: Option<Arc<EngineMetrics>>,
    /// What the engine holds on its device: weights plus KV cache, bytes.
    pub bytes: u64,
    /// Whether the model's CPU products of bf16 weights take bf16 activations.
    pub bf16_activations: bool,
}

/// Builds an engine: `config` says everything but the cache's size (its `num_blocks` is
/// replaced by the plan), `kv_cache` how to size it.
pub struct EngineBuilder {
    pub config: EngineConfig,
    pub kv_cache: KvCacheSize,
}

impl EngineBuilder {
    pub fn new(config: EngineConfig, kv_cache: KvCacheSize) -> Self {
        Self { config, kv_cache }
    }

    /// Opens the device, loads the model on it, applies the spec's overrides and starts the
    /// engine ([`Self::start`]).
    pub fn load(mut self, spec: &ModelSpec, metrics: Option<MetricsSpec<'_>>) -> Result<StartedEngine> {
        let (device, note) = spec.device.open()?;
        tracing::info!("device: {note}");
        if device.is_cpu() {
            // Which tiles the products run (FERRITE_SIMD caps it): figures depend on it.
            tracing::info!("CPU kernels: {}", crate::ops::simd::level().name());
        }
        if spec.activations == Activations::Int8 && !(device.is_cpu() && crate::ops::blocks::int8_products())
        {
            tracing::warn!(
                "--int8-activations applies to the CPU's int8 products (AVX-512 VNNI, level avx512-vnni or amx); here ({}) activations stay exact",
                if device.is_cpu() { crate::ops::simd::level().name() } else { "CUDA" }
            );
        }
        let options = spec.load_options(device)?;
        let load_started = Instant::now();
        let mut m = load(&spec.source, &options)?;
        // Asked of the loaded model, so every reason it could not apply is covered at once.
        if spec.bf16_products == Bf16Products::Dots {
            if m.model.bf16_activations() {
                tracing::info!("CPU: bf16 weights multiply on vdpbf16ps, activations rounded to bf16 (--bf16-activations)");
            } else {
                tracing::warn!(
                    "--bf16-activations did not apply: it takes bf16 linear weights (a bf16 checkpoint, or --weight-dtype bf16, not quantized), f32 compute on the CPU, and AVX-512 BF16 at a level of AVX-512 (here: {}); the products are as without it",
                    if m.model.device().is_cpu() { crate::ops::simd::level().name() } else { "CUDA" }
                );
            }
        }
        let load_seconds = load_started.elapsed().as_secs_f64();
        if let Some(template) = &spec.chat_template {
            m.tokenizer.set_chat_template(template.clone())?;
        }
        self.config.max_model_len = spec.max_model_len.unwrap_or(m.config.max_position_embeddings);
        self.start(m, metrics, load_seconds)
    }

    /// Sizes the cache for `m`, registers the metrics (when `metrics` says where) and starts
    /// the engine thread. `load_seconds` is reported as the start-up phase `load_weights`.
    pub fn start(
        self,
        m: LoadedModel,
        metrics: Option<MetricsSpec<'_>>,
        load_seconds: f64,
    ) -> Result<StartedEngine> {
        let mut config = self.config;
        check(&config, self.kv_cache)?;
        let model_name = metrics.as_ref().map_or_else(String::new, |spec| spec.model_name.to_string());
        config.cache.num_blocks = plan_blocks(&m, &config, self.kv_cache)?;
        let cache = config.cache;
        let metrics = match metrics {
            None => None,
            Some(spec) => {
                let dtype = format!("{:?}", m.dtype).to_lowercase();
                let registered = EngineMetrics::new(
                    spec.registry,
                    spec.model_name,
                    config.max_model_len,
                    &cache,
                    &dtype,
                    spec.device_cost_per_hour,
                )
                .map_err(|e| EngineError::Config(format!("registering the engine's metrics: {e}")))?;
                Some(Arc::new(registered))
            }
        };
        config.metrics = metrics.clone();
        match &m.pooling {
            Ok(p) => tracing::info!("embeddings: {}", p.source),
            Err(why) => tracing::info!("no embeddings: {why}"),
        }
        config.pooling = m.pooling.clone();
        let eos = m.eos_token_ids();
        let weight_bytes = m.model.weight_bytes();
        let bf16_activations = m.model.bf16_activations();
        let kv_cache_bytes = m.model.kv_cache_spec().bytes_per_token() * cache.num_tokens();
        let tokenizer = Arc::new(m.tokenizer);
        let max_itl_ms = config.scheduler.max_itl.map(|s| s * 1e3);
        let spawn_started = Instant::now();
        let (handle, thread) = spawn_engine(m.model, tokenizer.clone(), eos, config)?;
        let cache_seconds = spawn_started.elapsed().as_secs_f64();
        if let Some(m) = &metrics {
            m.record_startup_phase("load_weights", load_seconds);
            m.record_startup_phase("allocate_kv_cache", cache_seconds);
        }
        tracing::info!(
            model = %model_name,
            load_weights_s = load_seconds,
            allocate_kv_cache_s = cache_seconds,
            weights_mb = weight_bytes as f64 / 1e6,
            kv_blocks = cache.num_blocks,
            max_concurrent_tokens = cache.num_tokens(),
            max_itl_ms = ?max_itl_ms,
            "engine ready"
        );
        let bytes = (weight_bytes + kv_cache_bytes) as u64;
        Ok(StartedEngine {
            handle,
            thread,
            tokenizer,
            generation_config: m.generation_config,
            metrics,
            bytes,
            bf16_activations,
        })
    }
}

/// Every count the engine divides or allocates by is positive; a share of memory is a share.
fn check(config: &EngineConfig, kv_cache: KvCacheSize) -> Result<()> {
    let s = &config.scheduler;
    for (name, value) in [
        ("block_size", config.cache.block_size),
        ("max_num_batched_tokens", s.max_num_batched_tokens),
        ("max_num_seqs", s.max_num_seqs),
        ("max_model_len", config.max_model_len),
    ] {
        if value == 0 {
            return Err(EngineError::Config(format!("{name} must be at least 1, got 0")));
        }
    }
    match kv_cache {
        KvCacheSize::Bytes(0) | KvCacheSize::Blocks(0) => {
            Err(EngineError::Config("the KV cache must have room for at least one block".into()))
        }
        KvCacheSize::DeviceShare(u) | KvCacheSize::ByDevice { gpu_share: u, .. }
            if !(u > 0.0 && u <= 1.0) =>
        {
            Err(EngineError::Config(format!("gpu_memory_utilization must be in (0, 1], got {u}")))
        }
        KvCacheSize::ByDevice { cpu_bytes: 0, .. } => {
            Err(EngineError::Config("the KV cache must have room for at least one block".into()))
        }
        _ => Ok(()),
    }
}

/// The cache's blocks: as given, as many as the bytes hold, or what a GPU has left after the
/// weights and a profiled maximal step.
fn plan_blocks(m: &LoadedModel, config: &EngineConfig, kv_cache: KvCacheSize) -> Result<usize> {
    let spec = m.model.kv_cache_spec();
    let block_size = config.cache.block_size;
    match kv_cache {
        KvCacheSize::Blocks(n) => Ok(n),
        KvCacheSize::ByDevice { gpu_share, cpu_bytes } => {
            let size = match m.model.device().is_cuda() {
                true => KvCacheSize::DeviceShare(gpu_share),
                false => KvCacheSize::Bytes(cpu_bytes),
            };
            plan_blocks(m, config, size)
        }
        KvCacheSize::Bytes(bytes) => Ok(KvCache::num_blocks_for_bytes(&spec, block_size, bytes)),
        KvCacheSize::DeviceShare(utilization) => {
            let step = config.scheduler.max_num_batched_tokens;
            let measured = memory::measure(m.model.as_ref(), block_size, step).map_err(|e| {
                EngineError::Config(format!("profiling a maximal step for GPU memory planning: {e}"))
            })?;
            let longest = config.max_model_len.div_ceil(block_size);
            let plan = memory::plan_from(measured, utilization, &spec, block_size, longest)
                .map_err(EngineError::Config)?;
            tracing::info!("GPU memory plan: {plan}");
            Ok(plan.num_blocks)
        }
    }
}
