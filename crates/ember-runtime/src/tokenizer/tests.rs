//! Unit tests with tiny hand-built vocabularies (GGUF files made with `GgufWriter`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use ember_formats::{GgufFile, GgufWriter};
use proptest::prelude::*;

use super::*;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

struct Spec {
    model: &'static str,
    pre: Option<&'static str>,
    tokens: Vec<(String, f32, i32)>,
    merges: Vec<String>,
    extra: Vec<(&'static str, ember_formats::MetaValue)>,
}

fn build(spec: &Spec) -> Result<GgufTokenizer, TokenizerError> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "test");
    w.add("tokenizer.ggml.model", spec.model);
    if let Some(p) = spec.pre {
        w.add("tokenizer.ggml.pre", p);
    }
    w.add_string_array(
        "tokenizer.ggml.tokens",
        spec.tokens.iter().map(|t| t.0.as_str()),
    );
    w.add_array(
        "tokenizer.ggml.scores",
        spec.tokens.iter().map(|t| t.1).collect::<Vec<f32>>(),
    );
    w.add_array(
        "tokenizer.ggml.token_type",
        spec.tokens.iter().map(|t| t.2).collect::<Vec<i32>>(),
    );
    if spec.model == "gpt2" {
        w.add_string_array("tokenizer.ggml.merges", spec.merges.iter());
    }
    for (k, v) in &spec.extra {
        w.add(*k, v.clone());
    }
    let bytes = w.to_bytes().expect("write gguf");
    let f = GgufFile::from_bytes(bytes).expect("read gguf");
    GgufTokenizer::from_gguf(&f)
}

/// A small SPM vocab: <unk> <s> </s>, 256 byte tokens, then `normal` with scores.
fn spm_spec(normal: &[(&str, f32)], extra_specials: &[(&str, i32)]) -> Spec {
    let mut tokens = vec![
        ("<unk>".to_string(), 0.0, UNKNOWN),
        ("<s>".to_string(), 0.0, CONTROL),
        ("</s>".to_string(), 0.0, CONTROL),
    ];
    for b in 0..=255u8 {
        tokens.push((format!("<0x{b:02X}>"), 0.0, BYTE));
    }
    for (t, ty) in extra_specials {
        tokens.push((t.to_string(), 0.0, *ty));
    }
    for (t, s) in normal {
        tokens.push((t.to_string(), *s, NORMAL));
    }
    Spec {
        model: "llama",
        pre: None,
        tokens,
        merges: vec![],
        extra: vec![],
    }
}

fn id_of(t: &GgufTokenizer, s: &str) -> u32 {
    t.token_to_id(s).unwrap_or_else(|| panic!("no token {s:?}"))
}

fn ids_of(t: &GgufTokenizer, ss: &[&str]) -> Vec<u32> {
    ss.iter().map(|s| id_of(t, s)).collect()
}

#[test]
fn spm_basic_prefix_and_bos() {
    let spec = spm_spec(
        &[
            ("▁", -1.0),
            ("a", -2.0),
            ("b", -3.0),
            ("c", -4.0),
            ("ab", -5.0),
            ("▁a", -6.0),
            ("▁ab", -7.0),
        ],
        &[],
    );
    let t = build(&spec).expect("build");
    assert_eq!(t.kind(), VocabKind::Spm);
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    assert!(t.add_bos());
    // add_space_prefix defaults to true for SPM.
    let ids = t.encode("ab", true, true).expect("encode");
    assert_eq!(ids, [vec![1], ids_of(&t, &["▁ab"])].concat());
    assert_eq!(t.encode("", true, true).expect("encode"), vec![1]);
    assert_eq!(
        t.encode("", false, false).expect("encode"),
        Vec::<u32>::new()
    );
    // Decoding strips the prefix space of the first piece again...
    assert_eq!(t.decode(&ids[1..], true), "ab");
    assert_eq!(t.decode(&ids, false), "<s> ab");
    // ...except after a removed BOS (llama.cpp detokenize quirk: remove_space = false).
    assert_eq!(t.decode(&ids, true), " ab");
}

#[test]
fn spm_merges_by_score_and_byte_fallback() {
    let normal = [
        ("a", -1.0),
        ("b", -2.0),
        ("c", -3.0),
        ("ab", -10.0),
        ("bc", -5.0),
    ];
    let mut spec = spm_spec(&normal, &[]);
    spec.extra
        .push(("tokenizer.ggml.add_space_prefix", false.into()));
    let t = build(&spec).expect("build");
    // "bc" scores higher than "ab".
    assert_eq!(
        t.encode("abc", false, false).expect("encode"),
        ids_of(&t, &["a", "bc"])
    );
    // Characters outside the vocab fall back to <0xXX> tokens.
    assert_eq!(
        t.encode("aé", false, false).expect("encode"),
        ids_of(&t, &["a", "<0xC3>", "<0xA9>"])
    );
    assert_eq!(
        t.decode(&t.encode("aé", false, false).expect("e"), true),
        "aé"
    );

    let normal = [
        ("a", -1.0),
        ("b", -2.0),
        ("c", -3.0),
        ("ab", -4.0),
        ("bc", -5.0),
    ];
    let mut spec = spm_spec(&normal, &[]);
    spec.extra
        .push(("tokenizer.ggml.add_space_prefix", false.into()));
    let t = build(&spec).expect("build");
    assert_eq!(
        t.encode("abc", false, false).expect("encode"),
        ids_of(&t, &["ab", "c"])
    );
}

#[test]
fn special_partition_semantics() {
    let normal = [
        ("▁", -1.0),
        ("a", -2.0),
        ("<", -3.0),
        (">", -4.0),
        ("x", -5.0),
    ];
    let specials = [
        ("<x>", CONTROL),
        ("<a>", USER_DEFINED),
        ("<x><a>", USER_DEFINED),
    ];
    let mut spec = spm_spec(&normal, &specials);
    spec.extra
        .push(("tokenizer.ggml.add_space_prefix", false.into()));
    let t = build(&spec).expect("build");
    let x = id_of(&t, "<x>");
    let ua = id_of(&t, "<a>");
    let both = id_of(&t, "<x><a>");
    // USER_DEFINED tokens are split out even without parse_special; CONTROL only with it.
    assert_eq!(
        t.encode("a<a>a", false, false).expect("e"),
        vec![id_of(&t, "a"), ua, id_of(&t, "a")]
    );
    assert_eq!(
        t.encode("<x>", false, false).expect("e"),
        ids_of(&t, &["<", "x", ">"])
    );
    assert_eq!(t.encode("<x>", false, true).expect("e"), vec![x]);
    // Longest special text first.
    assert_eq!(
        t.encode("<x><a><x>", false, true).expect("e"),
        vec![both, x]
    );
    // Control text renders only when asked.
    assert_eq!(t.decode(&[x, ua], true), "<a>");
    assert_eq!(t.decode(&[x, ua], false), "<x><a>");
}

#[test]
fn spm_prefix_after_special_token() {
    let normal = [("▁", -1.0), ("a", -2.0), ("▁a", -3.0)];
    let t = build(&spm_spec(&normal, &[("<t>", CONTROL)])).expect("build");
    // add_space_prefix: every raw fragment following a special token gets a leading space.
    assert_eq!(
        t.encode("a<t>a", false, true).expect("e"),
        ids_of(&t, &["▁a", "<t>", "▁a"])
    );
}

/// GPT-2 byte-level alphabet (byte -> char) for building test vocabs.
fn bl(s: &str) -> String {
    let map = byte_to_unicode();
    s.bytes()
        .map(|b| char::from_u32(map[b as usize]).unwrap_or('?'))
        .collect()
}

fn gpt2_spec(pre: &'static str, words: &[&str], merges: &[(&str, &str)]) -> Spec {
    let mut tokens = vec![
        ("<|endoftext|>".to_string(), 0.0, CONTROL),
        ("<|im_start|>".to_string(), 0.0, CONTROL),
        ("<|im_end|>".to_string(), 0.0, CONTROL),
    ];
    for c in byte_to_unicode() {
        tokens.push((char::from_u32(c).unwrap_or('?').to_string(), 0.0, NORMAL));
    }
    for w in words {
        tokens.push((bl(w), 0.0, NORMAL));
    }
    Spec {
        model: "gpt2",
        pre: Some(pre),
        tokens,
        merges: merges
            .iter()
            .map(|(a, b)| format!("{} {}", bl(a), bl(b)))
            .collect(),
        extra: vec![],
    }
}

#[test]
fn gpt2_bpe_and_specials() {
    let spec = gpt2_spec(
        "gpt-2",
        &["he", " t", " the", "th", "the", "ll"],
        &[
            ("h", "e"),
            (" ", "t"),
            (" t", "he"),
            ("t", "he"),
            ("l", "l"),
        ],
    );
    let t = build(&spec).expect("build");
    assert_eq!(t.kind(), VocabKind::Bpe);
    assert!(!t.add_bos());
    let ids = t.encode("the the", true, true).expect("e");
    assert_eq!(ids, ids_of(&t, &[&bl("the"), &bl(" the")]));
    assert_eq!(t.decode(&ids, true), "the the");
    // Special text with and without parse_special.
    let ids = t.encode("<|im_start|>the", false, true).expect("e");
    assert_eq!(ids, vec![1, id_of(&t, &bl("the"))]);
    let raw = t.encode("<|im_start|>", false, false).expect("e");
    assert!(raw.len() > 1 && !raw.contains(&1));
    assert_eq!(t.decode(&raw, false), "<|im_start|>");
    // Non-ASCII round trip through byte-level tokens.
    let s = "naïve 日本 🚀\n\t x";
    assert_eq!(t.decode(&t.encode(s, false, false).expect("e"), true), s);
    // EOG detection by text.
    assert!(t.is_eog(0) && t.is_eog(2) && !t.is_eog(1));
    assert_eq!(t.token_to_piece(2), b"<|im_end|>".to_vec());
    assert_eq!(t.piece(2, false), b"");
}

#[test]
fn gpt2_clean_spaces_quirk() {
    // "gpt-2" keeps llama.cpp's clean_spaces = true; "smollm" turns it off.
    let t = build(&gpt2_spec("gpt-2", &[], &[])).expect("build");
    let ids = t.encode("a , b ' c 's", false, false).expect("e");
    assert_eq!(t.decode(&ids, true), "a, b'c's");
    let t = build(&gpt2_spec("smollm", &[], &[])).expect("build");
    let ids = t.encode("a , b ' c 's", false, false).expect("e");
    assert_eq!(t.decode(&ids, true), "a , b ' c 's");
}

#[test]
fn pre_tokenizer_profiles_split() {
    // Digits split one by one for smollm, grouped by three for llama3.
    let t = build(&gpt2_spec(
        "smollm",
        &["12", "123"],
        &[("1", "2"), ("12", "3")],
    ))
    .expect("b");
    assert_eq!(t.encode("123", false, false).expect("e").len(), 3);
    let t = build(&gpt2_spec(
        "llama-bpe",
        &["12", "123"],
        &[("1", "2"), ("12", "3")],
    ))
    .expect("b");
    assert_eq!(t.encode("1234", false, false).expect("e").len(), 2);
    assert!(t.add_bos()); // llama3 defaults add_bos = true (bos defaults to id 11 here)
    let t = build(&gpt2_spec("qwen2", &["12"], &[("1", "2")])).expect("b");
    assert_eq!(t.encode("12", false, false).expect("e").len(), 2);
    let t = build(&gpt2_spec("default", &["12"], &[("1", "2")])).expect("b");
    assert_eq!(t.encode("12", false, false).expect("e").len(), 1);
}

#[test]
fn unknown_pre_and_model_are_errors() {
    match build(&gpt2_spec("frobnicate-9", &[], &[])) {
        Err(TokenizerError::UnknownPre(p)) => assert_eq!(p, "frobnicate-9"),
        other => panic!("expected UnknownPre, got {other:?}"),
    }
    let e = build(&gpt2_spec("frobnicate-9", &[], &[])).expect_err("unknown pre");
    assert!(e.to_string().contains("frobnicate-9"));
    let mut spec = gpt2_spec("gpt-2", &[], &[]);
    spec.model = "bert";
    assert!(matches!(build(&spec), Err(TokenizerError::UnknownModel(m)) if m == "bert"));
}

#[test]
fn rstrip_attr_for_phi3() {
    let normal = [("▁", -1.0), ("a", -2.0), ("▁a", -3.0)];
    let mut spec = spm_spec(&normal, &[("<|end|>", CONTROL)]);
    spec.extra.push(("general.name", "Phi-3 mini".into()));
    spec.extra
        .push(("tokenizer.ggml.add_space_prefix", false.into()));
    let t = build(&spec).expect("build");
    let end = id_of(&t, "<|end|>");
    // RSTRIP drops the whitespace after the token.
    assert_eq!(
        t.encode("a<|end|>   a", false, true).expect("e"),
        vec![id_of(&t, "a"), end, id_of(&t, "a")]
    );
}

#[test]
fn stream_decoder_holds_partial_chars() {
    let mut d = StreamDecoder::new(true);
    let bytes = "é🚀".as_bytes();
    assert_eq!(d.push_bytes(&bytes[..1]), "");
    assert!(d.has_pending());
    assert_eq!(d.push_bytes(&bytes[1..3]), "é");
    assert_eq!(d.push_bytes(&bytes[3..5]), "");
    assert_eq!(d.push_bytes(&bytes[5..]), "🚀");
    assert_eq!(d.push_bytes(b"\xff a"), "\u{FFFD} a");
    assert_eq!(d.push_bytes(b"\xe6\x97"), "");
    assert_eq!(d.finish(), "\u{FFFD}");
}

#[test]
fn clean_spaces_port() {
    let mut v = b"Hello , world ! it ' s".to_vec();
    clean_spaces(&mut v);
    assert_eq!(v, b"Hello, world! it's");
    let mut v = b" 're 've 'll 'd 'm".to_vec();
    clean_spaces(&mut v);
    assert_eq!(v, b"'re've 'll 'd'm");
}

// ---- differential test against a direct port of llama.cpp's llm_tokenizer_spm

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}
impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    // max-heap: higher score first, then smaller left
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .partial_cmp(&o.score)
            .unwrap_or(Ordering::Equal)
            .then(o.left.cmp(&self.left))
    }
}

/// llm_tokenizer_spm_session::tokenize, ported literally.
fn reference_spm(text: &str, vocab: &HashMap<String, (u32, f32)>) -> Vec<u32> {
    #[derive(Clone, Copy)]
    struct Sym {
        prev: isize,
        next: isize,
        start: usize,
        n: usize,
    }
    let mut syms: Vec<Sym> = Vec::new();
    for (i, (off, c)) in text.char_indices().enumerate() {
        let n = c.len_utf8();
        syms.push(Sym {
            prev: i as isize - 1,
            next: if off + n == text.len() {
                -1
            } else {
                i as isize + 1
            },
            start: off,
            n,
        });
    }
    let mut q = BinaryHeap::new();
    let try_add = |q: &mut BinaryHeap<Bigram>, syms: &[Sym], l: isize, r: isize| {
        if l < 0 || r < 0 {
            return;
        }
        let (l, r) = (l as usize, r as usize);
        let s = &text[syms[l].start..syms[l].start + syms[l].n + syms[r].n];
        if let Some(&(_, score)) = vocab.get(s) {
            q.push(Bigram {
                left: l,
                right: r,
                score,
                size: s.len(),
            });
        }
    };
    for i in 1..syms.len() {
        try_add(&mut q, &syms, i as isize - 1, i as isize);
    }
    while let Some(b) = q.pop() {
        let (l, r) = (syms[b.left], syms[b.right]);
        if l.n == 0 || r.n == 0 || l.n + r.n != b.size {
            continue;
        }
        syms[b.left].n += r.n;
        syms[b.right].n = 0;
        syms[b.left].next = r.next;
        if r.next >= 0 {
            syms[r.next as usize].prev = b.left as isize;
        }
        let (p, nx) = (syms[b.left].prev, syms[b.left].next);
        try_add(&mut q, &syms, p, b.left as isize);
        try_add(&mut q, &syms, b.left as isize, nx);
    }
    let mut out = Vec::new();
    let mut i: isize = if syms.is_empty() { -1 } else { 0 };
    while i >= 0 {
        let s = syms[i as usize];
        let t = &text[s.start..s.start + s.n];
        match vocab.get(t) {
            Some(&(id, _)) => out.push(id),
            None => {
                for b in t.bytes() {
                    out.push(vocab[&format!("<0x{b:02X}>")].0);
                }
            }
        }
        i = s.next;
    }
    out
}

fn diff_vocab() -> Vec<(&'static str, f32)> {
    // Distinct scores, overlapping merges, multi-byte characters.
    vec![
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("c", -4.0),
        ("é", -5.0),
        ("ab", -9.0),
        ("bc", -8.0),
        ("ca", -7.5),
        ("abc", -6.0),
        ("▁a", -8.5),
        ("▁ab", -12.0),
        ("aa", -11.0),
        ("aaa", -10.5),
        ("bé", -13.0),
        ("▁▁", -14.0),
        ("cab", -6.5),
        ("éa", -15.0),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn spm_matches_llama_cpp_reference(s in "[abcé ▁xyz]{0,24}") {
        let normal = diff_vocab();
        let mut spec = spm_spec(&normal, &[]);
        spec.extra.push(("tokenizer.ggml.add_space_prefix", false.into()));
        let t = build(&spec).expect("build");
        let vocab: HashMap<String, (u32, f32)> = spec
            .tokens
            .iter()
            .enumerate()
            .map(|(i, (t, sc, _))| (t.clone(), (i as u32, *sc)))
            .collect();
        let escaped = s.replace(' ', "▁");
        let expect = reference_spm(&escaped, &vocab);
        let got = t.encode(&s, false, false).expect("encode");
        prop_assert_eq!(got, expect);
    }
}
