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

/// A repo id with an optional revision: `org/name` or `org/name@revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    pub repo: String,
    pub revision: Option<String>,
}

impl RepoId {
    /// Parses `org/name[@revision]`; `None` when the string does not have that shape.
    pub fn parse(s: &str) -> Option<Self> {
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
        (ok(org) && ok(name)).then(|| Self { repo: repo.to_string(), revision })
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

    /// Whether the config and every weight file are in the local cache (no network).
    pub fn weights_cached(&self) -> bool {
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
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(self.settings.cache_dir.clone()))
                .with_token(self.settings.token.clone())
                .with_progress(true);
        if let Some(e) = &self.settings.endpoint {
            builder = builder.with_endpoint(e.clone());
        }
        let api = builder.build().map_err(|e| self.err(file, e.to_string()))?;
        let repo = Repo::with_revision(self.id.repo.clone(), RepoType::Model, self.id.revision().to_string());
        match api.repo(repo).get(file) {
            Ok(p) => Ok(Some(p)),
            // ureq reports an HTTP error status as "<url>: status code 404".
            Err(hf_hub::api::sync::ApiError::RequestError(e))
                if e.to_string().ends_with("status code 404") =>
            {
                Ok(None)
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

    fn err(&self, file: &str, message: String) -> LoadError {
        LoadError::Hub { repo: self.id.repo.clone(), file: file.to_string(), message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_parse_with_and_without_revision() {
        assert_eq!(
            RepoId::parse("Qwen/Qwen2.5-0.5B-Instruct"),
            Some(RepoId { repo: "Qwen/Qwen2.5-0.5B-Instruct".into(), revision: None })
        );
        assert_eq!(RepoId::parse("org/name@v1.0").unwrap().revision.as_deref(), Some("v1.0"));
        for bad in ["name", "a/b/c", "/abs/path", "./rel", "org/", "org/name@", "../x/y"] {
            assert_eq!(RepoId::parse(bad), None, "{bad}");
        }
    }
}
