//! The CubeCL kernels behind [`super`]'s ops.

use cubecl::prelude::*;

use super::blocks::{chunk_dot, chunk_values, round_f32_to_f16};

/// The cube's index in a [`super::grid`].
#[cube]
fn cube_index() -> usize {
    CUBE_POS_X as usize + CUBE_POS_Y as usize * CUBE_COUNT_X as usize
}

/// The sum of every thread's `value`, in every thread: a tree sum in `partial` (one slot per
/// thread; the cube's size a power of two). Every thread of the cube must call it.
#[cube]
fn cube_sum(partial: &mut [f32], value: f32) -> f32 {
    let tid = UNIT_POS_X as usize;
    partial[tid] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if tid < stride {
            partial[tid] += partial[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = partial[0];
    // Nobody writes `partial` again until everyone has read the total.
    sync_cube();
    total
}

/// `out[r, col0 + row] = x[r, :] . w[row, :]` for every `r < m` (`out` is `out_cols` wide; `w`
/// holds `rows` weight rows, one part of a weight split across buffers): one cube per weight
/// row, its threads taking the row's 32-value chunks in turn, then summing across the cube.
#[cube(launch_unchecked)]
pub(crate) fn quant_matmul(
    w: &[u32],
    x: &[f32],
    out: &mut [f32],
    rows: usize,
    out_cols: usize,
    col0: usize,
    cols: usize,
    m: usize,
    row_bytes: usize,
    #[comptime] layout: u32,
    #[comptime] block_bytes: usize,
    #[comptime] chunks_per_block: usize,
    #[comptime] threads: u32,
) {
    let row = cube_index();
    if row >= rows {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let chunks = cols / 32;
    let mut partial = Shared::new_slice(threads as usize);
    let threads = CUBE_DIM_X as usize;
    for r in 0..m {
        let mut acc = 0.0f32;
        let mut c = tid;
        while c < chunks {
            let base = row * row_bytes + (c / chunks_per_block) * block_bytes;
            acc += chunk_dot(w, base, c % chunks_per_block, x, r * cols + c * 32, layout);
            c += threads;
        }
        let total = cube_sum(&mut partial, acc);
        if tid == 0 {
            out[r * out_cols + col0 + row] = total;
        }
    }
}

/// Every value rounded to the nearest f16, kept as f32.
#[cube(launch_unchecked)]
pub(crate) fn round_to_f16(x: &[f32], out: &mut [f32], n: usize) {
    let i = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < n {
        out[i] = round_f32_to_f16(x[i]);
    }
}

/// `out[r] = x[r] * w / sqrt(mean(x[r]^2) + eps)`: one cube per row.
#[cube(launch_unchecked)]
pub(crate) fn rms_norm(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    rows: usize,
    d: usize,
    eps: f32,
    #[comptime] threads: u32,
) {
    let row = cube_index();
    if row >= rows {
        terminate!();
    }
    let tid = UNIT_POS_X as usize;
    let base = row * d;
    let mut partial = Shared::new_slice(threads as usize);
    let threads = CUBE_DIM_X as usize;
    let mut acc = 0.0f32;
    let mut i = tid;
    while i < d {
        let v = x[base + i];
        acc += v * v;
        i += threads;
    }
    let total = cube_sum(&mut partial, acc);
    let scale = 1.0f32 / f32::sqrt(total / f32::cast_from(d) + eps);
    let mut j = tid;
    while j < d {
        out[base + j] = x[base + j] * scale * w[j];
        j += threads;
    }
}

/// Rows `first..first + n_rows` of a weight as f32, row-major in `out`: one thread per 32-value
/// chunk.
#[cube(launch_unchecked)]
pub(crate) fn dequantize_rows(
    w: &[u32],
    out: &mut [f32],
    first: usize,
    n_rows: usize,
    cols: usize,
    row_bytes: usize,
    #[comptime] layout: u32,
    #[comptime] block_bytes: usize,
    #[comptime] chunks_per_block: usize,
) {
    let g = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let chunks = cols / 32;
    if g >= n_rows * chunks {
        terminate!();
    }
    let (r, c) = (g / chunks, g % chunks);
    let base = (first + r) * row_bytes + (c / chunks_per_block) * block_bytes;
    chunk_values(
        w,
        base,
        c % chunks_per_block,
        out,
        r * cols + c * 32,
        layout,
    );
}
