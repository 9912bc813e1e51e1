//! `ferrite serve`: the OpenAI-compatible HTTP server over one engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ferrite_engine::metrics::Totals;
use ferrite_server::cors::CorsPolicy;
use ferrite_server::{app_with_cors, metrics_app, AppState, ModelPool, PoolLimits};

use crate::engine_args::EngineArgs;
use crate::limits::LimitArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Accepted API keys (repeatable); none means no authentication.
    #[arg(long = "api-key", env = "FERRITE_API_KEY", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// A TOML file of more API keys, each with budgets (priority, deadline_ms,
    /// ttft_deadline_ms, max_cost_usd) for the requests that set none.
    #[arg(long, value_name = "FILE")]
    api_keys_file: Option<std::path::PathBuf>,
    /// The model name clients must send (default: the registry entry's name, else --model as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests waiting to be scheduled before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body, bytes (413 beyond it).
    #[arg(long, default_value_t = ferrite_server::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Also serve `GET /metrics` on this port (it is always on the API port too).
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Seconds between two stats log lines (throughput, queue, KV cache, prefix hits); 0: none.
    #[arg(long, default_value_t = 10)]
    stats_interval_secs: u64,
    /// Seconds a client may take to send a request's head (then the connection is closed).
    #[arg(long, default_value_t = 10.0)]
    header_read_timeout_secs: f64,
    /// Seconds a client may take to send a request's body (then 408).
    #[arg(long, default_value_t = 30.0)]
    body_read_timeout_secs: f64,
    /// Most open client connections; one more is answered 503 and closed.
    #[arg(long, default_value_t = 2048)]
    max_connections: usize,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Origins whose pages may call the API from a browser (`scheme://host[:port]`, or `*`;
    /// repeatable or comma-separated). Default: none (no CORS headers).
    #[arg(long, value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Methods cross-origin pages may use (default: any).
    #[arg(long, value_delimiter = ',')]
    allowed_methods: Vec<String>,
    /// Request headers cross-origin pages may send (default: any, Authorization included).
    #[arg(long, value_delimiter = ',')]
    allowed_headers: Vec<String>,
    /// Cross-origin pages may send credentials (cookies, HTTP authentication).
    #[arg(long)]
    allow_credentials: bool,
    /// Most models loaded at once: the first is loaded at start, the others on their first
    /// request, unloading the least recently used idle one to make room. Default: every model
    /// is loaded at start and stays.
    #[arg(long)]
    max_loaded_models: Option<usize>,
    /// Most GiB the loaded models may take (weights and KV caches), with the same on-demand
    /// loading; a model larger than this alone is refused with its size.
    #[arg(long)]
    max_loaded_gib: Option<f64>,
    /// Seconds a request waits for its model to load (or for room to load it) before a 503.
    #[arg(long, default_value_t = 600)]
    model_load_timeout_secs: u64,
}

/// A line for the operator on stderr. Not `eprintln!`: a closed stderr (a supervisor gone)
/// must not panic the server.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `serve`'s default inter-token latency target, in milliseconds.
const SERVE_MAX_ITL_MS: f64 = 250.0;

pub fn run(args: ServeArgs) -> Result<()> {
    // Checked before the model loads: a typo should not cost a load.
    let cors = CorsPolicy {
        allowed_origins: args.allowed_origins.clone(),
        allowed_methods: args.allowed_methods.clone(),
        allowed_headers: args.allowed_headers.clone(),
        allow_credentials: args.allow_credentials,
    }
    .layer()?;
    if cors.is_none()
        && (!args.allowed_methods.is_empty() || !args.allowed_headers.is_empty() || args.allow_credentials)
    {
        anyhow::bail!("--allowed-methods, --allowed-headers and --allow-credentials apply to the origins --allowed-origins names; none are given");
    }
    // The keys file's syntax, before the model loads (its budgets against the price after).
    if let Some(path) = &args.api_keys_file {
        crate::api_keys::load(path, &crate::api_keys::Honoured { priorities: true, priced: true })?;
    }
    let mut engine_args = args.engine;
    // An interactive server: streams keep their pace while prompts arrive (see --max-itl-ms).
    engine_args.max_itl_ms = engine_args.max_itl_ms.or(Some(SERVE_MAX_ITL_MS));
    let pool_limits = PoolLimits {
        max_loaded: match args.max_loaded_models {
            Some(0) => anyhow::bail!("--max-loaded-models must be at least 1, got 0"),
            n => n,
        },
        max_bytes: match args.max_loaded_gib {
            Some(g) if !(g > 0.0 && g.is_finite()) => {
                anyhow::bail!("--max-loaded-gib must be a positive number of GiB, got {g}")
            }
            g => g.map(|g| (g * (1u64 << 30) as f64) as u64),
        },
        load_timeout: Duration::from_secs(args.model_load_timeout_secs.max(1)),
        max_waiting: args.max_queue,
    };
    let choices = engine_args.model_choices(true, args.served_model_name.as_deref())?;
    let models = crate::serve_models::start(&engine_args, choices, pool_limits, args.max_queue)?;
    let seconds = |what: &str, s: f64| {
        if s > 0.0 && s.is_finite() {
            Ok(Duration::from_secs_f64(s))
        } else {
            anyhow::bail!("--{what} must be a positive number of seconds, got {s}")
        }
    };
    let header_read_timeout = seconds("header-read-timeout-secs", args.header_read_timeout_secs)?;
    let body_read_timeout = seconds("body-read-timeout-secs", args.body_read_timeout_secs)?;
    let request_limits = args.limits.request_limits()?;
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections must be at least 1, got 0");
    }
    let honoured = crate::api_keys::Honoured {
        priorities: engine_args.scheduling_policy == crate::engine_args::PolicyArg::Priority,
        priced: models.priced,
    };
    let key_budgets = match &args.api_keys_file {
        Some(path) => crate::api_keys::load(path, &honoured)?,
        None => Default::default(),
    };
    let mut api_keys = args.api_keys.clone();
    api_keys.extend(key_budgets.keys().cloned());
    let state = AppState {
        api_keys: Arc::new(api_keys),
        key_budgets: Arc::new(key_budgets),
        request_limits,
        body_read_timeout,
        ..AppState::over(models.pool.clone(), models.metrics)
    };
    let pool = models.pool;
    let served_model_name = pool.names().collect::<Vec<_>>().join("`, `");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let served = pool.clone();
    runtime.block_on(async move {
        let pool = served;
        let addr: SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .with_context(|| format!("--host {} --port {} is not an address", args.host, args.port))?;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, model = %served_model_name, "ready");
        say!("ferrite serving `{served_model_name}` on http://{addr}");
        if let Some(port) = args.metrics_port {
            let addr: SocketAddr = format!("{}:{port}", args.host)
                .parse()
                .with_context(|| format!("--host {} --metrics-port {port} is not an address", args.host))?;
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
            let addr = listener.local_addr().unwrap_or(addr);
            say!("ferrite metrics on http://{addr}/metrics");
            let app = metrics_app(state.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("the metrics listener stopped: {e}");
                }
            });
        }
        if args.stats_interval_secs > 0 {
            tokio::spawn(log_stats(pool.clone(), Duration::from_secs(args.stats_interval_secs)));
        }
        let grace = Duration::from_secs(args.shutdown_grace_secs);
        let app = app_with_cors(state.clone(), args.max_body_bytes, cors);
        let limits =
            crate::http::ConnectionLimits { header_read_timeout, max_connections: args.max_connections };
        // Cutting the last requests closes their connections, which can end the serve loop
        // below before the cut is reported: once cutting starts, the loop's end waits for it.
        let cutting = Arc::new((std::sync::atomic::AtomicBool::new(false), tokio::sync::Notify::new()));
        let cut = cutting.clone();
        let engines = pool.clone();
        crate::http::serve(listener, app, limits, async move {
            shutdown_signal().await;
            say!("shutting down: finishing in-flight requests (up to {}s)", grace.as_secs());
            engines.shutdown();
            // In-flight requests end as the engine finishes them; what is left at the end of
            // the grace gets an error event (so no stream just stops), then the process exits.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                cut.0.store(true, std::sync::atomic::Ordering::SeqCst);
                cut_unfinished(engines, grace).await;
                cut.1.notify_one();
                std::process::exit(0);
            });
        })
        .await;
        if cutting.0.load(std::sync::atomic::Ordering::SeqCst) {
            cutting.1.notified().await;
        }
        anyhow::Ok(())
    })?;
    pool.stop_all();
    Ok(())
}

/// Ends every request still running at the end of the shutdown grace with an error (streams
/// get an error event and `[DONE]`, others a 500), says how many, and gives those answers a
/// moment to reach their clients.
async fn cut_unfinished(pool: Arc<ModelPool>, grace: Duration) {
    let why = format!(
        "the server shut down before this request finished (its shutdown grace is {} s)",
        grace.as_secs()
    );
    let wait = Duration::from_secs(2);
    let cut = tokio::task::spawn_blocking(move || {
        pool.loaded().iter().map(|m| m.engine.abort_all(&why, wait)).sum::<Option<usize>>()
    })
    .await
    .ok()
    .flatten();
    match cut {
        Some(0) => {}
        Some(n) => say!("shutdown grace over: cut {n} unfinished request(s), each answered with an error"),
        None => say!("shutdown grace over: the engine did not answer within {}s; exiting", wait.as_secs()),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// vLLM's periodic line, per loaded model: throughput over the interval, queue, KV cache use,
/// prefix-cache hits. Quiet while the model is idle.
async fn log_stats(pool: Arc<ModelPool>, every: Duration) {
    let mut last = std::collections::HashMap::new();
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let mut next = std::collections::HashMap::new();
        for served in pool.loaded() {
            if let Some((m, _)) = &served.metrics {
                let now = m.totals();
                // The same engine as at the last tick (a model loaded again starts from zero).
                if let Some((_, before)) = last.get(&served.name).filter(|(was, _)| Arc::ptr_eq(was, m)) {
                    log_interval(&served.name, before, &now, every);
                }
                next.insert(served.name.clone(), (m.clone(), now));
            }
        }
        last = next;
    }
}

/// One model's line over one interval.
fn log_interval(model: &str, last: &Totals, now: &Totals, every: Duration) {
    let secs = every.as_secs_f64();
    let prompt = (now.prompt_tokens - last.prompt_tokens) as f64 / secs;
    let generation = (now.generation_tokens - last.generation_tokens) as f64 / secs;
    let queries = now.prefix_cache_queries - last.prefix_cache_queries;
    let hits = now.prefix_cache_hits - last.prefix_cache_hits;
    if prompt > 0.0 || generation > 0.0 || now.running > 0 || now.waiting > 0 {
        let hit_rate = if queries > 0 { 100.0 * hits as f64 / queries as f64 } else { 0.0 };
        tracing::info!(
            model,
            "Avg prompt throughput: {prompt:.1} tokens/s, Avg generation throughput: {generation:.1} tokens/s, \
             Running: {} reqs, Waiting: {} reqs, KV cache usage: {:.1}%, Prefix cache hit rate: {hit_rate:.1}%, \
             Cost so far: ${:.6}",
            now.running,
            now.waiting,
            100.0 * now.kv_cache_usage,
            now.cost_usd
        );
    }
}
