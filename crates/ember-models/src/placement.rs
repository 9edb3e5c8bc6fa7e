//! Where a model's parts run: every block on one device, or (`--gpu-layers`, llama.cpp's
//! `-ngl`) the first blocks on the CPU and the last ones with the output head on a GPU; and
//! what the GPU's part takes in memory, known from the file's tensor table before anything is
//! uploaded.

use burn::tensor::Device;
use ember_formats::GgufFile;
use ember_kernels::KvDtype;

use crate::{ExternalWeights, ModelConfig, ModelError, UBATCH};

/// Which device each block, the embedding rows and the head are on.
///
/// The embedding lookup reads the file's blocks on the host and its rows go to the first
/// block's device. Blocks `0..first_offloaded` run on `host`, the rest with the output norm
/// and head on `offload`, so activations cross once, at the boundary, and the logits come back
/// from `offload`.
#[derive(Clone, Debug)]
pub struct Placement {
    host: Device,
    offload: Device,
    first_offloaded: usize,
}

impl Placement {
    /// Everything on `device`.
    pub fn single(device: &Device) -> Self {
        Self {
            host: device.clone(),
            offload: device.clone(),
            first_offloaded: 0,
        }
    }

    /// The last `gpu_layers` of `n_layer` blocks and the head on `gpu`, the others on `cpu`
    /// (more than `n_layer` means all of them).
    pub fn split(cpu: &Device, gpu: &Device, n_layer: usize, gpu_layers: usize) -> Self {
        Self {
            host: cpu.clone(),
            offload: gpu.clone(),
            first_offloaded: n_layer.saturating_sub(gpu_layers),
        }
    }

    /// The device block `layer` runs on.
    pub fn layer(&self, layer: usize) -> &Device {
        if layer < self.first_offloaded {
            &self.host
        } else {
            &self.offload
        }
    }

    /// The device of the output norm and head, where the logits are.
    pub fn head(&self) -> &Device {
        &self.offload
    }

    /// The device the embedding rows go to: the first block's.
    pub fn input(&self) -> &Device {
        self.layer(0)
    }

    /// The first block on the offload device (0 when every block is there).
    pub fn first_offloaded(&self) -> usize {
        self.first_offloaded
    }

    /// The device a GGUF tensor belongs on: `blk.N.*` its block's, the output norm and head
    /// the head's, anything else (the embedding, RoPE factors) the input's.
    pub fn tensor(&self, name: &str) -> &Device {
        match block_of(name) {
            Some(layer) => self.layer(layer),
            None if matches!(name, "output.weight" | "output_norm.weight") => self.head(),
            None => self.input(),
        }
    }
}

/// Whether `device` is a CPU backend (where weights stay in the mapping or are repacked).
pub(crate) fn is_cpu(device: &Device) -> bool {
    #[cfg(feature = "cube")]
    if let burn::backend::DispatchDevice::Cube(_) = device.as_dispatch() {
        return false;
    }
    let _ = device;
    true
}

/// The block index in a tensor name `blk.N.*`.
fn block_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    rest[..rest.find('.')?].parse().ok()
}

/// What the offloaded part of a model takes on its GPU, in bytes, counted before loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The offloaded blocks' weights, the output norm and the head, as uploaded
    /// ([`ember_kernels::gpu_matrix_bytes`]: the blocks of the types the kernels read in
    /// place, else f32).
    pub weights: u64,
    /// What one pass holds at once beside them: a ubatch's activations and logits, and the
    /// f32 weight tile of the many-row matmul.
    pub scratch: u64,
    /// The offloaded blocks' KV cache at `context` positions, kept on the GPU (f16 or f32).
    /// For a q8_0 cache, which stays on the host, attention's working set instead: each
    /// layer's keys and values of the longest sequence uploaded in f32, and a ubatch's scores
    /// against them held three times over.
    pub kv_cache: u64,
    /// The positions `kv_cache` was counted for.
    pub context: usize,
    /// Blocks counted.
    pub layers: usize,
}

impl DeviceMemory {
    /// Everything counted.
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.scratch)
            .saturating_add(self.kv_cache)
    }
}

/// The many-row matmul dequantizes at most this many bytes of a weight at a time (see
/// `ember_kernels`' cube module).
const GEMM_TILE_BYTES: u64 = 64 << 20;

/// What a model's blocks from `first_offloaded` on and its head take on a GPU, for sequences
/// of up to `context` positions with a `kv` cache, from `file`'s tensor table (and
/// `external`'s matrices, which replace the file's of the same name): nothing is read or
/// uploaded.
pub fn device_memory(
    file: &GgufFile,
    external: Option<&ExternalWeights>,
    config: &ModelConfig,
    first_offloaded: usize,
    context: usize,
    kv: KvDtype,
) -> Result<DeviceMemory, ModelError> {
    let c = config;
    let offloaded = |name: &str| match block_of(name) {
        Some(layer) => layer >= first_offloaded,
        None => matches!(name, "output.weight" | "output_norm.weight"),
    };
    let mut weights = 0u64;
    let mut largest = 0u64;
    for t in file.tensors() {
        if !offloaded(&t.name) || external.is_some_and(|e| e.get(&t.name).is_some()) {
            continue;
        }
        let bytes = match t.dims.as_slice() {
            // Vectors (norms, biases) become f32 tensors.
            [n] => n.checked_mul(4),
            [cols, rest @ ..] => rest
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .and_then(|rows| ember_kernels::gpu_matrix_bytes(t.ggml_type, rows, *cols)),
            [] => Some(4),
        };
        let bytes = bytes.ok_or_else(|| {
            ModelError::Unsupported(format!(
                "tensor '{}' of shape {:?} in {} (its size on a GPU overflows 64 bits, or its \
                 rows are not whole blocks)",
                t.name, t.dims, t.ggml_type
            ))
        })?;
        largest = largest.max(bytes);
        weights = weights.saturating_add(bytes);
    }
    for (name, m) in external.into_iter().flat_map(|e| e.iter()) {
        if offloaded(name) {
            let bytes = m.device_size() as u64;
            largest = largest.max(bytes);
            weights = weights.saturating_add(bytes);
        }
    }
    // A tied head is the embedding's blocks, uploaded for the head.
    if !file.tensors().iter().any(|t| t.name == "output.weight")
        && external.is_none_or(|e| e.get("output.weight").is_none())
    {
        let head = match external.and_then(|e| e.get("token_embd.weight")) {
            Some(m) => Some(m.device_size() as u64),
            None => file.tensor("token_embd.weight").and_then(|t| {
                ember_kernels::gpu_matrix_bytes(t.ggml_type, c.n_vocab as u64, c.n_embd as u64)
            }),
        };
        let head = head.unwrap_or(0);
        largest = largest.max(head);
        weights = weights.saturating_add(head);
    }
    let f = |n: usize| n as u64 * 4;
    let ub = UBATCH.min(context.max(1)) as u64;
    let q_width = c.n_head * c.head_dim;
    let kv_width = c.n_head_kv * c.head_dim;
    let widest = c.n_ff.max(c.n_embd).max(q_width + 2 * kv_width);
    // The residual stream, a norm's output, two feed-forward halves and their product (or Q, K,
    // V and the attention output), and one ubatch of logits.
    let activations = ub * (f(c.n_embd) * 2 + f(widest) * 3) + ub * f(c.n_vocab);
    let scratch = activations + GEMM_TILE_BYTES.min(largest);
    // Only blocks attend: the head alone needs no cache.
    let layers = c.n_layer.saturating_sub(first_offloaded) as u64;
    let ctx = if layers > 0 { context as u64 } else { 0 };
    let kv_cache = match kv.row_bytes(c.head_dim) {
        // An f16 or f32 cache lives on the device: K and V of every offloaded block.
        Some(row) if kv != KvDtype::Q8_0 => layers * ctx * (row * c.n_head_kv) as u64 * 2,
        // A q8_0 cache stays on the host: attention uploads one layer's keys and values of a
        // sequence in f32 and holds its scores three times (the scaled products, the masked
        // ones, the softmax) for a ubatch of queries (`ember_kernels`' generic paged attention).
        _ => ctx * f(kv_width) * 2 + 3 * ub * ctx * f(c.n_head),
    };
    Ok(DeviceMemory {
        weights,
        scratch,
        kv_cache,
        context,
        layers: c.n_layer.saturating_sub(first_offloaded),
    })
}

/// Refuses, with [`ModelError::DeviceMemory`], a placement of the last `gpu_layers` blocks and
/// the head whose [`device_memory`] at `context` positions is over `limit` bytes, naming the
/// most blocks that would fit.
pub(crate) fn check_fits(
    file: &GgufFile,
    external: Option<&ExternalWeights>,
    config: &ModelConfig,
    gpu_layers: usize,
    limit: u64,
    context: usize,
    kv: KvDtype,
) -> Result<(), ModelError> {
    let n_layer = config.n_layer;
    let need = |n: usize| {
        device_memory(
            file,
            external,
            config,
            n_layer - n.min(n_layer),
            context,
            kv,
        )
    };
    let asked = need(gpu_layers)?;
    if asked.total() <= limit {
        return Ok(());
    }
    // The most blocks that fit, if even the head alone does (each block adds to the need).
    let mut fits = None;
    for n in (0..gpu_layers.min(n_layer)).rev() {
        if need(n)?.total() <= limit {
            fits = Some(n);
            break;
        }
    }
    Err(ModelError::DeviceMemory {
        need: asked,
        limit,
        fits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny::{self, TinyArch, TinyDtype};

    fn tiny_model(arch: TinyArch) -> (GgufFile, ModelConfig) {
        let bytes = tiny::gguf(arch, TinyDtype::F16).expect("tiny model");
        let file = GgufFile::from_bytes(bytes).expect("tiny GGUF");
        let config = ModelConfig::from_gguf(&file).expect("config");
        (file, config)
    }

    /// F16 goes to the GPU as f32, so every tensor counts 4 bytes a value; the embedding only
    /// as a tied head; and a split leaves out exactly the CPU blocks' tensors.
    #[test]
    fn weights_are_the_offloaded_tensors() {
        // Qwen2's head is its own tensor, Qwen3's is tied to the embedding.
        for arch in [TinyArch::Qwen2, TinyArch::Qwen3] {
            let (file, c) = tiny_model(arch);
            let tied = file.tensor("output.weight").is_none();
            assert_eq!(tied, arch == TinyArch::Qwen3);
            let bytes = |keep: &dyn Fn(&str) -> bool| -> u64 {
                file.tensors()
                    .iter()
                    .filter(|t| keep(&t.name))
                    .map(|t| t.n_elements() * 4)
                    .sum()
            };
            let all = device_memory(&file, None, &c, 0, 64, KvDtype::F16).expect("plan");
            assert_eq!(
                all.weights,
                bytes(&|n: &str| n != "token_embd.weight" || tied),
                "{arch:?}"
            );
            assert_eq!(all.layers, c.n_layer);
            for first in 0..=c.n_layer {
                let part = device_memory(&file, None, &c, first, 64, KvDtype::F16).expect("plan");
                let on_cpu = bytes(&|n: &str| block_of(n).is_some_and(|l| l < first));
                assert_eq!(part.weights, all.weights - on_cpu, "{arch:?} from {first}");
                assert_eq!(part.layers, c.n_layer - first);
                assert_eq!(part.scratch, all.scratch);
            }
            // The cache grows with the context: f16 K and V of every offloaded block (twice that
            // in f32); q8_0 stays on the host, counted as attention's uploads. The head alone
            // needs none.
            let long = device_memory(&file, None, &c, 0, 4096, KvDtype::F16).expect("plan");
            let per_token = (c.n_head_kv * c.head_dim * 2 * 2) as u64;
            assert_eq!(
                long.kv_cache,
                c.n_layer as u64 * 4096 * per_token,
                "{arch:?}"
            );
            assert_eq!(all.kv_cache, c.n_layer as u64 * 64 * per_token, "{arch:?}");
            assert_eq!(long.context, 4096);
            let half =
                device_memory(&file, None, &c, c.n_layer / 2, 4096, KvDtype::F32).expect("plan");
            let offloaded = (c.n_layer - c.n_layer / 2) as u64;
            assert_eq!(half.kv_cache, offloaded * 4096 * per_token * 2, "{arch:?}");
            let q8 = device_memory(&file, None, &c, 0, 4096, KvDtype::Q8_0).expect("plan");
            assert!(q8.kv_cache > 0, "{arch:?}");
            for kv in KvDtype::ALL {
                let head = device_memory(&file, None, &c, c.n_layer, 4096, kv).expect("plan");
                assert_eq!(head.kv_cache, 0, "{arch:?} {kv}");
            }
        }
    }

    /// A limit under the need is refused, naming the most blocks that fit; that many do fit
    /// and one more does not. A limit under even the head's need names none.
    #[test]
    fn refusal_names_the_blocks_that_fit() {
        let (file, c) = tiny_model(TinyArch::Qwen2);
        let n = c.n_layer;
        let all = device_memory(&file, None, &c, 0, 64, KvDtype::F16).expect("plan");
        assert!(check_fits(&file, None, &c, n, all.total(), 64, KvDtype::F16).is_ok());
        let head_only = device_memory(&file, None, &c, n, 64, KvDtype::F16).expect("plan");
        for limit in [all.total() - 1, head_only.total() + 1, head_only.total()] {
            match check_fits(&file, None, &c, n, limit, 64, KvDtype::F16) {
                Err(e @ ModelError::DeviceMemory { fits: Some(k), .. }) => {
                    assert!(k < n);
                    assert!(check_fits(&file, None, &c, k, limit, 64, KvDtype::F16).is_ok());
                    assert!(check_fits(&file, None, &c, k + 1, limit, 64, KvDtype::F16).is_err());
                    assert!(
                        e.to_string().contains(&format!("--gpu-layers {k} fits")),
                        "{e}"
                    );
                }
                other => panic!("limit {limit}: {other:?}"),
            }
        }
        match check_fits(&file, None, &c, n, head_only.total() - 1, 64, KvDtype::F16) {
            Err(e @ ModelError::DeviceMemory { fits: None, .. }) => {
                assert!(e.to_string().contains("--device cpu"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gpu_options_need_a_gpu_device() {
        let (file, _) = tiny_model(TinyArch::Qwen2);
        for options in [
            crate::ModelOptions {
                gpu_layers: Some(1),
                ..Default::default()
            },
            crate::ModelOptions {
                gpu_memory: Some(1 << 30),
                ..Default::default()
            },
        ] {
            let device = crate::default_device();
            match crate::load_with_options(&file, None, &device, &options) {
                Err(ModelError::GpuOptionsOnCpu) => {}
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("loaded with {options:?} on the CPU"),
            }
        }
    }

    #[test]
    fn block_names_map_to_their_layer() {
        assert_eq!(block_of("blk.0.attn_q.weight"), Some(0));
        assert_eq!(block_of("blk.29.ffn_down.weight"), Some(29));
        assert_eq!(block_of("blk.x.ffn_down.weight"), None);
        assert_eq!(block_of("blk.3"), None);
        assert_eq!(block_of("output.weight"), None);
    }
}
