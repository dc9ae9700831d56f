//! The overlay's sector map in memory: one bit per 512-byte sector, kept in 4 KiB
//! pages that exist only once a sector they cover is written.
//!
//! A page covers 32,768 sectors (16 MiB of the device), the unit in which the map is
//! written to the overlay file and its mirror. An absent page is all zeros. So a
//! 4 TiB device costs 2 MiB (one pointer per page) before the VM writes, and then
//! 4 KiB per 16 MiB region it has written to — memory follows the writes, not the
//! device size. The same holds on disk and on /run: the map regions of the overlay
//! file and of the mirror are sparse, written page by page, and read back with
//! SEEK_DATA so that opening a large, mostly empty overlay reads only what exists.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes of one map page.
pub const PAGE: u64 = 4096;
const WORDS: usize = (PAGE / 8) as usize;

/// One page of bits.
type Page = Box<[u64; WORDS]>;

/// A sector bitmap of `pages × 4096` bytes whose all-zero pages take no memory.
#[derive(Default)]
pub struct SparseMap {
    pages: Vec<Option<Page>>,
    /// Pages allocated.
    allocated: usize,
}

impl SparseMap {
    /// An empty map of `map_len` bytes (a multiple of [`PAGE`]).
    pub fn new(map_len: u64) -> SparseMap {
        let n = map_len.div_ceil(PAGE) as usize;
        let mut pages = Vec::new();
        pages.resize_with(n, || None);
        SparseMap {
            pages,
            allocated: 0,
        }
    }

    /// Pages in the map (allocated or not).
    pub fn page_count(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Word `w` (64 sectors); 0 where no page exists, or past the end.
    pub fn word(&self, w: usize) -> u64 {
        match self.pages.get(w / WORDS) {
            Some(Some(p)) => p[w % WORDS],
            _ => 0,
        }
    }

    /// Is sector `s` set?
    pub fn get(&self, s: u64) -> bool {
        self.word((s / 64) as usize) >> (s % 64) & 1 == 1
    }

    /// Set sector `s`; true if it was not set. A sector past the end is ignored
    /// (callers check ranges against the device first).
    pub fn set(&mut self, s: u64) -> bool {
        let (w, b) = ((s / 64) as usize, s % 64);
        let Some(slot) = self.pages.get_mut(w / WORDS) else {
            return false;
        };
        let page = match slot {
            Some(p) => p,
            None => {
                self.allocated += 1;
                slot.insert(Box::new([0; WORDS]))
            }
        };
        let word = &mut page[w % WORDS];
        let was = *word >> b & 1 == 1;
        *word |= 1 << b;
        !was
    }

    /// OR `bytes` (a whole page, little-endian words) into page `p`; true if any bit
    /// was new. An all-zero page allocates nothing.
    pub fn merge_page(&mut self, p: u64, bytes: &[u8]) -> bool {
        let mut new = false;
        for (i, c) in bytes.chunks_exact(8).take(WORDS).enumerate() {
            let v = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            if v == 0 {
                continue;
            }
            let Some(slot) = self.pages.get_mut(p as usize) else {
                return new;
            };
            let page = match slot {
                Some(page) => page,
                None => {
                    self.allocated += 1;
                    slot.insert(Box::new([0; WORDS]))
                }
            };
            if v & !page[i] != 0 {
                page[i] |= v;
                new = true;
            }
        }
        new
    }

    /// The bytes of page `p` (zeros where none exists).
    pub fn page_bytes(&self, p: u64) -> Vec<u8> {
        match self.pages.get(p as usize) {
            Some(Some(page)) => page.iter().flat_map(|w| w.to_le_bytes()).collect(),
            _ => vec![0; PAGE as usize],
        }
    }

    /// Indices of the allocated pages, ascending.
    pub fn allocated_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| i as u64)
    }

    /// Set sectors.
    pub fn count_ones(&self) -> u64 {
        self.pages
            .iter()
            .flatten()
            .map(|p| p.iter().map(|w| w.count_ones() as u64).sum::<u64>())
            .sum()
    }

    /// Bytes of memory the map holds.
    pub fn heap_bytes(&self) -> u64 {
        (self.pages.len() * std::mem::size_of::<Option<Page>>()) as u64
            + self.allocated as u64 * PAGE
    }

    /// Read a map of `map_len` bytes stored at `offset` of `file`, visiting only the
    /// file's data extents there (SEEK_DATA; every byte where it is not supported).
    pub fn load(file: &File, offset: u64, map_len: u64) -> std::io::Result<SparseMap> {
        let mut map = SparseMap::new(map_len);
        let end = offset + map_len;
        let mut buf = vec![0u8; 1 << 20];
        for (start, stop) in livemount_store::fsutil::data_extents(file, offset, end) {
            // Whole pages: extents are block aligned, pages are 4 KiB.
            let mut pos = offset + (start - offset) / PAGE * PAGE;
            while pos < stop {
                let n = (stop - pos).min(buf.len() as u64).div_ceil(PAGE) * PAGE;
                let n = n.min(end - pos) as usize;
                file.read_exact_at(&mut buf[..n], pos)?;
                for (i, page) in buf[..n].chunks_exact(PAGE as usize).enumerate() {
                    map.merge_page((pos - offset) / PAGE + i as u64, page);
                }
                pos += n as u64;
            }
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_appear_only_where_bits_are_set() {
        // A 4 TiB device: 1 GiB of map, 262,144 pages, none allocated.
        let mut m = SparseMap::new((4u64 << 40) / 512 / 8);
        assert_eq!(m.page_count(), 262_144);
        assert!(m.heap_bytes() <= 2 << 20, "{}", m.heap_bytes());
        let last = (4u64 << 40) / 512 - 1;
        assert!(!m.get(0) && !m.get(last));
        assert!(m.set(0));
        assert!(!m.set(0), "set twice");
        assert!(m.set(last));
        assert!(m.set(1 << 31));
        assert!(m.get(0) && m.get(last) && m.get(1 << 31) && !m.get(1));
        assert_eq!(m.count_ones(), 3);
        assert_eq!(m.allocated_pages().count(), 3);
        assert!(m.heap_bytes() <= (2 << 20) + 3 * PAGE);
        assert!(!m.set(last + 64 * 512 * 8 * 8), "past the end is ignored");
        let b = m.page_bytes(m.page_count() - 1);
        assert_eq!(b[PAGE as usize - 1], 0x80);
        assert_eq!(m.page_bytes(7), vec![0; PAGE as usize]);
    }

    #[test]
    fn merging_zero_pages_allocates_nothing() {
        let mut m = SparseMap::new(16 * PAGE);
        assert!(!m.merge_page(3, &[0; PAGE as usize]));
        assert_eq!(m.allocated_pages().count(), 0);
        let mut p = vec![0u8; PAGE as usize];
        p[8] = 1;
        assert!(m.merge_page(3, &p));
        assert!(!m.merge_page(3, &p), "no new bits");
        assert!(m.get(3 * 32768 + 64));
    }

    #[test]
    fn loading_reads_the_pages_that_exist_in_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        let (offset, len) = (4096u64, 1u64 << 30);
        f.set_len(offset + len).unwrap();
        let mut p = vec![0u8; PAGE as usize];
        p[0] = 0b101;
        f.write_all_at(&p, offset + 5 * PAGE).unwrap();
        p[0] = 0;
        p[4095] = 0x80;
        f.write_all_at(&p, offset + len - PAGE).unwrap();
        // A page of zeros that exists on disk is still no page in memory.
        f.write_all_at(&[0; 4096], offset + 9 * PAGE).unwrap();
        let m = SparseMap::load(&f, offset, len).unwrap();
        assert_eq!(
            m.allocated_pages().collect::<Vec<_>>(),
            vec![5, len / PAGE - 1]
        );
        assert!(m.get(5 * 32768) && m.get(5 * 32768 + 2) && !m.get(5 * 32768 + 1));
        assert!(m.get(len * 8 - 1));
        assert_eq!(m.count_ones(), 3);
        // Only the written pages are visited, not the 1 GiB region.
        let ext = livemount_store::fsutil::data_extents(&f, offset, offset + len);
        let visited: u64 = ext.iter().map(|(a, b)| b - a).sum();
        assert!(visited < 1 << 20, "{ext:?}");
    }
}
