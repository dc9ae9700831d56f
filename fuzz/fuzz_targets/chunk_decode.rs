//! Chunk files: parse (under the id the header names) and decode, whole and in
//! parts. Any input: an error, never a panic, never an allocation it asks for. Each
//! input is tried as is and with its crcs recomputed (they are forgeable, so the
//! checks behind them must hold on their own).
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemount_store::format::chunk::{ChunkId, ChunkLayout};

fn reseal(f: &mut [u8]) {
    if f.len() < 64 {
        return;
    }
    let frames = u32::from_le_bytes([f[20], f[21], f[22], f[23]]) as usize;
    if let Some(t) = f.get(64..64usize.saturating_add(frames.saturating_mul(40))) {
        let crc = crc32c::crc32c(t);
        f[56..60].copy_from_slice(&crc.to_le_bytes());
    }
    let h = crc32c::crc32c(&f[..60]);
    f[60..64].copy_from_slice(&h.to_le_bytes());
}

fn check(data: &[u8]) {
    let mut id = [0u8; 32];
    if let Some(h) = data.get(24..56) {
        id.copy_from_slice(h);
    }
    let id = ChunkId(id);
    if let Ok(l) = ChunkLayout::parse(&id, data) {
        assert!(l.file_len() <= ChunkLayout::max_file_len(l.content_len, l.frame_size));
        let _ = l.decode_all(data);
        let n = l.frames.len();
        for r in [0..n, n / 2..n, 0..n / 2] {
            let fr = l.file_range(r.clone());
            if let Some(b) = data.get(fr.start as usize..fr.end as usize) {
                let _ = l.decode_frames(r, b);
            }
        }
        let _ = l.frames_for(0..l.content_len);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    reseal(&mut sealed);
    check(&sealed);
});
