//! `ferrite batch`: OpenAI Batch API lines in, result lines out, through the engine with
//! continuous batching.
//!
//! Every request goes through the same axum router `ferrite serve` uses (in-process, no socket),
//! so validation, defaults, errors and response bodies are the server's, byte for byte. Lines
//! are written (one `write` each, no user-space buffer) as their requests finish, so a crash
//! loses only what was in flight; a re-run with the same output file skips every request already
//! answered there.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use axum::Router;
use clap::Args;
use ferrite_server::app_with_body_limit;
use futures::StreamExt;
use http_body_util::BodyExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::engine_args::{EngineArgs, Running};
use crate::limits::LimitArgs;

/// The endpoints a batch line may name.
const URLS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// OpenAI Batch API input: one `{"custom_id", "method", "url", "body"}` object per line.
    #[arg(long)]
    input: PathBuf,
    /// Result lines are appended here; requests already answered in it are skipped (resume).
    #[arg(long)]
    output: PathBuf,
    /// The model name bodies must give (default: as for `serve`, the entry name or --model).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests in flight at once (default: twice --max-num-seqs, so the scheduler never
    /// starves between two finishing requests).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Stop sending new lines once the batch has spent this many dollars (the `cost_usd` of
    /// every answer in --output, earlier runs' included): lines in flight finish and are
    /// written; a later run with a larger cap resumes. Needs a device price.
    #[arg(long, value_name = "USD")]
    max_total_cost_usd: Option<f64>,
}

/// What an input line is, decided before anything runs.
enum Line {
    /// A request to send: custom_id, url, body.
    Request { custom_id: String, url: String, body: Value },
    /// A line that cannot be a request; it gets an error line of its own.
    Invalid { custom_id: Option<String>, code: &'static str, message: String },
}

/// Reads one input line. `number` is 1-based, for messages.
fn classify(text: &InputText, number: usize) -> Line {
    let invalid = |custom_id: Option<String>, code, message: String| Line::Invalid {
        custom_id,
        code,
        message: format!("input line {number}: {message}"),
    };
    let text = match text {
        Ok(t) => t,
        Err(why) => return invalid(None, "invalid_json", why.clone()),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return invalid(None, "invalid_json", format!("not valid JSON: {e}")),
    };
    let Some(obj) = value.as_object() else {
        return invalid(None, "invalid_request", "a line must be a JSON object".into());
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return invalid(None, "missing_custom_id", "`custom_id` is empty".into()),
        Some(_) => return invalid(None, "missing_custom_id", "`custom_id` must be a string".into()),
        None => return invalid(None, "missing_custom_id", "`custom_id` is missing".into()),
    };
    let id = Some(custom_id.clone());
    match obj.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        Some(m) => return invalid(id, "invalid_method", format!("`method` must be \"POST\", got {m:?}")),
        None => return invalid(id, "invalid_method", "`method` must be \"POST\"".into()),
    }
    let url = match obj.get("url").and_then(Value::as_str) {
        Some(u) if URLS.contains(&u) => u.to_string(),
        other => {
            let got = other.map(|u| format!("{u:?}")).unwrap_or_else(|| "nothing".into());
            return invalid(id, "invalid_url", format!("`url` must be one of {URLS:?}, got {got}"));
        }
    };
    let body = match obj.get("body") {
        Some(b @ Value::Object(_)) => b.clone(),
        _ => return invalid(id, "invalid_body", "`body` must be a JSON object".into()),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return invalid(id, "invalid_body", "`stream: true` is not supported in a batch".into());
    }
    Line::Request { custom_id, url, body }
}

/// The custom_id of a line that has one, read exactly as [`classify`] reads it (the duplicate
/// check and resuming must agree with it on every line, odd ones included).
fn custom_id_of(text: &InputText) -> Option<String> {
    let value: Value = serde_json::from_str(text.as_ref().ok()?).ok()?;
    match value.as_object()?.get("custom_id")? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A line's text, or why it is not text.
type InputText = std::result::Result<String, String>;

/// Input lines that are not blank: (1-based line number, text). A line that is not UTF-8 is
/// yielded too (as an error), so it gets an error line of its own instead of stopping the batch.
fn input_lines(path: &Path) -> Result<impl Iterator<Item = Result<(usize, InputText)>>> {
    let file = File::open(path).with_context(|| format!("opening --input {}", path.display()))?;
    let path = path.display().to_string();
    Ok(BufReader::new(file).split(b'\n').enumerate().filter_map(move |(i, line)| match line {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => None,
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| format!("not valid UTF-8 ({e})"));
            Some(Ok((i + 1, text.map(|t| t.trim_end_matches('\r').to_string()))))
        }
        Err(e) => Some(Err(anyhow::Error::new(e).context(format!("reading {path} line {}", i + 1)))),
    }))
}

/// Refuses an input with a custom_id on two lines, naming them; returns the number of lines.
fn check_duplicates(path: &Path) -> Result<usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut duplicates = Vec::new();
    let mut count = 0;
    for line in input_lines(path)? {
        let (number, text) = line?;
        count += 1;
        if let Some(id) = custom_id_of(&text) {
            if let Some(&first) = seen.get(&id) {
                duplicates.push(format!("{id:?} on lines {first} and {number}"));
            } else {
                seen.insert(id, number);
            }
        }
    }
    if !duplicates.is_empty() {
        let shown = duplicates.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        let more = duplicates.len().saturating_sub(5);
        let more = if more > 0 { format!(" (and {more} more)") } else { String::new() };
        bail!("duplicate custom_id in {}: {shown}{more}; nothing was run", path.display());
    }
    Ok(count)
}

/// What an earlier run already wrote to the output file.
#[derive(Debug, Default)]
pub struct Done {
    pub custom_ids: HashSet<String>,
    /// Input lines without a usable custom_id, answered by line number.
    pub lines: HashSet<usize>,
    /// What the answers written cost, summed (`usage.cost_usd`).
    pub cost_usd: f64,
}

/// Reads the answered requests from `path` (if it exists) and cuts off a last line that a crash
/// left half-written, so appending continues on a line boundary. An existing `path` must be a
/// regular file: a device (`/dev/zero`) or a FIFO would be read forever.
pub fn resume_from(path: &Path) -> Result<Done> {
    let mut done = Done::default();
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => bail!(
            "--output {} must be a regular file (it is read to resume, then appended to)",
            path.display()
        ),
        _ => {}
    }
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("opening --output {}", path.display())),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text).with_context(|| format!("reading --output {}", path.display()))?;
    let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    for (i, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: Value = serde_json::from_slice(line).with_context(|| {
            format!("--output {} line {} is not JSON; is it another file?", path.display(), i + 1)
        })?;
        done.cost_usd += value["response"]["body"]["usage"]["cost_usd"].as_f64().unwrap_or(0.0);
        match (value.get("custom_id"), value.get("line").and_then(Value::as_u64)) {
            (Some(Value::String(id)), _) => {
                done.custom_ids.insert(id.clone());
            }
            (_, Some(n)) => {
                done.lines.insert(n as usize);
            }
            _ => bail!(
                "--output {} line {} has neither a custom_id nor a line number; is it another file?",
                path.display(),
                i + 1
            ),
        }
    }
    // Only now that every whole line is known to be ours: cut a tail a crash left half-written.
    if complete < text.len() {
        tracing::warn!(
            bytes = text.len() - complete,
            "--output ends in a half-written line (an interrupted run); dropping it, its request runs again"
        );
        file.set_len(complete as u64)?;
        file.seek(SeekFrom::End(0))?;
    }
    Ok(done)
}

/// A unique id for an output line or a request.
fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}_{nanos:x}{:06x}", NEXT.fetch_add(1, Ordering::Relaxed) & 0xff_ffff)
}

/// One finished line: the JSON to write and what it counts for in the summary.
struct Outcome {
    /// The engine failed (5xx) or the request could not be run: not an answer to write, since a
    /// re-run may well succeed. The batch stops.
    fatal: Option<String>,
    json: Value,
    custom_id: Option<String>,
    ok: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
}

fn error_line(number: usize, custom_id: Option<String>, code: &str, message: String) -> Outcome {
    let mut json = json!({
        "id": unique_id("batch_req"),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    });
    if custom_id.is_none() {
        // Without a custom_id, the line number is what a re-run recognizes it by.
        json["line"] = json!(number);
    }
    Outcome { fatal: None, json, custom_id, ok: false, prompt_tokens: 0, completion_tokens: 0, cost_usd: 0.0 }
}

/// How long one request keeps retrying a full engine queue (429) before its 429 is the answer
/// (a request with more prompts than the queue holds can never fit).
const QUEUE_FULL_PATIENCE: Duration = Duration::from_secs(60);

/// Sends one request through the router; a full engine queue (429) is retried, since a batch
/// has nobody else to hand the back-pressure to. A deadline the engine cannot meet (also a
/// 429) is the line's answer: the line asked for it.
async fn send(router: &Router, url: &str, body: &Value) -> Result<(StatusCode, Value)> {
    let bytes = serde_json::to_vec(body)?;
    let first_try = Instant::now();
    loop {
        let request = HttpRequest::post(url)
            .header("content-type", "application/json")
            .body(Body::from(bytes.clone()))?;
        let response = router.clone().oneshot(request).await?;
        let status = response.status();
        let raw = response.into_body().collect().await?.to_bytes();
        let value: Value =
            serde_json::from_slice(&raw).unwrap_or_else(|_| json!(String::from_utf8_lossy(&raw)));
        let queue_full =
            status == StatusCode::TOO_MANY_REQUESTS && value["error"]["code"] != "deadline_infeasible";
        if queue_full && first_try.elapsed() < QUEUE_FULL_PATIENCE {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        return Ok((status, value));
    }
}

async fn run_line(router: Router, number: usize, text: InputText) -> Outcome {
    match classify(&text, number) {
        Line::Invalid { custom_id, code, message } => error_line(number, custom_id, code, message),
        Line::Request { custom_id, url, body } => match send(&router, &url, &body).await {
            Ok((status, body)) if status.is_server_error() => {
                let why =
                    body["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| body.to_string());
                let mut o = error_line(number, Some(custom_id), "server_error", why.clone());
                o.fatal = Some(format!("input line {number}: {} {why}", status.as_u16()));
                o
            }
            Ok((status, body)) => {
                let usage = |key: &str| body["usage"][key].as_u64().unwrap_or(0);
                let (prompt_tokens, completion_tokens) = (usage("prompt_tokens"), usage("completion_tokens"));
                let cost_usd = body["usage"]["cost_usd"].as_f64().unwrap_or(0.0);
                let request_id = body["id"].as_str().map(str::to_string).unwrap_or_else(|| unique_id("req"));
                let json = json!({
                    "id": unique_id("batch_req"),
                    "custom_id": custom_id,
                    "response": {"status_code": status.as_u16(), "request_id": request_id, "body": body},
                    "error": null,
                });
                Outcome {
                    fatal: None,
                    json,
                    custom_id: Some(custom_id),
                    ok: status.is_success(),
                    prompt_tokens,
                    completion_tokens,
                    cost_usd,
                }
            }
            Err(e) => {
                let mut o = error_line(number, Some(custom_id), "internal_error", format!("{e:#}"));
                o.fatal = Some(format!("input line {number}: {e:#}"));
                o
            }
        },
    }
}

#[derive(Default)]
struct Summary {
    ok: usize,
    failed: usize,
    prompt_tokens: u64,
    completion_tokens: u64,
}

pub fn run(args: BatchArgs) -> Result<()> {
    let meta = std::fs::metadata(&args.input).with_context(|| format!("--input {}", args.input.display()))?;
    if !meta.is_file() {
        bail!(
            "--input {} must be a regular file (it is read more than once: checks, then the run)",
            args.input.display()
        );
    }
    if let (Ok(a), Ok(b)) = (args.input.canonicalize(), args.output.canonicalize()) {
        if a == b {
            bail!("--input and --output are the same file ({})", a.display());
        }
    }
    let total_lines = check_duplicates(&args.input)?;
    let done = resume_from(&args.output)?;
    let mut output = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("opening --output {}", args.output.display()))?;

    let concurrency = args.max_concurrency.unwrap_or(2 * args.engine.max_num_seqs).max(1);
    // Multi-prompt completions put several engine requests in the queue per line.
    let running = args.engine.start((4 * concurrency).max(1024), args.served_model_name.as_deref())?;
    let router = app_with_body_limit(running.app_state(args.limits.request_limits()?), usize::MAX);
    let Running { engine, thread, device_cost_per_hour, .. } = running;
    let cap = args.max_total_cost_usd;
    if let Some(c) = cap {
        if !(c.is_finite() && c > 0.0) {
            bail!("--max-total-cost-usd must be a positive number of dollars, got {c}");
        }
        if device_cost_per_hour <= 0.0 {
            bail!("--max-total-cost-usd needs a device price: give --device-cost-per-hour (or a models.toml price)");
        }
    }
    // Spend so far, earlier runs' included; past the cap, no new line is sent.
    let mut spent = done.cost_usd;
    let capped = Arc::new(AtomicBool::new(cap.is_some_and(|c| spent >= c)));

    // What this run has to do: every line not answered in the output yet.
    let skip = |number: usize, text: &InputText| match custom_id_of(text) {
        Some(id) => done.custom_ids.contains(&id),
        None => done.lines.contains(&number),
    };
    let mut todo_count = 0;
    for line in input_lines(&args.input)? {
        let (number, text) = line?;
        todo_count += usize::from(!skip(number, &text));
    }
    let skipped = total_lines.saturating_sub(todo_count);
    if skipped > 0 {
        eprintln!("resuming: {skipped} of {total_lines} requests are already in {}", args.output.display());
    }

    let progress = ProgressBar::new(todo_count as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} requests · {msg} · {elapsed_precise} (ETA {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut summary = Summary::default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut fatal = None;
    let interrupted = runtime.block_on(async {
        let stop = capped.clone();
        let lines = input_lines(&args.input)?
            .filter(|l| match l {
                Ok((number, text)) => !skip(*number, text),
                Err(_) => true,
            })
            .take_while(move |_| !stop.load(Ordering::Acquire));
        let mut results = futures::stream::iter(lines)
            .map(|line| {
                let router = router.clone();
                async move {
                    let (number, text) = line?;
                    anyhow::Ok(run_line(router, number, text).await)
                }
            })
            .buffer_unordered(concurrency);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let outcome = tokio::select! {
                next = results.next() => match next {
                    Some(outcome) => outcome?,
                    None => return anyhow::Ok(false),
                },
                _ = &mut ctrl_c => return Ok(true),
            };
            if let Some(why) = outcome.fatal {
                // In-flight requests are dropped (aborted) with the stream; none is written.
                fatal = Some(why);
                return Ok(false);
            }
            let mut line = serde_json::to_vec(&outcome.json)?;
            line.push(b'\n');
            output.write_all(&line).with_context(|| format!("writing {}", args.output.display()))?;
            if outcome.ok {
                summary.ok += 1;
            } else {
                summary.failed += 1;
            }
            summary.prompt_tokens += outcome.prompt_tokens;
            summary.completion_tokens += outcome.completion_tokens;
            spent += outcome.cost_usd;
            if cap.is_some_and(|c| spent >= c) {
                capped.store(true, Ordering::Release);
            }
            let written = summary.ok + summary.failed;
            tracing::debug!(custom_id = ?outcome.custom_id, written, total = todo_count, "wrote");
            progress.inc(1);
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            progress.set_message(format!("{:.0} generated tok/s", summary.completion_tokens as f64 / secs));
        }
    })?;
    progress.finish_and_clear();
    let wall = started.elapsed();
    output.flush()?;
    let written = summary.ok + summary.failed;
    let gen_rate = summary.completion_tokens as f64 / wall.as_secs_f64().max(1e-9);
    let cost = if device_cost_per_hour > 0.0 {
        format!(", cost ${:.6}", wall.as_secs_f64() * device_cost_per_hour / 3600.0)
    } else {
        String::new()
    };
    eprintln!(
        "{} ok, {} failed{} · {} prompt + {} generated tokens · {:.1}s · {gen_rate:.1} generated tok/s{cost}",
        summary.ok,
        summary.failed,
        if skipped > 0 { format!(", {skipped} skipped (already done)") } else { String::new() },
        summary.prompt_tokens,
        summary.completion_tokens,
        wall.as_secs_f64(),
    );
    if let Some(why) = fatal {
        bail!(
            "stopped: the engine failed ({why}); {written} of {todo_count} requests were written, the rest were \
             not; run the same command again to resume"
        );
    }
    if let Some(c) = cap.filter(|_| capped.load(Ordering::Acquire) && written < todo_count) {
        engine.shutdown();
        drop(router);
        let _ = thread.join();
        bail!(
            "stopped at --max-total-cost-usd {c}: the batch has spent ${spent:.6}; {written} of {todo_count} \
             requests were written, the rest were not sent; run again with a larger cap to resume"
        );
    }
    if interrupted {
        eprintln!(
            "interrupted: {} of {todo_count} requests written, the rest were not; run the same command again to resume",
            written
        );
        // In-flight requests were dropped with the stream (aborted); don't wait for a drain.
        std::process::exit(130);
    }
    engine.shutdown();
    drop(router);
    let _ = thread.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device or a FIFO as --output would be read forever while resuming (`/dev/zero` never
    /// ends); each is refused at once, naming the flag.
    #[test]
    fn resuming_refuses_an_output_that_is_not_a_regular_file() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        for path in [Path::new("/dev/zero"), Path::new("/dev/full"), fifo.as_path(), tmp.path()] {
            let err = resume_from(path).unwrap_err().to_string();
            assert!(err.contains("--output") && err.contains("regular file"), "{}: {err}", path.display());
        }
        let file = tmp.path().join("out.jsonl");
        assert!(resume_from(&file).unwrap().lines.is_empty(), "a missing file is a fresh start");
        std::fs::write(&file, "{\"line\": 3}\n").unwrap();
        assert!(resume_from(&file).unwrap().lines.contains(&3));
    }

    #[test]
    fn classify_names_what_is_wrong() {
        let cases = [
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_request"),
            (r#"{"method": "POST"}"#, "missing_custom_id"),
            (r#"{"custom_id": 7}"#, "missing_custom_id"),
            (
                r#"{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}"#,
                "invalid_method",
            ),
            (r#"{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}"#, "invalid_url"),
            (r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": 3}"#, "invalid_body"),
            (
                r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"stream": true}}"#,
                "invalid_body",
            ),
        ];
        for (text, want) in cases {
            match classify(&Ok(text.to_string()), 9) {
                Line::Invalid { code, message, .. } => {
                    assert_eq!(code, want, "{text}");
                    assert!(message.starts_with("input line 9: "), "{message}");
                }
                Line::Request { .. } => panic!("{text} was accepted"),
            }
        }
        let ok =
            r#"{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}"#;
        assert!(matches!(classify(&Ok(ok.into()), 1), Line::Request { custom_id, .. } if custom_id == "a"));
        let not_text = classify(&Err("not valid UTF-8".into()), 4);
        assert!(matches!(not_text, Line::Invalid { code: "invalid_json", custom_id: None, .. }));
        // The duplicate check and resuming read custom_ids exactly as classify does.
        for odd in [r#"["abc"]"#, r#"{"custom_id": "a", "custom_id": "b", "method": "POST"}"#, "{bad"] {
            let by_classify = match classify(&Ok(odd.into()), 1) {
                Line::Invalid { custom_id, .. } => custom_id,
                Line::Request { custom_id, .. } => Some(custom_id),
            };
            assert_eq!(custom_id_of(&Ok(odd.into())), by_classify, "{odd}");
        }
    }

    #[test]
    fn duplicates_are_refused_with_their_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        std::fs::write(
            &path,
            "{\"custom_id\": \"x\"}\n\n{\"custom_id\": \"y\"}\n{bad\n{\"custom_id\": \"x\"}\n",
        )
        .unwrap();
        let err = check_duplicates(&path).unwrap_err().to_string();
        assert!(err.contains("\"x\" on lines 1 and 5"), "{err}");
        let mut bytes = b"{\"custom_id\": \"x\"}\n\n{bad\n{\"custom_id\": \"y\"}\n".to_vec();
        bytes.extend_from_slice(b"{\"custom_id\": \"\xff\"}\n");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(check_duplicates(&path).unwrap(), 4, "a line that is not UTF-8 is a line, not a stop");
    }

    #[test]
    fn resume_reads_answered_ids_and_cuts_a_half_written_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        assert!(resume_from(&path).unwrap().custom_ids.is_empty());
        let whole = "{\"custom_id\": \"a\"}\n{\"custom_id\": null, \"line\": 4}\n";
        std::fs::write(&path, format!("{whole}{{\"custom_id\": \"b\", \"resp")).unwrap();
        let done = resume_from(&path).unwrap();
        assert_eq!(done.custom_ids, HashSet::from(["a".to_string()]));
        assert_eq!(done.lines, HashSet::from([4]));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);

        std::fs::write(&path, "hello\n").unwrap();
        let err = format!("{:#}", resume_from(&path).unwrap_err());
        assert!(err.contains("line 1 is not JSON"), "{err}");
    }
}
