//! Builds the HF `tokenizers::Tokenizer` from a [`Vocab`].
//!
//! * gpt2: `BPE(vocab, merges)` + pre-tokenizer `Sequence[Split(regex, Isolated)..., ByteLevel]`
//!   + `ByteLevel` decoder.
//! * llama (SPM), only for export (Ember encodes with [`super::spm`]): `BPE(vocab, merges
//!   derived from the scores, byte_fallback)`, normalizer `[Prepend("▁")], Replace(" ", "▁")`
//!   and decoder `Replace("▁", " "), ByteFallback, Fuse, [Strip]` (the transformers
//!   `LlamaConverter` shape).
//!
//! CONTROL/UNKNOWN tokens are registered as special added tokens and USER_DEFINED ones as
//! normal added tokens, so `inner()` is usable on its own; [`super::GgufTokenizer::encode`]
//! does its own llama.cpp-exact special-token partition and only uses the pre-tokenizer and the
//! model of this tokenizer.

use std::collections::HashSet;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::TokenizerError;
use super::vocab::{Vocab, attr};

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

/// Builds the HF tokenizer of a byte-level BPE (gpt2) vocab from its text -> id map and its
/// GGUF merges.
pub(crate) fn build_bpe(
    v: &Vocab,
    vocab_map: tokenizers::models::bpe::Vocab,
    gguf_merges: Vec<(String, String)>,
) -> Result<Tokenizer, TokenizerError> {
    let merges = filter_bpe_merges(gguf_merges, &vocab_map);
    let model = BPE::builder()
        .vocab_and_merges(vocab_map, merges)
        .ignore_merges(v.ignore_merges)
        .build()
        .map_err(build_err)?;
    let mut tok = Tokenizer::new(model);
    let prof = v
        .pre
        .as_ref()
        .ok_or_else(|| TokenizerError::Build("BPE vocab without a pre-tokenizer".into()))?;
    let mut pre: Vec<PreTokenizerWrapper> = Vec::with_capacity(prof.regexes.len() + 1);
    for re in prof.regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex {re:?}: {e}")))?;
        pre.push(split.into());
    }
    pre.push(ByteLevel::new(false, false, false).into());
    tok.with_pre_tokenizer(Some(PreSequence::new(pre)));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    add_tokens(&mut tok, &v.texts, &v.attrs);
    Ok(tok)
}

/// What [`build_spm`] reads of a SentencePiece-style vocab.
pub(crate) struct SpmParts<'a> {
    pub texts: &'a [String],
    pub attrs: &'a [u32],
    /// Scores as [`super::spm::Spm`] keeps them (no NaN, no -0.0).
    pub scores: &'a [f32],
    pub unk: Option<u32>,
    pub add_space_prefix: bool,
}

/// The HF form of a SentencePiece-style vocab (the transformers `LlamaConverter` shape: BPE
/// with merges derived from the scores and byte fallback, the `▁` normalizer and decoder), for
/// exporting it as tokenizer.json. Ember's own encoding does not use it (see
/// [`super::spm`]).
pub(crate) fn build_spm(p: &SpmParts<'_>) -> Result<Tokenizer, TokenizerError> {
    let vocab = text_to_id(p.texts);
    let merges = derive_spm_merges(p.texts, p.scores, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = p.unk {
        builder = builder.unk_token(p.texts[unk as usize].clone());
    }
    let model = builder.build().map_err(build_err)?;
    let mut tok = Tokenizer::new(model);
    let replace = Replace::new(" ", "\u{2581}").map_err(build_err)?;
    let norm: NormalizerWrapper = if p.add_space_prefix {
        NormSequence::new(vec![Prepend::new("\u{2581}".into()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    tok.with_normalizer(Some(norm));
    let mut dec: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ").map_err(build_err)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if p.add_space_prefix {
        dec.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(dec)));
    add_tokens(&mut tok, p.texts, p.attrs);
    Ok(tok)
}

/// The HF BPE model's text -> id map of `texts` (distinct: [`super::vocab::TextIndex`] checked).
pub(crate) fn text_to_id(texts: &[String]) -> tokenizers::models::bpe::Vocab {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// Registers CONTROL/UNKNOWN tokens as special added tokens and USER_DEFINED ones as normal
/// added tokens.
fn add_tokens(tok: &mut Tokenizer, texts: &[String], attrs: &[u32]) {
    let mut added = Vec::new();
    for (t, &a) in texts.iter().zip(attrs.iter()) {
        let special = a & (attr::CONTROL | attr::UNKNOWN) != 0;
        if special || a & attr::USER_DEFINED != 0 {
            let mut at = AddedToken::from(t.clone(), special).normalized(false);
            at.lstrip = a & attr::LSTRIP != 0;
            at.rstrip = a & attr::RSTRIP != 0;
            added.push(at);
        }
    }
    tok.add_tokens(&added);
}

/// GGUF merges as the HF BPE model accepts them. llama.cpp keys its ranks by strings and keeps
/// the first rank of a repeated pair (`bpe_ranks.emplace`); HF needs both sides and the merged
/// text in the vocab, so merges that produce an out-of-vocab text are dropped (llama.cpp would
/// form the symbol and then emit it byte by byte, an edge case that well-formed vocabs avoid).
fn filter_bpe_merges(
    merges: Vec<(String, String)>,
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let mut seen: HashSet<(u32, u32)> = HashSet::with_capacity(merges.len());
    let mut out = Vec::with_capacity(merges.len());
    let mut merged = String::new();
    for (a, b) in merges {
        let (Some(&ia), Some(&ib)) = (vocab.get(&a), vocab.get(&b)) else {
            continue;
        };
        merged.clear();
        merged.push_str(&a);
        merged.push_str(&b);
        if !vocab.contains_key(&merged) || !seen.insert((ia, ib)) {
            continue;
        }
        out.push((a, b));
    }
    out
}

/// Merges for llama.cpp's `llm_tokenizer_spm`: any two adjacent symbols whose concatenation is
/// a token are merged, highest token score first (ties: leftmost). As a BPE merge list this is
/// every split `(left, right)` of every token text with both halves in the vocab, ranked by the
/// score of the whole token (transformers' `SentencePieceExtractor` does the same). Ties between
/// equal scores are ranked by token id then split position, so only two *overlapping*
/// candidates of equal score could order differently from llama.cpp's leftmost rule.
fn derive_spm_merges(
    texts: &[String],
    scores: &[f32],
    vocab: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    type Cand = (f32, u32, u32);
    fn order(a: &Cand, b: &Cand) -> std::cmp::Ordering {
        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
    }
    let candidates = |ids: std::ops::Range<usize>| -> Vec<Cand> {
        let mut cands = Vec::new();
        for id in ids {
            let t = &texts[id];
            for (k, _) in t.char_indices().skip(1) {
                if vocab.contains_key(&t[..k]) && vocab.contains_key(&t[k..]) {
                    cands.push((scores[id], id as u32, k as u32));
                }
            }
        }
        cands.sort_unstable_by(order);
        cands
    };
    let to_strings = |cands: &[Cand]| -> Vec<(String, String)> {
        cands
            .iter()
            .map(|&(_, id, k)| {
                let t = &texts[id as usize];
                let k = k as usize;
                (t[..k].to_string(), t[k..].to_string())
            })
            .collect()
    };
    // Two halves on two threads (a 262k vocab yields ~500k merges), then a linear merge.
    let n = texts.len();
    let (a, b) = join(|| candidates(0..n / 2), || candidates(n / 2..n));
    let mut cands = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if order(&a[i], &b[j]).is_le() {
            cands.push(a[i]);
            i += 1;
        } else {
            cands.push(b[j]);
            j += 1;
        }
    }
    cands.extend_from_slice(&a[i..]);
    cands.extend_from_slice(&b[j..]);
    let half = cands.len() / 2;
    let (mut first, second) = join(|| to_strings(&cands[..half]), || to_strings(&cands[half..]));
    first.extend(second);
    first
}

/// Runs two closures, the second on a scoped thread; a panic in either is propagated.
pub(crate) fn join<A: Send, B: Send>(
    fa: impl FnOnce() -> A + Send,
    fb: impl FnOnce() -> B + Send,
) -> (A, B) {
    std::thread::scope(|s| {
        let hb = s.spawn(fb);
        let a = fa();
        match hb.join() {
            Ok(b) => (a, b),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
