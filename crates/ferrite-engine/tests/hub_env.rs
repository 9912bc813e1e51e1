//! `--model org/name` end to end through the environment, as a user sets it: HF_HUB_CACHE or
//! HF_HOME pick the cache, HF_TOKEN is read, HF_HUB_OFFLINE keeps the network out.
//! One test in its own binary: it changes the process environment.

mod common;

use common::*;
use ferrite_engine::model::hub::HubSettings;
use ferrite_engine::{load, LoadOptions};

#[test]
fn environment_selects_cache_token_and_offline_mode() {
    let home = tempfile::tempdir().unwrap();
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo_dir = home.path().join("hub/models--acme--tiny-qwen3");
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let snapshot = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for e in std::fs::read_dir(fixture("qwen3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snapshot.join(e.file_name())).unwrap();
    }

    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_TOKEN", "hf_test_token");
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let s = HubSettings::from_env();
    assert_eq!(s.cache_dir, home.path().join("hub"));
    assert_eq!(s.token.as_deref(), Some("hf_test_token"));
    assert!(s.offline);

    // Through the public entry point, exactly as `--model acme/tiny-qwen3` resolves.
    let m = load("acme/tiny-qwen3", &LoadOptions::default()).unwrap();
    let r = reference(&fixture("qwen3"));
    let p = &r.prompts[2];
    let out = TestEngine::start(m, test_config()).generate_one(greedy(&p.prompt_ids, p.greedy_ids.len()));
    assert_eq!(out.token_ids, p.greedy_ids);

    // A llama.cpp-style repo (GGUF files, no config.json): `:TAG` picks a file, no tag picks
    // Q4_K_M (here the only other file), and a tag that matches nothing lists the files.
    let gguf_dir = home.path().join("hub/models--acme--tiny-qwen3-GGUF");
    std::fs::create_dir_all(gguf_dir.join("refs")).unwrap();
    std::fs::write(gguf_dir.join("refs/main"), commit).unwrap();
    let snapshot = gguf_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    let gguf = fixture("gguf");
    std::fs::copy(gguf.join("qwen3-f32.gguf"), snapshot.join("tiny-qwen3-F32.gguf")).unwrap();
    std::fs::copy(gguf.join("qwen3-q4_0.gguf"), snapshot.join("tiny-qwen3-Q4_K_M.gguf")).unwrap();
    let m = load("acme/tiny-qwen3-GGUF:f32", &LoadOptions::default()).unwrap();
    assert!(m.files.location.ends_with("tiny-qwen3-F32.gguf"), "{}", m.files.location);
    let out = TestEngine::start(m, test_config()).generate_one(greedy(&p.prompt_ids, p.greedy_ids.len()));
    assert_eq!(out.token_ids, p.greedy_ids, "the F32 GGUF from the hub cache");
    let m = load("acme/tiny-qwen3-GGUF", &LoadOptions::default()).unwrap();
    assert!(m.files.location.ends_with("tiny-qwen3-Q4_K_M.gguf"), "{}", m.files.location);
    let err = load("acme/tiny-qwen3-GGUF:Q6_K", &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("no GGUF file matches `Q6_K`") && err.contains("tiny-qwen3-F32.gguf"), "{err}");

    // HF_HUB_CACHE wins over HF_HOME; a repo missing from it fails offline, naming both.
    let empty = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", empty.path());
    assert_eq!(HubSettings::from_env().cache_dir, empty.path());
    let err = load("acme/tiny-qwen3", &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("acme/tiny-qwen3") && err.contains("HF_HUB_OFFLINE"), "{err}");
}
