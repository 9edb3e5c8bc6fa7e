//! Building blocks shared by architectures, as llama.cpp's graph builders share `build_qkv`,
//! `build_attn` and `build_ffn`: the attention sub-layer with its projections, RoPE and cache
//! write ([`Attention`]), the gated feed-forward ([`GatedFfn`]), and the pre-norm decoder that
//! runs them ([`Decoder`]). An architecture is what it loads into them ([`DecoderSpec`]). The
//! arithmetic lives in `ember_kernels`, fused on burn-flex, in CubeCL on a GPU, and built from
//! plain burn ops on other backends.

use std::sync::Arc;

use burn::tensor::Tensor;
use ember_kernels::{QuantMatrix, RopeScaling, geglu, residual_add, swiglu};

use crate::model::Pass;
use crate::trace;

use crate::{ModelConfig, ModelError, RopeMode, Weights};

/// `x * w / sqrt(mean(x^2) + eps)` over the last dimension of `x: [n, d]`.
pub fn rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f32) -> Tensor<2> {
    ember_kernels::rms_norm(x, weight, eps)
}

/// Rotates the first `rope_dim` dimensions of every head of `x: [n, heads, head_dim]`, whose
/// row `i` sits at position `positions[i]` (a ragged batch mixes sequences).
///
/// Angles are computed in f32 with the same recurrence as ggml (`theta *= theta_scale` per
/// pair) so our rounding follows llama.cpp's rather than an exact f64 value.
/// `scaling` scales the angles as ggml's `ggml_rope_ext` does (frequency factors, linear
/// scaling).
pub fn rope(
    x: Tensor<3>,
    positions: &Arc<[u32]>,
    rope_dim: usize,
    base: f32,
    scaling: &RopeScaling,
    mode: RopeMode,
) -> Tensor<3> {
    ember_kernels::rope(
        x,
        Arc::clone(positions),
        rope_dim,
        base,
        scaling.clone(),
        mode == RopeMode::Neox,
    )
}

/// A linear layer `x @ w^T + b`, the bias optional.
pub struct Linear {
    pub w: Arc<QuantMatrix>,
    pub b: Option<Tensor<1>>,
}

impl Linear {
    /// The `rows x cols` weight `{name}.weight`, and its `{name}.bias` when `bias` allows one
    /// and the file has it.
    pub fn load(
        w: &Weights<'_>,
        name: &str,
        rows: usize,
        cols: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            w: w.matrix(&format!("{name}.weight"), rows, cols)?,
            b: if bias {
                w.optional_vector(&format!("{name}.bias"), rows)?
            } else {
                None
            },
        })
    }

    /// The bias added to the product `y`, writing the product as `name` and, with a bias, the
    /// sum as `{name}_b` for [`trace`] (llama.cpp's `build_ffn` names them so).
    fn bias_traced(&self, y: Tensor<2>, name: &str, layer: Option<usize>) -> Tensor<2> {
        trace::tensor(name, layer, &y);
        let y = self.bias(y);
        if self.b.is_some() && trace::enabled() {
            trace::tensor(&format!("{name}_b"), layer, &y);
        }
        y
    }

    /// `x: [n, w.cols()]` to `[n, w.rows()]`, with the arithmetic `pass` keeps for its rows.
    pub fn forward(&self, x: Tensor<2>, pass: &Pass<'_>) -> Tensor<2> {
        self.bias(pass.matmul(x, &self.w))
    }

    /// The bias added to the product `y`.
    fn bias(&self, y: Tensor<2>) -> Tensor<2> {
        match &self.b {
            // A `[1, rows]` bias broadcast over the rows, as ggml_add does.
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }

    /// [`forward`](Self::forward) of the same `x` through several layers, their products
    /// computed as one call ([`Pass::matmul_many`]).
    fn forward_many<const N: usize>(
        layers: [&Linear; N],
        x: Tensor<2>,
        pass: &Pass<'_>,
    ) -> [Tensor<2>; N] {
        let mut ys = Self::products_many(layers, x, pass).into_iter();
        layers.map(|l| l.bias(ys.next().expect("one product per layer")))
    }

    /// The products (before the biases) of [`forward_many`](Self::forward_many).
    fn products_many<const N: usize>(
        layers: [&Linear; N],
        x: Tensor<2>,
        pass: &Pass<'_>,
    ) -> [Tensor<2>; N] {
        let ws = layers.map(|l| Arc::clone(&l.w));
        pass.matmul_many(x, &ws)
            .try_into()
            .expect("one product per weight")
    }
}

/// Q, K and V projections loaded as llama.cpp's `create_tensor_qkv` does: one fused
/// `attn_qkv` (Q rows, then K, then V) if the file has it, else `attn_q`/`attn_k`/`attn_v`;
/// biases optional either way (`attn_qkv.bias`, or separate ones next to a fused weight).
pub struct QkvProj {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
}

impl QkvProj {
    /// Layer `layer`'s projections from `n_embd` to `n_q`, `n_k` and `n_v` outputs.
    pub fn load(
        w: &Weights<'_>,
        layer: usize,
        n_embd: usize,
        [n_q, n_k, n_v]: [usize; 3],
    ) -> Result<Self, ModelError> {
        let name = |t: &str| format!("blk.{layer}.{t}");
        let bias = |t: &str, len: usize| w.optional_vector(&name(&format!("{t}.bias")), len);
        let fused = name("attn_qkv.weight");
        if !w.has(&fused) {
            let part = |t: &str, rows: usize| -> Result<Linear, ModelError> {
                Ok(Linear {
                    w: w.matrix(&name(&format!("{t}.weight")), rows, n_embd)?,
                    b: bias(t, rows)?,
                })
            };
            return Ok(Self {
                q: part("attn_q", n_q)?,
                k: part("attn_k", n_k)?,
                v: part("attn_v", n_v)?,
            });
        }
        let total = n_q + n_k + n_v;
        let parts = [0..n_q, n_q..n_q + n_k, n_q + n_k..total];
        let biases: [Option<Tensor<1>>; 3] = match bias("attn_qkv", total)? {
            Some(all) => parts.clone().map(|p| Some(all.clone().slice([p]))),
            None => {
                // llama.cpp adds separate biases to a fused weight only when all three exist.
                let (bq, bk, bv) = (
                    bias("attn_q", n_q)?,
                    bias("attn_k", n_k)?,
                    bias("attn_v", n_v)?,
                );
                if bq.is_some() && bk.is_some() && bv.is_some() {
                    [bq, bk, bv]
                } else {
                    [None, None, None]
                }
            }
        };
        let [bq, bk, bv] = biases;
        let [pq, pk, pv] = parts;
        Ok(Self {
            q: Linear {
                w: w.matrix_rows(&fused, total, n_embd, pq)?,
                b: bq,
            },
            k: Linear {
                w: w.matrix_rows(&fused, total, n_embd, pk)?,
                b: bk,
            },
            v: Linear {
                w: w.matrix_rows(&fused, total, n_embd, pv)?,
                b: bv,
            },
        })
    }

    /// `(q, k, v)` for `h: [n, n_embd]`, each `[n, outputs]`.
    pub fn forward(&self, h: Tensor<2>, pass: &Pass<'_>) -> (Tensor<2>, Tensor<2>, Tensor<2>) {
        let [q, k, v] = Linear::forward_many([&self.q, &self.k, &self.v], h, pass);
        (q, k, v)
    }
}

/// RMS norm of every head's vector of `x: [n, heads * head_dim]` with the shared `weight:
/// [head_dim]` (QK-norm), giving `[n, heads, head_dim]`.
pub fn head_rms_norm(x: Tensor<2>, heads: usize, weight: &Tensor<1>, eps: f32) -> Tensor<3> {
    let [n, _] = x.dims();
    let hd = weight.dims()[0];
    rms_norm(x.reshape([n * heads, hd]), weight, eps).reshape([n, heads, hd])
}

/// The activation of a gated feed-forward, `act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// SiLU: llama.cpp's `ggml_swiglu` (llama, qwen2, qwen3, phi3).
    Silu,
    /// GELU, tanh form: llama.cpp's `ggml_geglu` (gemma3).
    Gelu,
}

/// Where attention's `1 / sqrt(head_dim)` (or the model's own scale) is applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QueryScale {
    /// Inside attention, on the scores: llama.cpp's `kq_scale` (llama, qwen2, qwen3).
    InAttention(f32),
    /// On Q after RoPE, attention then at scale 1, as llama.cpp's phi3 and gemma3 graphs do:
    /// the f16 rounding of Q sees the scaled values, so the two are not the same bits.
    OnQuery(f32),
}

/// A block's self-attention: pre-norm, Q/K/V projections, optional per-head Q/K norms, RoPE,
/// the cache write and paged attention ([`Pass::attend`]), the output projection, and an
/// optional norm of its output (Gemma's post-attention norm).
pub struct Attention {
    pub norm: Tensor<1>,
    pub qkv: QkvProj,
    /// Per-head RMS norms of Q and K before RoPE (QK-norm: qwen3, gemma3).
    pub qk_norm: Option<(Tensor<1>, Tensor<1>)>,
    pub wo: Linear,
    pub post_norm: Option<Tensor<1>>,
    /// RoPE's base frequency for this layer (Gemma's window layers have their own).
    pub rope_base: f32,
    /// How this layer's RoPE angles are scaled: per-pair divisors (`rope_freqs.weight`: Llama
    /// 3.1-style scaling, which the converter writes as this tensor and no metadata key) and
    /// linear scaling.
    pub rope_scaling: RopeScaling,
    /// `Some(window)` on a sliding-window layer.
    pub window: Option<usize>,
}

/// A block's gated feed-forward: pre-norm, `down(act(gate(h)) * up(h))`, and an optional norm
/// of its output (Gemma's post-feed-forward norm).
pub struct GatedFfn {
    pub norm: Tensor<1>,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub post_norm: Option<Tensor<1>>,
}

/// One pre-norm decoder block: `x + attn(x)`, then `x + ffn(x)`.
pub struct Block {
    pub attn: Attention,
    pub ffn: GatedFfn,
}

/// What distinguishes one architecture's blocks from another's: which optional weights it
/// loads and how it scales and activates. Everything else is [`Decoder`]'s, shared.
#[derive(Clone, Copy, Debug)]
pub struct DecoderSpec {
    /// Per-head Q and K norms (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// Norms of the attention and feed-forward outputs (`post_attention_norm`,
    /// `post_ffw_norm`).
    pub post_norms: bool,
    /// Optional biases on the output and feed-forward projections (`attn_output.bias`,
    /// `ffn_{gate,up,down}.bias`), as llama.cpp's `llama` loader takes them. Q/K/V biases are
    /// [`QkvProj`]'s, optional for every architecture as in llama.cpp's `create_tensor_qkv`.
    pub projection_biases: bool,
    /// RoPE frequency factors from `rope_freqs.weight` when the file has it (llama.cpp's
    /// `llama` loader; one tensor shared by every layer).
    pub rope_factors: bool,
    /// A feed-forward whose `ffn_up` holds the gate rows and then the up rows when the file has
    /// no `ffn_gate` (Phi-3).
    pub fused_gate_up: bool,
    pub gate: Gate,
    pub query_scale: QueryScale,
}

/// One layer's attention window and RoPE parameters, as an architecture places them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerRope {
    /// `Some(window)` on a sliding-window layer.
    pub window: Option<usize>,
    /// RoPE's base frequency.
    pub base: f32,
    /// Linear scaling's `1 / factor` ([`ModelConfig::rope_freq_scale`], or 1 where the
    /// architecture does not scale this layer).
    pub freq_scale: f32,
}

impl LayerRope {
    /// Every layer alike: full attention, the file's base and linear scaling.
    pub fn uniform(config: &ModelConfig) -> impl Fn(usize) -> LayerRope + '_ {
        |_| LayerRope {
            window: None,
            base: config.rope_base,
            freq_scale: config.rope_freq_scale,
        }
    }
}

impl DecoderSpec {
    /// The plain llama block (qwen2's too): no QK-norm or post-norms, Q/K/V biases only if the
    /// file has them, SiLU gate, attention scaled by `1 / sqrt(head_dim)` on the scores. Other
    /// architectures say how they differ with struct update syntax.
    pub fn plain(config: &ModelConfig) -> Self {
        Self {
            qk_norm: false,
            post_norms: false,
            projection_biases: false,
            rope_factors: false,
            fused_gate_up: false,
            gate: Gate::Silu,
            query_scale: QueryScale::InAttention(1.0 / (config.head_dim as f32).sqrt()),
        }
    }
}

/// The blocks of a pre-norm decoder-only transformer, shared by every architecture here.
pub struct Decoder {
    config: ModelConfig,
    spec: DecoderSpec,
    blocks: Vec<Block>,
}

impl Decoder {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`;
    /// `layer_rope(i)` gives layer `i`'s window and RoPE parameters.
    pub fn load(
        w: &Weights<'_>,
        config: &ModelConfig,
        spec: DecoderSpec,
        layer_rope: impl Fn(usize) -> LayerRope,
    ) -> Result<Self, ModelError> {
        let c = config;
        let (d, hd, n_ff) = (c.n_embd, c.head_dim, c.n_ff);
        const ROPE_FREQS: &str = "rope_freqs.weight";
        let rope_factors: Option<Arc<[f32]>> = if spec.rope_factors && w.has(ROPE_FREQS) {
            let factors = w.host_vector(ROPE_FREQS, c.rope_dim / 2)?;
            // ggml divides by them: a zero, negative or non-finite factor is a broken file.
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(ModelError::BadMetadata {
                    key: ROPE_FREQS.into(),
                    value: bad.to_string(),
                    expected: "positive and finite (each divides a RoPE angle)".into(),
                });
            }
            Some(factors.into())
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let name = |t: &str| format!("blk.{i}.{t}");
            let linear = |t: &str, rows: usize, cols: usize| -> Result<Linear, ModelError> {
                Linear::load(w, &name(t), rows, cols, spec.projection_biases)
            };
            let norm = |t: &str, len: usize| w.vector(&name(&format!("{t}.weight")), len);
            let LayerRope {
                window,
                base: rope_base,
                freq_scale,
            } = layer_rope(i);
            let qk_norm = if spec.qk_norm {
                Some((norm("attn_q_norm", hd)?, norm("attn_k_norm", hd)?))
            } else {
                None
            };
            let attn = Attention {
                norm: norm("attn_norm", d)?,
                qkv: QkvProj::load(w, i, d, [c.n_head * hd, c.n_head_kv * hd, c.n_head_kv * hd])?,
                qk_norm,
                wo: linear("attn_output", d, c.n_head * hd)?,
                post_norm: if spec.post_norms {
                    Some(norm("post_attention_norm", d)?)
                } else {
                    None
                },
                rope_base,
                rope_scaling: RopeScaling {
                    factors: rope_factors.clone(),
                    freq_scale,
                },
                window,
            };
            let up = name("ffn_up.weight");
            // GGUF fuses Phi-3's gate and up (`ffn_up`, 2 n_ff rows); a checkpoint directory
            // run without converting supplies them split (ember-convert's checkpoint image).
            let (gate, up) = if spec.fused_gate_up && !w.has(&name("ffn_gate.weight")) {
                let half = |rows| -> Result<Linear, ModelError> {
                    Ok(Linear {
                        w: w.matrix_rows(&up, 2 * n_ff, d, rows)?,
                        b: None,
                    })
                };
                (half(0..n_ff)?, half(n_ff..2 * n_ff)?)
            } else {
                (linear("ffn_gate", n_ff, d)?, linear("ffn_up", n_ff, d)?)
            };
            let ffn = GatedFfn {
                norm: norm("ffn_norm", d)?,
                gate,
                up,
                down: linear("ffn_down", d, n_ff)?,
                post_norm: if spec.post_norms {
                    Some(norm("post_ffw_norm", d)?)
                } else {
                    None
                },
            };
            blocks.push(Block { attn, ffn });
        }
        Ok(Self {
            config: config.clone(),
            spec,
            blocks,
        })
    }

    /// Each layer's attention window (`None`: full causal attention).
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        self.blocks.iter().map(|b| b.attn.window).collect()
    }

    /// Runs `x: [rows, n_embd]` through the first [`Pass::layers`] blocks, indexed by their
    /// true layer so per-layer windows, RoPE and cache layers stay theirs (a self-speculative
    /// draft runs only the first ones), calling [`Pass::select_outputs`] in the last.
    pub fn forward(&self, mut x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        let last = pass.layers().min(self.blocks.len());
        for (layer, b) in self.blocks.iter().enumerate().take(last) {
            let l = Some(layer);
            x = pass.enter(layer, x);
            let mut attn = self.attention(layer, &b.attn, x.clone(), pass)?;
            if layer + 1 == last {
                (attn, x) = pass.select_outputs(attn, x);
            }
            x = match &b.attn.post_norm {
                Some(post) => {
                    let attn = rms_norm(attn, post, self.config.rms_eps);
                    trace::tensor("attn_post_norm", l, &attn);
                    let x = residual_add(attn, x);
                    trace::tensor("sa_out", l, &x);
                    x
                }
                None => {
                    let x = residual_add(attn, x);
                    trace::tensor("ffn_inp", l, &x);
                    x
                }
            };
            let ffn = self.feed_forward(layer, &b.ffn, x.clone(), pass);
            x = residual_add(ffn, x);
            trace::tensor("l_out", l, &x);
        }
        Ok(x)
    }

    /// The attention sub-layer's output (before its post-norm, if any) for residual `x`.
    fn attention(
        &self,
        layer: usize,
        a: &Attention,
        x: Tensor<2>,
        pass: &mut Pass<'_>,
    ) -> Result<Tensor<2>, ModelError> {
        let c = &self.config;
        let (n, hd, l) = (pass.n_rows, c.head_dim, Some(layer));
        let h = rms_norm(x, &a.norm, c.rms_eps);
        trace::tensor("attn_norm", l, &h);
        let (q, k, v) = a.qkv.forward(h, pass);
        let (q, k) = match &a.qk_norm {
            Some((q_norm, k_norm)) => {
                let q = head_rms_norm(q, c.n_head, q_norm, c.rms_eps);
                let k = head_rms_norm(k, c.n_head_kv, k_norm, c.rms_eps);
                trace::tensor("Qcur_normed", l, &q);
                trace::tensor("Kcur_normed", l, &k);
                (q, k)
            }
            None => (
                q.reshape([n, c.n_head, hd]),
                k.reshape([n, c.n_head_kv, hd]),
            ),
        };
        let v = v.reshape([n, c.n_head_kv, hd]);
        trace::tensor("Vcur", l, &v);
        let scaling = &a.rope_scaling;
        let rope = |t| {
            rope(
                t,
                &pass.positions,
                c.rope_dim,
                a.rope_base,
                scaling,
                c.rope_mode,
            )
        };
        let (q, k) = (rope(q), rope(k));
        trace::tensor("Qcur", l, &q);
        trace::tensor("Kcur", l, &k);
        let out = match self.spec.query_scale {
            QueryScale::InAttention(scale) => pass.attend(layer, q, k, v, scale)?,
            QueryScale::OnQuery(scale) => pass.attend(layer, q.mul_scalar(scale), k, v, 1.0)?,
        };
        trace::tensor("kqv_out", l, &out);
        let out = a.wo.forward(out, pass);
        trace::tensor("attn_out", l, &out);
        Ok(out)
    }

    /// The feed-forward sub-layer's output (after its post-norm, if any) for residual `x`.
    fn feed_forward(&self, layer: usize, f: &GatedFfn, x: Tensor<2>, pass: &Pass<'_>) -> Tensor<2> {
        let (eps, l) = (self.config.rms_eps, Some(layer));
        let h = rms_norm(x, &f.norm, eps);
        trace::tensor("ffn_norm", l, &h);
        let [gate, up] = Linear::products_many([&f.gate, &f.up], h, pass);
        let gate = f.gate.bias_traced(gate, "ffn_gate", l);
        let up = f.up.bias_traced(up, "ffn_up", l);
        // Named as llama.cpp's `build_ffn` names them.
        let act = match self.spec.gate {
            Gate::Silu => {
                let act = swiglu(gate, up);
                trace::tensor("ffn_swiglu", l, &act);
                act
            }
            Gate::Gelu => {
                let act = geglu(gate, up);
                trace::tensor("ffn_geglu", l, &act);
                act
            }
        };
        let out = f.down.forward(act, pass);
        trace::tensor("ffn_out", l, &out);
        match &f.post_norm {
            Some(post) => {
                let out = rms_norm(out, post, eps);
                trace::tensor("ffn_post_norm", l, &out);
                out
            }
            None => out,
        }
    }
}
