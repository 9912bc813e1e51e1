//! RoPE parameters as configs write them (`rope_parameters`, or the older `rope_theta` and
//! `rope_scaling`), checked into a [`RopeConfig`] per layer kind.

use serde_json::Value;

use super::{Architecture, RawConfig};

/// What a RoPE's parameters may lean on outside themselves.
#[derive(Clone, Copy)]
struct Context {
    max_position_embeddings: usize,
    /// The top-level `original_max_position_embeddings` (Phi-3 writes it there).
    original_max_position_embeddings: Option<usize>,
    arch: Architecture,
}

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
    /// YaRN: high frequencies kept, low ones divided by `factor`, a linear ramp between (by
    /// rotations over the original context, `beta_fast` to `beta_slow`); cos and sin scaled by
    /// `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Round the ramp's ends outward to whole dimensions.
        truncate: bool,
        attention_factor: f32,
    },
    /// LongRoPE (Phi-3): each frequency divided by its own factor, the short ones for contexts up
    /// to `original_max_position_embeddings`, the long ones beyond; cos and sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
    /// Dynamic NTK: the base grows for contexts past `max_position_embeddings`.
    DynamicNtk { factor: f32, max_position_embeddings: usize },
}

impl RopeScaling {
    /// How many per-frequency factors the scaling carries, where it carries any (the rotary
    /// dimensions must be twice that).
    pub fn num_factors(&self) -> Option<usize> {
        match self {
            RopeScaling::Factors(f) => Some(f.len()),
            RopeScaling::LongRope { short_factor, .. } => Some(short_factor.len()),
            _ => None,
        }
    }
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
    let cx = Context {
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(super::DEFAULT_MAX_POSITIONS),
        original_max_position_embeddings: raw.original_max_position_embeddings,
        arch,
    };
    let rope_from = |params, theta| rope_from(params, theta, cx);
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
/// them wins over `theta`. Defaults as transformers' `ROPE_INIT_FUNCTIONS` take them.
fn rope_from(params: Option<&Value>, theta: f64, cx: Context) -> Result<RopeConfig, String> {
    let params = params.filter(|p| !p.is_null());
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(theta) as f32;
    let Some(p) = params else {
        return Ok(RopeConfig { theta, scaling: RopeScaling::Default });
    };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    // The first Phi-3 128k configs called LongRoPE `su` (or `yarn`); transformers reads both as it.
    let kind = match kind {
        "su" | "yarn" if cx.arch == Architecture::Phi3 => "longrope",
        kind => kind,
    };
    let opt = |key: &str| -> Result<Option<f64>, String> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(v) if v.is_finite() => Ok(Some(v)),
                _ => Err(format!("rope scaling `{kind}`: `{key}` must be a number, got {v}")),
            },
        }
    };
    let num64 = |key: &str| -> Result<f64, String> {
        opt(key)?.ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    let num = |key: &str| num64(key).map(|v| v as f32);
    let factors = |key: &str| -> Result<Vec<f32>, String> {
        let list = p.get(key).and_then(Value::as_array);
        list.and_then(|l| l.iter().map(|v| v.as_f64().map(|v| v as f32)).collect::<Option<Vec<f32>>>())
            .filter(|l| l.iter().all(|&v| v.is_finite() && v > 0.0))
            .ok_or_else(|| format!("rope scaling `{kind}` needs `{key}`: a list of positive numbers"))
    };
    // The pretrained context: in the parameters, else at the top level (Phi-3).
    let original = || -> Result<usize, String> {
        match opt("original_max_position_embeddings")? {
            Some(v) if v >= 1.0 => Ok(v as usize),
            Some(v) => {
                Err(format!("rope scaling `{kind}`: original_max_position_embeddings {v} must be at least 1"))
            }
            None => cx
                .original_max_position_embeddings
                .ok_or_else(|| format!("rope scaling `{kind}` needs `original_max_position_embeddings`")),
        }
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
        "yarn" => {
            let original = original()?;
            // transformers: without a factor, the ratio of the contexts.
            let factor = match opt("factor")? {
                Some(f) => f,
                None => cx.max_position_embeddings as f64 / original as f64,
            };
            let attention_factor = match (opt("attention_factor")?, opt("mscale")?, opt("mscale_all_dim")?) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor: factor as f32,
                original_max_position_embeddings: original,
                // `or`: transformers takes a 0 or null as the default too.
                beta_fast: opt("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: opt("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                attention_factor: attention_factor as f32,
            }
        }
        "longrope" => {
            let original = original()?;
            let (short_factor, long_factor) = (factors("short_factor")?, factors("long_factor")?);
            if short_factor.len() != long_factor.len() {
                return Err(format!(
                    "rope scaling `longrope`: short_factor has {} entries, long_factor {}",
                    short_factor.len(),
                    long_factor.len()
                ));
            }
            let factor = match opt("factor")? {
                Some(f) => f,
                None => cx.max_position_embeddings as f64 / original as f64,
            };
            let attention_factor = match opt("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original,
                attention_factor: attention_factor as f32,
            }
        }
        "dynamic" => RopeScaling::DynamicNtk {
            factor: num("factor")?,
            max_position_embeddings: cx.max_position_embeddings,
        },
        other => {
            return Err(format!(
            "rope scaling type `{other}` is not supported (default, linear, llama3, yarn, longrope, dynamic)"
        ))
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// YaRN's attention scaling for a context `scale` times the original (transformers
/// `yarn_get_mscale`).
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{parse, BASE};

    fn error_of(arch: &str, extra: &str) -> String {
        parse(&format!(r#"{{"architectures": ["{arch}"], {BASE}, {extra}}}"#)).unwrap_err()
    }

    /// Each scaling names what it lacks; unknown types list the known ones.
    #[test]
    fn scalings_name_what_is_wrong() {
        let e = error_of("Qwen3ForCausalLM", r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#);
        assert!(e.contains("rope scaling `yarn` needs `original_max_position_embeddings`"), "{e}");
        let e = error_of(
            "Phi3ForCausalLM",
            r#""original_max_position_embeddings": 64,
               "rope_scaling": {"type": "longrope", "short_factor": [1, 2], "long_factor": [1]}"#,
        );
        assert!(e.contains("short_factor has 2 entries, long_factor 1"), "{e}");
        // head_dim 4: 2 frequencies, so 2 factors each.
        let e = error_of(
            "Phi3ForCausalLM",
            r#""original_max_position_embeddings": 64,
               "rope_scaling": {"type": "longrope", "short_factor": [1, 2, 3], "long_factor": [1, 2, 3]}"#,
        );
        assert!(e.contains("3 per-frequency factors, but the 4 rotary dimensions need 2"), "{e}");
        let e = error_of(
            "Phi3ForCausalLM",
            r#""original_max_position_embeddings": 64,
               "rope_scaling": {"type": "longrope", "short_factor": [1, -2], "long_factor": [1, 2]}"#,
        );
        assert!(e.contains("needs `short_factor`: a list of positive numbers"), "{e}");
        // Phi-3-mini-128k's first config: `su` is LongRoPE (for Phi-3 only).
        let c = parse(&format!(
            r#"{{"architectures": ["Phi3ForCausalLM"], {BASE}, "original_max_position_embeddings": 64,
            "rope_scaling": {{"type": "su", "short_factor": [1, 2], "long_factor": [3, 4]}}}}"#
        ))
        .unwrap();
        assert!(matches!(c.rope.scaling, crate::model::hf_config::RopeScaling::LongRope { .. }));
        let e = error_of("LlamaForCausalLM", r#""rope_scaling": {"rope_type": "su"}"#);
        assert!(e.contains("`su` is not supported"), "{e}");
        let e = error_of("LlamaForCausalLM", r#""rope_scaling": {"rope_type": "mrope"}"#);
        assert!(
            e.contains("`mrope` is not supported (default, linear, llama3, yarn, longrope, dynamic)"),
            "{e}"
        );
    }

    /// transformers' defaults: YaRN's attention factor from the factor (0.1 ln s + 1), or the
    /// ratio of two mscales; LongRoPE's factor from the contexts' ratio when not given.
    #[test]
    fn derived_attention_factors() {
        use crate::model::hf_config::RopeScaling;
        let c = parse(&format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], {BASE},
            "rope_scaling": {{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}}}"#
        ))
        .unwrap();
        let RopeScaling::Yarn { attention_factor, beta_fast, beta_slow, truncate, .. } = c.rope.scaling
        else {
            panic!("{:?}", c.rope.scaling)
        };
        assert!((attention_factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
        assert_eq!((beta_fast, beta_slow, truncate), (32.0, 1.0, true));
        let c = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE},
            "rope_scaling": {{"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "original_max_position_embeddings": 4096}}}}"#
        ))
        .unwrap();
        assert!(
            matches!(c.rope.scaling, RopeScaling::Yarn { attention_factor, .. } if attention_factor == 1.0)
        );
        // Phi-3.5: 131072 / 4096 = 32 → √(1 + ln 32 / ln 4096).
        let c = parse(&format!(
            r#"{{"architectures": ["Phi3ForCausalLM"], {BASE}, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {{"type": "longrope", "short_factor": [1, 1], "long_factor": [2, 3]}}}}"#
        ))
        .unwrap();
        let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt() as f32;
        assert!(
            matches!(c.rope.scaling, RopeScaling::LongRope { attention_factor, .. } if (attention_factor - want).abs() < 1e-6)
        );
    }
}
