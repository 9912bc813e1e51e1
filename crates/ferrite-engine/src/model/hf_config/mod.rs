//! Model configuration: `config.json` and `generation_config.json`, parsed into one checked
//! [`ModelConfig`] that the decoder reads its switches from.
//!
//! Both spellings Hugging Face has used are accepted: the older `rope_theta` / `rope_scaling` /
//! `torch_dtype` and the newer (transformers 5) `rope_parameters` / `dtype`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::LoadError;

mod block;
mod rope;

use block::{block_of, layer_windows, moe_of};
pub use block::{BlockConfig, ExpertNames, MoeConfig, NormPlacement, NormWeight, Projections, QkNorm};
use rope::parse_ropes;
pub use rope::{RopeConfig, RopeScaling};

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
    Qwen3Moe,
    Mixtral,
}

impl Architecture {
    pub const SUPPORTED: [(&'static str, Architecture); 12] = [
        ("LlamaForCausalLM", Architecture::Llama),
        ("MistralForCausalLM", Architecture::Mistral),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
        ("Gemma2ForCausalLM", Architecture::Gemma2),
        ("Gemma3ForCausalLM", Architecture::Gemma3),
        ("GraniteForCausalLM", Architecture::Granite),
        ("Olmo2ForCausalLM", Architecture::Olmo2),
        ("Phi3ForCausalLM", Architecture::Phi3),
        // Its language model (text only: the vision tower is not loaded).
        ("Gemma3ForConditionalGeneration", Architecture::Gemma3),
        ("Qwen3MoeForCausalLM", Architecture::Qwen3Moe),
        ("MixtralForCausalLM", Architecture::Mixtral),
    ];

    /// Also a bare `…Model` (the transformer saved without its head, as embedding checkpoints
    /// are): the body of its `…ForCausalLM`.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        let causal = name.strip_suffix("Model").map(|family| format!("{family}ForCausalLM"));
        let name = causal.as_deref().unwrap_or(name);
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
    /// The longest sequence the engine will run, where the loader was told it: RoPE scalings
    /// that depend on the context (LongRoPE, dynamic NTK) are fixed for it. `None`:
    /// `max_position_embeddings`.
    pub max_model_len: Option<usize>,
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
    /// The experts of a mixture-of-experts model (Qwen3-MoE, Mixtral).
    pub moe: Option<MoeConfig>,
    /// Where the model's weights sit in the checkpoint when not at its root: the language
    /// model of a multimodal checkpoint (`language_model`).
    pub weights_prefix: Option<String>,
    /// For each layer, its sliding window in tokens, or `None` for full attention.
    pub layer_sliding_windows: Vec<Option<usize>>,
    pub weight_dtype: Option<WeightDtype>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// transformers' `max_position_embeddings` where a config leaves it out.
const DEFAULT_MAX_POSITIONS: usize = 4096;

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
    original_max_position_embeddings: Option<usize>,
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
    // Mixtures of experts
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
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
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigProblem::Invalid(e.to_string()))?;
        let (value, weights_prefix) = language_model_of(value).map_err(ConfigProblem::Invalid)?;
        let raw: RawConfig =
            serde_json::from_value(value).map_err(|e| ConfigProblem::Invalid(e.to_string()))?;
        let architecture = architecture_of(&raw)?;
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_hidden_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let (num_attention_heads, num_key_value_heads, head_dim) = heads_of(&raw, hidden_size)?;

        if let Some(q) = &raw.quantization_config {
            return Err(ConfigProblem::Invalid(refuse_quantization(q)));
        }
        let (rope, local_rope) = parse_ropes(&raw, architecture).map_err(ConfigProblem::Invalid)?;
        let block = block_of(&raw, architecture, hidden_size, head_dim).map_err(ConfigProblem::Invalid)?;
        for r in std::iter::once(&rope).chain(&local_rope) {
            if let Some(n) = r.scaling.num_factors() {
                if 2 * n != block.rotary_dim {
                    return Err(ConfigProblem::Invalid(format!(
                        "the rope scaling has {n} per-frequency factors, but the {} rotary dimensions need {}",
                        block.rotary_dim,
                        block.rotary_dim / 2
                    )));
                }
            }
        }
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
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(DEFAULT_MAX_POSITIONS),
            max_model_len: None,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            rope,
            local_rope,
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            block,
            moe: moe_of(&raw, architecture, num_hidden_layers).map_err(ConfigProblem::Invalid)?,
            weights_prefix,
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

/// A multimodal checkpoint whose language model ferrite runs, as that model's own config and
/// the prefix of its weights; any other config as it is.
///
/// Gemma 3 (4B and up) ships as `Gemma3ForConditionalGeneration`: the language model's config
/// is `text_config` (on the hub often only the keys that differ from `Gemma3TextConfig`'s
/// defaults, which are filled in here), its weights `language_model.model.*`, the head tied.
fn language_model_of(mut config: Value) -> Result<(Value, Option<String>), String> {
    let arch = config.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str);
    if arch != Some("Gemma3ForConditionalGeneration") {
        return Ok((config, None));
    }
    let mut text = match config.get_mut("text_config").map(Value::take) {
        Some(Value::Object(text)) => text,
        _ => return Err("Gemma3ForConditionalGeneration without a `text_config` object".into()),
    };
    // transformers' Gemma3TextConfig defaults (4.5x and 5.x agree on these).
    let defaults = serde_json::json!({
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
        "bos_token_id": 2, "eos_token_id": 1,
    });
    // The top level speaks for the whole checkpoint where the text part is silent.
    for key in
        ["tie_word_embeddings", "torch_dtype", "dtype", "quantization_config", "bos_token_id", "eos_token_id"]
    {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            text.entry(key).or_insert_with(|| v.clone());
        }
    }
    if let Value::Object(defaults) = defaults {
        for (key, v) in defaults {
            text.entry(key).or_insert(v);
        }
    }
    text.entry("tie_word_embeddings").or_insert(Value::Bool(true));
    text.insert("architectures".into(), serde_json::json!(["Gemma3ForCausalLM"]));
    Ok((Value::Object(text), Some("language_model".into())))
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
pub(super) mod tests {
    use super::*;

    pub(crate) fn parse(json: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json_str(json).map_err(|e| match e {
            ConfigProblem::Unsupported(e) => e.to_string(),
            ConfigProblem::Invalid(m) => m,
        })
    }

    pub(crate) const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
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
    /// gemma-3-4b-it's config as the hub has it: a `text_config` of only what differs from
    /// transformers' defaults, eos and dtype at the top level.
    #[test]
    fn gemma3_multimodal_checkpoint_runs_its_language_model() {
        let c = parse(
            r#"{"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
            "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256,
            "model_type": "gemma3", "torch_dtype": "bfloat16",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024},
            "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}}"#,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!(c.weights_prefix.as_deref(), Some("language_model"));
        assert_eq!((c.vocab_size, c.hidden_size, c.num_hidden_layers), (262208, 2560, 34));
        assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (8, 4, 256));
        assert_eq!(c.max_position_embeddings, 131072);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![1, 106]);
        assert_eq!(c.weight_dtype, Some(WeightDtype::BF16));
        // One global layer in six, the rest local with their own base.
        let globals: Vec<usize> = (0..34).filter(|&i| c.layer_sliding_windows[i].is_none()).collect();
        assert_eq!(globals, vec![5, 11, 17, 23, 29]);
        assert_eq!(c.layer_sliding_windows[0], Some(1024));
        assert_eq!(c.rope, RopeConfig { theta: 1e6, scaling: RopeScaling::Linear { factor: 8.0 } });
        assert_eq!(c.local_rope, Some(RopeConfig { theta: 1e4, scaling: RopeScaling::Default }));
        assert_eq!(c.block.attention_scale, 1.0 / 16.0);

        let e = parse(r#"{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}"#)
            .unwrap_err();
        assert!(e.contains("without a `text_config`"), "{e}");
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
