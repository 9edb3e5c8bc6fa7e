//! Teacher-forced top-5 logits of a comma-separated id file in slices of B tokens (default 4096),
//! as JSON like `tfgen`; with `EMBER_TRACE_DIR` every pass's tensors are written, to compare op by
//! op with `tests/fixtures/reference/make/tfgen_ubatch -d DIR`.
//! `cargo run --release -p ember-runtime --example tf_once -- MODEL.gguf IDS_FILE [B]`
use ember_runtime::eval::{teacher_forced_logits, top_k};
use ember_runtime::loaded::LoadedModel;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let m = LoadedModel::open(a[1].as_ref(), &ember_models::default_device()).unwrap();
    let ids: Vec<u32> = std::fs::read_to_string(&a[2])
        .unwrap()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let b = a.get(3).map(|s| s.parse().unwrap()).unwrap_or(4096);
    let rows = teacher_forced_logits(&m.model, &ids, b).unwrap();
    let v: Vec<_> = rows.iter().enumerate().map(|(p, r)| serde_json::json!({"pos": p, "top": top_k(r, 5).iter().map(|&(i, l)| serde_json::json!([i, l])).collect::<Vec<_>>()})).collect();
    println!("{}", serde_json::json!({"positions": v}));
}
