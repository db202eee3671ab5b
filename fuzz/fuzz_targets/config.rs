//! `cargo +nightly fuzz run config` (or `scripts/fuzz config`); the body is in ../bodies.rs.
#![no_main]

#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::config(data));
