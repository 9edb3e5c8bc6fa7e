//! Training checkpoints: the student's parameters, the optimizer's state and the step, so a
//! run resumed from one continues exactly where it stopped.
//!
//! A checkpoint is a directory. It is written whole next to its final place
//! (`DIR.partial`) and swapped in by renames, so a crash or a full disk mid-write leaves the
//! previous checkpoint readable (as `DIR`, or as `DIR.old` for the instant between the two
//! renames, which [`load_checkpoint`] also reads).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;

use crate::{DistillError, Student};

const STUDENT: &str = "student.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
const STEP: &str = "step";
const MANIFEST: &str = "job.json";

fn err(dir: &Path, what: &str, why: impl std::fmt::Display) -> DistillError {
    DistillError::Write {
        path: dir.join(what).display().to_string(),
        why: why.to_string(),
    }
}

/// `dir`'s sibling named `<dir's name><suffix>` (a trailing slash or `./` in `dir` does not
/// put it inside `dir`); `None` for a path without a name (`.`, `/`).
fn sibling(dir: &Path, suffix: &str) -> Option<PathBuf> {
    let name = dir.file_name()?;
    if dir.components().next_back() != Some(std::path::Component::Normal(name)) {
        return None;
    }
    let mut s = name.to_owned();
    s.push(suffix);
    Some(dir.with_file_name(s))
}

/// Refuses a checkpoint directory that could not be swapped safely: a path without a name,
/// or an existing directory with other contents than a checkpoint's (replacing it would
/// delete them).
pub fn check_checkpoint_dir(dir: &Path) -> Result<(), DistillError> {
    let nameless = || {
        err(
            dir,
            "",
            "a checkpoint directory needs a name of its own (not `.`, `..` or `/`)",
        )
    };
    sibling(dir, "").ok_or_else(nameless)?;
    if dir.is_file() {
        return Err(err(dir, "", "it is a file, not a directory"));
    }
    let foreign = std::fs::read_dir(dir)
        .map(|mut entries| entries.next().is_some() && !dir.join(STEP).exists())
        .unwrap_or(false);
    if foreign {
        return Err(err(
            dir,
            "",
            "the directory holds other files and no checkpoint: a checkpoint would replace \
             it, so give a new or empty directory",
        ));
    }
    Ok(())
}

/// Flushes a written file (or a directory's entries) to the disk.
fn sync(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Writes a checkpoint into `dir` (created if missing): the student's parameters
/// (`student.bpk`), the optimizer's state (`optimizer.bpk`), the step, and when given the
/// run's `manifest` (`job.json`: what a resume must agree with).
pub fn save_checkpoint(
    dir: &Path,
    student: &Student,
    optim: &ModuleOptimizer,
    step: usize,
    manifest: Option<&str>,
) -> Result<(), DistillError> {
    check_checkpoint_dir(dir)?;
    let nameless = || err(dir, "", "a checkpoint directory needs a name of its own");
    let partial = sibling(dir, ".partial").ok_or_else(nameless)?;
    let old = sibling(dir, ".old").ok_or_else(nameless)?;
    // A save interrupted between its renames left the checkpoint as `old`: put it back first,
    // so that it is never the copy removed below.
    if !dir.join(STEP).exists() && old.join(STEP).exists() {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&old, dir).map_err(|e| err(dir, "", e))?;
    }
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| err(&partial, "", e))?;
    let write = || -> Result<(), DistillError> {
        student
            .valid()
            .into_record()
            .save(partial.join(STUDENT))
            .map_err(|e| err(&partial, STUDENT, format!("{e:?}")))?;
        optim
            .save(partial.join(OPTIMIZER))
            .map_err(|e| err(&partial, OPTIMIZER, format!("{e:?}")))?;
        if let Some(m) = manifest {
            std::fs::write(partial.join(MANIFEST), m).map_err(|e| err(&partial, MANIFEST, e))?;
        }
        // The step is written last: a directory without it is never taken for a checkpoint.
        std::fs::write(partial.join(STEP), step.to_string()).map_err(|e| err(&partial, STEP, e))?;
        for f in [STUDENT, OPTIMIZER, MANIFEST, STEP] {
            let path = partial.join(f);
            if path.exists() {
                sync(&path).map_err(|e| err(&partial, f, e))?;
            }
        }
        sync(&partial).map_err(|e| err(&partial, "", e))
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| err(dir, "", e))?;
    }
    std::fs::rename(&partial, dir).map_err(|e| err(dir, "", e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = sync(parent);
    }
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The directory holding the checkpoint `dir` names: `dir` itself, or `dir.old` when a save
/// was interrupted between its two renames.
fn readable(dir: &Path) -> PathBuf {
    match sibling(dir, ".old") {
        Some(old) if !dir.join(STEP).exists() && old.join(STEP).exists() => old,
        _ => dir.to_path_buf(),
    }
}

/// The manifest saved with the checkpoint in `dir`, if it has one.
pub fn checkpoint_manifest(dir: &Path) -> Result<Option<String>, DistillError> {
    let dir = readable(dir);
    if !dir.join(STEP).exists() {
        return Err(err(
            &dir,
            STEP,
            "no checkpoint here (its step file is missing)",
        ));
    }
    match std::fs::read_to_string(dir.join(MANIFEST)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(&dir, MANIFEST, e)),
    }
}

/// Reads a checkpoint written by [`save_checkpoint`] into `student` (built with the same
/// configuration) and `optim` (a fresh optimizer of the same kind). Returns them, the student
/// tracked for training, and the step the checkpoint was written at.
pub fn load_checkpoint(
    dir: &Path,
    student: Student,
    optim: ModuleOptimizer,
) -> Result<(Student, ModuleOptimizer, usize), DistillError> {
    let dir = &readable(dir);
    let step: usize = std::fs::read_to_string(dir.join(STEP))
        .map_err(|e| err(dir, STEP, e))?
        .trim()
        .parse()
        .map_err(|e| err(dir, STEP, e))?;
    let record =
        ModuleRecord::load(dir.join(STUDENT)).map_err(|e| err(dir, STUDENT, format!("{e:?}")))?;
    let student = student
        .try_load_record(record)
        .map_err(|e| err(dir, STUDENT, format!("does not fit this student: {e:?}")))?
        .train();
    let optim = optim
        .load(dir.join(OPTIMIZER))
        .map_err(|e| err(dir, OPTIMIZER, format!("{e:?}")))?;
    Ok((student, optim, step))
}
