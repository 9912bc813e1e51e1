//! The engine's Prometheus metrics, named and bucketed as vLLM v1's with the prefix `ferrite:`
//! (so dashboards built for vLLM work with a prefix swap), plus what no peer reports: device
//! time, cost and energy per request (the power meters are `energy`).
//!
//! Interval definitions follow vLLM: queue = queued in the engine → first scheduled; prefill =
//! first scheduled → first token; decode = first token → last token; inference = first
//! scheduled → last token; TTFT and end-to-end from the request's arrival at the server.
//!
//! Device time: each step's wall time is split among the sequences in it in proportion to the
//! tokens each had in that step; a request's `device_seconds` is the sum over its steps and
//! samples. `device_seconds_total` grows by a request's share when the request ends (finished,
//! aborted or failed), so at idle it equals the sum over every request.
//!
//! One name differs from vLLM's: the tokens-per-step histogram is `ferrite:iteration_tokens`
//! (vLLM's `iteration_tokens_total` is a histogram with a counter's suffix, which promtool
//! rejects).
//!
//! Unlike vLLM, aborted requests are counted: `request_success_total{finished_reason="abort"}`
//! and the per-request histograms include them.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::scheduler::SchedulerStats;

pub const PREFIX: &str = "ferrite:";

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];
const PARAMS_N_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
const ITERATION_TOKENS_BUCKETS: &[f64] =
    &[1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];

/// vLLM's `build_1_2_5_buckets(max)`: 1, 2, 5, 10, 20, 50, ... up to `max`.
pub fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut scale = 1usize;
    loop {
        for m in [1, 2, 5] {
            let v = m * scale;
            if v > max {
                return out;
            }
            out.push(v as f64);
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => return out,
        };
    }
}

/// $ buckets for one request's cost: 1-2-5 from a micro-dollar to ten dollars.
fn cost_buckets() -> Vec<f64> {
    buckets_1_2_5(10_000_000).into_iter().map(|v| v * 1e-6).collect()
}

/// How a request ended, as vLLM spells it in `finished_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Stop,
    Length,
    Abort,
    Error,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Stop => "stop",
            EndReason::Length => "length",
            EndReason::Abort => "abort",
            EndReason::Error => "error",
        }
    }
}

/// One ended request's figures, observed once.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub reason: EndReason,
    pub arrival: Instant,
    pub queued: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    pub ended: Instant,
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    pub n: usize,
    pub max_tokens: usize,
    pub device_seconds: f64,
    pub energy_joules: Option<f64>,
}

/// Tokens and their share of cost, of one step or summed over the window.
#[derive(Debug, Default, Clone, Copy)]
struct CostShares {
    prompt_tokens: f64,
    prompt_cost: f64,
    generation_tokens: f64,
    generation_cost: f64,
}

impl CostShares {
    fn add(&mut self, o: &CostShares, sign: f64) {
        self.prompt_tokens += sign * o.prompt_tokens;
        self.prompt_cost += sign * o.prompt_cost;
        self.generation_tokens += sign * o.generation_tokens;
        self.generation_cost += sign * o.generation_cost;
    }
}

/// The last minute of steps with their running sums: recording a step is O(1), not a pass
/// over the minute.
#[derive(Default)]
struct CostWindow {
    steps: VecDeque<(Instant, CostShares)>,
    sums: CostShares,
}

impl CostWindow {
    fn push(&mut self, at: Instant, shares: CostShares) {
        self.sums.add(&shares, 1.0);
        self.steps.push_back((at, shares));
    }

    fn forget_before(&mut self, now: Instant) {
        while self.steps.front().is_some_and(|(at, _)| now.duration_since(*at) > COST_WINDOW) {
            if let Some((_, shares)) = self.steps.pop_front() {
                self.sums.add(&shares, -1.0);
            }
        }
        if self.steps.is_empty() {
            // No rounding left over from the subtractions.
            self.sums = CostShares::default();
        }
    }
}

/// Where an engine step's wall time goes, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    /// Taking requests, dropping abandoned ones, planning the step.
    Schedule,
    /// Building the flat batch's inputs and moving them to the device.
    Inputs,
    /// Issuing the forward pass: on the CPU the whole computation; on a GPU the host's launches.
    Forward,
    /// Waiting for the device to finish the forward pass once it is issued (0 on the CPU). A
    /// GPU step with a long `forward` and a short `device` is bound by the host's launches
    /// (roughly: a copy from pageable host memory inside the pass can wait for the device).
    Device,
    /// Sampling: on the device, copying back, on the host.
    Sample,
    /// Detokenizing, stop checks, sending events, accounting.
    Emit,
}

impl StepPhase {
    pub const COUNT: usize = 6;
    pub const ALL: [StepPhase; Self::COUNT] = [
        StepPhase::Schedule,
        StepPhase::Inputs,
        StepPhase::Forward,
        StepPhase::Device,
        StepPhase::Sample,
        StepPhase::Emit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepPhase::Schedule => "schedule",
            StepPhase::Inputs => "inputs",
            StepPhase::Forward => "forward",
            StepPhase::Device => "device",
            StepPhase::Sample => "sample",
            StepPhase::Emit => "emit",
        }
    }
}

/// Everything the engine reports. Cheap to update (atomics; one mutex for the cost window).
pub struct EngineMetrics {
    price_per_hour: f64,
    num_requests_running: IntGauge,
    num_requests_waiting: IntGauge,
    kv_cache_usage_perc: Gauge,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    prefix_cache_queries: IntCounter,
    prefix_cache_hits: IntCounter,
    num_preemptions: IntCounter,
    request_success: IntCounterVec,
    ttft: Histogram,
    itl: Histogram,
    time_per_output_token: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    prefill_time: Histogram,
    decode_time: Histogram,
    inference_time: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    params_n: Histogram,
    params_max_tokens: Histogram,
    iteration_tokens: Histogram,
    device_seconds: prometheus::Counter,
    cost_usd: prometheus::Counter,
    energy_joules: prometheus::Counter,
    energy_available: IntGauge,
    request_cost: Histogram,
    cost_per_million: GaugeVec,
    startup: GaugeVec,
    step_phases: prometheus::CounterVec,
    /// Cumulative scheduler counters last seen, to turn them into counter increments.
    last: Mutex<SchedulerStats>,
    window: Mutex<CostWindow>,
}

impl std::fmt::Debug for EngineMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineMetrics").field("price_per_hour", &self.price_per_hour).finish_non_exhaustive()
    }
}

/// Counter and gauge values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub running: i64,
    pub waiting: i64,
    pub kv_cache_usage: f64,
    pub cost_usd: f64,
}

/// The cache facts `cache_config_info` carries as labels.
pub struct CacheInfo {
    pub block_size: usize,
    pub num_blocks: usize,
    pub dtype: String,
    pub enable_prefix_caching: bool,
}

/// The window `cost_per_million_tokens` averages over.
const COST_WINDOW: Duration = Duration::from_secs(60);

impl EngineMetrics {
    /// Registers every engine metric in `registry` with the `model_name` label.
    pub fn new(
        registry: &Registry,
        model_name: &str,
        max_model_len: usize,
        cache: &CacheInfo,
        price_per_hour: f64,
    ) -> prometheus::Result<Self> {
        let name = |n: &str| format!("{PREFIX}{n}");
        let opts = |n: &str, help: &str| Opts::new(name(n), help).const_label("model_name", model_name);
        let hist = |n: &str, help: &str, buckets: Vec<f64>| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(
                HistogramOpts::new(name(n), help).const_label("model_name", model_name).buckets(buckets),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let int_gauge = |n: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::with_opts(opts(n, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |n: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(opts(n, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let float_counter = |n: &str, help: &str| -> prometheus::Result<prometheus::Counter> {
            let c = prometheus::Counter::with_opts(opts(n, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let kv_cache_usage_perc =
            Gauge::with_opts(opts("kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent"))?;
        registry.register(Box::new(kv_cache_usage_perc.clone()))?;
        let cache_info = IntGaugeVec::new(
            opts("cache_config_info", "Information of the KV cache configuration"),
            &["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
        )?;
        registry.register(Box::new(cache_info.clone()))?;
        cache_info
            .with_label_values(&[
                cache.block_size.to_string().as_str(),
                cache.num_blocks.to_string().as_str(),
                cache.dtype.as_str(),
                if cache.enable_prefix_caching { "True" } else { "False" },
            ])
            .set(1);
        let request_success = IntCounterVec::new(
            opts("request_success_total", "Count of finished requests by finish reason (abort included)"),
            &["finished_reason"],
        )?;
        registry.register(Box::new(request_success.clone()))?;
        for r in [EndReason::Stop, EndReason::Length, EndReason::Abort, EndReason::Error] {
            request_success.with_label_values(&[r.as_str()]);
        }
        let cost_per_million = GaugeVec::new(
            opts(
                "cost_per_million_tokens",
                "Device cost in $ per million tokens over the last minute, by token type",
            ),
            &["token_type"],
        )?;
        registry.register(Box::new(cost_per_million.clone()))?;
        let startup =
            GaugeVec::new(opts("startup_phase_seconds", "Seconds each start-up phase took"), &["phase"])?;
        registry.register(Box::new(startup.clone()))?;
        let step_phases = prometheus::CounterVec::new(
            opts("engine_step_phase_seconds_total", "Engine step wall time by phase (StepPhase)"),
            &["phase"],
        )?;
        registry.register(Box::new(step_phases.clone()))?;
        for phase in StepPhase::ALL {
            step_phases.with_label_values(&[phase.as_str()]); // every series from the start
        }
        let tokens = buckets_1_2_5(max_model_len);
        Ok(Self {
            price_per_hour,
            num_requests_running: int_gauge("num_requests_running", "Requests in model execution batches")?,
            num_requests_waiting: int_gauge("num_requests_waiting", "Requests waiting to be processed")?,
            kv_cache_usage_perc,
            prompt_tokens: counter(
                "prompt_tokens_total",
                "Prefill tokens processed (prefix-cache hits included)",
            )?,
            generation_tokens: counter("generation_tokens_total", "Generation tokens processed")?,
            prefix_cache_queries: counter("prefix_cache_queries_total", "Prefix-cache queries, in tokens")?,
            prefix_cache_hits: counter("prefix_cache_hits_total", "Prefix-cache hits, in tokens")?,
            num_preemptions: counter("num_preemptions_total", "Cumulative number of preemptions")?,
            request_success,
            ttft: hist(
                "time_to_first_token_seconds",
                "Time to first token, from arrival",
                TTFT_BUCKETS.to_vec(),
            )?,
            itl: hist(
                "inter_token_latency_seconds",
                "Time between two tokens of a sample",
                ITL_BUCKETS.to_vec(),
            )?,
            time_per_output_token: hist(
                "request_time_per_output_token_seconds",
                "Per request: decode time / (generated tokens - 1)",
                ITL_BUCKETS.to_vec(),
            )?,
            e2e: hist(
                "e2e_request_latency_seconds",
                "End-to-end request latency",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            queue_time: hist(
                "request_queue_time_seconds",
                "Time a request waited to be scheduled",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            prefill_time: hist(
                "request_prefill_time_seconds",
                "First scheduled to first token",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            decode_time: hist(
                "request_decode_time_seconds",
                "First token to last token",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            inference_time: hist(
                "request_inference_time_seconds",
                "First scheduled to last token",
                REQUEST_LATENCY_BUCKETS.to_vec(),
            )?,
            request_prompt_tokens: hist(
                "request_prompt_tokens",
                "Prompt tokens per request",
                tokens.clone(),
            )?,
            request_generation_tokens: hist(
                "request_generation_tokens",
                "Generated tokens per request (all samples)",
                tokens.clone(),
            )?,
            params_n: hist("request_params_n", "The n parameter of requests", PARAMS_N_BUCKETS.to_vec())?,
            params_max_tokens: hist(
                "request_params_max_tokens",
                "The max_tokens parameter of requests",
                tokens,
            )?,
            // vLLM calls this histogram `iteration_tokens_total`; promtool rejects a non-counter
            // ending in `_total`, so it is the one name that does not carry over.
            iteration_tokens: hist(
                "iteration_tokens",
                "Tokens per engine step",
                ITERATION_TOKENS_BUCKETS.to_vec(),
            )?,
            device_seconds: float_counter("device_seconds_total", "Device seconds spent on ended requests")?,
            cost_usd: float_counter("cost_usd_total", "Device cost of ended requests, $")?,
            energy_joules: float_counter(
                "energy_joules_total",
                "Energy of ended requests, J (stays 0 when energy_available is 0)",
            )?,
            energy_available: int_gauge("energy_available", "1 when a power meter (NVML or RAPL) is read")?,
            request_cost: hist("request_cost_usd", "Device cost per request, $", cost_buckets())?,
            cost_per_million,
            startup,
            step_phases,
            last: Mutex::new(SchedulerStats::default()),
            window: Mutex::new(CostWindow::default()),
        })
    }

    /// Running totals, for the periodic stats log line.
    pub fn totals(&self) -> Totals {
        Totals {
            prompt_tokens: self.prompt_tokens.get(),
            generation_tokens: self.generation_tokens.get(),
            prefix_cache_queries: self.prefix_cache_queries.get(),
            prefix_cache_hits: self.prefix_cache_hits.get(),
            running: self.num_requests_running.get(),
            waiting: self.num_requests_waiting.get(),
            kv_cache_usage: self.kv_cache_usage_perc.get(),
            cost_usd: self.cost_usd.get(),
        }
    }

    /// $ for `device_seconds` at the configured price.
    pub fn cost_of(&self, device_seconds: f64) -> f64 {
        device_seconds * self.price_per_hour / 3600.0
    }

    pub fn set_energy_available(&self, yes: bool) {
        self.energy_available.set(i64::from(yes));
    }

    pub fn record_startup_phase(&self, phase: &str, seconds: f64) {
        self.startup.with_label_values(&[phase]).set(seconds);
    }

    /// One step's wall time, phase by phase (`seconds[i]` for `StepPhase::ALL[i]`).
    pub fn observe_step_phases(&self, seconds: &[f64; StepPhase::COUNT]) {
        for (phase, &s) in StepPhase::ALL.iter().zip(seconds) {
            self.step_phases.with_label_values(&[phase.as_str()]).inc_by(s.max(0.0));
        }
    }

    /// Seconds spent in each step phase since start, and the number of steps that did work.
    pub fn step_phase_totals(&self) -> (u64, [(StepPhase, f64); StepPhase::COUNT]) {
        let steps = self.iteration_tokens.get_sample_count();
        let totals = StepPhase::ALL.map(|p| (p, self.step_phases.with_label_values(&[p.as_str()]).get()));
        (steps, totals)
    }

    /// Gauges from the scheduler, and counter increments since the last call.
    pub fn observe_scheduler(&self, s: &SchedulerStats) {
        self.num_requests_running.set(s.num_running as i64);
        self.num_requests_waiting.set(s.num_waiting as i64);
        self.kv_cache_usage_perc.set(s.kv_cache_usage);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        self.prefix_cache_queries
            .inc_by(s.prefix_cache_queried_tokens.saturating_sub(last.prefix_cache_queried_tokens));
        self.prefix_cache_hits.inc_by(s.prefix_cache_hit_tokens.saturating_sub(last.prefix_cache_hit_tokens));
        self.num_preemptions.inc_by(s.num_preemptions.saturating_sub(last.num_preemptions));
        *last = *s;
    }

    /// One engine step: its token count, and its prompt / generated tokens for the cost window.
    pub fn observe_step(&self, at: Instant, seconds: f64, prompt_tokens: usize, generation_tokens: usize) {
        let total = prompt_tokens + generation_tokens;
        self.iteration_tokens.observe(total as f64);
        if total == 0 {
            return;
        }
        let cost = self.cost_of(seconds);
        let share = |t: usize| cost * t as f64 / total as f64;
        let shares = CostShares {
            prompt_tokens: prompt_tokens as f64,
            prompt_cost: share(prompt_tokens),
            generation_tokens: generation_tokens as f64,
            generation_cost: share(generation_tokens),
        };
        // The gauges are set when scraped (`refresh_cost_window`), not on every step.
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.forget_before(at);
        w.push(at, shares);
    }

    /// Drops steps older than a minute and sets the cost-per-million gauges.
    pub fn refresh_cost_window(&self, now: Instant) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.forget_before(now);
        let s = w.sums;
        let per_million = |cost: f64, tokens: f64| if tokens > 0.0 { cost / tokens * 1e6 } else { 0.0 };
        self.cost_per_million.with_label_values(&["prompt"]).set(per_million(s.prompt_cost, s.prompt_tokens));
        self.cost_per_million
            .with_label_values(&["generation"])
            .set(per_million(s.generation_cost, s.generation_tokens));
    }

    /// A request's first token: its prompt counts as processed (vLLM's rule) and TTFT is known.
    pub fn observe_first_token(&self, arrival: Instant, at: Instant, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.ttft.observe(at.saturating_duration_since(arrival).as_secs_f64());
    }

    /// A generated token; `gap` is the time since the same sample's previous token.
    pub fn observe_token(&self, gap: Option<Duration>) {
        self.generation_tokens.inc();
        if let Some(g) = gap {
            self.itl.observe(g.as_secs_f64());
        }
    }

    /// An ended request (finished, aborted or failed): every per-request figure, once.
    pub fn observe_request(&self, r: &RequestRecord) {
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        self.request_success.with_label_values(&[r.reason.as_str()]).inc();
        self.e2e.observe(secs(r.arrival, r.ended));
        if let Some(s) = r.first_scheduled {
            self.queue_time.observe(secs(r.queued, s));
            if let Some(last) = r.last_token {
                self.inference_time.observe(secs(s, last));
            }
            if let Some(first) = r.first_token {
                self.prefill_time.observe(secs(s, first));
            }
        }
        if let (Some(first), Some(last)) = (r.first_token, r.last_token) {
            let decode = secs(first, last);
            self.decode_time.observe(decode);
            let per_token =
                if r.generation_tokens > r.n { decode / (r.generation_tokens - r.n) as f64 } else { 0.0 };
            self.time_per_output_token.observe(per_token);
        }
        self.request_prompt_tokens.observe(r.prompt_tokens as f64);
        self.request_generation_tokens.observe(r.generation_tokens as f64);
        self.params_n.observe(r.n as f64);
        self.params_max_tokens.observe(r.max_tokens as f64);
        self.device_seconds.inc_by(r.device_seconds);
        let cost = self.cost_of(r.device_seconds);
        self.cost_usd.inc_by(cost);
        self.request_cost.observe(cost);
        if let Some(j) = r.energy_joules {
            self.energy_joules.inc_by(j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn buckets_match_vllm() {
        assert_eq!(buckets_1_2_5(512), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]);
        assert_eq!(buckets_1_2_5(2048).last(), Some(&2000.0));
        assert_eq!(buckets_1_2_5(100), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
    }

    #[test]
    fn cost_window_splits_by_token_type_and_forgets_after_a_minute() {
        let registry = Registry::new();
        let cache =
            CacheInfo { block_size: 16, num_blocks: 8, dtype: "f32".into(), enable_prefix_caching: true };
        let m = EngineMetrics::new(&registry, "m", 128, &cache, 3600.0).unwrap();
        let t0 = Instant::now();
        // 2 s at $1/s: 3 prompt tokens cost $1.5, 1 generated token $0.5.
        m.observe_step(t0, 2.0, 3, 1);
        m.refresh_cost_window(t0);
        let gauge = |kind: &str| m.cost_per_million.with_label_values(&[kind]).get();
        assert!((gauge("prompt") - 0.5e6).abs() < 1e-6);
        assert!((gauge("generation") - 0.5e6).abs() < 1e-6);
        // A later step of generated tokens only: 1 s = $1 over 4 tokens.
        m.observe_step(t0 + Duration::from_secs(30), 1.0, 0, 4);
        m.refresh_cost_window(t0 + Duration::from_secs(61));
        assert_eq!(gauge("prompt"), 0.0);
        assert!((gauge("generation") - 0.25e6).abs() < 1e-6, "only the later step is left");
        m.refresh_cost_window(t0 + Duration::from_secs(100));
        assert_eq!(gauge("generation"), 0.0);
        assert_eq!(m.cost_of(7200.0), 7200.0);
    }
}
