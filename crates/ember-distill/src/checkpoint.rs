//! Training checkpoints: the student's parameters, the optimizer's state and the step, so a
//! run resumed from one continues exactly where it stopped.

use std::path::Path;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::store::ModuleRecord;

use crate::{DistillError, Student};

const STUDENT: &str = "student.bpk";
const OPTIMIZER: &str = "optimizer.bpk";
const STEP: &str = "step";

fn err(dir: &Path, what: &str, why: impl std::fmt::Display) -> DistillError {
    DistillError::Write {
        path: dir.join(what).display().to_string(),
        why: why.to_string(),
    }
}

/// Writes `student`, `optim` and `step` into `dir` (created if needed). The step file is
/// written last, so a directory with one holds a whole checkpoint.
pub fn save_checkpoint(
    dir: &Path,
    student: &Student,
    optim: &ModuleOptimizer,
    step: usize,
) -> Result<(), DistillError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, "", e))?;
    let _ = std::fs::remove_file(dir.join(STEP));
    student
        .valid()
        .into_record()
        .save(dir.join(STUDENT))
        .map_err(|e| err(dir, STUDENT, format!("{e:?}")))?;
    optim
        .save(dir.join(OPTIMIZER))
        .map_err(|e| err(dir, OPTIMIZER, format!("{e:?}")))?;
    std::fs::write(dir.join(STEP), step.to_string()).map_err(|e| err(dir, STEP, e))
}

/// Loads a checkpoint written by [`save_checkpoint`] into `student` (a student of the same
/// shape, e.g. made again from the teacher) and `optim` (a fresh optimizer of the same
/// configuration): the student on its device, tracked for training, and the step to go on
/// from.
pub fn load_checkpoint(
    dir: &Path,
    student: Student,
    optim: ModuleOptimizer,
) -> Result<(Student, ModuleOptimizer, usize), DistillError> {
    let step: usize = std::fs::read_to_string(dir.join(STEP))
        .map_err(|e| err(dir, STEP, e))?
        .trim()
        .parse()
        .map_err(|e| err(dir, STEP, e))?;
    let record =
        ModuleRecord::load(dir.join(STUDENT)).map_err(|e| err(dir, STUDENT, format!("{e:?}")))?;
    // A checkpoint of another student (other layers, another teacher) is an error, not a
    // panic.
    let student = student
        .try_load_record(record)
        .map_err(|e| err(dir, STUDENT, format!("does not fit this student: {e:?}")))?
        .train();
    let optim = optim
        .load(dir.join(OPTIMIZER))
        .map_err(|e| err(dir, OPTIMIZER, format!("{e:?}")))?;
    Ok((student, optim, step))
}
