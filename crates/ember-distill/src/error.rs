//! What can go wrong.

/// Why a student could not be made, run or written.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// The teacher's architecture has no student here.
    #[error("a {0} teacher has no student yet (llama-family teachers only)")]
    UnsupportedArchitecture(String),
    /// The teacher's hyper-parameters could not be read.
    #[error("teacher: {0}")]
    Teacher(#[from] ember_models::ModelError),
    /// A layer choice that cannot make a student.
    #[error("layers: {0}")]
    Layers(String),
    /// A teacher tensor is missing or has another shape than its config says.
    #[error("teacher tensor {name}: {why}")]
    Tensor {
        /// The GGUF tensor name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The training data cannot be used.
    #[error("data: {0}")]
    Data(String),
    /// A checkpoint that this run cannot continue from.
    #[error("resume: {0}")]
    Resume(String),
    /// The caller stopped the run before training began (nothing to checkpoint yet).
    #[error("interrupted before training began; nothing was saved")]
    Interrupted,
    /// Measuring the report failed.
    #[error("report: {0}")]
    Report(String),
    /// Writing the GGUF (or a checkpoint, cache or log) failed.
    #[error("writing {path}: {why}")]
    Write {
        /// The output path.
        path: String,
        /// The cause.
        why: String,
    },
}
