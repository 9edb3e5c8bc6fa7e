//! Read a GGUF file's metadata and tensor table with `ember-formats` alone: no burn, no model
//! loaded, only the header parsed from the memory map.
//!
//! `cargo run --release -p ember --example gguf_metadata -- [MODEL]`

use ember_formats::GgufFile;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "smollm2-135m-instruct-q4_1".into());
    // A path, or a manifest name resolved (and pulled once) by ember-hub.
    let path = ember_hub::resolve(&name)?;
    let file = GgufFile::open(&path)?;
    println!("{}", path.display());
    println!("architecture: {}", file.architecture().unwrap_or("?"));
    println!("name: {}", file.get_str("general.name").unwrap_or("?"));
    let tensors = file.tensors();
    let bytes: u64 = tensors.iter().map(|t| t.n_bytes).sum();
    let params: u64 = tensors.iter().map(|t| t.n_elements()).sum();
    println!(
        "{} tensors, {:.1} M parameters, {:.1} MiB",
        tensors.len(),
        params as f64 / 1e6,
        bytes as f64 / 1048576.0
    );
    for t in tensors.iter().take(5) {
        println!("  {:<28} {:<6} {:?}", t.name, t.ggml_type.name(), t.dims);
    }
    Ok(())
}
