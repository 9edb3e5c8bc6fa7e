//! One group's block pool: reference counts and an intrusive doubly linked LRU free list.
//!
//! Every block with reference count 0 is on the free list; every other block is not. The list is
//! ordered by eviction priority: the head is reused first. Links live in two index arrays, so
//! taking a cached block out of the middle of the list (a prefix hit) is O(1), and nothing
//! allocates after construction.

/// "No block" in the link arrays.
pub(crate) const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub(crate) struct BlockPool {
    refcount: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    n_free: usize,
}

impl BlockPool {
    /// `n` free blocks, listed in id order. The caller checks `n <= u32::MAX as usize` so that
    /// ids never reach [`NIL`].
    pub(crate) fn new(n: usize) -> Self {
        let n32 = n as u32;
        let mut pool = Self {
            refcount: vec![0; n],
            prev: (0..n32).map(|b| b.checked_sub(1).unwrap_or(NIL)).collect(),
            next: (0..n32)
                .map(|b| if b + 1 < n32 { b + 1 } else { NIL })
                .collect(),
            head: NIL,
            tail: NIL,
            n_free: n,
        };
        if n > 0 {
            pool.head = 0;
            pool.tail = n32 - 1;
        }
        pool
    }

    pub(crate) fn total(&self) -> usize {
        self.refcount.len()
    }

    pub(crate) fn free(&self) -> usize {
        self.n_free
    }

    pub(crate) fn used(&self) -> usize {
        self.total() - self.n_free
    }

    pub(crate) fn refcount(&self, b: u32) -> u32 {
        self.refcount[b as usize]
    }

    /// Takes the block at the head of the free list (the least recently freed one, or one that
    /// never held a cached prefix) with reference count 1.
    pub(crate) fn take_lru(&mut self) -> Option<u32> {
        let b = self.head;
        if b == NIL {
            return None;
        }
        self.unlink(b);
        self.refcount[b as usize] = 1;
        Some(b)
    }

    /// One more reference to `b`; a free block is taken off the list wherever it sits.
    pub(crate) fn acquire(&mut self, b: u32) {
        if self.refcount[b as usize] == 0 {
            self.unlink(b);
        }
        self.refcount[b as usize] += 1;
    }

    /// One reference fewer. At zero the block joins the free list: at the tail if it still
    /// holds a cached prefix (`cached`; evicted last, in the order freed), at the head otherwise
    /// (nothing worth keeping, so it is reused before any cached block).
    pub(crate) fn release(&mut self, b: u32, cached: bool) {
        let rc = &mut self.refcount[b as usize];
        debug_assert!(*rc > 0, "release of free block {b}");
        *rc = rc.saturating_sub(1);
        if *rc == 0 {
            if cached {
                self.push_back(b);
            } else {
                self.push_front(b);
            }
        }
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.n_free -= 1;
    }

    fn push_back(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.n_free += 1;
    }

    fn push_front(&mut self, b: u32) {
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        if self.head == NIL {
            self.tail = b;
        } else {
            self.prev[self.head as usize] = b;
        }
        self.head = b;
        self.n_free += 1;
    }

    /// The free list from head (reused first) to tail, after checking its links both ways.
    #[cfg(test)]
    pub(crate) fn free_list(&self) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        let mut prev = NIL;
        let mut b = self.head;
        while b != NIL {
            if out.len() > self.total() {
                return Err("free list has a cycle".into());
            }
            if self.prev[b as usize] != prev {
                return Err(format!("block {b}: prev link broken"));
            }
            if self.refcount[b as usize] != 0 {
                return Err(format!("block {b} is on the free list with refcount > 0"));
            }
            out.push(b);
            prev = b;
            b = self.next[b as usize];
        }
        if self.tail != prev {
            return Err("tail does not end the list".into());
        }
        if out.len() != self.n_free {
            return Err(format!("{} listed, n_free {}", out.len(), self.n_free));
        }
        let zero = self.refcount.iter().filter(|&&r| r == 0).count();
        if zero != self.n_free {
            return Err(format!(
                "{zero} blocks at refcount 0, n_free {}",
                self.n_free
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_order_and_middle_removal() {
        let mut p = BlockPool::new(4);
        assert_eq!(p.free_list().unwrap(), vec![0, 1, 2, 3]);
        let a = p.take_lru().unwrap();
        let b = p.take_lru().unwrap();
        assert_eq!((a, b), (0, 1));
        p.release(b, true);
        p.release(a, true);
        assert_eq!(p.free_list().unwrap(), vec![2, 3, 1, 0]);
        // An uncached block goes to the head.
        let c = p.take_lru().unwrap();
        p.release(c, false);
        assert_eq!(p.free_list().unwrap(), vec![2, 3, 1, 0]);
        // Taking a cached block out of the middle.
        p.acquire(1);
        assert_eq!(p.free_list().unwrap(), vec![2, 3, 0]);
        assert_eq!((p.free(), p.used(), p.refcount(1)), (3, 1, 1));
        p.acquire(1);
        p.release(1, true);
        assert_eq!(p.refcount(1), 1);
        assert_eq!(p.free_list().unwrap(), vec![2, 3, 0]);
        p.release(1, true);
        assert_eq!(p.free_list().unwrap(), vec![2, 3, 0, 1]);
        for want in [2, 3, 0, 1] {
            assert_eq!(p.take_lru(), Some(want));
        }
        assert_eq!(p.take_lru(), None);
        assert_eq!(p.free_list().unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn empty_pool() {
        let mut p = BlockPool::new(0);
        assert_eq!(p.take_lru(), None);
        assert_eq!((p.free(), p.used(), p.total()), (0, 0, 0));
    }
}
