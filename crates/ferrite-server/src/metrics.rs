//! `/metrics` (Prometheus text format) and the per-request HTTP layer: request ids
//! (`x-request-id` taken from the client or made here, echoed back), HTTP counters and latency
//! by matched route pattern (bounded cardinality), and one access-log line per request.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferrite_engine::metrics::PREFIX;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::AppState;

/// HTTP latency buckets, seconds.
const HTTP_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// The server's registry (HTTP and model-pool metrics); each loaded model's engine metrics are
/// in that model's own registry, gathered beside it.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Adds the HTTP metrics to `registry`.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let http_requests = IntCounterVec::new(
            Opts::new(
                format!("{PREFIX}http_requests_total"),
                "HTTP requests by method, route pattern and status",
            ),
            &["method", "route", "status"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                format!("{PREFIX}http_request_duration_seconds"),
                "Time to the response head, by method and route pattern (a stream's body runs on)",
            )
            .buckets(HTTP_BUCKETS.to_vec()),
            &["method", "route"],
        )?;
        registry.register(Box::new(http_duration.clone()))?;
        Ok(Self { registry, http_requests, http_duration })
    }

    /// A fresh registry with the HTTP metrics.
    pub fn http_only() -> Self {
        Self::new(Registry::new()).expect("invariant: fresh registry, fixed valid names")
    }

    /// Where the server's other metrics (the model pool's) register.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// `GET /metrics`: each loaded engine's scheduler gauges are refreshed first (a command round
/// trip, so they reflect every stream dropped before the scrape), then the server's series
/// and every loaded model's are written as one exposition (a metric's series from several
/// models under one name).
pub async fn metrics(State(state): State<AppState>) -> Response {
    let loaded = state.models.loaded();
    let refresh = loaded.clone();
    // `stats` waits for each engine thread between two steps: keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || {
        for served in &refresh {
            if let Some((m, _)) = &served.metrics {
                served.engine.stats();
                m.refresh_cost_window(Instant::now());
            }
        }
    })
    .await;
    let mut families = state.metrics.registry.gather();
    for served in &loaded {
        if let Some((_, registry)) = &served.metrics {
            families.extend(registry.gather());
        }
    }
    let mut body = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&merged(families), &mut body) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")).into_response();
    }
    ([("content-type", prometheus::TEXT_FORMAT)], body).into_response()
}

/// One family per name, its series from every registry that had it, sorted by name.
fn merged(families: Vec<prometheus::proto::MetricFamily>) -> Vec<prometheus::proto::MetricFamily> {
    let mut by_name: std::collections::BTreeMap<String, prometheus::proto::MetricFamily> = Default::default();
    for mut family in families {
        match by_name.get_mut(family.name()) {
            Some(first) => first.mut_metric().extend(family.take_metric()),
            None => {
                by_name.insert(family.name().to_string(), family);
            }
        }
    }
    by_name.into_values().collect()
}

/// When the request reached the server: TTFT and end-to-end latency count from here.
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// A request id: the client's `x-request-id` when it is safe to log (see
/// `is_safe_request_id`), else a new one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn new_request_id() -> String {
    crate::response::response_id("req")
}

/// The `method` label: a standard method's name, else `other`, so that clients cannot mint
/// label values (the route label is the matched pattern or `unmatched`, the status a number).
fn method_label(method: &axum::http::Method) -> String {
    use axum::http::Method;
    let known = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    if known.contains(method) {
        method.to_string()
    } else {
        "other".to_string()
    }
}

/// A client's `x-request-id` is kept only when it is 1 to 128 of `[A-Za-z0-9._:-]`: it goes
/// into log lines and response headers as is, so nothing that could forge a log field passes.
fn is_safe_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Per request: id, span, HTTP metrics, access log.
pub async fn track(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_safe_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    request.extensions_mut().insert(RequestId(id.clone()));
    request.extensions_mut().insert(Arrival(started));
    let span = tracing::info_span!("request", id = %id, method = %method, route = %route);
    let mut response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    state.metrics.http_requests.with_label_values(&[&method, &route, &status.to_string()]).inc();
    state.metrics.http_duration.with_label_values(&[&method, &route]).observe(elapsed);
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let usage = response.extensions().get::<AccessUsage>().cloned();
    let _enter = span.enter();
    match usage {
        Some(u) => tracing::info!(
            status,
            duration_ms = elapsed * 1000.0,
            prompt_tokens = u.prompt_tokens,
            completion_tokens = u.completion_tokens,
            ttft_ms = u.ttft_seconds.map(|t| t * 1000.0),
            cost_usd = u.cost_usd,
            budgets = %u.budgets,
            "access"
        ),
        None => tracing::info!(status, duration_ms = elapsed * 1000.0, "access"),
    }
    response
}

/// What a non-streamed completion tells the access log.
#[derive(Debug, Clone, Default)]
pub struct AccessUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_seconds: Option<f64>,
    pub cost_usd: f64,
    /// How the budgets the request carried ended (`deadline=cut,cost=met`); empty for none.
    pub budgets: String,
}
