//! Resolving a Hugging Face repo id to local files: the hub cache first (the layout
//! `models--org--name/{refs,snapshots}` that huggingface_hub and hf-hub share), then a download
//! through `hf-hub` unless offline.
//!
//! Environment, as huggingface_hub reads it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `HF_TOKEN` (else the token file under `HF_HOME`);
//! `HF_HUB_OFFLINE=1` forbids the network; `HF_ENDPOINT` changes the server.

use std::path::PathBuf;

use hf_hub::{Cache, Repo, RepoType};

use crate::error::LoadError;

/// A repo id with an optional revision and GGUF file: `org/name[@revision][:file]`, where
/// `file` is a `.gguf` file's name in the repo or a quantization tag its name ends with
/// (`org/name:Q4_K_M`, as llama.cpp's `-hf` takes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    pub repo: String,
    pub revision: Option<String>,
    pub file: Option<String>,
}

impl RepoId {
    /// Parses `org/name[@revision][:file]`; `None` when the string does not have that shape.
    pub fn parse(s: &str) -> Option<Self> {
        let (s, file) = match s.split_once(':') {
            Some((id, f))
                if !f.is_empty()
                    && !f.starts_with(['/', '.'])
                    && !f.contains("..")
                    && f.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) =>
            {
                (id, Some(f.to_string()))
            }
            Some(_) => return None,
            None => (s, None),
        };
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let (org, name) = repo.split_once('/')?;
        let ok = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (ok(org) && ok(name)).then(|| Self { repo: repo.to_string(), revision, file })
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// Where and how files are fetched.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub cache_dir: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    pub endpoint: Option<String>,
}

impl HubSettings {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| Cache::default().path().clone());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let token = var("HF_TOKEN").or_else(|| Cache::from_env().token());
        Self { cache_dir, token, offline, endpoint: var("HF_ENDPOINT") }
    }
}

pub struct HubRepo {
    id: RepoId,
    settings: HubSettings,
}

impl HubRepo {
    pub fn new(id: RepoId, settings: HubSettings) -> Self {
        Self { id, settings }
    }

    pub fn describe(&self) -> String {
        format!("Hugging Face repo `{}` at revision `{}`", self.id.repo, self.id.revision())
    }

    /// The cached copy of `file` at the repo's revision, if present. A branch or tag goes
    /// through `refs/`; a full commit hash names the snapshot directly.
    fn cached(&self, file: &str) -> Option<PathBuf> {
        let rev = self.id.revision();
        let repo = Repo::with_revision(self.id.repo.clone(), RepoType::Model, rev.to_string());
        if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
            let path =
                self.settings.cache_dir.join(repo.folder_name()).join("snapshots").join(rev).join(file);
            return path.exists().then_some(path);
        }
        Cache::new(self.settings.cache_dir.clone()).repo(repo).get(file)
    }

    /// The repo's file names (paths inside it): the hub's listing, or offline the cached
    /// snapshot's files.
    pub fn files(&self) -> Result<Vec<String>, LoadError> {
        if self.settings.offline {
            return self.cached_files().ok_or_else(|| LoadError::MissingFile {
                file: "a snapshot".into(),
                location: format!(
                    "{} (HF_HUB_OFFLINE is set and it is not in the cache at {})",
                    self.describe(),
                    self.settings.cache_dir.display()
                ),
            });
        }
        let repo = Repo::with_revision(self.id.repo.clone(), RepoType::Model, self.id.revision().to_string());
        let info =
            self.api("(listing)")?.repo(repo).info().map_err(|e| self.err("(listing)", e.to_string()))?;
        Ok(info.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    /// The cached snapshot's files at the repo's revision, if it is cached.
    fn cached_files(&self) -> Option<Vec<String>> {
        let rev = self.id.revision();
        let repo = Repo::with_revision(self.id.repo.clone(), RepoType::Model, rev.to_string());
        let folder = self.settings.cache_dir.join(repo.folder_name());
        let commit = if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
            rev.to_string()
        } else {
            std::fs::read_to_string(folder.join("refs").join(rev)).ok()?.trim().to_string()
        };
        let root = folder.join("snapshots").join(commit);
        let mut files = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).ok()?.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Ok(rel) = path.strip_prefix(&root) {
                    files.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        files.sort();
        Some(files)
    }

    /// The GGUF file the repo id selects (its `file`, else Q4_K_M, else the only one), local.
    pub fn gguf(&self) -> Result<PathBuf, LoadError> {
        let files = self.files()?;
        let name = pick_gguf(&files, self.id.file.as_deref())
            .map_err(|message| self.err(self.id.file.as_deref().unwrap_or("*.gguf"), message))?;
        self.require(&name)
    }

    /// Whether the config and every weight file are in the local cache (no network).
    pub fn weights_cached(&self) -> bool {
        if self.id.file.is_some() {
            let files = self.cached_files().unwrap_or_default();
            return pick_gguf(&files, self.id.file.as_deref()).is_ok_and(|f| self.cached(&f).is_some());
        }
        if self.cached("config.json").is_none() {
            return false;
        }
        if self.cached("model.safetensors").is_some() {
            return true;
        }
        let Some(index) = self.cached("model.safetensors.index.json") else { return false };
        let Ok(text) = std::fs::read_to_string(index) else { return false };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else { return false };
        map.values().filter_map(|f| f.as_str()).all(|f| self.cached(f).is_some())
    }

    /// `Ok(None)` when the file does not exist in the repo (or, offline, is not cached).
    pub fn get(&self, file: &str) -> Result<Option<PathBuf>, LoadError> {
        if let Some(p) = self.cached(file) {
            return Ok(Some(p));
        }
        if self.settings.offline {
            return Ok(None);
        }
        let api = self.api(file)?;
        let repo = Repo::with_revision(self.id.repo.clone(), RepoType::Model, self.id.revision().to_string());
        match api.repo(repo).get(file) {
            Ok(p) => Ok(Some(p)),
            // ureq reports an HTTP error status as "<url>: status code 404".
            Err(hf_hub::api::sync::ApiError::RequestError(e))
                if e.to_string().ends_with("status code 404") =>
            {
                Ok(None)
            }
            // No HTTP status at all: the hub is out of reach (no network, DNS, a proxy).
            Err(e @ hf_hub::api::sync::ApiError::RequestError(_)) if !e.to_string().contains("status code") => {
                Err(self.err(file, format!("{e}. The hub cannot be reached from here: serve a local model instead (`--model stories260k`, which is in the repository, or `--model path/to/folder`), or set HF_HUB_OFFLINE=1 to use only what is cached")))
            }
            Err(e) => Err(self.err(file, e.to_string())),
        }
    }

    /// Like [`HubRepo::get`], but a missing file is an error that says why it could be missing.
    pub fn require(&self, file: &str) -> Result<PathBuf, LoadError> {
        self.get(file)?.ok_or_else(|| LoadError::MissingFile {
            file: file.to_string(),
            location: if self.settings.offline {
                format!(
                    "{} (HF_HUB_OFFLINE is set and it is not in the cache at {})",
                    self.describe(),
                    self.settings.cache_dir.display()
                )
            } else {
                self.describe()
            },
        })
    }

    fn api(&self, file: &str) -> Result<hf_hub::api::sync::Api, LoadError> {
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(self.settings.cache_dir.clone()))
                .with_token(self.settings.token.clone())
                .with_progress(true);
        if let Some(e) = &self.settings.endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        builder.build().map_err(|e| self.err(file, e.to_string()))
    }

    fn err(&self, file: &str, message: String) -> LoadError {
        LoadError::Hub { repo: self.id.repo.clone(), file: file.to_string(), message }
    }
}

/// Which of a repo's files `selector` names: a `.gguf` file by its path, or a quantization tag
/// (any case) that a `.gguf` file's name ends with after `-` or `.`; with no selector the
/// Q4_K_M file if there is one, else the only GGUF file. Vision projectors (`mmproj`) are never
/// picked. The error lists the GGUF files there are.
pub fn pick_gguf(files: &[String], selector: Option<&str>) -> Result<String, String> {
    let ggufs: Vec<&String> = files
        .iter()
        .filter(|f| f.to_ascii_lowercase().ends_with(".gguf") && !f.to_ascii_lowercase().contains("mmproj"))
        .collect();
    let listing = || {
        if ggufs.is_empty() {
            "the repo has no GGUF files".to_string()
        } else {
            format!("its GGUF files: {}", ggufs.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", "))
        }
    };
    let tagged = |tag: &str| -> Vec<&String> {
        let tag = tag.to_ascii_lowercase();
        ggufs
            .iter()
            .copied()
            .filter(|f| {
                let stem = f.to_ascii_lowercase();
                let stem = stem.trim_end_matches(".gguf");
                let stem = stem.rsplit('/').next().unwrap_or(stem);
                // A split file's part number (`-00001-of-00002`) follows the tag.
                let stem = match stem.rsplit_once("-of-") {
                    Some((head, _)) => head.rsplit_once('-').map_or(head, |(h, _)| h),
                    None => stem,
                };
                stem.strip_suffix(tag.as_str()).is_some_and(|head| head.ends_with(['-', '.']))
            })
            .collect()
    };
    let found = match selector {
        Some(file) if file.to_ascii_lowercase().ends_with(".gguf") => {
            ggufs.iter().copied().filter(|f| *f == file).collect()
        }
        Some(tag) => tagged(tag),
        None => match tagged("Q4_K_M") {
            q if q.len() == 1 => q,
            _ => ggufs.clone(),
        },
    };
    let wanted = selector.unwrap_or("*.gguf");
    if found.iter().any(|f| f.contains("-of-")) {
        return Err(format!(
            "`{wanted}` is split into several files, which ferrite does not read yet; {}",
            listing()
        ));
    }
    match found.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(format!("no GGUF file matches `{wanted}`; {}", listing())),
        _ => {
            Err(format!("several GGUF files match `{wanted}`: name one with `org/name:FILE`; {}", listing()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_parse_with_and_without_revision() {
        assert_eq!(
            RepoId::parse("Qwen/Qwen2.5-0.5B-Instruct"),
            Some(RepoId { repo: "Qwen/Qwen2.5-0.5B-Instruct".into(), revision: None, file: None })
        );
        let id = RepoId::parse("org/name-GGUF@v2:Q4_K_M").unwrap();
        assert_eq!((id.revision.as_deref(), id.file.as_deref()), (Some("v2"), Some("Q4_K_M")));
        assert_eq!(
            RepoId::parse("org/name:sub/model-q8_0.gguf").unwrap().file.as_deref(),
            Some("sub/model-q8_0.gguf")
        );
        assert_eq!(RepoId::parse("org/name@v1.0").unwrap().revision.as_deref(), Some("v1.0"));
        for bad in [
            "name",
            "a/b/c",
            "/abs/path",
            "./rel",
            "org/",
            "org/name@",
            "../x/y",
            "org/name:",
            "org/name:../x",
        ] {
            assert_eq!(RepoId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn gguf_files_are_picked_by_name_or_tag() {
        let files: Vec<String> = [
            "README.md",
            "SmolLM2-135M-Instruct-Q4_K_M.gguf",
            "SmolLM2-135M-Instruct-Q8_0.gguf",
            "SmolLM2-135M-Instruct.Q4_0.gguf",
            "mmproj-SmolLM2-f16.gguf",
            "big/Model-Q6_K-00001-of-00002.gguf",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(pick_gguf(&files, Some("q8_0")).unwrap(), "SmolLM2-135M-Instruct-Q8_0.gguf");
        assert_eq!(pick_gguf(&files, Some("Q4_0")).unwrap(), "SmolLM2-135M-Instruct.Q4_0.gguf");
        assert_eq!(pick_gguf(&files, None).unwrap(), "SmolLM2-135M-Instruct-Q4_K_M.gguf");
        assert_eq!(
            pick_gguf(&files, Some("SmolLM2-135M-Instruct-Q8_0.gguf")).unwrap(),
            "SmolLM2-135M-Instruct-Q8_0.gguf"
        );
        let e = pick_gguf(&files, Some("Q5_K_M")).unwrap_err();
        assert!(
            e.contains("no GGUF file matches `Q5_K_M`") && e.contains("SmolLM2-135M-Instruct-Q8_0.gguf"),
            "{e}"
        );
        assert!(!e.contains("mmproj"), "{e}");
        // A tag is the name's whole last part: `K_M` is not one.
        let e = pick_gguf(&files, Some("K_M")).unwrap_err();
        assert!(e.contains("no GGUF file matches"), "{e}");
        let e = pick_gguf(&files, Some("Q6_K")).unwrap_err();
        assert!(e.contains("split into several files"), "{e}");
        let two = ["a-Q8_0.gguf", "b-Q8_0.gguf"].map(String::from).to_vec();
        assert!(pick_gguf(&two, Some("Q8_0")).unwrap_err().contains("several GGUF files match"));
        assert!(pick_gguf(&two, None).unwrap_err().contains("several GGUF files match `*.gguf`"));
    }
}
