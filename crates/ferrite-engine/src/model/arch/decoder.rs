//! The decoder: Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3, Granite, OLMo 2, Phi-3, and the
//! mixtures Qwen3-MoE and Mixtral, in one implementation whose differences are config switches
//! ([`BlockConfig`]: where the norms sit, q/k norms, fused projections, the activation,
//! scalings and soft-caps, sliding windows, partial and per-layer RoPE, biases, tied
//! embeddings). This file holds the model around the layers: the embedding and the head (tied,
//! packed or in blocks), the RoPE tables, the residual stream and the logits' finishing;
//! [`super::layer`] holds a layer's parts. Weight paths spell the checkpoint's own names, so
//! `load` is the weight map.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use super::layer::{add_then_norm, linear, norm_bytes, rms_norm, DecoderLayer};
use crate::forward_input::ForwardInput;
use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::model::arch::rope::Rotary;
use crate::model::arch::{LinearWeights, Model};
use crate::model::hf_config::{BlockConfig, ModelConfig};
use crate::ops::linear::{tensor_bytes, Linear};
use crate::ops::quantized::{quantize_matrix, CpuProducts, QuantizedMatrix};

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
fn tied_quantized(
    q: Arc<QuantizedMatrix>,
    products: CpuProducts,
) -> candle_core::Result<(Linear, TokenEmbedding)> {
    let lm_head = Linear::quantized(q.clone(), None, products)?;
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
    /// False for an embedding model without a head of its own.
    generates: bool,
    dtype: DType,
    device: Device,
}

/// The transformer's weights: under `model.` in a `…ForCausalLM` checkpoint, or at the root in
/// a bare `…Model` saved alone (sentence-transformers embedding checkpoints such as
/// Qwen3-Embedding: `embed_tokens.weight`, `layers.N.…`, `norm.weight`, the head tied).
fn body<'a>(vb: &VarBuilder<'a>) -> VarBuilder<'a> {
    if is_bare(vb) {
        vb.clone()
    } else {
        vb.pp("model")
    }
}

fn is_bare(vb: &VarBuilder) -> bool {
    !vb.contains_tensor("model.embed_tokens.weight") && vb.contains_tensor("embed_tokens.weight")
}

impl Decoder {
    pub fn load(cfg: &ModelConfig, vb: VarBuilder, dt: &LinearWeights) -> candle_core::Result<Self> {
        let m = body(&vb);
        // A bare untied checkpoint with no head (an embedding model such as e5-mistral): the
        // embedding stands in for the head so that the shapes hold, and nothing is generated.
        let headless = is_bare(&vb) && !cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight");
        if headless {
            tracing::info!(
                "no `lm_head.weight` in a bare checkpoint: an embedding model, which generates nothing"
            );
        }
        let tied = cfg.tie_word_embeddings || headless;
        let embed_shape = (cfg.vocab_size, cfg.hidden_size);
        // The checkpoint's name for it (under the model's prefix, where it has one).
        let embed_path = format!("{}.weight", m.pp("embed_tokens").prefix());
        if let Some(q) = dt.quantized(&embed_path) {
            if q.dims() != embed_shape {
                candle_core::bail!("{embed_path}: shape {:?}, expected {embed_shape:?}", q.dims());
            }
            if tied {
                let (lm_head, embed) = tied_quantized(q, dt.products())?;
                return Self::load_layers(cfg, vb, dt, embed, lm_head, !headless);
            }
            let lm_head = linear(cfg.hidden_size, cfg.vocab_size, false, vb.pp("lm_head"), dt)?;
            return Self::load_layers(cfg, vb, dt, TokenEmbedding::Quantized(q), lm_head, true);
        }
        if let (Some(kind), true) = (dt.quantize_to(), tied) {
            // Quantized as the head, whose blocks serve the lookups too (held once).
            let weight = m.pp("embed_tokens").get_with_hints_dtype(
                embed_shape,
                "weight",
                Default::default(),
                DType::F32,
            )?;
            let q = Arc::new(quantize_matrix(&weight, kind)?);
            drop(weight);
            let (lm_head, embed) = tied_quantized(q, dt.products())?;
            return Self::load_layers(cfg, vb, dt, embed, lm_head, !headless);
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
        let (lm_head, embed_tokens) = if tied {
            let lm_head =
                Linear::new(embed_weight.clone(), None, vb.dtype())?.for_bf16_products(dt.products().bf16);
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
        Self::load_layers(cfg, vb, dt, embed_tokens, lm_head, !headless)
    }

    /// The rest of the model, once the embedding and the head are in place.
    fn load_layers(
        cfg: &ModelConfig,
        vb: VarBuilder,
        dt: &LinearWeights,
        embed_tokens: TokenEmbedding,
        lm_head: Linear,
        generates: bool,
    ) -> candle_core::Result<Self> {
        let m = body(&vb);
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
                DecoderLayer::load(cfg, i, l, dt)
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
            generates,
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
    ///
    /// Scalars go in as the ops' parameters (`affine`), never as tensors made on the host: a
    /// step captured into a CUDA graph would replay a copy from host memory long freed.
    fn finished_logits(&self, logits: Tensor) -> candle_core::Result<Tensor> {
        let mut logits = logits.to_dtype(DType::F32)?;
        if let Some(d) = self.block.logits_divisor {
            logits = logits.affine(1.0 / f64::from(d), 0.0)?;
        }
        if let Some(cap) = self.block.final_softcap {
            let cap = f64::from(cap);
            logits = logits.affine(1.0 / cap, 0.0)?.tanh()?.affine(cap, 0.0)?;
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
        let layers: usize = self.layers.iter().map(DecoderLayer::num_bytes).sum();
        embed + layers + norm_bytes(&self.norm) + self.lm_head.num_bytes()
    }

    fn bf16_activations(&self) -> bool {
        self.lm_head.takes_bf16_activations() || self.layers.iter().any(DecoderLayer::takes_bf16_activations)
    }

    fn generates(&self) -> bool {
        self.generates
    }

    fn replayable(&self, positions: &[u32]) -> bool {
        // The packed and block-format embeddings read token ids on the host, and experts are
        // picked on the host from each step's router output.
        !self.layers.iter().any(DecoderLayer::is_routed)
            && matches!(self.embed_tokens, TokenEmbedding::Dense(_))
            && self.rotary.table_holds(positions)
            && self.local_rotary.as_ref().is_none_or(|r| r.table_holds(positions))
    }

    fn forward_with_hidden(
        &self,
        input: &ForwardInput,
        kv: &mut KvCache,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
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
            let (cos, sin) = match (&local, layer.self_attn.uses_local_rope()) {
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
        let logits = self.finished_logits(self.lm_head.forward(&self.norm.forward(&last)?)?)?;
        let hidden = match &input.hidden_indices {
            Some(rows) => Some(self.norm.forward(&x.index_select(rows, 0)?)?.to_dtype(DType::F32)?),
            None => None,
        };
        Ok((logits, hidden))
    }
}
