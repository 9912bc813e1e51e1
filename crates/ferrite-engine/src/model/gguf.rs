//! GGUF checkpoints (llama.cpp's format), read with candle's GGUF reader: the metadata becomes
//! the same [`ModelConfig`] a `config.json` gives, the tensors are renamed to the Hugging Face
//! names the decoder loads (with llama.cpp's permutation of the llama family's q/k rows
//! undone), and the tokenizer is rebuilt from `tokenizer.ggml.*` as a `tokenizers` tokenizer,
//! so everything downstream is unchanged.
//!
//! This first step dequantizes every tensor to f32 at load: any type candle reads (F32, F16,
//! BF16, Q4_0, Q8_0, the K-quants) loads and runs, at f32's speed and memory. Quantized
//! products are the next step.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper};

use crate::error::LoadError;
use crate::model::tokenizer::TokenizerConfig;

/// A GGUF file's header: its metadata and where each tensor is.
pub struct GgufFile {
    pub path: PathBuf,
    content: Content,
}

/// "None" in GGUF's optional token ids.
const UNSET: u32 = u32::MAX;

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let mut reader = BufReader::new(File::open(path).map_err(|e| io(path, e))?);
        let content = Content::read(&mut reader).map_err(|e| LoadError::Config {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    fn invalid(&self, message: impl Into<String>) -> LoadError {
        LoadError::Config { path: self.path.clone(), message: message.into() }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| v.to_string().ok()).cloned()
    }

    fn uint(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().filter(|&x| x >= 0).map(|x| x as u64))
    }

    fn need_uint(&self, key: &str) -> Result<u64, LoadError> {
        self.uint(key).ok_or_else(|| self.invalid(format!("missing metadata `{key}`")))
    }

    fn float(&self, key: &str) -> Option<f64> {
        let v = self.get(key)?;
        v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok())
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String, LoadError> {
        self.string("general.architecture").ok_or_else(|| self.invalid("missing `general.architecture`"))
    }

    /// The model's configuration as a Hugging Face `config.json` would give it.
    pub fn config_json(&self) -> Result<serde_json::Value, LoadError> {
        let arch = self.architecture()?;
        let hf = match arch.as_str() {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            other => {
                return Err(LoadError::UnsupportedArchitecture {
                    name: format!("{other} (GGUF)"),
                    supported: vec!["llama".into(), "qwen2".into(), "qwen3".into()],
                })
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let heads = self.need_uint(&key("attention.head_count"))?;
        let embd = self.tensor_dims("token_embd.weight")?;
        let mut config = json!({
            "architectures": [hf],
            "hidden_size": self.need_uint(&key("embedding_length"))?,
            "intermediate_size": self.need_uint(&key("feed_forward_length"))?,
            "num_hidden_layers": self.need_uint(&key("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.uint(&key("attention.head_count_kv")).unwrap_or(heads),
            "max_position_embeddings": self.uint(&key("context_length")).unwrap_or(4096),
            "rms_norm_eps": self.float(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "rope_theta": self.float(&key("rope.freq_base")).unwrap_or(10000.0),
            "vocab_size": embd[0],
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "attention_bias": self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            "torch_dtype": "float32",
        });
        if let Some(head_dim) = self.uint(&key("attention.key_length")) {
            config["head_dim"] = json!(head_dim);
        }
        match self.string(&key("rope.scaling.type")).as_deref() {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self.float(&key("rope.scaling.factor")).unwrap_or(1.0);
                config["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
            }
            Some(other) => return Err(self.invalid(format!("rope scaling `{other}` is not supported yet"))),
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.invalid(
                "`rope_freqs.weight` (Llama 3.1's frequency scaling, stored as factors) is not supported yet",
            ));
        }
        let id = |k: &str| self.uint(k).map(|v| v as u32).filter(|&v| v != UNSET);
        if let Some(bos) = id("tokenizer.ggml.bos_token_id") {
            config["bos_token_id"] = json!(bos);
        }
        if let Some(eos) = id("tokenizer.ggml.eos_token_id") {
            config["eos_token_id"] = json!(eos);
        }
        Ok(config)
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        let info =
            self.content.tensor_infos.get(name).ok_or_else(|| self.invalid(format!("no tensor `{name}`")))?;
        Ok(info.shape.dims().to_vec())
    }

    /// Every tensor, dequantized to f32 on `device`, under its Hugging Face name.
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>, LoadError> {
        let arch = self.architecture()?;
        let heads = self.need_uint(&format!("{arch}.attention.head_count"))? as usize;
        let kv_heads = self.uint(&format!("{arch}.attention.head_count_kv")).map_or(heads, |v| v as usize);
        let mut reader = BufReader::new(File::open(&self.path).map_err(|e| io(&self.path, e))?);
        let weights = |e: candle_core::Error| LoadError::Weights {
            location: self.path.display().to_string(),
            message: e.to_string(),
        };
        let mut out = HashMap::new();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let Some(hf) = hf_name(name) else {
                return Err(self.invalid(format!("tensor `{name}` has no place in a {arch} model")));
            };
            let q = self.content.tensor(&mut reader, name, &Device::Cpu).map_err(|e| {
                let kind = self.content.tensor_infos.get(name).map(|i| format!("{:?}", i.ggml_dtype));
                self.invalid(format!("tensor `{name}` ({}): {e}", kind.unwrap_or_default()))
            })?;
            let mut t = q.dequantize(&Device::Cpu).map_err(weights)?;
            // llama.cpp's converter permutes the llama family's q and k rows so that its RoPE
            // rotates interleaved pairs; the decoder rotates halves, as transformers does.
            if arch == "llama" {
                if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                    t = unpermute(&t, heads).map_err(weights)?;
                } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                    t = unpermute(&t, kv_heads).map_err(weights)?;
                }
            }
            out.insert(hf, t.to_device(device).map_err(weights)?);
        }
        Ok(out)
    }

    /// The tokenizer, rebuilt from `tokenizer.ggml.*`, and the settings `tokenizer_config.json`
    /// would carry (BOS/EOS, `add_bos_token`, the chat template).
    pub fn tokenizer(&self) -> Result<(tokenizers::Tokenizer, TokenizerConfig), LoadError> {
        let model =
            self.string("tokenizer.ggml.model").ok_or_else(|| self.invalid("no `tokenizer.ggml.model`"))?;
        let tokens: Vec<String> = self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| self.invalid("no `tokenizer.ggml.tokens`"))?
            .iter()
            .map(|t| t.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|e| self.invalid(format!("`tokenizer.ggml.tokens`: {e}")))?;
        let types: Vec<i32> = match self.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
            Some(list) => list.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let mut tok = match model.as_str() {
            "llama" => self.sentencepiece_bpe(&tokens)?,
            "gpt2" => self.byte_level_bpe(&tokens)?,
            other => {
                return Err(self.invalid(format!(
                    "tokenizer model `{other}` is not supported yet (llama, gpt2); give --tokenizer"
                )))
            }
        };
        // Control (3) and unknown (2) tokens are special; user-defined (4) ones are added text.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| matches!(t, 2..=4))
            .map(|(text, &t)| AddedToken::from(text.clone(), t != 4))
            .collect();
        let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) = added.into_iter().partition(|t| t.special);
        let tokenizer_err = |e: tokenizers::Error| self.invalid(format!("tokenizer: {e}"));
        tok.add_special_tokens(special).map_err(tokenizer_err)?;
        tok.add_tokens(plain).map_err(tokenizer_err)?;
        let id = |k: &str| self.uint(k).map(|v| v as usize).filter(|&v| v != UNSET as usize);
        let text_of = |i: Option<usize>| i.and_then(|i| tokens.get(i).cloned());
        let config = TokenizerConfig {
            bos_token: text_of(id("tokenizer.ggml.bos_token_id")),
            eos_token: text_of(id("tokenizer.ggml.eos_token_id")),
            add_bos_token: self.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).or(
                // llama.cpp adds BOS for SentencePiece vocabularies unless told otherwise.
                (model == "llama").then_some(true),
            ),
            chat_template: self.string("tokenizer.chat_template"),
        };
        Ok((tok, config))
    }

    /// SentencePiece vocabularies (`llama`): BPE over `▁`-joined pieces with byte fallback,
    /// whose merges come from the pieces' scores (as transformers converts them).
    fn sentencepiece_bpe(&self, tokens: &[String]) -> Result<tokenizers::Tokenizer, LoadError> {
        let scores: Vec<f32> = match self.get("tokenizer.ggml.scores").and_then(|v| v.to_vec().ok()) {
            Some(list) => list.iter().map(|s| s.to_f32().unwrap_or(0.0)).collect(),
            None => vec![0.0; tokens.len()],
        };
        let vocab: HashMap<String, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges = merges_from_scores(tokens, &scores, &vocab);
        let unk = self.uint("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize).cloned());
        let vocab: Vocab = vocab.into_iter().collect();
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder.build().map_err(|e| self.invalid(format!("tokenizer: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, strip::Strip};
        use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
        tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
            '▁',
            PrependScheme::First,
            false,
        ))));
        let replace = tokenizers::normalizers::Replace::new("▁", " ")
            .map_err(|e| self.invalid(format!("tokenizer: {e}")))?;
        tok.with_decoder(Some(DecoderWrapper::Sequence(tokenizers::decoders::sequence::Sequence::new(
            vec![
                DecoderWrapper::Replace(replace),
                DecoderWrapper::ByteFallback(ByteFallback::new()),
                DecoderWrapper::Fuse(Fuse::new()),
                DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
            ],
        ))));
        Ok(tok)
    }

    /// Byte-level BPE vocabularies (`gpt2`): the merges as stored, and the pre-tokenizer that
    /// `tokenizer.ggml.pre` names.
    fn byte_level_bpe(&self, tokens: &[String]) -> Result<tokenizers::Tokenizer, LoadError> {
        let merges: Vec<(String, String)> = self
            .get("tokenizer.ggml.merges")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| self.invalid("no `tokenizer.ggml.merges`"))?
            .iter()
            .filter_map(|m| m.to_string().ok())
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| self.invalid(format!("tokenizer: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let pre = self.string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        match pre.as_str() {
            "default" | "gpt2" => {
                tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))));
            }
            "qwen2" => {
                let split = tokenizers::pre_tokenizers::split::Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex(QWEN2_SPLIT.into()),
                    tokenizers::SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| self.invalid(format!("tokenizer: {e}")))?;
                tok.with_normalizer(Some(NormalizerWrapper::NFC(tokenizers::normalizers::NFC)))
                    .map_err(|e| self.invalid(format!("tokenizer: {e}")))?;
                tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(
                    tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
                        PreTokenizerWrapper::Split(split),
                        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
                    ]),
                )));
            }
            other => {
                return Err(self.invalid(format!(
                    "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported yet (default, gpt2, qwen2); give --tokenizer"
                )))
            }
        }
        tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
        Ok(tok)
    }
}

/// Qwen2's pre-tokenizer split (`tokenizer.ggml.pre = "qwen2"`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn io(path: &Path, e: std::io::Error) -> LoadError {
    LoadError::Io { path: path.to_path_buf(), message: e.to_string() }
}

/// The Hugging Face name of a llama.cpp tensor name.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's q/k permutation: within each of `heads` heads, its rows were reordered
/// from (half, pair) to (pair, half).
fn unpermute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    t.reshape((heads, rows / heads / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

/// BPE merges of a SentencePiece vocabulary, from its pieces' scores: every split of a piece
/// into two pieces of the vocabulary is a merge, ranked by the whole piece's score (ties: the
/// longer left part, then the longer right), as transformers' slow-to-fast conversion does.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let chars: Vec<(usize, char)> = piece.char_indices().collect();
        let mut local: Vec<(String, String, f32)> = chars
            .iter()
            .skip(1)
            .map(|&(at, _)| (&piece[..at], &piece[at..]))
            .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r))
            .map(|(l, r)| (l.to_string(), r.to_string(), score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let chars = |s: &str| s.chars().count();
    // Highest score first; stable, so equal keys keep their order.
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(chars(&b.0).cmp(&chars(&a.0)))
            .then(chars(&b.1).cmp(&chars(&a.1)))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// The GGUF file `source` names: the file itself, or the one `.gguf` file in a folder that has
/// no safetensors weights.
pub fn find(source: &Path) -> Option<PathBuf> {
    let is_gguf = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if source.is_file() && is_gguf(source) {
        return Some(source.to_path_buf());
    }
    if !source.is_dir()
        || source.join("model.safetensors").is_file()
        || source.join("model.safetensors.index.json").is_file()
    {
        return None;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(source)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf(p))
        .collect();
    found.sort();
    (found.len() == 1).then(|| found.remove(0))
}
