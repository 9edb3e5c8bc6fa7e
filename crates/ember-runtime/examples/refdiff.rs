//! Compares Ember with a llama.cpp reference JSON (`shared/reference`, `tests/fixtures/reference`)
//! position by position: the prompt then each step, and one-call teacher forcing in slices of B.
//! `cargo run --release -p ember-runtime --example refdiff -- MODEL.gguf REF.json [B]`
use ember_runtime::eval::{prompt_then_step_logits, teacher_forced_logits};
use ember_runtime::loaded::LoadedModel;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
fn tops(v: &Value) -> Vec<(u32, f32)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            if p.is_array() {
                (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32)
            } else {
                (
                    p["id"].as_u64().unwrap() as u32,
                    p["logit"].as_f64().unwrap() as f32,
                )
            }
        })
        .collect()
}
fn diff(row: &[f32], want: &[(u32, f32)]) -> f32 {
    want.iter()
        .map(|&(i, l)| (row[i as usize] - l).abs())
        .fold(0.0, f32::max)
}
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let m = LoadedModel::open(a[1].as_ref(), &ember_models::default_device()).unwrap();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&a[2]).unwrap()).unwrap();
    let prompt = ids(&r["prompt_token_ids"]);
    let greedy = ids(&r["greedy_generated_token_ids"]);
    let steps: Value = match &r["step_top5"] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        v => v.clone(),
    };
    let rows = prompt_then_step_logits(&m.model, &prompt, &greedy).unwrap();
    let mut want = vec![tops(&r["top5_logits_at_last_prompt_position"])];
    for s in steps.as_array().unwrap() {
        want.push(tops(s));
    }
    let d: Vec<String> = rows
        .iter()
        .zip(&want)
        .map(|(row, w)| format!("{:.1e}", diff(row, w)))
        .collect();
    println!("prompt({}) then steps: {}", prompt.len(), d.join(" "));
    if let Some(tf) = r.get("teacher_forced_top5") {
        let tf: Value = match tf {
            Value::String(s) => serde_json::from_str(s).unwrap(),
            v => v.clone(),
        };
        let all: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        let batch = a.get(3).map(|s| s.parse().unwrap()).unwrap_or(4096);
        let rows = teacher_forced_logits(&m.model, &all, batch).unwrap();
        let tf = tf.as_array().unwrap();
        let mut first_bad = None;
        let mut max = 0.0f32;
        for (p, (row, w)) in rows.iter().zip(tf).enumerate() {
            let w = if w.is_object() && w.get("top").is_some() {
                tops(&w["top"])
            } else {
                tops(w)
            };
            let dd = diff(row, &w);
            if dd > 5e-6 && first_bad.is_none() {
                first_bad = Some(p);
            }
            max = max.max(dd);
        }
        println!(
            "teacher-forced one batch ({}): first bad {:?}, max {:.2e}",
            all.len(),
            first_bad,
            max
        );
    }
}
