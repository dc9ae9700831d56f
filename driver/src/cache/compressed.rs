//! The compressed tier: whole chunk files fetched by chunk read-ahead (one store
//! request instead of one per run of frames), kept compressed in memory and decoded
//! lazily, frame by frame, as reads need them. Bounded by bytes (2Q, like the frame
//! tier); what it holds was checked against its chunk id's layout when fetched.

use super::memory::TwoQueue;
use livemount_store::format::chunk::ChunkId;
use std::sync::{Arc, Mutex};

/// Whole compressed chunk files, by id.
pub struct ChunkTier {
    q: Mutex<TwoQueue<ChunkId, Arc<Vec<u8>>>>,
}

impl ChunkTier {
    /// A tier holding at most `budget` bytes.
    pub fn new(budget: u64) -> Self {
        ChunkTier {
            q: Mutex::new(TwoQueue::new(budget as usize)),
        }
    }

    /// The file of chunk `id`, if held.
    pub fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.q.lock().ok()?.get(id)
    }

    /// True if chunk `id` is held (no counting as an access).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.q.lock().is_ok_and(|q| q.contains(id))
    }

    /// Keep the file of chunk `id`.
    pub fn insert(&self, id: ChunkId, file: Vec<u8>) {
        if let Ok(mut q) = self.q.lock() {
            let len = file.len();
            q.insert(id, Arc::new(file), len);
        }
    }

    /// Forget chunk `id` (damaged, or every frame decoded elsewhere).
    pub fn remove(&self, id: &ChunkId) {
        if let Ok(mut q) = self.q.lock() {
            q.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_files_within_its_budget() {
        let t = ChunkTier::new(3000);
        let id = |b: u8| ChunkId([b; 32]);
        t.insert(id(1), vec![1; 1000]);
        t.insert(id(2), vec![2; 1000]);
        assert_eq!(t.get(&id(1)).unwrap()[0], 1);
        t.insert(id(3), vec![3; 1500]);
        let held = (1..=3).filter(|&b| t.contains(&id(b))).count();
        assert!(held < 3, "3500 bytes do not fit in 3000");
        t.remove(&id(3));
        assert!(!t.contains(&id(3)));
    }
}
