//! Reads the tokenizer metadata of a GGUF file into a [`Vocab`]: a port of the parts of
//! llama.cpp's `llama_vocab::impl::load` (src/llama-vocab.cpp) that decide token attributes,
//! special token ids, the end-of-generation set and the add-BOS/EOS flags.

use std::hash::BuildHasher;

use ember_formats::{GgufFile, MetaValue};

use super::TokenizerError;
use super::pre::{self, PreProfile};

/// Token attributes, same bits as llama.cpp's `llama_token_attr`.
pub(crate) mod attr {
    pub const UNDEFINED: u32 = 0;
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
    pub const LSTRIP: u32 = 1 << 7;
    pub const RSTRIP: u32 = 1 << 8;
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// Which tokenizer algorithm the vocabulary uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// `tokenizer.ggml.model == "llama"`: SentencePiece-style, merge-by-score with byte fallback.
    Spm,
    /// `tokenizer.ggml.model == "gpt2"`: byte-level BPE with a regex pre-tokenizer.
    Bpe,
}

/// Special token ids (llama.cpp's `special_*_id`; `None` is `LLAMA_TOKEN_NULL`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

/// Everything the tokenizer needs from the metadata, llama.cpp-normalised.
pub(crate) struct Vocab {
    pub kind: VocabKind,
    pub pre_name: Option<String>,
    pub pre: Option<PreProfile>,
    pub texts: Vec<String>,
    /// Text -> id (llama.cpp's `token_to_id`).
    pub index: TextIndex,
    pub scores: Vec<f32>,
    pub attrs: Vec<u32>,
    /// BPE merges in rank order (gpt2 only), as `(left, right)`.
    pub merges: Vec<(String, String)>,
    pub special: SpecialIds,
    /// Sorted, deduplicated end-of-generation ids.
    pub eog: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub clean_spaces: bool,
    pub ignore_merges: bool,
}

/// Text -> id over the vocabulary's own texts (llama.cpp's `token_to_id`): ids in a table
/// hashed by their text, so that no text is stored twice. (A `HashMap<String, u32>` of Gemma
/// 3's 262k tokens took about 18 MB beside the texts.)
#[derive(Default)]
pub(crate) struct TextIndex {
    table: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl TextIndex {
    /// The index of `texts`, or [`TokenizerError::DuplicateToken`] for a text that appears
    /// twice.
    pub fn new(texts: &[String]) -> Result<Self, TokenizerError> {
        let hasher = hashbrown::DefaultHashBuilder::default();
        let mut table = hashbrown::HashTable::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            let h = hasher.hash_one(t.as_str());
            match table.entry(
                h,
                |&j: &u32| texts[j as usize] == *t,
                |&j: &u32| hasher.hash_one(texts[j as usize].as_str()),
            ) {
                hashbrown::hash_table::Entry::Occupied(e) => {
                    return Err(TokenizerError::DuplicateToken {
                        text: t.clone(),
                        first: *e.get(),
                        second: i as u32,
                    });
                }
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(i as u32);
                }
            }
        }
        Ok(TextIndex { table, hasher })
    }

    /// The id of `text` among `texts` (the texts the index was built from).
    pub fn get(&self, texts: &[String], text: &str) -> Option<u32> {
        let h = self.hasher.hash_one(text);
        self.table
            .find(h, |&j| texts.get(j as usize).is_some_and(|t| t == text))
            .copied()
    }
}

/// Accessor for one of the [`SpecialIds`] fields.
type IdSlot = fn(&mut SpecialIds) -> &mut Option<u32>;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

fn wrong_type(key: &'static str, expected: &'static str) -> TokenizerError {
    TokenizerError::WrongType { key, expected }
}

fn opt_str<'a>(f: &'a GgufFile, key: &'static str) -> Result<Option<&'a str>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or(wrong_type(key, "string")),
    }
}

fn opt_bool(f: &GgufFile, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or(wrong_type(key, "bool")),
    }
}

/// An optional token-id key (any integer type). An id outside the vocabulary is an error
/// naming the key: llama.cpp warns and falls back to a default, but such a file is damaged and
/// a wrong BOS/EOS silently changes every prompt and where generation stops.
fn opt_id(f: &GgufFile, key: &'static str, n_tokens: usize) -> Result<Option<u32>, TokenizerError> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => match v.as_integer() {
            Some(i) => match u32::try_from(i) {
                Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
                _ => Err(TokenizerError::BadSpecialId {
                    key,
                    value: i64::try_from(i).unwrap_or(if i < 0 { i64::MIN } else { i64::MAX }),
                    n_tokens,
                }),
            },
            None => Err(wrong_type(key, "integer")),
        },
    }
}

impl Vocab {
    pub(crate) fn from_gguf(f: &GgufFile) -> Result<Vocab, TokenizerError> {
        let model = opt_str(f, KEY_MODEL)?.ok_or(TokenizerError::MissingKey(KEY_MODEL))?;
        let pre_name = opt_str(f, KEY_PRE)?;

        let mut special = SpecialIds::default();
        let kind;
        let mut pre_prof = None;
        let (mut add_bos, mut add_eos, mut add_space_prefix, clean_spaces, ignore_merges);
        match model {
            "llama" => {
                kind = VocabKind::Spm;
                special.bos = Some(1);
                special.eos = Some(2);
                special.unk = Some(0);
                add_space_prefix = true;
                clean_spaces = false;
                add_bos = true;
                add_eos = false;
                ignore_merges = false;
            }
            "gpt2" => {
                kind = VocabKind::Bpe;
                special.bos = Some(11);
                special.eos = Some(11);
                let prof = pre::resolve(pre_name)?;
                add_space_prefix = false;
                clean_spaces = prof.clean_spaces;
                add_bos = prof.add_bos;
                add_eos = false;
                ignore_merges = prof.ignore_merges;
                if prof.no_default_bos {
                    special.bos = None;
                }
                pre_prof = Some(prof);
            }
            other => return Err(TokenizerError::UnknownModel(other.to_string())),
        }
        if let Some(v) = opt_bool(f, "tokenizer.ggml.add_space_prefix")? {
            add_space_prefix = v;
        }

        // ---- tokens, scores, types
        let tokens = match f.get(KEY_TOKENS) {
            None => return Err(TokenizerError::MissingKey(KEY_TOKENS)),
            Some(MetaValue::Array(a)) => a
                .as_strings()
                .ok_or(wrong_type(KEY_TOKENS, "string array"))?,
            Some(_) => return Err(wrong_type(KEY_TOKENS, "string array")),
        };
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(TokenizerError::BadVocab(format!("{n} tokens")));
        }
        let scores = match f.get(KEY_SCORES) {
            None => vec![0.0; n],
            Some(v) => {
                let s = v
                    .as_array()
                    .and_then(|a| a.to_f32_vec())
                    .ok_or(wrong_type(KEY_SCORES, "f32/i32 array"))?;
                if s.len() < n {
                    return Err(TokenizerError::ArrayTooShort {
                        key: KEY_SCORES,
                        got: s.len(),
                        n_tokens: n,
                    });
                }
                s
            }
        };
        let types = match f.get(KEY_TYPES) {
            None => None,
            Some(v) => {
                let t = v
                    .as_array()
                    .and_then(|a| a.to_i32_vec())
                    .ok_or(wrong_type(KEY_TYPES, "i32 array"))?;
                if t.len() < n {
                    return Err(TokenizerError::ArrayTooShort {
                        key: KEY_TYPES,
                        got: t.len(),
                        n_tokens: n,
                    });
                }
                Some(t)
            }
        };

        // llama.cpp quirk: an empty token text is replaced by "[EMPTY_<id>]".
        let text_of = |i: usize, word: &str| {
            if word.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                word.to_string()
            }
        };
        let mut texts = Vec::with_capacity(n);
        let mut attrs = Vec::with_capacity(n);
        for (i, word) in tokens.iter().enumerate() {
            texts.push(text_of(i, word));
            attrs.push(match types.as_ref().map(|t| t[i]) {
                None => attr::NORMAL,
                Some(token_type::NORMAL) => attr::NORMAL,
                Some(token_type::UNKNOWN) => attr::UNKNOWN,
                Some(token_type::CONTROL) => attr::CONTROL,
                Some(token_type::USER_DEFINED) => attr::USER_DEFINED,
                Some(token_type::UNUSED) => attr::UNUSED,
                Some(token_type::BYTE) => attr::BYTE,
                Some(_) => attr::UNDEFINED,
            });
        }
        // llama.cpp asserts id_to_token.size() == token_to_id.size().
        let index = TextIndex::new(&texts)?;
        let scores = scores[..n].to_vec();

        // ---- merges (gpt2)
        let mut merges = Vec::new();
        if kind == VocabKind::Bpe {
            let arr = match f.get(KEY_MERGES) {
                None => return Err(TokenizerError::MissingKey(KEY_MERGES)),
                Some(MetaValue::Array(a)) => a
                    .as_strings()
                    .ok_or(wrong_type(KEY_MERGES, "string array"))?,
                Some(_) => return Err(wrong_type(KEY_MERGES, "string array")),
            };
            merges.reserve(arr.len());
            for word in arr.iter() {
                // llama.cpp splits at the first space at byte index >= 1.
                let Some(pos) = word.as_bytes().iter().skip(1).position(|&b| b == b' ') else {
                    continue;
                };
                let pos = pos + 1;
                merges.push((word[..pos].to_string(), word[pos + 1..].to_string()));
            }
        }

        // ---- special token ids from metadata
        let n32 = n as u32;
        let id_keys: [(&'static str, IdSlot); 17] = [
            ("tokenizer.ggml.bos_token_id", |s| &mut s.bos),
            ("tokenizer.ggml.eos_token_id", |s| &mut s.eos),
            ("tokenizer.ggml.eot_token_id", |s| &mut s.eot),
            ("tokenizer.ggml.eom_token_id", |s| &mut s.eom),
            ("tokenizer.ggml.unknown_token_id", |s| &mut s.unk),
            ("tokenizer.ggml.seperator_token_id", |s| &mut s.sep),
            ("tokenizer.ggml.padding_token_id", |s| &mut s.pad),
            ("tokenizer.ggml.mask_token_id", |s| &mut s.mask),
            ("tokenizer.ggml.fim_pre_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.fim_suf_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.fim_mid_token_id", |s| &mut s.fim_mid),
            ("tokenizer.ggml.fim_pad_token_id", |s| &mut s.fim_pad),
            ("tokenizer.ggml.fim_rep_token_id", |s| &mut s.fim_rep),
            ("tokenizer.ggml.fim_sep_token_id", |s| &mut s.fim_sep),
            // deprecated keys
            ("tokenizer.ggml.prefix_token_id", |s| &mut s.fim_pre),
            ("tokenizer.ggml.suffix_token_id", |s| &mut s.fim_suf),
            ("tokenizer.ggml.middle_token_id", |s| &mut s.fim_mid),
        ];
        for (key, slot) in id_keys {
            let id = slot(&mut special);
            // Default ids outside the vocab are disabled.
            if id.is_some_and(|v| v >= n32) {
                *id = None;
            }
            if let Some(v) = opt_id(f, key, n)? {
                *id = Some(v);
            }
        }
        if let Some(v) = opt_bool(f, "tokenizer.ggml.add_bos_token")? {
            add_bos = v;
        }
        if let Some(v) = opt_bool(f, "tokenizer.ggml.add_eos_token")? {
            add_eos = v;
        }

        let mut vocab = Vocab {
            kind,
            pre_name: pre_name.map(str::to_string),
            pre: pre_prof,
            texts,
            index,
            scores,
            attrs,
            merges,
            special,
            eog: Vec::new(),
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            ignore_merges,
        };
        vocab.detect_special_tokens();
        vocab.set_per_model_attrs(
            opt_str(f, "general.name")?.unwrap_or(""),
            pre_name.unwrap_or(""),
            opt_str(f, "general.architecture")?.unwrap_or(""),
        );
        Ok(vocab)
    }

    fn find(&self, text: &str) -> Option<u32> {
        self.index.get(&self.texts, text)
    }

    /// llama.cpp's "auto-detect special tokens by text" workaround, the unused-token detection,
    /// the EOG list and its sanity fixes, in llama.cpp's order.
    fn detect_special_tokens(&mut self) {
        // Candidates are looked up by text once, in list order. llama.cpp walks an
        // unordered_map and takes the first hit, so when a vocab holds several candidates its
        // choice is unspecified; we take the first in llama.cpp's list.
        const EOT: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<｜end▁of▁sentence｜>",
            "<end_of_utterance>",
        ];
        const EOM: &[&str] = &["<|eom_id|>"];
        const FIM_PRE: &[&str] = &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ];
        const FIM_SUF: &[&str] = &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ];
        const FIM_MID: &[&str] = &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ];
        const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
        const FIM_REP: &[&str] = &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ];
        const FIM_SEP: &[&str] = &["<|file_sep|>"];
        const EOG: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<|flush|>",
            "<|calls|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "</s>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "[EOS]",
            "<|end_of_text|>",
            "<end_of_utterance>",
            "<eos>",
            "<turn|>",
            "<|tool_response>",
            "<｜end▁of▁sentence｜>",
            "[e~[",
        ];

        // Auto-detected tokens that are not CONTROL get CONTROL added (llama.cpp:
        // "control-looking token ... its type will be overridden").
        let lists: [(&[&str], IdSlot); 8] = [
            (EOT, |s| &mut s.eot),
            (EOM, |s| &mut s.eom),
            (FIM_PRE, |s| &mut s.fim_pre),
            (FIM_SUF, |s| &mut s.fim_suf),
            (FIM_MID, |s| &mut s.fim_mid),
            (FIM_PAD, |s| &mut s.fim_pad),
            (FIM_REP, |s| &mut s.fim_rep),
            (FIM_SEP, |s| &mut s.fim_sep),
        ];
        for (names, slot) in lists {
            if slot(&mut self.special).is_some() {
                continue;
            }
            if let Some(id) = names.iter().find_map(|t| self.find(t)) {
                *slot(&mut self.special) = Some(id);
                self.attrs[id as usize] |= attr::CONTROL;
            }
        }

        // Control tokens whose text contains "unused" are marked UNUSED.
        for (t, a) in self.texts.iter().zip(self.attrs.iter_mut()) {
            if *a & attr::CONTROL != 0 && t.contains("unused") {
                *a |= attr::UNUSED;
            }
        }

        let mut eog: Vec<u32> = Vec::new();
        let s = self.special;
        eog.extend(s.fim_pad);
        eog.extend(s.fim_rep);
        eog.extend(s.fim_sep);
        for name in EOG {
            if let Some(id) = self.find(name) {
                eog.push(id);
                self.attrs[id as usize] |= attr::CONTROL;
            }
        }
        // llama.cpp hack for gpt-oss: these are always rendered (USER_DEFINED).
        for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(id) = self.find(name) {
                self.attrs[id as usize] = attr::USER_DEFINED;
            }
        }
        eog.extend(s.eos);
        eog.extend(s.eot);
        eog.extend(s.eom);
        eog.retain(|&id| (id as usize) < self.texts.len());
        eog.sort_unstable();
        eog.dedup();

        // llama.cpp workaround (o200k_harmony / solar-open): "<|end|>" is not EOG when
        // "<|return|>"+"<|call|>" or "<|calls|>"+"<|flush|>" are present.
        let has = |eog: &[u32], name: &str| eog.iter().any(|&i| self.texts[i as usize] == name);
        let has_return = has(&eog, "<|return|>");
        let has_call = has(&eog, "<|call|>") || has(&eog, "<|calls|>");
        let has_flush = has(&eog, "<|flush|>");
        if let Some(end_id) = eog
            .iter()
            .copied()
            .find(|&i| self.texts[i as usize] == "<|end|>")
            && has_call
            && (has_return || has_flush)
        {
            eog.retain(|&i| i != end_id);
            self.attrs[end_id as usize] = attr::USER_DEFINED;
        }
        // llama.cpp: gemma4 / plamo have a normal "</s>".
        let normal_s_marker = has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>");
        if normal_s_marker
            && let Some(s_id) = eog
                .iter()
                .copied()
                .find(|&i| self.texts[i as usize] == "</s>")
        {
            eog.retain(|&i| i != s_id);
            self.attrs[s_id as usize] = attr::NORMAL;
        }
        self.eog = eog;
    }

    /// llama.cpp's per-model LSTRIP/RSTRIP attributes ("Handle per token attributes").
    fn set_per_model_attrs(&mut self, model_name: &str, pre: &str, arch: &str) {
        let model_name = model_name.to_ascii_lowercase();
        let any = |s: &str, subs: &[&str]| subs.iter().any(|x| s.contains(x));
        if any(pre, &["jina-v2-de", "jina-v2-es", "jina-v2-code"])
            || any(arch, &["nomic-bert-moe", "jina-bert-v3"])
        {
            if let Some(id) = self.find("<mask>") {
                self.attrs[id as usize] |= attr::LSTRIP;
            }
        } else if any(&model_name, &["phi-3", "phi3"]) {
            for a in self.attrs.iter_mut() {
                if *a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0 {
                    *a |= attr::RSTRIP;
                }
            }
            if let Some(id) = self.find("</s>") {
                self.attrs[id as usize] |= attr::RSTRIP;
            }
            for name in ["<unk>", "<s>", "<|endoftext|>"] {
                if let Some(id) = self.find(name) {
                    self.attrs[id as usize] &= !attr::RSTRIP;
                }
            }
        } else if model_name.contains("modern-bert")
            && let Some(id) = self.find("[MASK]")
        {
            self.attrs[id as usize] |= attr::LSTRIP;
        }
    }
}
