//! `ferrite bench`: `latency` and `throughput` run the engine in-process; `serve` measures any
//! OpenAI-compatible server over HTTP. Flag names, metric definitions, printed lines and JSON
//! keys follow `vllm bench`, so figures compare directly.

mod datasets;
mod offline;
mod serve;
pub mod stats;

use std::path::Path;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    kind: BenchKind,
}

// Parsed once at start-up: boxing the larger variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum BenchKind {
    /// Time one fixed batch from submission to the last token (in-process).
    Latency(offline::LatencyArgs),
    /// Requests and tokens per second over a whole dataset (in-process).
    Throughput(offline::ThroughputArgs),
    /// TTFT, TPOT, ITL, E2EL and goodput of a running OpenAI-compatible server.
    Serve(serve::ServeBenchArgs),
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.kind {
        BenchKind::Latency(a) => offline::latency(a),
        BenchKind::Throughput(a) => offline::throughput(a),
        BenchKind::Serve(a) => serve::run(a),
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}
