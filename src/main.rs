//! The `ferrite` binary: one command line for generation (and, as they land, serving, batch
//! jobs and benchmarks).

mod api_keys;
mod batch;
mod bench;
mod engine_args;
mod generate;
mod http;
mod limits;
mod registry;
mod serve;
mod serve_models;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferrite", version, about = "A local LLM inference engine and server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text or as JSON objects (one per line). Levels: FERRITE_LOG.
    #[arg(long, global = true, value_enum, default_value = "text", env = "FERRITE_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once at start-up: boxing the larger variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Generate text for one or more prompts (several prompts run together as one flat batch).
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Benchmarks with `vllm bench`'s flags and outputs: latency, throughput, serve.
    Bench(bench::BenchArgs),
    /// List the models.toml entries and whether their weights are on this machine.
    Models {
        /// The model registry (default: ./models.toml, else the one built in).
        #[arg(long, env = "FERRITE_MODELS_FILE")]
        models_file: Option<std::path::PathBuf>,
    },
    /// Run an OpenAI Batch API file (JSONL) through the engine; resumable.
    Batch(batch::BatchArgs),
}

/// How long candle's CPU worker threads spin after an elementwise op before they sleep
/// (candle's default is 25,000 spins). Those threads sit beside rayon's, which run ferrite's
/// products and attention, and while they spin they take a core from the step's next product:
/// ~10 % of a 128-token prefill's samples in perf, and 0.29-0.31 → 0.25-0.27 s a prefill with
/// a short spin (2-core VM). A short spin still catches back-to-back ops.
const CANDLE_SPIN_LIMIT: &str = "1000";

fn main() -> std::process::ExitCode {
    // Read once, when candle first uses its pool; set before any thread exists. A value the
    // user set wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT);
    }
    let cli = Cli::parse();
    let filter =
        || tracing_subscriber::EnvFilter::try_from_env("FERRITE_LOG").unwrap_or_else(|_| "info".into());
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => {
            tracing_subscriber::fmt().json().with_env_filter(filter()).with_writer(std::io::stderr).init()
        }
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Models { models_file } => registry::list(models_file.as_deref()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
