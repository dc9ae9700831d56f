//! Kernel/user ABI of the livemount block profiler.
//!
//! Both the eBPF programs (`ebpf/`, built for `bpfel-unknown-none`) and the
//! userspace loader (`livemount-profiler`) include this crate, so the structs
//! below are the single definition of what crosses the boundary. Everything is
//! `#[repr(C)]` with explicit padding so both sides agree byte for byte.
//!
//! The layout of the tracepoint records themselves is *not* defined here: it
//! changes across kernels (`rwbs` grew from 8 to 10 bytes, `ioprio` was added),
//! so userspace reads the field offsets from tracefs at load time and passes
//! them in [`Config`].
#![no_std]

/// Name of the `Array<Config>` map (one entry) holding the run-time configuration.
pub const CONFIG_MAP: &str = "CONFIG";
/// Name of the `HashMap<u32, u32>` of traced devices (kernel `dev_t` → target index).
pub const DEVICES_MAP: &str = "DEVICES";
/// Name of the `HashMap<InodeKey, u32>` of traced files for the page-cache program.
pub const INODES_MAP: &str = "INODES";
/// Name of the ring buffer carrying [`Event`]s to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU `Array<u64>` of counters, indexed by the `COUNTER_*` constants.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Program name: classic tracepoint `block:block_rq_issue` (reads as the device sees them).
pub const PROG_RQ_ISSUE: &str = "block_rq_issue";
/// Program name: classic tracepoint `block:block_bio_queue` (reads in the submitter's context,
/// used when filtering by pid or cgroup, since requests are issued by other tasks).
pub const PROG_BIO_QUEUE: &str = "block_bio_queue";
/// Program name: classic tracepoint `filemap:mm_filemap_get_pages` (buffered reads of a file,
/// page-cache hits and misses alike).
pub const PROG_FILEMAP_GET_PAGES: &str = "mm_filemap_get_pages";

/// Counter index: events that passed the filters and were submitted to the ring buffer.
pub const COUNTER_SEEN: u32 = 0;
/// Counter index: events that passed the filters but found the ring buffer full.
pub const COUNTER_LOST: u32 = 1;
/// Counter index: field reads (`bpf_probe_read`) that failed; non-zero means bad offsets.
pub const COUNTER_READ_ERRORS: u32 = 2;
/// Number of counters in [`COUNTERS_MAP`].
pub const COUNTER_COUNT: u32 = 3;

/// Most devices (disks or partitions' parents) one profiler can trace at once.
pub const MAX_DEVICES: u32 = 64;
/// Most files one profiler can trace at once in page-cache mode.
pub const MAX_INODES: u32 = 64;

/// [`Event::kind`]: a block-layer read request; `start` and `len` are 512-byte sectors.
pub const KIND_BLOCK: u8 = 1;
/// [`Event::kind`]: a buffered file read; `start` and `len` are page indexes / page counts.
pub const KIND_PAGE_CACHE: u8 = 2;

/// [`Event::flags`]: the request was readahead (`A` in `rwbs`).
pub const FLAG_READAHEAD: u8 = 1;

/// Byte offsets of the fields the block programs read, taken from
/// `/sys/kernel/tracing/events/block/<tracepoint>/format`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOffsets {
    /// `dev_t dev` (4 bytes, kernel encoding `major << 20 | minor`).
    pub dev: u16,
    /// `sector_t sector` (8 bytes).
    pub sector: u16,
    /// `unsigned int nr_sector` (4 bytes).
    pub nr_sector: u16,
    /// `char rwbs[8 or 10]`; the programs read its first 8 bytes.
    pub rwbs: u16,
}

/// Byte offsets of the fields of `filemap:mm_filemap_get_pages`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilemapOffsets {
    /// `unsigned long i_ino` (8 bytes).
    pub ino: u16,
    /// `dev_t s_dev` (4 bytes).
    pub dev: u16,
    /// `unsigned long index` (8 bytes): first page of the read.
    pub index: u16,
    /// `unsigned long last_index` (8 bytes): last page of the read, inclusive.
    pub last_index: u16,
}

/// Run-time configuration, written by userspace into [`CONFIG_MAP`] before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Field offsets for `block_rq_issue`.
    pub rq_issue: BlockOffsets,
    /// Field offsets for `block_bio_queue`.
    pub bio_queue: BlockOffsets,
    /// Field offsets for `mm_filemap_get_pages`.
    pub filemap: FilemapOffsets,
    /// Only events from this thread group (process) when non-zero.
    pub tgid: u32,
    /// Padding; keeps `cgroup_id` 8-byte aligned on both sides.
    pub _pad: u32,
    /// Only events from tasks in this cgroup (v2 id, the cgroup directory's inode) when non-zero.
    pub cgroup_id: u64,
}

/// Key of [`INODES_MAP`]: a file by its file system device and inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    /// `s_dev` in kernel encoding (`major << 20 | minor`).
    pub dev: u32,
    /// Padding, always zero (hash keys compare all bytes).
    pub _pad: u32,
    /// Inode number.
    pub ino: u64,
}

/// One traced read, as sent through the ring buffer (32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the tracepoint fired.
    pub ts_ns: u64,
    /// First sector ([`KIND_BLOCK`]) or page index ([`KIND_PAGE_CACHE`]).
    pub start: u64,
    /// Number of sectors or pages.
    pub len: u32,
    /// Device the event was reported under (kernel encoding).
    pub dev: u32,
    /// Thread group id of the task the tracepoint fired in.
    pub tgid: u32,
    /// [`KIND_BLOCK`] or [`KIND_PAGE_CACHE`].
    pub kind: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Padding, zero.
    pub _pad: [u8; 2],
}

/// Kernel encoding of a device number, as block tracepoints report it.
pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & ((1 << 20) - 1))
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these types are `#[repr(C)]`, `Copy`, contain only integers and
    // explicit padding fields, so every bit pattern is valid and there are no
    // implicit padding bytes.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Event>(), 32);
        assert_eq!(core::mem::size_of::<BlockOffsets>(), 8);
        assert_eq!(core::mem::size_of::<Config>(), 40);
        assert_eq!(core::mem::size_of::<InodeKey>(), 16);
    }

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(kernel_dev(7, 3), (7 << 20) | 3);
        assert_eq!(kernel_dev(259, 1), (259 << 20) | 1);
    }
}
