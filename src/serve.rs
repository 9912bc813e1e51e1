//! `ferrite serve`: the OpenAI-compatible HTTP server over one engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use ferrite_server::{app_with_body_limit, AppState};

use crate::engine_args::{EngineArgs, Running};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Accepted API keys (repeatable); none means no authentication.
    #[arg(long = "api-key", env = "FERRITE_API_KEY", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// The model name clients must send (default: the registry entry's name, else --model as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests waiting to be scheduled before new ones get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body, bytes (413 beyond it).
    #[arg(long, default_value_t = ferrite_server::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_secs: u64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let Running { engine, thread, tokenizer, name, sampling_defaults, .. } =
        args.engine.start(args.max_queue)?;
    let served_model_name = args.served_model_name.clone().unwrap_or(name);
    let state = AppState {
        engine: engine.clone(),
        tokenizer,
        served_model_name: served_model_name.clone(),
        api_keys: Arc::new(args.api_keys.clone()),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        defaults: Arc::new(sampling_defaults),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .with_context(|| format!("--host {} --port {} is not an address", args.host, args.port))?;
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr().unwrap_or(addr);
        // Without TCP_NODELAY a token written right after another waits for the client's
        // delayed ACK (40 ms on Linux): streamed tokens would arrive in bursts.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
            }
        });
        tracing::info!(%addr, model = %served_model_name, "ready");
        eprintln!("ferrite serving `{served_model_name}` on http://{addr}");
        let grace = Duration::from_secs(args.shutdown_grace_secs);
        axum::serve(listener, app_with_body_limit(state, args.max_body_bytes))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("shutting down: finishing in-flight requests (up to {}s)", grace.as_secs());
                engine.shutdown();
                // In-flight streams end as the engine finishes them; a stuck one is cut off.
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    std::process::exit(0);
                });
            })
            .await
            .context("serving")
    })?;
    let _ = thread.join();
    Ok(())
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
