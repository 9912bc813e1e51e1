//! Benchmark prompts, built as `vllm bench` builds them so results compare: `random` (runs of
//! consecutive token ids from random offsets, lengths drawn around the target), `sharegpt`
//! (the first two turns of conversations from a JSON file) and `prefix_repetition` (a few
//! shared prefixes, each followed by random suffixes).

use std::path::Path;

use anyhow::{bail, Context, Result};
use ferrite_engine::Tokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One benchmark request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The prompt as text (what an HTTP client sends).
    pub prompt: String,
    /// The prompt as a server tokenizes it (special tokens such as BOS added): what the
    /// in-process benchmarks submit.
    pub prompt_ids: Vec<u32>,
    pub output_len: usize,
}

/// Lengths drawn uniformly from the integers in [floor(L(1-r)), ceil(L(1+r))], as vLLM's
/// current `--random-range-ratio`.
fn length_range(len: usize, ratio: f64, min: usize) -> (usize, usize) {
    let lo = ((len as f64) * (1.0 - ratio)).floor() as usize;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as usize;
    (lo.max(min), hi.max(lo.max(min)))
}

/// Ids a random prompt may use: the vocabulary without special tokens (as vLLM), and without
/// tokens that do not survive decode → encode on their own (byte fragments of a UTF-8
/// character), so the text sent over HTTP re-tokenizes to the length asked for.
fn allowed_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    let special = tokenizer.special_token_ids();
    (0..tokenizer.vocab_size() as u32)
        .filter(|id| special.binary_search(id).is_err())
        .filter(|&id| match tokenizer.decode(&[id], false) {
            Ok(text) if !text.contains('\u{fffd}') => {
                tokenizer.encode(&text, false).is_ok_and(|ids| ids == [id])
            }
            _ => false,
        })
        .collect()
}

/// Decodes `ids` and re-encodes the text until it is exactly `target` tokens (padding with
/// random ids or truncating), as vLLM does, so the text sent over HTTP has the length asked for.
fn text_of_length(
    tokenizer: &Tokenizer,
    allowed: &[u32],
    mut ids: Vec<u32>,
    target: usize,
    rng: &mut StdRng,
) -> Result<Sample> {
    let mut text = tokenizer.decode(&ids, false)?;
    for _ in 0..10 {
        let encoded = tokenizer.encode(&text, false)?;
        if encoded.len() == target {
            ids = encoded;
            break;
        }
        ids = encoded;
        if ids.len() < target {
            ids.extend((ids.len()..target).map(|_| allowed[rng.random_range(0..allowed.len())]));
        } else {
            ids.truncate(target);
        }
        text = tokenizer.decode(&ids, false)?;
    }
    Ok(Sample { prompt: text, prompt_ids: ids, output_len: 0 })
}

pub struct RandomSpec {
    pub num_prompts: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub range_ratio: f64,
    pub prefix_len: usize,
}

/// vLLM's RandomDataset: request i gets `prefix + allowed[(offset_i + i + j) % len]` for
/// j < its input length.
pub fn random(tokenizer: &Tokenizer, spec: &RandomSpec, seed: u64) -> Result<Vec<Sample>> {
    if !(0.0..1.0).contains(&spec.range_ratio) {
        bail!("--random-range-ratio must be in [0, 1), got {}", spec.range_ratio);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let allowed = allowed_ids(tokenizer);
    if allowed.is_empty() {
        bail!("the tokenizer has no non-special tokens to build prompts from");
    }
    let num_special = tokenizer.encode("", true)?.len();
    let real_input = spec.input_len.saturating_sub(num_special);
    let (in_lo, in_hi) = length_range(real_input, spec.range_ratio, 0);
    let (out_lo, out_hi) = length_range(spec.output_len, spec.range_ratio, 1);
    let input_lens: Vec<usize> = (0..spec.num_prompts).map(|_| rng.random_range(in_lo..=in_hi)).collect();
    let output_lens: Vec<usize> = (0..spec.num_prompts).map(|_| rng.random_range(out_lo..=out_hi)).collect();
    let offsets: Vec<usize> = (0..spec.num_prompts).map(|_| rng.random_range(0..allowed.len())).collect();
    let prefix: Vec<u32> =
        (0..spec.prefix_len).map(|_| allowed[rng.random_range(0..allowed.len())]).collect();
    let mut samples = Vec::with_capacity(spec.num_prompts);
    for i in 0..spec.num_prompts {
        let mut ids = prefix.clone();
        ids.extend((0..input_lens[i]).map(|j| allowed[(offsets[i] + i + j) % allowed.len()]));
        let target = ids.len();
        let prompt = text_of_length(tokenizer, &allowed, ids, target, &mut rng)?.prompt;
        let prompt_ids = tokenizer.encode(&prompt, true)?;
        samples.push(Sample { prompt, prompt_ids, output_len: output_lens[i] });
    }
    Ok(samples)
}

pub struct PrefixRepetitionSpec {
    pub num_prompts: usize,
    pub prefix_len: usize,
    pub suffix_len: usize,
    pub num_prefixes: usize,
    pub output_len: usize,
}

/// vLLM's PrefixRepetitionRandomDataset: `num_prefixes` random prefixes, each followed by
/// `num_prompts / num_prefixes` random suffixes, shuffled.
pub fn prefix_repetition(
    tokenizer: &Tokenizer,
    spec: &PrefixRepetitionSpec,
    seed: u64,
) -> Result<Vec<Sample>> {
    if spec.num_prefixes == 0 || spec.prefix_len + spec.suffix_len == 0 {
        bail!("--prefix-repetition-num-prefixes and the prefix or suffix length must be at least 1");
    }
    let per_prefix = spec.num_prompts / spec.num_prefixes;
    if per_prefix == 0 {
        bail!(
            "--num-prompts ({}) must be at least --prefix-repetition-num-prefixes ({})",
            spec.num_prompts,
            spec.num_prefixes
        );
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let allowed = allowed_ids(tokenizer);
    if allowed.is_empty() {
        bail!("the tokenizer has no non-special tokens to build prompts from");
    }
    let random_ids = |rng: &mut StdRng, n: usize| -> Result<Vec<u32>> {
        let ids: Vec<u32> = (0..n).map(|_| allowed[rng.random_range(0..allowed.len())]).collect();
        Ok(text_of_length(tokenizer, &allowed, ids, n, rng)?.prompt_ids)
    };
    let special = tokenizer.encode("", true)?;
    let mut samples = Vec::new();
    for _ in 0..spec.num_prefixes {
        let prefix = random_ids(&mut rng, spec.prefix_len)?;
        for _ in 0..per_prefix {
            let mut ids = prefix.clone();
            ids.extend(random_ids(&mut rng, spec.suffix_len)?);
            let prompt = tokenizer.decode(&ids, false)?;
            // In-process runs submit the exact ids, so the prefix is shared token for token.
            let prompt_ids = [special.as_slice(), &ids].concat();
            samples.push(Sample { prompt, prompt_ids, output_len: spec.output_len });
        }
    }
    samples.shuffle(&mut rng);
    Ok(samples)
}

/// [`sharegpt`] from the `--dataset-path` flag, which that dataset requires.
pub fn sharegpt_flag(
    tokenizer: &Tokenizer,
    path: Option<&Path>,
    num_prompts: usize,
    fixed_output_len: Option<usize>,
    seed: u64,
) -> Result<Vec<Sample>> {
    let Some(path) = path else { bail!("--dataset-name sharegpt needs --dataset-path") };
    sharegpt(tokenizer, path, num_prompts, fixed_output_len, seed)
}

/// vLLM's ShareGPT loader: conversations with at least two turns, the first as the prompt and
/// the second's length as the output length (or `fixed_output_len`), filtered as vLLM filters.
pub fn sharegpt(
    tokenizer: &Tokenizer,
    path: &Path,
    num_prompts: usize,
    fixed_output_len: Option<usize>,
    seed: u64,
) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a ShareGPT JSON list", path.display()))?;
    let mut conversations: Vec<(String, String)> = entries
        .iter()
        .filter_map(|e| {
            let turns = e.get("conversations")?.as_array()?;
            let text = |i: usize| turns.get(i)?.get("value")?.as_str().map(str::to_string);
            Some((text(0)?, text(1)?))
        })
        .collect();
    conversations.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut samples = Vec::new();
    for (prompt, completion) in conversations {
        if samples.len() == num_prompts {
            break;
        }
        let prompt_ids = tokenizer.encode(&prompt, true)?;
        let output_len = match fixed_output_len {
            Some(n) => n,
            None => tokenizer.encode(&completion, false)?.len(),
        };
        let too_short = prompt_ids.len() < 4 || (fixed_output_len.is_none() && output_len < 4);
        if too_short || prompt_ids.len() > 1024 || prompt_ids.len() + output_len > 2048 {
            continue;
        }
        samples.push(Sample { prompt, prompt_ids, output_len });
    }
    if samples.is_empty() {
        bail!("{} has no usable conversations (two turns, prompt 4..=1024 tokens)", path.display());
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        ferrite_engine::model::loader::load_tokenizer(dir.to_str().unwrap()).unwrap()
    }

    #[test]
    fn random_prompts_have_the_asked_lengths_and_are_reproducible() {
        let tok = tokenizer();
        let spec =
            RandomSpec { num_prompts: 20, input_len: 40, output_len: 8, range_ratio: 0.0, prefix_len: 0 };
        let a = random(&tok, &spec, 7).unwrap();
        for s in &a {
            assert_eq!(s.output_len, 8);
            assert_eq!(tok.encode(&s.prompt, true).unwrap(), s.prompt_ids, "text and ids agree");
            assert_eq!(s.prompt_ids.len(), 40, "the length asked for, special tokens included");
        }
        let b = random(&tok, &spec, 7).unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.prompt == y.prompt));
        let c = random(&tok, &spec, 8).unwrap();
        assert!(a.iter().zip(&c).any(|(x, y)| x.prompt != y.prompt));

        let spread = RandomSpec { range_ratio: 0.5, prefix_len: 5, ..spec };
        let lens: Vec<usize> = random(&tok, &spread, 1).unwrap().iter().map(|s| s.output_len).collect();
        assert!(lens.iter().all(|&l| (4..=12).contains(&l)), "{lens:?}");
        assert!(lens.iter().any(|&l| l != lens[0]), "lengths vary with a range ratio: {lens:?}");
    }

    #[test]
    fn prefix_repetition_shares_prefixes() {
        let tok = tokenizer();
        let spec = PrefixRepetitionSpec {
            num_prompts: 12,
            prefix_len: 16,
            suffix_len: 8,
            num_prefixes: 3,
            output_len: 5,
        };
        let s = prefix_repetition(&tok, &spec, 0).unwrap();
        assert_eq!(s.len(), 12);
        let bos = tok.encode("", true).unwrap().len();
        let mut prefixes: Vec<&[u32]> = s.iter().map(|x| &x.prompt_ids[..bos + 16]).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 3);
        assert!(s.iter().all(|x| x.prompt_ids.len() == bos + 24 && x.output_len == 5));
    }

    #[test]
    fn sharegpt_takes_two_turn_conversations() {
        let tok = tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sg.json");
        let conv = |a: &str, b: &str| serde_json::json!({"conversations": [{"from": "human", "value": a}, {"from": "gpt", "value": b}]});
        let long = "the quick brown fox jumps over the lazy dog ".repeat(3);
        let data = serde_json::json!([conv(&long, &long), {"conversations": [{"value": "one turn"}]}, conv("hi", &long)]);
        std::fs::write(&path, data.to_string()).unwrap();
        let s = sharegpt(&tok, &path, 10, None, 0).unwrap();
        assert_eq!(s.len(), 1, "the one-turn and the too-short prompt are dropped");
        assert_eq!(s[0].output_len, tok.encode(&long, false).unwrap().len());
        assert_eq!(sharegpt(&tok, &path, 10, Some(3), 0).unwrap()[0].output_len, 3);
    }
}
