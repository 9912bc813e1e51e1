//! ferrite's OpenAI-compatible HTTP API: axum routes over an [`EngineHandle`]. `app(state)`
//! builds the whole router, so tests drive it with `oneshot` and no socket.

#![warn(clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod budgets;
pub mod cors;
mod embeddings;
pub mod error;
pub mod logprobs;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod reasoning;
mod response;
mod responses;
mod routes;
mod stream;
pub mod structured;
pub mod tools;
pub mod validate;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
pub use models::{Lease, Loaded, ModelEntry, ModelPool, PoolLimits, Served};

/// What every handler shares: the models, and the server-wide settings.
#[derive(Clone)]
pub struct AppState {
    /// The models this server answers for (each request names one), loaded on demand.
    pub models: Arc<ModelPool>,
    /// Empty: no authentication.
    pub api_keys: Arc<Vec<String>>,
    /// Budgets for the requests of a key that set none (`--api-keys-file`), by key: above the
    /// model's defaults, below the request's own fields and headers.
    pub key_budgets: Arc<std::collections::HashMap<String, budgets::BudgetDefaults>>,
    /// Bounds on `n`, stop strings and `logit_bias` (the flags' values).
    pub request_limits: validate::RequestLimits,
    /// What `/metrics` exposes beside the models' own.
    pub metrics: Arc<metrics::Metrics>,
    /// How long a request body may take to arrive (408 beyond it).
    pub body_read_timeout: std::time::Duration,
}

impl AppState {
    /// One model, always loaded, with the default limits and no keys.
    pub fn single(served: Served) -> Self {
        Self::over(ModelPool::single(served), Arc::new(metrics::Metrics::http_only()))
    }

    /// `models` with the default limits and no keys; `metrics` holds the pool's series.
    pub fn over(models: Arc<ModelPool>, metrics: Arc<metrics::Metrics>) -> Self {
        Self {
            models,
            api_keys: Default::default(),
            key_budgets: Default::default(),
            request_limits: Default::default(),
            metrics,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
        }
    }
}

/// Default for [`AppState::body_read_timeout`].
pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest request body accepted by default (413 beyond it).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;

pub fn app(state: AppState) -> Router {
    app_with_body_limit(state, DEFAULT_MAX_BODY_BYTES)
}

/// [`app`] with another request body limit.
pub fn app_with_body_limit(state: AppState, max_body_bytes: usize) -> Router {
    app_with_cors(state, max_body_bytes, None)
}

/// [`app_with_body_limit`], answering cross-origin requests as `cors` says (outside every
/// route, so a preflight is answered before the API key check: browsers send it without one).
pub fn app_with_cors(
    state: AppState,
    max_body_bytes: usize,
    cors: Option<tower_http::cors::CorsLayer>,
) -> Router {
    // With `--api-key`, these answer 401 before reading a body; health, version and metrics
    // stay open (probes and scrapers carry no key).
    let keyed = Router::new()
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{id}", get(routes::get_model))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/responses", post(responses::responses))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), routes::require_key));
    let router = Router::new()
        .route("/health", get(routes::health))
        .route("/version", get(routes::version))
        .route("/metrics", get(metrics::metrics))
        .merge(keyed)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .with_state(state);
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Only `GET /metrics`, for `--metrics-port`.
pub fn metrics_app(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics::metrics)).with_state(state)
}
