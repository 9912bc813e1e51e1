//! A quantized GGUF fixture served beside its dequantized twin (the same tensors dequantized by
//! gguf-py, served as F32): how far apart their outputs are.

use ferrite_engine::model::loader::{Activations, KQuants};
use ferrite_engine::{load, LoadOptions};

use super::*;

/// A GGUF fixture's path.
pub fn gguf(file: &str) -> std::path::PathBuf {
    fixture("gguf").join(file)
}

/// The first generated position's log-softmax, and the greedy tokens.
pub fn got_and_want(out: &Generated, vocab: usize) -> (Vec<f32>, Vec<u32>) {
    (out.distribution(0, vocab), out.token_ids.clone())
}

/// ‖a − b‖ / ‖b‖ over the centered vectors (log-softmax centered is the logits centered): an
/// error relative to the logits' own spread, which a model's scale does not change.
pub fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let center = |v: &[f32]| {
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        v.iter().map(|&x| f64::from(x) - mean).collect::<Vec<f64>>()
    };
    let (a, b) = (center(a), center(b));
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt() as f32
}

/// How far a quantized file's served outputs are from its dequantized twin's: the worst
/// relative error of the first generated position's logits, and how many prompts' greedy tokens
/// agree in full.
pub fn against_twin(
    file: &str,
    prompts_from: &str,
    k_quants: KQuants,
    activations: Activations,
) -> (f32, f32, usize, usize) {
    let opts = LoadOptions {
        dtype: Some(ferrite_engine::DType::F32),
        device: test_device(),
        k_quants,
        activations,
        ..Default::default()
    };
    let start = |file: String| {
        let m = load(gguf(&file).to_str().unwrap(), &opts).unwrap_or_else(|e| panic!("{file}: {e}"));
        let vocab = m.model.vocab_size();
        (TestEngine::start(m, test_config()), vocab)
    };
    let (quantized, vocab) = start(format!("{file}.gguf"));
    let (twin, _) = start(format!("{file}-dequantized.gguf"));
    let (mut worst, mut worst_abs, mut agree) = (0f32, 0f32, 0);
    let prompts = reference(&fixture(prompts_from)).prompts;
    for p in &prompts {
        let request = || full(greedy(&p.prompt_ids, p.greedy_ids.len()));
        let (got, want) = (quantized.generate_one(request()), twin.generate_one(request()));
        let (got, want) = (got_and_want(&got, vocab), got_and_want(&want, vocab));
        worst = worst.max(relative_error(&got.0, &want.0));
        worst_abs = worst_abs.max(max_abs_diff(&got.0, &want.0));
        agree += usize::from(got.1 == want.1);
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{file}: first-token logits within {:.2} % (RMS, relative) and {worst_abs:.2e} (max abs log-softmax) of its dequantized twin's; greedy tokens agree on {agree} of {} prompts",
        worst * 100.0,
        prompts.len()
    );
    (worst, worst_abs, agree, prompts.len())
}

/// The Q8_0 and Q4_0 fixtures whose products run in our block panels, each with the fixture
/// whose prompts it takes.
pub const BLOCK_FIXTURES: [(&str, &str); 4] = [
    ("llama_linear-q8_0", "llama_linear"),
    ("qwen3-q8_0", "qwen3"),
    ("llama_linear-q4_0", "llama_linear"),
    ("qwen3-q4_0", "qwen3"),
];

/// Sets this test process's SIMD level to `name` (before any kernel runs; every test of a
/// binary that calls this names the same one); `false`, having said so, where the CPU lacks it.
#[cfg(target_arch = "x86_64")]
pub fn pin_level(name: &str) -> bool {
    use ferrite_engine::ops::simd;
    let Some(&wanted) = simd::SimdLevel::all().iter().find(|l| l.name() == name) else {
        panic!("no SIMD level {name}");
    };
    if simd::detected() < wanted {
        println!("skipped: this CPU has no {name} ({})", simd::detected().name());
        return false;
    }
    std::env::set_var("FERRITE_SIMD", name);
    assert_eq!(simd::level(), wanted, "FERRITE_SIMD names {name}");
    true
}

/// Serves the Q8_0 and Q4_0 fixtures at SIMD level `name` (which this test binary sets for its
/// own process before any kernel runs) against their dequantized twins: f32 rounding apart,
/// so within `tol`, and the same greedy tokens. Says so, and checks nothing, where the CPU
/// lacks it.
#[cfg(target_arch = "x86_64")]
pub fn block_products_serve_like_twins(name: &str, tol: f32) {
    if !pin_level(name) {
        return;
    }
    for (file, prompts) in BLOCK_FIXTURES {
        let (_, worst_abs, agree, total) = against_twin(file, prompts, KQuants::Rounded, Activations::Exact);
        assert!(
            worst_abs < tol,
            "{file} at {name}: log-softmax max abs diff {worst_abs} from its dequantized twin"
        );
        assert_eq!(agree, total, "{file} at {name}: greedy tokens differ from the twin's");
    }
}
