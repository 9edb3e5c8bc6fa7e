#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod allocator;
mod cache;
mod pool;
mod prefix;

pub use allocator::{
    AllocatorConfig, BlockAllocator, BlockCopy, ConfigError, GroupConfig, MAX_BLOCK_SIZE, RELEASED,
    SeqId, blocks_for_budget, blocks_for_token_budget, check_block_size, kv_bytes_per_token,
};
pub use cache::{KvBudget, KvCacheConfig, KvOptions, PagedKvCache, SequenceCache};
pub use ember_kernels::KvDtype;

/// Why a KV cache or allocator call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    /// An append would take the sequence past the cache's `max_seq_len` (the context size).
    #[error(
        "context is full: {used} tokens cached + {requested} new exceeds the context size of {capacity} tokens"
    )]
    ContextFull {
        /// Positions the sequence already has.
        used: usize,
        /// Positions the append asked for.
        requested: usize,
        /// The context size.
        capacity: usize,
    },
    /// A layer index past the cache's last layer.
    #[error("layer {layer} out of range ({layers} layers)")]
    NoSuchLayer {
        /// The layer given.
        layer: usize,
        /// Layers in the cache.
        layers: usize,
    },
    /// The allocator configuration was refused.
    #[error("invalid KV allocator config: {0}")]
    Config(#[from] ConfigError),
    /// A sequence id this allocator does not hold (never made here, or already freed).
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    /// A KV group index past the last group.
    #[error("KV group {group} out of range ({groups} groups)")]
    NoSuchGroup {
        /// The group given.
        group: usize,
        /// Groups in the allocator.
        groups: usize,
    },
    /// A group's pool has too few free blocks for an append: the caller may free or preempt a
    /// sequence and retry.
    #[error("KV group {group} is out of blocks: {needed} needed, {free} free")]
    OutOfBlocks {
        /// The group that ran out.
        group: usize,
        /// Blocks the append needs there (copy-on-write included).
        needed: usize,
        /// Blocks free there.
        free: usize,
    },
    /// [`BlockAllocator::fork`] of a sequence with appended positions not yet committed.
    #[error("{seq} has {pending} uncommitted positions")]
    Uncommitted {
        /// The sequence.
        seq: SeqId,
        /// Its appended, uncommitted positions.
        pending: usize,
    },
    /// A truncate to a length whose queries would need window positions already released.
    #[error(
        "cannot truncate {seq} to {len}: KV group {group} already released positions before {released} that a query at {len} needs"
    )]
    ReleasedPositions {
        /// The sequence.
        seq: SeqId,
        /// The window group that released them.
        group: usize,
        /// The requested length.
        len: usize,
        /// Positions before this one are released in that group.
        released: usize,
    },
    /// The storage refused a write or copy: a bug in the caller, reported rather than panicking.
    #[error("KV storage: {0}")]
    Storage(String),
}
