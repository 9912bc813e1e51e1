//! Shared by the process tests: a `ferrite serve` on a free port.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// A fixture model's folder.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// `ferrite serve` on the qwen3 fixture (served as "tiny") on a free port (`addr` is its
/// `host:port`). Its stderr is drained into lines the test can read, so the server never writes
/// into a closed pipe. It is killed when dropped unless the test already reaped
/// it (so a failing assertion never leaves it running, holding the test's pipes).
pub struct Served {
    pub child: Child,
    pub addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    /// Started with `extra` flags, under `ulimit -n fd_limit` when given.
    pub fn start(extra: &[&str], fd_limit: Option<u32>) -> Self {
        Self::start_with_env(extra, fd_limit, &[])
    }

    /// As [`Self::start`], with these environment variables set for the server.
    pub fn start_with_env(extra: &[&str], fd_limit: Option<u32>, env: &[(&str, &str)]) -> Self {
        let model = fixture("qwen3");
        let mut args = vec!["--model", model.to_str().unwrap(), "--served-model-name", "tiny"];
        args.extend(extra);
        Self::launch(&args, fd_limit, env)
    }

    /// `ferrite serve --port 0` with `args` alone (they name the models).
    pub fn launch(args: &[&str], fd_limit: Option<u32>, env: &[(&str, &str)]) -> Self {
        let bin = env!("CARGO_BIN_EXE_ferrite");
        let mut command = match fd_limit {
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!(r#"ulimit -n {n} && exec "$0" "$@""#), bin]);
                c
            }
            None => Command::new(bin),
        };
        #[allow(clippy::zombie_processes)] // Drop (or the caller) waits for it
        let mut child = command
            .args(["serve", "--port", "0"])
            .args(args)
            .env("FERRITE_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        // Lines up to the address (the load's log) are kept too.
        let mut early = Vec::new();
        let addr = loop {
            line.clear();
            let read = stderr.read_line(&mut line).unwrap();
            if read == 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server exited before announcing its address");
            }
            early.push(line.trim_end().to_string());
            if let Some(rest) = line.trim().split("http://").nth(1) {
                break rest.to_string();
            }
        };
        let lines = Arc::new(Mutex::new(early));
        let kept = lines.clone();
        let drain = std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Self { child, addr, stderr: lines, drain: Some(drain) }
    }

    /// The stderr lines so far that contain `needle`.
    pub fn stderr_lines(&self, needle: &str) -> Vec<String> {
        self.stderr.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
        self.wait()
    }

    /// The exit status, once every line the server wrote to stderr has been read: the drain
    /// thread is joined (it ends at the pipe's end), so [`Self::stderr_lines`] then sees the
    /// server's last words. Waiting on `child` alone races the drain.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().unwrap();
        if let Some(drain) = self.drain.take() {
            drain.join().unwrap();
        }
        status
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
