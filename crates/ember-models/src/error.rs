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
    /// [`PassOptions::layers`](crate::PassOptions::layers) outside `1..=n_layer`.
    #[error(
        "the pass asks for {layers} layers but the model has {n_layer} (a pass runs 1 to \
         {n_layer} of them)"
    )]
    BadLayerCount { layers: usize, n_layer: usize },
    #[error(
        "the KV cache has {cache} layers but the pass runs {layers} (a cache made for another \
         layer count)"
    )]
    CacheLayers { cache: usize, layers: usize },
    /// A self-speculative draft must skip at least one layer and run at least one.
    #[error(
        "a self-speculative draft runs the first 1 to {max} of the model's {n_layer} layers, \
         not {layers} (it must run at least one and skip at least one)",
        max = .n_layer.saturating_sub(1)
    )]
    SelfDraftLayers { layers: usize, n_layer: usize },
    #[error("{0} appears more than once in one batch")]
    DuplicateSequence(ember_kv::SeqId),
}
