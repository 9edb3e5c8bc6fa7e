//! The tokenizer, built from GGUF metadata, with llama.cpp's token ids.
//!
//! [`GgufTokenizer::from_gguf`] reads `tokenizer.ggml.*`:
//!
//! * `tokenizer.ggml.model == "gpt2"`: byte-level BPE from `tokens` + `merges` in a HF
//!   [`tokenizers::Tokenizer`], pre-tokenized by the regex profile that `tokenizer.ggml.pre`
//!   names (copied from llama.cpp; an unknown name is an error).
//! * `tokenizer.ggml.model == "llama"`: llama.cpp's `llm_tokenizer_spm` (merges by token score),
//!   with `<0xXX>` byte fallback and `add_space_prefix`, by hand (`spm.rs` says why); its HF
//!   form is built only when asked for ([`GgufTokenizer::inner`]).
//!
//! Encoding follows llama.cpp's `llama_tokenize` exactly: special tokens are split out first
//! (`tokenizer_st_partition`: CONTROL/UNKNOWN tokens only with `parse_special`, USER_DEFINED
//! ones always, longest text first), each remaining text fragment goes through the HF
//! pre-tokenizer and model, and BOS/EOS are added when `add_special` is set and the model asks
//! for them. Decoding and [`GgufTokenizer::token_to_piece`] follow llama.cpp's
//! `token_to_piece`/`detokenize`.
//!
//! Two variants guard against hostile prompts: [`GgufTokenizer::encode_bounded`] refuses a text
//! that cannot fit a token budget without tokenizing it whole, and
//! [`GgufTokenizer::encode_with_text_spans`] treats chosen byte ranges (chat message content)
//! as plain text, so that special-token text typed by a user never becomes a special token.

mod hf;
mod pre;
mod spm;
mod stream;
mod vocab;

use std::ops::Range;

use aho_corasick::AhoCorasick;
use ember_formats::GgufFile;
use tokenizers::{Model as _, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

pub use pre::{pre_names_for_regexes, pre_tokenizer_regexes};
pub use stream::StreamDecoder;
pub use vocab::VocabKind;
use vocab::{Vocab, attr};

/// Errors building or using a [`GgufTokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required `tokenizer.ggml.*` key (named) is absent.
    #[error("GGUF metadata key '{0}' is missing")]
    MissingKey(&'static str),
    /// A `tokenizer.ggml.*` key holds a value of another type than the tokenizer needs.
    #[error("GGUF metadata key '{key}' has the wrong type (expected {expected})")]
    WrongType {
        /// The metadata key.
        key: &'static str,
        /// The type it must have, in words.
        expected: &'static str,
    },
    /// `tokenizer.ggml.model` names an algorithm other than `gpt2` or `llama`.
    #[error("unknown tokenizer model '{0}' (tokenizer.ggml.model); supported: gpt2, llama")]
    UnknownModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer llama.cpp does not know either.
    #[error("unknown pre-tokenizer type '{0}' (tokenizer.ggml.pre)")]
    UnknownPre(String),
    /// `tokenizer.ggml.pre` names a llama.cpp pre-tokenizer that Ember has not ported.
    #[error("pre-tokenizer type '{0}' (tokenizer.ggml.pre) is not supported by Ember")]
    UnsupportedPre(String),
    /// A per-token array (scores, token types) has fewer entries than there are tokens.
    #[error("'{key}' has {got} entries but the vocabulary has {n_tokens} tokens")]
    ArrayTooShort {
        /// The metadata key of the array.
        key: &'static str,
        /// Its number of entries.
        got: usize,
        /// The number of tokens (`tokenizer.ggml.tokens`).
        n_tokens: usize,
    },
    /// Two tokens have the same text, so text-to-id lookup would be ambiguous.
    #[error("token text {text:?} appears twice (ids {first} and {second})")]
    DuplicateToken {
        /// The repeated token text.
        text: String,
        /// The first id with that text.
        first: u32,
        /// The later id with that text.
        second: u32,
    },
    /// The vocabulary is inconsistent in some other way (message says how).
    #[error("bad vocabulary: {0}")]
    BadVocab(String),
    /// Encoding with `add_special` needs a BOS or EOS token (named) that the file lacks.
    #[error("the model asks for a {0} token but does not define one")]
    MissingSpecialToken(&'static str),
    /// The HF tokenizer (model, pre-tokenizer regexes, special-token matcher) could not be
    /// built.
    #[error("building the tokenizer failed: {0}")]
    Build(String),
    /// The HF model or pre-tokenizer failed on a piece of text.
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// A special-token id key (`tokenizer.ggml.bos_token_id`, ...) points outside the
    /// vocabulary.
    #[error(
        "GGUF metadata key '{key}' is {value} but the vocabulary has {n_tokens} tokens \
         (valid ids are 0..{n_tokens}); the model file is damaged"
    )]
    BadSpecialId {
        /// The metadata key.
        key: &'static str,
        /// The id it holds.
        value: i64,
        /// The number of tokens in the vocabulary.
        n_tokens: usize,
    },
    /// [`GgufTokenizer::encode_bounded`]: the text needs more tokens than allowed.
    #[error(
        "the text is too long: it needs at least {at_least} tokens but at most {max_tokens} fit; \
         shorten it or raise the context size"
    )]
    TooLong {
        /// A lower bound on the tokens the text needs, BOS/EOS included (tokenization
        /// stops, or never starts, once the budget is certainly passed).
        at_least: usize,
        /// The budget that was asked for.
        max_tokens: usize,
    },
}

/// How the text between special tokens becomes ids.
enum Model {
    /// Byte-level BPE: the HF tokenizer's pre-tokenizer and model (boxed: it is large, and
    /// the tokenizer is built once).
    Bpe(Box<tokenizers::Tokenizer>),
    /// SentencePiece-style: llama.cpp's algorithm, and the HF form once asked for.
    Spm(Box<SpmModel>),
}

struct SpmModel {
    spm: spm::Spm,
    hf: std::sync::OnceLock<Result<tokenizers::Tokenizer, String>>,
}

/// A tokenizer built from GGUF metadata whose ids match llama.cpp's.
pub struct GgufTokenizer {
    model: Model,
    kind: VocabKind,
    pre_name: Option<String>,
    pre_type: Option<&'static str>,
    texts: Vec<String>,
    attrs: Vec<u32>,
    /// llama.cpp's `cache_token_to_piece` (rendered with special = true), concatenated.
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<u32>,
    /// CONTROL / USER_DEFINED / UNKNOWN token ids, longest text first.
    special_cache: Vec<u32>,
    /// Finds which special-token texts occur in a prompt (pattern i = `special_cache[i]`).
    special_matcher: Option<AhoCorasick>,
    special: vocab::SpecialIds,
    /// Upper bound on the input bytes one token can cover (for the length pre-check).
    max_token_bytes: usize,
    /// Whether `ceil(bytes / max_token_bytes)` is a lower bound on the token count. Not when a
    /// special token eats surrounding whitespace (LSTRIP/RSTRIP: one token covers any number
    /// of bytes), nor when the vocabulary cannot spell every byte (the model then drops text).
    precheck: bool,
    /// Per byte value: whether it always ends up in some token (see `from_gguf`).
    spellable: [bool; 256],
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("kind", &self.kind)
            .field("pre", &self.pre_name)
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.special.bos)
            .field("eos", &self.special.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// A piece of the prompt after special-token partitioning: raw text (byte range) or a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// Sorts, clamps to `len` and merges byte ranges, dropping empty ones.
fn normalize_spans(spans: &[Range<usize>], len: usize) -> Vec<Range<usize>> {
    let mut v: Vec<Range<usize>> = spans
        .iter()
        .map(|r| r.start.min(len)..r.end.min(len))
        .filter(|r| r.start < r.end)
        .collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Whether `[start, end)` overlaps one of `spans` (sorted, disjoint, non-empty).
fn overlaps(spans: &[Range<usize>], start: usize, end: usize) -> bool {
    let i = spans.partition_point(|r| r.end <= start);
    spans.get(i).is_some_and(|r| r.start < end)
}

/// C `isspace` in the "C" locale.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// GPT-2 byte-level alphabet: byte -> char code.
fn byte_to_unicode() -> [u32; 256] {
    let mut map = [0u32; 256];
    let mut n = 0;
    for b in 0..256u32 {
        let direct = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        map[b as usize] = if direct {
            b
        } else {
            n += 1;
            255 + n
        };
    }
    map
}

/// llama.cpp's `llama_decode_text`: byte-level token text back to bytes.
fn byte_level_decode(text: &str, inverse: &[i16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match inverse.get(c as usize).copied() {
            Some(b) if b >= 0 => out.push(b as u8),
            _ => {
                // llama.cpp quirk: unmappable characters become "[UNK_BYTE_0x<hex><text>]".
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{byte:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// llama.cpp's `token_to_byte`: `strtol(text.substr(3, 2), 16)`.
fn byte_token_value(text: &str) -> u8 {
    let digits = text.as_bytes().get(3..).unwrap_or(&[]);
    let mut v: u32 = 0;
    for &d in digits.iter().take(2) {
        match (d as char).to_digit(16) {
            Some(x) => v = v * 16 + x,
            None => break,
        }
    }
    v as u8
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let mut v = Vocab::from_gguf(file)?;
        let index = std::mem::take(&mut v.index);
        let merges = std::mem::take(&mut v.merges);
        // The lookup tables are built on a second thread meanwhile.
        let (model, tables) = hf::join(
            || match v.kind {
                VocabKind::Bpe => hf::build_bpe(&v, hf::text_to_id(&v.texts), merges)
                    .map(|t| Model::Bpe(Box::new(t))),
                VocabKind::Spm => Ok(Model::Spm(Box::new(SpmModel {
                    spm: spm::Spm::new(&v.texts, index, &v.scores, v.special.unk)?,
                    hf: std::sync::OnceLock::new(),
                }))),
            },
            || Tables::new(&v),
        );
        let (model, tables) = (model?, tables?);
        // A token covers at most its vocabulary text's bytes (byte-level and `▁` escapes only
        // make the text longer than what it stands for); an unknown-token fallback covers one
        // character, at most 4 bytes.
        let max_token_bytes = v.texts.iter().map(String::len).max().unwrap_or(0).max(4);
        let has_strip_attr = v
            .attrs
            .iter()
            .any(|a| a & (attr::LSTRIP | attr::RSTRIP) != 0);
        // Bytes that become a token of their own when nothing merges them. A byte that
        // cannot is dropped (or folded into an unknown token) and may cover no token at all,
        // so the length pre-check counts only these.
        let byte_map = byte_to_unicode();
        let spellable: [bool; 256] = std::array::from_fn(|b| match &model {
            Model::Bpe(hf) => char::from_u32(byte_map[b]).is_some_and(|c| {
                hf.get_model()
                    .token_to_id(c.encode_utf8(&mut [0; 4]))
                    .is_some()
            }),
            Model::Spm(m) => v.special.unk.is_some() || m.spm.has_byte(b as u8),
        });
        Ok(GgufTokenizer {
            model,
            kind: v.kind,
            pre_name: v.pre_name,
            pre_type: v.pre.as_ref().map(|p| p.kind),
            texts: v.texts,
            attrs: v.attrs,
            piece_bytes: tables.piece_bytes,
            piece_offsets: tables.piece_offsets,
            special_cache: tables.special_cache,
            special_matcher: tables.special_matcher,
            special: v.special,
            max_token_bytes,
            precheck: !has_strip_attr,
            spellable,
            eog: v.eog,
            add_bos: v.add_bos,
            add_eos: v.add_eos,
            add_space_prefix: v.add_space_prefix,
            clean_spaces: v.clean_spaces,
        })
    }
}

/// Lookup tables derived from the vocab.
struct Tables {
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<u32>,
    special_cache: Vec<u32>,
    special_matcher: Option<AhoCorasick>,
}

impl Tables {
    fn new(v: &Vocab) -> Result<Tables, TokenizerError> {
        let n = v.texts.len();
        // Piece cache (llama.cpp `token_to_piece(id, special = true)`).
        let inverse = {
            let mut inv = vec![-1i16; 324];
            for (b, &c) in byte_to_unicode().iter().enumerate() {
                inv[c as usize] = b as i16;
            }
            inv
        };
        let mut piece_bytes = Vec::with_capacity(n * 6);
        let mut piece_offsets = Vec::with_capacity(n + 1);
        piece_offsets.push(0u32);
        for (t, &a) in v.texts.iter().zip(v.attrs.iter()) {
            if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
                piece_bytes.extend_from_slice(t.as_bytes());
            } else if a & attr::NORMAL != 0 {
                match v.kind {
                    VocabKind::Spm => {
                        piece_bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes())
                    }
                    VocabKind::Bpe => piece_bytes.extend(byte_level_decode(t, &inverse)),
                }
            } else if a & attr::BYTE != 0 {
                piece_bytes.push(byte_token_value(t));
            }
            let off = u32::try_from(piece_bytes.len())
                .map_err(|_| TokenizerError::BadVocab("token texts exceed 4 GiB".into()))?;
            piece_offsets.push(off);
        }

        // Special-token cache: llama.cpp sorts by text length, descending, with an unstable
        // std::sort; we use a stable order (length desc, then id) so equal-length tokens are
        // tried in id order.
        let mut special_cache: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                v.attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        special_cache.sort_by(|&a, &b| {
            v.texts[b as usize]
                .len()
                .cmp(&v.texts[a as usize].len())
                .then(a.cmp(&b))
        });
        let special_matcher = if special_cache.is_empty() {
            None
        } else {
            let pats = special_cache.iter().map(|&i| v.texts[i as usize].as_str());
            Some(AhoCorasick::new(pats).map_err(|e| TokenizerError::Build(e.to_string()))?)
        };
        Ok(Tables {
            piece_bytes,
            piece_offsets,
            special_cache,
            special_matcher,
        })
    }
}

impl GgufTokenizer {
    /// The vocabulary as a HF tokenizer (model, normalizer, pre-tokenizer, decoder, added
    /// tokens), e.g. to write it as tokenizer.json. For a SentencePiece-style vocab it is
    /// built on the first call (a BPE model with merges derived from the scores: about half a
    /// second for a 262k vocab), which is when building it can fail. Its own `encode` matches
    /// llama.cpp except in rare special-token overlaps (and, for SPM, characters outside the
    /// vocab); use [`GgufTokenizer::encode`] for llama.cpp-exact ids and BOS/EOS handling.
    pub fn inner(&self) -> Result<&tokenizers::Tokenizer, TokenizerError> {
        match &self.model {
            Model::Bpe(hf) => Ok(hf),
            Model::Spm(m) => {
                m.hf.get_or_init(|| {
                    hf::build_spm(&hf::SpmParts {
                        texts: &self.texts,
                        attrs: &self.attrs,
                        scores: m.spm.scores(),
                        unk: self.special.unk,
                        add_space_prefix: self.add_space_prefix,
                    })
                    .map_err(|e| match e {
                        // Kept as its message, so that the error is not wrapped twice.
                        TokenizerError::Build(message) => message,
                        other => other.to_string(),
                    })
                })
                .as_ref()
                .map_err(|message| TokenizerError::Build(message.clone()))
            }
        }
    }

    /// SPM or BPE.
    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// `tokenizer.ggml.pre`, if the file has one.
    pub fn pre(&self) -> Option<&str> {
        self.pre_name.as_deref()
    }

    /// The pre-tokenizer profile in use (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` name, e.g.
    /// `"SMOLLM"`); `None` for SPM vocabularies.
    pub fn pre_type(&self) -> Option<&'static str> {
        self.pre_type
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// Beginning-of-sequence token: `tokenizer.ggml.bos_token_id`, else llama.cpp's default for
    /// the tokenizer model (1 for SPM); `None` when the model has none.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    /// End-of-sequence token: `tokenizer.ggml.eos_token_id`, else llama.cpp's default for the
    /// tokenizer model (2 for SPM).
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    /// End-of-turn token (metadata, else llama.cpp's by-text detection).
    pub fn eot_id(&self) -> Option<u32> {
        self.special.eot
    }

    /// End-of-message token (`tokenizer.ggml.eom_token_id`, else found by text, e.g. Llama
    /// 3.1's `<|eom_id|>`).
    pub fn eom_id(&self) -> Option<u32> {
        self.special.eom
    }

    /// Unknown token (`tokenizer.ggml.unknown_token_id`; 0 by default for SPM), which stands
    /// for text the vocabulary cannot spell.
    pub fn unk_id(&self) -> Option<u32> {
        self.special.unk
    }

    /// Padding token (`tokenizer.ggml.padding_token_id`), if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether generation stops at this token (llama.cpp's `special_eog_ids`).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether the token is a CONTROL token (BOS, EOS, `<|im_start|>`, ...).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// The token's text as stored in the vocabulary (byte-level or `▁`-escaped).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The id of a token text (exact vocabulary text).
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        match &self.model {
            Model::Bpe(hf) => hf.get_model().token_to_id(text),
            Model::Spm(m) => m.spm.id(&self.texts, text),
        }
    }

    /// The raw bytes a token stands for (special tokens rendered as their text). May be a
    /// partial UTF-8 character; see [`StreamDecoder`].
    pub fn token_to_piece(&self, id: u32) -> Vec<u8> {
        self.piece(id, true).to_vec()
    }

    /// llama.cpp `token_to_piece(id, special)`: with `special == false`, CONTROL and UNKNOWN
    /// tokens render as nothing. Unknown ids render as nothing.
    pub fn piece(&self, id: u32, special: bool) -> &[u8] {
        let i = id as usize;
        let Some(&a) = self.attrs.get(i) else {
            return &[];
        };
        if !special && a & (attr::UNKNOWN | attr::CONTROL) != 0 {
            return &[];
        }
        let (s, e) = (
            self.piece_offsets[i] as usize,
            self.piece_offsets[i + 1] as usize,
        );
        &self.piece_bytes[s..e]
    }

    /// A [`StreamDecoder`] for this tokenizer.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder {
        StreamDecoder::new(skip_special)
    }

    /// Tokenizes like llama.cpp's `llama_tokenize(text, add_special, parse_special)`.
    ///
    /// `add_special` adds BOS (and EOS) if the model's `add_bos_token` (`add_eos_token`) says
    /// so; `parse_special` lets CONTROL tokens written in the text (`<|im_start|>`) become their
    /// ids. USER_DEFINED tokens are always split out, as in llama.cpp.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_impl(text, add_special, parse_special, &[], None)
    }

    /// [`GgufTokenizer::encode`] with a token budget: the same ids when they number at most
    /// `max_tokens` (BOS/EOS included), else [`TokenizerError::TooLong`].
    ///
    /// A text of `n` bytes needs at least `n / L` tokens, `L` being the most bytes one token
    /// covers, so a text far over budget is refused without tokenizing it; otherwise
    /// tokenization stops at the first pre-token that goes over. Work and memory are bounded by
    /// `max_tokens`, not by the length of the text.
    pub fn encode_bounded(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_impl(text, add_special, parse_special, &[], Some(max_tokens))
    }

    /// Tokenizes a prompt whose `text_spans` (byte ranges, e.g. chat message content) are
    /// plain text: CONTROL/UNKNOWN tokens (`<|im_start|>`, `<end_of_turn>`, ...) are parsed
    /// only outside them, so text a user typed can never become one. Inside the spans the text
    /// is tokenized like `encode(.., parse_special = false)` (USER_DEFINED tokens are still
    /// split out, as llama.cpp does for raw text). Fragments are not cut at span edges, so a
    /// text whose spans hold no special-token text gives exactly `encode(text, add_special,
    /// true)`. Ranges that are out of bounds are clamped; they may overlap and be unsorted.
    pub fn encode_with_text_spans(
        &self,
        text: &str,
        add_special: bool,
        text_spans: &[Range<usize>],
    ) -> Result<Vec<u32>, TokenizerError> {
        let spans = normalize_spans(text_spans, text.len());
        self.encode_impl(text, add_special, true, &spans, None)
    }

    /// [`GgufTokenizer::encode_with_text_spans`] with the token budget of
    /// [`GgufTokenizer::encode_bounded`].
    pub fn encode_with_text_spans_bounded(
        &self,
        text: &str,
        add_special: bool,
        text_spans: &[Range<usize>],
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        let spans = normalize_spans(text_spans, text.len());
        self.encode_impl(text, add_special, true, &spans, Some(max_tokens))
    }

    /// The text of the first CONTROL or UNKNOWN token (those `parse_special` turns into
    /// tokens) that occurs in `s`, if any.
    pub fn find_control_text<'a>(&'a self, s: &str) -> Option<&'a str> {
        let matcher = self.special_matcher.as_ref()?;
        matcher.find_overlapping_iter(s).find_map(|m| {
            let id = self.special_cache[m.pattern().as_usize()];
            (self.attrs[id as usize] & (attr::CONTROL | attr::UNKNOWN) != 0)
                .then(|| self.texts[id as usize].as_str())
        })
    }

    /// The most input bytes a single token can stand for (the divisor of the length
    /// pre-check of [`GgufTokenizer::encode_bounded`]).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// `spans` must be sorted, disjoint and non-empty (see [`normalize_spans`]).
    fn encode_impl(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
        spans: &[Range<usize>],
        max_tokens: Option<usize>,
    ) -> Result<Vec<u32>, TokenizerError> {
        let n_added =
            usize::from(add_special && self.add_bos) + usize::from(add_special && self.add_eos);
        if let Some(max) = max_tokens
            && self.precheck
        {
            // Every spellable byte lies in exactly one token and a token covers at most
            // `max_token_bytes` bytes: a lower bound that needs one table lookup per byte.
            let covered = text.bytes().filter(|&b| self.spellable[b as usize]).count();
            let at_least = covered.div_ceil(self.max_token_bytes) + n_added;
            if at_least > max {
                return Err(TokenizerError::TooLong {
                    at_least,
                    max_tokens: max,
                });
            }
        }
        // `out` holds BOS and the tokens so far; EOS comes last. Stop once the budget is passed.
        let n_eos = usize::from(add_special && self.add_eos);
        let limit = max_tokens.map_or(usize::MAX, |m| m.saturating_sub(n_eos));
        let too_long = |got: usize| TokenizerError::TooLong {
            at_least: got + n_eos,
            max_tokens: max_tokens.unwrap_or(0),
        };
        let frags = self.partition(text, parse_special, spans);
        let mut out = Vec::with_capacity((text.len() / 3).min(limit) + 2);
        if add_special && self.add_bos {
            out.push(
                self.special
                    .bos
                    .ok_or(TokenizerError::MissingSpecialToken("BOS"))?,
            );
        }
        match &self.model {
            Model::Spm(m) => {
                // llama.cpp: a raw fragment gets a leading space when add_space_prefix is set
                // and it follows a special token or starts the text.
                let mut is_prev_special = true;
                let mut buf = String::new();
                for f in frags {
                    match f {
                        Fragment::Text(s, e) => {
                            buf.clear();
                            if self.add_space_prefix && is_prev_special {
                                buf.push('\u{2581}');
                            }
                            for c in text[s..e].chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            m.spm.tokenize(&self.texts, &buf, &mut out)?;
                            is_prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            is_prev_special = true;
                        }
                    }
                    if out.len() > limit {
                        return Err(too_long(out.len()));
                    }
                }
            }
            Model::Bpe(hf) => {
                for f in frags {
                    match f {
                        Fragment::Text(s, e) => {
                            Self::bpe_tokenize(hf, &text[s..e], &mut out, limit)?
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                    if out.len() > limit {
                        return Err(too_long(out.len()));
                    }
                }
            }
        }
        // `limit` already leaves room for EOS, but a budget smaller than EOS alone (0 with
        // an empty text) leaves none: compare against the budget itself.
        if out.len() > limit || max_tokens.is_some_and(|m| out.len() + n_eos > m) {
            return Err(too_long(out.len()));
        }
        if add_special && self.add_eos {
            out.push(
                self.special
                    .eos
                    .ok_or(TokenizerError::MissingSpecialToken("EOS"))?,
            );
        }
        Ok(out)
    }

    /// The BPE model's ids of one pre-token.
    fn model_tokenize(
        hf: &tokenizers::Tokenizer,
        s: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let toks = hf
            .get_model()
            .tokenize(s)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        out.extend(toks.iter().map(|t| t.id));
        Ok(())
    }

    /// Stops early (leaving `out` longer than `limit`) once `limit` is passed.
    fn bpe_tokenize(
        hf: &tokenizers::Tokenizer,
        s: &str,
        out: &mut Vec<u32>,
        limit: usize,
    ) -> Result<(), TokenizerError> {
        let mut pts = PreTokenizedString::from(s);
        if let Some(pre) = hf.get_pre_tokenizer() {
            pre.pre_tokenize(&mut pts)
                .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        }
        for (word, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::None) {
            Self::model_tokenize(hf, word, out)?;
            if out.len() > limit {
                break;
            }
        }
        Ok(())
    }

    /// llama.cpp's `tokenizer_st_partition`: for each special token, longest text first, split
    /// every raw fragment at each (leftmost, non-overlapping) occurrence of its text. Tokens
    /// that do not occur in `text` at all are skipped up front (a pure speed-up: fragments are
    /// substrings of `text`).
    ///
    /// A CONTROL/UNKNOWN match that overlaps one of `spans` (sorted, disjoint) stays text; the
    /// next occurrence is then looked for one character further on.
    fn partition(&self, text: &str, parse_special: bool, spans: &[Range<usize>]) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        let Some(matcher) = &self.special_matcher else {
            return frags;
        };
        let mut present = vec![false; self.special_cache.len()];
        let mut any = false;
        for m in matcher.find_overlapping_iter(text) {
            present[m.pattern().as_usize()] = true;
            any = true;
        }
        if !any {
            return frags;
        }
        let bytes = text.as_bytes();
        for (k, &id) in self.special_cache.iter().enumerate() {
            if !present[k] {
                continue;
            }
            let a = self.attrs[id as usize];
            // Control and unknown tokens are plain text unless parse_special; user-defined
            // tokens are always split out.
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let guarded = a & (attr::CONTROL | attr::UNKNOWN) != 0 && !spans.is_empty();
            let tok = self.texts[id as usize].as_str();
            // Step past a refused match by the token's first character (keeps char boundaries).
            let step = tok.chars().next().map_or(1, char::len_utf8);
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(mut s, e) = f else {
                    next.push(f);
                    continue;
                };
                let mut from = s;
                loop {
                    let Some(rel) = text[from..e].find(tok) else {
                        next.push(Fragment::Text(s, e));
                        break;
                    };
                    let m = from + rel;
                    if guarded && overlaps(spans, m, m + tok.len()) {
                        from = m + step;
                        continue;
                    }
                    if m > s {
                        let mut left_end = m;
                        if a & attr::LSTRIP != 0 {
                            while left_end > s && c_isspace(bytes[left_end - 1]) {
                                left_end -= 1;
                            }
                        }
                        if left_end > s {
                            next.push(Fragment::Text(s, left_end));
                        }
                    }
                    next.push(Fragment::Token(id));
                    let mut r = m + tok.len();
                    if r >= e {
                        break;
                    }
                    if a & attr::RSTRIP != 0 {
                        while r < e && c_isspace(bytes[r]) {
                            r += 1;
                        }
                    }
                    if r >= e {
                        break;
                    }
                    s = r;
                    from = r;
                }
            }
            frags = next;
        }
        frags
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD).
    ///
    /// `skip_special == true` is llama.cpp's `detokenize(remove_special = true,
    /// unparse_special = false)`: a leading BOS / trailing EOS that the model adds is removed
    /// and CONTROL tokens render as nothing. `false` renders every token's text. With
    /// `add_space_prefix` vocabularies the first piece's leading space is dropped, unless a BOS
    /// was removed first (llama.cpp quirk, kept for parity).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }

    /// [`GgufTokenizer::decode`] as raw bytes.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        self.detokenize(ids, skip_special, !skip_special)
    }

    /// llama.cpp's `llama_vocab::impl::detokenize`.
    fn detokenize(&self, mut ids: &[u32], remove_special: bool, unparse_special: bool) -> Vec<u8> {
        let mut remove_space = self.add_space_prefix;
        if remove_special
            && self.add_bos
            && let Some((&first, rest)) = ids.split_first()
            && Some(first) == self.special.bos
        {
            remove_space = false;
            ids = rest;
        }
        if remove_special
            && self.add_eos
            && let Some((&last, rest)) = ids.split_last()
            && Some(last) == self.special.eos
        {
            ids = rest;
        }
        let mut text = Vec::new();
        for &id in ids {
            let mut piece = self.piece(id, unparse_special);
            // lstrip = 1: at most one leading space of the first piece is dropped.
            if remove_space && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            remove_space = false;
            text.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_spaces(&mut text);
        }
        text
    }
}

/// llama.cpp's `clean_spaces` post-processing of `detokenize`, ported literally (three
/// in-place passes over the bytes, including its quirk of writing NUL into the buffer).
fn clean_spaces(text: &mut Vec<u8>) {
    // first pass: " ?", " !", " .", " ,"
    let total1 = text.len();
    let mut total = usize::from(total1 > 0);
    for i in 1..total1 {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }
    // second pass: strip single apostrophe between spaces
    let total2 = total;
    total = usize::from(total2 > 0);
    let mut i = 1;
    while i < total2 {
        let x = text[i];
        if x == b'\'' && i + 1 < total2 && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }
    // third pass: apostrophe contractions
    let total3 = total;
    total = usize::from(total3 > 0);
    for i in 1..total3 {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < total3 {
            let x1 = text[i + 1];
            if x1 == b't' || x1 == b'd' {
                // " 't", " 'd": kept
            } else if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if i + 2 < total3 {
                let x2 = text[i + 2];
                if matches!((x1, x2), (b'r', b'e') | (b'v', b'e')) {
                    total -= 1;
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

#[cfg(test)]
mod tests;
