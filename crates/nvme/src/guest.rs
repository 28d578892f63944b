//! Access to guest memory through host pointers: queue rings, shadow doorbell buffers.
//!
//! A [`GuestPtr`] is a range of guest memory translated once (with `GuestMemory::translate`, which
//! checks the whole range against one region) and kept with the `Arc<GuestMemory>` snapshot that
//! maps it, so the pointer cannot outlive its mapping. Every accessor checks its offset against
//! the translated length, so a bug here cannot reach host memory outside the guest's regions.
//! Accesses are volatile: the guest (another process) may change the memory at any time, and
//! values are copied out once and then validated (no double fetch).

use std::sync::Arc;

use vstor_mem::GuestMemory;

/// A translated, bounds-checked range of guest memory.
#[derive(Clone)]
pub(crate) struct GuestPtr {
    /// Keeps the mapping `ptr` points into alive.
    _mem: Arc<GuestMemory>,
    ptr: *mut u8,
    len: usize,
}

impl std::fmt::Debug for GuestPtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestPtr({} bytes)", self.len)
    }
}

impl GuestPtr {
    /// Translates `len` bytes at `gpa`; `None` if any byte lies outside one region of `mem`.
    pub fn new(mem: &Arc<GuestMemory>, gpa: u64, len: u64) -> Option<GuestPtr> {
        let ptr = mem.translate(gpa, len)?;
        Some(GuestPtr { _mem: mem.clone(), ptr, len: usize::try_from(len).ok()? })
    }

    fn check(&self, off: usize, n: usize) -> bool {
        off.checked_add(n).is_some_and(|end| end <= self.len)
    }

    /// Copies `out.len()` bytes from offset `off`. Returns false (and copies nothing) if the range
    /// is not inside this pointer's range.
    pub fn read(&self, off: usize, out: &mut [u8]) -> bool {
        if !self.check(off, out.len()) {
            return false;
        }
        // SAFETY: `off + out.len() <= self.len` (checked above) and `ptr..ptr+len` lies in a region
        // of `self._mem`, which this value keeps mapped. Volatile reads: the guest may write the
        // memory concurrently; we only ever copy bytes out, never form a reference.
        unsafe {
            let src = self.ptr.add(off);
            if (src as usize).is_multiple_of(8) && out.len().is_multiple_of(8) {
                for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                    let v = std::ptr::read_volatile(src.add(i * 8).cast::<u64>());
                    chunk.copy_from_slice(&v.to_ne_bytes());
                }
            } else {
                for (i, b) in out.iter_mut().enumerate() {
                    *b = std::ptr::read_volatile(src.add(i));
                }
            }
        }
        true
    }

    /// Reads the little-endian u32 at `off` (which must be 4-byte aligned in guest memory).
    pub fn read_u32(&self, off: usize) -> Option<u32> {
        if !self.check(off, 4) {
            return None;
        }
        // SAFETY: in bounds (checked) and inside the mapping kept alive by `self._mem`.
        let p = unsafe { self.ptr.add(off) };
        if !(p as usize).is_multiple_of(4) {
            return None;
        }
        // SAFETY: `p` is in bounds and 4-byte aligned; volatile because the guest writes it.
        Some(u32::from_le(unsafe { std::ptr::read_volatile(p.cast::<u32>()) }))
    }

    /// Writes the little-endian u32 `v` at `off` (4-byte aligned). Returns false if out of bounds
    /// or misaligned.
    pub fn write_u32(&self, off: usize, v: u32) -> bool {
        if !self.check(off, 4) {
            return false;
        }
        // SAFETY: in bounds (checked) and inside the mapping kept alive by `self._mem`.
        let p = unsafe { self.ptr.add(off) };
        if !(p as usize).is_multiple_of(4) {
            return false;
        }
        // SAFETY: `p` is in bounds, aligned and writable (guest memory is mapped read-write); the
        // guest may read it concurrently, hence volatile.
        unsafe { std::ptr::write_volatile(p.cast::<u32>(), v.to_le()) };
        true
    }
}
