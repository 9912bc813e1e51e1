//! The model's vocabulary as llguidance sees it: each token's bytes in a trie (read from the
//! `tokenizer.json` the model ships, by llguidance's own reader), and our tokenizer for the
//! text llguidance needs tokenized.
//!
//! toktrie_hf_tokenizers does this too, but it is built on `tokenizers` 0.21 and ferrite on
//! 0.23: using it would compile and load a second tokenizer. The trie is the part that
//! matters, and llguidance reads it from the JSON itself.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::model::tokenizer::Tokenizer;

use super::GrammarError;

struct ModelTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Text through the model's own tokenizer; bytes that are not UTF-8 (a grammar literal
    /// may split a character) greedily through the trie.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s).ok().and_then(|t| self.tokenizer.encode(t, false).ok()) {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(s),
        }
    }
}

/// The environment for a model whose logits rows have `vocab_size` entries: token ids past the
/// tokenizer's own (a padded embedding) have no bytes, so no grammar ever allows them. Every id
/// in `eos_token_ids` ends a grammar.
pub(super) fn tok_env(
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos_token_ids: &[u32],
) -> Result<TokEnv, GrammarError> {
    let json = tokenizer.to_json().map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
    let mut token_bytes = llguidance::token_bytes_from_tokenizer_json(&json)
        .map_err(|e| GrammarError::Tokenizer(format!("{e:#}")))?;
    if token_bytes.len() > vocab_size {
        return Err(GrammarError::Tokenizer(format!(
            "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
            token_bytes.len()
        )));
    }
    token_bytes.resize(vocab_size, Vec::new());
    let Some((&first_eos, _)) = eos_token_ids.split_first() else {
        return Err(GrammarError::Tokenizer("the model has no EOS token to end a grammar with".into()));
    };
    let info = TokRxInfo::new(vocab_size as u32, first_eos);
    let trie = TokTrie::from(&info, &token_bytes).with_eos_tokens(eos_token_ids);
    Ok(Arc::new(ModelTokEnv { trie, tokenizer }))
}
