//! Shared by the benches: a SmolLM2-135M-shaped llama with random weights made in Rust.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ferrite_engine::forward_input::ForwardInput;
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::model::arch::{build_model, CpuWeights, LinearWeights, Model};
use ferrite_engine::model::hf_config::{
    Architecture, BlockConfig, ExpertNames, ModelConfig, MoeConfig, RopeConfig, RopeScaling,
};

pub fn smollm2_135m() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        max_model_len: None,
        tie_word_embeddings: true,
        rope: RopeConfig { theta: 100_000.0, scaling: RopeScaling::Default },
        local_rope: None,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        block: BlockConfig::llama(64),
        moe: None,
        weights_prefix: None,
        layer_sliding_windows: vec![None; 30],
        weight_dtype: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// The SmolLM2-135M shape as a mixture (Mixtral's layout): `experts` gated MLPs of its 1536 per
/// layer, `top_k` of them per token.
pub fn smollm2_135m_moe(experts: usize, top_k: usize) -> ModelConfig {
    let base = smollm2_135m();
    ModelConfig {
        architecture: Architecture::Mixtral,
        moe: Some(MoeConfig {
            num_experts: experts,
            top_k,
            expert_intermediate_size: base.intermediate_size,
            renormalize: true,
            sparse_layers: vec![true; base.num_hidden_layers],
            names: ExpertNames::Mixtral,
        }),
        ..base
    }
}

/// Random weights under the checkpoint's own names, the linear ones (and the tied head) held as
/// `weights` says; returns the model and the bytes it holds them in.
pub fn random_model(cfg: &ModelConfig, weights: CpuWeights) -> (Box<dyn Model>, usize) {
    let dev = Device::Cpu;
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            shapes.push((format!("{p}.{name}"), shape));
        }
        match &cfg.moe {
            // Mixtral's names: a router and `num_experts` gated MLPs.
            Some(moe) if moe.sparse_layers[l] => {
                let (e, ie) = (moe.num_experts, moe.expert_intermediate_size);
                shapes.push((format!("{p}.block_sparse_moe.gate.weight"), vec![e, h]));
                for x in 0..e {
                    let ep = format!("{p}.block_sparse_moe.experts.{x}");
                    shapes.push((format!("{ep}.w1.weight"), vec![ie, h]));
                    shapes.push((format!("{ep}.w3.weight"), vec![ie, h]));
                    shapes.push((format!("{ep}.w2.weight"), vec![h, ie]));
                }
            }
            _ => {
                shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                shapes.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            }
        }
    }
    let tensors: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let t = if shape.len() == 1 {
                Tensor::ones(shape, DType::F32, &dev)
            } else {
                Tensor::randn(0f32, 0.02, shape, &dev)
            };
            (name, t.expect("random tensor"))
        })
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let dtypes = LinearWeights::new(weights, HashMap::new());
    let model = build_model(cfg, vb, &dtypes).expect("model builds");
    let bytes = model.weight_bytes();
    (model, bytes)
}

/// One forward step on a rayon worker, as the engine runs CPU steps (so each parallel
/// operation splits inside the pool instead of waking it from outside).
pub fn step_in_pool(model: &mut dyn Model, input: &ForwardInput, kv: &mut KvCache) -> Tensor {
    let mut out = None;
    let slot = &mut out;
    rayon::scope(move |_| *slot = Some(model.forward(input, kv).expect("forward")));
    out.expect("the scope ran the step")
}
