//! Per-token log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob,
//! bytes, top_logprobs}]}` and legacy completions' `{tokens, token_logprobs, top_logprobs,
//! text_offset}`. Values are the engine's: log-softmax of the raw logits.

use ferrite_engine::{PromptLogprob, TokenOutput, Tokenizer};
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
#[derive(Debug, Default, Clone)]
pub struct CompletionLogprobs {
    tokens: Vec<String>,
    /// `None` (JSON null) only for the first token of an echoed prompt.
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// `offset`: where this token's text starts in the choice's text (characters).
    pub fn push(&mut self, tokenizer: &Tokenizer, t: &TokenOutput, offset: usize) {
        self.push_token(tokenizer, t.token_id, Some(t.logprob), Some(&t.top_logprobs), offset);
    }

    /// An echoed prompt's scores, in front of the generated tokens' (the first prompt token
    /// has null logprobs). Token `k` starts where the echoed text of the tokens before it ends,
    /// so offsets index the choice's text; that decodes every prefix, quadratic in the prompt,
    /// which scoring requests (short prompts, rare) can afford.
    pub fn echoed_prompt(tokenizer: &Tokenizer, prompt: &[PromptLogprob]) -> Self {
        let ids: Vec<u32> = prompt.iter().map(|p| p.token_id).collect();
        let chars = |k: usize| tokenizer.decode(&ids[..k], true).map_or(0, |t| t.chars().count());
        let total = chars(ids.len());
        let mut lp = Self::default();
        let mut offset = 0;
        for (k, p) in prompt.iter().enumerate() {
            // Never backwards, never past the text (a prefix may end inside a character).
            offset = chars(k).clamp(offset, total.max(offset));
            let top = p.logprob.map(|_| p.top_logprobs.as_slice());
            lp.push_token(tokenizer, p.token_id, p.logprob, top, offset);
        }
        lp
    }

    fn push_token(
        &mut self,
        tokenizer: &Tokenizer,
        id: u32,
        logprob: Option<f32>,
        top: Option<&[(u32, f32)]>,
        offset: usize,
    ) {
        self.tokens.push(token_text(tokenizer, id));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top.map_or(Value::Null, |top| {
            let top: Map<String, Value> =
                top.iter().map(|&(id, lp)| (token_text(tokenizer, id), json!(lp))).collect();
            Value::Object(top)
        }));
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
