//! The `ferrite generate` command line, run as a user would: JSON output equals the
//! transformers reference, text streams, and bad input fails with a message.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap()).unwrap()
}

fn ferrite(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrite")).args(args).output().expect("run ferrite")
}

#[test]
fn json_lines_for_several_prompts_match_the_reference_in_order() {
    let r = reference("llama");
    let prompts = &r["prompts"].as_array().unwrap()[1..4];
    let dir = fixture("llama");
    let mut args =
        vec!["generate", "--model", dir.to_str().unwrap(), "--max-tokens", "24", "--ignore-eos", "--json"];
    for p in prompts {
        args.extend(["--prompt", p["prompt_text"].as_str().unwrap()]);
    }
    let out = ferrite(&args);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), prompts.len());
    for (line, p) in lines.iter().zip(prompts) {
        assert_eq!(line["prompt_token_ids"], p["prompt_ids"]);
        let expected: Vec<u64> =
            p["greedy_ids"].as_array().unwrap().iter().take(24).map(|v| v.as_u64().unwrap()).collect();
        let got: Vec<u64> =
            line["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(got, expected);
        let lp = line["logprobs"].as_array().unwrap();
        assert_eq!(lp.len(), got.len(), "one logprob per generated token");
        for (a, b) in lp.iter().zip(p["greedy_logprobs"].as_array().unwrap()) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-4);
        }
        assert_eq!(line["finish_reason"], "length");
        assert!(line["text"].is_string());
    }
}

/// `--weight-dtype bf16` holds an f32 checkpoint's weights in bf16: the run works and its
/// first greedy token is transformers' f32 one (the logits move by bf16 rounding only).
#[test]
fn bf16_weights_from_the_command_line() {
    let r = reference("llama");
    let p = &r["prompts"][3];
    let dir = fixture("llama");
    let args = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--max-tokens",
        "1",
        "--ignore-eos",
        "--json",
        "--weight-dtype",
        "bf16",
        "--prompt",
        p["prompt_text"].as_str().unwrap(),
    ];
    let out = ferrite(&args);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["token_ids"][0], p["greedy_ids"][0]);
}

#[test]
fn streamed_text_equals_the_full_decode() {
    let dir = fixture("qwen3");
    let r = reference("qwen3");
    // The multi-byte prompt: streaming must not split UTF-8 sequences.
    let p = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| !p["prompt_text"].as_str().unwrap().is_ascii())
        .expect("a prompt with non-ASCII text");
    let n = p["greedy_ids"].as_array().unwrap().len().to_string();
    let prompt = p["prompt_text"].as_str().unwrap();
    let model = dir.to_str().unwrap();
    let args = ["generate", "--model", model, "--prompt", prompt, "--max-tokens", &n, "--ignore-eos"];
    let out = ferrite(&args);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, format!("{}\n", p["greedy_text_skip_special"].as_str().unwrap()));
}

#[test]
fn bad_input_fails_with_a_message() {
    let out = ferrite(&["generate", "--model", "/no/such/model", "--prompt", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/model"), "{err}");

    let dir = fixture("llama");
    let out = ferrite(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi", "--top-p", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("top_p"), "{err}");

    let out = ferrite(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "hi", "--max-itl-ms=-5"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-itl-ms must be a number of milliseconds >= 0"), "{err}");

    let out = ferrite(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--dtype",
        "bf16",
        "--weight-dtype",
        "bf16",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "a weight dtype (--weight-dtype) applies on the CPU computing in f32, but this model computes in bf16 on the CPU"
        ),
        "{err}"
    );

    let out = ferrite(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "4",
    ]);
    assert!(
        out.status.success(),
        "the fixture has a chat template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json_token_ids(stdout: &[u8]) -> Vec<Vec<u64>> {
    String::from_utf8(stdout.to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
        })
        .collect()
}

/// Eight prompts at once, then again under a budget and a cache small enough to force chunked
/// prefill and preemption: the same token ids per prompt as running each prompt alone.
#[test]
fn eight_prompts_at_once_equal_one_at_a_time_even_when_squeezed() {
    let r = reference("mistral");
    let prompts: Vec<String> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prompt_text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(prompts.len(), 8);
    let dir = fixture("mistral");
    let base = ["generate", "--model", dir.to_str().unwrap(), "--max-tokens", "20", "--ignore-eos", "--json"];
    let run = |extra: &[&str], ps: &[String]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        for p in ps {
            args.extend(["--prompt", p.as_str()]);
        }
        let out = ferrite(&args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        json_token_ids(&out.stdout)
    };
    let alone: Vec<Vec<u64>> = prompts.iter().map(|p| run(&[], std::slice::from_ref(p)).remove(0)).collect();
    assert_eq!(run(&[], &prompts), alone, "8 prompts in one batch");
    // 16 tokens per step; 30 blocks of 16 = 480 tokens for prompts of ~770 tokens in all.
    let squeezed = run(&["--max-num-batched-tokens", "16", "--kv-cache-blocks", "30"], &prompts);
    assert_eq!(squeezed, alone, "chunked and preempted");
    // A latency target no step can meet: prompts go 16 tokens a step beside the decodes.
    assert_eq!(run(&["--max-itl-ms", "0.01"], &prompts), alone, "prompt chunks cut by the latency target");
}

/// A models.toml with a local entry (the default), a repo in a mock hub cache and a repo that
/// is not downloaded: `models` tells them apart, `--model` omitted loads the default, an entry
/// name loads from the cache offline, and the entry's sampling defaults apply.
#[test]
fn models_toml_entries_resolve_and_list_their_cache_state() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let snapshot = cache.join("models--org--cached/snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(cache.join("models--org--cached/refs")).unwrap();
    std::fs::write(cache.join("models--org--cached/refs/main"), "0123abcd").unwrap();
    for f in std::fs::read_dir(fixture("llama")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snapshot.join(f.file_name())).unwrap();
    }
    let registry = dir.path().join("models.toml");
    std::fs::write(
        &registry,
        format!(
            "default = \"tiny\"\n\n[models.tiny]\npath = {:?}\nsampling = {{ temperature = 0.0 }}\n\n\
             [models.cached]\nrepo = \"org/cached\"\n\n[models.absent]\nrepo = \"org/absent\"\n\n\
             [models.urgent]\npath = {:?}\nbudgets = {{ priority = 3, ttft_deadline_ms = 500 }}\n",
            fixture("llama").to_str().unwrap(),
            fixture("llama").to_str().unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(args)
            .env("FERRITE_MODELS_FILE", &registry)
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };

    let out = run(&["models"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8(out.stdout).unwrap();
    let row = |name: &str| listing.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{listing}"));
    assert!(row("tiny").starts_with("* tiny") && row("tiny").contains("local folder"), "{listing}");
    assert!(row("org/cached").contains("in HF cache"), "{listing}");
    assert!(row("org/absent").contains("not downloaded"), "{listing}");

    // No --model: the default entry, greedy through its sampling default (no --temperature).
    let r = reference("llama");
    let p = &r["prompts"][1];
    let prompt = p["prompt_text"].as_str().unwrap();
    let greedy: Vec<u64> =
        p["greedy_ids"].as_array().unwrap().iter().take(8).map(|v| v.as_u64().unwrap()).collect();
    for model in [None, Some("cached")] {
        let mut args = vec!["generate", "--prompt", prompt, "--max-tokens", "8", "--ignore-eos", "--json"];
        if let Some(m) = model {
            args.extend(["--model", m, "--temperature", "0"]);
        }
        let out = run(&args);
        assert!(out.status.success(), "{model:?}: {}", String::from_utf8_lossy(&out.stderr));
        let ids = json_token_ids(&out.stdout);
        assert_eq!(ids, vec![greedy.clone()], "{model:?}");
    }

    let out = run(&["generate", "--model", "absent", "--prompt", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model `absent` (org/absent") && err.contains("HF_HUB_OFFLINE"), "{err}");

    // A default priority that the scheduling policy would ignore is refused at start.
    let out = run(&["generate", "--model", "urgent", "--prompt", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model `urgent` sets a default priority"), "{err}");
    let out = run(&["generate", "--model", "urgent", "--prompt", "x", "--scheduling-policy", "priority"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// CORS flags are checked before the model loads, with the value named (the model given does
/// not exist, so only an early check can answer about the flag).
#[test]
fn bad_cors_flags_fail_before_loading() {
    let out = ferrite(&["serve", "--model", "/nonexistent/model", "--allowed-origins", "chat.example"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allowed-origins: `chat.example` is not an origin"), "{err}");
    let out = ferrite(&["serve", "--model", "/nonexistent/model", "--allow-credentials"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("none are given"), "{err}");
}

/// A hub that cannot be reached (here: nothing listens at HF_ENDPOINT) is said in one line,
/// with the way out: a local model, or the cache alone.
#[test]
fn an_unreachable_hub_names_the_offline_way_out() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["generate", "--model", "acme/not-cached", "--prompt", "hi"])
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .expect("run ferrite");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("The hub cannot be reached from here") && last.contains("--model stories260k"),
        "{err}"
    );
    assert!(!err.contains("stack backtrace"), "{err}");
}
