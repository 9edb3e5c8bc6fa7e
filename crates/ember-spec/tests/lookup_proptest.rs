//! Prompt lookup against a brute-force reference: every proposal is a real continuation of an
//! earlier occurrence of the suffix, and it is the one the documented preference picks.

use ember_spec::lookup::PromptLookup;
use proptest::prelude::*;

/// The specification, written the slow and obvious way: for n from max down to min, the most
/// recent j < len with tokens[j-n..j] == the last n tokens.
fn reference(pl: &PromptLookup, tokens: &[u32], k: usize) -> Vec<u32> {
    let len = tokens.len();
    for n in (pl.ngram_min..=pl.ngram_max).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        for j in (n..len).rev() {
            if &tokens[j - n..j] == suffix {
                return tokens[j..len.min(j + k)].to_vec();
            }
        }
    }
    Vec::new()
}

/// Token sequences over a small alphabet so that n-grams repeat often.
fn sequences() -> impl Strategy<Value = Vec<u32>> {
    (1u32..6).prop_flat_map(|alphabet| prop::collection::vec(0..alphabet, 0..80))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn proposals_are_real_continuations(
        tokens in sequences(),
        ngram_max in 1usize..6,
        ngram_min in 1usize..4,
        k in 0usize..12,
    ) {
        let pl = PromptLookup::new(ngram_max, ngram_min);
        let got = pl.propose(&tokens, k);
        prop_assert!(got.len() <= k);
        if !got.is_empty() {
            let len = tokens.len();
            let real = (pl.ngram_min..=pl.ngram_max).any(|n| {
                n < len
                    && (n..len).any(|j| {
                        tokens[j - n..j] == tokens[len - n..]
                            && tokens.get(j..j + got.len()) == Some(&got[..])
                    })
            });
            prop_assert!(real, "{got:?} does not follow the suffix anywhere in {tokens:?}");
        }
        prop_assert_eq!(got, reference(&pl, &tokens, k));
    }

    #[test]
    fn a_planted_repeat_is_found(
        prefix in prop::collection::vec(100u32..200, 0..30),
        span in prop::collection::vec(0u32..50, 4..20),
        k in 1usize..8,
    ) {
        // prefix, span, 999, then the first 3 tokens of span again: the 3-gram match is at
        // the planted span (or a later one), and the proposal continues it.
        let mut tokens = prefix.clone();
        tokens.extend(&span);
        tokens.push(999);
        tokens.extend(&span[..3]);
        let got = PromptLookup::default().propose(&tokens, k);
        prop_assert!(!got.is_empty());
        prop_assert_eq!(&got, &reference(&PromptLookup::default(), &tokens, k));
    }
}

#[test]
fn long_context_is_fast_enough() {
    // 50k tokens with no 1-gram repeat of the last token: the worst case scans everything.
    let mut tokens: Vec<u32> = (0..50_000u32).map(|i| i % 1000).collect();
    tokens.push(5000);
    let pl = PromptLookup::default();
    let start = std::time::Instant::now();
    for _ in 0..20 {
        assert!(pl.propose(&tokens, 8).is_empty());
    }
    // A scan is ~50k short comparisons; 20 of them take well under a second in release
    // builds. The bound is loose so a busy machine does not flake it.
    let elapsed = start.elapsed();
    assert!(elapsed.as_secs_f64() < 5.0, "{elapsed:?}");
    // And the common case: a periodic text finds a 3-gram at once.
    tokens.pop();
    assert_eq!(pl.propose(&tokens, 3), vec![0, 1, 2]);
}
