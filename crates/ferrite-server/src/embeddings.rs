//! `POST /v1/embeddings`, OpenAI's shape: `input` as a string, strings, token ids or lists of
//! them (at most [`MAX_INPUTS`]); `encoding_format` float or base64 (little-endian f32 bytes);
//! `dimensions` for models trained for truncation. The inputs go to the engine as one request
//! (one place in its queue), each a prefill-only sequence batched with generation.

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use base64::Engine as _;
use ferrite_engine::{EmbedRequest, RequestEvent};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::metrics::{Arrival, RequestId};
use crate::models::Served;
use crate::openai::Prompt;
use crate::response::UsageSum;
use crate::routes::{limits, off_workers, parse, required, ReadBody};
use crate::validate::{check_text_bytes, RequestLimits};
use crate::AppState;

/// The most inputs one request may carry (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Option<Prompt>,
    pub encoding_format: Option<String>,
    pub dimensions: Option<usize>,
    // OpenAI's `user` (an end-user id) is accepted as any unknown field is, and not used.
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Float,
    Base64,
}

pub async fn embeddings(
    State(state): State<AppState>,
    arrival: Option<Extension<Arrival>>,
    request_id: Option<Extension<RequestId>>,
    body: Result<ReadBody, ApiError>,
) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse(&body?.0)?;
    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                format!("encoding_format must be \"float\" or \"base64\", got {other:?}"),
            ))
        }
    };
    let model = state.models.acquire(required(&req.model)?).await?;
    let dimensions = req.dimensions;
    let request_limits = state.request_limits;
    let inputs = off_workers(&model, move |m| tokenized(m, request_limits, req.input)).await?;
    let count = inputs.len();
    let request = EmbedRequest {
        request_id: request_id.map(|Extension(RequestId(id))| id).unwrap_or_default(),
        inputs,
        dimensions,
        arrival: arrival.map_or_else(std::time::Instant::now, |Extension(Arrival(at))| at),
        priority: 0,
    };
    let mut stream = model.engine.embed(request)?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; count];
    let mut usage = UsageSum::default();
    loop {
        match stream.next().await {
            Some(RequestEvent::Embedding { index, vector }) => vectors[index] = Some(vector),
            Some(RequestEvent::Finished(u)) => {
                usage.add(&u);
                break;
            }
            Some(RequestEvent::Error(e)) => return Err(ApiError::internal(e)),
            Some(RequestEvent::Token(_) | RequestEvent::Stopped { .. }) => {
                return Err(ApiError::internal("an embedding request was answered with a token"))
            }
            None => return Err(ApiError::internal("the engine stopped before the embeddings were made")),
        }
    }
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let v = v.ok_or_else(|| ApiError::internal(format!("input {index} got no embedding")))?;
            Ok(json!({"object": "embedding", "index": index, "embedding": encode(&v, encoding)}))
        })
        .collect::<Result<Vec<Value>, ApiError>>()?;
    let mut body = json!({
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": usage.to_openai(),
    });
    // An embedding has no completion: its usage is the prompt's (and ferrite's cost extras).
    if let Some(u) = body["usage"].as_object_mut() {
        u.remove("completion_tokens");
    }
    Ok(usage.answer(body))
}

/// Every input as token ids: text is encoded with the model's special tokens (as
/// sentence-transformers does), ids are taken as given. Empty inputs and too many of them are
/// refused, naming the one at fault.
fn tokenized(
    model: &Served,
    request_limits: RequestLimits,
    input: Option<Prompt>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let bad = |message: String| ApiError::invalid(Some("input"), message);
    let input = input.ok_or_else(|| bad("`input` is required".into()))?;
    let inputs: Vec<Result<String, Vec<u32>>> = match input {
        Prompt::Text(t) => vec![Ok(t)],
        Prompt::Texts(ts) => ts.into_iter().map(Ok).collect(),
        Prompt::Tokens(ids) => vec![Err(ids)],
        Prompt::TokenLists(lists) => lists.into_iter().map(Err).collect(),
    };
    if inputs.is_empty() {
        return Err(bad("`input` is an empty list".into()));
    }
    if inputs.len() > MAX_INPUTS {
        return Err(bad(format!("`input` has {} items; at most {MAX_INPUTS} are allowed", inputs.len())));
    }
    let limits = limits(model, request_limits);
    let several = inputs.len() > 1;
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            let which = if several { format!("input[{i}]") } else { "input".into() };
            let ids = match input {
                Ok(text) => {
                    check_text_bytes(&which, text.len(), &model.tokenizer, &limits)?;
                    if text.is_empty() {
                        return Err(ApiError::invalid(Some(&which), format!("`{which}` is an empty string")));
                    }
                    model
                        .tokenizer
                        .encode(&text, true)
                        .map_err(|e| ApiError::invalid(Some(&which), e.to_string()))?
                }
                Err(ids) => ids,
            };
            if ids.is_empty() {
                return Err(ApiError::invalid(Some(&which), format!("`{which}` has no tokens")));
            }
            Ok(ids)
        })
        .collect()
}

/// A vector as OpenAI sends it: a list of floats, or base64 of its little-endian f32 bytes.
fn encode(v: &[f32], encoding: Encoding) -> Value {
    match encoding {
        Encoding::Float => json!(v),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_little_endian_f32_bytes() {
        let Value::String(s) = encode(&[1.0, -2.5], Encoding::Base64) else { panic!("not a string") };
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(bytes, [0, 0, 128, 63, 0, 0, 32, 192]);
    }
}
