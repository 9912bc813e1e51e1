//! Structured output: a request's grammar (a JSON schema, a regex, a choice of strings, a Lark
//! grammar) compiled by llguidance for this model's vocabulary, and each constrained sample's
//! [`SeqGrammar`], whose token mask limits its logits row before sampling.
//!
//! - Compiling happens on the caller's thread (the server validates on its blocking pool),
//!   never on the engine's, and is bounded by llguidance's fuel limits and the size of the
//!   grammar text; [`Grammars`] caches compiled grammars by their text (LRU).
//! - Each step the engine computes the masks of the step's constrained samples while the
//!   forward pass runs (`Engine::forward`), so a constrained batch costs about what a free one
//!   does; the sampler then sets every disallowed logit to -inf, and the sampled token is
//!   committed to the matcher.
//! - A grammar that is complete ends its sample (`finish_reason: "stop"`): llguidance then
//!   allows only EOS, or stops by itself when nothing can follow.
//!
//! JSON is generated with at most [`JSON_MAX_WHITESPACE`] whitespace characters between two
//! tokens of the JSON text (llguidance's default allows any number, and a small model can loop
//! on newlines until `max_tokens`). A schema's own `x-guidance` object overrides this.

mod tok_env;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::SimpleVob;
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use lru::LruCache;
use serde_json::Value;

use crate::model::tokenizer::Tokenizer;

/// Most whitespace characters between two JSON tokens (see the module docs).
pub const JSON_MAX_WHITESPACE: usize = 32;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this schema (a JSON object).
    JsonSchema(Value),
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl GrammarSpec {
    /// The cache key: the kind and the text.
    fn key(&self) -> String {
        match self {
            GrammarSpec::JsonObject => "json_object".into(),
            GrammarSpec::JsonSchema(schema) => format!("json:{schema}"),
            GrammarSpec::Regex(rx) => format!("regex:{rx}"),
            GrammarSpec::Choice(choices) => format!("choice:{}", Value::from(choices.clone())),
            GrammarSpec::Lark(lark) => format!("lark:{lark}"),
        }
    }

    /// llguidance's form of it.
    fn top_level(&self) -> Result<TopLevelGrammar, GrammarError> {
        Ok(match self {
            GrammarSpec::JsonObject => json_grammar(serde_json::json!({"type": "object"})),
            GrammarSpec::JsonSchema(schema) => {
                if !schema.is_object() {
                    return Err(GrammarError::Invalid(format!(
                        "a JSON schema must be a JSON object, got {}",
                        json_kind(schema)
                    )));
                }
                json_grammar(schema.clone())
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError::Invalid("a choice needs at least one string".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `schema` (an object) with ferrite's JSON options unless it carries its own.
fn json_grammar(mut schema: Value) -> TopLevelGrammar {
    bounded_json_whitespace(&mut schema);
    TopLevelGrammar::from_json_schema(schema)
}

/// Gives `schema` (an object) ferrite's JSON options, unless it carries its own `x-guidance`:
/// at most [`JSON_MAX_WHITESPACE`] whitespace characters between tokens. For schemas embedded
/// in a Lark grammar (`%json {…}`) as well as whole ones.
pub fn bounded_json_whitespace(schema: &mut Value) {
    if schema.get("x-guidance").is_none() {
        let options = JsonCompileOptions {
            whitespace_pattern: Some(format!(r"[\x20\x0A\x0D\x09]{{1,{JSON_MAX_WHITESPACE}}}")),
            ..JsonCompileOptions::default()
        };
        options.apply_to(schema);
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The model's vocabulary could not be read into a token trie.
    #[error("structured output is unavailable for this model: {0}")]
    Tokenizer(String),
    /// The grammar does not compile (or passes a limit); the message is llguidance's.
    #[error("{0}")]
    Invalid(String),
}

/// Settings of the grammar compiler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrammarConfig {
    /// Compiled grammars kept for reuse, by text.
    pub cache_entries: usize,
}

impl Default for GrammarConfig {
    fn default() -> Self {
        Self { cache_entries: 256 }
    }
}

/// The grammar compiler for one model: its vocabulary as a token trie, and the cache.
pub struct Grammars {
    factory: ParserFactory,
    cache: Mutex<LruCache<String, Grammar>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// A compiler for a model with `vocab_size` logits whose samples end at `eos_token_ids`.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        eos_token_ids: &[u32],
        config: GrammarConfig,
    ) -> Result<Self, GrammarError> {
        let env = tok_env::tok_env(tokenizer, vocab_size, eos_token_ids)?;
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Tokenizer(format!("{e:#}")))?;
        factory.quiet();
        let entries = NonZeroUsize::new(config.cache_entries).unwrap_or(NonZeroUsize::MIN);
        Ok(Self { factory, cache: Mutex::new(LruCache::new(entries)) })
    }

    /// `spec` compiled, from the cache when the same text was compiled before. Bounded by
    /// llguidance's limits (grammar size, lexer fuel): a pathological grammar is an error, in
    /// milliseconds.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, GrammarError> {
        let key = spec.key();
        if let Some(hit) = self.lock().get(&key) {
            return Ok(hit.clone());
        }
        let parser = self
            .factory
            .create_parser(spec.top_level()?)
            .map_err(|e| GrammarError::Invalid(format!("{e:#}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(e));
        }
        let grammar = Grammar { template: Arc::new(Mutex::new(matcher)), thinking: None };
        self.lock().put(key, grammar.clone());
        Ok(grammar)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, Grammar>> {
        // A panic elsewhere while holding it leaves a cache that is still a valid cache.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A compiled grammar, shared by every request that uses it: each sample starts its own
/// [`SeqGrammar`] from it.
#[derive(Clone)]
pub struct Grammar {
    template: Arc<Mutex<Matcher>>,
    /// Reasoning models: the grammar holds after the thinking, not during it.
    thinking: Option<Thinking>,
}

/// A reasoning model's thinking, as single tokens: `open` (`<think>`) and `end`
/// (`</think>`). The grammar constrains what follows the thinking:
/// - with `started` (the prompt opened the thinking), nothing is constrained until `end`;
/// - otherwise the first token may be `open` (then the same) or what the grammar allows (then
///   the answer is constrained from there, with no thinking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thinking {
    pub open: u32,
    pub end: u32,
    pub started: bool,
}

/// Where a sample is with respect to its thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// The grammar holds.
    Open,
    /// Thinking: free until this token.
    Thinking { end: u32 },
    /// The first token: `open` starts thinking, anything the grammar allows starts the answer.
    First { open: u32, end: u32 },
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").finish_non_exhaustive()
    }
}

impl Grammar {
    /// A fresh matcher at the grammar's start, with caches of its own (samples compute their
    /// masks in parallel, and a shared cache would serialize them).
    pub fn start(&self) -> SeqGrammar {
        let template = self.template.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let gate = match self.thinking {
            None => Gate::Open,
            Some(Thinking { end, started: true, .. }) => Gate::Thinking { end },
            Some(Thinking { open, end, started: false }) => Gate::First { open, end },
        };
        SeqGrammar { matcher: template.deep_clone(), mask: None, failure: None, gate }
    }

    /// The same grammar, holding only after a reasoning model's thinking.
    pub fn after_thinking(&self, thinking: Thinking) -> Grammar {
        Grammar { template: self.template.clone(), thinking: Some(thinking) }
    }
}

/// One sample's place in its grammar: the matcher, the mask for its next token once computed,
/// and the first error, if the matcher failed (the sample then ends with that error).
pub struct SeqGrammar {
    matcher: Matcher,
    mask: Option<SimpleVob>,
    failure: Option<String>,
    gate: Gate,
}

impl std::fmt::Debug for SeqGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqGrammar").field("failure", &self.failure).finish_non_exhaustive()
    }
}

impl SeqGrammar {
    /// Computes the mask of tokens allowed next, unless it is already computed (the engine
    /// does it while the forward pass runs; the sampler calls it again to be sure).
    pub fn prepare_mask(&mut self) {
        if self.mask.is_some() || self.failure.is_some() || matches!(self.gate, Gate::Thinking { .. }) {
            return;
        }
        match self.matcher.compute_mask_or_eos() {
            Ok(mut mask) => {
                if let Gate::First { open, .. } = self.gate {
                    mask.allow_token(open);
                }
                self.mask = Some(mask)
            }
            Err(e) => self.failure = Some(format!("structured output: {e:#}")),
        }
    }

    /// `row` (`[vocab]` logits) with every token the grammar does not allow next at -inf.
    /// After a failure nothing is allowed but the row stays as it was: the sample ends with the
    /// error whatever is drawn.
    pub fn mask_row(&mut self, row: &[f32]) -> Vec<f32> {
        self.prepare_mask();
        let Some(mask) = &self.mask else { return row.to_vec() };
        row.iter()
            .enumerate()
            .map(|(id, &l)| if mask.is_allowed(id as u32) { l } else { f32::NEG_INFINITY })
            .collect()
    }

    /// Moves the matcher past the sampled `token`.
    pub fn commit(&mut self, token: u32) {
        self.mask = None;
        if self.failure.is_some() {
            return;
        }
        match self.gate {
            Gate::Thinking { end } => {
                if token == end {
                    self.gate = Gate::Open;
                }
                return;
            }
            Gate::First { open, end } if token == open => {
                self.gate = Gate::Thinking { end };
                return;
            }
            Gate::First { .. } => self.gate = Gate::Open,
            Gate::Open => {}
        }
        if let Err(e) = self.matcher.consume_token(token) {
            self.failure = Some(format!("structured output: {e:#}"));
        }
    }

    /// The grammar is complete: nothing more may follow.
    pub fn is_complete(&self) -> bool {
        self.gate == Gate::Open && self.failure.is_none() && self.matcher.is_stopped()
    }

    /// Still thinking: the grammar does not hold yet.
    pub fn is_thinking(&self) -> bool {
        matches!(self.gate, Gate::Thinking { .. })
    }

    /// Why the matcher failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
}

#[cfg(test)]
mod tests;
