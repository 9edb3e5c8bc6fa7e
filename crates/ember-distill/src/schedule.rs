//! The learning-rate schedule: linear warmup, then cosine decay.

/// Linear warmup over `warmup` steps to `peak`, then a cosine from `peak` down to `min` at
/// step `total` (and `min` after it). Step numbers start at 0; the first warmup step already
/// takes `peak / warmup` (never a zero rate, which would waste the step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    /// The rate after warmup.
    pub peak: f64,
    /// The rate the cosine ends at.
    pub min: f64,
    /// Warmup steps (0: none).
    pub warmup: usize,
    /// All steps of the run.
    pub total: usize,
}

impl WarmupCosine {
    /// The rate for step `step`.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let done = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * done).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_minimum() {
        let s = WarmupCosine {
            peak: 1e-3,
            min: 1e-5,
            warmup: 10,
            total: 110,
        };
        assert_eq!(s.at(0), 1e-4);
        assert!((s.at(9) - 1e-3).abs() < 1e-15);
        assert!((s.at(10) - 1e-3).abs() < 1e-15);
        assert!((s.at(60) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-12);
        assert!((s.at(110) - 1e-5).abs() < 1e-15);
        assert!((s.at(500) - 1e-5).abs() < 1e-15);
        let rates: Vec<f64> = (10..=110).map(|i| s.at(i)).collect();
        assert!(rates.windows(2).all(|w| w[1] <= w[0]));
        let none = WarmupCosine { warmup: 0, ..s };
        assert_eq!(none.at(0), 1e-3);
    }
}
