//! Snapshot indexes: decode any bytes; what decodes re-encodes to the same bytes.
//! Each input is tried as is and as a body with its BLAKE3 checksum appended (the
//! checksum is not a secret: the bounds behind it must hold on their own).
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemount_store::format::index::SnapshotIndex;
use std::path::Path;

fn check(data: &[u8]) {
    if let Ok(i) = SnapshotIndex::decode(Path::new("fuzz.fidx"), data) {
        assert_eq!(i.encode(), data, "decode/encode round trip");
        for c in 0..i.chunks.len().min(4) {
            let _ = i.chunk_len(c);
        }
        let _ = i.stored_ids();
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(blake3::hash(data).as_bytes());
    check(&sealed);
});
