//! Stop strings over streamed text.
//!
//! Generated text arrives one token piece at a time, and a stop string can span several
//! pieces. [`StopMatcher`] emits text as early as possible while holding back any suffix
//! that could still grow into a stop string, so a stop is never partly shown to the user.

/// What [`StopMatcher::push`] lets the caller emit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that is now safe to show (never contains any part of a matched stop string).
    pub text: String,
    /// A stop string was found: generation should end; `text` holds everything before it.
    pub stopped: bool,
}

/// Finds stop strings in text streamed piece by piece, holding back what could still turn
/// into one. Once a stop is found, nothing more is emitted.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted (a possible stop-string prefix).
    pending: String,
    /// Trailing bytes of an incomplete UTF-8 sequence fed through `push_bytes`.
    partial_utf8: Vec<u8>,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            ..Self::default()
        }
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds one decoded piece of text.
    pub fn push(&mut self, piece: &str) -> StopOutput {
        if self.stopped {
            return StopOutput {
                text: String::new(),
                stopped: true,
            };
        }
        self.pending.push_str(piece);

        // Earliest match across all stop strings wins: it ends the text soonest.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(pos) = hit {
            self.pending.truncate(pos);
            self.stopped = true;
            self.partial_utf8.clear();
            return StopOutput {
                text: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }

        let hold = self.held_suffix_start();
        let rest = self.pending.split_off(hold);
        StopOutput {
            text: std::mem::replace(&mut self.pending, rest),
            stopped: false,
        }
    }

    /// Feeds raw token bytes (e.g. byte-fallback tokens that split a UTF-8 character);
    /// incomplete trailing sequences wait for the next call, invalid bytes become U+FFFD.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> StopOutput {
        self.partial_utf8.extend_from_slice(bytes);
        let mut text = String::new();
        let mut rest: &[u8] = &self.partial_utf8;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    text.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` was just checked by from_utf8.
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        None => {
                            rest = after; // incomplete: keep for the next piece
                            break;
                        }
                    }
                }
            }
        }
        self.partial_utf8 = rest.to_vec();
        self.push(&text)
    }

    /// End of generation without a stop: returns everything still held back.
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.pending);
        if !self.stopped && !self.partial_utf8.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.partial_utf8));
        }
        self.partial_utf8.clear();
        out
    }

    /// Byte index where the longest suffix of `pending` that is a proper prefix of some
    /// stop string begins (`pending.len()` if none). Only char boundaries are considered,
    /// so the emitted part is always valid UTF-8.
    fn held_suffix_start(&self) -> usize {
        let p = self.pending.as_bytes();
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let from = p.len().saturating_sub(longest.saturating_sub(1));
        (from..p.len())
            .filter(|&i| self.pending.is_char_boundary(i))
            .find(|&i| {
                let tail = &p[i..];
                self.stops.iter().any(|s| s.as_bytes().starts_with(tail))
            })
            .unwrap_or(p.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let o = m.push(p);
            out.push(o.text);
            if o.stopped {
                stopped = true;
                break;
            }
        }
        (out, stopped, m.finish())
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let (out, stopped, rest) = run(&[], &["a", "b"]);
        assert_eq!(out, vec!["a", "b"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn stop_within_one_piece() {
        let (out, stopped, rest) = run(&["</s>"], &["Hello", " world</s>tail"]);
        assert_eq!(out, vec!["Hello", " world"]);
        assert!(stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn stop_split_across_pieces_is_held_then_dropped() {
        let (out, stopped, _) = run(&["<|im_end|>"], &["Paris.", "<|im", "_end", "|>", "more"]);
        assert_eq!(out, vec!["Paris.", "", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn false_alarm_prefix_is_released() {
        let (out, stopped, rest) = run(&["STOP"], &["ST", "ART", " then S"]);
        assert_eq!(out, vec!["", "START", " then "]);
        assert!(!stopped);
        assert_eq!(rest, "S"); // still a possible prefix at the end, flushed by finish
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["\n\n", "User:"], &["Answer.", " User: hi\n\nx"]);
        assert_eq!(out.concat(), "Answer. ");
        assert!(stopped);
    }

    #[test]
    fn overlapping_prefix_candidates() {
        // "aab" must still be found when the text is "aaab" streamed byte by byte.
        let (out, stopped, _) = run(&["aab"], &["a", "a", "a", "b"]);
        assert_eq!(out.concat(), "a");
        assert!(stopped);
    }

    #[test]
    fn multibyte_stop_and_text() {
        // Stop "終わり" split between pieces at char boundaries; text before includes "é".
        let (out, stopped, _) = run(&["終わり"], &["café ", "終", "わ", "り!"]);
        assert_eq!(out.concat(), "café ");
        assert!(stopped);
        // A multi-byte char sharing a leading byte with the stop must not be held forever.
        let (out, stopped, rest) = run(&["終わり"], &["終点"]);
        assert_eq!(out.concat(), "終点");
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn bytes_split_inside_a_character() {
        let mut m = StopMatcher::new(["é!"]);
        let bytes = "xé!y".as_bytes(); // 'é' = C3 A9
        assert_eq!(m.push_bytes(&bytes[..2]).text, "x"); // "x" + half of é
        let o = m.push_bytes(&bytes[2..3]); // completes 'é', which may start the stop
        assert_eq!((o.text.as_str(), o.stopped), ("", false));
        let o = m.push_bytes(&bytes[3..]);
        assert_eq!((o.text.as_str(), o.stopped), ("", true));

        let mut m = StopMatcher::new(["zz"]);
        assert_eq!(m.push_bytes(&[b'a', 0xFF, b'b']).text, "a\u{FFFD}b");
        assert_eq!(m.push_bytes(&[0xE2, 0x82]).text, "");
        assert_eq!(m.finish(), "\u{FFFD}");
    }

    #[test]
    fn after_stop_nothing_more_is_emitted() {
        let mut m = StopMatcher::new(["x"]);
        assert!(m.push("axb").stopped);
        let o = m.push("more");
        assert!(o.stopped && o.text.is_empty());
        assert!(m.is_stopped());
        assert_eq!(m.finish(), "");
    }
}
