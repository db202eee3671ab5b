//! A small per-thread pseudo-random source for load balancing choices and jitter.
//!
//! Neither use needs cryptographic quality; both need to be cheap and uncontended, so each
//! thread keeps its own xorshift state seeded from the standard library's random hasher keys.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_usize(&STATE as *const _ as usize);
    hasher.finish() | 1
}

/// A uniformly distributed `u64`.
pub(crate) fn next_u64() -> u64 {
    STATE.with(|state| {
        // xorshift64*: fast, and good enough to pick between endpoints.
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// A number in `0..n`; `n` must be above zero.
pub(crate) fn below(n: usize) -> usize {
    (((next_u64() >> 32) * n as u64) >> 32) as usize
}

/// A float in `[-1.0, 1.0)`, for symmetric jitter.
pub(crate) fn symmetric_unit() -> f64 {
    (next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut seen = [0usize; 5];
        for _ in 0..10_000 {
            seen[below(5)] += 1;
        }
        assert!(seen.iter().all(|&count| count > 1_000), "{seen:?}");
    }

    #[test]
    fn symmetric_unit_stays_in_range() {
        for _ in 0..10_000 {
            let x = symmetric_unit();
            assert!((-1.0..1.0).contains(&x), "{x}");
        }
    }
}
