//! The models one server answers for: each request names one (`model`), which is found here,
//! loaded on demand when it is not, and held by a [`Lease`] while the request runs. A model
//! with no lease may be unloaded, least recently used first, to make room for another under
//! `--max-loaded-models` or `--max-loaded-gib` (llama-swap's and Ollama's behaviour, in one
//! process). Each loaded model runs its own engine thread and scheduler.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use ferrite_engine::metrics::{EngineMetrics, PREFIX};
use ferrite_engine::{EngineHandle, Tokenizer};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::error::ApiError;
use crate::reasoning::ReasoningParser;
use crate::tools;
use crate::validate::SamplingDefaults;

/// A loaded model: what the handlers need of it.
pub struct Served {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// The name clients send as `model`.
    pub name: String,
    /// Seconds since the epoch when it was loaded (`created` of /v1/models).
    pub created: u64,
    /// Sampling values for fields a request leaves out (the model's models.toml entry).
    pub defaults: Arc<SamplingDefaults>,
    /// The format this model writes tool calls in (`--tool-call-parser`); `None`: recognised
    /// from the chat template.
    pub tool_call_parser: Option<tools::Parser>,
    /// `--reasoning-parser`: thinking goes to `reasoning_content`.
    pub reasoning_parser: Option<ReasoningParser>,
    /// The engine's metrics and the registry that holds them (exposed with the server's).
    pub metrics: Option<(Arc<EngineMetrics>, Registry)>,
}

/// A model just loaded, with what it occupies and how to stop it.
pub struct Loaded {
    pub served: Served,
    /// Weights plus KV cache, bytes.
    pub bytes: u64,
    /// Stops the engine and waits for its thread, so that its memory is free on return.
    pub stop: Box<dyn FnOnce() + Send>,
}

/// Loads a model (on a blocking thread: it takes seconds to minutes). The error is shown to
/// the requests that waited for it.
pub type LoadFn = Arc<dyn Fn() -> Result<Loaded, String> + Send + Sync>;

/// One model the server may answer for.
pub struct ModelEntry {
    pub name: String,
    /// Its expected weights + KV cache before it was ever loaded (file sizes), bytes.
    pub estimated_bytes: Option<u64>,
    pub load: LoadFn,
}

/// How many models may be loaded at once, and how long a request waits for one.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// `--max-loaded-models`; `None`: no limit.
    pub max_loaded: Option<usize>,
    /// `--max-loaded-gib` in bytes: weights plus KV caches of the loaded models.
    pub max_bytes: Option<u64>,
    /// How long a request waits for its model to load (or for room to load it).
    pub load_timeout: Duration,
    /// Requests that may wait for a model at once; one more gets 429.
    pub max_waiting: usize,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self { max_loaded: None, max_bytes: None, load_timeout: Duration::from_secs(600), max_waiting: 256 }
    }
}

enum Slot {
    Unloaded,
    /// Being loaded (after its victims stop).
    Loading,
    Ready(Ready),
    /// Being stopped to make room; counts as occupied until it is.
    Stopping,
}

struct Ready {
    served: Arc<Served>,
    leases: usize,
    last_used: Instant,
    stop: Option<Box<dyn FnOnce() + Send>>,
    /// Wanted gone by the request holding this ticket (the earliest such): requests that came
    /// later wait instead of taking new leases, so that it drains and a model waited for
    /// longer can load in its place.
    drain: Option<u64>,
}

impl Ready {
    fn new(loaded: Loaded) -> Self {
        Self {
            served: Arc::new(loaded.served),
            leases: 0,
            last_used: Instant::now(),
            stop: Some(loaded.stop),
            drain: None,
        }
    }
}

struct State {
    slots: Vec<Slot>,
    /// What each model occupied when last loaded, else its estimate.
    bytes: Vec<Option<u64>>,
    /// How many loads each model has begun: a waiter knows the failure it waited for.
    attempts: Vec<u64>,
    /// The last failed load: its attempt and why.
    failures: Vec<Option<(u64, String)>>,
    /// The tickets of the requests waiting for each model (a ticket orders requests by
    /// arrival: earlier ones are served first when models take turns).
    waiters: Vec<Vec<u64>>,
    next_ticket: u64,
}

impl State {
    fn waiting(&self) -> usize {
        self.waiters.iter().map(Vec::len).sum()
    }

    /// The ticket of the earliest request still waiting for room that wants `i` to go, if
    /// any (a request whose model has begun loading no longer waits for room).
    fn drain(&self, i: usize) -> Option<u64> {
        match &self.slots[i] {
            Slot::Ready(r) => r.drain.filter(|&d| self.wants_room(d)),
            _ => None,
        }
    }

    /// Whether the request holding `ticket` waits for room: for a model not loaded nor loading.
    fn wants_room(&self, ticket: u64) -> bool {
        self.waiters.iter().zip(&self.slots).any(|(w, s)| matches!(s, Slot::Unloaded) && w.contains(&ticket))
    }

    /// Whether a request that came before `ticket` waits for room for another model than
    /// `index`: room goes to requests in the order they came.
    fn earlier_wants_room(&self, index: usize, ticket: u64) -> bool {
        self.waiters
            .iter()
            .zip(&self.slots)
            .enumerate()
            .any(|(j, (w, s))| j != index && matches!(s, Slot::Unloaded) && w.iter().any(|&t| t < ticket))
    }

    /// Whether `i` may be stopped for the request holding `ticket`: loaded, idle, and no
    /// earlier request waits for it.
    fn evictable(&self, i: usize, ticket: u64) -> bool {
        matches!(&self.slots[i], Slot::Ready(r) if r.leases == 0)
            && self.waiters[i].iter().all(|&t| t > ticket)
    }
}

/// The models and their state; handlers reach it through `AppState::models`.
pub struct ModelPool {
    entries: Vec<ModelEntry>,
    limits: PoolLimits,
    state: Mutex<State>,
    /// Bumped on every change a waiter may be waiting for (a load done, a lease ended, a
    /// model stopped).
    changed: tokio::sync::watch::Sender<u64>,
    metrics: PoolMetrics,
}

/// A model held for one request: it is not unloaded while a lease on it lives.
#[derive(Clone)]
pub struct Lease(Arc<LeaseInner>);

struct LeaseInner {
    pool: Arc<ModelPool>,
    index: usize,
    served: Arc<Served>,
}

impl std::ops::Deref for Lease {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.0.served
    }
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if let Slot::Ready(r) = &mut state.slots[self.index] {
            if Arc::ptr_eq(&r.served, &self.served) {
                r.leases -= 1;
                r.last_used = Instant::now();
                if r.leases == 0 {
                    drop(state);
                    self.pool.bump();
                }
            }
        }
    }
}

/// What loading one more model takes.
enum Room {
    Free,
    /// After these idle models stop.
    After(Vec<usize>),
    /// Every model that would have to go is in use: wait for one to be idle.
    Busy,
    /// Not even alone: the limit and the numbers.
    Never(String),
}

impl ModelPool {
    /// `entries` in order (the first answers requests that name no model); `preloaded` are
    /// already loaded (by index), as at start-up. Registers the pool's metrics in `registry`.
    pub fn new(
        entries: Vec<ModelEntry>,
        limits: PoolLimits,
        preloaded: Vec<(usize, Loaded)>,
        registry: &Registry,
    ) -> prometheus::Result<Arc<Self>> {
        assert!(!entries.is_empty(), "invariant: a server answers for at least one model");
        let metrics = PoolMetrics::new(registry)?;
        let n = entries.len();
        let mut state = State {
            slots: (0..n).map(|_| Slot::Unloaded).collect(),
            bytes: entries.iter().map(|e| e.estimated_bytes).collect(),
            attempts: vec![0; n],
            failures: vec![None; n],
            waiters: vec![Vec::new(); n],
            next_ticket: 0,
        };
        for e in &entries {
            metrics.loaded.with_label_values(&[&e.name]).set(0);
        }
        for (index, loaded) in preloaded {
            metrics.loads.with_label_values(&[&entries[index].name]).inc();
            metrics.loaded.with_label_values(&[&entries[index].name]).set(1);
            state.bytes[index] = Some(loaded.bytes);
            state.slots[index] = Slot::Ready(Ready::new(loaded));
        }
        let (changed, _) = tokio::sync::watch::channel(0);
        Ok(Arc::new(Self { entries, limits, state: Mutex::new(state), changed, metrics }))
    }

    /// One model, loaded, that is never unloaded: `batch`'s in-process router and tests.
    pub fn single(served: Served) -> Arc<Self> {
        let name = served.name.clone();
        let entry = ModelEntry {
            name,
            estimated_bytes: None,
            load: Arc::new(|| Err("this model cannot be reloaded".into())),
        };
        let loaded = Loaded { served, bytes: 0, stop: Box::new(|| {}) };
        Self::new(vec![entry], PoolLimits::default(), vec![(0, loaded)], &Registry::new())
            .expect("invariant: fresh registry, fixed valid names")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The served names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// The model a request names (`None`: the first), loaded if it is not (waiting for room
    /// and for the load, up to the load timeout), and held until the lease is dropped.
    pub async fn acquire(self: &Arc<Self>, model: Option<&str>) -> Result<Lease, ApiError> {
        let index = self.index(model)?;
        let deadline = tokio::time::Instant::now() + self.limits.load_timeout;
        // The ticket orders this request among the others; a load of this model that fails,
        // other than the `since` loads finished before it came, is one it waited for.
        let (ticket, since) = {
            let mut state = self.lock();
            state.next_ticket += 1;
            let loading = matches!(state.slots[index], Slot::Loading);
            (state.next_ticket, state.attempts[index] - u64::from(loading))
        };
        let mut waiting = None;
        loop {
            let mut changed = self.changed.subscribe();
            {
                let mut state = self.lock();
                let drain = state.drain(index);
                if let Slot::Ready(r) = &mut state.slots[index] {
                    if drain.is_none_or(|d| ticket < d) {
                        r.leases += 1;
                        r.last_used = Instant::now();
                        let served = r.served.clone();
                        return Ok(Lease(Arc::new(LeaseInner { pool: self.clone(), index, served })));
                    }
                }
                if let Some((attempt, why)) = &state.failures[index] {
                    if *attempt > since {
                        return Err(self.load_failed(index, why));
                    }
                }
                // Counted among the waiting (or refused) before it may start anything.
                if waiting.is_none() {
                    let now_waiting = state.waiting();
                    if now_waiting >= self.limits.max_waiting {
                        return Err(ApiError {
                            code: Some("rate_limit_exceeded"),
                            ..ApiError::with_status(
                                StatusCode::TOO_MANY_REQUESTS,
                                format!(
                                    "{now_waiting} requests are already waiting for a model to load (the limit, --max-queue)"
                                ),
                            )
                        });
                    }
                    state.waiters[index].push(ticket);
                    waiting = Some(Waiting { pool: self.clone(), index, ticket });
                }
                if matches!(state.slots[index], Slot::Unloaded) {
                    match self.room(&mut state, index, ticket) {
                        Room::Never(why) => return Err(ApiError::invalid(Some("model"), why)),
                        Room::Busy => {}
                        Room::Free => self.begin_load(&mut state, index, Vec::new()),
                        Room::After(victims) => self.begin_load(&mut state, index, victims),
                    }
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                let secs = self.limits.load_timeout.as_secs_f64();
                let name = &self.entries[index].name;
                return Err(ApiError::with_status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("model `{name}` was not ready within {secs} s (loading, or every other loaded model busy)"),
                ));
            }
        }
    }

    fn index(&self, model: Option<&str>) -> Result<usize, ApiError> {
        let Some(name) = model else { return Ok(0) };
        self.entries.iter().position(|e| e.name == name).ok_or_else(|| {
            let names: Vec<_> = self.names().collect();
            ApiError::model_not_found(name, &names)
        })
    }

    fn load_failed(&self, index: usize, why: &str) -> ApiError {
        let name = &self.entries[index].name;
        ApiError::with_status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model `{name}` failed to load: {why}"),
        )
    }

    /// What loading `index` for the request holding `ticket` needs: nothing, idle models
    /// stopped first, a wait (the models in the way are marked to drain), or more than the
    /// limits allow.
    fn room(&self, state: &mut State, index: usize, ticket: u64) -> Room {
        // A size not known yet counts as the whole budget: loaded alone, then measured.
        let need = state.bytes[index].or(self.limits.max_bytes).unwrap_or(0);
        let name = &self.entries[index].name;
        if let Some(max) = self.limits.max_bytes {
            if need > max {
                return Room::Never(format!(
                    "model `{name}` needs {} (weights and KV cache) and at most {} may be loaded (--max-loaded-gib); it can never be loaded",
                    gib(need),
                    gib(max)
                ));
            }
        }
        if state.earlier_wants_room(index, ticket) {
            return Room::Busy;
        }
        let fits = |count: usize, bytes: u64| {
            self.limits.max_loaded.is_none_or(|m| count < m)
                && self.limits.max_bytes.is_none_or(|m| bytes + need <= m)
        };
        let bytes_of = |state: &State, i: usize| state.bytes[i].unwrap_or(0);
        let occupied: Vec<usize> = (0..state.slots.len())
            .filter(|&i| i != index && !matches!(state.slots[i], Slot::Unloaded))
            .collect();
        let count = occupied.len();
        let bytes: u64 = occupied.iter().map(|&i| bytes_of(state, i)).sum();
        if fits(count, bytes) {
            return Room::Free;
        }
        // Least recently used first.
        let mut loaded: Vec<(Instant, usize)> = occupied
            .iter()
            .filter_map(|&i| match &state.slots[i] {
                Slot::Ready(r) => Some((r.last_used, i)),
                _ => None,
            })
            .collect();
        loaded.sort();
        let (mut c, mut b) = (count, bytes);
        let mut victims = Vec::new();
        for &(_, i) in &loaded {
            if state.evictable(i, ticket) {
                victims.push(i);
                (c, b) = (c - 1, b - bytes_of(state, i));
                if fits(c, b) {
                    return Room::After(victims);
                }
            }
        }
        // Not enough idle: the least recently used that would make room take no new requests
        // that came after this one, so they drain.
        let (mut c, mut b) = (count, bytes);
        for &(_, i) in &loaded {
            let drain = state.drain(i).map_or(ticket, |d| d.min(ticket));
            if let Slot::Ready(r) = &mut state.slots[i] {
                r.drain = Some(drain);
            }
            (c, b) = (c - 1, b - bytes_of(state, i));
            if fits(c, b) {
                break;
            }
        }
        Room::Busy
    }

    /// Marks `index` loading and its victims stopping, and loads it on a blocking thread once
    /// they have stopped.
    fn begin_load(self: &Arc<Self>, state: &mut State, index: usize, victims: Vec<usize>) {
        let mut stops = Vec::new();
        for &v in &victims {
            if let Slot::Ready(mut r) = std::mem::replace(&mut state.slots[v], Slot::Stopping) {
                stops.push((v, r.stop.take()));
            }
        }
        state.slots[index] = Slot::Loading;
        state.attempts[index] += 1;
        let attempt = state.attempts[index];
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            for (v, stop) in stops {
                let name = &pool.entries[v].name;
                let started = Instant::now();
                if let Err(why) = stop.map_or(Ok(()), unwound) {
                    // Its memory may not be free; the slot is all the pool can give back.
                    tracing::error!(model = %name, "stopping the model panicked: {why}");
                }
                tracing::info!(model = %name, seconds = started.elapsed().as_secs_f64(), "model unloaded (least recently used, to make room)");
                pool.metrics.unloads.with_label_values(&[name]).inc();
                pool.metrics.loaded.with_label_values(&[name]).set(0);
                pool.lock().slots[v] = Slot::Unloaded;
                pool.bump();
            }
            let name = &pool.entries[index].name;
            let started = Instant::now();
            let result = unwound(|| (pool.entries[index].load)()).and_then(|r| r);
            let seconds = started.elapsed().as_secs_f64();
            let mut state = pool.lock();
            match result {
                Ok(loaded) => match pool.limits.max_bytes.filter(|&max| loaded.bytes > max) {
                    Some(max) => {
                        // Known only now that it is loaded: stop it again.
                        let why = format!(
                            "it takes {} (weights and KV cache) and at most {} may be loaded (--max-loaded-gib); it can never be loaded",
                            gib(loaded.bytes),
                            gib(max)
                        );
                        state.bytes[index] = Some(loaded.bytes);
                        state.slots[index] = Slot::Stopping;
                        drop(state);
                        if let Err(panic) = unwound(loaded.stop) {
                            tracing::error!(model = %name, "stopping the model panicked: {panic}");
                        }
                        let mut state = pool.lock();
                        state.slots[index] = Slot::Unloaded;
                        state.failures[index] = Some((attempt, why));
                    }
                    None => {
                        tracing::info!(model = %name, seconds, gib = loaded.bytes as f64 / GIB, "model loaded");
                        pool.metrics.loads.with_label_values(&[name]).inc();
                        pool.metrics.loaded.with_label_values(&[name]).set(1);
                        pool.metrics.load_seconds.with_label_values(&[name]).observe(seconds);
                        state.bytes[index] = Some(loaded.bytes);
                        state.failures[index] = None;
                        state.slots[index] = Slot::Ready(Ready::new(loaded));
                    }
                },
                Err(why) => {
                    tracing::error!(model = %name, "loading failed: {why}");
                    state.slots[index] = Slot::Unloaded;
                    state.failures[index] = Some((attempt, why));
                }
            }
            pool.bump();
        });
    }

    /// The models loaded now, in order.
    pub fn loaded(&self) -> Vec<Arc<Served>> {
        self.lock()
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Ready(r) => Some(r.served.clone()),
                _ => None,
            })
            .collect()
    }

    /// Each model's name and, when loaded, its model.
    pub fn cards(&self) -> Vec<(String, Option<Arc<Served>>)> {
        let state = self.lock();
        self.entries
            .iter()
            .zip(&state.slots)
            .map(|(e, s)| match s {
                Slot::Ready(r) => (e.name.clone(), Some(r.served.clone())),
                _ => (e.name.clone(), None),
            })
            .collect()
    }

    /// Stops intake on every loaded engine (running requests finish).
    pub fn shutdown(&self) {
        self.loaded().iter().for_each(|s| s.engine.shutdown());
    }

    /// Stops every loaded engine and waits for its thread (at exit).
    pub fn stop_all(&self) {
        let stops: Vec<_> = self
            .lock()
            .slots
            .iter_mut()
            .filter_map(|s| match s {
                Slot::Ready(r) => r.stop.take(),
                _ => None,
            })
            .collect();
        stops.into_iter().for_each(|stop| stop());
    }
}

/// `work`'s result, or what it panicked with: a load or a stop that panics must leave its slot
/// settled (else the pool would wait for it forever).
fn unwound<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        format!("it panicked: {text}")
    })
}

/// Counts a request among those waiting for a model while it lives.
struct Waiting {
    pool: Arc<ModelPool>,
    index: usize,
    ticket: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        let waiters = &mut state.waiters[self.index];
        if let Some(at) = waiters.iter().position(|&t| t == self.ticket) {
            waiters.swap_remove(at);
        }
        drop(state);
        // An earlier waiter gone may let a later one evict.
        self.pool.bump();
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB)
}

/// The pool's own series, by `model_name`.
struct PoolMetrics {
    loaded: IntGaugeVec,
    loads: IntCounterVec,
    unloads: IntCounterVec,
    load_seconds: HistogramVec,
}

impl PoolMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let loaded = IntGaugeVec::new(
            Opts::new(format!("{PREFIX}model_loaded"), "1 while the model is loaded, else 0"),
            &["model_name"],
        )?;
        let loads = IntCounterVec::new(
            Opts::new(format!("{PREFIX}model_loads_total"), "Times the model was loaded"),
            &["model_name"],
        )?;
        let unloads = IntCounterVec::new(
            Opts::new(format!("{PREFIX}model_unloads_total"), "Times the model was unloaded to make room"),
            &["model_name"],
        )?;
        let load_seconds = HistogramVec::new(
            HistogramOpts::new(format!("{PREFIX}model_load_seconds"), "Time to load the model on demand")
                .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
            &["model_name"],
        )?;
        registry.register(Box::new(loaded.clone()))?;
        registry.register(Box::new(loads.clone()))?;
        registry.register(Box::new(unloads.clone()))?;
        registry.register(Box::new(load_seconds.clone()))?;
        Ok(Self { loaded, loads, unloads, load_seconds })
    }
}

/// `response` holding `lease` until its body is sent (or dropped): a stream keeps its model
/// loaded to the end.
pub(crate) fn held(response: axum::response::Response, lease: Lease) -> axum::response::Response {
    use futures::StreamExt as _;
    response.map(|body| {
        let chunks = body.into_data_stream().map(move |chunk| {
            let _held = &lease;
            chunk
        });
        axum::body::Body::from_stream(chunks)
    })
}
