//! Token ids must equal llama.cpp's (reference dumps in `shared/reference`, produced by
//! llama.cpp 0c1e570 as vendored in llama-cpp-python 0.3.36).
//!
//! Models come from `EMBER_TEST_SMOLLM2` / `EMBER_TEST_GEMMA3` (paths to the GGUF files) or are
//! pulled by name through ember-hub.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use ember_formats::GgufFile;
use ember_text::tokenizer::GgufTokenizer;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TestModel {
    SmolLm2,
    Gemma3,
}

/// The test model files: `EMBER_TEST_SMOLLM2` / `EMBER_TEST_GEMMA3` when set, else the
/// model is resolved by name through ember-hub, which pulls it on first use (as the CLI does).
fn model_path(model: TestModel) -> Option<PathBuf> {
    let (var, name) = match model {
        TestModel::SmolLm2 => ("EMBER_TEST_SMOLLM2", "smollm2-135m-instruct-q4_1"),
        TestModel::Gemma3 => ("EMBER_TEST_GEMMA3", "gemma3-270m-q4_k_m"),
    };
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => Some(
            ember_hub::resolve(name)
                .unwrap_or_else(|e| panic!("cannot get test model {name}: {e}")),
        ),
    }
}

fn reference_dir() -> PathBuf {
    match std::env::var_os("EMBER_REFERENCE_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference"),
    }
}

fn load(model: TestModel) -> Option<&'static GgufTokenizer> {
    static SMOL: OnceLock<Option<GgufTokenizer>> = OnceLock::new();
    static GEMMA: OnceLock<Option<GgufTokenizer>> = OnceLock::new();
    let cell = match model {
        TestModel::SmolLm2 => &SMOL,
        TestModel::Gemma3 => &GEMMA,
    };
    cell.get_or_init(|| {
        let path = model_path(model)?;
        let t0 = Instant::now();
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
        let t1 = Instant::now();
        let tok = GgufTokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("tokenizer: {e}"));
        let t2 = Instant::now();
        eprintln!(
            "{model:?}: vocab {} — GGUF open {:.1} ms, tokenizer build {:.1} ms",
            tok.vocab_size(),
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3
        );
        Some(tok)
    })
    .as_ref()
}

fn read_json(name: &str) -> Value {
    let path = reference_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path:?}: {e}"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an id array, got {v}"))
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).expect("id"))
        .collect()
}

fn reference_strings(model: TestModel, key: &str) {
    let Some(tok) = load(model) else { return };
    let refs = read_json("tokenizer_reference.json");
    let cases = refs["models"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no cases for {key}"));
    let mut failures = Vec::new();
    let (mut ok_special, mut ok_raw) = (0, 0);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want_special = ids(&case["ids_special"]);
        let want_raw = ids(&case["ids_raw"]);
        let got_special = tok.encode(text, true, true).expect("encode");
        let got_raw = tok.encode(text, false, false).expect("encode");
        if got_special == want_special {
            ok_special += 1;
        } else {
            failures.push(format!(
                "special {text:?}\n  want {want_special:?}\n  got  {got_special:?}"
            ));
        }
        if got_raw == want_raw {
            ok_raw += 1;
        } else {
            failures.push(format!(
                "raw {text:?}\n  want {want_raw:?}\n  got  {got_raw:?}"
            ));
        }
    }
    eprintln!(
        "{key}: ids_special {ok_special}/{n}, ids_raw {ok_raw}/{n}",
        n = cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_reference_strings() {
    reference_strings(TestModel::SmolLm2, "smollm2-135m-instruct-q4_1");
}

#[test]
fn gemma3_reference_strings() {
    reference_strings(TestModel::Gemma3, "gemma3-270m-q4_k_m");
}

fn model_of_file(name: &str) -> Option<TestModel> {
    let n = name.to_ascii_lowercase();
    if n.contains("smollm2") {
        Some(TestModel::SmolLm2)
    } else if n.contains("gemma-3") || n.contains("gemma3") {
        Some(TestModel::Gemma3)
    } else {
        None
    }
}

fn reference_prompts(model: TestModel) {
    if load(model).is_none() {
        return;
    }
    let mut entries: Vec<_> = std::fs::read_dir(reference_dir())
        .expect("reference dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_name()
                    .is_some_and(|n| n != "tokenizer_reference.json")
        })
        .collect();
    entries.sort();
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in entries {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        let v = read_json(name);
        let file = v["model_file"].as_str().unwrap_or("");
        if model_of_file(file) != Some(model) {
            continue;
        }
        let Some(tok) = load(model) else { return };
        let text = v["prompt_text"].as_str().expect("prompt_text");
        let flags = &v["tokenize_flags"];
        let add_special = flags["add_special"].as_bool().expect("add_special");
        let parse_special = flags["parse_special"].as_bool().expect("parse_special");
        let want = ids(&v["prompt_token_ids"]);
        let got = tok
            .encode(text, add_special, parse_special)
            .expect("encode");
        checked += 1;
        if got != want {
            failures.push(format!("{name}\n  want {want:?}\n  got  {got:?}"));
        }
        // The greedy continuation decodes to the reference text.
        if let (Some(gen_ids), Some(gen_text)) = (
            v["greedy_generated_token_ids"].as_array(),
            v["greedy_generated_text"].as_str(),
        ) {
            let gen_ids: Vec<u32> = gen_ids
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect();
            let pieces: Vec<u8> = gen_ids
                .iter()
                .flat_map(|&i| tok.token_to_piece(i))
                .collect();
            if String::from_utf8_lossy(&pieces) != gen_text {
                failures.push(format!(
                    "{name}: generated pieces differ from reference text"
                ));
            }
        }
    }
    eprintln!("{model:?}: {checked} reference prompts checked");
    assert!(checked > 0, "no reference prompts for {model:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_reference_prompts() {
    reference_prompts(TestModel::SmolLm2);
}

#[test]
fn gemma3_reference_prompts() {
    reference_prompts(TestModel::Gemma3);
}

const PLAIN: &[&str] = &[
    "",
    " ",
    "Hello world",
    "  leading and trailing   ",
    "hello\nworld\n\n\ttabs",
    "naïve café résumé — “quotes” ‘single’",
    "日本語のテキスト 中文 한국어 Привет мир",
    "😀🚀👍🏽 🇫🇷 e\u{301}",
    "def f(x):\n    return x**2  # square\n",
    "a\r\nb\u{a0}c\u{200b}d",
    "don't won't I'm we'll they're I've",
    "The quick brown fox jumps over the lazy dog. 1234567890 $1,000,000 3.14159",
];

fn round_trip(model: TestModel) {
    let Some(tok) = load(model) else { return };
    for s in PLAIN {
        let plain = tok.encode(s, false, false).expect("encode");
        assert_eq!(tok.decode(&plain, false), *s, "raw round trip {s:?}");
        let with_bos = tok.encode(s, true, true).expect("encode");
        assert_eq!(tok.decode(&with_bos, true), *s, "special round trip {s:?}");
        // Streaming gives the same text.
        let mut dec = tok.stream_decoder(true);
        let mut streamed = String::new();
        for &id in &with_bos {
            streamed.push_str(&dec.push(tok, id));
        }
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, *s, "stream {s:?}");
    }
}

#[test]
fn smollm2_round_trip() {
    round_trip(TestModel::SmolLm2);
}

#[test]
fn gemma3_round_trip() {
    round_trip(TestModel::Gemma3);
}

fn special_ids(model: TestModel) {
    let Some(tok) = load(model) else { return };
    match model {
        TestModel::SmolLm2 => {
            assert_eq!(tok.bos_id(), Some(1));
            assert_eq!(tok.eos_id(), Some(2));
            assert!(!tok.add_bos());
            let im_end = tok.token_to_id("<|im_end|>").expect("<|im_end|>");
            assert!(tok.is_eog(im_end) && tok.is_eog(0));
            assert!(!tok.is_eog(1));
        }
        TestModel::Gemma3 => {
            assert_eq!(tok.bos_id(), Some(2));
            assert_eq!(tok.eos_id(), Some(1));
            assert!(tok.add_bos());
            let eot = tok.token_to_id("<end_of_turn>").expect("<end_of_turn>");
            assert!(tok.is_eog(eot) && tok.is_eog(1));
            assert!(!tok.is_eog(105));
            assert_eq!(tok.token_str(105), Some("<start_of_turn>"));
        }
    }
}

#[test]
fn smollm2_special_ids() {
    special_ids(TestModel::SmolLm2);
}

#[test]
fn gemma3_special_ids() {
    special_ids(TestModel::Gemma3);
}
