//! Group-quantized Hugging Face checkpoints (AWQ, GPTQ, EXL2, compressed-tensors
//! `pack-quantized`): `quantization_config` detection, dequantizing their linear layers for
//! [`crate::hf_to_gguf`], and quantizing linear layers for [`crate::gguf_to_quantized_hf`].
//!
//! Layouts and config keys: `docs/quant-formats.md` sections 1-4.

use std::borrow::Cow;
use std::sync::Arc;

use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::{StDtype, StTensorInfo, StWriteTensor};
use ember_quant::group::awq::gemv_zeros_width;
use ember_quant::group::ct::ScaleDtype;
use ember_quant::group::exl2::{Exl2Perm, padded_n};
use ember_quant::group::gptq::{GptqOptions, GptqZeros};
use ember_quant::group::{ByteView, GroupError, PackedLinear, awq, ct, exl2, gptq};
use serde_json::{Value, json};

use crate::ConvertError;

/// AutoAWQ's packing variant (`version`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwqVersion {
    /// `"gemm"`: `qweight [K, N/8]`, nibbles in `[0,2,4,6,1,3,5,7]` order.
    Gemm,
    /// `"gemv"`: `qweight [N, K/8]`, sequential nibbles, padded zeros/scales.
    Gemv,
}

/// compressed-tensors weight `strategy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtStrategy {
    /// `"group"` with `group_size`.
    Group(usize),
    /// `"channel"`: one scale per output row.
    Channel,
}

/// A group size: a number of inputs, or `-1` in a config (one group per row, per channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupSize {
    /// `g` consecutive inputs per group.
    Size(usize),
    /// One group per output row (`group_size: -1`).
    PerChannel,
}

impl GroupSize {
    /// The group size for a layer with `k` inputs.
    pub fn for_k(self, k: usize) -> usize {
        match self {
            GroupSize::Size(g) => g,
            GroupSize::PerChannel => k,
        }
    }

    /// As a config value (`-1` for per channel).
    pub fn to_json(self) -> Value {
        match self {
            GroupSize::Size(g) => json!(g),
            GroupSize::PerChannel => json!(-1),
        }
    }
}

/// The quantization scheme of a checkpoint, parsed from `config.json`'s `quantization_config`
/// (or `quantize_config.json`, or for EXL2 from the tensor names when the key is absent).
#[derive(Clone, Debug, PartialEq)]
pub enum QuantScheme {
    /// AutoAWQ: 4-bit, asymmetric (`zero_point: true`).
    Awq {
        /// `version`.
        version: AwqVersion,
        /// `bits` (always 4).
        bits: u32,
        /// `group_size`.
        group_size: GroupSize,
        /// `modules_to_not_convert`.
        modules_to_not_convert: Vec<String>,
    },
    /// AutoGPTQ / GPTQModel.
    Gptq {
        /// `bits`: 2, 3, 4 or 8.
        bits: u32,
        /// `group_size`.
        group_size: GroupSize,
        /// `desc_act` (act-order; the order itself is in each layer's `g_idx`).
        desc_act: bool,
        /// `sym`.
        sym: bool,
        /// `checkpoint_format` / `format`: `gptq` (v1 zeros) or `gptq_v2`.
        zeros: GptqZeros,
    },
    /// exllamav2 EXL2 (per-group widths are in each layer's `q_groups`).
    Exl2 {
        /// `bits`: the target bits per weight, when the config records it.
        bits: Option<f64>,
        /// `head_bits`, when recorded.
        head_bits: Option<u32>,
    },
    /// compressed-tensors `pack-quantized` INT weights (weight-only).
    CompressedTensors {
        /// `num_bits`: 2..=8.
        bits: u32,
        /// `strategy` (and `group_size`).
        strategy: CtStrategy,
        /// `symmetric`.
        symmetric: bool,
        /// `ignore`.
        ignore: Vec<String>,
    },
}

fn unsupported(field: &str, value: Option<&Value>, reason: impl Into<String>) -> ConvertError {
    ConvertError::UnsupportedQuantization {
        field: field.to_string(),
        value: value.map_or_else(|| "absent".to_string(), Value::to_string),
        reason: reason.into(),
    }
}

fn get_u32(q: &Value, field: &str, path: &str, allowed: &[u32]) -> Result<u32, ConvertError> {
    let v = q.get(field);
    let n = v
        .and_then(Value::as_u64)
        .ok_or_else(|| unsupported(path, v, "must be an unsigned integer"))?;
    if !allowed.iter().any(|&a| u64::from(a) == n) {
        return Err(unsupported(
            path,
            v,
            format!("this format supports {allowed:?} bits"),
        ));
    }
    Ok(n as u32)
}

fn get_bool(q: &Value, field: &str, path: &str, default: bool) -> Result<bool, ConvertError> {
    match q.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        v => Err(unsupported(path, v, "must be true or false")),
    }
}

fn get_group_size(q: &Value, field: &str, path: &str) -> Result<GroupSize, ConvertError> {
    let v = q.get(field);
    match v.and_then(Value::as_i64) {
        Some(-1) => Ok(GroupSize::PerChannel),
        Some(g) if g > 0 => Ok(GroupSize::Size(g as usize)),
        _ => Err(unsupported(
            path,
            v,
            "must be a positive integer or -1 (one group per row)",
        )),
    }
}

fn get_strings(q: &Value, field: &str, path: &str) -> Result<Vec<String>, ConvertError> {
    match q.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| unsupported(path, Some(s), "must be a list of strings"))
            })
            .collect(),
        v => Err(unsupported(path, v, "must be a list of strings")),
    }
}

fn is_null(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Null))
}

impl std::fmt::Display for GroupSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupSize::Size(g) => write!(f, "g{g}"),
            GroupSize::PerChannel => f.write_str("per-channel"),
        }
    }
}

impl std::fmt::Display for QuantScheme {
    /// One line: `AWQ (gemm) 4-bit g128`, `GPTQ 4-bit g128 act-order sym (v1 zeros)`,
    /// `EXL2 4.00 bpw`, `compressed-tensors 4-bit g64 sym`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantScheme::Awq {
                version,
                bits,
                group_size,
                ..
            } => {
                let v = match version {
                    AwqVersion::Gemm => "gemm",
                    AwqVersion::Gemv => "gemv",
                };
                write!(f, "AWQ ({v}) {bits}-bit {group_size}")
            }
            QuantScheme::Gptq {
                bits,
                group_size,
                desc_act,
                sym,
                zeros,
            } => {
                let act = if *desc_act { " act-order" } else { "" };
                let sym = if *sym { "sym" } else { "asym" };
                let z = match zeros {
                    GptqZeros::V1 => "v1",
                    GptqZeros::V2 => "v2",
                };
                write!(f, "GPTQ {bits}-bit {group_size}{act} {sym} ({z} zeros)")
            }
            QuantScheme::Exl2 { bits, head_bits } => {
                f.write_str("EXL2")?;
                if let Some(b) = bits {
                    write!(f, " {b:.2} bpw")?;
                }
                if let Some(h) = head_bits {
                    write!(f, ", head {h}-bit")?;
                }
                Ok(())
            }
            QuantScheme::CompressedTensors {
                bits,
                strategy,
                symmetric,
                ..
            } => {
                let s = match strategy {
                    CtStrategy::Group(g) => format!("g{g}"),
                    CtStrategy::Channel => "per-channel".to_string(),
                };
                let sym = if *symmetric { "sym" } else { "asym" };
                write!(f, "compressed-tensors {bits}-bit {s} {sym}")
            }
        }
    }
}

impl QuantScheme {
    /// The scheme of a checkpoint: its `quantization_config` (or `quantize_config.json` for
    /// GPTQ), or EXL2 when tensors named `*.q_weight` and `*.q_invperm` are present without
    /// one. `Ok(None)` for an unquantized checkpoint.
    pub fn detect(ckpt: &Checkpoint) -> Result<Option<QuantScheme>, ConvertError> {
        let names: Vec<&str> = ckpt.tensor_names().collect();
        let side = ckpt.dir().join("quantize_config.json");
        let side_cfg = if ckpt.config().get("quantization_config").is_none() && side.is_file() {
            let text = std::fs::read_to_string(&side).map_err(|e| ConvertError::io(&side, e))?;
            Some(
                serde_json::from_str::<Value>(&text)
                    .map_err(|source| ConvertError::Json { path: side, source })?,
            )
        } else {
            None
        };
        match side_cfg {
            Some(q) => {
                let mut q = q;
                if let Some(o) = q.as_object_mut() {
                    o.entry("quant_method").or_insert(json!("gptq"));
                }
                Self::from_config(&json!({ "quantization_config": q }), &names)
            }
            None => Self::from_config(ckpt.config(), &names),
        }
    }

    /// Parses `config["quantization_config"]`; `tensor_names` is used only when the key is
    /// absent (EXL2 detection; a `qweight`/`weight_packed` tensor without a config is an error).
    pub fn from_config(
        config: &Value,
        tensor_names: &[&str],
    ) -> Result<Option<QuantScheme>, ConvertError> {
        let Some(q) = config.get("quantization_config").filter(|v| !v.is_null()) else {
            let has = |suffix: &str| tensor_names.iter().any(|n| n.ends_with(suffix));
            if has(".q_weight") && has(".q_invperm") {
                return Ok(Some(QuantScheme::Exl2 {
                    bits: None,
                    head_bits: None,
                }));
            }
            if has(".qweight") || has(".weight_packed") {
                return Err(unsupported(
                    "quant_method",
                    None,
                    "the checkpoint has quantized tensors (qweight / weight_packed) but no \
                     quantization_config says which format",
                ));
            }
            return Ok(None);
        };
        if !q.is_object() {
            return Err(unsupported("", Some(q), "must be an object"));
        }
        let method_v = q.get("quant_method").or_else(|| q.get("method"));
        let method = method_v
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| unsupported("quant_method", method_v, "must be a string"))?;
        match method.as_str() {
            "awq" => Self::parse_awq(q).map(Some),
            "gptq" => Self::parse_gptq(q).map(Some),
            "exl2" => Ok(Some(QuantScheme::Exl2 {
                bits: q.get("bits").and_then(Value::as_f64),
                head_bits: q.get("head_bits").and_then(Value::as_u64).map(|b| b as u32),
            })),
            "compressed-tensors" => Self::parse_ct(q).map(Some),
            _ => Err(unsupported(
                "quant_method",
                method_v,
                "supported: awq, gptq, exl2, compressed-tensors",
            )),
        }
    }

    fn parse_awq(q: &Value) -> Result<QuantScheme, ConvertError> {
        let version_v = q.get("version");
        let version = match version_v {
            None | Some(Value::Null) => AwqVersion::Gemm,
            Some(v) => match v.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("gemm") => AwqVersion::Gemm,
                Some("gemv") => AwqVersion::Gemv,
                _ => {
                    return Err(unsupported(
                        "version",
                        version_v,
                        "supported AWQ layouts: gemm, gemv (gemv_fast, marlin, exllama and ipex \
                         pack differently)",
                    ));
                }
            },
        };
        let bits = get_u32(q, "bits", "bits", &[4])?;
        let group_size = get_group_size(q, "group_size", "group_size")?;
        if !get_bool(q, "zero_point", "zero_point", true)? {
            return Err(unsupported(
                "zero_point",
                q.get("zero_point"),
                "AutoAWQ's GEMM/GEMV layers always carry zero points; zero_point=false is not \
                 a layout it writes",
            ));
        }
        Ok(QuantScheme::Awq {
            version,
            bits,
            group_size,
            modules_to_not_convert: get_strings(
                q,
                "modules_to_not_convert",
                "modules_to_not_convert",
            )?,
        })
    }

    fn parse_gptq(q: &Value) -> Result<QuantScheme, ConvertError> {
        let fmt_field = if q.get("checkpoint_format").is_some() {
            "checkpoint_format"
        } else {
            "format"
        };
        let fmt_v = q.get(fmt_field);
        let zeros = match fmt_v {
            None | Some(Value::Null) => GptqZeros::V1,
            Some(v) => match v.as_str() {
                Some("gptq") => GptqZeros::V1,
                Some("gptq_v2") => GptqZeros::V2,
                _ => {
                    return Err(unsupported(
                        fmt_field,
                        fmt_v,
                        "supported GPTQ layouts: gptq (v1 zeros), gptq_v2 (marlin, gptq_p, bitblas, \
                         ... pack differently)",
                    ));
                }
            },
        };
        if let Some(pd) = q.get("pack_dtype").filter(|v| !v.is_null())
            && pd.as_str() != Some("int32")
        {
            return Err(unsupported(
                "pack_dtype",
                Some(pd),
                "only int32 packing is read",
            ));
        }
        Ok(QuantScheme::Gptq {
            bits: get_u32(q, "bits", "bits", &[2, 3, 4, 8])?,
            group_size: get_group_size(q, "group_size", "group_size")?,
            desc_act: get_bool(q, "desc_act", "desc_act", false)?,
            sym: get_bool(q, "sym", "sym", true)?,
            zeros,
        })
    }

    fn parse_ct(q: &Value) -> Result<QuantScheme, ConvertError> {
        let fmt = q.get("format");
        if fmt.and_then(Value::as_str) != Some("pack-quantized") {
            return Err(unsupported(
                "format",
                fmt,
                "only the pack-quantized format (INT weights packed in int32) is read",
            ));
        }
        let status = q.get("quantization_status");
        if !is_null(status) && status.and_then(Value::as_str) != Some("compressed") {
            return Err(unsupported(
                "quantization_status",
                status,
                "only compressed checkpoints hold packed weights",
            ));
        }
        if !is_null(q.get("kv_cache_scheme")) {
            return Err(unsupported(
                "kv_cache_scheme",
                q.get("kv_cache_scheme"),
                "KV-cache quantization is not supported (weight-only schemes are)",
            ));
        }
        let groups = q
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or_else(|| {
                unsupported(
                    "config_groups",
                    q.get("config_groups"),
                    "must be a non-empty object",
                )
            })?;
        let mut scheme: Option<(u32, CtStrategy, bool)> = None;
        for (name, grp) in groups {
            let path = |f: &str| format!("config_groups.{name}.{f}");
            for act in ["input_activations", "output_activations"] {
                if !is_null(grp.get(act)) {
                    return Err(unsupported(
                        &path(act),
                        grp.get(act),
                        "activation quantization is not supported (weight-only INT schemes \
                         such as W4A16/W8A16 are)",
                    ));
                }
            }
            if let Some(f) = grp.get("format").filter(|v| !v.is_null())
                && f.as_str() != Some("pack-quantized")
            {
                return Err(unsupported(
                    &path("format"),
                    Some(f),
                    "only pack-quantized is read",
                ));
            }
            let w = grp
                .get("weights")
                .filter(|v| v.is_object())
                .ok_or_else(|| {
                    unsupported(&path("weights"), grp.get("weights"), "must be an object")
                })?;
            let wp = |f: &str| path(&format!("weights.{f}"));
            let ty = w.get("type");
            if !is_null(ty) && ty.and_then(Value::as_str) != Some("int") {
                return Err(unsupported(&wp("type"), ty, "only int weights are packed"));
            }
            if w.get("dynamic").and_then(Value::as_bool) == Some(true) {
                return Err(unsupported(
                    &wp("dynamic"),
                    w.get("dynamic"),
                    "dynamic weight quantization has no stored scales",
                ));
            }
            let bits = get_u32(w, "num_bits", &wp("num_bits"), &[2, 3, 4, 5, 6, 7, 8])?;
            let symmetric = get_bool(w, "symmetric", &wp("symmetric"), true)?;
            let strat_v = w.get("strategy");
            let strategy = match strat_v.and_then(Value::as_str) {
                Some("group") => match get_group_size(w, "group_size", &wp("group_size"))? {
                    GroupSize::Size(g) => CtStrategy::Group(g),
                    GroupSize::PerChannel => CtStrategy::Channel,
                },
                Some("channel") => CtStrategy::Channel,
                _ => {
                    return Err(unsupported(
                        &wp("strategy"),
                        strat_v,
                        "supported strategies: group, channel",
                    ));
                }
            };
            let this = (bits, strategy, symmetric);
            match scheme {
                None => scheme = Some(this),
                Some(s) if s == this => {}
                Some(_) => {
                    return Err(unsupported(
                        &path("weights"),
                        Some(w),
                        "config groups with different weight schemes are not supported",
                    ));
                }
            }
        }
        let (bits, strategy, symmetric) = scheme.expect("config_groups is non-empty");
        Ok(QuantScheme::CompressedTensors {
            bits,
            strategy,
            symmetric,
            ignore: get_strings(q, "ignore", "ignore")?,
        })
    }

    /// The suffix of each quantized layer's main tensor.
    pub(crate) fn main_suffix(&self) -> &'static str {
        match self {
            QuantScheme::Awq { .. } | QuantScheme::Gptq { .. } => "qweight",
            QuantScheme::Exl2 { .. } => "q_weight",
            QuantScheme::CompressedTensors { .. } => "weight_packed",
        }
    }

    /// The suffixes of the other tensors of a quantized layer.
    pub(crate) fn aux_suffixes(&self) -> &'static [&'static str] {
        match self {
            QuantScheme::Awq { .. } => &["qzeros", "scales"],
            QuantScheme::Gptq { .. } => &["qzeros", "scales", "g_idx"],
            QuantScheme::Exl2 { .. } => &[
                "q_scale",
                "q_scale_max",
                "q_groups",
                "q_invperm",
                "q_perm",
                "q_group_map",
            ],
            QuantScheme::CompressedTensors { .. } => &[
                "weight_scale",
                "weight_zero_point",
                "weight_shape",
                "weight_g_idx",
            ],
        }
    }

    /// How a tensor name relates to this scheme: `Some((prefix, true))` for a main tensor,
    /// `Some((prefix, false))` for an auxiliary one, `None` otherwise.
    pub(crate) fn classify<'n>(&self, name: &'n str) -> Option<(&'n str, bool)> {
        let (prefix, suffix) = name.rsplit_once('.')?;
        if suffix == self.main_suffix() {
            Some((prefix, true))
        } else if self.aux_suffixes().contains(&suffix) {
            Some((prefix, false))
        } else {
            None
        }
    }
}

/// The `[out, in]` shape a linear layer must have, from the config's sizes.
pub(crate) fn expected_nk(prefix: &str, c: &Value) -> Result<(usize, usize), ConvertError> {
    let get = |k: &str| {
        c.get(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ConvertError::MissingConfig(k.to_string()))
    };
    let hidden = get("hidden_size")?;
    let n_head = get("num_attention_heads")?;
    if n_head == 0 {
        return Err(ConvertError::UnsupportedConfig {
            key: "num_attention_heads".into(),
            reason: "is 0".into(),
        });
    }
    let n_kv = match c.get("num_key_value_heads") {
        None | Some(Value::Null) => n_head,
        Some(_) => get("num_key_value_heads")?,
    };
    let gemma = c
        .get("model_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.starts_with("gemma3"));
    let hd = match c.get("head_dim") {
        // Gemma 3's configuration default, as the GGUF metadata is written.
        None | Some(Value::Null) if gemma => 256,
        None | Some(Value::Null) => hidden / n_head,
        Some(_) => get("head_dim")?,
    };
    let ov = |a: usize, b: usize| {
        a.checked_mul(b)
            .ok_or_else(|| ConvertError::bad_tensor(prefix, "config sizes overflow"))
    };
    let base = prefix.rsplit_once('.').map_or(prefix, |(_, b)| b);
    Ok(match base {
        "q_proj" => (ov(n_head, hd)?, hidden),
        "k_proj" | "v_proj" => (ov(n_kv, hd)?, hidden),
        "o_proj" => (hidden, ov(n_head, hd)?),
        "gate_proj" | "up_proj" => (get("intermediate_size")?, hidden),
        "down_proj" => (hidden, get("intermediate_size")?),
        // Phi-3's fused projections: Q, K, V rows; gate rows, then up rows.
        "qkv_proj" => {
            let heads = n_kv
                .checked_mul(2)
                .and_then(|kv| kv.checked_add(n_head))
                .ok_or_else(|| ConvertError::bad_tensor(prefix, "config sizes overflow"))?;
            (ov(heads, hd)?, hidden)
        }
        "gate_up_proj" => (ov(2, get("intermediate_size")?)?, hidden),
        "lm_head" => (get("vocab_size")?, hidden),
        _ => {
            return Err(ConvertError::bad_tensor(
                prefix,
                "is quantized but is not a known linear layer (q/k/v/o_proj, qkv_proj, \
                 gate/up/down_proj, gate_up_proj, lm_head)",
            ));
        }
    })
}

fn quant_err(prefix: &str) -> impl Fn(GroupError) -> ConvertError + '_ {
    move |source| ConvertError::QuantizedTensor {
        tensor: prefix.to_string(),
        source,
    }
}

/// Checks a tensor's dtype (one of `dtypes`) and, when given, its exact shape.
fn check_tensor(
    name: &str,
    info: &StTensorInfo,
    dtypes: &[StDtype],
    shape: Option<&[usize]>,
) -> Result<(), ConvertError> {
    if !dtypes.contains(&info.dtype) {
        let want: Vec<&str> = dtypes.iter().map(StDtype::name).collect();
        return Err(ConvertError::bad_tensor(
            name,
            format!(
                "dtype {}, expected {}",
                info.dtype.name(),
                want.join(" or ")
            ),
        ));
    }
    if let Some(s) = shape
        && info.shape != s
    {
        return Err(ConvertError::bad_tensor(
            name,
            format!("shape {:?}, expected {s:?}", info.shape),
        ));
    }
    Ok(())
}

fn divides(prefix: &str, suffix: &str, k: usize, g: usize) -> Result<(), ConvertError> {
    if g == 0 || !k.is_multiple_of(g) {
        return Err(ConvertError::GroupSizeDoesNotDivide {
            tensor: format!("{prefix}.{suffix}"),
            k,
            group_size: g,
        });
    }
    Ok(())
}

/// Dequantizes the linear layer `prefix` (`[n][k]` f32, the `nn.Linear.weight` orientation).
/// Every tensor's presence, dtype and the main tensor's shape are checked against `(n, k)`, and
/// the ember-quant reader validates all lengths and index tensors before anything is allocated.
pub(crate) fn dequantize_linear(
    ckpt: &Checkpoint,
    scheme: &QuantScheme,
    prefix: &str,
    n: usize,
    k: usize,
) -> Result<Vec<f32>, ConvertError> {
    let packed = packed_linear(ckpt, scheme, prefix, n, k)?;
    let len = n
        .checked_mul(k)
        .ok_or_else(|| ConvertError::bad_tensor(prefix, "element count overflows"))?;
    let mut out = vec![0f32; len];
    packed
        .view()
        .dequantize_into(&mut out)
        .map_err(quant_err(prefix))?;
    Ok(out)
}

/// The quantized linear layer `prefix` (its `qweight`/`q_weight`/`weight_packed` and
/// companions) as a validated [`PackedLinear`] over the checkpoint's memory map: every
/// tensor's dtype and shape checked against `[n out, k in]` and the scheme, nothing copied.
pub fn packed_linear(
    ckpt: &Checkpoint,
    scheme: &QuantScheme,
    prefix: &str,
    n: usize,
    k: usize,
) -> Result<PackedLinear, ConvertError> {
    let view = |name: &str| -> Option<(&StTensorInfo, ByteView)> {
        let (shard, info) = ckpt.tensor_location(name)?;
        let file = ckpt.shards().get(shard)?;
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(file.shared_bytes());
        let range = info.offset..info.offset.checked_add(info.n_bytes)?;
        Some((info, ByteView::new(owner, range)?))
    };
    let tensor = |suffix: &str| -> Result<(&StTensorInfo, ByteView), ConvertError> {
        let name = format!("{prefix}.{suffix}");
        view(&name).ok_or(ConvertError::MissingTensor(name))
    };
    let optional = |suffix: &str| view(&format!("{prefix}.{suffix}"));
    let nm = |suffix: &str| format!("{prefix}.{suffix}");
    let i32s = [StDtype::I32];
    let f16s = [StDtype::F16];
    let packed = match scheme {
        QuantScheme::Awq {
            version,
            bits,
            group_size,
            ..
        } => {
            let g = group_size.for_k(k);
            divides(prefix, "qweight", k, g)?;
            let (qi, qweight) = tensor("qweight")?;
            let (zi, qzeros) = tensor("qzeros")?;
            let (si, scales) = tensor("scales")?;
            let main_shape = match version {
                AwqVersion::Gemm => [k, n / 8],
                AwqVersion::Gemv => [n, k / 8],
            };
            check_tensor(&nm("qweight"), qi, &i32s, Some(&main_shape))?;
            check_tensor(&nm("qzeros"), zi, &i32s, None)?;
            check_tensor(&nm("scales"), si, &f16s, None)?;
            match version {
                AwqVersion::Gemm => PackedLinear::AwqGemm {
                    k,
                    n,
                    group_size: g,
                    bits: *bits,
                    qweight,
                    qzeros,
                    scales,
                },
                AwqVersion::Gemv => {
                    if gemv_zeros_width(k, g).is_none() {
                        return Err(ConvertError::bad_tensor(
                            &nm("qzeros"),
                            format!("AWQ GEMV has no zeros layout for group size {g}"),
                        ));
                    }
                    PackedLinear::AwqGemv {
                        k,
                        n,
                        group_size: g,
                        bits: *bits,
                        qweight,
                        qzeros,
                        scales,
                    }
                }
            }
        }
        QuantScheme::Gptq {
            bits,
            group_size,
            zeros,
            ..
        } => {
            let g = group_size.for_k(k);
            let (qi, qweight) = tensor("qweight")?;
            let (zi, qzeros) = tensor("qzeros")?;
            let (si, scales) = tensor("scales")?;
            check_tensor(
                &nm("qweight"),
                qi,
                &i32s,
                Some(&[k.saturating_mul(*bits as usize) / 32, n]),
            )?;
            check_tensor(&nm("qzeros"), zi, &i32s, None)?;
            check_tensor(&nm("scales"), si, &f16s, None)?;
            let g_idx = match optional("g_idx") {
                Some((gi, bytes)) => {
                    check_tensor(&nm("g_idx"), gi, &i32s, Some(&[k]))?;
                    Some(bytes)
                }
                None => None,
            };
            PackedLinear::Gptq {
                k,
                n,
                bits: *bits,
                group_size: g,
                zeros: *zeros,
                qweight,
                qzeros,
                scales,
                g_idx,
            }
        }
        QuantScheme::Exl2 { .. } => {
            let (qi, q_weight) = tensor("q_weight")?;
            let (si, q_scale) = tensor("q_scale")?;
            let (mi, q_scale_max) = tensor("q_scale_max")?;
            let (gi, q_groups) = tensor("q_groups")?;
            let (pi, q_invperm) = tensor("q_invperm")?;
            check_tensor(&nm("q_weight"), qi, &i32s, None)?;
            if qi.shape.len() != 2 || qi.shape[1] != padded_n(n) {
                return Err(ConvertError::bad_tensor(
                    &nm("q_weight"),
                    format!(
                        "shape {:?}, expected [rows, {}] (out features {n} padded to 32)",
                        qi.shape,
                        padded_n(n)
                    ),
                ));
            }
            check_tensor(&nm("q_scale"), si, &i32s, None)?;
            check_tensor(&nm("q_scale_max"), mi, &f16s, None)?;
            check_tensor(&nm("q_groups"), gi, &[StDtype::I16], None)?;
            check_tensor(&nm("q_invperm"), pi, &i32s, Some(&[k]))?;
            PackedLinear::Exl2 {
                k,
                n,
                q_weight,
                q_scale,
                q_scale_max,
                q_groups,
                q_invperm,
            }
        }
        QuantScheme::CompressedTensors { bits, strategy, .. } => {
            let g = match strategy {
                CtStrategy::Group(g) => *g,
                CtStrategy::Channel => k,
            };
            let (pi, weight_packed) = tensor("weight_packed")?;
            let (si, weight_scale) = tensor("weight_scale")?;
            let (hi, weight_shape) = tensor("weight_shape")?;
            check_tensor(&nm("weight_packed"), pi, &i32s, None)?;
            if pi.shape.len() != 2 || pi.shape[0] != n {
                return Err(ConvertError::bad_tensor(
                    &nm("weight_packed"),
                    format!("shape {:?}, expected [{n}, packed words]", pi.shape),
                ));
            }
            let scale_dtype = match si.dtype {
                StDtype::F16 => ScaleDtype::F16,
                StDtype::BF16 => ScaleDtype::Bf16,
                StDtype::F32 => ScaleDtype::F32,
                other => {
                    return Err(ConvertError::bad_tensor(
                        &nm("weight_scale"),
                        format!("dtype {}, expected F16, BF16 or F32", other.name()),
                    ));
                }
            };
            check_tensor(
                &nm("weight_shape"),
                hi,
                &[StDtype::I64, StDtype::I32],
                Some(&[2]),
            )?;
            let weight_zero_point = match optional("weight_zero_point") {
                Some((zi, b)) => {
                    check_tensor(&nm("weight_zero_point"), zi, &i32s, None)?;
                    Some(b)
                }
                None => None,
            };
            if let QuantScheme::CompressedTensors {
                symmetric: false, ..
            } = scheme
                && weight_zero_point.is_none()
            {
                return Err(ConvertError::MissingTensor(nm("weight_zero_point")));
            }
            let weight_g_idx = match optional("weight_g_idx") {
                Some((gi, b)) => {
                    check_tensor(&nm("weight_g_idx"), gi, &i32s, Some(&[k]))?;
                    Some(b)
                }
                None => None,
            };
            PackedLinear::Ct {
                k,
                n,
                bits: *bits,
                group_size: g,
                scale_dtype,
                weight_packed,
                weight_scale,
                weight_shape,
                weight_zero_point,
                weight_g_idx,
            }
        }
    };
    PackedLinear::new(packed).map_err(quant_err(prefix))
}

/// The quantized format [`crate::gguf_to_quantized_hf`] writes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QuantWriteFormat {
    /// AutoAWQ GEMM (4-bit, asymmetric), `version: "gemm"`.
    Awq,
    /// AutoGPTQ layout.
    Gptq {
        /// Act-order (`desc_act: true`): inputs are grouped in descending order of the weight's
        /// column L2 norm, a stand-in for GPTQ's `argsort(diag(H))`, which needs calibration
        /// activations; `g_idx` records it.
        act_order: bool,
        /// Symmetric (`zero = 2^(bits−1)`).
        sym: bool,
        /// Write `checkpoint_format: "gptq_v2"` (true zeros) instead of v1 (`zero − 1`). v1
        /// with `sym = false` fails on any group whose zero point is 0 (the v1 defect).
        v2: bool,
    },
    /// exllamav2 EXL2 with per-group widths planned for an average of `target_bpw` bits
    /// ([`exl2::plan`]), inputs ordered by descending column norm.
    Exl2 {
        /// Target bits per weight (2.0..=8.0; scale storage not counted).
        target_bpw: f32,
    },
    /// compressed-tensors `pack-quantized` (dense packing).
    CompressedTensors {
        /// Symmetric (no `weight_zero_point`).
        symmetric: bool,
    },
}

/// Options of [`crate::gguf_to_quantized_hf`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantWriteOptions {
    /// The format.
    pub format: QuantWriteFormat,
    /// Bits per code (AWQ: 4; GPTQ: 2, 3, 4, 8; compressed-tensors: 2..=8). Ignored for EXL2,
    /// whose widths come from `target_bpw`.
    pub bits: u32,
    /// The group size (EXL2: a multiple of 32). Every layer's in-features must be a multiple
    /// of it ([`ConvertError::GroupSizeDoesNotDivide`]).
    pub group_size: GroupSize,
}

impl QuantWriteOptions {
    /// Checks the bits against the format, before any tensor is written.
    pub(crate) fn check(&self) -> Result<(), ConvertError> {
        let bits = json!(self.bits);
        let allowed: &[u32] = match self.format {
            QuantWriteFormat::Awq => &[4],
            QuantWriteFormat::Gptq { .. } => &[2, 3, 4, 8],
            QuantWriteFormat::Exl2 { target_bpw } => {
                if !(2.0..=8.0).contains(&target_bpw) {
                    return Err(unsupported(
                        "bits",
                        Some(&json!(target_bpw)),
                        "EXL2 targets 2.0 to 8.0 bits per weight",
                    ));
                }
                return Ok(());
            }
            QuantWriteFormat::CompressedTensors { .. } => &[2, 3, 4, 5, 6, 7, 8],
        };
        if !allowed.contains(&self.bits) {
            return Err(unsupported(
                "bits",
                Some(&bits),
                format!("this format supports {allowed:?} bits"),
            ));
        }
        if let GroupSize::Size(0) = self.group_size {
            return Err(unsupported(
                "group_size",
                Some(&json!(0)),
                "must be positive or -1",
            ));
        }
        Ok(())
    }

    /// The `quantization_config` the upstream tool writes for these options.
    pub fn quantization_config(&self) -> Value {
        let g = self.group_size.to_json();
        match self.format {
            QuantWriteFormat::Awq => json!({
                "quant_method": "awq",
                "bits": self.bits,
                "group_size": g,
                "zero_point": true,
                "version": "gemm",
                "modules_to_not_convert": null,
            }),
            QuantWriteFormat::Gptq { act_order, sym, v2 } => json!({
                "bits": self.bits,
                "group_size": g,
                "damp_percent": 0.01,
                "desc_act": act_order,
                "static_groups": false,
                "sym": sym,
                "true_sequential": true,
                "model_name_or_path": null,
                "model_file_base_name": null,
                "quant_method": "gptq",
                "checkpoint_format": if v2 { "gptq_v2" } else { "gptq" },
            }),
            QuantWriteFormat::Exl2 { target_bpw } => json!({
                "quant_method": "exl2",
                "version": "0.2.7",
                "bits": crate::util::f32_json(target_bpw),
            }),
            QuantWriteFormat::CompressedTensors { symmetric } => {
                let (strategy, gs) = match self.group_size {
                    GroupSize::Size(s) => ("group", json!(s)),
                    GroupSize::PerChannel => ("channel", Value::Null),
                };
                json!({
                    "quant_method": "compressed-tensors",
                    "format": "pack-quantized",
                    "quantization_status": "compressed",
                    "global_compression_ratio": null,
                    "ignore": ["lm_head"],
                    "kv_cache_scheme": null,
                    "config_groups": {
                        "group_0": {
                            "targets": ["Linear"],
                            "input_activations": null,
                            "output_activations": null,
                            "weights": {
                                "num_bits": self.bits,
                                "type": "int",
                                "symmetric": symmetric,
                                "strategy": strategy,
                                "group_size": gs,
                                "dynamic": false,
                                "actorder": null,
                                "observer": "minmax",
                                "block_structure": null,
                            }
                        }
                    }
                })
            }
        }
    }
}

/// Input order by descending L2 norm of each column of `w` (`[n][k]`); ties keep order.
pub(crate) fn column_norm_order(w: &[f32], n: usize, k: usize) -> Vec<u32> {
    let mut norms = vec![0f64; k];
    for row in w.chunks_exact(k).take(n) {
        for (acc, &x) in norms.iter_mut().zip(row) {
            *acc += f64::from(x) * f64::from(x);
        }
    }
    let mut order: Vec<u32> = (0..k as u32).collect();
    order.sort_by(|&a, &b| norms[b as usize].total_cmp(&norms[a as usize]));
    order
}

fn st(name: String, dtype: StDtype, shape: Vec<usize>, data: Vec<u8>) -> StWriteTensor<'static> {
    StWriteTensor {
        name,
        dtype,
        shape,
        data: Cow::Owned(data),
    }
}

/// Quantizes the linear weight `w` (`[n][k]`, HF orientation) of layer `prefix` into the
/// format's tensors, with the upstream names, dtypes and shapes.
pub(crate) fn quantize_linear(
    prefix: &str,
    w: &[f32],
    n: usize,
    k: usize,
    o: &QuantWriteOptions,
) -> Result<Vec<StWriteTensor<'static>>, ConvertError> {
    let g = o.group_size.for_k(k);
    // GPTQ stores ceil(k / g) groups, the last one short (AutoGPTQ's `scales` has
    // `ceil(infeatures / group_size)` rows); the other layouts need whole groups.
    if !matches!(o.format, QuantWriteFormat::Gptq { .. }) {
        divides(prefix, "weight", k, g)?;
    }
    let name = |s: &str| format!("{prefix}.{s}");
    let qe = quant_err(prefix);
    Ok(match o.format {
        QuantWriteFormat::Awq => {
            let t = awq::quantize(w, n, k, g).map_err(&qe)?;
            vec![
                st(name("qweight"), StDtype::I32, vec![k, n / 8], t.qweight),
                st(name("qzeros"), StDtype::I32, vec![k / g, n / 8], t.qzeros),
                st(name("scales"), StDtype::F16, vec![k / g, n], t.scales),
            ]
        }
        QuantWriteFormat::Gptq { act_order, sym, v2 } => {
            let order = act_order.then(|| column_norm_order(w, n, k));
            let t = gptq::quantize(
                w,
                n,
                k,
                &GptqOptions {
                    bits: o.bits,
                    group_size: g,
                    act_order: order.as_deref(),
                    sym,
                    format: if v2 { GptqZeros::V2 } else { GptqZeros::V1 },
                },
            )
            .map_err(&qe)?;
            let b = o.bits as usize;
            let groups = k.div_ceil(g);
            vec![
                st(
                    name("qweight"),
                    StDtype::I32,
                    vec![k * b / 32, n],
                    t.qweight,
                ),
                st(
                    name("qzeros"),
                    StDtype::I32,
                    vec![groups, n * b / 32],
                    t.qzeros,
                ),
                st(name("scales"), StDtype::F16, vec![groups, n], t.scales),
                st(name("g_idx"), StDtype::I32, vec![k], t.g_idx),
            ]
        }
        QuantWriteFormat::Exl2 { target_bpw } => {
            let plan = exl2::plan(k, g, target_bpw).map_err(&qe)?;
            let t = exl2::quantize(w, n, k, &plan, g, Exl2Perm::ColumnNorm).map_err(&qe)?;
            let np = padded_n(n);
            let groups = plan.len();
            let qrows = t.q_weight.len() / 4 / np.max(1);
            vec![
                st(name("q_weight"), StDtype::I32, vec![qrows, np], t.q_weight),
                st(
                    name("q_scale"),
                    StDtype::I32,
                    vec![groups, np / 8],
                    t.q_scale,
                ),
                st(
                    name("q_scale_max"),
                    StDtype::F16,
                    vec![groups],
                    t.q_scale_max,
                ),
                st(name("q_groups"), StDtype::I16, vec![2 * groups], t.q_groups),
                st(name("q_invperm"), StDtype::I32, vec![k], t.q_invperm),
            ]
        }
        QuantWriteFormat::CompressedTensors { symmetric } => {
            let t = ct::quantize(w, n, k, o.bits, g, symmetric, ScaleDtype::F16).map_err(&qe)?;
            let groups = k.div_ceil(g);
            let words = (k * o.bits as usize).div_ceil(32);
            let mut v = vec![
                st(
                    name("weight_packed"),
                    StDtype::I32,
                    vec![n, words],
                    t.weight_packed,
                ),
                st(
                    name("weight_scale"),
                    StDtype::F16,
                    vec![n, groups],
                    t.weight_scale,
                ),
            ];
            if let Some(zp) = t.weight_zero_point {
                let zrows = (n * o.bits as usize).div_ceil(32);
                v.push(st(
                    name("weight_zero_point"),
                    StDtype::I32,
                    vec![zrows, groups],
                    zp,
                ));
            }
            v.push(st(
                name("weight_shape"),
                StDtype::I64,
                vec![2],
                t.weight_shape,
            ));
            v
        }
    })
}
