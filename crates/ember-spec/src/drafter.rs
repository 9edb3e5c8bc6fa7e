//! A proposer that runs a model: a smaller draft model with the target's vocabulary, or the
//! target itself limited to its first layers (self-speculation).
//!
//! The drafter has a paged KV cache of its own (for the draft model, or for the target's
//! first layers) and keeps each sequence in step with the target's: every
//! [`propose`](Drafter::propose) is given the target's whole context, keeps the longest
//! prefix it already holds, feeds what is missing and then drafts.
//!
//! Drafted tokens are written without a commit ([`PassOptions::defer_commit`]) and removed
//! first thing at the next call, so rejecting them is always possible, also in sliding-window
//! layers (a commit releases window blocks that a rollback would need) and without rejected
//! text entering the prefix cache. Only the target's own tokens are committed.

use std::collections::{HashMap, HashSet};

use burn::tensor::Tensor;
use ember_kv::{KvBudget, KvError, KvOptions, PagedKvCache, SeqId};
use ember_models::{BatchSeq, Logits, Model, ModelError, PassOptions, UBATCH};

/// Runs a draft model (or the target's first layers) over the target's sequences.
pub struct Drafter {
    /// `None`: every layer of a draft model; `Some(n)`: the target's first `n`.
    layers: Option<usize>,
    cache: PagedKvCache,
    ctx_size: usize,
    /// The cache sequence behind each handle: the one it was created with, or a newer one
    /// after a rollback the cache refused made the drafter start the sequence over.
    seqs: HashMap<DraftSeq, SeqId>,
}

/// A sequence of a [`Drafter`]: the id its cache first gave it (ids are never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DraftSeq(SeqId);

/// One sequence's part of a [`Drafter::propose`] call.
#[derive(Debug)]
pub struct DraftItem<'a> {
    /// The drafter's sequence that follows this target sequence.
    pub seq: DraftSeq,
    /// Everything the target's sequence holds: prompt and generated tokens; the last one has
    /// no K/V anywhere yet.
    pub context: &'a [u32],
    /// Tokens to propose at most (0: just catch up).
    pub max: usize,
    /// Filled by `propose` (cleared first; empty after an error).
    pub proposed: Vec<u32>,
}

impl Drafter {
    /// `layers`: `None` = every layer of `model` (a draft model); `Some(n)` = its first `n`
    /// (self-speculation; `1..n_layer`, else [`ModelError::SelfDraftLayers`]). The cache holds
    /// `budget_tokens` positions over all sequences (`kv.budget` is replaced by that), each
    /// at most `ctx_size`.
    pub fn new(
        model: &Model,
        layers: Option<usize>,
        kv: &KvOptions,
        ctx_size: usize,
        budget_tokens: usize,
    ) -> Result<Drafter, ModelError> {
        let n_layer = model.n_layers();
        let opts = KvOptions {
            budget: Some(KvBudget::Tokens(budget_tokens)),
            ..kv.clone()
        };
        let config = match layers {
            None => model.kv_config(&opts, ctx_size),
            Some(n) if n == 0 || n >= n_layer => {
                return Err(ModelError::SelfDraftLayers { layers: n, n_layer });
            }
            Some(n) => model.kv_config_layers(&opts, ctx_size, n),
        };
        Ok(Drafter {
            layers,
            cache: PagedKvCache::new(&config)?,
            ctx_size,
            seqs: HashMap::new(),
        })
    }

    /// A new, empty sequence (the first [`propose`](Self::propose) feeds its context).
    pub fn add_sequence(&mut self) -> Result<DraftSeq, ModelError> {
        let (sid, _) = self.cache.add_sequence(&[])?;
        let seq = DraftSeq(sid);
        self.seqs.insert(seq, sid);
        Ok(seq)
    }

    /// Ends `seq` and gives its blocks back; an unknown (or already freed) `seq` is ignored.
    pub fn free(&mut self, seq: DraftSeq) {
        if let Some(sid) = self.seqs.remove(&seq) {
            // It is live (the map only holds live sequences): this cannot fail.
            let _ = self.cache.free(sid);
        }
    }

    /// `None` for a draft model, `Some(n)` for self-speculation over the target's first `n`
    /// layers (as given to [`Drafter::new`]).
    pub fn layers(&self) -> Option<usize> {
        self.layers
    }

    /// The drafter's cache, read-only (block usage, and what each sequence holds).
    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    /// The cache sequence `seq` currently uses, if `seq` is live.
    pub fn cache_seq(&self, seq: DraftSeq) -> Option<SeqId> {
        self.seqs.get(&seq).copied()
    }

    /// For every item: brings the drafter's cache for `seq` to `context[..len - 1]` (dropping
    /// the last call's drafts and anything else not in `context`, so rejected drafts and
    /// context shifts are followed), feeds the missing context tokens (the last one at least)
    /// in batched passes of at most [`UBATCH`] tokens per item, then proposes up to `max`
    /// tokens: `choose(item_index, logits_row)` picks each one (`None` stops that item). All
    /// items advance together, one batched pass per drafted token. An item also stops when
    /// its next proposal would take the sequence past `ctx_size` positions (the target must
    /// hold the context and every proposal to verify them).
    ///
    /// `model` must be the one the drafter was made for (the draft model, or the target for
    /// self-speculation).
    ///
    /// # Errors
    ///
    /// Unknown or repeated sequences, an empty context or one longer than `ctx_size` are
    /// refused before anything changes. A pass that fails is rolled back, so the drafter stays
    /// consistent whatever the error: each sequence then holds a prefix of its context (the
    /// next call feeds the rest), and every `proposed` is empty. In particular
    /// [`KvError::OutOfBlocks`] (the drafter's budget is used up) says only that no draft is
    /// available this time: the caller decodes without one, and drafting can resume once
    /// sequences are freed.
    pub fn propose(
        &mut self,
        model: &Model,
        items: &mut [DraftItem<'_>],
        mut choose: impl FnMut(usize, &[f32]) -> Option<u32>,
    ) -> Result<(), ModelError> {
        for item in items.iter_mut() {
            item.proposed.clear();
        }
        let result = self.propose_inner(model, items, &mut choose);
        if result.is_err() {
            for item in items.iter_mut() {
                item.proposed.clear();
            }
        }
        result
    }

    fn propose_inner(
        &mut self,
        model: &Model,
        items: &mut [DraftItem<'_>],
        choose: &mut impl FnMut(usize, &[f32]) -> Option<u32>,
    ) -> Result<(), ModelError> {
        let mut seen = HashSet::with_capacity(items.len());
        let mut sids = Vec::with_capacity(items.len());
        for item in items.iter() {
            let sid = self
                .cache_seq(item.seq)
                .ok_or(KvError::UnknownSequence(item.seq.0))?;
            if !seen.insert(item.seq) {
                return Err(ModelError::DuplicateSequence(item.seq.0));
            }
            if item.context.is_empty() {
                return Err(ModelError::EmptyBatch);
            }
            if item.context.len() > self.ctx_size {
                return Err(KvError::ContextFull {
                    used: 0,
                    requested: item.context.len(),
                    capacity: self.ctx_size,
                }
                .into());
            }
            sids.push(sid);
        }
        for (item, sid) in items.iter().zip(sids.iter_mut()) {
            *sid = self.sync(item.seq, *sid, &item.context[..item.context.len() - 1])?;
        }
        let rows = self.catch_up(model, items, &sids)?;
        let n_vocab = model.config().n_vocab;
        let mut active = Vec::new();
        for (i, (item, row)) in items.iter_mut().zip(&rows).enumerate() {
            if let Some(row) = row
                && self.may_propose(item)
                && self.choose_next(i, item, row, n_vocab, choose)?
            {
                active.push(i);
            }
        }
        // One batched pass per drafted token: each active item feeds its last proposal.
        while !active.is_empty() {
            let last: Vec<[u32; 1]> = active
                .iter()
                .map(|&i| [items[i].proposed.last().copied().unwrap_or_default()])
                .collect();
            let batch: Vec<BatchSeq<'_>> = active
                .iter()
                .zip(&last)
                .map(|(&i, t)| BatchSeq {
                    seq: sids[i],
                    tokens: t,
                    logits: Some(Logits::Last),
                    solo_rows: None,
                })
                .collect();
            let logits = self.pass(model, &batch, true)?;
            let flat = host(logits, batch.len(), n_vocab)?;
            let mut still = Vec::with_capacity(active.len());
            for (&i, row) in active.iter().zip(flat.chunks_exact(n_vocab)) {
                if self.choose_next(i, &mut items[i], row, n_vocab, choose)? {
                    still.push(i);
                }
            }
            active = still;
        }
        Ok(())
    }

    /// Whether `item` may get another proposal: below its `max`, and the target can still
    /// hold it (the context and `k` proposals take `context.len() + k` positions).
    fn may_propose(&self, item: &DraftItem<'_>) -> bool {
        item.proposed.len() < item.max && item.context.len() + item.proposed.len() < self.ctx_size
    }

    /// Asks `choose` for item `i`'s next token from its logits `row`; returns whether the item
    /// goes on drafting.
    fn choose_next(
        &self,
        i: usize,
        item: &mut DraftItem<'_>,
        row: &[f32],
        n_vocab: usize,
        choose: &mut impl FnMut(usize, &[f32]) -> Option<u32>,
    ) -> Result<bool, ModelError> {
        let Some(t) = choose(i, row) else {
            return Ok(false);
        };
        if t as usize >= n_vocab {
            return Err(ModelError::TokenOutOfRange {
                id: t,
                vocab: n_vocab,
            });
        }
        item.proposed.push(t);
        Ok(self.may_propose(item))
    }

    /// Makes `seq` (cache sequence `sid`) hold a prefix of `keep` and returns its cache
    /// sequence. The last call's drafts go first (uncommitted, so this always works); then
    /// whatever differs from `keep`. If the cache refuses that rollback (window blocks it
    /// needs were released at a commit), or nothing is left, the sequence starts over, taking
    /// what the prefix cache still has of `keep`.
    fn sync(&mut self, seq: DraftSeq, sid: SeqId, keep: &[u32]) -> Result<SeqId, ModelError> {
        let committed = self.cache.allocator().committed_len(sid)?;
        self.cache.truncate(sid, committed)?;
        let held = self.cache.allocator().tokens(sid)?;
        let common = held.iter().zip(keep).take_while(|(a, b)| a == b).count();
        match self.cache.truncate(sid, common) {
            Ok(()) if common > 0 || keep.is_empty() => return Ok(sid),
            Ok(()) | Err(KvError::ReleasedPositions { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // The new sequence first: it shares the old one's blocks that it can use, and a
        // failure leaves the old one in place.
        let (new, _) = self.cache.add_sequence(keep)?;
        let _ = self.cache.free(sid);
        self.seqs.insert(seq, new);
        Ok(new)
    }

    /// Feeds every item's missing context tokens (committed: they are the target's), at most
    /// [`UBATCH`] per item per pass; returns each item's logits row after its last token.
    fn catch_up(
        &mut self,
        model: &Model,
        items: &[DraftItem<'_>],
        sids: &[SeqId],
    ) -> Result<Vec<Option<Vec<f32>>>, ModelError> {
        let n_vocab = model.config().n_vocab;
        let mut fed = sids
            .iter()
            .map(|&s| self.cache.len(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rows = vec![None; items.len()];
        loop {
            let mut batch = Vec::new();
            let mut who = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let n = item.context.len();
                if fed[i] >= n {
                    continue;
                }
                let end = n.min(fed[i] + UBATCH);
                batch.push(BatchSeq {
                    seq: sids[i],
                    tokens: &item.context[fed[i]..end],
                    logits: (end == n).then_some(Logits::Last),
                    solo_rows: None,
                });
                who.push(i);
            }
            if batch.is_empty() {
                return Ok(rows);
            }
            let logits = self.pass(model, &batch, false)?;
            let wanted = batch.iter().filter(|b| b.logits.is_some()).count();
            let flat = host(logits, wanted, n_vocab)?;
            let mut out = flat.chunks_exact(n_vocab);
            for (&i, b) in who.iter().zip(&batch) {
                fed[i] += b.tokens.len();
                if b.logits.is_some() {
                    rows[i] = out.next().map(<[f32]>::to_vec);
                }
            }
        }
    }

    fn pass(
        &mut self,
        model: &Model,
        batch: &[BatchSeq<'_>],
        defer_commit: bool,
    ) -> Result<Tensor<2>, ModelError> {
        let opts = PassOptions {
            layers: self.layers,
            defer_commit,
        };
        model.forward_batch_with(batch, &mut self.cache, opts)
    }
}

/// The `rows` logits rows of a pass, row-major.
fn host(logits: Tensor<2>, rows: usize, n_vocab: usize) -> Result<Vec<f32>, ModelError> {
    let flat = logits.into_data().try_to_vec::<f32>().unwrap_or_default();
    if flat.len() != rows * n_vocab {
        // The model always returns f32 logits of this shape; anything else is a bug there.
        return Err(ModelError::Unsupported(format!(
            "a pass returning {} logits for {rows} rows of {n_vocab}",
            flat.len()
        )));
    }
    Ok(flat)
}
