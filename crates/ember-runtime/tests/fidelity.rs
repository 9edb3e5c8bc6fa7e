//! The whole model against llama.cpp: SmolLM2-135M-Instruct Q4_1 on the reference prompts in
//! `shared/reference` (llama.cpp 0c1e570, CPU, 2 threads, f16 KV cache).
//!
//! Ember computes every operation with llama.cpp's arithmetic (the same activation
//! quantization, the same order of every float operation in the dot products, ggml's `expf`,
//! the same FMAs), so its logits are llama.cpp's bit for bit. The references store them with 6
//! decimals; every one of llama.cpp's top-5 logits, after the prompt and after each of its
//! 32 greedy tokens, must be matched to that precision, and greedy decoding must produce its
//! 32 tokens exactly.

use std::path::PathBuf;
use std::sync::OnceLock;

use ember_runtime::eval::{prompt_then_step_logits, teacher_forced_logits, top_k};
use ember_runtime::generate::{GenerateRequest, generate};
use ember_runtime::loaded::LoadedModel;
use ember_runtime::sampling::SamplingParams;
use serde_json::Value;

/// Half a unit of the reference's sixth decimal, plus an f32 ulp of a logit near 32.
const MAX_ABS: f32 = 5e-7 + 4e-6;

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = match std::env::var_os("EMBER_TEST_SMOLLM2") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => ember_hub::resolve("smollm2-135m-instruct-q4_1")
                .unwrap_or_else(|e| panic!("cannot get SmolLM2: {e}")),
        };
        LoadedModel::open(&path, &ember_models::default_device()).expect("load SmolLM2")
    })
}

fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference")
}

fn references() -> Vec<(String, Value)> {
    let mut out: Vec<_> = std::fs::read_dir(reference_dir())
        .expect("shared/reference beside the repository")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("smollm2_") && n.ends_with(".json"))
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read reference");
            (
                p.display().to_string(),
                serde_json::from_str(&text).expect("reference JSON"),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 3,
        "expected SmolLM2 references in {:?}",
        reference_dir()
    );
    out
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The reference's top-5 lists: after the last prompt token, then after each greedy token.
fn reference_top5(r: &Value) -> Vec<Vec<(u32, f32)>> {
    let first = r["top5_logits_at_last_prompt_position"]
        .as_array()
        .expect("top5")
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().unwrap() as u32,
                e["logit"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    let steps: Value = match &r["step_top5"] {
        Value::String(s) => serde_json::from_str(s).expect("step_top5 JSON"),
        v => v.clone(),
    };
    let mut out = vec![first];
    for step in steps.as_array().expect("steps") {
        out.push(
            step.as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect(),
        );
    }
    out
}

#[test]
fn prompt_tokens_match_llama_cpp() {
    let m = model();
    for (name, r) in references() {
        let got = m
            .tokenize_prompt(r["prompt_text"].as_str().unwrap())
            .unwrap();
        assert_eq!(got, ids(&r["prompt_token_ids"]), "{name}");
    }
}

#[test]
fn teacher_forced_logits_match_llama_cpp() {
    let m = model();
    for (name, r) in references() {
        let prompt = ids(&r["prompt_token_ids"]);
        let greedy = ids(&r["greedy_generated_token_ids"]);
        // As llama.cpp computed them: the prompt as one batch, then one token per step.
        let rows = prompt_then_step_logits(&m.model, &prompt, &greedy).unwrap();
        let refs = reference_top5(&r);
        let (mut sum, mut n, mut max) = (0.0f32, 0usize, 0.0f32);
        // refs[j] and rows[j] are both the distribution after token prompt.len() - 1 + j.
        for (j, top5) in refs.iter().enumerate() {
            let pos = prompt.len() - 1 + j;
            let Some(row) = rows.get(j) else { break };
            for &(id, logit) in top5 {
                let d = (row[id as usize] - logit).abs();
                assert!(
                    d <= MAX_ABS,
                    "{name} pos {pos} token {id}: ours {} vs {logit}",
                    row[id as usize]
                );
                sum += d;
                max = max.max(d);
                n += 1;
            }
            if top5[0].1 > top5[1].1 {
                let ours = top_k(row, 1)[0].0;
                assert_eq!(
                    ours,
                    top5[0].0,
                    "{name} pos {pos}: argmax differs (llama.cpp margin {})",
                    top5[0].1 - top5[1].1
                );
            }
        }
        let mean = sum / n as f32;
        eprintln!("{name}: {n} logits, mean |diff| {mean:.2e}, max {max:.2e}");
        assert_eq!(n, 5 * refs.len(), "{name}: every reference position scored");
    }
}

/// One batch over prompt + continuation (the tiled attention path once it reaches 64 tokens)
/// must pick the same tokens as the step-by-step run wherever llama.cpp's choice was clear.
#[test]
fn one_batch_teacher_forcing_agrees_on_decided_tokens() {
    let m = model();
    for (name, r) in references() {
        let prompt = ids(&r["prompt_token_ids"]);
        let greedy = ids(&r["greedy_generated_token_ids"]);
        let all: Vec<u32> = prompt.iter().chain(&greedy).copied().collect();
        let rows = teacher_forced_logits(&m.model, &all, 512).unwrap();
        for (j, top5) in reference_top5(&r).iter().enumerate() {
            let pos = prompt.len() - 1 + j;
            if pos >= rows.len() || top5[0].1 - top5[1].1 <= 1.0 {
                continue;
            }
            assert_eq!(top_k(&rows[pos], 1)[0].0, top5[0].0, "{name} pos {pos}");
        }
    }
}

#[test]
fn greedy_generation_is_llama_cpps() {
    let m = model();
    for (name, r) in references() {
        let prompt = ids(&r["prompt_token_ids"]);
        let greedy = ids(&r["greedy_generated_token_ids"]);
        let decided = greedy.len();
        let req = GenerateRequest {
            prompt_tokens: prompt,
            max_tokens: decided,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ctx_size: 2048,
            stop_at_eog: false,
            context_shift: None,
            kv: Default::default(),
        };
        let out = generate(&m.model, &m.tokenizer, &req, |_| {}).unwrap();
        assert_eq!(out.tokens[..decided], greedy[..decided], "{name}");
    }
}

#[test]
fn prompt_longer_than_context_is_refused_not_truncated() {
    let m = model();
    let req = GenerateRequest {
        prompt_tokens: vec![504; 40],
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        ctx_size: 16,
        stop_at_eog: true,
        context_shift: None,
        kv: Default::default(),
    };
    let err = generate(&m.model, &m.tokenizer, &req, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("40 tokens") && err.contains("16"), "{err}");
}

#[test]
fn same_seed_same_output() {
    let m = model();
    let prompt = m.tokenize_prompt("Once upon a time").unwrap();
    let run = |seed| {
        let req = GenerateRequest {
            prompt_tokens: prompt.clone(),
            max_tokens: 12,
            sampling: SamplingParams {
                seed: Some(seed),
                ..SamplingParams::default()
            },
            stop: Vec::new(),
            ctx_size: 256,
            stop_at_eog: false,
            context_shift: None,
            kv: Default::default(),
        };
        generate(&m.model, &m.tokenizer, &req, |_| {})
            .unwrap()
            .tokens
    };
    assert_eq!(run(42), run(42));
}
