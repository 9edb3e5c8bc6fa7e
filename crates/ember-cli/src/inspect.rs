//! `ember inspect`: metadata and a tensor table, like gguf-dump.

use anyhow::{Context, Result};
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
