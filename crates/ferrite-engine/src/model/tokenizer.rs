//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, plus what
//! `tokenizer_config.json` adds (BOS/EOS strings, `add_bos_token`, the chat template).

use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, LoadError};
use crate::model::chat_template::ChatTemplate;
use crate::model::hf_config::read_file;

/// The parts of `tokenizer_config.json` that change how text becomes ids.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = read_file(path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Json { path: path.to_path_buf(), message: e.to_string() })?;
        // Special tokens are either a string or an AddedToken object `{"content": ...}`.
        let token = |key: &str| match v.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        // The chat template is a string, or (older files) a list of named templates.
        let chat_template = match v.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            add_bos_token: v.get("add_bos_token").and_then(Value::as_bool),
            chat_template,
        })
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    add_bos_token: Option<bool>,
    chat_template: Option<ChatTemplate>,
    /// The longest token's text, bytes (as the vocabulary spells it, which is never shorter
    /// than the bytes it stands for: `Ġ`, `▁` and `<0x0A>` are longer than what they encode).
    max_token_bytes: usize,
}

/// How much a normalizer may shrink text before it is split (NFKC folds a 4-byte
/// mathematical letter to its 1-byte ASCII one).
const NORMALIZER_SHRINK: usize = 4;

impl Tokenizer {
    pub fn load(tokenizer_json: &Path, config: TokenizerConfig) -> Result<Self, LoadError> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| LoadError::Tokenizer {
            path: tokenizer_json.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_parts(inner, config, tokenizer_json)
    }

    /// A tokenizer built elsewhere (from a GGUF file's vocabulary) with its settings; `origin`
    /// names where it came from in errors.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        config: TokenizerConfig,
        origin: &Path,
    ) -> Result<Self, LoadError> {
        let tokenizer_json = origin;
        let lookup =
            |tok: &Option<String>| tok.as_ref().and_then(|t| inner.token_to_id(t).map(|id| (t.clone(), id)));
        let bos = lookup(&config.bos_token);
        let eos = lookup(&config.eos_token);
        let chat_template = config
            .chat_template
            .map(|src| ChatTemplate::new(src, config.bos_token.clone(), config.eos_token.clone()))
            .transpose()
            .map_err(|e| LoadError::Tokenizer {
                path: tokenizer_json.with_file_name("tokenizer_config.json"),
                message: format!("chat_template: {e}"),
            })?;
        let max_token_bytes = inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1);
        Ok(Self { inner, bos, eos, add_bos_token: config.add_bos_token, chat_template, max_token_bytes })
    }

    /// Text to ids. With `add_special_tokens` the tokenizer's post-processor runs (it adds BOS
    /// where the model wants one), and `add_bos_token: true` is honoured if it did not.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        let enc =
            self.inner.encode(text, add_special_tokens).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos_token == Some(true) {
            if let Some((_, bos)) = &self.bos {
                if ids.first() != Some(bos) {
                    ids.insert(0, *bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|b| b.1)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|e| e.1)
    }

    /// Ids of the added tokens marked special (BOS, EOS, chat markers...).
    pub fn special_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Most bytes of text that can encode to `tokens` tokens or fewer: a text longer than this
    /// cannot fit, and is refused without spending the time to tokenize it.
    pub fn max_text_bytes(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.max_token_bytes).saturating_mul(NORMALIZER_SHRINK)
    }

    /// The id of the token spelled exactly `token` (an added token such as `</think>`), if
    /// the vocabulary has one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` spells it (what llguidance reads token bytes from).
    pub fn to_json(&self) -> Result<serde_json::Value, EngineError> {
        let text = self.inner.to_string(false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Replaces the model's chat template (a registry or command-line override).
    pub fn set_chat_template(&mut self, source: String) -> Result<(), EngineError> {
        let text = |t: &Option<(String, u32)>| t.as_ref().map(|(s, _)| s.clone());
        self.chat_template = Some(ChatTemplate::new(source, text(&self.bos), text(&self.eos))?);
        Ok(())
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders `messages` through the chat template and tokenizes the result without adding
    /// special tokens again (the template carries them), as transformers' `apply_chat_template`.
    pub fn encode_chat(
        &self,
        messages: &[crate::model::chat_template::Message],
    ) -> Result<(String, Vec<u32>), EngineError> {
        self.encode_chat_with(messages, &Default::default())
    }

    /// As [`Self::encode_chat`], with the request's tools and template variables.
    pub fn encode_chat_with(
        &self,
        messages: &[crate::model::chat_template::Message],
        extras: &crate::model::chat_template::ChatExtras,
    ) -> Result<(String, Vec<u32>), EngineError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            EngineError::ChatTemplate("this model's tokenizer_config.json has no chat_template".into())
        })?;
        let text = template.render_with(messages, true, extras)?;
        let ids = self.encode(&text, false)?;
        Ok((text, ids))
    }
}
