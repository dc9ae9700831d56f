//! What an NBD client sends: option headers, INFO/GO and META_CONTEXT payloads,
//! request headers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemount::frontend::nbd::proto;

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..16) {
        let _ = proto::parse_option_header(h.try_into().unwrap_or(&[0u8; 16]));
    }
    let _ = proto::parse_info_request(data);
    let _ = proto::parse_meta_request(data);
    if let Some(h) = data.get(..28) {
        let _ = proto::parse_request(h.try_into().unwrap_or(&[0u8; 28]));
    }
});
