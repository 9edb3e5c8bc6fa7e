//! llama.cpp's SentencePiece-style tokenizer (`llm_tokenizer_spm_session`), written by hand.
//!
//! It splits a text into characters, then keeps merging the adjacent pair whose concatenation
//! is the best-scoring token (ties: the leftmost pair). No model of the `tokenizers` crate
//! works from token scores; the BPE merge list Ember derived from them instead (every split of
//! every token, ranked by score) took about half a second and over 100 MB to build for Gemma
//! 3's 262k tokens, and could not merge a character outside the vocabulary with its neighbour,
//! which llama.cpp does.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::TokenizerError;
use super::vocab::TextIndex;

/// The vocabulary's text -> id index and scores, with the byte tokens looked up once. The
/// texts themselves are the caller's (every method that looks a text up takes them).
pub(crate) struct Spm {
    index: TextIndex,
    /// Token scores, NaN as -inf and -0.0 as 0.0: llama.cpp compares them with `<`, so -0.0
    /// ties with 0.0; a NaN makes its comparator inconsistent (its result unspecified), and
    /// Ember ranks it last.
    scores: Vec<f32>,
    /// The `<0xXX>` token of each byte (llama.cpp's `byte_to_token`; its fallback to the byte's
    /// one-byte text can never apply here: a one-character symbol reaches the byte fallback
    /// only when its text is not a token, and bytes from 0x80 are no text of their own).
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

/// No symbol (the ends of the list).
const NONE: u32 = u32::MAX;

/// A run of the text: the characters merged so far, in a list linked through the indices.
/// Indices and offsets are `u32` (a text of 4 GiB or more is refused), so a symbol takes 16
/// bytes for each character of the text.
#[derive(Clone, Copy)]
struct Symbol {
    prev: u32,
    next: u32,
    start: u32,
    /// Bytes; 0 once merged into the symbol on its left.
    len: u32,
}

/// Two adjacent symbols whose texts together make a token of `score`.
struct Bigram {
    left: u32,
    right: u32,
    score: f32,
    /// The joined text's length, to spot a pair that an earlier merge changed.
    size: u32,
}

impl Ord for Bigram {
    /// llama.cpp's `llm_bigram_spm::comparator` as a max-heap order: the higher score first,
    /// then the smaller `left`.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl Spm {
    /// The tokenizer of the vocabulary `texts`, given their index and one score per text.
    pub(crate) fn new(
        texts: &[String],
        index: TextIndex,
        scores: &[f32],
        unk: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        if scores.len() < texts.len() {
            return Err(TokenizerError::BadVocab(format!(
                "{} scores for {} tokens",
                scores.len(),
                texts.len()
            )));
        }
        let scores = scores
            .iter()
            .map(|&s| {
                if s.is_nan() {
                    f32::NEG_INFINITY
                } else if s == 0.0 {
                    0.0
                } else {
                    s
                }
            })
            .collect();
        let byte_tokens = std::array::from_fn(|b| index.get(texts, &format!("<0x{b:02X}>")));
        Ok(Spm {
            index,
            scores,
            byte_tokens,
            unk,
        })
    }

    /// The id of a token text.
    pub(crate) fn id(&self, texts: &[String], text: &str) -> Option<u32> {
        self.index.get(texts, text)
    }

    /// The token scores (normalized as [`Spm::scores`] says).
    pub(crate) fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// Whether byte `b` has a `<0xXX>` token.
    pub(crate) fn has_byte(&self, b: u8) -> bool {
        self.byte_tokens[b as usize].is_some()
    }

    /// Appends the ids of `text` (already escaped: spaces as `▁`) to `out`, as
    /// `llm_tokenizer_spm_session::tokenize` does. A text of 4 GiB or more is refused.
    pub(crate) fn tokenize(
        &self,
        texts: &[String],
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let Ok(n_bytes) = u32::try_from(text.len()) else {
            return Err(TokenizerError::Encode(format!(
                "a text fragment of {} bytes (at most {} are tokenized at once)",
                text.len(),
                u32::MAX
            )));
        };
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.chars().count());
        for (i, (start, c)) in text.char_indices().enumerate() {
            // Both fit: `start < n_bytes`, and there are no more characters than bytes.
            let (i, start, len) = (i as u32, start as u32, c.len_utf8() as u32);
            symbols.push(Symbol {
                prev: if i == 0 { NONE } else { i - 1 },
                next: if start + len < n_bytes { i + 1 } else { NONE },
                start,
                len,
            });
        }
        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() as u32 {
            self.try_add_bigram(texts, text, &symbols, &mut queue, right - 1, right);
        }
        while let Some(bigram) = queue.pop() {
            let (li, ri) = (bigram.left as usize, bigram.right as usize);
            let (left, right) = (symbols[li], symbols[ri]);
            // One side was merged away, or grew, since the pair was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            symbols[li].len += right.len;
            symbols[ri].len = 0;
            symbols[li].next = right.next;
            if right.next != NONE {
                symbols[right.next as usize].prev = bigram.left;
            }
            let merged = symbols[li];
            self.try_add_bigram(texts, text, &symbols, &mut queue, merged.prev, bigram.left);
            self.try_add_bigram(texts, text, &symbols, &mut queue, bigram.left, merged.next);
        }
        let mut at = if symbols.is_empty() { NONE } else { 0 };
        while at != NONE {
            let s = symbols[at as usize];
            let (start, end) = (s.start as usize, (s.start + s.len) as usize);
            self.resegment(texts, &text[start..end], out);
            at = s.next;
        }
        Ok(())
    }

    /// Queues the pair `(left, right)` if both exist and their joined text is a token.
    fn try_add_bigram(
        &self,
        texts: &[String],
        text: &str,
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Bigram>,
        left: u32,
        right: u32,
    ) {
        if left == NONE || right == NONE {
            return;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let size = l.len + r.len;
        let start = l.start as usize;
        let Some(id) = self.id(texts, &text[start..start + size as usize]) else {
            return;
        };
        queue.push(Bigram {
            left,
            right,
            score: self.scores[id as usize],
            size,
        });
    }

    /// llama.cpp's `resegment` of one final symbol. A merged symbol is always a token (pairs
    /// merge only into one), so llama.cpp's `rev_merge` fallback never applies: a symbol that
    /// is not a token is one character, spelled as byte tokens.
    ///
    /// Where a byte has no token llama.cpp throws (`token_to_id.at`) and the program ends;
    /// Ember gives the character the unknown token instead, as the `tokenizers` BPE model it
    /// used before did (an SPM vocabulary has one unless it is empty: then the character is
    /// dropped).
    fn resegment(&self, texts: &[String], symbol: &str, out: &mut Vec<u32>) {
        if let Some(id) = self.id(texts, symbol) {
            out.push(id);
            return;
        }
        let bytes = symbol.as_bytes();
        if bytes.iter().all(|&b| self.has_byte(b)) {
            out.extend(bytes.iter().filter_map(|&b| self.byte_tokens[b as usize]));
        } else if let Some(unk) = self.unk {
            out.push(unk);
        }
    }
}
