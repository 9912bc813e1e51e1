//! Shared by the process tests: a `ferrite serve` on a free port.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// `ferrite serve` on the qwen3 fixture (served as "tiny") on a free port, with `extra` flags:
/// the child and its `host:port`. Its stderr is drained from then on, so the server never
/// writes into a closed pipe. The caller waits for the child.
pub fn start_server(extra: &[&str]) -> (Child, String) {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3");
    #[allow(clippy::zombie_processes)] // the caller waits for it
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--served-model-name", "tiny"])
        .args(extra)
        .env("FERRITE_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "server exited before announcing its address");
        if let Some(rest) = line.trim().split("http://").nth(1) {
            std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
            return (child, rest.to_string());
        }
    }
}
