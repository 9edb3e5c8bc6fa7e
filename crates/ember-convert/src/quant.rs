//! GGUF -> GGUF requantization with llama-quantize's per-tensor type rules.

use std::path::Path;

use ember_formats::{GgufFile, GgufWriter, MetaValue};
use ember_quant::GgmlType;

use crate::util::{dequantize_tensor, quantize_tensor, write_gguf_atomic};
use crate::{ConvertError, Progress};

/// The types Ember writes: `f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`,
/// `q2_K` .. `q6_K`.
pub const TARGET_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// A target type by name, case-insensitive (`q4_k`, `Q4_K`, `f16`, ...).
pub fn parse_type(name: &str) -> Result<GgmlType, ConvertError> {
    TARGET_TYPES
        .iter()
        .copied()
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| ConvertError::UnknownTypeName(name.to_string()))
}

/// `general.file_type` (llama.cpp's `llama_ftype`) for a file whose main type is `ty`. The
/// k-quant types map to the `_S` mixture ids (`q3_K` -> `MOSTLY_Q3_K_S` = 11, `q4_K` -> 14,
/// `q5_K` -> 16), since the per-layer `_M`/`_L` mixtures are not applied here.
pub fn file_type_for(ty: GgmlType) -> Result<u32, ConvertError> {
    use GgmlType::*;
    Ok(match ty {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q8_0 => 7,
        Q5_0 => 8,
        Q5_1 => 9,
        Q2_K => 10,
        Q3_K => 11,
        Q4_K => 14,
        Q5_K => 16,
        Q6_K => 18,
        BF16 => 32,
        other => return Err(ConvertError::UnsupportedType(other)),
    })
}

/// Options of [`requantize_gguf`] and [`crate::hf_to_gguf`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// The main type (one of [`TARGET_TYPES`]).
    pub ty: GgmlType,
    /// Leave `output.weight` in its source type (llama-quantize `--leave-output-tensor`).
    pub keep_output: bool,
    /// Leave `token_embd.weight` in its source type (llama-quantize `--token-embedding-type`
    /// set to the source type).
    pub keep_embeddings: bool,
}

impl QuantizeOptions {
    /// Plain options for type `ty`.
    pub fn new(ty: GgmlType) -> QuantizeOptions {
        QuantizeOptions {
            ty,
            keep_output: false,
            keep_embeddings: false,
        }
    }
}

fn is_quantized(ty: GgmlType) -> bool {
    ty.block_size() > 1
}

/// llama-quantize's `tensor_allows_quantization` for the tensors of the supported
/// architectures: 2-D (or more) tensors whose name ends in `weight`, not a norm, not
/// positional or token-type embeddings.
fn allows_quantization(name: &str, dims: &[u64]) -> bool {
    // ggml_n_dims: trailing dimensions of 1 do not count.
    let n_dims = dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1);
    n_dims >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

/// The type llama-quantize gives tensor `name` (ggml `dims`, stored as `src`) for the options,
/// without importance matrix and without the per-layer `_M`/`_L` mixture rules:
///
/// * tensors that may not be quantized (1-D tensors: norms, biases; see
///   `tensor_allows_quantization`) keep `src`; so do `output.weight` with `keep_output` and
///   `token_embd.weight` with `keep_embeddings`;
/// * for a quantized target, `output.weight` (or `token_embd.weight` when there is no
///   `output.weight`: tied embeddings) becomes Q8_0 if its rows are not whole blocks of the
///   target, else Q6_K unless the target is Q8_0 (llama.cpp `llama_tensor_get_type_impl`);
/// * a row length that is not whole blocks falls back as `tensor_type_fallback` does: Q2_K and
///   Q3_K to Q4_0, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0, and to F16 when even that does not
///   divide the rows (these are exactly llama.cpp's fallbacks for the types Ember writes; the
///   IQ types that fall back to IQ4_NL are not targets here).
pub fn target_type(
    name: &str,
    dims: &[u64],
    src: GgmlType,
    opts: &QuantizeOptions,
    has_output: bool,
) -> GgmlType {
    if !allows_quantization(name, dims)
        || (opts.keep_output && name == "output.weight")
        || (opts.keep_embeddings && name == "token_embd.weight")
    {
        return src;
    }
    let mut ty = opts.ty;
    if !is_quantized(ty) {
        return ty;
    }
    let nx = dims.first().copied().unwrap_or(0);
    let divides = |t: GgmlType| nx.is_multiple_of(t.block_size() as u64);
    if name == "output.weight" || (!has_output && name == "token_embd.weight") {
        if !divides(ty) {
            ty = GgmlType::Q8_0;
        } else if ty != GgmlType::Q8_0 {
            ty = GgmlType::Q6_K;
        }
    }
    if !divides(ty) {
        ty = match ty {
            GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            other => other,
        };
        if !divides(ty) {
            ty = GgmlType::F16;
        }
    }
    ty
}

pub(crate) fn check_target(ty: GgmlType) -> Result<(), ConvertError> {
    if TARGET_TYPES.contains(&ty) {
        Ok(())
    } else {
        Err(ConvertError::UnsupportedType(ty))
    }
}

/// Converts one tensor given as f32 or as bytes of `src` to `dst`.
pub(crate) enum TensorSource<'a> {
    /// Already-encoded bytes of this type.
    Bytes(GgmlType, &'a [u8]),
    /// f32 values.
    F32(Vec<f32>),
}

pub(crate) fn encode_tensor(
    name: &str,
    src: TensorSource<'_>,
    n_elements: u64,
    dst: GgmlType,
) -> Result<Vec<u8>, ConvertError> {
    match src {
        TensorSource::Bytes(ty, bytes) if ty == dst => Ok(bytes.to_vec()),
        TensorSource::Bytes(ty, bytes) => {
            let f = dequantize_tensor(name, ty, bytes, n_elements)?;
            quantize_tensor(name, dst, &f)
        }
        TensorSource::F32(f) => quantize_tensor(name, dst, &f),
    }
}

/// Requantizes a GGUF file to `opts.ty` and writes it to `output` (through a temporary file
/// renamed at the end), as llama-quantize does without an importance matrix: every tensor's
/// type comes from [`target_type`]; a tensor already of its target type is copied, any other
/// is dequantized (bit-exact with ggml) and quantized with ggml's reference quantizer. The
/// metadata is copied in order with `general.file_type` set ([`file_type_for`]) and
/// `general.quantization_version` = 2.
///
/// `progress` is called after each tensor.
pub fn requantize_gguf(
    input: &GgufFile,
    output: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), ConvertError> {
    check_target(opts.ty)?;
    let mut w = GgufWriter::new();
    for (k, v) in input.metadata() {
        w.add(k.clone(), v.clone());
    }
    w.add("general.file_type", MetaValue::U32(file_type_for(opts.ty)?));
    w.add("general.quantization_version", MetaValue::U32(2));
    let has_output = input.tensor("output.weight").is_some();
    let total = input.tensors().len();
    for (i, t) in input.tensors().iter().enumerate() {
        let dst = target_type(&t.name, &t.dims, t.ggml_type, opts, has_output);
        let data = encode_tensor(
            &t.name,
            TensorSource::Bytes(t.ggml_type, input.tensor_data(t)),
            t.n_elements(),
            dst,
        )?;
        w.add_tensor(t.name.clone(), &t.dims, dst, data)?;
        progress(Progress {
            done: i + 1,
            total,
            tensor: &t.name,
        });
    }
    write_gguf_atomic(&w, output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlType::*;

    #[test]
    fn llama_quantize_type_rules() {
        let o = QuantizeOptions::new(Q4_K);
        // SmolLM2: rows of 576 are not whole 256-blocks.
        assert_eq!(
            target_type("blk.0.attn_q.weight", &[576, 576], Q4_1, &o, false),
            Q5_0
        );
        assert_eq!(
            target_type("blk.0.ffn_down.weight", &[1536, 576], Q4_1, &o, false),
            Q4_K
        );
        assert_eq!(
            target_type("blk.0.attn_norm.weight", &[576], F32, &o, false),
            F32
        );
        // Tied embeddings are the output: Q6_K, which falls back to Q8_0 for 576.
        assert_eq!(
            target_type("token_embd.weight", &[576, 49152], Q8_0, &o, false),
            Q8_0
        );
        assert_eq!(
            target_type("token_embd.weight", &[1024, 49152], F16, &o, false),
            Q6_K
        );
        assert_eq!(
            target_type("token_embd.weight", &[1024, 49152], F16, &o, true),
            Q4_K
        );
        assert_eq!(
            target_type("output.weight", &[1024, 49152], F16, &o, true),
            Q6_K
        );
        // Q4_1 target on 576 rows: output rule picks Q6_K, which falls back to Q8_0 (as the
        // real SmolLM2 Q4_1 file has).
        let o41 = QuantizeOptions::new(Q4_1);
        assert_eq!(
            target_type("token_embd.weight", &[576, 49152], F16, &o41, false),
            Q8_0
        );
        let keep = QuantizeOptions {
            keep_output: true,
            keep_embeddings: true,
            ..QuantizeOptions::new(Q4_0)
        };
        assert_eq!(
            target_type("output.weight", &[1024, 8], BF16, &keep, true),
            BF16
        );
        assert_eq!(
            target_type("token_embd.weight", &[1024, 8], F16, &keep, true),
            F16
        );
        let q8 = QuantizeOptions::new(Q8_0);
        assert_eq!(
            target_type("output.weight", &[1024, 8], F16, &q8, true),
            Q8_0
        );
        // Rows that are not even 32-blocks end as F16.
        assert_eq!(
            target_type("blk.0.attn_q.weight", &[48, 8], F32, &o, true),
            F16
        );
        assert_eq!(
            target_type("blk.0.attn_q.weight", &[48, 8], F32, &q8, true),
            F16
        );
        assert_eq!(
            target_type(
                "blk.0.attn_q.weight",
                &[48, 8],
                Q8_0,
                &QuantizeOptions::new(F32),
                true
            ),
            F32
        );
        for (t, f) in [(Q2_K, Q4_0), (Q3_K, Q4_0), (Q5_K, Q5_1), (Q6_K, Q8_0)] {
            let o = QuantizeOptions::new(t);
            assert_eq!(
                target_type("blk.1.ffn_up.weight", &[576, 8], F32, &o, true),
                f
            );
        }
    }

    #[test]
    fn names_and_file_types() {
        assert_eq!(parse_type("Q4_K").unwrap(), Q4_K);
        assert_eq!(parse_type("q6_k").unwrap(), Q6_K);
        assert_eq!(parse_type("bf16").unwrap(), BF16);
        assert!(matches!(
            parse_type("iq4_nl"),
            Err(ConvertError::UnknownTypeName(_))
        ));
        assert_eq!(file_type_for(Q4_1).unwrap(), 3);
        assert_eq!(file_type_for(BF16).unwrap(), 32);
        for t in TARGET_TYPES {
            file_type_for(*t).unwrap();
        }
        assert!(file_type_for(IQ4_NL).is_err());
    }
}
