// Throwaway probe (not committed): one thread, the q8 repacked kernel alone.
use ember_kernels::QuantMatrix;
use ember_kernels::cpu::Repacked;
use ember_kernels::cpu::q8;
use ember_quant::GgmlType;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let k: usize = args[1].parse().unwrap();
    let n: usize = args[2].parse().unwrap();
    let m: usize = args[3].parse().unwrap();
    let ty = match args[4].as_str() {
        "q4_1" => GgmlType::Q4_1,
        "q8_0" => GgmlType::Q8_0,
        _ => GgmlType::Q4_0,
    };
    let vals: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let mut w = QuantMatrix::quantize(ty, n, k, &vals).unwrap();
    assert!(w.repack());
    let Some(Repacked::Blocks(rep)) = w.repacked() else {
        panic!()
    };
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 31 % 100) as f32 / 50.0) - 1.0)
        .collect();
    let batch = q8::prepare_batch(&x, k, m, q8::act_format(ty).unwrap());
    let mut tile = q8::Tile::default();
    let mut buf = vec![0.0f32; m * 16];
    let iters = (2_000_000_000 / (n * k * m.max(1))).max(3);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            for g in 0..rep.groups() {
                let rows = rep.group_rows(g);
                if m == 1 {
                    rep.dot(g, &batch, &mut buf[..rows]);
                } else {
                    rep.tile_matmul(g, &batch, &mut tile, &mut buf[..m * rows]);
                }
            }
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
    }
    let gb = (n / 16) * (k / 32);
    let uops = gb as f64 * m as f64 * 26.0;
    println!(
        "{ty} {k}x{n} m{m}: {:.1} us, {:.2} vector uops/ns (26 per group-block-row)",
        best * 1e6,
        uops / (best * 1e9)
    );
}
