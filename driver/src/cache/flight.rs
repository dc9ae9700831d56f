//! Single flight: concurrent misses on one key fetch it once; later callers wait
//! for the first. And a gauge of demand fetches in flight, which pre-staging waits
//! on (a condition variable, not a poll) so that it yields to the VM's own reads.

use hashbrown::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One fetch in progress: done flag and the condition its waiters sleep on.
#[derive(Default)]
struct Flight {
    done: Mutex<bool>,
    cv: Condvar,
}

/// A fetch someone else is doing.
#[derive(Clone)]
pub struct Waiter(Arc<Flight>);

impl Waiter {
    /// Sleep until the fetch is released (whatever its outcome: the caller looks
    /// again and fetches itself if the data is still missing).
    pub fn wait(&self) {
        let Ok(mut done) = self.0.done.lock() else {
            return;
        };
        while !*done {
            match self.0.cv.wait(done) {
                Ok(d) => done = d,
                Err(_) => return,
            }
        }
    }
}

/// Keys being fetched now.
pub struct SingleFlight<K> {
    inflight: Mutex<HashMap<K, Arc<Flight>>>,
}

impl<K: Hash + Eq + Copy> Default for SingleFlight<K> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Copy> SingleFlight<K> {
    /// Claim every key of `keys` nobody is fetching (returned: the caller must fetch
    /// them and then [`release`](Self::release) them); for keys someone else
    /// fetches, one [`Waiter`] to wait on. `unless` runs under the lock and drops
    /// keys that need no fetch after all (e.g. arrived meanwhile).
    pub fn claim(
        &self,
        keys: impl IntoIterator<Item = K>,
        unless: impl Fn(&K) -> bool,
    ) -> (Vec<K>, Option<Waiter>) {
        let Ok(mut inflight) = self.inflight.lock() else {
            // A poisoned table: fetch without deduplication rather than fail reads.
            return (keys.into_iter().collect(), None);
        };
        let mut mine = Vec::new();
        let mut wait = None;
        for k in keys {
            if unless(&k) {
                continue;
            }
            match inflight.get(&k) {
                Some(f) => wait = Some(Waiter(f.clone())),
                None => {
                    inflight.insert(k, Arc::new(Flight::default()));
                    mine.push(k);
                }
            }
        }
        (mine, wait)
    }

    /// Release `keys` claimed by [`claim`](Self::claim) and wake their waiters.
    pub fn release(&self, keys: &[K]) {
        let Ok(mut inflight) = self.inflight.lock() else {
            return;
        };
        for k in keys {
            if let Some(f) = inflight.remove(k) {
                if let Ok(mut done) = f.done.lock() {
                    *done = true;
                }
                f.cv.notify_all();
            }
        }
    }

    /// True if `key` is being fetched.
    pub fn contains(&self, key: &K) -> bool {
        self.inflight.lock().is_ok_and(|m| m.contains_key(key))
    }
}

/// Releases claimed keys when dropped — also when the fetch panics, so that a panic
/// (turned into EIO by the frontend) never leaves waiters asleep forever.
pub struct ReleaseOnDrop<'a, K: Hash + Eq + Copy> {
    flight: &'a SingleFlight<K>,
    keys: Vec<K>,
}

impl<'a, K: Hash + Eq + Copy> ReleaseOnDrop<'a, K> {
    /// Release `keys` of `flight` when this is dropped.
    pub fn new(flight: &'a SingleFlight<K>, keys: Vec<K>) -> Self {
        ReleaseOnDrop { flight, keys }
    }
}

impl<K: Hash + Eq + Copy> Drop for ReleaseOnDrop<'_, K> {
    fn drop(&mut self) {
        self.flight.release(&self.keys);
    }
}

/// Demand fetches in flight, with a condition to wait until there are none.
#[derive(Default)]
pub struct DemandGauge {
    count: Mutex<usize>,
    idle: Condvar,
    /// When the last demand fetch started or ended.
    last: Mutex<Option<std::time::Instant>>,
}

/// One demand fetch; dropping it ends it.
pub struct DemandGuard<'a>(&'a DemandGauge);

impl DemandGauge {
    /// Start a demand fetch.
    pub fn enter(&self) -> DemandGuard<'_> {
        if let Ok(mut c) = self.count.lock() {
            *c += 1;
        }
        self.touch();
        DemandGuard(self)
    }

    fn touch(&self) {
        if let Ok(mut l) = self.last.lock() {
            *l = Some(std::time::Instant::now());
        }
    }

    /// True if a demand fetch is in flight or ended less than `window` ago.
    pub fn recent(&self, window: Duration) -> bool {
        self.current() > 0
            || self
                .last
                .lock()
                .is_ok_and(|l| l.is_some_and(|t| t.elapsed() < window))
    }

    /// Demand fetches in flight now.
    pub fn current(&self) -> usize {
        self.count.lock().map(|c| *c).unwrap_or(0)
    }

    /// Wait until no demand fetch is in flight, at most `limit`; true if idle.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let Ok(c) = self.count.lock() else {
            return true;
        };
        match self.idle.wait_timeout_while(c, limit, |c| *c > 0) {
            Ok((c, _)) => *c == 0,
            Err(_) => true,
        }
    }
}

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.touch();
        if let Ok(mut c) = self.0.count.lock() {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.0.idle.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_first_claims_later_ones_wait_and_see_the_release() {
        let sf = SingleFlight::<u32>::default();
        let (mine, wait) = sf.claim([1, 2, 3], |k| *k == 3);
        assert_eq!(mine, vec![1, 2], "3 needed no fetch");
        assert!(wait.is_none());
        let (mine2, wait2) = sf.claim([2, 4], |_| false);
        assert_eq!(mine2, vec![4]);
        let wait2 = wait2.expect("2 is in flight: wait for it");
        let fetched = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            let f = fetched.clone();
            let w = s.spawn(move || {
                wait2.wait();
                f.load(Ordering::SeqCst)
            });
            std::thread::sleep(Duration::from_millis(20));
            fetched.store(1, Ordering::SeqCst);
            sf.release(&[1, 2]);
            assert_eq!(w.join().unwrap(), 1, "the waiter woke after the release");
        });
        assert!(!sf.contains(&2));
        assert!(sf.contains(&4));
        sf.release(&[4]);
        assert_eq!(
            sf.claim([2], |_| false).0,
            vec![2],
            "released keys can be claimed again"
        );
    }

    #[test]
    fn a_panicking_fetch_still_releases_its_claims() {
        let sf = SingleFlight::<u32>::default();
        let (mine, _) = sf.claim([5], |_| false);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _release = ReleaseOnDrop::new(&sf, mine);
            panic!("decoder bug");
        }));
        assert!(r.is_err());
        assert!(
            !sf.contains(&5),
            "a panic left the key claimed: its waiters would hang"
        );
    }

    #[test]
    fn the_gauge_wakes_waiters_when_demand_ends() {
        let g = DemandGauge::default();
        assert!(g.wait_idle(Duration::ZERO));
        let guard = g.enter();
        assert_eq!(g.current(), 1);
        assert!(!g.wait_idle(Duration::from_millis(1)), "busy");
        std::thread::scope(|s| {
            let w = s.spawn(|| g.wait_idle(Duration::from_secs(30)));
            std::thread::sleep(Duration::from_millis(20));
            drop(guard);
            assert!(w.join().unwrap());
        });
        assert_eq!(g.current(), 0);
    }
}
