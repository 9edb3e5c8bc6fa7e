//! Test support shared by this crate's tests, the crates above it and `cargo xtask`: tiny random
//! models whose llama.cpp logits are checked in as fixtures, and scratch directories.

pub mod tiny;

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A fresh directory for a test's files, removed when dropped unless the thread is panicking
/// (a failed test keeps its files to look at). Tests that convert real models write hundreds
/// of MiB each; leaving them behind filled CI's disk once.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `parent/name`, emptied first. Tests pass `env!("CARGO_TARGET_TMPDIR")` as `parent`.
    ///
    /// # Panics
    /// If the directory cannot be made: this is test support.
    pub fn new(parent: impl AsRef<Path>, name: &str) -> ScratchDir {
        let dir = parent.as_ref().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("scratch dir {}: {e}", dir.display()));
        ScratchDir(dir)
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ScratchDir;

    #[test]
    fn scratch_dir_is_fresh_and_removed_on_drop() {
        let parent = std::env::temp_dir().join(format!("ember-scratch-{}", std::process::id()));
        let path = {
            let dir = ScratchDir::new(&parent, "a");
            std::fs::write(dir.join("f"), b"x").unwrap();
            let again = ScratchDir::new(&parent, "a");
            assert!(!again.join("f").exists(), "a new scratch dir starts empty");
            std::mem::forget(dir);
            again.path().to_path_buf()
        };
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&parent);
    }
}
