//! The draft-length policy against a simulated proposer whose every drafted token is accepted
//! independently with a fixed probability (the target stops at the first rejection).

use ember_spec::adaptive::DraftLength;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MIN: usize = 1;
const MAX: usize = 8;
const WARM_UP: usize = 500;
const STEPS: usize = 20_000;

struct Outcome {
    /// Share of steps (after warm-up) that drafted anything.
    drafting: f64,
    /// Mean draft length over the drafting steps.
    mean_len: f64,
    /// Accepted tokens per step, over all steps.
    accepted_per_step: f64,
    rate: f64,
}

fn simulate(p_accept: f64, seed: u64) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut d = DraftLength::new(MIN, MAX);
    let (mut drafting, mut len_sum, mut accepted_sum) = (0usize, 0usize, 0usize);
    for step in 0..WARM_UP + STEPS {
        let n = d.next();
        assert!(n == 0 || (MIN..=MAX).contains(&n), "length {n}");
        let accepted = (0..n)
            .take_while(|_| rng.random::<f64>() < p_accept)
            .count();
        d.record(n, accepted);
        if step >= WARM_UP && n > 0 {
            drafting += 1;
            len_sum += n;
            accepted_sum += accepted;
        }
    }
    Outcome {
        drafting: drafting as f64 / STEPS as f64,
        mean_len: len_sum as f64 / drafting.max(1) as f64,
        accepted_per_step: accepted_sum as f64 / STEPS as f64,
        rate: d.acceptance_rate(),
    }
}

#[test]
fn never_accepted_drafts_almost_never() {
    let o = simulate(0.0, 1);
    eprintln!(
        "p=0.0: drafting {:.3}, mean length {:.2}",
        o.drafting, o.mean_len
    );
    // The issue asks for < 20%; the policy gives about 3 steps in 67 once the cool-down has
    // reached its cap.
    assert!(o.drafting < 0.08, "drafting on {:.3} of steps", o.drafting);
    assert!(o.drafting > 0.0, "it must keep probing");
    assert_eq!(o.mean_len, MIN as f64, "probes draft min tokens");
    assert_eq!(o.rate, 0.0);
}

#[test]
fn mostly_accepted_drafts_near_max() {
    let o = simulate(0.9, 2);
    eprintln!(
        "p=0.9: drafting {:.3}, mean length {:.2}, accepted/step {:.2}, rate {:.2}",
        o.drafting, o.mean_len, o.accepted_per_step, o.rate
    );
    assert!(o.drafting > 0.99, "drafting on {:.3} of steps", o.drafting);
    assert!(
        o.mean_len >= MAX as f64 - 1.5,
        "mean length {:.2}",
        o.mean_len
    );
    // At length 8, p = 0.9 yields 9 * (1 - 0.9^8) = 5.1 accepted tokens per draft on average.
    assert!(o.accepted_per_step > 4.3, "{:.2}", o.accepted_per_step);
    assert!((o.rate - 0.6).abs() < 0.15, "rate {:.2}", o.rate);
}

#[test]
fn sometimes_accepted_drafts_short() {
    let o = simulate(0.3, 3);
    eprintln!(
        "p=0.3: drafting {:.3}, mean length {:.2}, accepted/step {:.2}",
        o.drafting, o.mean_len, o.accepted_per_step
    );
    // Short drafts (long ones would almost surely be cut at the first token or two) ...
    assert!(o.mean_len < 2.5, "mean length {:.2}", o.mean_len);
    // ... but speculation stays on for a good share of steps since hits keep coming.
    assert!(o.drafting > 0.4, "drafting on {:.3} of steps", o.drafting);
}

#[test]
fn drafting_share_and_length_grow_with_the_acceptance_probability() {
    let outcomes: Vec<Outcome> = [0.0, 0.3, 0.6, 0.9, 1.0]
        .iter()
        .enumerate()
        .map(|(i, &p)| simulate(p, 10 + i as u64))
        .collect();
    for w in outcomes.windows(2) {
        assert!(w[1].drafting >= w[0].drafting);
        assert!(w[1].mean_len >= w[0].mean_len);
    }
    let all = outcomes.last().map_or(0.0, |o| o.mean_len);
    assert_eq!(all, MAX as f64, "always accepted: always max");
}
