//! Packed virtqueues (virtio 1.x section 2.8).

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vstor_mem::GuestMemory;

use crate::chain::{ChainBuilder, DescChain};
use crate::inflight::{InflightPacked, PackedDesc, QueueRegion};
use crate::ring::{area, read, write};
use crate::{ChainError, FatalError, PopError, QueueError, QueueParams, MAX_INDIRECT, MAX_QUEUE_SIZE};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;
const EVENT_ENABLE: u16 = 0;
const EVENT_DISABLE: u16 = 1;
const EVENT_DESC: u16 = 2;

#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

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
        return Desc { addr: lo, len: hi as u32, id: (hi >> 32) as u16, flags: (hi >> 48) as u16 };
    }
    // SAFETY: mapped (above); `[u8; 16]` has alignment 1.
    let b: [u8; 16] = unsafe { read(p) };
    Desc {
        addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        id: u16::from_le_bytes([b[12], b[13]]),
        flags: u16::from_le_bytes([b[14], b[15]]),
    }
}

/// A packed virtqueue, device side.
pub struct PackedQueue {
    p: QueueParams,
    mem: Arc<GuestMemory>,
    desc: *mut u8,
    driver: *mut u8,
    device: *mut u8,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    signalled_used: u16,
    signalled_valid: bool,
    inflight: Vec<bool>,
    /// The shared in-flight record (vhost-user INFLIGHT_SHMFD), if the frontend gave one, and
    /// the head entry in it of each buffer id in flight.
    log: Option<(InflightPacked, Vec<u16>)>,
    dirty: Option<(Arc<vstor_mem::DirtyLog>, u64)>,
}

impl PackedQueue {
    pub fn new(p: &QueueParams, mem: Arc<GuestMemory>) -> Result<Self, QueueError> {
        if p.size == 0 || p.size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadSize(p.size));
        }
        let next_avail = (p.base & 0x7fff) as u16;
        if next_avail >= p.size {
            return Err(QueueError::BadSize(p.size));
        }
        let wrap = p.base & 0x8000 != 0;
        let mut q = PackedQueue {
            p: *p,
            mem: mem.clone(),
            desc: std::ptr::null_mut(),
            driver: std::ptr::null_mut(),
            device: std::ptr::null_mut(),
            next_avail,
            avail_wrap: wrap,
            next_used: next_avail,
            used_wrap: wrap,
            signalled_used: next_avail,
            signalled_valid: false,
            inflight: vec![false; usize::from(p.size)],
            log: None,
            dirty: None,
        };
        q.set_memory(mem)?;
        Ok(q)
    }

    pub fn set_memory(&mut self, mem: Arc<GuestMemory>) -> Result<(), QueueError> {
        let a = self.p.addrs;
        self.desc = area(&mem, "descriptor ring", a.desc, 16 * u64::from(self.p.size), 16)?;
        self.driver = area(&mem, "driver event suppression area", a.driver, 4, 4)?;
        self.device = area(&mem, "device event suppression area", a.device, 4, 4)?;
        self.mem = mem;
        Ok(())
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    pub fn size(&self) -> u16 {
        self.p.size
    }

    fn flags_at(&self, i: u16) -> u16 {
        // SAFETY: `i < size`; the flags are the last 2 bytes of the 16-byte descriptor, which is
        // 2-aligned because the ring is 16-aligned.
        u16::from_le(unsafe { read::<u16>(self.desc.add(16 * usize::from(i) + 14)) })
    }

    fn is_avail(flags: u16, wrap: bool) -> bool {
        ((flags & F_AVAIL != 0) == wrap) && ((flags & F_USED != 0) != wrap)
    }

    pub fn has_available(&self) -> bool {
        Self::is_avail(self.flags_at(self.next_avail), self.avail_wrap)
    }

    /// Moves ring position `i` forward by `n <= size` slots, flipping `wrap` when it wraps.
    fn advance(i: &mut u16, wrap: &mut bool, n: u16, size: u16) {
        let next = u32::from(*i) + u32::from(n);
        let (v, wrapped) = if next >= u32::from(size) { (next - u32::from(size), true) } else { (next, false) };
        // `i < size` and `n <= size`, so `v < size <= 32768`.
        *i = u16::try_from(v).unwrap_or(0);
        *wrap ^= wrapped;
    }

    pub fn pop(&mut self) -> Option<Result<DescChain, PopError>> {
        if !self.has_available() {
            return None;
        }
        // Descriptor contents are read only after seeing the flags that publish them.
        fence(Ordering::Acquire);
        // First pass: find the chain's extent and buffer id from the flags alone, so that even a
        // chain with bad buffers is consumed whole and the ring stays in step.
        let size = self.p.size;
        let (mut i, mut wrap) = (self.next_avail, self.avail_wrap);
        let mut n: u16 = 0;
        let id;
        loop {
            if n >= size {
                return Some(Err(PopError::Fatal(FatalError::ChainTooLong)));
            }
            // SAFETY: `i < size`.
            let d = unsafe { read_desc(self.desc, u32::from(i)) };
            if !Self::is_avail(d.flags, wrap) {
                // The driver makes the head available last, so the rest must already be there.
                return Some(Err(PopError::Fatal(FatalError::ChainCut(i))));
            }
            n += 1;
            Self::advance(&mut i, &mut wrap, 1, size);
            if d.flags & F_NEXT == 0 || d.flags & F_INDIRECT != 0 {
                id = d.id;
                break;
            }
        }
        let (start, start_wrap) = (self.next_avail, self.avail_wrap);
        self.next_avail = i;
        self.avail_wrap = wrap;
        if id >= size {
            return Some(Err(PopError::Fatal(FatalError::HeadOutOfRange(id))));
        }
        if self.inflight[usize::from(id)] {
            return Some(Err(PopError::Fatal(FatalError::DuplicateHead(id))));
        }
        // From here the chain is the device's until it is returned, even if it is malformed
        // (then it is returned at once with an error).
        self.inflight[usize::from(id)] = true;
        if self.log.is_some() {
            self.log_chain(start, n, id);
        }
        let descs = (0..n).map(|k| {
            let (mut i, mut w) = (start, start_wrap);
            Self::advance(&mut i, &mut w, k, size);
            // SAFETY: `i < size`.
            unsafe { read_desc(self.desc, u32::from(i)) }
        });
        match self.walk(descs, n) {
            Ok(b) => Some(Ok(b.finish(id, n))),
            Err(kind) => Some(Err(PopError::Chain { head: id, ndesc: n, kind })),
        }
    }

    /// Copies the `n` descriptors from ring slot `start` into the in-flight record as chain `id`.
    fn log_chain(&mut self, start: u16, n: u16, id: u16) {
        let Some((log, entry_of)) = &mut self.log else { return };
        let size = self.p.size;
        let mut i = start;
        let mut w = false;
        for k in 0..n {
            // SAFETY: `i < size`.
            let d = unsafe { read_desc(self.desc, u32::from(i)) };
            if !log.record(k, PackedDesc { addr: d.addr, len: d.len, id: d.id, flags: d.flags }) {
                // Only a region the frontend scribbled on runs out of entries: stop tracking.
                log.abort();
                self.log = None;
                return;
            }
            Self::advance(&mut i, &mut w, 1, size);
        }
        entry_of[usize::from(id)] = log.commit(n);
    }

    /// Attaches the shared in-flight record and recovers from it: the ring position comes from
    /// the record (the frontend's SET_VRING_BASE is stale after a crash), and the buffer ids of
    /// the chains a previous device instance took and did not complete are returned in the
    /// order it took them. Resubmit each with [`resubmit`](Self::resubmit).
    pub fn attach_inflight(&mut self, region: QueueRegion, features: u64) -> Result<Vec<u16>, &'static str> {
        let mut log = InflightPacked::new(region);
        let base = self.base();
        let rec = log.recover(base, features, |slot| if slot < self.p.size { self.flags_at(slot) } else { 0 })?;
        let size = self.p.size;
        let slots: u32 = rec.chains.iter().map(|c| u32::from(c.ndesc)).sum();
        let slots = u16::try_from(slots).ok().filter(|&s| s <= size).ok_or("in-flight chains exceed the ring")?;
        self.next_used = rec.used;
        self.used_wrap = rec.used_wrap;
        self.signalled_used = rec.used;
        self.signalled_valid = false;
        let (mut a, mut w) = (rec.used, rec.used_wrap);
        Self::advance(&mut a, &mut w, slots, size);
        self.next_avail = a;
        self.avail_wrap = w;
        let mut entry_of = vec![u16::MAX; usize::from(size)];
        for c in &rec.chains {
            entry_of[usize::from(c.id)] = c.entry;
        }
        self.log = Some((log, entry_of));
        Ok(rec.chains.iter().map(|c| c.id).collect())
    }

    /// Takes chain `id` again after a restart, from the descriptor copies in the in-flight
    /// record (the ring slots may hold other chains' used elements by now).
    pub fn resubmit(&mut self, id: u16) -> Result<DescChain, PopError> {
        let bad = PopError::Fatal(FatalError::HeadOutOfRange(id));
        let Some((log, entry_of)) = &self.log else { return Err(bad) };
        let entry = entry_of.get(usize::from(id)).copied().unwrap_or(u16::MAX);
        if self.inflight.get(usize::from(id)).is_none_or(|&f| f) || entry == u16::MAX {
            return Err(bad);
        }
        let descs = log.chain(entry).ok_or(bad)?;
        let n = u16::try_from(descs.len()).map_err(|_| bad)?;
        self.inflight[usize::from(id)] = true;
        let descs = descs.into_iter().map(|d| Desc { addr: d.addr, len: d.len, id: d.id, flags: d.flags });
        match self.walk(descs, n) {
            Ok(b) => Ok(b.finish(id, n)),
            Err(kind) => Err(PopError::Chain { head: id, ndesc: n, kind }),
        }
    }

    /// Builds the chain of `n` descriptors `descs` (ring order).
    fn walk(&self, descs: impl Iterator<Item = Desc>, n: u16) -> Result<ChainBuilder, ChainError> {
        let mut b = ChainBuilder::new();
        for (k, d) in (0..n).zip(descs) {
            if d.flags & F_INDIRECT != 0 {
                if !self.p.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                // virtio 2.8.8: an indirect descriptor is alone and has no NEXT flag.
                if d.flags & F_NEXT != 0 || k + 1 != n || n != 1 {
                    return Err(ChainError::IndirectWithNext);
                }
                self.walk_indirect(&mut b, d.addr, d.len)?;
            } else {
                b.add(&self.mem, d.addr, d.len, d.flags & F_WRITE != 0)?;
            }
        }
        Ok(b)
    }

    fn walk_indirect(&self, b: &mut ChainBuilder, addr: u64, len: u32) -> Result<(), ChainError> {
        if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_INDIRECT {
            return Err(ChainError::BadIndirectLen(len));
        }
        let table = self.mem.translate(addr, u64::from(len)).ok_or(ChainError::IndirectNotMapped(addr))?;
        for i in 0..len / 16 {
            // SAFETY: `i < len / 16` and the whole table was translated as one range.
            let d = unsafe { read_desc(table, i) };
            if d.flags & F_INDIRECT != 0 {
                return Err(ChainError::NestedIndirect);
            }
            b.add(&self.mem, d.addr, d.len, d.flags & F_WRITE != 0)?;
        }
        Ok(())
    }

    pub fn push_used(&mut self, id: u16, ndesc: u16, len: u32) {
        let slot = usize::from(self.next_used);
        let (mut next, mut wrap) = (self.next_used, self.used_wrap);
        Self::advance(&mut next, &mut wrap, ndesc.clamp(1, self.p.size), self.p.size);
        let entry = match &mut self.log {
            Some((log, entry_of)) => match entry_of.get_mut(usize::from(id)) {
                Some(e) if *e != u16::MAX => {
                    let entry = std::mem::replace(e, u16::MAX);
                    log.pre_put(entry, next, wrap);
                    Some(entry)
                }
                _ => None,
            },
            None => None,
        };
        // SAFETY: `next_used < size`; id and len are the 4-aligned fields at 8..16 of the
        // descriptor (the ring is 16-aligned).
        unsafe {
            write::<u32>(self.desc.add(16 * slot + 8), len.to_le());
            write::<u16>(self.desc.add(16 * slot + 12), id.to_le());
        }
        // The id and length must be visible before the flags that hand the slot back.
        fence(Ordering::Release);
        let flags = if self.used_wrap { F_AVAIL | F_USED } else { 0 };
        // SAFETY: the flags field of the same descriptor.
        unsafe { write::<u16>(self.desc.add(16 * slot + 14), flags.to_le()) };
        if let Some((d, ring)) = &self.dirty {
            d.mark(ring + 16 * slot as u64, 16);
        }
        (self.next_used, self.used_wrap) = (next, wrap);
        if let (Some((log, _)), Some(entry)) = (&mut self.log, entry) {
            log.post_put(entry);
        }
        if let Some(f) = self.inflight.get_mut(usize::from(id)) {
            *f = false;
        }
    }

    pub fn needs_call(&mut self) -> bool {
        fence(Ordering::SeqCst);
        // SAFETY: the driver event suppression area is 4 bytes, 4-aligned: off_wrap then flags.
        let (off_wrap, flags) =
            unsafe { (u16::from_le(read::<u16>(self.driver)), u16::from_le(read::<u16>(self.driver.add(2)))) };
        let old = self.signalled_used;
        let new = self.next_used;
        let valid = self.signalled_valid;
        self.signalled_used = new;
        self.signalled_valid = true;
        match flags & 3 {
            EVENT_ENABLE => true,
            EVENT_DISABLE => false,
            EVENT_DESC if self.p.event_idx => {
                if !valid {
                    return true;
                }
                let size = i32::from(self.p.size);
                let mut old = i32::from(old);
                let new = i32::from(new);
                if new <= old {
                    old -= size;
                }
                let mut off = i32::from(off_wrap & 0x7fff);
                if self.used_wrap != (off_wrap >> 15 != 0) {
                    off -= size;
                }
                // vring_need_event in 16-bit arithmetic (two's-complement wrap is intended).
                let low16 = |v: i32| u16::try_from(v.rem_euclid(1 << 16)).unwrap_or(0);
                low16(new - off - 1) < low16(new - old)
            }
            _ => true,
        }
    }

    pub fn enable_kicks(&mut self) -> bool {
        // SAFETY: the device event suppression area: flags at offset 2.
        unsafe { write::<u16>(self.device.add(2), EVENT_ENABLE.to_le()) };
        fence(Ordering::SeqCst);
        self.has_available()
    }

    pub fn disable_kicks(&mut self) {
        // SAFETY: as above.
        unsafe { write::<u16>(self.device.add(2), EVENT_DISABLE.to_le()) };
    }

    pub fn base(&self) -> u32 {
        u32::from(self.next_avail) | (u32::from(self.avail_wrap) << 15)
    }

    /// Starts (or stops) logging descriptor-ring writes (the packed ring is where used
    /// elements go); `ring_gpa` is the descriptor ring's guest address.
    pub fn set_dirty_log(&mut self, log: Option<(Arc<vstor_mem::DirtyLog>, u64)>) {
        self.dirty = log;
    }

    pub fn desc_area(&self) -> (u64, u64) {
        (self.p.addrs.desc, 16 * u64::from(self.p.size))
    }
}

// SAFETY: the raw pointers point into `mem`, which the queue holds an Arc of; the queue is used
// by one reactor at a time.
unsafe impl Send for PackedQueue {}
