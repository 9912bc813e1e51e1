//! `ferrite bench`: `serve` against a `ferrite serve` started here (vLLM's JSON keys and printed
//! labels, counts equal to what was asked), `latency` and `throughput` in-process.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3")
}

fn ferrite() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrite"));
    c.env("FERRITE_LOG", "warn");
    c
}

/// A server on a free port (killed when dropped) and its base URL.
fn start_server() -> (common::Served, String) {
    let served = common::Served::start(&["--kv-cache-blocks", "512", "--device-cost-per-hour", "3.6"], None);
    let url = format!("http://{}", served.addr);
    (served, url)
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn bench_serve_reports_vllms_keys_and_exact_counts() {
    let (_server, url) = start_server();
    let dir = tempfile::tempdir().unwrap();
    for backend in ["openai", "openai-chat"] {
        let result = dir.path().join(format!("{backend}.json"));
        let out = ferrite()
            .args(["bench", "serve", "--backend", backend, "--base-url", &url, "--model", "tiny"])
            .args(["--tokenizer", fixture().to_str().unwrap(), "--dataset-name", "random"])
            .args(["--random-input-len", "24", "--random-output-len", "6", "--num-prompts", "12"])
            .args(["--max-concurrency", "4", "--ignore-eos", "--metric-percentiles", "50,99"])
            .args(["--percentile-metrics", "ttft,tpot,itl,e2el", "--goodput", "ttft:60000", "e2el:60000"])
            .args(["--save-result", "--result-filename", result.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        for label in [
            " Serving Benchmark Result ",
            "Successful requests:                     12",
            "Failed requests:                         0",
            "Maximum request concurrency:             4",
            "Benchmark duration (s):",
            "Total input tokens:",
            "Total generated tokens:                  72",
            "Request throughput (req/s):",
            "Request goodput (req/s):",
            "Output token throughput (tok/s):",
            "Total token throughput (tok/s):",
            "Time to First Token",
            "Mean TTFT (ms):",
            "Median TTFT (ms):",
            "P99 TTFT (ms):",
            "Time per Output Token (excl. 1st token)",
            "Mean TPOT (ms):",
            "Inter-token Latency",
            "P50 ITL (ms):",
            "End-to-end Latency",
            "P99 E2EL (ms):",
        ] {
            assert!(stdout.contains(label), "{backend}: no {label:?} in\n{stdout}");
        }
        let r = read_json(&result);
        assert_eq!(r["completed"], 12, "{r}");
        assert_eq!(r["failed"], 0);
        assert_eq!(r["num_prompts"], 12);
        assert_eq!(r["total_output_tokens"], 72);
        assert_eq!(r["output_lens"].as_array().unwrap().len(), 12);
        assert!(r["output_lens"].as_array().unwrap().iter().all(|l| l == 6), "{r}");
        // Every prompt is 24 tokens long as the server counts them (+ the chat template's).
        if backend == "openai" {
            assert_eq!(r["total_input_tokens"], 12 * 24, "{r}");
        }
        for key in [
            "date",
            "backend",
            "model_id",
            "tokenizer_id",
            "request_rate",
            "burstiness",
            "max_concurrency",
            "duration",
            "total_input_tokens",
            "request_throughput",
            "request_goodput",
            "output_throughput",
            "total_token_throughput",
            "max_output_tokens_per_s",
            "max_concurrent_requests",
            "mean_ttft_ms",
            "median_ttft_ms",
            "std_ttft_ms",
            "p99_ttft_ms",
            "p50_ttft_ms",
            "mean_tpot_ms",
            "p99_tpot_ms",
            "mean_itl_ms",
            "p99_itl_ms",
            "mean_e2el_ms",
            "p99_e2el_ms",
        ] {
            assert!(r.get(key).is_some(), "{backend}: no {key} in {r}");
        }
        assert_eq!(r["request_rate"], "inf");
        let (ttft, e2el) = (r["mean_ttft_ms"].as_f64().unwrap(), r["mean_e2el_ms"].as_f64().unwrap());
        assert!(ttft > 0.0 && ttft <= e2el, "{r}");
        assert!(r["request_goodput"].as_f64().unwrap() > 0.0, "{r}");
        // The server's own account of the run, from its /metrics before and after.
        let deltas = &r["server_metrics_delta"];
        assert_eq!(deltas["ferrite:generation_tokens_total{model_name=\"tiny\"}"], 72.0, "{deltas}");
        let success =
            deltas["ferrite:request_success_total{finished_reason=\"length\",model_name=\"tiny\"}"].clone();
        assert_eq!(success, 12.0, "{deltas}");
        assert!(r["cost_per_million_tokens"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
}

/// `--endpoint /v1/embeddings` benchmarks embeddings: every prompt embedded, its tokens counted
/// as the server counts them, nothing generated, each latency also its time to the answer.
#[test]
fn bench_serve_measures_embeddings() {
    let (_server, url) = start_server();
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("embeddings.json");
    let out = ferrite()
        .args(["bench", "serve", "--endpoint", "/v1/embeddings", "--base-url", &url, "--model", "tiny"])
        .args(["--tokenizer", fixture().to_str().unwrap(), "--dataset-name", "random"])
        .args(["--random-input-len", "24", "--num-prompts", "16", "--percentile-metrics", "ttft,e2el"])
        .args(["--save-result", "--result-filename", result.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for label in
        ["Successful requests:                     16", "Request throughput (req/s):", "P99 E2EL (ms):"]
    {
        assert!(stdout.contains(label), "no {label:?} in\n{stdout}");
    }
    let r = read_json(&result);
    assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(16), Some(0)), "{r}");
    assert_eq!(r["backend"], "openai-embeddings");
    assert_eq!(r["total_input_tokens"], 16 * 24, "{r}");
    assert_eq!(r["total_output_tokens"], 0, "{r}");
    assert_eq!(r["mean_ttft_ms"], r["mean_e2el_ms"], "{r}");
    assert!(r["mean_e2el_ms"].as_f64().unwrap() > 0.0, "{r}");
}

/// vLLM's run-shaping flags: `--header` reaches the server (here the API key it demands),
/// `--num-warmups` requests are sent but not measured (the server's own token count over the
/// run is the measured requests' only), `--metadata` lands in the JSON, and `--append-result`
/// adds one object per line; the second run ramps its rate up (`--ramp-up-strategy`).
#[test]
fn bench_serve_headers_warmups_metadata_and_appended_results() {
    let served = common::Served::start(&["--kv-cache-blocks", "512", "--api-key", "sk-bench"], None);
    let url = format!("http://{}", served.addr);
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("runs.jsonl");
    for run in 0..2 {
        let ramp: &[&str] = if run == 1 {
            &["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "200", "--ramp-up-end-rps", "400"]
        } else {
            &[]
        };
        let out = ferrite()
            .env_remove("OPENAI_API_KEY")
            .args(["bench", "serve", "--base-url", &url, "--model", "tiny"])
            .args(ramp)
            .args(["--tokenizer", fixture().to_str().unwrap(), "--dataset-name", "random"])
            .args(["--random-input-len", "16", "--random-output-len", "5", "--num-prompts", "6"])
            .args(["--ignore-eos", "--num-warmups", "3", "--header", "authorization=Bearer sk-bench"])
            .args(["--metadata", &format!("run={run}"), "version=0.3"])
            .args(["--save-result", "--append-result", "--result-filename", result.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.contains("Warming up with 3 requests...") && stdout.contains("Warmup run completed."),
            "{stdout}"
        );
    }
    let text = std::fs::read_to_string(&result).unwrap();
    let runs: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(runs.len(), 2, "{text}");
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r["run"], i.to_string());
        assert_eq!(r["version"], "0.3");
        assert_eq!(r["completed"], 6);
        // Warm-ups (3 x 5 tokens) are not in the run's account.
        let deltas = &r["server_metrics_delta"];
        assert_eq!(deltas["ferrite:generation_tokens_total{model_name=\"tiny\"}"], 30.0, "{deltas}");
    }
    assert!(runs[0].get("ramp_up_strategy").is_none());
    assert_eq!(runs[1]["ramp_up_strategy"], "linear");
    assert_eq!(
        (runs[1]["ramp_up_start_rps"].as_f64(), runs[1]["ramp_up_end_rps"].as_f64()),
        (Some(200.0), Some(400.0))
    );
    let out = ferrite()
        .args(["bench", "serve", "--base-url", &url, "--model", "tiny", "--ramp-up-strategy", "linear"])
        .args(["--tokenizer", fixture().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs --ramp-up-start-rps and --ramp-up-end-rps"),
        "{err}"
    );
    let out = ferrite()
        .args(["bench", "serve", "--base-url", &url, "--model", "tiny", "--header", "no-equals-sign"])
        .args(["--tokenizer", fixture().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--header \"no-equals-sign\": expected NAME=VALUE"),
        "{err}"
    );
}

/// `--ttft-deadline-ms` and `--deadline-ms` go with every request: roomy ones are met, and
/// the run reports the server's TTFT predictions against what it measured; an impossible one
/// (once warm-ups have timed the server's steps) is refused at admission for every request,
/// which the run counts apart from other failures.
#[test]
fn bench_serve_attaches_deadlines_and_reports_refusals_and_predictions() {
    let (_server, url) = start_server();
    let dir = tempfile::tempdir().unwrap();
    let run = |budget: &[&str], name: &str| {
        let result = dir.path().join(name);
        let out = ferrite()
            .args(["bench", "serve", "--base-url", &url, "--model", "tiny"])
            .args(["--tokenizer", fixture().to_str().unwrap(), "--dataset-name", "random"])
            .args(["--random-input-len", "16", "--random-output-len", "4", "--num-prompts", "8"])
            .args(["--ignore-eos", "--num-warmups", "2", "--goodput", "ttft:60000"])
            .args(budget)
            .args(["--save-result", "--result-filename", result.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        (stdout, read_json(&result))
    };
    let (stdout, met) = run(&["--ttft-deadline-ms", "60000", "--deadline-ms", "600000"], "met.json");
    assert_eq!(
        (met["completed"].as_u64(), met["rejected_by_deadline"].as_u64()),
        (Some(8), Some(0)),
        "{met}"
    );
    assert_eq!(met["cut_by_deadline"], 0);
    assert_eq!(met["admitted_goodput_ratio"], 1.0);
    assert!(met["ttft_estimate_count"].as_u64().unwrap() > 0, "no prediction came back: {met}");
    let error = |p: &str| met[format!("ttft_estimate_abs_error_{p}_ms")].as_f64().unwrap();
    assert!(error("p90") >= error("p50"), "{met}");
    for label in ["Rejected at admission (429):", "TTFT prediction |error| P50 (ms):"] {
        assert!(stdout.contains(label), "{label}: {stdout}");
    }
    // The initial request and the warm-ups go without budgets (they check and warm the server).
    let (_, refused) = run(&["--ttft-deadline-ms", "0.001"], "refused.json");
    assert_eq!(refused["rejected_by_deadline"], 8, "{refused}");
    assert_eq!((refused["completed"].as_u64(), refused["failed"].as_u64()), (Some(0), Some(8)));
}

#[test]
fn bench_serve_fails_clearly_when_the_model_is_wrong() {
    let (_server, url) = start_server();
    let out = ferrite()
        .args(["bench", "serve", "--base-url", &url, "--model", "nope"])
        .args(["--tokenizer", fixture().to_str().unwrap(), "--num-prompts", "2", "--random-input-len", "8"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Initial test run failed") && err.contains("nope"), "{err}");

    // A result folder that is not there fails before the first request, not after the run.
    let missing = tempfile::tempdir().unwrap().path().join("no/such/dir");
    let out = ferrite()
        .args(["bench", "serve", "--base-url", &url, "--model", "tiny", "--num-prompts", "2"])
        .args(["--tokenizer", fixture().to_str().unwrap(), "--random-input-len", "8"])
        .args(["--save-result", "--result-dir", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("--save-result cannot write into {}", missing.display());
    assert!(err.contains(&want), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Starting initial single prompt test run"), "{stdout}");
}

#[test]
fn bench_latency_and_throughput_write_vllms_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture();
    let latency = dir.path().join("latency.json");
    let out = ferrite()
        .args(["bench", "latency", "--model", model.to_str().unwrap(), "--kv-cache-blocks", "256"])
        .args(["--input-len", "16", "--output-len", "8", "--batch-size", "4"])
        .args(["--num-iters-warmup", "1", "--num-iters", "3", "--output-json", latency.to_str().unwrap()])
        // bf16 weights with bf16 activations: applied where the CPU has AVX-512 BF16.
        .args(["--weight-dtype", "bf16", "--bf16-activations"])
        .env_remove("FERRITE_SIMD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Avg latency: ") && stdout.contains("99% percentile latency: "), "{stdout}");
    let r = read_json(&latency);
    assert_eq!(r["latencies"].as_array().unwrap().len(), 3);
    let avg = r["avg_latency"].as_f64().unwrap();
    assert!(avg > 0.0);
    for p in ["10", "25", "50", "75", "90", "99"] {
        assert!(r["percentiles"][p].as_f64().is_some(), "{r}");
    }
    let kernels = r["cpu_kernels"].as_str().unwrap_or_default();
    assert!(["baseline", "avx2", "avx512", "avx512-vnni", "amx"].contains(&kernels), "{r}");
    #[cfg(target_arch = "x86_64")]
    let bf16_dots = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
        && ["avx512", "avx512-vnni", "amx"].contains(&kernels);
    #[cfg(not(target_arch = "x86_64"))]
    let bf16_dots = false;
    assert_eq!(r["cpu_activations"], if bf16_dots { "bf16" } else { "exact" }, "{r}");

    let throughput = dir.path().join("throughput.json");
    let out = ferrite()
        .args(["bench", "throughput", "--model", model.to_str().unwrap(), "--kv-cache-blocks", "256"])
        .args(["--num-prompts", "20", "--input-len", "16", "--output-len", "8"])
        .args(["--output-json", throughput.to_str().unwrap()])
        // The portable tiles, whatever this CPU has: the cap is obeyed and reported, and int8
        // and bf16 activations (which need int8 products and AVX-512 BF16) are reported as not
        // applied.
        .args(["--int8-activations", "--bf16-activations", "--weight-dtype", "bf16"])
        .env("FERRITE_SIMD", "baseline")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.starts_with("Throughput: ") && stdout.contains("Total num output tokens:  160"),
        "{stdout}"
    );
    let r = read_json(&throughput);
    assert_eq!(r["num_requests"], 20);
    assert_eq!(r["total_num_tokens"], 20 * 16 + 20 * 8, "{r}");
    let elapsed = r["elapsed_time"].as_f64().unwrap();
    assert!((r["requests_per_second"].as_f64().unwrap() - 20.0 / elapsed).abs() < 1e-6);
    assert!((r["tokens_per_second"].as_f64().unwrap() - 480.0 / elapsed).abs() < 1e-6);
    assert_eq!(r["cpu_kernels"], "baseline", "{r}");
    assert_eq!(r["cpu_activations"], "exact", "{r}");
}
