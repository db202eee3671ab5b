//! `cargo +nightly fuzz run response` (or `scripts/fuzz response`); the body is in ../bodies.rs.
#![no_main]

#[path = "../bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    bodies::response(data);
});
