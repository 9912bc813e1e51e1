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

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::budgets::BudgetMetrics;
pub use crate::budgets::{BudgetKind, BudgetOutcome};
use crate::kv_cache::CacheConfig;
use crate::sched::SchedulerStats;

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
    /// How each budget the request carried ended.
    pub budgets: Vec<(BudgetKind, BudgetOutcome)>,
    pub priority: i32,
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

/// The last minute of steps in one-second slots: recording a step is O(1) and the memory is
/// fixed (a slot per second, not an entry per step: at a thousand steps a second a per-step
/// list held megabytes).
struct CostWindow {
    /// Whole seconds count from here.
    base: Instant,
    /// Slot `s % COST_WINDOW_SECS` holds second `s`'s sums (when its tag says `s`).
    slots: [(u64, CostShares); COST_WINDOW_SECS as usize],
}

impl Default for CostWindow {
    fn default() -> Self {
        Self { base: Instant::now(), slots: [(u64::MAX, CostShares::default()); COST_WINDOW_SECS as usize] }
    }
}

impl CostWindow {
    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_secs()
    }

    fn push(&mut self, at: Instant, shares: CostShares) {
        let second = self.second(at);
        let slot = &mut self.slots[(second % COST_WINDOW_SECS) as usize];
        if slot.0 != second {
            *slot = (second, CostShares::default());
        }
        slot.1.add(&shares, 1.0);
    }

    /// The sums of the steps in the minute up to `now` (to the second).
    fn sums(&self, now: Instant) -> CostShares {
        let now = self.second(now);
        let mut sums = CostShares::default();
        for (second, shares) in &self.slots {
            if *second <= now && now - second < COST_WINDOW_SECS {
                sums.add(shares, 1.0);
            }
        }
        sums
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
    /// Computing the grammar masks of constrained samples. Not a slice of the step's wall time
    /// like the others: it runs while `forward` does, so it only lengthens the step where it
    /// outlasts the forward pass.
    Mask,
}

impl StepPhase {
    pub const COUNT: usize = 7;
    /// The phases that follow each other, whose seconds add up to the step's.
    pub const SEQUENTIAL: usize = 6;
    pub const ALL: [StepPhase; Self::COUNT] = [
        StepPhase::Schedule,
        StepPhase::Inputs,
        StepPhase::Forward,
        StepPhase::Device,
        StepPhase::Sample,
        StepPhase::Emit,
        StepPhase::Mask,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepPhase::Schedule => "schedule",
            StepPhase::Inputs => "inputs",
            StepPhase::Forward => "forward",
            StepPhase::Device => "device",
            StepPhase::Sample => "sample",
            StepPhase::Emit => "emit",
            StepPhase::Mask => "mask",
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
    /// Per-request latencies and sizes.
    hist: RequestHistograms,
    iteration_tokens: Histogram,
    device_seconds: prometheus::Counter,
    cost_usd: prometheus::Counter,
    energy_joules: prometheus::Counter,
    energy_available: IntGauge,
    cost_per_million: GaugeVec,
    startup: GaugeVec,
    step_phases: prometheus::CounterVec,
    budgets: BudgetMetrics,
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

/// The window `cost_per_million_tokens` averages over, seconds.
const COST_WINDOW_SECS: u64 = 60;

/// Registers metrics in one registry under the `ferrite:` prefix and the `model_name` label.
struct Registrar<'a> {
    registry: &'a Registry,
    model_name: &'a str,
}

impl Registrar<'_> {
    fn opts(&self, name: &str, help: &str) -> Opts {
        Opts::new(format!("{PREFIX}{name}"), help).const_label("model_name", self.model_name)
    }

    fn register<M: prometheus::core::Collector + Clone + 'static>(&self, m: M) -> prometheus::Result<M> {
        self.registry.register(Box::new(m.clone()))?;
        Ok(m)
    }

    fn hist(&self, name: &str, help: &str, buckets: Vec<f64>) -> prometheus::Result<Histogram> {
        let opts = HistogramOpts::new(format!("{PREFIX}{name}"), help)
            .const_label("model_name", self.model_name)
            .buckets(buckets);
        self.register(Histogram::with_opts(opts)?)
    }

    fn int_gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.register(IntGauge::with_opts(self.opts(name, help))?)
    }

    fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.register(IntCounter::with_opts(self.opts(name, help))?)
    }

    fn float_counter(&self, name: &str, help: &str) -> prometheus::Result<prometheus::Counter> {
        self.register(prometheus::Counter::with_opts(self.opts(name, help))?)
    }

    /// `cache_config_info`: one series whose labels are the cache's facts and its dtype.
    fn cache_info(&self, cache: &CacheConfig, dtype: &str) -> prometheus::Result<()> {
        let info = self.register(IntGaugeVec::new(
            self.opts("cache_config_info", "Information of the KV cache configuration"),
            &["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
        )?)?;
        let labels = [
            cache.block_size.to_string(),
            cache.num_blocks.to_string(),
            dtype.to_string(),
            if cache.enable_prefix_caching { "True" } else { "False" }.to_string(),
        ];
        info.with_label_values(&labels.each_ref().map(String::as_str)).set(1);
        Ok(())
    }

    /// A labelled family whose every series (`labels`' values) exists from the start.
    fn counter_family(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let family = self.register(IntCounterVec::new(self.opts(name, help), &[label])?)?;
        for v in values {
            family.with_label_values(&[v]);
        }
        Ok(family)
    }
}

/// Per-request histograms, observed when a request ends (TTFT and ITL as tokens come).
struct RequestHistograms {
    ttft: Histogram,
    itl: Histogram,
    time_per_output_token: Histogram,
    e2e: Histogram,
    queue_time: Histogram,
    prefill_time: Histogram,
    decode_time: Histogram,
    inference_time: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
    params_n: Histogram,
    params_max_tokens: Histogram,
    cost: Histogram,
}

impl RequestHistograms {
    fn new(r: &Registrar<'_>, max_model_len: usize) -> prometheus::Result<Self> {
        let latency = || REQUEST_LATENCY_BUCKETS.to_vec();
        let tokens = || buckets_1_2_5(max_model_len);
        Ok(Self {
            ttft: r.hist(
                "time_to_first_token_seconds",
                "Time to first token, from arrival",
                TTFT_BUCKETS.to_vec(),
            )?,
            itl: r.hist(
                "inter_token_latency_seconds",
                "Time between two tokens of a sample",
                ITL_BUCKETS.to_vec(),
            )?,
            time_per_output_token: r.hist(
                "request_time_per_output_token_seconds",
                "Per request: decode time / (generated tokens - 1)",
                ITL_BUCKETS.to_vec(),
            )?,
            e2e: r.hist("e2e_request_latency_seconds", "End-to-end request latency", latency())?,
            queue_time: r.hist(
                "request_queue_time_seconds",
                "Time a request waited to be scheduled",
                latency(),
            )?,
            prefill_time: r.hist(
                "request_prefill_time_seconds",
                "First scheduled to first token",
                latency(),
            )?,
            decode_time: r.hist("request_decode_time_seconds", "First token to last token", latency())?,
            inference_time: r.hist(
                "request_inference_time_seconds",
                "First scheduled to last token",
                latency(),
            )?,
            prompt_tokens: r.hist("request_prompt_tokens", "Prompt tokens per request", tokens())?,
            generation_tokens: r.hist(
                "request_generation_tokens",
                "Generated tokens per request (all samples)",
                tokens(),
            )?,
            params_n: r.hist("request_params_n", "The n parameter of requests", PARAMS_N_BUCKETS.to_vec())?,
            params_max_tokens: r.hist(
                "request_params_max_tokens",
                "The max_tokens parameter of requests",
                tokens(),
            )?,
            cost: r.hist("request_cost_usd", "Device cost per request, $", cost_buckets())?,
        })
    }
}

impl EngineMetrics {
    /// Registers every engine metric in `registry` with the `model_name` label.
    pub fn new(
        registry: &Registry,
        model_name: &str,
        max_model_len: usize,
        cache: &CacheConfig,
        cache_dtype: &str,
        price_per_hour: f64,
    ) -> prometheus::Result<Self> {
        let r = Registrar { registry, model_name };
        r.cache_info(cache, cache_dtype)?;
        let reasons =
            [EndReason::Stop, EndReason::Length, EndReason::Abort, EndReason::Error].map(EndReason::as_str);
        let phases = StepPhase::ALL.map(StepPhase::as_str);
        Ok(Self {
            price_per_hour,
            num_requests_running: r
                .int_gauge("num_requests_running", "Requests in model execution batches")?,
            num_requests_waiting: r.int_gauge("num_requests_waiting", "Requests waiting to be processed")?,
            kv_cache_usage_perc: r.register(Gauge::with_opts(
                r.opts("kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent"),
            )?)?,
            prompt_tokens: r
                .counter("prompt_tokens_total", "Prefill tokens processed (prefix-cache hits included)")?,
            generation_tokens: r.counter("generation_tokens_total", "Generation tokens processed")?,
            prefix_cache_queries: r
                .counter("prefix_cache_queries_total", "Prefix-cache queries, in tokens")?,
            prefix_cache_hits: r.counter("prefix_cache_hits_total", "Prefix-cache hits, in tokens")?,
            num_preemptions: r.counter("num_preemptions_total", "Cumulative number of preemptions")?,
            request_success: r.counter_family(
                "request_success_total",
                "Count of finished requests by finish reason (abort included)",
                "finished_reason",
                &reasons,
            )?,
            hist: RequestHistograms::new(&r, max_model_len)?,
            // vLLM calls this histogram `iteration_tokens_total`; promtool rejects a non-counter
            // ending in `_total`, so it is the one name that does not carry over.
            iteration_tokens: r.hist(
                "iteration_tokens",
                "Tokens per engine step",
                ITERATION_TOKENS_BUCKETS.to_vec(),
            )?,
            device_seconds: r
                .float_counter("device_seconds_total", "Device seconds spent on ended requests")?,
            cost_usd: r.float_counter("cost_usd_total", "Device cost of ended requests, $")?,
            energy_joules: r.float_counter(
                "energy_joules_total",
                "Energy of ended requests, J (stays 0 when energy_available is 0)",
            )?,
            energy_available: r
                .int_gauge("energy_available", "1 when a power meter (NVML or RAPL) is read")?,
            cost_per_million: r.register(GaugeVec::new(
                r.opts(
                    "cost_per_million_tokens",
                    "Device cost in $ per million tokens over the last minute, by token type",
                ),
                &["token_type"],
            )?)?,
            startup: r.register(GaugeVec::new(
                r.opts("startup_phase_seconds", "Seconds each start-up phase took"),
                &["phase"],
            )?)?,
            step_phases: {
                let opts =
                    r.opts("engine_step_phase_seconds_total", "Engine step wall time by phase (StepPhase)");
                let family = r.register(prometheus::CounterVec::new(opts, &["phase"])?)?;
                for phase in phases {
                    family.with_label_values(&[phase]); // every series from the start
                }
                family
            },
            budgets: BudgetMetrics::new(registry, model_name, REQUEST_LATENCY_BUCKETS.to_vec())?,
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
    /// The configured device price, $/hour (0: none).
    pub fn price_per_hour(&self) -> f64 {
        self.price_per_hour
    }

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
    pub fn observe_step_phases(&self, seconds: &[f64; StepPhase::SEQUENTIAL]) {
        for (phase, &s) in StepPhase::ALL.iter().zip(seconds) {
            self.step_phases.with_label_values(&[phase.as_str()]).inc_by(s.max(0.0));
        }
    }

    /// Seconds one step spent computing grammar masks (beside its forward pass).
    pub fn observe_mask_seconds(&self, seconds: f64) {
        self.step_phases.with_label_values(&[StepPhase::Mask.as_str()]).inc_by(seconds.max(0.0));
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
        self.window.lock().unwrap_or_else(|p| p.into_inner()).push(at, shares);
    }

    /// Sets the cost-per-million gauges from the last minute's steps.
    pub fn refresh_cost_window(&self, now: Instant) {
        let s = self.window.lock().unwrap_or_else(|p| p.into_inner()).sums(now);
        let per_million = |cost: f64, tokens: f64| if tokens > 0.0 { cost / tokens * 1e6 } else { 0.0 };
        self.cost_per_million.with_label_values(&["prompt"]).set(per_million(s.prompt_cost, s.prompt_tokens));
        self.cost_per_million
            .with_label_values(&["generation"])
            .set(per_million(s.generation_cost, s.generation_tokens));
    }

    /// A request's first token: its prompt counts as processed (vLLM's rule) and TTFT is known.
    pub fn observe_first_token(&self, arrival: Instant, at: Instant, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
        self.hist.ttft.observe(at.saturating_duration_since(arrival).as_secs_f64());
    }

    /// A generated token; `gap` is the time since the same sample's previous token.
    pub fn observe_token(&self, gap: Option<Duration>) {
        self.generation_tokens.inc();
        if let Some(g) = gap {
            self.hist.itl.observe(g.as_secs_f64());
        }
    }

    /// An ended request (finished, aborted or failed): every per-request figure, once.
    pub fn observe_request(&self, r: &RequestRecord) {
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        self.request_success.with_label_values(&[r.reason.as_str()]).inc();
        self.hist.e2e.observe(secs(r.arrival, r.ended));
        if let Some(s) = r.first_scheduled {
            self.hist.queue_time.observe(secs(r.queued, s));
            self.budgets.observe_queue(r.priority, secs(r.queued, s));
            if let Some(last) = r.last_token {
                self.hist.inference_time.observe(secs(s, last));
            }
            if let Some(first) = r.first_token {
                self.hist.prefill_time.observe(secs(s, first));
            }
        }
        if let (Some(first), Some(last)) = (r.first_token, r.last_token) {
            let decode = secs(first, last);
            self.hist.decode_time.observe(decode);
            let per_token =
                if r.generation_tokens > r.n { decode / (r.generation_tokens - r.n) as f64 } else { 0.0 };
            self.hist.time_per_output_token.observe(per_token);
        }
        self.hist.prompt_tokens.observe(r.prompt_tokens as f64);
        self.hist.generation_tokens.observe(r.generation_tokens as f64);
        self.hist.params_n.observe(r.n as f64);
        self.hist.params_max_tokens.observe(r.max_tokens as f64);
        self.device_seconds.inc_by(r.device_seconds);
        let cost = self.cost_of(r.device_seconds);
        self.cost_usd.inc_by(cost);
        self.hist.cost.observe(cost);
        if let Some(j) = r.energy_joules {
            self.energy_joules.inc_by(j);
        }
        if matches!(r.reason, EndReason::Stop | EndReason::Length) {
            for &(kind, outcome) in &r.budgets {
                self.budgets.observe(kind, outcome);
            }
            let met = r.budgets.iter().all(|(_, o)| *o == BudgetOutcome::Met);
            self.budgets.observe_finished(r.ended, met);
        }
    }

    /// A budget's outcome decided outside a finished request (a refusal at submission).
    pub fn observe_budget(&self, kind: BudgetKind, outcome: BudgetOutcome) {
        self.budgets.observe(kind, outcome);
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
        let cache = CacheConfig { block_size: 16, num_blocks: 8, enable_prefix_caching: true };
        let m = EngineMetrics::new(&registry, "m", 128, &cache, "f32", 3600.0).unwrap();
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
        // Many steps in the same second and the next all count: 3000 steps of 1 ms and one
        // token each, $1/s, is $1e-3 a token.
        for i in 0..3000 {
            m.observe_step(t0 + Duration::from_millis(120_000 + i), 1e-3, 0, 1);
        }
        m.refresh_cost_window(t0 + Duration::from_secs(123));
        assert!((gauge("generation") - 1e3).abs() < 1e-6, "{}", gauge("generation"));
        assert_eq!(m.cost_of(7200.0), 7200.0);
    }
}
