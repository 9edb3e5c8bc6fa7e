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
    /// Token scores, NaN as -inf and -0.0 as 0.0 (llama.cpp compares them with `<`: -0.0 ties
    /// with 0.0, a NaN never wins).
    scores: Vec<f32>,
    /// llama.cpp's `byte_to_token`: the `<0xXX>` token, else the byte's own one-byte text.
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

/// A run of the text: the characters merged so far, in a list linked through the indices.
#[derive(Clone, Copy)]
struct Symbol {
    prev: Option<usize>,
    next: Option<usize>,
    start: usize,
    /// Bytes; 0 once merged into the symbol on its left.
    len: usize,
}

/// Two adjacent symbols whose texts together make a token of `score`.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    /// The joined text's length, to spot a pair that an earlier merge changed.
    size: usize,
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
        let byte_tokens = std::array::from_fn(|b| {
            index.get(texts, &format!("<0x{b:02X}>")).or_else(|| {
                let b = u8::try_from(b).ok()?;
                // A one-byte text is a `str` only for ASCII.
                index.get(texts, std::str::from_utf8(&[b]).ok()?)
            })
        });
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

    /// Whether byte `b` has a token of its own (`<0xXX>` or its one-byte text).
    pub(crate) fn has_byte(&self, b: u8) -> bool {
        self.byte_tokens[b as usize].is_some()
    }

    /// Appends the ids of `text` (already escaped: spaces as `▁`) to `out`, as
    /// `llm_tokenizer_spm_session::tokenize` does.
    pub(crate) fn tokenize(&self, texts: &[String], text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
                start,
                len,
            });
        }
        let mut queue = BinaryHeap::new();
        for right in 1..symbols.len() {
            self.try_add_bigram(
                texts,
                text,
                &symbols,
                &mut queue,
                Some(right - 1),
                Some(right),
            );
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
            // One side was merged away, or grew, since the pair was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += right.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = right.next;
            if let Some(next) = right.next {
                symbols[next].prev = Some(bigram.left);
            }
            let merged = symbols[bigram.left];
            self.try_add_bigram(
                texts,
                text,
                &symbols,
                &mut queue,
                merged.prev,
                Some(bigram.left),
            );
            self.try_add_bigram(
                texts,
                text,
                &symbols,
                &mut queue,
                Some(bigram.left),
                merged.next,
            );
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            self.resegment(texts, &text[s.start..s.start + s.len], out);
            at = s.next;
        }
    }

    /// Queues the pair `(left, right)` if their joined text is a token.
    fn try_add_bigram(
        &self,
        texts: &[String],
        text: &str,
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Bigram>,
        left: Option<usize>,
        right: Option<usize>,
    ) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (symbols[left], symbols[right]);
        let size = l.len + r.len;
        let Some(id) = self.id(texts, &text[l.start..l.start + size]) else {
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
    /// Ember gives the character the unknown token instead (which an SPM vocab always has),
    /// as the `tokenizers` BPE model it used before did, or drops it without one.
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
