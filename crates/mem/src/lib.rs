//! Guest memory as a VMM shares it: regions of files (memfds) mapped into vstor, each with a
//! guest-physical address (or IOVA) and, for vhost-user, the frontend's own virtual address.
//!
//! A [`GuestMemory`] is an immutable snapshot, shared as `Arc<GuestMemory>`. A new memory table
//! builds a new snapshot; users that still hold the old one (in-flight I/O) keep its mappings alive
//! until they drop it. Every translation checks the whole range against one region (or a run of
//! adjacent regions for [`GuestMemory::append_iovecs`]) with checked arithmetic: guest-controlled
//! addresses never reach host memory outside the guest's regions.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vstor_bdev::IoVecs;

pub mod sigbus;
mod uffd;
pub use uffd::Userfault;

/// Most regions one memory table may have (vhost-user's slot limit as QEMU applies it).
pub const MAX_REGIONS: usize = 512;

/// Why a memory table or a translation was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    #[error("region at guest address {gpa:#x}: size {size:#x} is zero or wraps the address space")]
    BadSize { gpa: u64, size: u64 },
    #[error("region at guest address {gpa:#x} overlaps the region at {other:#x}")]
    Overlap { gpa: u64, other: u64 },
    #[error("region at frontend address {va:#x} overlaps another region's frontend addresses")]
    OverlapVa { va: u64 },
    #[error("region at guest address {gpa:#x}: the file holds {file_size:#x} bytes, fewer than offset {offset:#x} + size {size:#x}")]
    FileTooSmall { gpa: u64, file_size: u64, offset: u64, size: u64 },
    #[error("more than {MAX_REGIONS} memory regions")]
    TooManyRegions,
    #[error("mapping region at guest address {gpa:#x} failed: {errno}")]
    Map { gpa: u64, errno: i32 },
    #[error("no region at guest address {gpa:#x}")]
    NoRegion { gpa: u64 },
}

/// One mmap of a file, unmapped when the last region using it goes.
struct Mapping {
    base: *mut u8,
    len: usize,
    /// Protection against the file being truncated under it (see [`sigbus`]); taken (and so
    /// unregistered) before the unmap.
    guard: Option<sigbus::Registration>,
}

// SAFETY: the mapping is shared memory owned by this value; all access to its bytes goes through
// raw pointers with volatile or kernel (I/O) semantics, never through Rust references.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        drop(self.guard.take());
        // SAFETY: `base`/`len` come from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A mapped region.
#[derive(Clone)]
pub struct Region {
    /// Guest-physical address (or IOVA) of the first byte.
    pub gpa: u64,
    /// Size in bytes (> 0).
    pub size: u64,
    /// The frontend's virtual address of the first byte (vhost-user); equal to `gpa` otherwise.
    pub user_addr: u64,
    /// Offset of the region in its file.
    pub offset: u64,
    host: *mut u8,
    _map: Arc<Mapping>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region(gpa {:#x}+{:#x}, va {:#x})", self.gpa, self.size, self.user_addr)
    }
}

// SAFETY: `host` points into the mapping the region keeps alive; see `Mapping`.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096).max(4096)
}

impl Region {
    /// Maps `size` bytes of `file` from `offset`, to be seen at `gpa` (and frontend address
    /// `user_addr`). Refuses sizes that wrap and files too small for the range (touching a page
    /// past the end of a file would raise SIGBUS).
    pub fn map(file: &File, gpa: u64, size: u64, user_addr: u64, offset: u64) -> Result<Region, MemError> {
        let bad = MemError::BadSize { gpa, size };
        if size == 0 || gpa.checked_add(size).is_none() || user_addr.checked_add(size).is_none() {
            return Err(bad);
        }
        let end = offset.checked_add(size).ok_or(bad.clone())?;
        let file_size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if file.metadata().map(|m| m.file_type().is_file()).unwrap_or(false) && file_size < end {
            return Err(MemError::FileTooSmall { gpa, file_size, offset, size });
        }
        let page = page_size();
        let map_off = offset - offset % page;
        let delta = offset - map_off;
        let map_len = usize::try_from(size.checked_add(delta).ok_or(bad.clone())?).map_err(|_| bad.clone())?;
        let off = libc::off_t::try_from(map_off).map_err(|_| bad)?;
        // Ask the kernel to refuse shrinking the file from now on (works for sealable memfds).
        // SAFETY: fcntl on a valid fd with an integer argument; failure is harmless.
        let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        // SAFETY: a new shared mapping of the file at a kernel-chosen address; no existing memory
        // is affected. The range was checked against the file size above.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemError::Map { gpa, errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) });
        }
        let guard = sigbus::register(p as usize, map_len);
        let map = Arc::new(Mapping { base: p.cast(), len: map_len, guard: Some(guard) });
        // SAFETY: `delta < page <= map_len`, so the pointer stays inside the mapping.
        let host = unsafe { map.base.add(usize::try_from(delta).unwrap_or(0)) };
        Ok(Region { gpa, size, user_addr, offset, host, _map: map })
    }

    /// Host address of the region's first byte.
    pub fn host(&self) -> *mut u8 {
        self.host
    }

    /// Whether the VMM truncated the file under this region (some of its pages were lost and
    /// now read as zeroes; see [`sigbus`]).
    pub fn lost(&self) -> bool {
        self._map.guard.as_ref().is_some_and(sigbus::Registration::lost)
    }

    /// The page-aligned host range (start, length) of the mapping behind this region.
    pub fn page_range(&self) -> (usize, usize) {
        let page = usize::try_from(page_size()).unwrap_or(4096);
        let len = self._map.len.div_ceil(page) * page;
        (self._map.base as usize, len)
    }

    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }
}

/// An immutable set of regions, sorted by guest address.
#[derive(Default, Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl GuestMemory {
    /// No memory: every translation fails.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds a snapshot. Refuses overlapping guest or frontend ranges and too many regions.
    pub fn new(mut regions: Vec<Region>) -> Result<Self, MemError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemError::TooManyRegions);
        }
        regions.sort_by_key(|r| r.gpa);
        for w in regions.windows(2) {
            if w[0].gpa + w[0].size > w[1].gpa {
                return Err(MemError::Overlap { gpa: w[1].gpa, other: w[0].gpa });
            }
        }
        let mut by_va: Vec<(u64, u64)> = regions.iter().map(|r| (r.user_addr, r.size)).collect();
        by_va.sort_unstable();
        for w in by_va.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(MemError::OverlapVa { va: w[1].0 });
            }
        }
        Ok(Self { regions })
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// A snapshot with `r` added.
    pub fn with_region(&self, r: Region) -> Result<Self, MemError> {
        let mut v = self.regions.clone();
        v.push(r);
        Self::new(v)
    }

    /// A snapshot without the region at `gpa` of `size` bytes.
    pub fn without_region(&self, gpa: u64, size: u64) -> Result<Self, MemError> {
        let mut v = self.regions.clone();
        let before = v.len();
        v.retain(|r| !(r.gpa == gpa && r.size == size));
        if v.len() == before {
            return Err(MemError::NoRegion { gpa });
        }
        Self::new(v)
    }

    fn find(&self, gpa: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        r.contains(gpa).then_some(r)
    }

    /// Host pointer for `len` bytes at `gpa`, if the whole range lies in one region.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let r = self.find(gpa)?;
        let off = gpa - r.gpa;
        if off.checked_add(len)? > r.size {
            return None;
        }
        // SAFETY: `off + len <= size`, so the pointer (and the range) stays inside the region.
        Some(unsafe { r.host.add(usize::try_from(off).ok()?) })
    }

    /// Guest address of frontend virtual address `va` (vhost-user ring addresses are VAs).
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions.iter().find(|r| va >= r.user_addr && va - r.user_addr < r.size).map(|r| r.gpa + (va - r.user_addr))
    }

    /// Host pointer for `len` bytes at frontend virtual address `va`, within one region.
    pub fn translate_va(&self, va: u64, len: u64) -> Option<*mut u8> {
        self.translate(self.va_to_gpa(va)?, len)
    }

    /// Appends iovecs for `len` bytes at `gpa` to `out`, splitting where the range crosses from
    /// one region into an adjacent one. Fails if any byte is outside guest memory.
    ///
    /// The iovecs point into this snapshot: the caller must keep the `Arc<GuestMemory>` alive
    /// until the I/O using them has completed.
    pub fn append_iovecs(&self, mut gpa: u64, mut len: u64, out: &mut IoVecs) -> Result<(), MemError> {
        while len > 0 {
            let r = self.find(gpa).ok_or(MemError::NoRegion { gpa })?;
            let off = gpa - r.gpa;
            let n = len.min(r.size - off);
            let n_us = usize::try_from(n).map_err(|_| MemError::NoRegion { gpa })?;
            // SAFETY: `off + n <= size`: the segment lies inside the region's mapping, which this
            // snapshot keeps alive; the caller keeps the snapshot alive for the I/O (see above).
            unsafe { out.push_raw(r.host.add(usize::try_from(off).unwrap_or(0)), n_us) };
            gpa = gpa.checked_add(n).ok_or(MemError::NoRegion { gpa })?;
            len -= n;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from guest memory at `gpa` (may span adjacent regions).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let mut iov = IoVecs::new();
        self.append_iovecs(gpa, buf.len() as u64, &mut iov)?;
        iov.copy_to(buf);
        Ok(())
    }

    /// Copies `buf` into guest memory at `gpa` (may span adjacent regions).
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let mut iov = IoVecs::new();
        self.append_iovecs(gpa, buf.len() as u64, &mut iov)?;
        iov.copy_from(buf);
        Ok(())
    }

    /// Total bytes mapped.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// Makes a memfd of `size` bytes, for tests and in-process clients that need guest-like memory.
pub fn memfd(name: &str, size: u64) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `cname` is NUL-terminated; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// The dirty-page log of a live migration (vhost-user LOG_SHMFD): a bitmap in a memfd shared
/// with the frontend, one bit per 4 KiB guest page. Pages the backend writes into guest memory
/// are marked, so the frontend copies them again.
pub struct DirtyLog {
    base: *mut u8,
    len: usize,
    _map: Arc<Mapping>,
}

// SAFETY: the bitmap is shared memory owned by this value; bits are set with atomic byte ORs.
unsafe impl Send for DirtyLog {}
// SAFETY: as above: concurrent marking from several reactors uses atomic operations only.
unsafe impl Sync for DirtyLog {}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirtyLog({} bytes)", self.len)
    }
}

/// Page size the vhost-user log counts in.
pub const LOG_PAGE: u64 = 4096;

impl DirtyLog {
    /// Maps `size` bytes of `file` from `offset` as the log.
    pub fn map(file: &File, size: u64, offset: u64) -> Result<Self, MemError> {
        let r = Region::map(file, 0, size, 0, offset)?;
        let len = usize::try_from(size).map_err(|_| MemError::BadSize { gpa: 0, size })?;
        Ok(Self { base: r.host, len, _map: r._map })
    }

    /// Marks every page of `[gpa, gpa + len)` dirty. Pages beyond the log are ignored.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let Ok(byte) = usize::try_from(page / 8) else { return };
            if byte >= self.len {
                return;
            }
            // SAFETY: `byte < len`, inside the mapping; `AtomicU8` has the layout of `u8` and the
            // mapping outlives `self`.
            let a = unsafe { &*(self.base.add(byte) as *const std::sync::atomic::AtomicU8) };
            a.fetch_or(1 << (page % 8), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether `gpa`'s page is marked (for tests).
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        let Ok(byte) = usize::try_from(page / 8) else { return false };
        if byte >= self.len {
            return false;
        }
        // SAFETY: as in `mark`.
        let a = unsafe { &*(self.base.add(byte) as *const std::sync::atomic::AtomicU8) };
        a.load(std::sync::atomic::Ordering::Relaxed) & (1 << (page % 8)) != 0
    }
}

impl GuestMemory {
    /// Guest address of host address `p`, if it lies in a region.
    pub fn host_to_gpa(&self, p: *const u8) -> Option<u64> {
        let a = p as usize;
        self.regions.iter().find_map(|r| {
            let start = r.host as usize;
            let size = usize::try_from(r.size).ok()?;
            (a >= start && a - start < size).then(|| r.gpa + (a - start) as u64)
        })
    }

    /// Marks in `log` every guest page `iovs` covers (buffers the device wrote).
    pub fn mark_dirty(&self, log: &DirtyLog, iovs: &IoVecs) {
        for s in iovs.as_slice() {
            if let Some(gpa) = self.host_to_gpa(s.iov_base.cast::<u8>()) {
                log.mark(gpa, s.iov_len as u64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(f: &File, gpa: u64, size: u64, off: u64) -> Region {
        Region::map(f, gpa, size, gpa + 0x7f00_0000_0000, off).unwrap()
    }

    #[test]
    fn translation_stays_inside_regions() {
        let f = memfd("t", 3 << 20).unwrap();
        let m = GuestMemory::new(vec![region(&f, 0, 1 << 20, 0), region(&f, 1 << 20, 1 << 20, 1 << 20)]).unwrap();
        assert!(m.translate(0, 1 << 20).is_some());
        assert!(m.translate(0, (1 << 20) + 1).is_none(), "a range crossing regions is not one pointer");
        assert!(m.translate((2 << 20) - 1, 1).is_some());
        assert!(m.translate(2 << 20, 1).is_none(), "past the last region");
        assert!(m.translate(u64::MAX, 2).is_none(), "wrapping range");
        assert!(m.translate(100, u64::MAX).is_none());
        let mut iov = IoVecs::new();
        m.append_iovecs((1 << 20) - 10, 20, &mut iov).unwrap();
        assert_eq!((iov.len(), iov.total_len()), (2, 20), "adjacent regions split into two iovecs");
        let mut iov = IoVecs::new();
        assert!(m.append_iovecs((2 << 20) - 10, 20, &mut iov).is_err());
    }

    #[test]
    fn data_written_through_one_region_reads_back_across_the_boundary() {
        let f = memfd("t", 2 << 20).unwrap();
        let m = GuestMemory::new(vec![region(&f, 0x1000_0000, 1 << 20, 0), region(&f, 0x1010_0000, 1 << 20, 1 << 20)])
            .unwrap();
        let data: Vec<u8> = (0..64u8).collect();
        m.write(0x1010_0000 - 32, &data).unwrap();
        let mut back = vec![0u8; 64];
        m.read(0x1010_0000 - 32, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(m.va_to_gpa(0x7f00_0000_0000 + 0x1010_0004), Some(0x1010_0004));
        assert!(m.translate_va(0x1234, 1).is_none());
    }

    #[test]
    fn bad_tables_are_refused() {
        let f = memfd("t", 2 << 20).unwrap();
        let e = GuestMemory::new(vec![region(&f, 0, 1 << 20, 0), region(&f, 4096, 4096, 0)]).unwrap_err();
        assert!(matches!(e, MemError::Overlap { .. }));
        assert!(matches!(Region::map(&f, 0, 0, 0, 0), Err(MemError::BadSize { .. })));
        assert!(matches!(Region::map(&f, u64::MAX - 10, 4096, 0, 0), Err(MemError::BadSize { .. })));
        let e = Region::map(&f, 0, 4 << 20, 0, 0).unwrap_err();
        assert!(matches!(e, MemError::FileTooSmall { .. }), "a file smaller than the region would SIGBUS");
        assert!(matches!(Region::map(&f, 0, 4096, 0, u64::MAX - 5), Err(MemError::BadSize { .. })));
        let a = Region::map(&f, 0, 4096, 0x5000, 0).unwrap();
        let b = Region::map(&f, 0x10000, 4096, 0x5800, 0).unwrap();
        assert!(matches!(GuestMemory::new(vec![a, b]).unwrap_err(), MemError::OverlapVa { .. }));
    }

    #[test]
    fn unaligned_file_offsets_map_the_right_bytes() {
        let f = memfd("t", 3 * 4096).unwrap();
        let whole = GuestMemory::new(vec![region(&f, 0, 3 * 4096, 0)]).unwrap();
        whole.write(4096 + 100, b"hello").unwrap();
        let part = GuestMemory::new(vec![Region::map(&f, 0x9000, 1000, 0x9000, 4096 + 100).unwrap()]).unwrap();
        let mut b = [0u8; 5];
        part.read(0x9000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
    }
}
