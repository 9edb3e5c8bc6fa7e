//! Shared helpers: temporary output files, tensor (de)quantization, dtype conversion and the
//! llama Q/K row permutation.

use std::path::{Path, PathBuf};

use ember_formats::GgufWriter;
use ember_formats::safetensors::StDtype;
use ember_quant::GgmlType;
use ember_quant::convert::{
    bf16_bytes_to_f32, f16_bytes_to_f32, f32_to_bf16_bytes, f32_to_f16_bytes,
};

use crate::ConvertError;

/// `dir/.name.tmp-<pid>`: the temporary sibling of `path`.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".to_string());
    let tmp = format!(".{name}.tmp-{}", std::process::id());
    match path.parent() {
        Some(p) => p.join(tmp),
        None => PathBuf::from(tmp),
    }
}

/// Writes `w` to a temporary sibling of `path`, then renames it over `path`: a failed or
/// interrupted conversion never leaves a half file under the final name.
pub(crate) fn write_gguf_atomic(w: &GgufWriter, path: &Path) -> Result<(), ConvertError> {
    let tmp = temp_path(path);
    if let Err(e) = w.write_file(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ConvertError::io(path, e)
    })
}

/// Writes JSON text (pretty, trailing newline) to `path` through a temporary file.
pub(crate) fn write_json_atomic(path: &Path, v: &serde_json::Value) -> Result<(), ConvertError> {
    let mut text = serde_json::to_string_pretty(v).map_err(|source| ConvertError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_bytes_atomic(path, text.as_bytes())
}

/// Writes bytes to `path` through a temporary file.
pub(crate) fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), ConvertError> {
    let tmp = temp_path(path);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ConvertError::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ConvertError::io(path, e)
    })
}

/// Dequantizes one tensor's bytes (`n_elements` elements of `ty`) to f32.
pub(crate) fn dequantize_tensor(
    name: &str,
    ty: GgmlType,
    data: &[u8],
    n_elements: u64,
) -> Result<Vec<f32>, ConvertError> {
    // The size the element count implies must be the data's size before anything is allocated.
    let expected = ty
        .bytes_for(n_elements)
        .ok_or_else(|| ConvertError::bad_tensor(name, "element count is not whole blocks"))?;
    if expected != data.len() as u64 {
        return Err(ConvertError::bad_tensor(
            name,
            format!("{} bytes of {ty} data, expected {expected}", data.len()),
        ));
    }
    let n = usize::try_from(n_elements)
        .map_err(|_| ConvertError::bad_tensor(name, "too many elements"))?;
    let mut out = vec![0f32; n];
    ember_quant::dequantize(ty, data, &mut out).map_err(|source| ConvertError::Quant {
        tensor: name.to_string(),
        source,
    })?;
    Ok(out)
}

/// Quantizes f32 values to `ty`.
pub(crate) fn quantize_tensor(
    name: &str,
    ty: GgmlType,
    data: &[f32],
) -> Result<Vec<u8>, ConvertError> {
    ember_quant::quantize(ty, data).map_err(|source| ConvertError::Quant {
        tensor: name.to_string(),
        source,
    })
}

/// f32 values as the bytes of a safetensors dtype (F32, F16 or BF16).
pub(crate) fn f32_to_st_bytes(data: &[f32], dtype: StDtype) -> Result<Vec<u8>, ConvertError> {
    Ok(match dtype {
        StDtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StDtype::F16 => data.iter().flat_map(|&v| f32_to_f16_bytes(v)).collect(),
        StDtype::BF16 => data.iter().flat_map(|&v| f32_to_bf16_bytes(v)).collect(),
        other => return Err(ConvertError::UnsupportedDtype(other.name().to_string())),
    })
}

/// The bytes of a safetensors F32/F16/BF16 tensor as f32 (exact).
pub(crate) fn st_bytes_to_f32(
    name: &str,
    data: &[u8],
    dtype: StDtype,
    n_elements: usize,
) -> Result<Vec<f32>, ConvertError> {
    let width = match dtype {
        StDtype::F32 => 4,
        StDtype::F16 | StDtype::BF16 => 2,
        other => return Err(ConvertError::UnsupportedDtype(other.name().to_string())),
    };
    if n_elements.checked_mul(width) != Some(data.len()) {
        return Err(ConvertError::bad_tensor(
            name,
            format!(
                "{} bytes of {} data for {n_elements} elements",
                data.len(),
                dtype.name()
            ),
        ));
    }
    Ok(match dtype {
        StDtype::F32 => data
            .as_chunks::<4>()
            .0
            .iter()
            .map(|b| f32::from_le_bytes(*b))
            .collect(),
        StDtype::F16 => data
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| f16_bytes_to_f32(*b))
            .collect(),
        _ => data
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| bf16_bytes_to_f32(*b))
            .collect(),
    })
}

/// Which way [`permute_rows`] moves rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// HF (rotate-half) to GGUF (interleaved): GGUF row `2i+j` = HF row `j·d+i`.
    HfToGguf,
    /// GGUF to HF: HF row `j·d+i` = GGUF row `2i+j`.
    GgufToHf,
}

/// llama.cpp's `LlamaModel.permute` of the rows of a Q or K projection (weight `[n_head·hd, K]`
/// as `row_len = K`, or bias with `row_len = 1`), or its inverse, per head with `d = hd/2`.
pub(crate) fn permute_rows(
    name: &str,
    data: &[f32],
    row_len: usize,
    n_head: usize,
    dir: Direction,
) -> Result<Vec<f32>, ConvertError> {
    let bad = |why: &str| ConvertError::bad_tensor(name, why.to_string());
    if row_len == 0 || n_head == 0 || !data.len().is_multiple_of(row_len) {
        return Err(bad("cannot split into rows for the Q/K permutation"));
    }
    let n_rows = data.len() / row_len;
    if !n_rows.is_multiple_of(n_head) || !(n_rows / n_head).is_multiple_of(2) {
        return Err(bad(
            "row count is not a multiple of 2 x head count (Q/K permutation)",
        ));
    }
    let hd = n_rows / n_head;
    let d = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..d {
            for j in 0..2 {
                let gguf_row = h * hd + 2 * i + j;
                let hf_row = h * hd + j * d + i;
                let (src, dst) = match dir {
                    Direction::HfToGguf => (hf_row, gguf_row),
                    Direction::GgufToHf => (gguf_row, hf_row),
                };
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    Ok(out)
}

/// An f32 as a JSON number with the shortest decimal that reads back as the same f32.
pub(crate) fn f32_json(v: f32) -> serde_json::Value {
    let shortest: f64 = v.to_string().parse().unwrap_or(f64::from(v));
    serde_json::Number::from_f64(shortest)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_llama_cpp_and_inverts() {
        // One head, hd = 4 (d = 2), rows of length 1: HF rows [0,1,2,3] -> GGUF [0,2,1,3].
        let hf = [0.0, 1.0, 2.0, 3.0];
        let g = permute_rows("t", &hf, 1, 1, Direction::HfToGguf).unwrap();
        assert_eq!(g, [0.0, 2.0, 1.0, 3.0]);
        let back = permute_rows("t", &g, 1, 1, Direction::GgufToHf).unwrap();
        assert_eq!(back, hf);
        // Two heads, hd = 6, rows of length 2.
        let hf: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let g = permute_rows("t", &hf, 2, 2, Direction::HfToGguf).unwrap();
        // Head 0 HF rows 0..6 -> GGUF order [0,3,1,4,2,5].
        let rows: Vec<f32> = g.chunks(2).map(|r| r[0] / 2.0).collect();
        assert_eq!(rows, [0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
        assert_eq!(
            permute_rows("t", &g, 2, 2, Direction::GgufToHf).unwrap(),
            hf
        );
        assert!(permute_rows("t", &hf, 2, 5, Direction::HfToGguf).is_err());
    }

    #[test]
    fn f32_json_is_shortest() {
        assert_eq!(f32_json(1e-5f32).as_f64(), Some(1e-5));
        assert_eq!(f32_json(100000.0).to_string(), "100000.0");
        let v = f32_json(f32::from_bits(0x3727_c5ac)).as_f64().unwrap() as f32;
        assert_eq!(v, 1e-5f32);
    }
}
