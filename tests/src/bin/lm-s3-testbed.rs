//! A real object store for benchmarks driven from outside Rust tests (`cargo xtask
//! boot-s3`): a single-node Garage on loopback with one bucket, behind the delay
//! proxy of `livemount_tests::netem` (RTT and rate from the arguments). Prints one
//! JSON line — `{"endpoint": proxy URL, "direct": Garage's URL, "credentials":
//! FILE, "bucket": NAME}` — then serves until its standard input closes, and stops
//! Garage on the way out.
//!
//! Usage: `lm-s3-testbed BUCKET RTT_MS RATE_BYTES_S` (RATE 0: unlimited).

use livemount_tests::garage::{garage_bin, Garage};
use livemount_tests::netem::DelayProxy;
use std::io::Read;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bucket, rtt, rate] = &args[..] else {
        eprintln!("usage: lm-s3-testbed BUCKET RTT_MS RATE_BYTES_S");
        std::process::exit(2);
    };
    let (Ok(rtt), Ok(rate)) = (rtt.parse::<u64>(), rate.parse::<u64>()) else {
        eprintln!("lm-s3-testbed: RTT_MS and RATE_BYTES_S are numbers");
        std::process::exit(2);
    };
    let Some(bin) = garage_bin() else {
        eprintln!("lm-s3-testbed: no garage binary: run `cargo xtask setup`");
        std::process::exit(1);
    };
    let g = Garage::start(&bin);
    g.bucket(bucket);
    let upstream = match g.endpoint.trim_start_matches("http://").parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lm-s3-testbed: Garage's endpoint {}: {e}", g.endpoint);
            std::process::exit(1);
        }
    };
    let proxy = DelayProxy::start(
        upstream,
        Duration::from_millis(rtt / 2),
        (rate > 0).then_some(rate),
    );
    println!(
        "{}",
        serde_json::json!({
            "endpoint": proxy.url(),
            "direct": g.endpoint,
            "credentials": g.credentials_file(),
            "bucket": bucket,
        })
    );
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    let (up, down) = proxy.bytes();
    eprintln!("lm-s3-testbed: {up} bytes up, {down} bytes down through the proxy");
}
