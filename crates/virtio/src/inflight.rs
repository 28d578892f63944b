//! In-flight tracking in a region shared with the vhost-user frontend
//! (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, split-ring layout).
//!
//! Per queue the region holds a header and one 16-byte state per descriptor head:
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc[i]:  u8 inflight | u8 pad[5] | u16 next | u64 counter
//! ```
//!
//! A head is marked when the device takes it and cleared after its used element is published;
//! `last_batch_head` and `used_idx` let a restarted device tell a completion that was published
//! but not yet cleared (crash between the two) from one still in flight. The frontend keeps the
//! region across backend restarts, so a new vstor process finds every request the old one took
//! and had not completed, and processes them again in the order they were taken.

use std::sync::atomic::{fence, Ordering};

use crate::ring::{read, write};

const HDR: usize = 16;
const DESC: usize = 16;
const VERSION: u16 = 1;

/// Bytes one queue's region takes for a queue of `size` entries (rounded up to 64 bytes).
pub fn queue_region_size(size: u16) -> u64 {
    ((HDR + DESC * usize::from(size)) as u64).div_ceil(64) * 64
}

/// One queue's in-flight region.
pub struct InflightSplit {
    base: *mut u8,
    size: u16,
}

// SAFETY: the pointer is into a shared mapping whose owner keeps it alive while the queue exists
// (see `new`); the queue is used by one reactor at a time.
unsafe impl Send for InflightSplit {}

impl InflightSplit {
    /// # Safety
    /// `base..base + queue_region_size(size)` must be mapped read-write, 8-aligned, and stay
    /// mapped for the life of the returned value.
    pub unsafe fn new(base: *mut u8, size: u16) -> Self {
        Self { base, size }
    }

    fn desc(&self, head: u16) -> *mut u8 {
        // SAFETY: callers pass `head < size`, so the state lies inside the region (see `new`).
        unsafe { self.base.add(HDR + DESC * usize::from(head)) }
    }

    /// Marks `head` taken, with its order number.
    pub fn get(&self, head: u16, counter: u64) {
        if head >= self.size {
            return;
        }
        let d = self.desc(head);
        // SAFETY: `d` is the 16-byte state of `head` (checked above); offsets 8 (u64) and 0 (u8)
        // are aligned because the region is 8-aligned and states are 16 bytes.
        unsafe {
            write::<u64>(d.add(8), counter.to_le());
            write::<u8>(d, 1);
        }
    }

    /// Before publishing `head` as used.
    pub fn pre_put(&self, head: u16) {
        // SAFETY: `last_batch_head` at offset 12 of the header.
        unsafe { write::<u16>(self.base.add(12), head.to_le()) };
    }

    /// After publishing: `head` is no longer in flight; `used_idx` is the ring's used index now.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.size {
            // SAFETY: as in `get`.
            unsafe { write::<u8>(self.desc(head), 0) };
        }
        fence(Ordering::Release);
        // SAFETY: `used_idx` at offset 14 of the header.
        unsafe { write::<u16>(self.base.add(14), used_idx.to_le()) };
    }

    /// Reads the region at queue start. A fresh region (version 0) is initialised and nothing is
    /// returned. Otherwise a completion published but not cleared is cleared, and the heads
    /// still in flight are returned in the order they were taken. `used_idx` is the used index
    /// found in the ring.
    pub fn recover(&self, used_idx: u16, features: u64) -> Result<Vec<u16>, &'static str> {
        // SAFETY: header fields at offsets 0, 8, 10, 12, 14 (aligned, inside the region).
        let (version, desc_num, last_batch, inf_used) = unsafe {
            (
                u16::from_le(read::<u16>(self.base.add(8))),
                u16::from_le(read::<u16>(self.base.add(10))),
                u16::from_le(read::<u16>(self.base.add(12))),
                u16::from_le(read::<u16>(self.base.add(14))),
            )
        };
        if version == 0 {
            // SAFETY: as above.
            unsafe {
                write::<u64>(self.base, features.to_le());
                write::<u16>(self.base.add(10), self.size.to_le());
                write::<u16>(self.base.add(14), used_idx.to_le());
                fence(Ordering::Release);
                write::<u16>(self.base.add(8), VERSION.to_le());
            }
            return Ok(Vec::new());
        }
        if desc_num != self.size {
            return Err("the in-flight region was made for a different queue size");
        }
        if inf_used != used_idx {
            // Crashed after publishing the used element of `last_batch` but before clearing it.
            if last_batch < self.size {
                // SAFETY: as in `get`.
                unsafe { write::<u8>(self.desc(last_batch), 0) };
            }
            fence(Ordering::Release);
            // SAFETY: as above.
            unsafe { write::<u16>(self.base.add(14), used_idx.to_le()) };
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter_map(|h| {
                let d = self.desc(h);
                // SAFETY: as in `get`.
                let (flag, counter) = unsafe { (read::<u8>(d), u64::from_le(read::<u64>(d.add(8)))) };
                (flag == 1).then_some((counter, h))
            })
            .collect();
        heads.sort_unstable();
        Ok(heads.into_iter().map(|(_, h)| h).collect())
    }
}
