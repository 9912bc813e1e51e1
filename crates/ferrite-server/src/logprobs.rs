//! Per-token log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob,
//! bytes, top_logprobs}]}` and legacy completions' `{tokens, token_logprobs, top_logprobs,
//! text_offset}`. Values are the engine's: log-softmax of the raw logits.

use ferrite_engine::request::TokenOutput;
use ferrite_engine::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

/// A token as text (special tokens spelled out; a lone byte of a multi-byte character decodes
/// to U+FFFD, as in other servers).
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_item(tokenizer: &Tokenizer, id: u32, logprob: f32) -> Value {
    let token = token_text(tokenizer, id);
    json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
}

/// One chat `content` entry for a generated token.
pub fn chat_entry(tokenizer: &Tokenizer, t: &TokenOutput) -> Value {
    let mut entry = chat_item(tokenizer, t.token_id, t.logprob);
    entry["top_logprobs"] = t.top_logprobs.iter().map(|&(id, lp)| chat_item(tokenizer, id, lp)).collect();
    entry
}

/// Legacy completions logprobs for one choice, built token by token.
#[derive(Debug, Default)]
pub struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// `offset`: where this token's text starts in the choice's text (characters).
    pub fn push(&mut self, tokenizer: &Tokenizer, t: &TokenOutput, offset: usize) {
        self.tokens.push(token_text(tokenizer, t.token_id));
        self.token_logprobs.push(t.logprob);
        let top: Map<String, Value> =
            t.top_logprobs.iter().map(|&(id, lp)| (token_text(tokenizer, id), json!(lp))).collect();
        self.top_logprobs.push(Value::Object(top));
        self.text_offset.push(offset);
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}
