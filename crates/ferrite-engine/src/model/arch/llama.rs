//! The Llama-family decoder: Llama, Mistral, Qwen2 and Qwen3 in one implementation whose
//! differences are config switches (biases, q/k norms, sliding windows, RoPE scaling, tied
//! embeddings). Weight paths spell the checkpoint's own names, so `load` is the weight map.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::forward_input::ForwardInput;
use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::model::arch::rope::Rotary;
use crate::model::arch::{LinearWeights, Model};
use crate::model::hf_config::ModelConfig;
use crate::ops::activation::silu_mul;
use crate::ops::fused::{residual_norm, split_rotate, QkvHeads, QkvParts};
use crate::ops::linear::{tensor_bytes, Linear};
use crate::ops::paged_attention::{paged_attention, write_kv, AttentionMetadata, AttentionParams};
use crate::ops::quantized::{quantize_matrix, QuantizedMatrix};

fn linear(
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

fn rms_norm(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(dim, "weight")?, eps))
}

struct Attention {
    /// q_proj, k_proj and v_proj stacked into one product (rows q, then k, then v): one
    /// matmul per layer instead of three (fewer dispatches on a CPU, fewer launches on a GPU).
    qkv_proj: Linear,
    o_proj: Linear,
    /// Qwen3: RMSNorm over each head's `head_dim` before RoPE.
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    params: AttentionParams,
}

impl Attention {
    fn load(
        cfg: &ModelConfig,
        layer: usize,
        vb: VarBuilder,
        dt: &LinearWeights,
    ) -> candle_core::Result<Self> {
        let (h, kvh, d) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let norm = |name: &str| -> candle_core::Result<Option<RmsNorm>> {
            cfg.qk_norm.then(|| rms_norm(d, cfg.rms_norm_eps, vb.pp(name))).transpose()
        };
        let q_proj = linear(cfg.hidden_size, h * d, cfg.qkv_bias, vb.pp("q_proj"), dt)?;
        let k_proj = linear(cfg.hidden_size, kvh * d, cfg.qkv_bias, vb.pp("k_proj"), dt)?;
        let v_proj = linear(cfg.hidden_size, kvh * d, cfg.qkv_bias, vb.pp("v_proj"), dt)?;
        Ok(Self {
            qkv_proj: Linear::stacked(&[q_proj, k_proj, v_proj])?,
            o_proj: linear(h * d, cfg.hidden_size, cfg.o_bias, vb.pp("o_proj"), dt)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: h,
            num_kv_heads: kvh,
            head_dim: d,
            params: AttentionParams {
                scale: 1.0 / (d as f32).sqrt(),
                sliding_window: cfg.layer_sliding_windows[layer],
                softcap: None,
            },
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

    /// q `[t, heads, head_dim]`, k and v `[t, kv_heads, head_dim]`, q and k normed (Qwen3) and
    /// rotated.
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
            qk_norms: self.q_norm.as_ref().zip(self.k_norm.as_ref()),
        };
        split_rotate(&self.qkv_proj.forward_unbiased(x)?, &parts, cos, sin)
    }
}

struct Mlp {
    /// gate_proj and up_proj stacked into one product (rows gate, then up).
    gate_up_proj: Linear,
    intermediate: usize,
    down_proj: Linear,
}

impl Mlp {
    fn load(cfg: &ModelConfig, vb: VarBuilder, dt: &LinearWeights) -> candle_core::Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let gate_proj = linear(h, i, b, vb.pp("gate_proj"), dt)?;
        let up_proj = linear(h, i, b, vb.pp("up_proj"), dt)?;
        Ok(Self {
            gate_up_proj: Linear::stacked(&[gate_proj, up_proj])?,
            intermediate: i,
            down_proj: linear(i, h, b, vb.pp("down_proj"), dt)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        self.down_proj.forward(&silu_mul(&gate_up, self.intermediate)?)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
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

/// Llama / Mistral / Qwen2 / Qwen3 for causal LM.
pub struct LlamaFamily {
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    cache_spec: KvCacheSpec,
    vocab_size: usize,
    /// The RMSNorms' epsilon (for the fused residual add and norm on CUDA).
    rms_norm_eps: f32,
    dtype: DType,
    device: Device,
}

impl LlamaFamily {
    pub fn load(cfg: &ModelConfig, vb: VarBuilder, dt: &LinearWeights) -> candle_core::Result<Self> {
        let m = vb.pp("model");
        let embed_shape = (cfg.vocab_size, cfg.hidden_size);
        if let Some(q) = dt.quantized("model.embed_tokens.weight") {
            if q.dims() != embed_shape {
                candle_core::bail!(
                    "model.embed_tokens.weight: shape {:?}, expected {embed_shape:?}",
                    q.dims()
                );
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
        let embed_dtype = dt.weight("model.embed_tokens.weight", vb.dtype(), vb.device());
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
        let rotary = Rotary::new(&cfg.rope, cfg.head_dim);
        // On a GPU the tables live there, gathered per step by position (a CUDA graph reads
        // positions from a buffer); the CPU computes a step's rows, holding no table.
        let rotary = match vb.device() {
            Device::Cpu => rotary,
            device => rotary.with_table(cfg.max_position_embeddings, vb.dtype(), device)?,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp("layers").pp(i);
                Ok(DecoderLayer {
                    input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, l.pp("input_layernorm"))?,
                    self_attn: Attention::load(cfg, i, l.pp("self_attn"), dt)?,
                    post_attention_layernorm: rms_norm(
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                        l.pp("post_attention_layernorm"),
                    )?,
                    mlp: Mlp::load(cfg, l.pp("mlp"), dt)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, m.pp("norm"))?,
            lm_head,
            rotary,
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

impl Model for LlamaFamily {
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
        let norm = |n: &RmsNorm| tensor_bytes(n.weight());
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
                let qk_norms: usize = [&a.q_norm, &a.k_norm].into_iter().flatten().map(norm).sum();
                norm(&l.input_layernorm)
                    + norm(&l.post_attention_layernorm)
                    + a.qkv_proj.num_bytes()
                    + a.o_proj.num_bytes()
                    + qk_norms
                    + l.mlp.gate_up_proj.num_bytes()
                    + l.mlp.down_proj.num_bytes()
            })
            .sum();
        embed + layers + norm(&self.norm) + self.lm_head.num_bytes()
    }

    fn replayable(&self, positions: &[u32]) -> bool {
        // The packed and block-format embeddings read token ids on the host.
        matches!(self.embed_tokens, TokenEmbedding::Dense(_)) && self.rotary.table_holds(positions)
    }

    fn forward(&self, input: &ForwardInput, kv: &mut KvCache) -> candle_core::Result<Tensor> {
        if kv.layers.len() != self.layers.len() {
            candle_core::bail!("KV cache has {} layers, model {}", kv.layers.len(), self.layers.len());
        }
        let (cos, sin) =
            self.rotary.cos_sin(&input.positions, &input.position_ids, self.dtype, &self.device)?;
        let mut x = match &self.embed_tokens {
            TokenEmbedding::Dense(e) => e.forward(&input.token_ids)?.to_dtype(self.dtype)?,
            TokenEmbedding::TiedPanels => self
                .lm_head
                .panel_rows(&input.token_ids)?
                .expect("invariant: TiedPanels is built from a head in CPU panels")
                .to_dtype(self.dtype)?,
            TokenEmbedding::Quantized(q) => q.gather_rows(&input.token_ids)?.to_dtype(self.dtype)?,
        };
        // Each residual add runs with the RMSNorm after it (one launch on CUDA).
        let eps = self.rms_norm_eps;
        let mut h = match self.layers.first() {
            Some(first) => first.input_layernorm.forward(&x)?,
            None => x.clone(),
        };
        for (i, (layer, cache)) in self.layers.iter().zip(&kv.layers).enumerate() {
            let attn = layer.self_attn.forward(&h, &cos, &sin, cache, &input.attention)?;
            let (sum, normed) = residual_norm(&x, &attn, &layer.post_attention_layernorm, eps)?;
            let mlp = layer.mlp.forward(&normed)?;
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = residual_norm(&sum, &mlp, &next.input_layernorm, eps)?,
                None => x = (sum + mlp)?,
            }
        }
        let last = x.index_select(&input.logits_indices, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        logits.to_dtype(DType::F32)
    }
}
