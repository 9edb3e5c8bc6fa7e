//! The vocabulary check against real models and against small GGUF files written with the
//! ember-formats writer into a temporary directory.

use std::path::PathBuf;

use ember_formats::{GgufFile, GgufWriter, MetaValue};
use ember_spec::vocab::{Side, VocabMismatch, check_same_vocab};

const SMOLLM2: &str = "smollm2-135m-instruct-q4_1";
const GEMMA3: &str = "gemma3-270m-q4_k_m";

fn open_model(name: &str) -> GgufFile {
    let path = ember_hub::resolve(name).unwrap_or_else(|e| panic!("cannot get {name}: {e}"));
    GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A directory for this test process, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("ember-spec-vocab-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Write `w` as `<name>.gguf` and open it again.
    fn roundtrip(&self, name: &str, w: &GgufWriter) -> GgufFile {
        let path = self.0.join(format!("{name}.gguf"));
        w.write_file(&path).expect("write gguf");
        GgufFile::open(&path).expect("open gguf")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny tokenizer: 12 tokens, control tokens first, as llama.cpp writes them.
fn tiny_vocab() -> GgufWriter {
    let tokens = [
        "<unk>",
        "<s>",
        "</s>",
        "a",
        "b",
        "hello",
        "world",
        "\u{2581}the",
        "<0x0A>",
        "!",
        "?",
        "é",
    ];
    let types: Vec<i32> = vec![2, 3, 3, 1, 1, 1, 1, 1, 6, 1, 1, 1];
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama")
        .add("tokenizer.ggml.model", "llama")
        .add_string_array("tokenizer.ggml.tokens", tokens)
        .add_array("tokenizer.ggml.token_type", types)
        .add("tokenizer.ggml.bos_token_id", 1u32)
        .add("tokenizer.ggml.eos_token_id", 2u32);
    w
}

/// `tiny_vocab` with token `id` replaced.
fn with_token(mut w: GgufWriter, id: usize, text: &str) -> GgufWriter {
    let mut tokens: Vec<String> = tiny_vocab_tokens();
    tokens[id] = text.to_owned();
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    w
}

fn tiny_vocab_tokens() -> Vec<String> {
    let f = GgufFile::from_bytes(tiny_vocab().to_bytes().expect("bytes")).expect("parse");
    f.get_string_array("tokenizer.ggml.tokens")
        .expect("tokens")
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[test]
fn real_models_match_themselves() {
    for name in [SMOLLM2, GEMMA3] {
        let (a, b) = (open_model(name), open_model(name));
        assert_eq!(check_same_vocab(&a, &b), Ok(()), "{name}");
    }
}

#[test]
fn smollm2_and_gemma3_differ_in_size() {
    let (smol, gemma) = (open_model(SMOLLM2), open_model(GEMMA3));
    let err = check_same_vocab(&smol, &gemma).expect_err("different vocabularies");
    assert_eq!(
        err,
        VocabMismatch::Size {
            target: 49152,
            draft: 262144
        }
    );
    assert_eq!(
        err.to_string(),
        "the draft model has 262144 tokens, the target 49152"
    );
    let err = check_same_vocab(&gemma, &smol).expect_err("different vocabularies");
    assert_eq!(
        err.to_string(),
        "the draft model has 49152 tokens, the target 262144"
    );
}

#[test]
fn a_real_vocabulary_with_one_token_changed_is_caught() {
    // Copy SmolLM2's tokenizer metadata into a small file: equal; then change token 1234.
    let smol = open_model(SMOLLM2);
    let mut w = GgufWriter::new();
    for (k, v) in smol.metadata() {
        if k.starts_with("tokenizer.") {
            w.add(k.clone(), v.clone());
        }
    }
    let dir = TempDir::new("real");
    let copy = dir.roundtrip("copy", &w);
    assert_eq!(check_same_vocab(&smol, &copy), Ok(()));

    let mut tokens: Vec<String> = smol
        .get_string_array("tokenizer.ggml.tokens")
        .expect("SmolLM2 tokens")
        .into_iter()
        .map(str::to_owned)
        .collect();
    let original = tokens[1234].clone();
    tokens[1234].push('x');
    w.add_string_array("tokenizer.ggml.tokens", &tokens);
    let changed = dir.roundtrip("changed", &w);
    let err = check_same_vocab(&smol, &changed).expect_err("one token differs");
    let msg = err.to_string();
    assert!(msg.contains("at token 1234"), "{msg}");
    assert!(
        msg.contains(&format!("target {original:?} (normal)")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("draft {:?} (normal)", tokens[1234])),
        "{msg}"
    );
}

#[test]
fn identical_tiny_vocabularies_match() {
    let dir = TempDir::new("same");
    let a = dir.roundtrip("a", &tiny_vocab());
    let b = dir.roundtrip("b", &tiny_vocab());
    assert_eq!(check_same_vocab(&a, &b), Ok(()));
    // The integer type of the arrays and ids does not matter, only the values.
    let mut w = tiny_vocab();
    w.add_array(
        "tokenizer.ggml.token_type",
        vec![2u8, 3, 3, 1, 1, 1, 1, 1, 6, 1, 1, 1],
    )
    .add("tokenizer.ggml.bos_token_id", 1u64)
    .add("tokenizer.ggml.eos_token_id", 2i32);
    let c = dir.roundtrip("c", &w);
    assert_eq!(check_same_vocab(&a, &c), Ok(()));
}

#[test]
fn a_changed_token_text_names_the_id_and_both_texts() {
    let dir = TempDir::new("text");
    let target = dir.roundtrip("target", &tiny_vocab());
    let draft = dir.roundtrip("draft", &with_token(tiny_vocab(), 5, "hullo"));
    let err = check_same_vocab(&target, &draft).expect_err("token 5 differs");
    assert_eq!(
        err,
        VocabMismatch::Token {
            id: 5,
            target_text: "hello".into(),
            target_type: Some(1),
            draft_text: "hullo".into(),
            draft_type: Some(1),
        }
    );
    assert_eq!(
        err.to_string(),
        "the draft model's vocabulary differs from the target's at token 5: target \"hello\" \
         (normal), draft \"hullo\" (normal)"
    );
    // Texts are compared exactly: a trailing space is a difference too.
    let spaced = dir.roundtrip("spaced", &with_token(tiny_vocab(), 11, "é "));
    let err = check_same_vocab(&target, &spaced).expect_err("token 11 differs");
    assert!(matches!(err, VocabMismatch::Token { id: 11, .. }), "{err}");
}

#[test]
fn a_changed_token_type_is_caught() {
    let dir = TempDir::new("type");
    let target = dir.roundtrip("target", &tiny_vocab());
    let mut w = tiny_vocab();
    w.add_array(
        "tokenizer.ggml.token_type",
        vec![2i32, 3, 3, 1, 1, 1, 1, 3, 6, 1, 1, 1],
    );
    let draft = dir.roundtrip("draft", &w);
    let err = check_same_vocab(&target, &draft).expect_err("type of 7 differs");
    assert_eq!(
        err.to_string(),
        "the draft model's vocabulary differs from the target's at token 7: target \"\u{2581}the\" \
         (normal), draft \"\u{2581}the\" (control)"
    );
    // A shorter type array leaves the last token without a type on one side.
    let mut w = tiny_vocab();
    w.add_array(
        "tokenizer.ggml.token_type",
        vec![2i32, 3, 3, 1, 1, 1, 1, 1, 6, 1, 1],
    );
    let short = dir.roundtrip("short", &w);
    let err = check_same_vocab(&target, &short).expect_err("type of 11 missing");
    assert!(
        err.to_string()
            .ends_with("target \"é\" (normal), draft \"é\" (no type)"),
        "{err}"
    );
}

#[test]
fn token_types_missing_on_one_side_is_a_mismatch() {
    let dir = TempDir::new("notypes");
    let with_types = dir.roundtrip("with", &tiny_vocab());
    let bytes = without_key(&tiny_vocab(), "tokenizer.ggml.token_type");
    let without = dir.roundtrip("without", &bytes);
    assert_eq!(
        check_same_vocab(&with_types, &without),
        Err(VocabMismatch::TokenTypesMissing {
            missing: Side::Draft
        })
    );
    let err = check_same_vocab(&without, &with_types).expect_err("types missing");
    assert_eq!(
        err.to_string(),
        "the draft model has token types (tokenizer.ggml.token_type), the target model has none"
    );
    // Missing on both sides: only the texts are compared.
    assert_eq!(check_same_vocab(&without, &without), Ok(()));
}

#[test]
fn bos_differs() {
    let dir = TempDir::new("bos");
    let target = dir.roundtrip("target", &tiny_vocab());
    let mut w = tiny_vocab();
    w.add("tokenizer.ggml.bos_token_id", 2u32);
    let draft = dir.roundtrip("draft", &w);
    let err = check_same_vocab(&target, &draft).expect_err("BOS differs");
    assert_eq!(
        err,
        VocabMismatch::SpecialToken {
            name: "BOS",
            target: Some(1),
            draft: Some(2)
        }
    );
    assert_eq!(err.to_string(), "BOS is 1 in the target, 2 in the draft");
}

#[test]
fn eos_missing_on_one_side() {
    let dir = TempDir::new("eos");
    let target = dir.roundtrip("target", &tiny_vocab());
    let draft = dir.roundtrip(
        "draft",
        &without_key(&tiny_vocab(), "tokenizer.ggml.eos_token_id"),
    );
    let err = check_same_vocab(&target, &draft).expect_err("EOS missing");
    assert_eq!(err.to_string(), "EOS is 2 in the target, none in the draft");
    let err = check_same_vocab(&draft, &target).expect_err("EOS missing");
    assert_eq!(err.to_string(), "EOS is none in the target, 2 in the draft");
}

#[test]
fn tokenizer_model_and_size_differences() {
    let dir = TempDir::new("model");
    let target = dir.roundtrip("target", &tiny_vocab());
    let mut w = tiny_vocab();
    w.add("tokenizer.ggml.model", "gpt2");
    let gpt2 = dir.roundtrip("gpt2", &w);
    let err = check_same_vocab(&target, &gpt2).expect_err("model differs");
    assert_eq!(
        err.to_string(),
        "the draft model's tokenizer model is \"gpt2\", the target's \"llama\""
    );
    let mut w = tiny_vocab();
    let mut tokens = tiny_vocab_tokens();
    tokens.push("extra".into());
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    let bigger = dir.roundtrip("bigger", &w);
    assert_eq!(
        check_same_vocab(&target, &bigger),
        Err(VocabMismatch::Size {
            target: 12,
            draft: 13
        })
    );
}

#[test]
fn odd_metadata_is_an_error_not_a_panic() {
    let dir = TempDir::new("odd");
    let good = dir.roundtrip("good", &tiny_vocab());
    let cases: [(&str, MetaValue, &str); 6] = [
        (
            "tokenizer.ggml.tokens",
            vec![1u32, 2, 3].into(),
            "the draft model's tokenizer.ggml.tokens is an array of u32, expected an array of strings",
        ),
        (
            "tokenizer.ggml.tokens",
            "abc".into(),
            "the draft model's tokenizer.ggml.tokens is a string, expected an array of strings",
        ),
        (
            "tokenizer.ggml.token_type",
            vec![0.5f32; 12].into(),
            "the draft model's tokenizer.ggml.token_type is an array of f32, expected an array of integers",
        ),
        (
            "tokenizer.ggml.bos_token_id",
            "<s>".into(),
            "the draft model's tokenizer.ggml.bos_token_id is a string, expected a token id (an integer in u32 range)",
        ),
        (
            "tokenizer.ggml.eos_token_id",
            MetaValue::I32(-1),
            "the draft model's tokenizer.ggml.eos_token_id is the i32 -1, expected a token id (an integer in u32 range)",
        ),
        (
            "tokenizer.ggml.model",
            MetaValue::U32(7),
            "the draft model's tokenizer.ggml.model is the u32 7, expected a string",
        ),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        let mut w = tiny_vocab();
        w.add(key, value);
        let odd = dir.roundtrip(&format!("odd{i}"), &w);
        let err = check_same_vocab(&good, &odd).expect_err(key);
        assert_eq!(err.to_string(), want);
        // The same file on the target side names the target.
        let err = check_same_vocab(&odd, &good).expect_err(key);
        assert!(err.to_string().starts_with("the target model's"), "{err}");
    }
    // A token type that does not fit i64, and no vocabulary at all.
    let mut w = tiny_vocab();
    w.add_array("tokenizer.ggml.token_type", vec![u64::MAX; 12]);
    let huge = dir.roundtrip("huge", &w);
    let err = check_same_vocab(&good, &huge).expect_err("huge type");
    assert!(
        matches!(
            err,
            VocabMismatch::BadValue {
                side: Side::Draft,
                key: "tokenizer.ggml.token_type",
                ..
            }
        ),
        "{err}"
    );
    let none = dir.roundtrip("none", &without_key(&tiny_vocab(), "tokenizer.ggml.tokens"));
    assert_eq!(
        check_same_vocab(&none, &good),
        Err(VocabMismatch::NoVocabulary { side: Side::Target })
    );
    assert_eq!(
        check_same_vocab(&good, &none).map_err(|e| e.to_string()),
        Err("the draft model has no vocabulary (tokenizer.ggml.tokens is missing)".into())
    );
}

/// A writer with the same metadata as `w` minus `key` (the writer cannot remove keys).
fn without_key(w: &GgufWriter, key: &str) -> GgufWriter {
    let f = GgufFile::from_bytes(w.to_bytes().expect("bytes")).expect("parse");
    let mut out = GgufWriter::new();
    for (k, v) in f.metadata() {
        if k != key {
            out.add(k.clone(), v.clone());
        }
    }
    out
}
