//! Where each family's decoder layer departs from Llama's: the switches ([`BlockConfig`]) and
//! the one function that reads them, and the sliding windows, from a family's config keys.

use serde_json::Value;

use super::{Architecture, RawConfig};
use crate::ops::activation::Activation;

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

/// The checkpoint's names for a mixture's router and experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNames {
    /// `mlp.gate`, `mlp.experts.N.{gate,up,down}_proj` (Qwen3-MoE).
    Qwen,
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.N.{w1,w3,w2}` (w1 the gate, w3 up).
    Mixtral,
}

/// A mixture of experts in place of some layers' MLP: a router's softmax picks `top_k` of
/// `num_experts` gated MLPs per token, and their outputs are summed weighted by the picked
/// probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub expert_intermediate_size: usize,
    /// The picked probabilities are divided by their sum (Mixtral always; Qwen3-MoE's
    /// `norm_topk_prob`).
    pub renormalize: bool,
    /// For each layer, whether it has experts (else the dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    pub names: ExpertNames,
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

/// The one place that says how each family's layer departs from Llama's.
pub(super) fn block_of(
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
            A::Qwen3 | A::Qwen3Moe | A::Gemma3 => QkNorm::PerHead,
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

pub(super) fn layer_windows(
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
        Architecture::Mistral | Architecture::Mixtral | Architecture::Phi3 => {
            vec![raw.sliding_window; num_layers]
        }
        // Older configs without `layer_types`: Gemma 2 alternates local and global layers,
        // starting local; Gemma 3 has one global layer in every `sliding_window_pattern` (6).
        Architecture::Gemma2 => {
            (0..num_layers).map(|i| if i % 2 == 0 { gemma_window } else { None }).collect()
        }
        Architecture::Gemma3 => {
            let pattern = raw.sliding_window_pattern.unwrap_or(6).max(1);
            (0..num_layers).map(|i| if (i + 1) % pattern != 0 { gemma_window } else { None }).collect()
        }
        Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe
            if raw.use_sliding_window == Some(true) =>
        {
            let first = raw.max_window_layers.unwrap_or(0);
            (0..num_layers).map(|i| if i >= first { raw.sliding_window } else { None }).collect()
        }
        _ => vec![None; num_layers],
    })
}

/// The experts, for the families that have them (transformers' defaults where a key is left
/// out).
pub(super) fn moe_of(
    raw: &RawConfig,
    arch: Architecture,
    num_layers: usize,
) -> Result<Option<MoeConfig>, String> {
    let (num_experts, names, expert_intermediate_size, renormalize) = match arch {
        Architecture::Qwen3Moe => (
            // transformers 5 writes `num_local_experts`; the hub's configs `num_experts`.
            raw.num_experts.or(raw.num_local_experts).unwrap_or(128),
            ExpertNames::Qwen,
            raw.moe_intermediate_size.unwrap_or(768),
            raw.norm_topk_prob.unwrap_or(false),
        ),
        Architecture::Mixtral => (
            raw.num_local_experts.or(raw.num_experts).unwrap_or(8),
            ExpertNames::Mixtral,
            raw.intermediate_size.unwrap_or(14336),
            true,
        ),
        _ => return Ok(None),
    };
    let top_k = raw.num_experts_per_tok.unwrap_or(2);
    if top_k == 0 || top_k > num_experts {
        return Err(format!(
            "num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})"
        ));
    }
    let sparse_layers = match arch {
        // transformers: experts where the layer is not in `mlp_only_layers` and every
        // `decoder_sparse_step`-th layer (counting from 1).
        Architecture::Qwen3Moe => {
            let step = raw.decoder_sparse_step.unwrap_or(1).max(1);
            let dense = raw.mlp_only_layers.clone().unwrap_or_default();
            (0..num_layers).map(|i| !dense.contains(&i) && (i + 1) % step == 0).collect()
        }
        _ => vec![true; num_layers],
    };
    Ok(Some(MoeConfig { num_experts, top_k, expert_intermediate_size, renormalize, sparse_layers, names }))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{parse, BASE};
    use super::*;
    use crate::model::hf_config::{RopeConfig, RopeScaling};

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

    /// Which layers have experts, under both spellings of the expert count.
    #[test]
    fn experts_by_layer() {
        let layers =
            |n: usize| BASE.replace(r#""num_hidden_layers": 2"#, &format!(r#""num_hidden_layers": {n}"#));
        let q = parse(&format!(
            r#"{{"architectures": ["Qwen3MoeForCausalLM"], {}, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}}"#,
            layers(6)
        ))
        .unwrap();
        let moe = q.moe.unwrap();
        // Every 2nd layer counting from 1 (indices 1, 3, 5), less layer 3.
        assert_eq!(moe.sparse_layers, vec![false, true, false, false, false, true]);
        assert_eq!((moe.num_experts, moe.top_k, moe.expert_intermediate_size), (8, 2, 6));
        assert!(!moe.renormalize, "transformers' default norm_topk_prob is false");
        assert_eq!(q.block.qk_norm, QkNorm::PerHead);

        let m = parse(&format!(
            r#"{{"architectures": ["MixtralForCausalLM"], {BASE}, "num_local_experts": 4, "sliding_window": 32}}"#
        ))
        .unwrap();
        let moe = m.moe.unwrap();
        assert_eq!((moe.num_experts, moe.expert_intermediate_size, moe.renormalize), (4, 16, true));
        assert_eq!((moe.sparse_layers, moe.names), (vec![true, true], ExpertNames::Mixtral));
        assert_eq!(m.layer_sliding_windows, vec![Some(32), Some(32)]);

        let e = parse(&format!(
            r#"{{"architectures": ["MixtralForCausalLM"], {BASE}, "num_local_experts": 4, "num_experts_per_tok": 5}}"#
        ))
        .unwrap_err();
        assert!(e.contains("num_experts_per_tok (5) must be between 1 and the number of experts (4)"), "{e}");
        assert!(parse(&format!(r#"{{"architectures": ["LlamaForCausalLM"], {BASE}}}"#))
            .unwrap()
            .moe
            .is_none());
    }
}
