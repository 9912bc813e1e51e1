//! The model and engine flags `generate` and `serve` share, and the one function that turns
//! them into a running engine.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrite_engine::metrics::EngineMetrics;
use ferrite_engine::model::hf_config::GenerationConfig;
use ferrite_engine::model::loader::CpuWeights;
use ferrite_engine::{
    load, CacheConfig, DType, Device, EngineBuilder, EngineConfig, EngineHandle, KvCacheSize, LoadOptions,
    LoadedModel, MetricsSpec, SchedulerConfig, Tokenizer,
};
use ferrite_server::metrics::Metrics;
use ferrite_server::validate::SamplingDefaults;
use ferrite_server::AppState;

use crate::registry::{DtypeArg, Registry};

/// `--device`: `auto` (a GPU when this build has CUDA and one is present, else the CPU),
/// `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, got `{s}`")),
        }
    }
}

impl DeviceArg {
    /// The device, and a line saying which and why.
    fn open(self) -> Result<(Device, String)> {
        match self {
            Self::Cpu => Ok((Device::Cpu, "CPU (--device cpu)".into())),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!("--device cuda:{n}: this binary was built without the `cuda` feature (scripts/cuda-build.sh builds it)");
                }
                let device =
                    ferrite_engine::device::open_cuda(n).with_context(|| format!("--device cuda:{n}"))?;
                Ok((device, format!("CUDA device {n}")))
            }
            Self::Auto if !cfg!(feature = "cuda") => Ok((Device::Cpu, "CPU (this build has no CUDA)".into())),
            Self::Auto => match ferrite_engine::device::open_cuda(0) {
                Ok(device) => Ok((device, "CUDA device 0 (auto)".into())),
                Err(e) => {
                    let why = e.to_string();
                    let why = why.lines().next().unwrap_or_default();
                    Ok((Device::Cpu, format!("CPU (no usable GPU: {why})")))
                }
            },
        }
    }
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
    /// Compute dtype: activations, KV cache, and the weights except as --weight-dtype says
    /// (default: the registry entry's, else auto: f32 on CPU, bf16 on CUDA).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// On the CPU computing in f32: the dtype of the linear layers' weights and the embedding
    /// table. auto keeps each as the checkpoint stores it (a bf16 checkpoint stays bf16: half
    /// the bytes a decode step reads, and the same outputs as widening it); bf16 or f16 rounds
    /// an f32 checkpoint to halve them (f16 also overflows bf16 values past 65504).
    #[arg(long, value_enum, default_value = "auto")]
    pub weight_dtype: DtypeArg,
    /// auto, cpu, cuda or cuda:N. Auto takes GPU 0 when this build has CUDA and a GPU is there.
    #[arg(long, default_value = "auto", env = "FERRITE_DEVICE")]
    pub device: DeviceArg,
    /// On CUDA: the share of the card's memory ferrite may use; the KV cache gets what the
    /// weights and a maximal step's activations leave of it.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Longest prompt + output (default: the registry entry's, else the model's
    /// max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Memory for the KV cache on the CPU, GiB (on CUDA it is planned from
    /// --gpu-memory-utilization).
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
    /// On a GPU, run every step eagerly: no CUDA graphs of decode steps (which replay a whole
    /// decode pass in one launch; captured as batch sizes first occur).
    #[arg(long)]
    pub enforce_eager: bool,
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
        let (device, device_note) = self.device.open()?;
        tracing::info!("device: {device_note}");
        let kv_cache = self.kv_cache(&device)?;
        let registry = Registry::load(self.models_file.as_deref())?;
        let resolved = registry.resolve(self.model.as_deref())?;
        let entry = resolved.entry.clone();
        let device_cost_per_hour =
            self.device_cost_per_hour.or(entry.as_ref().and_then(|e| e.device_cost_per_hour)).unwrap_or(0.0);
        if !(device_cost_per_hour >= 0.0 && device_cost_per_hour.is_finite()) {
            bail!("--device-cost-per-hour must be a number >= 0, got {device_cost_per_hour}");
        }
        let source = resolved.model_arg();
        let what = if entry.is_some() {
            format!("model `{}` ({source}, from {})", resolved.name, registry.origin)
        } else {
            format!("model `{source}`")
        };
        let load_started = Instant::now();
        let options = self.load_options(device, entry.as_ref().and_then(|e| e.dtype))?;
        let mut m = load_with_spinner(&source, &what, &options)?;
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
        let max_model_len = self
            .max_model_len
            .or(entry.as_ref().and_then(|e| e.max_model_len))
            .unwrap_or(m.config.max_position_embeddings);
        let name = served_model_name.map(str::to_string).unwrap_or(resolved.name);
        let metrics_registry = prometheus::Registry::new();
        let spec = MetricsSpec { registry: &metrics_registry, model_name: &name, device_cost_per_hour };
        let builder = EngineBuilder::new(self.engine_config(max_model_len, max_waiting_requests), kv_cache);
        let started = builder
            .start(m, Some(spec), load_seconds)
            .with_context(|| format!("starting the engine for {what}"))?;
        let metrics = started.metrics.expect("invariant: the builder registers the metrics it is given");
        Ok(Running {
            engine: started.handle,
            thread: started.thread,
            tokenizer: started.tokenizer,
            generation_config: started.generation_config,
            name,
            sampling_defaults: entry.map(|e| e.sampling).unwrap_or_default(),
            device_cost_per_hour,
            metrics_registry,
            metrics,
        })
    }

    /// `--dtype` (else the registry entry's, else auto: bf16 on CUDA, the checkpoint's f32 path
    /// on the CPU) and `--weight-dtype`, checked against each other and the device.
    fn load_options(&self, device: Device, entry_dtype: Option<DtypeArg>) -> Result<LoadOptions> {
        let dtype = match self.dtype.or(entry_dtype).unwrap_or(DtypeArg::Auto) {
            DtypeArg::Auto if device.is_cuda() => Some(DType::BF16),
            DtypeArg::Auto => None,
            DtypeArg::F32 => Some(DType::F32),
            DtypeArg::F16 => Some(DType::F16),
            DtypeArg::Bf16 => Some(DType::BF16),
        };
        let cpu_weights = match self.weight_dtype {
            DtypeArg::Auto => CpuWeights::AsStored,
            _ if !device.is_cpu() || dtype.is_some_and(|d| d != DType::F32) => bail!(
                "--weight-dtype applies on the CPU computing in f32, but this model computes in {} on {}: there the weights are held in the compute dtype (set it with --dtype)",
                dtype.map_or("f32".to_string(), |d| format!("{d:?}").to_lowercase()),
                if device.is_cpu() { "the CPU" } else { "CUDA" }
            ),
            DtypeArg::F32 => CpuWeights::Cast(DType::F32),
            DtypeArg::F16 => CpuWeights::Cast(DType::F16),
            DtypeArg::Bf16 => CpuWeights::Cast(DType::BF16),
        };
        Ok(LoadOptions { dtype, device, cpu_weights })
    }

    /// The KV cache's size: `--kv-cache-blocks`, else a share of a GPU, else `--kv-cache-gib`.
    fn kv_cache(&self, device: &Device) -> Result<KvCacheSize> {
        if !(self.kv_cache_gib > 0.0 && self.kv_cache_gib.is_finite()) {
            bail!("--kv-cache-gib must be a positive number, got {}", self.kv_cache_gib);
        }
        Ok(match self.kv_cache_blocks {
            Some(n) => KvCacheSize::Blocks(n),
            None if device.is_cuda() => KvCacheSize::DeviceShare(self.gpu_memory_utilization),
            None => KvCacheSize::Bytes((self.kv_cache_gib * (1u64 << 30) as f64) as usize),
        })
    }

    fn engine_config(&self, max_model_len: usize, max_waiting_requests: usize) -> EngineConfig {
        EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            },
            cache: CacheConfig {
                block_size: self.block_size,
                enable_prefix_caching: !self.no_prefix_caching,
                ..CacheConfig::default()
            },
            max_model_len,
            max_waiting_requests,
            enforce_eager: self.enforce_eager,
            ..EngineConfig::default()
        }
    }
}

/// Downloads show hf-hub's own bars; this spinner covers reading the weights (terminal only).
fn load_with_spinner(source: &str, what: &str, options: &LoadOptions) -> Result<LoadedModel> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {what}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let loaded = load(source, options);
    spinner.finish_and_clear();
    loaded.with_context(|| format!("loading {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("auto".parse::<DeviceArg>(), Ok(DeviceArg::Auto));
        assert_eq!("cpu".parse::<DeviceArg>(), Ok(DeviceArg::Cpu));
        assert_eq!("cuda".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceArg>(), Ok(DeviceArg::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let err = bad.parse::<DeviceArg>().unwrap_err();
            assert!(err.contains("cuda:N") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn without_cuda_auto_is_the_cpu_and_cuda_is_a_clear_error() {
        if cfg!(feature = "cuda") {
            use std::io::Write;
            return writeln!(std::io::stderr(), "skipped: this build has CUDA").unwrap_or(());
        }
        let (device, note) = DeviceArg::Auto.open().unwrap();
        assert!(device.is_cpu() && note.contains("no CUDA"), "{note}");
        let err = DeviceArg::Cuda(1).open().unwrap_err().to_string();
        assert!(err.contains("cuda:1") && err.contains("`cuda` feature"), "{err}");
    }
}
