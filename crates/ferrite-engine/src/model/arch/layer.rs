//! One decoder layer and its parts, as each family's switches build them: attention (separate
//! or fused q/k/v, q/k norms, partial or per-layer-type RoPE, soft-cap, window), the
//! feed-forward (a gated MLP, or a mixture of experts in [`super::moe`]), and the norms around
//! them ([`LayerNorms`]: pre, sandwich or post). Weight paths spell the checkpoint's names.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::{RmsNorm, VarBuilder};

use crate::model::arch::moe::MoeBlock;
use crate::model::arch::LinearWeights;
use crate::model::hf_config::{ExpertNames, ModelConfig, NormPlacement, NormWeight, Projections, QkNorm};
use crate::ops::activation::{gated, Activation};
use crate::ops::fused::{residual_norm, split_rotate, QkNorms, QkvHeads, QkvParts};
use crate::ops::linear::{tensor_bytes, Linear};
use crate::ops::paged_attention::{paged_attention, write_kv, AttentionMetadata, AttentionParams};
use crate::ops::quantized::quantize_matrix;

pub(super) fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    dtypes: &LinearWeights,
) -> candle_core::Result<Linear> {
    let path = format!("{}.weight", vb.prefix());
    let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
    if let Some(q) = dtypes.quantized(&path) {
        if q.dims() != (out_dim, in_dim) {
            candle_core::bail!("{path}: shape {:?}, expected ({out_dim}, {in_dim})", q.dims());
        }
        return Linear::quantized(q, bias, dtypes.products());
    }
    if let Some(kind) = dtypes.quantize_to() {
        let weight = vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), DType::F32)?;
        return Linear::quantized(Arc::new(quantize_matrix(&weight, kind)?), bias, dtypes.products());
    }
    let dtype = dtypes.weight(&path, vb.dtype(), vb.device());
    let weight = vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), dtype)?;
    Ok(Linear::new(weight, bias, vb.dtype())?.for_bf16_products(dtypes.products().bf16))
}

pub(super) fn rms_norm(dim: usize, cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<RmsNorm> {
    let weight = vb.get(dim, "weight")?;
    let weight = match cfg.block.norm_weight {
        NormWeight::Scale => weight,
        // Gemma's `x̂ · (1 + w)`: the sum taken once, in f32 as transformers takes it.
        NormWeight::OffsetFromOne => (weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(weight.dtype())?,
    };
    Ok(RmsNorm::new(weight, cfg.rms_norm_eps))
}

pub(super) fn norm_bytes(n: &RmsNorm) -> usize {
    tensor_bytes(n.weight())
}

pub(super) struct Attention {
    /// q_proj, k_proj and v_proj stacked into one product (rows q, then k, then v): one
    /// matmul per layer instead of three (fewer dispatches on a CPU, fewer launches on a GPU).
    qkv_proj: Linear,
    o_proj: Linear,
    /// RMSNorms on q and k before RoPE, per head or over the whole projection (`qk_norm`).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    qk_norm: QkNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    params: AttentionParams,
    /// Rotated by the sliding-window layers' own RoPE (Gemma 3's local layers).
    local_rope: bool,
}

impl Attention {
    fn load(
        cfg: &ModelConfig,
        layer: usize,
        vb: VarBuilder,
        dt: &LinearWeights,
    ) -> candle_core::Result<Self> {
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let block = &cfg.block;
        let (q_norm_dim, k_norm_dim) = match block.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(d), Some(d)),
            QkNorm::WholeProjection => (Some(h * d), Some(kvh * d)),
        };
        let norm = |dim: Option<usize>, name: &str| -> candle_core::Result<Option<RmsNorm>> {
            dim.map(|dim| rms_norm(dim, cfg, vb.pp(name))).transpose()
        };
        let qkv_proj = match block.projections {
            Projections::Separate => {
                let q_proj = linear(cfg.hidden_size, h * d, cfg.qkv_bias, vb.pp("q_proj"), dt)?;
                let k_proj = linear(cfg.hidden_size, kvh * d, cfg.qkv_bias, vb.pp("k_proj"), dt)?;
                let v_proj = linear(cfg.hidden_size, kvh * d, cfg.qkv_bias, vb.pp("v_proj"), dt)?;
                Linear::stacked(&[q_proj, k_proj, v_proj])?
            }
            Projections::Fused => {
                linear(cfg.hidden_size, (h + 2 * kvh) * d, cfg.qkv_bias, vb.pp("qkv_proj"), dt)?
            }
        };
        let sliding_window = cfg.layer_sliding_windows[layer];
        Ok(Self {
            qkv_proj,
            o_proj: linear(h * d, cfg.hidden_size, cfg.o_bias, vb.pp("o_proj"), dt)?,
            q_norm: norm(q_norm_dim, "q_norm")?,
            k_norm: norm(k_norm_dim, "k_norm")?,
            qk_norm: block.qk_norm,
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            params: AttentionParams {
                scale: block.attention_scale,
                sliding_window,
                softcap: block.attn_softcap,
            },
            local_rope: sliding_window.is_some() && cfg.local_rope.is_some(),
        })
    }

    pub(super) fn num_bytes(&self) -> usize {
        let qk_norms: usize = [&self.q_norm, &self.k_norm].into_iter().flatten().map(norm_bytes).sum();
        self.qkv_proj.num_bytes() + self.o_proj.num_bytes() + qk_norms
    }

    /// Whether this layer is rotated by the sliding-window layers' own RoPE.
    pub(super) fn uses_local_rope(&self) -> bool {
        self.local_rope
    }

    /// x: `[num_tokens, hidden]`; cos/sin: `[num_tokens, rotary_dim / 2]`.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &(Tensor, Tensor),
        meta: &AttentionMetadata,
    ) -> candle_core::Result<Tensor> {
        let t = x.dim(0)?;
        let (q, k, v) = self.rotated_qkv(x, cos, sin)?;
        write_kv(&k, &v, &cache.0, &cache.1, meta)?;
        let out = paged_attention(&q, &cache.0, &cache.1, meta, &self.params)?;
        self.o_proj.forward(&out.reshape((t, self.num_heads * self.head_dim))?)
    }

    /// q `[t, heads, head_dim]`, k and v `[t, kv_heads, head_dim]`, q and k normed (where the
    /// family has q/k norms) and rotated.
    fn rotated_qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let parts = QkvParts {
            heads: QkvHeads {
                num_heads: self.num_heads,
                num_kv_heads: self.num_kv_heads,
                head_dim: self.head_dim,
            },
            bias: self.qkv_proj.bias(),
            qk_norms: self.q_norm.as_ref().zip(self.k_norm.as_ref()).map(|(q, k)| match self.qk_norm {
                QkNorm::WholeProjection => QkNorms::Whole(q, k),
                QkNorm::PerHead | QkNorm::None => QkNorms::PerHead(q, k),
            }),
        };
        split_rotate(&self.qkv_proj.forward_unbiased(x)?, &parts, cos, sin)
    }
}

/// A gated MLP's projections, by the checkpoint's names for them.
#[derive(Clone, Copy)]
pub(super) struct MlpNames {
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

pub(super) const MLP_NAMES: MlpNames = MlpNames { gate: "gate_proj", up: "up_proj", down: "down_proj" };

/// `down(act(gate(x)) · up(x))`: a dense layer's MLP, or one expert of a mixture.
pub(super) struct Mlp {
    /// gate_proj and up_proj stacked into one product (rows gate, then up), or the
    /// checkpoint's own fused `gate_up_proj` (the same layout).
    gate_up_proj: Linear,
    intermediate: usize,
    activation: Activation,
    down_proj: Linear,
}

impl Mlp {
    /// The dense MLP of a layer (`intermediate_size`, the family's projections).
    fn load(cfg: &ModelConfig, vb: VarBuilder, dt: &LinearWeights) -> candle_core::Result<Self> {
        if cfg.block.projections == Projections::Fused {
            let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
            return Ok(Self {
                gate_up_proj: linear(h, 2 * i, b, vb.pp("gate_up_proj"), dt)?,
                intermediate: i,
                activation: cfg.block.activation,
                down_proj: linear(i, h, b, vb.pp("down_proj"), dt)?,
            });
        }
        Self::load_named(cfg, cfg.intermediate_size, MLP_NAMES, vb, dt)
    }

    /// Separate gate, up and down projections under `names`, `intermediate` wide.
    pub(super) fn load_named(
        cfg: &ModelConfig,
        intermediate: usize,
        names: MlpNames,
        vb: VarBuilder,
        dt: &LinearWeights,
    ) -> candle_core::Result<Self> {
        let (h, i, b) = (cfg.hidden_size, intermediate, cfg.mlp_bias);
        let gate_proj = linear(h, i, b, vb.pp(names.gate), dt)?;
        let up_proj = linear(h, i, b, vb.pp(names.up), dt)?;
        Ok(Self {
            gate_up_proj: Linear::stacked(&[gate_proj, up_proj])?,
            intermediate: i,
            activation: cfg.block.activation,
            down_proj: linear(i, h, b, vb.pp(names.down), dt)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        self.down_proj.forward(&gated(&gate_up, self.intermediate, self.activation)?)
    }

    pub(super) fn num_bytes(&self) -> usize {
        self.gate_up_proj.num_bytes() + self.down_proj.num_bytes()
    }
}

/// A layer's feed-forward part: one MLP, or a mixture of experts.
pub(super) enum FeedForward {
    Dense(Mlp),
    Experts(MoeBlock),
}

impl FeedForward {
    pub(super) fn load(
        cfg: &ModelConfig,
        layer: usize,
        vb: &VarBuilder,
        dt: &LinearWeights,
    ) -> candle_core::Result<Self> {
        match &cfg.moe {
            Some(moe) if moe.sparse_layers[layer] => {
                let prefix = match moe.names {
                    ExpertNames::Qwen => "mlp",
                    ExpertNames::Mixtral => "block_sparse_moe",
                };
                Ok(Self::Experts(MoeBlock::load(cfg, moe, vb.pp(prefix), dt)?))
            }
            _ => Ok(Self::Dense(Mlp::load(cfg, vb.pp("mlp"), dt)?)),
        }
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Experts(moe) => moe.forward(x),
        }
    }

    fn num_bytes(&self) -> usize {
        match self {
            Self::Dense(mlp) => mlp.num_bytes(),
            Self::Experts(moe) => moe.num_bytes(),
        }
    }
}

/// A layer's RMSNorms, by the sublayer they sit before or after (each family's names for them
/// are in [`LayerNorms::load`]).
pub(super) struct LayerNorms {
    pub(super) pre_attn: Option<RmsNorm>,
    pub(super) post_attn: Option<RmsNorm>,
    pub(super) pre_mlp: Option<RmsNorm>,
    pub(super) post_mlp: Option<RmsNorm>,
}

impl LayerNorms {
    fn load(cfg: &ModelConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let n = |name: &str| rms_norm(cfg.hidden_size, cfg, vb.pp(name)).map(Some);
        Ok(match cfg.block.norms {
            NormPlacement::Pre => Self {
                pre_attn: n("input_layernorm")?,
                post_attn: None,
                pre_mlp: n("post_attention_layernorm")?,
                post_mlp: None,
            },
            NormPlacement::Sandwich => Self {
                pre_attn: n("input_layernorm")?,
                post_attn: n("post_attention_layernorm")?,
                pre_mlp: n("pre_feedforward_layernorm")?,
                post_mlp: n("post_feedforward_layernorm")?,
            },
            NormPlacement::Post => Self {
                pre_attn: None,
                post_attn: n("post_attention_layernorm")?,
                pre_mlp: None,
                post_mlp: n("post_feedforward_layernorm")?,
            },
        })
    }

    fn num_bytes(&self) -> usize {
        [&self.pre_attn, &self.post_attn, &self.pre_mlp, &self.post_mlp]
            .into_iter()
            .flatten()
            .map(norm_bytes)
            .sum()
    }
}

pub(super) struct DecoderLayer {
    pub(super) norms: LayerNorms,
    pub(super) self_attn: Attention,
    pub(super) mlp: FeedForward,
}

impl DecoderLayer {
    /// Layer `layer`, `vb` at `model.layers.{layer}`.
    pub(super) fn load(
        cfg: &ModelConfig,
        layer: usize,
        vb: VarBuilder,
        dt: &LinearWeights,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norms: LayerNorms::load(cfg, &vb)?,
            self_attn: Attention::load(cfg, layer, vb.pp("self_attn"), dt)?,
            mlp: FeedForward::load(cfg, layer, &vb, dt)?,
        })
    }

    pub(super) fn num_bytes(&self) -> usize {
        self.norms.num_bytes() + self.self_attn.num_bytes() + self.mlp.num_bytes()
    }

    /// Whether its projections take bf16 activations (all or none do: one policy loads them).
    pub(super) fn takes_bf16_activations(&self) -> bool {
        self.self_attn.qkv_proj.takes_bf16_activations()
    }

    /// Its experts are picked on the host from each step's router output.
    pub(super) fn is_routed(&self) -> bool {
        matches!(self.mlp, FeedForward::Experts(_))
    }
}

/// `(x + y, norm(x + y))`; the sum twice where the next sublayer takes it unnormed (OLMo 2).
pub(super) fn add_then_norm(
    x: &Tensor,
    y: &Tensor,
    norm: Option<&RmsNorm>,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    match norm {
        Some(n) => residual_norm(x, y, n, eps),
        None => {
            let sum = (x + y)?;
            Ok((sum.clone(), sum))
        }
    }
}
