//! Memory tier of the read cache: decoded frames, bounded in bytes, 2Q-style.
//!
//! Policy: a new frame enters a FIFO *probation* segment (a quarter of the budget);
//! a second access while there promotes it to the LRU *protected* segment. A full
//! sequential scan therefore only cycles through probation and cannot flush the hot
//! boot set, which lives in protected; plain LRU would lose it (see the unit test and
//! docs/performance.md for the measured hit rates).

use hashbrown::HashMap;
use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Segment {
    Probation,
    Protected,
}

struct Entry<V> {
    value: V,
    bytes: usize,
    segment: Segment,
    tick: u64,
}

/// A byte-bounded cache with a scan-resistant (2Q / segmented LRU) policy.
pub struct TwoQueue<K, V> {
    map: HashMap<K, Entry<V>>,
    probation: BTreeMap<u64, K>,
    protected: BTreeMap<u64, K>,
    probation_bytes: usize,
    protected_bytes: usize,
    capacity: usize,
    tick: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> TwoQueue<K, V> {
    /// A cache holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        TwoQueue {
            map: HashMap::new(),
            probation: BTreeMap::new(),
            protected: BTreeMap::new(),
            probation_bytes: 0,
            protected_bytes: 0,
            capacity,
            tick: 0,
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

    /// Look up `key`, counting it as an access.
    pub fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.map.get_mut(key)?;
        match e.segment {
            Segment::Probation => {
                self.probation.remove(&e.tick);
                self.probation_bytes -= e.bytes;
                e.segment = Segment::Protected;
                self.protected_bytes += e.bytes;
            }
            Segment::Protected => {
                self.protected.remove(&e.tick);
            }
        }
        e.tick = tick;
        self.protected.insert(tick, key.clone());
        let v = e.value.clone();
        self.evict();
        Some(v)
    }

    /// Insert `value` of `bytes` bytes (into probation).
    pub fn insert(&mut self, key: K, value: V, bytes: usize) {
        if bytes > self.capacity {
            return;
        }
        self.remove(&key);
        self.tick += 1;
        self.probation.insert(self.tick, key.clone());
        self.probation_bytes += bytes;
        self.map.insert(
            key,
            Entry {
                value,
                bytes,
                segment: Segment::Probation,
                tick: self.tick,
            },
        );
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
        self.tick += 1;
        self.protected.insert(self.tick, key.clone());
        self.protected_bytes += bytes;
        self.map.insert(
            key,
            Entry {
                value,
                bytes,
                segment: Segment::Protected,
                tick: self.tick,
            },
        );
        self.evict();
        true
    }

    /// Remove `key`.
    pub fn remove(&mut self, key: &K) {
        if let Some(e) = self.map.remove(key) {
            match e.segment {
                Segment::Probation => {
                    self.probation.remove(&e.tick);
                    self.probation_bytes -= e.bytes;
                }
                Segment::Protected => {
                    self.protected.remove(&e.tick);
                    self.protected_bytes -= e.bytes;
                }
            }
        }
    }

    fn pop(&mut self, seg: Segment) {
        let first = match seg {
            Segment::Probation => self.probation.first_key_value(),
            Segment::Protected => self.protected.first_key_value(),
        };
        if let Some((_, k)) = first {
            let k = k.clone();
            if seg == Segment::Protected {
                // Demote to probation rather than drop: a frame that was hot once gets
                // one more chance before it leaves.
                if let Some(e) = self.map.get_mut(&k) {
                    self.protected.remove(&e.tick);
                    self.protected_bytes -= e.bytes;
                    e.segment = Segment::Probation;
                    self.probation_bytes += e.bytes;
                    self.tick += 1;
                    e.tick = self.tick;
                    self.probation.insert(self.tick, k);
                }
            } else {
                self.remove(&k);
            }
        }
    }

    fn evict(&mut self) {
        let protected_cap = self.capacity - self.capacity / 4;
        while self.protected_bytes > protected_cap {
            self.pop(Segment::Protected);
        }
        while self.bytes() > self.capacity {
            self.pop(Segment::Probation);
        }
    }
}

/// A decoded frame shared between the cache and readers.
pub type FrameBytes = Arc<Vec<u8>>;

#[cfg(test)]
mod tests {
    use super::*;

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
