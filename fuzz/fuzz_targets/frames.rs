//! `cargo +nightly fuzz run frames` (or `scripts/fuzz frames`); the body is in ../bodies.rs.
#![no_main]

#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::frames(data));
