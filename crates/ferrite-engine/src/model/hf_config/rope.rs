//! RoPE parameters as configs write them (`rope_parameters`, or the older `rope_theta` and
//! `rope_scaling`), checked into a [`RopeConfig`] per layer kind.

use serde_json::Value;

use super::{Architecture, RawConfig};

/// How rotary frequencies are scaled (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Each inverse frequency divided by its own factor (`head_dim / 2` of them): how GGUF files
    /// store Llama 3's scaling (`rope_freqs.weight`).
    Factors(Vec<f32>),
    /// Positions divided by `factor` (equivalently, frequencies).
    Linear { factor: f32 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: RopeScaling,
}

/// The RoPE of every layer and, for Gemma 3, the different one of its sliding-window layers.
pub(super) fn parse_ropes(
    raw: &RawConfig,
    arch: Architecture,
) -> Result<(RopeConfig, Option<RopeConfig>), String> {
    // transformers 5 writes `rope_parameters` (with `rope_theta` inside); older configs have a
    // top-level `rope_theta` and an optional `rope_scaling`. Prefer the newer where both exist.
    let params = raw
        .rope_parameters
        .as_ref()
        .filter(|v| !v.is_null())
        .or(raw.rope_scaling.as_ref().filter(|v| !v.is_null()));
    if arch != Architecture::Gemma3 {
        return Ok((rope_from(params, raw.rope_theta.unwrap_or(10_000.0))?, None));
    }
    // Gemma 3: global layers at `rope_theta` (with any scaling), local ones at
    // `rope_local_base_freq`, unscaled; transformers 5 writes one entry per layer type.
    let (global_theta, local_theta) =
        (raw.rope_theta.unwrap_or(1_000_000.0), raw.rope_local_base_freq.unwrap_or(10_000.0));
    match params {
        Some(p) if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() => Ok((
            rope_from(p.get("full_attention"), global_theta)?,
            Some(rope_from(p.get("sliding_attention"), local_theta)?),
        )),
        _ => Ok((
            rope_from(params, global_theta)?,
            Some(RopeConfig { theta: local_theta as f32, scaling: RopeScaling::Default }),
        )),
    }
}

/// One RoPE from its parameters (`rope_parameters` or `rope_scaling`); a `rope_theta` among
/// them wins over `theta`.
fn rope_from(params: Option<&Value>, theta: f64) -> Result<RopeConfig, String> {
    let params = params.filter(|p| !p.is_null());
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(theta) as f32;
    let Some(p) = params else {
        return Ok(RopeConfig { theta, scaling: RopeScaling::Default });
    };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f32, String> {
        p.get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(format!("rope scaling type `{other}` is not supported (default, linear, llama3)"))
        }
    };
    Ok(RopeConfig { theta, scaling })
}
