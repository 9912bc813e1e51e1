//! The flags that bound one request's fields, shared by `serve` and `batch` (both answer through
//! the same router).

use anyhow::{bail, Result};
use clap::Args;
use ferrite_server::validate::RequestLimits;

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Most samples one request may ask for (`n`).
    #[arg(long, default_value_t = RequestLimits::default().max_n)]
    pub max_n: usize,
    /// Most stop strings one request may give.
    #[arg(long, default_value_t = RequestLimits::default().max_stop_strings)]
    pub max_stop_strings: usize,
    /// Most bytes one request's stop strings may take together (every step of every sample
    /// searches for them).
    #[arg(long, default_value_t = RequestLimits::default().max_stop_bytes)]
    pub max_stop_bytes: usize,
    /// Most `logit_bias` entries in one request.
    #[arg(long, default_value_t = RequestLimits::default().max_logit_bias)]
    pub max_logit_bias: usize,
    /// Most bytes of one request's structured-output grammar (a JSON schema, a regex, the
    /// choices of `guided_choice`, a Lark grammar).
    #[arg(long, default_value_t = RequestLimits::default().max_grammar_bytes)]
    pub max_grammar_bytes: usize,
}

impl LimitArgs {
    pub fn request_limits(&self) -> Result<RequestLimits> {
        if self.max_n == 0 {
            bail!("--max-n must be at least 1 (every request has one sample), got 0");
        }
        Ok(RequestLimits {
            max_n: self.max_n,
            max_stop_strings: self.max_stop_strings,
            max_stop_bytes: self.max_stop_bytes,
            max_logit_bias: self.max_logit_bias,
            max_grammar_bytes: self.max_grammar_bytes,
        })
    }
}
