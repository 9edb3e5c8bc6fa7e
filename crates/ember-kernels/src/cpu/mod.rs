//! Plain-Rust CPU kernels (no burn types): quantized activations and integer dot products.

pub mod attention;
pub mod fused;
pub mod paged_attention;
pub mod q8;

use rayon::prelude::*;

use crate::QuantMatrix;

/// Weight rows per parallel task: enough work to amortize scheduling, small enough that two
/// threads split even the narrowest layer (192 rows) evenly.
const ROWS_PER_TASK: usize = 16;

/// Output rows per task of the final transpose.
const TRANSPOSE_ROWS: usize = 8;

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
            let row_bytes = k / q8::BLOCK * ty.type_size();
            let bytes = w.bytes();
            if m == 1 {
                // Decode: dot straight from the packed blocks, nothing to amortize an unpack.
                let acts = q8::quantize_acts(x, k, fmt);
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
            // Batched: each task unpacks a tile of weight rows once and multiplies it with
            // every activation row, writing `[m, tile rows]`; the tiles are then laid side by
            // side into `[m, n]`.
            let with_min = fmt == q8::ActFormat::Q8_1;
            let batch = q8::prepare_batch(x, k, m, fmt);
            let mut tiles = out_t;
            tiles
                .par_chunks_mut(m * q8::TILE_ROWS)
                .enumerate()
                .for_each_init(q8::Tile::default, |tile, (t, dst)| {
                    let start = t * q8::TILE_ROWS * row_bytes;
                    tile.load(
                        ty,
                        &bytes[start..start + dst.len() / m * row_bytes],
                        row_bytes,
                    );
                    q8::tile_matmul(tile, &batch, with_min, dst);
                });
            let mut out = vec![0.0f32; m * n];
            out.par_chunks_mut(n * TRANSPOSE_ROWS)
                .enumerate()
                .for_each(|(band, dst)| {
                    let i0 = band * TRANSPOSE_ROWS;
                    for (t, tile) in tiles.chunks(m * q8::TILE_ROWS).enumerate() {
                        let rows = tile.len() / m;
                        let j0 = t * q8::TILE_ROWS;
                        for (r, o) in dst.chunks_exact_mut(n).enumerate() {
                            let i = i0 + r;
                            o[j0..j0 + rows].copy_from_slice(&tile[i * rows..(i + 1) * rows]);
                        }
                    }
                });
            return out;
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
    // Transpose `[n, m]` to `[m, n]`, a band of output rows per task: each task reads
    // `TRANSPOSE_ROWS` consecutive values of every `out_t` row.
    let mut out = vec![0.0f32; m * n];
    out.par_chunks_mut(TRANSPOSE_ROWS * n)
        .enumerate()
        .for_each(|(band, dst)| {
            let i0 = band * TRANSPOSE_ROWS;
            let rows = dst.len() / n;
            for (j, col) in out_t.chunks_exact(m).enumerate() {
                for (r, &v) in col[i0..i0 + rows].iter().enumerate() {
                    dst[r * n + j] = v;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_quant::GgmlType;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// The batched path (tiles, then laid side by side) gives every output exactly the
    /// scalar `unpack_row` + `dot` value, partial last tile included.
    #[test]
    fn batched_matmul_matches_row_dots_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(3);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
        ] {
            for (m, n, k) in [(2, 40, 64), (5, 16, 576), (17, 37, 96), (8, 3, 32)] {
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
                let w = QuantMatrix::quantize(ty, n, k, &wf).unwrap();
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0f32)).collect();
                let got = quant_matmul_rows(&w, &x, m);
                let fmt = q8::act_format(ty).unwrap();
                let acts = q8::quantize_acts_with(q8::Isa::Scalar, &x, k, fmt);
                let mut un = q8::UnpackedRow::default();
                for j in 0..n {
                    q8::unpack_row_with(q8::Isa::Scalar, ty, w.row(j), &mut un);
                    for i in 0..m {
                        let want = q8::dot_with(
                            q8::Isa::Scalar,
                            &un,
                            &acts,
                            i,
                            fmt == q8::ActFormat::Q8_1,
                        );
                        assert_eq!(
                            got[i * n + j].to_bits(),
                            want.to_bits(),
                            "{ty} m={m} n={n} k={k} ({i}, {j})"
                        );
                    }
                }
            }
        }
    }
}
