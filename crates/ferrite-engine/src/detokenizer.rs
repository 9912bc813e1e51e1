//! Incremental detokenization for streaming: emits only text that is final, never half of a
//! multi-byte character (a trailing U+FFFD means the bytes are not complete yet).
//!
//! The prefix/read offset scheme follows Hugging Face text-generation-inference: decode a few
//! tokens of left context together with the new ones, so tokenizers whose decoding depends on
//! the neighbours (SentencePiece's leading spaces) produce the same text as a full decode.

use crate::error::EngineError;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { skip_special_tokens, ..Default::default() }
    }

    /// Adds one token; returns the text that became final with it (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let prefix =
            tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (incomplete bytes at the very end), decoded as is.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, EngineError> {
        let prefix =
            tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
