//! `serve`'s models: the pool's entries built from the flags, a GPU's memory split among
//! them, and the ones loaded at start (all of them, or under a loading limit the first).

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use ferrite_server::metrics::Metrics;
use ferrite_server::{Loaded, ModelEntry, ModelPool, PoolLimits};

use crate::engine_args::{gpu_shares, EngineArgs, ModelChoice};

/// What `serve` runs over.
pub struct Models {
    pub pool: Arc<ModelPool>,
    /// The server's registry, holding the pool's series.
    pub metrics: Arc<Metrics>,
    /// Whether every model has a device price (so `max_cost_usd` budgets can be honoured).
    pub priced: bool,
}

/// Builds the pool over `choices` and loads what is loaded at start: every model without a
/// loading limit, else the first (so the default model answers at once and a broken one
/// fails the start).
pub fn start(
    args: &EngineArgs,
    choices: Vec<ModelChoice>,
    limits: PoolLimits,
    max_queue: usize,
) -> Result<Models> {
    let on_demand = limits.max_loaded.is_some() || limits.max_bytes.is_some();
    let weights: Vec<Option<u64>> = choices.iter().map(|c| args.weight_file_bytes(c)).collect();
    let shares = gpu_shares(args.gpu_memory_utilization, &weights, limits.max_loaded.filter(|_| on_demand));
    if choices.len() > 1 {
        let split: Vec<String> =
            choices.iter().zip(&shares).map(|(c, s)| format!("{}={s:.3}", c.name)).collect();
        tracing::info!("serving {} models; on a GPU each plans its memory within its share of --gpu-memory-utilization ({})", choices.len(), split.join(", "));
    }
    let priced = choices.iter().all(|c| args.device_cost_per_hour(c) > 0.0);
    // One load at a time: a GPU's planning measures what the card has left.
    let loading = Arc::new(Mutex::new(0.0f64));
    let entries: Vec<ModelEntry> = choices
        .iter()
        .zip(&shares)
        .map(|(choice, &share)| {
            let (args, choice, loading) = (args.clone(), choice.clone(), loading.clone());
            ModelEntry {
                name: choice.name.clone(),
                estimated_bytes: args.estimated_bytes(&choice),
                load: Arc::new(move || {
                    load(&args, &choice, max_queue, share, &loading).map_err(|e| format!("{e:#}"))
                }),
            }
        })
        .collect();
    let at_start = if on_demand { 1 } else { entries.len() };
    if let (Some(max), Some(need)) = (limits.max_bytes, entries[0].estimated_bytes) {
        if need > max {
            bail!(
                "model `{}` needs about {:.2} GiB (weight files and --kv-cache-gib), over --max-loaded-gib {:.2}",
                entries[0].name,
                need as f64 / GIB,
                max as f64 / GIB
            );
        }
    }
    let mut preloaded = Vec::new();
    for (i, entry) in entries.iter().enumerate().take(at_start) {
        preloaded.push((i, (entry.load)().map_err(anyhow::Error::msg)?));
    }
    let metrics = Arc::new(Metrics::http_only());
    let pool = ModelPool::new(entries, limits, preloaded, metrics.registry())?;
    Ok(Models { pool, metrics, priced })
}

const GIB: f64 = (1u64 << 30) as f64;

/// Loads `choice` within `share` of a GPU beside the shares the loaded models hold
/// (`in_use`, which this load adds to and its stop takes back).
fn load(
    args: &EngineArgs,
    choice: &ModelChoice,
    max_queue: usize,
    share: f64,
    in_use: &Arc<Mutex<f64>>,
) -> Result<Loaded> {
    let mut held = in_use.lock().unwrap_or_else(|p| p.into_inner());
    let running = args.start_model(choice, max_queue, (*held + share).min(1.0))?;
    *held += share;
    let loaded = running.into_loaded();
    let in_use = in_use.clone();
    let stop = loaded.stop;
    Ok(Loaded {
        stop: Box::new(move || {
            stop();
            *in_use.lock().unwrap_or_else(|p| p.into_inner()) -= share;
        }),
        ..loaded
    })
}
