//! Architectures and the HF <-> GGUF tensor names (formats spec §5.5, from llama.cpp's
//! `gguf-py/gguf/tensor_mapping.py`).

use crate::ConvertError;

/// A supported architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arch {
    /// llama (also Mistral, which llama.cpp converts as llama).
    Llama,
    /// qwen2.
    Qwen2,
    /// qwen3.
    Qwen3,
    /// gemma3 (Hugging Face `gemma3_text`, Gemma3ForCausalLM).
    Gemma3,
    /// phi3 (Phi-3 with plain RoPE, e.g. mini/medium 4k; LongRoPE models such as Phi-3 128k,
    /// Phi-3.5 and Phi-4 mini are refused by the rope check): fused `qkv_proj` and `gate_up_proj`,
    /// which GGUF keeps fused (`attn_qkv`, `ffn_up` of twice the feed-forward width).
    Phi3,
}

impl Arch {
    /// From `general.architecture`.
    pub(crate) fn from_gguf(name: &str) -> Result<Arch, ConvertError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            "gemma3" => Ok(Arch::Gemma3),
            "phi3" => Ok(Arch::Phi3),
            other => Err(ConvertError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// From config.json `model_type`.
    pub(crate) fn from_hf(model_type: &str) -> Result<Arch, ConvertError> {
        match model_type {
            "llama" | "mistral" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            "gemma3_text" => Ok(Arch::Gemma3),
            "phi3" => Ok(Arch::Phi3),
            other => Err(ConvertError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// `general.architecture`.
    pub(crate) fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
            Arch::Phi3 => "phi3",
        }
    }

    /// config.json `model_type`.
    pub(crate) fn model_type(self) -> &'static str {
        match self {
            Arch::Gemma3 => "gemma3_text",
            other => other.gguf_name(),
        }
    }

    /// config.json `architectures[0]`.
    pub(crate) fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// Whether Q/K rows are permuted between HF and GGUF (llama.cpp `LlamaModel.permute`).
    pub(crate) fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }

    /// What GGUF adds to a Hugging Face value of tensor `gguf_name` (HF -> GGUF; GGUF -> HF
    /// subtracts it): Gemma's RMSNorm scales by `1 + w` and llama.cpp's converter stores
    /// `1 + w` for every `*norm.weight` (`Gemma3Model.norm_shift`), so ggml scales by the
    /// stored value.
    pub(crate) fn norm_shift(self, gguf_name: &str) -> Option<f32> {
        (self == Arch::Gemma3 && gguf_name.ends_with("norm.weight")).then_some(1.0)
    }

    fn layer_names(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Arch::Gemma3 => GEMMA3_LAYER,
            Arch::Phi3 => PHI3_LAYER,
            _ => LAYER,
        }
    }
}

/// Adds `shift` to every value, in f32 (llama.cpp: `data_torch + f_shift`).
pub(crate) fn apply_shift(values: &mut [f32], shift: f32) {
    for v in values {
        *v += shift;
    }
}

/// Per-layer names: GGUF `blk.{i}.X` <-> HF `model.layers.{i}.Y`.
const LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Gemma 3's per-layer names: four norms around attention and the feed-forward (HF's
/// `post_attention_layernorm` is GGUF's `post_attention_norm` here, not `ffn_norm`).
const GEMMA3_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Phi-3's per-layer names: the fused projections keep their fusion in GGUF (llama.cpp's
/// `tensor_mapping.py`: `qkv_proj` is `attn_qkv`, `gate_up_proj` is `ffn_up`, gate rows first).
const PHI3_LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_up", "mlp.gate_up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model names: GGUF <-> HF.
const GLOBAL: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

fn unmapped(name: &str, arch: Arch) -> ConvertError {
    ConvertError::UnmappedTensor {
        name: name.to_string(),
        arch: arch.gguf_name().to_string(),
    }
}

fn layer_allowed(arch: Arch, gguf_base: &str, suffix: &str) -> bool {
    if arch == Arch::Phi3 {
        // Phi-3 has no biases.
        return suffix == "weight";
    }
    match gguf_base {
        "attn_q_norm" | "attn_k_norm" => {
            matches!(arch, Arch::Qwen3 | Arch::Gemma3) && suffix == "weight"
        }
        "attn_q" | "attn_k" | "attn_v" => {
            suffix == "weight" || !matches!(arch, Arch::Qwen3 | Arch::Gemma3)
        }
        _ => arch != Arch::Gemma3 || suffix == "weight",
    }
}

/// The HF name of GGUF tensor `name`.
pub(crate) fn gguf_to_hf_name(arch: Arch, name: &str) -> Result<String, ConvertError> {
    if let Some((_, hf)) = GLOBAL.iter().find(|(g, _)| *g == name) {
        return Ok((*hf).to_string());
    }
    let rest = name
        .strip_prefix("blk.")
        .ok_or_else(|| unmapped(name, arch))?;
    let (layer, rest) = rest.split_once('.').ok_or_else(|| unmapped(name, arch))?;
    let layer: u32 = layer.parse().map_err(|_| unmapped(name, arch))?;
    let (base, suffix) = rest.rsplit_once('.').ok_or_else(|| unmapped(name, arch))?;
    if !matches!(suffix, "weight" | "bias") || !layer_allowed(arch, base, suffix) {
        return Err(unmapped(name, arch));
    }
    let (_, hf) = arch
        .layer_names()
        .iter()
        .find(|(g, _)| *g == base)
        .ok_or_else(|| unmapped(name, arch))?;
    Ok(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The GGUF name of HF tensor `name`.
pub(crate) fn hf_to_gguf_name(arch: Arch, name: &str) -> Result<String, ConvertError> {
    if let Some((g, _)) = GLOBAL.iter().find(|(_, h)| *h == name) {
        return Ok((*g).to_string());
    }
    let rest = name
        .strip_prefix("model.layers.")
        .ok_or_else(|| unmapped(name, arch))?;
    let (layer, rest) = rest.split_once('.').ok_or_else(|| unmapped(name, arch))?;
    let layer: u32 = layer.parse().map_err(|_| unmapped(name, arch))?;
    let (base, suffix) = rest.rsplit_once('.').ok_or_else(|| unmapped(name, arch))?;
    if !matches!(suffix, "weight" | "bias") {
        return Err(unmapped(name, arch));
    }
    let (g, _) = arch
        .layer_names()
        .iter()
        .find(|(_, h)| *h == base)
        .ok_or_else(|| unmapped(name, arch))?;
    if !layer_allowed(arch, g, suffix) {
        return Err(unmapped(name, arch));
    }
    Ok(format!("blk.{layer}.{g}.{suffix}"))
}

/// The layer index of a GGUF name (`blk.{i}.`), for ordering.
pub(crate) fn gguf_layer(name: &str) -> Option<u32> {
    name.strip_prefix("blk.")?.split_once('.')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (arch, g, h) in [
            (
                Arch::Llama,
                "token_embd.weight",
                "model.embed_tokens.weight",
            ),
            (
                Arch::Llama,
                "blk.12.attn_output.weight",
                "model.layers.12.self_attn.o_proj.weight",
            ),
            (
                Arch::Llama,
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                Arch::Qwen2,
                "blk.3.attn_q.bias",
                "model.layers.3.self_attn.q_proj.bias",
            ),
            (
                Arch::Qwen3,
                "blk.3.attn_k_norm.weight",
                "model.layers.3.self_attn.k_norm.weight",
            ),
            (Arch::Qwen3, "output.weight", "lm_head.weight"),
            (
                Arch::Gemma3,
                "blk.2.post_attention_norm.weight",
                "model.layers.2.post_attention_layernorm.weight",
            ),
            (
                Arch::Gemma3,
                "blk.2.ffn_norm.weight",
                "model.layers.2.pre_feedforward_layernorm.weight",
            ),
            (
                Arch::Gemma3,
                "blk.2.post_ffw_norm.weight",
                "model.layers.2.post_feedforward_layernorm.weight",
            ),
            (
                Arch::Gemma3,
                "blk.2.attn_q_norm.weight",
                "model.layers.2.self_attn.q_norm.weight",
            ),
        ] {
            assert_eq!(gguf_to_hf_name(arch, g).unwrap(), h);
            assert_eq!(hf_to_gguf_name(arch, h).unwrap(), g);
        }
        assert!(gguf_to_hf_name(Arch::Llama, "blk.0.attn_q_norm.weight").is_err());
        assert!(gguf_to_hf_name(Arch::Llama, "rope_freqs.weight").is_err());
        assert!(hf_to_gguf_name(Arch::Qwen3, "model.layers.0.self_attn.q_proj.bias").is_err());
        assert!(hf_to_gguf_name(Arch::Llama, "model.layers.x.mlp.up_proj.weight").is_err());
        assert_eq!(gguf_layer("blk.17.ffn_up.weight"), Some(17));
        assert!(gguf_to_hf_name(Arch::Llama, "blk.0.post_ffw_norm.weight").is_err());
        assert!(hf_to_gguf_name(Arch::Gemma3, "model.layers.0.self_attn.q_proj.bias").is_err());
        assert_eq!(
            Arch::Gemma3.norm_shift("blk.0.attn_k_norm.weight"),
            Some(1.0)
        );
        assert_eq!(Arch::Gemma3.norm_shift("output_norm.weight"), Some(1.0));
        assert_eq!(Arch::Gemma3.norm_shift("blk.0.ffn_up.weight"), None);
        assert_eq!(Arch::Qwen3.norm_shift("output_norm.weight"), None);
        for (g, h) in [
            (
                "blk.1.attn_qkv.weight",
                "model.layers.1.self_attn.qkv_proj.weight",
            ),
            (
                "blk.1.ffn_up.weight",
                "model.layers.1.mlp.gate_up_proj.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
        ] {
            assert_eq!(gguf_to_hf_name(Arch::Phi3, g).unwrap(), h);
            assert_eq!(hf_to_gguf_name(Arch::Phi3, h).unwrap(), g);
        }
        assert!(gguf_to_hf_name(Arch::Phi3, "blk.0.attn_q.weight").is_err());
        assert!(hf_to_gguf_name(Arch::Phi3, "model.layers.0.mlp.up_proj.weight").is_err());
        assert!(hf_to_gguf_name(Arch::Phi3, "model.layers.0.self_attn.qkv_proj.bias").is_err());
    }
}
