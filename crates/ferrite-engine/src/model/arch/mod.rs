//! The one model trait, and the one place that picks an implementation by architecture.

pub mod decoder;
mod layer;
pub mod moe;
pub mod rope;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::forward_input::ForwardInput;
use crate::kv_cache::{KvCache, KvCacheSpec};
use crate::model::hf_config::{Architecture, ModelConfig};
use crate::ops::quantized::{CpuProducts, Quantize, QuantizedMatrix};

/// A causal LM that runs one flat batch over a paged KV cache.
pub trait Model: Send {
    fn kv_cache_spec(&self) -> KvCacheSpec;
    fn vocab_size(&self) -> usize;
    fn device(&self) -> &Device;
    /// Bytes the weights occupy as held (packed or not): what one decode step reads at least.
    fn weight_bytes(&self) -> usize;
    /// Whether its CPU products of bf16 weights take bf16 activations on `vdpbf16ps`
    /// (`--bf16-activations`, where it applied).
    fn bf16_activations(&self) -> bool {
        false
    }
    /// Writes the step's K/V into `kv` and returns f32 logits `[rows, vocab]` for the rows
    /// `input.logits_indices` names (each sequence's last scheduled token, or all of a chunk's).
    fn forward(&self, input: &ForwardInput, kv: &mut KvCache) -> candle_core::Result<Tensor> {
        Ok(self.forward_with_hidden(input, kv)?.0)
    }
    /// [`Model::forward`], and the final-normed hidden states `[rows, hidden]` (f32) of the
    /// rows `input.hidden_indices` names, when it names any (for pooling).
    fn forward_with_hidden(
        &self,
        input: &ForwardInput,
        kv: &mut KvCache,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)>;
    /// Whether a forward pass over tokens at these positions reads every input from the
    /// input's device tensors and the cache (no per-step host data baked into its launches),
    /// so that a CUDA graph of it replays correctly with refilled inputs.
    fn replayable(&self, _positions: &[u32]) -> bool {
        false
    }

    /// Whether its logits mean anything: false for an embedding checkpoint without a head.
    fn generates(&self) -> bool {
        true
    }
}

pub fn build_model(
    cfg: &ModelConfig,
    vb: VarBuilder,
    linear_weights: &LinearWeights,
) -> candle_core::Result<Box<dyn Model>> {
    let vb = match &cfg.weights_prefix {
        Some(prefix) => vb.pp(prefix),
        None => vb,
    };
    // Every family so far is the one decoder with its switches (`cfg.block`, `cfg.moe`); a
    // family whose layer differs beyond them gets its own arm here.
    match cfg.architecture {
        Architecture::Llama
        | Architecture::Mistral
        | Architecture::Qwen2
        | Architecture::Qwen3
        | Architecture::Gemma2
        | Architecture::Gemma3
        | Architecture::Granite
        | Architecture::Olmo2
        | Architecture::Phi3
        | Architecture::Qwen3Moe
        | Architecture::Mixtral => Ok(Box::new(decoder::Decoder::load(cfg, vb, linear_weights)?)),
    }
}

/// The dtype the CPU keeps linear layers' weights in when it computes in f32 (the products read
/// packed panels of any of these; see `ops::packed`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CpuWeights {
    /// As the checkpoint stores each one (f32, bf16 or f16): nothing is rounded, and a bf16
    /// checkpoint's decode steps read half the bytes of an upcast copy.
    #[default]
    AsStored,
    /// Converted to this dtype (f32, bf16 or f16) at load.
    Cast(DType),
}

/// How each linear layer's weight loads: the dtype a plain one loads in, and the weights that
/// stay in a GGUF block format (which the `VarBuilder` does not hold).
#[derive(Debug, Clone, Default)]
pub struct LinearWeights {
    policy: CpuWeights,
    /// The checkpoint's tensors' stored dtypes, by name (for [`CpuWeights::AsStored`]).
    stored: HashMap<String, DType>,
    /// Block-format weights by name.
    quantized: HashMap<String, Arc<QuantizedMatrix>>,
    /// Quantize the other linear weights (and a tied embedding) into this format at load.
    quantize: Option<Quantize>,
    /// How block-format weights multiply on the CPU.
    products: CpuProducts,
}

impl LinearWeights {
    pub fn new(policy: CpuWeights, stored: HashMap<String, DType>) -> Self {
        Self { policy, stored, quantized: HashMap::new(), quantize: None, products: CpuProducts::default() }
    }

    /// Block-format weights multiply as `products` says.
    pub fn with_products(mut self, products: CpuProducts) -> Self {
        self.products = products;
        self
    }

    pub fn products(&self) -> CpuProducts {
        self.products
    }

    /// Linear weights not already in a block format are quantized into `kind` at load.
    pub fn with_quantize(mut self, kind: Option<Quantize>) -> Self {
        self.quantize = kind;
        self
    }

    pub fn quantize_to(&self) -> Option<Quantize> {
        self.quantize
    }

    /// With these block-format weights (by name) in place of the `VarBuilder`'s.
    pub fn with_quantized(mut self, quantized: HashMap<String, Arc<QuantizedMatrix>>) -> Self {
        self.quantized = quantized;
        self
    }

    /// The weight named `path`, where it stays in a block format.
    pub fn quantized(&self, path: &str) -> Option<Arc<QuantizedMatrix>> {
        self.quantized.get(path).cloned()
    }

    /// For the weight named `path`, in a model computing in `compute` on `device`: the
    /// policy's dtype on the CPU in f32, else `compute` (the only dtype candle's matmul takes).
    pub fn weight(&self, path: &str, compute: DType, device: &Device) -> DType {
        if !device.is_cpu() || compute != DType::F32 {
            return compute;
        }
        match self.policy {
            CpuWeights::AsStored => match self.stored.get(path) {
                Some(&d @ (DType::BF16 | DType::F16)) => d,
                _ => DType::F32,
            },
            CpuWeights::Cast(d) => d,
        }
    }
}
