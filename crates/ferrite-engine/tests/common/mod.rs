//! Shared by the integration tests: the fixtures' reference files, and a one-call generation.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ferrite_engine::block_allocator::BlockAllocator;
use ferrite_engine::generate::{generate, GenerationOutput, GenerationRequest, StepLimits};
use ferrite_engine::kv_cache::KvCache;
use ferrite_engine::loader::LoadedModel;
use ferrite_engine::sampler::SamplingParams;
use ferrite_engine::Device;
use serde::Deserialize;

/// Where the model tests run: `FERRITE_TEST_DEVICE=cuda` (or `cuda:N`) puts them on a GPU
/// (scripts/gpu-check.sh does), anything else or nothing on the CPU. A GPU asked for but not
/// usable fails the test: it must never pass on the CPU instead.
pub fn test_device() -> Device {
    match std::env::var("FERRITE_TEST_DEVICE").as_deref() {
        Ok(d) if d.starts_with("cuda") => {
            let n = d.strip_prefix("cuda:").map_or(0, |n| n.parse().expect("FERRITE_TEST_DEVICE=cuda:N"));
            ferrite_engine::device::open_cuda(n).unwrap_or_else(|e| panic!("FERRITE_TEST_DEVICE={d}: {e}"))
        }
        _ => Device::Cpu,
    }
}

#[derive(Debug, Deserialize)]
pub struct PromptRef {
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub greedy_logprobs: Vec<f32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRef {
    pub messages: Vec<serde_json::Value>,
    pub rendered: String,
    pub prompt_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompts: Vec<PromptRef>,
    #[serde(default)]
    pub chat: Vec<ChatRef>,
}

/// The committed fixtures; `FERRITE_FIXTURES` points prebuilt test binaries at a copy (on a
/// GPU machine the repository is somewhere else than where they were built).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("FERRITE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

pub fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

pub fn greedy(prompt: &[u32], max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt_token_ids: prompt.to_vec(),
        sampling: SamplingParams { ignore_eos: true, ..SamplingParams::default() },
        max_tokens,
        eos_token_ids: vec![],
    }
}

/// Runs `requests` as one batch on a fresh cache.
pub fn run(m: &LoadedModel, requests: Vec<GenerationRequest>, limits: &StepLimits) -> Vec<GenerationOutput> {
    let block_size = 16;
    let spec = m.model.kv_cache_spec();
    let num_blocks = 512;
    let mut kv = KvCache::new(spec, block_size, num_blocks, m.model.device()).unwrap();
    let mut alloc = BlockAllocator::new(num_blocks);
    let out = generate(m.model.as_ref(), &mut kv, &mut alloc, requests, limits, |_| {}).unwrap();
    assert_eq!(alloc.num_free_blocks(), num_blocks, "every block returned after the batch");
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

pub fn with_logits() -> StepLimits {
    StepLimits { keep_prompt_logits: true, ..StepLimits::default() }
}
