//! The CubeCL kernels behind [`super`]'s ops.

use cubecl::prelude::*;

use super::blocks::{chunk_dot, chunk_values, round_f32_to_f16};

/// The cube's index in a [`super::grid`].
#[cube]
pub(super) fn cube_index() -> usize {
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

/// Rotary embedding of `x: [rows, heads, d]`, one thread per value: the first `rope_dim` values
/// of each head rotate by the row's angles (`cos`, `sin`: `[rows, rope_dim / 2]`, ggml's f32
/// recurrence computed on the host, where the trigonometry is glibc's), in pairs `(2i, 2i + 1)`
/// or, `neox`, `(i, i + rope_dim / 2)`; the rest pass through.
#[cube(launch_unchecked)]
// `is_multiple_of` has no CubeCL expansion.
#[allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)]
pub(crate) fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    out: &mut [f32],
    n: usize,
    heads: usize,
    d: usize,
    rope_dim: usize,
    #[comptime] neox: bool,
) {
    let g = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if g >= n {
        terminate!();
    }
    let e = g % d;
    if e >= rope_dim {
        out[g] = x[g];
    } else {
        let half = rope_dim / 2;
        let head = g - e;
        let row = g / (d * heads);
        // Pair `i`: its two values at `head + a` and `head + b`; this thread writes the first
        // or the second.
        let i = if neox { e % half } else { e / 2 };
        let first = if neox { e < half } else { e % 2 == 0 };
        let a = if neox { i } else { 2 * i };
        let b = if neox { i + half } else { 2 * i + 1 };
        let (x0, x1) = (x[head + a], x[head + b]);
        let c = cos[row * half + i];
        let s = sin[row * half + i];
        out[g] = if first {
            x0 * c - x1 * s
        } else {
            x0 * s + x1 * c
        };
    }
}

/// `out = silu(gate) * up` element-wise (`silu(x) = x / (1 + e^-x)`, as ggml).
#[cube(launch_unchecked)]
pub(crate) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32], n: usize) {
    let i = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < n {
        let g = gate[i];
        out[i] = g / (1.0f32 + f32::exp(0.0f32 - g)) * up[i];
    }
}

/// `out = gelu(gate) * up` element-wise: ggml's tanh approximation, 0 below -10 and the
/// identity above 10 as its CPU kernel (which also rounds through an f16 table; this does not).
#[cube(launch_unchecked)]
pub(crate) fn geglu(gate: &[f32], up: &[f32], out: &mut [f32], n: usize) {
    let i = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < n {
        let g = gate[i];
        let gelu = if g > 10.0f32 {
            g
        } else if g < -10.0f32 {
            0.0f32
        } else {
            let inner = 1.0f32 + 0.044715f32 * g * g;
            0.5f32 * g * (1.0f32 + f32::tanh(0.797_884_6f32 * g * inner))
        };
        out[i] = gelu * up[i];
    }
}

/// `out = a + b` element-wise.
#[cube(launch_unchecked)]
pub(crate) fn add(a: &[f32], b: &[f32], out: &mut [f32], n: usize) {
    let i = cube_index() * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if i < n {
        out[i] = a[i] + b[i];
    }
}
