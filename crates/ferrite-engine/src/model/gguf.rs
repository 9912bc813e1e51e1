//! GGUF checkpoints (llama.cpp's format), read with candle's GGUF reader: the metadata becomes
//! the same [`ModelConfig`] a `config.json` gives, the tensors are renamed to the Hugging Face
//! names the decoder loads (with llama.cpp's permutation of the llama family's q/k rows
//! undone), and the tokenizer is rebuilt from `tokenizer.ggml.*` as a `tokenizers` tokenizer,
//! so everything downstream is unchanged.
//!
//! Weights in a block format (Q8_0, Q4_0, the K-quants, …) stay in it and multiply through
//! candle's quantized kernels (`ops::quantized`); norms and other small tensors are widened to
//! f32 at load.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper};

use crate::error::LoadError;
use crate::model::tokenizer::TokenizerConfig;
use crate::ops::quantized::{is_block_format, permute_rows, QuantizedMatrix};

/// A GGUF file's tensors, under Hugging Face names.
#[derive(Default)]
pub struct GgufTensors {
    /// Widened to f32.
    pub dense: HashMap<String, Tensor>,
    /// The dtype each dense tensor stored in bf16 or f16 had.
    pub stored: HashMap<String, DType>,
    /// Rank-2 weights kept in their block format.
    pub quantized: HashMap<String, Arc<QuantizedMatrix>>,
}

impl GgufTensors {
    /// Every block-format tensor dequantized into `dense` as f32 (the CPU then packs it in the
    /// dtype `--weight-dtype` asks for).
    pub fn widen_blocks(&mut self) -> candle_core::Result<()> {
        for (name, q) in std::mem::take(&mut self.quantized) {
            self.dense.insert(name, q.dequantize()?);
        }
        Ok(())
    }

    /// The block formats present, with how many tensors each (for the load log and `ferrite
    /// models`), e.g. `q4_k ×150, q6_k ×31`.
    pub fn formats(&self) -> Vec<(String, usize)> {
        let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
        for q in self.quantized.values() {
            *counts.entry(q.dtype_name()).or_default() += 1;
        }
        counts.into_iter().collect()
    }
}

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
        let content = Content::read(&mut reader).map_err(|e| {
            let message = match unsupported_tensor(path) {
                Some((tensor, code)) => format!(
                    "tensor `{tensor}` is stored as {}, which ferrite does not read (supported: {SUPPORTED_TYPES})",
                    ggml_type_name(code)
                ),
                None => format!("not a readable GGUF file: {e}"),
            };
            LoadError::Config { path: path.to_path_buf(), message }
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
        let id = |k: &str| self.uint(k).map(|v| v as u32).filter(|&v| v != UNSET);
        if let Some(bos) = id("tokenizer.ggml.bos_token_id") {
            config["bos_token_id"] = json!(bos);
        }
        if let Some(eos) = id("tokenizer.ggml.eos_token_id") {
            config["eos_token_id"] = json!(eos);
        }
        Ok(config)
    }

    /// `rope_freqs.weight`: the divisor of each rotary inverse frequency (`head_dim / 2` of
    /// them), where llama.cpp's converter stores Llama 3's frequency scaling.
    pub fn rope_factors(&self, head_dim: usize) -> Result<Option<Vec<f32>>, LoadError> {
        const NAME: &str = "rope_freqs.weight";
        if !self.content.tensor_infos.contains_key(NAME) {
            return Ok(None);
        }
        let mut reader = BufReader::new(File::open(&self.path).map_err(|e| io(&self.path, e))?);
        let read = |e: candle_core::Error| self.invalid(format!("tensor `{NAME}`: {e}"));
        let t = self.content.tensor(&mut reader, NAME, &Device::Cpu).map_err(read)?;
        let factors: Vec<f32> =
            t.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()?.to_vec1()).map_err(read)?;
        if factors.len() != head_dim / 2 || factors.iter().any(|f| !f.is_finite() || *f <= 0.0) {
            return Err(self.invalid(format!(
                "`{NAME}` must hold head_dim / 2 = {} positive factors, got {} values",
                head_dim / 2,
                factors.len()
            )));
        }
        Ok(Some(factors))
    }

    /// Bytes of every weight's data as the file stores it.
    pub fn tensor_bytes(&self) -> usize {
        self.content
            .tensor_infos
            .iter()
            .filter(|(name, _)| *name != "rope_freqs.weight")
            .map(|(_, i)| i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size())
            .sum()
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        let info =
            self.content.tensor_infos.get(name).ok_or_else(|| self.invalid(format!("no tensor `{name}`")))?;
        Ok(info.shape.dims().to_vec())
    }

    /// Every tensor under its Hugging Face name, on `device`: the linear layers' and the
    /// embedding's rank-2 weights in a block format stay in it (`quantized`), the rest are
    /// widened to f32 (`dense`, with the dtype each was stored in, for weights the CPU keeps
    /// in bf16 or f16).
    pub fn tensors(&self, device: &Device) -> Result<GgufTensors, LoadError> {
        let arch = self.architecture()?;
        let heads = self.need_uint(&format!("{arch}.attention.head_count"))? as usize;
        let kv_heads = self.uint(&format!("{arch}.attention.head_count_kv")).map_or(heads, |v| v as usize);
        let mut reader = BufReader::new(File::open(&self.path).map_err(|e| io(&self.path, e))?);
        let weights = |e: candle_core::Error| LoadError::Weights {
            location: self.path.display().to_string(),
            message: e.to_string(),
        };
        let mut out = GgufTensors::default();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            if name == "rope_freqs.weight" {
                continue; // part of the rotary config (`rope_factors`), not a weight
            }
            let Some(hf) = hf_name(name) else {
                return Err(self.invalid(format!("tensor `{name}` has no place in a {arch} model")));
            };
            let q = self.content.tensor(&mut reader, name, &Device::Cpu).map_err(|e| {
                let kind = self.content.tensor_infos.get(name).map(|i| format!("{:?}", i.ggml_dtype));
                self.invalid(format!("tensor `{name}` ({}): {e}", kind.unwrap_or_default()))
            })?;
            // llama.cpp's converter permutes the llama family's q and k rows so that its RoPE
            // rotates interleaved pairs; the decoder rotates halves, as transformers does.
            let permuted_heads = match arch.as_str() {
                "llama" if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") => Some(heads),
                "llama" if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") => Some(kv_heads),
                _ => None,
            };
            let dtype = q.dtype();
            if is_block_format(dtype) && q.rank() == 2 {
                let (rows, cols) = q.shape().dims2().map_err(weights)?;
                let q = match permuted_heads {
                    Some(h) => {
                        let bytes = q.data().map_err(weights)?;
                        let moved = permute_rows(&bytes, rows, |i| unpermuted_source(i, rows, h));
                        let storage =
                            QStorage::from_data(Cow::Owned(moved), &Device::Cpu, dtype).map_err(weights)?;
                        QTensor::new(storage, (rows, cols)).map_err(weights)?
                    }
                    None => q,
                };
                let q = if device.is_cpu() { q } else { move_qtensor(q, device).map_err(weights)? };
                let matrix = QuantizedMatrix::new(Arc::new(q))
                    .map_err(|e| self.invalid(format!("tensor `{name}`: {e}")))?;
                out.quantized.insert(hf, Arc::new(matrix));
                continue;
            }
            let mut t = q.dequantize(&Device::Cpu).map_err(weights)?;
            if let Some(h) = permuted_heads {
                t = unpermute(&t, h).map_err(weights)?;
            }
            match dtype {
                GgmlDType::F16 => _ = out.stored.insert(hf.clone(), DType::F16),
                GgmlDType::BF16 => _ = out.stored.insert(hf.clone(), DType::BF16),
                _ => {}
            }
            out.dense.insert(hf, t.to_device(device).map_err(weights)?);
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
                // llama.cpp adds BOS for SentencePiece vocabularies and Llama 3's group unless
                // told otherwise.
                (model == "llama"
                    || self.string("tokenizer.ggml.pre").is_some_and(|p| LLAMA3_PRES.contains(&p.as_str())))
                .then_some(true),
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
        let pre = self.string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
        let llama3 = LLAMA3_PRES.contains(&pre.as_str());
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama 3's vocabulary comes from tiktoken's ranks: a pre-token that is a whole
            // token is taken whole, whether or not merges reach it (its tokenizer.json says so,
            // and llama.cpp does the same for this group).
            .ignore_merges(llama3)
            .build()
            .map_err(|e| self.invalid(format!("tokenizer: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let split = |pattern: &str| {
            tokenizers::pre_tokenizers::split::Split::new(
                tokenizers::pre_tokenizers::split::SplitPattern::Regex(pattern.into()),
                tokenizers::SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(|split| {
                PreTokenizerWrapper::Sequence(tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
                    PreTokenizerWrapper::Split(split),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
                ]))
            })
            .map_err(|e| self.invalid(format!("tokenizer: {e}")))
        };
        match pre.as_str() {
            "default" | "gpt2" => {
                tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true))));
            }
            "qwen2" => {
                tok.with_normalizer(Some(NormalizerWrapper::NFC(tokenizers::normalizers::NFC)))
                    .map_err(|e| self.invalid(format!("tokenizer: {e}")))?;
                tok.with_pre_tokenizer(Some(split(QWEN2_SPLIT)?));
            }
            _ if llama3 => {
                tok.with_pre_tokenizer(Some(split(LLAMA3_SPLIT)?));
            }
            other => {
                return Err(self.invalid(format!(
                    "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported yet (default, gpt2, qwen2, {}); give --tokenizer",
                    LLAMA3_PRES.join(", ")
                )))
            }
        }
        tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
        Ok(tok)
    }
}

/// Qwen2's pre-tokenizer split (`tokenizer.ggml.pre = "qwen2"`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split: Qwen2's but for digits, taken in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names llama.cpp reads as Llama 3's pre-tokenizer (its LLAMA3 group:
/// that split, whole tokens before merges, and BOS added unless the file says otherwise).
const LLAMA3_PRES: [&str; 8] =
    ["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"];

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

/// Where row `i` of the unpermuted matrix sits in llama.cpp's: [`unpermute`] as a row map
/// (within a head of `2 · half` rows, row `h · half + p` comes from row `2p + h`).
fn unpermuted_source(i: usize, rows: usize, heads: usize) -> usize {
    let per_head = rows / heads;
    let half = per_head / 2;
    let (head, r) = (i / per_head, i % per_head);
    let (h, p) = (r / half, r % half);
    head * per_head + 2 * p + h
}

/// A block-format tensor on another device (candle reads GGUF tensors onto one device; the
/// permutation above works on host bytes).
fn move_qtensor(q: QTensor, device: &Device) -> candle_core::Result<QTensor> {
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    QTensor::new(storage, q.shape().clone())
}

/// The GGML tensor types candle reads, for messages.
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// llama.cpp's name of a GGML tensor type code.
fn ggml_type_name(code: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "type 4", "type 5", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
        "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",
        "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "type 31", "type 32", "type 33",
        "TQ1_0", "TQ2_0", "type 36", "type 37", "type 38", "MXFP4",
    ];
    NAMES.get(code as usize).map_or_else(|| format!("type {code}"), |n| n.to_string())
}

/// The first tensor whose GGML type candle does not read, and its type code, from a GGUF v2/v3
/// header (candle's reader stops at such a tensor without naming it).
fn unsupported_tensor(path: &Path) -> Option<(String, u32)> {
    use std::io::Read;
    struct Header<R>(R);
    impl<R: Read> Header<R> {
        fn bytes(&mut self, n: usize) -> Option<Vec<u8>> {
            let mut b = vec![0; n];
            self.0.read_exact(&mut b).ok()?;
            Some(b)
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
        }
        fn string(&mut self) -> Option<String> {
            let n = usize::try_from(self.u64()?).ok().filter(|&n| n < 1 << 24)?;
            String::from_utf8(self.bytes(n)?).ok()
        }
        /// Skips one metadata value of type `t`.
        fn skip(&mut self, t: u32) -> Option<()> {
            match t {
                0 | 1 | 7 => _ = self.bytes(1)?,
                2 | 3 => _ = self.bytes(2)?,
                4..=6 => _ = self.bytes(4)?,
                10..=12 => _ = self.bytes(8)?,
                8 => _ = self.string()?,
                9 => {
                    let (item, n) = (self.u32()?, self.u64()?);
                    for _ in 0..n {
                        self.skip(item)?;
                    }
                }
                _ => return None,
            }
            Some(())
        }
    }
    let mut h = Header(BufReader::new(File::open(path).ok()?));
    if h.bytes(4)? != b"GGUF" || h.u32()? < 2 {
        return None;
    }
    let (tensors, kvs) = (h.u64()?, h.u64()?);
    for _ in 0..kvs {
        h.string()?;
        let t = h.u32()?;
        h.skip(t)?;
    }
    for _ in 0..tensors {
        let name = h.string()?;
        let dims = h.u32()?;
        for _ in 0..dims {
            h.u64()?;
        }
        let code = h.u32()?;
        h.u64()?;
        if !matches!(code, 0..=3 | 6..=15 | 30) {
            return Some((name, code));
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The row map that moves a block-format tensor's bytes is the f32 unpermutation: applied to
    /// a matrix whose rows hold their own index, both give the same order.
    #[test]
    fn the_byte_row_map_is_the_f32_unpermutation() {
        for (rows, heads) in [(16, 2), (24, 3), (8, 1)] {
            let ids: Vec<f32> = (0..rows).map(|r| r as f32).collect();
            let t = Tensor::from_vec(ids, (rows, 1), &Device::Cpu).unwrap();
            let want: Vec<f32> = unpermute(&t, heads).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got: Vec<f32> = (0..rows).map(|i| unpermuted_source(i, rows, heads) as f32).collect();
            assert_eq!(got, want, "{rows} rows, {heads} heads");
        }
    }
}
