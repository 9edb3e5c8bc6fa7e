//! Opens the real GGUF models. Paths come from environment variables when set, else the models
//! are resolved by name through ember-hub (pulled on first use).
//!
//! * `EMBER_TEST_SMOLLM2`: SmolLM2-135M-Instruct.Q4_1.gguf
//! * `EMBER_TEST_GEMMA3_270M`: gemma-3-270m-q4_k_m.gguf
//!
//! Expected values were cross-checked against the Python `gguf.GGUFReader`.

mod common;

use ember_formats::{GgmlType, GgufFile};

fn model(var: &str) -> Option<GgufFile> {
    let name = match var {
        "EMBER_TEST_SMOLLM2" => "smollm2-135m-instruct-q4_1",
        _ => "gemma3-270m-q4_k_m",
    };
    let path = match std::env::var_os(var) {
        Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => ember_hub::resolve(name).unwrap_or_else(|e| panic!("cannot get {name}: {e}")),
    };
    Some(GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn check_common(f: &GgufFile) {
    // Every tensor is in bounds, aligned and has the size its type implies.
    let mut end = 0;
    for t in f.tensors() {
        assert_eq!(t.offset % f.alignment(), 0);
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
        assert_eq!(t.ggml_type.bytes_for(t.n_elements()), Some(t.n_bytes));
        end = end.max(f.data_offset() + t.offset + t.n_bytes);
    }
    assert!(end <= f.bytes().len() as u64);
    common::touch_everything(f);
}

#[test]
fn smollm2_135m_q4_1() {
    let Some(f) = model("EMBER_TEST_SMOLLM2") else {
        return;
    };
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset(), 1_785_664);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.get_u32("llama.block_count"), Some(30));
    assert_eq!(f.get_u32("llama.embedding_length"), Some(576));
    assert_eq!(f.get_u32("llama.attention.head_count"), Some(9));
    assert_eq!(f.get_u32("llama.attention.head_count_kv"), Some(3));
    assert_eq!(f.get_str("tokenizer.ggml.model"), Some("gpt2"));
    let tokens = f.get_string_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(
        f.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
        49152
    );
    assert_eq!(
        f.get_string_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.dims, vec![576, 49152]);
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(emb.n_bytes, 30_081_024);
    check_common(&f);
}

#[test]
fn gemma3_270m_q4_k_m() {
    let Some(f) = model("EMBER_TEST_GEMMA3_270M") else {
        return;
    };
    assert_eq!(f.architecture(), Some("gemma3"));
    assert_eq!(f.data_offset(), 6_525_120);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.tensors().len(), 236);
    assert_eq!(f.get_u32("gemma3.block_count"), Some(18));
    assert_eq!(f.get_u32("gemma3.attention.sliding_window"), Some(512));
    assert_eq!(f.get_f32("gemma3.rope.freq_base"), Some(1_000_000.0));
    assert_eq!(
        f.get_array("tokenizer.ggml.tokens")
            .unwrap()
            .as_strings()
            .unwrap()
            .len(),
        262_144
    );
    assert_eq!(
        f.get_f32_array("tokenizer.ggml.scores").unwrap().len(),
        262_144
    );
    check_common(&f);
}
