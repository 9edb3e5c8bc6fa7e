//! What the fidelity tests share: llama.cpp's reference outputs in `shared/reference`
//! (llama.cpp 0c1e570 as vendored in llama-cpp-python 0.3.36, CPU, 2 threads, f16 KV cache,
//! built natively on an x86 CPU with AVX-512 VNNI, BF16 and FP16) and the checks that Ember
//! reproduces them exactly.

use std::path::PathBuf;

use ember_runtime::eval::{prompt_then_step_logits, teacher_forced_logits, top_k};
use ember_runtime::generate::{GenerateRequest, generate};
use ember_runtime::loaded::{LoadOptions, LoadedModel};
use ember_runtime::sampling::SamplingParams;
use serde_json::Value;

/// Half a unit of the references' sixth decimal, plus an f32 ulp of a logit near 32.
pub const MAX_ABS: f32 = 5e-7 + 4e-6;

/// The model a test runs: `env` names a file to use instead of the manifest's `name`.
pub fn load(env: &str, name: &str) -> LoadedModel {
    load_with(env, name, &LoadOptions::default())
}

/// [`load`] with options.
#[allow(dead_code)]
pub fn load_with(env: &str, name: &str, opts: &LoadOptions) -> LoadedModel {
    let path = match std::env::var_os(env) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => ember_hub::resolve(name).unwrap_or_else(|e| panic!("cannot get {name}: {e}")),
    };
    LoadedModel::open_with(&path, &ember_models::default_device(), opts)
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
}

/// The references whose file names start with `prefix`, sorted by name: the shared ones
/// beside the repository, and the project's own in `tests/fixtures/reference` (prompts longer
/// than one 512-token ubatch, made by the same llama.cpp build on an AVX512-FP16 host with
/// `n_ubatch = 512`; see that folder's README).
pub fn references(prefix: &str) -> Vec<(String, Value)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut out = references_in(&root.join("../shared/reference"), prefix);
    out.extend(references_in(
        &root.join("tests/fixtures/reference"),
        prefix,
    ));
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn references_in(dir: &std::path::Path, prefix: &str) -> Vec<(String, Value)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("references in {dir:?}: {e}"))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".json"))
        })
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read reference");
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).expect("reference JSON"))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no {prefix}* references in {dir:?}");
    out
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// llama.cpp's top-5 logits after the last prompt token, then after each greedy token.
pub fn reference_top5(r: &Value) -> Vec<Vec<(u32, f32)>> {
    let first = r["top5_logits_at_last_prompt_position"]
        .as_array()
        .expect("top5")
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().expect("id") as u32,
                e["logit"].as_f64().expect("logit") as f32,
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
                .expect("step")
                .iter()
                .map(|p| {
                    (
                        p[0].as_u64().expect("id") as u32,
                        p[1].as_f64().expect("logit") as f32,
                    )
                })
                .collect(),
        );
    }
    out
}

/// Prompt token ids equal llama.cpp's on every reference.
pub fn check_prompt_tokens(m: &LoadedModel, refs: &[(String, Value)]) {
    for (name, r) in refs {
        let got = m
            .tokenize_prompt(r["prompt_text"].as_str().expect("prompt_text"))
            .expect("tokenize");
        assert_eq!(got, ids(&r["prompt_token_ids"]), "{name}: prompt tokens");
    }
}

/// Teacher-forced over prompt + llama.cpp's greedy tokens, as llama.cpp ran them (the prompt
/// as one batch, then one token per step): every one of its top-5 logits at every position
/// is matched to the references' precision, and the argmax equals its choice wherever it was
/// not a tie.
pub fn check_logits_exact(m: &LoadedModel, refs: &[(String, Value)]) {
    for (name, r) in refs {
        let prompt = ids(&r["prompt_token_ids"]);
        let greedy = ids(&r["greedy_generated_token_ids"]);
        let rows = prompt_then_step_logits(&m.model, &prompt, &greedy).expect("forward");
        let top5 = reference_top5(r);
        assert!(rows.len() >= top5.len(), "{name}: too few rows");
        let (mut max, mut n) = (0.0f32, 0);
        // top5[j] and rows[j] are both the distribution after token prompt.len() - 1 + j.
        for (j, (want, row)) in top5.iter().zip(&rows).enumerate() {
            let pos = prompt.len() - 1 + j;
            for &(id, logit) in want {
                let d = (row[id as usize] - logit).abs();
                assert!(
                    d <= MAX_ABS,
                    "{name} pos {pos} token {id}: ours {} vs llama.cpp {logit}",
                    row[id as usize]
                );
                max = max.max(d);
                n += 1;
            }
            if want[0].1 > want[1].1 {
                assert_eq!(top_k(row, 1)[0].0, want[0].0, "{name} pos {pos}: argmax");
            }
        }
        eprintln!("{name}: {n} logits, max |diff| {max:.2e}");
    }
}

/// Teacher forcing as llama.cpp's `teacher_forced_top5` was made: the prompt and its greedy
/// tokens in one call, sliced into ubatches of 512, logits at every position. Every top-5
/// logit at every position is matched to the references' precision. This is the
/// prompt-processing path (the tiled attention from 64 rows, every matmul at the batch's
/// size) at every position, where the generation check above sees it only at the prompt's
/// last one. Returns how many references had these logits.
pub fn check_teacher_forced_exact(m: &LoadedModel, refs: &[(String, Value)]) -> usize {
    let mut checked = 0;
    for (name, r) in refs {
        let Some(tf) = r.get("teacher_forced_top5") else {
            continue;
        };
        let all: Vec<u32> = ids(&r["prompt_token_ids"])
            .into_iter()
            .chain(ids(&r["greedy_generated_token_ids"]))
            .collect();
        let rows = teacher_forced_logits(&m.model, &all, ember_models::UBATCH).expect("forward");
        let tf = tf.as_array().expect("teacher_forced_top5");
        assert_eq!(tf.len(), all.len(), "{name}: one row per position");
        let mut max = 0.0f32;
        for (pos, (want, row)) in tf.iter().zip(&rows).enumerate() {
            for p in want.as_array().expect("top5") {
                let (id, logit) = (
                    p[0].as_u64().expect("id") as usize,
                    p[1].as_f64().expect("logit") as f32,
                );
                let d = (row[id] - logit).abs();
                assert!(
                    d <= MAX_ABS,
                    "{name} teacher-forced pos {pos} token {id}: ours {} vs llama.cpp {logit}",
                    row[id]
                );
                max = max.max(d);
            }
        }
        eprintln!(
            "{name}: teacher-forced, {} positions, max |diff| {max:.2e}",
            all.len()
        );
        checked += 1;
    }
    checked
}

/// `tests/fixtures/reference/edges_<model>.json`: teacher-forced logits of token sequences
/// whose lengths sit on llama.cpp's kernel switches (1, 63, 64, 65, 512, 513, 576 rows), each
/// matched exactly at every position.
pub fn check_edges(m: &LoadedModel, model: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/fixtures/reference/edges_{model}.json"));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("edges fixture"))
        .expect("JSON");
    let cases = doc["cases"].as_array().expect("cases");
    assert!(cases.len() >= 7);
    for case in cases {
        let tokens = ids(&case["tokens"]);
        let rows = teacher_forced_logits(&m.model, &tokens, ember_models::UBATCH).expect("forward");
        for (pos, want) in case["teacher_forced_top5"]
            .as_array()
            .expect("top5")
            .iter()
            .enumerate()
        {
            for p in want.as_array().expect("top5") {
                let (id, logit) = (
                    p[0].as_u64().expect("id") as usize,
                    p[1].as_f64().expect("logit") as f32,
                );
                assert!(
                    (rows[pos][id] - logit).abs() <= MAX_ABS,
                    "{model}, {} tokens, pos {pos} token {id}: ours {} vs llama.cpp {logit}",
                    tokens.len(),
                    rows[pos][id]
                );
            }
        }
    }
}

/// Greedy generation through the engine produces llama.cpp's tokens, all of them.
pub fn check_greedy_tokens(m: &LoadedModel, refs: &[(String, Value)]) {
    for (name, r) in refs {
        let greedy = ids(&r["greedy_generated_token_ids"]);
        let req = GenerateRequest {
            prompt_tokens: ids(&r["prompt_token_ids"]),
            max_tokens: greedy.len(),
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ctx_size: 2048,
            stop_at_eog: false,
            context_shift: None,
            kv: Default::default(),
            spec: Default::default(),
        };
        let out = generate(&m.model, &m.tokenizer, &req, |_| {}).expect("generate");
        assert_eq!(out.tokens, greedy, "{name}");
    }
}
