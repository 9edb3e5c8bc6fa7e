//! The KV cache: keys and values of every past position, per layer.
//!
//! This first cache is contiguous: each layer holds one growing `[kv_heads, len, head_dim]`
//! tensor for keys and one for values. It enforces the context limit with a typed error (never
//! a silent truncation). The paged block pool replaces it in a later step.

use burn::tensor::Tensor;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error(
        "context is full: {used} tokens cached + {requested} new exceeds the context size of {capacity} tokens"
    )]
    ContextFull {
        used: usize,
        requested: usize,
        capacity: usize,
    },
    #[error("layer {layer} out of range ({layers} layers)")]
    NoSuchLayer { layer: usize, layers: usize },
}

/// One sequence's keys and values, contiguous per layer.
pub struct ContiguousKvCache {
    layers: Vec<Option<(Tensor<3>, Tensor<3>)>>,
    len: usize,
    capacity: usize,
}

impl ContiguousKvCache {
    /// A cache for `n_layers` layers holding at most `capacity` positions.
    pub fn new(n_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
            capacity,
        }
    }

    /// Positions already cached (committed by [`advance`](Self::advance)).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Checks that `n` more positions fit; call before running a batch through the layers.
    pub fn reserve(&self, n: usize) -> Result<(), KvError> {
        if self.len + n > self.capacity {
            return Err(KvError::ContextFull {
                used: self.len,
                requested: n,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Appends `k`, `v` (`[kv_heads, n, head_dim]`) for `layer` and returns that layer's whole
    /// keys and values `[kv_heads, len + n, head_dim]`. Positions become visible to the next call
    /// only after [`advance`](Self::advance), so every layer of one batch sees the same `len`.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor<3>,
        v: Tensor<3>,
    ) -> Result<(Tensor<3>, Tensor<3>), KvError> {
        let n = k.dims()[1];
        self.reserve(n)?;
        let layers = self.layers.len();
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or(KvError::NoSuchLayer { layer, layers })?;
        let (k_all, v_all) = match slot.take() {
            // Only the committed prefix is kept, so a batch that failed part-way (or a
            // truncate) cannot leave stale positions behind.
            Some((pk, pv)) if self.len > 0 => {
                let [h, _, d] = pk.dims();
                let pk = pk.slice([0..h, 0..self.len, 0..d]);
                let pv = pv.slice([0..h, 0..self.len, 0..d]);
                (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1))
            }
            _ => (k, v),
        };
        *slot = Some((k_all.clone(), v_all.clone()));
        Ok((k_all, v_all))
    }

    /// Commits `n` positions appended to every layer.
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }

    /// Forgets every position from `len` on (rewinding a sequence, e.g. to re-score).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.layers.iter_mut().for_each(|l| *l = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn t(vals: Vec<f32>, n: usize) -> Tensor<3> {
        Tensor::from_data(TensorData::new(vals, [1, n, 2]), &Device::flex())
    }

    #[test]
    fn appends_and_enforces_capacity() {
        let mut c = ContiguousKvCache::new(1, 3);
        let (k, _) = c
            .append(0, t(vec![1., 2., 3., 4.], 2), t(vec![0.; 4], 2))
            .unwrap();
        assert_eq!(k.dims(), [1, 2, 2]);
        c.advance(2);
        let (k, _) = c.append(0, t(vec![5., 6.], 1), t(vec![0.; 2], 1)).unwrap();
        assert_eq!(
            k.into_data().try_to_vec::<f32>().unwrap(),
            vec![1., 2., 3., 4., 5., 6.]
        );
        c.advance(1);
        let err = c
            .append(0, t(vec![7., 8.], 1), t(vec![0.; 2], 1))
            .unwrap_err();
        assert_eq!(
            err,
            KvError::ContextFull {
                used: 3,
                requested: 1,
                capacity: 3
            }
        );
        assert!(err.to_string().contains("context size of 3"));
    }

    #[test]
    fn uncommitted_positions_are_dropped() {
        let mut c = ContiguousKvCache::new(1, 8);
        c.append(0, t(vec![1., 2.], 1), t(vec![0.; 2], 1)).unwrap();
        c.advance(1);
        // Appended but never committed (e.g. the batch failed in a later layer).
        c.append(0, t(vec![9., 9.], 1), t(vec![0.; 2], 1)).unwrap();
        let (k, _) = c.append(0, t(vec![3., 4.], 1), t(vec![0.; 2], 1)).unwrap();
        assert_eq!(
            k.into_data().try_to_vec::<f32>().unwrap(),
            vec![1., 2., 3., 4.]
        );
    }
}
