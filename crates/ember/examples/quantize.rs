//! Quantize a row of weights to several GGUF block formats and back with `ember-quant` alone
//! (no burn, no file): the size of each format and the error it costs.
//!
//! `cargo run --release -p ember --example quantize`

use ember_quant::GgmlType;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A deterministic, weight-like row: 1024 values (a multiple of every block size here).
    let row: Vec<f32> = (0..1024)
        .map(|i| ((i as f32 * 0.37).sin() * 0.8 + (i as f32 * 0.011).cos() * 0.2) * 0.05)
        .collect();
    println!("{:<6} {:>8} {:>12}", "type", "bytes", "rms error");
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let blocks = ember_quant::quantize(ty, &row)?;
        let mut back = vec![0.0f32; row.len()];
        ember_quant::dequantize(ty, &blocks, &mut back)?;
        let rms = (row
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / row.len() as f32)
            .sqrt();
        println!("{:<6} {:>8} {:>12.2e}", ty.name(), blocks.len(), rms);
        assert!(rms < 0.01, "{} lost too much", ty.name());
    }
    Ok(())
}
