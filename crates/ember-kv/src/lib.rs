//! The paged KV cache: keys and values of every past position, in fixed-size blocks.
//!
//! [`BlockAllocator`] is the bookkeeping half: block ids, reference counts, prefix caching and
//! sliding-window release, with no tensor storage (and no burn). [`PagedKvCache`] adds one
//! storage arena per layer (`ember_kernels::PagedLayerStore`, the layout the attention kernel
//! reads) and enforces the context limit with a typed error, never a silent truncation.
//! [`SequenceCache`] is a private cache for one sequence (generation, perplexity, bench).

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

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    #[error("invalid KV allocator config: {0}")]
    Config(#[from] ConfigError),
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("KV group {group} out of range ({groups} groups)")]
    NoSuchGroup { group: usize, groups: usize },
    #[error("KV group {group} is out of blocks: {needed} needed, {free} free")]
    OutOfBlocks {
        group: usize,
        needed: usize,
        free: usize,
    },
    #[error("{seq} has {pending} uncommitted positions")]
    Uncommitted { seq: SeqId, pending: usize },
    #[error(
        "cannot truncate {seq} to {len}: KV group {group} already released positions before {released} that a query at {len} needs"
    )]
    ReleasedPositions {
        seq: SeqId,
        group: usize,
        len: usize,
        released: usize,
    },
    /// The storage refused a write or copy: a bug in the caller, reported rather than panicking.
    #[error("KV storage: {0}")]
    Storage(String),
}
