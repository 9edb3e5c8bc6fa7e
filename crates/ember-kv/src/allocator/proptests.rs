//! State-machine test: random operations against a shadow model of the K/V storage.
//!
//! The storage is simulated as one `Option<u64>` per (group, block, slot). Appending applies the
//! returned [`BlockCopy`]s, then "writes" every new position: the value is a fingerprint of the
//! sequence's whole token prefix up to that position (K/V at `p` depends on tokens `0..=p`).
//! After every operation, reading each live position of each sequence through its block tables
//! must give that sequence's fingerprint: this catches wrong prefix hits (collisions included:
//! some cases run with deliberately weak hashes), missing copy-on-write and any block shared by
//! mistake.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use super::tests::{full, win};
use super::*;

#[derive(Clone, Copy, Debug)]
enum HashKind {
    Strong,
    /// Few distinct values: collisions everywhere.
    Weak,
    /// Ignores the parent: equal blocks after different prefixes collide.
    Parentless,
}

#[derive(Clone, Debug)]
struct Setup {
    config: AllocatorConfig,
    hash: HashKind,
}

#[derive(Clone, Debug)]
enum Op {
    /// Add a sequence, append the uncached rest of the prompt, maybe commit.
    Add(Vec<u32>, bool),
    Append(usize, Vec<u32>),
    Commit(usize),
    Fork(usize),
    Truncate(usize, usize),
    Free(usize),
    /// Any call on a freed id.
    Stale(usize),
}

fn setup() -> impl Strategy<Value = Setup> {
    let groups = prop_oneof![
        (4usize..48).prop_map(|n| vec![full(n)]),
        (4usize..48, 1usize..9, 3usize..32).prop_map(|(n, w, m)| vec![full(n), win(w, m)]),
        (1usize..9, 3usize..32).prop_map(|(w, m)| vec![win(w, m)]),
    ];
    let hash = prop_oneof![
        3 => Just(HashKind::Strong),
        1 => Just(HashKind::Weak),
        1 => Just(HashKind::Parentless),
    ];
    (1usize..5, groups, prop::bool::weighted(0.85), hash).prop_map(
        |(block_size, groups, prefix_caching, hash)| Setup {
            config: AllocatorConfig {
                block_size,
                groups,
                prefix_caching,
            },
            hash,
        },
    )
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    // A 3-token alphabet, so prompts share prefixes often.
    let toks = |max| prop::collection::vec(0u32..3, 0..max);
    let op = prop_oneof![
        3 => (toks(24), any::<bool>()).prop_map(|(p, c)| Op::Add(p, c)),
        4 => (any::<usize>(), toks(8)).prop_map(|(i, t)| Op::Append(i, t)),
        3 => any::<usize>().prop_map(Op::Commit),
        2 => any::<usize>().prop_map(Op::Fork),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(i, l)| Op::Truncate(i, l)),
        2 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::Stale),
    ];
    prop::collection::vec(op, 1..80)
}

/// How often the interesting paths ran (to check the strategy reaches them).
#[derive(Debug, Default)]
struct Stats {
    prefix_hits: usize,
    copies: usize,
    evictions: usize,
    releases: usize,
    out_of_blocks: usize,
    refused_truncates: usize,
}

struct Model {
    a: BlockAllocator,
    bs: usize,
    live: Vec<SeqId>,
    freed: Vec<SeqId>,
    /// Per sequence: tokens and prefix fingerprints.
    expect: HashMap<SeqId, (Vec<u32>, Vec<u64>)>,
    /// Per group: `n_blocks * block_size` slots.
    storage: Vec<Vec<Option<u64>>>,
    stats: Stats,
}

fn fingerprint(prev: Option<&u64>, token: u32) -> u64 {
    let mut h = DefaultHasher::new();
    (prev, token).hash(&mut h);
    h.finish()
}

fn push_tokens(entry: &mut (Vec<u32>, Vec<u64>), tokens: &[u32]) {
    for &t in tokens {
        let fp = fingerprint(entry.1.last(), t);
        entry.0.push(t);
        entry.1.push(fp);
    }
}

impl Model {
    fn new(setup: &Setup) -> Self {
        let config = setup.config.clone();
        let a = match setup.hash {
            HashKind::Strong => BlockAllocator::new(config),
            HashKind::Weak => BlockAllocator::with_chain_hash(config, |p, t| {
                (p ^ t.iter().map(|&x| u64::from(x)).sum::<u64>()) % 3
            }),
            HashKind::Parentless => BlockAllocator::with_chain_hash(config, |_, t| {
                t.iter().fold(7, |h, &x| h * 3 + u64::from(x))
            }),
        }
        .unwrap();
        let bs = setup.config.block_size;
        let storage = setup
            .config
            .groups
            .iter()
            .map(|g| vec![None; g.n_blocks * bs])
            .collect();
        Self {
            a,
            bs,
            live: Vec::new(),
            freed: Vec::new(),
            expect: HashMap::new(),
            storage,
            stats: Stats::default(),
        }
    }

    fn pick(&self, i: usize) -> Option<SeqId> {
        (!self.live.is_empty()).then(|| self.live[i % self.live.len()])
    }

    fn cached_blocks(&self) -> usize {
        (0..self.a.n_groups())
            .map(|g| {
                (0..self.a.total_blocks(g).unwrap() as u32)
                    .filter(|&b| self.a.is_cached(g, b))
                    .count()
            })
            .sum()
    }

    fn append(&mut self, id: SeqId, tokens: &[u32]) -> Result<(), TestCaseError> {
        let before = self.a.snapshot();
        let cached_before = self.cached_blocks();
        let old_len = self.a.len(id).unwrap();
        match self.a.append(id, tokens) {
            Ok(copies) => {
                self.stats.copies += copies.len();
                // Unregistering happens only on eviction or when overwriting a block's tail.
                if self.cached_blocks() < cached_before {
                    self.stats.evictions += 1;
                }
                for c in &copies {
                    prop_assert!(c.slots > 0 && c.slots < self.bs);
                    prop_assert_eq!(self.a.refcount(c.group, c.dst), 1);
                    let bs = self.bs;
                    let st = &mut self.storage[c.group];
                    for i in 0..c.slots {
                        st[c.dst as usize * bs + i] = st[c.src as usize * bs + i];
                    }
                }
                let e = self.expect.get_mut(&id).unwrap();
                push_tokens(e, tokens);
                for p in old_len..old_len + tokens.len() {
                    for g in 0..self.a.n_groups() {
                        let b = self.a.block_table(id, g).unwrap()[p / self.bs];
                        prop_assert_ne!(b, RELEASED, "write to a released block");
                        // Never write where another sequence (or the prefix cache) reads.
                        prop_assert_eq!(self.a.refcount(g, b), 1, "write to a shared block");
                        prop_assert!(!self.a.is_cached(g, b), "write to a cached block");
                        self.storage[g][b as usize * self.bs + p % self.bs] = Some(e.1[p]);
                    }
                }
            }
            Err(KvError::OutOfBlocks {
                group,
                needed,
                free,
            }) => {
                self.stats.out_of_blocks += 1;
                prop_assert!(needed > free);
                prop_assert_eq!(self.a.free_blocks(group), Ok(free));
                prop_assert_eq!(self.a.snapshot(), before, "failed append changed state");
            }
            Err(e) => return Err(TestCaseError::fail(format!("append: {e}"))),
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let bs = self.bs;
        match op {
            Op::Add(prompt, commit) => {
                let (id, cached) = self.a.add_sequence(prompt).unwrap();
                prop_assert_eq!(cached % bs, 0);
                prop_assert!(cached == 0 || cached < prompt.len());
                prop_assert!(self.a.prefix_caching() || cached == 0);
                if cached > 0 {
                    self.stats.prefix_hits += 1;
                }
                prop_assert!(!self.live.contains(&id) && !self.freed.contains(&id));
                let mut e = (Vec::new(), Vec::new());
                push_tokens(&mut e, &prompt[..cached]);
                self.expect.insert(id, e);
                self.live.push(id);
                // The cached positions must read back right before anything else happens.
                self.check_reads()?;
                self.append(id, &prompt[cached..])?;
                if *commit {
                    self.a.commit(id).unwrap();
                }
            }
            Op::Append(i, tokens) => {
                if let Some(id) = self.pick(*i) {
                    self.append(id, tokens)?;
                }
            }
            Op::Commit(i) => {
                if let Some(id) = self.pick(*i) {
                    let released_before = self.released();
                    self.a.commit(id).unwrap();
                    prop_assert_eq!(self.a.committed_len(id), self.a.len(id));
                    if self.released() > released_before {
                        self.stats.releases += 1;
                    }
                }
            }
            Op::Fork(i) => {
                if let Some(id) = self.pick(*i) {
                    let before = self.a.snapshot();
                    let pending = self.a.len(id).unwrap() - self.a.committed_len(id).unwrap();
                    match self.a.fork(id) {
                        Ok(child) => {
                            prop_assert_eq!(pending, 0);
                            let e = self.expect[&id].clone();
                            self.expect.insert(child, e);
                            self.live.push(child);
                        }
                        Err(KvError::Uncommitted { seq, pending: p }) => {
                            prop_assert_eq!((seq, p), (id, pending));
                            prop_assert!(pending > 0);
                            prop_assert_eq!(self.a.snapshot(), before);
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("fork: {e}"))),
                    }
                }
            }
            Op::Truncate(i, l) => {
                if let Some(id) = self.pick(*i) {
                    let len = self.a.len(id).unwrap();
                    let new_len = l % (len + 1);
                    let before = self.a.snapshot();
                    match self.a.truncate(id, new_len) {
                        Ok(()) => {
                            let e = self.expect.get_mut(&id).unwrap();
                            e.0.truncate(new_len);
                            e.1.truncate(new_len);
                        }
                        Err(KvError::ReleasedPositions { group, .. }) => {
                            self.stats.refused_truncates += 1;
                            prop_assert_eq!(self.a.snapshot(), before);
                            // Refused only if a query at new_len would read a released
                            // position, or its write would land in a released block.
                            let w = self.a.window(group).unwrap().unwrap();
                            let table = self.a.block_table(id, group).unwrap();
                            let needed = (new_len + 1).saturating_sub(w)..new_len;
                            let read = needed.clone().any(|p| table[p / bs] == RELEASED);
                            let write =
                                !new_len.is_multiple_of(bs) && table[new_len / bs] == RELEASED;
                            prop_assert!(read || write, "needless refusal");
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("truncate: {e}"))),
                    }
                }
            }
            Op::Free(i) => {
                if let Some(id) = self.pick(*i) {
                    self.a.free(id).unwrap();
                    self.live.retain(|&s| s != id);
                    self.expect.remove(&id);
                    self.freed.push(id);
                }
            }
            Op::Stale(i) => {
                if !self.freed.is_empty() {
                    let id = self.freed[i % self.freed.len()];
                    let before = self.a.snapshot();
                    let unknown = KvError::UnknownSequence(id);
                    prop_assert_eq!(self.a.append(id, &[1]), Err(unknown.clone()));
                    prop_assert_eq!(self.a.commit(id), Err(unknown.clone()));
                    prop_assert_eq!(self.a.fork(id), Err(unknown.clone()));
                    prop_assert_eq!(self.a.truncate(id, 0), Err(unknown.clone()));
                    prop_assert_eq!(self.a.free(id), Err(unknown.clone()));
                    prop_assert_eq!(self.a.len(id), Err(unknown.clone()));
                    prop_assert_eq!(self.a.block_table(id, 0), Err(unknown));
                    prop_assert_eq!(self.a.snapshot(), before);
                }
            }
        }
        Ok(())
    }

    fn released(&self) -> usize {
        self.live
            .iter()
            .map(|&id| {
                (0..self.a.n_groups())
                    .map(|g| {
                        let t = self.a.block_table(id, g).unwrap();
                        t.iter().filter(|&&b| b == RELEASED).count()
                    })
                    .sum::<usize>()
            })
            .sum()
    }

    /// Every live position of every sequence reads back its own fingerprint.
    fn check_reads(&self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.a.n_seqs(), self.live.len());
        for &id in &self.live {
            let (tokens, fps) = &self.expect[&id];
            prop_assert_eq!(self.a.tokens(id).unwrap(), &tokens[..]);
            let committed = self.a.committed_len(id).unwrap();
            for g in 0..self.a.n_groups() {
                let table = self.a.block_table(id, g).unwrap();
                prop_assert_eq!(table.len(), tokens.len().div_ceil(self.bs));
                for (p, fp) in fps.iter().enumerate() {
                    let b = table[p / self.bs];
                    if b == RELEASED {
                        // Only positions no future query sees.
                        let w = self.a.window(g).unwrap();
                        prop_assert!(
                            w.is_some_and(|w| p + w <= committed),
                            "{} group {} position {} released too early",
                            id,
                            g,
                            p
                        );
                    } else {
                        let got = self.storage[g][b as usize * self.bs + p % self.bs];
                        prop_assert_eq!(got, Some(*fp), "{} group {} position {}", id, g, p);
                    }
                }
            }
        }
        Ok(())
    }
}

fn run(setup: &Setup, ops: &[Op]) -> Result<Stats, TestCaseError> {
    let mut m = Model::new(setup);
    for op in ops {
        m.apply(op)?;
        if let Err(e) = m.a.check_invariants() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        m.check_reads()?;
    }
    for id in std::mem::take(&mut m.live) {
        m.a.free(id).unwrap();
    }
    m.a.check_invariants().map_err(TestCaseError::fail)?;
    for g in 0..m.a.n_groups() {
        prop_assert_eq!(m.a.used_blocks(g), Ok(0));
        prop_assert_eq!(m.a.free_blocks(g), m.a.total_blocks(g));
    }
    Ok(m.stats)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn allocator_state_machine(setup in setup(), ops in ops()) {
        run(&setup, &ops)?;
    }
}

/// The generated cases do reach every interesting path (else the property test proves little).
#[test]
fn state_machine_reaches_every_path() {
    let mut runner = TestRunner::deterministic();
    let strategy = (setup(), ops());
    let mut total = Stats::default();
    for _ in 0..300 {
        let (setup, ops) = strategy.new_tree(&mut runner).unwrap().current();
        let s = run(&setup, &ops).unwrap();
        total.prefix_hits += s.prefix_hits;
        total.copies += s.copies;
        total.evictions += s.evictions;
        total.releases += s.releases;
        total.out_of_blocks += s.out_of_blocks;
        total.refused_truncates += s.refused_truncates;
    }
    let counts = [
        total.prefix_hits,
        total.copies,
        total.evictions,
        total.releases,
        total.out_of_blocks,
        total.refused_truncates,
    ];
    assert!(counts.iter().all(|&n| n > 0), "{total:?}");
}
