use ember_quant::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{0}' (supported: llama, gemma3, qwen2, qwen3, phi3)")]
    UnsupportedArchitecture(String),
    #[error("the file has no general.architecture")]
    NoArchitecture,
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    /// A metadata value that cannot be right: out of range, of the wrong type, or contradicting
    /// the tensors or other keys. `value` is what the file says, `expected` what it must be.
    #[error(
        "{key} is {value} but {expected} (the model file is damaged or was converted wrongly: \
         download or convert it again)"
    )]
    BadMetadata {
        key: String,
        value: String,
        expected: String,
    },
    #[error("{0} is not supported yet")]
    Unsupported(String),
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error(
        "tensor '{name}' has shape {got:?} but the metadata makes it {expected:?} (the model \
         file is damaged or was converted wrongly)"
    )]
    BadShape {
        name: String,
        got: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("tensor '{name}': {ty} is not supported here")]
    UnsupportedType { name: String, ty: GgmlType },
    #[error("tensor '{name}': {source}")]
    Weight {
        name: String,
        source: ember_kernels::QuantMatrixError,
    },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error(transparent)]
    Kv(#[from] ember_kv::KvError),
    #[error("empty batch: at least one token is needed")]
    EmptyBatch,
}
