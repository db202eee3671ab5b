//! The fuzz targets' bodies (fuzz/bodies.rs) on stable Rust, for CI: each runs over its seed
//! corpus (fuzz/corpus/<target>/) and over inputs made from the seeds by a fixed
//! pseudo-random generator (bytes flipped, cut, repeated, spliced). `scripts/fuzz` runs the
//! real, coverage-guided fuzzer (nightly and cargo-fuzz); this keeps the bodies compiling
//! and catches what a few thousand variations of the seeds can.

#[path = "../fuzz/bodies.rs"]
mod bodies;

/// xorshift64*: a fixed sequence, so a failure here repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = format!("{}/fuzz/corpus/{target}", env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {dir}");
    seeds.sort();
    seeds
}

/// One variation of `seed`, with a little of `other` now and then.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] = rng.next() as u8;
            }
            2 => out.truncate(rng.below(out.len() + 1)),
            3 if !out.is_empty() => {
                let from = rng.below(out.len());
                let to = (from + rng.below(16)).min(out.len());
                let piece = out[from..to].to_vec();
                let at = rng.below(out.len() + 1);
                out.splice(at..at, piece);
            }
            4 if !other.is_empty() => {
                let from = rng.below(other.len());
                let to = (from + rng.below(64)).min(other.len());
                let at = rng.below(out.len() + 1);
                out.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                let at = rng.below(out.len() + 1);
                let bytes: Vec<u8> = (0..rng.below(8)).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
        }
    }
    out
}

fn run(target: &str, variations: usize, body: impl Fn(&[u8])) {
    let seeds = seeds(target);
    for seed in &seeds {
        body(seed);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..variations {
        let seed = &seeds[rng.below(seeds.len())];
        let other = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed, other);
        body(&input);
    }
}

#[test]
fn config_target_survives_its_seeds_and_their_variations() {
    run("config", 3_000, bodies::config);
}

#[test]
fn frames_target_survives_its_seeds_and_their_variations() {
    run("frames", 20_000, bodies::frames);
}

#[test]
fn response_target_survives_its_seeds_and_their_variations() {
    // The well-formed answer gets through: the body does reach the response path.
    let ok = std::fs::read(format!("{}/fuzz/corpus/response/ok", env!("CARGO_MANIFEST_DIR"))).unwrap();
    assert!(bodies::response(&ok), "a well-formed response was not answered");
    run("response", 2_000, |input| {
        bodies::response(input);
    });
}
