//! The distillation loss.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// The teacher's distribution at some positions, kept as its top `k` logits (values and
/// token ids) per position: what is cached on disk so training never runs the teacher.
#[derive(Clone, Debug, PartialEq)]
pub struct TopK {
    /// Entries per position.
    pub k: usize,
    /// `positions * k` token ids, each position's in descending logit order.
    pub ids: Vec<u32>,
    /// `positions * k` logits, matching `ids`.
    pub logits: Vec<f32>,
}

impl TopK {
    /// The top `k` of each row of `rows` (ties: the lower id first). Rows must hold at least
    /// `k` values for the result to have `k` per position ([`crate::TeacherCache::build`]
    /// checks this).
    pub fn from_rows(rows: &[Vec<f32>], k: usize) -> Self {
        let mut ids = Vec::with_capacity(rows.len() * k);
        let mut logits = Vec::with_capacity(rows.len() * k);
        for row in rows {
            let k = k.min(row.len());
            if k == 0 {
                continue;
            }
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            order.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
                row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b))
            });
            let mut top: Vec<u32> = order[..k].to_vec();
            top.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            logits.extend(top.iter().map(|&i| row[i as usize]));
            ids.extend(top);
        }
        Self { k, ids, logits }
    }

    /// Positions held.
    pub fn positions(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }
}

/// KL(p_teacher ‖ q_student) at temperature `t`, averaged over positions, scaled by `t²` (so
/// its gradients keep their size across temperatures, as Hinton et al. do): the teacher's
/// distribution is its top-k logits renormalised (`softmax(top / t)` over the k), the
/// student's is its full softmax at `t`, read at the teacher's k ids.
///
/// `student: [b, s, V]`, `ids: [b, s, k]`, `teacher: [b, s, k]`; returns a one-element tensor.
pub fn kl_topk(
    student: Tensor<3>,
    ids: Tensor<3, Int>,
    teacher: Tensor<3>,
    temperature: f32,
) -> Tensor<1> {
    let [b, s, _] = student.dims();
    let log_q = log_softmax(student.div_scalar(temperature), 2).gather(2, ids);
    let log_p = log_softmax(teacher.div_scalar(temperature), 2);
    let p = log_p.clone().exp();
    (p * (log_p - log_q))
        .sum()
        .div_scalar((b * s) as f32)
        .mul_scalar(temperature * temperature)
}
