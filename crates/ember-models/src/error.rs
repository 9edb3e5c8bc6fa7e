use ember_quant::GgmlType;

/// Errors loading a model or running a pass.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `general.architecture` names an architecture this crate does not implement.
    #[error("unsupported architecture '{0}' (supported: llama, gemma3, qwen2, qwen3, phi3)")]
    UnsupportedArchitecture(String),
    /// The file has no `general.architecture` key.
    #[error("the file has no general.architecture")]
    NoArchitecture,
    /// A metadata key the architecture needs (named) is absent.
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    /// A metadata value that cannot be right: out of range, of the wrong type, or contradicting
    /// the tensors or other keys. `value` is what the file says, `expected` what it must be.
    #[error(
        "{key} is {value} but {expected} (the model file is damaged or was converted wrongly: \
         download or convert it again)"
    )]
    BadMetadata {
        /// The metadata key.
        key: String,
        /// Its value, as the file has it.
        value: String,
        /// What it must be, and why.
        expected: String,
    },
    /// A model feature Ember does not implement (RoPE scaling, a V head size different from
    /// K's, ...), described.
    #[error("{0} is not supported yet")]
    Unsupported(String),
    /// A tensor the architecture needs (named) is not in the file.
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    /// A tensor's shape disagrees with the hyper-parameters.
    #[error(
        "tensor '{name}' has shape {got:?} but the metadata makes it {expected:?} (the model \
         file is damaged or was converted wrongly)"
    )]
    BadShape {
        /// The tensor's name.
        name: String,
        /// Its dims in the file (ggml order: innermost first).
        got: Vec<u64>,
        /// The dims the metadata implies.
        expected: Vec<u64>,
    },
    /// A vector tensor (a norm weight, a bias) is stored in a type that cannot be dequantized.
    #[error("tensor '{name}': {ty} is not supported here")]
    UnsupportedType {
        /// The tensor's name.
        name: String,
        /// Its ggml type.
        ty: GgmlType,
    },
    /// A weight matrix cannot be used: its type has no matmul kernel, a row does not fill
    /// whole quantization blocks, or its rows could not be read (the embedding lookup).
    #[error("tensor '{name}': {source}")]
    Weight {
        /// The tensor's name.
        name: String,
        /// Why the matrix was refused.
        source: ember_kernels::QuantMatrixError,
    },
    /// A token id given to a pass has no row in the embedding.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size ([`ModelConfig::n_vocab`](crate::ModelConfig::n_vocab)).
        vocab: usize,
    },
    /// The KV cache refused an operation (out of blocks, context full, unknown sequence, ...).
    #[error(transparent)]
    Kv(#[from] ember_kv::KvError),
    /// A pass was given no items, or an item without tokens.
    #[error("empty batch: at least one token is needed")]
    EmptyBatch,
    /// [`PassOptions::layers`](crate::PassOptions::layers) outside `1..=n_layer`.
    #[error(
        "the pass asks for {layers} layers but the model has {n_layer} (a pass runs 1 to \
         {n_layer} of them)"
    )]
    BadLayerCount {
        /// The layers asked for.
        layers: usize,
        /// The model's layer count.
        n_layer: usize,
    },
    /// The cache has another number of layers than the pass runs (see
    /// [`Model::kv_config_layers`](crate::Model::kv_config_layers)).
    #[error(
        "the KV cache has {cache} layers but the pass runs {layers} (a cache made for another \
         layer count)"
    )]
    CacheLayers {
        /// Layers in the cache.
        cache: usize,
        /// Layers the pass runs.
        layers: usize,
    },
    /// A self-speculative draft must skip at least one layer and run at least one.
    #[error(
        "a self-speculative draft runs the first 1 to {max} of the model's {n_layer} layers, \
         not {layers} (it must run at least one and skip at least one)",
        max = .n_layer.saturating_sub(1)
    )]
    SelfDraftLayers {
        /// The layers asked for.
        layers: usize,
        /// The model's layer count.
        n_layer: usize,
    },
    /// A sequence appears twice in one batch, where each may appear once.
    #[error("{0} appears more than once in one batch")]
    DuplicateSequence(ember_kv::SeqId),
    /// `--gpu-layers` or a GPU memory limit given for a CPU device.
    #[error(
        "--gpu-layers and --gpu-memory-mib place blocks on a GPU: give a GPU --device (wgpu, \
         vulkan, metal, cuda) with them"
    )]
    GpuOptionsOnCpu,
    /// The GPU's part of the model needs more memory than the stated limit
    /// ([`ModelOptions::gpu_memory`](crate::ModelOptions::gpu_memory)).
    #[error(
        "the model's GPU part needs {} (weights {} for {} blocks and the head, working memory \
         {}, KV cache at {} positions {}) but the GPU has {} for it: {}",
        mib(need.total()), mib(need.weights), need.layers, mib(need.scratch), need.context,
        mib(need.kv_cache), mib(*limit),
        match fits {
            Some(n) => format!(
                "--gpu-layers {n} fits, the other blocks running on the CPU (a smaller \
                 --ctx-size shrinks the KV cache)"
            ),
            None => "not even the head alone fits; run it on the CPU (--device cpu)".into(),
        }
    )]
    DeviceMemory {
        /// What the asked placement needs.
        need: crate::DeviceMemory,
        /// The memory stated.
        limit: u64,
        /// The most blocks that fit with the head, if any number does.
        fits: Option<usize>,
    },
}

/// Bytes in MiB, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}
