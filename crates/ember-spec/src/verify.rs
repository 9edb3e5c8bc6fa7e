//! The acceptance rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023).
//!
//! A drafted token `x ~ q` is kept with probability `min(1, p(x) / q(x))`; on rejection a
//! replacement is drawn from `normalize(max(0, p - q))`. The output then has exactly the
//! target's distribution `p`, whatever `q` is: `P(out = t) = min(q(t), p(t)) +
//! P(reject) * max(0, p(t) - q(t)) / Z`, and `P(reject) = Z = sum max(0, p - q)`.
//!
//! Distributions are sparse (`(id, probability)` pairs) because proposers are usually
//! one-hot (prompt lookup, greedy drafts) or top-k truncated.

/// A distribution over token ids: `(id, probability)` pairs with probability > 0, summing to 1
/// (within rounding), ids unique, any order.
pub type Dist = [(u32, f64)];

/// The outcome of checking one drafted token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the drafted token and go on to the next drafted position.
    Accepted,
    /// Output `token` instead and drop the rest of the draft.
    Rejected {
        /// The replacement, drawn from the residual `max(0, p - q)`.
        token: u32,
    },
}

/// Above this many entries `q` is looked up by binary search (in a sorted copy unless it is
/// already sorted by id) instead of a linear scan, so that full-vocabulary distributions
/// stay O(n log n) rather than O(n^2).
const LINEAR_LOOKUP_MAX: usize = 32;

/// Target distribution `p`, proposal distribution `q`, drafted token `x` (drawn from `q`),
/// two independent uniforms in [0, 1). Accept `x` with probability `min(1, p(x)/q(x))` (i.e.
/// accept iff `u_accept < p(x)/q(x)`); on rejection draw from `normalize(max(0, p - q))` using
/// `u_resample`. If `q(x)` is 0 (caller bug) treat as reject. If the residual has no mass
/// (rounding), draw from `p`. If `p` has no mass either (caller bug), `Rejected { token: x }`:
/// the drafted token is kept but the rest of the draft is dropped.
pub fn verify(p: &Dist, q: &Dist, x: u32, u_accept: f64, u_resample: f64) -> Verdict {
    let qx = mass(q, x);
    if qx > 0.0 {
        let px = mass(p, x);
        // `px >= qx` accepts outright, so a uniform of exactly 1.0 (or NaN) from a sloppy RNG
        // cannot reject a token the target likes at least as much as the draft.
        if px >= qx || u_accept < px / qx {
            return Verdict::Accepted;
        }
    }
    let token = if q.len() <= LINEAR_LOOKUP_MAX {
        draw_residual(p, |id| mass(q, id), u_resample)
    } else if q.is_sorted_by_key(|&(id, _)| id) {
        // Full-vocabulary distributions usually come in id order: no copy needed.
        draw_residual(p, |id| sorted_mass(q, id), u_resample)
    } else {
        let mut sorted: Vec<(u32, f64)> = q.to_vec();
        sorted.sort_unstable_by_key(|&(id, _)| id);
        draw_residual(p, |id| sorted_mass(&sorted, id), u_resample)
    };
    Verdict::Rejected {
        token: token.or_else(|| draw(p, u_resample)).unwrap_or(x),
    }
}

/// Inverse-CDF draw from `dist` in its given order with uniform `u`; falls back to the last
/// id with positive mass on rounding. Never panics; an empty dist (or one without positive
/// mass) returns `None`.
pub fn draw(dist: &Dist, u: f64) -> Option<u32> {
    let mut cum = 0.0;
    let mut last = None;
    for &(id, pr) in dist {
        let pr = positive(pr);
        if pr > 0.0 {
            cum += pr;
            last = Some(id);
            if u < cum {
                return Some(id);
            }
        }
    }
    last
}

/// A one-hot distribution at `id` (prompt lookup is a deterministic proposer; greedy targets
/// are one-hot too).
pub fn one_hot(id: u32) -> Vec<(u32, f64)> {
    vec![(id, 1.0)]
}

/// A probability as usable mass: negative and NaN count as nothing.
fn positive(pr: f64) -> f64 {
    if pr > 0.0 { pr } else { 0.0 }
}

/// The probability of `id` in `dist` (0 when absent).
fn mass(dist: &Dist, id: u32) -> f64 {
    dist.iter()
        .find(|&&(i, _)| i == id)
        .map_or(0.0, |&(_, pr)| positive(pr))
}

/// The probability of `id` in `dist` sorted by id (0 when absent).
fn sorted_mass(sorted: &Dist, id: u32) -> f64 {
    match sorted.binary_search_by_key(&id, |&(i, _)| i) {
        Ok(i) => positive(sorted[i].1),
        Err(_) => 0.0,
    }
}

/// Draw from `normalize(max(0, p - q))` in `p`'s order (ids outside `p` have no residual).
/// `None` when the residual has no mass.
fn draw_residual(p: &Dist, q_of: impl Fn(u32) -> f64, u: f64) -> Option<u32> {
    let residual = |&(id, pr): &(u32, f64)| (id, (positive(pr) - q_of(id)).max(0.0));
    let total: f64 = p.iter().map(|e| residual(e).1).sum();
    if !(total > 0.0 && total.is_finite()) {
        return None;
    }
    let target = u * total;
    let mut cum = 0.0;
    let mut last = None;
    for (id, r) in p.iter().map(residual) {
        if r > 0.0 {
            cum += r;
            last = Some(id);
            if target < cum {
                return Some(id);
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIFORMS: [f64; 6] = [0.0, 1e-12, 0.25, 0.5, 0.75, 1.0 - 1e-12];

    #[test]
    fn greedy_accepts_iff_the_draft_is_the_argmax() {
        for argmax in [0u32, 3, 7] {
            for x in 0u32..8 {
                for &ua in &UNIFORMS {
                    for &ur in &UNIFORMS {
                        let v = verify(&one_hot(argmax), &one_hot(x), x, ua, ur);
                        let want = if x == argmax {
                            Verdict::Accepted
                        } else {
                            Verdict::Rejected { token: argmax }
                        };
                        assert_eq!(v, want, "argmax {argmax}, x {x}, u {ua} {ur}");
                    }
                }
            }
        }
    }

    #[test]
    fn acceptance_follows_the_ratio() {
        let p = [(1, 0.2), (2, 0.8)];
        let q = [(1, 0.8), (2, 0.2)];
        // p(1)/q(1) = 0.25.
        assert_eq!(verify(&p, &q, 1, 0.2499, 0.0), Verdict::Accepted);
        assert_eq!(
            verify(&p, &q, 1, 0.2501, 0.0),
            Verdict::Rejected { token: 2 }
        );
        // p(2) > q(2): always accepted, even for u = 1.
        for u in [0.0, 0.999, 1.0, f64::NAN] {
            assert_eq!(verify(&p, &q, 2, u, 0.0), Verdict::Accepted);
        }
    }

    #[test]
    fn rejection_draws_from_the_residual_only() {
        // Residual: id 1: 0, id 2: 0.1, id 3: 0.3 -> normalized 0.25 / 0.75.
        let p = [(1, 0.2), (2, 0.3), (3, 0.5)];
        let q = [(1, 0.6), (2, 0.2), (3, 0.2)];
        let r = |u| verify(&p, &q, 1, 0.99, u);
        assert_eq!(r(0.0), Verdict::Rejected { token: 2 });
        assert_eq!(r(0.2499), Verdict::Rejected { token: 2 });
        assert_eq!(r(0.2501), Verdict::Rejected { token: 3 });
        assert_eq!(r(0.9999), Verdict::Rejected { token: 3 });
    }

    #[test]
    fn draft_outside_p_is_always_rejected_and_p_only_ids_can_replace() {
        let p = [(4, 0.5), (5, 0.5)];
        let q = [(4, 0.5), (9, 0.5)];
        for &u in &UNIFORMS {
            // Residual is all on 5, which q lacks.
            assert_eq!(verify(&p, &q, 9, u, u), Verdict::Rejected { token: 5 });
        }
    }

    #[test]
    fn zero_q_of_x_is_a_rejection() {
        let p = [(1, 0.5), (2, 0.5)];
        let q = [(1, 1.0)];
        assert_eq!(verify(&p, &q, 2, 0.0, 0.0), Verdict::Rejected { token: 2 });
    }

    #[test]
    fn residual_without_mass_falls_back_to_p() {
        // p == q, but x is (wrongly) absent from q: the residual is zero everywhere.
        let p = [(1, 0.25), (2, 0.75)];
        assert_eq!(verify(&p, &p, 7, 0.0, 0.1), Verdict::Rejected { token: 1 });
        assert_eq!(verify(&p, &p, 7, 0.0, 0.9), Verdict::Rejected { token: 2 });
        // Nothing in p either: keep x, end the draft.
        assert_eq!(verify(&[], &p, 7, 0.0, 0.5), Verdict::Rejected { token: 7 });
    }

    #[test]
    fn large_q_uses_the_sorted_lookup_with_the_same_result() {
        // 100 ids: p favours even ids, q odd ones; compare with a brute-force residual draw.
        let n = 100u32;
        let p: Vec<(u32, f64)> = (0..n)
            .rev()
            .map(|i| (i, if i % 2 == 0 { 3.0 } else { 1.0 } / 200.0))
            .collect();
        let q_sorted: Vec<(u32, f64)> = (0..n)
            .map(|i| (i, if i % 2 == 0 { 1.0 } else { 3.0 } / 200.0))
            .collect();
        let mut q_shuffled = q_sorted.clone();
        q_shuffled.reverse();
        q_shuffled.swap(3, 70);
        for (q, k) in [&q_sorted, &q_shuffled]
            .into_iter()
            .flat_map(|q| (0..50).map(move |k| (q, k)))
        {
            let u = k as f64 / 50.0 + 0.001;
            let want = draw_residual(&p, |id| mass(q, id), u);
            assert_eq!(
                verify(&p, q, 1, 0.9, u),
                Verdict::Rejected {
                    token: want.unwrap_or(u32::MAX)
                }
            );
            // Residual lives on even ids only.
            assert!(matches!(want, Some(t) if t % 2 == 0));
        }
    }

    #[test]
    fn draw_is_inverse_cdf_in_given_order() {
        let d = [(9, 0.5), (3, 0.25), (4, 0.25)];
        assert_eq!(draw(&d, 0.0), Some(9));
        assert_eq!(draw(&d, 0.4999), Some(9));
        assert_eq!(draw(&d, 0.5), Some(3));
        assert_eq!(draw(&d, 0.7499), Some(3));
        assert_eq!(draw(&d, 0.75), Some(4));
        // Rounding: the cumulative sum falls short of u.
        let short = [(1, 0.3), (2, 0.3), (3, 0.3999999), (4, 0.0)];
        assert_eq!(draw(&short, 0.99999999), Some(3));
        assert_eq!(draw(&short, f64::NAN), Some(3));
        assert_eq!(draw(&[], 0.5), None);
        assert_eq!(draw(&[(1, 0.0), (2, -1.0)], 0.5), None);
        // Zero-mass entries are never drawn, even at u = 0.
        assert_eq!(draw(&[(1, 0.0), (2, 1.0)], 0.0), Some(2));
    }

    #[test]
    fn one_hot_is_one_entry_of_mass_one() {
        assert_eq!(one_hot(42), vec![(42, 1.0)]);
        assert_eq!(draw(&one_hot(42), 0.999), Some(42));
    }
}
