//! `bench serve`: an HTTP client that measures any OpenAI-compatible server (ferrite, vLLM,
//! llama-server) the way `vllm bench serve` does: the same flags, the same definitions of TTFT,
//! TPOT, ITL and E2EL, the same printed block and JSON keys, plus the server's `/metrics` deltas
//! and ferrite's cost per million tokens when the server reports them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::budgets::{BudgetArgs, BudgetReport};
use super::datasets::{self, PrefixRepetitionSpec, RandomSpec, Sample};
use super::request::send;
use super::stats::{mean, percentile, std_dev};
use super::traffic::{arrival_times, Ramp, RampStrategy};
use super::{check_result_dir, date_string, save_json};
use crate::registry::Registry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// `/v1/completions`
    Openai,
    /// `/v1/chat/completions`
    OpenaiChat,
    /// `/v1/embeddings` (also chosen by an `--endpoint` ending in `/embeddings`): each prompt
    /// embedded, its latency the whole request's.
    OpenaiEmbeddings,
}

/// Which schema the constrained requests of `--structured-output-ratio` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchemaVariety {
    /// The same schema for all (compiled once, then cached).
    One,
    /// Each request its own (a compile per request, and no two matchers alike).
    Distinct,
}

#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    #[arg(long, value_enum, default_value = "openai")]
    backend: Backend,
    /// The server, e.g. http://127.0.0.1:8000 (default: from --host and --port).
    #[arg(long)]
    base_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Path under the base URL (default: the backend's).
    #[arg(long)]
    endpoint: Option<String>,
    /// The model name to send (default: the first one `/v1/models` lists).
    #[arg(long)]
    model: Option<String>,
    /// Tokenizer for building prompts of a given length: a models.toml entry, folder or repo id
    /// (default: --model).
    #[arg(long)]
    tokenizer: Option<String>,
    #[arg(long, env = "FERRITE_MODELS_FILE")]
    models_file: Option<PathBuf>,
    #[arg(long, default_value = "random")]
    dataset_name: String,
    #[arg(long)]
    dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    num_prompts: usize,
    #[arg(long, default_value_t = 1024)]
    random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    random_output_len: usize,
    #[arg(long, default_value_t = 0.0)]
    random_range_ratio: f64,
    #[arg(long, default_value_t = 0)]
    random_prefix_len: usize,
    #[arg(long, default_value_t = 256)]
    prefix_repetition_prefix_len: usize,
    #[arg(long, default_value_t = 256)]
    prefix_repetition_suffix_len: usize,
    #[arg(long, default_value_t = 10)]
    prefix_repetition_num_prefixes: usize,
    #[arg(long, default_value_t = 128)]
    prefix_repetition_output_len: usize,
    #[arg(long)]
    sharegpt_output_len: Option<usize>,
    /// Requests per second (Poisson arrivals, or gamma with --burstiness); inf sends all at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// Gamma shape of the inter-arrival times: 1 is Poisson, below 1 burstier.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    #[arg(long)]
    max_concurrency: Option<usize>,
    #[arg(long)]
    ignore_eos: bool,
    /// Which of ttft, tpot, itl, e2el to report (default ttft,tpot,itl).
    #[arg(long, default_value = "ttft,tpot,itl")]
    percentile_metrics: String,
    #[arg(long, default_value = "99")]
    metric_percentiles: String,
    /// Service-level objectives in ms, e.g. `ttft:500 tpot:50 e2el:2000`.
    #[arg(long, num_args = 1..)]
    goodput: Vec<String>,
    #[command(flatten)]
    budgets: BudgetArgs,
    #[arg(long)]
    save_result: bool,
    /// Keep the per-request lists (input_lens, ttfts, itls, generated_texts, ...) in the JSON.
    #[arg(long)]
    save_detailed: bool,
    #[arg(long)]
    result_dir: Option<PathBuf>,
    #[arg(long)]
    result_filename: Option<String>,
    #[arg(long)]
    label: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<i64>,
    /// Fraction of the requests (spread evenly) that ask for structured output: a JSON schema
    /// in `response_format` (vLLM's structured-output benchmark has the same knob).
    #[arg(long, default_value_t = 0.0)]
    structured_output_ratio: f64,
    #[arg(long, value_enum, default_value = "one")]
    structured_output_schemas: SchemaVariety,
    /// A request rate that changes over the run instead of --request-rate: from
    /// --ramp-up-start-rps at the first request to --ramp-up-end-rps at the last (vLLM's).
    #[arg(long, value_enum)]
    ramp_up_strategy: Option<RampStrategy>,
    #[arg(long)]
    ramp_up_start_rps: Option<f64>,
    #[arg(long)]
    ramp_up_end_rps: Option<f64>,
    /// Requests sent (and not measured) before the run, as the run sends them.
    #[arg(long, default_value_t = 0)]
    num_warmups: usize,
    /// An HTTP header for every request, `NAME=VALUE` (repeatable).
    #[arg(long = "header", num_args = 1..)]
    headers: Vec<String>,
    /// `KEY=VALUE` pairs saved in the result JSON (e.g. `--metadata version=0.3 tp=1`).
    #[arg(long, num_args = 1..)]
    metadata: Vec<String>,
    /// With --save-result, add this run's JSON to the end of the result file as one line
    /// (creating it) instead of replacing the file with it.
    #[arg(long)]
    append_result: bool,
}

/// `--header` values as a header map, each checked (`NAME=VALUE`, a valid name and value).
fn header_map(headers: &[String]) -> Result<reqwest::header::HeaderMap> {
    let mut map = reqwest::header::HeaderMap::new();
    for h in headers {
        let (name, value) =
            h.split_once('=').with_context(|| format!("--header {h:?}: expected NAME=VALUE"))?;
        let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("--header {h:?}: `{name}` is not a header name"))?;
        let value = reqwest::header::HeaderValue::from_str(value.trim())
            .with_context(|| format!("--header {h:?}: not a header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// `--metadata` pairs as JSON strings by key.
fn metadata_pairs(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            let (k, v) =
                p.split_once('=').with_context(|| format!("--metadata {p:?}: expected KEY=VALUE"))?;
            Ok((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// The schema of constrained request `i`: strings long enough that `max_tokens` ends the
/// answer before the grammar does, so constrained and free requests generate as many tokens
/// and their step times compare.
fn bench_schema(i: usize, variety: SchemaVariety) -> Value {
    let salt = match variety {
        SchemaVariety::One => 0,
        SchemaVariety::Distinct => i,
    };
    json!({"type": "object", "properties": {
        format!("title_{salt}"): {"type": "string", "minLength": 400},
        "rating": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": [format!("title_{salt}"), "rating", "tags"], "additionalProperties": false})
}

/// Whether request `i` of the run is constrained: `ratio` of them, evenly spread.
fn constrained(i: usize, ratio: f64) -> bool {
    ((i + 1) as f64 * ratio).floor() > (i as f64 * ratio).floor()
}

fn payload(args: &ServeBenchArgs, model: &str, sample: &Sample, i: usize) -> Value {
    let mut body = match args.backend {
        Backend::Openai => json!({
            "model": model,
            "prompt": sample.prompt,
            "max_tokens": sample.output_len,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
        Backend::OpenaiChat => json!({
            "model": model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": sample.prompt}]}],
            "max_completion_tokens": sample.output_len,
            "stream": true,
            "stream_options": {"include_usage": true},
        }),
        Backend::OpenaiEmbeddings => return json!({"model": model, "input": sample.prompt}),
    };
    if args.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let Some(t) = args.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = args.top_p {
        body["top_p"] = json!(p);
    }
    if let Some(k) = args.top_k {
        body["top_k"] = json!(k);
    }
    args.budgets.apply(&mut body);
    if constrained(i, args.structured_output_ratio) {
        let schema = bench_schema(i, args.structured_output_schemas);
        body["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}});
    }
    body
}

/// Parses Prometheus text exposition into series → value (comments skipped).
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.trim().to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

async fn scrape(client: &reqwest::Client, base: &str) -> Option<BTreeMap<String, f64>> {
    let r = client.get(format!("{base}/metrics")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(parse_metrics(&r.text().await.ok()?))
}

/// vLLM's `{:<40} {:<10}` row.
fn row(label: &str, value: impl std::fmt::Display) -> String {
    format!("{label:<40} {value:<10}")
}

fn percentile_label(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(mut args: ServeBenchArgs) -> Result<()> {
    if args.save_result {
        check_result_dir(args.result_dir.as_deref(), args.result_filename.as_deref())?;
    }
    let base = args.base_url.clone().unwrap_or_else(|| format!("http://{}:{}", args.host, args.port));
    let base = base.trim_end_matches('/').trim_end_matches("/v1").to_string();
    let endpoint = args.endpoint.clone().unwrap_or_else(|| match args.backend {
        Backend::Openai => "/v1/completions".into(),
        Backend::OpenaiChat => "/v1/chat/completions".into(),
        Backend::OpenaiEmbeddings => "/v1/embeddings".into(),
    });
    if endpoint.trim_end_matches('/').ends_with("/embeddings") {
        args.backend = Backend::OpenaiEmbeddings;
    }
    let url = format!("{base}{endpoint}");
    let key = std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty());
    let metadata = metadata_pairs(&args.metadata)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(6 * 3600))
        .tcp_nodelay(true)
        .default_headers(header_map(&args.headers)?)
        .build()?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let mut r = client.get(format!("{base}/v1/models"));
            if let Some(k) = &key {
                r = r.bearer_auth(k);
            }
            let r = r.send().await.context("asking /v1/models for the model name")?;
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            if !status.is_success() {
                bail!("GET {base}/v1/models answered {status} (an API key in OPENAI_API_KEY?): {text}");
            }
            let v: Value =
                serde_json::from_str(&text).with_context(|| format!("/v1/models is not JSON: {text}"))?;
            v["data"][0]["id"].as_str().context("/v1/models lists no model; pass --model")?.to_string()
        }
    };
    let tokenizer_arg = args.tokenizer.clone().unwrap_or_else(|| model.clone());
    let registry = Registry::load(args.models_file.as_deref())?;
    let source = registry.resolve(Some(&tokenizer_arg))?.model_arg();
    let tokenizer = ferrite_engine::model::loader::load_tokenizer(&source)
        .with_context(|| format!("loading the tokenizer `{tokenizer_arg}` (set --tokenizer)"))?;

    let samples = match args.dataset_name.as_str() {
        "random" => datasets::random(
            &tokenizer,
            &RandomSpec {
                num_prompts: args.num_prompts,
                input_len: args.random_input_len,
                output_len: args.random_output_len,
                range_ratio: args.random_range_ratio,
                prefix_len: args.random_prefix_len,
            },
            args.seed,
        )?,
        "prefix_repetition" => datasets::prefix_repetition(
            &tokenizer,
            &PrefixRepetitionSpec {
                num_prompts: args.num_prompts,
                prefix_len: args.prefix_repetition_prefix_len,
                suffix_len: args.prefix_repetition_suffix_len,
                num_prefixes: args.prefix_repetition_num_prefixes,
                output_len: args.prefix_repetition_output_len,
            },
            args.seed,
        )?,
        "sharegpt" => datasets::sharegpt_flag(
            &tokenizer,
            args.dataset_path.as_deref(),
            args.num_prompts,
            args.sharegpt_output_len,
            args.seed,
        )?,
        other => bail!("--dataset-name {other:?}: expected random, sharegpt or prefix_repetition"),
    };
    if samples.is_empty() {
        bail!("no prompts to send (--num-prompts 0?)");
    }
    if !(0.0..=1.0).contains(&args.structured_output_ratio) {
        bail!("--structured-output-ratio must be in [0, 1], got {}", args.structured_output_ratio);
    }
    let metrics_list: Vec<String> =
        args.percentile_metrics.split(',').map(|s| s.trim().to_string()).collect();
    if let Some(bad) = metrics_list.iter().find(|m| !["ttft", "tpot", "itl", "e2el"].contains(&m.as_str())) {
        bail!("--percentile-metrics: unknown metric {bad:?} (ttft, tpot, itl, e2el)");
    }
    let percentiles: Vec<f64> = args
        .metric_percentiles
        .split(',')
        .map(|p| p.trim().parse::<f64>().with_context(|| format!("--metric-percentiles: {p:?}")))
        .collect::<Result<_>>()?;
    let mut slos: BTreeMap<String, f64> = BTreeMap::new();
    for g in &args.goodput {
        let (k, v) = g.split_once(':').with_context(|| format!("--goodput {g:?}: expected KEY:MS"))?;
        let v: f64 = v.parse().with_context(|| format!("--goodput {g:?}: not a number"))?;
        if !["ttft", "tpot", "e2el"].contains(&k) || v < 0.0 {
            bail!("--goodput {g:?}: keys are ttft, tpot, e2el with a value >= 0 (ms)");
        }
        slos.insert(k.to_string(), v);
    }

    let ramp = Ramp::from_flags(
        args.ramp_up_strategy,
        args.ramp_up_start_rps,
        args.ramp_up_end_rps,
        args.request_rate,
    )?;

    println!("Starting initial single prompt test run...");
    let first = send(
        args.backend,
        &client,
        &url,
        &BudgetArgs::strip(payload(&args, &model, &samples[0], 0)),
        Instant::now(),
        key.as_deref(),
    )
    .await;
    if !first.success {
        bail!("Initial test run failed - Please make sure benchmark arguments are correctly specified. Error: {}", first.error);
    }
    println!("Initial test run completed.");
    if args.num_warmups > 0 {
        // As the run sends them (at once, within --max-concurrency), the first prompts again.
        println!("Warming up with {} requests...", args.num_warmups);
        let limit = args.max_concurrency.filter(|&c| c > 0).unwrap_or(args.num_warmups);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(limit));
        let warmups: Vec<_> = (0..args.num_warmups)
            .map(|i| {
                let (client, url, key) = (client.clone(), url.clone(), key.clone());
                let body = BudgetArgs::strip(payload(&args, &model, &samples[i % samples.len()], i));
                let semaphore = semaphore.clone();
                let backend = args.backend;
                tokio::spawn(async move {
                    let _permit = semaphore.acquire_owned().await;
                    send(backend, &client, &url, &body, Instant::now(), key.as_deref()).await
                })
            })
            .collect();
        for w in warmups {
            let out = w.await.context("a warm-up task panicked")?;
            if !out.success {
                bail!("a warm-up request failed: {}", out.error);
            }
        }
        println!("Warmup run completed.");
    }
    println!("Starting main benchmark run...");
    let rate = args.request_rate;
    match &ramp {
        Some(r) => println!(
            "Traffic request rate: ramp-up ({:?}) from {} to {} requests/s",
            r.strategy, r.start_rps, r.end_rps
        ),
        None => println!(
            "Traffic request rate: {}",
            if rate.is_infinite() { "inf".to_string() } else { rate.to_string() }
        ),
    }
    let kind = if args.burstiness == 1.0 { "Poisson process" } else { "Gamma distribution" };
    println!("Burstiness factor: {} ({kind})", args.burstiness);
    println!(
        "Maximum request concurrency: {}",
        args.max_concurrency.map(|c| c.to_string()).unwrap_or_else(|| "None".into())
    );

    let before = scrape(&client, &base).await;
    let times = match &ramp {
        Some(r) => r.arrival_times(samples.len(), args.burstiness, args.seed)?,
        None => arrival_times(samples.len(), rate, args.burstiness, args.seed)?,
    };
    // As vLLM, 0 means no limit.
    let semaphore = args.max_concurrency.filter(|&c| c > 0).map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    let t0 = Instant::now();
    let tasks: Vec<_> = samples
        .iter()
        .zip(&times)
        .enumerate()
        .map(|(i, (sample, &at))| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            let body = payload(&args, &model, sample, i);
            let semaphore = semaphore.clone();
            let backend = args.backend;
            tokio::spawn(async move {
                tokio::time::sleep_until((t0 + Duration::from_secs_f64(at)).into()).await;
                let _permit = match &semaphore {
                    Some(s) => Some(s.clone().acquire_owned().await),
                    None => None,
                };
                send(backend, &client, &url, &body, t0, key.as_deref()).await
            })
        })
        .collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for t in tasks {
        outputs.push(t.await.context("a request task panicked")?);
    }
    let duration = t0.elapsed().as_secs_f64();
    let after = scrape(&client, &base).await;

    // Per-request figures over the successful requests.
    let mut input_lens = Vec::new();
    let mut output_lens = Vec::new();
    let (mut ttfts, mut tpots, mut itls, mut e2els) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut good = 0;
    for (o, s) in outputs.iter().zip(&samples) {
        if !o.success {
            continue;
        }
        let out_len = if o.output_tokens > 0 {
            o.output_tokens
        } else {
            tokenizer.encode(&o.generated_text, false).map(|t| t.len()).unwrap_or(1)
        };
        let in_len = if o.prompt_len > 0 { o.prompt_len } else { s.prompt_ids.len() };
        input_lens.push(in_len);
        output_lens.push(out_len);
        let tpot = if out_len > 1 { (o.latency - o.ttft) / (out_len - 1) as f64 } else { 0.0 };
        if out_len > 1 {
            tpots.push(tpot);
        }
        ttfts.push(o.ttft);
        itls.extend(&o.itl);
        e2els.push(o.latency);
        let within = |k: &str, v: f64| slos.get(k).is_none_or(|slo| v <= slo / 1000.0);
        // A request a deadline cut answered on time, but not what was asked: not good.
        let cut = BudgetReport::cut_by_deadline(o);
        if !cut && within("ttft", o.ttft) && within("tpot", tpot) && within("e2el", o.latency) {
            good += 1;
        }
    }
    let completed = input_lens.len();
    let failed = outputs.len() - completed;
    let total_input: usize = input_lens.iter().sum();
    let total_output: usize = output_lens.iter().sum();
    // Peak output tokens/s over 1-second buckets of chunk times; peak overlapping requests.
    let mut buckets: BTreeMap<u64, usize> = BTreeMap::new();
    let mut events: Vec<(f64, i32)> = Vec::new();
    for o in outputs.iter().filter(|o| o.success) {
        let mut t = o.start + o.ttft;
        *buckets.entry(t as u64).or_default() += 1;
        for gap in &o.itl {
            t += gap;
            *buckets.entry(t as u64).or_default() += 1;
        }
        events.push((o.start, 1));
        events.push((o.start + o.latency, -1));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut live, mut peak_concurrency) = (0i32, 0i32);
    for (_, d) in &events {
        live += d;
        peak_concurrency = peak_concurrency.max(live);
    }
    let peak_output = buckets.values().copied().max().unwrap_or(0) as f64;

    println!("{:=^50}", " Serving Benchmark Result ");
    println!("{}", row("Successful requests:", completed));
    println!("{}", row("Failed requests:", failed));
    if let Some(c) = args.max_concurrency {
        println!("{}", row("Maximum request concurrency:", c));
    }
    if rate.is_finite() {
        println!("{}", row("Request rate configured (RPS):", format!("{rate:.2}")));
    }
    println!("{}", row("Benchmark duration (s):", format!("{duration:.2}")));
    println!("{}", row("Total input tokens:", total_input));
    println!("{}", row("Total generated tokens:", total_output));
    println!("{}", row("Request throughput (req/s):", format!("{:.2}", completed as f64 / duration)));
    let goodput = (!slos.is_empty()).then(|| good as f64 / duration);
    if let Some(g) = goodput {
        println!("{}", row("Request goodput (req/s):", format!("{g:.2}")));
    }
    let mut budget_keys = serde_json::Map::new();
    let budgets = BudgetReport::of(&outputs);
    let budgeted = args.budgets.deadline_ms.is_some() || args.budgets.ttft_deadline_ms.is_some();
    if budgeted || budgets.rejected > 0 || budgets.cut > 0 {
        let met = (!slos.is_empty() && completed > 0).then(|| good as f64 / completed as f64);
        budgets.report(met, row, &mut budget_keys);
    }
    println!("{}", row("Output token throughput (tok/s):", format!("{:.2}", total_output as f64 / duration)));
    println!("{}", row("Peak output token throughput (tok/s):", format!("{peak_output:.2}")));
    println!("{}", row("Peak concurrent requests:", format!("{:.2}", peak_concurrency as f64)));
    println!(
        "{}",
        row(
            "Total token throughput (tok/s):",
            format!("{:.2}", (total_input + total_output) as f64 / duration)
        )
    );

    let mut result = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        result.insert(k.to_string(), v);
    };
    put("date", json!(date_string()));
    for (k, v) in &metadata {
        put(k, json!(v));
    }
    if let Some(r) = &ramp {
        put("ramp_up_strategy", json!(format!("{:?}", r.strategy).to_lowercase()));
        put("ramp_up_start_rps", json!(r.start_rps));
        put("ramp_up_end_rps", json!(r.end_rps));
    }
    put("endpoint_type", json!(args.backend.to_possible_value().map(|v| v.get_name().to_string())));
    put("backend", json!(args.backend.to_possible_value().map(|v| v.get_name().to_string())));
    put("label", json!(args.label));
    put("model_id", json!(model));
    put("tokenizer_id", json!(tokenizer_arg));
    put("num_prompts", json!(samples.len()));
    put("request_rate", if rate.is_infinite() { json!("inf") } else { json!(rate) });
    put("burstiness", json!(args.burstiness));
    put("max_concurrency", json!(args.max_concurrency));
    put("duration", json!(duration));
    put("completed", json!(completed));
    put("failed", json!(failed));
    put("total_input_tokens", json!(total_input));
    put("total_output_tokens", json!(total_output));
    put("request_throughput", json!(completed as f64 / duration));
    put("request_goodput", json!(goodput));
    for (k, v) in budget_keys {
        put(&k, v);
    }
    put("output_throughput", json!(total_output as f64 / duration));
    put("total_token_throughput", json!((total_input + total_output) as f64 / duration));
    put("max_output_tokens_per_s", json!(peak_output));
    put("max_concurrent_requests", json!(peak_concurrency));
    let sections = [
        ("ttft", "TTFT", "Time to First Token", &ttfts),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)", &tpots),
        ("itl", "ITL", "Inter-token Latency", &itls),
        ("e2el", "E2EL", "End-to-end Latency", &e2els),
    ];
    for (key, name, title, values) in sections {
        if !metrics_list.iter().any(|m| m == key) {
            continue;
        }
        let ms: Vec<f64> = values.iter().map(|v| v * 1000.0).collect();
        println!("{:-^50}", title);
        println!("{}", row(&format!("Mean {name} (ms):"), format!("{:.2}", mean(&ms))));
        println!("{}", row(&format!("Median {name} (ms):"), format!("{:.2}", percentile(&ms, 50.0))));
        put(&format!("mean_{key}_ms"), json!(mean(&ms)));
        put(&format!("median_{key}_ms"), json!(percentile(&ms, 50.0)));
        put(&format!("std_{key}_ms"), json!(std_dev(&ms)));
        for &p in &percentiles {
            let label = percentile_label(p);
            println!("{}", row(&format!("P{label} {name} (ms):"), format!("{:.2}", percentile(&ms, p))));
            put(&format!("p{label}_{key}_ms"), json!(percentile(&ms, p)));
        }
    }
    println!("{}", "=".repeat(50));
    if args.save_detailed {
        put("input_lens", json!(input_lens));
        put("output_lens", json!(output_lens));
        put("ttfts", json!(outputs.iter().map(|o| o.ttft).collect::<Vec<_>>()));
        // ferrite's predictions of them, where it made one (`null` elsewhere).
        put("ttft_estimates", json!(outputs.iter().map(|o| o.ttft_estimate).collect::<Vec<_>>()));
        put("stop_reasons", json!(outputs.iter().map(|o| o.stop_reason.clone()).collect::<Vec<_>>()));
        put("itls", json!(outputs.iter().map(|o| o.itl.clone()).collect::<Vec<_>>()));
        put("generated_texts", json!(outputs.iter().map(|o| o.generated_text.clone()).collect::<Vec<_>>()));
        put("errors", json!(outputs.iter().map(|o| o.error.clone()).collect::<Vec<_>>()));
        put("start_times", json!(outputs.iter().map(|o| o.start).collect::<Vec<_>>()));
    } else {
        // Counts stay checkable without the bulky per-request lists.
        put("output_lens", json!(output_lens));
    }
    // The server's own view of the run, when it exposes Prometheus metrics.
    let (deltas, cost) = match (before, after) {
        (Some(b), Some(a)) => {
            let deltas: BTreeMap<String, f64> = a
                .iter()
                .filter(|(k, _)| {
                    let name = k.split('{').next().unwrap_or(k);
                    name.ends_with("_total") || name.ends_with("_sum") || name.ends_with("_count")
                })
                .filter_map(|(k, v)| {
                    let d = v - b.get(k).copied().unwrap_or(0.0);
                    (d != 0.0).then(|| (k.clone(), d))
                })
                .collect();
            let cost: f64 = deltas
                .iter()
                .filter(|(k, _)| k.split('{').next() == Some("ferrite:cost_usd_total"))
                .map(|(_, v)| v)
                .sum();
            let tokens = (total_input + total_output) as f64;
            let per_million = (cost > 0.0 && tokens > 0.0).then(|| cost / tokens * 1e6);
            (Some(deltas), per_million)
        }
        _ => (None, None),
    };
    put("server_metrics_delta", json!(deltas));
    put("cost_per_million_tokens", json!(cost));
    if failed > 0 {
        for e in outputs.iter().filter(|o| !o.success).take(10) {
            eprintln!("failed request: {}", e.error);
        }
    }
    if args.save_result {
        let name = args.result_filename.clone().unwrap_or_else(|| {
            let rate = if rate.is_infinite() { "inf".to_string() } else { rate.to_string() };
            let conc = args.max_concurrency.map(|c| format!("-concurrency{c}")).unwrap_or_default();
            let base_name = model.rsplit('/').next().unwrap_or(&model);
            let label = args.label.clone().unwrap_or_else(|| "ferrite".into());
            format!("{label}-{rate}qps{conc}-{base_name}-{}.json", date_string())
        });
        let path = match &args.result_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        };
        save_json(&path, &Value::Object(result), args.append_result)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_structured_ratio_picks_that_share_spread_evenly() {
        for (ratio, n, want) in [(0.0, 100, 0), (0.25, 100, 25), (0.5, 7, 3), (1.0, 64, 64)] {
            let picked: Vec<usize> = (0..n).filter(|&i| constrained(i, ratio)).collect();
            assert_eq!(picked.len(), want, "ratio {ratio} of {n}");
            if ratio == 0.25 {
                assert!(picked.windows(2).all(|w| w[1] - w[0] == 4), "{picked:?}");
            }
        }
        let one = bench_schema(3, SchemaVariety::One);
        assert_eq!(one, bench_schema(9, SchemaVariety::One));
        assert_ne!(bench_schema(3, SchemaVariety::Distinct), bench_schema(9, SchemaVariety::Distinct));
    }

    #[test]
    fn metrics_text_parses_to_series() {
        let m = parse_metrics("# HELP x y\n# TYPE x counter\nx_total{a=\"b c\"} 3\ny 1.5e3\n\n");
        assert_eq!(m["x_total{a=\"b c\"}"], 3.0);
        assert_eq!(m["y"], 1500.0);
    }

    #[test]
    fn vllm_row_format() {
        assert_eq!(
            row("Successful requests:", 5),
            format!("Successful requests:{} 5{}", " ".repeat(20), " ".repeat(9))
        );
        assert_eq!(percentile_label(99.0), "99");
        assert_eq!(percentile_label(99.9), "99.9");
    }
}
