//! Streaming detokenization: token ids in, text deltas out, never half of a multi-byte character
//! and never a byte of a stop string.
//!
//! Two layers. [`IncrementalDecoder`] turns ids into final text: it decodes a small window of
//! ids (prefix/read offsets, as Hugging Face text-generation-inference and vLLM do) so the cost
//! per token stays constant, and so tokenizers whose decoding depends on the neighbours
//! (SentencePiece's leading spaces) give the same text as a full decode. [`Detokenizer`] is the
//! engine's per-sequence object on top: it searches that text for stop strings and holds back a
//! tail that might still become one, so what it streams never has to be taken back.

use crate::error::EngineError;
use crate::model::tokenizer::Tokenizer;
use crate::request::RequestError;

/// The replacement character: what a lossy decode shows for bytes that are not (yet) UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

/// UTF-8-safe incremental decoding of one sequence's ids.
///
/// Invariant: the text returned so far (the concatenation of all `push` results) is the decode of
/// `ids[..prefix_offset]`, then the decode of `ids[prefix_offset..read_offset]`, then
/// `read_text_bytes` bytes of the decode of `ids[read_offset..]` (decoded with the window as
/// left context). `prefix_offset` and `read_offset` only move to points where the decode did not
/// end in U+FFFD, i.e. where the bytes end on a complete character, so decoding from there on
/// gives the same text as decoding everything.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    read_text_bytes: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { skip_special_tokens, ..Default::default() }
    }

    /// Adds one token; returns the text that became final with it (often empty).
    ///
    /// Text is final up to a trailing run of U+FFFD: only that run can still change (it may be
    /// the first bytes of a character whose other bytes come with the next tokens; a lossy
    /// UTF-8 decode, and byte-fallback, replace only the unfinished tail). The window moves on
    /// once the decode ends on a complete character, so it stays a few ids long, except across a
    /// run of tokens that keep ending in invalid bytes.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let (prefix, window) = self.decode_window(tokenizer)?;
        let stable = window.trim_end_matches(REPLACEMENT);
        // `None` when the decode is shorter than what was returned or does not continue it on a
        // character boundary (a decoder that rewrote its left context): wait for more ids.
        let Some(delta) = stable.get(prefix.len() + self.read_text_bytes..) else {
            return Ok(String::new());
        };
        let delta = delta.to_string();
        if stable.len() == window.len() && window.len() > prefix.len() {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            self.read_text_bytes = 0;
        } else {
            self.read_text_bytes += delta.len();
        }
        Ok(delta)
    }

    /// Whatever is still held back (incomplete bytes at the very end), decoded as is (U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, EngineError> {
        let (prefix, window) = self.decode_window(tokenizer)?;
        let rest = window.get(prefix.len() + self.read_text_bytes..).unwrap_or_default().to_string();
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.read_text_bytes = 0;
        Ok(rest)
    }

    /// The decodes of `ids[prefix_offset..read_offset]` and of `ids[prefix_offset..]`.
    fn decode_window(&self, tokenizer: &Tokenizer) -> Result<(String, String), EngineError> {
        let prefix =
            tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let window = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok((prefix, window))
    }
}

/// How one sequence's ids become text (the detokenization part of vLLM's `SamplingParams`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetokenizerParams {
    /// Drop special tokens (`<|im_end|>`, ...) from the text. Default true, as in vLLM.
    pub skip_special_tokens: bool,
    /// The sequence ends where one of these appears in the text. Non-empty strings.
    pub stop: Vec<String>,
    /// Keep the matched stop string at the end of the text (else the text ends just before it).
    pub include_stop_str_in_output: bool,
}

impl Default for DetokenizerParams {
    fn default() -> Self {
        Self { skip_special_tokens: true, stop: Vec::new(), include_stop_str_in_output: false }
    }
}

impl DetokenizerParams {
    /// An empty stop string would match before any text; it is an error, not a silent no-op.
    pub fn validate(&self) -> Result<(), RequestError> {
        match self.stop.iter().position(String::is_empty) {
            Some(i) => Err(RequestError::out_of_range(
                "stop",
                format!("stop[{i}] is an empty string; stop strings must be non-empty"),
            )),
            None => Ok(()),
        }
    }
}

/// A stop string found in the text: the sequence ends there (finish_reason "stop").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopMatch {
    /// Index into [`DetokenizerParams::stop`].
    pub stop_index: usize,
    /// The stop string itself (vLLM's `stop_reason`).
    pub text: String,
}

/// What one token added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DetokenizerStep {
    /// Text to stream now; may be empty (an unfinished character, a possible stop string).
    pub delta: String,
    /// Set on the token that completes a stop string; the sequence is finished then, and
    /// `delta` ends just before the stop string (or just after it with
    /// `include_stop_str_in_output`).
    pub stop: Option<StopMatch>,
}

/// One sequence's streaming detokenizer: UTF-8-safe text, stop strings with hold-back.
///
/// The concatenation of every `delta` and of `finish`'s result is the final text, [`Self::text`].
/// Without a stop it equals the tokenizer's decode of all ids.
#[derive(Debug)]
pub struct Detokenizer {
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    include_stop_str_in_output: bool,
    /// Length of the longest stop string, bytes.
    max_stop_bytes: usize,
    /// Per stop string, KMP's failure function: `borders[i]` is the length of the longest
    /// proper prefix of `stop[..=i]` that is also its suffix. The hold-back then costs one
    /// pass over the unreleased text, not one comparison per candidate length.
    borders: Vec<Vec<usize>>,
    /// The final text decoded so far: `text[..emitted_bytes]` was streamed, the rest is held
    /// back because it is the beginning of a stop string. Invariant: no byte of a later stop
    /// match lies in `text[..emitted_bytes]` (the held-back tail is the *longest* suffix that
    /// begins a stop string).
    text: String,
    emitted_bytes: usize,
    /// A stop string matched or `finish` ran; later tokens add nothing.
    finished: bool,
}

impl Detokenizer {
    /// `params` passed [`DetokenizerParams::validate`] (`EngineHandle::submit` runs it).
    pub fn new(params: DetokenizerParams) -> Self {
        debug_assert_eq!(params.validate(), Ok(()));
        let max_stop_bytes = params.stop.iter().map(String::len).max().unwrap_or(0);
        let borders = params.stop.iter().map(|s| borders(s.as_bytes())).collect();
        Self {
            decoder: IncrementalDecoder::new(params.skip_special_tokens),
            stop: params.stop,
            include_stop_str_in_output: params.include_stop_str_in_output,
            max_stop_bytes,
            borders,
            text: String::new(),
            emitted_bytes: 0,
            finished: false,
        }
    }

    /// Adds one generated token. After a stop (or `finish`) it returns an empty step: text after
    /// a stop string is never emitted.
    pub fn push(&mut self, tokenizer: &Tokenizer, token_id: u32) -> Result<DetokenizerStep, EngineError> {
        if self.finished {
            return Ok(DetokenizerStep::default());
        }
        let new_text = self.decoder.push(tokenizer, token_id)?;
        if new_text.is_empty() {
            return Ok(DetokenizerStep::default());
        }
        // A match that ends in the new text starts at most `max_stop_bytes - 1` bytes before
        // it; one that ends earlier would have been found by an earlier token.
        let search_from = floor_char_boundary(
            &self.text,
            self.text.len().saturating_sub(self.max_stop_bytes.saturating_sub(1)),
        );
        self.text.push_str(&new_text);

        if let Some((stop_index, start, end)) = self.find_stop(search_from) {
            let cut = if self.include_stop_str_in_output { end } else { start };
            debug_assert!(cut >= self.emitted_bytes, "a byte of the stop string was streamed");
            let cut = cut.max(self.emitted_bytes);
            self.text.truncate(cut);
            let delta = self.take_delta(cut);
            self.finished = true;
            let stop = StopMatch { stop_index, text: self.stop[stop_index].clone() };
            return Ok(DetokenizerStep { delta, stop: Some(stop) });
        }
        let release_to = self.text.len() - self.held_back_bytes();
        Ok(DetokenizerStep { delta: self.take_delta(release_to), stop: None })
    }

    /// The sequence ended for another reason (length, EOS): returns everything still held back.
    /// A held-back stop-string beginning turned out not to be one; an unfinished character at
    /// the very end comes out as U+FFFD, as a full decode shows it. That last tail is not
    /// searched for stop strings (it ends in U+FFFD, so only a stop string containing U+FFFD
    /// could match it).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, EngineError> {
        if self.finished {
            return Ok(String::new());
        }
        self.finished = true;
        let tail = self.decoder.finish(tokenizer)?;
        self.text.push_str(&tail);
        Ok(self.take_delta(self.text.len()))
    }

    /// The text streamed so far; after a stop or `finish`, the final text.
    #[cfg(test)]
    fn text(&self) -> &str {
        &self.text[..self.emitted_bytes]
    }

    /// `text[emitted_bytes..to]`, now counted as emitted.
    fn take_delta(&mut self, to: usize) -> String {
        let delta = self.text[self.emitted_bytes..to].to_string();
        self.emitted_bytes = to;
        delta
    }

    /// The stop match in `text[from..]` that ends first (as if the text arrived one character at
    /// a time); among those ending at the same byte, the longest, so no byte of a matched stop
    /// string stays in the output. Returns (stop index, start, end) in bytes of `text`.
    ///
    /// vLLM instead takes the first stop string in list order that matches the new text, which
    /// depends on how the text was split into tokens.
    fn find_stop(&self, from: usize) -> Option<(usize, usize, usize)> {
        let mut best: Option<(usize, usize, usize)> = None;
        let window = &self.text[from..];
        for (i, stop) in self.stop.iter().enumerate() {
            // Never search for a string longer than the text it could match.
            if stop.len() > window.len() {
                continue;
            }
            let Some(pos) = window.find(stop.as_str()) else { continue };
            let (start, end) = (from + pos, from + pos + stop.len());
            if best.is_none_or(|(_, s, e)| end < e || (end == e && start < s)) {
                best = Some((i, start, end));
            }
        }
        best
    }

    /// Length of the longest suffix of the not-yet-streamed text that begins a stop string:
    /// per stop string, KMP over the last `len - 1` unreleased bytes (linear in them).
    fn held_back_bytes(&self) -> usize {
        let text = self.text.as_bytes();
        let unreleased = &text[self.emitted_bytes..];
        self.stop
            .iter()
            .zip(&self.borders)
            .map(|(stop, borders)| {
                let stop = stop.as_bytes();
                let tail = &unreleased[unreleased.len().saturating_sub(stop.len() - 1)..];
                // `matched`: the longest prefix of `stop` that is a suffix of what was read.
                let mut matched = 0;
                for &b in tail {
                    while matched > 0 && (matched == stop.len() || stop[matched] != b) {
                        matched = borders[matched - 1];
                    }
                    if stop[matched] == b {
                        matched += 1;
                    }
                }
                // A whole match would have been found as a stop; a prefix held back is shorter.
                while matched == stop.len() {
                    matched = borders[matched - 1];
                }
                matched
            })
            .max()
            .unwrap_or(0)
    }
}

/// KMP's failure function of `s` (see [`Detokenizer`]'s `borders`).
fn borders(s: &[u8]) -> Vec<usize> {
    let mut out = vec![0; s.len()];
    let mut k = 0;
    for i in 1..s.len() {
        while k > 0 && s[i] != s[k] {
            k = out[k - 1];
        }
        if s[i] == s[k] {
            k += 1;
        }
        out[i] = k;
    }
    out
}

/// The largest character boundary of `s` at or below `index` (`str::floor_char_boundary` is
/// newer than our minimum Rust version).
fn floor_char_boundary(s: &str, mut index: usize) -> usize {
    while !s.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::Value;

    use super::*;
    use crate::model::tokenizer::TokenizerConfig;

    fn fixture_dir(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
    }

    fn tokenizer(fixture: &str) -> Tokenizer {
        let dir = fixture_dir(fixture);
        let config = TokenizerConfig::from_file(&dir.join("tokenizer_config.json")).unwrap();
        Tokenizer::load(&dir.join("tokenizer.json"), config).unwrap()
    }

    /// Fixtures with distinct tokenizers (llama: ByteLevel pre-tokenizer, qwen: Split + NFC) or
    /// distinct greedy ids.
    const FIXTURES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

    /// Id sequences from a fixture's reference.json: every prompt, its greedy continuation (random
    /// weights, so random byte tokens and partial UTF-8), both together, and the chat prompts.
    fn sequences(fixture: &str) -> Vec<Vec<u32>> {
        let text = std::fs::read_to_string(fixture_dir(fixture).join("reference.json")).unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        let ids = |v: &Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|x| u32::try_from(x.as_u64().unwrap()).unwrap()).collect()
        };
        let mut out = Vec::new();
        for p in reference["prompts"].as_array().unwrap() {
            let (prompt, greedy) = (ids(&p["prompt_ids"]), ids(&p["greedy_ids"]));
            out.push([prompt.as_slice(), greedy.as_slice()].concat());
            out.push(prompt);
            out.push(greedy);
        }
        for c in reference["chat"].as_array().unwrap() {
            out.push(ids(&c["prompt_ids"]));
        }
        out
    }

    fn stable(text: &str) -> &str {
        text.trim_end_matches(REPLACEMENT)
    }

    /// Everything one stream produced: the step of each token, then `finish`'s text.
    struct Run {
        steps: Vec<DetokenizerStep>,
        /// `text()` after each token.
        texts: Vec<String>,
        finished: String,
        text: String,
    }

    fn stream(tok: &Tokenizer, params: DetokenizerParams, ids: &[u32]) -> Run {
        let mut d = Detokenizer::new(params);
        let mut steps = Vec::new();
        let mut texts = Vec::new();
        for &id in ids {
            steps.push(d.push(tok, id).unwrap());
            texts.push(d.text().to_string());
        }
        let finished = d.finish(tok).unwrap();
        let text = d.text().to_string();
        let concatenated: String =
            steps.iter().map(|s| s.delta.as_str()).chain([finished.as_str()]).collect();
        assert_eq!(concatenated, text, "the deltas add up to text()");
        Run { steps, texts, finished, text }
    }

    fn with_stop(stop: Vec<String>, include_stop_str_in_output: bool) -> DetokenizerParams {
        DetokenizerParams { stop, include_stop_str_in_output, ..Default::default() }
    }

    /// `stable_len[k]`: bytes of the decode of `ids[..k]` that are final (before a trailing
    /// U+FFFD run), checked to be a prefix of the full decode.
    fn stable_lens(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Vec<usize> {
        let full = tok.decode(ids, skip_special_tokens).unwrap();
        (0..=ids.len())
            .map(|k| {
                let decoded = tok.decode(&ids[..k], skip_special_tokens).unwrap();
                assert!(full.starts_with(stable(&decoded)), "decoding more ids never rewrites final text");
                stable(&decoded).len()
            })
            .collect()
    }

    /// Byte offset `n` characters before (`n < 0`) or after `i` in `s`, clamped to the ends.
    fn chars_from(s: &str, i: usize, n: isize) -> usize {
        if n < 0 {
            s[..i].char_indices().rev().nth(n.unsigned_abs() - 1).map_or(0, |(j, _)| j)
        } else {
            s[i..].char_indices().nth(n.unsigned_abs()).map_or(s.len(), |(j, _)| i + j)
        }
    }

    /// The reference semantics of several stop strings over the whole text: the match that ends
    /// first, the longest among those; returns (stop index, start, end).
    fn first_stop(full: &str, stops: &[String]) -> Option<(usize, usize, usize)> {
        stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| full.find(s.as_str()).map(|start| (i, start, start + s.len())))
            .min_by_key(|&(i, start, end)| (end, start, i))
    }

    /// Streams `ids` with `stops` and checks it against [`first_stop`] on the full decode: the
    /// stop is reported once, on the first token whose final text reaches the match's end; no
    /// byte of the match is streamed before; the text is cut before (or after) the match.
    /// Returns the token index of the stop.
    fn check_stop(tok: &Tokenizer, ids: &[u32], stops: &[String], include: bool, lens: &[usize]) -> usize {
        let full = tok.decode(ids, true).unwrap();
        let (index, start, end) = first_stop(&full, stops).expect("a stop string of the text");
        let stop_token = lens.iter().position(|&len| len >= end).unwrap() - 1;
        let run = stream(tok, with_stop(stops.to_vec(), include), ids);
        let ctx = format!("stops {stops:?}, include {include}, text {full:?}");
        for (k, (step, text)) in run.steps.iter().zip(&run.texts).enumerate() {
            if k < stop_token {
                assert_eq!(step.stop, None, "{ctx}: stop too early, token {k}");
                assert!(text.len() <= start, "{ctx}: token {k} streamed {text:?}, into the match at {start}");
            } else if k == stop_token {
                let expected = StopMatch { stop_index: index, text: stops[index].clone() };
                assert_eq!(step.stop, Some(expected), "{ctx}: token {k}");
            } else {
                assert_eq!(*step, DetokenizerStep::default(), "{ctx}: token {k} after the stop");
            }
        }
        assert_eq!(run.finished, "", "{ctx}");
        let cut = if include { end } else { start };
        assert_eq!(run.text, full[..cut], "{ctx}");
        stop_token
    }

    #[test]
    fn deltas_add_up_to_the_full_decode_and_never_split_a_character() {
        let mut split_characters = 0;
        for fixture in FIXTURES {
            let tok = tokenizer(fixture);
            for ids in sequences(fixture) {
                for skip_special_tokens in [true, false] {
                    let params = DetokenizerParams { skip_special_tokens, ..Default::default() };
                    let run = stream(&tok, params, &ids);
                    let full = tok.decode(&ids, skip_special_tokens).unwrap();
                    assert_eq!(run.text, full);
                    let mut at = 0;
                    for (k, step) in run.steps.iter().enumerate() {
                        let decoded = tok.decode(&ids[..=k], skip_special_tokens).unwrap();
                        // Every delta is the final text at its place, U+FFFD included...
                        assert_eq!(
                            full.get(at..at + step.delta.len()),
                            Some(step.delta.as_str()),
                            "token {k}"
                        );
                        at += step.delta.len();
                        // ...and all of the final text is out as soon as it is final.
                        assert_eq!(run.texts[k], stable(&decoded), "token {k}");
                        // A trailing U+FFFD that is not in the final text: a split character.
                        let replacement_at = decoded.len().saturating_sub(REPLACEMENT.len_utf8());
                        if decoded.ends_with(REPLACEMENT)
                            && full.get(replacement_at..decoded.len()) != Some("\u{FFFD}")
                        {
                            split_characters += 1;
                        }
                    }
                }
            }
        }
        assert!(split_characters > 10, "the fixtures split characters across tokens ({split_characters})");
    }

    #[test]
    fn a_character_split_over_tokens_comes_out_whole() {
        let tok = tokenizer("qwen2");
        let ids = tok.encode("a🦀", false).unwrap();
        assert!(ids.len() >= 3, "🦀 is several byte tokens: {ids:?}");
        let mut d = Detokenizer::new(DetokenizerParams::default());
        let deltas: Vec<String> = ids.iter().map(|&id| d.push(&tok, id).unwrap().delta).collect();
        let mut expected = vec![String::new(); ids.len()];
        expected[0] = "a".into();
        expected[ids.len() - 1] = "🦀".into();
        assert_eq!(deltas, expected);

        // Cut short, the unfinished character is flushed as a full decode shows it.
        let mut d = Detokenizer::new(DetokenizerParams::default());
        assert_eq!(d.push(&tok, ids[0]).unwrap().delta, "a");
        assert_eq!(d.push(&tok, ids[1]).unwrap().delta, "");
        assert_eq!(d.finish(&tok).unwrap(), "\u{FFFD}");
        assert_eq!(d.text(), "a\u{FFFD}");
    }

    #[test]
    fn stop_string_across_tokens_is_never_streamed() {
        let mut cases = 0;
        for fixture in FIXTURES {
            let tok = tokenizer(fixture);
            for ids in sequences(fixture) {
                let lens = stable_lens(&tok, &ids, true);
                let full = tok.decode(&ids, true).unwrap();
                // Token boundaries in the text; the stop string is 2 characters either side.
                let mut boundaries: Vec<usize> =
                    lens.iter().copied().filter(|&b| b > 0 && b < full.len()).collect();
                boundaries.dedup();
                for &b in boundaries.iter().step_by(3) {
                    // An unfinished character at the very end is only flushed by `finish`,
                    // which does not look for stop strings.
                    let end = chars_from(&full, b, 2).min(stable(&full).len());
                    if end <= b {
                        continue;
                    }
                    let stop = full[chars_from(&full, b, -2)..end].to_string();
                    for include in [false, true] {
                        check_stop(&tok, &ids, std::slice::from_ref(&stop), include, &lens);
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 500, "{cases} cases");
    }

    #[test]
    fn earliest_ending_stop_string_wins() {
        // Hand-computed: "of" ends before "middle of a" although that one starts first and is
        // listed first.
        let tok = tokenizer("llama");
        let ids = tok.encode("In the middle of a quiet valley", false).unwrap();
        let lens = stable_lens(&tok, &ids, true);
        let stops = vec!["middle of a".to_string(), "of".to_string(), "valley".to_string()];
        check_stop(&tok, &ids, &stops, false, &lens);
        let run = stream(&tok, with_stop(stops, false), &ids);
        assert_eq!(run.text, "In the middle ");
        assert_eq!(
            run.steps.iter().filter_map(|s| s.stop.as_ref()).map(|s| s.stop_index).collect::<Vec<_>>(),
            [1]
        );

        // Two stop strings completing on the same token: A starts earlier and ends with the
        // token, B starts one character later and ends inside it. B wins; a list-order rule or
        // an earliest-start rule would pick A.
        let mut same_token = 0;
        for fixture in FIXTURES {
            let tok = tokenizer(fixture);
            for ids in sequences(fixture) {
                let lens = stable_lens(&tok, &ids, true);
                let full = tok.decode(&ids, true).unwrap();
                for k in 1..ids.len() {
                    let (b, next) = (lens[k], lens[k + 1]);
                    if b == 0 || next <= chars_from(&full, b, 1) {
                        continue; // the token adds fewer than two final characters
                    }
                    let a = full[chars_from(&full, b, -2)..next].to_string();
                    let b_stop = full[chars_from(&full, b, -1)..chars_from(&full, b, 1)].to_string();
                    let stops = vec![a, b_stop];
                    let (index, _, _) = first_stop(&full, &stops).unwrap();
                    let stop_token = check_stop(&tok, &ids, &stops, false, &lens);
                    check_stop(&tok, &ids, &stops, true, &lens);
                    if index == 1 && stop_token == k && full.find(&stops[0]) == Some(chars_from(&full, b, -2))
                    {
                        same_token += 1;
                    }
                }
            }
        }
        assert!(same_token > 50, "{same_token} cases where both complete on the same token");
    }

    #[test]
    fn unfinished_stop_string_is_held_back_then_released_by_finish() {
        // Hand-computed: "sat" might begin "sat down", so it waits; the sequence ends without it.
        let tok = tokenizer("llama");
        let ids = tok.encode("the cat sat", false).unwrap();
        let run = stream(&tok, with_stop(vec!["sat down".into()], false), &ids);
        assert_eq!(run.texts.last().unwrap(), "the cat ");
        assert_eq!(run.finished, "sat");
        assert_eq!(run.text, "the cat sat");

        // Every sequence with a stop string = its last three final characters + a character
        // that never occurs: those three characters are held back to the end.
        for fixture in FIXTURES {
            let tok = tokenizer(fixture);
            for ids in sequences(fixture) {
                let full = tok.decode(&ids, true).unwrap();
                let final_text = stable(&full);
                let held = chars_from(final_text, final_text.len(), -3);
                let stop = format!("{}\u{E000}", &final_text[held..]);
                let run = stream(&tok, with_stop(vec![stop], false), &ids);
                assert!(run.steps.iter().all(|s| s.stop.is_none()));
                assert_eq!(run.texts.last().unwrap(), &final_text[..held], "{full:?}");
                assert_eq!(run.finished, full[held..]);
                assert_eq!(run.text, full);
            }
        }
    }

    #[test]
    fn skip_special_tokens_drops_them_from_text_and_stop_search() {
        let tok = tokenizer("qwen2");
        let text = std::fs::read_to_string(fixture_dir("qwen2").join("reference.json")).unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        let chat = &reference["chat"][0];
        let rendered = chat["rendered"].as_str().unwrap();
        let ids: Vec<u32> =
            chat["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let content = chat["messages"][0]["content"].as_str().unwrap();

        let kept = stream(&tok, DetokenizerParams { skip_special_tokens: false, ..Default::default() }, &ids);
        assert_eq!(kept.text, rendered);
        let skipped = stream(&tok, DetokenizerParams::default(), &ids);
        assert_eq!(skipped.text, format!("user\n{content}\nassistant\n"));

        let im_end = vec!["<|im_end|>".to_string()];
        let params = DetokenizerParams { skip_special_tokens: false, ..with_stop(im_end.clone(), false) };
        let run = stream(&tok, params, &ids);
        assert_eq!(run.text, format!("<|im_start|>user\n{content}"));
        assert_eq!(run.steps.iter().filter(|s| s.stop.is_some()).count(), 1);
        let run = stream(&tok, with_stop(im_end, false), &ids);
        assert_eq!(run.text, skipped.text, "a skipped special token is not text to stop on");
    }

    #[test]
    fn empty_stop_string_is_rejected_with_its_index() {
        let err = with_stop(vec!["a".into(), String::new()], false).validate().unwrap_err();
        assert_eq!(err.to_string(), "stop[1] is an empty string; stop strings must be non-empty");
    }

    #[test]
    fn decode_window_stays_small_over_a_long_output() {
        let tok = tokenizer("llama");
        let text =
            "The old lighthouse keeper climbed the spiral stairs every evening. Zürich 日本 🦀! ".repeat(60);
        let ids = tok.encode(&text, false).unwrap();
        let mut d = Detokenizer::new(DetokenizerParams::default());
        let mut widest = 0;
        for &id in &ids {
            d.push(&tok, id).unwrap();
            widest = widest.max(d.decoder.ids.len() - d.decoder.prefix_offset);
        }
        assert!(ids.len() > 2000);
        assert!(widest <= 8, "decode window grew to {widest} ids");
        assert_eq!(d.text(), text);
    }

    /// The hold-back (KMP over the unreleased tail) equals its definition, checked naively:
    /// the longest proper prefix of any stop string that the unreleased text ends with.
    #[test]
    fn held_back_bytes_match_the_naive_definition() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let word = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
            (0..rng.random_range(1..=max)).map(|_| ['a', 'b', 'é'][rng.random_range(0..3)]).collect()
        };
        for _ in 0..3000 {
            let stops: Vec<String> = (0..rng.random_range(1..=3)).map(|_| word(&mut rng, 6)).collect();
            let mut d = Detokenizer::new(with_stop(stops.clone(), false));
            d.text = word(&mut rng, 12);
            let emitted = floor_char_boundary(&d.text, rng.random_range(0..=d.text.len()));
            d.emitted_bytes = emitted;
            let unreleased = &d.text[emitted..];
            let naive = stops
                .iter()
                .flat_map(|s| {
                    (1..s.len()).filter(|&n| s.is_char_boundary(n) && unreleased.ends_with(&s[..n]))
                })
                .max()
                .unwrap_or(0);
            assert_eq!(d.held_back_bytes(), naive, "stops {stops:?}, unreleased {unreleased:?}");
        }
    }

    /// Stop strings far longer than the text (never searched for: they cannot match) whose
    /// prefixes the whole output is: all of it is held back, then released by `finish`. (With
    /// the hold-back quadratic in the stop's length this took minutes; now milliseconds.)
    #[test]
    fn long_stop_strings_cost_linear_work() {
        let tok = tokenizer("llama");
        let stops: Vec<String> = (0..16).map(|i| format!("{}{i}", "ab".repeat(32 << 10))).collect();
        let mut d = Detokenizer::new(with_stop(stops, false));
        let ids = tok.encode(&"ab".repeat(2000), false).unwrap();
        let mut streamed = String::new();
        for &id in &ids {
            let step = d.push(&tok, id).unwrap();
            assert!(step.stop.is_none());
            streamed.push_str(&step.delta);
        }
        // Everything is a prefix of every stop string, so it is all held back; finish releases it.
        assert_eq!(streamed, "");
        assert_eq!(d.finish(&tok).unwrap(), "ab".repeat(2000));
    }
}
