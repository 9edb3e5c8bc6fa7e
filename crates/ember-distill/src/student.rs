//! The differentiable llama-family student.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use ember_formats::GgufFile;
use ember_models::{ModelConfig, RopeMode};

use crate::DistillError;

/// The student's hyper-parameters: the teacher's, with its own layer count.
#[derive(Clone, Debug, PartialEq)]
pub struct StudentConfig {
    /// Transformer blocks.
    pub n_layer: usize,
    /// Hidden width.
    pub n_embd: usize,
    /// Feed-forward hidden units.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (divides `n_head`).
    pub n_head_kv: usize,
    /// Size of each head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Dimensions of each head RoPE rotates (even, at most `head_dim`).
    pub rope_dim: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

impl StudentConfig {
    fn from_model(c: &ModelConfig, n_layer: usize, n_ff: usize) -> Self {
        Self {
            n_layer,
            n_embd: c.n_embd,
            n_ff,
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            n_vocab: c.n_vocab,
            rope_dim: c.rope_dim,
            rope_base: c.rope_base,
            rms_eps: c.rms_eps,
        }
    }
}

/// One transformer block. Matrices are `[out, in]`, as GGUF rows are (and as Ember's
/// inference model reads them), so a student's tensors export without a transpose.
#[derive(Module, Debug)]
pub struct Block {
    attn_norm: Param<Tensor<1>>,
    wq: Param<Tensor<2>>,
    wk: Param<Tensor<2>>,
    wv: Param<Tensor<2>>,
    wo: Param<Tensor<2>>,
    ffn_norm: Param<Tensor<1>>,
    w_gate: Param<Tensor<2>>,
    w_up: Param<Tensor<2>>,
    w_down: Param<Tensor<2>>,
}

/// A llama-architecture model in plain burn ops (differentiable under burn's autodiff): the
/// student of a distillation. It computes what `ember-models`' `llama` computes — pre-norm
/// blocks of GQA attention with RoPE in GGUF's row order (pairs `(2i, 2i+1)`, llama.cpp's
/// `ROPE_TYPE_NORM`) and a SwiGLU feed-forward — in f32 throughout (the inference model keeps
/// its KV cache in f16 and may quantize activations, so the two agree to that rounding).
#[derive(Module, Debug)]
pub struct Student {
    token_embd: Param<Tensor<2>>,
    /// The output head; `None` when tied to `token_embd`.
    output: Option<Param<Tensor<2>>>,
    output_norm: Param<Tensor<1>>,
    blocks: Vec<Block>,
    #[module(skip)]
    config: StudentConfig,
}

/// A teacher tensor dequantized to f32, with its GGUF dims checked.
fn teacher_tensor(file: &GgufFile, name: &str, dims: &[usize]) -> Result<Vec<f32>, DistillError> {
    let bad = |why: String| DistillError::Tensor {
        name: name.to_string(),
        why,
    };
    let info = file.tensor(name).ok_or_else(|| bad("missing".into()))?;
    let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
    if info.dims != want {
        return Err(bad(format!("dims {:?}, expected {want:?}", info.dims)));
    }
    let n: usize = dims.iter().product();
    let mut out = vec![0f32; n];
    ember_quant::dequantize(info.ggml_type, file.tensor_data(info), &mut out)
        .map_err(|e| bad(e.to_string()))?;
    Ok(out)
}

fn param2(values: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::from_data(
        TensorData::new(values, [rows, cols]),
        device,
    ))
}

fn param1(values: Vec<f32>, device: &Device) -> Param<Tensor<1>> {
    let n = values.len();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, [n]), device))
}

/// The feed-forward cut to `n_ff` of its `ff` units (all of them when `n_ff == ff`): `gate`
/// and `up` are `[ff, d]`, `down` `[d, ff]`, row-major; the units kept are those with the
/// largest product of their three norms, in their original order.
fn narrow_ffn(
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
    d: usize,
    ff: usize,
    n_ff: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if n_ff == ff {
        return (gate, up, down);
    }
    let norm = |xs: &mut dyn Iterator<Item = f32>| xs.map(|x| f64::from(x).powi(2)).sum::<f64>();
    let mut score: Vec<(f64, usize)> = (0..ff)
        .map(|j| {
            let g = norm(&mut gate[j * d..(j + 1) * d].iter().copied());
            let u = norm(&mut up[j * d..(j + 1) * d].iter().copied());
            let w = norm(&mut (0..d).map(|r| down[r * ff + j]));
            let score = (g * u * w).sqrt();
            // A NaN (from a non-finite weight) counts as the least important.
            (
                if score.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    score
                },
                j,
            )
        })
        .collect();
    // Highest first; ties to the lower unit.
    score.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut units: Vec<usize> = score[..n_ff].iter().map(|&(_, j)| j).collect();
    units.sort_unstable();
    let rows = |m: &[f32]| -> Vec<f32> {
        units
            .iter()
            .flat_map(|&j| m[j * d..(j + 1) * d].iter().copied())
            .collect()
    };
    let down_cols: Vec<f32> = (0..d)
        .flat_map(|r| units.iter().map(move |&j| (r, j)))
        .map(|(r, j)| down[r * ff + j])
        .collect();
    (rows(&gate), rows(&up), down_cols)
}

/// `x @ w^T` for `x: [b, t, in]` and `w: [out, in]`.
fn linear(x: Tensor<3>, w: &Param<Tensor<2>>) -> Tensor<3> {
    x.matmul(w.val().transpose().unsqueeze::<3>())
}

/// `x * w / sqrt(mean(x^2) + eps)` over the last dim.
fn rms_norm(x: Tensor<3>, w: &Param<Tensor<1>>, eps: f32) -> Tensor<3> {
    let ms = x.clone().powf_scalar(2.0).mean_dim(2);
    x.mul(ms.add_scalar(eps).sqrt().recip())
        .mul(w.val().unsqueeze::<3>())
}

impl Student {
    /// A student of the teacher's layers `keep` (in the order given: block `i` of the student
    /// is the teacher's block `keep[i]`), with the teacher's embeddings, output norm and head,
    /// everything dequantized to f32 on `device`.
    pub fn from_teacher(
        file: &GgufFile,
        keep: &[usize],
        device: &Device,
    ) -> Result<Self, DistillError> {
        Self::from_teacher_narrow(file, keep, None, device)
    }

    /// [`from_teacher`](Self::from_teacher) with, when `n_ff` is given, a narrower
    /// feed-forward: each block keeps the `n_ff` hidden units of the teacher's with the
    /// largest `|gate_j| * |up_j| * |down_j|` (the norms of the unit's gate and up rows and
    /// its down column: a cheap estimate of what the unit contributes), in their order.
    pub fn from_teacher_narrow(
        file: &GgufFile,
        keep: &[usize],
        n_ff: Option<usize>,
        device: &Device,
    ) -> Result<Self, DistillError> {
        let arch = file.architecture().unwrap_or("").to_string();
        if arch != "llama" {
            return Err(DistillError::UnsupportedArchitecture(arch));
        }
        let c = ModelConfig::from_gguf(file)?;
        // The student rotates with plain RoPE: a teacher that scales it is refused rather
        // than imitated wrongly.
        if file.tensor("rope_freqs.weight").is_some() {
            return Err(DistillError::UnsupportedArchitecture(
                "llama with rope_freqs.weight (Llama 3.1-style rope scaling)".into(),
            ));
        }
        if let Some(kind) = file.get_str("llama.rope.scaling.type")
            && kind != "none"
        {
            return Err(DistillError::UnsupportedArchitecture(format!(
                "llama with '{kind}' rope scaling"
            )));
        }
        if c.rope_freq_scale != 1.0 {
            return Err(DistillError::UnsupportedArchitecture(format!(
                "llama with linear rope scaling (freq_scale {})",
                c.rope_freq_scale
            )));
        }
        // The student's blocks have no biases and no fused Q/K/V: a teacher with them (which
        // llama.cpp's loader and ember-models take) is refused rather than copied without them.
        if let Some(t) = file
            .tensors()
            .iter()
            .find(|t| t.name.ends_with(".bias") || t.name.contains(".attn_qkv."))
        {
            return Err(DistillError::UnsupportedArchitecture(format!(
                "llama with {} (the student has no biases or fused Q/K/V)",
                t.name
            )));
        }
        if c.rope_mode != RopeMode::Normal {
            return Err(DistillError::UnsupportedArchitecture(format!(
                "{arch} with {:?} rope",
                c.rope_mode
            )));
        }
        if keep.is_empty() {
            return Err(DistillError::Layers("no layer chosen".into()));
        }
        if let Some(&bad) = keep.iter().find(|&&l| l >= c.n_layer) {
            return Err(DistillError::Layers(format!(
                "layer {bad} is not among the teacher's {}",
                c.n_layer
            )));
        }
        let ff = c.n_ff;
        let n_ff = n_ff.unwrap_or(ff);
        if n_ff == 0 || n_ff > ff {
            return Err(DistillError::Layers(format!(
                "a feed-forward width of {n_ff}: it must be between 1 and the teacher's {ff}"
            )));
        }
        let config = StudentConfig::from_model(&c, keep.len(), n_ff);
        let (d, hd) = (c.n_embd, c.head_dim);
        let (nq, nkv) = (c.n_head * hd, c.n_head_kv * hd);
        let m = |name: &str, rows: usize, cols: usize| {
            teacher_tensor(file, name, &[cols, rows]).map(|v| param2(v, rows, cols, device))
        };
        let raw = |name: &str, rows: usize, cols: usize| teacher_tensor(file, name, &[cols, rows]);
        let v =
            |name: &str, len: usize| teacher_tensor(file, name, &[len]).map(|v| param1(v, device));
        let mut blocks = Vec::with_capacity(keep.len());
        for &l in keep {
            let n = |t: &str| format!("blk.{l}.{t}.weight");
            let (gate, up, down) = narrow_ffn(
                raw(&n("ffn_gate"), ff, d)?,
                raw(&n("ffn_up"), ff, d)?,
                raw(&n("ffn_down"), d, ff)?,
                d,
                ff,
                n_ff,
            );
            blocks.push(Block {
                attn_norm: v(&n("attn_norm"), d)?,
                wq: m(&n("attn_q"), nq, d)?,
                wk: m(&n("attn_k"), nkv, d)?,
                wv: m(&n("attn_v"), nkv, d)?,
                wo: m(&n("attn_output"), d, nq)?,
                ffn_norm: v(&n("ffn_norm"), d)?,
                w_gate: param2(gate, n_ff, d, device),
                w_up: param2(up, n_ff, d, device),
                w_down: param2(down, d, n_ff, device),
            });
        }
        let output = if file.tensor("output.weight").is_some() {
            Some(m("output.weight", c.n_vocab, d)?)
        } else {
            None
        };
        Ok(Self {
            token_embd: m("token_embd.weight", c.n_vocab, d)?,
            output,
            output_norm: v("output_norm.weight", d)?,
            blocks,
            config,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &StudentConfig {
        &self.config
    }

    /// The RoPE angles' cosines and sines, `[t, rope_dim / 2]` each, for positions `0..t`:
    /// pair `i` turns by `pos * base^(-2i / rope_dim)`.
    fn rope_tables(&self, t: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let c = &self.config;
        let half = c.rope_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for pos in 0..t {
            for i in 0..half {
                let freq = (c.rope_base as f64).powf(-2.0 * i as f64 / c.rope_dim as f64);
                let a = pos as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [t, half]), device),
            Tensor::from_data(TensorData::new(sin, [t, half]), device),
        )
    }

    /// Rotates `x: [b, heads, t, head_dim]` in GGUF llama's pairing (`(2i, 2i+1)` over the
    /// first `rope_dim` dims; the rest pass through).
    fn rope(&self, x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
        let [b, h, t, hd] = x.dims();
        let rd = self.config.rope_dim;
        let (rot, pass) = if rd < hd {
            (x.clone().narrow(3, 0, rd), Some(x.narrow(3, rd, hd - rd)))
        } else {
            (x, None)
        };
        let pairs = rot.reshape([b, h, t, rd / 2, 2]);
        let x0 = pairs.clone().narrow(4, 0, 1).reshape([b, h, t, rd / 2]);
        let x1 = pairs.narrow(4, 1, 1).reshape([b, h, t, rd / 2]);
        let c = cos.clone().unsqueeze::<4>();
        let s = sin.clone().unsqueeze::<4>();
        let y0 = x0.clone() * c.clone() - x1.clone() * s.clone();
        let y1 = x0 * s + x1 * c;
        let y = Tensor::stack::<5>(vec![y0, y1], 4).reshape([b, h, t, rd]);
        match pass {
            Some(p) => Tensor::cat(vec![y, p], 3),
            None => y,
        }
    }

    /// Logits `[b, t, n_vocab]` for token ids `tokens: [b, t]`, each position attending to
    /// itself and the positions before it.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let c = &self.config;
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let (hd, nh, nkv) = (c.head_dim, c.n_head, c.n_head_kv);
        let ids = tokens.reshape([b * t]);
        let mut x = self
            .token_embd
            .val()
            .select(0, ids)
            .reshape([b, t, c.n_embd]);
        let (cos, sin) = self.rope_tables(t, &device);
        // `tril_mask` is false on and below the diagonal, true above it: the later positions
        // each row must not see.
        let future = Tensor::<2, Bool>::tril_mask([t, t], 0, &device).unsqueeze::<4>();
        let scale = 1.0 / (hd as f32).sqrt();
        let rep = nh / nkv;
        for blk in &self.blocks {
            let h = rms_norm(x.clone(), &blk.attn_norm, c.rms_eps);
            let heads = |y: Tensor<3>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
            let q = self.rope(heads(linear(h.clone(), &blk.wq), nh), &cos, &sin);
            let k = self.rope(heads(linear(h.clone(), &blk.wk), nkv), &cos, &sin);
            let v = heads(linear(h, &blk.wv), nkv);
            // GQA: K/V head j serves query heads j*rep .. (j+1)*rep.
            let expand = |y: Tensor<4>| {
                y.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, rep)
                    .reshape([b, nh, t, hd])
            };
            let (k, v) = (expand(k), expand(v));
            let scores = q
                .matmul(k.swap_dims(2, 3))
                .mul_scalar(scale)
                .mask_fill(future.clone(), f32::NEG_INFINITY);
            let attn = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([b, t, nh * hd]);
            x = x + linear(attn, &blk.wo);
            let h = rms_norm(x.clone(), &blk.ffn_norm, c.rms_eps);
            let ffn = silu(linear(h.clone(), &blk.w_gate)) * linear(h, &blk.w_up);
            x = x + linear(ffn, &blk.w_down);
        }
        let h = rms_norm(x, &self.output_norm, c.rms_eps);
        let head = self.output.as_ref().unwrap_or(&self.token_embd);
        linear(h, head)
    }

    /// Every tensor under its GGUF name with its GGUF dims (`[cols, rows]` for matrices),
    /// row-major f32: what [`crate::export_gguf`] writes.
    pub fn tensors(&self) -> Vec<(String, Vec<u64>, Vec<f32>)> {
        fn values<const D: usize>(p: &Param<Tensor<D>>) -> (Vec<u64>, Vec<f32>) {
            let t = p.val();
            let mut dims: Vec<u64> = t.dims().iter().map(|&d| d as u64).collect();
            dims.reverse();
            let data = t.into_data().convert::<f32>();
            (dims, data.try_to_vec::<f32>().unwrap_or_default())
        }
        let mut out = Vec::new();
        let mut push = |name: String, (dims, v): (Vec<u64>, Vec<f32>)| out.push((name, dims, v));
        push("token_embd.weight".into(), values(&self.token_embd));
        for (i, b) in self.blocks.iter().enumerate() {
            let n = |t: &str| format!("blk.{i}.{t}.weight");
            push(n("attn_norm"), values(&b.attn_norm));
            push(n("attn_q"), values(&b.wq));
            push(n("attn_k"), values(&b.wk));
            push(n("attn_v"), values(&b.wv));
            push(n("attn_output"), values(&b.wo));
            push(n("ffn_norm"), values(&b.ffn_norm));
            push(n("ffn_gate"), values(&b.w_gate));
            push(n("ffn_up"), values(&b.w_up));
            push(n("ffn_down"), values(&b.w_down));
        }
        push("output_norm.weight".into(), values(&self.output_norm));
        if let Some(o) = &self.output {
            push("output.weight".into(), values(o));
        }
        out
    }
}
