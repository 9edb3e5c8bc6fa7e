//! Cache layout `<cache>/<name>/<file>`, the `.verified` marker and the pull lock.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{HubError, IoContext};
use crate::manifest::ModelEntry;
use crate::progress::Reporter;

/// The model cache: `$EMBER_MODELS`, else `$XDG_CACHE_HOME/ember/models`, else
/// `~/.cache/ember/models`.
pub fn cache_dir() -> Result<PathBuf, HubError> {
    cache_dir_from(|k| std::env::var_os(k))
}

/// `cache_dir` with the environment injected, so precedence is testable without
/// mutating the process environment.
pub(crate) fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, HubError> {
    // Empty values count as unset, as the XDG spec asks.
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("EMBER_MODELS") {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("ember").join("models"));
    }
    if let Some(home) = var("HOME") {
        return Ok(home.join(".cache").join("ember").join("models"));
    }
    Err(HubError::NoCacheDir)
}

pub(crate) fn model_dir(cache: &Path, entry: &ModelEntry) -> PathBuf {
    cache.join(&entry.name)
}

pub(crate) fn marker_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// What we knew about the file when we last hashed it. If size and mtime still match,
/// the file is trusted without re-hashing hundreds of MB.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    sha256: String,
    size: u64,
    mtime_secs: u64,
    mtime_nanos: u32,
}

fn marker_for(meta: &fs::Metadata, sha256: &str) -> Option<Marker> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(Marker {
        sha256: sha256.to_string(),
        size: meta.len(),
        mtime_secs: mtime.as_secs(),
        mtime_nanos: mtime.subsec_nanos(),
    })
}

/// Record that `file` has been hashed and matched. Best effort: a missing marker only
/// costs one more hash next time.
pub(crate) fn write_marker(file: &Path, sha256: &str) {
    if let Ok(meta) = fs::metadata(file)
        && let Some(m) = marker_for(&meta, sha256)
        && let Ok(json) = serde_json::to_string(&m)
    {
        let _ = fs::write(marker_path(file), json);
    }
}

/// Whether `file` exists and holds the model, hashing it only if the marker is stale.
pub(crate) fn is_cached(
    entry: &ModelEntry,
    file: &Path,
    reporter: &Reporter,
) -> Result<bool, HubError> {
    let meta = match fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(HubError::io(format!("cannot stat {}", file.display()), e)),
    };
    if !meta.is_file() || meta.len() != entry.size {
        return Ok(false);
    }
    let expected = marker_for(&meta, &entry.sha256);
    let recorded = fs::read_to_string(marker_path(file))
        .ok()
        .and_then(|s| serde_json::from_str::<Marker>(&s).ok());
    if expected.is_some() && recorded == expected {
        return Ok(true);
    }
    reporter.log(&format!("verifying {}", file.display()));
    let actual = sha256_file(file, reporter)?;
    if actual == entry.sha256 {
        write_marker(file, &entry.sha256);
        Ok(true)
    } else {
        reporter.log(&format!(
            "cached {} has sha256 {actual}, expected {}; it will be fetched again",
            file.display(),
            entry.sha256
        ));
        Ok(false)
    }
}

pub(crate) fn sha256_file(path: &Path, reporter: &Reporter) -> Result<String, HubError> {
    let ctx = || format!("cannot read {}", path.display());
    let mut f = File::open(path).ctx(ctx)?;
    let len = f.metadata().ctx(ctx)?.len();
    let bar = reporter.bytes_bar(len, "verifying sha256");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HubError::io(ctx(), e)),
        };
        hasher.update(&buf[..n]);
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Exclusive advisory lock on `<dir>/.lock`, held until the returned file is dropped.
///
/// `flock`-style locks (std `File::lock`) are released by the kernel when the holder
/// exits or crashes, so there is no stale-lock timeout to tune. The lock file itself is
/// never deleted: removing it would let a waiter and a newcomer lock different inodes.
pub(crate) fn lock_dir(dir: &Path, what: &str, reporter: &Reporter) -> Result<File, HubError> {
    let path = dir.join(".lock");
    let ctx = || format!("cannot lock {}", path.display());
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .ctx(ctx)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            reporter.log(&format!(
                "waiting for another process that is fetching {what} ({})",
                path.display()
            ));
            f.lock().ctx(ctx)?;
        }
        Err(fs::TryLockError::Error(e)) => return Err(HubError::io(ctx(), e)),
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn cache_dir_precedence() {
        let all = [
            ("EMBER_MODELS", "/m"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(env(&all)).unwrap(), PathBuf::from("/m"));
        assert_eq!(
            cache_dir_from(env(&all[1..])).unwrap(),
            PathBuf::from("/x/ember/models")
        );
        assert_eq!(
            cache_dir_from(env(&[("EMBER_MODELS", ""), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.cache/ember/models")
        );
        assert!(matches!(
            cache_dir_from(env(&[])),
            Err(HubError::NoCacheDir)
        ));
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
