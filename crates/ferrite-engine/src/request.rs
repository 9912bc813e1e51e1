//! What goes into the engine and what comes out: a checked [`Request`], and the events of its
//! [`RequestStream`](crate::RequestStream).

use std::time::{Duration, Instant};

use crate::budgets::{BudgetKind, BudgetOutcome};
use crate::detokenizer::DetokenizerParams;
use crate::grammar::Grammar;
use crate::sampler::SamplingParams;

/// One generation request, already tokenized. `n` samples share the prompt.
#[derive(Debug, Clone)]
pub struct Request {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub detokenize: DetokenizerParams,
    pub max_tokens: usize,
    pub n: usize,
    /// Also score the prompt: each prompt token's log-probability given the tokens before it,
    /// with this many most likely alternatives per position. Such a request computes its whole
    /// prompt (it does not read the prefix cache), and its logits rows cost `vocab` floats each.
    pub prompt_logprobs: Option<usize>,
    /// Structured output: every sample's text must follow this grammar
    /// ([`crate::Grammars::compile`]), and a sample whose grammar is complete stops.
    pub grammar: Option<Grammar>,
    /// When the request reached the server (TTFT and queue time count from here).
    pub arrival: Instant,
    /// Lower runs first under `--scheduling-policy priority` (vLLM's field); must be 0
    /// otherwise.
    pub priority: i32,
    /// Time budgets from `arrival`; none by default.
    pub deadlines: Deadlines,
}

/// A request's time budgets, each counted from its arrival. Budgets never change a token: they
/// decide whether a request is taken, and when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// The whole request. When a sample's next token would come later (the last step's time
    /// ahead), it stops where it is: finish `length`, [`StopReason::Deadline`], its text so far
    /// returned. Under `--scheduling-policy deadline` the earliest deadline runs first.
    pub total: Option<Duration>,
    /// The first token. A request the engine predicts cannot meet it is refused at submission
    /// ([`SubmitError::Infeasible`]); one that misses it all the same ends without tokens
    /// ([`StopReason::FirstTokenDeadline`]).
    pub first_token: Option<Duration>,
}

impl Deadlines {
    /// The tighter of the two budgets: the scheduling deadline before the first token, and the
    /// most the first token may take.
    pub fn first_token_budget(&self) -> Option<Duration> {
        match (self.total, self.first_token) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the request should be done by, for ordering under the deadline policy: its first
    /// token's deadline while it has none, which is the earlier of the two.
    pub fn earliest(&self, arrival: Instant) -> Option<Instant> {
        self.first_token_budget().map(|d| arrival + d)
    }
}

/// One embedding request, already tokenized: each input a prefill-only sequence whose final
/// hidden states are pooled as the model's [`crate::Pooling`] says. Its stream carries a
/// [`RequestEvent::Embedding`] per input (in the order they finish), then `Finished` with the
/// inputs' tokens summed. It is one request against the queue limit however many inputs it has.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub request_id: String,
    pub inputs: Vec<Vec<u32>>,
    /// Keep this many leading values (then normalise, where the model does): OpenAI's
    /// `dimensions`, for models trained for it (Matryoshka).
    pub dimensions: Option<usize>,
    pub arrival: Instant,
    /// As [`Request::priority`].
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS or stop token, or a stop string.
    Stop,
    /// `max_tokens` or the model's length limit.
    Length,
    /// The client went away or the engine shut down.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What stopped a sequence with [`FinishReason::Stop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// EOS or one of `stop_token_ids`.
    Token(u32),
    /// One of the request's stop strings.
    Text(String),
    /// Its `max_cost_usd` (the finish reason is then length).
    Cost,
    /// Its end-to-end deadline (the finish reason is then length).
    Deadline,
    /// Its first-token deadline passed before its first token (length, and no tokens).
    FirstTokenDeadline,
}

/// One new token of one of the request's samples.
#[derive(Debug, Clone)]
pub struct TokenOutput {
    /// Which of the `n` samples.
    pub index: usize,
    pub token_id: u32,
    /// Text that became final with this token (may be empty: held back or special).
    pub text: String,
    /// Log-probability of `token_id` under the raw logits.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, when asked for.
    pub top_logprobs: Vec<(u32, f32)>,
    /// Set on the sample's last token.
    pub finish: Option<(FinishReason, Option<StopReason>)>,
    /// On the first token of sample 0 of a request that asked for `prompt_logprobs`: one entry
    /// per prompt token.
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
}

/// One prompt token scored under the logits of the position before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub token_id: u32,
    /// `None` for the first token: nothing comes before it to score it on.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, `(token id, logprob)`, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Token counts and times of a finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Over all `n` samples.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub finished: Instant,
    /// This request's share of the engine steps it was in (see `metrics`).
    pub device_seconds: f64,
    /// `device_seconds` at the configured device price (0 without one).
    pub cost_usd: f64,
    /// Its share of the measured energy; `None` where no power meter can be read.
    pub energy_joules: Option<f64>,
    /// How each budget it carried ended.
    pub budgets: Vec<(BudgetKind, BudgetOutcome)>,
}

#[derive(Debug, Clone)]
pub enum RequestEvent {
    Token(TokenOutput),
    /// The vector of an embedding request's input `index` (`Finished` follows the last).
    Embedding {
        index: usize,
        vector: Vec<f32>,
    },
    /// The last event of a successful request.
    Finished(Usage),
    /// Sample `index` ended without a new token (a deadline came first): `text` is what its
    /// detokenizer still held back.
    Stopped {
        index: usize,
        text: String,
        finish: (FinishReason, Option<StopReason>),
    },
    /// The request failed; no event follows.
    Error(String),
}

/// What is wrong with a request: each names the field at fault ([`RequestError::param`]), the
/// limit and the value given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the prompt is empty (0 tokens)")]
    EmptyPrompt,
    /// This model cannot make embeddings; the reason says why.
    #[error("{0}")]
    NoEmbeddings(String),
    #[error("this model is an embedding model (its checkpoint has no LM head): it generates nothing; use /v1/embeddings")]
    NoGeneration,
    #[error("{param} token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownToken { param: &'static str, id: u32, vocab_size: usize },
    #[error(
        "the prompt ({prompt_tokens} tokens) leaves no room for output in max_model_len {max_model_len}"
    )]
    PromptTooLong { prompt_tokens: usize, max_model_len: usize },
    #[error(
        "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {} tokens exceeds max_model_len {max_model_len}",
        prompt_tokens.saturating_add(*max_tokens)
    )]
    MaxTokens { prompt_tokens: usize, max_tokens: usize, max_model_len: usize },
    #[error(
        "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {needed_blocks} KV cache blocks of {block_size} tokens, but the whole cache has {total_blocks}"
    )]
    KvCacheTooSmall {
        prompt_tokens: usize,
        max_tokens: usize,
        needed_blocks: usize,
        block_size: usize,
        total_blocks: usize,
    },
    /// A field outside its range; `message` says the range and the value.
    #[error("{message}")]
    OutOfRange { param: &'static str, message: String },
}

impl RequestError {
    /// The request field at fault, as the OpenAI API names it (`param` of its error body).
    pub fn param(&self) -> &'static str {
        match self {
            RequestError::EmptyPrompt | RequestError::PromptTooLong { .. } => "prompt",
            RequestError::UnknownToken { param, .. } | RequestError::OutOfRange { param, .. } => param,
            RequestError::MaxTokens { .. } | RequestError::KvCacheTooSmall { .. } => "max_tokens",
            RequestError::NoEmbeddings(_) | RequestError::NoGeneration => "model",
        }
    }

    /// `param` is outside its range: `message` says which range and which value.
    pub fn out_of_range(param: &'static str, message: String) -> Self {
        RequestError::OutOfRange { param, message }
    }
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] RequestError),
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// The first token cannot come within the request's budget `param`: the engine predicts
    /// it `estimate_us` after arrival, against `budget_us` (microseconds).
    #[error(
        "the first token is predicted {} ms after arrival ({tokens_ahead} prompt tokens queued ahead), beyond {param} {} ms; retry after {retry_after_secs} s or with a larger budget",
        *estimate_us as f64 / 1e3,
        *budget_us as f64 / 1e3
    )]
    Infeasible {
        param: &'static str,
        estimate_us: u64,
        budget_us: u64,
        tokens_ahead: usize,
        retry_after_secs: u64,
    },
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the engine has stopped: {0}")]
    EngineDead(String),
}
