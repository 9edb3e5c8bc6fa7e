//! GGUF -> Hugging Face checkpoint directory.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use ember_formats::safetensors::{StDtype, StWriteTensor, write_safetensors};
use ember_formats::{GgufFile, MetaArray, MetaValue};
use serde_json::{Map, Value, json};

use crate::arch::{Arch, apply_shift, gguf_to_hf_name};
use crate::quantized::{QuantWriteOptions, quantize_linear};
use crate::tokenizer;
use crate::util::{
    Direction, dequantize_tensor, f32_json, f32_to_st_bytes, permute_rows, write_bytes_atomic,
    write_json_atomic,
};
use crate::{ConvertError, Progress};

/// config.json key under which [`gguf_to_hf`] records the GGUF metadata that HF configs have no
/// key for (`general.*` strings and string arrays, `tokenizer.ggml.pre`), so that
/// [`crate::hf_to_gguf`] writes them back.
pub(crate) const GGUF_METADATA_KEY: &str = "gguf_metadata";

/// `general.*` keys that are not carried in [`GGUF_METADATA_KEY`] (they are rewritten).
const GENERAL_SKIP: &[&str] = &[
    "general.architecture",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
];

fn torch_dtype(dtype: StDtype) -> Result<&'static str, ConvertError> {
    match dtype {
        StDtype::F32 => Ok("float32"),
        StDtype::F16 => Ok("float16"),
        StDtype::BF16 => Ok("bfloat16"),
        other => Err(ConvertError::UnsupportedDtype(other.name().to_string())),
    }
}

struct Hparams {
    n_head: u64,
    n_head_kv: u64,
}

/// config.json for the GGUF's architecture (formats spec §5.4, read backwards).
fn build_config(
    gguf: &GgufFile,
    arch: Arch,
    dtype: StDtype,
    special_ids: &[(&str, u32)],
) -> Result<(Value, Hparams), ConvertError> {
    let a = arch.gguf_name();
    let key = |k: &str| format!("{a}.{k}");
    let req_u64 = |k: &str| {
        gguf.get(&key(k))
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| ConvertError::MissingKey(key(k)))
    };
    let n_layer = req_u64("block_count")?;
    let n_embd = req_u64("embedding_length")?;
    let n_ff = req_u64("feed_forward_length")?;
    let n_head = req_u64("attention.head_count")?;
    if n_head == 0 {
        return Err(ConvertError::UnsupportedMetadata {
            key: key("attention.head_count"),
            reason: "is 0".into(),
        });
    }
    let n_head_kv = gguf
        .get(&key("attention.head_count_kv"))
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| ConvertError::MissingKey(key("attention.head_count_kv")))
        })
        .transpose()?
        .unwrap_or(n_head);
    let n_ctx = req_u64("context_length")?;
    let eps = gguf
        .get(&key("attention.layer_norm_rms_epsilon"))
        .and_then(MetaValue::as_f32)
        .ok_or_else(|| ConvertError::MissingKey(key("attention.layer_norm_rms_epsilon")))?;
    let rope_base = gguf
        .get(&key("rope.freq_base"))
        .and_then(MetaValue::as_f32)
        .unwrap_or(10000.0);
    let key_length = gguf
        .get(&key("attention.key_length"))
        .and_then(MetaValue::as_u64);
    let head_dim = key_length.unwrap_or(n_embd / n_head);
    if let Some(vl) = gguf
        .get(&key("attention.value_length"))
        .and_then(MetaValue::as_u64)
        && vl != head_dim
    {
        return Err(ConvertError::UnsupportedMetadata {
            key: key("attention.value_length"),
            reason: format!("{vl} differs from the key length {head_dim}"),
        });
    }
    // Partial rotary: Phi3Config's `partial_rotary_factor`, which llama.cpp's converter turns
    // back into `int(factor * n_embd) // n_head` dims (checked to give `rd` again).
    let mut partial_rotary = None;
    if let Some(rd) = gguf
        .get(&key("rope.dimension_count"))
        .and_then(MetaValue::as_u64)
        && rd != head_dim
    {
        let factor = rd as f64 / head_dim as f64;
        // ember-models' rule too: an even number of rotated dims, fewer than the head's.
        let valid = rd > 0 && rd < head_dim && rd % 2 == 0;
        if arch != Arch::Phi3 || !valid || (factor * n_embd as f64) as u64 / n_head != rd {
            return Err(ConvertError::UnsupportedMetadata {
                key: key("rope.dimension_count"),
                reason: format!("partial rotary ({rd} of {head_dim}) is not converted"),
            });
        }
        partial_rotary = Some(factor);
    }
    let rope_scaling = match gguf.get_str(&key("rope.scaling.type")) {
        None | Some("none") => Value::Null,
        Some("linear") => {
            let f = gguf
                .get(&key("rope.scaling.factor"))
                .and_then(MetaValue::as_f32)
                .ok_or_else(|| ConvertError::MissingKey(key("rope.scaling.factor")))?;
            json!({"type": "linear", "rope_type": "linear", "factor": f32_json(f)})
        }
        Some(other) => {
            return Err(ConvertError::UnsupportedMetadata {
                key: key("rope.scaling.type"),
                reason: format!("rope scaling '{other}' is not converted"),
            });
        }
    };
    let vocab_size = match gguf.get(&key("vocab_size")).and_then(MetaValue::as_u64) {
        Some(v) => v,
        None => match gguf.get_array("tokenizer.ggml.tokens") {
            Some(t) => t.len() as u64,
            None => gguf
                .tensor("token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
                .ok_or_else(|| ConvertError::MissingKey(key("vocab_size")))?,
        },
    };
    let tied = gguf.tensor("output.weight").is_none();
    let has_qkv_bias = gguf.tensor("blk.0.attn_q.bias").is_some();

    let mut c = Map::new();
    c.insert("architectures".into(), json!([arch.hf_class()]));
    c.insert("model_type".into(), json!(arch.model_type()));
    c.insert("vocab_size".into(), json!(vocab_size));
    c.insert("hidden_size".into(), json!(n_embd));
    c.insert("intermediate_size".into(), json!(n_ff));
    c.insert("num_hidden_layers".into(), json!(n_layer));
    c.insert("num_attention_heads".into(), json!(n_head));
    c.insert("num_key_value_heads".into(), json!(n_head_kv));
    if key_length.is_some() || arch == Arch::Qwen3 {
        c.insert("head_dim".into(), json!(head_dim));
    }
    c.insert("max_position_embeddings".into(), json!(n_ctx));
    c.insert("rms_norm_eps".into(), f32_json(eps));
    c.insert("rope_theta".into(), f32_json(rope_base));
    c.insert("rope_scaling".into(), rope_scaling);
    if arch == Arch::Gemma3 {
        c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    } else {
        c.insert("hidden_act".into(), json!("silu"));
    }
    c.insert("initializer_range".into(), json!(0.02));
    c.insert("attention_dropout".into(), json!(0.0));
    match arch {
        Arch::Llama => {
            c.insert("attention_bias".into(), json!(has_qkv_bias));
            c.insert("mlp_bias".into(), json!(false));
            c.insert("pretraining_tp".into(), json!(1));
        }
        Arch::Qwen2 => {
            c.insert("use_sliding_window".into(), json!(false));
            c.insert("sliding_window".into(), json!(n_ctx));
            c.insert("max_window_layers".into(), json!(n_layer));
        }
        Arch::Qwen3 => {
            c.insert("attention_bias".into(), json!(has_qkv_bias));
            c.insert("use_sliding_window".into(), json!(false));
            c.insert("sliding_window".into(), Value::Null);
            c.insert("max_window_layers".into(), json!(n_layer));
        }
        Arch::Gemma3 => gemma3_config(gguf, &mut c, n_layer, n_embd / n_head, head_dim)?,
        Arch::Phi3 => {
            // Phi3Config: the pre-extension context (llama.cpp requires it), the window
            // (0 in GGUF means none), and dropout rates the class reads.
            let orig = gguf
                .get("phi3.rope.scaling.original_context_length")
                .and_then(MetaValue::as_u64)
                .unwrap_or(n_ctx);
            c.insert("original_max_position_embeddings".into(), json!(orig));
            let window = gguf
                .get("phi3.attention.sliding_window")
                .and_then(MetaValue::as_u64)
                .filter(|&w| w > 0);
            c.insert("sliding_window".into(), json!(window));
            c.insert("resid_pdrop".into(), json!(0.0));
            c.insert("embd_pdrop".into(), json!(0.0));
            if let Some(f) = partial_rotary {
                c.insert("partial_rotary_factor".into(), json!(f));
            }
        }
    }
    c.insert("tie_word_embeddings".into(), json!(tied));
    c.insert("torch_dtype".into(), json!(torch_dtype(dtype)?));
    c.insert("use_cache".into(), json!(true));
    for (kind, id) in special_ids {
        if matches!(*kind, "bos" | "eos" | "pad") {
            c.insert(format!("{kind}_token_id"), json!(id));
        }
    }

    let mut carried = Map::new();
    for (k, v) in gguf.metadata() {
        if !k.starts_with("general.") || GENERAL_SKIP.contains(&k.as_str()) {
            continue;
        }
        match v {
            MetaValue::String(s) => {
                carried.insert(k.clone(), json!(s));
            }
            MetaValue::Array(MetaArray::String(a)) => {
                carried.insert(k.clone(), json!(a.to_vec()));
            }
            _ => {}
        }
    }
    if let Some(pre) = gguf.get_str("tokenizer.ggml.pre") {
        carried.insert("tokenizer.ggml.pre".into(), json!(pre));
    }
    c.insert(GGUF_METADATA_KEY.into(), Value::Object(carried));
    Ok((Value::Object(c), Hparams { n_head, n_head_kv }))
}

/// Gemma3TextConfig's own keys (ember-models' reading of the `gemma3.*` keys, backwards):
/// the window (`sliding_window`, `sliding_window_pattern` and the `layer_types` it gives,
/// every `pattern`-th layer global), `rope_local_base_freq` (`rope.freq_base_swa`, else
/// llama.cpp's 10000), `query_pre_attn_scalar` (head_dim; the 27B's 62 layers use
/// n_embd / n_head, as llama.cpp and ember-models do) and the soft-capping values.
fn gemma3_config(
    gguf: &GgufFile,
    c: &mut Map<String, Value>,
    n_layer: u64,
    embd_per_head: u64,
    head_dim: u64,
) -> Result<(), ConvertError> {
    let window = gguf
        .get("gemma3.attention.sliding_window")
        .and_then(MetaValue::as_u64);
    let pattern = match gguf.get("gemma3.attention.sliding_window_pattern") {
        None => 6,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ConvertError::UnsupportedMetadata {
                key: "gemma3.attention.sliding_window_pattern".into(),
                reason: "is not an unsigned integer (a per-layer array is not converted)".into(),
            })?,
    };
    let swa_base = gguf
        .get("gemma3.rope.freq_base_swa")
        .and_then(MetaValue::as_f32)
        .unwrap_or(10_000.0);
    let (window_json, pattern) = match window {
        Some(w) => (json!(w), pattern),
        None => (Value::Null, 1),
    };
    let layer_types: Vec<&str> = (0..n_layer)
        .map(|i| {
            if pattern == 1 || (pattern > 0 && (i + 1) % pattern == 0) {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    c.insert("sliding_window".into(), window_json);
    c.insert("sliding_window_pattern".into(), json!(pattern));
    c.insert("layer_types".into(), json!(layer_types));
    c.insert("rope_local_base_freq".into(), f32_json(swa_base));
    let scalar = if n_layer == 62 {
        embd_per_head
    } else {
        head_dim
    };
    c.insert("query_pre_attn_scalar".into(), json!(scalar));
    let cap = gguf
        .get("gemma3.final_logit_softcapping")
        .and_then(MetaValue::as_f32)
        .map_or(Value::Null, f32_json);
    c.insert("final_logit_softcapping".into(), cap);
    c.insert("attn_logit_softcapping".into(), Value::Null);
    c.insert("attention_bias".into(), json!(false));
    Ok(())
}

/// Converts a GGUF model to a Hugging Face checkpoint directory `out_dir` (created if needed):
///
/// * `config.json`: the HF keys of the architecture (`architectures`, `model_type`, sizes,
///   `rms_norm_eps`, `rope_theta`, `tie_word_embeddings` when `output.weight` is absent,
///   `torch_dtype`, bos/eos/pad ids), plus `gguf_metadata`: the GGUF's `general.*` strings and
///   `tokenizer.ggml.pre`, which HF has no key for and [`crate::hf_to_gguf`] writes back;
/// * `model.safetensors`: every tensor under its HF name, dequantized (bit-exact with ggml)
///   and stored as `dtype` (F32, F16 or BF16), in HF's `[out, in]` shape, with llama's Q/K rows
///   permuted back to HF's rotate-half order;
/// * `tokenizer.json` (byte-level BPE: vocab, merges, one `Split` per llama.cpp pre-tokenizer
///   regex then `ByteLevel`, ByteLevel decoder, added tokens), `tokenizer_config.json`
///   (`chat_template`, special tokens, `add_bos_token`) and `generation_config.json`.
///
/// Architectures: llama (and Mistral), qwen2, qwen3, gemma3 (`gemma3_text`; its `1 + w` norms
/// are written as HF's `w`), phi3 (fused `qkv_proj` / `gate_up_proj` as GGUF keeps them; a
/// byte-level BPE vocabulary is declared `GPT2Tokenizer`, as Phi-4 mini's, which is how
/// llama.cpp's converter tells it from Phi-3's SentencePiece one). SentencePiece vocabularies
/// (`tokenizer.ggml.model` = `llama`) are exported for gemma3 and phi3 (tokenizer.json with byte fallback, plus tokenizer.model with the exact
/// scores and types) and refused for the other architectures with
/// [`ConvertError::UnsupportedTokenizerModel`]. Each file is written through a temporary file
/// and renamed, weights first.
pub fn gguf_to_hf(
    gguf: &GgufFile,
    out_dir: &Path,
    dtype: StDtype,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), ConvertError> {
    export(gguf, out_dir, dtype, None, progress)
}

/// GGUF linear weights that [`gguf_to_quantized_hf`] quantizes.
const LINEAR: &[&str] = &[
    "attn_qkv",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

fn is_linear_weight(name: &str) -> bool {
    name.strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(_, r)| r.strip_suffix(".weight"))
        .is_some_and(|base| LINEAR.contains(&base))
}

/// Like [`gguf_to_hf`] (config.json, tokenizer files, F16 weights), but every linear layer's
/// weight (attention q/k/v/o, FFN gate/up/down) is quantized with ember-quant's
/// round-to-nearest writer into the format's tensors, under the upstream names and dtypes
/// (AWQ GEMM: `qweight`/`qzeros` I32, `scales` F16; GPTQ: `qweight`/`qzeros`/`g_idx` I32,
/// `scales` F16; EXL2: `q_weight`/`q_scale`/`q_invperm` I32, `q_scale_max` F16, `q_groups`
/// I16; compressed-tensors: `weight_packed` I32, `weight_scale` F16, `weight_zero_point` I32
/// when asymmetric, `weight_shape` I64), and config.json carries the `quantization_config`
/// the upstream tool writes ([`QuantWriteOptions::quantization_config`]).
///
/// Embeddings, norms and the output head stay F16. A layer whose in-features are not a
/// multiple of the group size is refused with [`ConvertError::GroupSizeDoesNotDivide`] (use
/// a divisor, or [`crate::GroupSize::PerChannel`]). Nothing is quantized with calibration data:
/// GPTQ act-order and EXL2 use a column-norm order in place of the Hessian diagonal.
pub fn gguf_to_quantized_hf(
    gguf: &GgufFile,
    out_dir: &Path,
    scheme: &QuantWriteOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), ConvertError> {
    scheme.check()?;
    export(gguf, out_dir, StDtype::F16, Some(scheme), progress)
}

fn export(
    gguf: &GgufFile,
    out_dir: &Path,
    dtype: StDtype,
    quant: Option<&QuantWriteOptions>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), ConvertError> {
    torch_dtype(dtype)?;
    let arch_name = gguf
        .architecture()
        .ok_or_else(|| ConvertError::MissingKey("general.architecture".into()))?;
    let arch = Arch::from_gguf(arch_name)?;
    let n_ctx = gguf
        .get(&format!("{arch_name}.context_length"))
        .and_then(MetaValue::as_u64);
    let mut tok = tokenizer::export(gguf, n_ctx, matches!(arch, Arch::Gemma3 | Arch::Phi3))?;
    if arch == Arch::Phi3
        && tok.tokenizer_model.is_none()
        && let Some(cfg) = tok.tokenizer_config.as_object_mut()
    {
        cfg.insert("tokenizer_class".into(), json!("GPT2Tokenizer"));
    }
    let (mut config, hp) = build_config(gguf, arch, dtype, &tok.special_ids)?;
    if let (Some(q), Some(obj)) = (quant, config.as_object_mut()) {
        obj.insert("quantization_config".into(), q.quantization_config());
    }

    let total = gguf.tensors().len();
    let mut tensors = Vec::with_capacity(total);
    for (i, t) in gguf.tensors().iter().enumerate() {
        let hf_name = gguf_to_hf_name(arch, &t.name)?;
        let mut f = dequantize_tensor(&t.name, t.ggml_type, gguf.tensor_data(t), t.n_elements())?;
        if let Some(shift) = arch.norm_shift(&t.name) {
            apply_shift(&mut f, -shift);
        }
        if arch.permutes_qk() {
            let n_head = if t.name.ends_with(".attn_q.weight") || t.name.ends_with(".attn_q.bias") {
                Some(hp.n_head)
            } else if t.name.ends_with(".attn_k.weight") || t.name.ends_with(".attn_k.bias") {
                Some(hp.n_head_kv)
            } else {
                None
            };
            if let Some(n_head) = n_head {
                let row_len = if t.name.ends_with(".bias") {
                    1
                } else {
                    t.dims.first().copied().unwrap_or(1) as usize
                };
                f = permute_rows(&t.name, &f, row_len, n_head as usize, Direction::GgufToHf)?;
            }
        }
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        match quant {
            Some(q) if is_linear_weight(&t.name) && shape.len() == 2 => {
                let prefix = hf_name.strip_suffix(".weight").unwrap_or(&hf_name);
                tensors.extend(quantize_linear(prefix, &f, shape[0], shape[1], q)?);
            }
            _ => {
                let data = f32_to_st_bytes(&f, dtype)?;
                tensors.push(StWriteTensor {
                    name: hf_name.clone(),
                    dtype,
                    shape,
                    data: Cow::Owned(data),
                });
            }
        }
        progress(Progress {
            done: i + 1,
            total,
            tensor: &hf_name,
        });
    }

    std::fs::create_dir_all(out_dir).map_err(|e| ConvertError::io(out_dir, e))?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&out_dir.join("model.safetensors"), &tensors, &meta)?;
    drop(tensors);

    write_json_atomic(&out_dir.join("config.json"), &config)?;
    let mut gen_cfg = Map::new();
    for (kind, id) in &tok.special_ids {
        if matches!(*kind, "bos" | "eos" | "pad") {
            gen_cfg.insert(format!("{kind}_token_id"), json!(id));
        }
    }
    write_json_atomic(
        &out_dir.join("generation_config.json"),
        &Value::Object(gen_cfg),
    )?;
    if let Some(model) = &tok.tokenizer_model {
        write_bytes_atomic(&out_dir.join("tokenizer.model"), model)?;
    }
    let mut tj = tok.tokenizer_json.into_bytes();
    tj.push(b'\n');
    write_bytes_atomic(&out_dir.join("tokenizer.json"), &tj)?;
    write_json_atomic(
        &out_dir.join("tokenizer_config.json"),
        &tok.tokenizer_config,
    )?;
    Ok(())
}
