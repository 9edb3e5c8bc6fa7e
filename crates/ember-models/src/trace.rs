//! Tensor tracing for debugging numerics against llama.cpp: with `EMBER_TRACE_DIR` set, every
//! forward pass writes its named intermediate tensors to `DIR/<pass>/<name>-<layer>.bin`, in
//! the layout an eval callback on llama.cpp can write too (4 x i64 `ne`, innermost first, then
//! f32 data), so the two engines can be compared op by op and bit for bit. Off (one relaxed
//! load per call) unless the variable is set when the process starts.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::Tensor;

fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("EMBER_TRACE_DIR").map(PathBuf::from))
        .as_ref()
}

static PASS: AtomicUsize = AtomicUsize::new(0);

/// Whether tracing is on.
pub fn enabled() -> bool {
    dir().is_some()
}

/// Marks the end of a forward pass: later tensors go to the next pass's folder.
pub fn next_pass() {
    if enabled() {
        PASS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes `t` under `name` (`name-layer` when `layer` is given) for the current pass.
pub fn tensor<const D: usize>(name: &str, layer: Option<usize>, t: &Tensor<D>) {
    let Some(dir) = dir() else { return };
    let dims = t.dims();
    let data: Vec<f32> = t
        .clone()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    values(dir, name, layer, &dims, &data);
}

/// Writes host values of shape `dims` (outermost first) under `name`.
pub fn slice(name: &str, layer: Option<usize>, dims: &[usize], data: &[f32]) {
    if let Some(dir) = dir() {
        values(dir, name, layer, dims, data);
    }
}

fn values(dir: &std::path::Path, name: &str, layer: Option<usize>, dims: &[usize], data: &[f32]) {
    let pass = dir.join(PASS.load(Ordering::Relaxed).to_string());
    let file = match layer {
        Some(l) => format!("{name}-{l}.bin"),
        None => format!("{name}.bin"),
    };
    let mut ne = [1i64; 4];
    for (slot, &d) in ne.iter_mut().zip(dims.iter().rev()) {
        *slot = d as i64;
    }
    let mut bytes = Vec::with_capacity(32 + data.len() * 4);
    ne.iter()
        .for_each(|n| bytes.extend_from_slice(&n.to_le_bytes()));
    data.iter()
        .for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    // Debug output only: a failure to write is reported and otherwise ignored.
    if let Err(e) =
        std::fs::create_dir_all(&pass).and_then(|_| std::fs::write(pass.join(&file), bytes))
    {
        eprintln!("ember trace: cannot write {file}: {e}");
    }
}
