//! Parity with Hugging Face transformers: for every fixture architecture and prompt, the f32
//! logits at the last prompt position, the greedy continuation and its log-probabilities equal
//! the reference transformers recorded (tests/fixtures/*/reference.json, made by
//! scripts/gen_fixtures.py), and the tokenizer and chat template produce the same ids.

mod common;

use std::path::Path;

use common::*;
use ferrite_engine::{load, EngineConfig, LoadOptions};

/// f32 against transformers' f32: the CPU sums in the same order families as torch; a GPU's
/// kernels (cuBLAS, our attention) reorder sums more, so they get 1e-3.
fn logit_tol(device: &ferrite_engine::Device) -> f32 {
    if device.is_cpu() {
        1e-4
    } else {
        1e-3
    }
}

fn check_fixture(dir: &Path) {
    let engine = check_prompts(dir, None, |_| true);
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    check_chat(&engine, &reference(dir), &name, "rendered template");
}

/// The reference prompts `which` picks, each alone through an engine whose sequences reach
/// `max_model_len` tokens (default: the model's): the distribution after the prompt, the greedy
/// tokens, their logprobs and text, as transformers gave them.
fn check_prompts(dir: &Path, max_model_len: Option<usize>, which: impl Fn(&PromptRef) -> bool) -> TestEngine {
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let device = test_device();
    let tol = logit_tol(&device);
    // f32 compute: the references are f32 (on the CPU the bf16 fixture's weights stay bf16
    // and are widened as each product loads them; transformers widened them up front).
    let opts =
        LoadOptions { dtype: Some(ferrite_engine::DType::F32), device, max_model_len, ..Default::default() };
    let m = load(dir.to_str().unwrap(), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let vocab = m.model.vocab_size();
    let config = match max_model_len {
        Some(len) => EngineConfig { max_model_len: len, ..test_config() },
        None => test_config(),
    };
    let engine = TestEngine::start(m, config);
    let r = reference(dir);
    let picked: Vec<_> = r.prompts.iter().enumerate().filter(|(_, p)| which(p)).collect();
    assert!(!picked.is_empty(), "{name}: no reference prompt picked");
    assert!(r.prompts.len() >= 5, "{name}: too few reference prompts");
    for (i, p) in picked {
        let ids = engine.tokenizer.encode(&p.prompt_text, true).unwrap();
        assert_eq!(ids, p.prompt_ids, "{name} prompt {i}: tokenization");
        // Each prompt alone: the distribution after the prompt, greedy tokens, logprobs.
        let out = engine.generate_one(full(greedy(&p.prompt_ids, p.greedy_ids.len())));
        let err = max_abs_diff(&out.distribution(0, vocab), &log_softmax(&p.last_logits));
        assert!(err < tol, "{name} prompt {i} ({} tokens): log-softmax max abs diff {err}", ids.len());
        assert_eq!(out.token_ids, p.greedy_ids, "{name} prompt {i}: greedy tokens");
        let err = max_abs_diff(&out.logprobs, &p.greedy_logprobs);
        assert!(err < tol, "{name} prompt {i}: logprobs max abs diff {err}");
        assert_eq!(
            engine.tokenizer.decode(&out.token_ids, false).unwrap(),
            p.greedy_text,
            "{name} prompt {i}: text"
        );
    }
    engine
}

macro_rules! parity {
    ($($test:ident => $dir:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            check_fixture(&fixture($dir));
        }
    )*};
}

parity! {
    llama_llama3_rope_tied => "llama",
    llama_sharded_weights => "llama_sharded",
    llama_linear_rope => "llama_linear",
    mistral_sliding_window => "mistral",
    qwen2_qkv_bias => "qwen2",
    qwen2_bf16_weights_upcast => "qwen2_bf16",
    qwen3_qk_norm_head_dim => "qwen3",
    gemma2_sandwich_norms_softcaps_alternating_windows => "gemma2",
    gemma3_qk_norms_local_rope_linear_global_rope => "gemma3",
    gemma3_language_model_of_a_multimodal_checkpoint => "gemma3_multimodal",
    granite_multipliers => "granite",
    olmo2_post_norms_whole_projection_qk_norms => "olmo2",
    phi3_fused_projections_partial_rotary_window => "phi3",
    qwen3_yarn_rope => "qwen3_yarn",
    qwen3_moe_renormalized_top2_of_4_and_a_dense_layer => "qwen3_moe",
    mixtral_top2_of_4_experts => "mixtral",
}

/// LongRoPE picks its factor set by the engine's context: the short factors where
/// `--max-model-len` stays within the pretrained 256 tokens (transformers' choice for every
/// sequence that fits), the long ones past it (transformers' choice for a prompt already longer
/// than 256, here the 310-token one). Either way each sequence is rotated alike at every step.
#[test]
fn phi3_longrope_picks_its_factors_by_the_context() {
    let dir = fixture("phi3_longrope");
    let fits = |p: &PromptRef| p.prompt_ids.len() + p.greedy_ids.len() <= 256;
    check_prompts(&dir, Some(256), fits);
    check_prompts(&dir, None, |p| p.prompt_ids.len() > 256);
    // The choice matters: with the long factors a short prompt leaves transformers' (short)
    // distribution.
    let r = reference(&dir);
    let p = r.prompts.iter().filter(|p| fits(p)).max_by_key(|p| p.prompt_ids.len()).unwrap();
    let opts = LoadOptions { dtype: Some(ferrite_engine::DType::F32), ..Default::default() };
    let m = load(dir.to_str().unwrap(), &opts).unwrap();
    let vocab = m.model.vocab_size();
    let out = TestEngine::start(m, test_config()).generate_one(full(greedy(&p.prompt_ids, 1)));
    let err = max_abs_diff(&out.distribution(0, vocab), &log_softmax(&p.last_logits));
    assert!(err > 1e-2, "the long factors gave the short factors' distribution (differs by {err})");
}

/// The real trained TinyStories model (Karpathy's llama2.c stories260K, MIT), committed beside
/// the random fixtures so that this check always runs (see its README.md).
#[test]
fn stories260k_matches_reference() {
    let dir = fixture("stories260K");
    check_fixture(&dir);

    // 200 greedy tokens from "Once upon a time": a long decode through many blocks.
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let long = &r["long_greedy"];
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let prompt = ids(&long["prompt_ids"]);
    let expected = ids(&long["greedy_ids"]);
    let opts = LoadOptions { device: test_device(), ..Default::default() };
    let engine = TestEngine::start(load(dir.to_str().unwrap(), &opts).unwrap(), test_config());
    let out = engine.generate_one(greedy(&prompt, expected.len()));
    assert_eq!(out.token_ids, expected, "stories260K long greedy continuation");
    assert_eq!(
        engine.tokenizer.decode(&out.token_ids, false).unwrap(),
        long["greedy_text"].as_str().unwrap()
    );
}
