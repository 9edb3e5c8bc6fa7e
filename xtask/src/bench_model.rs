//! `cargo xtask bench-model`: llama-architecture GGUFs with real 1B and 3B shapes, random
//! weights and SmolLM2's tokenizer, for benchmarks in the bandwidth-bound regime most local
//! users live in (the two real models are 135M and 270M). The weights are noise: the text is
//! meaningless; the work a token costs is that of a real model of these layers and type, with
//! a smaller vocabulary than Llama 3.2's 128256 (49152: for the 1B Q4_0, 630 MB read a token
//! instead of about 760 MB). The same name gives the same file on every host.
//!
//! Shapes are Llama 3.2 1B and 3B (tied embeddings) with SmolLM2's 49152-token vocabulary.
//! Types follow llama-quantize's rules without an importance matrix: `q4_0` and `q8_0` as
//! `ember_convert::target_type` gives them (the tied embedding, which is the output, Q6_K for
//! Q4_0), and `q4_k_m` with llama.cpp's per-layer mixture (`attn_v` and `ffn_down` of the
//! layers `use_more_bits` picks in Q6_K, the rest Q4_K).
//!
//! Also the streaming-read probe the benchmarks measure their bandwidth limit with.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ember_formats::{GgufFile, GgufWriter, MetaValue};
use ember_quant::GgmlType;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model shape: 1b (Llama 3.2 1B: 16 layers of 2048) or 3b (28 layers of 3072).
    #[arg(long, default_value = "1b")]
    pub shape: String,
    /// Weight type: q4_0, q4_k_m or q8_0.
    #[arg(long = "type", default_value = "q4_0")]
    pub ty: String,
    /// Output file (default target/bench-models/llama-SHAPE-TYPE.gguf).
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

/// The shape of one benchmark model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub name: &'static str,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv: usize,
    pub n_ff: usize,
}

pub const SHAPES: &[Shape] = &[
    Shape {
        name: "1b",
        n_embd: 2048,
        n_layer: 16,
        n_head: 32,
        n_kv: 8,
        n_ff: 8192,
    },
    Shape {
        name: "3b",
        n_embd: 3072,
        n_layer: 28,
        n_head: 24,
        n_kv: 8,
        n_ff: 8192,
    },
];

/// The weight types, by the name llama.cpp's files carry.
pub const TYPES: &[&str] = &["q4_0", "q4_k_m", "q8_0"];

/// A benchmark model's manifest-like name, `llama-1b-q4_0`: what `bench-vs-llamacpp --model`
/// accepts and generates on first use.
pub fn model_name(shape: &str, ty: &str) -> String {
    format!("llama-{shape}-{ty}")
}

/// (shape, type) of a benchmark model name, if it is one.
pub fn parse_name(name: &str) -> Option<(Shape, &'static str)> {
    let rest = name.strip_prefix("llama-")?;
    let (shape, ty) = rest.split_once('-')?;
    let shape = *SHAPES.iter().find(|s| s.name == shape)?;
    let ty = *TYPES.iter().find(|t| **t == ty)?;
    Some((shape, ty))
}

pub fn default_path(shape: &str, ty: &str) -> PathBuf {
    crate::root()
        .join("target/bench-models")
        .join(format!("{}.gguf", model_name(shape, ty)))
}

pub fn run(a: Args) -> Result<()> {
    let Some(shape) = SHAPES.iter().find(|s| s.name == a.shape) else {
        bail!("--shape {} is not one of 1b, 3b", a.shape);
    };
    let Some(ty) = TYPES.iter().find(|t| **t == a.ty) else {
        bail!("--type {} is not one of {}", a.ty, TYPES.join(", "));
    };
    let out = a.out.unwrap_or_else(|| default_path(shape.name, ty));
    write_model(*shape, ty, &out)?;
    Ok(())
}

/// The path of benchmark model `name`, generated first when it is missing; `None` when `name`
/// is not a benchmark model's name.
pub fn ensure(name: &str) -> Result<Option<PathBuf>> {
    let Some((shape, ty)) = parse_name(name) else {
        return Ok(None);
    };
    let path = default_path(shape.name, ty);
    if !path.exists() {
        write_model(shape, ty, &path)?;
    }
    Ok(Some(path))
}

/// llama.cpp's `use_more_bits` (llama-quant.cpp): the first and last eighth of the layers and
/// every third one between get the bigger type in the `_M` mixtures.
fn use_more_bits(i_layer: usize, n_layer: usize) -> bool {
    i_layer < n_layer / 8
        || i_layer >= 7 * n_layer / 8
        || (i_layer as isize - (n_layer / 8) as isize).rem_euclid(3) == 2
}

/// The stored type of tensor `name` (ggml `dims`) in layer `layer` of `n_layer` for file type
/// `ty`, as llama-quantize chooses it with no importance matrix.
fn tensor_type(
    ty: &str,
    name: &str,
    dims: &[u64],
    layer: Option<usize>,
    n_layer: usize,
) -> GgmlType {
    let base = match ty {
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        _ => GgmlType::Q4_K,
    };
    let opts = ember_convert::QuantizeOptions::new(base);
    // Tied embeddings: no output.weight, so token_embd.weight gets the output's rule.
    let t = ember_convert::target_type(name, dims, GgmlType::F32, &opts, false);
    if ty == "q4_k_m"
        && (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
        && layer.is_some_and(|i| use_more_bits(i, n_layer))
    {
        return GgmlType::Q6_K;
    }
    t
}

fn file_type(ty: &str) -> u32 {
    match ty {
        "q8_0" => 7,
        "q4_0" => 2,
        // LLAMA_FTYPE_MOSTLY_Q4_K_M
        _ => 15,
    }
}

/// xorshift64*: fast, seedable noise (the weights only have to be finite and of a realistic
/// spread, so that activations stay in range).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self, scale: f32) -> f32 {
        // 24 random bits to [-1, 1), times scale.
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    }
}

/// A `rows x cols` matrix of uniform noise in `±scale`, quantized to `ty`. Blocks of 256 rows
/// each have their own seed (so the bytes do not depend on the host's core count), and every
/// core generates and quantizes a contiguous run of blocks.
fn random_matrix(rows: usize, cols: usize, scale: f32, ty: GgmlType, seed: u64) -> Result<Vec<u8>> {
    const BLOCK_ROWS: usize = 256;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let blocks = rows.div_ceil(BLOCK_ROWS);
    let per = blocks.div_ceil(threads).max(1) * BLOCK_ROWS;
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..rows)
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(rows);
                s.spawn(move || {
                    let mut bytes = Vec::new();
                    for block in (start..end).step_by(BLOCK_ROWS) {
                        let n = BLOCK_ROWS.min(end - block);
                        let mut rng =
                            Rng(seed ^ (block as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                        let vals: Vec<f32> = (0..n * cols).map(|_| rng.uniform(scale)).collect();
                        bytes.extend(
                            ember_quant::quantize(ty, &vals)
                                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
                        );
                    }
                    Ok(bytes)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a quantizing thread panicked"))?
            })
            .collect()
    });
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

/// SmolLM2's tokenizer metadata (every `tokenizer.` key), from the real model's file.
fn tokenizer_metadata() -> Result<Vec<(String, MetaValue)>> {
    let path = ember_hub::resolve(crate::DEFAULT_MODEL)?;
    let f = GgufFile::open(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(f.metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect())
}

/// Writes benchmark model `shape`/`ty` to `out` (through `OUT.partial`, renamed at the end).
pub fn write_model(shape: Shape, ty: &str, out: &Path) -> Result<()> {
    let started = Instant::now();
    eprintln!(
        "writing {} ({} layers of {}, random weights, {ty}) to {}",
        model_name(shape.name, ty),
        shape.n_layer,
        shape.n_embd,
        out.display()
    );
    let tokenizer = tokenizer_metadata()?;
    let vocab = tokenizer
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| match v {
            MetaValue::Array(a) => Some(a.len()),
            _ => None,
        })
        .context("SmolLM2's file has no token list")?;
    let head_dim = shape.n_embd / shape.n_head;
    let (n_q, n_kv) = (shape.n_head * head_dim, shape.n_kv * head_dim);
    let mut w = GgufWriter::new();
    let key = |k: &str| format!("llama.{k}");
    w.add("general.architecture", "llama")
        .add(
            "general.name",
            format!(
                "Ember benchmark llama {} (random weights)",
                shape.name.to_uppercase()
            )
            .as_str(),
        )
        .add("general.file_type", MetaValue::U32(file_type(ty)))
        .add("general.quantization_version", MetaValue::U32(2))
        .add(key("block_count"), shape.n_layer as u32)
        .add(key("context_length"), 8192u32)
        .add(key("embedding_length"), shape.n_embd as u32)
        .add(key("feed_forward_length"), shape.n_ff as u32)
        .add(key("attention.head_count"), shape.n_head as u32)
        .add(key("attention.head_count_kv"), shape.n_kv as u32)
        .add(key("rope.freq_base"), 500_000.0f32)
        .add(key("rope.dimension_count"), head_dim as u32)
        .add(key("attention.layer_norm_rms_epsilon"), 1e-5f32)
        .add(key("vocab_size"), vocab as u32);
    for (k, v) in tokenizer {
        w.add(k, v);
    }
    let mut seed = 0x0045_4d42_4552_u64; // "EMBER"
    let mut matrix = |w: &mut GgufWriter,
                      name: String,
                      rows: usize,
                      cols: usize,
                      scale: f32,
                      layer: Option<usize>|
     -> Result<()> {
        let dims = [cols as u64, rows as u64];
        let t = tensor_type(ty, &name, &dims, layer, shape.n_layer);
        seed = seed.wrapping_add(1);
        let bytes = random_matrix(rows, cols, scale, t, seed)?;
        w.add_tensor(name, &dims, t, bytes)?;
        Ok(())
    };
    let norm = |w: &mut GgufWriter, name: String, len: usize| -> Result<()> {
        let bytes: Vec<u8> = (0..len).flat_map(|_| 1.0f32.to_le_bytes()).collect();
        w.add_tensor(name, &[len as u64], GgmlType::F32, bytes)?;
        Ok(())
    };
    let linear = |cols: usize| 1.5 / (cols as f32).sqrt();
    matrix(
        &mut w,
        "token_embd.weight".into(),
        vocab,
        shape.n_embd,
        1.0,
        None,
    )?;
    norm(&mut w, "output_norm.weight".into(), shape.n_embd)?;
    for i in 0..shape.n_layer {
        let n = |t: &str| format!("blk.{i}.{t}");
        let (e, f) = (shape.n_embd, shape.n_ff);
        norm(&mut w, n("attn_norm.weight"), e)?;
        matrix(&mut w, n("attn_q.weight"), n_q, e, linear(e), Some(i))?;
        matrix(&mut w, n("attn_k.weight"), n_kv, e, linear(e), Some(i))?;
        matrix(&mut w, n("attn_v.weight"), n_kv, e, linear(e), Some(i))?;
        matrix(
            &mut w,
            n("attn_output.weight"),
            e,
            n_q,
            linear(n_q),
            Some(i),
        )?;
        norm(&mut w, n("ffn_norm.weight"), e)?;
        matrix(&mut w, n("ffn_gate.weight"), f, e, linear(e), Some(i))?;
        matrix(&mut w, n("ffn_up.weight"), f, e, linear(e), Some(i))?;
        matrix(&mut w, n("ffn_down.weight"), e, f, linear(f), Some(i))?;
        if std::io::stderr().is_terminal() {
            eprint!("\rlayer {}/{}", i + 1, shape.n_layer);
        }
    }
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    w.write_file(&partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, out).with_context(|| format!("renaming to {}", out.display()))?;
    let size = std::fs::metadata(out).map_or(0, |m| m.len());
    eprintln!(
        "wrote {} ({:.2} GB) in {:.0} s",
        out.display(),
        size as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Bytes of weights one decode step reads: every tensor, except the token embedding when the
/// model has a separate output matrix (then only one embedding row is read a token).
pub fn bytes_per_token(f: &GgufFile) -> u64 {
    let has_output = f.tensor("output.weight").is_some();
    f.tensors()
        .iter()
        .filter(|t| !(has_output && t.name == "token_embd.weight"))
        .map(|t| t.ggml_type.bytes_for(t.n_elements()).unwrap_or(0))
        .sum()
}

/// Streaming-read bandwidth in bytes/s with `threads` readers: a 1 GiB buffer (far beyond any
/// last-level cache) written once so every page is real, then read whole by the threads, each
/// its own contiguous share; the best of `passes`. The read is `memchr` for a byte that is not
/// there: a vectorized scan, compiled optimized in its crate even in xtask's dev profile, and
/// far faster per core than DRAM, so the figure is the memory system's.
pub fn read_bandwidth(threads: usize, passes: usize) -> f64 {
    const BYTES: usize = 1 << 30;
    let buf = vec![7u8; BYTES];
    let threads = threads.max(1);
    let share = BYTES.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..passes.max(1) {
        let t0 = Instant::now();
        let found = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(share)
                .map(|chunk| s.spawn(move || memchr::memchr(0, chunk).is_some()))
                .collect();
            handles.into_iter().any(|h| h.join().unwrap_or(true))
        });
        let secs = t0.elapsed().as_secs_f64();
        assert!(!found, "the probe buffer holds no zero byte");
        best = best.max(BYTES as f64 / secs);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in SHAPES {
            for t in TYPES {
                let (shape, ty) = parse_name(&model_name(s.name, t)).expect("parses");
                assert_eq!((shape, ty), (*s, *t));
            }
        }
        assert!(parse_name("llama-2b-q4_0").is_none());
        assert!(parse_name("llama-1b-q5_0").is_none());
        assert!(parse_name("smollm2-135m-instruct-q4_1").is_none());
    }

    #[test]
    fn q4_k_m_mixture_is_llama_quantizes() {
        // Llama 3.2 1B Q4_K_M as llama-quantize writes it: attn_v and ffn_down in Q6_K for
        // layers 0, 1, 4, 7, 10, 13, 14, 15; the tied embedding Q6_K; the rest Q4_K.
        let more: Vec<usize> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
        let dims = [2048u64, 512];
        assert_eq!(
            tensor_type("q4_k_m", "blk.4.attn_v.weight", &dims, Some(4), 16),
            GgmlType::Q6_K
        );
        assert_eq!(
            tensor_type("q4_k_m", "blk.5.attn_v.weight", &dims, Some(5), 16),
            GgmlType::Q4_K
        );
        assert_eq!(
            tensor_type("q4_k_m", "blk.0.attn_q.weight", &dims, Some(0), 16),
            GgmlType::Q4_K
        );
        assert_eq!(
            tensor_type("q4_k_m", "token_embd.weight", &[2048, 49152], None, 16),
            GgmlType::Q6_K
        );
        assert_eq!(
            tensor_type("q4_0", "token_embd.weight", &[2048, 49152], None, 16),
            GgmlType::Q6_K
        );
        assert_eq!(
            tensor_type("q4_0", "blk.0.ffn_down.weight", &[8192, 2048], Some(0), 16),
            GgmlType::Q4_0
        );
        assert_eq!(
            tensor_type("q8_0", "token_embd.weight", &[2048, 49152], None, 16),
            GgmlType::Q8_0
        );
    }

    #[test]
    fn the_probe_reads() {
        assert!(read_bandwidth(2, 1) > 0.0);
    }
}
