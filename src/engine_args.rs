//! The model and engine flags `generate` and `serve` share, turned into an [`EngineBuilder`]
//! and a [`ModelSpec`]: the engine crate opens the device, loads and starts.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferrite_engine::metrics::EngineMetrics;
use ferrite_engine::model::hf_config::GenerationConfig;
use ferrite_engine::model::loader::{Activations, Bf16Products, CpuWeights, KQuants};
use ferrite_engine::{
    CacheConfig, DType, DeviceChoice, EngineBuilder, EngineConfig, EngineHandle, KvCacheSize, MetricsSpec,
    ModelSpec, SchedulerConfig, SchedulingPolicy, Tokenizer,
};
use ferrite_server::validate::{RequestLimits, SamplingDefaults};
use ferrite_server::{AppState, Loaded, Served};

use crate::registry::{DtypeArg, Entry, QuantizeArg, Registry, Resolved};

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A models.toml entry name, a local model directory, or a Hugging Face repo id
    /// (org/name[@revision]). Default: the registry's entries marked `serve = true` for
    /// `serve`, else its `default` entry. `serve` takes it more than once to serve several
    /// models, each as `name=model` or by its entry name (or path / repo id as given).
    #[arg(long)]
    pub model: Vec<String>,
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
    /// Quantize the linear weights (and a tied embedding) into a GGUF block format at load, as
    /// a GGUF file of that type would hold them: a quarter (q8_0) to an eighth (q4_k) of f32's
    /// bytes. K-quant formats fall back to q5_0 / q5_1 / q8_0 for rows that are not multiples of
    /// 256, as llama.cpp's quantizer does.
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// On the CPU, multiply K-quant weights (Q4_K, Q5_K, Q6_K) in our f32 panels: the outputs of
    /// the dequantized weights up to f32 rounding, as Q8_0/Q5_0/Q4_0 already are. Without it
    /// they go through candle's kernels, which round activations to 8 bits (as llama.cpp does)
    /// and decode 15-25 % faster.
    #[arg(long)]
    pub exact_k_quants: bool,
    /// On CPUs with AVX-512 VNNI: round each block of 32 activations to int8 on one scale
    /// (max/127) before the block-format weights' products (Q8_0, Q5_0, Q4_0, and the K-quants
    /// under --exact-k-quants), as llama.cpp does, instead of keeping them to 2^-23 of the
    /// block's largest in three int8 limbs: one integer product where exact takes three, each
    /// activation off by up to 0.4 % of its block's largest (batch invariance holds). Offline
    /// and prefill about 1.5x on VNNI; AMX gives the same outputs without the saving yet.
    #[arg(long)]
    pub int8_activations: bool,
    /// On CPUs with AVX-512 BF16: round the activations to bf16 before the products of bf16
    /// weights (a bf16 checkpoint, or --weight-dtype bf16) and multiply them in pairs by
    /// vdpbf16ps instead of widening each weight to f32: each activation off by up to 2^-9 of
    /// itself (batch invariance holds). Prefill and offline faster where compute sets the pace.
    #[arg(long)]
    pub bf16_activations: bool,
    /// auto, cpu, cuda or cuda:N. Auto takes GPU 0 when this build has CUDA and a GPU is there.
    #[arg(long, default_value = "auto", env = "FERRITE_DEVICE")]
    pub device: DeviceChoice,
    /// On CUDA: the share of the card's memory ferrite may use; the KV cache gets what the
    /// weights and a maximal step's activations leave of it.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Longest prompt + output (default: the registry entry's, else the model's
    /// max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Memory for the KV cache on the CPU, GiB, each model's when several are served (on CUDA
    /// it is planned from --gpu-memory-utilization).
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
    /// Inter-token latency target: prompt tokens per step are capped so a step, decodes
    /// included, should take at most this long (learned from the steps run; prompts keep at
    /// least half of every step, so under overload a step runs over). Prompts then finish one or a
    /// few at a time, so first tokens do not wait for every queued prompt and streams are not
    /// stalled by a burst. 0: no target (the token budget alone). Default: 250 for `serve`
    /// (an interactive server), 0 for the offline commands (throughput first).
    #[arg(long, value_name = "MS")]
    pub max_itl_ms: Option<f64>,
    /// fcfs: first come, first served. priority: by each request's `priority` (lower first),
    /// then arrival; a better priority may preempt a worse one's KV blocks (outputs unchanged).
    /// deadline: by each request's deadline (`ttft_deadline_ms`, else `deadline_ms`; earliest
    /// first, none last), with the same preemption.
    #[arg(long, value_enum, default_value = "fcfs")]
    pub scheduling_policy: PolicyArg,
    /// Most `top_logprobs` / `logprobs` / `prompt_logprobs` a request may ask for.
    #[arg(long, default_value_t = EngineConfig::default().max_logprobs)]
    pub max_logprobs: usize,
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
    /// The tokenizer (and its chat template) of this model folder, repo id or GGUF file
    /// instead of the model's own: for a GGUF whose vocabulary ferrite cannot rebuild.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Price of the device per hour, for cost figures (default: the registry entry's, else 0).
    #[arg(long)]
    pub device_cost_per_hour: Option<f64>,
    /// The format this model writes tool calls in, for `tool_choice: "auto"` (default: the one
    /// its chat template shows: `<tool_call>` blocks are hermes, `[TOOL_CALLS]` mistral,
    /// `<|python_tag|>` or ipython with "parameters" llama3_json).
    #[arg(long, value_parser = ferrite_server::tools::Parser::NAMES)]
    pub tool_call_parser: Option<String>,
    /// Read chat answers for a `<think>…</think>` thinking and answer it as
    /// `reasoning_content` (qwen3 and deepseek_r1 read alike: whether the prompt opened the
    /// thinking is read from the prompt). A grammar then holds after the thinking.
    #[arg(long, value_parser = ferrite_server::reasoning::ReasoningParser::NAMES)]
    pub reasoning_parser: Option<String>,
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
    /// `--tool-call-parser`.
    pub tool_call_parser: Option<ferrite_server::tools::Parser>,
    /// `--reasoning-parser`.
    pub reasoning_parser: Option<ferrite_server::reasoning::ReasoningParser>,
    /// Weights plus KV cache, bytes.
    pub bytes: u64,
    /// Whether the model's CPU products of bf16 weights take bf16 activations.
    pub bf16_activations: bool,
}

impl Running {
    /// What the server's handlers need of this model.
    pub fn served(&self) -> Served {
        Served {
            engine: self.engine.clone(),
            tokenizer: self.tokenizer.clone(),
            name: self.name.clone(),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            defaults: Arc::new(self.sampling_defaults.clone()),
            tool_call_parser: self.tool_call_parser,
            reasoning_parser: self.reasoning_parser,
            metrics: Some((self.metrics.clone(), self.metrics_registry.clone())),
        }
    }

    /// The server's state over this one engine (`batch`'s in-process router).
    pub fn app_state(&self, request_limits: RequestLimits) -> AppState {
        AppState { request_limits, ..AppState::single(self.served()) }
    }

    /// As the model pool holds it: the model, its size, and how to stop it.
    pub fn into_loaded(self) -> Loaded {
        let served = self.served();
        let (engine, thread) = (self.engine, self.thread);
        let stop = Box::new(move || {
            engine.shutdown();
            let _ = thread.join();
        });
        Loaded { served, bytes: self.bytes, stop }
    }
}

/// One model to serve: the name clients use and what the registry resolved it to.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    pub name: String,
    pub resolved: Resolved,
    /// Where the registry came from, for messages.
    pub origin: String,
}

impl EngineArgs {
    /// The models `--model` names (`name=model` or a bare model each), else the registry's
    /// entries marked `serve = true` when `several` (serve), else its default entry.
    /// `served_model_name` renames a single model.
    pub fn model_choices(&self, several: bool, served_model_name: Option<&str>) -> Result<Vec<ModelChoice>> {
        let registry = Registry::load(self.models_file.as_deref())?;
        let origin = registry.origin.clone();
        if !several && self.model.len() > 1 {
            bail!("--model is given {} times; only `serve` serves several models", self.model.len());
        }
        let mut choices = Vec::new();
        for arg in &self.model {
            let (name, model) = split_named(arg);
            let resolved = registry.resolve(Some(model))?;
            let name = name.map(str::to_string).unwrap_or_else(|| resolved.name.clone());
            choices.push(ModelChoice { name, resolved, origin: origin.clone() });
        }
        if choices.is_empty() && several {
            for (name, entry) in registry.models.iter().filter(|(_, e)| e.serve) {
                let resolved = Resolved { name: name.clone(), entry: Some(entry.clone()) };
                choices.push(ModelChoice { name: name.clone(), resolved, origin: origin.clone() });
            }
        }
        if choices.is_empty() {
            let resolved = registry.resolve(None)?;
            choices.push(ModelChoice { name: resolved.name.clone(), resolved, origin });
        }
        match (served_model_name, choices.as_mut_slice()) {
            (Some(n), [one]) => one.name = n.to_string(),
            (Some(_), _) => {
                bail!("--served-model-name names one model; with several, name each as --model NAME=MODEL")
            }
            (None, _) => {}
        }
        for (i, c) in choices.iter().enumerate() {
            if choices[..i].iter().any(|d| d.name == c.name) {
                bail!("two models are served as `{}`; name them apart with --model NAME=MODEL", c.name);
            }
        }
        Ok(choices)
    }

    /// Loads the model and starts the engine; `max_waiting_requests` bounds its queue and
    /// `served_model_name` (default: the entry name or --model as given) labels its metrics.
    pub fn start(&self, max_waiting_requests: usize, served_model_name: Option<&str>) -> Result<Running> {
        let choices = self.model_choices(false, served_model_name)?;
        let choice = choices.into_iter().next().expect("invariant: model_choices gives at least one");
        self.start_model(&choice, max_waiting_requests, self.gpu_memory_utilization)
    }

    /// Loads one model and starts its engine, with `gpu_share` of a GPU's memory (the share
    /// of the card's whole memory this process may use by the end of this load).
    pub fn start_model(
        &self,
        choice: &ModelChoice,
        max_waiting_requests: usize,
        gpu_share: f64,
    ) -> Result<Running> {
        let resolved = &choice.resolved;
        let entry = resolved.entry.clone();
        let device_cost_per_hour =
            self.device_cost_per_hour.or(entry.as_ref().and_then(|e| e.device_cost_per_hour)).unwrap_or(0.0);
        if !(device_cost_per_hour >= 0.0 && device_cost_per_hour.is_finite()) {
            bail!("--device-cost-per-hour must be a number >= 0, got {device_cost_per_hour}");
        }
        if let Some(ms) = self.max_itl_ms.filter(|ms| !(*ms >= 0.0 && ms.is_finite())) {
            bail!("--max-itl-ms must be a number of milliseconds >= 0 (0: no target), got {ms}");
        }
        if let Some(d) = entry.as_ref().map(|e| &e.sampling) {
            let entry = &resolved.name;
            if d.priority.is_some_and(|p| p != 0) && self.scheduling_policy != PolicyArg::Priority {
                bail!("model `{entry}` sets a default priority, which only --scheduling-policy priority honours");
            }
            if d.max_cost_usd.is_some() && device_cost_per_hour <= 0.0 {
                bail!("model `{entry}` sets a default max_cost_usd, which needs a device price (--device-cost-per-hour)");
            }
        }
        let source = resolved.model_arg();
        let what = if entry.is_some() {
            format!("model `{}` ({source}, from {})", resolved.name, choice.origin)
        } else {
            format!("model `{source}`")
        };
        let spec = self.model_spec(source, entry.as_ref())?;
        let name = choice.name.clone();
        let metrics_registry = prometheus::Registry::new();
        let metrics = MetricsSpec { registry: &metrics_registry, model_name: &name, device_cost_per_hour };
        let builder = EngineBuilder::new(self.engine_config(max_waiting_requests), self.kv_cache(gpu_share)?);
        let started = with_spinner(&what, || builder.load(&spec, Some(metrics)))
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
            tool_call_parser: self
                .tool_call_parser
                .as_deref()
                .and_then(ferrite_server::tools::Parser::from_name),
            reasoning_parser: self
                .reasoning_parser
                .as_deref()
                .and_then(ferrite_server::reasoning::ReasoningParser::from_name),
            bytes: started.bytes,
            bf16_activations: started.bf16_activations,
        })
    }

    /// What `choice` is expected to take before it is loaded, bytes: its weight files plus
    /// the CPU's `--kv-cache-gib` (`None` for a repo id).
    pub fn estimated_bytes(&self, choice: &ModelChoice) -> Option<u64> {
        let kv = match self.kv_cache_blocks {
            Some(_) => 0,
            None => (self.kv_cache_gib * (1u64 << 30) as f64) as u64,
        };
        Some(self.weight_file_bytes(choice)? + kv)
    }

    /// The device price for `choice`: the flag, else its entry's, else 0.
    pub fn device_cost_per_hour(&self, choice: &ModelChoice) -> f64 {
        let entry = choice.resolved.entry.as_ref();
        self.device_cost_per_hour.or(entry.and_then(|e| e.device_cost_per_hour)).unwrap_or(0.0)
    }

    /// The bytes of `choice`'s weight files (safetensors or GGUF) in a local folder or file;
    /// `None` for a repo id.
    pub fn weight_file_bytes(&self, choice: &ModelChoice) -> Option<u64> {
        let source = choice.resolved.model_arg();
        let path = std::path::Path::new(&source);
        let weights = |p: &std::path::Path| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".safetensors") || name.ends_with(".gguf") {
                std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
            } else {
                0
            }
        };
        let files = if path.is_file() {
            weights(path)
        } else if path.is_dir() {
            std::fs::read_dir(path).ok()?.flatten().map(|e| weights(&e.path())).sum()
        } else {
            return None;
        };
        Some(files)
    }

    /// What to load and how: the flags, else the registry entry's values.
    fn model_spec(&self, source: String, entry: Option<&Entry>) -> Result<ModelSpec> {
        let dtype = match self.dtype.or(entry.and_then(|e| e.dtype)).unwrap_or(DtypeArg::Auto) {
            DtypeArg::Auto => None,
            DtypeArg::F32 => Some(DType::F32),
            DtypeArg::F16 => Some(DType::F16),
            DtypeArg::Bf16 => Some(DType::BF16),
        };
        let cpu_weights = match self.weight_dtype {
            DtypeArg::Auto => CpuWeights::AsStored,
            DtypeArg::F32 => CpuWeights::Cast(DType::F32),
            DtypeArg::F16 => CpuWeights::Cast(DType::F16),
            DtypeArg::Bf16 => CpuWeights::Cast(DType::BF16),
        };
        let chat_template = match &self.chat_template {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --chat-template {}", path.display()))?,
            ),
            None => entry.and_then(|e| e.chat_template.clone()),
        };
        Ok(ModelSpec {
            source,
            device: self.device,
            dtype,
            cpu_weights,
            quantize: self.quantize.or(entry.and_then(|e| e.quantize)).map(QuantizeArg::engine),
            k_quants: if self.exact_k_quants { KQuants::Exact } else { KQuants::Rounded },
            activations: if self.int8_activations { Activations::Int8 } else { Activations::Exact },
            bf16_products: if self.bf16_activations { Bf16Products::Dots } else { Bf16Products::Widened },
            tokenizer: self.tokenizer.clone(),
            chat_template,
            max_model_len: self.max_model_len.or(entry.and_then(|e| e.max_model_len)),
        })
    }

    /// The KV cache's size: `--kv-cache-blocks`, else `gpu_share` of a GPU, else
    /// `--kv-cache-gib`.
    fn kv_cache(&self, gpu_share: f64) -> Result<KvCacheSize> {
        if !(self.kv_cache_gib > 0.0 && self.kv_cache_gib.is_finite()) {
            bail!("--kv-cache-gib must be a positive number, got {}", self.kv_cache_gib);
        }
        Ok(match self.kv_cache_blocks {
            Some(n) => KvCacheSize::Blocks(n),
            None => KvCacheSize::ByDevice {
                gpu_share,
                cpu_bytes: (self.kv_cache_gib * (1u64 << 30) as f64) as usize,
            },
        })
    }

    /// Everything but `max_model_len` (the model spec's) and the cache's size (the plan's).
    fn engine_config(&self, max_waiting_requests: usize) -> EngineConfig {
        EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                policy: match self.scheduling_policy {
                    PolicyArg::Fcfs => SchedulingPolicy::Fcfs,
                    PolicyArg::Priority => SchedulingPolicy::Priority,
                    PolicyArg::Deadline => SchedulingPolicy::Deadline,
                },
                max_itl: self.max_itl_ms.filter(|&ms| ms > 0.0).map(|ms| ms / 1e3),
            },
            cache: CacheConfig {
                block_size: self.block_size,
                enable_prefix_caching: !self.no_prefix_caching,
                ..CacheConfig::default()
            },
            max_waiting_requests,
            enforce_eager: self.enforce_eager,
            max_logprobs: self.max_logprobs,
            ..EngineConfig::default()
        }
    }
}

/// Downloads show hf-hub's own bars; this spinner covers reading the weights, planning the
/// cache and warming up (terminal only).
fn with_spinner<T>(what: &str, work: impl FnOnce() -> T) -> T {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("loading {what}"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let out = work();
    spinner.finish_and_clear();
    out
}

/// `--scheduling-policy` (vLLM's names, and ferrite's `deadline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    Fcfs,
    Priority,
    Deadline,
}

/// `--model name=model` → (`name`, `model`); a bare model → (`None`, it). A name is what the
/// registry allows (no `/` or `@`), so a path or repo id with `=` further on stays whole.
fn split_named(arg: &str) -> (Option<&str>, &str) {
    match arg.split_once('=') {
        Some((name, model))
            if !name.is_empty()
                && !model.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')) =>
        {
            (Some(name), model)
        }
        _ => (None, arg),
    }
}

/// Each model's share of a GPU, from `util` (`--gpu-memory-utilization`) in proportion to its
/// expected size: over all models when all are loaded at once, over the largest
/// `max_loaded` when at most that many are (any of them then fit together). Unknown sizes
/// count as the mean of the known (or alike when none is known).
pub fn gpu_shares(util: f64, sizes: &[Option<u64>], max_loaded: Option<usize>) -> Vec<f64> {
    let known: Vec<f64> = sizes.iter().flatten().map(|&b| b as f64).collect();
    let mean = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
    let sizes: Vec<f64> = sizes.iter().map(|s| s.map_or(mean, |b| (b as f64).max(1.0))).collect();
    let mut largest = sizes.clone();
    largest.sort_by(|a, b| b.total_cmp(a));
    let together: f64 = largest.iter().take(max_loaded.unwrap_or(sizes.len()).max(1)).sum();
    sizes.iter().map(|s| util * s / together).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_prefix_is_split_off_and_paths_stay_whole() {
        assert_eq!(split_named("chat=qwen3-0.6b"), (Some("chat"), "qwen3-0.6b"));
        assert_eq!(split_named("qwen3-0.6b"), (None, "qwen3-0.6b"));
        assert_eq!(split_named("./dir/a=b"), (None, "./dir/a=b"));
        assert_eq!(split_named("org/name@rev=x"), (None, "org/name@rev=x"));
        assert_eq!(split_named("=x"), (None, "=x"));
        assert_eq!(split_named("name="), (None, "name="));
    }

    fn args(flags: &[&str]) -> EngineArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            engine: EngineArgs,
        }
        <Cli as clap::Parser>::parse_from(std::iter::once("ferrite").chain(flags.iter().copied())).engine
    }

    #[test]
    fn serve_takes_the_entries_marked_to_serve_unless_models_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("models.toml");
        std::fs::write(
            &file,
            "default = \"one\"\n[models.one]\npath = \"a\"\n[models.two]\npath = \"b\"\nserve = true\n[models.three]\npath = \"c\"\nserve = true\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let names = |flags: &[&str], several: bool| -> Vec<String> {
            let a = args(&[&["--models-file", file], flags].concat());
            a.model_choices(several, None).unwrap().into_iter().map(|c| c.name).collect()
        };
        // A BTreeMap: entries in name order.
        assert_eq!(names(&[], true), ["three", "two"]);
        assert_eq!(names(&[], false), ["one"]);
        assert_eq!(names(&["--model", "x=two", "--model", "one"], true), ["x", "one"]);
        let a = args(&["--models-file", file, "--model", "one", "--model", "two"]);
        let err = a.model_choices(false, None).unwrap_err().to_string();
        assert!(err.contains("only `serve` serves several models"), "{err}");
        let err = a.model_choices(true, Some("n")).unwrap_err().to_string();
        assert!(err.contains("--served-model-name names one model"), "{err}");
        let a = args(&["--models-file", file, "--model", "two", "--model", "two"]);
        let err = a.model_choices(true, None).unwrap_err().to_string();
        assert!(err.contains("two models are served as `two`"), "{err}");
    }

    #[test]
    fn gpu_shares_split_in_proportion_and_fit_together() {
        let gib = 1u64 << 30;
        // All loaded at once: 1 and 3 GiB share 0.8 as 0.2 and 0.6.
        let s = gpu_shares(0.8, &[Some(gib), Some(3 * gib)], None);
        assert!((s[0] - 0.2).abs() < 1e-12 && (s[1] - 0.6).abs() < 1e-12, "{s:?}");
        // One at a time: each may take all of it... scaled by the largest.
        let s = gpu_shares(0.8, &[Some(gib), Some(3 * gib), Some(2 * gib)], Some(1));
        assert!((s[1] - 0.8).abs() < 1e-12, "{s:?}");
        // Any two of three together stay within 0.8.
        let s = gpu_shares(0.8, &[Some(gib), Some(3 * gib), Some(2 * gib)], Some(2));
        assert!((s[1] + s[2] - 0.8).abs() < 1e-12, "{s:?}");
        // An unknown size counts as the mean of the known.
        let s = gpu_shares(0.9, &[Some(gib), None, Some(3 * gib)], None);
        assert!((s[1] - 0.3).abs() < 1e-12, "{s:?}");
    }
}
