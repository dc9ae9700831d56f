//! Sequential read-ahead: streams found in the reads of the snapshot image, and the
//! chunks ahead of each stream fetched and decoded in the background.
//!
//! A profile (pre-staging) covers what a VM reads at boot; it cannot know that a
//! guest will later copy a large file or that an operator will `dd` the device out.
//! Such a reader asks for one chunk after another and, without read-ahead, waits for
//! each one's store request and decoding in turn: against a remote store at 20 ms
//! per request that caps a QD1 reader near one chunk per 20 ms. Here a few threads
//! fetch the next chunks while the reader is still on the current one, so the
//! store's latency overlaps with the reader's own work and the second CPU decodes.
//!
//! Detection works like the kernel's per-file read-ahead state, for a whole disk:
//! a small table of streams, each the end of the last read that continued it.
//! A read continues a stream when it starts near that end (requests at a queue depth
//! above one arrive slightly out of order, and a guest may skip a few blocks); it
//! starts a new stream otherwise, replacing the least recently used one. Once a
//! stream has read [`MIN_RUN`] bytes, the chunks up to one chunk past its end are
//! requested, each chunk once per stream; that distance doubles each time the
//! reader moves on, up to `window` bytes (the kernel's read-ahead ramps up alike). Random reads never reach
//! [`MIN_RUN`], so they cost a table lookup and nothing else.
//!
//! Read-ahead only runs while the store is latency-bound as the read cache measures
//! it: a store request costs at least a quarter of verifying and decoding a chunk.
//! Then a reader waits a good part of its time, and fetching ahead overlaps the wait. Otherwise the reader's
//! time is CPU (BLAKE3, zstd, fresh memory), and fetching ahead only moves that work
//! to other threads that compete with the reader: measured in the emulated two-vCPU
//! VM against a local tmpfs store, an ungated read-ahead made the cold sequential
//! read 30 % slower (docs/performance.md).
//!
//! The work runs on its own threads, never on the ublk queue, and below demand
//! reads: a demand read of a frame being read ahead waits for that fetch instead of
//! issuing a second one (the cache's single-flight map), and read-ahead frames enter
//! the memory tier's probation segment marked unread, so the reader's first access
//! is not taken for a second one: a long scan cannot push the hot set out.

use crate::cache::ReadCache;
use livemount_store::format::chunk::ChunkId;
use livemount_store::workers::Pool;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Bytes a stream must have read before read-ahead starts: two 128 KiB guest
/// read-ahead requests, so a file system's scattered metadata reads do not trigger it.
pub const MIN_RUN: u64 = 256 << 10;

/// How far before a stream's end a read may start and still continue it (reads in
/// flight together complete and arrive out of order).
const REORDER: u64 = 4 << 20;

/// How far past a stream's end a read may start and still continue it: one
/// request of the largest size the device accepts (512 KiB), so two neighbouring
/// requests that swapped places on the way still make one stream.
const GAP: u64 = 512 << 10;

/// Streams tracked at once (a guest copying two files, plus its metadata reads).
const STREAMS: usize = 8;

/// Chunk requests queued for the read-ahead threads; more are dropped (the reader
/// is then well behind, and its demand reads fetch the chunks anyway).
const QUEUE: usize = 64;

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// End of the furthest read that continued this stream.
    next: u64,
    /// Bytes read in this stream so far.
    run: u64,
    /// Chunks below this number were already requested for this stream.
    requested_to: usize,
    /// How far ahead of its end this stream reads now, bytes (grows to the window).
    ahead: u64,
    /// The chunk the reader was in when chunks were last requested.
    requested_in: usize,
    /// Last use, for replacement.
    used: u64,
    live: bool,
}

/// Finds sequential streams in a disk's reads (pure logic, no I/O).
#[derive(Debug)]
pub struct StreamDetector {
    streams: [Stream; STREAMS],
    clock: u64,
    chunk_size: u64,
    chunks: usize,
    window: u64,
}

impl StreamDetector {
    /// A detector for a disk of `chunks` chunks of `chunk_size` bytes, reading
    /// `window` bytes ahead of a stream.
    pub fn new(chunk_size: u32, chunks: usize, window: u64) -> Self {
        StreamDetector {
            streams: [Stream::default(); STREAMS],
            clock: 0,
            chunk_size: u64::from(chunk_size.max(1)),
            chunks,
            window,
        }
    }

    /// Note a read of `len` bytes at `offset`; returns the chunks to read ahead now
    /// (never one this stream already asked for). `worth_it` is asked only when a
    /// stream could ask for chunks; while it says no, the streams are followed but
    /// nothing is asked for, and the first call it says yes asks from where the
    /// reader is then.
    pub fn observe(
        &mut self,
        offset: u64,
        len: u64,
        worth_it: impl FnOnce() -> bool,
    ) -> Option<Range<usize>> {
        self.clock += 1;
        let end = offset.saturating_add(len);
        let found = self.streams.iter().position(|s| {
            s.live && offset >= s.next.saturating_sub(REORDER) && offset <= s.next + GAP
        });
        let Some(i) = found else {
            let slot = (0..STREAMS)
                .min_by_key(|&i| (self.streams[i].live, self.streams[i].used))
                .unwrap_or(0);
            self.streams[slot] = Stream {
                next: end,
                run: len,
                requested_to: 0,
                ahead: 0,
                requested_in: usize::MAX,
                used: self.clock,
                live: true,
            };
            return None;
        };
        let s = &mut self.streams[i];
        s.next = s.next.max(end);
        s.run = s.run.saturating_add(len);
        s.used = self.clock;
        if s.run < MIN_RUN || self.window == 0 || !worth_it() {
            return None;
        }
        // From the chunk holding the stream's next byte (its frames past the reader
        // are still ahead) to the chunk holding the last byte `ahead` past it. The
        // distance starts at one chunk and doubles each time the reader moves into
        // chunks not yet asked for, up to the window: a 300 KB file costs at most a
        // chunk of extra work, a long copy soon gets the whole window.
        let current = (s.next / self.chunk_size) as usize;
        if s.ahead == 0 {
            s.ahead = self.chunk_size.min(self.window);
        } else if current == s.requested_in {
            return None;
        }
        let from = current.max(s.requested_to);
        let to = ((s.next + s.ahead).div_ceil(self.chunk_size) as usize).min(self.chunks);
        if to <= from {
            return None;
        }
        s.requested_to = to;
        s.requested_in = current;
        s.ahead = (s.ahead * 2).min(self.window);
        Some(from..to)
    }
}

/// Sequential read-ahead for one snapshot image: the detector plus its threads.
pub struct SequentialReadAhead {
    detector: Mutex<StreamDetector>,
    pool: Arc<Pool>,
    cache: Arc<ReadCache>,
    chunk_size: u32,
    /// Chunks handed to the threads so far (queued synchronously by the reader).
    requested: std::sync::atomic::AtomicU64,
}

impl SequentialReadAhead {
    /// Read `window` bytes ahead of each stream into `cache`, with `threads` threads
    /// (parallel requests hide a remote store's latency). The threads end when this
    /// value is dropped.
    pub fn start(
        cache: Arc<ReadCache>,
        chunk_size: u32,
        chunks: usize,
        window: u64,
        threads: usize,
    ) -> Self {
        SequentialReadAhead {
            detector: Mutex::new(StreamDetector::new(chunk_size, chunks, window)),
            pool: Pool::bounded("lm-seq-ahead", threads, QUEUE),
            cache,
            chunk_size,
            requested: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Chunks queued for read-ahead so far.
    pub fn requested(&self) -> u64 {
        self.requested.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Note a read of `len` bytes at `offset`: the chunks to read ahead, if any.
    /// None while the store is not latency-bound as measured
    /// ([`ReadCache::store_latency_bound`]): the reader's time is then CPU, which
    /// read-ahead would only take from it.
    pub fn observe(&self, offset: u64, len: u64) -> Option<Range<usize>> {
        // The measurement is only consulted for reads that continue a stream: a
        // random read costs the table lookup alone. Called on the ublk queue thread:
        // never wait for another queue's thread; a read not noted only delays a
        // stream by one request.
        self.detector.try_lock().ok()?.observe(offset, len, || {
            self.cache.store_latency_bound(self.chunk_size)
        })
    }

    /// Queue chunk `id` (`chunk_len` bytes of content) for read-ahead; dropped when
    /// the queue is full.
    pub fn request(&self, id: ChunkId, chunk_len: u32) {
        // Full: the reader is far behind and fetches these itself. Refused after
        // shut-down: the image is going away. Neither is an error for the reader.
        let cache = self.cache.clone();
        let queued = self.pool.try_spawn(move || {
            if let Err(e) = cache.read_ahead(&id, chunk_len) {
                // Not fatal: a demand read of these bytes fails with the chunk's name.
                eprintln!("livemount: sequential read-ahead: {e}");
            }
        });
        if queued {
            self.requested
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::image::SnapshotImage;
    use crate::block::BlockDevice;
    use crate::cache::test_utils::{mem_store, MemSource};
    use livemount_store::format::index::{ChunkRef, SnapshotIndex};
    use std::time::{Duration, Instant};

    const CS: u64 = 1 << 20;

    /// An image of `n` 1 MiB chunks over a 5 ms-latency store, read-ahead `window`.
    fn image_over(
        store: Arc<MemSource>,
        chunks: &[(ChunkId, Vec<u8>)],
        window: u64,
    ) -> (SnapshotImage, Arc<ReadCache>) {
        let remote = livemount_store::backend::throttle::ThrottledSource::new(
            store,
            Duration::from_millis(5),
            None,
        );
        let cache = Arc::new(ReadCache::new(Arc::new(remote), 64 << 20, None, 65536));
        let index = SnapshotIndex {
            image_size: chunks.len() as u64 * CS,
            chunk_size: CS as u32,
            frame_size: 65536,
            created: 0,
            source: String::new(),
            chunks: chunks.iter().map(|(id, _)| ChunkRef::Stored(*id)).collect(),
        };
        let image = SnapshotImage::new(index, cache.clone()).with_sequential_readahead(window, 2);
        (image, cache)
    }

    /// Read like the ublk frontend: the queue thread's try, then the slow path.
    fn read(image: &SnapshotImage, at: u64, buf: &mut [u8]) -> crate::error::Result<()> {
        if image.read_cached(at, buf) {
            return Ok(());
        }
        image.read_at(at, buf)
    }

    /// Wait (bounded) until read-ahead has handled `chunks` chunks.
    fn wait_for_readahead(cache: &ReadCache, chunks: u64) -> u64 {
        let t = Instant::now();
        loop {
            let n = cache.report().seq_readahead_chunks;
            if n >= chunks || t.elapsed() > Duration::from_secs(20) {
                return n;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn chunks_ahead_of_a_sequential_reader_are_decoded_before_it_gets_there() {
        let (store, chunks) = mem_store(8);
        let (image, cache) = image_over(store, &chunks, 4 << 20);
        // The first 2 MiB in 128 KiB reads: the stream is found at the second read
        // (chunks 0..2), then reads ahead 2 chunks (2..3), then 4 (3..6).
        let mut buf = vec![0u8; 128 << 10];
        for at in (0..2 * CS).step_by(buf.len()) {
            read(&image, at, &mut buf).unwrap();
            let (c, o) = ((at / CS) as usize, (at % CS) as usize);
            assert_eq!(buf, chunks[c].1[o..o + buf.len()]);
        }
        assert_eq!(wait_for_readahead(&cache, 6), 6);
        // Chunks 2..6 are now in memory: read without I/O, byte-exact.
        let store_reads = cache.report().store_reads;
        let mut ahead = vec![0u8; 4 << 20];
        for (k, part) in ahead.chunks_mut(CS as usize).enumerate() {
            let (id, data) = &chunks[k + 2];
            assert!(
                cache.read_if_cached(id, 0..CS as u32, part),
                "chunk {}",
                k + 2
            );
            assert_eq!(part, &data[..], "chunk {}", k + 2);
        }
        assert_eq!(cache.report().store_reads, store_reads);
        // Chunk 6 was beyond the window and is not in memory.
        assert!(!cache.read_if_cached(&chunks[6].0, 0..4096, &mut buf[..4096]));
    }

    #[test]
    fn random_reads_and_a_zero_window_read_nothing_ahead() {
        let (store, chunks) = mem_store(4);
        let (image, cache) = image_over(store.clone(), &chunks, 4 << 20);
        let mut buf = vec![0u8; 4096];
        for at in [3 * CS + 8192, 40960, 2 * CS + 4096, CS + 655_360, 12288] {
            read(&image, at, &mut buf).unwrap();
        }
        let (off, off_cache) = image_over(store, &chunks, 0);
        let mut big = vec![0u8; 1 << 20];
        for c in 0..4 {
            read(&off, c * CS, &mut big).unwrap();
        }
        // Chunks are queued synchronously by the reads themselves: no waiting for
        // background threads to prove an absence.
        assert_eq!(image.sequential_requested(), 0);
        assert_eq!(off.sequential_requested(), 0);
        assert_eq!(cache.report().seq_readahead_chunks, 0);
        assert_eq!(off_cache.report().seq_readahead_chunks, 0);
    }

    #[test]
    fn a_corrupt_chunk_met_by_read_ahead_is_still_an_error_for_the_reader() {
        let (store, chunks) = mem_store(4);
        let mut files = store.0.clone();
        let bad = chunks[2].0;
        if let Some(f) = files.get_mut(&bad) {
            let at = f.len() / 2;
            f[at] ^= 0x40;
        }
        let (image, cache) = image_over(Arc::new(MemSource(files)), &chunks, 4 << 20);
        let mut buf = vec![0u8; 256 << 10];
        for at in (0..2 * CS).step_by(buf.len()) {
            read(&image, at, &mut buf).unwrap();
        }
        // Read-ahead met chunk 2 (requested when the reader entered chunk 1), failed
        // and left its frames out; chunks 0, 1 and 3 were read ahead.
        assert_eq!(wait_for_readahead(&cache, 3), 3);
        let mut whole = vec![0u8; 1 << 20];
        let e = read(&image, 2 * CS, &mut whole).unwrap_err().to_string();
        assert!(e.contains(&bad.to_hex()), "{e}");
        read(&image, 3 * CS, &mut whole).unwrap();
        assert_eq!(whole, chunks[3].1);
    }

    fn detector() -> StreamDetector {
        StreamDetector::new(CS as u32, 100, 4 << 20)
    }

    #[test]
    fn a_sequential_reader_gets_each_chunk_ahead_once_and_the_distance_ramps_up() {
        let mut d = detector();
        let mut asked = Vec::new();
        for i in 0..64u64 {
            if let Some(r) = d.observe(i * 128 * 1024, 128 * 1024, || true) {
                asked.extend(r);
            }
        }
        // 64 × 128 KiB = 8 MiB read; at most 4 MiB ahead of its end (1, 2, then 4
        // chunks as the reader moves on): chunks 0..12, once each.
        assert_eq!(asked, (0..12).collect::<Vec<_>>());
        // A short file (300 KB) costs at most the rest of its chunk and one more.
        let mut d = detector();
        let short: Vec<usize> = (0..3u64)
            .filter_map(|i| d.observe(50 * CS + i * 100_000, 100_000, || true))
            .flatten()
            .collect();
        assert_eq!(short, vec![50, 51]);
    }

    #[test]
    fn random_reads_never_trigger_read_ahead() {
        let mut d = detector();
        let mut x = 0x1234_5678_u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (100 * CS)) & !4095;
            // Never even consults the store measurements.
            let asked = || unreachable!("measurements consulted for a random read");
            assert_eq!(d.observe(off, 4096, asked), None, "read at {off}");
        }
    }

    #[test]
    fn reads_arriving_out_of_order_continue_the_stream() {
        let mut d = detector();
        // 1 MiB reads at QD4 reach ublk as 512 KiB requests; neighbours may swap.
        let half = CS / 2;
        let mut asked = Vec::new();
        for group in 0..4u64 {
            for k in [1u64, 0, 3, 2] {
                if let Some(r) = d.observe((group * 4 + k) * half, half, || true) {
                    asked.extend(r);
                }
            }
        }
        // Found at the second request (chunk 0 was being read); 8 MiB read, up to 4
        // chunks ahead.
        assert_eq!(asked, (1..12).collect::<Vec<_>>());
    }

    #[test]
    fn two_interleaved_streams_are_both_followed_and_the_end_of_the_disk_bounds_them() {
        let mut d = StreamDetector::new(CS as u32, 40, 2 << 20);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..40u64 {
            a.extend(
                d.observe(i * 256 * 1024, 256 * 1024, || true)
                    .into_iter()
                    .flatten(),
            );
            b.extend(
                d.observe(30 * CS + i * 256 * 1024, 256 * 1024, || true)
                    .into_iter()
                    .flatten(),
            );
        }
        assert_eq!(a, (0..12).collect::<Vec<_>>());
        assert_eq!(b, (30..40).collect::<Vec<_>>());
    }

    #[test]
    fn while_not_worth_it_streams_are_followed_and_nothing_is_asked() {
        let mut d = detector();
        for i in 0..24u64 {
            assert_eq!(d.observe(i * 128 * 1024, 128 * 1024, || false), None);
        }
        // Worth it now (the store turned out slow): from the reader's chunk on.
        assert_eq!(d.observe(24 * 128 * 1024, 128 * 1024, || true), Some(3..5));
    }

    #[test]
    fn a_zero_window_turns_it_off() {
        let mut d = StreamDetector::new(CS as u32, 100, 0);
        for i in 0..64u64 {
            assert_eq!(d.observe(i * CS, CS, || true), None);
        }
    }
}
