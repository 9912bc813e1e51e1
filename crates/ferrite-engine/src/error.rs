//! Typed errors of the engine library: loading a model, and running it.

use std::path::PathBuf;

/// Why a model could not be loaded. Every message names the file, key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "model source `{0}` is neither a local directory nor a Hugging Face repo id (org/name[@revision])"
    )]
    BadSource(String),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("missing file `{file}` in {location}")]
    MissingFile { file: String, location: String },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported architecture `{name}`; supported: {}", supported.join(", "))]
    UnsupportedArchitecture { name: String, supported: Vec<String> },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("weights in {location}: {message}")]
    Weights { location: String, message: String },
    #[error("Hugging Face hub, repo `{repo}`, file `{file}`: {message}")]
    Hub { repo: String, file: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Why a generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error(transparent)]
    Request(#[from] crate::request::RequestError),
    #[error("cannot start the engine thread: {0}")]
    Spawn(String),
    /// The device asked for cannot be opened.
    #[error("device {0}")]
    Device(String),
    #[error("KV cache: {0}")]
    KvCache(String),
    /// An engine configuration that cannot run (a zero count, a memory plan that does not fit).
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
