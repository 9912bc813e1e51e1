//! OpenAI request and response bodies (the subset ferrite implements), as serde types.
//! Unknown request fields are ignored, as OpenAI's own server does; fields ferrite cannot honour
//! yet are declared so that validation can refuse them by name instead of ignoring them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `prompt`: a string, a list of strings, token ids, or a list of token-id lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by completions and chat, with vLLM's extras.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<usize>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    // vLLM extras
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub min_tokens: Option<usize>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// Lower runs first under `--scheduling-policy priority` (vLLM's field; default 0).
    pub priority: Option<i32>,
    /// Stop before the request's running cost would pass this many dollars (ferrite's).
    pub max_cost_usd: Option<f64>,
    /// The whole request's budget in milliseconds from its arrival: generation stops there
    /// (`stop_reason: "deadline"`) with what it has (ferrite's).
    pub deadline_ms: Option<f64>,
    /// The first token's budget in milliseconds: a request predicted to miss it is refused at
    /// once (429) (ferrite's).
    pub ttft_deadline_ms: Option<f64>,
    /// vLLM's structured-output fields (`response_format` is each endpoint's own).
    #[serde(flatten)]
    pub structured: crate::structured::StructuredFields,
}

/// The name of the first field that is present and not `null`.
fn first_given<const N: usize>(fields: [(&'static str, &Option<Value>); N]) -> Option<&'static str> {
    fields.into_iter().find(|(_, v)| v.as_ref().is_some_and(|v| !v.is_null())).map(|(name, _)| name)
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Prompt>,
    pub max_tokens: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<Value>,
    pub suffix: Option<Value>,
    pub response_format: Option<Value>,
}

/// Message content: a string, or a list of parts of which ferrite reads the text ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant turn's calls: `{"id", "type": "function", "function": {"name", "arguments"}}`.
    pub tool_calls: Option<Vec<Value>>,
    /// A `tool` turn's answer to this call.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    /// Extra variables for the chat template (e.g. `{"enable_thinking": false}`).
    pub chat_template_kwargs: Option<Value>,
    // Fields ferrite does not implement (refused by name): the deprecated function-calling
    // pair (use `tools`), and continuing the last assistant message.
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub continue_final_message: Option<Value>,
}

impl ChatRequest {
    /// The first chat-only field given that ferrite does not implement.
    pub fn first_unsupported(&self) -> Option<&'static str> {
        first_given([
            ("functions", &self.functions),
            ("function_call", &self.function_call),
            ("continue_final_message", &self.continue_final_message),
        ])
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// ferrite's extras (clients ignore unknown fields): the device time this request took
    /// (its share of every engine step it was in), that time at the device's price, and its
    /// share of the measured energy (`null` where no power meter can be read).
    pub device_seconds: f64,
    pub cost_usd: f64,
    pub energy_joules: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// With `messages`: rendered by the chat template as a chat request's would be.
    pub tools: Option<Vec<Value>>,
    pub chat_template_kwargs: Option<Value>,
    pub add_special_tokens: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}
