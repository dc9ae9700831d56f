//! Criterion benchmarks for livemount live in `benches/benches/`.
