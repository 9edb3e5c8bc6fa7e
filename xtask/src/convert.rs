//! `cargo xtask convert IN OUT [--to gguf|hf|awq|gptq|exl2] [--type TYPE] [--bits B]
//! [--group-size G] [--keep-output] [--keep-embeddings] [--dtype f16|bf16|f32]`: a thin front
//! end over `ember-convert`.
//!
//! `IN` is a GGUF file, a Hugging Face checkpoint directory, or a manifest model name
//! (`ember_hub::resolve`). `--to` defaults to `gguf` when `OUT` ends in `.gguf`, else `hf`.
//!
//! - GGUF -> gguf: requantize to `--type` (required), as llama-quantize does;
//! - GGUF -> hf: a checkpoint directory with weights in `--dtype` (default f16);
//! - checkpoint -> gguf: `--type` (default f16).
//!
//! AWQ, GPTQ and EXL2 output (and `--bits`, `--group-size`) are not supported yet.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ember_convert::{
    Progress, QuantizeOptions, gguf_to_hf, hf_to_gguf, parse_type, requantize_gguf,
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
    /// AutoAWQ (not yet supported).
    Awq,
    /// GPTQ (not yet supported).
    Gptq,
    /// ExLlamaV2 EXL2 (not yet supported).
    Exl2,
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
    /// Bits per weight (AWQ/GPTQ/EXL2; not yet supported).
    #[arg(long)]
    pub(crate) bits: Option<f32>,
    /// Quantization group size (AWQ/GPTQ; not yet supported).
    #[arg(long)]
    pub(crate) group_size: Option<u32>,
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
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// GGUF -> GGUF.
    Requantize(QuantizeOptions),
    /// GGUF -> HF directory.
    GgufToHf(StDtype),
    /// HF directory -> GGUF.
    HfToGguf(QuantizeOptions),
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
    if matches!(to, Target::Awq | Target::Gptq | Target::Exl2) {
        let name = format!("{to:?}").to_lowercase();
        bail!("--to {name} is not yet supported (AWQ, GPTQ and EXL2 writers are still to come)");
    }
    if a.bits.is_some() || a.group_size.is_some() {
        bail!("--bits and --group-size are for AWQ/GPTQ/EXL2 output, which is not yet supported");
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
        Plan::HfToGguf(opts) => {
            let c = Checkpoint::open(&input).with_context(|| input.display().to_string())?;
            hf_to_gguf(&c, &a.output, &opts, &mut progress)?;
        }
    }
    bar.finish_and_clear();
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
