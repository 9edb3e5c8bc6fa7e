//! Incremental detokenization for streaming output.

use super::GgufTokenizer;

/// Turns a stream of token ids into valid UTF-8 text as the tokens arrive.
///
/// A character can span tokens (byte-fallback tokens, or byte-level BPE pieces that split a
/// multi-byte character); the decoder holds back an incomplete UTF-8 tail until the bytes that
/// complete it arrive. Bytes that can never form a character are emitted as U+FFFD.
///
/// ```no_run
/// # fn demo(tok: &ember_text::tokenizer::GgufTokenizer, ids: &[u32]) {
/// let mut dec = tok.stream_decoder(true);
/// for &id in ids {
///     print!("{}", dec.push(tok, id));
/// }
/// print!("{}", dec.finish());
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl StreamDecoder {
    /// A decoder; `skip_special` drops CONTROL/UNKNOWN tokens (like `decode(.., true)`),
    /// otherwise they are rendered as their text.
    pub fn new(skip_special: bool) -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            skip_special,
        }
    }

    /// Feeds one token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> String {
        let piece = tokenizer.piece(id, !self.skip_special);
        self.push_bytes(piece)
    }

    /// Feeds raw bytes; returns the text that became complete (possibly empty).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whether bytes of an incomplete character are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Flushes what is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
