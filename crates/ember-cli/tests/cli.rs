//! The `ember` binary as a user (or a tool parsing its `--json`) sees it, on the real SmolLM2
//! model (pulled by name on first use).

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const MODEL: &str = "smollm2-135m-instruct-q4_1";

fn ember(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ember")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "ember failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn tokenize_json_matches_llama_cpp() {
    let out = ember(&[
        "tokenize",
        "-m",
        MODEL,
        "-p",
        "The capital of France is",
        "--json",
    ]);
    assert_eq!(
        json_of(&out),
        serde_json::json!({"tokens": [504, 3575, 282, 4649, 314]})
    );
}

#[test]
fn generate_json_has_the_contract_fields() {
    let out = ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "The capital of France is",
        "-n",
        "6",
        "--temperature",
        "0",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(
        v["prompt_tokens"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    // llama.cpp's greedy continuation starts " Paris."
    assert_eq!(v["tokens"][0], 7042);
    assert!(v["text"].as_str().unwrap().starts_with(" Paris"));
    for k in ["prompt_n", "prompt_ms", "predicted_n", "predicted_ms"] {
        assert!(v["timings"][k].is_number(), "timings.{k}");
    }
    assert_eq!(v["timings"]["prompt_n"], 5);
}

#[test]
fn bench_runs_each_test_at_the_given_depth() {
    let out = ember(&[
        "bench", "-m", MODEL, "-p", "16", "-n", "3", "-d", "40", "-r", "2", "-t", "1", "--json",
    ]);
    let v = json_of(&out);
    let tests = v.as_array().expect("a JSON list");
    assert_eq!(tests.len(), 2, "pp and tg");
    for (t, (p, n)) in tests.iter().zip([(16, 0), (0, 3)]) {
        assert_eq!(t["n_prompt"], p);
        assert_eq!(t["n_gen"], n);
        assert_eq!(t["n_depth"], 40);
        assert_eq!(t["samples_ns"].as_array().map(Vec::len), Some(2));
    }
    // The table labels a test at depth as llama-bench does.
    let out = ember(&[
        "bench", "-m", MODEL, "-p", "8", "-n", "0", "-d", "20", "-r", "1",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("| pp8 @ d20 |"));
}

#[test]
fn generate_streams_from_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "generate",
            "-m",
            MODEL,
            "--stdin",
            "-n",
            "3",
            "--temperature",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"The capital of France is")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(" Paris"));
}

#[test]
fn logits_json_shape() {
    let out = ember(&[
        "logits",
        "-m",
        MODEL,
        "--tokens",
        "504,3575,282",
        "--top-k",
        "3",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["tokens"], serde_json::json!([504, 3575, 282]));
    let positions = v["positions"].as_array().unwrap();
    assert_eq!(positions.len(), 3);
    for (i, p) in positions.iter().enumerate() {
        assert_eq!(p["pos"], i);
        let top = p["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(top[0][1].as_f64().unwrap() >= top[1][1].as_f64().unwrap());
    }
}

#[test]
fn prompt_over_context_size_fails_clearly() {
    let long = "word ".repeat(300);
    let out = ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        &long,
        "--ctx-size",
        "256",
        "-n",
        "4",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("context size is 256") && err.contains("nothing was truncated"),
        "{err}"
    );
}

#[test]
fn hostile_and_truncated_files_exit_1_without_panicking() {
    let dir = std::env::temp_dir().join(format!("ember-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = ember_hub::resolve(MODEL).unwrap();
    let bytes = std::fs::read(&real).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not-gguf", b"hello, this is not a model".to_vec()),
        ("truncated-header", bytes[..1000].to_vec()),
        ("truncated-data", bytes[..bytes.len() / 2].to_vec()),
    ];
    // A tensor count of 2^62 in an otherwise valid header.
    let mut huge = bytes[..4096].to_vec();
    huge[8..16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    cases.push(("huge-count", huge));
    for (name, data) in cases {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, data).unwrap();
        for cmd in ["inspect", "generate"] {
            let p = path.to_str().unwrap();
            let out = if cmd == "inspect" {
                ember(&["inspect", p])
            } else {
                ember(&["generate", "-m", p, "-p", "hi", "-n", "1"])
            };
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd} {name}: {err}");
            assert!(
                err.starts_with("error:") && !err.contains("panicked"),
                "{cmd} {name}: {err}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_lists_tensors() {
    let out = ember(&["inspect", MODEL, "--json"]);
    let v = json_of(&out);
    assert_eq!(v["metadata"]["general.architecture"], "llama");
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 272);
    let embd = tensors
        .iter()
        .find(|t| t["name"] == "token_embd.weight")
        .unwrap();
    assert_eq!(embd["type"], "q8_0");
    assert_eq!(embd["shape"], serde_json::json!([576, 49152]));
}

/// `ember perplexity` against llama-perplexity's result on the same file and ctx (fixtures made
/// with the command recorded in them, on an AVX512-FP16 host). Fixtures marked `exact` must be
/// equal to the 4 decimals llama-perplexity prints; the others (whose remaining difference
/// and its cause the fixture's `note` states) within 1%.
fn perplexity_matches_fixture(name: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures").join(name)).unwrap(),
    )
    .unwrap();
    let text = root.join(fixture["text"].as_str().unwrap());
    let ctx = fixture["ctx"].as_u64().unwrap();
    let chunks = fixture["chunks"].as_u64().unwrap();
    let out = ember(&[
        "perplexity",
        "-m",
        fixture["model"].as_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        &ctx.to_string(),
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["chunks"], fixture["chunks"]);
    // llama-perplexity scores the second half of each chunk but its first token.
    assert_eq!(v["tokens"].as_u64().unwrap(), chunks * (ctx / 2 - 1));
    let (ours, theirs) = (v["ppl"].as_f64().unwrap(), fixture["ppl"].as_f64().unwrap());
    if fixture["exact"].as_bool() == Some(true) {
        assert_eq!(format!("{ours:.4}"), format!("{theirs:.4}"), "{name}");
    } else {
        assert!(
            (ours / theirs - 1.0).abs() < 0.01,
            "ctx {ctx}: ember {ours} vs llama.cpp {theirs}"
        );
    }
}

#[test]
fn perplexity_matches_llama_perplexity() {
    perplexity_matches_fixture("perplexity-smollm2-q4_1-ctx512.json");
    perplexity_matches_fixture("perplexity-smollm2-q4_1-ctx512-b512.json");
}

#[test]
fn perplexity_at_ctx_2048_matches_llama_perplexity() {
    perplexity_matches_fixture("perplexity-smollm2-q4_1-ctx2048.json");
}

/// Gemma 3 at ctx 512, 1024 (past its 512-token sliding window) and 2048 (past the 1024 cells
/// of llama.cpp's window cache).
#[test]
fn gemma3_perplexity_matches_llama_perplexity() {
    perplexity_matches_fixture("perplexity-gemma3-270m-q4_k_m-ctx512.json");
    perplexity_matches_fixture("perplexity-gemma3-270m-q4_k_m-ctx1024.json");
    perplexity_matches_fixture("perplexity-gemma3-270m-q4_k_m-ctx2048.json");
}

#[test]
fn context_shift_is_opt_in_and_reported() {
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "generate",
            "-m",
            MODEL,
            "-p",
            "The quick brown fox",
            "--ctx-size",
            "24",
            "-n",
            "40",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ];
        a.extend_from_slice(extra);
        a
    };
    // Without the flag, generation stops when the context is full and says why.
    let v = json_of(&ember(&args(&[])));
    assert_eq!(v["stop_reason"], "context_full");
    assert!(v["context_shifts"].as_array().unwrap().is_empty());
    let n_prompt = v["prompt_tokens"].as_array().unwrap().len();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 24 - n_prompt + 1);

    let out = ember(&args(&["--context-shift"]));
    let v = json_of(&out);
    assert_eq!(v["stop_reason"], "length");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 40);
    assert!(!v["context_shifts"].as_array().unwrap().is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context shift"), "{err}");
}

#[test]
fn kv_cache_types_all_generate() {
    for ty in ["f32", "f16", "q8_0"] {
        let v = json_of(&ember(&[
            "generate",
            "-m",
            MODEL,
            "-p",
            "Once upon a time",
            "-n",
            "8",
            "--temperature",
            "0",
            "--kv-type",
            ty,
            "--kv-block-size",
            "16",
            "--json",
        ]));
        assert_eq!(v["tokens"].as_array().unwrap().len(), 8, "{ty}");
    }
    let out = ember(&["generate", "-m", MODEL, "-p", "hi", "--kv-type", "q4_9"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects an unknown type");
}

/// Issue #14: with `--context-shift`, the second shift rebuilt a cache larger than the
/// context ("0 tokens cached + 65 new exceeds the context size of 64 tokens"), the command
/// exited 1 and `--json` printed nothing. The exact reported command now returns all 300.
#[test]
fn context_shift_returns_every_token_over_many_shifts() {
    let out = ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "Once upon a time",
        "-n",
        "300",
        "--ctx-size",
        "64",
        "--context-shift",
        "--ignore-eos",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["stop_reason"], "length");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 300);
    assert_eq!(v["timings"]["predicted_n"], 300);
    let shifts = v["context_shifts"].as_array().unwrap();
    assert!(shifts.len() >= 4, "several shifts: {shifts:?}");
    assert!(shifts.iter().all(|d| d.as_u64().unwrap() >= 1));
    assert!(!v["text"].as_str().unwrap().is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("context shift:").count(), shifts.len(), "{err}");

    // Longer, with --keep past the prompt (only the prompt is pinned, as llama.cpp) and a
    // small context: each shift drops (32 - 4) / 2 tokens.
    let v = json_of(&ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "Once upon a time",
        "-n",
        "500",
        "--ctx-size",
        "32",
        "--context-shift",
        "--keep",
        "1000",
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
    ]));
    assert_eq!(v["stop_reason"], "length");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 500);
    let shifts = v["context_shifts"].as_array().unwrap();
    assert!(
        shifts.len() > 10 && shifts.iter().all(|d| d == 14),
        "{shifts:?}"
    );
}

/// A context that the pinned prompt fills but for one slot cannot shift (nothing could be
/// dropped): generation stops with `context_full`, the tokens so far kept, exit 0.
#[test]
fn context_shift_that_can_drop_nothing_stops_with_context_full() {
    let v = json_of(&ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "Once upon a time",
        "-n",
        "20",
        "--ctx-size",
        "5",
        "--context-shift",
        "--keep",
        "1000",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(v["stop_reason"], "context_full");
    // Four prompt tokens: the first token needs no slot, the second takes the last one.
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);
    assert!(v["context_shifts"].as_array().unwrap().is_empty());
}

/// `-n 0` generated one token; now nothing, as llama.cpp's `-n 0`, on both generation paths.
#[test]
fn n_predict_zero_generates_nothing() {
    for extra in [&[][..], &["--context-shift"][..]] {
        let mut args = vec![
            "generate",
            "-m",
            MODEL,
            "-p",
            "Once upon a time",
            "-n",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let v = json_of(&ember(&args));
        assert_eq!(v["tokens"], serde_json::json!([]), "{extra:?}");
        assert_eq!(v["text"], "");
        assert_eq!(v["stop_reason"], "length");
        assert_eq!(v["timings"]["predicted_n"], 0);
    }
}

/// Out-of-range values are refused with a clear `error:` line and clap's usage exit code
/// before any model is loaded; none runs, none aborts.
#[test]
fn out_of_range_flags_are_refused_clearly() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--top-p", "2"],
            "'--top-p <TOP_P>': must be between 0 and 1",
        ),
        (
            &["--top-p", "-0.5"],
            "'--top-p <TOP_P>': must be between 0 and 1",
        ),
        (
            &["--min-p", "1.5"],
            "'--min-p <MIN_P>': must be between 0 and 1",
        ),
        (
            &["--min-p", "NaN"],
            "'--min-p <MIN_P>': must be a finite number",
        ),
        (&["--temperature", "NaN"], "must be a finite number"),
        (&["--temperature", "inf"], "must be a finite number"),
        (&["--temperature", "1e308"], "must be a finite number"),
        (&["--temperature", "-1"], "must be 0 (greedy) or more"),
        (&["--repeat-penalty", "0"], "must be more than 0"),
        (&["--repeat-penalty", "-1"], "must be more than 0"),
        (&["--repeat-penalty", "NaN"], "must be a finite number"),
        (&["--presence-penalty", "inf"], "must be a finite number"),
        (&["--frequency-penalty", "NaN"], "must be a finite number"),
        (&["--top-k", "-1"], "'--top-k <TOP_K>': must be 0 (off)"),
        (&["--repeat-last-n", "-2"], "must be -1 (all), 0 (off)"),
        (
            &["-n", "-1"],
            "'--n-predict <N>': must be a number of tokens, 0 or more",
        ),
        (
            &["--ctx-size", "0"],
            "'--ctx-size <CTX_SIZE>': must be at least 1",
        ),
        (
            &["--kv-budget-mib", "0"],
            "must be a number of MiB greater than 0",
        ),
        (
            &["--kv-budget-mib", "-5"],
            "must be a number of MiB greater than 0",
        ),
        (
            &["--kv-budget-mib", "NaN"],
            "must be a number of MiB greater than 0",
        ),
        (
            &["--kv-block-size", "0"],
            "must be between 1 and 4096 tokens",
        ),
        // Aborted with "memory allocation of ... failed" (exit 134).
        (
            &["--kv-block-size", "1000000000"],
            "must be between 1 and 4096 tokens",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["generate", "-m", MODEL, "-p", "hi", "-n", "2"];
        if flags[0] == "-n" {
            args.truncate(5);
        }
        args.extend_from_slice(flags);
        let out = ember(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(
            err.starts_with("error: invalid value") && err.contains(want),
            "{flags:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{flags:?}");
    }
    // The same flags on the other commands that take them.
    for args in [
        &["serve", "-m", MODEL, "--kv-block-size", "1000000000"][..],
        &["serve", "-m", MODEL, "--ctx-size", "0"][..],
        &["serve", "-m", MODEL, "--kv-budget-mib", "0"][..],
        &["chat", "-m", MODEL, "--kv-block-size", "1000000000"][..],
        &["chat", "-m", MODEL, "--top-p", "2"][..],
        &["perplexity", "-m", MODEL, "-f", "README.md", "--ctx", "0"][..],
        &["perplexity", "-m", MODEL, "-f", "README.md", "--ctx", "2"][..],
    ] {
        let out = ember(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: invalid value"), "{args:?}: {err}");
    }
    // In range: -1 is llama.cpp's "all" (clap took it for a flag before), 0 and 1 bounds.
    let v = json_of(&ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "hi",
        "-n",
        "2",
        "--repeat-last-n",
        "-1",
        "--repeat-penalty",
        "1.1",
        "--top-p",
        "1",
        "--min-p",
        "0",
        "--temperature",
        "0",
        "--kv-block-size",
        "4096",
        "--json",
    ]));
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);
}

/// `--ctx-size 1` and a budget too small for one token ran a silent one-token context; a
/// context must hold the prompt and one generated token.
#[test]
fn a_context_too_small_for_the_prompt_is_an_error() {
    let out = ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "hi",
        "-n",
        "4",
        "--ctx-size",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: the prompt is 1 tokens but the context size is 1")
            && err.contains("at least 2 tokens"),
        "{err}"
    );
    let out = ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "hi",
        "-n",
        "4",
        "--kv-budget-mib",
        "0.0001",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: --kv-budget-mib 0.0001 holds no token"),
        "{err}"
    );
    // A budget of a few tokens: the default context is what it holds, too small here.
    let out = ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "Once upon a time",
        "-n",
        "4",
        "--kv-budget-mib",
        "0.05",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("capped by --kv-budget-mib"), "{err}");
}

/// Issue #14: a KV cache larger than the machine (a context and budget from flags) is an
/// error that says what to lower, not an abort from a failed allocation (exit 134); and the
/// message says it once.
#[test]
fn an_impossible_kv_cache_is_an_error_not_an_abort() {
    let out = ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        "hi",
        "-n",
        "2",
        "--ctx-size",
        "4000000000",
        "--kv-budget-mib",
        "100000000",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("lower the context size"), "{err}");
    assert_eq!(err.matches("could not allocate").count(), 1, "{err}");
}

/// A passage the model is asked to repeat: prompt lookup finds it in the prompt.
const REWRITE: &str = "<|im_start|>user\nRepeat this text exactly: The river rises in the \
    northern hills, runs south through three valleys and a market town, and meets the sea at a \
    wide, shallow bay where herons wait at low tide.<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn spec_lookup_keeps_the_text_and_reports_its_counts() {
    let run = |spec: &str| {
        json_of(&ember(&[
            "generate",
            "-m",
            MODEL,
            "-p",
            REWRITE,
            "-n",
            "48",
            "--temperature",
            "0",
            "--spec",
            spec,
            "--json",
        ]))
    };
    let plain = run("none");
    assert!(plain["spec"].is_null(), "{}", plain["spec"]);
    let lookup = run("lookup");
    assert_eq!(lookup["text"], plain["text"]);
    assert_eq!(lookup["tokens"], plain["tokens"]);
    assert_eq!(lookup["spec"]["proposer"], "lookup");
    let (drafted, accepted) = (
        lookup["spec"]["drafted"].as_u64().expect("drafted"),
        lookup["spec"]["accepted"].as_u64().expect("accepted"),
    );
    assert!(accepted > 0 && accepted <= drafted, "{}", lookup["spec"]);
    // `timings` keep their meaning: the generated tokens, the prompt's.
    assert_eq!(
        lookup["timings"]["predicted_n"],
        plain["timings"]["predicted_n"]
    );
    assert_eq!(lookup["timings"]["prompt_n"], plain["timings"]["prompt_n"]);
    // Self-speculation runs too, with the same text.
    let selfspec = json_of(&ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        REWRITE,
        "-n",
        "24",
        "--temperature",
        "0",
        "--spec",
        "self",
        "--spec-layers",
        "10",
        "--json",
    ]));
    let plain24 = json_of(&ember(&[
        "generate",
        "-m",
        MODEL,
        "-p",
        REWRITE,
        "-n",
        "24",
        "--temperature",
        "0",
        "--json",
    ]));
    assert_eq!(selfspec["tokens"], plain24["tokens"]);
    assert_eq!(selfspec["spec"]["proposer"], "self");
}

#[test]
fn bad_speculation_settings_exit_1_with_a_clear_error() {
    let base = ["generate", "-m", MODEL, "-p", "Hello", "-n", "4"];
    let cases: &[(&[&str], &str)] = &[
        (&["--spec", "draft"], "--draft-model"),
        (&["--spec", "self", "--spec-layers", "0"], "--spec-layers"),
        (&["--spec", "self", "--spec-layers", "30"], "--spec-layers"),
        (&["--spec", "lookup", "--draft-max", "0"], "--draft-max"),
        (&["--spec", "lookup", "--draft-max", "-3"], "--draft-max"),
        (&["--spec", "lookup", "--draft-min", "9"], "--draft-min"),
        (
            &["--spec", "lookup", "--draft-model", MODEL],
            "--draft-model",
        ),
        (&["--draft-model", "gemma3-270m-q4_k_m"], "vocabulary"),
    ];
    for (extra, needle) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let out = ember(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }
    // An unknown mode is a usage error, as every other bad flag value.
    let mut args = base.to_vec();
    args.extend_from_slice(&["--spec", "bogus"]);
    let out = ember(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none, lookup, draft or self"));
}

/// A GPTQ checkpoint directory made from SmolLM2 by ember-convert's writer runs through every
/// command that takes `-m`, packed and dequantized; a broken one fails with the field named.
#[test]
fn checkpoint_directories_run_and_fail_clearly() {
    use ember_convert::{GroupSize, QuantWriteFormat, QuantWriteOptions};
    let root =
        ember_models::testing::ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), "cli-checkpoint");
    let dir = root.join("gptq");
    let gguf_path = ember_hub::resolve(MODEL).expect("model");
    let gguf = ember_formats::GgufFile::open(&gguf_path).expect("open");
    let opts = QuantWriteOptions {
        format: QuantWriteFormat::Gptq {
            act_order: true,
            sym: true,
            v2: false,
        },
        bits: 4,
        group_size: GroupSize::Size(128),
    };
    ember_convert::gguf_to_quantized_hf(&gguf, &dir, &opts, &mut |_| {}).expect("export");
    let d = dir.to_str().expect("utf-8 path");

    let tokens = json_of(&ember(&[
        "tokenize",
        "-m",
        d,
        "-p",
        "The capital of France is",
        "--json",
    ]));
    assert_eq!(
        tokens["tokens"],
        serde_json::json!([504, 3575, 282, 4649, 314])
    );
    for extra in [None, Some("--dequantize")] {
        let mut args = vec!["generate", "-m", d, "-p", "The capital of France is"];
        args.extend(["-n", "8", "--temperature", "0", "--ignore-eos", "--json"]);
        args.extend(extra);
        let out = json_of(&ember(&args));
        assert_eq!(out["timings"]["predicted_n"], 8, "{extra:?}: {out}");
    }
    let info = json_of(&ember(&["inspect", d, "--json"]));
    let scheme = info["quantization"]["scheme"].as_str().unwrap_or("");
    assert!(scheme.starts_with("GPTQ 4-bit g128 act-order"), "{scheme}");
    assert!(info["tensors"].as_array().is_some_and(|t| t.len() > 200));

    // Five-bit GPTQ does not exist: the error names the field and its value.
    let bad = root.join("bad-bits");
    std::fs::create_dir_all(&bad).expect("mkdir");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir.join(f), bad.join(f)).expect("copy");
    }
    let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
    let mut config: Value = serde_json::from_str(&config).expect("json");
    config["quantization_config"]["bits"] = serde_json::json!(5);
    std::fs::write(bad.join("config.json"), config.to_string()).expect("write");
    let b = bad.to_str().expect("utf-8 path");
    let out = ember(&["generate", "-m", b, "-p", "hi", "-n", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bits") && err.contains('5'), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A missing weight file: a clear error, no panic.
    std::fs::remove_file(bad.join("model.safetensors")).expect("rm");
    let out = ember(&["inspect", b]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
