#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod config;
mod error;
mod gemma3;
mod layers;
mod llama;
mod model;
mod phi3;
mod placement;
mod qwen2;
mod qwen3;
pub mod testing;
pub mod trace;
mod weights;

pub use config::{ModelConfig, RopeMode, SlidingWindow};
pub use error::ModelError;
pub use gemma3::Gemma3;
pub use llama::Llama;
pub use model::{Architecture, BatchSeq, Logits, Model, Pass, PassOptions, UBATCH};
pub use phi3::Phi3;
pub use placement::{DeviceMemory, Placement, device_memory};
pub use qwen2::Qwen2;
pub use qwen3::Qwen3;
pub use weights::{ExternalWeights, Weights};

use burn::tensor::Device;
#[cfg(feature = "cube")]
use burn::tensor::TensorData;
use ember_formats::GgufFile;

/// The CPU device used by default: burn-flex when built, else burn-ndarray.
pub fn default_device() -> Device {
    #[cfg(feature = "flex")]
    {
        Device::flex()
    }
    #[cfg(all(not(feature = "flex"), feature = "ndarray"))]
    #[allow(deprecated)]
    {
        Device::ndarray()
    }
}

/// The names [`device_by_name`] takes, whether or not this build has them.
pub const DEVICE_NAMES: &[&str] = &["cpu", "wgpu", "vulkan", "metal", "cuda"];

/// A device named as `--device` takes it: `cpu` ([`default_device`]); with feature `wgpu`,
/// `wgpu` (the best GPU adapter on whichever API the machine offers: Vulkan, Metal, DX12, or
/// Mesa's lavapipe on a machine with none); with `vulkan` or `metal`, that API only; with
/// `cuda`, the first CUDA device (compile-checked only: see docs/gpu.md). A GPU
/// device is started here, with one small round trip, so that a machine without one gets an
/// error now rather than a panic in the middle of loading.
pub fn device_by_name(name: &str) -> Result<Device, UnknownDevice> {
    let unbuilt = |feature: &'static str| {
        Err(UnknownDevice {
            name: name.to_string(),
            why: format!(
                "this build has no `{feature}` feature (cargo build --release -p ember-cli --features {feature})"
            ),
        })
    };
    match name {
        "cpu" => Ok(default_device()),
        #[cfg(feature = "wgpu")]
        "wgpu" => gpu_up(name, Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => unbuilt("wgpu"),
        #[cfg(feature = "vulkan")]
        "vulkan" => gpu_up(
            name,
            Device::vulkan(burn::tensor::DeviceKind::DefaultDevice),
        ),
        #[cfg(not(feature = "vulkan"))]
        "vulkan" => unbuilt("vulkan"),
        #[cfg(feature = "metal")]
        "metal" => gpu_up(name, Device::metal(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(not(feature = "metal"))]
        "metal" => unbuilt("metal"),
        #[cfg(feature = "cuda")]
        "cuda" => gpu_up(name, Device::cuda(0)),
        #[cfg(not(feature = "cuda"))]
        "cuda" => unbuilt("cuda"),
        _ => Err(UnknownDevice {
            name: name.to_string(),
            why: format!("expected one of {}", DEVICE_NAMES.join(", ")),
        }),
    }
}

/// `device` once a value has made a round trip through it. burn's wgpu runtime panics when no
/// adapter exists; that panic becomes the error here.
#[cfg(feature = "cube")]
fn gpu_up(name: &str, device: Device) -> Result<Device, UnknownDevice> {
    let probe = device.clone();
    let round_trip = std::panic::catch_unwind(move || {
        burn::tensor::Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &probe)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))
    });
    let why = match round_trip {
        Ok(Ok(v)) if v == [1.0] => return Ok(device),
        Ok(Ok(v)) => format!("a round trip through the device gave {v:?}"),
        Ok(Err(e)) => e,
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "it failed to start".into()),
    };
    Err(UnknownDevice {
        name: name.to_string(),
        why: format!("no usable GPU adapter: {why}"),
    })
}

/// Why [`device_by_name`] refused a name.
#[derive(Debug, thiserror::Error)]
#[error("device `{name}`: {why}")]
pub struct UnknownDevice {
    /// The name asked for.
    pub name: String,
    /// What is wrong with it.
    pub why: String,
}

/// Loads the model a GGUF file describes, on `device`.
pub fn load(file: &GgufFile, device: &Device) -> Result<Model, ModelError> {
    load_with(file, None, device)
}

/// [`load`], with linear layers supplied beside the file (a checkpoint directory's, see
/// [`ExternalWeights`]).
pub fn load_with(
    file: &GgufFile,
    external: Option<&ExternalWeights>,
    device: &Device,
) -> Result<Model, ModelError> {
    load_with_options(file, external, device, &ModelOptions::default())
}

/// How [`load_with_options`] treats the file's weights and where it puts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// Repack the file's matrices for this CPU's kernels at load ([`Weights::with_repack`]):
    /// on by default; off keeps every weight a zero-copy view of the mapping. Results are the
    /// same bits either way.
    pub repack: bool,
    /// On a GPU device, how many blocks run there, the last ones, with the output head
    /// (`--gpu-layers`, as llama.cpp's `-ngl`); the others run on the CPU
    /// ([`default_device`]). `None`: every block. Refused on a CPU device.
    pub gpu_layers: Option<usize>,
    /// On a GPU device, the memory it has for the model, in bytes: a model whose GPU part
    /// ([`device_memory`]) needs more is refused before anything is uploaded, naming the
    /// sizes and how many blocks would fit. `None`: the capacity the device states, where it
    /// states one (CUDA, Metal, Vulkan through the `vulkan` feature), else not checked (wgpu's
    /// portable path states none). Refused on a CPU device.
    pub gpu_memory: Option<u64>,
    /// The longest sequence the model will run, for the GPU memory check's attention term;
    /// `None`: the trained context length, capped by what [`kv_budget`](Self::kv_budget)
    /// holds.
    pub max_context: Option<usize>,
    /// The KV cache budget in bytes and its element type, when the context is not given: the
    /// context the check counts is then the trained length capped by what the budget holds
    /// (the runtime's default context).
    pub kv_budget: Option<(u64, ember_kernels::KvDtype)>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            repack: true,
            gpu_layers: None,
            gpu_memory: None,
            max_context: None,
            kv_budget: None,
        }
    }
}

/// [`load_with`], with options.
pub fn load_with_options(
    file: &GgufFile,
    external: Option<&ExternalWeights>,
    device: &Device,
    options: &ModelOptions,
) -> Result<Model, ModelError> {
    let config = ModelConfig::from_gguf_with(file, external)?;
    let placement = place(file, external, &config, device, options)?;
    let w = match external {
        Some(e) => Weights::with_external(file, e, device),
        None => Weights::new(file, device),
    }
    .with_repack(options.repack)
    .with_placement(placement);
    let arch: Box<dyn Architecture> = match config.architecture.as_str() {
        "llama" => Box::new(Llama::load(&w, &config)?),
        "gemma3" => Box::new(Gemma3::load(&w, &config)?),
        "qwen2" => Box::new(Qwen2::load(&w, &config)?),
        "qwen3" => Box::new(Qwen3::load(&w, &config)?),
        "phi3" => Box::new(Phi3::load(&w, &config)?),
        other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
    };
    Model::new(&w, config, device, arch)
}

/// Where the blocks go, and the GPU memory check, before any weight is touched.
fn place(
    file: &GgufFile,
    external: Option<&ExternalWeights>,
    config: &ModelConfig,
    device: &Device,
    options: &ModelOptions,
) -> Result<Placement, ModelError> {
    if placement::is_cpu(device) {
        if options.gpu_layers.is_some() || options.gpu_memory.is_some() {
            return Err(ModelError::GpuOptionsOnCpu);
        }
        return Ok(Placement::single(device));
    }
    let n_layer = config.n_layer;
    let gpu_layers = options.gpu_layers.unwrap_or(n_layer).min(n_layer);
    // A stated limit, else what the device says it has (wgpu's portable path says nothing).
    #[cfg(feature = "cube")]
    let capacity = ember_kernels::gpu_memory_limits(device).and_then(|l| l.capacity);
    #[cfg(not(feature = "cube"))]
    let capacity = None;
    if let Some(limit) = options.gpu_memory.or(capacity) {
        let context = options.max_context.unwrap_or_else(|| {
            let trained = config.context_length;
            // The cache's own per-token size (the shape fields alone decide it).
            let per_token = |dtype| {
                ember_kv::KvCacheConfig {
                    block_size: 1,
                    dtype,
                    n_kv_heads: config.n_head_kv,
                    head_dim: config.head_dim,
                    layer_windows: vec![None; config.n_layer],
                    budget: ember_kv::KvBudget::Tokens(1),
                    max_seq_len: 1,
                    prefix_caching: false,
                    layer_devices: Vec::new(),
                }
                .bytes_per_token()
            };
            match options.kv_budget {
                Some((bytes, dtype)) if per_token(dtype) > 0 => {
                    trained.min(usize::try_from(bytes / per_token(dtype)).unwrap_or(usize::MAX))
                }
                _ => trained,
            }
        });
        let kv = options
            .kv_budget
            .map_or(ember_kernels::KvDtype::F16, |(_, dtype)| dtype);
        placement::check_fits(file, external, config, gpu_layers, limit, context, kv)?;
    }
    Ok(if gpu_layers == n_layer {
        Placement::single(device)
    } else {
        Placement::split(&default_device(), device, n_layer, gpu_layers)
    })
}
