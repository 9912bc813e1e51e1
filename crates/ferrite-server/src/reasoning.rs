//! Reasoning models (`--reasoning-parser`): the thinking between `<think>` and `</think>` is
//! answered as `message.reasoning_content` (vLLM's field; `delta.reasoning_content` in a
//! stream), the rest as `content`, which is what tool calls are read from and what a grammar
//! constrains. [`AnswerReader`] puts the thinking and the call readers together: one reader for
//! the whole answer and the stream.

use crate::tools::{CallReader, Mode, Piece};

pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

/// The reasoning formats ferrite reads: both write `<think>…</think>`. Qwen3 opens the thinking
/// itself (or its template closes an empty one when `enable_thinking` is false); DeepSeek-R1's
/// template opens it in the prompt. Which applies is read from the prompt, so the two names
/// behave alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    Qwen3,
    DeepseekR1,
}

impl ReasoningParser {
    pub const NAMES: [&'static str; 2] = ["qwen3", "deepseek_r1"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "qwen3" => Some(Self::Qwen3),
            "deepseek_r1" => Some(Self::DeepseekR1),
            _ => None,
        }
    }
}

/// Whether the rendered prompt leaves a thinking open for the answer to continue: its last
/// `<think>` comes after its last `</think>`.
pub fn opens_thinking(prompt: &str) -> bool {
    match (prompt.rfind(OPEN), prompt.rfind(CLOSE)) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but whitespace yet: the answer may still open a thinking.
    Start,
    Thinking,
    /// After the thinking (or without one): content. `trim` drops the whitespace that
    /// follows `</think>`.
    Answer {
        trim: bool,
    },
}

/// Splits a reasoning model's text into thinking and answer, token by token.
pub struct ThinkReader {
    phase: Phase,
    held: String,
}

impl ThinkReader {
    /// `started`: the prompt opened the thinking ([`opens_thinking`]).
    pub fn new(started: bool) -> Self {
        let phase = if started { Phase::Thinking } else { Phase::Start };
        Self { phase, held: String::new() }
    }

    /// The pieces (only `Reasoning` and `Content`) that `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.phase {
                Phase::Start => {
                    let start = self.held.trim_start();
                    if let Some(rest) = start.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.phase = Phase::Thinking;
                    } else if start.is_empty() || OPEN.starts_with(start) {
                        return out;
                    } else {
                        self.phase = Phase::Answer { trim: false };
                    }
                }
                Phase::Thinking => match self.held.find(CLOSE) {
                    Some(end) => {
                        let thought: String = self.held.drain(..end).collect();
                        self.held.drain(..CLOSE.len());
                        out.push(Piece::Reasoning(thought));
                        self.phase = Phase::Answer { trim: true };
                    }
                    None => {
                        let keep = partial_suffix(&self.held, CLOSE);
                        let thought: String = self.held.drain(..self.held.len() - keep).collect();
                        if !thought.is_empty() {
                            out.push(Piece::Reasoning(thought));
                        }
                        return out;
                    }
                },
                Phase::Answer { trim } => {
                    let mut text = std::mem::take(&mut self.held);
                    if trim {
                        text = text.trim_start().to_string();
                        if text.is_empty() {
                            return out;
                        }
                        self.phase = Phase::Answer { trim: false };
                    }
                    if !text.is_empty() {
                        out.push(Piece::Content(text));
                    }
                    return out;
                }
            }
        }
    }

    /// What is left when the text ends: an unfinished thinking is reasoning, a held start
    /// is content.
    pub fn finish(&mut self) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Thinking => vec![Piece::Reasoning(held)],
            Phase::Answer { trim: true } => vec![],
            _ if held.is_empty() => vec![],
            _ => vec![Piece::Content(held)],
        }
    }
}

/// How many bytes at the end of `text` could begin `marker`.
pub(crate) fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// A chat choice's text read into thinking, content and tool calls.
pub struct AnswerReader {
    think: Option<ThinkReader>,
    calls: Option<CallReader>,
}

impl AnswerReader {
    /// `None` when the text is plain content (no reasoning parser, no tools to read).
    pub fn new(thinking_started: Option<bool>, tools: Option<&Mode>) -> Option<Self> {
        if thinking_started.is_none() && tools.is_none() {
            return None;
        }
        Some(Self {
            think: thinking_started.map(ThinkReader::new),
            calls: tools.cloned().map(CallReader::new),
        })
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let pieces = match &mut self.think {
            Some(think) => think.push(text),
            None => vec![Piece::Content(text.to_string())],
        };
        self.route(pieces)
    }

    pub fn finish(&mut self) -> Vec<Piece> {
        let pieces = self.think.as_mut().map(ThinkReader::finish).unwrap_or_default();
        let mut out = self.route(pieces);
        if let Some(calls) = &mut self.calls {
            out.extend(calls.finish());
        }
        out
    }

    /// Content goes on to the call reader, when there is one.
    fn route(&mut self, pieces: Vec<Piece>) -> Vec<Piece> {
        let Some(calls) = &mut self.calls else { return pieces };
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(text) => out.extend(calls.push(&text)),
                other => out.push(other),
            }
        }
        out
    }

    pub fn finish_reason(&self, engine: &'static str) -> &'static str {
        self.calls.as_ref().map_or(engine, |c| c.finish_reason(engine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(started: bool, tokens: &[&str]) -> (String, String) {
        let mut r = ThinkReader::new(started);
        let mut pieces: Vec<Piece> = tokens.iter().flat_map(|t| r.push(t)).collect();
        pieces.extend(r.finish());
        let (mut thought, mut content) = (String::new(), String::new());
        for p in pieces {
            match p {
                Piece::Reasoning(t) => thought.push_str(&t),
                Piece::Content(t) => content.push_str(&t),
                other => panic!("{other:?}"),
            }
        }
        (thought, content)
    }

    #[test]
    fn thinking_and_answer_split_however_the_text_is_cut() {
        let text = "<think>\nLet me see: 2 < 3.\n</think>\n\nThe answer is 3.";
        for every in [1, 2, 5, 100] {
            let chars: Vec<char> = text.chars().collect();
            let tokens: Vec<String> = chars.chunks(every).map(|c| c.iter().collect()).collect();
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            assert_eq!(
                read(false, &tokens),
                ("\nLet me see: 2 < 3.\n".to_string(), "The answer is 3.".to_string()),
                "cut every {every}"
            );
        }
        // The prompt opened the thinking (DeepSeek-R1's template): only `</think>` comes.
        assert_eq!(read(true, &["a b", "</thi", "nk>", " c"]), ("a b".into(), "c".into()));
        // No thinking at all, or an unfinished one.
        assert_eq!(read(false, &["  <thin", "g> x"]), (String::new(), "  <thing> x".into()));
        assert_eq!(read(false, &["<think>still"]), ("still".into(), String::new()));
    }

    #[test]
    fn the_prompt_says_whether_thinking_is_open() {
        assert!(opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!opens_thinking("<|im_start|>assistant\n"));
        assert!(opens_thinking("<think>a</think> b <think>"));
    }

    #[test]
    fn calls_are_read_from_the_answer_not_the_thinking() {
        let mode = Mode::Auto { parser: crate::tools::Parser::Hermes, parallel: true };
        let mut r = AnswerReader::new(Some(false), Some(&mode)).unwrap();
        let text = "<think>maybe <tool_call>{\"name\": \"no\"}</tool_call></think>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>";
        let mut pieces = r.push(text);
        pieces.extend(r.finish());
        let names: Vec<&str> = pieces
            .iter()
            .filter_map(|p| if let Piece::Call { name, .. } = p { Some(name.as_str()) } else { None })
            .collect();
        assert_eq!(names, ["f"]);
        assert!(matches!(&pieces[0], Piece::Reasoning(t) if t.contains("\"no\"")));
        assert_eq!(r.finish_reason("stop"), "tool_calls");
        assert!(AnswerReader::new(None, None).is_none());
    }
}
