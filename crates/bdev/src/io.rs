//! I/O requests, their buffers and their results.

use smallvec::SmallVec;
use std::rc::Rc;

/// The kinds of I/O a bdev may support (SPDK's `spdk_bdev_io_type`, the subset vstor uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
}

impl IoType {
    /// Every I/O type, in the order `bdev_get_bdevs` lists them.
    pub const ALL: [IoType; 6] =
        [IoType::Read, IoType::Write, IoType::Unmap, IoType::WriteZeroes, IoType::Flush, IoType::Reset];

    /// SPDK's name for the type in `supported_io_types`.
    pub fn spdk_name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::Flush => "flush",
            IoType::Unmap => "unmap",
            IoType::WriteZeroes => "write_zeroes",
            IoType::Reset => "reset",
        }
    }

    /// True for types that change data.
    pub fn modifies(self) -> bool {
        matches!(self, IoType::Write | IoType::Unmap | IoType::WriteZeroes)
    }
}

/// Why an I/O failed. Small and matchable: each transport maps it to its own status
/// (virtio-blk status byte, SCSI sense, NVMe status code) with an exhaustive `match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The block range runs past the end of the device.
    #[error("block range past the end of the device")]
    OutOfRange,
    /// The buffers do not add up to the transfer length, or a length is not whole blocks.
    #[error("buffer length does not match the transfer length")]
    InvalidLength,
    /// The bdev does not support this I/O type.
    #[error("I/O type not supported by this bdev")]
    Unsupported,
    /// A write-type I/O to a read-only bdev.
    #[error("bdev is read-only")]
    ReadOnly,
    /// The backend failed with this errno.
    #[error("backend I/O error (errno {0})")]
    Os(i32),
    /// The I/O was aborted (reset, removal, shutdown).
    #[error("I/O aborted")]
    Aborted,
    /// The backend could not allocate what the I/O needs.
    #[error("out of memory for I/O")]
    NoMemory,
}

/// The result of one I/O.
pub type IoResult = Result<(), IoError>;

/// A contiguous range of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub offset_blocks: u64,
    pub num_blocks: u64,
}

/// Scatter-gather list of host buffers for one I/O. Entries point into guest memory (zero copy)
/// or into buffers the submitter owns.
#[derive(Default)]
pub struct IoVecs {
    v: SmallVec<[libc::iovec; 4]>,
    total: u64,
}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoVecs({} segments, {} bytes)", self.v.len(), self.total)
    }
}

impl IoVecs {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a segment.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes until the I/O this list is part of has
    /// completed (its callback has run), and no Rust reference may be formed to that memory in that
    /// time. Guest memory satisfies this while the I/O holds a reference to the memory-table
    /// snapshot that maps it.
    pub unsafe fn push_raw(&mut self, ptr: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.v.push(libc::iovec { iov_base: ptr.cast(), iov_len: len });
        self.total += len as u64;
    }

    /// The bytes `offset..offset+len` of this list as a new list (zero copy). `None` if the range
    /// runs past the end. The new list points into the same memory, under the same contract.
    pub fn sub(&self, offset: u64, len: u64) -> Option<IoVecs> {
        if offset.checked_add(len)? > self.total {
            return None;
        }
        if len == 0 {
            return Some(IoVecs::new());
        }
        // Find the segments holding the first and the last byte, copy that run of segments in
        // one go, then trim its two ends.
        let (mut first, mut skip) = (0, offset);
        while skip >= self.v.get(first)?.iov_len as u64 {
            skip -= self.v[first].iov_len as u64;
            first += 1;
        }
        let (mut last, mut upto) = (first, skip + len);
        while upto > self.v.get(last)?.iov_len as u64 {
            upto -= self.v[last].iov_len as u64;
            last += 1;
        }
        let mut v: SmallVec<[libc::iovec; 4]> = SmallVec::from_slice(self.v.get(first..=last)?);
        // Both fit in a segment length (a usize): skip < iov_len[first], upto <= iov_len[last].
        let (skip, upto) = (usize::try_from(skip).ok()?, usize::try_from(upto).ok()?);
        let n = v.len();
        v[n - 1].iov_len = upto;
        // SAFETY: `skip < iov_len` of the first segment (and `skip < upto` when it is also the
        // last): the new base stays inside it, so every piece lies inside a segment that is valid
        // under `push_raw`'s contract, which the new list inherits.
        v[0].iov_base = unsafe { v[0].iov_base.cast::<u8>().add(skip) }.cast();
        v[0].iov_len -= skip;
        Some(IoVecs { v, total: len })
    }

    /// Total bytes.
    pub fn total_len(&self) -> u64 {
        self.total
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.v.len()
    }

    /// True when there are no segments.
    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    /// The segments, for passing to the kernel.
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.v
    }

    /// Whether every segment's address and length are multiples of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        align <= 1
            || self.v.iter().all(|s| (s.iov_base as usize).is_multiple_of(align) && s.iov_len.is_multiple_of(align))
    }

    /// Drops the first `n` bytes (after a short transfer).
    pub(crate) fn advance(&mut self, mut n: u64) {
        let mut drop = 0;
        for s in self.v.iter_mut() {
            if n == 0 {
                break;
            }
            let l = s.iov_len as u64;
            if n >= l {
                n -= l;
                self.total -= l;
                drop += 1;
            } else {
                let k = usize::try_from(n).unwrap_or(usize::MAX);
                // SAFETY: `k < iov_len`, so the new base stays inside the same segment.
                s.iov_base = unsafe { s.iov_base.cast::<u8>().add(k) }.cast();
                s.iov_len -= k;
                self.total -= n;
                n = 0;
            }
        }
        self.v.drain(..drop);
    }

    /// Copies `src` into the segments, in order; returns bytes copied.
    pub fn copy_from(&self, src: &[u8]) -> usize {
        let mut off = 0;
        for s in &self.v {
            if off >= src.len() {
                break;
            }
            let n = s.iov_len.min(src.len() - off);
            // SAFETY: the segment is valid for writes of `iov_len` bytes (contract of `push_raw`),
            // `n <= iov_len`, and `src[off..off+n]` is in bounds. The regions cannot overlap
            // because `src` is a Rust slice and segments may not alias Rust references.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(off), s.iov_base.cast::<u8>(), n) };
            off += n;
        }
        off
    }

    /// Copies the segments, in order, into `dst`; returns bytes copied.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let mut off = 0;
        for s in &self.v {
            if off >= dst.len() {
                break;
            }
            let n = s.iov_len.min(dst.len() - off);
            // SAFETY: as in `copy_from`, with the directions swapped.
            unsafe { std::ptr::copy_nonoverlapping(s.iov_base.cast::<u8>(), dst.as_mut_ptr().add(off), n) };
            off += n;
        }
        off
    }

    /// Calls `f(ptr, at, n)` for each piece of the bytes `offset..offset + len` (cut to the
    /// list's end): `n` bytes at `ptr`, which are bytes `at..at + n` of the range. Returns the
    /// bytes visited. Walks the segments in place (no sub-list is built).
    fn for_range(&self, offset: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> usize {
        let (mut skip, mut at) = (offset, 0usize);
        for s in &self.v {
            if at >= len {
                break;
            }
            let l = s.iov_len as u64;
            if skip >= l {
                skip -= l;
                continue;
            }
            // `skip < l = iov_len`, a usize.
            let k = usize::try_from(skip).unwrap_or(0);
            let n = (s.iov_len - k).min(len - at);
            // SAFETY: `k < iov_len`: the pointer stays inside the segment.
            f(unsafe { s.iov_base.cast::<u8>().add(k) }, at, n);
            at += n;
            skip = 0;
        }
        at
    }

    /// Copies `src` into the list starting `offset` bytes in; returns bytes copied.
    pub fn copy_from_at(&self, offset: u64, src: &[u8]) -> usize {
        self.for_range(offset, src.len(), |p, at, n| {
            // SAFETY: `p..p+n` lies inside one segment, valid for writes (contract of `push_raw`);
            // `src[at..at+n]` is in bounds (`for_range` stops at `src.len()`); guest memory and a
            // Rust slice cannot overlap (see `copy_from`).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(at), p, n) }
        })
    }

    /// Copies `dst.len()` bytes (or what there is) starting `offset` bytes in; returns bytes copied.
    pub fn copy_to_at(&self, offset: u64, dst: &mut [u8]) -> usize {
        let len = dst.len();
        let d = dst.as_mut_ptr();
        self.for_range(offset, len, |p, at, n| {
            // SAFETY: as in `copy_from_at`, with the directions swapped.
            unsafe { std::ptr::copy_nonoverlapping(p, d.add(at), n) }
        })
    }

    /// Writes `b` as the list's last byte (a virtio status byte); false if the list is empty.
    pub fn set_last_byte(&self, b: u8) -> bool {
        // Segments are never empty (`push_raw` drops zero-length ones).
        match self.v.last() {
            Some(s) if s.iov_len > 0 => {
                // SAFETY: `iov_len - 1 < iov_len`: the byte lies inside the segment, valid for
                // writes under `push_raw`'s contract.
                unsafe { s.iov_base.cast::<u8>().add(s.iov_len - 1).write_volatile(b) };
                true
            }
            _ => false,
        }
    }

    /// Fills every segment with zeroes.
    pub fn zero(&self) {
        for s in &self.v {
            // SAFETY: the segment is valid for writes of `iov_len` bytes (contract of `push_raw`).
            unsafe { std::ptr::write_bytes(s.iov_base.cast::<u8>(), 0, s.iov_len) };
        }
    }
}

/// One I/O operation, already validated by the channel before a backend sees it.
#[derive(Debug)]
pub enum IoOp {
    Read {
        offset_blocks: u64,
        num_blocks: u64,
        iovs: IoVecs,
    },
    /// `fua`: the data must be durable when the write completes.
    Write {
        offset_blocks: u64,
        num_blocks: u64,
        iovs: IoVecs,
        fua: bool,
    },
    /// Make every completed write durable.
    Flush,
    Unmap {
        ranges: SmallVec<[BlockRange; 1]>,
    },
    WriteZeroes {
        offset_blocks: u64,
        num_blocks: u64,
    },
    /// Completes once every I/O submitted before it on the same channel has completed.
    Reset,
}

impl IoOp {
    /// The I/O type.
    pub fn io_type(&self) -> IoType {
        match self {
            IoOp::Read { .. } => IoType::Read,
            IoOp::Write { .. } => IoType::Write,
            IoOp::Flush => IoType::Flush,
            IoOp::Unmap { .. } => IoType::Unmap,
            IoOp::WriteZeroes { .. } => IoType::WriteZeroes,
            IoOp::Reset => IoType::Reset,
        }
    }
}

/// Receives completions. Implemented by whatever submits I/O (a virtqueue, a SCSI LUN, an NVMe
/// queue, the perf tool). Called on the submitting reactor, never from inside `submit`.
pub trait IoSink {
    /// I/O `tag` finished with `result`.
    fn io_done(&self, tag: u64, result: IoResult);
}

/// Where a completion goes: a sink and the submitter's tag for the request.
#[derive(Clone)]
pub struct IoCallback {
    pub sink: Rc<dyn IoSink>,
    pub tag: u64,
}

impl std::fmt::Debug for IoCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoCallback(tag {})", self.tag)
    }
}
