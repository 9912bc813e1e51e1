//! GGUF checkpoints against transformers: each GGUF copy of a fixture (written by
//! scripts/gen_gguf_fixtures.py the way llama.cpp's converter lays files out, q/k rows permuted
//! for the llama family) and the real stories260K.gguf (converted by llama.cpp's own tools) must
//! tokenize like the Hugging Face tokenizer and compute what transformers computed from the
//! original checkpoint (tests/fixtures/*/reference.json), through the engine's served path.

mod common;

use std::path::Path;

use common::*;
use ferrite_engine::{load, LoadOptions, Message};

/// F32 tensors hold the same numbers as the safetensors checkpoint: parity's tolerance.
const LOGIT_TOL: f32 = 1e-4;

fn check_gguf(file: &Path, reference_dir: &Path) {
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    let opts =
        LoadOptions { dtype: Some(ferrite_engine::DType::F32), device: test_device(), ..Default::default() };
    let m = load(file.to_str().unwrap(), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    let vocab = m.model.vocab_size();
    let engine = TestEngine::start(m, test_config());
    let r = reference(reference_dir);
    let (mut total, mut worst) = (0, 0.0f32);
    for (i, p) in r.prompts.iter().enumerate() {
        let ids = engine.tokenizer.encode(&p.prompt_text, true).unwrap();
        assert_eq!(ids, p.prompt_ids, "{name} prompt {i} {:?}: tokenization", p.prompt_text);
        let out = engine.generate_one(full(greedy(&p.prompt_ids, p.greedy_ids.len())));
        let err = max_abs_diff(&out.distribution(0, vocab), &log_softmax(&p.last_logits));
        worst = worst.max(err);
        assert!(err < LOGIT_TOL, "{name} prompt {i}: log-softmax max abs diff {err}");
        assert_eq!(out.token_ids, p.greedy_ids, "{name} prompt {i}: greedy tokens");
        assert_eq!(
            engine.tokenizer.decode(&out.token_ids, false).unwrap(),
            p.greedy_text,
            "{name} prompt {i}"
        );
        total += p.greedy_ids.len();
    }
    for (i, c) in r.chat.iter().enumerate() {
        let messages: Vec<Message> = c
            .messages
            .iter()
            .map(|v| Message::new(v["role"].as_str().unwrap(), v["content"].as_str().unwrap()))
            .collect();
        let (text, ids) = engine.tokenizer.encode_chat(&messages).unwrap();
        assert_eq!(text, c.rendered, "{name} chat {i}: the GGUF's chat template");
        assert_eq!(ids, c.prompt_ids, "{name} chat {i}: ids");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{name}: log-softmax within {worst:.2e} of transformers; all {total} greedy tokens equal"
    );
}

fn gguf(file: &str) -> std::path::PathBuf {
    fixture("gguf").join(file)
}

#[test]
fn llama_f32_gguf_undoes_the_rope_permutation() {
    check_gguf(&gguf("llama_linear-f32.gguf"), &fixture("llama_linear"));
}

#[test]
fn qwen2_f32_gguf_matches_transformers() {
    check_gguf(&gguf("qwen2-f32.gguf"), &fixture("qwen2"));
}

#[test]
fn qwen3_f32_gguf_matches_transformers() {
    check_gguf(&gguf("qwen3-f32.gguf"), &fixture("qwen3"));
}

/// Q8_0 files against the same tensors dequantized by gguf-py's numpy code and stored as F32
/// (an independent dequantization): the same logits and the same greedy tokens, on every
/// reference prompt. (Against transformers' f32 the Q8_0 rounding, about 0.55 % of each
/// weight, moves these random models' log-softmax by up to ~0.6; that is the quantization,
/// which this comparison factors out.)
#[test]
fn q8_0_ggufs_dequantize_as_gguf_py_does() {
    for name in ["llama_linear", "qwen3"] {
        let opts = LoadOptions {
            dtype: Some(ferrite_engine::DType::F32),
            device: test_device(),
            ..Default::default()
        };
        let start = |file: String| {
            let m = load(gguf(&file).to_str().unwrap(), &opts).unwrap_or_else(|e| panic!("{file}: {e}"));
            let vocab = m.model.vocab_size();
            (TestEngine::start(m, test_config()), vocab)
        };
        let (quantized, vocab) = start(format!("{name}-q8_0.gguf"));
        let (reference_engine, _) = start(format!("{name}-q8_0-dequantized.gguf"));
        for (i, p) in reference(&fixture(name)).prompts.iter().enumerate() {
            let request = || full(greedy(&p.prompt_ids, p.greedy_ids.len()));
            let (got, want) = (quantized.generate_one(request()), reference_engine.generate_one(request()));
            let err = max_abs_diff(&got.distribution(0, vocab), &want.distribution(0, vocab));
            assert!(err < 1e-5, "{name} Q8_0 prompt {i}: log-softmax max abs diff {err}");
            assert_eq!(got.token_ids, want.token_ids, "{name} Q8_0 prompt {i}: greedy tokens");
        }
    }
}

/// The real stories260K.gguf (ggml-org's, converted by llama.cpp: SentencePiece vocabulary,
/// permuted q/k with 8 query and 4 KV heads) against the Hugging Face conversion's reference.
#[test]
fn stories260k_gguf_generates_what_the_hf_model_does() {
    let file = fixture("stories260K-gguf").join("stories260K.gguf");
    check_gguf(&file, &fixture("stories260K"));
}

/// A folder holding one GGUF file loads as that file; a tensor llama.cpp would not put in
/// such a model is refused by name.
#[test]
fn a_folder_with_one_gguf_loads_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gguf("qwen3-f32.gguf"), dir.path().join("model.gguf")).unwrap();
    let opts = LoadOptions::default();
    let m = load(dir.path().to_str().unwrap(), &opts).unwrap();
    assert_eq!(m.config.num_hidden_layers, 2);
    std::fs::write(dir.path().join("model.gguf"), b"GGUF but not really").unwrap();
    let e = load(dir.path().to_str().unwrap(), &opts).err().unwrap().to_string();
    assert!(e.contains("model.gguf") && e.contains("GGUF"), "{e}");
}
