//! `ferrite bench`: `latency` and `throughput` run the engine in-process; `serve` measures any
//! OpenAI-compatible server over HTTP. Flag names, metric definitions, printed lines and JSON
//! keys follow `vllm bench`, so figures compare directly.

mod budgets;
mod datasets;
mod offline;
mod request;
mod serve;
pub mod stats;
mod traffic;

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

/// Where `--save-result` will write, checked before the run: a missing or read-only folder
/// fails now, not after the whole benchmark.
fn check_result_dir(result_dir: Option<&Path>, result_filename: Option<&str>) -> Result<()> {
    let name = result_filename.unwrap_or("result.json");
    let path = result_dir.map_or_else(|| std::path::PathBuf::from(name), |d| d.join(name));
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let probe = dir.join(format!(".ferrite-bench-write-check-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).with_context(|| {
        format!("--save-result cannot write into {} (set by --result-dir / --result-filename)", dir.display())
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A result JSON: written whole (pretty), or with `append` added to the end of the file as one
/// line (vLLM's `--append-result`), creating it.
fn save_json(path: &Path, value: &serde_json::Value, append: bool) -> Result<()> {
    if !append {
        write_json(path, value)?;
        println!("Results saved to {}", path.display());
        return Ok(());
    }
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("appending to {}", path.display()))?;
    // One object per line; a file that does not end its last line gets one first.
    let ends_open = std::fs::read(path)?.last().is_some_and(|&b| b != b'\n');
    let sep = if ends_open { "\n" } else { "" };
    writeln!(file, "{sep}{}", serde_json::to_string(value)?)
        .with_context(|| format!("appending to {}", path.display()))?;
    println!("Results appended to {}", path.display());
    Ok(())
}

/// Now as `%Y%m%d-%H%M%S` in UTC (vLLM's `date` key and file names).
fn date_string() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    date_string_at(secs)
}

fn date_string_at(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(date_string_at(0), "19700101-000000");
        assert_eq!(date_string_at(951_782_400), "20000229-000000");
        assert_eq!(date_string_at(1_700_000_000), "20231114-221320");
        assert_eq!(date_string_at(4_107_542_399), "21000228-235959");
    }
}
