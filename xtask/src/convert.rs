//! `cargo xtask convert IN OUT [--to gguf|hf|awq|gptq|exl2|ct] [--type TYPE] [--bits B]
//! [--group-size G] [--act-order] [--asym] [--keep-output] [--keep-embeddings]
//! [--dtype f16|bf16|f32]`: a thin front end over `ember-convert`.
//!
//! `IN` is a GGUF file, a Hugging Face checkpoint directory, or a manifest model name
//! (`ember_hub::resolve`). `--to` defaults to `gguf` when `OUT` ends in `.gguf`, else `hf`.
//!
//! - GGUF -> gguf: requantize to `--type` (required), as llama-quantize does;
//! - GGUF -> hf: a checkpoint directory with weights in `--dtype` (default f16);
//! - checkpoint (plain, or AWQ/GPTQ/EXL2/compressed-tensors quantized) -> gguf: `--type`
//!   (default f16);
//! - GGUF -> awq | gptq | exl2 | ct: a quantized checkpoint directory (`--bits`, default 4:
//!   the code width, or for EXL2 the target bits per weight; `--group-size`, default 128, `-1`
//!   for one group per row; GPTQ `--act-order` (column-norm order), `--asym` for GPTQ (written
//!   as gptq_v2) and compressed-tensors).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ember_convert::{
    GroupSize, Progress, QuantWriteFormat, QuantWriteOptions, QuantizeOptions, gguf_to_hf,
    gguf_to_quantized_hf, hf_to_gguf, parse_type, requantize_gguf,
};
use ember_formats::GgufFile;
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StDtype;
use ember_quant::GgmlType;

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A GGUF file.
    Gguf,
    /// A Hugging Face checkpoint directory (safetensors).
    Hf,
    /// AutoAWQ GEMM checkpoint directory (4-bit).
    Awq,
    /// GPTQ checkpoint directory (2, 3, 4 or 8 bits).
    Gptq,
    /// ExLlamaV2 EXL2 checkpoint directory (`--bits` = target bits per weight).
    Exl2,
    /// compressed-tensors pack-quantized checkpoint directory (2..8 bits).
    Ct,
}

/// HF weight dtypes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HfDtype {
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// f32.
    F32,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A GGUF file, a Hugging Face checkpoint directory, or a manifest model name.
    pub(crate) input: String,
    /// The output: a `.gguf` file, or a directory for `--to hf`.
    pub(crate) output: PathBuf,
    /// Output format (default: gguf when OUT ends in .gguf, else hf).
    #[arg(long, value_enum)]
    pub(crate) to: Option<Target>,
    /// GGUF type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k
    /// (default f16 from a checkpoint; required to requantize a GGUF).
    #[arg(long = "type")]
    pub(crate) ty: Option<String>,
    /// Bits per code (AWQ 4; GPTQ 2/3/4/8; CT 2..8) or EXL2's target bits per weight
    /// (default 4).
    #[arg(long)]
    pub(crate) bits: Option<f32>,
    /// Quantization group size (default 128; -1 = one group per row). Must divide every
    /// layer's in-features.
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) group_size: Option<i64>,
    /// GPTQ act-order (desc_act): group inputs by descending weight column norm.
    #[arg(long)]
    pub(crate) act_order: bool,
    /// Asymmetric (zero-point) quantization for GPTQ (written as gptq_v2) and CT.
    #[arg(long)]
    pub(crate) asym: bool,
    /// Leave output.weight in its source type (llama-quantize --leave-output-tensor).
    #[arg(long)]
    pub(crate) keep_output: bool,
    /// Leave token_embd.weight in its source type.
    #[arg(long)]
    pub(crate) keep_embeddings: bool,
    /// Weight dtype of an HF output.
    #[arg(long, value_enum, default_value = "f16")]
    pub(crate) dtype: HfDtype,
}

/// What a conversion will do.
#[derive(Debug, PartialEq)]
pub(crate) enum Plan {
    /// GGUF -> GGUF.
    Requantize(QuantizeOptions),
    /// GGUF -> HF directory.
    GgufToHf(StDtype),
    /// HF directory (plain or quantized) -> GGUF.
    HfToGguf(QuantizeOptions),
    /// GGUF -> quantized HF directory.
    GgufToQuantized(QuantWriteOptions),
}

/// The quantized-output options from the flags.
fn quant_options(a: &Args, to: Target) -> Result<QuantWriteOptions> {
    let bits_f = a.bits.unwrap_or(4.0);
    let group_size = match a.group_size.unwrap_or(128) {
        -1 => GroupSize::PerChannel,
        g if g > 0 => GroupSize::Size(usize::try_from(g)?),
        g => bail!("--group-size {g}: expected a positive size or -1 (one group per row)"),
    };
    let int_bits = || -> Result<u32> {
        if bits_f.fract() != 0.0 || !(1.0..=8.0).contains(&bits_f) {
            bail!("--bits {bits_f}: this format takes a whole number of bits (2..8)");
        }
        Ok(bits_f as u32)
    };
    if a.act_order && to != Target::Gptq {
        bail!("--act-order applies to --to gptq only");
    }
    if a.asym && !matches!(to, Target::Gptq | Target::Ct) {
        bail!(
            "--asym applies to --to gptq and --to ct only (AWQ is always asymmetric, EXL2 symmetric)"
        );
    }
    let (format, bits) = match to {
        Target::Awq => (QuantWriteFormat::Awq, int_bits()?),
        Target::Gptq => (
            QuantWriteFormat::Gptq {
                act_order: a.act_order,
                sym: !a.asym,
                v2: a.asym,
            },
            int_bits()?,
        ),
        Target::Exl2 => (
            QuantWriteFormat::Exl2 { target_bpw: bits_f },
            bits_f.ceil() as u32,
        ),
        Target::Ct => (
            QuantWriteFormat::CompressedTensors { symmetric: !a.asym },
            int_bits()?,
        ),
        Target::Gguf | Target::Hf => unreachable!("not a quantized target"),
    };
    Ok(QuantWriteOptions {
        format,
        bits,
        group_size,
    })
}

/// Decides the conversion from the flags and whether the input is a checkpoint directory.
pub(crate) fn plan(a: &Args, input_is_dir: bool) -> Result<Plan> {
    let to = a.to.unwrap_or_else(|| {
        if a.output
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            Target::Gguf
        } else {
            Target::Hf
        }
    });
    let quantized = matches!(to, Target::Awq | Target::Gptq | Target::Exl2 | Target::Ct);
    if !quantized && (a.bits.is_some() || a.group_size.is_some() || a.act_order || a.asym) {
        bail!("--bits, --group-size, --act-order and --asym are for --to awq|gptq|exl2|ct");
    }
    if quantized {
        if input_is_dir {
            bail!(
                "--to awq|gptq|exl2|ct needs a GGUF input (convert the checkpoint to GGUF first)"
            );
        }
        if a.ty.is_some() {
            bail!("--type applies to GGUF output");
        }
        return Ok(Plan::GgufToQuantized(quant_options(a, to)?));
    }
    let ty = a.ty.as_deref().map(parse_type).transpose()?;
    let opts = |ty: GgmlType| QuantizeOptions {
        ty,
        keep_output: a.keep_output,
        keep_embeddings: a.keep_embeddings,
    };
    Ok(match (input_is_dir, to) {
        (false, Target::Gguf) => Plan::Requantize(opts(
            ty.context("--type is required to requantize a GGUF (e.g. --type q4_k)")?,
        )),
        (false, _) => {
            if a.ty.is_some() {
                bail!("--type applies to GGUF output; use --dtype for an HF checkpoint");
            }
            Plan::GgufToHf(match a.dtype {
                HfDtype::F16 => StDtype::F16,
                HfDtype::Bf16 => StDtype::BF16,
                HfDtype::F32 => StDtype::F32,
            })
        }
        (true, Target::Gguf) => Plan::HfToGguf(opts(ty.unwrap_or(GgmlType::F16))),
        (true, _) => bail!("the input is already a Hugging Face checkpoint directory"),
    })
}

/// Runs `cargo xtask convert`.
pub(crate) fn run(a: Args) -> Result<()> {
    let input = if Path::new(&a.input).exists() {
        PathBuf::from(&a.input)
    } else {
        ember_hub::resolve(&a.input)
            .with_context(|| format!("{} is neither a path nor a known model name", a.input))?
    };
    let plan = plan(&a, input.is_dir())?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |p: Progress<'_>| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.tensor.to_string());
    };
    match plan {
        Plan::Requantize(opts) => {
            let f = GgufFile::open(&input).with_context(|| input.display().to_string())?;
            requantize_gguf(&f, &a.output, &opts, &mut progress)?;
        }
        Plan::GgufToHf(dtype) => {
            let f = GgufFile::open(&input).with_context(|| input.display().to_string())?;
            gguf_to_hf(&f, &a.output, dtype, &mut progress)?;
        }
        Plan::GgufToQuantized(opts) => {
            let f = GgufFile::open(&input).with_context(|| input.display().to_string())?;
            gguf_to_quantized_hf(&f, &a.output, &opts, &mut progress)?;
        }
        Plan::HfToGguf(opts) => {
            let c = Checkpoint::open(&input).with_context(|| input.display().to_string())?;
            hf_to_gguf(&c, &a.output, &opts, &mut progress)?;
        }
    }
    bar.finish_and_clear();
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
