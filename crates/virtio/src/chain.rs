//! A descriptor chain, translated to host buffers and split into its device-readable and
//! device-writable parts.

use vstor_bdev::IoVecs;
use vstor_mem::GuestMemory;

use crate::ChainError;

/// One request taken from a queue. The buffers point into the queue's memory snapshot: keep a
/// clone of [`Virtqueue::memory`](crate::Virtqueue::memory) until the request is returned.
#[derive(Debug)]
pub struct DescChain {
    /// Head descriptor index (split) or buffer id (packed): what `push_used` returns.
    pub head: u16,
    /// Ring slots the chain used (packed rings advance by this much when it is returned).
    pub ndesc: u16,
    /// Device-readable bytes (driver to device), in order.
    pub readable: IoVecs,
    /// Device-writable bytes (device to driver), in order.
    pub writable: IoVecs,
}

/// Accumulates a chain's buffers, enforcing readable-before-writable.
pub(crate) struct ChainBuilder {
    pub readable: IoVecs,
    pub writable: IoVecs,
    seen_write: bool,
}

impl ChainBuilder {
    pub fn new() -> Self {
        Self { readable: IoVecs::new(), writable: IoVecs::new(), seen_write: false }
    }

    /// Adds a buffer of `len` bytes at `gpa`.
    pub fn add(&mut self, mem: &GuestMemory, gpa: u64, len: u32, write: bool) -> Result<(), ChainError> {
        if !write && self.seen_write {
            return Err(ChainError::ReadableAfterWritable);
        }
        self.seen_write |= write;
        if len == 0 {
            return Ok(());
        }
        let target = if write { &mut self.writable } else { &mut self.readable };
        mem.append_iovecs(gpa, u64::from(len), target).map_err(|_| ChainError::BadBuffer { gpa, len })
    }

    pub fn finish(self, head: u16, ndesc: u16) -> DescChain {
        DescChain { head, ndesc, readable: self.readable, writable: self.writable }
    }
}
