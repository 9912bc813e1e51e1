//! Loading from a Hugging Face cache layout (repo ids, revisions, offline mode) and the error
//! messages for broken model folders: each names the file, architecture or tensor at fault.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ferrite_engine::model::hub::{HubRepo, HubSettings, RepoId};
use ferrite_engine::model::loader::{load_files, ModelFiles, ModelSource};
use ferrite_engine::{load, LoadOptions};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn broken_copy(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&fixture("qwen2"), &dir);
    edit(&dir);
    (tmp, dir)
}

fn load_err(dir: &Path) -> String {
    match load(dir.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Lays out `models--{org}--{name}/{refs/main, snapshots/<commit>/...}` as the hub does.
fn hub_cache(repo: &str, commit: &str) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let folder = cache.path().join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), commit).unwrap();
    copy_dir(&fixture("llama_sharded"), &folder.join("snapshots").join(commit));
    cache
}

fn offline(cache: &Path) -> HubSettings {
    HubSettings { cache_dir: cache.to_path_buf(), token: None, offline: true, endpoint: None }
}

#[test]
fn repo_id_resolves_through_the_hub_cache_and_generates_the_reference() {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let cache = hub_cache("tiny-org/tiny-llama", commit);
    let r = reference(&fixture("llama_sharded"));
    for source in ["tiny-org/tiny-llama", &format!("tiny-org/tiny-llama@{commit}")] {
        let ModelSource::Hub(id) = ModelSource::parse(source).unwrap() else {
            panic!("{source} is a repo id")
        };
        let files = ModelFiles::from_hub(&HubRepo::new(id, offline(cache.path()))).unwrap();
        assert!(files.weights.len() >= 2, "sharded weights resolved from the index");
        assert!(files.config.starts_with(cache.path()));
        let m = load_files(files, &LoadOptions::default()).unwrap();
        let p = &r.prompts[1];
        let out = TestEngine::start(m, test_config()).generate_one(greedy(&p.prompt_ids, p.greedy_ids.len()));
        assert_eq!(out.token_ids, p.greedy_ids, "{source}");
    }
}

#[test]
fn offline_miss_names_the_repo_file_and_cache() {
    let cache = hub_cache("tiny-org/tiny-llama", "0123456789abcdef0123456789abcdef01234567");
    let id = RepoId::parse("tiny-org/other-model@v2").unwrap();
    let err = ModelFiles::from_hub(&HubRepo::new(id, offline(cache.path()))).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("tiny-org/other-model") && err.contains("v2"),
        "{err}"
    );
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn missing_files_are_named() {
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let (_tmp, dir) = broken_copy(|d| std::fs::remove_file(d.join(file)).unwrap());
        let err = load_err(&dir);
        assert!(err.contains(file) && err.contains(dir.to_str().unwrap()), "{file}: {err}");
    }
    let (_tmp, dir) = broken_copy(|_| {});
    let sharded = dir.parent().unwrap().join("sharded");
    copy_dir(&fixture("llama_sharded"), &sharded);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shard =
        index["weight_map"].as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string();
    std::fs::remove_file(sharded.join(&shard)).unwrap();
    let err = load_err(&sharded);
    assert!(err.contains(&shard), "missing shard: {err}");
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let (_tmp, dir) = broken_copy(|d| {
        let p = d.join("config.json");
        let text = std::fs::read_to_string(&p).unwrap().replace("Qwen2ForCausalLM", "GPTNeoXForCausalLM");
        std::fs::write(p, text).unwrap();
    });
    let err = load_err(&dir);
    assert!(
        err.contains("GPTNeoXForCausalLM")
            && err.contains("LlamaForCausalLM")
            && err.contains("Qwen3ForCausalLM"),
        "{err}"
    );
}

/// Rewrites model.safetensors through `edit`, which may drop or replace tensors.
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, safetensors::tensor::TensorView<'_>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    edit(&mut tensors);
    let out = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let name = "model.layers.1.self_attn.k_proj.bias";
    let (_tmp, dir) = broken_copy(|d| rewrite_weights(d, |t| t.retain(|(n, _)| n != name)));
    let err = load_err(&dir);
    assert!(err.contains(name), "{err}");
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let name = "model.layers.0.mlp.down_proj.weight";
    let (_tmp, dir) = broken_copy(|d| {
        rewrite_weights(d, |t| {
            let i = t.iter().position(|(n, _)| n == name).unwrap();
            let v = &t[i].1;
            let shape = v.shape().to_vec();
            // Same bytes, transposed shape: a checkpoint written with the wrong layout.
            let swapped = vec![shape[1], shape[0]];
            let view = safetensors::tensor::TensorView::new(v.dtype(), swapped, v.data()).unwrap();
            t[i].1 = view;
        })
    });
    let err = load_err(&dir);
    assert!(err.contains(name) && err.contains("shape"), "{err}");
}

#[test]
fn not_a_model_source_is_explained() {
    let err = load("not a repo id", &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("not a repo id") && err.contains("org/name"), "{err}");
    let err = load("./does/not/exist", &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("./does/not/exist"), "{err}");
}

/// The builder takes a source, not a loaded model: it opens the device, loads, applies the
/// spec's overrides and sizes the cache for the device it got.
#[test]
fn the_builder_loads_a_source_and_applies_its_overrides() {
    use ferrite_engine::{
        DeviceChoice, EngineBuilder, EngineConfig, KvCacheSize, Message, ModelSpec, StartedEngine,
    };
    let source = fixture("llama").to_str().unwrap().to_string();
    let start = |spec: &ModelSpec, kv_cache: KvCacheSize| -> StartedEngine {
        EngineBuilder::new(EngineConfig::default(), kv_cache).load(spec, None).expect("engine starts")
    };
    let stop = |started: StartedEngine| {
        started.handle.shutdown();
        started.thread.join().unwrap();
    };
    let plain = ModelSpec { device: DeviceChoice::Cpu, ..ModelSpec::new(source.clone()) };
    let cpu_bytes = 1 << 20;
    let by_device = start(&plain, KvCacheSize::ByDevice { gpu_share: 0.5, cpu_bytes });
    let by_bytes = start(&plain, KvCacheSize::Bytes(cpu_bytes));
    let info = by_device.handle.info().clone();
    assert_eq!(info.max_model_len, 1024, "the model's max_position_embeddings");
    assert_eq!(info.cache.num_blocks, by_bytes.handle.info().cache.num_blocks, "on the CPU, the bytes");
    assert!(info.cache.num_blocks > 0);
    stop(by_bytes);
    stop(by_device);

    let spec = ModelSpec {
        max_model_len: Some(100),
        chat_template: Some("{% for m in messages %}<{{ m.content }}>{% endfor %}".into()),
        ..plain
    };
    let started = start(&spec, KvCacheSize::Blocks(8));
    assert_eq!(started.handle.info().max_model_len, 100);
    let rendered = started
        .tokenizer
        .chat_template()
        .expect("the override")
        .render(&[Message::new("user", "hey")], false)
        .unwrap();
    assert_eq!(rendered, "<hey>");
    stop(started);

    let err = EngineBuilder::new(EngineConfig::default(), KvCacheSize::Blocks(8))
        .load(&ModelSpec::new("/no/such/model"), None)
        .err()
        .expect("a missing folder is an error")
        .to_string();
    assert!(err.contains("/no/such/model"), "{err}");
}
