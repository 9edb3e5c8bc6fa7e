//! The paged KV cache: the [`BlockAllocator`]'s bookkeeping plus one storage arena per layer.
//!
//! Layers are grouped by their attention window (Gemma 3: full layers and window-512 layers;
//! llama: one full group). Each group has its own block pool and block tables, and each layer
//! its own [`PagedLayerStore`] sized to its group's pool, laid out `[block][kv_head][slot]
//! [head_dim]`. The model writes a batch's K/V through [`PagedKvCache::write`] and reads them
//! back through [`PagedKvCache::attention`], which hands the attention kernel the layer's
//! store and the sequences' block tables.

use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use ember_kernels::{KvDtype, PagedAttention, PagedError, PagedLayerStore, SeqAttn, paged_write};

use crate::KvError;
use crate::allocator::{
    AllocatorConfig, BlockAllocator, GroupConfig, RELEASED, SeqId, blocks_for_budget,
    check_block_size,
};

/// How much memory the cache may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KvBudget {
    /// Room for this many token positions in every group (summed over sequences).
    Tokens(usize),
    /// At most this many MiB of K and V over all layers, split between groups in proportion
    /// to their per-token cost (each group then holds the same number of tokens).
    Mib(f64),
}

/// Shape and policy of a cache, fixed at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCacheConfig {
    /// Token slots per block.
    pub block_size: usize,
    /// How K and V values are stored.
    pub dtype: KvDtype,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Values per head (a multiple of 32 for [`KvDtype::Q8_0`]).
    pub head_dim: usize,
    /// Each layer's sliding window (`None`: full attention); its length is the layer count.
    pub layer_windows: Vec<Option<usize>>,
    /// How many blocks each group's pool gets.
    pub budget: KvBudget,
    /// Longest sequence (the context size): an append past it is [`KvError::ContextFull`].
    pub max_seq_len: usize,
    /// Reuse the KV of cached full blocks for a prompt that starts the same way.
    pub prefix_caching: bool,
    /// The device each layer runs on, where its K and V are kept
    /// ([`PagedLayerStore::new_on`]: a GPU device gets them in its memory); empty: every layer
    /// on the host. Otherwise one per layer.
    pub layer_devices: Vec<Device>,
}

impl KvCacheConfig {
    /// Bytes of K and V one token takes over all layers.
    pub fn bytes_per_token(&self) -> u64 {
        let per_layer = self
            .dtype
            .row_bytes(self.head_dim)
            .map_or(0, |row| row as u64 * self.n_kv_heads as u64 * 2);
        per_layer.saturating_mul(self.layer_windows.len() as u64)
    }
}

/// What a user picks for the cache at start-up; the model fills in the shape.
#[derive(Clone, Debug, PartialEq)]
pub struct KvOptions {
    /// How K and V values are stored (`--kv-type`).
    pub dtype: KvDtype,
    /// Token slots per block.
    pub block_size: usize,
    /// `None`: room for the requested context exactly.
    pub budget: Option<KvBudget>,
    /// Share the KV of full blocks between prompts that start the same way.
    pub prefix_caching: bool,
}

impl Default for KvOptions {
    /// f16 K and V as llama.cpp's default, blocks of 32 tokens, prefix caching on.
    fn default() -> Self {
        Self {
            dtype: KvDtype::F16,
            block_size: 32,
            budget: None,
            prefix_caching: true,
        }
    }
}

impl KvOptions {
    /// Checks what the user picked before anything is sized from it: the block size must be
    /// `1..=`[`MAX_BLOCK_SIZE`](crate::MAX_BLOCK_SIZE). [`PagedKvCache::new`] checks the same
    /// before it allocates, so this is only for refusing a bad value early.
    pub fn validate(&self) -> Result<(), KvError> {
        check_block_size(self.block_size)?;
        Ok(())
    }
}

/// The block of `table` (blocks of `bs` positions) holding `pos`, which must be allocated.
fn block_at(table: &[u32], pos: usize, bs: usize, seq: SeqId) -> Result<u32, KvError> {
    match table.get(pos / bs) {
        Some(&b) if b != RELEASED => Ok(b),
        _ => Err(KvError::Storage(format!(
            "position {pos} of {seq} has no block (append it first)"
        ))),
    }
}

/// A store-level failure (a bad block id or row length) is a bug in the caller or in the
/// allocator, never a user error; keep its message.
fn storage(e: PagedError) -> KvError {
    KvError::Storage(e.to_string())
}

/// A paged KV cache for many sequences: a [`BlockAllocator`] and one [`PagedLayerStore`] per
/// layer, each sized to its group's pool.
pub struct PagedKvCache {
    alloc: BlockAllocator,
    /// Group of each layer.
    layer_group: Vec<usize>,
    stores: Vec<Arc<PagedLayerStore>>,
    max_seq_len: usize,
    dtype: KvDtype,
}

impl PagedKvCache {
    /// Sizes the pools from `config.budget` and allocates every layer's arenas (zeroed lazily
    /// by the OS); fails on a bad block size or shape, or when the memory cannot be had.
    pub fn new(config: &KvCacheConfig) -> Result<Self, KvError> {
        // Before any size is derived from it: a huge block is one huge allocation (an abort).
        check_block_size(config.block_size)?;
        let bs = config.block_size;
        // One group per distinct window, in order of first appearance.
        let mut windows: Vec<Option<usize>> = Vec::new();
        let layer_group: Vec<usize> = config
            .layer_windows
            .iter()
            .map(|w| match windows.iter().position(|x| x == w) {
                Some(g) => g,
                None => {
                    windows.push(*w);
                    windows.len() - 1
                }
            })
            .collect();
        let tokens = match config.budget {
            KvBudget::Tokens(t) => t,
            KvBudget::Mib(mib) => {
                let bytes = (mib.max(0.0) * 1024.0 * 1024.0) as u64;
                let per_block = config.bytes_per_token().max(1);
                blocks_for_budget(bytes, per_block, bs).saturating_mul(bs)
            }
        };
        let n_blocks = tokens.div_ceil(bs);
        let groups = windows
            .iter()
            .map(|&window| GroupConfig { window, n_blocks })
            .collect();
        let alloc = BlockAllocator::new(AllocatorConfig {
            block_size: config.block_size,
            groups,
            prefix_caching: config.prefix_caching,
        })?;
        if !config.layer_devices.is_empty() && config.layer_devices.len() != layer_group.len() {
            return Err(KvError::Storage(format!(
                "{} layer devices for {} layers",
                config.layer_devices.len(),
                layer_group.len()
            )));
        }
        let stores = (0..layer_group.len())
            .map(|layer| {
                let (dtype, kv, d) = (config.dtype, config.n_kv_heads, config.head_dim);
                match config.layer_devices.get(layer) {
                    Some(device) => PagedLayerStore::new_on(dtype, n_blocks, bs, kv, d, device),
                    None => PagedLayerStore::new(dtype, n_blocks, bs, kv, d),
                }
                .map(Arc::new)
                .map_err(storage)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            alloc,
            layer_group,
            stores,
            max_seq_len: config.max_seq_len,
            dtype: config.dtype,
        })
    }

    /// The bookkeeping (block tables, counts), read-only.
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// How K and V values are stored.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Longest sequence the cache accepts (the context size).
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Layers (one store each).
    pub fn n_layers(&self) -> usize {
        self.stores.len()
    }

    /// Memory held by every layer's K and V arenas (reserved address space; pages are touched
    /// only as positions are written).
    pub fn bytes(&self) -> usize {
        self.stores.iter().map(|s| s.bytes()).sum()
    }

    /// Blocks referenced by some sequence, summed over groups.
    pub fn used_blocks(&self) -> usize {
        (0..self.alloc.n_groups())
            .filter_map(|g| self.alloc.used_blocks(g).ok())
            .sum()
    }

    /// Blocks in every group's pool, summed over groups.
    pub fn total_blocks(&self) -> usize {
        (0..self.alloc.n_groups())
            .filter_map(|g| self.alloc.total_blocks(g).ok())
            .sum()
    }

    /// Starts a sequence; returns it and how many leading prompt tokens are already cached
    /// (their K/V need not be computed again).
    pub fn add_sequence(&mut self, prompt: &[u32]) -> Result<(SeqId, usize), KvError> {
        self.alloc.add_sequence(prompt)
    }

    /// Positions of `seq`, appended ones included.
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.alloc.len(seq)
    }

    /// Reserves positions for `tokens` after the sequence's current length and performs the
    /// copy-on-write the allocator asks for. Refuses (changing nothing) past `max_seq_len` or
    /// when a pool is exhausted.
    pub fn append(&mut self, seq: SeqId, tokens: &[u32]) -> Result<(), KvError> {
        let used = self.alloc.len(seq)?;
        if used + tokens.len() > self.max_seq_len {
            return Err(KvError::ContextFull {
                used,
                requested: tokens.len(),
                capacity: self.max_seq_len,
            });
        }
        let copies = self.alloc.append(seq, tokens)?;
        for c in copies {
            for (store, _) in self
                .stores
                .iter_mut()
                .zip(&self.layer_group)
                .filter(|(_, g)| **g == c.group)
            {
                Arc::make_mut(store)
                    .copy_slots(c.src as usize, c.dst as usize, c.slots)
                    .map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Writes K and V of positions `start..start + n` of `seq` for `layer`: `k` and `v` are
    /// `[n, n_kv_heads * head_dim]`, row-major. The positions must have been appended.
    pub fn write(
        &mut self,
        layer: usize,
        seq: SeqId,
        start: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let group = self.group_of(layer)?;
        let table = self.alloc.block_table(seq, group)?;
        let store = &mut self.stores[layer];
        // Unique unless a lazy backend still holds the previous pass's view; then copy.
        let store = Arc::make_mut(store);
        let bs = store.block_size();
        let row = store.n_kv() * store.head_dim();
        if k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(KvError::Storage(format!(
                "k/v of {} and {} values are not rows of {row}",
                k.len(),
                v.len()
            )));
        }
        for (i, (kr, vr)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let pos = start + i;
            let block = block_at(table, pos, bs, seq)?;
            store
                .write(block as usize, pos % bs, kr, vr)
                .map_err(storage)?;
        }
        Ok(())
    }

    /// The window group whose block tables `layer` reads.
    fn group_of(&self, layer: usize) -> Result<usize, KvError> {
        let layers = self.stores.len();
        self.layer_group
            .get(layer)
            .copied()
            .ok_or(KvError::NoSuchLayer { layer, layers })
    }

    /// Whether `layer`'s K and V live on a GPU device (written with
    /// [`write_tensors`](Self::write_tensors), never crossing to the host).
    pub fn layer_on_device(&self, layer: usize) -> bool {
        self.stores.get(layer).is_some_and(|s| s.is_on_device())
    }

    /// [`write`](Self::write) for a batch, from tensors: `k` and `v` are `[rows, n_kv_heads,
    /// head_dim]` holding, for each `(seq, first_row, len)` of `batch` with its cached length
    /// `starts[i]` before the pass, positions `starts[i]..starts[i] + len` at rows
    /// `first_row..first_row + len`. On a layer kept on a GPU device the values stay there
    /// ([`paged_write`]); rows of no item are not stored.
    pub fn write_tensors(
        &mut self,
        layer: usize,
        batch: &[(SeqId, usize, usize)],
        starts: &[usize],
        k: Tensor<3>,
        v: Tensor<3>,
    ) -> Result<(), KvError> {
        let group = self.group_of(layer)?;
        let bs = self.stores[layer].block_size();
        let rows = k.dims()[0];
        let mut slots = Vec::with_capacity(rows);
        let mut kept = Vec::with_capacity(rows);
        for (&(seq, first, len), &start) in batch.iter().zip(starts) {
            let table = self.alloc.block_table(seq, group)?;
            for i in 0..len {
                let pos = start + i;
                let block = block_at(table, pos, bs, seq)?;
                slots.push(block * bs as u32 + (pos % bs) as u32);
                kept.push((first + i) as i64);
            }
        }
        let (k, v) = if kept.len() == rows && kept.iter().enumerate().all(|(i, &r)| r == i as i64) {
            (k, v)
        } else {
            let index = Tensor::<1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(kept, [slots.len()]),
                &k.device(),
            );
            (k.select(0, index.clone()), v.select(0, index))
        };
        let store = Arc::make_mut(&mut self.stores[layer]);
        paged_write(store, k, v, &slots).map_err(storage)
    }

    /// The attention kernel's view of `layer` for a batch: each entry is a sequence with its
    /// query rows `q_start..q_start + n_q`, the last `n_q` of its appended positions.
    pub fn attention(
        &self,
        layer: usize,
        batch: &[(SeqId, usize, usize)],
        scale: f32,
    ) -> Result<PagedAttention, KvError> {
        let layers = self.stores.len();
        let group = *self
            .layer_group
            .get(layer)
            .ok_or(KvError::NoSuchLayer { layer, layers })?;
        let window = self.alloc.window(group)?;
        let seqs = batch
            .iter()
            .map(|&(seq, q_start, n_q)| {
                let len = self.alloc.len(seq)?;
                Ok(SeqAttn {
                    q_start,
                    n_q,
                    n_past: len.saturating_sub(n_q),
                    block_table: self.alloc.block_table(seq, group)?.into(),
                    window,
                    path_rows: n_q,
                })
            })
            .collect::<Result<Vec<_>, KvError>>()?;
        Ok(PagedAttention {
            store: Arc::clone(&self.stores[layer]),
            seqs: seqs.into(),
            scale,
        })
    }

    /// Makes the appended positions permanent (prefix registration, window release).
    pub fn commit(&mut self, seq: SeqId) -> Result<(), KvError> {
        self.alloc.commit(seq)
    }

    /// Forgets positions from `len` on (also how a failed pass is rolled back).
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        self.alloc.truncate(seq, len)
    }

    /// A new sequence sharing every block of `seq` (see [`BlockAllocator::fork`]).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId, KvError> {
        self.alloc.fork(seq)
    }

    /// Ends a sequence and gives its blocks back (kept for prefix reuse until needed).
    pub fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        self.alloc.free(seq)
    }

    /// The live sequences (see [`BlockAllocator::seq_ids`]).
    pub fn sequences(&self) -> Vec<SeqId> {
        self.alloc.seq_ids()
    }
}

/// One sequence with a cache of its own: what single-stream callers (generation, perplexity,
/// bench) use.
pub struct SequenceCache {
    cache: PagedKvCache,
    seq: SeqId,
}

impl SequenceCache {
    /// A cache holding exactly one sequence of at most `config.max_seq_len` positions.
    pub fn new(config: &KvCacheConfig) -> Result<Self, KvError> {
        let mut cache = PagedKvCache::new(config)?;
        let (seq, _) = cache.add_sequence(&[])?;
        Ok(Self { cache, seq })
    }

    /// Positions cached, appended ones included.
    pub fn len(&self) -> usize {
        self.cache.len(self.seq).unwrap_or(0)
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most positions the sequence may hold (`max_seq_len`).
    pub fn capacity(&self) -> usize {
        self.cache.max_seq_len()
    }

    /// The one sequence's id in [`SequenceCache::cache`].
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// The cache and the sequence, for the calls that take both (append, write, attention).
    pub fn parts(&mut self) -> (&mut PagedKvCache, SeqId) {
        (&mut self.cache, self.seq)
    }

    /// The underlying cache, read-only.
    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) -> Result<(), KvError> {
        self.cache.truncate(self.seq, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(windows: Vec<Option<usize>>, tokens: usize, max_seq_len: usize) -> KvCacheConfig {
        KvCacheConfig {
            block_size: 4,
            dtype: KvDtype::F32,
            n_kv_heads: 2,
            head_dim: 8,
            layer_windows: windows,
            budget: KvBudget::Tokens(tokens),
            max_seq_len,
            prefix_caching: true,
            layer_devices: Vec::new(),
        }
    }

    /// K row of a token: its position and head in every value, so reads can be checked.
    fn kv_of(pos: usize) -> Vec<f32> {
        (0..16).map(|i| (pos * 100 + i / 8) as f32).collect()
    }

    fn step(cache: &mut PagedKvCache, seq: SeqId, tok: u32) {
        let pos = cache.len(seq).unwrap();
        cache.append(seq, &[tok]).unwrap();
        for layer in 0..cache.n_layers() {
            cache
                .write(layer, seq, pos, &kv_of(pos), &kv_of(pos))
                .unwrap();
        }
        cache.commit(seq).unwrap();
    }

    /// Reads position `pos` of `seq` in `layer` back through the attention view's table.
    fn read(cache: &PagedKvCache, layer: usize, seq: SeqId, pos: usize) -> f32 {
        let n = cache.len(seq).unwrap();
        let view = cache.attention(layer, &[(seq, 0, n)], 1.0).unwrap();
        let block = view.seqs[0].block_table[pos / 4] as usize;
        let mut row = [0.0f32; 8];
        view.store.k_row_f32(block, 1, pos % 4, &mut row).unwrap();
        row[0]
    }

    /// `write_tensors` for a batch of two sequences (rows not in order of the sequences, and
    /// one row of no sequence) stores what `write` stores per sequence, in both layer groups.
    #[test]
    fn write_tensors_stores_what_write_stores() {
        let device = burn::tensor::Device::flex();
        let mut a = PagedKvCache::new(&config(vec![None, Some(8)], 64, 64)).unwrap();
        let mut b = PagedKvCache::new(&config(vec![None, Some(8)], 64, 64)).unwrap();
        let (s0, _) = a.add_sequence(&[]).unwrap();
        let (t0, _) = b.add_sequence(&[]).unwrap();
        let (s1, _) = a.add_sequence(&[]).unwrap();
        let (t1, _) = b.add_sequence(&[]).unwrap();
        // Sequence 0 gets 6 positions, then 3 more with sequence 1's 5 in one batch.
        for (cache, seq) in [(&mut a, s0), (&mut b, t0)] {
            cache.append(seq, &[1; 6]).unwrap();
        }
        let rows: Vec<Vec<f32>> = (0..15).map(kv_of).collect();
        for layer in 0..2 {
            a.write(layer, s0, 0, &rows[..6].concat(), &rows[..6].concat())
                .unwrap();
            let t = |r: &[Vec<f32>]| {
                burn::tensor::Tensor::<3>::from_data(
                    burn::tensor::TensorData::new(r.concat(), [r.len(), 2, 8]),
                    &device,
                )
            };
            b.write_tensors(layer, &[(t0, 0, 6)], &[0], t(&rows[..6]), t(&rows[..6]))
                .unwrap();
        }
        for (seq, n) in [(s0, 3), (s1, 5)] {
            a.append(seq, &vec![2; n]).unwrap();
        }
        for (seq, n) in [(t0, 3), (t1, 5)] {
            b.append(seq, &vec![2; n]).unwrap();
        }
        // The batch: rows 0..5 are sequence 1, row 5 no one's, rows 6..9 sequence 0.
        let batch = [(t1, 0, 5), (t0, 6, 3)];
        let data: Vec<Vec<f32>> = rows[6..11]
            .iter()
            .chain([&vec![-1.0; 16]])
            .chain(&rows[11..14])
            .cloned()
            .collect();
        for layer in 0..2 {
            a.write(layer, s1, 0, &rows[6..11].concat(), &rows[6..11].concat())
                .unwrap();
            a.write(layer, s0, 6, &rows[11..14].concat(), &rows[11..14].concat())
                .unwrap();
            let t = burn::tensor::Tensor::<3>::from_data(
                burn::tensor::TensorData::new(data.concat(), [data.len(), 2, 8]),
                &device,
            );
            b.write_tensors(layer, &batch, &[0, 6], t.clone(), t)
                .unwrap();
        }
        for layer in 0..2 {
            for (sa, sb, n) in [(s0, t0, 9), (s1, t1, 5)] {
                let va = a.attention(layer, &[(sa, 0, n)], 1.0).unwrap();
                let vb = b.attention(layer, &[(sb, 0, n)], 1.0).unwrap();
                let ga = va.store.gather_f32(&va.seqs[0]).unwrap();
                let gb = vb.store.gather_f32(&vb.seqs[0]).unwrap();
                assert_eq!(ga, gb, "layer {layer}");
            }
        }
        // A position in no block of the sequence is refused (t1 has 5 positions: 2 blocks).
        let t = burn::tensor::Tensor::<3>::zeros([1, 2, 8], &device);
        assert!(
            b.write_tensors(0, &[(t1, 0, 1)], &[8], t.clone(), t)
                .is_err()
        );
    }

    #[test]
    fn window_layers_release_blocks_full_layers_keep_them() {
        let mut cache = PagedKvCache::new(&config(vec![None, Some(8)], 64, 64)).unwrap();
        let (seq, _) = cache.add_sequence(&[]).unwrap();
        for t in 0..40 {
            step(&mut cache, seq, t);
        }
        let a = cache.allocator();
        assert_eq!(
            a.used_blocks(0).unwrap(),
            10,
            "full group keeps every block"
        );
        // The window group keeps only what a query at 40 or later can still see.
        assert!(
            a.used_blocks(1).unwrap() <= 3,
            "{}",
            a.used_blocks(1).unwrap()
        );
        for pos in 0..40 {
            assert_eq!(read(&cache, 0, seq, pos), (pos * 100 + 1) as f32);
        }
        for pos in 33..40 {
            assert_eq!(read(&cache, 1, seq, pos), (pos * 100 + 1) as f32);
        }
        cache.free(seq).unwrap();
        assert_eq!(cache.used_blocks(), 0);
    }

    #[test]
    fn prefix_is_shared_and_copy_on_write_keeps_sequences_apart() {
        let mut cache = PagedKvCache::new(&config(vec![None, None], 64, 64)).unwrap();
        let prompt: Vec<u32> = (0..10).collect();
        let (a, cached) = cache.add_sequence(&prompt).unwrap();
        assert_eq!(cached, 0);
        for &t in &prompt {
            step(&mut cache, a, t);
        }
        let (b, cached) = cache.add_sequence(&prompt).unwrap();
        assert_eq!(cached, 8, "two full blocks of 4 reused");
        assert_eq!(
            cache.allocator().block_table(a, 0).unwrap()[..2],
            cache.allocator().block_table(b, 0).unwrap()[..2]
        );
        for &t in &prompt[8..] {
            step(&mut cache, b, t);
        }
        // A fork shares everything; writing its next token copies the partly filled block.
        let c = cache.fork(b).unwrap();
        let pos = cache.len(c).unwrap();
        cache.append(c, &[99]).unwrap();
        let other: Vec<f32> = vec![-1.0; 16];
        for layer in 0..2 {
            cache.write(layer, c, pos, &other, &other).unwrap();
        }
        cache.commit(c).unwrap();
        step(&mut cache, b, 7);
        assert_eq!(read(&cache, 0, c, pos), -1.0);
        assert_eq!(read(&cache, 0, b, pos), (pos * 100 + 1) as f32);
        for seq in [a, b, c] {
            for p in 0..10 {
                assert_eq!(read(&cache, 1, seq, p), (p * 100 + 1) as f32);
            }
            cache.free(seq).unwrap();
        }
        assert_eq!(cache.used_blocks(), 0);
    }

    #[test]
    fn full_context_and_exhausted_pool_are_typed_errors_that_change_nothing() {
        let mut cache = PagedKvCache::new(&config(vec![None], 8, 6)).unwrap();
        let (a, _) = cache.add_sequence(&[]).unwrap();
        let err = cache.append(a, &[0; 7]).unwrap_err();
        assert_eq!(
            err,
            KvError::ContextFull {
                used: 0,
                requested: 7,
                capacity: 6
            }
        );
        for t in 0..6 {
            step(&mut cache, a, t);
        }
        let (b, _) = cache.add_sequence(&[]).unwrap();
        let err = cache.append(b, &[1, 2, 3, 4, 5]).unwrap_err();
        assert!(
            matches!(err, KvError::OutOfBlocks { group: 0, .. }),
            "{err}"
        );
        assert_eq!(cache.len(b).unwrap(), 0);
        assert_eq!(cache.used_blocks(), 2);
        cache.free(a).unwrap();
        cache.append(b, &[1, 2, 3, 4, 5]).unwrap();
    }

    /// `--kv-block-size 1000000000` aborted with "memory allocation failed": one block of a
    /// billion slots was allocated before anything checked the size.
    #[test]
    fn oversized_or_zero_block_size_is_an_error_before_any_allocation() {
        use crate::{ConfigError, MAX_BLOCK_SIZE};
        for (bs, want) in [
            (
                1_000_000_000,
                ConfigError::BlockSizeTooLarge {
                    block_size: 1_000_000_000,
                    max: MAX_BLOCK_SIZE,
                },
            ),
            (
                MAX_BLOCK_SIZE + 1,
                ConfigError::BlockSizeTooLarge {
                    block_size: MAX_BLOCK_SIZE + 1,
                    max: MAX_BLOCK_SIZE,
                },
            ),
            (0, ConfigError::ZeroBlockSize),
        ] {
            let mut cfg = config(vec![None; 30], 64, 64);
            cfg.head_dim = 64;
            cfg.block_size = bs;
            let err = PagedKvCache::new(&cfg).err();
            assert_eq!(err, Some(KvError::Config(want.clone())), "block size {bs}");
            let opts = KvOptions {
                block_size: bs,
                ..KvOptions::default()
            };
            assert_eq!(opts.validate(), Err(KvError::Config(want)));
        }
        // The largest accepted size works, and so does one that is not a power of two.
        for bs in [MAX_BLOCK_SIZE, 3] {
            let mut cfg = config(vec![None], 64, 64);
            cfg.block_size = bs;
            let mut cache = PagedKvCache::new(&cfg).unwrap();
            let (seq, _) = cache.add_sequence(&[]).unwrap();
            cache.append(seq, &[1; 10]).unwrap();
            assert_eq!(cache.len(seq).unwrap(), 10);
        }
    }

    #[test]
    fn mib_budget_counts_every_layer() {
        let mut cfg = config(vec![None; 4], 0, 1024);
        cfg.dtype = KvDtype::F16;
        // 4 layers x 2 heads x 8 dims x 2 bytes x (K, V) = 256 bytes per token.
        assert_eq!(cfg.bytes_per_token(), 256);
        cfg.budget = KvBudget::Mib(1.0);
        let cache = PagedKvCache::new(&cfg).unwrap();
        assert_eq!(cache.total_blocks(), 4096 / 4);
        assert_eq!(cache.bytes(), 1024 * 1024);
    }
}
