//! The paged KV cache's block allocator: bookkeeping only (block ids, reference counts, prefix
//! cache), no tensor storage.
//!
//! # Model
//!
//! A model's layers are split into KV *groups* (e.g. Gemma 3: full-attention layers and
//! window-512 layers). Each group has its own pool of `n_blocks` blocks of `block_size` token
//! slots and, per sequence, its own block table: position `p` lives in slot `p % block_size`
//! of block `table[p / block_size]`.
//!
//! # Protocol per forward pass
//!
//! 1. [`BlockAllocator::add_sequence`] with the prompt: returns how many prompt tokens are
//!    already cached (prefix caching); the sequence starts at that length.
//! 2. [`BlockAllocator::append`] with the tokens to run (the rest of the prompt, or a sampled
//!    token): reserves slots in every group and returns the [`BlockCopy`]s the storage must do
//!    *before* writing the new K/V (copy-on-write of a shared, partially filled last block).
//! 3. Run the model, writing K/V for the appended positions through the block tables.
//! 4. [`BlockAllocator::commit`]: registers newly full blocks in the prefix cache and releases
//!    window blocks that no future query can see. If the pass failed, call
//!    [`BlockAllocator::truncate`] back to the previous length instead.
//!
//! Commit only positions you keep: truncating *below* the committed length can fail in a
//! window group whose blocks the next query would need were already released (speculative
//! decoding should truncate rejected drafts before committing).
//!
//! # Sliding windows
//!
//! In a group with window `w`, a query at position `q` sees key `k` iff `k <= q && q - k < w`.
//! After committing length `L` every later query has `q >= L`, so position `p` is dead iff
//! `L - p >= w`, i.e. `p + w <= L`. Block `b` (positions `b*bs .. (b+1)*bs`) is dead iff its
//! last position is: `(b+1)*bs - 1 + w <= L`, so the dead blocks are exactly the first
//! `(L + 1 - w) / bs` ones (saturating). They are released at commit; their table entries
//! become [`RELEASED`] so that indices stay `p / block_size`.

use std::collections::HashMap;
use std::fmt;

use crate::KvError;
use crate::pool::{BlockPool, NIL};
use crate::prefix::{ChainHasher, PrefixRegistry};

/// Block table entry of a window-group block released because every future query is past it.
pub const RELEASED: u32 = u32::MAX;

/// A sequence handle. Ids are never reused within one allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    /// The raw id (for logs and maps; ids are only meaningful to the allocator that made them).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq#{}", self.0)
    }
}

/// One KV group: layers that share a block pool and block tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// `Some(w)`: sliding-window attention (a query at `q` sees keys `k` with `q - k < w`);
    /// `None`: full causal attention.
    pub window: Option<usize>,
    /// Blocks in this group's pool (see [`blocks_for_budget`]).
    pub n_blocks: usize,
}

/// Shape and policy of a [`BlockAllocator`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// Token slots per block: `1..=`[`MAX_BLOCK_SIZE`].
    pub block_size: usize,
    /// The KV groups (at least one); group `g` is index `g` in every call that takes a group.
    pub groups: Vec<GroupConfig>,
    /// Reuse the KV of full blocks whose whole token prefix matches.
    pub prefix_caching: bool,
}

/// Largest block size accepted. Blocks are allocated whole, so a block far larger than any
/// context only reserves memory nothing will use, and a huge one fails the allocation (an
/// abort, not an error); no kernel needs more than this.
pub const MAX_BLOCK_SIZE: usize = 4096;

/// Checks a block size against what the allocator and the stores accept: `1..=`
/// [`MAX_BLOCK_SIZE`] tokens (any value in between; no power of two is needed).
pub fn check_block_size(block_size: usize) -> Result<(), ConfigError> {
    match block_size {
        0 => Err(ConfigError::ZeroBlockSize),
        n if n > MAX_BLOCK_SIZE => Err(ConfigError::BlockSizeTooLarge {
            block_size: n,
            max: MAX_BLOCK_SIZE,
        }),
        _ => Ok(()),
    }
}

/// Why an [`AllocatorConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A block size of 0.
    #[error("block_size must be > 0")]
    ZeroBlockSize,
    /// A block size above [`MAX_BLOCK_SIZE`].
    #[error("block_size {block_size} exceeds the maximum of {max} tokens per block")]
    BlockSizeTooLarge {
        /// The block size given.
        block_size: usize,
        /// [`MAX_BLOCK_SIZE`].
        max: usize,
    },
    /// No groups.
    #[error("at least one KV group is needed")]
    NoGroups,
    /// A group with a sliding window of 0.
    #[error("group {group}: a sliding window must be > 0")]
    ZeroWindow {
        /// The group's index.
        group: usize,
    },
    /// A group with more blocks than `u32` ids can name (`u32::MAX` is reserved).
    #[error("group {group}: {n_blocks} blocks exceeds the maximum of {max}")]
    TooManyBlocks {
        /// The group's index.
        group: usize,
        /// Blocks asked for.
        n_blocks: usize,
        /// The most a group may have.
        max: usize,
    },
}

/// Copy slots `0..slots` of block `src` into block `dst` (both in `group`'s pool, every layer
/// of the group, K and V) before writing the appended positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    /// The KV group whose layers are copied.
    pub group: usize,
    /// The shared block to copy from.
    pub src: u32,
    /// The fresh block to copy into (now in the sequence's table instead of `src`).
    pub dst: u32,
    /// Filled slots to copy: `0..slots`.
    pub slots: usize,
}

/// K and V bytes one token takes in a group: `layers * n_kv_heads * head_dim * dtype_bytes * 2`
/// (saturating).
pub fn kv_bytes_per_token(
    layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype_bytes: usize,
) -> u64 {
    [layers, n_kv_heads, head_dim, dtype_bytes, 2]
        .iter()
        .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
}

/// Whole blocks that fit in `budget_bytes` when one token takes `bytes_per_token` bytes (see
/// [`kv_bytes_per_token`]); rounds down. A zero `bytes_per_token` or `block_size` gives 0
/// (no meaningful block), and so does a block larger than any `u64` budget.
pub fn blocks_for_budget(budget_bytes: u64, bytes_per_token: u64, block_size: usize) -> usize {
    match bytes_per_token.checked_mul(block_size as u64) {
        Some(per_block) if per_block > 0 => {
            usize::try_from(budget_bytes / per_block).unwrap_or(usize::MAX)
        }
        _ => 0,
    }
}

/// Whole blocks that fit in a budget of `budget_tokens` token slots; rounds down (0 for a zero
/// `block_size`).
pub fn blocks_for_token_budget(budget_tokens: usize, block_size: usize) -> usize {
    budget_tokens.checked_div(block_size).unwrap_or(0)
}

/// Blocks a window group can release once `committed` positions are committed (module docs).
fn dead_blocks(window: Option<usize>, committed: usize, bs: usize) -> usize {
    match window {
        None => 0,
        Some(w) => committed.saturating_add(1).saturating_sub(w) / bs,
    }
}

#[derive(Clone, Debug)]
struct Group {
    window: Option<usize>,
    pool: BlockPool,
    /// Per block: the prefix node whose KV it holds, or `NIL`.
    node_of: Vec<u32>,
}

impl Group {
    /// A block for new writes: the head of the free list, evicting the prefix it cached.
    fn alloc(&mut self, g: usize, registry: &mut PrefixRegistry) -> Option<u32> {
        let b = self.pool.take_lru()?;
        self.unregister(b, g, registry);
        Some(b)
    }

    fn unregister(&mut self, b: u32, g: usize, registry: &mut PrefixRegistry) {
        let n = std::mem::replace(&mut self.node_of[b as usize], NIL);
        if n != NIL {
            registry.unregister(n, g);
        }
    }

    fn drop_ref(&mut self, b: u32) {
        let cached = self.node_of[b as usize] != NIL;
        self.pool.release(b, cached);
    }
}

#[derive(Clone, Debug)]
struct Sequence {
    /// Every appended token (`len` of them).
    tokens: Vec<u32>,
    /// Positions whose K/V the model has written ([`BlockAllocator::commit`]).
    committed: usize,
    /// Prefix nodes of the committed full blocks, one reference each (prefix caching only; may
    /// stop short after a hash collision).
    nodes: Vec<u32>,
    /// `nodes[..registered]` have been offered to the groups' prefix maps.
    registered: usize,
    /// Per group: block ids, `ceil(len / block_size)` of them.
    tables: Vec<Vec<u32>>,
    /// Per group: the leading `released[g]` table entries are [`RELEASED`].
    released: Vec<usize>,
}

/// The paged KV-cache block allocator (see the module docs).
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    block_size: usize,
    prefix_caching: bool,
    groups: Vec<Group>,
    registry: PrefixRegistry,
    seqs: HashMap<SeqId, Sequence>,
    next_id: u64,
}

impl BlockAllocator {
    /// An allocator with every block free and no sequences; fails with [`KvError::Config`] on a
    /// bad block size, no groups, a zero window or too many blocks.
    pub fn new(config: AllocatorConfig) -> Result<Self, KvError> {
        Self::with_hasher(config, ChainHasher::new())
    }

    fn with_hasher(config: AllocatorConfig, hasher: ChainHasher) -> Result<Self, KvError> {
        check_block_size(config.block_size)?;
        if config.groups.is_empty() {
            return Err(ConfigError::NoGroups.into());
        }
        // Ids must stay below the `NIL`/`RELEASED` sentinel.
        let max = u32::MAX as usize;
        for (group, gc) in config.groups.iter().enumerate() {
            if gc.window == Some(0) {
                return Err(ConfigError::ZeroWindow { group }.into());
            }
            if gc.n_blocks > max {
                return Err(ConfigError::TooManyBlocks {
                    group,
                    n_blocks: gc.n_blocks,
                    max,
                }
                .into());
            }
        }
        let groups = config
            .groups
            .iter()
            .map(|gc| Group {
                window: gc.window,
                pool: BlockPool::new(gc.n_blocks),
                node_of: vec![NIL; gc.n_blocks],
            })
            .collect::<Vec<_>>();
        Ok(Self {
            block_size: config.block_size,
            prefix_caching: config.prefix_caching,
            registry: PrefixRegistry::new(groups.len(), hasher),
            groups,
            seqs: HashMap::new(),
            next_id: 0,
        })
    }

    /// An allocator whose chain hash is `f` (tests make it collide on purpose).
    #[cfg(test)]
    pub(crate) fn with_chain_hash(
        config: AllocatorConfig,
        f: fn(u64, &[u32]) -> u64,
    ) -> Result<Self, KvError> {
        Self::with_hasher(config, ChainHasher::custom(f))
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// KV groups (valid group indices are `0..n_groups`).
    pub fn n_groups(&self) -> usize {
        self.groups.len()
    }

    /// Live sequences.
    pub fn n_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// The live sequences, in no particular order (a scheduler that lost track of some after
    /// a fault frees what it no longer owns).
    pub fn seq_ids(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }

    /// Whether full blocks are shared between prompts that start the same way.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    fn group(&self, group: usize) -> Result<&Group, KvError> {
        self.groups.get(group).ok_or(KvError::NoSuchGroup {
            group,
            groups: self.groups.len(),
        })
    }

    fn seq(&self, seq: SeqId) -> Result<&Sequence, KvError> {
        self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))
    }

    /// The group's sliding window (`None`: full attention).
    pub fn window(&self, group: usize) -> Result<Option<usize>, KvError> {
        Ok(self.group(group)?.window)
    }

    /// Free blocks, including those still caching a prefix (they are evicted on demand).
    pub fn free_blocks(&self, group: usize) -> Result<usize, KvError> {
        Ok(self.group(group)?.pool.free())
    }

    /// Blocks referenced by at least one sequence.
    pub fn used_blocks(&self, group: usize) -> Result<usize, KvError> {
        Ok(self.group(group)?.pool.used())
    }

    /// Blocks in the group's pool, used or free.
    pub fn total_blocks(&self, group: usize) -> Result<usize, KvError> {
        Ok(self.group(group)?.pool.total())
    }

    /// Block ids of `seq` in `group`: position `p` is in `table[p / block_size]`, slot
    /// `p % block_size`; [`RELEASED`] entries (window groups only) are positions no future query
    /// sees. The table has `ceil(len / block_size)` entries.
    pub fn block_table(&self, seq: SeqId, group: usize) -> Result<&[u32], KvError> {
        let s = self.seq(seq)?;
        self.group(group)?;
        Ok(&s.tables[group])
    }

    /// Positions of `seq`, appended ones included.
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self.seq(seq)?.tokens.len())
    }

    /// Positions whose K/V was committed.
    pub fn committed_len(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self.seq(seq)?.committed)
    }

    /// The tokens at positions `0..len`.
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32], KvError> {
        Ok(&self.seq(seq)?.tokens)
    }

    /// Creates a sequence for `prompt` and returns it with the number of prompt tokens whose
    /// K/V is already cached; the sequence starts with that many positions (committed), and the
    /// caller appends `prompt[cached..]`.
    ///
    /// With prefix caching, `cached` is the longest prefix made of whole blocks such that:
    /// - the token prefix matches cached content exactly (hash hits are verified token by token
    ///   and parent by parent, so a collision is a miss);
    /// - every full-attention group holds all its blocks;
    /// - every window group (window `w`) holds the blocks a query at `cached` can see, i.e.
    ///   those after the first `(cached + 1 - w) / block_size` (the blocks [`commit`] would
    ///   have released at that length; the new table records those as [`RELEASED`]);
    /// - it is strictly less than `prompt.len()`, so at least one token is computed and yields
    ///   logits.
    ///
    /// It is shortened block by block until every group can serve it (possibly to 0). Matched
    /// blocks gain a reference (a free cached block leaves the free list). Without prefix
    /// caching `cached` is 0. Never fails today; the `Result` leaves room for limits.
    ///
    /// [`commit`]: Self::commit
    pub fn add_sequence(&mut self, prompt: &[u32]) -> Result<(SeqId, usize), KvError> {
        let bs = self.block_size;
        let chain = if self.prefix_caching {
            self.matched_chain(prompt)
        } else {
            Vec::new()
        };
        let j = self.servable_blocks(&chain);
        let cached = j * bs;
        let Self {
            groups,
            registry,
            seqs,
            next_id,
            ..
        } = self;
        let mut tables = Vec::with_capacity(groups.len());
        let mut released = Vec::with_capacity(groups.len());
        for (g, group) in groups.iter_mut().enumerate() {
            let first = dead_blocks(group.window, cached, bs).min(j);
            let mut table = vec![RELEASED; first];
            for &n in &chain[first..j] {
                let b = registry.block(n, g);
                group.pool.acquire(b);
                table.push(b);
            }
            tables.push(table);
            released.push(first);
        }
        for &n in &chain[..j] {
            registry.retain(n);
        }
        let id = SeqId(*next_id);
        *next_id += 1;
        seqs.insert(
            id,
            Sequence {
                tokens: prompt[..cached].to_vec(),
                committed: cached,
                nodes: chain[..j].to_vec(),
                registered: j,
                tables,
                released,
            },
        );
        Ok((id, cached))
    }

    /// Prefix nodes matching `prompt`'s leading full blocks, leaving at least one token out.
    fn matched_chain(&self, prompt: &[u32]) -> Vec<u32> {
        let bs = self.block_size;
        let max_blocks = prompt.len().saturating_sub(1) / bs;
        let mut chain = Vec::new();
        let mut parent = NIL;
        for block in prompt.chunks_exact(bs).take(max_blocks) {
            match self.registry.find(parent, block) {
                Some(n) => {
                    chain.push(n);
                    parent = n;
                }
                None => break,
            }
        }
        chain
    }

    /// The largest `j <= chain.len()` such that every group holds the blocks a query at
    /// `j * block_size` needs.
    fn servable_blocks(&self, chain: &[u32]) -> usize {
        // missing[g][i]: blocks among chain[..i] that group g does not hold.
        let missing: Vec<Vec<usize>> = (0..self.groups.len())
            .map(|g| {
                let mut m = Vec::with_capacity(chain.len() + 1);
                m.push(0);
                for &n in chain {
                    let last = m[m.len() - 1];
                    m.push(last + usize::from(self.registry.block(n, g) == NIL));
                }
                m
            })
            .collect();
        (1..=chain.len())
            .rev()
            .find(|&j| {
                self.groups.iter().zip(&missing).all(|(group, m)| {
                    let first = dead_blocks(group.window, j * self.block_size, self.block_size);
                    m[j] == m[first.min(j)]
                })
            })
            .unwrap_or(0)
    }

    /// Reserves positions `len .. len + tokens.len()` of `seq` in every group and records the
    /// tokens. Returns the copies the storage must do before writing those positions: when the
    /// last, partially filled block is shared (reference count > 1) it is copied to a fresh
    /// block first (copy-on-write). Fresh blocks come from the head of each free list, evicting
    /// the prefix a cached free block held.
    ///
    /// On [`KvError::OutOfBlocks`] (some group lacks free blocks) nothing has changed.
    pub fn append(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<BlockCopy>, KvError> {
        let bs = self.block_size;
        let Self {
            groups,
            registry,
            seqs,
            ..
        } = self;
        let s = seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))?;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let len = s.tokens.len();
        let have = len.div_ceil(bs);
        let want = (len + tokens.len()).div_ceil(bs);
        let partial = len % bs;
        // The last block is never released while partial: its positions are not dead yet.
        let shared =
            |group: &Group, table: &[u32]| partial > 0 && group.pool.refcount(table[have - 1]) > 1;
        // Check every group before touching any.
        for (g, group) in groups.iter().enumerate() {
            let needed = want - have + usize::from(shared(group, &s.tables[g]));
            let free = group.pool.free();
            if needed > free {
                return Err(KvError::OutOfBlocks {
                    group: g,
                    needed,
                    free,
                });
            }
        }
        let mut copies = Vec::new();
        for (g, group) in groups.iter_mut().enumerate() {
            let table = &mut s.tables[g];
            if partial > 0 {
                let src = table[have - 1];
                if shared(group, table) {
                    let dst = group.alloc(g, registry).ok_or(KvError::OutOfBlocks {
                        group: g,
                        needed: 1,
                        free: 0,
                    })?; // cannot fail: counted above
                    copies.push(BlockCopy {
                        group: g,
                        src,
                        dst,
                        slots: partial,
                    });
                    group.drop_ref(src);
                    table[have - 1] = dst;
                } else {
                    // Ours alone but still caching a full block's prefix (left by a truncate
                    // while shared): writing over its tail invalidates that entry.
                    group.unregister(src, g, registry);
                }
            }
            for _ in have..want {
                let b = group.alloc(g, registry).ok_or(KvError::OutOfBlocks {
                    group: g,
                    needed: 1,
                    free: 0,
                })?; // cannot fail: counted above
                table.push(b);
            }
        }
        s.tokens.extend_from_slice(tokens);
        Ok(copies)
    }

    /// Marks every appended position of `seq` as written. With prefix caching, newly full blocks
    /// enter their groups' prefix maps (unless another block already caches the same prefix);
    /// in window groups, blocks no future query can see are released (reference dropped; a
    /// block left unreferenced goes to the free list still caching its prefix) and their entries
    /// become [`RELEASED`].
    pub fn commit(&mut self, seq: SeqId) -> Result<(), KvError> {
        let bs = self.block_size;
        let Self {
            groups,
            registry,
            seqs,
            prefix_caching,
            ..
        } = self;
        let s = seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))?;
        s.committed = s.tokens.len();
        if *prefix_caching {
            for i in s.nodes.len()..s.committed / bs {
                let parent = i.checked_sub(1).map_or(NIL, |p| s.nodes[p]);
                match registry.acquire_child(parent, &s.tokens[i * bs..(i + 1) * bs]) {
                    Some(n) => s.nodes.push(n),
                    // Hash collision with another prefix: the rest is not cached.
                    None => break,
                }
            }
            for (i, &n) in s.nodes.iter().enumerate().skip(s.registered) {
                for (g, group) in groups.iter_mut().enumerate() {
                    let b = s.tables[g][i];
                    if b == RELEASED
                        || group.node_of[b as usize] != NIL
                        || registry.block(n, g) != NIL
                    {
                        continue;
                    }
                    registry.register(n, g, b);
                    group.node_of[b as usize] = n;
                }
            }
            s.registered = s.nodes.len();
        }
        for (g, group) in groups.iter_mut().enumerate() {
            let table = &mut s.tables[g];
            let dead = dead_blocks(group.window, s.committed, bs).min(table.len());
            for entry in &mut table[s.released[g].min(dead)..dead] {
                if *entry != RELEASED {
                    group.drop_ref(*entry);
                    *entry = RELEASED;
                }
            }
            s.released[g] = s.released[g].max(dead);
        }
        Ok(())
    }

    /// Forgets positions `len..` of `seq` (no-op if `len` is not shorter): rolls back an append
    /// whose forward pass failed, or rewinds. Blocks left empty lose a reference. A block left
    /// partially filled that was caching a full block's prefix stops doing so if the sequence
    /// holds it alone; if it is shared it keeps its entry and the next append copies it.
    ///
    /// Fails with [`KvError::ReleasedPositions`] (nothing changed) when a window group already
    /// released positions a query at `len` would need; truncating to the committed length or
    /// to 0 always works.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<(), KvError> {
        let bs = self.block_size;
        let Self {
            groups,
            registry,
            seqs,
            ..
        } = self;
        let s = seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))?;
        if len >= s.tokens.len() {
            return Ok(());
        }
        if len > 0 {
            for (g, group) in groups.iter().enumerate() {
                let Some(w) = group.window else { continue };
                // First position a query at `len` sees; the partial last block is written to.
                let mut first = (len + 1).saturating_sub(w);
                if !len.is_multiple_of(bs) {
                    first = first.min(len - len % bs);
                }
                if first < len && first / bs < s.released[g] {
                    return Err(KvError::ReleasedPositions {
                        seq,
                        group: g,
                        len,
                        released: s.released[g] * bs,
                    });
                }
            }
        }
        let keep = len.div_ceil(bs);
        for (g, group) in groups.iter_mut().enumerate() {
            let table = &mut s.tables[g];
            // Last blocks first, so they are the first of this sequence to be evicted.
            while table.len() > keep {
                if let Some(b) = table.pop()
                    && b != RELEASED
                {
                    group.drop_ref(b);
                }
            }
            s.released[g] = s.released[g].min(keep);
            if !len.is_multiple_of(bs) {
                let b = table[keep - 1];
                if b != RELEASED && group.pool.refcount(b) == 1 {
                    group.unregister(b, g, registry);
                }
            }
        }
        s.tokens.truncate(len);
        s.committed = s.committed.min(len);
        while s.nodes.len() > len / bs {
            if let Some(n) = s.nodes.pop() {
                registry.release(n);
            }
        }
        s.registered = s.registered.min(s.nodes.len());
        Ok(())
    }

    /// A new sequence sharing every block of `seq` (each gains a reference), e.g. for parallel
    /// sampling; writes to a shared partial block are copied on write. `seq` must have no
    /// uncommitted positions ([`KvError::Uncommitted`]).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId, KvError> {
        let s = self.seq(seq)?;
        if s.committed != s.tokens.len() {
            return Err(KvError::Uncommitted {
                seq,
                pending: s.tokens.len() - s.committed,
            });
        }
        let child = s.clone();
        for (group, table) in self.groups.iter_mut().zip(&child.tables) {
            for &b in table.iter().filter(|&&b| b != RELEASED) {
                group.pool.acquire(b);
            }
        }
        for &n in &child.nodes {
            self.registry.retain(n);
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, child);
        Ok(id)
    }

    /// Ends `seq`: every block loses a reference; blocks left unreferenced go to the free list
    /// still caching their prefix, the sequence's last blocks ahead of its first ones (evicted
    /// sooner: a later prompt is likelier to share the beginning).
    pub fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        for (group, table) in self.groups.iter_mut().zip(&s.tables) {
            for &b in table.iter().rev().filter(|&&b| b != RELEASED) {
                group.drop_ref(b);
            }
        }
        for &n in s.nodes.iter().rev() {
            self.registry.release(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
