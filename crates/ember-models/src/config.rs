//! Hyper-parameters read from GGUF metadata (`{arch}.*` keys, as llama.cpp names them), and
//! the one place that checks them: every count and size is checked against the tensor
//! directory and against the other keys before a loader allocates anything from it.
//!
//! Limits come from the tensors rather than from caps: `block_count` must equal the number of
//! `blk.N` groups present, `embedding_length` and the vocabulary size the shape of
//! `token_embd.weight`, the head counts and `feed_forward_length` the shapes of block 0's
//! projections (the architecture's loader then checks every tensor of every block). A tensor
//! with no zero dimension takes file bytes for each of its elements, and every size here is
//! at least 1, so a size that matches a tensor is bounded by the file's length.

use std::collections::BTreeSet;

use ember_formats::{GgufFile, MetaValue};

use crate::{ExternalWeights, ModelError};

/// How rotary embeddings pair up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's `LLAMA_ROPE_TYPE_NORM`, used by the `llama`
    /// architecture (the GGUF converter permutes Q/K weights to fit it).
    Normal,
    /// Halves `(i, i + d/2)`: `LLAMA_ROPE_TYPE_NEOX` (Qwen, Gemma, Phi-3, ...).
    Neox,
}

/// Gemma 3's sliding-window attention (`{arch}.attention.sliding_window*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Positions a query on a window layer sees, itself included (at least 1).
    pub window: usize,
    /// Every `pattern`-th layer (the last of each group) is global; 0 makes every layer a
    /// window layer (llama.cpp's `set_swa_pattern`).
    pub pattern: usize,
    /// RoPE base of the window layers (`rope.freq_base_swa`).
    pub rope_base: f32,
}

/// llama.cpp's default: every 6th layer is global.
const DEFAULT_SWA_PATTERN: usize = 6;
/// `rope.freq_base_swa` when the file has none (llama.cpp's `rope_freq_base_train_swa`).
const DEFAULT_ROPE_BASE_SWA: f32 = 10_000.0;

/// A model's hyper-parameters, read from its GGUF metadata and checked against its tensors
/// ([`ModelConfig::from_gguf`]). Keys are `{arch}.*`, `{arch}` being the architecture name.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// `general.architecture`: `llama`, `gemma3`, `qwen2`, `qwen3` or `phi3`.
    pub architecture: String,
    /// Transformer blocks (`block_count`).
    pub n_layer: usize,
    /// Width of the hidden states (`embedding_length`).
    pub n_embd: usize,
    /// Hidden units of the feed-forward (`feed_forward_length`).
    pub n_ff: usize,
    /// Query heads (`attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`attention.head_count_kv`, else `n_head`); divides `n_head`, each
    /// K/V head serving an equal group of query heads (GQA).
    pub n_head_kv: usize,
    /// Size of each Q, K and V head (`attention.key_length`, else `n_embd / n_head`).
    pub head_dim: usize,
    /// Tokens in the vocabulary, one row of `token_embd.weight` each (`vocab_size`, else the
    /// length of `tokenizer.ggml.tokens`).
    pub n_vocab: usize,
    /// Context length the model was trained for, in positions (`context_length`).
    pub context_length: usize,
    /// RoPE frequency base (`rope.freq_base`, default 10000).
    pub rope_base: f32,
    /// Dimensions of each head that RoPE rotates (`rope.dimension_count`, else `head_dim`;
    /// even, at most `head_dim`).
    pub rope_dim: usize,
    /// How RoPE pairs dimensions (fixed by the architecture).
    pub rope_mode: RopeMode,
    /// Linear RoPE scaling's `1 / factor` (ggml's `freq_scale`: every angle is multiplied by
    /// it), 1 when the file scales nothing: `rope.scaling.type` linear (llama.cpp's default
    /// when absent) with `rope.scaling.factor` or `rope.scale_linear`. Gemma 3 applies it to
    /// its global layers only, as llama.cpp does.
    pub rope_freq_scale: f32,
    /// Epsilon of the RMS norms (`attention.layer_norm_rms_epsilon`, default 1e-5).
    pub rms_eps: f32,
    /// Gemma 3's window layers, when the file gives a window (`None` for every other
    /// architecture: llama.cpp ignores `sliding_window` for llama and phi3, and so do we).
    pub sliding_window: Option<SlidingWindow>,
}

impl ModelConfig {
    /// Reads and checks the hyper-parameters: a value that cannot be right is a
    /// [`ModelError::BadMetadata`] naming the key, its value and what it must be.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        Self::from_gguf_with(file, None)
    }

    /// [`from_gguf`](Self::from_gguf) for a file whose linear layers (some or all) are
    /// supplied beside it: their shapes are checked like the file's own, and Hugging Face
    /// Q/K row order selects NeoX rotation for llama.
    pub fn from_gguf_with(
        file: &GgufFile,
        external: Option<&ExternalWeights>,
    ) -> Result<Self, ModelError> {
        let tensors = Dims { file, external };
        let arch = file
            .architecture()
            .ok_or(ModelError::NoArchitecture)?
            .to_string();
        let rope_mode = match arch.as_str() {
            "llama" if external.is_some_and(|e| e.hf_qk_order) => RopeMode::Neox,
            "llama" => RopeMode::Normal,
            // llama.cpp's `llama_model_rope_type`: all of these pair dims `(i, i + n_rot / 2)`.
            "gemma3" | "qwen2" | "qwen3" | "phi3" => RopeMode::Neox,
            other => return Err(ModelError::UnsupportedArchitecture(other.to_string())),
        };
        let meta = Meta { file, arch: &arch };

        let n_layer = meta.count("block_count")?;
        check_block_count(file, &meta.key("block_count"), n_layer)?;

        let n_embd = meta.count("embedding_length")?;
        let n_vocab = vocab_size(&tensors, &meta, n_embd)?;

        let n_head = meta.count("attention.head_count")?;
        let n_head_kv = meta.opt_count("attention.head_count_kv")?.unwrap_or(n_head);
        if !n_head.is_multiple_of(n_head_kv) {
            return Err(bad(
                meta.key("attention.head_count_kv"),
                n_head_kv,
                format!(
                    "it must divide {} ({n_head}): query heads share kv heads in equal groups",
                    meta.key("attention.head_count")
                ),
            ));
        }
        let head_dim = match meta.opt_count("attention.key_length")? {
            Some(v) => v,
            None if n_embd.is_multiple_of(n_head) => n_embd / n_head,
            None => {
                return Err(bad(
                    meta.key("attention.head_count"),
                    n_head,
                    format!(
                        "{} ({n_embd}) is not a multiple of it, and without {} that is how \
                         the head size is found",
                        meta.key("embedding_length"),
                        meta.key("attention.key_length")
                    ),
                ));
            }
        };
        // Every block here reshapes V with the K head size.
        let value_length = meta.key("attention.value_length");
        if let Some(v) = meta.opt_count("attention.value_length")?
            && v != head_dim
        {
            return Err(ModelError::Unsupported(format!(
                "{value_length} {v} different from the key length {head_dim}"
            )));
        }
        check_attention_shapes(&tensors, &meta, [n_embd, n_head, n_head_kv, head_dim])?;
        let rope_dim = meta.opt_count("rope.dimension_count")?.unwrap_or(head_dim);
        if rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            return Err(bad(
                meta.key("rope.dimension_count"),
                rope_dim,
                format!("it must be even and at most the head size {head_dim}"),
            ));
        }
        if matches!(arch.as_str(), "qwen2" | "qwen3") && rope_dim != head_dim {
            // llama.cpp's qwen2 and qwen3 graphs assert `n_rot == n_embd_head`.
            return Err(bad(
                meta.key("rope.dimension_count"),
                rope_dim,
                format!("{arch} rotates whole heads: it must equal the head size {head_dim}"),
            ));
        }
        let rope_freq_scale = rope_freq_scale(file, &arch)?;
        // Mixtral-style files are `llama` with routed experts (`ffn_gate_inp`, `ffn_*_exps`):
        // say so rather than report a missing `ffn_gate`.
        if let Some(n) = meta.opt_uint("expert_count")?
            && n > 0
        {
            return Err(ModelError::Unsupported(format!(
                "a mixture-of-experts feed-forward ({} = {n})",
                meta.key("expert_count")
            )));
        }
        let n_ff = meta.count("feed_forward_length")?;
        let name = "blk.0.ffn_down.weight";
        if let Some(d) = tensors.get(name)
            && let Some(&cols) = d.first()
            && cols != n_ff as u64
        {
            return Err(bad(
                meta.key("feed_forward_length"),
                n_ff,
                format!("{name} has shape {d:?}: {cols} inputs, one per feed-forward unit"),
            ));
        }
        let context_length = meta.count("context_length")?;
        // Positions are u32 throughout (the KV cache and RoPE); a longer trained context
        // cannot be addressed.
        if u32::try_from(context_length).is_err() {
            return Err(bad(
                meta.key("context_length"),
                context_length,
                format!("positions are 32-bit: it must be at most {}", u32::MAX),
            ));
        }
        let sliding_window = match arch.as_str() {
            "gemma3" => match meta.opt_count("attention.sliding_window")? {
                Some(window) => Some(SlidingWindow {
                    window,
                    pattern: meta
                        .opt_uint("attention.sliding_window_pattern")?
                        .unwrap_or(DEFAULT_SWA_PATTERN),
                    rope_base: meta.positive_f32("rope.freq_base_swa", DEFAULT_ROPE_BASE_SWA)?,
                }),
                None => None,
            },
            _ => None,
        };
        Ok(Self {
            n_layer,
            n_ff,
            context_length,
            rope_base: meta.positive_f32("rope.freq_base", 10_000.0)?,
            rms_eps: meta.positive_f32("attention.layer_norm_rms_epsilon", 1e-5)?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            rope_dim,
            rope_mode,
            rope_freq_scale,
            sliding_window,
            architecture: arch,
        })
    }
}

/// The head counts and head size against block 0's attention projections, so a wrong key is
/// named rather than only the tensor it does not fit (the loaders check every tensor's full
/// shape).
fn check_attention_shapes(
    tensors: &Dims<'_>,
    meta: &Meta<'_>,
    [n_embd, n_head, n_head_kv, hd]: [usize; 4],
) -> Result<(), ModelError> {
    let file = tensors.file;
    let dims = |name: &str| tensors.get(name);
    let head_size = match file.get(&meta.key("attention.key_length")) {
        Some(_) => meta.key("attention.key_length"),
        None => format!(
            "{} / {} = {n_embd} / {n_head}",
            meta.key("embedding_length"),
            meta.key("attention.head_count"),
        ),
    };
    // Products in u128: both factors are only known to fit in usize so far.
    let (n_q, n_kv) = (n_head as u128 * hd as u128, n_head_kv as u128 * hd as u128);
    let name = "blk.0.attn_output.weight";
    if let Some(d) = dims(name)
        && let Some(&cols) = d.first()
        && u128::from(cols) != n_q
    {
        return Err(bad(
            meta.key("attention.head_count"),
            n_head,
            format!(
                "{name} has shape {d:?}: {cols} inputs, not head count x head size = \
                 {n_head} x {hd} = {n_q} (head size from {head_size})"
            ),
        ));
    }
    let kv_key = meta.key("attention.head_count_kv");
    let kv_value = if file.get(&kv_key).is_some() {
        n_head_kv.to_string()
    } else {
        format!("not set (so {n_head_kv}, the head count)")
    };
    let (k, qkv) = ("blk.0.attn_k.weight", "blk.0.attn_qkv.weight");
    let (name, want, how) = if tensors.get(k).is_some() {
        (
            k,
            n_kv,
            format!("kv heads x head size = {n_head_kv} x {hd}"),
        )
    } else {
        let how =
            format!("(heads + 2 x kv heads) x head size = ({n_head} + 2 x {n_head_kv}) x {hd}");
        (qkv, n_q + 2 * n_kv, how)
    };
    if let Some(d) = dims(name)
        && let Some(&rows) = d.get(1)
        && u128::from(rows) != want
    {
        return Err(ModelError::BadMetadata {
            key: kv_key,
            value: kv_value,
            expected: format!(
                "{name} has shape {d:?}: {rows} outputs, not {how} = {want} (head size from \
                 {head_size})"
            ),
        });
    }
    Ok(())
}

/// A [`ModelError::BadMetadata`] for `key`.
fn bad(key: impl Into<String>, value: impl ToString, expected: String) -> ModelError {
    ModelError::BadMetadata {
        key: key.into(),
        value: value.to_string(),
        expected,
    }
}

/// A metadata value as an error message shows it.
fn describe(v: &MetaValue) -> String {
    match v {
        MetaValue::String(s) => {
            const SHOWN: usize = 40;
            let mut short: String = s.chars().take(SHOWN).collect();
            if short.len() < s.len() {
                short.push_str("...");
            }
            format!("the string {short:?}")
        }
        MetaValue::Array(a) => format!("an array of {} {} values", a.len(), a.element_type()),
        MetaValue::Bool(b) => format!("the bool {b}"),
        // Debug: `1e300`, not three hundred digits.
        MetaValue::F32(f) => format!("{f:?}"),
        MetaValue::F64(f) => format!("{f:?}"),
        other => other
            .as_integer()
            .map(|i| i.to_string())
            .unwrap_or_default(),
    }
}

/// Typed, checked reads of one architecture's `{arch}.*` keys.
struct Meta<'a> {
    file: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// A non-negative integer, if the key is there.
    fn opt_uint(&self, k: &str) -> Result<Option<usize>, ModelError> {
        self.opt_int(k, 0)
    }

    /// A count or size (an integer of at least 1), if the key is there.
    fn opt_count(&self, k: &str) -> Result<Option<usize>, ModelError> {
        self.opt_int(k, 1)
    }

    /// A count or size the architecture needs.
    fn count(&self, k: &str) -> Result<usize, ModelError> {
        self.opt_count(k)?
            .ok_or_else(|| ModelError::MissingKey(self.key(k)))
    }

    fn opt_int(&self, k: &str, min: usize) -> Result<Option<usize>, ModelError> {
        let key = self.key(k);
        let Some(v) = self.file.get(&key) else {
            return Ok(None);
        };
        let Some(n) = v.as_integer() else {
            return Err(bad(key, describe(v), "it must be an integer".into()));
        };
        if n < min as i128 {
            return Err(bad(key, n, format!("it must be at least {min}")));
        }
        usize::try_from(n)
            .map(Some)
            .map_err(|_| bad(key, n, "it is too large for this machine's memory".into()))
    }

    /// A finite number above 0 (a RoPE base, a norm epsilon), `default` if the key is absent.
    /// Integers are taken as numbers; the value is checked after narrowing to f32.
    fn positive_f32(&self, k: &str, default: f32) -> Result<f32, ModelError> {
        let key = self.key(k);
        let Some(v) = self.file.get(&key) else {
            return Ok(default);
        };
        let f = v
            .as_f64()
            .or_else(|| v.as_integer().map(|i| i as f64))
            .map(|f| f as f32);
        match f {
            Some(f) if f.is_finite() && f > 0.0 => Ok(f),
            _ => Err(bad(
                key,
                describe(v),
                "it must be a finite number above 0 (in f32)".into(),
            )),
        }
    }
}

/// `block_count` against the `blk.N.*` tensors: exactly blocks `0..n_layer` must have some.
/// This bounds every per-layer allocation by the number of tensors in the file.
fn check_block_count(file: &GgufFile, key: &str, n_layer: usize) -> Result<(), ModelError> {
    let present: BTreeSet<usize> = file
        .tensors()
        .iter()
        .filter_map(|t| {
            let (n, _) = t.name.strip_prefix("blk.")?.split_once('.')?;
            n.parse().ok()
        })
        .collect();
    let k = present.len();
    let contiguous = present.last().is_none_or(|&last| last + 1 == k);
    if contiguous && k == n_layer {
        return Ok(());
    }
    let expected = match (present.first(), present.last()) {
        (Some(_), Some(last)) if contiguous => {
            format!("the file has tensors for {k} blocks (blk.0..blk.{last})")
        }
        (Some(first), Some(last)) => {
            let missing = (0..).find(|i| !present.contains(i)).unwrap_or(0);
            format!(
                "the file has tensors for {k} blocks between blk.{first} and blk.{last}, \
                 with blk.{missing} missing"
            )
        }
        _ => "the file has no block tensors (blk.N.*)".to_string(),
    };
    Err(bad(key, n_layer, expected))
}

/// The vocabulary size (`{arch}.vocab_size`, else the tokenizer's token count) with
/// `embedding_length`, against `token_embd.weight`: one row of `n_embd` values per token.
/// Every token the tokenizer can produce must have a row.
fn vocab_size(tensors: &Dims<'_>, meta: &Meta<'_>, n_embd: usize) -> Result<usize, ModelError> {
    const TOKENS: &str = "tokenizer.ggml.tokens";
    let n_tokens = tensors.file.get_array(TOKENS).map(|a| a.len());
    let (n_vocab, source) = match meta.opt_count("vocab_size")? {
        Some(v) => (v, meta.key("vocab_size")),
        None => match n_tokens {
            Some(n) => (n, TOKENS.to_string()),
            None => return Err(ModelError::MissingKey(meta.key("vocab_size"))),
        },
    };
    let name = "token_embd.weight";
    let dims = tensors
        .get(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    let expected = [n_embd as u64, n_vocab as u64];
    let &[cols, rows] = dims.as_slice() else {
        return Err(ModelError::BadShape {
            name: name.to_string(),
            got: dims.clone(),
            expected: expected.to_vec(),
        });
    };
    let shape = &dims;
    if cols != expected[0] {
        return Err(bad(
            meta.key("embedding_length"),
            n_embd,
            format!("{name} has shape {shape:?}: rows of {cols} values"),
        ));
    }
    if rows != expected[1] {
        let value = if source == TOKENS {
            format!("a list of {n_vocab} tokens")
        } else {
            n_vocab.to_string()
        };
        return Err(ModelError::BadMetadata {
            key: source,
            value,
            expected: format!("{name} has shape {shape:?}: {rows} rows, one per token"),
        });
    }
    if let Some(n) = n_tokens
        && n > n_vocab
    {
        return Err(ModelError::BadMetadata {
            key: TOKENS.to_string(),
            value: format!("a list of {n} tokens"),
            expected: format!(
                "{name} has only {n_vocab} rows ({}): every token needs one",
                meta.key("vocab_size")
            ),
        });
    }
    Ok(n_vocab)
}

/// RoPE's linear scaling as llama.cpp reads it (`llama_model::load_hparams`):
/// `rope.scaling.type` (absent: linear) with `rope.scaling.factor`, or the older
/// `rope.scale_linear` (0 or absent: none), gives `freq_scale = 1 / factor` in f32; type `none`
/// ignores the factor. What the blocks do not implement is refused rather than run unscaled:
/// other types (YaRN, LongRoPE, ...) and an attention factor other than 1.
fn rope_freq_scale(file: &GgufFile, arch: &str) -> Result<f32, ModelError> {
    let key = |k: &str| format!("{arch}.{k}");
    let kind = file.get_str(&key("rope.scaling.type")).unwrap_or("linear");
    if kind != "none" && kind != "linear" {
        return Err(ModelError::Unsupported(format!(
            "RoPE scaling type '{kind}'"
        )));
    }
    // Written with LongRoPE (Phi-3 128k, Phi-3.5) and YaRN; scales cos and sin.
    let attn_factor = key("rope.scaling.attn_factor");
    if let Some(f) = file.get_f32(&attn_factor)
        && f != 1.0
    {
        return Err(ModelError::Unsupported(format!(
            "RoPE attention factor {f} ({attn_factor})"
        )));
    }
    let factor_key = ["rope.scaling.factor", "rope.scale_linear"]
        .map(key)
        .into_iter()
        .find(|k| file.get_f32(k).is_some());
    let Some(factor_key) = factor_key else {
        return Ok(1.0);
    };
    let factor = file.get_f32(&factor_key).unwrap_or(0.0);
    // llama.cpp reads 0 as "no scaling".
    if kind == "none" || factor == 0.0 {
        return Ok(1.0);
    }
    if !(factor.is_finite() && factor > 0.0) {
        return Err(bad(
            factor_key,
            factor,
            "a positive RoPE scaling factor (or 0 for none)".into(),
        ));
    }
    Ok(1.0 / factor)
}

/// Tensor shapes from the file, or from the matrices supplied beside it.
struct Dims<'a> {
    file: &'a GgufFile,
    external: Option<&'a ExternalWeights>,
}

impl Dims<'_> {
    fn get(&self, name: &str) -> Option<Vec<u64>> {
        if let Some(m) = self.external.and_then(|e| e.get(name)) {
            return Some(vec![m.cols() as u64, m.rows() as u64]);
        }
        self.file.tensor(name).map(|t| t.dims.clone())
    }
}
