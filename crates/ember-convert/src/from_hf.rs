//! Hugging Face checkpoint directory -> GGUF.

use std::path::Path;

use ember_formats::checkpoint::Checkpoint;
use ember_formats::{GgufWriter, MetaValue};
use ember_quant::GgmlType;
use serde_json::Value;

use crate::arch::{Arch, apply_shift, gguf_layer, hf_to_gguf_name};
use crate::quant::{
    QuantizeOptions, TensorSource, check_target, encode_tensor, file_type_for, target_type,
};
use crate::quantized::{QuantScheme, dequantize_linear, expected_nk};
use crate::to_hf::GGUF_METADATA_KEY;
use crate::tokenizer::{self, TokenizerSource};
use crate::util::{Direction, permute_rows, st_bytes_to_f32, write_gguf_atomic};
use crate::{ConvertError, Progress};

fn cfg_u64(c: &Value, k: &str) -> Result<u64, ConvertError> {
    c.get(k)
        .and_then(Value::as_u64)
        .ok_or_else(|| ConvertError::MissingConfig(k.to_string()))
}

fn cfg_u32(c: &Value, k: &str) -> Result<u32, ConvertError> {
    u32::try_from(cfg_u64(c, k)?).map_err(|_| ConvertError::UnsupportedConfig {
        key: k.to_string(),
        reason: "does not fit in u32".into(),
    })
}

fn cfg_f32(c: &Value, k: &str) -> Option<f32> {
    c.get(k).and_then(Value::as_f64).map(|v| v as f32)
}

/// What [`write_hparams`] found beyond the keys it wrote.
struct Hparams {
    n_head: u64,
    n_head_kv: u64,
    /// Llama 3.1's RoPE scaling as per-pair divisors of the angles: `rope_freqs.weight`.
    rope_freqs: Option<Vec<f32>>,
}

/// Llama 3.1's RoPE scaling (`rope_type: llama3`) as the per-pair divisors llama.cpp's
/// converter writes to `rope_freqs.weight` (`LlamaModel.generate_extra_tensors`): 1 for pairs
/// whose wavelength is under `original_max_position_embeddings / high_freq_factor`, `factor`
/// for those over `.. / low_freq_factor`, a smooth blend between. Computed in f32 in the
/// converter's order, as its torch code does (`a / t` on a tensor is `t.reciprocal() * a`);
/// torch's vectorized `pow` may still differ from this `powf` by an ulp.
fn llama3_rope_factors(
    s: &Value,
    config: &Value,
    base: f32,
    dim: u32,
) -> Result<Vec<f32>, ConvertError> {
    let get = |k: &str, default: f64| s.get(k).and_then(Value::as_f64).unwrap_or(default);
    let factor = get("factor", 8.0);
    let low = get("low_freq_factor", 1.0);
    let high = get("high_freq_factor", 4.0);
    // llama.cpp's converter takes a top-level `original_max_position_embeddings` when the
    // scaling dict has none.
    let old = s
        .get("original_max_position_embeddings")
        .or_else(|| config.get("original_max_position_embeddings"))
        .and_then(Value::as_f64)
        .unwrap_or(8192.0);
    if !(factor > 0.0 && low > 0.0 && high >= low && old > 0.0 && base > 1.0 && dim >= 2) {
        return Err(ConvertError::UnsupportedConfig {
            key: "rope_scaling".into(),
            reason: format!(
                "llama3 scaling needs factor > 0, 0 < low_freq_factor <= high_freq_factor, \
                 original_max_position_embeddings > 0 and rope_theta > 1 (got {factor}, {low}, \
                 {high}, {old}, {base})"
            ),
        });
    }
    // Python's float operands meet f32 tensors as f32.
    let (low_wavelen, high_wavelen) = ((old / low) as f32, (old / high) as f32);
    let (factor, low, span, old) = (factor as f32, low as f32, (high - low) as f32, old as f32);
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    Ok((0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            let freq = 1.0 / base.powf(exponent);
            let wavelen = (1.0 / freq) * two_pi;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = ((1.0 / wavelen) * old - low) / span;
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect())
}

/// Writes the `{arch}.*` hyperparameters llama.cpp's converter writes (formats spec §5.4), and
/// `general.file_type`, in its order.
fn write_hparams(
    w: &mut GgufWriter,
    c: &Value,
    arch: Arch,
    ty: GgmlType,
) -> Result<Hparams, ConvertError> {
    let a = arch.gguf_name();
    let n_head = cfg_u32(c, "num_attention_heads")?;
    let n_embd = cfg_u32(c, "hidden_size")?;
    if n_head == 0 {
        return Err(ConvertError::UnsupportedConfig {
            key: "num_attention_heads".into(),
            reason: "is 0".into(),
        });
    }
    let n_head_kv = match c.get("num_key_value_heads") {
        None | Some(Value::Null) => n_head,
        Some(_) => cfg_u32(c, "num_key_value_heads")?,
    };
    w.add(format!("{a}.block_count"), cfg_u32(c, "num_hidden_layers")?);
    w.add(
        format!("{a}.context_length"),
        cfg_u32(c, "max_position_embeddings")?,
    );
    w.add(format!("{a}.embedding_length"), n_embd);
    w.add(
        format!("{a}.feed_forward_length"),
        cfg_u32(c, "intermediate_size")?,
    );
    w.add(format!("{a}.attention.head_count"), n_head);
    w.add(format!("{a}.attention.head_count_kv"), n_head_kv);
    // transformers 5 keeps Gemma 3's two rope setups under `rope_parameters.{full,sliding}_attention`.
    let rope_params = |kind: &str| c.get("rope_parameters").and_then(|p| p.get(kind));
    let scaling = c
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or_else(|| rope_params("full_attention"))
        .or_else(|| c.get("rope_parameters"))
        .filter(|v| !v.is_null());
    let mut llama3_scaling = None;
    if let Some(s) = scaling {
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_ascii_lowercase();
        match kind.as_str() {
            "default" => {}
            "linear" => {
                let f = cfg_f32(s, "factor")
                    .ok_or_else(|| ConvertError::MissingConfig("rope_scaling.factor".into()))?;
                w.add(format!("{a}.rope.scaling.type"), "linear");
                w.add(format!("{a}.rope.scaling.factor"), f);
            }
            // No metadata key: a tensor of per-pair factors, written once the base and the
            // head size are known.
            "llama3" if arch == Arch::Llama => llama3_scaling = Some(s),
            other => {
                return Err(ConvertError::UnsupportedConfig {
                    key: "rope_scaling".into(),
                    reason: format!("rope type '{other}' is not converted"),
                });
            }
        }
    }
    let theta = cfg_f32(c, "rope_theta")
        .or_else(|| {
            c.get("rope_parameters")
                .and_then(|p| cfg_f32(p, "rope_theta"))
        })
        .or_else(|| rope_params("full_attention").and_then(|p| cfg_f32(p, "rope_theta")))
        .or((arch == Arch::Gemma3).then_some(1_000_000.0));
    if let Some(t) = theta {
        w.add(format!("{a}.rope.freq_base"), t);
    }
    let eps = cfg_f32(c, "rms_norm_eps")
        .ok_or_else(|| ConvertError::MissingConfig("rms_norm_eps".into()))?;
    w.add(format!("{a}.attention.layer_norm_rms_epsilon"), eps);
    let head_dim = match c.get("head_dim") {
        None | Some(Value::Null) if arch == Arch::Gemma3 => Some(256),
        None | Some(Value::Null) => None,
        Some(_) => Some(cfg_u32(c, "head_dim")?),
    };
    if let Some(hd) = head_dim {
        w.add(format!("{a}.attention.key_length"), hd);
        w.add(format!("{a}.attention.value_length"), hd);
    }
    if arch == Arch::Gemma3 {
        gemma3_hparams(w, c, n_head, n_embd, head_dim.unwrap_or(256), |k| {
            rope_params(k).and_then(|p| cfg_f32(p, "rope_theta"))
        })?;
    }
    if arch == Arch::Phi3 {
        phi3_hparams(w, c, n_head, n_embd)?;
    }
    w.add("general.file_type", file_type_for(ty)?);
    let rope_dim = head_dim.unwrap_or(n_embd / n_head);
    if arch == Arch::Llama {
        w.add(format!("{a}.vocab_size"), cfg_u32(c, "vocab_size")?);
        w.add(format!("{a}.rope.dimension_count"), rope_dim);
    }
    let rope_freqs = match llama3_scaling {
        // llama.cpp's loader defaults the base to 10000 as transformers does.
        Some(s) => Some(llama3_rope_factors(
            s,
            c,
            theta.unwrap_or(10_000.0),
            rope_dim,
        )?),
        None => None,
    };
    Ok(Hparams {
        n_head: u64::from(n_head),
        n_head_kv: u64::from(n_head_kv),
        rope_freqs,
    })
}

/// The `gemma3.*` keys beyond the common ones (llama.cpp's `Gemma3Model.set_gguf_parameters`):
/// `attention.sliding_window` unless every layer is global, `final_logit_softcapping` when
/// set. The window pattern and the window layers' rope base, which llama.cpp's converter does
/// not write (its loader assumes 6 and 10000), are written as
/// `attention.sliding_window_pattern` / `rope.freq_base_swa` only when they differ.
fn gemma3_hparams(
    w: &mut GgufWriter,
    c: &Value,
    n_head: u32,
    n_embd: u32,
    head_dim: u32,
    rope_theta_of: impl Fn(&str) -> Option<f32>,
) -> Result<(), ConvertError> {
    let unsupported = |key: &str, reason: String| ConvertError::UnsupportedConfig {
        key: key.into(),
        reason,
    };
    if c.get("attn_logit_softcapping")
        .is_some_and(|v| !v.is_null())
    {
        return Err(unsupported(
            "attn_logit_softcapping",
            "attention logit soft-capping is not part of Gemma 3".into(),
        ));
    }
    if let Some(q) = c.get("query_pre_attn_scalar").and_then(Value::as_f64) {
        // ember-models and llama.cpp scale Q by 1/sqrt(head_dim), except the 27B's
        // n_embd / n_head: any other scalar would run differently.
        let q = q as u64;
        if q != u64::from(head_dim) && q != u64::from(n_embd / n_head) {
            return Err(unsupported(
                "query_pre_attn_scalar",
                format!("{q} is neither head_dim {head_dim} nor hidden_size / heads"),
            ));
        }
    }
    // The pattern: `layer_types` (every `pattern`-th layer full), else `sliding_window_pattern`.
    let pattern = match c.get("layer_types").and_then(Value::as_array) {
        Some(types) => {
            let full: Vec<bool> = types
                .iter()
                .map(|t| t.as_str() == Some("full_attention"))
                .collect();
            let p = full.iter().position(|&f| f).map_or(0, |i| i + 1);
            let periodic = full
                .iter()
                .enumerate()
                .all(|(i, &f)| f == (p > 0 && (i + 1) % p == 0));
            if !periodic {
                return Err(unsupported(
                    "layer_types",
                    "full-attention layers that are not every n-th layer".into(),
                ));
            }
            p as u64
        }
        None => c
            .get("sliding_window_pattern")
            .or_else(|| c.get("_sliding_window_pattern"))
            .and_then(Value::as_u64)
            .unwrap_or(6),
    };
    if pattern != 1 {
        w.add(
            "gemma3.attention.sliding_window",
            cfg_u32(c, "sliding_window")?,
        );
        if pattern != 6 {
            w.add(
                "gemma3.attention.sliding_window_pattern",
                u32::try_from(pattern).map_err(|_| {
                    unsupported("sliding_window_pattern", "does not fit in u32".into())
                })?,
            );
        }
    }
    let swa_base =
        cfg_f32(c, "rope_local_base_freq").or_else(|| rope_theta_of("sliding_attention"));
    if let Some(b) = swa_base
        && b != 10_000.0
    {
        w.add("gemma3.rope.freq_base_swa", b);
    }
    if let Some(cap) = cfg_f32(c, "final_logit_softcapping") {
        w.add("gemma3.final_logit_softcapping", cap);
    }
    Ok(())
}

/// The `phi3.*` keys beyond the common ones (llama.cpp's `Phi3MiniModel.set_gguf_parameters`):
/// `rope.dimension_count` from `partial_rotary_factor` (`int(factor * n_embd) // n_head`),
/// `rope.scaling.original_context_length` from `original_max_position_embeddings` when the
/// config has it, and `attention.sliding_window` (0 when there is none, which tells Phi-4
/// from Phi-3 in llama.cpp). LongRoPE (`rope_scaling` with `long_factor`) is refused by the
/// rope-type check before this.
fn phi3_hparams(
    w: &mut GgufWriter,
    c: &Value,
    n_head: u32,
    n_embd: u32,
) -> Result<(), ConvertError> {
    let rope = c
        .get("rope_parameters")
        .or_else(|| c.get("rope_scaling"))
        .filter(|v| v.is_object());
    // llama.cpp prefers `rope_parameters` (or `rope_scaling`) over the top-level key.
    let param = |k: &str| rope.and_then(|r| r.get(k)).or_else(|| c.get(k));
    let factor = param("partial_rotary_factor")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(ConvertError::UnsupportedConfig {
            key: "partial_rotary_factor".into(),
            reason: format!("{factor} is not in (0, 1]"),
        });
    }
    // Python's `int(rot_pct * n_embd) // n_head`, in f64 as Python computes it.
    let rope_dims = (factor * f64::from(n_embd)) as u32 / n_head;
    if let Some(orig) = param("original_max_position_embeddings").and_then(Value::as_u64) {
        let orig = u32::try_from(orig).map_err(|_| ConvertError::UnsupportedConfig {
            key: "original_max_position_embeddings".into(),
            reason: "does not fit in u32".into(),
        })?;
        w.add("phi3.rope.scaling.original_context_length", orig);
    }
    w.add("phi3.rope.dimension_count", rope_dims);
    let window = match c.get("sliding_window") {
        None | Some(Value::Null) => 0,
        Some(_) => cfg_u32(c, "sliding_window")?,
    };
    w.add("phi3.attention.sliding_window", window);
    Ok(())
}

/// Sort key of a GGUF tensor name: embeddings, then layers in order, then the head.
fn order_key(name: &str) -> (u32, u32) {
    match name {
        "token_embd.weight" => (0, 0),
        "output_norm.weight" => (2, 0),
        "output.weight" => (3, 0),
        n => (1, gguf_layer(n).unwrap_or(u32::MAX)),
    }
}

/// Converts a Hugging Face checkpoint (llama/mistral, qwen2, qwen3, gemma3_text, phi3;
/// F32/F16/BF16
/// weights) to a
/// GGUF file at `output`, written through a temporary file renamed at the end.
///
/// Quantized checkpoints are read too: the scheme is detected with [`QuantScheme::detect`]
/// (AWQ GEMM/GEMV, GPTQ v1/v2 with `g_idx`, EXL2, compressed-tensors `pack-quantized`), and
/// each quantized linear layer (`{prefix}.qweight` / `.q_weight` / `.weight_packed` with its
/// companion tensors) is checked against the `[out, in]` shape the config's sizes give,
/// dequantized to f32 by ember-quant's reader, and then treated exactly like an f32
/// `{prefix}.weight`.
///
/// The metadata is what llama.cpp's `convert_hf_to_gguf.py` writes for the architecture:
/// `general.architecture`, `general.type`, `general.name` and, when the checkpoint came from
/// [`crate::gguf_to_hf`], the other `general.*` strings it recorded; the `{arch}.*`
/// hyperparameters; `general.file_type`; `tokenizer.ggml.{model, pre, tokens, token_type,
/// merges, *_token_id, add_bos_token, add_space_prefix}` and `tokenizer.chat_template` from
/// tokenizer.json / tokenizer_config.json (byte-level BPE: `tokenizer.ggml.pre` is recovered
/// from the pre-tokenizer's split regexes; a SentencePiece BPE with byte fallback, as Gemma's:
/// `tokenizer.ggml.{tokens, scores, token_type}` from tokenizer.model when present);
/// `general.quantization_version`. Gemma 3's norms get llama.cpp's `+ 1`.
///
/// Tensors get their GGUF names, llama's Q/K rows are permuted to GGML's interleaved rope
/// order, and each tensor is converted to f32 (exact) and then to the type [`target_type`]
/// picks for `opts` (1-D tensors stay F32), with ggml's reference quantizers. Rotary
/// `inv_freq` buffers are skipped, and so is `lm_head.weight` when `tie_word_embeddings` is
/// set.
pub fn hf_to_gguf(
    ckpt: &Checkpoint,
    output: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), ConvertError> {
    check_target(opts.ty)?;
    let Prepared {
        mut w,
        arch,
        n_head,
        n_head_kv,
        scheme,
        names,
        has_output,
        rope_freqs,
    } = prepare(ckpt, opts.ty)?;
    let c = ckpt.config();
    if let Some(f) = rope_freqs {
        add_rope_freqs(&mut w, &f)?;
    }
    let total = names.len();
    for (i, (gname, hf, quantized)) in names.iter().enumerate() {
        let (shape, mut f) = if *quantized {
            let scheme = scheme.as_ref().expect("quantized entries need a scheme");
            let (n, k) = expected_nk(hf, c)?;
            (vec![n, k], dequantize_linear(ckpt, scheme, hf, n, k)?)
        } else {
            let (info, bytes) = ckpt
                .tensor(hf)
                .ok_or_else(|| ConvertError::MissingTensor(hf.clone()))?;
            let n: usize = info
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| ConvertError::bad_tensor(hf, "element count overflows"))?;
            (
                info.shape.clone(),
                st_bytes_to_f32(hf, bytes, info.dtype, n)?,
            )
        };
        let n = f.len();
        if let Some(shift) = arch.norm_shift(gname) {
            apply_shift(&mut f, shift);
        }
        if arch.permutes_qk() {
            let heads = if gname.contains(".attn_q.") {
                Some(n_head)
            } else if gname.contains(".attn_k.") {
                Some(n_head_kv)
            } else {
                None
            };
            if let Some(heads) = heads {
                let row_len = if shape.len() >= 2 {
                    shape[1..].iter().product()
                } else {
                    1
                };
                f = permute_rows(hf, &f, row_len, heads as usize, Direction::HfToGguf)?;
            }
        }
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let dst = target_type(gname, &dims, GgmlType::F32, opts, has_output);
        let data = encode_tensor(gname, TensorSource::F32(f), n as u64, dst)?;
        w.add_tensor(gname.clone(), &dims, dst, data)?;
        progress(Progress {
            done: i + 1,
            total,
            tensor: gname,
        });
    }
    write_gguf_atomic(&w, output)
}

/// What both [`hf_to_gguf`] and [`crate::checkpoint_image`] start from: the metadata written,
/// the quantization scheme detected and every tensor named.
pub(crate) struct Prepared {
    /// Metadata and tokenizer keys, no tensors yet.
    pub w: GgufWriter,
    pub arch: Arch,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub scheme: Option<QuantScheme>,
    /// (GGUF name, HF tensor name or quantized layer prefix, quantized?), in GGUF order.
    pub names: Vec<(String, String, bool)>,
    pub has_output: bool,
    /// `rope_freqs.weight`, computed from the config (Llama 3.1's scaling), not in the
    /// checkpoint.
    pub rope_freqs: Option<Vec<f32>>,
}

/// Adds `rope_freqs.weight` (F32, one factor per rotated pair), as llama.cpp's converter does
/// before the checkpoint's tensors.
pub(crate) fn add_rope_freqs(w: &mut GgufWriter, factors: &[f32]) -> Result<(), ConvertError> {
    let data: Vec<u8> = factors.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.add_tensor(
        "rope_freqs.weight",
        &[factors.len() as u64],
        GgmlType::F32,
        data,
    )?;
    Ok(())
}

/// Reads the config and tokenizer into GGUF metadata (`general.file_type` from `file_type`)
/// and maps every tensor name.
pub(crate) fn prepare(ckpt: &Checkpoint, file_type: GgmlType) -> Result<Prepared, ConvertError> {
    let c = ckpt.config();
    let model_type = c
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| ConvertError::MissingConfig("model_type".into()))?;
    let arch = Arch::from_hf(model_type)?;
    let carried = c.get(GGUF_METADATA_KEY).and_then(Value::as_object);

    let mut w = GgufWriter::new();
    w.add("general.architecture", arch.gguf_name());
    w.add("general.type", "model");
    let name = carried
        .and_then(|m| m.get("general.name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            c.get("_name_or_path")
                .and_then(Value::as_str)
                .and_then(|p| p.rsplit('/').find(|s| !s.is_empty()))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "model".to_string());
    w.add("general.name", name);
    if let Some(m) = carried {
        for (k, v) in m {
            if !k.starts_with("general.") || k == "general.name" || k == "general.type" {
                continue;
            }
            match v {
                Value::String(s) => {
                    w.add(k.clone(), s.as_str());
                }
                Value::Array(items) => {
                    let strs: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                    if let Some(strs) = strs {
                        w.add_string_array(k.clone(), strs);
                    }
                }
                _ => {}
            }
        }
    }
    let Hparams {
        n_head,
        n_head_kv,
        rope_freqs,
    } = write_hparams(&mut w, c, arch, file_type)?;

    let tj_path = ckpt.tokenizer_json().ok_or_else(|| {
        ConvertError::BadTokenizerJson("the checkpoint has no tokenizer.json".into())
    })?;
    let tj = std::fs::read_to_string(&tj_path).map_err(|e| ConvertError::io(&tj_path, e))?;
    let spm_path = ckpt.dir().join("tokenizer.model");
    let spm_model = if spm_path.is_file() {
        Some(std::fs::read(&spm_path).map_err(|e| ConvertError::io(&spm_path, e))?)
    } else {
        None
    };
    tokenizer::import(
        &mut w,
        &TokenizerSource {
            json: &tj,
            config: ckpt.tokenizer_config(),
            model_config: c,
            pre_hint: carried
                .and_then(|m| m.get("tokenizer.ggml.pre"))
                .and_then(Value::as_str),
            spm_model: spm_model.as_deref(),
        },
    )?;
    drop(tj);
    w.add("general.quantization_version", MetaValue::U32(2));

    let tied = c
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let scheme = QuantScheme::detect(ckpt)?;
    // (GGUF name, HF tensor name or quantized layer prefix, quantized?)
    let mut names: Vec<(String, String, bool)> = Vec::new();
    let mut aux_prefixes: Vec<&str> = Vec::new();
    for hf in ckpt.tensor_names() {
        if hf.ends_with(".rotary_emb.inv_freq") || (tied && hf == "lm_head.weight") {
            continue;
        }
        if let Some((prefix, is_main)) = scheme.as_ref().and_then(|s| s.classify(hf)) {
            if is_main {
                let gname = hf_to_gguf_name(arch, &format!("{prefix}.weight"))?;
                names.push((gname, prefix.to_string(), true));
            } else {
                aux_prefixes.push(prefix);
            }
            continue;
        }
        names.push((hf_to_gguf_name(arch, hf)?, hf.to_string(), false));
    }
    if let Some(s) = &scheme {
        // An auxiliary tensor (qzeros, scales, ...) whose layer has no main tensor.
        for p in aux_prefixes {
            if !names.iter().any(|(_, h, q)| *q && h == p) {
                return Err(ConvertError::MissingTensor(format!(
                    "{p}.{}",
                    s.main_suffix()
                )));
            }
        }
    }
    names.sort_by(|a, b| order_key(&a.0).cmp(&order_key(&b.0)).then(a.1.cmp(&b.1)));
    if let Some(w) = names.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ConvertError::bad_tensor(
            &w[1].1,
            format!(
                "maps to '{}' like '{}' (a layer stored twice?)",
                w[1].0, w[0].1
            ),
        ));
    }
    if !names.iter().any(|(g, _, _)| g == "token_embd.weight") {
        return Err(ConvertError::MissingTensor(
            "model.embed_tokens.weight".into(),
        ));
    }
    let has_output = names.iter().any(|(g, _, _)| g == "output.weight");
    Ok(Prepared {
        w,
        arch,
        n_head,
        n_head_kv,
        scheme,
        names,
        has_output,
        rope_freqs,
    })
}
