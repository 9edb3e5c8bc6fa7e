//! Damaged model files (issue #14): a count, size or id in the metadata that cannot be right,
//! or that contradicts the tensors, is refused at load with an error naming the key, its value
//! and what it must be, never a panic or an abort. A `block_count` of 2^31 used to abort the
//! process on a 1.2 TB allocation sized from it before any tensor was looked at.
//!
//! Every case starts from a tiny model that loads (checked first), changes one thing and
//! expects the load to fail with a message that says what is wrong.

use std::time::{Duration, Instant};

use ember_formats::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue, StringArray};
use ember_kv::{KvOptions, PagedKvCache};
use ember_models::testing::tiny::{self, TinyArch, TinyDtype};
use ember_models::{Logits, Model, default_device, load};
use proptest::prelude::*;

/// A model file taken apart, to be edited and written again.
#[derive(Clone)]
struct Parts {
    meta: Vec<(String, MetaValue)>,
    tensors: Vec<Tensor>,
}

#[derive(Clone)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

impl Parts {
    fn of(bytes: Vec<u8>) -> Self {
        let file = GgufFile::from_bytes(bytes).expect("gguf");
        Self {
            meta: file.metadata().to_vec(),
            tensors: file
                .tensors()
                .iter()
                .map(|t| Tensor {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ty: t.ggml_type,
                    data: file.tensor_data(t).to_vec(),
                })
                .collect(),
        }
    }

    fn arch(&self) -> String {
        self.meta
            .iter()
            .find(|(k, _)| k == "general.architecture")
            .and_then(|(_, v)| v.as_str())
            .expect("architecture")
            .to_string()
    }

    /// `{arch}.{k}`.
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch())
    }

    fn set(&mut self, key: &str, value: impl Into<MetaValue>) -> &mut Self {
        let value = value.into();
        match self.meta.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.meta.push((key.to_string(), value)),
        }
        self
    }

    /// Sets `{arch}.{k}`.
    fn set_arch(&mut self, k: &str, value: impl Into<MetaValue>) -> &mut Self {
        let key = self.key(k);
        self.set(&key, value)
    }

    fn remove(&mut self, key: &str) -> &mut Self {
        self.meta.retain(|(k, _)| k != key);
        self
    }

    fn tensor(&mut self, name: &str) -> &mut Tensor {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    fn file(&self) -> GgufFile {
        let mut w = GgufWriter::new();
        for (k, v) in &self.meta {
            w.add(k.clone(), v.clone());
        }
        for t in &self.tensors {
            w.add_tensor(&t.name, &t.dims, t.ty, t.data.clone())
                .expect("tensor");
        }
        GgufFile::from_bytes(w.to_bytes().expect("write")).expect("gguf")
    }
}

fn tiny_parts(arch: TinyArch) -> Parts {
    Parts::of(tiny::gguf(arch, TinyDtype::F32).expect("tiny model"))
}

/// Gemma 3 has no tiny fixture model: the tiny qwen3 (QK-norm, a head size that is not
/// `n_embd / n_head`, tied head) renamed, with Gemma's post-attention and post-feed-forward
/// norms added and a sliding window of 4.
fn tiny_gemma3() -> Parts {
    let mut p = tiny_parts(TinyArch::Qwen3);
    for (k, _) in &mut p.meta {
        if let Some(rest) = k.strip_prefix("qwen3.") {
            *k = format!("gemma3.{rest}");
        }
    }
    p.set("general.architecture", "gemma3")
        .set_arch("attention.sliding_window", 4u32);
    let n_embd = p.tensor("output_norm.weight").dims[0];
    let ones: Vec<u8> = (0..n_embd).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    for i in 0.. {
        if !p
            .tensors
            .iter()
            .any(|t| t.name.starts_with(&format!("blk.{i}.")))
        {
            break;
        }
        for norm in ["post_attention_norm", "post_ffw_norm"] {
            p.tensors.push(Tensor {
                name: format!("blk.{i}.{norm}.weight"),
                dims: vec![n_embd],
                ty: GgmlType::F32,
                data: ones.clone(),
            });
        }
    }
    p
}

/// One tiny model of every architecture the crate loads (llama as Mistral writes it).
fn every_arch() -> Vec<Parts> {
    vec![
        tiny_parts(TinyArch::Mistral),
        tiny_parts(TinyArch::Qwen2),
        tiny_parts(TinyArch::Qwen3),
        tiny_parts(TinyArch::Phi3),
        tiny_gemma3(),
    ]
}

/// Runs a few tokens through a model loaded from damaged metadata: whatever it computes, it
/// must not panic.
fn run_a_little(model: &Model) -> Result<(), ember_models::ModelError> {
    let ctx = model.config().context_length.clamp(1, 8);
    let mut cache = PagedKvCache::new(&model.kv_config(&KvOptions::default(), ctx))?;
    let (seq, _) = cache.add_sequence(&[])?;
    let tokens: Vec<u32> = (0..ctx as u32).map(|t| t % 200).collect();
    model.forward_seq(&tokens, &mut cache, seq, Logits::All)?;
    Ok(())
}

/// The load error of a damaged file, as a user sees it.
fn load_error(p: &Parts) -> String {
    match load(&p.file(), &default_device()) {
        Ok(_) => panic!("a damaged {} file loaded", p.arch()),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_refused(p: &Parts, fragments: &[&str]) {
    let err = load_error(p);
    for f in fragments {
        assert!(err.contains(f), "error {err:?} does not say {f:?}");
    }
}

#[test]
fn every_tiny_model_loads_and_runs_as_written() {
    for p in every_arch() {
        let model =
            load(&p.file(), &default_device()).unwrap_or_else(|e| panic!("{}: {e}", p.arch()));
        run_a_little(&model).unwrap_or_else(|e| panic!("{}: {e}", p.arch()));
    }
    let gemma = load(&tiny_gemma3().file(), &default_device()).expect("gemma3");
    assert_eq!(gemma.config().sliding_window.map(|s| s.window), Some(4));
}

/// The crash: a block count of 2^31 aborted on a 1.2 TB `Vec` before any tensor was
/// checked. Now it is compared with the blocks the file has tensors for, in every
/// architecture.
#[test]
fn block_count_2_pow_31_is_refused_in_every_architecture() {
    for mut p in every_arch() {
        let key = p.key("block_count");
        p.set(&key, 1u32 << 31);
        assert_refused(
            &p,
            &[&format!(
                "{key} is 2147483648 but the file has tensors for 2 blocks (blk.0..blk.1)"
            )],
        );
        // The same as a u64, beyond what any allocation could take.
        p.set(&key, u64::MAX);
        assert_refused(&p, &[&format!("{key} is {}", u64::MAX)]);
    }
}

#[test]
fn block_count_off_by_one_either_way_is_refused() {
    for mut p in every_arch() {
        let key = p.key("block_count");
        for n in [1u32, 3] {
            p.set(&key, n);
            assert_refused(
                &p,
                &[&format!(
                    "{key} is {n} but the file has tensors for 2 blocks"
                )],
            );
        }
    }
}

#[test]
fn a_missing_block_is_named() {
    let mut p = tiny_parts(TinyArch::Mistral);
    // Blocks 0 and 2, block_count 3: as many tensors as the count wants, but blk.1 is gone.
    for t in &mut p.tensors {
        if let Some(rest) = t.name.strip_prefix("blk.1.") {
            t.name = format!("blk.2.{rest}");
        }
    }
    p.set("llama.block_count", 3u32);
    assert_refused(
        &p,
        &[
            "llama.block_count is 3",
            "between blk.0 and blk.2, with blk.1 missing",
        ],
    );
    // No block tensors at all.
    let mut p = tiny_parts(TinyArch::Qwen2);
    p.tensors.retain(|t| !t.name.starts_with("blk."));
    assert_refused(
        &p,
        &["qwen2.block_count is 2 but the file has no block tensors"],
    );
}

/// A block that has some tensors but not all of them is found by the architecture's loader.
#[test]
fn a_missing_tensor_is_named() {
    let mut p = tiny_parts(TinyArch::Qwen3);
    p.tensors.retain(|t| t.name != "blk.1.ffn_gate.weight");
    assert_refused(&p, &["missing tensor 'blk.1.ffn_gate.weight'"]);
}

/// Zero, negative, non-integer and absent counts, in every architecture.
#[test]
fn counts_must_be_positive_integers() {
    for p in every_arch() {
        for k in [
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
            "attention.key_length",
            "attention.value_length",
        ] {
            let key = p.key(k);
            let mut q = p.clone();
            q.set(&key, 0u32);
            assert_refused(&q, &[&format!("{key} is 0 but it must be at least 1")]);
            q.set(&key, -1i32);
            assert_refused(&q, &[&format!("{key} is -1 but it must be at least 1")]);
            q.set(&key, "12");
            assert_refused(
                &q,
                &[&format!(
                    "{key} is the string \"12\" but it must be an integer"
                )],
            );
            q.set(&key, 12.0f32);
            assert_refused(&q, &[&format!("{key} is 12.0 but it must be an integer")]);
        }
        for k in [
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
        ] {
            let key = p.key(k);
            let mut q = p.clone();
            q.remove(&key);
            assert_refused(&q, &[&format!("missing metadata key '{key}'")]);
        }
    }
}

#[test]
fn context_length_must_fit_32_bit_positions() {
    let mut p = tiny_parts(TinyArch::Phi3);
    p.set("phi3.context_length", 1u64 << 40);
    assert_refused(
        &p,
        &["phi3.context_length is 1099511627776 but positions are 32-bit"],
    );
}

#[test]
fn rope_dimension_count_must_be_even_and_within_the_head() {
    // Mistral's head size is 16; qwen2 and qwen3 rotate whole heads.
    let mut p = tiny_parts(TinyArch::Mistral);
    for n in [15u32, 18, 1 << 31] {
        p.set("llama.rope.dimension_count", n);
        assert_refused(
            &p,
            &[&format!(
                "llama.rope.dimension_count is {n} but it must be even and at most the head \
                 size 16"
            )],
        );
    }
    let mut p = tiny_parts(TinyArch::Qwen2);
    p.set("qwen2.rope.dimension_count", 8u32);
    assert_refused(
        &p,
        &["qwen2.rope.dimension_count is 8 but qwen2 rotates whole heads"],
    );
}

#[test]
fn head_counts_must_divide_and_fit_the_tensors() {
    for p in every_arch() {
        let (h, kv) = (
            p.key("attention.head_count"),
            p.key("attention.head_count_kv"),
        );
        // 4 query heads cannot share 3 kv heads.
        let mut q = p.clone();
        q.set(&kv, 3u32);
        assert_refused(&q, &[&format!("{kv} is 3 but it must divide {h} (4)")]);
        // 4 kv heads divide 4 heads but are twice what the K projection holds.
        let mut q = p.clone();
        q.set(&kv, 4u32);
        assert_refused(&q, &[&format!("{kv} is 4 but blk.0.attn_")]);
        // 8 heads divide any power-of-two sizes, so only the tensors can tell.
        let mut q = p.clone();
        q.set(&h, 8u32);
        assert_refused(&q, &["but blk.0.attn_"]);
        // Absent, the kv head count is the head count: said so when it does not fit.
        let mut q = p.clone();
        q.remove(&kv);
        assert_refused(&q, &[&format!("{kv} is not set (so 4, the head count)")]);
    }
    // Without key_length the head size is n_embd / n_head, which must then divide.
    let mut p = tiny_parts(TinyArch::Mistral);
    p.set("llama.attention.head_count", 3u32)
        .set("llama.attention.head_count_kv", 1u32);
    assert_refused(
        &p,
        &["llama.attention.head_count is 3 but llama.embedding_length (64) is not a multiple"],
    );
    // With 8 heads of 8 (64 / 8) the Q projection still fits, but K does not: the message
    // shows where the head size came from.
    let mut p = tiny_parts(TinyArch::Mistral);
    p.set("llama.attention.head_count", 8u32);
    assert_refused(
        &p,
        &[
            "llama.attention.head_count_kv is 2 but blk.0.attn_k.weight has shape [64, 32]",
            "2 x 8 = 16",
            "llama.embedding_length / llama.attention.head_count = 64 / 8",
        ],
    );
}

#[test]
fn key_and_value_lengths_must_fit() {
    let mut p = tiny_parts(TinyArch::Qwen3);
    p.set("qwen3.attention.key_length", 16u32)
        .set("qwen3.attention.value_length", 16u32);
    assert_refused(
        &p,
        &[
            "qwen3.attention.head_count is 4 but blk.0.attn_output.weight has shape [128, 64]",
            "head size from qwen3.attention.key_length",
        ],
    );
    let mut p = tiny_parts(TinyArch::Qwen3);
    p.set("qwen3.attention.value_length", 16u32);
    assert_refused(
        &p,
        &["qwen3.attention.value_length 16 different from the key length 32 is not supported"],
    );
}

#[test]
fn embedding_length_must_match_token_embd() {
    for p in every_arch() {
        let key = p.key("embedding_length");
        let mut q = p.clone();
        q.set(&key, 65u32);
        assert_refused(
            &q,
            &[&format!(
                "{key} is 65 but token_embd.weight has shape [64, {}]: rows of 64 values",
                tiny::VOCAB
            )],
        );
    }
}

#[test]
fn feed_forward_length_must_match_the_tensors() {
    for p in every_arch() {
        let key = p.key("feed_forward_length");
        let mut q = p.clone();
        q.set(&key, 97u32);
        assert_refused(
            &q,
            &[&format!(
                "{key} is 97 but blk.0.ffn_down.weight has shape [96, 64]: 96 inputs"
            )],
        );
    }
}

#[test]
fn vocabulary_size_must_match_the_embedding_rows() {
    let v = tiny::VOCAB;
    // Mistral's file has llama.vocab_size.
    let mut p = tiny_parts(TinyArch::Mistral);
    p.set("llama.vocab_size", (v + 1) as u32);
    assert_refused(
        &p,
        &[&format!(
            "llama.vocab_size is {} but token_embd.weight has shape [64, {v}]: {v} rows, one \
             per token",
            v + 1
        )],
    );
    p.set("llama.vocab_size", 1u64 << 40);
    assert_refused(
        &p,
        &["llama.vocab_size is 1099511627776 but token_embd.weight"],
    );
    // A smaller vocab_size leaves tokenizer ids without an embedding row.
    let mut p = tiny_parts(TinyArch::Mistral);
    let rows = v as u64 - 1;
    p.set("llama.vocab_size", rows);
    let embd = p.tensor("token_embd.weight");
    embd.dims[1] = rows;
    embd.data.truncate(64 * 4 * rows as usize);
    let out = p.tensor("output.weight");
    out.dims[1] = rows;
    out.data.truncate(64 * 4 * rows as usize);
    assert_refused(
        &p,
        &[&format!(
            "tokenizer.ggml.tokens is a list of {v} tokens but token_embd.weight has only \
             {rows} rows"
        )],
    );
    // Without vocab_size the token list gives the size.
    let mut p = tiny_parts(TinyArch::Qwen2);
    let tokens = p
        .meta
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array()?.as_strings())
        .expect("tokens");
    let mut more: StringArray = tokens.iter().collect();
    more.push("<|extra|>");
    p.set("tokenizer.ggml.tokens", MetaArray::String(more));
    assert_refused(
        &p,
        &[&format!(
            "tokenizer.ggml.tokens is a list of {} tokens but token_embd.weight has shape \
             [64, {v}]: {v} rows",
            v + 1
        )],
    );
    p.remove("tokenizer.ggml.tokens");
    assert_refused(&p, &["missing metadata key 'qwen2.vocab_size'"]);
}

#[test]
fn tensors_of_the_wrong_shape_are_named() {
    // A block's matrix transposed: same size, wrong shape.
    for p in every_arch() {
        let mut q = p.clone();
        let t = q.tensor("blk.1.ffn_down.weight");
        t.dims.reverse();
        assert_refused(
            &q,
            &[
                "tensor 'blk.1.ffn_down.weight' has shape [64, 96] but the metadata makes it \
               [96, 64]",
            ],
        );
    }
    // A norm of the wrong length.
    let mut p = tiny_parts(TinyArch::Qwen2);
    let t = p.tensor("blk.1.attn_norm.weight");
    t.dims = vec![32];
    t.data.truncate(32 * 4);
    assert_refused(&p, &["tensor 'blk.1.attn_norm.weight' has shape [32]"]);
    // The untied output head with fewer rows than the vocabulary.
    let mut p = tiny_parts(TinyArch::Mistral);
    let t = p.tensor("output.weight");
    t.dims = vec![64, 100];
    t.data.truncate(64 * 4 * 100);
    assert_refused(&p, &["tensor 'output.weight' has shape [64, 100]"]);
    // A 1-D or 3-D embedding.
    let mut p = tiny_parts(TinyArch::Qwen3);
    let t = p.tensor("token_embd.weight");
    t.dims = vec![64 * tiny::VOCAB as u64];
    assert_refused(&p, &["tensor 'token_embd.weight' has shape"]);
    let mut p = tiny_parts(TinyArch::Qwen3);
    p.tensor("token_embd.weight").dims = vec![64, tiny::VOCAB as u64 / 2, 2];
    assert_refused(&p, &["tensor 'token_embd.weight' has shape"]);
    let mut p = tiny_parts(TinyArch::Qwen3);
    p.tensors.retain(|t| t.name != "token_embd.weight");
    assert_refused(&p, &["missing tensor 'token_embd.weight'"]);
}

#[test]
fn rope_base_and_norm_epsilon_must_be_finite_and_positive() {
    for p in every_arch() {
        for k in ["rope.freq_base", "attention.layer_norm_rms_epsilon"] {
            let key = p.key(k);
            let mut q = p.clone();
            for (value, shown) in [
                (MetaValue::F32(f32::NAN), "NaN"),
                (MetaValue::F32(f32::INFINITY), "inf"),
                (MetaValue::F32(0.0), "0.0"),
                (MetaValue::F32(-1.0), "-1.0"),
                // Finite in f64 but not in f32.
                (MetaValue::F64(1e300), "1e300"),
                (MetaValue::F64(1e-300), "1e-300"),
                (MetaValue::String("1e4".into()), "the string \"1e4\""),
            ] {
                q.set(&key, value);
                assert_refused(
                    &q,
                    &[&format!(
                        "{key} is {shown} but it must be a finite number above 0"
                    )],
                );
            }
        }
    }
}

/// Gemma 3 is the one architecture here that uses its sliding window.
#[test]
fn gemma3_sliding_window_values_are_checked() {
    let mut p = tiny_gemma3();
    p.set("gemma3.attention.sliding_window", 0u32);
    assert_refused(
        &p,
        &["gemma3.attention.sliding_window is 0 but it must be at least 1"],
    );
    let mut p = tiny_gemma3();
    p.set("gemma3.rope.freq_base_swa", f32::NAN);
    assert_refused(&p, &["gemma3.rope.freq_base_swa is NaN"]);
    let mut p = tiny_gemma3();
    p.set("gemma3.attention.sliding_window_pattern", -6i32);
    assert_refused(
        &p,
        &["gemma3.attention.sliding_window_pattern is -6 but it must be at least 0"],
    );
    // A pattern of 0 (every layer a window layer) and huge windows are valid.
    let mut p = tiny_gemma3();
    p.set("gemma3.attention.sliding_window_pattern", 0u32)
        .set("gemma3.attention.sliding_window", u64::MAX);
    let model = load(&p.file(), &default_device()).expect("load");
    run_a_little(&model).expect("run");
}

/// A real model file as it is, and with its block count patched to 2^31 in place (the bytes
/// of the u32 value, nothing else moved): it loads, then it is refused at once with an error
/// naming the blocks the file has.
fn real_model_with_block_count_2_pow_31(env: &str, name: &str, arch: &str, blocks: usize) {
    let path = match std::env::var_os(env) {
        Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => ember_hub::resolve(name).unwrap_or_else(|e| panic!("cannot get {name}: {e}")),
    };
    let mut bytes = std::fs::read(&path).expect("read model");
    // A GGUF key-value pair: u64 key length, the key, u32 type (4: u32), the value.
    let key = format!("{arch}.block_count");
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .unwrap_or_else(|| panic!("{key} in {name}"));
    let ty = at + key.len();
    assert_eq!(bytes[ty..ty + 4], 4u32.to_le_bytes(), "{key}: a u32 value");
    let value = ty + 4..ty + 8;
    assert_eq!(bytes[value.clone()], (blocks as u32).to_le_bytes());
    let file = GgufFile::from_bytes(bytes.clone()).expect("gguf");
    let model = load(&file, &default_device()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(model.config().n_layer, blocks);
    drop((model, file));

    bytes[value].copy_from_slice(&(1u32 << 31).to_le_bytes());
    let start = Instant::now();
    let file = GgufFile::from_bytes(bytes).expect("gguf");
    let err = match load(&file, &default_device()) {
        Ok(_) => panic!("{name} loaded with {key} 2^31"),
        Err(e) => e.to_string(),
    };
    let took = start.elapsed();
    let last = blocks - 1;
    let want = format!(
        "{key} is 2147483648 but the file has tensors for {blocks} blocks (blk.0..blk.{last})"
    );
    assert!(err.contains(&want), "{name}: {err}");
    assert!(took < Duration::from_secs(5), "{name}: took {took:?}");
}

#[test]
fn real_smollm2_with_block_count_2_pow_31_is_refused_quickly() {
    real_model_with_block_count_2_pow_31(
        "EMBER_TEST_SMOLLM2",
        "smollm2-135m-instruct-q4_1",
        "llama",
        30,
    );
}

#[test]
fn real_gemma3_with_block_count_2_pow_31_is_refused_quickly() {
    real_model_with_block_count_2_pow_31("EMBER_TEST_GEMMA3", "gemma3-270m-q4_k_m", "gemma3", 18);
}

/// Interesting integers for a metadata value: edges, off-by-ones and the huge.
fn hostile_int() -> impl Strategy<Value = MetaValue> {
    prop_oneof![
        Just(MetaValue::U32(0)),
        Just(MetaValue::U32(1)),
        Just(MetaValue::U32(2)),
        Just(MetaValue::U32(3)),
        Just(MetaValue::U32(8)),
        Just(MetaValue::U32(1 << 31)),
        Just(MetaValue::U32(u32::MAX)),
        Just(MetaValue::U64(u64::MAX)),
        Just(MetaValue::U64(1 << 40)),
        Just(MetaValue::I32(-1)),
        Just(MetaValue::I64(i64::MIN)),
        (0u32..600).prop_map(MetaValue::U32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Any integer in any of a tiny model's integer keys: the load succeeds (and a few tokens
    /// then run) or fails with an error; it never panics or aborts.
    #[test]
    fn mutated_metadata_integers_never_panic(
        arch in 0usize..5,
        which in any::<prop::sample::Index>(),
        value in hostile_int(),
        second in any::<prop::sample::Index>(),
        value2 in hostile_int(),
    ) {
        let mut p = every_arch().swap_remove(arch);
        let ints: Vec<String> = p
            .meta
            .iter()
            .filter(|(k, v)| v.as_integer().is_some() && k != "general.alignment")
            .map(|(k, _)| k.clone())
            .collect();
        p.set(&ints[which.index(ints.len())], value);
        p.set(&ints[second.index(ints.len())], value2);
        if let Ok(model) = load(&p.file(), &default_device()) {
            let _ = run_a_little(&model);
        }
    }
}
