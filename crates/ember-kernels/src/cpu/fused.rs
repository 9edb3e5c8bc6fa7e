//! Fused element-wise kernels for the non-matmul parts of a transformer block: one pass over
//! host slices instead of a chain of burn ops, each allocating and dispatching.

use rayon::prelude::*;

use crate::ops::RopeScaling;

/// Rows at which the row-wise kernels split across threads; below this a call is decode-sized
/// and the scheduling costs more than the work.
const PAR_MIN_ROWS: usize = 32;
/// Element count at which the element-wise kernels split across threads.
const PAR_MIN_ELEMS: usize = 1 << 16;

/// `x * w / sqrt(mean(x^2) + eps)` per row of row-major `x: [n, d]`, `w: [d]`.
///
/// As ggml: the squares are summed in f64, the scale is `1 / sqrtf(mean + eps)` in f32, and
/// the normalized row is multiplied by the weight afterwards.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms_norm: shape mismatch"
    );
    let mut out = vec![0.0f32; x.len()];
    let row = |(xr, yr): (&[f32], &mut [f32])| {
        let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / d as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((y, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *y = (v * scale) * g;
        }
    };
    if x.len() / d >= PAR_MIN_ROWS {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(row);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(row);
    }
    out
}

/// Cosines and sines for one position, `rope_dim / 2` each, with ggml's f32 recurrence
/// (`theta` starts at the position and is multiplied by `theta_scale` per pair), each pair's
/// angle scaled as `scaling` says (ggml's `ggml_rope_cache_init`).
fn rope_cache(
    pos: usize,
    theta_scale: f32,
    scaling: &RopeScaling,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let mut theta = pos as f32;
    for (i, (c, s)) in cos.iter_mut().zip(sin.iter_mut()).enumerate() {
        let t = scaling.angle(theta, i);
        *c = t.cos();
        *s = t.sin();
        theta *= theta_scale;
    }
}

/// Rotary embedding of row-major `x: [n, heads, head_dim]`, row `i` at `positions[i]`,
/// rotating the first `rope_dim` dimensions of every head and passing the rest through.
/// Normal mode rotates pairs `(2i, 2i + 1)`, neox mode `(i, i + rope_dim / 2)`; the angles
/// are scaled as `scaling` says.
#[allow(clippy::too_many_arguments)] // the op's parameters, as ggml_rope_ext takes them
pub fn rope(
    x: &[f32],
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    rope_dim: usize,
    base: f32,
    scaling: &RopeScaling,
    neox: bool,
) -> Vec<f32> {
    assert!(
        rope_dim <= head_dim && rope_dim.is_multiple_of(2),
        "rope: rope_dim must be even and at most head_dim"
    );
    assert!(
        scaling.fits(rope_dim),
        "rope: one frequency factor per rotated pair and a positive scale"
    );
    let stride = heads * head_dim;
    assert!(
        stride > 0 && x.len().is_multiple_of(stride),
        "rope: shape mismatch"
    );
    let half = rope_dim / 2;
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let mut out = x.to_vec();
    let pos_rows = |(i, row): (usize, &mut [f32])| {
        let mut cos = vec![0.0f32; half];
        let mut sin = vec![0.0f32; half];
        rope_cache(
            positions[i] as usize,
            theta_scale,
            scaling,
            &mut cos,
            &mut sin,
        );
        rope_row(row, head_dim, rope_dim, &cos, &sin, neox);
    };
    if x.len() / stride >= PAR_MIN_ROWS {
        out.par_chunks_mut(stride).enumerate().for_each(pos_rows);
    } else {
        out.chunks_mut(stride).enumerate().for_each(pos_rows);
    }
    out
}

/// Rotates every head of one row (the body of [`rope`]), compiled with FMA where the CPU has
/// it: `mul_add` is then one instruction instead of a libm call, with the same bits.
fn rope_row(
    row: &mut [f32],
    head_dim: usize,
    rope_dim: usize,
    cos: &[f32],
    sin: &[f32],
    neox: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has FMA (checked at run time).
        return unsafe { rope_row_fma(row, head_dim, rope_dim, cos, sin, neox) };
    }
    rope_row_body(row, head_dim, rope_dim, cos, sin, neox)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn rope_row_fma(
    row: &mut [f32],
    head_dim: usize,
    rope_dim: usize,
    cos: &[f32],
    sin: &[f32],
    neox: bool,
) {
    rope_row_body(row, head_dim, rope_dim, cos, sin, neox)
}

/// Whether this x86 CPU has FMA (cached by std's feature detection).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_fma() -> bool {
    is_x86_feature_detected!("fma")
}

#[inline(always)]
fn rope_row_body(
    row: &mut [f32],
    head_dim: usize,
    rope_dim: usize,
    cos: &[f32],
    sin: &[f32],
    neox: bool,
) {
    let half = rope_dim / 2;
    for head in row.chunks_mut(head_dim) {
        if neox {
            let (a, b) = head[..rope_dim].split_at_mut(half);
            // ggml's x86 build (scalar loop, GCC-contracted): the `x0` products fused.
            for (((x0, x1), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (v0, v1) = (*x0, *x1);
                *x0 = v0.mul_add(c, -(v1 * s));
                *x1 = v0.mul_add(s, v1 * c);
            }
        } else {
            // As ggml's x86 build computes it: GCC vectorizes 4 or 8 pairs at a time with
            // `fmaddsub(x0, [c, s], x1 * [s, c])`, so the products of `x0` are the fused
            // ones; its unrolled remainder of fewer than 4 pairs, and rows of at most 6 pairs,
            // multiply and add separately.
            let fused = if half <= 6 { 0 } else { half - half % 4 };
            for (p, ((pair, &c), &s)) in head[..rope_dim]
                .chunks_exact_mut(2)
                .zip(cos)
                .zip(sin)
                .enumerate()
            {
                let (v0, v1) = (pair[0], pair[1]);
                if p < fused {
                    pair[0] = v0.mul_add(c, -(v1 * s));
                    pair[1] = v0.mul_add(s, v1 * c);
                } else {
                    pair[0] = v0 * c - v1 * s;
                    pair[1] = v1 * c + v0 * s;
                }
            }
        }
    }
}

/// `0x1.8p23`: adding it rounds an f32 of magnitude below 2^22 to an integer.
const EXPF_SHIFT: f32 = f32::from_bits(0x4b40_0000);
/// `0x1.715476p+0` = 1 / ln 2.
const EXPF_INV_LN2: f32 = f32::from_bits(0x3fb8_aa3b);
/// ln 2 in two parts, `0x1.62e4p-1` + `0x1.7f7d1cp-20`.
const EXPF_LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const EXPF_LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// The polynomial's coefficients, highest first: `0x1.0e4020p-7`, `0x1.573e2ep-5`,
/// `0x1.555e66p-3`, `0x1.fffdb6p-2`, `0x1.ffffecp-1`.
const EXPF_POLY: [f32; 5] = [
    f32::from_bits(0x3c07_2010),
    f32::from_bits(0x3d2b_9f17),
    f32::from_bits(0x3e2a_af33),
    f32::from_bits(0x3eff_fedb),
    f32::from_bits(0x3f7f_fff6),
];

/// `e^x` as ggml's AVX-512 `ggml_v_expf` computes it (ARM's optimized-routines polynomial,
/// at most 1.45 ulp from the true value): `2^n * p(b)` with `n = round(x / ln 2)` and the
/// reduced argument `b` taken in two FMA steps. Written out in scalar FMAs so every target
/// gives the bits llama.cpp's reference build gives.
#[inline(always)]
pub fn ggml_expf(x: f32) -> f32 {
    let r = EXPF_SHIFT;
    let z = x.mul_add(EXPF_INV_LN2, r);
    let n = z - r;
    let b = (-n).mul_add(EXPF_LN2_LO, (-n).mul_add(EXPF_LN2_HI, x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let [c5, c4, c3, c2, c1] = EXPF_POLY;
    let j = c5
        .mul_add(b, c4)
        .mul_add(u, c3.mul_add(b, c2))
        .mul_add(u, c1.mul_add(b, 1.0));
    scale_by_pow2(j, n as i32)
}

/// `j * 2^n` rounded once, as `_mm512_scalef_ps` does for an integral `n` in `-192..=192` and
/// the `j` here (within a factor 2 of 1): the first product is exact, the second rounds.
#[inline(always)]
fn scale_by_pow2(j: f32, n: i32) -> f32 {
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    if n > 127 {
        j * pow2(100) * pow2(n - 100)
    } else if n >= -126 {
        j * pow2(n)
    } else {
        j * pow2(-100) * pow2(n + 100)
    }
}

/// `silu(x) = x / (1 + e^-x)` with [`ggml_expf`], as ggml's vectorized SiLU.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + ggml_expf(0.0 - x))
}

/// `silu(gate) * up` element-wise, as ggml's CPU SwiGLU computes it (AVX-512 path).
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu: shape mismatch");
    gated(gate, up, swiglu_chunk)
}

/// `chunk(gate, up, out)` over 4096-element chunks, on every worker from [`PAR_MIN_ELEMS`]
/// elements: the gated activations' shared driver (`gate` and `up` of equal length).
fn gated(gate: &[f32], up: &[f32], chunk: fn(&[f32], &[f32], &mut [f32])) -> Vec<f32> {
    const CHUNK: usize = 4096;
    let mut out = vec![0.0f32; gate.len()];
    if gate.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK))
            .zip(up.par_chunks(CHUNK))
            .for_each(|((o, g), u)| chunk(g, u, o));
    } else {
        chunk(gate, up, &mut out);
    }
    out
}

/// [`swiglu`] over one chunk, with AVX-512 or FMA instructions where the CPU has them.
fn swiglu_chunk(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F (checked at run time).
        return unsafe { swiglu_chunk_avx512(g, u, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has FMA (checked at run time).
        return unsafe { swiglu_chunk_fma(g, u, out) };
    }
    swiglu_chunk_body(g, u, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
fn swiglu_chunk_fma(g: &[f32], u: &[f32], out: &mut [f32]) {
    swiglu_chunk_body(g, u, out)
}

/// [`swiglu_chunk_body`] sixteen lanes at a time: ggml's `ggml_v_expf` and `ggml_v_silu`
/// transcribed (the scalar [`ggml_expf`] emulates them, so the bits are the same, tested);
/// the scalar code, which the compiler does not vectorize, spent about 3 cycles an element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_chunk_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(g.len()).min(u.len());
    let body = n / 16 * 16;
    let c = _mm512_set1_ps;
    for i in (0..body).step_by(16) {
        // SAFETY: `i + 16 <= n`, within all three slices; unaligned loads and stores.
        unsafe {
            let x = _mm512_loadu_ps(g.as_ptr().add(i));
            let neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
            // ggml_v_expf(neg), as `ggml_expf` per lane.
            let r = c(EXPF_SHIFT);
            let z = _mm512_fmadd_ps(neg, c(EXPF_INV_LN2), r);
            let nn = _mm512_sub_ps(z, r);
            let b = _mm512_fnmadd_ps(
                nn,
                c(EXPF_LN2_LO),
                _mm512_fnmadd_ps(nn, c(EXPF_LN2_HI), neg),
            );
            let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(nn), c(192.0));
            let uu = _mm512_mul_ps(b, b);
            let [c5, c4, c3, c2, c1] = EXPF_POLY;
            let (c5, c4, c3, c2, c1) = (c(c5), c(c4), c(c3), c(c2), c(c1));
            let j = _mm512_fmadd_ps(
                _mm512_fmadd_ps(_mm512_fmadd_ps(c5, b, c4), uu, _mm512_fmadd_ps(c3, b, c2)),
                uu,
                _mm512_fmadd_ps(c1, b, c(1.0)),
            );
            let mut e = _mm512_scalef_ps(j, nn);
            if d != 0 {
                let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(nn, _mm512_setzero_ps());
                let alt = _mm512_mask_blend_ps(le, c(f32::INFINITY), _mm512_setzero_ps());
                e = _mm512_mask_blend_ps(d, e, alt);
            }
            let silu = _mm512_div_ps(x, _mm512_add_ps(c(1.0), e));
            let y = _mm512_mul_ps(silu, _mm512_loadu_ps(u.as_ptr().add(i)));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
        }
    }
    swiglu_chunk_body(&g[body..n], &u[body..n], &mut out[body..n]);
}

#[inline(always)]
fn swiglu_chunk_body(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = silu(g) * u;
    }
}

/// ggml's tanh-approximated GELU in f32: `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`.
pub fn gelu_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_COEF_A: f32 = 0.044715;
    // `1 + a*x*x` as GCC contracts it in ggml (one FMA): the table then equals ggml's entry
    // for entry (checked against its `ggml_table_gelu_f16`).
    let inner = (GELU_COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh())
}

/// GELU of every f16 value, rounded to f16: ggml's `ggml_table_gelu_f16`, which its CPU GELU
/// looks inputs up in (after rounding them to f16). Built once, 128 KiB.
fn gelu_table() -> &'static [half::f16] {
    static TABLE: std::sync::OnceLock<Vec<half::f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| half::f16::from_f32(gelu_f32(half::f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// `gelu(gate) * up` element-wise as ggml's CPU GEGLU computes it: 0 below -10, the identity
/// above 10, and in between the f16 table entry of `gate` rounded to f16.
pub fn geglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "geglu: shape mismatch");
    gated(gate, up, geglu_chunk)
}

/// [`geglu`] over one chunk, sixteen at a time where the CPU has AVX-512.
fn geglu_chunk(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX-512 F and F16C (checked at run time).
        return unsafe { geglu_chunk_avx512(g, u, out) };
    }
    geglu_chunk_body(g, u, out)
}

#[inline(always)]
fn geglu_chunk_body(g: &[f32], u: &[f32], out: &mut [f32]) {
    let table = gelu_table();
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = if g <= -10.0 {
            0.0
        } else if g >= 10.0 {
            g * u
        } else {
            table[half::f16::from_f32(g).to_bits() as usize].to_f32() * u
        };
    }
}

/// [`gelu_table`] widened to f32 (exact), for gathering sixteen entries at once.
fn gelu_table_f32() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| gelu_table().iter().map(|v| v.to_f32()).collect())
}

/// [`geglu_chunk_body`] sixteen lanes at a time: the gate rounded to f16 by `vcvtps2ph` (what
/// `half` itself runs on a CPU with F16C, so the same index, NaN included), the entry gathered
/// from the f32 table, the same product; the scalar code, one conversion call and one lookup
/// at a time, was 2.8% of Gemma 3's prompt processing.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
fn geglu_chunk_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let table = gelu_table_f32();
    assert_eq!(table.len(), 1 << 16, "one entry per f16");
    let n = out.len().min(g.len()).min(u.len());
    let body = n / 16 * 16;
    let (lo, hi) = (_mm512_set1_ps(-10.0), _mm512_set1_ps(10.0));
    for i in (0..body).step_by(16) {
        // SAFETY: `i + 16 <= n`, within all three slices (unaligned loads and stores); every
        // gathered index is a 16-bit value, inside the 65536-entry table.
        unsafe {
            let x = _mm512_loadu_ps(g.as_ptr().add(i));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            let idx = _mm512_cvtepu16_epi32(h);
            let t = _mm512_i32gather_ps::<4>(idx, table.as_ptr().cast());
            let high = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, hi);
            let low = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, lo);
            let y = _mm512_mul_ps(
                _mm512_mask_blend_ps(high, t, x),
                _mm512_loadu_ps(u.as_ptr().add(i)),
            );
            let y = _mm512_mask_blend_ps(low, y, _mm512_setzero_ps());
            _mm512_storeu_ps(out.as_mut_ptr().add(i), y);
        }
    }
    geglu_chunk_body(&g[body..n], &u[body..n], &mut out[body..n]);
}

/// `a + b` element-wise.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "add: shape mismatch");
    a.iter().zip(b).map(|(&x, &y)| x + y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 GEGLU gives the scalar code's bits: ordinary gates, the +-10 cut-offs and
    /// values next to them, zeros, infinities and NaN, ragged lengths.
    #[test]
    fn geglu_builds_agree() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(0x6e61);
        for len in [0usize, 1, 15, 16, 17, 2048, 4099] {
            let g: Vec<f32> = (0..len)
                .map(|i| match i % 9 {
                    0 => 10.0,
                    1 => -10.0,
                    2 => f32::from_bits(10.0f32.to_bits() - 1),
                    3 => -f32::from_bits(10.0f32.to_bits() - 1),
                    4 => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0][i % 5],
                    5 => rng.random_range(-30.0..30.0),
                    _ => rng.random_range(-4.0..4.0),
                })
                .collect();
            let u: Vec<f32> = (0..len)
                .map(|i| {
                    if i % 11 == 0 {
                        f32::INFINITY
                    } else {
                        rng.random_range(-3.0..3.0)
                    }
                })
                .collect();
            let mut want = vec![0.0f32; len];
            geglu_chunk_body(&g, &u, &mut want);
            let got = geglu(&g, &u);
            for i in 0..len {
                assert_eq!(
                    got[i].to_bits(),
                    want[i].to_bits(),
                    "len {len} at {i}: g {}",
                    g[i]
                );
            }
        }
    }

    /// The AVX-512 SwiGLU gives the scalar code's bits, over ordinary and extreme gates (past
    /// ggml's |n| > 192 cut-off both ways) and ragged lengths.
    #[test]
    fn swiglu_builds_agree() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(0x5161);
        for len in [0usize, 1, 15, 16, 17, 1536, 4099] {
            let g: Vec<f32> = (0..len)
                .map(|i| match i % 7 {
                    0 => rng.random_range(-200.0..200.0),
                    1 => rng.random_range(-150.0..-80.0),
                    2 => f32::INFINITY * if i % 2 == 0 { 1.0 } else { -1.0 },
                    _ => rng.random_range(-8.0..8.0),
                })
                .collect();
            let u: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0..3.0)).collect();
            let mut want = vec![0.0f32; len];
            swiglu_chunk_body(&g, &u, &mut want);
            let mut got = vec![0.0f32; len];
            swiglu_chunk(&g, &u, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "len {len} [{i}] gate {}: {a} vs {b}",
                    g[i]
                );
            }
        }
    }

    /// The f16 GELU table equals ggml's `ggml_table_gelu_f16` entry for entry for every finite
    /// input (the only ones GEGLU looks up): its FNV-1a hash over those little-endian entries,
    /// and a few entries, read from llama.cpp 0c1e570's x86 build after `ggml_cpu_init()`.
    #[test]
    fn gelu_table_is_ggmls() {
        let table = gelu_table();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (bits, v) in table.iter().enumerate() {
            if !half::f16::from_bits(bits as u16).is_finite() {
                continue;
            }
            for b in v.to_bits().to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        for (at, want) in [
            (0x3c00, 0x3abb),
            (0xbc00, 0xb115),
            (0xc000, 0xa9d0),
            (0xbfff, 0xa9d3),
            (0x4000, 0x3fd2),
            (0x1234, 0x0e35),
        ] {
            assert_eq!(table[at].to_bits(), want, "entry {at:#x}");
        }
        assert_eq!(h, 0xdd1e_e17e_273b_67fa, "table hash");
    }
}
