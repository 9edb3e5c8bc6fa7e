//! `ember inspect`: metadata and a tensor table, like gguf-dump.

use std::path::Path;

use anyhow::{Context, Result};
use ember_convert::QuantScheme;
use ember_formats::checkpoint::Checkpoint;
use ember_formats::safetensors::StTensorInfo;
use ember_formats::{GgufFile, MetaArray, MetaValue};
use serde_json::{Value, json};

/// Items of an array shown unless `--full`.
const PREVIEW: usize = 8;

fn scalar_json(v: &MetaValue) -> Value {
    match v {
        MetaValue::U8(x) => json!(x),
        MetaValue::I8(x) => json!(x),
        MetaValue::U16(x) => json!(x),
        MetaValue::I16(x) => json!(x),
        MetaValue::U32(x) => json!(x),
        MetaValue::I32(x) => json!(x),
        MetaValue::U64(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::F32(x) => json!(x),
        MetaValue::F64(x) => json!(x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::String(s) => json!(s),
        MetaValue::Array(a) => array_json(a, usize::MAX),
    }
}

fn array_json(a: &MetaArray, limit: usize) -> Value {
    let n = a.len().min(limit);
    Value::Array(
        (0..n)
            .filter_map(|i| a.get(i))
            .map(|v| scalar_json(&v))
            .collect(),
    )
}

fn show(v: &MetaValue, full: bool) -> String {
    match v {
        MetaValue::String(s) if !full && s.chars().count() > 120 => {
            let head: String = s.chars().take(120).collect();
            format!("{head:?}... ({} chars)", s.chars().count())
        }
        MetaValue::String(s) => format!("{s:?}"),
        MetaValue::Array(a) => {
            let limit = if full { usize::MAX } else { PREVIEW };
            let items = array_json(a, limit);
            let more = if a.len() > limit { ", ..." } else { "" };
            let inner = items.to_string();
            let inner = inner.trim_start_matches('[').trim_end_matches(']');
            format!("[{}{more}] ({} x {})", inner, a.len(), a.element_type())
        }
        other => scalar_json(other).to_string(),
    }
}

pub fn run(model: &str, full: bool, as_json: bool) -> Result<()> {
    let path = ember_hub::resolve(model)?;
    if path.is_dir() {
        return run_checkpoint(&path, as_json);
    }
    let file = GgufFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
    if as_json {
        let limit = if full { usize::MAX } else { PREVIEW };
        let metadata: serde_json::Map<String, Value> = file
            .metadata()
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    MetaValue::Array(a) => json!({
                        "type": format!("array[{}]", a.element_type()),
                        "len": a.len(),
                        "items": array_json(a, limit),
                    }),
                    other => scalar_json(other),
                };
                (k.clone(), v)
            })
            .collect();
        let tensors: Vec<Value> = file
            .tensors()
            .iter()
            .map(|t| {
                json!({ "name": t.name, "type": t.ggml_type.name(), "shape": t.dims,
                        "bytes": t.n_bytes, "offset": t.offset })
            })
            .collect();
        let out = json!({
            "path": path, "version": file.version(), "alignment": file.alignment(),
            "data_offset": file.data_offset(), "metadata": metadata, "tensors": tensors,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "{}: GGUF v{}, {} metadata keys, {} tensors, data at offset {} (alignment {})",
        path.display(),
        file.version(),
        file.metadata().len(),
        file.tensors().len(),
        file.data_offset(),
        file.alignment()
    );
    println!("\nmetadata:");
    for (k, v) in file.metadata() {
        println!("  {k:<42} {}", show(v, full));
    }
    println!("\ntensors:");
    println!(
        "  {:<36} {:<6} {:<20} {:>12}",
        "name", "type", "shape", "bytes"
    );
    let mut total = 0u64;
    for t in file.tensors() {
        let shape = format!("{:?}", t.dims);
        println!(
            "  {:<36} {:<6} {:<20} {:>12}",
            t.name,
            t.ggml_type.name(),
            shape,
            t.n_bytes
        );
        total += t.n_bytes;
    }
    println!(
        "  total: {total} bytes ({:.1} MiB)",
        total as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// The `config.json` fields that say what a model is, in this order.
const CONFIG_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "torch_dtype",
];

/// `ember inspect DIR`: a Hugging Face checkpoint's config, quantization and tensor table.
fn run_checkpoint(dir: &Path, as_json: bool) -> Result<()> {
    let ckpt = Checkpoint::open(dir)?;
    let config = ckpt.config();
    let scheme = QuantScheme::detect(&ckpt)?;
    let shards: Vec<String> = ckpt
        .shards()
        .iter()
        .map(|s| {
            s.path()
                .and_then(|p| p.file_name())
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        })
        .collect();
    let mut tensors: Vec<(usize, &StTensorInfo)> = ckpt
        .tensor_names()
        .filter_map(|n| ckpt.tensor_location(n))
        .collect();
    tensors.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let total: usize = tensors.iter().map(|(_, t)| t.n_bytes).sum();
    if as_json {
        let out = json!({
            "path": dir,
            "format": "safetensors checkpoint",
            "config": config,
            "quantization": scheme.as_ref().map(|s| json!({
                "scheme": s.to_string(),
                "quantization_config": config.get("quantization_config"),
            })),
            "shards": shards,
            "tokenizer": ckpt.tokenizer_json().is_some(),
            "tensors": tensors.iter().map(|(shard, t)| json!({
                "name": t.name, "dtype": t.dtype.name(), "shape": t.shape,
                "bytes": t.n_bytes, "shard": shards.get(*shard),
            })).collect::<Vec<_>>(),
            "bytes": total,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "{}: safetensors checkpoint, {} tensors in {} file(s), {:.1} MiB{}",
        dir.display(),
        tensors.len(),
        shards.len(),
        total as f64 / (1024.0 * 1024.0),
        if ckpt.tokenizer_json().is_some() {
            ", tokenizer.json"
        } else {
            ", no tokenizer.json"
        }
    );
    println!("\nconfig:");
    for key in CONFIG_KEYS {
        if let Some(v) = config.get(*key) {
            println!("  {key:<26} {v}");
        }
    }
    println!(
        "\nquantization: {}",
        scheme
            .as_ref()
            .map_or_else(|| "none (dense weights)".to_string(), |s| s.to_string())
    );
    println!("\ntensors:");
    println!(
        "  {:<52} {:<5} {:<16} {:>11}  file",
        "name", "dtype", "shape", "bytes"
    );
    for (shard, t) in &tensors {
        println!(
            "  {:<52} {:<5} {:<16} {:>11}  {}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            t.n_bytes,
            shards.get(*shard).map_or("?", String::as_str)
        );
    }
    Ok(())
}
