//! Loading a model: resolve `--model` (a local directory or a Hugging Face repo id) to files,
//! read the configs and tokenizer, and map the safetensors weights (one file, or shards listed
//! by `model.safetensors.index.json`) into the decoder.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::LoadError;
pub use crate::model::arch::CpuWeights;
use crate::model::arch::{build_model, LinearWeights, Model};
use crate::model::hf_config::{read_file, GenerationConfig, ModelConfig, RopeScaling};
use crate::model::hub::{HubRepo, HubSettings, RepoId};
use crate::model::tokenizer::{Tokenizer, TokenizerConfig};
pub use crate::ops::packed::Bf16Products;
use crate::ops::quantized::format_name;
use crate::ops::quantized::CpuProducts;
pub use crate::ops::quantized::{Activations, KQuants, Quantize};
use crate::pooling::{read_pooling, Pooling};
use candle_core::quantized::GgmlDType;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(RepoId),
}

impl ModelSource {
    /// An existing directory is local; `org/name[@rev]` that is not a directory is a hub repo.
    pub fn parse(s: &str) -> Result<Self, LoadError> {
        let path = Path::new(s);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let looks_like_path = s.starts_with('/') || s.starts_with('.') || s.starts_with('~');
        match RepoId::parse(s) {
            Some(id) if !looks_like_path => Ok(Self::Hub(id)),
            _ if looks_like_path || path.exists() => {
                Err(LoadError::Io { path: path.to_path_buf(), message: "not a directory".into() })
            }
            _ => Err(LoadError::BadSource(s.to_string())),
        }
    }
}

/// The files of one model, all local.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// For messages: the directory or the repo and revision.
    pub location: String,
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub weights: Vec<PathBuf>,
    /// sentence-transformers' `modules.json` and its pooling module's `config.json`, where the
    /// checkpoint is an embedding model.
    pub modules: Option<PathBuf>,
    pub pooling_config: Option<PathBuf>,
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const MODULES: &str = "modules.json";

/// Where `modules.json` says the pooling module's `config.json` is (`1_Pooling/config.json` as
/// a rule), relative to the checkpoint.
fn pooling_config_path(modules: &Path) -> Result<Option<String>, LoadError> {
    Ok(Pooling::pooling_dir(&read_file(modules)?)
        .map(|dir| format!("{}/config.json", dir.trim_end_matches('/'))))
}

/// Shard file names listed in an index's `weight_map`, each once, sorted.
fn shard_names(index: &Path) -> Result<Vec<String>, LoadError> {
    let v: serde_json::Value = serde_json::from_str(&read_file(index)?)
        .map_err(|e| LoadError::Json { path: index.to_path_buf(), message: e.to_string() })?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LoadError::Config {
        path: index.to_path_buf(),
        message: "no `weight_map` object".into(),
    })?;
    let names: BTreeSet<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
    if names.is_empty() {
        return Err(LoadError::Config { path: index.to_path_buf(), message: "`weight_map` is empty".into() });
    }
    Ok(names.into_iter().collect())
}

impl ModelFiles {
    pub fn resolve(source: &ModelSource) -> Result<Self, LoadError> {
        match source {
            ModelSource::Local(dir) => Self::from_dir(dir),
            ModelSource::Hub(id) => Self::from_hub(&HubRepo::new(id.clone(), HubSettings::from_env())),
        }
    }

    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let location = dir.display().to_string();
        let missing =
            |file: &str| LoadError::MissingFile { file: file.to_string(), location: location.clone() };
        let required = |file: &str| {
            let p = dir.join(file);
            if p.is_file() {
                Ok(p)
            } else {
                Err(missing(file))
            }
        };
        let optional = |file: &str| Some(dir.join(file)).filter(|p| p.is_file());
        let weights = if let Some(index) = optional(INDEX) {
            shard_names(&index)?.iter().map(|s| required(s)).collect::<Result<_, _>>()?
        } else if let Some(single) = optional(SINGLE) {
            vec![single]
        } else {
            return Err(missing(&format!("{SINGLE} (or {INDEX})")));
        };
        let modules = optional(MODULES);
        let pooling_config = match &modules {
            Some(m) => pooling_config_path(m)?.and_then(|p| optional(&p)),
            None => None,
        };
        Ok(Self {
            config: required("config.json")?,
            generation_config: optional("generation_config.json"),
            tokenizer: required("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json"),
            weights,
            modules,
            pooling_config,
            location,
        })
    }

    pub fn from_hub(repo: &HubRepo) -> Result<Self, LoadError> {
        let config = repo.require("config.json")?;
        let weights = match repo.get(INDEX)? {
            Some(index) => shard_names(&index)?.iter().map(|s| repo.require(s)).collect::<Result<_, _>>()?,
            None => vec![repo.get(SINGLE)?.ok_or_else(|| LoadError::MissingFile {
                file: format!("{SINGLE} (or {INDEX})"),
                location: repo.describe(),
            })?],
        };
        let modules = repo.get(MODULES)?;
        let pooling_config = match &modules {
            Some(m) => match pooling_config_path(m)? {
                Some(p) => repo.get(&p)?,
                None => None,
            },
            None => None,
        };
        Ok(Self {
            config,
            generation_config: repo.get("generation_config.json")?,
            tokenizer: repo.require("tokenizer.json")?,
            tokenizer_config: repo.get("tokenizer_config.json")?,
            weights,
            modules,
            pooling_config,
            location: repo.describe(),
        })
    }
}

/// How to place the model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The compute dtype (activations, KV cache). `None`: f32 on CPU, the checkpoint's dtype
    /// elsewhere.
    pub dtype: Option<DType>,
    pub device: Device,
    /// On the CPU computing in f32: the linear weights' dtype (default: as stored, so a bf16
    /// checkpoint keeps bf16 weights and computes in f32).
    pub cpu_weights: CpuWeights,
    /// Quantize the linear weights (and a tied embedding) not already in a block format into
    /// this one at load.
    pub quantize: Option<Quantize>,
    /// How K-quant weights multiply on the CPU.
    pub k_quants: KQuants,
    /// How the CPU's int8 products take their activations.
    pub activations: Activations,
    /// How bf16 weights multiply on the CPU.
    pub bf16_products: Bf16Products,
    /// The tokenizer of this model folder, repo id or GGUF file instead of the model's own
    /// (for a GGUF whose vocabulary ferrite cannot rebuild, say).
    pub tokenizer: Option<String>,
    /// The longest sequence the engine will run (`--max-model-len`), for RoPE scalings that
    /// depend on it; `None`: the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
}

impl LoadOptions {
    fn products(&self) -> CpuProducts {
        CpuProducts { k_quants: self.k_quants, activations: self.activations, bf16: self.bf16_products }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            device: Device::Cpu,
            cpu_weights: CpuWeights::AsStored,
            quantize: None,
            k_quants: KQuants::default(),
            activations: Activations::default(),
            bf16_products: Bf16Products::default(),
            tokenizer: None,
            max_model_len: None,
        }
    }
}

/// A loaded model with everything needed to run it.
pub struct LoadedModel {
    pub files: ModelFiles,
    pub config: ModelConfig,
    pub generation_config: GenerationConfig,
    pub tokenizer: Tokenizer,
    pub model: Box<dyn Model>,
    pub dtype: DType,
    /// How the model makes embeddings (sentence-transformers' files, else a decoder's
    /// last-token default), or why it cannot.
    pub pooling: Result<Pooling, String>,
}

impl LoadedModel {
    /// Token ids that end generation: generation_config's (a list), else config's, else the
    /// tokenizer's EOS.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        if !self.generation_config.eos_token_id.is_empty() {
            self.generation_config.eos_token_id.clone()
        } else if !self.config.eos_token_ids.is_empty() {
            self.config.eos_token_ids.clone()
        } else {
            self.tokenizer.eos_token_id().into_iter().collect()
        }
    }
}

pub fn load(source: &str, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    if let Some(file) = crate::model::gguf::find(Path::new(source)) {
        return load_gguf(&file, opts);
    }
    let source = ModelSource::parse(source)?;
    if let Some(file) = hub_gguf(&source)? {
        return load_gguf(&file, opts);
    }
    load_files(ModelFiles::resolve(&source)?, opts)
}

/// The GGUF file a hub source stands for: the one its `:file` names, or for a repo with GGUF
/// files and no `config.json` (a llama.cpp repo), its Q4_K_M or only one. `None`: a safetensors
/// repo, or a local source.
fn hub_gguf(source: &ModelSource) -> Result<Option<PathBuf>, LoadError> {
    let ModelSource::Hub(id) = source else { return Ok(None) };
    let repo = HubRepo::new(id.clone(), HubSettings::from_env());
    if id.file.is_some() {
        return repo.gguf().map(Some);
    }
    if repo.get("config.json")?.is_some() {
        return Ok(None);
    }
    // No config: a GGUF repo if it lists GGUF files; otherwise the safetensors path's error.
    match repo.files() {
        Ok(files) if files.iter().any(|f| f.to_ascii_lowercase().ends_with(".gguf")) => repo.gguf().map(Some),
        _ => Ok(None),
    }
}

/// A GGUF file: its metadata is the config, its vocabulary the tokenizer, its tensors the
/// weights (block formats kept as they are, the rest widened to f32).
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let file = crate::model::gguf::GgufFile::open(path)?;
    let mut config = ModelConfig::from_json_text(&file.config_json()?.to_string(), path)?;
    config.max_model_len = opts.max_model_len;
    if let Some(factors) = file.rope_factors(config.head_dim)? {
        if config.rope.scaling != RopeScaling::Default {
            return Err(LoadError::Config {
                path: path.to_path_buf(),
                message: "both `rope_freqs.weight` and a rope scaling type: which one applies is ambiguous"
                    .into(),
            });
        }
        config.rope.scaling = RopeScaling::Factors(factors);
    }
    let tokenizer = match &opts.tokenizer {
        Some(source) => load_tokenizer(source)?,
        None => {
            let (inner, tokenizer_config) = file.tokenizer()?;
            Tokenizer::from_parts(inner, tokenizer_config, path)?
        }
    };
    let dtype = opts.dtype.unwrap_or(DType::F32);
    let mut tensors = file.tensors(&opts.device)?;
    if opts.device.is_cpu() && opts.cpu_weights != CpuWeights::AsStored {
        // `--weight-dtype f32|bf16|f16`: block weights widened into the packed products' panels
        // (faster than candle's block kernels on a CPU today, at 2-4 bytes a weight).
        tensors.widen_blocks().map_err(|e| LoadError::Weights {
            location: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let formats: Vec<String> = tensors.formats().iter().map(|(f, n)| format!("{f} ×{n}")).collect();
    tracing::info!(
        "GGUF {}: {} tensors in block formats ({}), {} widened to f32",
        path.display(),
        tensors.quantized.len(),
        if formats.is_empty() { "none".to_string() } else { formats.join(", ") },
        tensors.dense.len()
    );
    let k_quants = tensors
        .quantized
        .values()
        .any(|q| matches!(q.dtype(), GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K));
    if k_quants && opts.device.is_cpu() {
        tracing::info!(
            "K-quant tensors multiply {}",
            match opts.k_quants {
                KQuants::Exact => "in our panels (--exact-k-quants): the dequantized weights' outputs",
                KQuants::Rounded => "through candle's kernels, activations rounded to 8 bits (--exact-k-quants for exact products)",
            }
        );
    }
    let linear_weights = LinearWeights::new(opts.cpu_weights, tensors.stored)
        .with_quantized(tensors.quantized)
        .with_quantize(opts.quantize)
        .with_products(opts.products());
    let vb = VarBuilder::from_tensors(tensors.dense, dtype, &opts.device);
    let location = path.display().to_string();
    let model = build_model(&config, vb, &linear_weights)
        .map_err(|e| LoadError::Weights { location: location.clone(), message: e.to_string() })?;
    let files = ModelFiles {
        location,
        config: path.to_path_buf(),
        generation_config: None,
        tokenizer: path.to_path_buf(),
        tokenizer_config: None,
        weights: vec![path.to_path_buf()],
        modules: None,
        pooling_config: None,
    };
    let generation_config = GenerationConfig::default();
    let pooling = Ok(Pooling::default_for_decoder(config.hidden_size));
    Ok(LoadedModel { files, config, generation_config, tokenizer, model, dtype, pooling })
}

/// Each tensor's dtype as the checkpoint stores it (f32, bf16 and f16 ones; from the headers).
fn stored_dtypes(files: &[PathBuf]) -> candle_core::Result<HashMap<String, DType>> {
    // SAFETY: as for the VarBuilder: the files are mapped read-only and not modified meanwhile.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
    Ok(st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F16 => DType::F16,
                _ => return None,
            };
            Some((name, dtype))
        })
        .collect())
}

/// Only the tokenizer of a model (a folder or a repo id; no weights are read or downloaded), for
/// clients such as `ferrite bench serve` that build prompts of a given token length.
pub fn load_tokenizer(source: &str) -> Result<Tokenizer, LoadError> {
    let gguf = match crate::model::gguf::find(Path::new(source)) {
        Some(file) => Some(file),
        None => hub_gguf(&ModelSource::parse(source)?)?,
    };
    if let Some(file) = gguf {
        let (inner, config) = crate::model::gguf::GgufFile::open(&file)?.tokenizer()?;
        return Tokenizer::from_parts(inner, config, &file);
    }
    let (json, config) = match ModelSource::parse(source)? {
        ModelSource::Local(dir) => {
            let json = dir.join("tokenizer.json");
            if !json.is_file() {
                return Err(LoadError::MissingFile {
                    file: "tokenizer.json".into(),
                    location: dir.display().to_string(),
                });
            }
            let config = dir.join("tokenizer_config.json");
            (json, config.is_file().then_some(config))
        }
        ModelSource::Hub(id) => {
            let repo = HubRepo::new(id, HubSettings::from_env());
            (repo.require("tokenizer.json")?, repo.get("tokenizer_config.json")?)
        }
    };
    let config = match config {
        Some(p) => TokenizerConfig::from_file(&p)?,
        None => TokenizerConfig::default(),
    };
    Tokenizer::load(&json, config)
}

pub fn load_files(files: ModelFiles, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let mut config = ModelConfig::from_file(&files.config)?;
    config.max_model_len = opts.max_model_len;
    let generation_config = match &files.generation_config {
        Some(p) => GenerationConfig::from_file(p)?,
        None => GenerationConfig::default(),
    };
    let tokenizer_config = match &files.tokenizer_config {
        Some(p) => TokenizerConfig::from_file(p)?,
        None => TokenizerConfig::default(),
    };
    let tokenizer = match &opts.tokenizer {
        Some(source) => load_tokenizer(source)?,
        None => Tokenizer::load(&files.tokenizer, tokenizer_config)?,
    };
    let dtype = opts.dtype.unwrap_or(match (&opts.device, config.weight_dtype) {
        (Device::Cpu, _) | (_, None) | (_, Some(crate::model::hf_config::WeightDtype::F32)) => DType::F32,
        (_, Some(crate::model::hf_config::WeightDtype::F16)) => DType::F16,
        (_, Some(crate::model::hf_config::WeightDtype::BF16)) => DType::BF16,
    });
    let weights_err = |e: candle_core::Error| LoadError::Weights {
        location: files.location.clone(),
        message: e.to_string(),
    };
    // SAFETY: the files are memory-mapped read-only; like every safetensors loader we assume
    // they are not modified while the model is alive.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, &opts.device) }
        .map_err(weights_err)?;
    let linear_weights = if opts.device.is_cpu() && dtype == DType::F32 {
        let stored = stored_dtypes(&files.weights).map_err(weights_err)?;
        let mut kinds: Vec<String> = stored.values().map(|d| format!("{d:?}").to_lowercase()).collect();
        kinds.sort();
        kinds.dedup();
        match opts.cpu_weights {
            CpuWeights::AsStored => {
                tracing::info!("CPU: products in f32 over the weights as stored ({})", kinds.join(", "))
            }
            CpuWeights::Cast(d) => tracing::info!(
                "CPU: products in f32 over weights cast to {} (stored: {})",
                format!("{d:?}").to_lowercase(),
                kinds.join(", ")
            ),
        }
        if opts.cpu_weights == CpuWeights::Cast(DType::F16) && stored.values().any(|&d| d == DType::BF16) {
            tracing::warn!("--weight-dtype f16 on a bf16 checkpoint: bf16 values past f16's range (65504) become infinite");
        }
        LinearWeights::new(opts.cpu_weights, stored)
    } else {
        LinearWeights::default()
    };
    if let Some(kind) = opts.quantize {
        tracing::info!("quantizing the linear weights to {} at load", format_name(kind.ggml()));
    }
    let started = std::time::Instant::now();
    let model =
        build_model(&config, vb, &linear_weights.with_quantize(opts.quantize).with_products(opts.products()))
            .map_err(weights_err)?;
    if opts.quantize.is_some() {
        tracing::info!("weights loaded and quantized in {:.1} s", started.elapsed().as_secs_f64());
    }
    let config_json: serde_json::Value = serde_json::from_str(&read_file(&files.config)?)
        .map_err(|e| LoadError::Json { path: files.config.clone(), message: e.to_string() })?;
    let pooling = read_pooling(
        files.modules.as_deref(),
        files.pooling_config.as_deref(),
        &config_json,
        config.hidden_size,
    );
    Ok(LoadedModel { files, config, generation_config, tokenizer, model, dtype, pooling })
}
