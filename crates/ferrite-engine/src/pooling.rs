//! Embeddings: how a model pools its final hidden states into one vector (read from a
//! sentence-transformers checkpoint's `modules.json` and `1_Pooling/config.json`), and the
//! pooling itself, chunk by chunk as a prompt is prefilled.
//!
//! An embedding request runs through the engine as a prefill-only sequence: it is scheduled,
//! chunked and preempted like any prompt, the model hands back the final-normed hidden rows its
//! pooling needs (the last token's, the first's, or all of them), and when the prompt is
//! computed the vector is sent and the sequence leaves (its full blocks stay in the prefix
//! cache, like any finished prompt's). Nothing is sampled.

use std::path::Path;

use serde_json::Value;

/// Which hidden rows make the vector (sentence-transformers' pooling modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingType {
    /// The last token's (decoder embedding models: Qwen3-Embedding, gte-Qwen2, e5-mistral).
    Last,
    /// The mean over every token.
    Mean,
    /// The first token's.
    Cls,
}

impl PoolingType {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolingType::Last => "last-token",
            PoolingType::Mean => "mean",
            PoolingType::Cls => "CLS",
        }
    }
}

/// How this model's embeddings are made.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooling {
    pub pooling_type: PoolingType,
    /// L2-normalised (a sentence-transformers `Normalize` module).
    pub normalize: bool,
    /// Where the settings came from, for logs and errors.
    pub source: String,
    /// The widths `dimensions` may truncate to (Matryoshka): `None` when the model was not
    /// trained for truncation; an empty list when any width up to the full one is allowed.
    pub matryoshka: Option<Vec<usize>>,
    /// The vector's full width (the model's hidden size).
    pub hidden_size: usize,
}

impl Pooling {
    /// A decoder without sentence-transformers files: its last token, normalised (vLLM's
    /// default for an embedding task on a causal LM).
    pub fn default_for_decoder(hidden_size: usize) -> Self {
        Self {
            pooling_type: PoolingType::Last,
            normalize: true,
            source: "the default for a decoder (no modules.json)".into(),
            matryoshka: None,
            hidden_size,
        }
    }

    /// From the texts of `modules.json` and its pooling module's `config.json` (`None` when
    /// the checkpoint has no `modules.json`), and config.json's Matryoshka keys. A module or
    /// mode ferrite does not compute is an error naming it, never a silently different vector.
    pub fn from_sentence_transformers(
        modules: Option<&str>,
        pooling_config: Option<&str>,
        model_config: &Value,
        hidden_size: usize,
    ) -> Result<Self, String> {
        let matryoshka = matryoshka_of(model_config)?;
        let Some(modules) = modules else {
            return Ok(Self { matryoshka, ..Self::default_for_decoder(hidden_size) });
        };
        let modules: Value = serde_json::from_str(modules).map_err(|e| format!("modules.json: {e}"))?;
        let modules = modules.as_array().ok_or("modules.json: not a list")?;
        let mut pooling = None;
        let mut normalize = false;
        for module in modules {
            let kind = module.get("type").and_then(Value::as_str).unwrap_or_default();
            match kind.rsplit('.').next().unwrap_or_default() {
                "Transformer" => {}
                "Pooling" => pooling = Some(pooling_type_of(pooling_config)?),
                "Normalize" => normalize = true,
                other => {
                    return Err(format!(
                        "modules.json: the module `{other}` ({kind}) is not supported (ferrite computes Transformer, Pooling and Normalize)"
                    ))
                }
            }
        }
        let pooling_type = pooling.ok_or("modules.json lists no Pooling module")?;
        let source = format!(
            "sentence-transformers: {} pooling{}",
            pooling_type.as_str(),
            if normalize { ", normalised" } else { "" }
        );
        Ok(Self { pooling_type, normalize, source, matryoshka, hidden_size })
    }

    /// The module path of the pooling module in `modules.json` (`1_Pooling` as a rule), whose
    /// `config.json` holds the mode.
    pub fn pooling_dir(modules: &str) -> Option<String> {
        let modules: Value = serde_json::from_str(modules).ok()?;
        modules.as_array()?.iter().find_map(|m| {
            let kind = m.get("type").and_then(Value::as_str)?;
            kind.ends_with(".Pooling").then(|| m.get("path").and_then(Value::as_str).map(str::to_string))?
        })
    }

    /// Checks a request's `dimensions` against the full width and the Matryoshka widths.
    pub fn check_dimensions(&self, dimensions: usize) -> Result<(), String> {
        let hidden_size = self.hidden_size;
        if dimensions == 0 || dimensions > hidden_size {
            return Err(format!(
                "dimensions must be between 1 and {hidden_size} (the model's width), got {dimensions}"
            ));
        }
        if dimensions == hidden_size {
            return Ok(());
        }
        match &self.matryoshka {
            None => Err(format!(
                "this model was not trained for truncated embeddings (no `is_matryoshka` or `matryoshka_dimensions` in its config.json): dimensions must be {hidden_size}, got {dimensions}"
            )),
            Some(widths) if !widths.is_empty() && !widths.contains(&dimensions) => Err(format!(
                "dimensions must be one of the model's matryoshka_dimensions {widths:?}, got {dimensions}"
            )),
            Some(_) => Ok(()),
        }
    }
}

fn matryoshka_of(config: &Value) -> Result<Option<Vec<usize>>, String> {
    if let Some(dims) = config.get("matryoshka_dimensions").filter(|v| !v.is_null()) {
        let dims = dims
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
            .ok_or("config.json: `matryoshka_dimensions` is not a list of widths")?;
        return Ok(Some(dims));
    }
    Ok(config.get("is_matryoshka").and_then(Value::as_bool).unwrap_or(false).then(Vec::new))
}

/// The one mode a sentence-transformers pooling config sets.
fn pooling_type_of(config: Option<&str>) -> Result<PoolingType, String> {
    let config = config.ok_or("modules.json names a Pooling module whose config.json is missing")?;
    let config: Value = serde_json::from_str(config).map_err(|e| format!("the pooling config: {e}"))?;
    if config.get("include_prompt").and_then(Value::as_bool) == Some(false) {
        return Err("the pooling config excludes the prompt (`include_prompt: false`), which ferrite does not support".into());
    }
    // sentence-transformers 6 writes `pooling_mode` (a name, or a list of them); earlier
    // versions, and so most checkpoints, one `pooling_mode_*` flag per mode.
    let named: Vec<String> = match config.get("pooling_mode") {
        Some(Value::String(mode)) => vec![mode.clone()],
        Some(Value::Array(modes)) => modes.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        Some(other) => {
            return Err(format!("the pooling config's `pooling_mode` is {other}, not a mode name"))
        }
        None => {
            let flagged =
                config.as_object().into_iter().flatten().filter(|(_, on)| on.as_bool() == Some(true));
            flagged.filter_map(|(key, _)| key.strip_prefix("pooling_mode_")).map(str::to_string).collect()
        }
    };
    match named.as_slice() {
        [mode] => match mode.as_str() {
            "lasttoken" => Ok(PoolingType::Last),
            "mean" | "mean_tokens" => Ok(PoolingType::Mean),
            "cls" | "cls_token" => Ok(PoolingType::Cls),
            other => Err(format!(
                "the pooling mode `{other}` is not supported (ferrite pools lasttoken, mean or cls)"
            )),
        },
        [] => Err("the pooling config sets no pooling mode".into()),
        many => Err(format!(
            "the pooling config sets several modes ({}); ferrite pools with one",
            many.join(", ")
        )),
    }
}

/// Reads a model folder's sentence-transformers files, where there are any.
pub fn read_pooling(
    modules: Option<&Path>,
    pooling_config: Option<&Path>,
    model_config: &Value,
    hidden_size: usize,
) -> Result<Pooling, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let modules = modules.map(read).transpose()?;
    let pooling_config = pooling_config.map(read).transpose()?;
    Pooling::from_sentence_transformers(
        modules.as_deref(),
        pooling_config.as_deref(),
        model_config,
        hidden_size,
    )
}

/// One sequence's pooling in progress: rows arrive chunk by chunk (positions ascending; a
/// recompute after preemption starts again at position 0).
#[derive(Debug, Clone)]
pub(crate) struct Pooler {
    pooling_type: PoolingType,
    /// The sum of the rows so far (Mean), or the row kept (Last, Cls); f64 so that the chunking
    /// barely shows in the result.
    acc: Vec<f64>,
    rows: usize,
}

impl Pooler {
    pub fn new(pooling_type: PoolingType) -> Self {
        Self { pooling_type, acc: Vec::new(), rows: 0 }
    }

    /// Takes `rows` (`[n, hidden]`, row-major) computed at positions `first_pos ..`, as the
    /// scheduler asked for them ([`PoolingType`]'s rows only).
    pub fn add(&mut self, first_pos: usize, rows: &[f32], hidden: usize) {
        if first_pos == 0 || self.acc.len() != hidden {
            self.acc = vec![0.0; hidden];
            self.rows = 0;
        }
        match self.pooling_type {
            PoolingType::Mean => {
                for row in rows.chunks_exact(hidden) {
                    for (a, &x) in self.acc.iter_mut().zip(row) {
                        *a += f64::from(x);
                    }
                    self.rows += 1;
                }
            }
            PoolingType::Last | PoolingType::Cls => {
                if let Some(row) = rows.chunks_exact(hidden).last() {
                    self.acc = row.iter().map(|&x| f64::from(x)).collect();
                    self.rows = 1;
                }
            }
        }
    }

    /// The vector: the mean where it is one, truncated to `dimensions`, then normalised where
    /// the model normalises (truncation first, as Matryoshka training intends).
    pub fn finish(self, dimensions: Option<usize>, normalize: bool) -> Vec<f32> {
        let scale = match self.pooling_type {
            PoolingType::Mean => 1.0 / self.rows.max(1) as f64,
            _ => 1.0,
        };
        let mut v: Vec<f64> = self.acc.iter().map(|a| a * scale).collect();
        if let Some(d) = dimensions {
            v.truncate(d);
        }
        if normalize {
            // torch.nn.functional.normalize's floor on the norm.
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v.into_iter().map(|x| x as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(modules: &str, pooling: &str) -> Result<Pooling, String> {
        Pooling::from_sentence_transformers(Some(modules), Some(pooling), &Value::Null, 64)
    }

    const MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    #[test]
    fn sentence_transformers_files_say_the_mode_and_the_normalisation() {
        let p = st(MODULES, r#"{"word_embedding_dimension": 8, "pooling_mode_lasttoken": true}"#).unwrap();
        assert_eq!((p.pooling_type, p.normalize), (PoolingType::Last, true));
        assert_eq!(Pooling::pooling_dir(MODULES).as_deref(), Some("1_Pooling"));
        let no_norm = MODULES.replace("Normalize", "Transformer");
        let p =
            st(&no_norm, r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#).unwrap();
        assert_eq!((p.pooling_type, p.normalize), (PoolingType::Mean, false));
        let p = st(MODULES, r#"{"pooling_mode_cls_token": true}"#).unwrap();
        assert_eq!(p.pooling_type, PoolingType::Cls);
        // sentence-transformers 6's spelling: one `pooling_mode` name (or a list of one).
        for (mode, want) in
            [("lasttoken", PoolingType::Last), ("mean", PoolingType::Mean), ("cls", PoolingType::Cls)]
        {
            let p =
                st(MODULES, &format!(r#"{{"embedding_dimension": 8, "pooling_mode": "{mode}"}}"#)).unwrap();
            assert_eq!(p.pooling_type, want, "{mode}");
        }
        assert_eq!(st(MODULES, r#"{"pooling_mode": ["mean"]}"#).unwrap().pooling_type, PoolingType::Mean);
    }

    #[test]
    fn what_ferrite_does_not_compute_is_refused_by_name() {
        let e = st(MODULES, r#"{"pooling_mode_max_tokens": true}"#).unwrap_err();
        assert!(e.contains("`max_tokens`"), "{e}");
        let e = st(MODULES, r#"{"pooling_mode": "weightedmean"}"#).unwrap_err();
        assert!(e.contains("`weightedmean`"), "{e}");
        let e = st(MODULES, r#"{"pooling_mode": ["mean", "max"]}"#).unwrap_err();
        assert!(e.contains("several modes (mean, max)"), "{e}");
        let e =
            st(MODULES, r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}"#).unwrap_err();
        assert!(e.contains("several modes"), "{e}");
        let e = st(MODULES, "{}").unwrap_err();
        assert!(e.contains("no pooling mode"), "{e}");
        let dense = MODULES.replace("Normalize", "Dense");
        let e = st(&dense, r#"{"pooling_mode_lasttoken": true}"#).unwrap_err();
        assert!(e.contains("`Dense`"), "{e}");
        let e = Pooling::from_sentence_transformers(Some(MODULES), None, &Value::Null, 64).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn without_modules_json_a_decoder_pools_its_last_token_normalised() {
        let p = Pooling::from_sentence_transformers(None, None, &Value::Null, 64).unwrap();
        assert_eq!((p.pooling_type, p.normalize, p.matryoshka), (PoolingType::Last, true, None));
    }

    #[test]
    fn dimensions_are_checked_against_the_width_and_matryoshka() {
        let plain = Pooling::default_for_decoder(64);
        assert!(plain.check_dimensions(64).is_ok());
        let e = plain.check_dimensions(32).unwrap_err();
        assert!(e.contains("not trained for truncated") && e.contains("got 32"), "{e}");
        assert!(plain.check_dimensions(65).unwrap_err().contains("between 1 and 64"));
        assert!(plain.check_dimensions(0).is_err());
        let config = serde_json::json!({"is_matryoshka": true});
        let any = Pooling::from_sentence_transformers(None, None, &config, 64).unwrap();
        assert!(any.check_dimensions(7).is_ok());
        let config = serde_json::json!({"matryoshka_dimensions": [16, 32, 64]});
        let listed = Pooling::from_sentence_transformers(None, None, &config, 64).unwrap();
        assert!(listed.check_dimensions(32).is_ok());
        assert!(listed.check_dimensions(24).unwrap_err().contains("[16, 32, 64]"));
    }

    /// Rows of a 3-wide hidden state at positions 0..5: row p is [p, 2p, -1].
    fn rows(positions: std::ops::Range<usize>) -> Vec<f32> {
        positions.flat_map(|p| [p as f32, 2.0 * p as f32, -1.0]).collect()
    }

    #[test]
    fn mean_pooling_over_chunks_equals_the_mean_of_every_row() {
        let mut p = Pooler::new(PoolingType::Mean);
        p.add(0, &rows(0..2), 3);
        p.add(2, &rows(2..5), 3);
        // Mean over p = 0..5 of [p, 2p, -1] = [2, 4, -1].
        assert_eq!(p.finish(None, false), vec![2.0, 4.0, -1.0]);
    }

    #[test]
    fn a_recompute_from_position_zero_starts_the_pooling_again() {
        let mut p = Pooler::new(PoolingType::Mean);
        p.add(0, &rows(0..2), 3);
        p.add(2, &rows(2..3), 3);
        p.add(0, &rows(0..3), 3); // preempted, recomputed
        assert_eq!(p.finish(None, false), vec![1.0, 2.0, -1.0]);
    }

    #[test]
    fn last_and_cls_keep_their_row_then_truncate_and_normalise() {
        let mut last = Pooler::new(PoolingType::Last);
        last.add(3, &rows(4..5), 3);
        assert_eq!(last.clone().finish(None, false), vec![4.0, 8.0, -1.0]);
        // Truncated to 2 then normalised: [4, 8] / sqrt(80).
        let v = last.finish(Some(2), true);
        let n = 80f32.sqrt();
        assert!((v[0] - 4.0 / n).abs() < 1e-7 && (v[1] - 8.0 / n).abs() < 1e-7 && v.len() == 2);
        let mut cls = Pooler::new(PoolingType::Cls);
        cls.add(0, &rows(0..1), 3);
        assert_eq!(cls.finish(None, true), vec![0.0, 0.0, -1.0]);
    }
}
