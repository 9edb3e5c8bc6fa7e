//! Hyper-parameters read from GGUF metadata (`{arch}.*` keys, as llama.cpp names them).

use ember_formats::GgufFile;

use crate::ModelError;

/// How rotary embeddings pair up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's `LLAMA_ROPE_TYPE_NORM`, used by the `llama`
    /// architecture (the GGUF converter permutes Q/K weights to fit it).
    Normal,
    /// Halves `(i, i + d/2)`: `LLAMA_ROPE_TYPE_NEOX` (Qwen, Gemma, Phi-3, ...).
    Neox,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rope_dim: usize,
    pub rope_mode: RopeMode,
    pub rms_eps: f32,
}

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file
            .architecture()
            .ok_or(ModelError::NoArchitecture)?
            .to_string();
        let rope_mode = match arch.as_str() {
            "llama" => RopeMode::Normal,
            // llama.cpp's `llama_model_rope_type`: all of these pair dims `(i, i + n_rot / 2)`.
            "gemma3" | "qwen2" | "qwen3" | "phi3" => RopeMode::Neox,
            other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize, ModelError> {
            let full = key(k);
            file.get_u64(&full)
                .map(|v| v as usize)
                .ok_or(ModelError::MissingKey(full))
        };
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = file
            .get_u64(&key("attention.head_count_kv"))
            .map_or(n_head, |v| v as usize);
        if n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(ModelError::BadMetadata {
                key: key("attention.head_count_kv"),
                why: format!("{n_head} query heads cannot share {n_head_kv} kv heads"),
            });
        }
        let head_dim = file
            .get_u64(&key("attention.key_length"))
            .map_or(n_embd / n_head, |v| v as usize);
        let rope_dim = file
            .get_u64(&key("rope.dimension_count"))
            .map_or(head_dim, |v| v as usize);
        if rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(ModelError::BadMetadata {
                key: key("rope.dimension_count"),
                why: format!("{rope_dim} must be even and at most the head size {head_dim}"),
            });
        }
        if matches!(arch.as_str(), "qwen2" | "qwen3" | "phi3") {
            check_plain_attention(file, &arch, head_dim, rope_dim)?;
        }
        let n_vocab = file
            .get_u64(&key("vocab_size"))
            .map(|v| v as usize)
            .or_else(|| {
                file.get_string_array("tokenizer.ggml.tokens")
                    .map(|t| t.len())
            })
            .ok_or_else(|| ModelError::MissingKey(key("vocab_size")))?;
        Ok(Self {
            n_layer: req("block_count")?,
            n_ff: req("feed_forward_length")?,
            context_length: req("context_length")?,
            rope_base: file.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: file
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            architecture: arch,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            rope_dim,
            rope_mode,
        })
    }
}

/// What the newer architectures' blocks assume and llama.cpp would otherwise do differently:
/// V heads as wide as K heads, rotary dims covering the head where llama.cpp asserts so, and
/// no RoPE frequency scaling (our rope kernel has no scale or YaRN terms).
fn check_plain_attention(
    file: &GgufFile,
    arch: &str,
    head_dim: usize,
    rope_dim: usize,
) -> Result<(), ModelError> {
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(v) = file.get_u64(&key("attention.value_length"))
        && v as usize != head_dim
    {
        return Err(ModelError::BadMetadata {
            key: key("attention.value_length"),
            why: format!("{v} differs from the key length {head_dim}"),
        });
    }
    // llama.cpp's qwen2 and qwen3 graphs assert `n_rot == n_embd_head`.
    if arch != "phi3" && rope_dim != head_dim {
        return Err(ModelError::BadMetadata {
            key: key("rope.dimension_count"),
            why: format!("{arch} rotates whole heads: {rope_dim} != {head_dim}"),
        });
    }
    if let Some(t) = file.get_str(&key("rope.scaling.type"))
        && t != "none"
        && t != "linear"
    {
        return Err(ModelError::Unsupported(format!("RoPE scaling type '{t}'")));
    }
    for k in ["rope.scaling.factor", "rope.scale_linear"] {
        // llama.cpp reads 0 as "no scaling".
        if let Some(f) = file.get_f32(&key(k))
            && f != 0.0
            && f != 1.0
        {
            return Err(ModelError::Unsupported(format!(
                "RoPE scaling factor {f} ({})",
                key(k)
            )));
        }
    }
    // Written with LongRoPE (Phi-3 128k, Phi-3.5) and YaRN; scales cos and sin.
    let attn_factor = key("rope.scaling.attn_factor");
    if let Some(f) = file.get_f32(&attn_factor)
        && f != 1.0
    {
        return Err(ModelError::Unsupported(format!(
            "RoPE attention factor {f} ({attn_factor})"
        )));
    }
    Ok(())
}
