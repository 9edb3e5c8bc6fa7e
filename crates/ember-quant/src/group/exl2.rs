//! EXL2 (exllamav2): per-group bit widths (2, 3, 4, 5, 6, 8), 4-bit scale codes relative to a
//! per-group f16 maximum, and an input-row permutation.
//!
//! Sources (exllamav2 @ b9c025b4): `conversion/adaptivegptq.py::AdaptiveGPTQ.pack/quantize`
//! (tensor set, `q_groups`, `q_invperm`), `exllamav2_ext/cuda/pack_tensor.cu::
//! pack_columns_kernel` (per-group little-endian bitstreams along rows) and `pack_rows_4_kernel`
//! (`q_scale` nibble = `qs − 1`), `cuda/q_matrix.cu::QMatrix::QMatrix/reconstruct_kernel` and
//! `cuda/quant/qdq_util.cuh::dq_scale`, `ext.py::make_q_matrix` (dequantization),
//! `AdaptiveQuantizer.find_params` and `cuda/quantize.cu::quantize_kernel` (the quantizer).
//!
//! Tensors (`np = n` rounded up to a multiple of 32): `q_weight` I32 `[Σ qrows, np]`,
//! `q_scale` I32 `[G, np/8]`, `q_scale_max` F16 `[G]`, `q_groups` I16 `[2G]` = pairs
//! `(bits, first q_weight row)`, `q_invperm` I32 `[k]`. Permuted row `r` is original input
//! `perm[r]` (`perm = argsort(q_invperm)`); group `i` covers the permuted rows after the previous
//! groups, `(start_{i+1} − start_i)·32 / bits_i` of them (the last group: the rest of `k`).
//! Dequantization, with f16 rounding at each step as the CUDA kernel does:
//! `m = f16(q_scale_max/256)`, `s = f16(f16((code+1)²)·m)`, `Wp[r, n] = f16(f16(q − 2^(b−1))·s)`,
//! and `W[n, k] = Wp[q_invperm[k], n]`.

use half::f16;

use super::{
    GroupError, GroupFormat, GroupQuantized, GroupTensors, check_perm, check_weight, expect_len,
    f16_at, f16_to_bytes, for_rows, i32_at, mul, stream_get, stream_put, word, words_to_bytes,
};

const BITS_ALLOWED: &str = "2, 3, 4, 5, 6, 8 (per group, non-increasing)";

/// Bit widths exllamav2 has kernels for.
pub const EXL2_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

/// One group of an EXL2 tensor, decoded from `q_groups`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exl2Group {
    /// Bits per code.
    pub bits: u32,
    /// First `q_weight` row.
    pub qrow_start: usize,
    /// First permuted input row.
    pub row_start: usize,
    /// Permuted input rows in the group.
    pub rows: usize,
}

fn i16_at(bytes: &[u8], i: usize) -> i16 {
    i16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])
}

/// `n` rounded up to a multiple of 32 (the padded column count).
pub fn padded_n(n: usize) -> usize {
    n.div_ceil(32).saturating_mul(32)
}

/// A borrowed EXL2 tensor set.
#[derive(Clone, Copy, Debug)]
pub struct Exl2<'a> {
    /// In features.
    pub k: usize,
    /// Out features (the tensors hold `padded_n(n)` columns; only `< n` are used).
    pub n: usize,
    /// `q_weight` bytes, I32 `[Σ qrows, np]`.
    pub q_weight: &'a [u8],
    /// `q_scale` bytes, I32 `[G, np/8]`.
    pub q_scale: &'a [u8],
    /// `q_scale_max` bytes, F16 `[G]`.
    pub q_scale_max: &'a [u8],
    /// `q_groups` bytes, I16 `[2G]`.
    pub q_groups: &'a [u8],
    /// `q_invperm` bytes, I32 `[k]`.
    pub q_invperm: &'a [u8],
}

impl Exl2<'_> {
    /// Decodes and checks `q_groups`: pairs present, bits supported and non-increasing, first
    /// start 0, starts increasing by whole rows, rows covering exactly `k`.
    pub fn groups(&self) -> Result<Vec<Exl2Group>, GroupError> {
        let len = self.q_groups.len();
        if len == 0 || !len.is_multiple_of(4) {
            return Err(GroupError::Length {
                tensor: "q_groups",
                expected: (len / 4).max(1) * 4,
                actual: len,
            });
        }
        let g = len / 4;
        if g > self.k {
            return Err(GroupError::BadQGroups {
                group: g - 1,
                problem: "more groups than input rows",
                value: g as i64,
            });
        }
        let mut out = Vec::with_capacity(g);
        let mut row_start = 0usize;
        let mut prev_bits = u32::MAX;
        for i in 0..g {
            let bits = i16_at(self.q_groups, 2 * i);
            let start = i16_at(self.q_groups, 2 * i + 1);
            if bits < 0 || !EXL2_BITS.contains(&(bits as u32)) {
                return Err(GroupError::UnsupportedBits {
                    format: GroupFormat::Exl2,
                    bits: bits as u32,
                    allowed: BITS_ALLOWED,
                });
            }
            let bits = bits as u32;
            if bits > prev_bits {
                return Err(GroupError::BadQGroups {
                    group: i,
                    problem: "bits increase (groups must be ordered by non-increasing bits)",
                    value: bits as i64,
                });
            }
            prev_bits = bits;
            if start < 0 || (i == 0 && start != 0) {
                return Err(GroupError::BadQGroups {
                    group: i,
                    problem: "bad first q_weight row",
                    value: start as i64,
                });
            }
            out.push(Exl2Group {
                bits,
                qrow_start: start as usize,
                row_start,
                rows: 0,
            });
            if i > 0 {
                let p = &mut out[i - 1];
                let diff = start as i64 - p.qrow_start as i64;
                if diff <= 0 || (diff * 32) % p.bits as i64 != 0 {
                    return Err(GroupError::BadQGroups {
                        group: i,
                        problem: "q_weight row start not after the previous group by whole rows",
                        value: start as i64,
                    });
                }
                p.rows = (diff * 32 / p.bits as i64) as usize;
                row_start += p.rows;
                if row_start >= self.k {
                    return Err(GroupError::BadQGroups {
                        group: i,
                        problem: "groups before this one already cover k rows",
                        value: row_start as i64,
                    });
                }
                out[i].row_start = row_start;
            }
        }
        let last = &mut out[g - 1];
        last.rows = self.k - row_start;
        Ok(out)
    }

    fn check(&self) -> Result<Vec<Exl2Group>, GroupError> {
        if self.k == 0 {
            return Err(GroupError::BadDimension {
                format: GroupFormat::Exl2,
                dim: "k",
                value: 0,
                requirement: "must be at least 1",
            });
        }
        let groups = self.groups()?;
        let np = padded_n(self.n);
        let g = groups.len();
        let last = groups[g - 1];
        let qrows = last.qrow_start + (last.rows * last.bits as usize).div_ceil(32);
        expect_len("q_weight", self.q_weight, mul(&[qrows, np, 4]))?;
        expect_len("q_scale", self.q_scale, mul(&[g, np / 8, 4]))?;
        expect_len("q_scale_max", self.q_scale_max, mul(&[g, 2]))?;
        expect_len("q_invperm", self.q_invperm, mul(&[self.k, 4]))?;
        check_perm("q_invperm", self.k, |i| i32_at(self.q_invperm, i) as i64)?;
        Ok(groups)
    }

    /// The common description (`bits` = the first group's, `group_size` = its rows; both 0
    /// when `q_groups` is malformed).
    pub fn desc(&self) -> GroupQuantized {
        let first = self.groups().ok().and_then(|g| g.first().copied());
        GroupQuantized {
            format: GroupFormat::Exl2,
            bits: first.map_or(0, |g| g.bits),
            group_size: first.map_or(0, |g| g.rows),
            k: self.k,
            n: self.n,
        }
    }

    /// Checks `q_groups`, every tensor length and that `q_invperm` is a permutation.
    pub fn validate(&self) -> Result<(), GroupError> {
        self.check().map(|_| ())
    }

    fn row_unchecked(&self, groups: &[Exl2Group], n: usize, out: &mut [f32]) {
        let np = padded_n(self.n);
        // Per-group scale for this column, computed once (at most k groups, checked).
        let scales: Vec<f16> = groups
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let code = (word(self.q_scale, i * (np / 8) + n / 8) >> (4 * (n % 8))) & 0xF;
                let m = f16::from_f32(f16_at(self.q_scale_max, i) / 256.0);
                f16::from_f32(((code + 1) * (code + 1)) as f32 * m.to_f32())
            })
            .collect();
        for (k, o) in out.iter_mut().enumerate() {
            let r = i32_at(self.q_invperm, k) as usize;
            let gi = groups.partition_point(|g| g.row_start <= r) - 1;
            let g = &groups[gi];
            let q = stream_get(
                self.q_weight,
                g.qrow_start * np + n,
                np,
                r - g.row_start,
                g.bits,
            );
            let d = q as f32 - (1u32 << (g.bits - 1)) as f32;
            *o = f16::from_f32(d * scales[gi].to_f32()).to_f32();
        }
    }
}

impl GroupTensors for Exl2<'_> {
    fn desc(&self) -> GroupQuantized {
        Exl2::desc(self)
    }
    fn validate(&self) -> Result<(), GroupError> {
        Exl2::validate(self)
    }
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) -> Result<(), GroupError> {
        let groups = self.check()?;
        for_rows(self.n, self.k, start, out, |row, o| {
            self.row_unchecked(&groups, row, o)
        })
    }
}

/// Unpacked EXL2 parameters: the writer's input. Groups are `group_size` consecutive permuted
/// rows each (the last one may be short), with widths `group_bits`.
#[derive(Clone, Copy, Debug)]
pub struct Exl2Parts<'a> {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// Permuted rows per group (a multiple of 32, so every group but the last fills whole words).
    pub group_size: usize,
    /// Bits of each group (`ceil(k / group_size)` entries, from [`EXL2_BITS`], non-increasing).
    pub group_bits: &'a [u32],
    /// Codes `0..2^b`, `[n][k]` with columns in **permuted** row order.
    pub codes: &'a [u8],
    /// Scale codes `qs` in `1..=16`, `[n][G]`.
    pub qscale: &'a [u8],
    /// `q_scale_max` per group, `[G]` (not divided by 256).
    pub qscale_max: &'a [f16],
    /// `q_invperm`, `[k]` (a permutation of `0..k`).
    pub invperm: &'a [u32],
}

/// An owned EXL2 tensor set with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2Tensors {
    /// In features.
    pub k: usize,
    /// Out features.
    pub n: usize,
    /// `q_weight` bytes (I32).
    pub q_weight: Vec<u8>,
    /// `q_scale` bytes (I32).
    pub q_scale: Vec<u8>,
    /// `q_scale_max` bytes (F16).
    pub q_scale_max: Vec<u8>,
    /// `q_groups` bytes (I16).
    pub q_groups: Vec<u8>,
    /// `q_invperm` bytes (I32).
    pub q_invperm: Vec<u8>,
}

impl Exl2Tensors {
    /// A borrowed view.
    pub fn view(&self) -> Exl2<'_> {
        Exl2 {
            k: self.k,
            n: self.n,
            q_weight: &self.q_weight,
            q_scale: &self.q_scale,
            q_scale_max: &self.q_scale_max,
            q_groups: &self.q_groups,
            q_invperm: &self.q_invperm,
        }
    }
}

fn check_plan(k: usize, group_size: usize, group_bits: &[u32]) -> Result<usize, GroupError> {
    if group_size == 0 || !group_size.is_multiple_of(32) || k == 0 {
        return Err(GroupError::BadGroupSize {
            format: GroupFormat::Exl2,
            group_size,
            k,
            requirement: "writer needs k >= 1 and a group size that is a non-zero multiple of 32",
        });
    }
    let g = k.div_ceil(group_size);
    if group_bits.len() != g {
        return Err(GroupError::Length {
            tensor: "group_bits",
            expected: g,
            actual: group_bits.len(),
        });
    }
    for (i, &b) in group_bits.iter().enumerate() {
        if !EXL2_BITS.contains(&b) {
            return Err(GroupError::UnsupportedBits {
                format: GroupFormat::Exl2,
                bits: b,
                allowed: BITS_ALLOWED,
            });
        }
        if i > 0 && b > group_bits[i - 1] {
            return Err(GroupError::BadQGroups {
                group: i,
                problem: "bits increase (groups must be ordered by non-increasing bits)",
                value: b as i64,
            });
        }
    }
    Ok(g)
}

impl Exl2Parts<'_> {
    /// Packs exactly as `AdaptiveGPTQ.pack` with `pack_columns_kernel`/`pack_rows_4_kernel`
    /// does; padded columns get code `2^(b−1)` (dequantizes to 0) and scale nibble 0.
    pub fn pack(&self) -> Result<Exl2Tensors, GroupError> {
        let g = check_plan(self.k, self.group_size, self.group_bits)?;
        let (k, n) = (self.k, self.n);
        let lens = [
            ("codes", self.codes.len(), mul(&[n, k])),
            ("qscale", self.qscale.len(), mul(&[n, g])),
            ("qscale_max", self.qscale_max.len(), g),
            ("invperm", self.invperm.len(), k),
        ];
        for (tensor, actual, expected) in lens {
            if actual != expected || expected == usize::MAX {
                return Err(GroupError::Length {
                    tensor,
                    expected,
                    actual,
                });
            }
        }
        check_perm("invperm", k, |i| self.invperm[i] as i64)?;
        for (r, chunk) in self.codes.chunks_exact(k).enumerate() {
            for (c, &v) in chunk.iter().enumerate() {
                let b = self.group_bits[c / self.group_size];
                if v as u32 >= 1 << b {
                    return Err(GroupError::ValueOutOfRange {
                        what: "codes",
                        index: r * k + c,
                        value: v as i64,
                        min: 0,
                        max: (1i64 << b) - 1,
                    });
                }
            }
        }
        if let Some(index) = self.qscale.iter().position(|&v| !(1..=16).contains(&v)) {
            return Err(GroupError::ValueOutOfRange {
                what: "qscale",
                index,
                value: self.qscale[index] as i64,
                min: 1,
                max: 16,
            });
        }
        let np = padded_n(n);
        let mut groups = Vec::with_capacity(g);
        let mut qrow = 0usize;
        for (i, &bits) in self.group_bits.iter().enumerate() {
            let row_start = i * self.group_size;
            let rows = self.group_size.min(k - row_start);
            groups.push(Exl2Group {
                bits,
                qrow_start: qrow,
                row_start,
                rows,
            });
            qrow += (rows * bits as usize).div_ceil(32);
        }
        if qrow > i16::MAX as usize {
            return Err(GroupError::BadQGroups {
                group: g - 1,
                problem: "q_weight row start does not fit in int16",
                value: qrow as i64,
            });
        }
        let mut qw = vec![0u32; qrow * np];
        let mut qs = vec![0u32; g * np / 8];
        for col in 0..np {
            for (i, gr) in groups.iter().enumerate() {
                for t in 0..gr.rows {
                    let v = if col < n {
                        self.codes[col * k + gr.row_start + t] as u32
                    } else {
                        1 << (gr.bits - 1)
                    };
                    stream_put(&mut qw, gr.qrow_start * np + col, np, t, gr.bits, v);
                }
                if col < n {
                    let code = self.qscale[col * g + i] as u32 - 1;
                    qs[i * np / 8 + col / 8] |= code << (4 * (col % 8));
                }
            }
        }
        let q_groups: Vec<u8> = groups
            .iter()
            .flat_map(|gr| {
                let mut b = (gr.bits as i16).to_le_bytes().to_vec();
                b.extend((gr.qrow_start as i16).to_le_bytes());
                b
            })
            .collect();
        let q_invperm: Vec<u8> = self
            .invperm
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect();
        Ok(Exl2Tensors {
            k,
            n,
            q_weight: words_to_bytes(&qw),
            q_scale: words_to_bytes(&qs),
            q_scale_max: f16_to_bytes(self.qscale_max),
            q_groups,
            q_invperm,
        })
    }
}

/// How [`quantize`] orders the input rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exl2Perm {
    /// No reordering (`q_invperm = 0..k`).
    Identity,
    /// By descending L2 norm of each input column of the weight (a stand-in for exllamav2's
    /// `argsort(diag(H), descending)`, which needs calibration activations); ties keep order.
    ColumnNorm,
}

/// A simple bit plan: `ceil(k / group_size)` group widths from [`EXL2_BITS`], non-increasing,
/// whose mean is as close to `target_bpw` as whole groups allow (the two supported widths
/// around the target, with the wider ones first). Scale storage is not counted.
pub fn plan(k: usize, group_size: usize, target_bpw: f32) -> Result<Vec<u32>, GroupError> {
    if group_size == 0 || k == 0 {
        return Err(GroupError::BadGroupSize {
            format: GroupFormat::Exl2,
            group_size,
            k,
            requirement: "k and the group size must be at least 1",
        });
    }
    if !(2.0..=8.0).contains(&target_bpw) {
        return Err(GroupError::UnsupportedBits {
            format: GroupFormat::Exl2,
            bits: target_bpw as u32,
            allowed: "a target between 2.0 and 8.0 bits per weight",
        });
    }
    let g = k.div_ceil(group_size);
    let lo = *EXL2_BITS
        .iter()
        .rev()
        .find(|&&b| b as f32 <= target_bpw)
        .unwrap_or(&2);
    let hi = *EXL2_BITS.iter().find(|&&b| b > lo).unwrap_or(&lo);
    let hi_groups = if hi == lo {
        0
    } else {
        ((g as f32) * (target_bpw - lo as f32) / (hi - lo) as f32).round() as usize
    };
    let hi_groups = hi_groups.min(g);
    Ok((0..g)
        .map(|i| if i < hi_groups { hi } else { lo })
        .collect())
}

/// Owned unpacked parameters produced by [`quantize_parts`].
#[derive(Clone, Debug, PartialEq)]
pub struct Exl2OwnedParts {
    /// Codes `[n][k]` in permuted row order.
    pub codes: Vec<u8>,
    /// Scale codes `1..=16`, `[n][G]`.
    pub qscale: Vec<u8>,
    /// `q_scale_max` per group.
    pub qscale_max: Vec<f16>,
    /// `q_invperm`.
    pub invperm: Vec<u32>,
}

/// Round-to-nearest EXL2 quantization of `weight` (`[n][k]`), after
/// `AdaptiveQuantizer.find_params` and `quantize_kernel`, per group of permuted rows with `b`
/// bits: `base[n] = max|x[:, n]| / ((2^b − 1)/2)`, `q_scale_max = f16(max_n base)`,
/// `qs[n] = clamp(ceil(16·sqrt(base[n] / q_scale_max)), 1, 16)`,
/// `s = f16(f16(qs²)·f16(q_scale_max/256))`, `q = clamp(rint(w / s) + 2^(b−1), 0, 2^b − 1)`.
/// Deviations from exllamav2 (no calibration data here): no error feedback, no grid search of
/// `q_scale_max` (p = 1), and both scales round **up** (upstream rounds to nearest):
/// `m = f16(q_scale_max/256)` is the smallest f16 ≥ `max_n base / 256` and `qs` the smallest
/// code with `f16(qs²·m) ≥ base[n]`, so the rebuilt scale never undershoots a row's range.
pub fn quantize_parts(
    weight: &[f32],
    n: usize,
    k: usize,
    group_bits: &[u32],
    group_size: usize,
    perm: Exl2Perm,
) -> Result<Exl2OwnedParts, GroupError> {
    let g = check_plan(k, group_size, group_bits)?;
    check_weight(weight, n, k)?;
    let mut order: Vec<u32> = (0..k as u32).collect();
    if perm == Exl2Perm::ColumnNorm {
        let norms: Vec<f64> = (0..k)
            .map(|c| (0..n).map(|r| (weight[r * k + c] as f64).powi(2)).sum())
            .collect();
        order.sort_by(|&a, &b| norms[b as usize].total_cmp(&norms[a as usize]));
    }
    let mut invperm = vec![0u32; k];
    for (r, &c) in order.iter().enumerate() {
        invperm[c as usize] = r as u32;
    }
    let mut codes = vec![0u8; n * k];
    let mut qscale = vec![1u8; n * g];
    let mut qscale_max = vec![f16::ZERO; g];
    for (i, &b) in group_bits.iter().enumerate() {
        let rows = &order[i * group_size..((i + 1) * group_size).min(k)];
        let half_range = ((1u32 << b) - 1) as f32 / 2.0;
        let base: Vec<f32> = (0..n)
            .map(|r| {
                rows.iter()
                    .fold(0.0f32, |m, &c| m.max(weight[r * k + c as usize].abs()))
                    / half_range
            })
            .collect();
        // The reader's scale step is `m = f16(q_scale_max / 256)`, subnormal for small weights
        // (max |w| below about 2 at 8 bits, 0.02 at 2 bits), where rounding to nearest loses
        // up to a tenth of it near max |w| = 0.01 at 8 bits. Round `m` up and store `q_scale_max = 256·m` (exact in f16), so every scale the
        // reader rebuilds covers its row and the code clamp never cuts a value short.
        let max_base = base.iter().fold(0.0f32, |m, &v| m.max(v));
        let m = f16_at_least(max_base / 256.0);
        let qsm = f16::from_f32(m.to_f32() * 256.0);
        if !max_base.is_finite() || !qsm.is_finite() {
            return Err(GroupError::NonFinite {
                index: rows[0] as usize,
            });
        }
        qscale_max[i] = qsm;
        let m = f16::from_f32(qsm.to_f32() / 256.0).to_f32();
        let zero = (1u32 << (b - 1)) as f32;
        let maxq = ((1u32 << b) - 1) as f32;
        for r in 0..n {
            // The smallest code whose rebuilt scale covers the row (16 always does).
            let qs = (1..=16u32)
                .map(|q| q as f32)
                .find(|&q| f16::from_f32(q * q * m).to_f32() >= base[r])
                .unwrap_or(16.0);
            qscale[r * g + i] = qs as u8;
            let s = f16::from_f32(qs * qs * m).to_f32();
            for (t, &c) in rows.iter().enumerate() {
                let w = weight[r * k + c as usize];
                let q = if s > 0.0 {
                    ((w / s).round_ties_even() + zero).clamp(0.0, maxq)
                } else {
                    zero
                };
                codes[r * k + i * group_size + t] = q as u8;
            }
        }
    }
    Ok(Exl2OwnedParts {
        codes,
        qscale,
        qscale_max,
        invperm,
    })
}

/// The smallest finite f16 not below `x` (`x` ≥ 0); infinity past f16's range.
fn f16_at_least(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x || !h.is_finite() {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// Quantizes `weight` (`[n][k]`) with [`quantize_parts`] and packs it.
pub fn quantize(
    weight: &[f32],
    n: usize,
    k: usize,
    group_bits: &[u32],
    group_size: usize,
    perm: Exl2Perm,
) -> Result<Exl2Tensors, GroupError> {
    let p = quantize_parts(weight, n, k, group_bits, group_size, perm)?;
    Exl2Parts {
        k,
        n,
        group_size,
        group_bits,
        codes: &p.codes,
        qscale: &p.qscale,
        qscale_max: &p.qscale_max,
        invperm: &p.invperm,
    }
    .pack()
}
