//! The CPU's linear weights in their own dtype under f32 compute (`CpuWeights`), through the
//! served path: a bf16 checkpoint kept bf16 gives exactly the logprobs of its widened f32 copy,
//! and an f32 checkpoint rounded to bf16 or f16 stays within what those mantissas allow of its
//! f32 distributions (which parity.rs holds to transformers').

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;
use ferrite_engine::model::loader::CpuWeights;
use ferrite_engine::{load, DType, LoadOptions, LoadedModel};

fn options(cpu_weights: CpuWeights) -> LoadOptions {
    LoadOptions {
        dtype: Some(DType::F32),
        device: ferrite_engine::Device::Cpu,
        cpu_weights,
        ..Default::default()
    }
}

#[test]
fn a_bf16_checkpoint_kept_bf16_matches_its_widened_copy_bit_for_bit() {
    let dir = fixture("qwen2_bf16");
    let r = reference(&dir);
    let stored = load(dir.to_str().unwrap(), &options(CpuWeights::AsStored)).unwrap();
    let widened = load(dir.to_str().unwrap(), &options(CpuWeights::Cast(DType::F32))).unwrap();
    // Held in bf16: the projections take half the bytes (the norms and biases stay f32).
    let (half_bytes, f32_bytes) = (stored.model.weight_bytes(), widened.model.weight_bytes());
    assert!(half_bytes * 10 < f32_bytes * 6, "as stored {half_bytes} B against widened {f32_bytes} B");
    let (stored, widened) =
        (TestEngine::start(stored, test_config()), TestEngine::start(widened, test_config()));
    for (i, p) in r.prompts.iter().enumerate() {
        let request = || full(greedy(&p.prompt_ids, p.greedy_ids.len()));
        let a = stored.generate_one(request());
        let b = widened.generate_one(request());
        assert_eq!(bits(&a), bits(&b), "prompt {i}: every step's distribution");
        assert_eq!(a.token_ids, b.token_ids, "prompt {i}: tokens");
        assert_eq!(a.token_ids, p.greedy_ids, "prompt {i}: transformers' greedy tokens");
    }
}

#[test]
fn an_f32_checkpoint_rounded_to_half_weights_tracks_f32() {
    for name in ["llama", "qwen2"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let run_all = |weights: CpuWeights| {
            let m = load(dir.to_str().unwrap(), &options(weights)).unwrap();
            // The KV cache and activations stay f32.
            assert_eq!(m.model.kv_cache_spec().dtype, DType::F32);
            let engine = TestEngine::start(m, test_config());
            engine
                .generate(r.prompts.iter().map(|p| full(greedy(&p.prompt_ids, p.greedy_ids.len()))).collect())
        };
        let f32_run = run_all(CpuWeights::Cast(DType::F32));
        for (dtype, rel_tol) in [(DType::F16, 0.01), (DType::BF16, 0.05)] {
            let half = run_all(CpuWeights::Cast(dtype));
            let what = format!("{name} {dtype:?}");
            tracks(&f32_run, &half, rel_tol, &what);
            // Rounding does change them: the weights are really held in the smaller dtype.
            let vocab = f32_run[3].top_logprobs[0].len();
            let err = max_abs_diff(&f32_run[3].distribution(0, vocab), &half[3].distribution(0, vocab));
            assert!(err > 1e-5, "{what}: logprobs equal f32's ({err}); were the weights rounded?");
        }
    }
}

/// A copy of fixture `name` whose matrices are `dtype`'s rounding of the originals, stored as
/// `store` (the norms' vectors stay as they are, f32, as `--weight-dtype` leaves them).
fn rounded_copy(name: &str, dtype: DType, store: DType) -> tempfile::TempDir {
    let src = fixture(name);
    let out = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&path, out.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let rounded: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| match v.rank() {
            2 => (k, v.to_dtype(dtype).unwrap().to_dtype(store).unwrap()),
            _ => (k, v),
        })
        .collect();
    candle_core::safetensors::save(&rounded, out.path().join("model.safetensors")).unwrap();
    out
}

/// The distribution after each reference prompt of `dir` and the two greedy steps after it,
/// as bits.
fn logprobs_of(m: LoadedModel, dir: &Path) -> Vec<Vec<Vec<(u32, u32)>>> {
    let engine = TestEngine::start(m, test_config());
    let requests = reference(dir).prompts.iter().map(|p| full(greedy(&p.prompt_ids, 3))).collect();
    engine.generate(requests).iter().map(bits).collect()
}

/// Tied embeddings: the packed head serves the lookups. A bf16 checkpoint of the llama fixture
/// kept bf16 gives the bits of the same values stored as f32, and of `--weight-dtype bf16` on
/// the f32 original.
#[test]
fn tied_bf16_weights_give_the_bits_of_their_widened_copy() {
    let bf16 = rounded_copy("llama", DType::BF16, DType::BF16);
    let widened = rounded_copy("llama", DType::BF16, DType::F32);
    let load_dir = |dir: &Path, w: CpuWeights| load(dir.to_str().unwrap(), &options(w)).unwrap();
    let kept = load_dir(bf16.path(), CpuWeights::AsStored);
    let wide = load_dir(widened.path(), CpuWeights::AsStored);
    let cast = load_dir(&fixture("llama"), CpuWeights::Cast(DType::BF16));
    assert!(kept.model.weight_bytes() * 10 < wide.model.weight_bytes() * 6);
    assert_eq!(kept.model.weight_bytes(), cast.model.weight_bytes());
    let want = logprobs_of(wide, &fixture("llama"));
    for (name, m) in [("kept bf16", kept), ("--weight-dtype bf16", cast)] {
        for (i, (got, want)) in logprobs_of(m, &fixture("llama")).iter().zip(&want).enumerate() {
            assert_eq!(got, want, "{name}, prompt {i}: logprobs differ from the widened copy's");
        }
    }
}

/// bf16 activations' bound on the first token's logits against the widened products' (relative
/// RMS, centered): each x rounded to 8 bits of mantissa, through two or three layers of random
/// weights. Measured on the two fixtures, with a margin.
const BF16_ACTIVATIONS_TOL: f32 = 0.02;

/// `--bf16-activations` through the served path, on a bf16 checkpoint kept bf16 (qwen2_bf16)
/// and an f32 one rounded to bf16 (llama, whose tied head's panels also serve the embedding
/// lookups): the first token's logits move off the widened products' (the option reaches the
/// products) but within [`BF16_ACTIVATIONS_TOL`], and a prompt's tokens and every logprob are
/// the same bits alone and among the others.
#[test]
fn bf16_activations_serve_near_the_widened_products_and_batch_invariant() {
    use ferrite_engine::model::loader::Bf16Products;
    if !ferrite_engine::ops::packed::dots_available() {
        println!("skipped: this CPU has no AVX-512 BF16 (or FERRITE_SIMD caps it below avx512)");
        return;
    }
    for (name, weights) in [("qwen2_bf16", CpuWeights::AsStored), ("llama", CpuWeights::Cast(DType::BF16))] {
        let dir = fixture(name);
        let start = |bf16_products| {
            let m = load(dir.to_str().unwrap(), &LoadOptions { bf16_products, ..options(weights) }).unwrap();
            assert_eq!(m.model.bf16_activations(), bf16_products == Bf16Products::Dots, "{name}");
            let vocab = m.model.vocab_size();
            (TestEngine::start(m, test_config()), vocab)
        };
        let ((widened, vocab), (dots, _)) = (start(Bf16Products::Widened), start(Bf16Products::Dots));
        let requests = || -> Vec<_> {
            reference(&dir).prompts.iter().map(|p| full(greedy(&p.prompt_ids, p.greedy_ids.len()))).collect()
        };
        let (mut worst, mut worst_abs) = (0f32, 0f32);
        let together = dots.generate(requests());
        for (i, request) in requests().into_iter().enumerate() {
            let want = widened.generate_one(request.clone());
            let alone = dots.generate_one(request);
            let (got, want) = (alone.distribution(0, vocab), want.distribution(0, vocab));
            worst = worst.max(twin::relative_error(&got, &want));
            worst_abs = worst_abs.max(max_abs_diff(&got, &want));
            assert_eq!(
                alone.token_ids, together[i].token_ids,
                "{name}, prompt {i}: tokens alone vs among others"
            );
            assert_eq!(
                bits(&alone),
                bits(&together[i]),
                "{name}, prompt {i}: logprobs alone vs among others"
            );
        }
        eprintln!(
            "{name}: bf16 activations' first-token logits within {:.3} % (RMS) of the widened products'",
            worst * 100.0
        );
        assert!(worst_abs > 1e-6, "{name}: bf16 activations changed nothing ({worst_abs})");
        assert!(
            worst < BF16_ACTIVATIONS_TOL,
            "{name}: {:.3} % (RMS) off the widened products",
            worst * 100.0
        );
    }
    // f32 weights have nothing to pair: the option does not apply, and the model says so.
    let f32_weights = LoadOptions { bf16_products: Bf16Products::Dots, ..options(CpuWeights::AsStored) };
    let m = load(fixture("llama").to_str().unwrap(), &f32_weights).unwrap();
    assert!(!m.model.bf16_activations(), "f32 weights took bf16 activations");
}
