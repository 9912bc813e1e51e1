//! `ferrite batch` as a process: one output line per input line (errors included), duplicate
//! custom_ids refused up front, and a run killed with SIGKILL resumes without losing or
//! repeating a request, giving the same bodies as an uninterrupted run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const LINES: usize = 200;
/// What every tenth line's answer must be one of.
const CHOICES: [&str; 2] = ["red", "green blue"];

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3")
}

fn batch_command(input: &Path, output: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrite"));
    c.args(["batch", "--model", model().to_str().unwrap(), "--served-model-name", "tiny"])
        .args(["--kv-cache-blocks", "256", "--max-num-seqs", "4", "--max-concurrency", "4"])
        .args(["--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    c
}

/// 200 lines: chat and completions at temperature 0, with a malformed line, an unknown url and
/// an out-of-range temperature among them. Returns the text and the expected error per line.
fn input() -> (String, Vec<Option<&'static str>>) {
    let mut lines = Vec::new();
    let mut expected = Vec::new();
    for i in 0..LINES {
        let (line, error) = match i {
            17 => ("{\"custom_id\": \"r17\", \"method\": \"POST\",".to_string(), Some("invalid_json")),
            41 => (
                json!({"custom_id": "r41", "method": "POST", "url": "/v1/embeddings", "body": {"model": "tiny"}})
                    .to_string(),
                Some("invalid_url"),
            ),
            99 => (
                json!({"custom_id": "r99", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny", "prompt": "x", "temperature": 9}})
                .to_string(),
                Some("http_400"),
            ),
            _ if i % 2 == 0 => {
                let mut line = json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "tiny", "max_tokens": 12 + i % 5, "temperature": 0,
                                "messages": [{"role": "user", "content": format!("Tell me about {i}")}]}});
                if i % 10 == 0 {
                    // Structured output, as the server takes it.
                    line["body"]["guided_choice"] = json!(CHOICES);
                }
                if i % 10 == 4 {
                    // A forced tool call.
                    line["body"]["tools"] = json!([{"type": "function", "function": {"name": "pick",
                        "parameters": {"type": "object", "properties": {"n": {"enum": [1, 2]}},
                            "required": ["n"], "additionalProperties": false}}}]);
                    line["body"]["tool_choice"] = json!({"type": "function", "function": {"name": "pick"}});
                    line["body"]["max_tokens"] = json!(200);
                }
                (line.to_string(), None)
            }
            _ => (
                json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tiny", "prompt": format!("Once upon a time {i}"),
                                "max_tokens": 16, "temperature": 0}})
                .to_string(),
                None,
            ),
        };
        lines.push(line);
        expected.push(error);
    }
    (lines.join("\n") + "\n", expected)
}

fn read_output(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("output line {l:?}: {e}")))
        .collect()
}

/// custom_id (or `line:N` for a line without one) → the output line.
fn by_key(lines: Vec<Value>) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for l in lines {
        let key = match (&l["custom_id"], &l["line"]) {
            (Value::String(id), _) => id.clone(),
            (_, Value::Number(n)) => format!("line:{n}"),
            _ => panic!("output line without custom_id or line: {l}"),
        };
        assert!(map.insert(key.clone(), l).is_none(), "{key} written twice");
    }
    map
}

/// What must not differ between runs: the body without its id, timestamp, call ids, measured
/// device time (and cost) and prefix-cache hits (which depend on what ran before it).
fn stable_body(line: &Value) -> Value {
    let mut body = line["response"]["body"].clone();
    if let Some(obj) = body.as_object_mut() {
        obj.remove("id");
        obj.remove("created");
        if let Some(usage) = obj.get_mut("usage").and_then(Value::as_object_mut) {
            for measured in ["device_seconds", "cost_usd", "energy_joules", "prompt_tokens_details"] {
                usage.remove(measured);
            }
        }
        // Call ids are unique per answer.
        for choice in obj.get_mut("choices").and_then(Value::as_array_mut).into_iter().flatten() {
            for call in choice["message"]["tool_calls"].as_array_mut().into_iter().flatten() {
                call.as_object_mut().map(|c| c.remove("id"));
            }
        }
    }
    body
}

fn key_of_line(i: usize) -> String {
    // Line 18 (1-based) is the malformed one: it has no custom_id to go by.
    if i == 17 {
        "line:18".to_string()
    } else {
        format!("r{i}")
    }
}

#[test]
fn every_line_answered_once_and_a_killed_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (text, expected) = input();
    let input_path = dir.path().join("in.jsonl");
    std::fs::write(&input_path, text).unwrap();

    // Uninterrupted run.
    let full_path = dir.path().join("full.jsonl");
    let out = batch_command(&input_path, &full_path).env("FERRITE_LOG", "warn").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let full = by_key(read_output(&full_path));
    assert_eq!(full.len(), LINES);
    for (i, want) in expected.iter().enumerate() {
        let line = &full[&key_of_line(i)];
        match want {
            None => {
                assert_eq!(line["response"]["status_code"], 200, "{line}");
                assert!(line["error"].is_null());
                let body = &line["response"]["body"];
                let object = if i % 2 == 0 { "chat.completion" } else { "text_completion" };
                assert_eq!(body["object"], object, "{line}");
                assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
                if i % 10 == 0 {
                    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
                    assert!(CHOICES.contains(&content), "{line}");
                    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{line}");
                }
                if i % 10 == 4 {
                    let call = &body["choices"][0]["message"]["tool_calls"][0]["function"];
                    assert_eq!(call["name"], "pick", "{line}");
                    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
                    assert!(arguments["n"] == 1 || arguments["n"] == 2, "{line}");
                }
            }
            Some("http_400") => {
                assert_eq!(line["response"]["status_code"], 400, "{line}");
                assert_eq!(line["response"]["body"]["error"]["param"], "temperature", "{line}");
            }
            Some(code) => {
                assert!(line["response"].is_null(), "{line}");
                assert_eq!(line["error"]["code"], *code, "{line}");
                let message = line["error"]["message"].as_str().unwrap();
                assert!(message.starts_with(&format!("input line {}: ", i + 1)), "{message}");
            }
        }
    }

    // Killed partway (SIGKILL: no chance to clean up), then resumed.
    let part_path = dir.path().join("part.jsonl");
    let mut child = batch_command(&input_path, &part_path)
        .env("FERRITE_LOG", "warn,ferrite::batch=debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "batch exited before writing 50 lines");
        if line.contains(" written=50 ") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = read_output(&part_path).len();
    assert!((50..LINES).contains(&first), "the killed run wrote {first} lines");

    let out = batch_command(&input_path, &part_path).env("FERRITE_LOG", "warn").output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(&format!("resuming: {first} of {LINES} requests")), "{log}");
    let resumed = by_key(read_output(&part_path));
    assert_eq!(resumed.len(), LINES);
    for (key, line) in &full {
        let other = &resumed[key];
        assert_eq!(line["error"], other["error"].clone(), "{key}");
        assert_eq!(stable_body(line), stable_body(other), "{key}: differs after resuming");
    }
}

#[test]
fn duplicate_custom_ids_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let input_path = dir.path().join("in.jsonl");
    let line = |id: &str| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/completions",
               "body": {"model": "tiny", "prompt": "x", "max_tokens": 2}})
        .to_string()
    };
    std::fs::write(&input_path, [line("a"), line("b"), line("a")].join("\n")).unwrap();
    let output = dir.path().join("out.jsonl");
    let out = batch_command(&input_path, &output).env("FERRITE_LOG", "warn").output().unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("duplicate custom_id") && log.contains("\"a\" on lines 1 and 3"), "{log}");
    assert!(!output.exists(), "the output file was created although nothing ran");
}

/// `--max-total-cost-usd`: once the answers written have cost the cap, no new line is sent;
/// the lines in flight are written, the run fails saying so, and a run with a larger cap
/// resumes with the rest (every line answered once). Without a device price it is refused.
#[test]
fn a_total_cost_cap_stops_sending_and_a_larger_one_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let input_path = dir.path().join("in.jsonl");
    let lines: Vec<String> = (0..24)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": "tiny", "prompt": format!("Story {i}:"), "max_tokens": 6, "temperature": 0}})
            .to_string()
        })
        .collect();
    std::fs::write(&input_path, lines.join("\n")).unwrap();
    let output = dir.path().join("out.jsonl");
    let run = |cap: &str, price: bool| {
        let mut c = batch_command(&input_path, &output);
        if price {
            c.args(["--device-cost-per-hour", "3600"]);
        }
        c.args(["--max-total-cost-usd", cap]).env("FERRITE_LOG", "warn").output().unwrap()
    };
    let out = run("1", false);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && log.contains("needs a device price"), "{log}");

    // $1 a device-second: the first answer passes a cap of a nanodollar.
    let out = run("1e-9", true);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && log.contains("stopped at --max-total-cost-usd 0.000000001"), "{log}");
    let written = read_output(&output);
    // At most the lines in flight when the first answer came (--max-concurrency 4).
    assert!((1..=4).contains(&written.len()), "{} lines written", written.len());
    assert!(written.iter().all(|l| l["response"]["status_code"] == 200), "{written:?}");

    let out = run("1000000", true);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let all = by_key(read_output(&output));
    assert_eq!(all.len(), 24, "every line answered once after resuming");
}
