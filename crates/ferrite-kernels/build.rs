//! Compiles every `kernels/*.cu` (workspace root) to `$OUT_DIR/<stem>.ptx` with nvcc, one PTX
//! per file, when the crate's `cuda` feature is on. Without the feature nothing runs, so CPU-only
//! builds need no CUDA toolkit.
//!
//! - Target: `compute_80` by default: PTX, which the driver JIT-compiles for the card it runs on,
//!   so A100, L4, H100 and H200 all load it. `CUDA_COMPUTE_CAP=90` (or `90a`) targets
//!   `compute_90` instead.
//! - nvcc: `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_COMPUTE_CAP: &str = "80";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let kernels_dir = manifest_dir.join("../../kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // The directory itself too, so a newly added file triggers a rebuild.
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    let sources = kernel_files(&kernels_dir);
    for file in &sources {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc_command();
    let arch = format!("-arch=compute_{}", compute_cap());
    for cu in sources.iter().filter(|f| f.extension().is_some_and(|e| e == "cu")) {
        let stem = cu.file_stem().expect("a .cu file has a stem").to_string_lossy().into_owned();
        compile_ptx(&nvcc, &arch, &kernels_dir, cu, &out_dir.join(format!("{stem}.ptx")));
    }
}

/// Every `.cu` and `.cuh` file of the kernels directory, sorted (stable build output).
fn kernel_files(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())).path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    files.sort();
    files
}

fn nvcc_command() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        return Path::new(&home).join("bin").join("nvcc");
    }
    PathBuf::from("nvcc")
}

/// `CUDA_COMPUTE_CAP` as nvcc spells it after `compute_`: digits, optionally one trailing
/// letter (`90a`).
fn compute_cap() -> String {
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| DEFAULT_COMPUTE_CAP.to_string());
    let digits = cap.trim_end_matches(|c: char| c.is_ascii_lowercase());
    let valid =
        !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) && cap.len() <= digits.len() + 1;
    assert!(valid, "CUDA_COMPUTE_CAP={cap:?}: expected a compute capability such as 80, 89 or 90a");
    cap
}

fn compile_ptx(nvcc: &Path, arch: &str, include_dir: &Path, cu: &Path, ptx: &Path) {
    let mut cmd = Command::new(nvcc);
    cmd.args(["--ptx", "-O3", "-std=c++17", arch]).arg("-I").arg(include_dir).arg("-o").arg(ptx).arg(cu);
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run nvcc ({cmd:?}): {e}; set NVCC or CUDA_HOME, or put nvcc on PATH")
    });
    if !output.status.success() {
        panic!(
            "nvcc failed ({}) compiling {}:\n  command: {cmd:?}\n  stderr:\n{}",
            output.status,
            cu.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
