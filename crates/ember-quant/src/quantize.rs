//! Reference quantization, ported from ggml's `quantize_row_*_ref` (ggml-quants.c) with the
//! same f32 operations in the same order, so the output bytes match ggml's reference
//! quantizers (those llama-quantize uses without an importance matrix).

use crate::convert::{f32_to_bf16_bytes, f32_to_f16_bytes};
use crate::dequant::{QK_K, f16_at, scale_min_k4, supports_dequantize};
use crate::error::{QuantError, expected_bytes};
use crate::types::GgmlType;

/// ggml's `GROUP_MAX_EPS`: below this a group counts as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Quantizes `src` (a whole number of blocks of `ty`) with ggml's reference quantizer.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !supports_dequantize(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let n_bytes = expected_bytes(ty, src.len())?;
    let mut out = vec![0u8; n_bytes];
    use GgmlType::*;
    match ty {
        F32 => {
            for (o, v) in out.as_chunks_mut::<4>().0.iter_mut().zip(src) {
                *o = v.to_le_bytes();
            }
        }
        F16 => {
            for (o, v) in out.as_chunks_mut::<2>().0.iter_mut().zip(src) {
                *o = f32_to_f16_bytes(*v);
            }
        }
        BF16 => {
            for (o, v) in out.as_chunks_mut::<2>().0.iter_mut().zip(src) {
                *o = f32_to_bf16_bytes(*v);
            }
        }
        Q4_0 => blocks(src, &mut out, q4_0),
        Q4_1 => blocks(src, &mut out, q4_1),
        Q5_0 => blocks(src, &mut out, q5_0),
        Q5_1 => blocks(src, &mut out, q5_1),
        Q8_0 => blocks(src, &mut out, q8_0),
        Q8_1 => blocks(src, &mut out, q8_1),
        Q2_K => blocks(src, &mut out, q2_k),
        Q3_K => blocks(src, &mut out, q3_k),
        Q4_K => blocks(src, &mut out, q4_k),
        Q5_K => blocks(src, &mut out, q5_k),
        Q6_K => blocks(src, &mut out, q6_k),
        Q8_K => blocks(src, &mut out, q8_k),
        _ => return Err(QuantError::Unsupported(ty)),
    }
    Ok(out)
}

fn blocks<const BS: usize, const TS: usize>(
    src: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; BS], &mut [u8; TS]),
) {
    let (sb, _) = src.as_chunks::<BS>();
    let (db, _) = dst.as_chunks_mut::<TS>();
    for (s, d) in sb.iter().zip(db.iter_mut()) {
        f(s, d);
    }
}

fn put_f16<const N: usize>(b: &mut [u8; N], off: usize, v: f32) {
    let h = f32_to_f16_bytes(v);
    b[off] = h[0];
    b[off + 1] = h[1];
}

/// ggml's `nearest_int`: round to nearest, ties to even, via the 1.5*2^23 bias trick. Only
/// meaningful for |fval| <= 4194303 (ggml asserts that); outside it returns garbage as ggml
/// does in release builds, and callers clamp. Never panics.
#[inline(always)]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The first element of largest magnitude (ggml keeps the first on ties) and that magnitude.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn q4_0(x: &[f32; 32], y: &mut [u8; 18]) {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for j in 0..16 {
        // `(int8_t)(v + 8.5f)` truncates toward zero; `as` does the same (and saturates).
        let xi0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let xi1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = xi0 | (xi1 << 4);
    }
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn q4_1(x: &[f32; 32], y: &mut [u8; 20]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    for j in 0..16 {
        let xi0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let xi1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = xi0 | (xi1 << 4);
    }
}

fn q5_0(x: &[f32; 32], y: &mut [u8; 22]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let xi0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let xi1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        y[6 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn q5_1(x: &[f32; 32], y: &mut [u8; 24]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        // ggml has no clamp here: `(uint8_t)(v + 0.5f)`.
        let xi0 = ((x[j] - min) * id + 0.5) as u8;
        let xi1 = ((x[j + 16] - min) * id + 0.5) as u8;
        y[8 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

fn q8_0(x: &[f32; 32], y: &mut [u8; 34]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    for j in 0..32 {
        // C `roundf` rounds half away from zero, as `f32::round`.
        y[2 + j] = (x[j] * id).round() as i8 as u8;
    }
}

fn q8_1(x: &[f32; 32], y: &mut [u8; 36]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, 0, d);
    let mut sum = 0i32;
    for j in 0..32 {
        let q = (x[j] * id).round() as i8;
        y[4 + j] = q as u8;
        sum += q as i32;
    }
    put_f16(y, 2, sum as f32 * d);
}

// ---------------------------------------------------------------- K-quant helpers

/// ggml's `make_qx_quants` for `qw == NULL` and `rmse_type == 1` (weights x^2), the only form
/// the reference quantizers use (Q6_K). L gets values in 0..2*nmax.
fn make_qx_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (li, &xi) in l_out.iter_mut().zip(x) {
        let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        *li = (l + nmax) as i8;
        let w = xi * xi;
        sumlx += w * xi * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = xi * xi;
            sumlx += w * xi * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (li, &xi) in l_out.iter_mut().zip(x) {
                let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
                *li = (nmax + l) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// ggml's `make_q3_quants` with `do_rmse == true` (Q3_K). L gets values in 0..2*nmax, except
/// an all-zero group which gets 0 (as in ggml).
fn make_q3_quants(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (li, &xi) in l_out.iter_mut().zip(x) {
        let l = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
        *li = l as i8;
        let w = xi * xi;
        sumlx += w * xi * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (li, &xi) in l_out.iter_mut().zip(x) {
            let w = xi * xi;
            let lf = *li as f32;
            let mut slx = sumlx - w * xi * lf;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * lf * lf;
                let new_l = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *li as i32 {
                    let nl = new_l as f32;
                    slx += w * xi * nl;
                    sl2 += w * nl * nl;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for li in l_out.iter_mut() {
        *li += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Parameters of one `make_qkx2_quants` call.
struct Qkx2 {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
}

/// ggml's `make_qkx2_quants`: fits `x ≈ scale*L - the_min` with L in 0..=nmax, trying
/// `nstep+1` candidate scales. Returns (scale, the_min). `x`, `weights`, `l_out` have equal
/// length (at most 32).
fn make_qkx2_quants(p: &Qkx2, x: &[f32], weights: &[f32], l_out: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    let mut laux = [0u8; 32];
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let nmaxf = p.nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min));
        l_out[i] = l.clamp(0, p.nmax) as u8;
        let mut diff = scale * l_out[i] as f32 + min - x[i];
        diff = if p.use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmaxf) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let mut diff = this_scale * laux[i] as f32 + this_min - x[i];
                diff = if p.use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out.copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 2-bit values: byte `j/4 + l` of each 128-element half holds elements l, l+32, l+64,
/// l+96 at bit offsets 0, 2, 4, 6.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for k in 0..32 {
            qs[j / 4 + k] =
                l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6);
        }
    }
}

fn q2_k(x: &[f32; QK_K], y: &mut [u8; 84]) {
    const Q4SCALE: f32 = 15.0;
    let p = Qkx2 {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let mut weights = [0.0f32; 16];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(&p, xs, &weights, &mut l[16 * j..16 * j + 16]);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for j in 0..16 {
            y[j] = nearest_int(iscale * scales[j]) as u8;
        }
        put_f16(y, 80, max_scale / Q4SCALE);
    } else {
        y[..16].fill(0);
        put_f16(y, 80, 0.0);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for j in 0..16 {
            y[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        put_f16(y, 82, max_min / Q4SCALE);
    } else {
        put_f16(y, 82, 0.0);
    }
    let dall = f16_at(y, 80);
    let dmin = f16_at(y, 82);
    for j in 0..16 {
        let d = dall * (y[j] & 0xF) as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * (y[j] >> 4) as f32;
        for ii in 0..16 {
            let q = nearest_int((x[16 * j + ii] + dm) / d);
            l[16 * j + ii] = q.clamp(0, 3) as u8;
        }
    }
    pack_2bit(&l, &mut y[16..80]);
}

fn q3_k(x: &[f32; QK_K], y: &mut [u8; 110]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        let scale = scales[j].abs();
        if scale > amax {
            amax = scale;
            max_scale = scales[j];
        }
    }
    y[96..108].fill(0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            // ggml stores nearest_int into an int8_t before clamping.
            let lv = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) as i32 + 32;
            if j < 8 {
                y[96 + j] = (lv & 0xF) as u8;
            } else {
                y[96 + j - 8] |= ((lv & 0xF) << 4) as u8;
            }
            let hi = lv >> 4;
            y[96 + 8 + j % 4] |= (hi << (2 * (j / 4))) as u8;
        }
        put_f16(y, 108, 1.0 / iscale);
    } else {
        put_f16(y, 108, 0.0);
    }
    let dall = f16_at(y, 108);
    for j in 0..16 {
        let lo = if j < 8 {
            y[96 + j] & 0xF
        } else {
            y[96 + j - 8] >> 4
        };
        let sc = (lo | (((y[96 + 8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
        let d = dall * sc as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
            l[16 * j + ii] = (q + 4) as i8;
        }
    }
    // High bit of the 3-bit value goes to hmask: element j sets bit j/32 of byte j%32.
    y[..32].fill(0);
    let mut lu = [0u8; QK_K];
    for j in 0..QK_K {
        let mut v = l[j] as u8;
        if v > 3 {
            y[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        lu[j] = v;
    }
    pack_2bit(&lu, &mut y[32..96]);
}

/// Stores 8 six-bit (scale, min) pairs in the 12-byte Q4_K/Q5_K layout.
fn pack_scale_min_k4(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8]) {
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// Shared first half of Q4_K/Q5_K: per-32 (scale, min) fits, 6-bit scale packing into
/// `y[4..16]`, d/dmin into `y[0..4]`, then the requantized L values in 0..=nmax.
fn qk_scales_mins<const TS: usize>(x: &[f32; QK_K], y: &mut [u8; TS], p: &Qkx2) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0.0f32; 32];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(p, xs, &weights, &mut l[32 * j..32 * j + 32]);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // ggml assigns nearest_int to a uint8_t (wrapping) and then clamps to 63.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    y[4..16].fill(0);
    pack_scale_min_k4(&ls, &lm, &mut y[4..16]);
    put_f16(y, 0, max_scale / 63.0);
    put_f16(y, 2, max_min / 63.0);
    let dall = f16_at(y, 0);
    let dmin = f16_at(y, 2);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &y[4..16]);
        let d = dall * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / d);
            l[32 * j + ii] = q.clamp(0, p.nmax) as u8;
        }
    }
    l
}

fn q4_k(x: &[f32; QK_K], y: &mut [u8; 144]) {
    let p = Qkx2 {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let l = qk_scales_mins(x, y, &p);
    for (k, j) in (0..QK_K).step_by(64).enumerate() {
        for i in 0..32 {
            y[16 + 32 * k + i] = l[j + i] | (l[j + i + 32] << 4);
        }
    }
}

fn q5_k(x: &[f32; QK_K], y: &mut [u8; 176]) {
    let p = Qkx2 {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    let l = qk_scales_mins(x, y, &p);
    y[16..48].fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (k, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                y[16 + j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                y[16 + j] |= m2;
            }
            y[48 + 32 * k + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

fn q6_k(x: &[f32; QK_K], y: &mut [u8; 210]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(y, 208, 1.0 / iscale);
    for ib in 0..16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let dall = f16_at(y, 208);
    for j in 0..16 {
        let d = dall * (y[192 + j] as i8) as f32;
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    for (n, j) in (0..QK_K).step_by(128).enumerate() {
        for k in 0..32 {
            let lv = |o: usize| l[j + k + o] as u8;
            y[64 * n + k] = (lv(0) & 0xF) | ((lv(64) & 0xF) << 4);
            y[64 * n + k + 32] = (lv(32) & 0xF) | ((lv(96) & 0xF) << 4);
            y[128 + 32 * n + k] =
                (lv(0) >> 4) | ((lv(32) >> 4) << 2) | ((lv(64) >> 4) << 4) | ((lv(96) >> 4) << 6);
        }
    }
}

fn q8_k(x: &[f32; QK_K], y: &mut [u8; 292]) {
    let (max, amax) = signed_absmax(x);
    if amax == 0.0 {
        // ggml leaves bsums uninitialised here; zero is their only sensible value.
        y.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let mut q = [0i8; QK_K];
    for (qi, &v) in q.iter_mut().zip(x.iter()) {
        *qi = nearest_int(iscale * v).min(127) as i8;
    }
    y[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (o, &qi) in y[4..260].iter_mut().zip(q.iter()) {
        *o = qi as u8;
    }
    for j in 0..16 {
        let sum: i32 = q[16 * j..16 * j + 16].iter().map(|&v| v as i32).sum();
        y[260 + 2 * j..262 + 2 * j].copy_from_slice(&(sum as i16).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::nearest_int;

    #[test]
    fn nearest_int_ties_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(2.4999), 2);
        assert_eq!(nearest_int(-3.7), -4);
        assert_eq!(nearest_int(4_194_303.0), 4_194_303);
    }
}
