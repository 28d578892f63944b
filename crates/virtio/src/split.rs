//! Split virtqueues (virtio 1.x section 2.7).

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vstor_mem::GuestMemory;

use crate::chain::{ChainBuilder, DescChain};
use crate::inflight::{InflightSplit, QueueRegion};
use crate::ring::{area, read, write};
use crate::{ChainError, FatalError, PopError, QueueError, QueueParams, MAX_INDIRECT, MAX_QUEUE_SIZE};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// A descriptor as read from guest memory (little-endian fields, any alignment).
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Reads descriptor `i` of a table at `base`.
///
/// # Safety
/// `base + 16 * (i + 1)` must lie inside a live guest mapping.
unsafe fn read_desc(base: *const u8, i: u32) -> Desc {
    // SAFETY: the caller guarantees the 16 bytes are mapped.
    let p = unsafe { base.add(16 * i as usize) };
    if (p as usize).is_multiple_of(8) {
        // SAFETY: mapped (above) and 8-aligned: two volatile 64-bit loads.
        let (lo, hi): (u64, u64) = unsafe { (read(p), read(p.add(8))) };
        let (lo, hi) = (u64::from_le(lo), u64::from_le(hi));
        // Splitting a 64-bit word into its little-endian fields: the truncations are the point.
        #[allow(clippy::cast_possible_truncation)]
        return Desc { addr: lo, len: hi as u32, flags: (hi >> 32) as u16, next: (hi >> 48) as u16 };
    }
    // SAFETY: mapped (above); `[u8; 16]` has alignment 1, so the volatile read is valid at any
    // address (indirect tables need not be aligned).
    let b: [u8; 16] = unsafe { read(p) };
    Desc {
        addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    }
}

/// A split virtqueue, device side.
pub struct SplitQueue {
    p: QueueParams,
    mem: Arc<GuestMemory>,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    next_avail: u16,
    next_used: u16,
    signalled_used: u16,
    signalled_valid: bool,
    inflight: Vec<bool>,
    /// The shared in-flight record (vhost-user INFLIGHT_SHMFD), if the frontend gave one.
    log: Option<InflightSplit>,
    counter: u64,
    /// Migration dirty log and the guest address to log used-ring writes at.
    dirty: Option<(Arc<vstor_mem::DirtyLog>, u64)>,
}

impl SplitQueue {
    pub fn new(p: &QueueParams, mem: Arc<GuestMemory>) -> Result<Self, QueueError> {
        if p.size == 0 || p.size > MAX_QUEUE_SIZE || !p.size.is_power_of_two() {
            return Err(QueueError::BadSize(p.size));
        }
        let mut q = SplitQueue {
            p: *p,
            mem: mem.clone(),
            desc: std::ptr::null_mut(),
            avail: std::ptr::null_mut(),
            used: std::ptr::null_mut(),
            next_avail: (p.base & 0xffff) as u16,
            next_used: 0,
            signalled_used: 0,
            signalled_valid: false,
            inflight: vec![false; usize::from(p.size)],
            log: None,
            counter: 0,
            dirty: None,
        };
        q.set_memory(mem)?;
        // The used index in guest memory is where this device left off (0 on a fresh queue).
        // SAFETY: `used + 2..used + 4` lies in the used area validated by `set_memory`.
        q.next_used = u16::from_le(unsafe { read::<u16>(q.used.add(2)) });
        Ok(q)
    }

    pub fn set_memory(&mut self, mem: Arc<GuestMemory>) -> Result<(), QueueError> {
        let n = u64::from(self.p.size);
        let a = self.p.addrs;
        self.desc = area(&mem, "descriptor table", a.desc, 16 * n, 16)?;
        self.avail = area(&mem, "available ring", a.driver, 6 + 2 * n, 2)?;
        self.used = area(&mem, "used ring", a.device, 6 + 8 * n, 4)?;
        self.mem = mem;
        Ok(())
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    pub fn size(&self) -> u16 {
        self.p.size
    }

    fn avail_idx(&self) -> u16 {
        // SAFETY: `avail + 2..+4` is inside the validated available ring.
        u16::from_le(unsafe { read::<u16>(self.avail.add(2)) })
    }

    pub fn has_available(&self) -> bool {
        self.avail_idx() != self.next_avail
    }

    pub fn pop(&mut self) -> Option<Result<DescChain, PopError>> {
        let idx = self.avail_idx();
        let pending = idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return None;
        }
        // virtio 2.7.6: the driver never makes more than the queue size available.
        if pending > self.p.size {
            return Some(Err(PopError::Fatal(FatalError::AvailJump { last: self.next_avail, idx })));
        }
        // Read ring entries only after seeing the index that published them.
        fence(Ordering::Acquire);
        let slot = usize::from(self.next_avail % self.p.size);
        // SAFETY: `slot < size`, so `avail + 4 + 2 * slot` is inside the available ring.
        let head = u16::from_le(unsafe { read::<u16>(self.avail.add(4 + 2 * slot)) });
        self.next_avail = self.next_avail.wrapping_add(1);
        if head >= self.p.size {
            return Some(Err(PopError::Fatal(FatalError::HeadOutOfRange(head))));
        }
        if self.inflight[usize::from(head)] {
            return Some(Err(PopError::Fatal(FatalError::DuplicateHead(head))));
        }
        self.log_get(head);
        match self.walk(head) {
            Ok(c) => {
                self.inflight[usize::from(head)] = true;
                Some(Ok(c))
            }
            Err(kind) => Some(Err(PopError::Chain { head, ndesc: 1, kind })),
        }
    }

    fn log_get(&mut self, head: u16) {
        if let Some(l) = &self.log {
            self.counter = self.counter.wrapping_add(1);
            l.get(head, self.counter);
        }
    }

    /// Attaches the shared in-flight record and recovers from it: returns the heads a previous
    /// device instance took and did not complete, in the order it took them; the queue resumes
    /// after them. Resubmit each with [`resubmit`](Self::resubmit).
    pub fn attach_inflight(&mut self, region: QueueRegion, features: u64) -> Result<Vec<u16>, &'static str> {
        let log = InflightSplit::new(region);
        let (heads, counter) = log.recover(self.next_used, features)?;
        // Order numbers continue after the recovered ones, so a second crash resubmits in order.
        self.counter = counter;
        let n = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        // Everything taken = everything used + everything still in flight.
        self.next_avail = self.next_used.wrapping_add(n);
        self.log = Some(log);
        Ok(heads)
    }

    /// Takes chain `head` again after a restart (it is still the driver's and still in flight).
    pub fn resubmit(&mut self, head: u16) -> Result<DescChain, PopError> {
        if head >= self.p.size || self.inflight[usize::from(head)] {
            return Err(PopError::Fatal(FatalError::HeadOutOfRange(head)));
        }
        self.log_get(head);
        match self.walk(head) {
            Ok(c) => {
                self.inflight[usize::from(head)] = true;
                Ok(c)
            }
            Err(kind) => Err(PopError::Chain { head, ndesc: 1, kind }),
        }
    }

    fn walk(&self, head: u16) -> Result<DescChain, ChainError> {
        let size = u32::from(self.p.size);
        let mut b = ChainBuilder::new();
        let mut idx = u32::from(head);
        let mut count = 0u32;
        loop {
            if idx >= size {
                return Err(ChainError::NextOutOfRange(idx));
            }
            count += 1;
            if count > size {
                return Err(ChainError::TooLong);
            }
            // SAFETY: `idx < size` and the table holds `size` descriptors.
            let d = unsafe { read_desc(self.desc, idx) };
            if d.flags & F_INDIRECT != 0 {
                if !self.p.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                // virtio 2.7.5.3.1: the driver MUST NOT set both INDIRECT and NEXT.
                if d.flags & F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                self.walk_indirect(&mut b, d.addr, d.len)?;
                break;
            }
            b.add(&self.mem, d.addr, d.len, d.flags & F_WRITE != 0)?;
            if d.flags & F_NEXT == 0 {
                break;
            }
            idx = u32::from(d.next);
        }
        Ok(b.finish(head, 1))
    }

    fn walk_indirect(&self, b: &mut ChainBuilder, addr: u64, len: u32) -> Result<(), ChainError> {
        if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_INDIRECT {
            return Err(ChainError::BadIndirectLen(len));
        }
        let n = len / 16;
        let table = self.mem.translate(addr, u64::from(len)).ok_or(ChainError::IndirectNotMapped(addr))?;
        let mut i = 0u32;
        let mut count = 0u32;
        loop {
            if i >= n {
                return Err(ChainError::NextOutOfRange(i));
            }
            count += 1;
            if count > n {
                return Err(ChainError::TooLong);
            }
            // SAFETY: `i < n` and the table's `n * 16` bytes were translated as one range.
            let d = unsafe { read_desc(table, i) };
            // virtio 2.7.5.3.1: no indirect descriptor inside an indirect table.
            if d.flags & F_INDIRECT != 0 {
                return Err(ChainError::NestedIndirect);
            }
            b.add(&self.mem, d.addr, d.len, d.flags & F_WRITE != 0)?;
            if d.flags & F_NEXT == 0 {
                return Ok(());
            }
            i = u32::from(d.next);
        }
    }

    pub fn push_used(&mut self, head: u16, len: u32) {
        if let Some(l) = &self.log {
            l.pre_put(head);
        }
        let slot = usize::from(self.next_used % self.p.size);
        // SAFETY: `slot < size`: the element lies inside the used ring; it is 4-byte aligned
        // because the ring is (checked at setup) and elements are 8 bytes.
        unsafe {
            write::<u32>(self.used.add(4 + 8 * slot), u32::from(head).to_le());
            write::<u32>(self.used.add(8 + 8 * slot), len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        // SAFETY: `used + 2` is the used index, inside the ring.
        unsafe { write::<u16>(self.used.add(2), self.next_used.to_le()) };
        if let Some((d, used)) = &self.dirty {
            d.mark(used + 4 + 8 * slot as u64, 8);
            d.mark(used + 2, 2);
        }
        if let Some(l) = &self.log {
            l.post_put(head, self.next_used);
        }
        if let Some(f) = self.inflight.get_mut(usize::from(head)) {
            *f = false;
        }
    }

    pub fn needs_call(&mut self) -> bool {
        // Order our used-index store before reading the driver's suppression fields.
        fence(Ordering::SeqCst);
        if self.p.event_idx {
            // SAFETY: `used_event` follows the ring entries, inside the available ring area.
            let event = u16::from_le(unsafe { read::<u16>(self.avail.add(4 + 2 * usize::from(self.p.size))) });
            let new = self.next_used;
            let old = self.signalled_used;
            let need = !self.signalled_valid || new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old);
            self.signalled_used = new;
            self.signalled_valid = true;
            need
        } else {
            // SAFETY: the flags are the first field of the available ring.
            let flags = u16::from_le(unsafe { read::<u16>(self.avail) });
            flags & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    pub fn enable_kicks(&mut self) -> bool {
        if self.p.event_idx {
            // SAFETY: `avail_event` follows the used ring entries, inside the used area.
            unsafe { write::<u16>(self.used.add(4 + 8 * usize::from(self.p.size)), self.next_avail.to_le()) };
        } else {
            // SAFETY: the used ring's flags field.
            unsafe { write::<u16>(self.used, 0) };
        }
        fence(Ordering::SeqCst);
        self.has_available()
    }

    pub fn disable_kicks(&mut self) {
        if !self.p.event_idx {
            // SAFETY: the used ring's flags field.
            unsafe { write::<u16>(self.used, USED_F_NO_NOTIFY.to_le()) };
        }
        // With EVENT_IDX the stale avail_event already suppresses kicks: the driver notifies only
        // when its index crosses it, which then happens at most once per 64 Ki buffers.
    }

    pub fn base(&self) -> u32 {
        u32::from(self.next_avail)
    }

    /// Starts (or stops, with `None`) logging used-ring writes; `used_gpa` is where the frontend
    /// wants them logged (vhost-user `log_guest_addr`).
    pub fn set_dirty_log(&mut self, log: Option<(Arc<vstor_mem::DirtyLog>, u64)>) {
        self.dirty = log;
    }

    pub fn used_area(&self) -> (u64, u64) {
        (self.p.addrs.device, 6 + 8 * u64::from(self.p.size))
    }
}

// SAFETY: the raw pointers point into `mem`, which the queue owns an Arc of; the queue is used by
// one reactor at a time (moved, never shared).
unsafe impl Send for SplitQueue {}
