//! The draft length, following how much of the recent drafts the target accepted.
//!
//! Policy, and why:
//!
//! - Start at `max`: a proposer is only switched on where it is expected to help, and long
//!   accepted runs should pay off from the first step.
//! - Every drafted token accepted: grow by 2 (capped at `max`). The draft was too short to
//!   find where the proposer goes wrong, so try longer.
//! - Some rejected: shrink toward `accepted + 1` (never below `min`), by a quarter of the gap
//!   and at least one token. `accepted + 1` is where the last draft went wrong, so slots past
//!   it were wasted; but even at a 90% per-token acceptance a draft of 8 is cut short more
//!   often than not, so jumping straight there would keep long runs from ever reaching `max`.
//!   Total failures are handled by the cool-down below, not by this rule.
//! - 3 verifications in a row with nothing accepted: cool down. `next` returns 0 (don't
//!   draft) for a number of calls that starts at 4 and doubles each time it happens again
//!   without an accepted token in between, up to 64; then drafting resumes at `min` (the
//!   probe), and 3 more failures cool down again. Any accepted token resets the cool-down
//!   length. Verifying a draft costs target work even when everything is rejected, so when
//!   the proposer never hits (free generation with prompt lookup) drafting falls to about 3
//!   steps in 67 and speculation never makes a run much slower than plain decoding, while
//!   the probes notice when the text starts repeating again.
//! - A step where the proposer had nothing to offer (`drafted == 0`, e.g. no n-gram match)
//!   says nothing about acceptance and changes nothing.
//! - A proposer that costs something per drafted token (a draft model, the target's first
//!   layers) has a break-even acceptance rate ([`DraftLength::with_break_even`]): its cost per
//!   token as a fraction of a target pass, plus the verification row's. While the running
//!   rate is below it, every verification starts a cool-down (doubling up to 256 calls) and
//!   any acceptance does not reset it: drafting then costs more than it saves, so only the
//!   probes run, which notice when the proposer becomes worth it again.

/// Growth after a fully accepted draft.
const GROW_STEP: usize = 2;
/// Consecutive verifications with nothing accepted that start a cool-down.
const ZERO_STREAK: u32 = 3;
/// Length (in `next` calls) of the first cool-down.
const COOLDOWN_START: u32 = 4;
/// Longest cool-down.
const COOLDOWN_MAX: u32 = 64;
/// Longest cool-down while the acceptance rate is below the break-even.
const COOLDOWN_MAX_COSTLY: u32 = 256;
/// Drafted tokens (weighted) the running rate needs before it is compared with the break-even.
const BREAK_EVEN_SAMPLES: f64 = 3.0;
/// Weight of the past in the running acceptance rate, per verification.
const RATE_DECAY: f64 = 0.9;

/// Draft length controller; see the module documentation for the policy.
#[derive(Clone, Debug)]
pub struct DraftLength {
    min: usize,
    max: usize,
    current: usize,
    /// Verifications in a row that accepted nothing.
    zero_streak: u32,
    /// `next` calls left that return 0.
    cooldown_left: u32,
    /// Length of the next cool-down.
    cooldown_next: u32,
    /// Exponentially weighted accepted and drafted token counts.
    accepted_ewma: f64,
    drafted_ewma: f64,
    /// Acceptance rate below which drafting costs more than it saves (0: never).
    break_even: f64,
}

impl DraftLength {
    /// Drafts between `min` and `max` tokens (min >= 1, max >= min, clamped).
    pub fn new(min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        DraftLength {
            min,
            max,
            current: max,
            zero_streak: 0,
            cooldown_left: 0,
            cooldown_next: COOLDOWN_START,
            accepted_ewma: 0.0,
            drafted_ewma: 0.0,
            break_even: 0.0,
        }
    }

    /// The acceptance rate a proposer must keep for drafting to pay: its cost per drafted
    /// token as a fraction of a target pass plus a verification row's (see the module
    /// documentation). Rates at or above 1 mean it never pays; it then only probes.
    pub fn with_break_even(mut self, rate: f64) -> Self {
        self.break_even = if rate.is_finite() { rate.max(0.0) } else { 0.0 };
        self
    }

    /// Whether the running acceptance rate is below the break-even.
    fn below_break_even(&self) -> bool {
        self.break_even > 0.0
            && self.drafted_ewma >= BREAK_EVEN_SAMPLES
            && self.acceptance_rate() < self.break_even
    }

    /// Tokens to draft this step: 0 means "don't draft now" (a cool-down after repeated
    /// failures), else in `min..=max`.
    // The engine is written against this name; it is not an iterator (it never ends).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> usize {
        if self.cooldown_left > 0 {
            self.cooldown_left -= 1;
            return 0;
        }
        self.current
    }

    /// What the last verification did: `drafted` tokens proposed, `accepted` of them accepted
    /// (clamped to `drafted`). `drafted == 0` (nothing proposed) changes nothing.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        let accepted = accepted.min(drafted);
        self.accepted_ewma = RATE_DECAY * self.accepted_ewma + accepted as f64;
        self.drafted_ewma = RATE_DECAY * self.drafted_ewma + drafted as f64;

        if self.below_break_even() {
            // Drafting loses time at this rate: only probes, further and further apart.
            self.current = self.min;
            self.zero_streak = 0;
            self.cooldown_left = self.cooldown_next;
            self.cooldown_next = self
                .cooldown_next
                .saturating_mul(2)
                .min(COOLDOWN_MAX_COSTLY);
            return;
        }
        if accepted > 0 {
            // Also ends a cool-down in progress, for a caller that drafted anyway.
            self.zero_streak = 0;
            self.cooldown_left = 0;
            self.cooldown_next = COOLDOWN_START;
        }
        if accepted == drafted {
            self.current = self.current.saturating_add(GROW_STEP).min(self.max);
            return;
        }

        let target = accepted.saturating_add(1).clamp(self.min, self.max);
        if target < self.current {
            self.current -= ((self.current - target) / 4).max(1);
        }
        if accepted == 0 {
            self.zero_streak += 1;
            if self.zero_streak >= ZERO_STREAK {
                self.current = self.min; // The probe after the cool-down is short.
                self.cooldown_left = self.cooldown_next;
                self.cooldown_next = self.cooldown_next.saturating_mul(2).min(COOLDOWN_MAX);
                self.zero_streak = 0;
            }
        }
    }

    /// The length `next` would give when not cooling down (during a cool-down: the probe's).
    pub fn current(&self) -> usize {
        self.current
    }

    /// Running (exponentially weighted, per drafted token) acceptance rate in [0, 1], for
    /// reports; 0 before anything was drafted.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted_ewma > 0.0 {
            self.accepted_ewma / self.drafted_ewma
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls of `next` until it returns non-zero, and that value.
    fn zeros_then_value(d: &mut DraftLength) -> (u32, usize) {
        let mut zeros = 0;
        loop {
            match d.next() {
                0 => zeros += 1,
                n => return (zeros, n),
            }
            assert!(zeros <= 1000, "endless cool-down");
        }
    }

    /// `ZERO_STREAK` drafts with nothing accepted; asserts none of them was refused.
    fn fail_streak(d: &mut DraftLength) {
        for _ in 0..ZERO_STREAK {
            let n = d.next();
            assert!(n > 0, "drafting was refused before the streak was complete");
            d.record(n, 0);
        }
    }

    #[test]
    fn new_clamps_and_starts_at_max() {
        let d = DraftLength::new(0, 0);
        assert_eq!((d.min, d.max, d.current()), (1, 1, 1));
        let mut d = DraftLength::new(5, 3);
        assert_eq!((d.min, d.max), (5, 5));
        assert_eq!(d.next(), 5);
        let mut d = DraftLength::new(2, 8);
        assert_eq!(d.next(), 8);
        assert_eq!(d.current(), 8);
        assert_eq!(d.acceptance_rate(), 0.0);
    }

    #[test]
    fn all_accepted_grows_by_two_up_to_max() {
        let mut d = DraftLength::new(1, 8);
        for (accepted, len) in [(1, 7), (1, 6), (1, 5)] {
            d.record(d.current(), accepted);
            assert_eq!(d.current(), len);
        }
        d.record(5, 5);
        assert_eq!(d.current(), 7);
        d.record(7, 7);
        assert_eq!(d.current(), 8);
        d.record(8, 8);
        assert_eq!(d.current(), 8);
    }

    #[test]
    fn partial_rejection_shrinks_toward_accepted_plus_one() {
        let mut d = DraftLength::new(2, 32);
        // Target 4: a quarter of the gap (28 / 4 = 7), then of what is left.
        d.record(32, 3);
        assert_eq!(d.current(), 25);
        d.record(25, 3);
        assert_eq!(d.current(), 20);
        for _ in 0..30 {
            d.record(d.current(), 3);
        }
        assert_eq!(d.current(), 4, "converges to accepted + 1 and stays");
        // A gap smaller than 4 still moves by one.
        d.record(4, 2);
        assert_eq!(d.current(), 3);
        // Never below min: one accepted targets 2 = min; zero accepted targets 1 -> min.
        d.record(3, 1);
        d.record(2, 1);
        assert_eq!(d.current(), 2);
        d.record(2, 0);
        assert_eq!(d.current(), 2);
        // A rejection never grows the length, even when more was drafted than asked.
        d.record(12, 9);
        assert_eq!(d.current(), 2);
    }

    #[test]
    fn nothing_proposed_changes_nothing() {
        let mut d = DraftLength::new(1, 6);
        d.record(6, 2);
        let before = format!("{d:?}");
        for _ in 0..10 {
            d.record(0, 0);
            d.record(0, 5);
        }
        assert_eq!(format!("{d:?}"), before);
        // Nor does it break a zero streak: two failures, nothing proposed, one failure is
        // three in a row.
        d.record(3, 0);
        d.record(3, 0);
        d.record(0, 0);
        assert_ne!(d.next(), 0);
        d.record(3, 0);
        assert_eq!(d.next(), 0);
    }

    #[test]
    fn accepted_is_clamped_to_drafted() {
        let mut d = DraftLength::new(1, 8);
        d.record(8, 1);
        d.record(2, 99); // Counts as all accepted.
        assert_eq!(d.current(), 8);
        assert!((d.acceptance_rate() - (0.9 + 2.0) / (0.9 * 8.0 + 2.0)).abs() < 1e-12);
    }

    #[test]
    fn repeated_failures_cool_down_with_doubling_then_probe_min() {
        let mut d = DraftLength::new(2, 8);
        let mut expect = COOLDOWN_START;
        for _ in 0..8 {
            fail_streak(&mut d);
            let (zeros, probe) = zeros_then_value(&mut d);
            assert_eq!(zeros, expect);
            assert_eq!(probe, 2, "the probe drafts min tokens");
            expect = (expect * 2).min(COOLDOWN_MAX);
        }
        assert_eq!(expect, COOLDOWN_MAX);
        // Capped: still 64 after more rounds.
        fail_streak(&mut d);
        assert_eq!(zeros_then_value(&mut d).0, COOLDOWN_MAX);
    }

    #[test]
    fn any_acceptance_resets_the_cool_down() {
        let mut d = DraftLength::new(1, 8);
        fail_streak(&mut d);
        assert_eq!(zeros_then_value(&mut d).0, COOLDOWN_START);
        fail_streak(&mut d);
        let (zeros, probe) = zeros_then_value(&mut d);
        assert_eq!(zeros, COOLDOWN_START * 2);
        // The probe hits: drafting resumes and grows, and the next cool-down is short again.
        d.record(probe, probe);
        assert_eq!(d.current(), 3);
        fail_streak(&mut d);
        assert_eq!(zeros_then_value(&mut d).0, COOLDOWN_START);
        // A partial hit counts as an acceptance too.
        fail_streak(&mut d);
        let (_, probe) = zeros_then_value(&mut d);
        d.record(probe + 1, 1);
        fail_streak(&mut d);
        assert_eq!(zeros_then_value(&mut d).0, COOLDOWN_START);
    }

    #[test]
    fn current_is_the_probe_length_during_a_cool_down() {
        let mut d = DraftLength::new(3, 12);
        fail_streak(&mut d);
        assert_eq!(d.next(), 0);
        assert_eq!(d.current(), 3);
        // A caller that drafts anyway and gets a hit ends the cool-down.
        d.record(3, 3);
        assert_eq!(d.next(), 5);
    }

    #[test]
    fn a_partial_hit_breaks_the_zero_streak() {
        let mut d = DraftLength::new(1, 8);
        for _ in 0..10 {
            d.record(d.current(), 0);
            d.record(d.current(), 0);
            d.record(4, 1);
        }
        assert_ne!(d.next(), 0);
    }

    #[test]
    fn acceptance_rate_is_weighted_toward_recent_drafts() {
        let mut d = DraftLength::new(1, 4);
        d.record(4, 4);
        assert_eq!(d.acceptance_rate(), 1.0);
        d.record(4, 2);
        // (0.9 * 4 + 2) / (0.9 * 4 + 4)
        assert!((d.acceptance_rate() - 5.6 / 7.6).abs() < 1e-12);
        for _ in 0..100 {
            d.record(4, 0);
        }
        assert!(d.acceptance_rate() < 1e-3);
    }

    #[test]
    fn below_the_break_even_only_probes() {
        // Half the acceptance a costly proposer needs: after the first verifications it
        // drafts on a small share of steps, and acceptances do not reset the cool-down.
        let mut d = DraftLength::new(1, 8).with_break_even(0.6);
        let (mut drafting, steps) = (0, 2000);
        for step in 0..steps {
            let k = d.next();
            if k > 0 {
                drafting += 1;
                // Every other token accepted: a 50% rate.
                let accepted = (k + step % 2) / 2;
                d.record(k, accepted);
            }
        }
        assert!(
            drafting * 20 < steps,
            "drafted on {drafting} of {steps} steps"
        );
        // A proposer well above its break-even drafts every step at full length.
        let mut d = DraftLength::new(1, 8).with_break_even(0.6);
        for _ in 0..50 {
            let k = d.next();
            assert!(k > 0);
            d.record(k, k);
        }
        assert_eq!(d.current(), 8);
    }
}
