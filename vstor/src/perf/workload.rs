//! What to submit next: access pattern, offsets, and verify data.

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
    /// Write a seeded pattern, read it back, compare.
    Verify,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "randrw" | "rw" => Pattern::RandRw,
            "verify" => Pattern::Verify,
            other => {
                return Err(format!(
                    "workload '{other}' is not one of read, write, randread, randwrite, randrw, verify"
                ))
            }
        })
    }
}

/// A xorshift64* generator: fast and good enough for offsets and data.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Chooses the next operation: read or write, and which I/O-sized unit of the device.
pub struct OpGen {
    pattern: Pattern,
    rwmixread: u8,
    /// Units (of one I/O size) this generator may touch: `[first, first + count)`.
    first: u64,
    count: u64,
    seq: u64,
    rng: Rng,
}

impl OpGen {
    pub fn new(pattern: Pattern, rwmixread: u8, first: u64, count: u64, seed: u64) -> Self {
        Self { pattern, rwmixread, first, count: count.max(1), seq: 0, rng: Rng::new(seed) }
    }

    /// (is_write, unit index). For verify the caller handles the write-then-read pairing.
    pub fn next_op(&mut self) -> (bool, u64) {
        let unit = match self.pattern {
            Pattern::Read | Pattern::Write => {
                let u = self.seq % self.count;
                self.seq += 1;
                u
            }
            _ => self.rng.below(self.count),
        } + self.first;
        let write = match self.pattern {
            Pattern::Read | Pattern::RandRead => false,
            Pattern::Write | Pattern::RandWrite | Pattern::Verify => true,
            Pattern::RandRw => self.rng.below(100) >= u64::from(self.rwmixread),
        };
        (write, unit)
    }
}

/// Fills `buf` with the verify pattern for (`unit`, `generation`).
pub fn fill(buf: &mut [u8], unit: u64, generation: u64) {
    let mut r = Rng::new(unit ^ generation.rotate_left(32) ^ 0xA5A5);
    for chunk in buf.chunks_mut(8) {
        let v = r.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Whether `buf` holds the verify pattern for (`unit`, `generation`).
pub fn check(buf: &[u8], unit: u64, generation: u64) -> bool {
    let mut r = Rng::new(unit ^ generation.rotate_left(32) ^ 0xA5A5);
    buf.chunks(8).all(|c| c == &r.next_u64().to_le_bytes()[..c.len()])
}
