//! The prefix registry: which full blocks of tokens have cached KV, and where.
//!
//! A *node* stands for one exact token prefix that ends on a block boundary: its parent node
//! (the prefix one block shorter, or the root) plus its own block of tokens. Nodes are found
//! through a map keyed by the chain hash `hash(parent_hash, block_tokens)`, and every hit is
//! verified: the stored tokens must equal the looked-up ones and the stored parent must be the
//! very node matched one block earlier. A parent stays alive as long as any child does, so by
//! induction a matched node's content equals the prompt's prefix exactly; a hash collision costs
//! a cache miss, never wrong KV. (Comparing parent *hashes* instead would not be enough: after a
//! colliding parent is evicted and replaced, a surviving child would chain onto the wrong
//! prefix.)
//!
//! Each node records, per group, the pool block that holds its KV (if any). A node lives while
//! something references it: a registered block, a child node, or a sequence whose committed
//! tokens include it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use crate::pool::NIL;

/// Parent hash of a sequence's first block.
const ROOT_HASH: u64 = 0;

/// `hash(parent_hash, block_tokens)`, keyed per allocator (SipHash with random keys, so prompts
/// cannot be crafted to collide).
#[derive(Clone, Debug)]
pub(crate) struct ChainHasher {
    state: RandomState,
    #[cfg(test)]
    custom: Option<fn(u64, &[u32]) -> u64>,
}

impl ChainHasher {
    pub(crate) fn new() -> Self {
        Self {
            state: RandomState::new(),
            #[cfg(test)]
            custom: None,
        }
    }

    /// A deliberately weak hash, to test that collisions never serve wrong KV.
    #[cfg(test)]
    pub(crate) fn custom(f: fn(u64, &[u32]) -> u64) -> Self {
        Self {
            state: RandomState::new(),
            custom: Some(f),
        }
    }

    fn hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        #[cfg(test)]
        if let Some(f) = self.custom {
            return f(parent, tokens);
        }
        self.state.hash_one((parent, tokens))
    }
}

#[derive(Clone, Debug)]
struct Node {
    hash: u64,
    parent: u32,
    tokens: Box<[u32]>,
    /// Registered blocks + child nodes + sequence references; 0 means the slot is free.
    refs: u32,
    /// Per group: the block holding this prefix's KV, or `NIL`.
    blocks: Box<[u32]>,
}

#[derive(Clone, Debug)]
pub(crate) struct PrefixRegistry {
    nodes: Vec<Node>,
    free_slots: Vec<u32>,
    map: HashMap<u64, u32>,
    hasher: ChainHasher,
    n_groups: usize,
}

impl PrefixRegistry {
    pub(crate) fn new(n_groups: usize, hasher: ChainHasher) -> Self {
        Self {
            nodes: Vec::new(),
            free_slots: Vec::new(),
            map: HashMap::new(),
            hasher,
            n_groups,
        }
    }

    fn parent_hash(&self, parent: u32) -> u64 {
        if parent == NIL {
            ROOT_HASH
        } else {
            self.nodes[parent as usize].hash
        }
    }

    /// The node for `parent` + `tokens`, verified (see the module docs); `parent` is `NIL` for
    /// the first block.
    pub(crate) fn find(&self, parent: u32, tokens: &[u32]) -> Option<u32> {
        let h = self.hasher.hash(self.parent_hash(parent), tokens);
        let &n = self.map.get(&h)?;
        let node = &self.nodes[n as usize];
        (node.parent == parent && *node.tokens == *tokens).then_some(n)
    }

    /// A reference to the node for `parent` + `tokens`, created if needed. `None` when its hash
    /// is taken by a different prefix (a collision): that prefix simply is not cached.
    pub(crate) fn acquire_child(&mut self, parent: u32, tokens: &[u32]) -> Option<u32> {
        let h = self.hasher.hash(self.parent_hash(parent), tokens);
        if let Some(&n) = self.map.get(&h) {
            let node = &mut self.nodes[n as usize];
            if node.parent == parent && *node.tokens == *tokens {
                node.refs += 1;
                return Some(n);
            }
            return None;
        }
        let node = Node {
            hash: h,
            parent,
            tokens: tokens.into(),
            refs: 1,
            blocks: vec![NIL; self.n_groups].into(),
        };
        let n = match self.free_slots.pop() {
            Some(n) => {
                self.nodes[n as usize] = node;
                n
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        if parent != NIL {
            self.nodes[parent as usize].refs += 1;
        }
        self.map.insert(h, n);
        Some(n)
    }

    pub(crate) fn retain(&mut self, n: u32) {
        self.nodes[n as usize].refs += 1;
    }

    /// Drops one reference; a node left unreferenced is forgotten, and so, in turn, are
    /// ancestors that only it kept alive.
    pub(crate) fn release(&mut self, mut n: u32) {
        while n != NIL {
            let node = &mut self.nodes[n as usize];
            debug_assert!(node.refs > 0, "release of dead node {n}");
            node.refs = node.refs.saturating_sub(1);
            if node.refs > 0 {
                return;
            }
            let (h, parent) = (node.hash, node.parent);
            node.tokens = Box::new([]);
            node.parent = NIL;
            self.map.remove(&h);
            self.free_slots.push(n);
            n = parent;
        }
    }

    /// The block of `group` holding node `n`'s KV, or `NIL`.
    pub(crate) fn block(&self, n: u32, group: usize) -> u32 {
        self.nodes[n as usize].blocks[group]
    }

    /// Records that `block` of `group` holds node `n`'s KV (the caller checked the slot is
    /// empty).
    pub(crate) fn register(&mut self, n: u32, group: usize, block: u32) {
        let node = &mut self.nodes[n as usize];
        debug_assert_eq!(node.blocks[group], NIL);
        node.blocks[group] = block;
        node.refs += 1;
    }

    /// The block of `group` holding node `n` is being reused or overwritten.
    pub(crate) fn unregister(&mut self, n: u32, group: usize) {
        self.nodes[n as usize].blocks[group] = NIL;
        self.release(n);
    }

    #[cfg(test)]
    pub(crate) fn live_nodes(&self) -> usize {
        self.nodes.iter().filter(|n| n.refs > 0).count()
    }

    /// Checks the registry against the references the allocator holds: `seq_refs[n]` sequence
    /// references and `block_refs` (group, block, node) registrations.
    #[cfg(test)]
    pub(crate) fn check(
        &self,
        seq_refs: &HashMap<u32, u32>,
        block_refs: &[(usize, u32, u32)],
    ) -> Result<(), String> {
        let mut refs = vec![0u32; self.nodes.len()];
        for (&n, &r) in seq_refs {
            refs[n as usize] += r;
        }
        for &(g, b, n) in block_refs {
            if self.nodes[n as usize].blocks[g] != b {
                return Err(format!("group {g} block {b} says node {n}, node disagrees"));
            }
            refs[n as usize] += 1;
        }
        for node in &self.nodes {
            if node.refs > 0 && node.parent != NIL {
                refs[node.parent as usize] += 1;
            }
        }
        for (n, node) in self.nodes.iter().enumerate() {
            if node.refs != refs[n] {
                return Err(format!(
                    "node {n}: refs {} but {} references",
                    node.refs, refs[n]
                ));
            }
            if node.refs > 0 {
                if self.map.get(&node.hash) != Some(&(n as u32)) {
                    return Err(format!("live node {n} not in the map"));
                }
                for (g, &b) in node.blocks.iter().enumerate() {
                    if b != NIL && !block_refs.contains(&(g, b, n as u32)) {
                        return Err(format!(
                            "node {n} names group {g} block {b}, block disagrees"
                        ));
                    }
                }
            }
        }
        for (&h, &n) in &self.map {
            let node = &self.nodes[n as usize];
            if node.refs == 0 || node.hash != h {
                return Err(format!("map entry {h:#x} -> dead or mismatched node {n}"));
            }
        }
        Ok(())
    }
}
