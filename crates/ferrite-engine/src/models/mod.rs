//! The one model trait, and the one place that picks an implementation by architecture.

pub mod llama;
pub mod rope;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::{Architecture, ModelConfig};
use crate::forward_input::ForwardInput;
use crate::kv_cache::{KvCache, KvCacheSpec};

/// A causal LM that runs one flat batch over a paged KV cache.
pub trait Model: Send {
    fn kv_cache_spec(&self) -> KvCacheSpec;
    fn vocab_size(&self) -> usize;
    fn device(&self) -> &Device;
    /// Writes the step's K/V into `kv` and returns f32 logits `[rows, vocab]` for the rows
    /// `input.logits_indices` names (each sequence's last scheduled token, or all of a chunk's).
    fn forward(&self, input: &ForwardInput, kv: &mut KvCache) -> candle_core::Result<Tensor>;
}

pub fn build_model(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Box<dyn Model>> {
    match cfg.architecture {
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 | Architecture::Qwen3 => {
            Ok(Box::new(llama::LlamaFamily::load(cfg, vb)?))
        }
    }
}
