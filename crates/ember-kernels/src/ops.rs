//! The backend extension and its implementations.

use std::sync::Arc;

use burn::backend::{
    Backend, Dispatch, FloatDType, TensorMetadata, backend_extension, tensor::FloatTensor,
};
use burn::tensor::{Shape, Slice, Tensor, TensorData};

use crate::QuantMatrix;
use crate::cpu::kquant::SoloRow;
use crate::paged::{PagedAttention, PagedError};

#[backend_extension(Flex: cfg(feature = "flex"), NdArray: cfg(feature = "ndarray"))]
pub trait EmberBackend: Backend {
    /// `x @ w^T` for `x: [m, w.cols()]`, giving `[m, w.rows()]`, with `w` left quantized.
    fn quant_matmul(x: FloatTensor<Self>, w: Arc<QuantMatrix>) -> FloatTensor<Self> {
        quant_matmul_fallback::<Self>(x, &w)
    }

    /// [`EmberBackend::quant_matmul`] with each row's place in the batch it has when its
    /// sequence runs alone ([`SoloRow`]): where llama.cpp's arithmetic depends on the batch
    /// size, a backend that reproduces it uses these instead of the call's own rows. Others
    /// ignore them.
    fn quant_matmul_solo(
        x: FloatTensor<Self>,
        w: Arc<QuantMatrix>,
        solo: Arc<[SoloRow]>,
    ) -> FloatTensor<Self> {
        let _ = solo;
        Self::quant_matmul(x, w)
    }

    /// Causal attention: `q: [n_head, n, d]` over `k, v: [n_kv, t, d]`, the `n` queries being
    /// the last `n` of `t` positions; query head `h` reads kv head `h / (n_head / n_kv)`.
    /// Returns `[n, n_head * d]`.
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        causal_attention_fallback::<Self>(q, k, v, scale)
    }

    /// Attention over a paged KV cache for a ragged batch: `q: [n_rows, n_head, head_dim]`
    /// (token-major), each sequence of `attn.seqs` owning a range of rows (see
    /// [`crate::SeqAttn`]). Returns `[n_rows, n_head * head_dim]`; rows of no sequence are zero.
    /// Query head `h` reads kv head `h / (n_head / n_kv)`. Panics if `attn` does not
    /// validate against `q`'s shape ([`PagedAttention::validate`]).
    fn paged_attention(q: FloatTensor<Self>, attn: PagedAttention) -> FloatTensor<Self> {
        paged_attention_fallback::<Self>(q, &attn)
    }

    /// Rounds every value to the nearest f16, keeping the f32 dtype: how K and V are stored
    /// in llama.cpp's default f16 cache. Default: cast to f16 and back.
    fn round_to_f16(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_cast(Self::float_cast(x, FloatDType::F16), FloatDType::F32)
    }

    /// `x * weight / sqrt(mean(x^2) + eps)` over the last dimension of `x: [n, d]`,
    /// `weight: [d]`.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        rms_norm_fallback::<Self>(x, weight, eps)
    }

    /// Rotary embedding of `x: [n, heads, head_dim]` at positions `start..start + n`: the
    /// first `rope_dim` dimensions of each head rotate in pairs `(2i, 2i + 1)`, or
    /// `(i, i + rope_dim / 2)` when `neox`; the rest pass through. Angles follow ggml's f32
    /// recurrence: `theta = pos`, times `base^(-2 / rope_dim)` per pair.
    fn rope(
        x: FloatTensor<Self>,
        positions: Arc<[u32]>,
        rope_dim: usize,
        base: f32,
        neox: bool,
    ) -> FloatTensor<Self> {
        rope_fallback::<Self>(x, &positions, rope_dim, base, neox)
    }

    /// `silu(gate) * up`, element-wise over same-shaped tensors.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu_fallback::<Self>(gate, up)
    }

    /// `gelu(gate) * up` (tanh-approximated GELU), element-wise over same-shaped tensors.
    fn geglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        geglu_fallback::<Self>(gate, up)
    }

    /// `a + b`, element-wise over same-shaped tensors (the residual connection).
    fn residual_add(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_add(a, b)
    }
}

/// The generic RMS norm from burn ops: the mean of squares in f32.
pub fn rms_norm_fallback<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    eps: f32,
) -> FloatTensor<B> {
    let d = weight.shape()[0];
    let ms = B::float_mean_dim(B::float_powi_scalar(x.clone(), 2.into()), 1);
    let inv = B::float_recip(B::float_sqrt(B::float_add_scalar(ms, eps.into())));
    let w = B::float_reshape(weight, Shape::new([1, d]));
    B::float_mul(B::float_mul(x, inv), w)
}

/// ggml's rotary angles for `positions`: `(cos, sin)`, each `[n * rope_dim / 2]`.
fn rope_angles(positions: &[u32], rope_dim: usize, base: f32) -> (Vec<f32>, Vec<f32>) {
    let half = rope_dim / 2;
    let theta_scale = base.powf(-2.0 / rope_dim as f32);
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        let mut theta = p as f32;
        for _ in 0..half {
            cos.push(theta.cos());
            sin.push(theta.sin());
            theta *= theta_scale;
        }
    }
    (cos, sin)
}

/// The generic rotary embedding from burn ops: slices, products and concatenations.
pub fn rope_fallback<B: Backend>(
    x: FloatTensor<B>,
    positions: &[u32],
    rope_dim: usize,
    base: f32,
    neox: bool,
) -> FloatTensor<B> {
    let device = x.device();
    let xs = x.shape();
    let (n, h, d) = (xs[0], xs[1], xs[2]);
    let half = rope_dim / 2;
    assert_eq!(positions.len(), n, "rope: one position per row");
    let (cos, sin) = rope_angles(positions, rope_dim, base);
    let (rot, pass) = if rope_dim < d {
        (
            B::float_slice(
                x.clone(),
                &[(0..n).into(), (0..h).into(), (0..rope_dim).into()],
            ),
            Some(B::float_slice(
                x,
                &[(0..n).into(), (0..h).into(), (rope_dim..d).into()],
            )),
        )
    } else {
        (x, None)
    };
    // r0 = x0 cos - x1 sin, r1 = x0 sin + x1 cos.
    let rotate =
        |x0: FloatTensor<B>, x1: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>| {
            let r0 = B::float_sub(
                B::float_mul(x0.clone(), cos.clone()),
                B::float_mul(x1.clone(), sin.clone()),
            );
            let r1 = B::float_add(B::float_mul(x0, sin), B::float_mul(x1, cos));
            (r0, r1)
        };
    let rotated = if neox {
        let cos = B::float_from_data(TensorData::new(cos, [n, 1, half]), &device);
        let sin = B::float_from_data(TensorData::new(sin, [n, 1, half]), &device);
        let x0 = B::float_slice(
            rot.clone(),
            &[(0..n).into(), (0..h).into(), (0..half).into()],
        );
        let x1 = B::float_slice(
            rot,
            &[(0..n).into(), (0..h).into(), (half..rope_dim).into()],
        );
        let (r0, r1) = rotate(x0, x1, cos, sin);
        B::float_cat(vec![r0, r1], 2)
    } else {
        // Pairs are adjacent: view as [n, h, half, 2].
        let cos = B::float_from_data(TensorData::new(cos, [n, 1, half, 1]), &device);
        let sin = B::float_from_data(TensorData::new(sin, [n, 1, half, 1]), &device);
        let pairs = B::float_reshape(rot, Shape::new([n, h, half, 2]));
        let all: [Slice; 3] = [(0..n).into(), (0..h).into(), (0..half).into()];
        let x0 = B::float_slice(pairs.clone(), &[all[0], all[1], all[2], (0..1).into()]);
        let x1 = B::float_slice(pairs, &[all[0], all[1], all[2], (1..2).into()]);
        let (r0, r1) = rotate(x0, x1, cos, sin);
        B::float_reshape(B::float_cat(vec![r0, r1], 3), Shape::new([n, h, rope_dim]))
    };
    match pass {
        Some(pass) => B::float_cat(vec![rotated, pass], 2),
        None => rotated,
    }
}

/// The generic SwiGLU from burn ops: `gate * sigmoid(gate) * up`.
pub fn swiglu_fallback<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
    B::float_mul(silu, up)
}

/// The generic GEGLU from burn ops: `0.5 g (1 + tanh(sqrt(2/pi) g (1 + 0.044715 g^2))) * up`,
/// in f32 (ggml's CPU kernel also rounds `g` and the GELU to f16; this does not).
pub fn geglu_fallback<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let g2 = B::float_mul(gate.clone(), gate.clone());
    let inner = B::float_mul(
        B::float_mul_scalar(gate.clone(), 0.797_884_6f32.into()),
        B::float_add_scalar(B::float_mul_scalar(g2, 0.044715f32.into()), 1.0f32.into()),
    );
    let gelu = B::float_mul(
        B::float_mul_scalar(gate, 0.5f32.into()),
        B::float_add_scalar(B::float_tanh(inner), 1.0f32.into()),
    );
    B::float_mul(gelu, up)
}

/// The generic attention: a full score matrix per kv head, masked, softmaxed, times V.
pub fn causal_attention_fallback<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f32,
) -> FloatTensor<B> {
    let device = q.device();
    let (qs, ks) = (q.shape(), k.shape());
    let (n_head, n, d) = (qs[0], qs[1], qs[2]);
    let (n_kv, t) = (ks[0], ks[1]);
    let group = n_head / n_kv;
    let rows = group * n;
    let q = B::float_reshape(q, Shape::new([n_kv, rows, d]));
    let scores = B::float_mul_scalar(
        B::float_matmul(q, B::float_swap_dims(k, 1, 2)),
        scale.into(),
    );
    // Row r of each kv head's block is query r % n.
    let past = t - n;
    let mut mask = vec![0.0f32; n_kv * rows * t];
    for (r, row) in mask.chunks_mut(t).enumerate() {
        let i = r % n;
        row[past + i + 1..]
            .iter_mut()
            .for_each(|m| *m = f32::NEG_INFINITY);
    }
    let mask = B::float_from_data(TensorData::new(mask, [n_kv, rows, t]), &device);
    let scores = B::float_add(scores, mask);
    let max = B::float_max_dim(scores.clone(), 2);
    let e = B::float_exp(B::float_sub(scores, max));
    let z = B::float_sum_dim(e.clone(), 2);
    let probs = B::float_div(e, z);
    let out = B::float_matmul(probs, v); // [n_kv, group * n, d]
    let out = B::float_reshape(out, Shape::new([n_head, n, d]));
    let out = B::float_swap_dims(out, 0, 1);
    B::float_reshape(out, Shape::new([n, n_head * d]))
}

/// Causal attention on any backend (see [`EmberBackend::causal_attention`]).
pub fn causal_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, scale: f32) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as EmberBackend>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
    ))
}

/// The generic paged attention from burn ops: per sequence, its visible K and V gathered and
/// dequantized into dense `[n_kv, t, d]` tensors, a causal (and window) mask, a full score
/// matrix, softmax, times V; the sequences' outputs laid out in row order. Panics if `attn`
/// does not validate against `q`'s shape.
pub fn paged_attention_fallback<B: Backend>(
    q: FloatTensor<B>,
    attn: &PagedAttention,
) -> FloatTensor<B> {
    paged_fallback::<B>(q, attn).unwrap_or_else(|e| panic!("paged_attention: {e}"))
}

fn paged_fallback<B: Backend>(
    q: FloatTensor<B>,
    attn: &PagedAttention,
) -> Result<FloatTensor<B>, PagedError> {
    let device = q.device();
    let qs = q.shape();
    let (n_rows, n_head, d) = (qs[0], qs[1], qs[2]);
    attn.validate(n_rows, n_head, d)?;
    let store = &*attn.store;
    let n_kv = store.n_kv();
    let group = n_head / n_kv;
    let width = n_head * d;
    let zeros = |n: usize| {
        B::float_from_data(
            TensorData::new(vec![0.0f32; n * width], [n, width]),
            &device,
        )
    };
    let mut seqs: Vec<_> = attn.seqs.iter().filter(|s| s.n_q > 0).collect();
    seqs.sort_by_key(|s| s.q_start);
    let mut parts = Vec::with_capacity(2 * seqs.len() + 1);
    let mut row = 0;
    for seq in seqs {
        if seq.q_start > row {
            parts.push(zeros(seq.q_start - row));
        }
        let n = seq.n_q;
        let keys = seq.visible_keys();
        let t = keys.len();
        let (k, v) = store.gather_f32(seq)?;
        let k = B::float_from_data(TensorData::new(k, [n_kv, t, d]), &device);
        let v = B::float_from_data(TensorData::new(v, [n_kv, t, d]), &device);
        let qseq = B::float_slice(
            q.clone(),
            &[
                (seq.q_start..seq.q_start + n).into(),
                (0..n_head).into(),
                (0..d).into(),
            ],
        );
        // [n, n_head, d] -> [n_kv, group * n, d]: row r of a kv head's block is query r % n.
        let qseq = B::float_reshape(
            B::float_swap_dims(qseq, 0, 1),
            Shape::new([n_kv, group * n, d]),
        );
        let scores = B::float_mul_scalar(
            B::float_matmul(qseq, B::float_swap_dims(k, 1, 2)),
            attn.scale.into(),
        );
        let mut mask = vec![0.0f32; group * n * t];
        for (r, m) in mask.chunks_mut(t).enumerate() {
            let qp = seq.n_past + r % n;
            for (j, m) in m.iter_mut().enumerate() {
                let kp = keys.start + j;
                let visible = kp <= qp && seq.window.is_none_or(|w| qp - kp < w);
                if !visible {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        let mask = B::float_from_data(TensorData::new(mask, [1, group * n, t]), &device);
        let scores = B::float_add(scores, mask);
        let max = B::float_max_dim(scores.clone(), 2);
        let e = B::float_exp(B::float_sub(scores, max));
        let z = B::float_sum_dim(e.clone(), 2);
        let out = B::float_matmul(B::float_div(e, z), v); // [n_kv, group * n, d]
        let out = B::float_swap_dims(B::float_reshape(out, Shape::new([n_head, n, d])), 0, 1);
        parts.push(B::float_reshape(out, Shape::new([n, width])));
        row = seq.q_start + n;
    }
    if row < n_rows || parts.is_empty() {
        parts.push(zeros(n_rows - row));
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        B::float_cat(parts, 0)
    })
}

/// Paged attention on any backend (see [`EmberBackend::paged_attention`]): `q: [n_rows,
/// n_head, head_dim]`, result `[n_rows, n_head * head_dim]`. Panics if `attn` does not
/// validate against `q`'s shape; [`try_paged_attention`] returns the error instead.
pub fn paged_attention(q: Tensor<3>, attn: PagedAttention) -> Tensor<2> {
    try_paged_attention(q, attn).unwrap_or_else(|e| panic!("paged_attention: {e}"))
}

/// [`paged_attention`], with an invalid call (a block id out of range, too short a table,
/// overlapping rows, ...) returned as an error before anything runs.
pub fn try_paged_attention(q: Tensor<3>, attn: PagedAttention) -> Result<Tensor<2>, PagedError> {
    let [n_rows, n_head, d] = q.dims();
    attn.validate(n_rows, n_head, d)?;
    Ok(Tensor::from_dispatch(
        <Dispatch as EmberBackend>::paged_attention(q.into_dispatch(), attn),
    ))
}

/// The generic path: dequantize the whole weight and use the backend's own matmul. Correct on
/// every backend, but it materializes an f32 copy of the weight on every call.
pub fn quant_matmul_fallback<B: Backend>(x: FloatTensor<B>, w: &QuantMatrix) -> FloatTensor<B> {
    let device = x.device();
    let weight = TensorData::new(w.dequantize_all(), [w.rows(), w.cols()]);
    let weight = B::float_from_data(weight, &device);
    B::float_matmul(x, B::float_transpose(weight))
}

/// [`quant_matmul`] with `solo[i]`, row `i`'s place in the batch it has alone (see
/// [`EmberBackend::quant_matmul_solo`]); `solo` has one entry per row of `x`.
pub fn quant_matmul_solo(x: Tensor<2>, w: &Arc<QuantMatrix>, solo: &Arc<[SoloRow]>) -> Tensor<2> {
    let [m, k] = x.dims();
    assert_eq!(
        k,
        w.cols(),
        "quant_matmul: input width must equal the weight's columns"
    );
    assert_eq!(m, solo.len(), "quant_matmul_solo: one SoloRow per row");
    Tensor::from_dispatch(<Dispatch as EmberBackend>::quant_matmul_solo(
        x.into_dispatch(),
        Arc::clone(w),
        Arc::clone(solo),
    ))
}

/// `x @ w^T` on any backend: `x: [m, k]` with `k == w.cols()`, result `[m, w.rows()]`.
pub fn quant_matmul(x: Tensor<2>, w: &Arc<QuantMatrix>) -> Tensor<2> {
    let [_, k] = x.dims();
    assert_eq!(
        k,
        w.cols(),
        "quant_matmul: input width must equal the weight's columns"
    );
    Tensor::from_dispatch(<Dispatch as EmberBackend>::quant_matmul(
        x.into_dispatch(),
        Arc::clone(w),
    ))
}

/// Rounds to f16 precision on any backend (see [`EmberBackend::round_to_f16`]).
pub fn round_to_f16<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as EmberBackend>::round_to_f16(x.into_dispatch()))
}

/// RMS norm on any backend (see [`EmberBackend::rms_norm`]).
pub fn rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f32) -> Tensor<2> {
    let [_, d] = x.dims();
    assert_eq!(
        weight.dims()[0],
        d,
        "rms_norm: weight must match the row width"
    );
    Tensor::from_dispatch(<Dispatch as EmberBackend>::rms_norm(
        x.into_dispatch(),
        weight.clone().into_dispatch(),
        eps,
    ))
}

/// Positions `start..start + n`, for [`rope`] over one sequence's rows.
pub fn positions_from(start: usize, n: usize) -> Arc<[u32]> {
    (start..start + n).map(|p| p as u32).collect()
}

/// Rotary embedding on any backend (see [`EmberBackend::rope`]).
/// Row `i` of `x: [n, heads, head_dim]` sits at `positions[i]` (a ragged batch mixes
/// sequences; [`positions_from`] gives `start..start + n`).
pub fn rope(
    x: Tensor<3>,
    positions: Arc<[u32]>,
    rope_dim: usize,
    base: f32,
    neox: bool,
) -> Tensor<3> {
    let [n, _, d] = x.dims();
    assert!(
        rope_dim <= d && rope_dim.is_multiple_of(2),
        "rope: rope_dim must be even and at most the head size"
    );
    assert_eq!(positions.len(), n, "rope: one position per row");
    Tensor::from_dispatch(<Dispatch as EmberBackend>::rope(
        x.into_dispatch(),
        positions,
        rope_dim,
        base,
        neox,
    ))
}

/// `silu(gate) * up` on any backend (see [`EmberBackend::swiglu`]).
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(gate.dims(), up.dims(), "swiglu: shapes must match");
    Tensor::from_dispatch(<Dispatch as EmberBackend>::swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// `gelu(gate) * up` on any backend (see [`EmberBackend::geglu`]).
pub fn geglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(gate.dims(), up.dims(), "geglu: shapes must match");
    Tensor::from_dispatch(<Dispatch as EmberBackend>::geglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// `a + b` on any backend (see [`EmberBackend::residual_add`]).
pub fn residual_add<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    assert_eq!(a.dims(), b.dims(), "residual_add: shapes must match");
    Tensor::from_dispatch(<Dispatch as EmberBackend>::residual_add(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)]
impl EmberBackend for burn::backend::NdArray {
    /// burn-ndarray has no f16 tensors: K and V stay f32 there (closer to exact, further from
    /// llama.cpp's rounding).
    fn round_to_f16(x: FloatTensor<Self>) -> FloatTensor<Self> {
        x
    }
}

#[cfg(feature = "flex")]
mod flex {
    use super::*;
    use burn::backend::Flex;
    use burn::backend::ops::FloatTensorOps;
    use burn_flex::FlexTensor;

    /// Types with an 8-bit integer path always use it (it is llama.cpp's arithmetic). For the
    /// others, below this many input rows a call is a memory-bound GEMV: f32 dot products off
    /// the blocks. From here up, dequantize tiles of the weight to f32 and hand them to
    /// burn-flex's GEMM, which is compute-bound and far faster per element.
    const GEMM_MIN_ROWS: usize = 8;
    /// The same for K-quants, whose Q8_K integer path (~40-50 GFLOP/s at any `m`) beats the
    /// tiled GEMM (15-43 GFLOP/s at m = 8..32, 60-95 from 64 up) on small batches.
    const KQUANT_GEMM_MIN_ROWS: usize = 64;
    /// Weight rows dequantized per GEMM tile: 256 rows x 2048 cols x 4 B = 2 MiB, cache-sized.
    const TILE_ROWS: usize = 256;

    impl EmberBackend for Flex {
        fn quant_matmul(x: FlexTensor, w: Arc<QuantMatrix>) -> FlexTensor {
            matmul(x, w, None)
        }

        fn quant_matmul_solo(
            x: FlexTensor,
            w: Arc<QuantMatrix>,
            solo: Arc<[SoloRow]>,
        ) -> FlexTensor {
            matmul(x, w, Some(&solo))
        }

        fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, scale: f32) -> FlexTensor {
            let (qs, ks) = (q.shape(), k.shape());
            let shape = crate::cpu::attention::AttnShape {
                n_head: qs[0],
                n: qs[1],
                head_dim: qs[2],
                n_kv: ks[0],
                t: ks[1],
            };
            let (q, k, v) = (contiguous_f32(q), contiguous_f32(k), contiguous_f32(v));
            let out = crate::cpu::attention::causal_attention(
                q.as_slice::<f32>().expect("contiguous f32"),
                k.as_slice::<f32>().expect("contiguous f32"),
                v.as_slice::<f32>().expect("contiguous f32"),
                shape,
                scale,
            );
            FlexTensor::from_data(TensorData::new(
                out,
                [shape.n, shape.n_head * shape.head_dim],
            ))
        }

        fn paged_attention(q: FlexTensor, attn: PagedAttention) -> FlexTensor {
            let shape = q.shape();
            let (n_rows, n_head, d) = (shape[0], shape[1], shape[2]);
            let q = contiguous_f32(q);
            let out = crate::cpu::paged_attention::paged_attention(
                q.as_slice::<f32>().expect("contiguous f32"),
                n_rows,
                n_head,
                d,
                &attn,
            )
            .unwrap_or_else(|e| panic!("paged_attention: {e}"));
            FlexTensor::from_data(TensorData::new(out, [n_rows, n_head * d]))
        }

        fn round_to_f16(x: FlexTensor) -> FlexTensor {
            let shape = x.shape();
            let x = contiguous_f32(x);
            let mut out = x.as_slice::<f32>().expect("contiguous f32").to_vec();
            // Whole-slice conversions (F16C where the CPU has it), not one call per value.
            let mut tmp = vec![half::f16::ZERO; out.len()];
            crate::cpu::attention::round_slice(&mut out, &mut tmp);
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f32) -> FlexTensor {
            let shape = x.shape();
            let (x, weight) = (contiguous_f32(x), contiguous_f32(weight));
            let out = crate::cpu::fused::rms_norm(
                x.as_slice::<f32>().expect("contiguous f32"),
                weight.as_slice::<f32>().expect("contiguous f32"),
                eps,
            );
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn rope(
            x: FlexTensor,
            positions: Arc<[u32]>,
            rope_dim: usize,
            base: f32,
            neox: bool,
        ) -> FlexTensor {
            let shape = x.shape();
            let x = contiguous_f32(x);
            let out = crate::cpu::fused::rope(
                x.as_slice::<f32>().expect("contiguous f32"),
                shape[1],
                shape[2],
                &positions,
                rope_dim,
                base,
                neox,
            );
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
            let shape = gate.shape();
            let (gate, up) = (contiguous_f32(gate), contiguous_f32(up));
            let out = crate::cpu::fused::swiglu(
                gate.as_slice::<f32>().expect("contiguous f32"),
                up.as_slice::<f32>().expect("contiguous f32"),
            );
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn geglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
            let shape = gate.shape();
            let (gate, up) = (contiguous_f32(gate), contiguous_f32(up));
            let out = crate::cpu::fused::geglu(
                gate.as_slice::<f32>().expect("contiguous f32"),
                up.as_slice::<f32>().expect("contiguous f32"),
            );
            FlexTensor::from_data(TensorData::new(out, shape))
        }

        fn residual_add(a: FlexTensor, b: FlexTensor) -> FlexTensor {
            let shape = a.shape();
            let (a, b) = (contiguous_f32(a), contiguous_f32(b));
            let out = crate::cpu::fused::add(
                a.as_slice::<f32>().expect("contiguous f32"),
                b.as_slice::<f32>().expect("contiguous f32"),
            );
            FlexTensor::from_data(TensorData::new(out, shape))
        }
    }

    /// The flex `quant_matmul`, with rows' solo shapes when given.
    fn matmul(x: FlexTensor, w: Arc<QuantMatrix>, solo: Option<&Arc<[SoloRow]>>) -> FlexTensor {
        let shape = x.shape();
        let (m, n) = (shape[0], w.rows());
        let ty = w.ggml_type();
        let gemm_min = if crate::cpu::kquant::supported(ty) {
            KQUANT_GEMM_MIN_ROWS
        } else {
            GEMM_MIN_ROWS
        };
        // Q4_K and Q6_K keep llama.cpp's integer arithmetic at every batch size (their
        // results are its bits); the other K-quants and the float types use the GEMM.
        let exact = matches!(
            ty,
            ember_quant::GgmlType::Q4_K | ember_quant::GgmlType::Q6_K
        );
        if m >= gemm_min && crate::cpu::q8::act_format(ty).is_none() && !exact {
            return tiled_gemm(x, &w, m, n);
        }
        let x = contiguous_f32(x);
        let xs = x.as_slice::<f32>().expect("contiguous f32");
        let out = crate::cpu::quant_matmul_rows_solo(&w, xs, m, solo);
        FlexTensor::from_data(TensorData::new(out, [m, n]))
    }

    fn contiguous_f32(x: FlexTensor) -> FlexTensor {
        if x.as_slice::<f32>().is_some() {
            x
        } else {
            x.to_contiguous()
        }
    }

    fn tiled_gemm(x: FlexTensor, w: &QuantMatrix, m: usize, n: usize) -> FlexTensor {
        let k = w.cols();
        let mut out = vec![0.0f32; m * n];
        for start in (0..n).step_by(TILE_ROWS) {
            let rows = TILE_ROWS.min(n - start);
            // Dequantize straight into the buffer the tensor takes over: no second copy.
            let mut tile = vec![0.0f32; rows * k];
            w.dequantize_rows_into(start, &mut tile);
            let wt = FlexTensor::from_data(TensorData::new(tile, [rows, k]));
            let y = Flex::float_matmul(x.clone(), Flex::float_transpose(wt));
            let y = contiguous_f32(y);
            let ys = y.as_slice::<f32>().expect("contiguous f32");
            for i in 0..m {
                out[i * n + start..i * n + start + rows]
                    .copy_from_slice(&ys[i * rows..(i + 1) * rows]);
            }
        }
        FlexTensor::from_data(TensorData::new(out, [m, n]))
    }
}
