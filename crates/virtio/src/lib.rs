//! Virtqueues over shared guest memory, written for a polled backend.
//!
//! Ring addresses are validated and translated once, when a queue is created or its memory
//! snapshot changes, and kept as raw pointers into that snapshot (the queue holds the
//! `Arc<GuestMemory>`). Every guest-written value read afterwards (indices, descriptor fields) is
//! checked before use:
//! - the available index may not run ahead of the last one seen by more than the queue size;
//! - a descriptor index must be below the queue (or indirect table) size;
//! - a chain may not be longer than the queue (or the indirect table): this also catches loops;
//! - indirect tables may not nest, must hold whole descriptors and lie in one region;
//! - every buffer must lie inside guest memory (it may span adjacent regions);
//! - device-readable buffers may not follow device-writable ones;
//! - a head already in flight may not be made available again.
//!
//! A bad chain whose head is known is reported as [`PopError::Chain`] (the device returns the head
//! with an error status or length 0); a queue that cannot go on (head out of range, index jump,
//! duplicate head) is reported as [`PopError::Fatal`] and should be marked broken.

mod chain;
pub mod driver;
pub mod inflight;
mod packed;
mod ring;
mod split;

pub use chain::DescChain;
pub use packed::PackedQueue;
pub use split::SplitQueue;

use std::sync::Arc;

use vstor_mem::GuestMemory;

/// Largest queue the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest indirect table accepted, in descriptors.
pub const MAX_INDIRECT: u32 = 4096;

/// Feature bits this crate implements (virtio spec numbering).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_PACKED: u64 = 1 << 34;
}

/// Guest-physical addresses of a queue's three areas (split: descriptor table, available ring,
/// used ring; packed: descriptor ring, driver event suppression, device event suppression).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingAddrs {
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// Everything needed to (re)start a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueParams {
    pub size: u16,
    pub addrs: RingAddrs,
    pub packed: bool,
    pub event_idx: bool,
    pub indirect: bool,
    /// Where to resume: split = next available index; packed = next available index with the
    /// wrap counter in bit 15 (vhost-user SET_VRING_BASE encoding).
    pub base: u32,
}

/// Why a queue could not be set up.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("queue size {0} is invalid (split rings need a power of two, at most {MAX_QUEUE_SIZE})")]
    BadSize(u16),
    #[error("{area} at guest address {gpa:#x} is misaligned (needs {align}-byte alignment)")]
    Misaligned { area: &'static str, gpa: u64, align: u64 },
    #[error("{area} at guest address {gpa:#x} ({len} bytes) is not inside one guest memory region")]
    NotMapped { area: &'static str, gpa: u64, len: u64 },
}

/// What is wrong with one chain.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor index {0} out of range")]
    NextOutOfRange(u32),
    #[error("chain longer than the queue or table (loop?)")]
    TooLong,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor without the negotiated feature")]
    IndirectNotNegotiated,
    #[error("indirect table of {0} bytes is not a whole number of descriptors or too large")]
    BadIndirectLen(u32),
    #[error("indirect descriptor with the NEXT flag")]
    IndirectWithNext,
    #[error("indirect table at {0:#x} not inside one guest memory region")]
    IndirectNotMapped(u64),
    #[error("buffer at {gpa:#x} (+{len}) is outside guest memory")]
    BadBuffer { gpa: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
}

/// The queue cannot continue: the device should be marked as needing reset.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum FatalError {
    #[error("available index jumped from {last} to {idx}, more than the queue size")]
    AvailJump { last: u16, idx: u16 },
    #[error("head descriptor index {0} out of range")]
    HeadOutOfRange(u16),
    #[error("head {0} made available again while in flight")]
    DuplicateHead(u16),
    #[error("packed chain continues into slot {0}, which is not available")]
    ChainCut(u16),
    #[error("packed chain longer than the queue")]
    ChainTooLong,
}

/// A failure to take the next request.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum PopError {
    /// The chain at `head` is malformed; return it (`ndesc` ring slots) with an error.
    #[error("bad chain at head {head}: {kind}")]
    Chain { head: u16, ndesc: u16, kind: ChainError },
    #[error("queue broken: {0}")]
    Fatal(FatalError),
}

/// A split or packed virtqueue.
pub enum Virtqueue {
    Split(SplitQueue),
    Packed(PackedQueue),
}

impl std::fmt::Debug for Virtqueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Virtqueue::Split(_) => write!(f, "Virtqueue::Split(size {})", self.size()),
            Virtqueue::Packed(_) => write!(f, "Virtqueue::Packed(size {})", self.size()),
        }
    }
}

impl Virtqueue {
    /// Validates the rings against `mem` and starts at `p.base`.
    pub fn new(p: &QueueParams, mem: Arc<GuestMemory>) -> Result<Self, QueueError> {
        Ok(if p.packed {
            Virtqueue::Packed(PackedQueue::new(p, mem)?)
        } else {
            Virtqueue::Split(SplitQueue::new(p, mem)?)
        })
    }

    /// Switches to a new memory snapshot (re-validating ring addresses).
    pub fn set_memory(&mut self, mem: Arc<GuestMemory>) -> Result<(), QueueError> {
        match self {
            Virtqueue::Split(q) => q.set_memory(mem),
            Virtqueue::Packed(q) => q.set_memory(mem),
        }
    }

    /// The memory snapshot chains point into; in-flight requests keep a clone.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        match self {
            Virtqueue::Split(q) => q.memory(),
            Virtqueue::Packed(q) => q.memory(),
        }
    }

    /// Takes the next available chain.
    #[inline]
    pub fn pop(&mut self) -> Option<Result<DescChain, PopError>> {
        match self {
            Virtqueue::Split(q) => q.pop(),
            Virtqueue::Packed(q) => q.pop(),
        }
    }

    /// Returns chain `head` (which used `ndesc` ring slots) with `len` bytes written. Visible to
    /// the driver at once.
    #[inline]
    pub fn push_used(&mut self, head: u16, ndesc: u16, len: u32) {
        match self {
            Virtqueue::Split(q) => q.push_used(head, len),
            Virtqueue::Packed(q) => q.push_used(head, ndesc, len),
        }
    }

    /// Whether the driver wants an interrupt for what was used since the last call that returned
    /// true (EVENT_IDX or the no-interrupt flag).
    pub fn needs_call(&mut self) -> bool {
        match self {
            Virtqueue::Split(q) => q.needs_call(),
            Virtqueue::Packed(q) => q.needs_call(),
        }
    }

    /// Asks the driver to notify (kick) on new buffers; returns true if buffers are already
    /// waiting (checked after the request is visible, so none is missed).
    pub fn enable_kicks(&mut self) -> bool {
        match self {
            Virtqueue::Split(q) => q.enable_kicks(),
            Virtqueue::Packed(q) => q.enable_kicks(),
        }
    }

    /// Asks the driver not to notify (the device is polling).
    pub fn disable_kicks(&mut self) {
        match self {
            Virtqueue::Split(q) => q.disable_kicks(),
            Virtqueue::Packed(q) => q.disable_kicks(),
        }
    }

    /// The vhost-user GET_VRING_BASE value: where a restarted queue must resume.
    pub fn base(&self) -> u32 {
        match self {
            Virtqueue::Split(q) => q.base(),
            Virtqueue::Packed(q) => q.base(),
        }
    }

    pub fn size(&self) -> u16 {
        match self {
            Virtqueue::Split(q) => q.size(),
            Virtqueue::Packed(q) => q.size(),
        }
    }

    /// Whether buffers are waiting (without taking them).
    pub fn has_available(&self) -> bool {
        match self {
            Virtqueue::Split(q) => q.has_available(),
            Virtqueue::Packed(q) => q.has_available(),
        }
    }

    /// Attaches the queue's part of the shared in-flight region and recovers from it; returns
    /// the heads (split) or buffer ids (packed) a previous device instance left in flight, in
    /// the order it took them. A packed queue also takes its ring position from the region.
    pub fn attach_inflight(&mut self, region: inflight::QueueRegion, features: u64) -> Result<Vec<u16>, &'static str> {
        if region.queue_size() != self.size() {
            return Err("the in-flight region was made for a different queue size");
        }
        match self {
            Virtqueue::Split(q) => q.attach_inflight(region, features),
            Virtqueue::Packed(q) => q.attach_inflight(region, features),
        }
    }

    /// Takes a recovered head again (see [`attach_inflight`](Self::attach_inflight)).
    pub fn resubmit(&mut self, head: u16) -> Result<DescChain, PopError> {
        match self {
            Virtqueue::Split(q) => q.resubmit(head),
            Virtqueue::Packed(q) => q.resubmit(head),
        }
    }

    /// Starts or stops migration dirty logging of the rings' device-written area. `log_gpa` is the
    /// address the frontend asked writes to be logged at (split: the used ring; packed: ignored,
    /// the descriptor ring is used).
    pub fn set_dirty_log(&mut self, log: Option<(Arc<vstor_mem::DirtyLog>, u64)>) {
        match self {
            Virtqueue::Split(q) => q.set_dirty_log(log),
            Virtqueue::Packed(q) => {
                let ring = q.desc_area().0;
                q.set_dirty_log(log.map(|(l, _)| (l, ring)))
            }
        }
    }

    /// Guest-physical ranges of the areas the device writes (used ring / descriptor ring), for
    /// dirty logging.
    pub fn device_written_area(&self) -> (u64, u64) {
        match self {
            Virtqueue::Split(q) => q.used_area(),
            Virtqueue::Packed(q) => q.desc_area(),
        }
    }
}

#[cfg(test)]
mod tests;
