//! One `bench serve` request: sent, and measured as `vllm bench serve` measures it (TTFT, ITL
//! and latency of a streamed answer; the latency of an embedding).

use std::time::Instant;

use futures::StreamExt;
use serde_json::Value;

use super::serve::Backend;

/// What one request measured.
#[derive(Debug, Default, Clone)]
pub(super) struct Output {
    pub(super) success: bool,
    pub(super) error: String,
    /// Seconds from sending to the first chunk with choices.
    pub(super) ttft: f64,
    /// Gaps between later chunks with choices.
    pub(super) itl: Vec<f64>,
    /// Seconds from sending to the last chunk with choices.
    pub(super) latency: f64,
    pub(super) prompt_len: usize,
    pub(super) output_tokens: usize,
    pub(super) generated_text: String,
    /// Seconds from the benchmark's start to sending.
    pub(super) start: f64,
    /// Refused because its deadline could not be met (ferrite's 429 `deadline_infeasible`).
    pub(super) rejected: bool,
    /// The last choice's `stop_reason`, where it had one (vLLM's and ferrite's extra).
    pub(super) stop_reason: Option<String>,
    /// The server's prediction of the TTFT, seconds (ferrite's `x-ferrite-ttft-estimate-ms`).
    pub(super) ttft_estimate: Option<f64>,
}

/// Sends one request and measures it: a stream of chunks, or an embedding (one answer).
pub(super) async fn send(
    backend: Backend,
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    t0: Instant,
    key: Option<&str>,
) -> Output {
    let st = Instant::now();
    let mut out = Output { start: st.duration_since(t0).as_secs_f64(), ..Output::default() };
    match post(client, url, body, key).await {
        Err((status, e)) => {
            out.rejected = status == Some(429) && e.contains("deadline_infeasible");
            out.error = e;
        }
        Ok(r) if backend == Backend::OpenaiEmbeddings => read_embedding(r, st, &mut out).await,
        Ok(r) => read_stream(r, st, &mut out).await,
    }
    out
}

/// Reads a streamed answer, timing its chunks as vLLM does.
async fn read_stream(response: reqwest::Response, st: Instant, out: &mut Output) {
    out.ttft_estimate = response
        .headers()
        .get("x-ferrite-ttft-estimate-ms")
        .and_then(|v| v.to_str().ok()?.parse::<f64>().ok())
        .map(|ms| ms / 1e3);
    let mut stream = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                out.error = format!("reading the stream: {e}");
                return;
            }
        };
        // Servers end lines with \n or \r\n; SSE data never holds a raw \r.
        buffer.extend(chunk.iter().filter(|&&b| b != b'\r'));
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let now = Instant::now();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim_start) else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
                if let Some(choices) = v["choices"].as_array().filter(|c| !c.is_empty()) {
                    match last {
                        None => out.ttft = now.duration_since(st).as_secs_f64(),
                        Some(prev) => out.itl.push(now.duration_since(prev).as_secs_f64()),
                    }
                    last = Some(now);
                    let c = &choices[0];
                    let text = c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or("");
                    out.generated_text.push_str(text);
                    if let Some(stop) = c["stop_reason"].as_str() {
                        out.stop_reason = Some(stop.to_string());
                    }
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    out.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                    out.prompt_len = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                }
            }
        }
        if buffer.len() > 1 << 20 {
            out.error = "an SSE event over 1 MiB without a blank line: not an event stream?".into();
            return;
        }
    }
    match last {
        Some(l) => {
            out.latency = l.duration_since(st).as_secs_f64();
            out.success = true;
        }
        None => out.error = "Never received a valid chunk to calculate TTFT.".into(),
    }
}

/// POSTs `body`; a failure to connect, or a status other than success (given) with its body,
/// is the error.
async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    key: Option<&str>,
) -> std::result::Result<reqwest::Response, (Option<u16>, String)> {
    let mut request = client.post(url).json(body);
    if let Some(k) = key {
        request = request.bearer_auth(k);
    }
    let response = request.send().await.map_err(|e| (None, format!("{e}")))?;
    let status = response.status();
    if !status.is_success() {
        return Err((
            Some(status.as_u16()),
            format!("{status}: {}", response.text().await.unwrap_or_default()),
        ));
    }
    Ok(response)
}

/// Reads an embedding answer: its latency is also its time to the (only) answer, as vLLM
/// counts a pooling request.
async fn read_embedding(response: reqwest::Response, st: Instant, out: &mut Output) {
    let text = response.text().await.unwrap_or_default();
    let answer: Value = serde_json::from_str(&text).unwrap_or_default();
    if !answer["data"][0]["embedding"].is_array() {
        out.error = format!("no embedding in the answer: {}", text.chars().take(200).collect::<String>());
        return;
    }
    out.prompt_len = answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
    out.latency = st.elapsed().as_secs_f64();
    out.ttft = out.latency;
    out.success = true;
}
