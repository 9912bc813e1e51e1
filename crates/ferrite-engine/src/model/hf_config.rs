//! Model configuration: `config.json` and `generation_config.json`, parsed into one checked
//! [`ModelConfig`] that the decoder reads its switches from.
//!
//! Both spellings Hugging Face has used are accepted: the older `rope_theta` / `rope_scaling` /
//! `torch_dtype` and the newer (transformers 5) `rope_parameters` / `dtype`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::LoadError;
use crate::ops::activation::Activation;

/// The architectures the one decoder implementation covers (`config.json` `architectures[0]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Granite,
    Olmo2,
    Phi3,
}

impl Architecture {
    pub const SUPPORTED: [(&'static str, Architecture); 9] = [
        ("LlamaForCausalLM", Architecture::Llama),
        ("MistralForCausalLM", Architecture::Mistral),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
        ("Gemma2ForCausalLM", Architecture::Gemma2),
        ("Gemma3ForCausalLM", Architecture::Gemma3),
        ("GraniteForCausalLM", Architecture::Granite),
        ("Olmo2ForCausalLM", Architecture::Olmo2),
        ("Phi3ForCausalLM", Architecture::Phi3),
    ];

    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::SUPPORTED.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
    }

    pub fn hf_name(self) -> &'static str {
        Self::SUPPORTED
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .expect("invariant: every architecture is listed in SUPPORTED")
    }
}

/// How rotary frequencies are scaled (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Each inverse frequency divided by its own factor (`head_dim / 2` of them): how GGUF files
    /// store Llama 3's scaling (`rope_freqs.weight`).
    Factors(Vec<f32>),
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear { factor: f32 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: RopeScaling,
}

/// Which RMSNorms a decoder layer has, and where (each family's own weight names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// Before attention (`input_layernorm`) and before the MLP (`post_attention_layernorm`):
    /// Llama and most others.
    Pre,
    /// Before and after each sublayer (`input_layernorm`, `post_attention_layernorm`,
    /// `pre_feedforward_layernorm`, `post_feedforward_layernorm`): Gemma 2 and 3.
    Sandwich,
    /// After each sublayer only, before its residual add (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`): OLMo 2.
    Post,
}

/// How an RMSNorm's stored weight scales the normalized input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeight {
    /// `x̂ · w`.
    Scale,
    /// `x̂ · (1 + w)`: Gemma stores offsets from 1.
    OffsetFromOne,
}

/// RMSNorms on the queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection, all heads at once (OLMo 2).
    WholeProjection,
}

/// How the checkpoint stores the attention and MLP input projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projections {
    /// `q_proj`, `k_proj`, `v_proj`; `gate_proj`, `up_proj`.
    Separate,
    /// `qkv_proj` (q, k, v rows) and `gate_up_proj` (gate, up rows): Phi-3.
    Fused,
}

/// Where a decoder layer departs from Llama's: one value per architecture, read from its config
/// keys here, so the decoder itself never asks which family it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    pub norms: NormPlacement,
    pub norm_weight: NormWeight,
    pub qk_norm: QkNorm,
    pub projections: Projections,
    /// The MLP's activation on the gate (`hidden_act`; Gemma's `hidden_activation`).
    pub activation: Activation,
    /// Embedding rows are multiplied by this (Gemma: √hidden_size; Granite:
    /// `embedding_multiplier`).
    pub embedding_scale: Option<f64>,
    /// Each sublayer's output is multiplied by this before its residual add (Granite
    /// `residual_multiplier`).
    pub residual_scale: Option<f64>,
    /// Attention scores are `q·k` times this: 1/√head_dim, or Gemma's
    /// `query_pre_attn_scalar^-½`, or Granite's `attention_multiplier`.
    pub attention_scale: f32,
    /// Attention scores become `cap · tanh(score / cap)` (Gemma 2 `attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// Logits become `cap · tanh(logit / cap)` (Gemma `final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Logits are divided by this (Granite `logits_scaling`).
    pub logits_divisor: Option<f32>,
    /// How many leading dimensions of each head RoPE rotates (`partial_rotary_factor` ·
    /// head_dim; all of them by default).
    pub rotary_dim: usize,
}

impl BlockConfig {
    /// Llama's layer: pre-norms, separate projections, SiLU, 1/√head_dim, no scalings or caps.
    pub fn llama(head_dim: usize) -> Self {
        Self {
            norms: NormPlacement::Pre,
            norm_weight: NormWeight::Scale,
            qk_norm: QkNorm::None,
            projections: Projections::Separate,
            activation: Activation::Silu,
            embedding_scale: None,
            residual_scale: None,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            logits_divisor: None,
            rotary_dim: head_dim,
        }
    }
}

/// The checkpoint's own dtype, from `torch_dtype` or `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    BF16,
}

/// Everything the decoder needs to know about the checkpoint, checked once at load.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope: RopeConfig,
    /// The RoPE of sliding-window layers where it differs from `rope` (Gemma 3's local base
    /// frequency); `None`: every layer uses `rope`.
    pub local_rope: Option<RopeConfig>,
    /// Bias on q/k/v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Where a layer departs from Llama's.
    pub block: BlockConfig,
    /// For each layer, its sliding window in tokens, or `None` for full attention.
    pub layer_sliding_windows: Vec<Option<usize>>,
    pub weight_dtype: Option<WeightDtype>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as written, before checks. Every field optional where some writer omits it.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    quantization_config: Option<Value>,
    // Gemma
    query_pre_attn_scalar: Option<f64>,
    /// `Some(Value::Null)` where the config says `null` (none), `None` where it is silent (the
    /// family's default).
    #[serde(default, deserialize_with = "present")]
    attn_logit_softcapping: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    final_logit_softcapping: Option<Value>,
    use_bidirectional_attention: Option<bool>,
    rope_local_base_freq: Option<f64>,
    sliding_window_pattern: Option<usize>,
    // Granite
    embedding_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    attention_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    // Phi
    partial_rotary_factor: Option<f64>,
}

/// `generation_config.json`: the defaults a model ships for generation.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "token_id_list")]
    pub eos_token_id: Vec<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = read_file(path)?;
        serde_json::from_str(&text)
            .map_err(|e| LoadError::Json { path: path.to_path_buf(), message: e.to_string() })
    }
}

/// A key that is there, `null` included (serde reads a `null` `Option` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// An id or a list of ids (`eos_token_id` is either in the wild); `null` is no ids.
fn token_id_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    let v = Value::deserialize(d)?;
    ids_from_value(&v).map_err(serde::de::Error::custom)
}

fn ids_from_value(v: &Value) -> Result<Vec<u32>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| vec![n])
            .ok_or_else(|| format!("token id {n} is not a non-negative 32-bit integer")),
        Value::Array(items) => items
            .iter()
            .map(|i| ids_from_value(i).and_then(|v| v.into_iter().next().ok_or_default()))
            .collect(),
        other => Err(format!("expected a token id or a list of ids, got {other}")),
    }
}

trait OkOrDefault<T> {
    fn ok_or_default(self) -> Result<T, String>;
}
impl<T> OkOrDefault<T> for Option<T> {
    fn ok_or_default(self) -> Result<T, String> {
        self.ok_or_else(|| "null inside a token id list".to_string())
    }
}

pub(crate) fn read_file(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path)
        .map_err(|e| LoadError::Io { path: path.to_path_buf(), message: e.to_string() })
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = read_file(path)?;
        Self::from_json_str(&text).map_err(|message| match message {
            ConfigProblem::Unsupported(e) => e,
            ConfigProblem::Invalid(message) => LoadError::Config { path: path.to_path_buf(), message },
        })
    }

    /// A configuration given as `config.json` text by something other than a file (a GGUF
    /// file's metadata); errors name `origin`.
    pub fn from_json_text(text: &str, origin: &Path) -> Result<Self, LoadError> {
        Self::from_json_str(text).map_err(|message| match message {
            ConfigProblem::Unsupported(e) => e,
            ConfigProblem::Invalid(message) => LoadError::Config { path: origin.to_path_buf(), message },
        })
    }

    fn from_json_str(text: &str) -> Result<Self, ConfigProblem> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ConfigProblem::Invalid(e.to_string()))?;
        let architecture = architecture_of(&raw)?;
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_hidden_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let (num_attention_heads, num_key_value_heads, head_dim) = heads_of(&raw, hidden_size)?;

        if let Some(q) = &raw.quantization_config {
            return Err(ConfigProblem::Invalid(refuse_quantization(q)));
        }
        let (rope, local_rope) = parse_ropes(&raw, architecture).map_err(ConfigProblem::Invalid)?;
        let block = block_of(&raw, architecture, hidden_size, head_dim).map_err(ConfigProblem::Invalid)?;
        let sliding = layer_windows(&raw, architecture, num_hidden_layers).map_err(ConfigProblem::Invalid)?;
        if sliding.contains(&Some(0)) {
            // A window of 0 sees no key, not even the token itself: every softmax would be empty.
            return Err(ConfigProblem::Invalid(
                "`sliding_window` is 0; a sliding window must hold at least 1 token".into(),
            ));
        }
        let bos_token_id = match &raw.bos_token_id {
            Some(v) => ids_from_value(v).map_err(ConfigProblem::Invalid)?.first().copied(),
            None => None,
        };
        let eos_token_ids = match &raw.eos_token_id {
            Some(v) => ids_from_value(v).map_err(ConfigProblem::Invalid)?,
            None => Vec::new(),
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            // Phi-3's fused projections and OLMo 2's carry no bias.
            Architecture::Phi3 | Architecture::Olmo2 => (false, false),
            _ => (attention_bias, attention_bias),
        };

        Ok(ModelConfig {
            architecture,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            rope,
            local_rope,
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            block,
            layer_sliding_windows: sliding,
            weight_dtype: weight_dtype_of(&raw)?,
            bos_token_id,
            eos_token_ids,
        })
    }
}

fn need<T>(v: Option<T>, key: &str) -> Result<T, ConfigProblem> {
    v.ok_or_else(|| ConfigProblem::Invalid(format!("missing `{key}`")))
}

/// The first `architectures` entry, if ferrite runs it.
fn architecture_of(raw: &RawConfig) -> Result<Architecture, ConfigProblem> {
    let arch_name = raw
        .architectures
        .as_ref()
        .and_then(|a| a.first())
        .ok_or_else(|| ConfigProblem::Invalid("no `architectures` entry".into()))?;
    Architecture::from_hf_name(arch_name).ok_or_else(|| {
        ConfigProblem::Unsupported(LoadError::UnsupportedArchitecture {
            name: arch_name.clone(),
            supported: Architecture::SUPPORTED.iter().map(|(n, _)| n.to_string()).collect(),
        })
    })
}

/// `(num_attention_heads, num_key_value_heads, head_dim)`: query heads a positive multiple of
/// KV heads, and an even head_dim (given, or hidden_size / heads).
fn heads_of(raw: &RawConfig, hidden_size: usize) -> Result<(usize, usize, usize), ConfigProblem> {
    let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
    let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
    if num_attention_heads == 0
        || num_key_value_heads == 0
        || !num_attention_heads.is_multiple_of(num_key_value_heads)
    {
        return Err(ConfigProblem::Invalid(format!(
            "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
        )));
    }
    let head_dim = match raw.head_dim {
        Some(d) => d,
        None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
        None => {
            return Err(ConfigProblem::Invalid(format!(
                "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no `head_dim` is given"
            )))
        }
    };
    if !head_dim.is_multiple_of(2) {
        return Err(ConfigProblem::Invalid(format!("head_dim ({head_dim}) must be even for RoPE")));
    }
    Ok((num_attention_heads, num_key_value_heads, head_dim))
}

/// The checkpoint's stored dtype (`dtype`, or the older `torch_dtype`), when it says.
fn weight_dtype_of(raw: &RawConfig) -> Result<Option<WeightDtype>, ConfigProblem> {
    match raw.dtype.as_deref().or(raw.torch_dtype.as_deref()) {
        None => Ok(None),
        Some("float32") => Ok(Some(WeightDtype::F32)),
        Some("float16") => Ok(Some(WeightDtype::F16)),
        Some("bfloat16") => Ok(Some(WeightDtype::BF16)),
        Some(other) => Err(ConfigProblem::Invalid(format!(
            "dtype `{other}` is not supported (float32, float16, bfloat16)"
        ))),
    }
}

enum ConfigProblem {
    Unsupported(LoadError),
    Invalid(String),
}

/// The RoPE of every layer and, for Gemma 3, the different one of its sliding-window layers.
fn parse_ropes(raw: &RawConfig, arch: Architecture) -> Result<(RopeConfig, Option<RopeConfig>), String> {
    // transformers 5 writes `rope_parameters` (with `rope_theta` inside); older configs have a
    // top-level `rope_theta` and an optional `rope_scaling`. Prefer the newer where both exist.
    let params = raw
        .rope_parameters
        .as_ref()
        .filter(|v| !v.is_null())
        .or(raw.rope_scaling.as_ref().filter(|v| !v.is_null()));
    if arch != Architecture::Gemma3 {
        return Ok((rope_from(params, raw.rope_theta.unwrap_or(10_000.0))?, None));
    }
    // Gemma 3: global layers at `rope_theta` (with any scaling), local ones at
    // `rope_local_base_freq`, unscaled; transformers 5 writes one entry per layer type.
    let (global_theta, local_theta) =
        (raw.rope_theta.unwrap_or(1_000_000.0), raw.rope_local_base_freq.unwrap_or(10_000.0));
    match params {
        Some(p) if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() => Ok((
            rope_from(p.get("full_attention"), global_theta)?,
            Some(rope_from(p.get("sliding_attention"), local_theta)?),
        )),
        _ => Ok((
            rope_from(params, global_theta)?,
            Some(RopeConfig { theta: local_theta as f32, scaling: RopeScaling::Default }),
        )),
    }
}

/// One RoPE from its parameters (`rope_parameters` or `rope_scaling`); a `rope_theta` among
/// them wins over `theta`.
fn rope_from(params: Option<&Value>, theta: f64) -> Result<RopeConfig, String> {
    let params = params.filter(|p| !p.is_null());
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(theta) as f32;
    let Some(p) = params else {
        return Ok(RopeConfig { theta, scaling: RopeScaling::Default });
    };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f32, String> {
        p.get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(format!("rope scaling type `{other}` is not supported (default, linear, llama3)"))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// The one place that says how each family's layer departs from Llama's.
fn block_of(
    raw: &RawConfig,
    arch: Architecture,
    hidden_size: usize,
    head_dim: usize,
) -> Result<BlockConfig, String> {
    use Architecture as A;
    let gemma = matches!(arch, A::Gemma2 | A::Gemma3);
    if raw.use_bidirectional_attention == Some(true) {
        return Err("`use_bidirectional_attention` is not supported: ferrite runs causal LMs".into());
    }
    let activation = {
        // Gemma reads `hidden_activation` (its `hidden_act` once meant exact GELU).
        let given = if gemma {
            raw.hidden_activation.as_ref().or(raw.hidden_act.as_ref())
        } else {
            raw.hidden_act.as_ref()
        };
        match given.map(String::as_str) {
            None if gemma => Activation::GeluTanh,
            None | Some("silu" | "swish") => Activation::Silu,
            Some("gelu_pytorch_tanh" | "gelu_new") => Activation::GeluTanh,
            Some("gelu") => Activation::GeluErf,
            Some(other) => {
                return Err(format!(
                    "hidden_act `{other}` is not supported (silu, gelu, gelu_pytorch_tanh, gelu_new)"
                ))
            }
        }
    };
    let positive = |key: &str, v: Option<f64>| -> Result<Option<f64>, String> {
        match v {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                Err(format!("`{key}` must be a positive number, got {v}"))
            }
            v => Ok(v),
        }
    };
    // A soft-cap: absent means the family's default, `null` none.
    let cap = |key: &str, v: &Option<Value>, default: Option<f64>| -> Result<Option<f32>, String> {
        let v = match v {
            None => default,
            Some(Value::Null) => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| format!("`{key}` must be a number or null, got {v}"))?),
        };
        Ok(positive(key, v)?.map(|v| v as f32))
    };
    let partial = raw
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .or(raw.partial_rotary_factor);
    let rotary_dim = match (arch, partial) {
        (A::Phi3, Some(f)) => {
            // transformers: int(head_dim * partial_rotary_factor).
            let dim = (head_dim as f64 * f) as usize;
            if dim == 0 || dim > head_dim || !dim.is_multiple_of(2) {
                return Err(format!(
                    "partial_rotary_factor {f} gives {dim} rotary dimensions of head_dim {head_dim}; they must be even and between 2 and head_dim"
                ));
            }
            dim
        }
        _ => head_dim,
    };
    let default_scale = 1.0 / (head_dim as f32).sqrt();
    Ok(BlockConfig {
        norms: match arch {
            A::Gemma2 | A::Gemma3 => NormPlacement::Sandwich,
            A::Olmo2 => NormPlacement::Post,
            _ => NormPlacement::Pre,
        },
        norm_weight: if gemma { NormWeight::OffsetFromOne } else { NormWeight::Scale },
        qk_norm: match arch {
            A::Qwen3 | A::Gemma3 => QkNorm::PerHead,
            A::Olmo2 => QkNorm::WholeProjection,
            _ => QkNorm::None,
        },
        projections: if arch == A::Phi3 { Projections::Fused } else { Projections::Separate },
        activation,
        embedding_scale: match arch {
            // transformers rounds √hidden to the weights' dtype; the model does too.
            A::Gemma2 | A::Gemma3 => Some((hidden_size as f64).sqrt()),
            A::Granite => positive("embedding_multiplier", raw.embedding_multiplier)?,
            _ => None,
        },
        residual_scale: match arch {
            A::Granite => positive("residual_multiplier", raw.residual_multiplier)?,
            _ => None,
        },
        attention_scale: match arch {
            // transformers' default query_pre_attn_scalar is 256 for both.
            A::Gemma2 | A::Gemma3 => {
                let s = positive("query_pre_attn_scalar", raw.query_pre_attn_scalar)?.unwrap_or(256.0);
                s.powf(-0.5) as f32
            }
            A::Granite => positive("attention_multiplier", raw.attention_multiplier)?
                .map_or(default_scale, |m| m as f32),
            _ => default_scale,
        },
        attn_softcap: match arch {
            A::Gemma2 => cap("attn_logit_softcapping", &raw.attn_logit_softcapping, Some(50.0))?,
            A::Gemma3 => cap("attn_logit_softcapping", &raw.attn_logit_softcapping, None)?,
            _ => None,
        },
        final_softcap: match arch {
            A::Gemma2 => cap("final_logit_softcapping", &raw.final_logit_softcapping, Some(30.0))?,
            A::Gemma3 => cap("final_logit_softcapping", &raw.final_logit_softcapping, None)?,
            _ => None,
        },
        logits_divisor: match arch {
            A::Granite => positive("logits_scaling", raw.logits_scaling)?.map(|v| v as f32),
            _ => None,
        },
        rotary_dim,
    })
}

fn layer_windows(
    raw: &RawConfig,
    arch: Architecture,
    num_layers: usize,
) -> Result<Vec<Option<usize>>, String> {
    if let Some(types) = &raw.layer_types {
        if types.len() != num_layers {
            return Err(format!(
                "`layer_types` has {} entries but num_hidden_layers is {num_layers}",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => raw
                    .sliding_window
                    .map(Some)
                    .ok_or_else(|| "a `sliding_attention` layer needs `sliding_window`".to_string()),
                other => Err(format!("layer type `{other}` is not supported")),
            })
            .collect();
    }
    // transformers' default window for the Gemmas when a config leaves it out.
    let gemma_window = Some(raw.sliding_window.unwrap_or(4096));
    Ok(match arch {
        Architecture::Mistral | Architecture::Phi3 => vec![raw.sliding_window; num_layers],
        // Older configs without `layer_types`: Gemma 2 alternates local and global layers,
        // starting local; Gemma 3 has one global layer in every `sliding_window_pattern` (6).
        Architecture::Gemma2 => {
            (0..num_layers).map(|i| if i % 2 == 0 { gemma_window } else { None }).collect()
        }
        Architecture::Gemma3 => {
            let pattern = raw.sliding_window_pattern.unwrap_or(6).max(1);
            (0..num_layers).map(|i| if (i + 1) % pattern != 0 { gemma_window } else { None }).collect()
        }
        Architecture::Qwen2 | Architecture::Qwen3 if raw.use_sliding_window == Some(true) => {
            let first = raw.max_window_layers.unwrap_or(0);
            (0..num_layers).map(|i| if i >= first { raw.sliding_window } else { None }).collect()
        }
        _ => vec![None; num_layers],
    })
}

/// Why a checkpoint with a `quantization_config` does not load: its weights are in a format
/// whose kernels ferrite does not have (they would load as garbage or not at all), so the
/// message names the method and what does load.
fn refuse_quantization(q: &Value) -> String {
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unnamed");
    format!(
        "quantization_config.quant_method `{method}` is not supported: ferrite loads safetensors \
         weights in f32, f16 or bf16 (which `--quantize q8_0|q4_k|q6_k` can quantize at load) and GGUF \
         files (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K); use the unquantized \
         checkpoint or a GGUF conversion of it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json_str(json).map_err(|e| match e {
            ConfigProblem::Unsupported(e) => e.to_string(),
            ConfigProblem::Invalid(m) => m,
        })
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2"#;

    /// Pre-quantized safetensors (AWQ, GPTQ, FP8, bitsandbytes, compressed-tensors) are refused
    /// by method, with what does load.
    #[test]
    fn quantization_configs_are_refused_by_method() {
        for method in ["awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors"] {
            let json = format!(
                r#"{{"architectures": ["LlamaForCausalLM"], {BASE},
                   "quantization_config": {{"quant_method": "{method}", "bits": 4}}}}"#
            );
            let e = parse(&json).unwrap_err();
            assert!(
                e.contains(&format!("quantization_config.quant_method `{method}` is not supported")),
                "{e}"
            );
            assert!(e.contains("GGUF") && e.contains("--quantize"), "{e}");
        }
    }

    #[test]
    fn old_and_new_rope_spellings_agree() {
        let old = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
            "rope_scaling": {{"type": "linear", "factor": 2.0}}, "torch_dtype": "bfloat16"}}"#
        ))
        .unwrap();
        let new = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE},
            "rope_parameters": {{"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}, "dtype": "bfloat16"}}"#
        ))
        .unwrap();
        assert_eq!(old.rope, new.rope);
        assert_eq!(old.rope.scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(old.rope.theta, 500000.0);
        assert_eq!(old.weight_dtype, Some(WeightDtype::BF16));
        assert_eq!(new.weight_dtype, Some(WeightDtype::BF16));
        assert_eq!(old.num_key_value_heads, 2);
        assert_eq!(old.head_dim, 4);
    }

    #[test]
    fn eos_may_be_a_list() {
        let c = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "eos_token_id": [3, 7], "bos_token_id": null}}"#
        ))
        .unwrap();
        assert_eq!(c.eos_token_ids, vec![3, 7]);
        assert_eq!(c.bos_token_id, None);
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn unsupported_architecture_lists_supported_ones() {
        let e = parse(&format!(r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#)).unwrap_err();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
        assert!(e.contains("Qwen3ForCausalLM") && e.contains("MistralForCausalLM"), "{e}");
    }

    #[test]
    fn a_window_of_zero_is_an_error_where_it_applies() {
        let e =
            parse(&format!(r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "sliding_window": 0}}"#))
                .unwrap_err();
        assert!(e.contains("`sliding_window` is 0"), "{e}");
        // Not applied (Qwen2 without use_sliding_window): no error.
        let q = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "sliding_window": 0, "use_sliding_window": false}}"#
        ));
        assert!(q.is_ok(), "{q:?}");
    }

    #[test]
    fn mistral_window_applies_to_every_layer_and_qwen_only_when_enabled() {
        let m =
            parse(&format!(r#"{{"architectures": ["MistralForCausalLM"], {BASE}, "sliding_window": 48}}"#))
                .unwrap();
        assert_eq!(m.layer_sliding_windows, vec![Some(48), Some(48)]);
        let q = parse(&format!(
            r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}, "sliding_window": 48, "use_sliding_window": false}}"#
        ))
        .unwrap();
        assert_eq!(q.layer_sliding_windows, vec![None, None]);
        let t = parse(&format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], {BASE}, "sliding_window": 48,
            "layer_types": ["full_attention", "sliding_attention"]}}"#
        ))
        .unwrap();
        assert_eq!(t.layer_sliding_windows, vec![None, Some(48)]);
        assert_eq!(t.block.qk_norm, QkNorm::PerHead);
    }

    /// Real Gemma configs predate `layer_types` and per-type `rope_parameters`: the window
    /// pattern, the local base frequency and the soft-cap defaults come from the older keys.
    #[test]
    fn gemma_configs_in_the_older_spelling() {
        let layers =
            |n: usize| BASE.replace(r#""num_hidden_layers": 2"#, &format!(r#""num_hidden_layers": {n}"#));
        let g2 = parse(&format!(
            r#"{{"architectures": ["Gemma2ForCausalLM"], {}, "head_dim": 8,
            "sliding_window": 64, "query_pre_attn_scalar": 16, "final_logit_softcapping": null}}"#,
            layers(4)
        ))
        .unwrap();
        assert_eq!(g2.layer_sliding_windows, vec![Some(64), None, Some(64), None]);
        let b = &g2.block;
        assert_eq!(
            (b.norms, b.norm_weight, b.qk_norm),
            (NormPlacement::Sandwich, NormWeight::OffsetFromOne, QkNorm::None)
        );
        assert_eq!(b.activation, Activation::GeluTanh, "Gemma's default activation");
        // Absent: transformers' default of 50; null: none.
        assert_eq!((b.attn_softcap, b.final_softcap), (Some(50.0), None));
        assert_eq!(b.attention_scale, 0.25);
        assert_eq!(b.embedding_scale, Some(8f64.sqrt()));
        assert!(g2.local_rope.is_none());

        let g3 = parse(&format!(
            r#"{{"architectures": ["Gemma3ForCausalLM"], {},
            "sliding_window": 512, "sliding_window_pattern": 3, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "rope_scaling": {{"rope_type": "linear", "factor": 8.0}},
            "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu"}}"#,
            layers(7)
        ))
        .unwrap();
        let w = Some(512);
        assert_eq!(g3.layer_sliding_windows, vec![w, w, None, w, w, None, w]);
        assert_eq!(g3.rope, RopeConfig { theta: 1e6, scaling: RopeScaling::Linear { factor: 8.0 } });
        assert_eq!(g3.local_rope, Some(RopeConfig { theta: 1e4, scaling: RopeScaling::Default }));
        assert_eq!(g3.block.activation, Activation::GeluTanh, "hidden_activation wins for Gemma");
        assert_eq!(g3.block.qk_norm, QkNorm::PerHead);
        assert_eq!((g3.block.attn_softcap, g3.block.final_softcap), (None, None));

        let e = parse(&format!(
            r#"{{"architectures": ["Gemma3ForCausalLM"], {BASE}, "use_bidirectional_attention": true}}"#
        ))
        .unwrap_err();
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures": ["Gemma2ForCausalLM"], {BASE}, "attn_logit_softcapping": 0.0}}"#
        ))
        .unwrap_err();
        assert!(e.contains("`attn_logit_softcapping` must be a positive number, got 0"), "{e}");
    }

    #[test]
    fn granite_olmo2_and_phi3_switches() {
        let g = parse(&format!(
            r#"{{"architectures": ["GraniteForCausalLM"], {BASE}, "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22, "attention_multiplier": 0.0078125, "logits_scaling": 8.0}}"#
        ))
        .unwrap();
        let b = &g.block;
        assert_eq!((b.embedding_scale, b.residual_scale), (Some(12.0), Some(0.22)));
        assert_eq!((b.attention_scale, b.logits_divisor), (0.0078125, Some(8.0)));
        assert_eq!(b.norms, NormPlacement::Pre);

        let o = parse(&format!(r#"{{"architectures": ["Olmo2ForCausalLM"], {BASE}}}"#)).unwrap();
        assert_eq!((o.block.norms, o.block.qk_norm), (NormPlacement::Post, QkNorm::WholeProjection));

        // Phi-4-mini writes the factor at the top level; 0.75 of head_dim 4 is 3 dims: odd.
        let p = parse(&format!(
            r#"{{"architectures": ["Phi3ForCausalLM"], {BASE}, "head_dim": 8, "partial_rotary_factor": 0.75,
            "sliding_window": 2047}}"#
        ))
        .unwrap();
        assert_eq!((p.block.rotary_dim, p.block.projections), (6, Projections::Fused));
        assert_eq!(p.layer_sliding_windows, vec![Some(2047), Some(2047)]);
        let e = parse(&format!(
            r#"{{"architectures": ["Phi3ForCausalLM"], {BASE}, "partial_rotary_factor": 0.75}}"#
        ))
        .unwrap_err();
        assert!(e.contains("partial_rotary_factor 0.75 gives 3 rotary dimensions of head_dim 4"), "{e}");
        // Another family's stray factor changes nothing (transformers ignores it there too).
        let l = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "partial_rotary_factor": 0.5}}"#
        ))
        .unwrap();
        assert_eq!(l.block.rotary_dim, 4);
        let e = parse(&format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "hidden_act": "relu"}}"#))
            .unwrap_err();
        assert!(e.contains("hidden_act `relu` is not supported"), "{e}");
    }

    #[test]
    fn missing_key_and_bad_heads_are_named() {
        let e = parse(r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10}"#).unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
        let e =
            parse(&format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "num_key_value_heads": 3}}"#))
                .unwrap_err();
        assert!(e.contains("num_key_value_heads (3)"), "{e}");
    }
}
