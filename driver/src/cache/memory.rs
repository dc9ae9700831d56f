//! Memory tier of the read cache: decoded frames, bounded in bytes, 2Q-style.
//!
//! Policy: a new frame enters a FIFO *probation* segment (a quarter of the budget);
//! a second access while there promotes it to the LRU *protected* segment. A full
//! sequential scan therefore only cycles through probation and cannot flush the hot
//! boot set, which lives in protected; plain LRU would lose it (see the unit test and
//! docs/performance.md for the measured hit rates).

use hashbrown::HashMap;
use std::hash::Hash;
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Segment {
    Probation,
    Protected,
}

const NIL: usize = usize::MAX;

/// An entry, linked into the list of its segment (oldest at the head).
struct Node<K, V> {
    key: K,
    value: V,
    bytes: usize,
    segment: Segment,
    /// Brought in ahead of a reader: its first access is the reader's first, not a
    /// second one, and does not promote it.
    unread: bool,
    prev: usize,
    next: usize,
}

/// A doubly linked list of slab indexes: O(1) move-to-back and pop-front, so a hit
/// costs a hash lookup and a few index writes (a hit is the whole per-request work of
/// a warm read, done on the queue thread).
#[derive(Clone, Copy)]
struct List {
    head: usize,
    tail: usize,
}

/// A byte-bounded cache with a scan-resistant (2Q / segmented LRU) policy.
pub struct TwoQueue<K, V> {
    map: HashMap<K, usize>,
    slab: Vec<Option<Node<K, V>>>,
    free: Vec<usize>,
    probation: List,
    protected: List,
    probation_bytes: usize,
    protected_bytes: usize,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> TwoQueue<K, V> {
    /// A cache holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        TwoQueue {
            map: HashMap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            probation: List {
                head: NIL,
                tail: NIL,
            },
            protected: List {
                head: NIL,
                tail: NIL,
            },
            probation_bytes: 0,
            protected_bytes: 0,
            capacity,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.probation_bytes + self.protected_bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn node(&self, i: usize) -> &Node<K, V> {
        self.slab[i].as_ref().expect("linked slot is occupied")
    }

    fn node_mut(&mut self, i: usize) -> &mut Node<K, V> {
        self.slab[i].as_mut().expect("linked slot is occupied")
    }

    fn list_mut(&mut self, seg: Segment) -> &mut List {
        match seg {
            Segment::Probation => &mut self.probation,
            Segment::Protected => &mut self.protected,
        }
    }

    /// Take node `i` out of its segment's list and byte count.
    fn unlink(&mut self, i: usize) {
        let (prev, next, seg, bytes) = {
            let n = self.node(i);
            (n.prev, n.next, n.segment, n.bytes)
        };
        if prev == NIL {
            self.list_mut(seg).head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            self.list_mut(seg).tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
        match seg {
            Segment::Probation => self.probation_bytes -= bytes,
            Segment::Protected => self.protected_bytes -= bytes,
        }
    }

    /// Append node `i` (unlinked) as the newest of `seg`.
    fn push_back(&mut self, i: usize, seg: Segment) {
        let tail = self.list_mut(seg).tail;
        let bytes = {
            let n = self.node_mut(i);
            n.segment = seg;
            n.prev = tail;
            n.next = NIL;
            n.bytes
        };
        if tail == NIL {
            self.list_mut(seg).head = i;
        } else {
            self.node_mut(tail).next = i;
        }
        self.list_mut(seg).tail = i;
        match seg {
            Segment::Probation => self.probation_bytes += bytes,
            Segment::Protected => self.protected_bytes += bytes,
        }
    }

    fn alloc(&mut self, key: K, value: V, bytes: usize) -> usize {
        let node = Node {
            key,
            value,
            bytes,
            segment: Segment::Probation,
            unread: false,
            prev: NIL,
            next: NIL,
        };
        match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(node);
                i
            }
            None => {
                self.slab.push(Some(node));
                self.slab.len() - 1
            }
        }
    }

    /// Look up `key`, counting it as an access.
    pub fn get(&mut self, key: &K) -> Option<V> {
        let i = *self.map.get(key)?;
        if let Some(n) = self.slab[i].as_mut().filter(|n| n.unread) {
            // The first access of a frame read ahead: it stays on probation.
            n.unread = false;
            return Some(n.value.clone());
        }
        // Probation → protected on the second access; protected → most recent.
        self.unlink(i);
        self.push_back(i, Segment::Protected);
        let v = self.node(i).value.clone();
        self.evict();
        Some(v)
    }

    /// Insert `value` of `bytes` bytes (into probation).
    pub fn insert(&mut self, key: K, value: V, bytes: usize) {
        self.insert_probation(key, value, bytes, false);
    }

    /// Insert `value` into probation for a reader that has not read it yet
    /// (read-ahead): its next access counts as the first.
    pub fn insert_unread(&mut self, key: K, value: V, bytes: usize) {
        self.insert_probation(key, value, bytes, true);
    }

    fn insert_probation(&mut self, key: K, value: V, bytes: usize, unread: bool) {
        if bytes > self.capacity {
            return;
        }
        self.remove(&key);
        let i = self.alloc(key.clone(), value, bytes);
        if let Some(n) = self.slab[i].as_mut() {
            n.unread = unread;
        }
        self.push_back(i, Segment::Probation);
        self.map.insert(key, i);
        self.evict();
    }

    /// True if `key` is cached (no access is counted, nothing moves).
    pub fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Room left in the protected segment, bytes.
    pub fn protected_room(&self) -> usize {
        (self.capacity - self.capacity / 4).saturating_sub(self.protected_bytes)
    }

    /// Insert straight into the protected segment (pre-staged frames: the profile
    /// says they are hot). Refused (false) when it would evict protected entries:
    /// pre-staging stops at the budget rather than evicting the hot set.
    pub fn insert_protected(&mut self, key: K, value: V, bytes: usize) -> bool {
        if self.map.contains_key(&key) {
            return true;
        }
        if bytes > self.protected_room() {
            return false;
        }
        let i = self.alloc(key.clone(), value, bytes);
        self.push_back(i, Segment::Protected);
        self.map.insert(key, i);
        self.evict();
        true
    }

    /// Remove `key`.
    pub fn remove(&mut self, key: &K) {
        if let Some(i) = self.map.remove(key) {
            self.unlink(i);
            self.slab[i] = None;
            self.free.push(i);
        }
    }

    fn pop(&mut self, seg: Segment) {
        let head = match seg {
            Segment::Probation => self.probation.head,
            Segment::Protected => self.protected.head,
        };
        if head == NIL {
            return;
        }
        if seg == Segment::Protected {
            // Demote to probation rather than drop: a frame that was hot once gets
            // one more chance before it leaves.
            self.unlink(head);
            self.push_back(head, Segment::Probation);
        } else {
            let key = self.node(head).key.clone();
            self.remove(&key);
        }
    }

    fn evict(&mut self) {
        let protected_cap = self.capacity - self.capacity / 4;
        while self.protected_bytes > protected_cap && self.protected.head != NIL {
            self.pop(Segment::Protected);
        }
        while self.bytes() > self.capacity && self.probation.head != NIL {
            self.pop(Segment::Probation);
        }
    }
}

/// A decoded frame shared between the cache and readers.
pub type FrameBytes = Arc<Vec<u8>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Plain LRU for comparison.
    struct Lru {
        order: BTreeMap<u64, u64>,
        at: HashMap<u64, u64>,
        cap: usize,
        tick: u64,
    }
    impl Lru {
        fn access(&mut self, k: u64) -> bool {
            self.tick += 1;
            let hit = if let Some(t) = self.at.remove(&k) {
                self.order.remove(&t);
                true
            } else {
                false
            };
            self.order.insert(self.tick, k);
            self.at.insert(k, self.tick);
            while self.at.len() > self.cap {
                if let Some((t, k)) = self.order.pop_first() {
                    self.at.remove(&k);
                    let _ = t;
                }
            }
            hit
        }
    }

    /// A boot-like trace (a hot set read repeatedly) interleaved with a full scan:
    /// 2Q keeps the hot set, LRU loses it.
    #[test]
    fn scan_does_not_flush_hot_set() {
        let cap = 100;
        let mut q = TwoQueue::new(cap);
        let mut lru = Lru {
            order: BTreeMap::new(),
            at: HashMap::new(),
            cap,
            tick: 0,
        };
        let hot: Vec<u64> = (0..50).collect();
        let mut trace = Vec::new();
        for round in 0..10 {
            trace.extend(hot.iter().copied());
            if round == 3 {
                trace.extend(1000..3000); // a full sequential read of the disk
            }
        }
        let (mut hq, mut hl) = (0, 0);
        for k in trace {
            if q.get(&k).is_some() {
                hq += 1;
            } else {
                q.insert(k, (), 1);
            }
            if lru.access(k) {
                hl += 1;
            }
        }
        assert!(q.bytes() <= cap);
        // 500 hot accesses: 2Q misses only the first round; LRU also misses after the scan.
        assert_eq!(hq, 450, "2Q hits");
        assert_eq!(hl, 400, "LRU hits");
    }

    #[test]
    fn a_scan_read_ahead_of_its_reader_does_not_flush_the_hot_set_either() {
        let mut q = TwoQueue::new(100);
        for _ in 0..2 {
            for k in 0..50u64 {
                if q.get(&k).is_none() {
                    q.insert(k, (), 1);
                }
            }
        }
        // Read-ahead brings each scan block in, then the reader reads it once.
        for k in 1000..3000u64 {
            q.insert_unread(k, (), 1);
            assert!(q.get(&k).is_some());
        }
        let kept = (0..50u64).filter(|k| q.contains(k)).count();
        assert_eq!(kept, 50, "hot blocks lost to a read-ahead scan");
        // A frame read twice after read-ahead is hot like any other.
        q.insert_unread(5000, (), 1);
        q.get(&5000);
        q.get(&5000);
        for k in 6000..6200u64 {
            q.insert(k, (), 1);
        }
        assert!(q.contains(&5000));
    }

    /// Random inserts, hits and removals keep the lists, the map and the byte
    /// counts consistent, and the budget is never exceeded.
    #[test]
    fn lists_stay_consistent() {
        let mut q: TwoQueue<u32, u32> = TwoQueue::new(4000);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 300) as u32;
            match x % 7 {
                0 => q.remove(&k),
                1 => {
                    q.insert_protected(k, k, 1 + (x % 90) as usize);
                }
                2 | 3 => q.insert(k, k, 1 + (x % 90) as usize),
                _ => {
                    if let Some(v) = q.get(&k) {
                        assert_eq!(v, k);
                    }
                }
            }
            assert!(q.bytes() <= 4000);
            let mut seen = 0;
            for (seg, list, bytes) in [
                (Segment::Probation, q.probation, q.probation_bytes),
                (Segment::Protected, q.protected, q.protected_bytes),
            ] {
                let (mut i, mut prev, mut sum) = (list.head, NIL, 0);
                while i != NIL {
                    let n = q.node(i);
                    assert_eq!(n.segment, seg);
                    assert_eq!(n.prev, prev);
                    assert_eq!(q.map.get(&n.key), Some(&i));
                    sum += n.bytes;
                    seen += 1;
                    prev = i;
                    i = n.next;
                }
                assert_eq!(list.tail, prev);
                assert_eq!(sum, bytes);
            }
            assert_eq!(seen, q.len());
        }
    }

    #[test]
    fn bounded_by_bytes() {
        let mut q = TwoQueue::new(1000);
        for i in 0..100u32 {
            q.insert(i, i, 64);
            q.get(&i);
        }
        assert!(q.bytes() <= 1000);
        assert!(q.get(&99).is_some());
        assert!(q.get(&0).is_none());
        q.insert(1000, 0, 2000);
        assert!(q.get(&1000).is_none());
    }
}
