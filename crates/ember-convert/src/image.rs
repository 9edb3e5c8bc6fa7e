//! A checkpoint directory made ready to run without converting it: the metadata and tokenizer
//! as a small in-memory GGUF, the linear layers left where they lie in the safetensors files.

use std::ops::Range;
use std::sync::Arc;

use ember_formats::GgufFile;
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StDtype;
use ember_quant::GgmlType;
use ember_quant::group::{ByteView, GroupQuantized, PackedLinear};
use serde_json::Value;

use crate::ConvertError;
use crate::arch::{Arch, apply_shift};
use crate::from_hf::{Prepared, add_rope_freqs, prepare};
use crate::quantized::{QuantScheme, expected_nk, packed_linear};
use crate::util::st_bytes_to_f32;

/// How [`checkpoint_image`] treats quantized linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Dequantize AWQ/GPTQ/EXL2/compressed-tensors layers to F16 at load instead of running
    /// them packed (more memory, the float kernels).
    pub dequantize: bool,
}

/// One linear layer of a checkpoint, by its GGUF name.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// Dense rows (`rows x cols`, row-major, `ty` F32, F16 or BF16): the safetensors bytes as
    /// they are, since a Hugging Face `[out, in]` weight has GGUF's row layout.
    Dense {
        /// Element type.
        ty: GgmlType,
        /// Out features.
        rows: usize,
        /// In features.
        cols: usize,
        /// `rows * cols` elements.
        bytes: ByteView,
    },
    /// A group-quantized layer in its packed form.
    Packed(PackedLinear),
}

impl LinearWeight {
    /// `(rows, cols)`: out and in features.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            LinearWeight::Dense { rows, cols, .. } => (*rows, *cols),
            LinearWeight::Packed(p) => {
                let d = p.desc();
                (d.n, d.k)
            }
        }
    }

    /// The group quantization, for a packed layer.
    pub fn quantization(&self) -> Option<GroupQuantized> {
        match self {
            LinearWeight::Dense { .. } => None,
            LinearWeight::Packed(p) => Some(p.desc()),
        }
    }
}

impl LinearWeight {
    /// Output rows `rows` as a layer of its own: dense rows are a narrower view of the same
    /// bytes, packed layers [`PackedLinear::slice_outputs`] (see its alignment rules).
    fn slice_rows(&self, name: &str, rows: Range<usize>) -> Result<LinearWeight, ConvertError> {
        match self {
            LinearWeight::Dense {
                ty,
                rows: total,
                cols,
                bytes,
            } => {
                let row_bytes = ty
                    .bytes_for(*cols as u64)
                    .and_then(|b| usize::try_from(b).ok())
                    .ok_or_else(|| ConvertError::bad_tensor(name, "row size overflows"))?;
                if rows.start >= rows.end || rows.end > *total {
                    return Err(ConvertError::bad_tensor(
                        name,
                        format!("rows {rows:?} are not inside its {total}"),
                    ));
                }
                let part = bytes
                    .slice(rows.start * row_bytes..rows.end * row_bytes)
                    .ok_or_else(|| ConvertError::bad_tensor(name, "rows outside its bytes"))?;
                Ok(LinearWeight::Dense {
                    ty: *ty,
                    rows: rows.len(),
                    cols: *cols,
                    bytes: part,
                })
            }
            LinearWeight::Packed(p) => {
                p.slice_outputs(rows)
                    .map(LinearWeight::Packed)
                    .map_err(|source| ConvertError::QuantizedTensor {
                        tensor: name.to_string(),
                        source,
                    })
            }
        }
    }
}

/// How a fused layer is run as separate ones: Phi-3's `attn_qkv` (Q, K, V rows) and `ffn_up`
/// (gate rows, then up rows) become `attn_q`/`attn_k`/`attn_v` and `ffn_gate`/`ffn_up`, which
/// ember-models takes in place of the fused tensors. Splitting here (rather than slicing rows
/// when the model loads) keeps one copy of each part: a packed layer's load-time tables are
/// built per part, never for the fused whole.
struct FusedParts {
    /// Rows of Q, K and V in `attn_qkv`.
    qkv: Option<[usize; 3]>,
    /// Rows of gate (= of up) in Phi-3's `ffn_up`.
    gate_up: Option<usize>,
}

impl FusedParts {
    fn new(arch: Arch, c: &Value, n_head: u64, n_kv: u64) -> Result<Self, ConvertError> {
        if arch != Arch::Phi3 {
            return Ok(Self {
                qkv: None,
                gate_up: None,
            });
        }
        let get = |k: &str| {
            c.get(k)
                .and_then(Value::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| ConvertError::MissingConfig(k.to_string()))
        };
        let hidden = get("hidden_size")?;
        // The head size as `expected_nk` reads it (Phi3Config has no `head_dim`; honour one);
        // write_hparams checked n_head > 0.
        let hd = match c.get("head_dim") {
            None | Some(Value::Null) => hidden / n_head.max(1) as usize,
            Some(_) => get("head_dim")?,
        };
        let overflow = |key: &str| ConvertError::UnsupportedConfig {
            key: key.into(),
            reason: "fused layer sizes overflow".into(),
        };
        let q = usize::try_from(n_head)
            .ok()
            .and_then(|h| h.checked_mul(hd))
            .ok_or_else(|| overflow("num_attention_heads"))?;
        let kv = usize::try_from(n_kv)
            .ok()
            .and_then(|h| h.checked_mul(hd))
            .ok_or_else(|| overflow("num_key_value_heads"))?;
        // The parts' sums, checked once here so that cutting cannot overflow.
        q.checked_add(kv)
            .and_then(|s| s.checked_add(kv))
            .ok_or_else(|| overflow("num_key_value_heads"))?;
        let ff = get("intermediate_size")?;
        ff.checked_mul(2)
            .ok_or_else(|| overflow("intermediate_size"))?;
        Ok(Self {
            qkv: Some([q, kv, kv]),
            gate_up: Some(ff),
        })
    }

    /// Pushes `weight` under `gname`, or its parts under theirs.
    fn push(
        &self,
        out: &mut Vec<(String, LinearWeight)>,
        gname: &str,
        hf: &str,
        weight: LinearWeight,
    ) -> Result<(), ConvertError> {
        let layer = gname
            .strip_suffix(".weight")
            .and_then(|s| s.rsplit_once('.'));
        let (blk, sizes): (&str, Vec<(&str, usize)>) = match (layer, self.qkv, self.gate_up) {
            (Some((blk, "attn_qkv")), Some([q, k, v]), _) => {
                (blk, vec![("attn_q", q), ("attn_k", k), ("attn_v", v)])
            }
            (Some((blk, "ffn_up")), _, Some(ff)) => (blk, vec![("ffn_gate", ff), ("ffn_up", ff)]),
            _ => {
                out.push((gname.to_string(), weight));
                return Ok(());
            }
        };
        // `new` checked that these sums fit.
        let total: usize = sizes.iter().map(|(_, n)| n).sum();
        if weight.shape().0 != total {
            return Err(ConvertError::bad_tensor(
                hf,
                format!(
                    "has {} output rows; the config's fused sizes add up to {total}",
                    weight.shape().0
                ),
            ));
        }
        let mut start = 0;
        for (t, n) in sizes {
            let part = weight.slice_rows(hf, start..start + n)?;
            out.push((format!("{blk}.{t}.weight"), part));
            start += n;
        }
        Ok(())
    }
}

/// What [`checkpoint_image`] gives: enough to build a model without a GGUF file on disk.
#[derive(Debug)]
pub struct CheckpointImage {
    /// The metadata [`crate::hf_to_gguf`] would write (hyper-parameters, tokenizer, chat
    /// template) and the checkpoint's vectors (norms, biases) as F32: a small GGUF in memory.
    pub gguf: GgufFile,
    /// Every matrix (embeddings, projections, head), by GGUF tensor name, zero-copy over the
    /// checkpoint's memory maps unless dequantized.
    pub linears: Vec<(String, LinearWeight)>,
    /// The Q/K projections are in Hugging Face row order: llama must rotate them NeoX-style
    /// (GGUF converters permute them for GGML's interleaved rotation instead).
    pub hf_qk_order: bool,
    /// The quantization scheme from `config.json`, if any.
    pub scheme: Option<QuantScheme>,
}

/// Reads a checkpoint directory (llama/mistral, qwen2, qwen3, gemma3, phi3; F32/F16/BF16 or
/// AWQ, GPTQ, EXL2, compressed-tensors) for running: the same checks and metadata as
/// [`crate::hf_to_gguf`], but no tensor is converted or copied except the vectors, and
/// quantized layers stay packed (see [`ImageOptions::dequantize`]).
///
/// Phi-3's fused projections are listed as their parts (`attn_q`/`attn_k`/`attn_v` from
/// `qkv_proj`, `ffn_gate`/`ffn_up` from `gate_up_proj`): dense parts view the same bytes,
/// packed parts are cut at their output rows ([`PackedLinear::slice_outputs`]).
pub fn checkpoint_image(
    ckpt: &Checkpoint,
    opts: &ImageOptions,
) -> Result<CheckpointImage, ConvertError> {
    let Prepared {
        mut w,
        arch,
        scheme,
        names,
        n_head,
        n_head_kv,
        rope_freqs,
        ..
    } = prepare(ckpt, GgmlType::F16)?;
    if let Some(f) = rope_freqs {
        add_rope_freqs(&mut w, &f)?;
    }
    let c = ckpt.config();
    let fused = FusedParts::new(arch, c, n_head, n_head_kv)?;
    let mut linears = Vec::new();
    for (gname, hf, quantized) in &names {
        if *quantized {
            let scheme = scheme
                .as_ref()
                .ok_or_else(|| ConvertError::bad_tensor(hf, "quantized without a scheme"))?;
            let (n, k) = expected_nk(hf, c)?;
            let packed = packed_linear(ckpt, scheme, hf, n, k)?;
            let weight = if opts.dequantize {
                let mut f = vec![0f32; n.saturating_mul(k)];
                packed
                    .view()
                    .dequantize_into(&mut f)
                    .map_err(|e| ConvertError::bad_tensor(hf, e.to_string()))?;
                let bytes = ember_quant::quantize(GgmlType::F16, &f)
                    .map_err(|e| ConvertError::bad_tensor(hf, e.to_string()))?;
                LinearWeight::Dense {
                    ty: GgmlType::F16,
                    rows: n,
                    cols: k,
                    bytes: ByteView::from_vec(bytes),
                }
            } else {
                LinearWeight::Packed(packed)
            };
            fused.push(&mut linears, gname, hf, weight)?;
            continue;
        }
        let (shard, info) = ckpt
            .tensor_location(hf)
            .ok_or_else(|| ConvertError::MissingTensor(hf.clone()))?;
        let ty = match info.dtype {
            StDtype::F32 => Some(GgmlType::F32),
            StDtype::F16 => Some(GgmlType::F16),
            StDtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        };
        if let (Some(ty), &[rows, cols]) = (ty, info.shape.as_slice()) {
            let file = ckpt
                .shards()
                .get(shard)
                .ok_or_else(|| ConvertError::MissingTensor(hf.clone()))?;
            let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(file.shared_bytes());
            let end = info.offset.checked_add(info.n_bytes);
            let bytes = end
                .and_then(|end| ByteView::new(owner, info.offset..end))
                .ok_or_else(|| ConvertError::bad_tensor(hf, "data outside its file"))?;
            let weight = LinearWeight::Dense {
                ty,
                rows,
                cols,
                bytes,
            };
            fused.push(&mut linears, gname, hf, weight)?;
            continue;
        }
        // Vectors (and any other dtype) go into the image as F32: exact, and small.
        let (info, bytes) = ckpt
            .tensor(hf)
            .ok_or_else(|| ConvertError::MissingTensor(hf.clone()))?;
        let n = info.n_elements();
        let mut f = st_bytes_to_f32(hf, bytes, info.dtype, n)?;
        // Gemma's norms: GGUF holds `1 + w`, as hf_to_gguf writes it.
        if let Some(shift) = arch.norm_shift(gname) {
            apply_shift(&mut f, shift);
        }
        let dims: Vec<u64> = info.shape.iter().rev().map(|&d| d as u64).collect();
        let data: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.add_tensor(gname.clone(), &dims, GgmlType::F32, data)?;
    }
    let gguf = GgufFile::from_bytes(w.to_bytes()?)?;
    Ok(CheckpointImage {
        gguf,
        linears,
        hf_qk_order: arch.permutes_qk(),
        scheme,
    })
}
