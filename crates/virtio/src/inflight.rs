//! In-flight tracking in a region shared with the vhost-user frontend
//! (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), in the split and packed layouts of the vhost-user spec
//! ("Inflight I/O tracking").
//!
//! The frontend keeps the region across backend restarts, so a new vstor process finds every
//! request the old one took and had not completed, and processes them again in the order they
//! were taken. Every access goes through [`QueueRegion`], which bounds-checks offsets against the
//! region's size: a region with garbage in it (the frontend may hand back anything) yields an
//! error or a wrong answer about one queue, never an access outside the mapping.
//!
//! Split layout (header 16 bytes, one 16-byte state per descriptor head):
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
//! desc[i]:  u8 inflight | u8 pad[5] | u16 next | u64 counter
//! ```
//!
//! A head is marked when the device takes it and cleared after its used element is published;
//! `last_batch_head` and `used_idx` let a restarted device tell a completion that was published
//! but not yet cleared (crash between the two) from one still in flight.
//!
//! Packed layout (header 32 bytes, 32-byte entries forming a free list):
//!
//! ```text
//! u64 features | u16 version | u16 desc_num | u16 free_head | u16 old_free_head
//!   | u16 used_idx | u16 old_used_idx | u8 used_wrap | u8 old_used_wrap | pad[10]
//! desc[i]:  u8 inflight | u8 pad | u16 next | u16 last | u16 num | u64 counter
//!           | u16 id | u16 flags | u32 len | u64 addr
//! ```
//!
//! A packed ring overwrites a chain's descriptors with used elements of other chains when they
//! complete out of order, so the device copies every descriptor it takes into a free entry; the
//! head entry of a chain also holds its length (`num`), its last entry and its order number.
//! Each operation first moves `free_head` / `used_idx`, then commits by copying them to the
//! `old_*` fields; a restarted device rolls back anything not committed (after checking the ring
//! for a completion that was published just before the crash). The ring position after a crash
//! also comes from the region: the frontend cannot know it (it has no used index to read for a
//! packed ring), so what it sends in SET_VRING_BASE is stale. The next slot to take is the used
//! position plus the slots of every chain still in flight.

use std::sync::atomic::{fence, Ordering};

use crate::ring::{read, write};

const SPLIT_HDR: usize = 16;
const SPLIT_DESC: usize = 16;
const PACKED_HDR: usize = 32;
const PACKED_DESC: usize = 32;
const VERSION: u16 = 1;
const RING_PACKED: u64 = crate::features::RING_PACKED;

/// Bytes one queue's region takes for a queue of `size` entries: enough for either layout (the
/// packed one is larger), rounded up to 64 bytes, so a region handed out before the ring format
/// is known fits whichever the driver picks.
pub fn queue_region_size(size: u16) -> u64 {
    ((PACKED_HDR + PACKED_DESC * usize::from(size)) as u64).div_ceil(64) * 64
}

/// One queue's part of the shared region, with bounds-checked volatile access.
pub struct QueueRegion {
    base: *mut u8,
    /// Bytes mapped at `base` (`queue_region_size(size)`).
    bytes: usize,
    size: u16,
}

// SAFETY: the pointer is into a shared mapping whose owner keeps it alive while the queue exists
// (see `new`); the queue is used by one reactor at a time.
unsafe impl Send for QueueRegion {}

impl QueueRegion {
    /// # Safety
    /// `base..base + queue_region_size(size)` must be mapped read-write, 8-aligned, and stay
    /// mapped for the life of the returned value.
    pub unsafe fn new(base: *mut u8, size: u16) -> Self {
        let bytes = usize::try_from(queue_region_size(size)).unwrap_or(0);
        Self { base, bytes, size }
    }

    /// The queue size the region was set up for.
    pub fn queue_size(&self) -> u16 {
        self.size
    }

    fn fits<T>(&self, off: usize) -> bool {
        off.is_multiple_of(std::mem::align_of::<T>())
            && off.checked_add(std::mem::size_of::<T>()).is_some_and(|end| end <= self.bytes)
    }

    /// Reads a little-endian field; 0 if `off` is outside the region or misaligned.
    fn get<T: Copy + Default + LeInt>(&self, off: usize) -> T {
        if !self.fits::<T>(off) {
            return T::default();
        }
        // SAFETY: `off + size_of::<T>() <= bytes`, which `new`'s caller guarantees mapped; `off`
        // is a multiple of T's alignment and `base` is 8-aligned (T is at most 8 bytes).
        T::from_le(unsafe { read::<T>(self.base.add(off)) })
    }

    /// Writes a little-endian field; ignored if `off` is outside the region or misaligned.
    fn set<T: Copy + LeInt>(&self, off: usize, v: T) {
        if !self.fits::<T>(off) {
            return;
        }
        // SAFETY: as in `get`.
        unsafe { write::<T>(self.base.add(off), v.to_le()) }
    }
}

/// The integer types region fields have.
trait LeInt: Sized {
    fn from_le(v: Self) -> Self;
    fn to_le(self) -> Self;
}

macro_rules! le_int {
    ($($t:ty),*) => {$(
        impl LeInt for $t {
            fn from_le(v: Self) -> Self { <$t>::from_le(v) }
            fn to_le(self) -> Self { <$t>::to_le(self) }
        }
    )*};
}
le_int!(u8, u16, u32, u64);

/// The header fields both layouts share (offsets 0, 8 and 10).
fn check_header(r: &QueueRegion, features: u64) -> Result<bool, &'static str> {
    if r.get::<u16>(8) == 0 {
        return Ok(false);
    }
    if r.get::<u16>(10) != r.size {
        return Err("the in-flight region was made for a different queue size");
    }
    if r.get::<u64>(0) & RING_PACKED != features & RING_PACKED {
        return Err("the in-flight region was made for the other ring layout (split or packed)");
    }
    Ok(true)
}

/// One split queue's in-flight record.
pub struct InflightSplit {
    r: QueueRegion,
}

impl InflightSplit {
    pub fn new(r: QueueRegion) -> Self {
        Self { r }
    }

    fn desc(head: u16) -> usize {
        SPLIT_HDR + SPLIT_DESC * usize::from(head)
    }

    /// Marks `head` taken, with its order number.
    pub fn get(&self, head: u16, counter: u64) {
        if head >= self.r.size {
            return;
        }
        let d = Self::desc(head);
        self.r.set::<u64>(d + 8, counter);
        self.r.set::<u8>(d, 1);
    }

    /// Before publishing `head` as used.
    pub fn pre_put(&self, head: u16) {
        self.r.set::<u16>(12, head);
    }

    /// After publishing: `head` is no longer in flight; `used_idx` is the ring's used index now.
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if head < self.r.size {
            self.r.set::<u8>(Self::desc(head), 0);
        }
        fence(Ordering::Release);
        self.r.set::<u16>(14, used_idx);
    }

    /// Reads the region at queue start. A fresh region (version 0) is initialised and nothing is
    /// returned. Otherwise a completion published but not cleared is cleared, and the heads
    /// still in flight are returned in the order they were taken, with the highest order number
    /// seen. `used_idx` is the used index found in the ring.
    pub fn recover(&self, used_idx: u16, features: u64) -> Result<(Vec<u16>, u64), &'static str> {
        let r = &self.r;
        if !check_header(r, features)? {
            r.set::<u64>(0, features);
            r.set::<u16>(10, r.size);
            r.set::<u16>(14, used_idx);
            fence(Ordering::Release);
            r.set::<u16>(8, VERSION);
            return Ok((Vec::new(), 0));
        }
        let (last_batch, inf_used) = (r.get::<u16>(12), r.get::<u16>(14));
        if inf_used != used_idx {
            // Crashed after publishing the used element of `last_batch` but before clearing it.
            if last_batch < r.size {
                r.set::<u8>(Self::desc(last_batch), 0);
            }
            fence(Ordering::Release);
            r.set::<u16>(14, used_idx);
        }
        let mut heads: Vec<(u64, u16)> = (0..r.size)
            .filter(|&h| r.get::<u8>(Self::desc(h)) == 1)
            .map(|h| (r.get::<u64>(Self::desc(h) + 8), h))
            .collect();
        heads.sort_unstable();
        let max = heads.last().map_or(0, |h| h.0);
        Ok((heads.into_iter().map(|(_, h)| h).collect(), max))
    }
}

/// A descriptor as copied into a packed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedDesc {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

/// A chain found in flight by [`InflightPacked::recover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedChain {
    /// Buffer id (what the used element returns).
    pub id: u16,
    /// Head entry in the region.
    pub entry: u16,
    /// Ring slots (descriptors) the chain took.
    pub ndesc: u16,
}

/// What a restarted packed queue resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRecovery {
    /// Next used slot and its wrap counter.
    pub used: u16,
    pub used_wrap: bool,
    /// Chains still in flight, in the order they were taken.
    pub chains: Vec<PackedChain>,
}

// Packed header offsets.
const P_FREE: usize = 12;
const P_OLD_FREE: usize = 14;
const P_USED: usize = 16;
const P_OLD_USED: usize = 18;
const P_WRAP: usize = 20;
const P_OLD_WRAP: usize = 21;
// Packed entry field offsets.
const E_INFLIGHT: usize = 0;
const E_NEXT: usize = 2;
const E_LAST: usize = 4;
const E_NUM: usize = 6;
const E_COUNTER: usize = 8;
const E_ID: usize = 16;
const E_FLAGS: usize = 18;
const E_LEN: usize = 20;
const E_ADDR: usize = 24;

const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// One packed queue's in-flight record.
pub struct InflightPacked {
    r: QueueRegion,
    counter: u64,
    /// Entry the last [`record`](Self::record) filled.
    last_recorded: u16,
}

impl InflightPacked {
    pub fn new(r: QueueRegion) -> Self {
        Self { r, counter: 0, last_recorded: 0 }
    }

    fn e(i: u16, field: usize) -> usize {
        PACKED_HDR + PACKED_DESC * usize::from(i) + field
    }

    /// Copies descriptor `k` of the chain being taken into the next free entry. False if there
    /// is no free entry (a region the frontend corrupted): the caller must [`abort`](Self::abort).
    pub fn record(&mut self, k: u16, d: PackedDesc) -> bool {
        let r = &self.r;
        let f = r.get::<u16>(P_FREE);
        if f >= r.size {
            return false;
        }
        r.set::<u64>(Self::e(f, E_ADDR), d.addr);
        r.set::<u32>(Self::e(f, E_LEN), d.len);
        r.set::<u16>(Self::e(f, E_ID), d.id);
        r.set::<u16>(Self::e(f, E_FLAGS), d.flags);
        if k > 0 {
            r.set::<u8>(Self::e(f, E_INFLIGHT), 0);
        }
        r.set::<u16>(P_FREE, r.get::<u16>(Self::e(f, E_NEXT)));
        self.last_recorded = f;
        true
    }

    /// Drops a chain recorded but not committed.
    pub fn abort(&mut self) {
        let r = &self.r;
        r.set::<u16>(P_FREE, r.get::<u16>(P_OLD_FREE));
    }

    /// Makes the `ndesc` descriptors just recorded an in-flight chain; returns its head entry.
    pub fn commit(&mut self, ndesc: u16) -> u16 {
        let r = &self.r;
        let head = r.get::<u16>(P_OLD_FREE);
        self.counter = self.counter.wrapping_add(1);
        r.set::<u16>(Self::e(head, E_LAST), self.last_recorded);
        r.set::<u16>(Self::e(head, E_NUM), ndesc);
        r.set::<u64>(Self::e(head, E_COUNTER), self.counter);
        r.set::<u8>(Self::e(head, E_INFLIGHT), 1);
        fence(Ordering::Release);
        r.set::<u16>(P_OLD_FREE, r.get::<u16>(P_FREE));
        head
    }

    /// Before publishing the chain at `entry` as used: returns its entries to the free list and
    /// moves the used position to `used`/`used_wrap` (where it is after the publication).
    pub fn pre_put(&mut self, entry: u16, used: u16, used_wrap: bool) {
        let r = &self.r;
        let last = r.get::<u16>(Self::e(entry, E_LAST));
        r.set::<u16>(Self::e(last, E_NEXT), r.get::<u16>(P_FREE));
        r.set::<u16>(P_FREE, entry);
        r.set::<u16>(P_USED, used);
        r.set::<u8>(P_WRAP, u8::from(used_wrap));
        fence(Ordering::Release);
    }

    /// After publishing: commits what `pre_put` did.
    pub fn post_put(&mut self, entry: u16) {
        let r = &self.r;
        fence(Ordering::Release);
        r.set::<u8>(Self::e(entry, E_INFLIGHT), 0);
        fence(Ordering::Release);
        r.set::<u16>(P_OLD_FREE, r.get::<u16>(P_FREE));
        r.set::<u16>(P_OLD_USED, r.get::<u16>(P_USED));
        r.set::<u8>(P_OLD_WRAP, r.get::<u8>(P_WRAP));
    }

    /// The entries of the chain whose head entry is `entry`, following the entry links (bounded
    /// by the queue size). `None` unless they are `num` entries inside the region ending at the
    /// head's `last`.
    fn links(&self, entry: u16) -> Option<Vec<u16>> {
        let r = &self.r;
        let num = r.get::<u16>(Self::e(entry, E_NUM));
        if entry >= r.size || num == 0 || num > r.size {
            return None;
        }
        let mut out = Vec::with_capacity(usize::from(num));
        let mut e = entry;
        for k in 0..num {
            if e >= r.size {
                return None;
            }
            out.push(e);
            if k + 1 < num {
                e = r.get::<u16>(Self::e(e, E_NEXT));
            }
        }
        (e == r.get::<u16>(Self::e(entry, E_LAST))).then_some(out)
    }

    /// The descriptor copies of the chain whose head entry is `entry`.
    pub fn chain(&self, entry: u16) -> Option<Vec<PackedDesc>> {
        let r = &self.r;
        let descs = self.links(entry)?.into_iter().map(|e| PackedDesc {
            addr: r.get::<u64>(Self::e(e, E_ADDR)),
            len: r.get::<u32>(Self::e(e, E_LEN)),
            id: r.get::<u16>(Self::e(e, E_ID)),
            flags: r.get::<u16>(Self::e(e, E_FLAGS)),
        });
        Some(descs.collect())
    }

    /// Reads the region at queue start. A fresh region (version 0) is initialised at the
    /// frontend's position (`base`: next slot with the wrap counter in bit 15; nothing is in
    /// flight in a fresh queue). Otherwise an update interrupted by the crash is finished (if
    /// `ring_flags(old_used_idx)` shows its completion was published) or rolled back, and the
    /// chains still in flight are returned in the order they were taken.
    pub fn recover(
        &mut self,
        base: u32,
        features: u64,
        ring_flags: impl Fn(u16) -> u16,
    ) -> Result<PackedRecovery, &'static str> {
        let r = &self.r;
        let size = r.size;
        if !check_header(r, features)? {
            let used = u16::try_from(base & 0x7fff).unwrap_or(0);
            let wrap = base & 0x8000 != 0;
            r.set::<u64>(0, features);
            r.set::<u16>(10, size);
            for i in 0..size {
                r.set::<u8>(Self::e(i, E_INFLIGHT), 0);
                r.set::<u16>(Self::e(i, E_NEXT), i.saturating_add(1));
            }
            for (off, v) in [(P_FREE, 0), (P_OLD_FREE, 0), (P_USED, used), (P_OLD_USED, used)] {
                r.set::<u16>(off, v);
            }
            r.set::<u8>(P_WRAP, u8::from(wrap));
            r.set::<u8>(P_OLD_WRAP, u8::from(wrap));
            fence(Ordering::Release);
            r.set::<u16>(8, VERSION);
            self.counter = 0;
            return Ok(PackedRecovery { used, used_wrap: wrap, chains: Vec::new() });
        }
        let old_used = r.get::<u16>(P_OLD_USED);
        let old_wrap = r.get::<u8>(P_OLD_WRAP) != 0;
        if old_used >= size {
            return Err("the in-flight region's used index is out of range");
        }
        if r.get::<u16>(P_USED) != old_used || (r.get::<u8>(P_WRAP) != 0) != old_wrap {
            // Crashed inside a completion. If its used element reached the ring (the slot at the
            // old used position carries used flags for the old wrap counter), finish it.
            let f = ring_flags(old_used);
            if (f & F_AVAIL != 0) == old_wrap && (f & F_USED != 0) == old_wrap {
                r.set::<u16>(P_OLD_FREE, r.get::<u16>(P_FREE));
                r.set::<u16>(P_OLD_USED, r.get::<u16>(P_USED));
                r.set::<u8>(P_OLD_WRAP, r.get::<u8>(P_WRAP));
            }
        }
        // Roll back whatever was not committed.
        let (free, used, wrap) = (r.get::<u16>(P_OLD_FREE), r.get::<u16>(P_OLD_USED), r.get::<u8>(P_OLD_WRAP));
        if used >= size {
            return Err("the in-flight region's used index is out of range");
        }
        r.set::<u16>(P_FREE, free);
        r.set::<u16>(P_USED, used);
        r.set::<u8>(P_WRAP, wrap);
        // Entries on the free list are not in flight, whatever their flag says (a chain recorded
        // but not committed).
        let mut on_free = vec![false; usize::from(size)];
        let mut e = free;
        while e < size {
            if on_free[usize::from(e)] {
                return Err("the in-flight region's free list has a loop");
            }
            on_free[usize::from(e)] = true;
            r.set::<u8>(Self::e(e, E_INFLIGHT), 0);
            e = r.get::<u16>(Self::e(e, E_NEXT));
        }
        // Every entry belongs to the free list or to at most one in-flight chain; otherwise
        // recording a new chain would overwrite a copy still needed.
        let mut taken = on_free.clone();
        let mut found: Vec<(u64, PackedChain)> = Vec::new();
        let mut seen_id = vec![false; usize::from(size)];
        for h in (0..size).filter(|&h| !on_free[usize::from(h)]) {
            if r.get::<u8>(Self::e(h, E_INFLIGHT)) != 1 {
                continue;
            }
            let entries = self.links(h).ok_or("an in-flight chain in the region is malformed")?;
            for &x in &entries {
                if std::mem::replace(&mut taken[usize::from(x)], true) {
                    return Err("an in-flight chain in the region shares entries with another or the free list");
                }
            }
            let last = entries.last().copied().unwrap_or(h);
            let id = r.get::<u16>(Self::e(last, E_ID));
            if id >= size || std::mem::replace(&mut seen_id[usize::from(id)], true) {
                return Err("the in-flight region holds a buffer id twice or out of range");
            }
            let ndesc = u16::try_from(entries.len()).unwrap_or(u16::MAX);
            found.push((r.get::<u64>(Self::e(h, E_COUNTER)), PackedChain { id, entry: h, ndesc }));
        }
        // Disjoint chains of entries from a table of `size`: at most `size` descriptors in all.
        found.sort_unstable_by_key(|f| f.0);
        self.counter = found.last().map_or(0, |f| f.0);
        Ok(PackedRecovery { used, used_wrap: wrap != 0, chains: found.into_iter().map(|f| f.1).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USED_W1: u16 = F_AVAIL | F_USED;
    const AVAIL_W1: u16 = F_AVAIL;

    /// A region for a queue of 8 in a heap buffer (u64s: 8-aligned).
    fn region(buf: &mut [u64]) -> impl Fn() -> InflightPacked + '_ {
        assert!(buf.len() as u64 * 8 >= queue_region_size(8));
        let p = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` holds queue_region_size(8) bytes, is 8-aligned and outlives every
        // returned value (the closure borrows it).
        move || InflightPacked::new(unsafe { QueueRegion::new(p, 8) })
    }

    /// A fresh region set up for a ring at slot 0, wrap counter 1.
    fn started(new: &impl Fn() -> InflightPacked) -> InflightPacked {
        let mut log = new();
        assert!(log.recover(1 << 15, RING_PACKED, |_| 0).unwrap().chains.is_empty());
        log
    }

    fn d(addr: u64, id: u16) -> PackedDesc {
        PackedDesc { addr, len: 16, id, flags: AVAIL_W1 }
    }

    fn take(log: &mut InflightPacked, id: u16, n: u16) -> u16 {
        for k in 0..n {
            assert!(log.record(k, d(0x1000 * u64::from(k), id)));
        }
        log.commit(n)
    }

    #[test]
    fn a_completion_cut_short_before_it_reached_the_ring_is_rolled_back() {
        let mut buf = vec![0u64; 64];
        let new = region(&mut buf);
        let mut log = started(&new);
        let e0 = take(&mut log, 0, 2);
        let _e1 = take(&mut log, 1, 1);
        // The device starts returning chain 0 (2 slots) and dies before writing the ring.
        log.pre_put(e0, 2, true);
        let mut log = new();
        let rec = log.recover(1 << 15, RING_PACKED, |_| AVAIL_W1).unwrap();
        assert_eq!((rec.used, rec.used_wrap), (0, true), "used position rolled back");
        let ids: Vec<u16> = rec.chains.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![0, 1], "chain 0 is still in flight");
        assert_eq!(log.chain(rec.chains[0].entry).unwrap().len(), 2, "with both of its copies");
    }

    #[test]
    fn a_completion_that_reached_the_ring_before_the_crash_is_finished() {
        let mut buf = vec![0u64; 64];
        let new = region(&mut buf);
        let mut log = started(&new);
        let e0 = take(&mut log, 0, 2);
        take(&mut log, 1, 1);
        log.pre_put(e0, 2, true);
        // ... the used element is in the ring (slot 0 shows used flags for wrap 1); crash.
        let mut log = new();
        let rec = log.recover(1 << 15, RING_PACKED, |slot| if slot == 0 { USED_W1 } else { AVAIL_W1 }).unwrap();
        assert_eq!((rec.used, rec.used_wrap), (2, true));
        assert_eq!(rec.chains.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1]);
        // The freed entries are reused: 8 entries, 1 in flight, so 7 more descriptors fit.
        for k in 0..7 {
            assert!(log.record(k, d(0, 2)), "entry {k} of the free list");
        }
        assert!(!log.record(7, d(0, 2)), "no eighth free entry");
    }

    #[test]
    fn a_chain_recorded_but_not_committed_is_not_in_flight() {
        let mut buf = vec![0u64; 64];
        let new = region(&mut buf);
        let mut log = started(&new);
        take(&mut log, 0, 1);
        assert!(log.record(0, d(0, 1)) && log.record(1, d(0, 1)));
        let mut log = new(); // crash before commit
        let rec = log.recover(1 << 15, RING_PACKED, |_| AVAIL_W1).unwrap();
        assert_eq!(rec.chains.iter().map(|c| (c.id, c.ndesc)).collect::<Vec<_>>(), vec![(0, 1)]);
    }

    #[test]
    fn order_numbers_at_the_top_of_the_range_do_not_overflow() {
        // Found by fuzzing: a region whose in-flight chain carries the largest order number.
        let mut buf = vec![0u64; 64];
        {
            let new = region(&mut buf);
            let mut log = started(&new);
            take(&mut log, 0, 1);
        }
        buf[(PACKED_HDR + E_COUNTER) / 8] = u64::MAX;
        let new = region(&mut buf);
        let mut log = new();
        assert_eq!(log.recover(1 << 15, RING_PACKED, |_| 0).unwrap().chains.len(), 1);
        take(&mut log, 1, 1);
    }

    #[test]
    fn a_corrupt_region_is_refused_not_followed() {
        let mut buf = vec![0u64; 64];
        {
            let new = region(&mut buf);
            let mut log = started(&new);
            take(&mut log, 0, 2);
        }
        // Free list 2 -> 3 -> 2: a loop.
        let entry_next = |i: usize| (PACKED_HDR + PACKED_DESC * i + E_NEXT) / 8;
        let shift = |i: usize| ((PACKED_HDR + PACKED_DESC * i + E_NEXT) % 8) * 8;
        let i = entry_next(3);
        buf[i] = buf[i] & !(0xffff << shift(3)) | 2 << shift(3);
        let new = region(&mut buf);
        assert!(new().recover(1 << 15, RING_PACKED, |_| 0).unwrap_err().contains("loop"));
        drop(new);
        // Free list back to 2 -> 3 -> 4..., but chain 0 (entries 0, 1) claims entry 2 as well.
        buf[i] = buf[i] & !(0xffff << shift(3)) | 4 << shift(3);
        let num = (PACKED_HDR + E_NUM) / 8;
        buf[num] = buf[num] & !(0xffff << 48) | 3 << 48;
        let last = (PACKED_HDR + E_LAST) / 8;
        buf[last] = buf[last] & !(0xffff << 32) | 2 << 32;
        let new = region(&mut buf);
        assert!(new().recover(1 << 15, RING_PACKED, |_| 0).unwrap_err().contains("shares entries"));
    }
}
