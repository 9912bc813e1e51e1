//! The decoder: Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3, Granite, OLMo 2, Phi-3, and the
//! mixtures Qwen3-MoE and Mixtral, in one implementation whose differences are config switches
//! ([`BlockConfig`]: where the norms sit, q/k norms, fused projections, the activation,
//! scalings and soft-caps, sliding windows, partial and per-layer RoPE, biases, tied
//! embeddings; a layer's feed-forward is an MLP or a mixture of experts, [`super::moe`]). Weight paths spell the
//! checkpoint's own names, so `load` is the weight map.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::forward_input::ForwardInput;
use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::model::arch::moe::MoeBlock;
use crate::model::arch::rope::Rotary;
use crate::model::arch::{LinearWeights, Model};
use crate::model::hf_config::{
    BlockConfig, ExpertNames, ModelConfig, NormPlacement, NormWeight, Projections, QkNorm,
};
use crate::ops::activation::{gated, Activation};
use crate::ops::fused::{residual_norm, split_rotate, QkNorms, QkvHeads, QkvParts};
use crate::ops::linear::{tensor_bytes, Linear};
use crate::ops::paged_attention::{paged_attention, write_kv, AttentionMetadata, AttentionParams};
use crate::ops::quantized::{quantize_matrix, QuantizedMatrix};

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
        return Linear::quantized(q, bias);
    }
    if let Some(kind) = dtypes.quantize_to() {
        let weight = vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), DType::F32)?;
        return Linear::quantized(Arc::new(quantize_matrix(&weight, kind)?), bias);
    }
    let dtype = dtypes.weight(&path, vb.dtype(), vb.device());
    let weight = vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), dtype)?;
    Linear::new(weight, bias, vb.dtype())
}

fn rms_norm(dim: usize, cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<RmsNorm> {
    let weight = vb.get(dim, "weight")?;
    let weight = match cfg.block.norm_weight {
        NormWeight::Scale => weight,
        // Gemma's `x̂ · (1 + w)`: the sum taken once, in f32 as transformers takes it.
        NormWeight::OffsetFromOne => (weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(weight.dtype())?,
    };
    Ok(RmsNorm::new(weight, cfg.rms_norm_eps))
}

fn norm_bytes(n: &RmsNorm) -> usize {
    tensor_bytes(n.weight())
}

struct Attention {
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

    /// x: `[num_tokens, hidden]`; cos/sin: `[num_tokens, head_dim / 2]`.
    fn forward(
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
enum FeedForward {
    Dense(Mlp),
    Experts(MoeBlock),
}

impl FeedForward {
    fn load(
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

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
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
struct LayerNorms {
    pre_attn: Option<RmsNorm>,
    post_attn: Option<RmsNorm>,
    pre_mlp: Option<RmsNorm>,
    post_mlp: Option<RmsNorm>,
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

struct DecoderLayer {
    norms: LayerNorms,
    self_attn: Attention,
    mlp: FeedForward,
}

/// `(x + y, norm(x + y))`; the sum twice where the next sublayer takes it unnormed (OLMo 2).
fn add_then_norm(
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

/// Where token embeddings are looked up.
enum TokenEmbedding {
    Dense(Embedding),
    /// Tied to the LM head, whose weight is in CPU panels (packed f32/bf16/f16 computing in
    /// f32, or int8 blocks): rows come out of its panels, widened to f32.
    TiedPanels,
    /// In a GGUF block format (the LM head's own blocks when tied): looked-up rows are
    /// dequantized.
    Quantized(Arc<QuantizedMatrix>),
}

/// A tied head and embedding from one block-format matrix, held once: the head's int8 panels
/// serve the lookups where it has them, else both share the blocks.
fn tied_quantized(q: Arc<QuantizedMatrix>) -> candle_core::Result<(Linear, TokenEmbedding)> {
    let lm_head = Linear::quantized(q.clone(), None)?;
    let embed =
        if lm_head.blocks().is_some() { TokenEmbedding::TiedPanels } else { TokenEmbedding::Quantized(q) };
    Ok((lm_head, embed))
}

/// Every dense family, for causal LM.
pub struct Decoder {
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    /// The sliding-window layers' own RoPE, where it differs (Gemma 3).
    local_rotary: Option<Rotary>,
    /// The switches the forward pass reads (scalings and soft-caps).
    block: BlockConfig,
    cache_spec: KvCacheSpec,
    vocab_size: usize,
    /// The RMSNorms' epsilon (for the fused residual add and norm on CUDA).
    rms_norm_eps: f32,
    dtype: DType,
    device: Device,
}

impl Decoder {
    pub fn load(cfg: &ModelConfig, vb: VarBuilder, dt: &LinearWeights) -> candle_core::Result<Self> {
        let m = vb.pp("model");
        let embed_shape = (cfg.vocab_size, cfg.hidden_size);
        // The checkpoint's name for it (under the model's prefix, where it has one).
        let embed_path = format!("{}.weight", m.pp("embed_tokens").prefix());
        if let Some(q) = dt.quantized(&embed_path) {
            if q.dims() != embed_shape {
                candle_core::bail!("{embed_path}: shape {:?}, expected {embed_shape:?}", q.dims());
            }
            if cfg.tie_word_embeddings {
                let (lm_head, embed) = tied_quantized(q)?;
                return Self::load_layers(cfg, vb, dt, embed, lm_head);
            }
            let lm_head = linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"), dt)?;
            return Self::load_layers(cfg, vb, dt, TokenEmbedding::Quantized(q), lm_head);
        }
        if let (Some(kind), true) = (dt.quantize_to(), cfg.tie_word_embeddings) {
            // Quantized as the head, whose blocks serve the lookups too (held once).
            let weight = m.pp("embed_tokens").get_with_hints_dtype(
                embed_shape,
                "weight",
                Default::default(),
                DType::F32,
            )?;
            let q = Arc::new(quantize_matrix(&weight, kind)?);
            drop(weight);
            let (lm_head, embed) = tied_quantized(q)?;
            return Self::load_layers(cfg, vb, dt, embed, lm_head);
        }
        // Held as the linear weights are (a packed head serves the lookups of a tied one, else
        // the looked-up rows are widened to the compute dtype).
        let embed_dtype = dt.weight(&embed_path, vb.dtype(), vb.device());
        let embed_weight = m.pp("embed_tokens").get_with_hints_dtype(
            embed_shape,
            "weight",
            Default::default(),
            embed_dtype,
        )?;
        let (lm_head, embed_tokens) = if cfg.tie_word_embeddings {
            let lm_head = Linear::new(embed_weight.clone(), None, vb.dtype())?;
            // Packed for the CPU, the head's panels serve the lookups too: the matrix is held
            // once (the tensor is dropped here), as it is when both share the tensor.
            let embed = match lm_head.packed() {
                Some(_) => {
                    // Freed now, not after every layer has loaded beside it.
                    drop(embed_weight);
                    TokenEmbedding::TiedPanels
                }
                None => TokenEmbedding::Dense(Embedding::new(embed_weight, cfg.hidden_size)),
            };
            (lm_head, embed)
        } else {
            let lm_head = linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"), dt)?;
            (lm_head, TokenEmbedding::Dense(Embedding::new(embed_weight, cfg.hidden_size)))
        };
        Self::load_layers(cfg, vb, dt, embed_tokens, lm_head)
    }

    /// The rest of the model, once the embedding and the head are in place.
    fn load_layers(
        cfg: &ModelConfig,
        vb: VarBuilder,
        dt: &LinearWeights,
        embed_tokens: TokenEmbedding,
        lm_head: Linear,
    ) -> candle_core::Result<Self> {
        let m = vb.pp("model");
        // On a GPU the tables live there, gathered per step by position (a CUDA graph reads
        // positions from a buffer); the CPU computes a step's rows, holding no table.
        let rotary = |rope| -> candle_core::Result<Rotary> {
            let context_len = cfg.max_model_len.unwrap_or(cfg.max_position_embeddings);
            let rotary = Rotary::new(rope, cfg.block.rotary_dim, context_len);
            match vb.device() {
                Device::Cpu => Ok(rotary),
                device => rotary.with_table(cfg.max_position_embeddings, vb.dtype(), device),
            }
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp("layers").pp(i);
                Ok(DecoderLayer {
                    norms: LayerNorms::load(cfg, &l)?,
                    self_attn: Attention::load(cfg, i, l.pp("self_attn"), dt)?,
                    mlp: FeedForward::load(cfg, i, &l, dt)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(cfg.hidden_size, cfg, m.pp("norm"))?,
            lm_head,
            rotary: rotary(&cfg.rope)?,
            local_rotary: cfg.local_rope.as_ref().map(rotary).transpose()?,
            block: cfg.block.clone(),
            cache_spec: KvCacheSpec {
                num_layers: cfg.num_hidden_layers,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                dtype: vb.dtype(),
            },
            vocab_size: cfg.vocab_size,
            rms_norm_eps: cfg.rms_norm_eps as f32,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }
}

impl Decoder {
    /// A sublayer's output as it joins the residual stream: normed (Gemma, OLMo 2) and scaled
    /// (Granite) where the family does.
    fn joined(&self, out: Tensor, post_norm: Option<&RmsNorm>) -> candle_core::Result<Tensor> {
        let out = match post_norm {
            Some(n) => n.forward(&out)?,
            None => out,
        };
        match self.block.residual_scale {
            Some(s) => out.affine(s, 0.0),
            None => Ok(out),
        }
    }

    /// Logits from the head's output, in f32: divided (Granite) and soft-capped (Gemma) where
    /// the family does.
    fn finished_logits(&self, logits: Tensor) -> candle_core::Result<Tensor> {
        let mut logits = logits.to_dtype(DType::F32)?;
        if let Some(d) = self.block.logits_divisor {
            logits = logits.broadcast_div(&Tensor::new(d, logits.device())?)?;
        }
        if let Some(cap) = self.block.final_softcap {
            let cap = Tensor::new(cap, logits.device())?;
            logits = logits.broadcast_div(&cap)?.tanh()?.broadcast_mul(&cap)?;
        }
        Ok(logits)
    }
}

impl Model for Decoder {
    fn kv_cache_spec(&self) -> KvCacheSpec {
        self.cache_spec
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn weight_bytes(&self) -> usize {
        let embed = match &self.embed_tokens {
            TokenEmbedding::Dense(e) => tensor_bytes(e.embeddings()),
            TokenEmbedding::TiedPanels => 0,
            // Tied: the head's own blocks, counted there.
            TokenEmbedding::Quantized(q) => match self.lm_head.quantized_weight() {
                Some(head) if Arc::ptr_eq(head, q) => 0,
                _ => q.num_bytes(),
            },
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let qk_norms: usize = [&a.q_norm, &a.k_norm].into_iter().flatten().map(norm_bytes).sum();
                l.norms.num_bytes()
                    + a.qkv_proj.num_bytes()
                    + a.o_proj.num_bytes()
                    + qk_norms
                    + l.mlp.num_bytes()
            })
            .sum();
        embed + layers + norm_bytes(&self.norm) + self.lm_head.num_bytes()
    }

    fn replayable(&self, positions: &[u32]) -> bool {
        // The packed and block-format embeddings read token ids on the host.
        // Experts are picked on the host from each step's router output.
        let routed = self.layers.iter().any(|l| matches!(l.mlp, FeedForward::Experts(_)));
        !routed
            && matches!(self.embed_tokens, TokenEmbedding::Dense(_))
            && self.rotary.table_holds(positions)
            && self.local_rotary.as_ref().is_none_or(|r| r.table_holds(positions))
    }

    fn forward(&self, input: &ForwardInput, kv: &mut KvCache) -> candle_core::Result<Tensor> {
        if kv.layers.len() != self.layers.len() {
            candle_core::bail!("KV cache has {} layers, model {}", kv.layers.len(), self.layers.len());
        }
        let tables = |r: &Rotary| r.cos_sin(&input.positions, &input.position_ids, self.dtype, &self.device);
        let global = tables(&self.rotary)?;
        let local = self.local_rotary.as_ref().map(tables).transpose()?;
        let mut x = match &self.embed_tokens {
            TokenEmbedding::Dense(e) => e.forward(&input.token_ids)?.to_dtype(self.dtype)?,
            TokenEmbedding::TiedPanels => self
                .lm_head
                .panel_rows(&input.token_ids)?
                .expect("invariant: TiedPanels is built from a head in CPU panels")
                .to_dtype(self.dtype)?,
            TokenEmbedding::Quantized(q) => q.gather_rows(&input.token_ids)?.to_dtype(self.dtype)?,
        };
        if let Some(s) = self.block.embedding_scale {
            // In the compute dtype, as transformers scales (Gemma rounds √hidden to it).
            x = x.affine(s, 0.0)?;
        }
        // Each residual add runs with the RMSNorm after it (one launch on CUDA).
        let eps = self.rms_norm_eps;
        let mut h = match self.layers.first().and_then(|l| l.norms.pre_attn.as_ref()) {
            Some(norm) => norm.forward(&x)?,
            None => x.clone(),
        };
        for (i, (layer, cache)) in self.layers.iter().zip(&kv.layers).enumerate() {
            let (cos, sin) = match (&local, layer.self_attn.local_rope) {
                (Some(local), true) => local,
                _ => &global,
            };
            let attn = layer.self_attn.forward(&h, cos, sin, cache, &input.attention)?;
            let attn = self.joined(attn, layer.norms.post_attn.as_ref())?;
            let (sum, normed) = add_then_norm(&x, &attn, layer.norms.pre_mlp.as_ref(), eps)?;
            let mlp = self.joined(layer.mlp.forward(&normed)?, layer.norms.post_mlp.as_ref())?;
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = add_then_norm(&sum, &mlp, next.norms.pre_attn.as_ref(), eps)?,
                None => x = (sum + mlp)?,
            }
        }
        let last = x.index_select(&input.logits_indices, 0)?;
        self.finished_logits(self.lm_head.forward(&self.norm.forward(&last)?)?)
    }
}
