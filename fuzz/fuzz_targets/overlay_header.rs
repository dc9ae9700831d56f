//! Overlay headers (what `commit` and a mount read first from an overlay file), as
//! they are and with their crc recomputed (a crc is not a secret).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = livemount::block::overlay::parse_identity(data);
    if data.len() >= 4096 {
        let mut h = data[..4096].to_vec();
        let crc = crc32c::crc32c(&h[..4092]);
        h[4092..].copy_from_slice(&crc.to_le_bytes());
        let _ = livemount::block::overlay::parse_identity(&h);
    }
});
