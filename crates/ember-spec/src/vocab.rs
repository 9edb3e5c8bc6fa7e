//! A draft model must have the target's vocabulary, token for token: the acceptance rule
//! compares the two models' probabilities of the same token id, and drafted ids are fed to
//! the target as they are. A vocabulary that differs in one token silently corrupts output
//! whenever that token comes up, so the check is exhaustive.
//!
//! Compared GGUF metadata: `tokenizer.ggml.tokens` (size, then every token's text in order),
//! `tokenizer.ggml.model`, `tokenizer.ggml.token_type` (every type, when either file has
//! them), `tokenizer.ggml.bos_token_id` and `tokenizer.ggml.eos_token_id`. The check only
//! walks the already parsed metadata and allocates nothing sized by the files.

use ember_formats::{GgufFile, MetaArray, MetaType, MetaValue};

const TOKENS: &str = "tokenizer.ggml.tokens";
const TOKEN_TYPES: &str = "tokenizer.ggml.token_type";
const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
const BOS: &str = "tokenizer.ggml.bos_token_id";
const EOS: &str = "tokenizer.ggml.eos_token_id";

/// Which of the two models a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The model whose output is kept.
    Target,
    /// The model that proposes tokens.
    Draft,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Target => "target",
            Side::Draft => "draft",
        })
    }
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Target => Side::Draft,
            Side::Draft => Side::Target,
        }
    }
}

/// Why a draft model cannot be used with a target.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VocabMismatch {
    /// The vocabularies have different sizes.
    #[error("the draft model has {draft} tokens, the target {target}")]
    Size {
        /// The target's token count.
        target: usize,
        /// The draft's token count.
        draft: usize,
    },
    /// The tokenizer algorithms differ (`tokenizer.ggml.model`).
    #[error(
        "the draft model's tokenizer model is {}, the target's {}",
        quoted_or_none(.draft),
        quoted_or_none(.target)
    )]
    TokenizerModel {
        /// The target's `tokenizer.ggml.model` (`None`: absent).
        target: Option<String>,
        /// The draft's `tokenizer.ggml.model` (`None`: absent).
        draft: Option<String>,
    },
    /// A token's text or type differs (`None` types: that file has no type for the token).
    #[error(
        "the draft model's vocabulary differs from the target's at token {id}: target \
         {target_text:?} ({}), draft {draft_text:?} ({})",
        token_type_name(*.target_type),
        token_type_name(*.draft_type)
    )]
    Token {
        /// The first token id that differs.
        id: usize,
        /// The target's text for it.
        target_text: String,
        /// The target's token type (llama.cpp's `llama_token_type`).
        target_type: Option<i64>,
        /// The draft's text for it.
        draft_text: String,
        /// The draft's token type.
        draft_type: Option<i64>,
    },
    /// One model has token types and the other has none, so types cannot be compared.
    #[error(
        "the {} model has token types (tokenizer.ggml.token_type), the {missing} model has \
         none",
        .missing.other()
    )]
    TokenTypesMissing {
        /// The model without token types.
        missing: Side,
    },
    /// The BOS or EOS ids differ (`None`: the file has no such id).
    #[error(
        "{name} is {} in the target, {} in the draft",
        id_or_none(*.target),
        id_or_none(*.draft)
    )]
    SpecialToken {
        /// `BOS` or `EOS`.
        name: &'static str,
        /// The target's id.
        target: Option<u32>,
        /// The draft's id.
        draft: Option<u32>,
    },
    /// A model has no `tokenizer.ggml.tokens`.
    #[error("the {side} model has no vocabulary (tokenizer.ggml.tokens is missing)")]
    NoVocabulary {
        /// The model without a vocabulary.
        side: Side,
    },
    /// Metadata of the wrong type or out of range: the vocabularies cannot be compared.
    #[error("the {side} model's {key} is {found}, expected {expected}")]
    BadValue {
        /// The model whose metadata is wrong.
        side: Side,
        /// The metadata key.
        key: &'static str,
        /// What the file holds, in words.
        found: String,
        /// What it must hold, in words.
        expected: &'static str,
    },
}

fn quoted_or_none(s: &Option<String>) -> String {
    match s {
        Some(s) => format!("{s:?}"),
        None => "none".to_owned(),
    }
}

fn id_or_none(id: Option<u32>) -> String {
    id.map_or_else(|| "none".to_owned(), |id| id.to_string())
}

/// Token type names of llama.cpp's `llama_token_type`.
fn token_type_name(t: Option<i64>) -> String {
    match t {
        None => "no type".to_owned(),
        Some(0) => "undefined".to_owned(),
        Some(1) => "normal".to_owned(),
        Some(2) => "unknown".to_owned(),
        Some(3) => "control".to_owned(),
        Some(4) => "user-defined".to_owned(),
        Some(5) => "unused".to_owned(),
        Some(6) => "byte".to_owned(),
        Some(t) => format!("type {t}"),
    }
}

/// A short description of a value for errors ("a string", "an array of u32", "the i32 -1").
fn describe(v: &MetaValue) -> String {
    match v {
        MetaValue::String(_) => "a string".to_owned(),
        MetaValue::Array(a) => format!("an array of {}", a.element_type()),
        v => match v.as_integer() {
            Some(i) => format!("the {} {i}", v.meta_type()),
            None => format!("a value of type {}", v.meta_type()),
        },
    }
}

fn is_integer_type(t: MetaType) -> bool {
    use MetaType::*;
    matches!(t, U8 | I8 | U16 | I16 | U32 | I32 | U64 | I64)
}

/// One model's tokenizer metadata, borrowed from its parsed header.
struct Tokenizer<'a> {
    side: Side,
    tokens: &'a ember_formats::StringArray,
    types: Option<&'a MetaArray>,
    model: Option<&'a str>,
}

impl<'a> Tokenizer<'a> {
    fn read(f: &'a GgufFile, side: Side) -> Result<Tokenizer<'a>, VocabMismatch> {
        let bad = |key, v: &MetaValue, expected| VocabMismatch::BadValue {
            side,
            key,
            found: describe(v),
            expected,
        };
        let tokens = match f.get(TOKENS) {
            None => return Err(VocabMismatch::NoVocabulary { side }),
            Some(v) => v
                .as_array()
                .and_then(MetaArray::as_strings)
                .ok_or_else(|| bad(TOKENS, v, "an array of strings"))?,
        };
        let types = match f.get(TOKEN_TYPES) {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .filter(|a| is_integer_type(a.element_type()))
                    .ok_or_else(|| bad(TOKEN_TYPES, v, "an array of integers"))?,
            ),
        };
        let model = match f.get(TOKENIZER_MODEL) {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| bad(TOKENIZER_MODEL, v, "a string"))?,
            ),
        };
        Ok(Tokenizer {
            side,
            tokens,
            types,
            model,
        })
    }

    /// The type of token `i`: `None` past the end of the array (or without one).
    fn token_type(&self, i: usize) -> Result<Option<i64>, VocabMismatch> {
        let Some(v) = self.types.and_then(|a| a.get(i)) else {
            return Ok(None);
        };
        v.as_i64().map(Some).ok_or_else(|| VocabMismatch::BadValue {
            side: self.side,
            key: TOKEN_TYPES,
            found: format!("{} at token {i}", describe(&v)),
            expected: "token types that fit in i64",
        })
    }
}

/// A special token id: absent is `None`, a non-integer or out-of-range value is an error.
fn special_id(f: &GgufFile, key: &'static str, side: Side) -> Result<Option<u32>, VocabMismatch> {
    match f.get(key) {
        None => Ok(None),
        Some(v) => v.as_u32().map(Some).ok_or_else(|| VocabMismatch::BadValue {
            side,
            key,
            found: describe(v),
            expected: "a token id (an integer in u32 range)",
        }),
    }
}

/// Ok when `draft` has exactly `target`'s vocabulary: same size, same tokenizer model, every
/// token's text and type equal in order, same BOS and EOS ids. The first difference found is
/// returned; the size is checked first since it is the most telling.
pub fn check_same_vocab(target: &GgufFile, draft: &GgufFile) -> Result<(), VocabMismatch> {
    let t = Tokenizer::read(target, Side::Target)?;
    let d = Tokenizer::read(draft, Side::Draft)?;

    if t.tokens.len() != d.tokens.len() {
        return Err(VocabMismatch::Size {
            target: t.tokens.len(),
            draft: d.tokens.len(),
        });
    }
    if t.model != d.model {
        return Err(VocabMismatch::TokenizerModel {
            target: t.model.map(str::to_owned),
            draft: d.model.map(str::to_owned),
        });
    }
    match (t.types.is_some(), d.types.is_some()) {
        (true, false) => {
            return Err(VocabMismatch::TokenTypesMissing {
                missing: Side::Draft,
            });
        }
        (false, true) => {
            return Err(VocabMismatch::TokenTypesMissing {
                missing: Side::Target,
            });
        }
        _ => {}
    }

    for (id, (t_text, d_text)) in t.tokens.iter().zip(d.tokens.iter()).enumerate() {
        let (t_type, d_type) = (t.token_type(id)?, d.token_type(id)?);
        if t_text != d_text || t_type != d_type {
            return Err(VocabMismatch::Token {
                id,
                target_text: t_text.to_owned(),
                target_type: t_type,
                draft_text: d_text.to_owned(),
                draft_type: d_type,
            });
        }
    }

    for (name, key) in [("BOS", BOS), ("EOS", EOS)] {
        let (t_id, d_id) = (
            special_id(target, key, Side::Target)?,
            special_id(draft, key, Side::Draft)?,
        );
        if t_id != d_id {
            return Err(VocabMismatch::SpecialToken {
                name,
                target: t_id,
                draft: d_id,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_documented() {
        let token = VocabMismatch::Token {
            id: 1234,
            target_text: "hello".into(),
            target_type: Some(1),
            draft_text: "hullo".into(),
            draft_type: Some(1),
        };
        assert_eq!(
            token.to_string(),
            "the draft model's vocabulary differs from the target's at token 1234: target \
             \"hello\" (normal), draft \"hullo\" (normal)"
        );
        let size = VocabMismatch::Size {
            target: 262144,
            draft: 49152,
        };
        assert_eq!(
            size.to_string(),
            "the draft model has 49152 tokens, the target 262144"
        );
        let model = VocabMismatch::TokenizerModel {
            target: Some("gpt2".into()),
            draft: None,
        };
        assert_eq!(
            model.to_string(),
            "the draft model's tokenizer model is none, the target's \"gpt2\""
        );
        let bos = VocabMismatch::SpecialToken {
            name: "BOS",
            target: Some(1),
            draft: Some(2),
        };
        assert_eq!(bos.to_string(), "BOS is 1 in the target, 2 in the draft");
        let eos = VocabMismatch::SpecialToken {
            name: "EOS",
            target: None,
            draft: Some(2),
        };
        assert_eq!(eos.to_string(), "EOS is none in the target, 2 in the draft");
        let types = VocabMismatch::TokenTypesMissing {
            missing: Side::Draft,
        };
        assert_eq!(
            types.to_string(),
            "the target model has token types (tokenizer.ggml.token_type), the draft model \
             has none"
        );
    }

    #[test]
    fn token_types_and_values_are_named() {
        assert_eq!(token_type_name(Some(3)), "control");
        assert_eq!(token_type_name(Some(6)), "byte");
        assert_eq!(token_type_name(Some(-7)), "type -7");
        assert_eq!(token_type_name(None), "no type");
        assert_eq!(describe(&MetaValue::I32(-1)), "the i32 -1");
        assert_eq!(describe(&"x".into()), "a string");
        assert_eq!(describe(&vec![1u32].into()), "an array of u32");
        assert_eq!(describe(&MetaValue::F32(0.5)), "a value of type f32");
    }
}
