//! `ferrite serve` as a process on a real socket: it announces its address, answers a chat
//! completion over HTTP, and exits 0 on SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(addr, method, path, "", body)
}

/// [`http`] with `extra` header lines (each ending in `\r\n`).
fn http_with(addr: &str, method: &str, path: &str, extra: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn serves_over_http_and_stops_cleanly_on_sigterm() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--served-model-name", "tiny"])
        .args(["--kv-cache-blocks", "64", "--metrics-port", "0", "--log-format", "json"])
        .env("FERRITE_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let (mut addr, mut metrics_addr) = (None, None);
    while addr.is_none() || metrics_addr.is_none() {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "server exited before announcing its addresses");
        if line.starts_with('{') {
            let v: serde_json::Value =
                serde_json::from_str(&line).expect("--log-format json writes JSON lines");
            assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        } else if let Some(rest) = line.trim().strip_prefix("ferrite metrics on http://") {
            metrics_addr = Some(rest.trim_end_matches("/metrics").to_string());
        } else if let Some(rest) = line.trim().split("http://").nth(1) {
            addr = Some(rest.to_string());
        }
    }
    let (addr, metrics_addr) = (addr.unwrap(), metrics_addr.unwrap());
    let (status, _) = http(&addr, "GET", "/health", "");
    assert_eq!(status, 200);
    let body = r#"{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}"#;
    let (status, resp) = http(&addr, "POST", "/v1/chat/completions", body);
    assert_eq!(status, 200, "{resp}");
    assert!(resp.contains("\"chat.completion\""), "{resp}");
    // One JSON access line for it, with the tokens and the cost.
    let access = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "server exited before logging the request");
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if v["fields"]["message"] == "access" && v["span"]["route"] == "/v1/chat/completions" {
            break v;
        }
    };
    assert_eq!(access["fields"]["status"], 200, "{access}");
    let usage: serde_json::Value = serde_json::from_str(&resp).unwrap();
    let generated = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(access["fields"]["completion_tokens"], generated, "{access}");
    assert!(access["fields"]["cost_usd"].is_number(), "{access}");
    assert!(access["span"]["id"].as_str().is_some_and(|id| !id.is_empty()), "{access}");
    let (status, metrics) = http(&metrics_addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    let line = format!("ferrite:generation_tokens_total{{model_name=\"tiny\"}} {generated}\n");
    assert!(metrics.contains(&line), "{metrics}");
    for phase in ["load_weights", "allocate_kv_cache", "warm_up"] {
        let series = format!("ferrite:startup_phase_seconds{{model_name=\"tiny\",phase=\"{phase}\"}} ");
        assert!(metrics.contains(&series), "no {phase} phase in {metrics}");
    }
    // Where the steps' time went: every phase is reported, and the forward pass took time.
    for phase in ["schedule", "inputs", "forward", "device", "sample", "emit"] {
        let series =
            format!("ferrite:engine_step_phase_seconds_total{{model_name=\"tiny\",phase=\"{phase}\"}} ");
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {phase} step phase"));
        let seconds: f64 = value.parse().unwrap_or_else(|e| panic!("{phase}: {value:?}: {e}"));
        assert!(seconds >= 0.0 && (phase != "forward" || seconds > 0.0), "{phase}: {seconds} s");
    }

    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

/// Reads until the server closes the connection; the socket timeout only bounds a broken run.
fn read_until_closed(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("the server closes the connection (no read timeout hit)");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn slow_clients_are_cut_off_and_pipelined_requests_are_answered_in_order() {
    let mut server = common::Served::start(
        &["--kv-cache-blocks", "64", "--header-read-timeout-secs", "0.5", "--body-read-timeout-secs", "0.5"],
        None,
    );
    let addr = server.addr.clone();

    // Half a request head, then silence: the server closes the connection.
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\n").unwrap();
    read_until_closed(&mut s);

    // A whole head but half the body it announced: 408 in OpenAI's shape.
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\""
    )
    .unwrap();
    let resp = read_until_closed(&mut s);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("\"error\"") && resp.contains("did not arrive"), "{resp}");

    // Keep-alive and pipelining: three requests in one write, three answers in order.
    let mut s = TcpStream::connect(&addr).unwrap();
    let body = r#"{"model": "tiny", "prompt": "Hi", "max_tokens": 2}"#;
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n\
         POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}\
         GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let resp = read_until_closed(&mut s);
    let statuses: Vec<&str> = resp.match_indices("HTTP/1.1 ").map(|(i, _)| &resp[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["200", "200", "200"], "{resp}");
    let completion = resp.find("text_completion").expect("the completion came second");
    assert!(resp.find("\"object\":\"list\"").is_some_and(|models| models > completion), "{resp}");
    assert!(server.terminate().success());
}

/// Out of file descriptors (`ulimit -n 48`, 60 idle connections): the accept loop backs off
/// instead of spinning, warns a few times instead of millions, and serves again once
/// connections close.
#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let mut server = common::Served::start(&["--kv-cache-blocks", "16"], Some(48));
    let addr = server.addr.clone();
    let idle: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let during = server.stderr_lines("accepting").len();
    assert!((1..=3).contains(&during), "{during} accept warnings in 2 s (a spinning loop logs thousands)");
    drop(idle);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(s, "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    let answered = s.read_to_string(&mut resp);
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "no answer after the connections closed: {answered:?} {resp:?}"
    );
    assert!(server.terminate().success());
}

/// A stream still running when the shutdown grace ends is not just cut: it gets an error event
/// and `[DONE]`, and the operator is told how many were cut. One sequence at a time and twelve
/// long requests keep the engine busy well past a 1 s grace.
#[test]
fn streams_cut_at_the_end_of_the_shutdown_grace_get_an_error_event() {
    let mut server = common::Served::start(&["--max-num-seqs", "1", "--shutdown-grace-secs", "1"], None);
    let addr = server.addr.clone();
    let body =
        r#"{"model": "tiny", "prompt": "Once", "max_tokens": 1000, "ignore_eos": true, "stream": true}"#;
    let mut streams: Vec<TcpStream> = (0..12)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            write!(
                s,
                "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            s
        })
        .collect();
    // The first stream has started: its first chunk is here.
    let mut first = [0u8; 512];
    streams[0].set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    assert!(streams[0].read(&mut first).unwrap() > 0);
    // All twelve reached the engine (none is still on its way in: one that arrives after
    // SIGTERM is rightly refused with a 503): waiting + running + finished = 12.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, metrics) = http(&addr, "GET", "/metrics", "");
        let sum = |name: &str| -> f64 {
            let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            metrics.lines().filter(|l| l.starts_with(name)).map(value).sum()
        };
        let seen = sum("ferrite:num_requests_waiting{")
            + sum("ferrite:num_requests_running{")
            + sum("ferrite:request_success_total{");
        if seen >= 12.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {seen} of 12 requests reached the engine: {}",
            &metrics[..metrics.len().min(600)]
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ok = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let mut cut = 0;
    for s in &mut streams {
        let text = read_until_closed(s);
        let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(events.last(), Some(&"[DONE]"), "every stream ends with [DONE]: {text}");
        let before_done = events[events.len() - 2];
        if before_done.contains("\"error\"") {
            assert!(before_done.contains("shutdown grace is 1 s"), "{before_done}");
            cut += 1;
        }
    }
    assert!(cut >= 1, "twelve 1000-token requests one at a time outlast a 1 s grace");
    assert!(server.wait().success());
    let said = server.stderr_lines("shutdown grace over");
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains(&format!("cut {cut} unfinished request")), "{said:?} vs {cut} cut streams");
}

/// The limit flags reach the server: `--max-connections` (one more connection is answered 503
/// naming the limit, and served again once one closes), `--max-n` and `--max-logprobs`.
#[test]
fn limit_flags_bound_connections_and_request_fields() {
    let server =
        common::Served::start(&["--max-connections", "2", "--max-n", "1", "--max-logprobs", "3"], None);
    let addr = server.addr.clone();
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    // The two held connections have their permits once the server has accepted them.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, body) = http(&addr, "GET", "/health", "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--max-connections") && body.contains("2 connections"), "{body}");
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, _) = http(&addr, "GET", "/health", "");
    assert_eq!(status, 200);

    let completion = |extra: &str| {
        let body = format!(r#"{{"model": "tiny", "prompt": "hi", "max_tokens": 2{extra}}}"#);
        http(&addr, "POST", "/v1/completions", &body)
    };
    let (status, body) = completion(r#", "n": 2"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("between 1 and 1, got 2"), "{body}");
    let (status, body) = completion(r#", "logprobs": 4"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at most 3, got 4"), "{body}");
    let (status, body) = completion(r#", "logprobs": 3"#);
    assert_eq!(status, 200, "{body}");
}

/// `--tool-call-parser` reaches the server: the qwen3 fixture's template shows no call format,
/// so `auto` is refused without the flag and read as Hermes with it.
#[test]
fn the_tool_call_parser_flag_enables_auto() {
    let body = r#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "tools": [{"type": "function", "function": {"name": "f"}}]}"#;
    let mut plain = common::Served::start(&[], None);
    let (status, answer) = http(&plain.addr, "POST", "/v1/chat/completions", body);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("--tool-call-parser"), "{answer}");
    assert!(plain.terminate().success());
    let mut hermes = common::Served::start(&["--tool-call-parser", "hermes"], None);
    let (status, answer) = http(&hermes.addr, "POST", "/v1/chat/completions", body);
    assert_eq!(status, 200, "{answer}");
    assert!(hermes.terminate().success());
}

/// `serve` is interactive: a 250 ms inter-token latency target unless told otherwise, and the
/// load's log says so, and which CPU kernels run.
#[test]
fn serve_sets_a_latency_target_unless_told_and_logs_its_kernels() {
    for (extra, want) in
        [(&[][..], "max_itl_ms=Some(250.0)"), (&["--max-itl-ms", "0"][..], "max_itl_ms=None")]
    {
        let served = common::Served::start_with_env(extra, None, &[("FERRITE_LOG", "info")]);
        let ready = served.stderr_lines("engine ready");
        assert!(ready.len() == 1 && ready[0].contains(want), "{extra:?}: {ready:?}");
        assert_eq!(served.stderr_lines("CPU kernels: ").len(), 1, "{extra:?}");
    }
}

/// `--api-keys-file` adds keys (a request with one is served, one without is 401) and its
/// budgets are checked against the server at start: a priority under `fcfs` stops it.
#[test]
fn an_api_keys_file_adds_keys_and_is_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    std::fs::write(&file, "[[keys]]\nkey = \"sk-batch\"\npriority = 5\nmax_cost_usd = 0.5\n").unwrap();
    let file = file.to_str().unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--api-keys-file", file])
        .args(["--device-cost-per-hour", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("keys[0] sets a priority"), "{err}");

    let flags = ["--api-keys-file", file, "--scheduling-policy", "priority", "--device-cost-per-hour", "1"];
    let mut served = common::Served::start(&flags, None);
    let body = r#"{"model": "tiny", "prompt": "Once", "max_tokens": 2}"#;
    let (status, answer) = http(&served.addr, "POST", "/v1/completions", body);
    assert_eq!(status, 401, "{answer}");
    let key = "Authorization: Bearer sk-batch\r\n";
    let (status, answer) = http_with(&served.addr, "POST", "/v1/completions", key, body);
    assert_eq!(status, 200, "{answer}");
    assert!(served.terminate().success());
}

/// `--model NAME=MODEL` twice with `--max-loaded-models 1`: each request is answered by the
/// model it names (the first loaded at start, the second on demand in its place), `/v1/models`
/// lists both, and the pool's metrics say which is loaded.
#[test]
fn several_models_are_served_by_name_one_loaded_at_a_time() {
    let (llama, qwen3) = (common::fixture("llama"), common::fixture("qwen3"));
    let a = format!("a={}", llama.to_str().unwrap());
    let b = format!("b={}", qwen3.to_str().unwrap());
    let mut served =
        common::Served::launch(&["--model", &a, "--model", &b, "--max-loaded-models", "1"], None, &[]);
    let (status, list) = http(&served.addr, "GET", "/v1/models", "");
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let cards: Vec<(&str, bool)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m["loaded"].as_bool().unwrap()))
        .collect();
    assert_eq!(cards, [("a", true), ("b", false)]);
    let ask = |model: &str| {
        let body = format!(r#"{{"model": "{model}", "prompt": "Once", "max_tokens": 4, "temperature": 0}}"#);
        let (status, answer) = http(&served.addr, "POST", "/v1/completions", &body);
        assert_eq!(status, 200, "{answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["model"], model);
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let (first_a, first_b) = (ask("a"), ask("b"));
    assert_ne!(first_a, first_b, "the fixtures must differ for routing to show");
    // Back and forth: each reload answers as before.
    assert_eq!((ask("a"), ask("b")), (first_a, first_b));
    let (_, metrics) = http(&served.addr, "GET", "/metrics", "");
    assert!(metrics.contains("ferrite:model_loaded{model_name=\"a\"} 0"), "{metrics}");
    assert!(metrics.contains("ferrite:model_loaded{model_name=\"b\"} 1"), "{metrics}");
    assert!(metrics.contains("ferrite:model_loads_total{model_name=\"a\"} 2"), "{metrics}");
    assert!(served.terminate().success());

    // Names must tell models apart, and --served-model-name names one.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["serve", "--port", "0", "--model", &a, "--model", &a.replace("a=", "")])
        .args(["--served-model-name", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--served-model-name names one model"), "{err}");
}
