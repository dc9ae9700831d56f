//! Everything a user or a run file hands over as text: sizes, durations, pre-staging
//! windows, a store's configuration, a mount's status file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemount::cli::parse::{parse_duration, parse_prestage, parse_size};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_size(s);
    let _ = parse_duration(s);
    let _ = parse_prestage(s);
    let _ = serde_json::from_str::<livemount_store::store::StoreConfig>(s);
    let _ = serde_json::from_str::<livemount::daemon::status::MountStatus>(s);
});
