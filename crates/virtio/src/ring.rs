//! Raw access to ring memory. Rings live in guest memory the guest writes concurrently, so every
//! access is a volatile read or write through a pointer validated when the queue was set up.

use vstor_mem::GuestMemory;

use crate::QueueError;

/// Translates a ring area after checking its alignment; the whole area must lie in one region.
pub(crate) fn area(
    mem: &GuestMemory,
    name: &'static str,
    gpa: u64,
    len: u64,
    align: u64,
) -> Result<*mut u8, QueueError> {
    if !gpa.is_multiple_of(align) {
        return Err(QueueError::Misaligned { area: name, gpa, align });
    }
    mem.translate(gpa, len).ok_or(QueueError::NotMapped { area: name, gpa, len })
}

/// Reads a `T` at `p`.
///
/// # Safety
/// `p..p+size_of::<T>()` must lie inside a live guest memory mapping.
#[inline]
pub(crate) unsafe fn read<T: Copy>(p: *const u8) -> T {
    // SAFETY: the caller guarantees the range is mapped; unaligned volatile-free read through
    // read_unaligned would allow tearing to be optimised differently, so read volatilely.
    unsafe { std::ptr::read_volatile(p.cast::<T>()) }
}

/// Writes a `T` at `p`.
///
/// # Safety
/// As for [`read`], and `p` must be suitably aligned for `T` (ring areas are checked for
/// alignment at setup).
#[inline]
pub(crate) unsafe fn write<T: Copy>(p: *mut u8, v: T) {
    // SAFETY: the caller guarantees the range is mapped and aligned.
    unsafe { std::ptr::write_volatile(p.cast::<T>(), v) }
}
