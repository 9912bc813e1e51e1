//! `models.toml`: named models (a hub repo or a local folder) with their dtype, length limit,
//! chat template override, default sampling parameters and device price, and the `default`
//! entry used when `--model` is omitted.
//!
//! Which file: `--models-file` (or `FERRITE_MODELS_FILE`), else `models.toml` in the current
//! directory, else the copy built into the binary. Unknown keys and bad values are errors that
//! name the key and the line (the `toml` crate reports the span of the offending value).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use ferrite_engine::model::hub::{HubRepo, HubSettings, RepoId};
use ferrite_server::validate::SamplingDefaults;
use serde::{Deserialize, Deserializer};

/// The repo's `models.toml`, for a binary run outside a checkout.
const BUILT_IN: &str = include_str!("../models.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DtypeArg {
    Auto,
    F32,
    F16,
    Bf16,
}

/// A block format for `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum QuantizeArg {
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    #[serde(rename = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    #[serde(rename = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    #[serde(rename = "q6_k")]
    Q6K,
}

impl QuantizeArg {
    pub fn engine(self) -> ferrite_engine::model::loader::Quantize {
        use ferrite_engine::model::loader::Quantize;
        match self {
            QuantizeArg::Q8_0 => Quantize::Q8_0,
            QuantizeArg::Q4_0 => Quantize::Q4_0,
            QuantizeArg::Q4K => Quantize::Q4K,
            QuantizeArg::Q5K => Quantize::Q5K,
            QuantizeArg::Q6K => Quantize::Q6K,
        }
    }
}

/// One model. Exactly one of `repo` and `path`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawEntry")]
pub struct Entry {
    pub source: Source,
    pub description: Option<String>,
    pub dtype: Option<DtypeArg>,
    /// Quantize the linear weights into this block format at load (`--quantize`).
    pub quantize: Option<QuantizeArg>,
    pub max_model_len: Option<usize>,
    /// A Jinja chat template replacing the model's own.
    pub chat_template: Option<String>,
    pub sampling: SamplingDefaults,
    /// $/hour of the device, for cost figures (0: none).
    pub device_cost_per_hour: Option<f64>,
    /// `ferrite serve` without `--model` serves every entry marked so (else the default).
    pub serve: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Hub(RepoId),
    /// Relative paths are resolved against the directory holding models.toml.
    Path(PathBuf),
}

impl Source {
    /// What `ferrite_engine::model::loader::load` takes.
    pub fn as_model_arg(&self) -> String {
        match self {
            Source::Hub(id) => {
                let rev = id.revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default();
                let file = id.file.as_ref().map(|f| format!(":{f}")).unwrap_or_default();
                format!("{}{rev}{file}", id.repo)
            }
            Source::Path(p) => p.display().to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    repo: Option<String>,
    revision: Option<String>,
    /// A GGUF file in `repo`: its name, or a quantization tag its name ends with.
    file: Option<String>,
    path: Option<PathBuf>,
    description: Option<String>,
    dtype: Option<DtypeArg>,
    quantize: Option<QuantizeArg>,
    #[serde(default, deserialize_with = "positive")]
    max_model_len: Option<usize>,
    chat_template: Option<String>,
    chat_template_file: Option<PathBuf>,
    #[serde(default)]
    sampling: RawSampling,
    #[serde(default)]
    budgets: RawBudgets,
    #[serde(default, deserialize_with = "non_negative")]
    device_cost_per_hour: Option<f64>,
    #[serde(default)]
    serve: bool,
}

/// Budgets for the requests that set none.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudgets {
    priority: Option<i32>,
    #[serde(default, deserialize_with = "positive_f64")]
    deadline_ms: Option<f64>,
    #[serde(default, deserialize_with = "positive_f64")]
    ttft_deadline_ms: Option<f64>,
    #[serde(default, deserialize_with = "positive_f64")]
    max_cost_usd: Option<f64>,
}

/// Defaults for the request fields a client leaves out.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSampling {
    #[serde(default, deserialize_with = "temperature")]
    temperature: Option<f32>,
    #[serde(default, deserialize_with = "unit_interval")]
    top_p: Option<f32>,
    #[serde(default, deserialize_with = "positive")]
    top_k: Option<usize>,
    #[serde(default, deserialize_with = "unit_interval")]
    min_p: Option<f32>,
    #[serde(default, deserialize_with = "positive_f32")]
    repetition_penalty: Option<f32>,
    #[serde(default, deserialize_with = "positive")]
    max_tokens: Option<usize>,
}

fn checked<'de, D: Deserializer<'de>, T: Deserialize<'de> + Copy + std::fmt::Display>(
    d: D,
    ok: impl Fn(T) -> bool,
    what: &str,
) -> Result<Option<T>, D::Error> {
    let v = T::deserialize(d)?;
    if ok(v) {
        Ok(Some(v))
    } else {
        Err(serde::de::Error::custom(format!("must be {what}, got {v}")))
    }
}

fn positive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    checked(d, |v: usize| v > 0, "at least 1")
}

fn positive_f32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    checked(d, |v: f32| v > 0.0, "greater than 0")
}

fn positive_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    checked(d, |v: f64| v > 0.0 && v.is_finite(), "a number greater than 0")
}

fn non_negative<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    checked(d, |v: f64| v >= 0.0 && v.is_finite(), "a number >= 0")
}

fn temperature<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    checked(d, |v: f32| (0.0..=2.0).contains(&v), "in [0, 2]")
}

fn unit_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
    checked(d, |v: f32| (0.0..=1.0).contains(&v), "in [0, 1]")
}

impl TryFrom<RawEntry> for Entry {
    type Error = String;

    fn try_from(r: RawEntry) -> Result<Self, String> {
        let source = match (r.repo, r.path) {
            (Some(repo), None) => {
                let mut id = RepoId::parse(&repo)
                    .ok_or_else(|| format!("`repo` must look like `org/name`, got {repo:?}"))?;
                if let Some(rev) = r.revision {
                    if id.revision.is_some() {
                        return Err(
                            "give the revision either in `repo` (@rev) or in `revision`, not both".into()
                        );
                    }
                    id.revision = Some(rev);
                }
                if let Some(file) = r.file {
                    if id.file.is_some() {
                        return Err(
                            "give the GGUF file either in `repo` (:file) or in `file`, not both".into()
                        );
                    }
                    let with_file = RepoId::parse(&format!("{}:{file}", id.repo)).ok_or_else(|| {
                        format!("`file` must be a file name or tag in the repo, got {file:?}")
                    })?;
                    id.file = with_file.file;
                }
                Source::Hub(id)
            }
            (None, Some(_)) if r.file.is_some() => {
                return Err("`file` picks a GGUF file in a `repo`; a `path` names the file itself".into())
            }
            (None, Some(path)) if r.revision.is_none() => Source::Path(path),
            (None, Some(_)) => return Err("`revision` only applies to a `repo`".into()),
            (Some(_), Some(_)) => return Err("give `repo` or `path`, not both".into()),
            (None, None) => return Err("an entry needs `repo` (a Hugging Face repo id) or `path`".into()),
        };
        if r.chat_template.is_some() && r.chat_template_file.is_some() {
            return Err("give `chat_template` or `chat_template_file`, not both".into());
        }
        let chat_template = match r.chat_template_file {
            // Read once the file's directory is known (see `Registry::parse`).
            Some(f) => Some(format!("{FILE_MARK}{}", f.display())),
            None => r.chat_template,
        };
        let (s, b) = (r.sampling, r.budgets);
        Ok(Entry {
            source,
            description: r.description,
            dtype: r.dtype,
            quantize: r.quantize,
            max_model_len: r.max_model_len,
            chat_template,
            sampling: SamplingDefaults {
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                min_p: s.min_p,
                repetition_penalty: s.repetition_penalty,
                max_tokens: s.max_tokens,
                priority: b.priority,
                deadline_ms: b.deadline_ms,
                ttft_deadline_ms: b.ttft_deadline_ms,
                max_cost_usd: b.max_cost_usd,
            },
            device_cost_per_hour: r.device_cost_per_hour,
            serve: r.serve,
        })
    }
}

/// Marks a chat template still to be read from a file (relative to models.toml).
const FILE_MARK: &str = "\0file:";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    default: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, Entry>,
}

/// A parsed models.toml.
#[derive(Debug)]
pub struct Registry {
    /// Where it came from, for messages.
    pub origin: String,
    pub default: Option<String>,
    pub models: BTreeMap<String, Entry>,
}

impl Registry {
    /// Parses `text`; relative paths are taken from `base`.
    pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Self> {
        let raw: RawFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let mut models = raw.models;
        for (name, entry) in &mut models {
            if name.is_empty() || name.contains('/') || name.contains('@') {
                bail!("{origin}: model name {name:?} may not be empty or contain `/` or `@` (those mean a repo id)");
            }
            if let Source::Path(p) = &mut entry.source {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            if let Some(file) = entry.chat_template.as_deref().and_then(|t| t.strip_prefix(FILE_MARK)) {
                let path = base.join(file);
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!("{origin}: [models.{name}] chat_template_file {}", path.display())
                })?;
                entry.chat_template = Some(text);
            }
        }
        if let Some(d) = &raw.default {
            if !models.contains_key(d) {
                let names: Vec<_> = models.keys().map(String::as_str).collect();
                bail!("{origin}: `default = {d:?}` names no entry; the entries are {names:?}");
            }
        }
        Ok(Self { origin: origin.to_string(), default: raw.default, models })
    }

    /// `--models-file`, else ./models.toml, else the built-in copy.
    pub fn load(explicit: Option<&Path>) -> Result<Self> {
        let local = Path::new("models.toml");
        let path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => local.is_file().then(|| local.to_path_buf()),
        };
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
                // Absolute, so a missing relative folder is never mistaken for a repo id.
                let base = std::path::absolute(
                    p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")),
                )
                .with_context(|| format!("resolving the directory of {}", p.display()))?;
                Self::parse(&text, &p.display().to_string(), &base)
            }
            None => Self::parse(BUILT_IN, "built-in models.toml", Path::new(env!("CARGO_MANIFEST_DIR"))),
        }
    }

    /// What `--model` names: an entry, or (not being one) a folder or repo id left to the loader.
    /// `None` picks the default entry.
    pub fn resolve(&self, model: Option<&str>) -> Result<Resolved> {
        let name = match model {
            Some(m) => m,
            None => self
                .default
                .as_deref()
                .with_context(|| format!("no --model given and {} has no `default` entry", self.origin))?,
        };
        Ok(match self.models.get(name) {
            Some(entry) => Resolved { name: name.to_string(), entry: Some(entry.clone()) },
            None if Path::new(name).exists() || RepoId::parse(name).is_some() => {
                Resolved { name: name.to_string(), entry: None }
            }
            None => {
                let names: Vec<_> = self.models.keys().map(String::as_str).collect();
                bail!(
                    "--model {name:?} is not an entry of {} ({}), an existing folder, or a repo id (org/name)",
                    self.origin,
                    names.join(", ")
                )
            }
        })
    }
}

/// The model to load and what the registry says about it.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The entry name, or the folder / repo id as given: the default served model name.
    pub name: String,
    pub entry: Option<Entry>,
}

impl Resolved {
    pub fn model_arg(&self) -> String {
        match &self.entry {
            Some(e) => e.source.as_model_arg(),
            None => self.name.clone(),
        }
    }
}

/// Whether an entry's weights are on this machine (never touches the network).
pub fn locally_available(source: &Source) -> &'static str {
    match source {
        Source::Path(p) if p.join("config.json").is_file() => "local folder",
        Source::Path(p) if ferrite_engine::model::gguf::find(p).is_some() => "local GGUF",
        Source::Path(_) => "missing folder",
        Source::Hub(id) => {
            if HubRepo::new(id.clone(), HubSettings::from_env()).weights_cached() {
                "in HF cache"
            } else {
                "not downloaded"
            }
        }
    }
}

/// How an entry's weights are held, without reading them: the GGUF file's tag (from its name,
/// as llama.cpp names files), `--quantize`'s format applied at load, or `-` (as stored).
fn quantization(e: &Entry) -> String {
    let gguf = match &e.source {
        Source::Hub(id) => id.file.clone(),
        Source::Path(p) => ferrite_engine::model::gguf::find(p).map(|f| f.to_string_lossy().to_string()),
    };
    if let Some(file) = gguf {
        let stem = file.rsplit('/').next().unwrap_or(&file).trim_end_matches(".gguf").to_string();
        let tag = stem.rsplit(['-', '.']).next().unwrap_or(&stem).to_uppercase();
        return format!("GGUF {tag}");
    }
    match e.quantize {
        Some(q) => {
            format!("{} at load", q.to_possible_value().map_or("?".into(), |v| v.get_name().to_string()))
        }
        None => "-".into(),
    }
}

/// `ferrite models`: the entries, their sources and whether their weights are here.
pub fn list(models_file: Option<&Path>) -> Result<()> {
    let registry = Registry::load(models_file)?;
    println!("{} ({} entries)", registry.origin, registry.models.len());
    let rows: Vec<[String; 5]> = registry
        .models
        .iter()
        .map(|(name, e)| {
            let mark = if registry.default.as_deref() == Some(name) { "*" } else { " " };
            [
                format!("{mark} {name}"),
                e.source.as_model_arg(),
                quantization(e),
                locally_available(&e.source).to_string(),
                e.description.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = [
        "  NAME".to_string(),
        "SOURCE".into(),
        "QUANTIZATION".into(),
        "WEIGHTS".into(),
        "DESCRIPTION".into(),
    ];
    let widths: Vec<usize> =
        (0..4).map(|c| rows.iter().chain([&header]).map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in std::iter::once(&header).chain(&rows) {
        println!(
            "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    println!("(* = default, used when --model is omitted)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Registry> {
        Registry::parse(text, "models.toml", Path::new("/base"))
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn the_shipped_registry_parses_and_has_a_default() {
        let r = Registry::parse(BUILT_IN, "built-in", Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        let default = r.default.as_deref().expect("a default entry");
        assert!(matches!(r.models[default].source, Source::Hub(_)), "the default downloads anywhere");
    }

    #[test]
    fn entries_resolve_names_paths_and_repo_ids() {
        let r = parse(
            r#"
default = "small"
[models.small]
repo = "org/small"
revision = "v2"
dtype = "bf16"
max_model_len = 4096
device_cost_per_hour = 2.5
sampling = { temperature = 0.7, top_p = 0.9, max_tokens = 200 }
budgets = { priority = 10, deadline_ms = 30000, max_cost_usd = 0.01 }
[models.local]
path = "models/here"
chat_template = "{{ messages[0].content }}"
"#,
        )
        .unwrap();
        let small = r.resolve(None).unwrap();
        assert_eq!(small.name, "small");
        assert_eq!(small.model_arg(), "org/small@v2");
        let e = small.entry.unwrap();
        assert_eq!(e.dtype, Some(DtypeArg::Bf16));
        assert_eq!(e.max_model_len, Some(4096));
        assert_eq!(e.device_cost_per_hour, Some(2.5));
        assert_eq!(e.sampling.temperature, Some(0.7));
        assert_eq!(e.sampling.max_tokens, Some(200));
        assert_eq!(
            (
                e.sampling.priority,
                e.sampling.deadline_ms,
                e.sampling.ttft_deadline_ms,
                e.sampling.max_cost_usd
            ),
            (Some(10), Some(30000.0), None, Some(0.01))
        );
        assert_eq!(e.sampling.top_k, None);
        assert_eq!(r.resolve(Some("local")).unwrap().model_arg(), "/base/models/here");
        let typo = format!("{:#}", r.resolve(Some("smal")).unwrap_err());
        assert!(typo.contains("not an entry of models.toml (local, small)"), "{typo}");
        let other = r.resolve(Some("org/other@main")).unwrap();
        assert!(other.entry.is_none());
        assert_eq!(other.model_arg(), "org/other@main");
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let e = error("[models.a]\nrepo = \"org/a\"\ncolour = \"red\"\n");
        assert!(e.contains("line 3") && e.contains("colour"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a\"\n\ndtype = \"f8\"\n");
        assert!(e.contains("line 4") && e.contains("f8"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a\"\nsampling = { temperature = 3.0 }\n");
        assert!(e.contains("line 3") && e.contains("in [0, 2], got 3"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a\"\nbudgets = { deadline_ms = -1.0 }\n");
        assert!(e.contains("line 3") && e.contains("greater than 0, got -1"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a\"\nbudgets = { deadline = 5 }\n");
        assert!(e.contains("line 3") && e.contains("deadline"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a\"\nmax_model_len = 0\n");
        assert!(e.contains("line 3") && e.contains("at least 1"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a\"\n[models.b]\npath = \"x\"\nrepo = \"org/b\"\n");
        assert!(e.contains("line 3") && e.contains("not both"), "{e}");
        let e = error("[models.a]\ndtype = \"f32\"\n");
        assert!(e.contains("line 1") && e.contains("needs `repo`"), "{e}");
        let e = error("default = \"b\"\n[models.a]\nrepo = \"org/a\"\n");
        assert!(e.contains("`default = \"b\"` names no entry"), "{e}");
        let e = error("defualt = \"a\"\n");
        assert!(e.contains("line 1") && e.contains("defualt"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a\"\nquantize = \"q3_k\"\n");
        assert!(e.contains("line 3") && e.contains("q3_k"), "{e}");
        let e = error("[models.a]\npath = \"x\"\nfile = \"Q8_0\"\n");
        assert!(e.contains("`file` picks a GGUF file in a `repo`"), "{e}");
        let e = error("[models.a]\nrepo = \"org/a:Q8_0\"\nfile = \"Q4_0\"\n");
        assert!(e.contains("either in `repo` (:file) or in `file`"), "{e}");
    }

    /// A GGUF entry (`file` in a repo) loads through `repo:file` and lists its quantization
    /// tag; a `quantize` entry lists the format it quantizes into at load.
    #[test]
    fn gguf_and_quantize_entries_say_how_their_weights_are_held() {
        let r = parse(
            r#"
[models.gguf]
repo = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
revision = "v1"
file = "q4_k_m"
[models.isq]
repo = "org/plain"
quantize = "q4_k"
[models.plain]
repo = "org/plain"
"#,
        )
        .unwrap();
        let gguf = &r.models["gguf"];
        assert_eq!(gguf.source.as_model_arg(), "Qwen/Qwen2.5-0.5B-Instruct-GGUF@v1:q4_k_m");
        assert_eq!(quantization(gguf), "GGUF Q4_K_M");
        assert_eq!(quantization(&r.models["isq"]), "q4_k at load");
        assert_eq!(quantization(&r.models["plain"]), "-");
        let shipped = Registry::parse(BUILT_IN, "built-in", Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(shipped.models.values().any(|e| quantization(e) == "GGUF Q4_K_M"), "a Q4_K_M entry ships");
    }
}
