//! Prompt lookup: propose the tokens that followed the last time the current n-gram appeared.
//!
//! No model is involved. Text that quotes or edits its prompt (summaries, code changes,
//! extraction) repeats long spans, and the tokens after an earlier occurrence of the last few
//! tokens are then a good guess for what comes next. The target verifies every guess, so a
//! bad one costs only the wasted verification slots.

/// An n-gram proposer over the prompt and the tokens generated so far.
///
/// `ngram_max` and `ngram_min` bound the length of the suffix that is looked up; a longer
/// match is a stronger hint, so the longest one that occurs earlier wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptLookup {
    /// Longest suffix tried, in tokens (tried first).
    pub ngram_max: usize,
    /// Shortest suffix that still counts as a match, in tokens (at least 1).
    pub ngram_min: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        PromptLookup::new(3, 1)
    }
}

impl PromptLookup {
    /// A proposer matching suffixes of `ngram_min..=ngram_max` tokens. Clamped so that
    /// `ngram_min >= 1` (an empty n-gram matches everywhere) and `ngram_max >= ngram_min`.
    pub fn new(ngram_max: usize, ngram_min: usize) -> Self {
        let ngram_min = ngram_min.max(1);
        PromptLookup {
            ngram_max: ngram_max.max(ngram_min),
            ngram_min,
        }
    }

    /// Up to `k` tokens that followed the most recent earlier occurrence of the last n tokens
    /// of `tokens` (prompt and generated so far), trying n from `ngram_max` down to
    /// `ngram_min`; empty when nothing matches.
    ///
    /// The occurrence must end strictly before the end of `tokens` (the suffix itself does
    /// not count) and may overlap the suffix; the continuation may run up to the end of
    /// `tokens`. The longest n wins; for that n, the most recent occurrence.
    ///
    /// One backward scan: for every candidate end `j` it measures how many tokens before `j`
    /// agree with the suffix (at most `ngram_max`), so the cost is O(len * ngram_max) with no
    /// allocation besides the returned tokens.
    pub fn propose(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        // The fields are public: re-apply the clamps of `new` rather than trust them.
        let n_min = self.ngram_min.max(1);
        let n_max = self.ngram_max.max(n_min);
        let len = tokens.len();
        if k == 0 || len < 2 {
            return Vec::new();
        }

        // (match length, end of the match); the first j reaching a new maximum is the most
        // recent occurrence of that length because j runs backwards.
        let mut best: Option<(usize, usize)> = None;
        for j in (1..len).rev() {
            // tokens[j - m..j] == tokens[len - m..len], m capped by n_max and by j.
            let cap = n_max.min(j);
            let mut m = 0;
            while m < cap && tokens[j - 1 - m] == tokens[len - 1 - m] {
                m += 1;
            }
            if m >= n_min && best.is_none_or(|(bm, _)| m > bm) {
                best = Some((m, j));
                if m == n_max {
                    break; // Nothing longer is allowed; later (earlier in text) js only tie.
                }
            }
        }

        match best {
            Some((_, j)) => tokens[j..len.min(j.saturating_add(k))].to_vec(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_clamps() {
        assert_eq!(
            PromptLookup::new(0, 0),
            PromptLookup {
                ngram_max: 1,
                ngram_min: 1
            }
        );
        assert_eq!(
            PromptLookup::new(2, 5),
            PromptLookup {
                ngram_max: 5,
                ngram_min: 5
            }
        );
        assert_eq!(
            PromptLookup::default(),
            PromptLookup {
                ngram_max: 3,
                ngram_min: 1
            }
        );
    }

    #[test]
    fn repeated_span_is_proposed() {
        // "1 2 3 4 5 6 ... 1 2 3" -> "4 5 6 ..."
        let t = [1, 2, 3, 4, 5, 6, 7, 9, 9, 1, 2, 3];
        assert_eq!(PromptLookup::default().propose(&t, 4), vec![4, 5, 6, 7]);
    }

    #[test]
    fn continuation_may_run_into_generated_text_and_stops_at_the_end() {
        // The match [7 8] ends at 2; its continuation is the rest of the sequence.
        let t = [7, 8, 1, 2, 7, 8];
        assert_eq!(PromptLookup::new(2, 2).propose(&t, 10), vec![1, 2, 7, 8]);
    }

    #[test]
    fn no_match_is_empty() {
        assert!(
            PromptLookup::default()
                .propose(&[1, 2, 3, 4, 5], 4)
                .is_empty()
        );
        // A match only shorter than ngram_min does not count.
        let t = [1, 2, 3, 9, 3];
        assert!(PromptLookup::new(3, 2).propose(&t, 4).is_empty());
        assert_eq!(PromptLookup::new(3, 1).propose(&t, 4), vec![9, 3]);
    }

    #[test]
    fn the_suffix_itself_is_not_a_match() {
        // [5 6] occurs only at the end; [6] also only at the end.
        assert!(PromptLookup::default().propose(&[1, 2, 5, 6], 3).is_empty());
    }

    #[test]
    fn longer_ngram_wins_over_a_more_recent_shorter_one() {
        // The last 3 tokens [1 2 3] occur at 0..3 (followed by 10); [2 3] alone also occurs
        // later at 6..8 (followed by 20), and [3] at 11 (followed by 30).
        let t = [1, 2, 3, 10, 0, 0, 2, 3, 20, 0, 0, 3, 30, 1, 2, 3];
        let pl = PromptLookup::new(3, 1);
        assert_eq!(pl.propose(&t, 1), vec![10]);
        // Capping the n-gram length at 2 picks the most recent [2 3].
        assert_eq!(PromptLookup::new(2, 1).propose(&t, 1), vec![20]);
        // And at 1, the most recent [3].
        assert_eq!(PromptLookup::new(1, 1).propose(&t, 1), vec![30]);
    }

    #[test]
    fn most_recent_occurrence_wins_for_equal_length() {
        let t = [4, 5, 1, 4, 5, 2, 4, 5];
        assert_eq!(PromptLookup::new(2, 2).propose(&t, 1), vec![2]);
    }

    #[test]
    fn overlapping_occurrence_counts() {
        // A run of one token: the suffix [7 7 7] also occurs one position earlier.
        let t = [7, 7, 7, 7];
        assert_eq!(PromptLookup::default().propose(&t, 5), vec![7]);
        let t = [1, 2, 1, 2, 1, 2];
        assert_eq!(PromptLookup::default().propose(&t, 5), vec![1, 2]);
    }

    #[test]
    fn k_caps_the_proposal() {
        let t = [1, 2, 3, 4, 5, 6, 1, 2];
        let pl = PromptLookup::default();
        assert_eq!(pl.propose(&t, 1), vec![3]);
        assert_eq!(pl.propose(&t, 3), vec![3, 4, 5]);
        assert_eq!(pl.propose(&t, usize::MAX), vec![3, 4, 5, 6, 1, 2]);
    }

    #[test]
    fn tiny_inputs_and_zero_k() {
        let pl = PromptLookup::default();
        assert!(pl.propose(&[], 4).is_empty());
        assert!(pl.propose(&[1], 4).is_empty());
        assert_eq!(pl.propose(&[1, 1], 4), vec![1]);
        assert!(pl.propose(&[1, 2, 1], 0).is_empty());
        assert_eq!(pl.propose(&[1, 2, 1], 1), vec![2]);
    }

    #[test]
    fn unclamped_public_fields_are_tolerated() {
        let pl = PromptLookup {
            ngram_max: 0,
            ngram_min: 0,
        };
        assert_eq!(pl.propose(&[1, 2, 1], 4), vec![2, 1]);
        let huge = PromptLookup {
            ngram_max: usize::MAX,
            ngram_min: 2,
        };
        assert_eq!(huge.propose(&[1, 2, 3, 1, 2, 3], 2), vec![1, 2]);
    }
}
