use super::*;

/// Everything observable about the allocator's state, to check that a failed call changed
/// nothing.
#[derive(Debug, PartialEq)]
pub(super) struct Snapshot {
    /// Per sequence (by id): tokens, committed, nodes, registered, tables, released.
    seqs: Vec<SeqState>,
    /// Per group: reference counts, free list, cached node per block.
    pools: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)>,
    live_nodes: usize,
    next_id: u64,
}

type SeqState = (
    SeqId,
    Vec<u32>,
    usize,
    Vec<u32>,
    usize,
    Vec<Vec<u32>>,
    Vec<usize>,
);

impl BlockAllocator {
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut seqs: Vec<_> = self
            .seqs
            .iter()
            .map(|(&id, s)| {
                (
                    id,
                    s.tokens.clone(),
                    s.committed,
                    s.nodes.clone(),
                    s.registered,
                    s.tables.clone(),
                    s.released.clone(),
                )
            })
            .collect();
        seqs.sort_by_key(|s| s.0);
        let pools = self
            .groups
            .iter()
            .map(|g| {
                let rc = (0..g.pool.total() as u32)
                    .map(|b| g.pool.refcount(b))
                    .collect();
                (
                    rc,
                    g.pool.free_list().unwrap_or_default(),
                    g.node_of.clone(),
                )
            })
            .collect();
        Snapshot {
            seqs,
            pools,
            live_nodes: self.registry.live_nodes(),
            next_id: self.next_id,
        }
    }

    pub(super) fn refcount(&self, group: usize, b: u32) -> u32 {
        self.groups[group].pool.refcount(b)
    }

    pub(super) fn is_cached(&self, group: usize, b: u32) -> bool {
        self.groups[group].node_of[b as usize] != NIL
    }

    pub(super) fn free_list(&self, group: usize) -> Vec<u32> {
        self.groups[group].pool.free_list().unwrap()
    }

    /// Checks every structural invariant; the error says which one broke.
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        let bs = self.block_size;
        let mut block_refs = Vec::new();
        for (g, group) in self.groups.iter().enumerate() {
            let total = group.pool.total();
            let mut counts = vec![0u32; total];
            for s in self.seqs.values() {
                for &b in s.tables[g].iter().filter(|&&b| b != RELEASED) {
                    if b as usize >= total {
                        return Err(format!("group {g}: block id {b} out of range"));
                    }
                    counts[b as usize] += 1;
                }
            }
            for (b, &c) in counts.iter().enumerate() {
                let rc = group.pool.refcount(b as u32);
                if rc != c {
                    return Err(format!(
                        "group {g} block {b}: refcount {rc}, {c} references"
                    ));
                }
            }
            let free = group.pool.free_list()?;
            if free.len() + group.pool.used() != total {
                return Err(format!("group {g}: free + used != total"));
            }
            for (b, &n) in group.node_of.iter().enumerate() {
                if n != NIL {
                    block_refs.push((g, b as u32, n));
                }
            }
        }
        let mut seq_refs = HashMap::new();
        for (&id, s) in &self.seqs {
            let len = s.tokens.len();
            if s.committed > len {
                return Err(format!("{id}: committed {} > len {len}", s.committed));
            }
            for (g, group) in self.groups.iter().enumerate() {
                let t = &s.tables[g];
                if t.len() != len.div_ceil(bs) {
                    return Err(format!("{id} group {g}: {} entries for len {len}", t.len()));
                }
                let r = s.released[g];
                let lead = t.iter().take_while(|&&b| b == RELEASED).count();
                if lead != r || t.iter().skip(r).any(|&b| b == RELEASED) {
                    return Err(format!("{id} group {g}: released {r} but table {t:?}"));
                }
                if r > dead_blocks(group.window, s.committed, bs) {
                    return Err(format!("{id} group {g}: released {r} blocks still visible"));
                }
            }
            if s.nodes.len() > s.committed / bs || s.registered > s.nodes.len() {
                return Err(format!(
                    "{id}: {} nodes, {} registered",
                    s.nodes.len(),
                    s.registered
                ));
            }
            let mut parent = NIL;
            for (i, &n) in s.nodes.iter().enumerate() {
                if self.registry.find(parent, &s.tokens[i * bs..(i + 1) * bs]) != Some(n) {
                    return Err(format!("{id}: node {i} does not match its tokens"));
                }
                *seq_refs.entry(n).or_insert(0) += 1;
                parent = n;
            }
        }
        if !self.prefix_caching && (!block_refs.is_empty() || self.registry.live_nodes() > 0) {
            return Err("prefix caching is off but something is cached".into());
        }
        self.registry.check(&seq_refs, &block_refs)
    }
}

pub(super) fn full(n_blocks: usize) -> GroupConfig {
    GroupConfig {
        window: None,
        n_blocks,
    }
}

pub(super) fn win(w: usize, n_blocks: usize) -> GroupConfig {
    GroupConfig {
        window: Some(w),
        n_blocks,
    }
}

fn alloc(block_size: usize, groups: Vec<GroupConfig>) -> BlockAllocator {
    BlockAllocator::new(AllocatorConfig {
        block_size,
        groups,
        prefix_caching: true,
    })
    .unwrap()
}

/// `add_sequence` + append the uncached rest + commit; returns the id and the cached count.
fn prefill(a: &mut BlockAllocator, prompt: &[u32]) -> (SeqId, usize) {
    let (id, cached) = a.add_sequence(prompt).unwrap();
    a.append(id, &prompt[cached..]).unwrap();
    a.commit(id).unwrap();
    a.check_invariants().unwrap();
    (id, cached)
}

fn range(a: u32, b: u32) -> Vec<u32> {
    (a..=b).collect()
}

#[test]
fn config_is_validated() {
    let cfg = |block_size, groups| AllocatorConfig {
        block_size,
        groups,
        prefix_caching: true,
    };
    let err = |c| BlockAllocator::new(c).unwrap_err();
    assert_eq!(
        err(cfg(0, vec![full(4)])),
        KvError::Config(ConfigError::ZeroBlockSize)
    );
    assert_eq!(err(cfg(16, vec![])), KvError::Config(ConfigError::NoGroups));
    assert_eq!(
        err(cfg(16, vec![full(4), win(0, 4)])),
        KvError::Config(ConfigError::ZeroWindow { group: 1 })
    );
    if let Ok(too_many) = usize::try_from(u64::from(u32::MAX) + 1) {
        assert!(matches!(
            err(cfg(16, vec![full(too_many)])),
            KvError::Config(ConfigError::TooManyBlocks { group: 0, .. })
        ));
    }
    let a = BlockAllocator::new(cfg(16, vec![full(4), win(512, 3)])).unwrap();
    assert_eq!((a.block_size(), a.n_groups(), a.n_seqs()), (16, 2, 0));
    assert_eq!(a.window(0), Ok(None));
    assert_eq!(a.window(1), Ok(Some(512)));
    assert_eq!(a.total_blocks(1), Ok(3));
    assert_eq!(
        a.window(2),
        Err(KvError::NoSuchGroup {
            group: 2,
            groups: 2
        })
    );
    assert!(err(cfg(0, vec![])).to_string().contains("block_size"));
}

#[test]
fn budget_helpers_round_down() {
    // SmolLM2-135M: 30 layers, 3 KV heads of 64, f16.
    let per_token = kv_bytes_per_token(30, 3, 64, 2);
    assert_eq!(per_token, 30 * 3 * 64 * 2 * 2);
    assert_eq!(blocks_for_budget(1 << 30, per_token, 16), 2912);
    assert_eq!(blocks_for_budget(per_token * 16 - 1, per_token, 16), 0);
    assert_eq!(blocks_for_budget(per_token * 32, per_token, 16), 2);
    assert_eq!(blocks_for_budget(1 << 30, 0, 16), 0);
    assert_eq!(blocks_for_budget(1 << 30, per_token, 0), 0);
    assert_eq!(blocks_for_budget(u64::MAX, u64::MAX, 2), 0);
    assert_eq!(kv_bytes_per_token(usize::MAX, 2, 1, 1), u64::MAX);
    assert_eq!(blocks_for_token_budget(100, 16), 6);
    assert_eq!(blocks_for_token_budget(96, 16), 6);
    assert_eq!(blocks_for_token_budget(100, 0), 0);
}

#[test]
fn prefix_hit_across_live_sequences() {
    let mut a = alloc(4, vec![full(16)]);
    let prompt = range(1, 10);
    let (s1, cached) = prefill(&mut a, &prompt);
    assert_eq!(cached, 0);
    assert_eq!(a.block_table(s1, 0).unwrap(), &[0, 1, 2]);

    let (s2, cached) = a.add_sequence(&prompt).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(a.len(s2), Ok(8));
    assert_eq!(a.committed_len(s2), Ok(8));
    assert_eq!(a.tokens(s2).unwrap(), &prompt[..8]);
    assert_eq!(a.block_table(s2, 0).unwrap(), &[0, 1]);
    assert_eq!((a.refcount(0, 0), a.refcount(0, 1)), (2, 2));
    assert_eq!(a.append(s2, &prompt[8..]), Ok(vec![]));
    assert_eq!(a.block_table(s2, 0).unwrap(), &[0, 1, 3]);
    a.commit(s2).unwrap();
    a.check_invariants().unwrap();

    // Longest match only, whole blocks only.
    let mut p = range(1, 8);
    p.push(99);
    assert_eq!(a.add_sequence(&p).unwrap().1, 8);
    assert_eq!(a.add_sequence(&[1, 2, 3, 4, 7, 7, 7, 7, 9]).unwrap().1, 4);
    assert_eq!(a.add_sequence(&[2, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap().1, 0);
    // At least one token is left to compute.
    assert_eq!(a.add_sequence(&range(1, 8)).unwrap().1, 4);
    assert_eq!(a.add_sequence(&range(1, 4)).unwrap().1, 0);
    assert_eq!(a.add_sequence(&[]).unwrap().1, 0);
    assert_eq!(a.n_seqs(), 8);
    a.check_invariants().unwrap();
}

#[test]
fn hit_after_the_first_sequence_was_freed() {
    let mut a = alloc(4, vec![full(8)]);
    let prompt = range(1, 9);
    let (s1, _) = prefill(&mut a, &prompt);
    a.free(s1).unwrap();
    assert_eq!((a.free_blocks(0), a.used_blocks(0)), (Ok(8), Ok(0)));
    let (s2, cached) = a.add_sequence(&prompt).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(a.block_table(s2, 0).unwrap(), &[0, 1]);
    assert_eq!((a.free_blocks(0), a.used_blocks(0)), (Ok(6), Ok(2)));
    a.check_invariants().unwrap();
}

#[test]
fn a_cached_free_block_is_evicted_when_the_pool_runs_dry() {
    let mut a = alloc(2, vec![full(4)]);
    let (s1, _) = prefill(&mut a, &range(1, 6));
    a.free(s1).unwrap();
    // Unhashed block 3 first, then s1's blocks last to first.
    assert_eq!(a.free_list(0), vec![3, 2, 1, 0]);
    let (s2, cached) = prefill(&mut a, &range(11, 16));
    assert_eq!(cached, 0);
    assert_eq!(a.block_table(s2, 0).unwrap(), &[3, 2, 1]);
    assert!(a.is_cached(0, 0));
    a.free(s2).unwrap();
    // [1, 2] survived, [3, 4] and [5, 6] were evicted (their blocks now cache s2's).
    let (_, cached) = a.add_sequence(&range(1, 6)).unwrap();
    assert_eq!(cached, 2);
    let (_, cached) = a.add_sequence(&range(11, 16)).unwrap();
    assert_eq!(cached, 4);
    a.check_invariants().unwrap();
}

#[test]
fn eviction_follows_lru_and_last_blocks_first() {
    let mut a = alloc(2, vec![full(6)]);
    let (s1, _) = prefill(&mut a, &range(1, 6));
    let (s2, _) = prefill(&mut a, &range(7, 10));
    assert_eq!(a.block_table(s1, 0).unwrap(), &[0, 1, 2]);
    assert_eq!(a.block_table(s2, 0).unwrap(), &[3, 4]);
    a.free(s1).unwrap();
    a.free(s2).unwrap();
    assert_eq!(a.free_list(0), vec![5, 2, 1, 0, 4, 3]);

    let (s3, _) = a.add_sequence(&[]).unwrap();
    let mut order = Vec::new();
    for i in 0..6 {
        a.append(s3, &[100 + i, 200 + i]).unwrap();
        order.push(*a.block_table(s3, 0).unwrap().last().unwrap());
        if i == 1 {
            // s1's last block lost its prefix, its first two still cache theirs.
            assert!(!a.is_cached(0, 2) && a.is_cached(0, 1) && a.is_cached(0, 0));
            let mut p = range(1, 6);
            p.push(0);
            let (_, cached) = a.clone().add_sequence(&p).unwrap();
            assert_eq!(cached, 4);
        }
    }
    assert_eq!(order, vec![5, 2, 1, 0, 4, 3]);
    a.check_invariants().unwrap();
}

#[test]
fn copy_on_write_after_fork() {
    let mut a = alloc(4, vec![full(8), win(3, 8)]);
    let (s1, _) = prefill(&mut a, &range(1, 6));
    assert_eq!(a.block_table(s1, 0).unwrap(), &[0, 1]);
    // Window 3 at length 6: positions 0..=3 are dead, so block 0 is released.
    assert_eq!(a.block_table(s1, 1).unwrap(), &[RELEASED, 1]);
    let s2 = a.fork(s1).unwrap();
    assert_eq!(a.block_table(s2, 0).unwrap(), &[0, 1]);
    assert_eq!(a.tokens(s2).unwrap(), a.tokens(s1).unwrap());
    assert_eq!(
        (a.refcount(0, 0), a.refcount(0, 1), a.refcount(1, 1)),
        (2, 2, 2)
    );
    a.check_invariants().unwrap();

    let copies = a.append(s2, &[7]).unwrap();
    assert_eq!(
        copies,
        vec![
            BlockCopy {
                group: 0,
                src: 1,
                dst: 2,
                slots: 2
            },
            BlockCopy {
                group: 1,
                src: 1,
                dst: 2,
                slots: 2
            },
        ]
    );
    assert_eq!(a.block_table(s2, 0).unwrap(), &[0, 2]);
    assert_eq!(a.block_table(s1, 0).unwrap(), &[0, 1]);
    assert_eq!((a.refcount(0, 1), a.refcount(0, 2)), (1, 1));
    // s1 now owns block 1 alone: written in place.
    assert_eq!(a.append(s1, &[8]), Ok(vec![]));
    a.check_invariants().unwrap();

    // A full last block is never written: forking at a block boundary needs no copy.
    a.commit(s1).unwrap();
    a.append(s1, &[9]).unwrap();
    a.commit(s1).unwrap();
    let s3 = a.fork(s1).unwrap();
    assert_eq!(a.append(s3, &[11]), Ok(vec![]));
    a.check_invariants().unwrap();
}

#[test]
fn fork_refuses_uncommitted_positions() {
    let mut a = alloc(4, vec![full(8)]);
    let (s1, _) = prefill(&mut a, &range(1, 5));
    a.append(s1, &[6, 7]).unwrap();
    let before = a.snapshot();
    assert_eq!(
        a.fork(s1),
        Err(KvError::Uncommitted {
            seq: s1,
            pending: 2
        })
    );
    assert_eq!(a.snapshot(), before);
}

#[test]
fn out_of_blocks_leaves_state_unchanged() {
    let mut a = alloc(2, vec![full(8), win(4, 3)]);
    let (s1, _) = prefill(&mut a, &range(1, 3));
    let before = a.snapshot();
    let err = a.append(s1, &range(4, 9)).unwrap_err();
    // Group 0 could have served it: nothing may have been taken there either.
    assert_eq!(
        err,
        KvError::OutOfBlocks {
            group: 1,
            needed: 3,
            free: 1
        }
    );
    assert!(err.to_string().contains("group 1"));
    assert_eq!(a.snapshot(), before);
    assert_eq!(a.free_blocks(0), Ok(6));

    // The copy-on-write block counts too.
    let s2 = a.fork(s1).unwrap();
    let _s3 = a.fork(s1).unwrap();
    // s1 copies its last block away, taking the last free window block.
    assert_eq!(a.append(s1, &[4]).unwrap().len(), 2);
    // s2 still shares it with s3: no new block needed, but a copy.
    let before = a.snapshot();
    assert_eq!(
        a.append(s2, &[5]),
        Err(KvError::OutOfBlocks {
            group: 1,
            needed: 1,
            free: 0
        })
    );
    assert_eq!(a.snapshot(), before);
    a.check_invariants().unwrap();
}

#[test]
fn window_release_boundary_is_exact() {
    // Block 0 (positions 0..4) with window 6: a query at 8 still sees position 3; from 9 on
    // nothing sees it.
    let mut a = alloc(4, vec![full(8), win(6, 8)]);
    let (s, _) = a.add_sequence(&[]).unwrap();
    for t in 0..8 {
        a.append(s, &[t]).unwrap();
        a.commit(s).unwrap();
        assert_ne!(a.block_table(s, 1).unwrap()[0], RELEASED, "len {}", t + 1);
    }
    let used = a.used_blocks(1).unwrap();
    a.append(s, &[8]).unwrap();
    // Not before the commit.
    assert_ne!(a.block_table(s, 1).unwrap()[0], RELEASED);
    a.commit(s).unwrap();
    assert_eq!(a.block_table(s, 1).unwrap(), &[RELEASED, 1, 2]);
    assert_eq!(a.block_table(s, 0).unwrap(), &[0, 1, 2]);
    assert_eq!(a.used_blocks(1), Ok(used));
    a.check_invariants().unwrap();

    // Against the visibility rule, for many shapes: after committing L, block b is released
    // iff no query q >= L sees any of its positions.
    for bs in 1..=4usize {
        for w in 1..=9usize {
            let mut a = alloc(bs, vec![win(w, 64)]);
            let (s, _) = a.add_sequence(&[]).unwrap();
            for l in 1..=24usize {
                a.append(s, &[l as u32]).unwrap();
                a.commit(s).unwrap();
                let table = a.block_table(s, 0).unwrap();
                for (b, &id) in table.iter().enumerate() {
                    let visible = (b * bs..(b + 1) * bs)
                        .any(|k| (l..l + 2 * w + bs).any(|q| k <= q && q - k < w));
                    assert_eq!(id == RELEASED, !visible, "bs {bs} w {w} L {l} block {b}");
                }
            }
            a.check_invariants().unwrap();
        }
    }
}

#[test]
fn window_prefix_reuse_needs_only_the_window() {
    // Window 4, block 2: a query at 12 sees positions 9..=11, blocks 4 and 5.
    let mut a = alloc(2, vec![full(32), win(4, 7)]);
    let prompt = range(1, 13);
    let (s1, _) = prefill(&mut a, &prompt);
    assert_eq!(
        &a.block_table(s1, 1).unwrap()[..5],
        &[RELEASED; 5],
        "committed 13: blocks 0..5 are dead"
    );
    a.free(s1).unwrap();

    // Evict the window group's copy of block 0 only: still a full hit.
    let (filler, _) = a.add_sequence(&[]).unwrap();
    a.append(filler, &[50, 51, 52]).unwrap();
    let (s2, cached) = a.add_sequence(&prompt).unwrap();
    assert_eq!(cached, 12);
    let t = a.block_table(s2, 1).unwrap();
    assert_eq!(&t[..4], &[RELEASED; 4]);
    assert!(t[4] != RELEASED && t[5] != RELEASED);
    assert_eq!(a.block_table(s2, 0).unwrap().len(), 6);
    a.check_invariants().unwrap();
    a.free(s2).unwrap();

    // Hold blocks 2 and 3 (a prompt of 8 + 1 tokens reuses exactly those), then evict the rest.
    let mut p9 = range(1, 8);
    p9.push(99);
    let (holder, cached) = a.add_sequence(&p9).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(&a.block_table(holder, 1).unwrap()[..2], &[RELEASED; 2]);
    let (filler2, _) = a.add_sequence(&[]).unwrap();
    let free = a.free_blocks(1).unwrap();
    a.append(filler2, &vec![60; 2 * free]).unwrap();
    assert_eq!(a.free_blocks(1), Ok(0));
    // Blocks 4 and 5 are gone from the window group: reuse drops to 8 (window blocks 2, 3),
    // although the full group still has all six.
    let (s3, cached) = a.add_sequence(&prompt).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(a.block_table(s3, 0).unwrap().len(), 4);
    assert_eq!(
        a.block_table(s3, 1).unwrap()[2..],
        a.block_table(holder, 1).unwrap()[2..4]
    );
    a.check_invariants().unwrap();

    // Without the holder nothing in the window is left: no reuse at all.
    a.free(s3).unwrap();
    a.free(holder).unwrap();
    a.free(filler).unwrap();
    let (filler3, _) = a.add_sequence(&[]).unwrap();
    let free = a.free_blocks(1).unwrap();
    a.append(filler3, &vec![70; 2 * free]).unwrap();
    a.free(filler3).unwrap();
    assert_eq!(a.add_sequence(&prompt).unwrap().1, 0);
    a.check_invariants().unwrap();
}

/// A hash where 1 and 2 look alike, so `[1, x]` and `[2, x]` collide.
fn weak_hash(parent: u64, tokens: &[u32]) -> u64 {
    tokens.iter().fold(parent.wrapping_mul(31), |h, &t| {
        h.wrapping_mul(1000)
            .wrapping_add(u64::from(if t == 2 { 1 } else { t }))
    })
}

/// A hash that ignores the parent: equal blocks after different prefixes collide.
fn parentless_hash(_parent: u64, tokens: &[u32]) -> u64 {
    tokens.iter().fold(0u64, |h, &t| {
        h.wrapping_mul(1000).wrapping_add(u64::from(t))
    })
}

#[test]
fn hash_collisions_never_serve_wrong_kv() {
    let cfg = AllocatorConfig {
        block_size: 2,
        groups: vec![full(16)],
        prefix_caching: true,
    };
    // Same hash, different tokens.
    let mut a = BlockAllocator::with_chain_hash(cfg.clone(), weak_hash).unwrap();
    prefill(&mut a, &[1, 1, 5, 5, 7]);
    assert_eq!(a.add_sequence(&[2, 1, 5, 5, 9]).unwrap().1, 0);
    let (s2, _) = prefill(&mut a, &[2, 1, 5, 5, 7]);
    // Its first block's hash is taken: nothing of it is cached, so still no hit.
    assert_eq!(a.add_sequence(&[2, 1, 5, 5, 9]).unwrap().1, 0);
    assert_eq!(a.add_sequence(&[1, 1, 5, 5, 9]).unwrap().1, 4);
    a.free(s2).unwrap();
    a.check_invariants().unwrap();

    // Same hash and same tokens, different prefix: the parent is compared too.
    let mut a = BlockAllocator::with_chain_hash(cfg.clone(), parentless_hash).unwrap();
    prefill(&mut a, &[1, 1, 5, 5, 7]);
    prefill(&mut a, &[3, 3, 5, 5, 7]);
    assert_eq!(a.add_sequence(&[3, 3, 5, 5, 9]).unwrap().1, 2);
    assert_eq!(a.add_sequence(&[1, 1, 5, 5, 9]).unwrap().1, 4);
    a.check_invariants().unwrap();

    // Everything collides: only exact matches hit.
    let mut a = BlockAllocator::with_chain_hash(cfg, |_, _| 42).unwrap();
    prefill(&mut a, &[1, 1, 5, 5, 7]);
    assert_eq!(a.add_sequence(&[1, 1, 9, 9, 7]).unwrap().1, 2);
    assert_eq!(a.add_sequence(&[9, 9, 5, 5, 7]).unwrap().1, 0);
    a.check_invariants().unwrap();
}

#[test]
fn every_method_rejects_an_unknown_sequence() {
    let mut a = alloc(4, vec![full(8)]);
    let (s, _) = prefill(&mut a, &range(1, 5));
    a.free(s).unwrap();
    let unknown = KvError::UnknownSequence(s);
    assert!(unknown.to_string().contains("seq#0"));
    let e = Err(unknown);
    assert_eq!(a.append(s, &[1]), e.clone().map(|()| vec![]));
    assert_eq!(a.commit(s), e);
    assert_eq!(a.truncate(s, 0), e);
    assert_eq!(a.fork(s), e.clone().map(|()| s));
    assert_eq!(a.free(s), e);
    assert_eq!(a.len(s), e.clone().map(|()| 0));
    assert_eq!(a.committed_len(s), e.clone().map(|()| 0));
    assert_eq!(a.tokens(s), e.clone().map(|()| &[][..]));
    assert_eq!(a.block_table(s, 0), e.clone().map(|()| &[][..]));
    // Ids are not reused.
    let (s2, _) = a.add_sequence(&[1]).unwrap();
    assert_ne!(s2, s);
    assert_eq!(
        a.block_table(s2, 1),
        Err(KvError::NoSuchGroup {
            group: 1,
            groups: 1
        })
    );
    assert!(a.free_blocks(1).is_err() && a.used_blocks(1).is_err());
    assert!(a.total_blocks(1).is_err());
}

#[test]
fn truncate_rolls_back_an_append() {
    let mut a = alloc(4, vec![full(8), win(5, 8)]);
    let (s, _) = prefill(&mut a, &range(1, 5));
    let before = a.snapshot();
    a.append(s, &range(6, 14)).unwrap();
    assert_eq!(a.used_blocks(0), Ok(4));
    a.truncate(s, 5).unwrap();
    assert_eq!(a.snapshot(), before);
    // Longer or equal: nothing to do.
    a.truncate(s, 9).unwrap();
    assert_eq!(a.snapshot(), before);
    a.truncate(s, 0).unwrap();
    assert_eq!(
        (a.len(s), a.used_blocks(0), a.used_blocks(1)),
        (Ok(0), Ok(0), Ok(0))
    );
    a.check_invariants().unwrap();
}

#[test]
fn truncate_into_a_cached_block() {
    let p = range(1, 8);
    let mut probe = p.clone();
    probe.push(0);

    // Held alone: the block stops caching [5..8] and is written in place.
    let mut a = alloc(4, vec![full(8)]);
    let (s, _) = prefill(&mut a, &p);
    assert!(a.is_cached(0, 1));
    a.truncate(s, 6).unwrap();
    assert!(!a.is_cached(0, 1));
    assert_eq!(a.append(s, &[9, 9]), Ok(vec![]));
    a.commit(s).unwrap();
    assert_eq!(a.add_sequence(&probe).unwrap().1, 4);
    a.check_invariants().unwrap();

    // Shared: it stays cached (the other holder still has [5..8]) and the writer copies.
    let mut a = alloc(4, vec![full(8)]);
    let (s, _) = prefill(&mut a, &p);
    let _s2 = a.fork(s).unwrap();
    a.truncate(s, 6).unwrap();
    assert!(a.is_cached(0, 1));
    let copies = a.append(s, &[9, 9]).unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!((copies[0].src, copies[0].slots), (1, 2));
    a.commit(s).unwrap();
    assert_eq!(a.add_sequence(&probe).unwrap().1, 8);
    a.check_invariants().unwrap();

    // Shared at truncation, alone when written: no copy needed, but the entry must go.
    let mut a = alloc(4, vec![full(8)]);
    let (s, _) = prefill(&mut a, &p);
    let s2 = a.fork(s).unwrap();
    a.truncate(s, 6).unwrap();
    a.free(s2).unwrap();
    assert!(a.is_cached(0, 1));
    assert_eq!(a.append(s, &[9, 9]), Ok(vec![]));
    assert!(!a.is_cached(0, 1));
    a.commit(s).unwrap();
    assert_eq!(a.add_sequence(&probe).unwrap().1, 4);
    a.check_invariants().unwrap();
}

#[test]
fn truncate_refuses_released_window_positions() {
    let mut a = alloc(2, vec![full(16), win(4, 16)]);
    let (s, _) = prefill(&mut a, &range(1, 10));
    // Committed 10, window 4: positions 0..=5 (blocks 0..3) are released.
    assert_eq!(
        &a.block_table(s, 1).unwrap()[..4],
        &[RELEASED, RELEASED, RELEASED, 3]
    );
    let before = a.snapshot();
    // A query at 8 would see 5.
    assert_eq!(
        a.truncate(s, 8),
        Err(KvError::ReleasedPositions {
            seq: s,
            group: 1,
            len: 8,
            released: 6
        })
    );
    assert_eq!(a.snapshot(), before);
    // A query at 9 sees 6..=8: fine.
    a.truncate(s, 9).unwrap();
    a.check_invariants().unwrap();
    a.truncate(s, 0).unwrap();
    a.check_invariants().unwrap();

    // Window 1 sees nothing in the past, but a partial last block is still written to.
    let mut a = alloc(4, vec![win(1, 8)]);
    let (s, _) = prefill(&mut a, &range(1, 8));
    assert_eq!(a.block_table(s, 0).unwrap(), &[RELEASED, RELEASED]);
    assert!(matches!(
        a.truncate(s, 6),
        Err(KvError::ReleasedPositions { .. })
    ));
    a.truncate(s, 4).unwrap();
    assert_eq!(a.block_table(s, 0).unwrap(), &[RELEASED]);
    a.append(s, &[5]).unwrap();
    a.check_invariants().unwrap();
}

#[test]
fn without_prefix_caching_nothing_is_shared() {
    let mut a = BlockAllocator::new(AllocatorConfig {
        block_size: 2,
        groups: vec![full(8)],
        prefix_caching: false,
    })
    .unwrap();
    let p = range(1, 5);
    let (s1, _) = prefill(&mut a, &p);
    let (s2, cached) = prefill(&mut a, &p);
    assert_eq!(cached, 0);
    assert_eq!(a.block_table(s1, 0).unwrap(), &[0, 1, 2]);
    assert_eq!(a.block_table(s2, 0).unwrap(), &[3, 4, 5]);
    a.free(s1).unwrap();
    assert_eq!(a.add_sequence(&p).unwrap().1, 0);
    // Freed blocks carry nothing: all go to the head.
    assert_eq!(a.free_list(0), vec![0, 1, 2, 6, 7]);
    a.check_invariants().unwrap();
}

#[test]
fn prefix_hit_shares_blocks_in_every_group() {
    let mut a = alloc(2, vec![full(16), win(3, 16)]);
    let p = range(1, 9);
    let (s1, _) = prefill(&mut a, &p);
    let (s2, cached) = a.add_sequence(&p).unwrap();
    assert_eq!(cached, 8);
    // A query at 8 sees 6 and 7: window block 3 only.
    let t1 = a.block_table(s1, 1).unwrap();
    let t2 = a.block_table(s2, 1).unwrap();
    assert_eq!(&t2[..3], &[RELEASED; 3]);
    assert_eq!(t2[3], t1[3]);
    assert_eq!(a.refcount(1, t1[3]), 2);
    assert_eq!(
        a.block_table(s2, 0).unwrap(),
        &a.block_table(s1, 0).unwrap()[..4]
    );
    a.check_invariants().unwrap();
    a.free(s1).unwrap();
    a.free(s2).unwrap();
    assert_eq!((a.used_blocks(0), a.used_blocks(1)), (Ok(0), Ok(0)));
    a.check_invariants().unwrap();
}
