//! OS resources: the shared doorbell page (a memfd mapped here and, when mappable, by the client)
//! and the eventfds that wake a sleeping reactor when a trapped doorbell write arrives.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// The doorbell registers of BAR0 (offset 0x1000 on), backed by a memfd so the transport can let
/// the client map them. Every doorbell is a `u32` read and written atomically here; the client
/// writes the same memory with plain stores from its own process.
/// Where the doorbells start in the memfd: their offset in BAR0 (SPDK's layout).
pub(crate) const FILE_OFFSET: u64 = crate::spec::DOORBELL_BASE;

pub(crate) struct DoorbellPage {
    ptr: *mut u8,
    len: usize,
    fd: Arc<OwnedFd>,
}

// SAFETY: the mapping is owned by this value and only accessed through atomics.
unsafe impl Send for DoorbellPage {}
// SAFETY: as above; shared access goes through `AtomicU32`.
unsafe impl Sync for DoorbellPage {}

impl Drop for DoorbellPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` come from a successful mmap and are unmapped once, here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl DoorbellPage {
    /// Creates a zeroed page of `len` bytes (a multiple of the page size). The memfd holds the
    /// doorbells at file offset [`FILE_OFFSET`] (= their BAR0 offset), so a transport whose
    /// client maps a sparse area at "region offset + area offset" (vfio-user) finds them there.
    pub fn new(len: usize) -> std::io::Result<DoorbellPage> {
        let name = c"vstor-nvme-doorbells";
        // SAFETY: `name` is NUL-terminated; returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let bad = || std::io::Error::from(std::io::ErrorKind::InvalidInput);
        let size = len.checked_add(usize::try_from(FILE_OFFSET).map_err(|_| bad())?).ok_or_else(bad)?;
        let size = libc::off_t::try_from(size).map_err(|_| bad())?;
        let map_at = libc::off_t::try_from(FILE_OFFSET).map_err(|_| bad())?;
        // SAFETY: ftruncate on a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the doorbell part of the file at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                map_at,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DoorbellPage { ptr: p.cast(), len, fd: Arc::new(fd) })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// Doorbell number `index` (SQ y tail = 2y, CQ y head = 2y + 1, with CAP.DSTRD = 0).
    pub fn get(&self, index: usize) -> Option<&AtomicU32> {
        let off = index.checked_mul(4)?;
        if off.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: `off + 4 <= len`, the base is page-aligned so the pointer is 4-byte aligned,
        // and the mapping lives as long as `self`. All accesses from this process are atomic.
        Some(unsafe { AtomicU32::from_ptr(self.ptr.add(off).cast::<u32>()) })
    }

    /// Reads doorbell `index` (0 if out of range).
    pub fn load(&self, index: usize) -> u32 {
        self.get(index).map(|a| a.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Writes doorbell `index` (ignored if out of range).
    pub fn store(&self, index: usize, v: u32) {
        if let Some(a) = self.get(index) {
            a.store(v, Ordering::Release);
        }
    }

    /// Zeroes every doorbell.
    pub fn clear(&self) {
        for i in 0..self.len / 4 {
            self.store(i, 0);
        }
    }
}

/// Wakes a reactor that sleeps with this poller armed. `kick` costs a syscall only while armed.
pub(crate) struct Kick {
    fd: OwnedFd,
    armed: AtomicBool,
}

impl Kick {
    pub fn new() -> std::io::Result<Kick> {
        // SAFETY: eventfd with flags only; returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        Ok(Kick { fd: unsafe { OwnedFd::from_raw_fd(raw) }, armed: AtomicBool::new(false) })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Wakes the poller if it is armed (its reactor may be about to sleep or asleep). Call after
    /// publishing the new doorbell value.
    pub fn kick(&self) {
        // Pairs with the fence in `arm`: either the poller's re-check sees the new value, or we
        // see `armed` and signal.
        fence(Ordering::SeqCst);
        if self.armed.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd; failure (counter full) is
            // harmless since the fd is then readable anyway.
            unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }

    /// Marks the poller armed. Re-check for work after this.
    pub fn arm(&self) {
        self.drain();
        self.armed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Clears the armed flag, draining the eventfd if it may have been signalled.
    pub fn disarm(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.drain();
        }
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut v).cast(), 8) };
    }
}
