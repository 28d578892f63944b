//! A mock guest: memory in a memfd, mapped as three regions the way a VMM shares them.
//!
//! ```text
//! gpa 0x0000_0000 .. 0x0000_4000  region A (memfd offset 0x0000)
//! gpa 0x0000_4000 .. 0x0000_8000  region B (memfd offset 0x8000): adjacent to A in guest
//!                                 addresses, not in the host mapping, so buffers crossing
//!                                 0x4000 are split into two iovecs
//! gpa 0x0010_0000 .. 0x0010_1000  region C (memfd offset 0x4000), after a hole
//! ```
//!
//! An input's memory image is copied to gpa 0 onwards (A, then B); everything else is zero.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vstor_bdev::IoVecs;
use vstor_mem::{memfd, GuestMemory, Region};

pub const A: u64 = 0;
pub const A_SIZE: u64 = 0x4000;
pub const B: u64 = 0x4000;
pub const B_SIZE: u64 = 0x4000;
pub const C: u64 = 0x10_0000;
pub const C_SIZE: u64 = 0x1000;
/// Bytes of memory an input can fill (A and B).
pub const IMAGE_MAX: usize = (A_SIZE + B_SIZE) as usize;
const FILE_SIZE: u64 = 0x10000;

/// Guest memory over one memfd.
pub struct Guest {
    pub file: File,
    pub mem: Arc<GuestMemory>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guest({:?})", self.mem)
    }
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    pub fn new() -> Self {
        let file = memfd("fuzz-guest", FILE_SIZE).expect("memfd");
        let map = |gpa, size, off| Region::map(&file, gpa, size, gpa + 0x7f00_0000_0000, off).expect("map region");
        let regions = vec![map(A, A_SIZE, 0), map(B, B_SIZE, 0x8000), map(C, C_SIZE, 0x4000)];
        let mem = Arc::new(GuestMemory::new(regions).expect("guest memory"));
        Self { file, mem }
    }

    /// Zeroes all guest memory, then copies `image` to gpa 0 (at most [`IMAGE_MAX`] bytes).
    pub fn load(&self, image: &[u8]) {
        static ZERO: [u8; FILE_SIZE as usize] = [0; FILE_SIZE as usize];
        self.file.write_all_at(&ZERO, 0).expect("zero guest memory");
        let n = image.len().min(IMAGE_MAX);
        self.mem.write(0, &image[..n]).expect("image fits in A and B");
    }

    /// The whole memfd, to compare with later (see [`assert_changed_only`](Self::assert_changed_only)).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; FILE_SIZE as usize];
        self.file.read_exact_at(&mut v, 0).expect("read guest memory");
        v
    }

    /// Panics if a byte changed since `before` outside the guest-address ranges `allowed`
    /// (start, length): the device wrote where the guest did not let it.
    pub fn assert_changed_only(&self, before: &[u8], allowed: &[(u64, u64)]) {
        let after = self.snapshot();
        if after == before {
            return;
        }
        // (file offset, length, guest address) of each region.
        let map = [(0u64, A_SIZE, A), (0x8000, B_SIZE, B), (0x4000, C_SIZE, C)];
        let changed = after
            .chunks(64)
            .zip(before.chunks(64))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .flat_map(|(c, (a, b))| a.iter().zip(b.iter()).enumerate().map(move |(i, (a, b))| (c * 64 + i, a, b)));
        for (off, a, b) in changed {
            if a == b {
                continue;
            }
            let off = off as u64;
            let gpa = map.iter().find(|(o, l, _)| off >= *o && off - o < *l).map(|(o, _, g)| g + (off - o));
            let ok = gpa.is_some_and(|g| allowed.iter().any(|&(s, l)| g >= s && g - s < l));
            assert!(ok, "byte at memfd offset {off:#x} (guest address {gpa:x?}) changed {b:#x} -> {a:#x}; the device may write only {allowed:x?}");
        }
    }

    /// Panics unless every segment of `iovs` lies inside one region of the guest's memory.
    pub fn assert_inside(&self, iovs: &IoVecs, what: &str) {
        assert_inside(&self.mem, iovs, what);
    }
}

/// Panics unless every segment of `iovs` lies inside one region of `mem`.
pub fn assert_inside(mem: &GuestMemory, iovs: &IoVecs, what: &str) {
    for s in iovs.as_slice() {
        let start = s.iov_base as usize;
        let inside = mem.regions().iter().any(|r| {
            let base = r.host() as usize;
            let size = usize::try_from(r.size).unwrap_or(0);
            start >= base && s.iov_len <= size && start - base <= size - s.iov_len
        });
        assert!(inside, "{what}: iovec {start:#x}+{:#x} is outside guest memory {mem:?}", s.iov_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovecs_outside_guest_memory_are_caught() {
        let g = Guest::new();
        let mut ok = IoVecs::new();
        g.mem.append_iovecs(A_SIZE - 10, 20, &mut ok).unwrap();
        g.assert_inside(&ok, "adjacent regions");
        let r = &g.mem.regions()[0];
        let mut bad = IoVecs::new();
        // SAFETY: the iovec is only inspected, never used for I/O.
        unsafe { bad.push_raw(r.host().wrapping_add(usize::try_from(r.size).unwrap() - 1), 2) };
        let caught = std::panic::catch_unwind(|| g.assert_inside(&bad, "one byte past region A"));
        assert!(caught.is_err());
    }

    #[test]
    fn writes_outside_allowed_ranges_are_caught() {
        let g = Guest::new();
        g.load(&[]);
        let before = g.snapshot();
        g.mem.write(B + 0x10, &[1, 2]).unwrap();
        g.mem.write(C, &[3]).unwrap();
        g.assert_changed_only(&before, &[(B + 0x10, 2), (C, 1)]);
        let caught = std::panic::catch_unwind(|| g.assert_changed_only(&before, &[(B + 0x10, 1), (C, 1)]));
        assert!(caught.is_err(), "the byte at B + 0x11 is outside the allowed ranges");
    }
}
