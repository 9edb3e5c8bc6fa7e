//! Plain-Rust CPU kernels (no burn types): quantized activations and integer dot products.

pub mod attention;
pub mod q8;

use rayon::prelude::*;

use crate::QuantMatrix;

/// Weight rows per parallel task: enough work to amortize scheduling, small enough that two
/// threads split even the narrowest layer (192 rows) evenly.
const ROWS_PER_TASK: usize = 16;

/// `x @ w^T` for row-major `x: [m, w.cols()]`, returning `[m, w.rows()]`.
///
/// Types with an integer path quantize `x` to 8 bits first, as llama.cpp does; others take
/// f32 dot products straight off the blocks. Each task owns whole weight rows, so every
/// weight byte is read from memory once per call, whatever `m` is.
pub fn quant_matmul_rows(w: &QuantMatrix, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    debug_assert_eq!(x.len(), m * k);
    let ty = w.ggml_type();
    let mut out_t = vec![0.0f32; n * m];
    match q8::act_format(ty) {
        Some(fmt) => {
            let acts = q8::quantize_acts(x, k, fmt);
            if m == 1 {
                // Decode: dot straight from the packed blocks, nothing to amortize an unpack.
                let row_bytes = k / q8::BLOCK * ty.type_size();
                let bytes = w.bytes();
                out_t
                    .par_chunks_mut(ROWS_PER_TASK)
                    .enumerate()
                    .for_each(|(task, dst)| {
                        let start = task * ROWS_PER_TASK * row_bytes;
                        let rows = &bytes[start..start + dst.len() * row_bytes];
                        q8::dot_packed_rows(ty, rows, &acts, 0, dst);
                    });
                return out_t;
            }
            let with_min = fmt == q8::ActFormat::Q8_1;
            out_t
                .par_chunks_mut(m * ROWS_PER_TASK)
                .enumerate()
                .for_each_init(q8::UnpackedRow::default, |row, (task, dst)| {
                    for (jj, dst_row) in dst.chunks_mut(m).enumerate() {
                        q8::unpack_row(ty, w.row(task * ROWS_PER_TASK + jj), row);
                        for (i, d) in dst_row.iter_mut().enumerate() {
                            *d = q8::dot(row, &acts, i, with_min);
                        }
                    }
                });
        }
        None => {
            out_t
                .par_chunks_mut(m * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(task, dst)| {
                    for (jj, dst_row) in dst.chunks_mut(m).enumerate() {
                        let row = w.row(task * ROWS_PER_TASK + jj);
                        for (i, d) in dst_row.iter_mut().enumerate() {
                            *d = ember_quant::dot_row(ty, row, &x[i * k..(i + 1) * k]);
                        }
                    }
                });
        }
    }
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0.0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}
