//! GGUF checkpoints against transformers: each GGUF copy of a fixture (written by
//! scripts/gen_gguf_fixtures.py the way llama.cpp's converter lays files out, q/k rows permuted
//! for the llama family) and the real stories260K.gguf (converted by llama.cpp's own tools) must
//! tokenize like the Hugging Face tokenizer and compute what transformers computed from the
//! original checkpoint (tests/fixtures/*/reference.json), through the engine's served path.

mod common;

use std::path::Path;

use common::twin::*;
use common::*;
use ferrite_engine::model::loader::{Activations, KQuants};
use ferrite_engine::{load, LoadOptions};

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
    check_chat(&engine, &r, &name, "the GGUF's chat template");
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{name}: log-softmax within {worst:.2e} of transformers; all {total} greedy tokens equal"
    );
}

#[test]
fn llama_f32_gguf_undoes_the_rope_permutation() {
    check_gguf(&gguf("llama_linear-f32.gguf"), &fixture("llama_linear"));
}

/// Llama 3's rope scaling as llama.cpp stores it: no metadata, a `rope_freqs.weight` tensor of
/// per-frequency divisors (the `llama` fixture uses scaling factor 8).
#[test]
fn llama3_rope_factors_from_the_gguf_match_transformers() {
    check_gguf(&gguf("llama-f32.gguf"), &fixture("llama"));
}

#[test]
fn qwen2_f32_gguf_matches_transformers() {
    check_gguf(&gguf("qwen2-f32.gguf"), &fixture("qwen2"));
}

#[test]
fn qwen3_f32_gguf_matches_transformers() {
    check_gguf(&gguf("qwen3-f32.gguf"), &fixture("qwen3"));
}

/// Block-format files served, against the same tensors dequantized by gguf-py's numpy code and
/// served as F32 (an independent dequantization, run as plain f32 weights).
///
/// - Q8_0 and Q4_0, and with `--exact-k-quants` the K-quants of a Q4_K_M and a Q5_K_M file
///   (Q4_K, Q5_K, Q6_K, with Q5_0/Q8_0 where rows are not whole K-quant blocks), run as our
///   panels in f32 (`ops::blocks`): only f32 rounding separates them from the twin, so parity's
///   tolerance and identical greedy tokens.
/// - By default the K-quants run through candle's kernels, which round each activation block
///   to 8 bits before the dot products (as llama.cpp does): ~0.7 % RMS per product (measured
///   tensor by tensor below), compounded over a layer's products and the head, and amplified by
///   these random fixtures. Measured 2.7 % relative RMS on the first token's logits; bound 15 %
///   (leaving the q/k rows permuted, a wrong row order, gave 64–151 %). Greedy agreement over
///   whole continuations is reported, not asserted: one rounding flip changes the rest.
#[test]
fn quantized_ggufs_multiply_like_their_dequantized_weights() {
    for (file, prompts, k_quants) in [
        ("llama_linear-q8_0", "llama_linear", KQuants::Rounded),
        ("qwen3-q8_0", "qwen3", KQuants::Rounded),
        ("llama_linear-q4_0", "llama_linear", KQuants::Rounded),
        ("qwen3-q4_0", "qwen3", KQuants::Rounded),
        ("kquant-q4_k_m", "llama_linear", KQuants::Exact),
        ("kquant-q5_k_m", "llama_linear", KQuants::Exact),
    ] {
        let (_, worst_abs, agree, total) = against_twin(file, prompts, k_quants, Activations::Exact);
        assert!(
            worst_abs < LOGIT_TOL,
            "{file} ({k_quants:?}): log-softmax max abs diff {worst_abs} from its dequantized twin"
        );
        assert_eq!(agree, total, "{file} ({k_quants:?}): greedy tokens differ from the twin's");
    }
    for (file, prompts) in [("kquant-q4_k_m", "llama_linear"), ("kquant-q5_k_m", "llama_linear")] {
        let (worst, _, _, _) = against_twin(file, prompts, KQuants::Rounded, Activations::Exact);
        assert!(
            worst < 0.15,
            "{file}: first-token logits {:.1} % (RMS) away from its dequantized twin's",
            worst * 100.0
        );
    }
}

/// Every block-format tensor of each file, as the loader holds it (q/k rows unpermuted on their
/// bytes), multiplies like the same tensor of the dequantized twin (dequantized by gguf-py,
/// unpermuted as f32): random activations, relative error of the products under 2 %. The
/// kernels round each activation block to 8 bits (a step of its max / 127: ~0.7 % of its RMS,
/// RMS), so a faithful product lands near 0.7 %; a wrong row order, block layout or scale is
/// off by ~100 %. This checks each tensor alone, where the served comparison above sees them
/// through two layers that amplify any rounding.
#[test]
fn every_quantized_tensor_multiplies_like_its_dequantized_twin() {
    use candle_core::{DType, Device, Tensor};
    use ferrite_engine::model::gguf::GgufFile;
    for file in [
        "llama_linear-q8_0",
        "qwen3-q8_0",
        "llama_linear-q4_0",
        "qwen3-q4_0",
        "kquant-q4_k_m",
        "kquant-q5_k_m",
    ] {
        let quantized =
            GgufFile::open(&gguf(&format!("{file}.gguf"))).unwrap().tensors(&Device::Cpu).unwrap();
        let twin = GgufFile::open(&gguf(&format!("{file}-dequantized.gguf")))
            .unwrap()
            .tensors(&Device::Cpu)
            .unwrap();
        assert!(!quantized.quantized.is_empty(), "{file}: no block-format tensors");
        let mut worst = (0f32, String::new());
        let mut formats = std::collections::BTreeSet::new();
        for (name, q) in &quantized.quantized {
            formats.insert(q.dtype_name());
            let (_, k) = q.dims();
            let x = Tensor::randn(0f32, 1.0, (3, k), &Device::Cpu).unwrap();
            let got = q.matmul(&x).unwrap();
            let w = twin.dense.get(name).unwrap_or_else(|| panic!("{file}: the twin has no {name}"));
            let want = x.matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let err = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let diff: f32 = err.0.iter().zip(&err.1).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
            let norm: f32 = err.1.iter().map(|b| b * b).sum::<f32>().sqrt();
            if diff / norm > worst.0 {
                worst = (diff / norm, name.clone());
            }
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "{file}: {} tensors ({formats:?}), worst product error {:.2} % ({})",
            quantized.quantized.len(),
            worst.0 * 100.0,
            worst.1
        );
        assert!(worst.0 < 0.02, "{file}: {} multiplies {:.2} % away from its twin", worst.1, worst.0 * 100.0);
    }
}

/// A file's block-format weights are held at the file's size: the model's weight bytes are
/// the file's tensor bytes (nothing widened, the tied embedding held once). The panels hold
/// Q8_0, Q5_0, Q4_0 and Q6_K in their file's bytes; with `--exact-k-quants`, Q4_K and Q5_K take
/// 4 bytes more per 256 weights (their eight six-bit `sc` and `m`, packed into 12 bytes in the
/// file, a byte each): 148 bytes against 144, 180 against 176.
#[test]
fn quantized_weights_are_held_at_their_file_size() {
    use candle_core::quantized::GgmlDType;
    use ferrite_engine::model::gguf::GgufFile;
    let files =
        ["llama_linear-q8_0", "qwen3-q8_0", "qwen3-q4_0", "kquant-q4_k_m", "kquant-q5_k_m", "qwen3-f32"];
    for (file, k_quants) in files.iter().flat_map(|f| [(f, KQuants::Rounded), (f, KQuants::Exact)]) {
        let path = gguf(&format!("{file}.gguf"));
        let opts = LoadOptions { k_quants, ..Default::default() };
        let m = load(path.to_str().unwrap(), &opts).unwrap_or_else(|e| panic!("{file}: {e}"));
        let stored = GgufFile::open(&path).unwrap().tensor_bytes();
        let tensors = GgufFile::open(&path).unwrap().tensors(&candle_core::Device::Cpu).unwrap();
        let unpacked_scales: usize = tensors
            .quantized
            .values()
            .filter(|q| matches!(q.dtype(), GgmlDType::Q4K | GgmlDType::Q5K))
            .map(|q| q.dims().0 * q.dims().1 / 256 * 4)
            .sum();
        if file.starts_with("kquant") {
            assert!(unpacked_scales > 0, "{file} has Q4_K or Q5_K tensors");
        }
        let extra = if k_quants == KQuants::Exact { unpacked_scales } else { 0 };
        assert_eq!(m.model.weight_bytes(), stored + extra, "{file} ({k_quants:?})");
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

/// A tensor in a type ferrite does not read (here an IQ2_XXS code patched into a Q4_0 file's
/// header) is refused naming the tensor, llama.cpp's name of the type, and what is supported.
#[test]
fn an_unsupported_tensor_type_is_named_with_its_tensor() {
    let mut bytes = std::fs::read(gguf("qwen3-q4_0.gguf")).unwrap();
    let name = b"blk.1.ffn_up.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("the tensor's header entry");
    // After the name: n_dims (u32), the dims (u64 each), then the type (u32).
    let dims_at = at + name.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    let type_at = dims_at + 4 + 8 * n_dims;
    assert_eq!(u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()), 2, "Q4_0's code");
    bytes[type_at..type_at + 4].copy_from_slice(&16u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq2.gguf");
    std::fs::write(&path, bytes).unwrap();
    let e = load(path.to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("tensor `blk.1.ffn_up.weight` is stored as IQ2_XXS"), "{e}");
    assert!(e.contains("supported: F32, F16, BF16, Q4_0"), "{e}");
}

/// `--quantize q8_0` on a safetensors checkpoint gives what gguf-py's Q8_0 of the same weights
/// gives, dequantized (the same rounding rule, so the same blocks): parity's tolerance and the
/// same greedy tokens (Q8_0 runs as int8 panels in f32); the weights are held in blocks (about
/// a quarter of f32's bytes).
#[test]
fn quantizing_safetensors_at_load_matches_a_q8_0_file() {
    let opts = |quantize| LoadOptions {
        dtype: Some(ferrite_engine::DType::F32),
        device: test_device(),
        quantize,
        ..Default::default()
    };
    let quantized =
        load(fixture("qwen3").to_str().unwrap(), &opts(Some(ferrite_engine::model::loader::Quantize::Q8_0)))
            .unwrap();
    let plain = load(fixture("qwen3").to_str().unwrap(), &opts(None)).unwrap();
    let (qb, pb) = (quantized.model.weight_bytes(), plain.model.weight_bytes());
    assert!(qb * 3 < pb, "Q8_0 holds {qb} bytes against f32's {pb}");
    let vocab = quantized.model.vocab_size();
    let engine = TestEngine::start(quantized, test_config());
    let twin = load(gguf("qwen3-q8_0-dequantized.gguf").to_str().unwrap(), &opts(None)).unwrap();
    let twin = TestEngine::start(twin, test_config());
    for (i, p) in reference(&fixture("qwen3")).prompts.iter().enumerate() {
        let request = || full(greedy(&p.prompt_ids, p.greedy_ids.len()));
        let (got, want) = (engine.generate_one(request()), twin.generate_one(request()));
        let err = max_abs_diff(&got.distribution(0, vocab), &want.distribution(0, vocab));
        assert!(err < LOGIT_TOL, "prompt {i}: log-softmax max abs diff {err} from gguf-py's Q8_0");
        assert_eq!(got.token_ids, want.token_ids, "prompt {i}: greedy tokens");
    }
}

/// Batch invariance for block-format weights: a row's product is the same bits alone (a
/// decode step of one sequence) as among others (a busy batch or a prefill chunk), for every
/// format in the fixtures.
#[test]
fn quantized_products_are_batch_invariant() {
    use candle_core::{Device, Tensor};
    use ferrite_engine::model::gguf::GgufFile;
    for file in ["llama_linear-q8_0", "qwen3-q4_0", "kquant-q4_k_m", "kquant-q5_k_m"] {
        let tensors = GgufFile::open(&gguf(&format!("{file}.gguf"))).unwrap().tensors(&Device::Cpu).unwrap();
        for (name, q) in &tensors.quantized {
            let (_, k) = q.dims();
            let x = Tensor::randn(0f32, 1.0, (40, k), &Device::Cpu).unwrap();
            let all = q.matmul(&x).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in all.iter().enumerate() {
                let alone = q.matmul(&x.narrow(0, i, 1).unwrap()).unwrap().to_vec2::<f32>().unwrap();
                assert_eq!(&alone[0], row, "{file} {name} ({}): row {i} of 40 differs alone", q.dtype_name());
            }
        }
    }
}

/// `--weight-dtype f32` on a GGUF file widens its blocks into the packed f32 products: the same
/// outputs as the gguf-py-dequantized twin, within f32 parity's tolerance (two dequantizations
/// may round a product of scales differently in the last bit), and the same greedy tokens.
#[test]
fn widened_block_weights_compute_like_the_dequantized_twin() {
    use ferrite_engine::model::loader::CpuWeights;
    for file in ["kquant-q4_k_m", "qwen3-q8_0"] {
        let opts = |cpu_weights| LoadOptions {
            dtype: Some(ferrite_engine::DType::F32),
            device: ferrite_engine::Device::Cpu,
            cpu_weights,
            ..Default::default()
        };
        let widened = load(
            gguf(&format!("{file}.gguf")).to_str().unwrap(),
            &opts(CpuWeights::Cast(ferrite_engine::DType::F32)),
        )
        .unwrap();
        let twin =
            load(gguf(&format!("{file}-dequantized.gguf")).to_str().unwrap(), &opts(CpuWeights::AsStored))
                .unwrap();
        assert_eq!(widened.model.weight_bytes(), twin.model.weight_bytes(), "{file}: held as f32");
        let vocab = widened.model.vocab_size();
        let (widened, twin) =
            (TestEngine::start(widened, test_config()), TestEngine::start(twin, test_config()));
        let prompts = if file.starts_with("kquant") { "llama_linear" } else { "qwen3" };
        for (i, p) in reference(&fixture(prompts)).prompts.iter().enumerate() {
            let request = || full(greedy(&p.prompt_ids, p.greedy_ids.len()));
            let (got, want) = (widened.generate_one(request()), twin.generate_one(request()));
            let err = max_abs_diff(&got.distribution(0, vocab), &want.distribution(0, vocab));
            assert!(err < LOGIT_TOL, "{file} prompt {i}: log-softmax max abs diff {err}");
            assert_eq!(got.token_ids, want.token_ids, "{file} prompt {i}");
        }
    }
}

/// A GGUF whose vocabulary ferrite cannot rebuild (here qwen3's file with its pre-tokenizer
/// renamed to one ferrite does not know) is refused pointing at `--tokenizer`; given the
/// Hugging Face tokenizer of the same model, it loads and generates transformers' tokens.
#[test]
fn another_tokenizer_replaces_one_that_cannot_be_rebuilt() {
    let mut bytes = std::fs::read(gguf("qwen3-f32.gguf")).unwrap();
    let key = b"tokenizer.ggml.pre";
    let at = bytes.windows(key.len()).position(|w| w == key).expect("the pre-tokenizer key");
    // After the key: the value type (u32, 8 = string), its length (u64), then the text.
    let text = at + key.len() + 4 + 8;
    assert_eq!(&bytes[text..text + 5], b"qwen2");
    bytes[text..text + 5].copy_from_slice(b"qwenX");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("renamed.gguf");
    std::fs::write(&path, bytes).unwrap();
    let e = load(path.to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(e.contains("pre-tokenizer `qwenX`") && e.contains("--tokenizer"), "{e}");

    let opts =
        LoadOptions { tokenizer: Some(fixture("qwen3").to_str().unwrap().to_string()), ..Default::default() };
    let m = load(path.to_str().unwrap(), &opts).unwrap();
    let vocab = m.model.vocab_size();
    let engine = TestEngine::start(m, test_config());
    let r = reference(&fixture("qwen3"));
    for (i, p) in r.prompts.iter().enumerate() {
        assert_eq!(engine.tokenizer.encode(&p.prompt_text, true).unwrap(), p.prompt_ids, "prompt {i}");
        let out = engine.generate_one(full(greedy(&p.prompt_ids, p.greedy_ids.len())));
        assert_eq!(out.token_ids, p.greedy_ids, "prompt {i}");
        assert!(
            max_abs_diff(&out.distribution(0, vocab), &log_softmax(&p.last_logits)) < LOGIT_TOL,
            "prompt {i}"
        );
    }
    let missing = LoadOptions { tokenizer: Some("/nonexistent/tokenizer".into()), ..Default::default() };
    let e = load(path.to_str().unwrap(), &missing).err().unwrap().to_string();
    assert!(e.contains("/nonexistent/tokenizer"), "{e}");
}

/// Llama 3's pre-tokenizer (`tokenizer.ggml.pre = "llama-bpe"`): a tokenizer-only GGUF of a
/// byte-level BPE trained with Llama 3's split and `ignore_merges`, rebuilt by the loader, gives
/// the ids Hugging Face `tokenizers` gives from its tokenizer.json (digits in groups of three,
/// whole words no merge reaches, BOS added though the file has no `add_bos_token`). The
/// generator checked that GPT-2's or Qwen2's split, or merges without `ignore_merges`, give
/// other ids on these prompts.
#[test]
fn llama_bpe_pre_tokenizer_matches_hugging_face() {
    let t = ferrite_engine::model::loader::load_tokenizer(gguf("llama3-tokenizer.gguf").to_str().unwrap())
        .unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gguf("llama3-tokenizer.json")).unwrap()).unwrap();
    let bos = reference["bos_token_id"].as_u64().unwrap() as u32;
    let prompts = reference["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 10);
    for p in prompts {
        let text = p["text"].as_str().unwrap();
        let want: Vec<u32> =
            p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = t.encode(text, true).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(got[0], bos);
        assert_eq!(t.decode(&got, true).unwrap(), p["decoded"].as_str().unwrap(), "{text:?}");
    }
}
