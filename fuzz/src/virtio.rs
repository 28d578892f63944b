//! `virtio_split_chain` and `virtio_packed_chain`: a queue over guest memory the input wrote
//! (descriptor tables, indirect tables, rings, indices), popped until empty.
//!
//! Input layout:
//!
//! ```text
//! u8  flags      F_* below
//! u8  size       split: 1 << (size % 8), or with bit 7 set the raw value & 0x7f (may be invalid);
//!                packed: the raw value (0 is invalid)
//! u16 base       SET_VRING_BASE value (packed: wrap counter in bit 15)
//! u32 desc, u32 driver, u32 device    ring addresses, used only with F_CUSTOM_ADDRS
//! [in-flight region image, queue_region_size(size) bytes, only with F_INFLIGHT]
//! memory image   copied to gpa 0 (see `guest`)
//! ```
//!
//! Default ring layout: descriptors at 0x0000, driver area (available ring / driver event
//! suppression) at 0x1000, device area (used ring / device event suppression) at 0x2000 (packed:
//! 0x1004). Data buffers in the seeds live from 0x3000 on.

use std::cell::RefCell;

use vstor_mem::{memfd, Region};
use vstor_virtio::inflight::{queue_region_size, QueueRegion};
use vstor_virtio::{DescChain, PopError, QueueParams, RingAddrs, Virtqueue};

use crate::guest::Guest;
use crate::{Reader, Writer};

pub const F_INDIRECT: u8 = 1;
pub const F_EVENT_IDX: u8 = 2;
pub const F_CUSTOM_ADDRS: u8 = 4;
/// Return each good chain as soon as it is taken (else all at the end, in reverse order).
pub const F_COMPLETE_AT_ONCE: u8 = 8;
/// Attach an in-flight region (vhost-user INFLIGHT_SHMFD, split or packed layout) read from the
/// input.
pub const F_INFLIGHT: u8 = 16;
/// After draining, restart the queue at its `base()` (GET_VRING_BASE then SET_VRING_BASE) and
/// drain again.
pub const F_RESTART: u8 = 32;

pub const DESC: u64 = 0x0000;
pub const DRIVER: u64 = 0x1000;
pub const SPLIT_DEVICE: u64 = 0x2000;
pub const PACKED_DEVICE: u64 = 0x1004;
pub const DATA: u64 = 0x3000;
pub const HEADER_LEN: usize = 16;

/// Room for the in-flight region of a queue of up to 256 entries.
const INFLIGHT_BYTES: usize = 0x4000;

thread_local! {
    static ENV: RefCell<Option<Env>> = const { RefCell::new(None) };
}

struct Env {
    guest: Guest,
    /// Backing for in-flight regions (`INFLIGHT_BYTES`, page-aligned).
    inflight: Region,
    _inflight_file: std::fs::File,
}

impl Env {
    fn new() -> Self {
        let f = memfd("fuzz-inflight", INFLIGHT_BYTES as u64).expect("memfd");
        let inflight = Region::map(&f, 0, INFLIGHT_BYTES as u64, 0, 0).expect("map in-flight region");
        Self { guest: Guest::new(), inflight, _inflight_file: f }
    }
}

/// Queue size from the header byte.
pub fn queue_size(packed: bool, sel: u8) -> u16 {
    if packed {
        u16::from(sel)
    } else if sel & 0x80 != 0 {
        u16::from(sel & 0x7f)
    } else {
        1 << (sel % 8)
    }
}

/// Queue parameters for a header.
pub fn params(packed: bool, flags: u8, size: u16, base: u16, custom: [u32; 3]) -> QueueParams {
    let addrs = if flags & F_CUSTOM_ADDRS != 0 {
        RingAddrs { desc: custom[0].into(), driver: custom[1].into(), device: custom[2].into() }
    } else {
        RingAddrs { desc: DESC, driver: DRIVER, device: if packed { PACKED_DEVICE } else { SPLIT_DEVICE } }
    };
    QueueParams {
        size,
        addrs,
        packed,
        event_idx: flags & F_EVENT_IDX != 0,
        indirect: flags & F_INDIRECT != 0,
        base: u32::from(base),
    }
}

pub fn split_chain(data: &[u8]) {
    chain(data, false)
}

pub fn packed_chain(data: &[u8]) {
    chain(data, true)
}

fn check(guest: &Guest, c: &DescChain, size: u16) {
    guest.assert_inside(&c.readable, "readable part");
    guest.assert_inside(&c.writable, "writable part");
    assert!(c.head < size, "head {} of a queue of {size}", c.head);
    assert!(c.ndesc >= 1 && c.ndesc <= size, "chain of {} slots in a queue of {size}", c.ndesc);
}

/// Takes available chains (a bounded number); collects in `out` the ones still to be returned.
fn drain(guest: &Guest, q: &mut Virtqueue, flags: u8, out: &mut Vec<(u16, u16)>) {
    let size = q.size();
    for _ in 0..(2 * u32::from(size) + 4) {
        match q.pop() {
            None => return,
            Some(Ok(c)) => {
                check(guest, &c, size);
                let len = u32::try_from(c.writable.total_len()).unwrap_or(u32::MAX);
                if flags & F_COMPLETE_AT_ONCE != 0 {
                    q.push_used(c.head, c.ndesc, len);
                } else {
                    out.push((c.head, c.ndesc));
                }
            }
            Some(Err(PopError::Chain { head, ndesc, .. })) => {
                assert!(head < size && ndesc >= 1 && ndesc <= size, "bad chain {head}/{ndesc} in a queue of {size}");
                q.push_used(head, ndesc, 0);
            }
            // The device marks the queue broken and stops using it.
            Some(Err(PopError::Fatal(_))) => return,
        }
    }
    // Still more: rings that overlap (used ring over the available ring) let each completion
    // make more chains available. A guest can keep a device busy anyway; the poller's budget
    // bounds each pass, and so does this loop.
}

fn chain(data: &[u8], packed: bool) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let size = queue_size(packed, r.u8());
    let base = r.u16();
    let custom = [r.u32(), r.u32(), r.u32()];
    let p = params(packed, flags, size, base, custom);
    ENV.with(|env| {
        let mut env = env.borrow_mut();
        let env = env.get_or_insert_with(Env::new);
        let inflight_image = if flags & F_INFLIGHT != 0 && size > 0 && size <= 256 {
            Some(r.take(usize::try_from(queue_region_size(size)).unwrap_or(0)))
        } else {
            None
        };
        env.guest.load(r.rest());
        let before = env.guest.snapshot();
        exercise(env, &p, flags, inflight_image);
        // The device writes the used ring (split) or the descriptor ring and its event suppression
        // area (packed), nothing else: the chain harness never writes to buffers.
        let (a, n) = (p.addrs, u64::from(size));
        let allowed: &[(u64, u64)] = if packed { &[(a.desc, 16 * n), (a.device, 4)] } else { &[(a.device, 6 + 8 * n)] };
        env.guest.assert_changed_only(&before, allowed);
    });
}

fn exercise(env: &Env, p: &QueueParams, flags: u8, inflight_image: Option<&[u8]>) {
    let size = p.size;
    let mem = env.guest.mem.clone();
    let Ok(mut q) = Virtqueue::new(p, mem.clone()) else { return };
    let mut out = Vec::new();
    if let Some(img) = inflight_image {
        let host = env.inflight.host();
        // SAFETY: `host` is the start of an `INFLIGHT_BYTES` read-write mapping kept alive by
        // `env` for the whole call; `img` is at most `queue_region_size(256)` < INFLIGHT_BYTES.
        unsafe {
            std::ptr::write_bytes(host, 0, INFLIGHT_BYTES);
            std::ptr::copy_nonoverlapping(img.as_ptr(), host, img.len());
        }
        // SAFETY: the mapping is page-aligned, holds `queue_region_size(size)` bytes (size <= 256,
        // checked by the caller) and outlives `q`, which is dropped before this function returns.
        let region = unsafe { QueueRegion::new(host, size) };
        let features = if p.packed { vstor_virtio::features::RING_PACKED } else { 0 };
        if let Ok(heads) = q.attach_inflight(region, features) {
            for h in heads {
                match q.resubmit(h) {
                    Ok(c) => {
                        check(&env.guest, &c, size);
                        out.push((c.head, c.ndesc));
                    }
                    Err(PopError::Chain { head, ndesc, .. }) => q.push_used(head, ndesc, 0),
                    Err(PopError::Fatal(_)) => {}
                }
            }
        }
    }
    drain(&env.guest, &mut q, flags, &mut out);
    let _ = q.needs_call();
    let _ = q.enable_kicks();
    q.disable_kicks();
    for (head, ndesc) in out.drain(..).rev() {
        q.push_used(head, ndesc, 0);
    }
    let _ = q.needs_call();
    if flags & F_RESTART != 0 {
        let restart = QueueParams { base: q.base(), ..*p };
        drop(q);
        let Ok(mut q) = Virtqueue::new(&restart, mem.clone()) else { return };
        let _ = q.set_memory(mem);
        drain(&env.guest, &mut q, flags, &mut out);
        for (head, ndesc) in out.drain(..) {
            q.push_used(head, ndesc, 0);
        }
        let _ = q.needs_call();
    }
}

/// A 16-byte descriptor (split: flags then next; packed: id then flags).
pub fn desc(addr: u64, len: u32, a: u16, b: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&a.to_le_bytes());
    d[14..16].copy_from_slice(&b.to_le_bytes());
    d
}

/// A memory image under construction (for seeds).
#[derive(Debug, Clone)]
pub struct Image(pub Vec<u8>);

impl Image {
    pub fn new(len: usize) -> Self {
        Self(vec![0; len])
    }

    pub fn put(&mut self, gpa: u64, bytes: &[u8]) -> &mut Self {
        let at = usize::try_from(gpa).expect("small address");
        if self.0.len() < at + bytes.len() {
            self.0.resize(at + bytes.len(), 0);
        }
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }

    pub fn u16(&mut self, gpa: u64, v: u16) -> &mut Self {
        self.put(gpa, &v.to_le_bytes())
    }
}

/// A split ring in the default layout: chains of (addr, len, write) buffers, descriptors
/// allocated in order, each chain made available. `indirect` chains go through a table at
/// `table` instead.
#[derive(Debug)]
pub struct SplitRing {
    pub size: u16,
    pub img: Image,
    next_desc: u16,
    avail: u16,
}

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

impl SplitRing {
    pub fn new(size: u16) -> Self {
        Self { size, img: Image::new(DATA as usize), next_desc: 0, avail: 0 }
    }

    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.img.put(DESC + 16 * u64::from(i), &desc(addr, len, flags, next));
    }

    pub fn publish(&mut self, head: u16) {
        let slot = self.avail % self.size;
        self.img.u16(DRIVER + 4 + 2 * u64::from(slot), head);
        self.avail = self.avail.wrapping_add(1);
        self.img.u16(DRIVER + 2, self.avail);
    }

    /// Adds a direct chain; returns its head.
    pub fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc += 1;
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.set_desc(i, addr, len, flags, i + 1);
        }
        self.publish(head);
        head
    }

    /// Adds a chain whose buffers are in an indirect table written at `table`.
    pub fn indirect(&mut self, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
        let mut t = Vec::new();
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            t.extend_from_slice(&desc(addr, len, flags, u16::try_from(k + 1).unwrap_or(0)));
        }
        self.img.put(table, &t);
        let head = self.next_desc;
        self.next_desc += 1;
        let len = u32::try_from(t.len()).unwrap_or(0);
        self.set_desc(head, table, len, VIRTQ_DESC_F_INDIRECT, 0);
        self.publish(head);
        head
    }
}

pub const PACKED_F_AVAIL: u16 = 1 << 7;
pub const PACKED_F_USED: u16 = 1 << 15;

/// A packed ring in the default layout, driver wrap counter starting at 1.
#[derive(Debug)]
pub struct PackedRing {
    pub size: u16,
    pub img: Image,
    next: u16,
    wrap: bool,
}

impl PackedRing {
    pub fn new(size: u16) -> Self {
        Self { size, img: Image::new(DATA as usize), next: 0, wrap: true }
    }

    fn avail_flags(&self) -> u16 {
        if self.wrap {
            PACKED_F_AVAIL
        } else {
            PACKED_F_USED
        }
    }

    /// Adds a chain with buffer `id`; `extra` flags per buffer (e.g. VIRTQ_DESC_F_INDIRECT).
    pub fn chain(&mut self, id: u16, bufs: &[(u64, u32, u16)]) {
        for (k, &(addr, len, extra)) in bufs.iter().enumerate() {
            let mut flags = extra | self.avail_flags();
            if k + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.img.put(DESC + 16 * u64::from(self.next), &desc(addr, len, id, flags));
            self.next += 1;
            if self.next == self.size {
                self.next = 0;
                self.wrap = !self.wrap;
            }
        }
    }
}

/// A chain-target input: header, then the memory image.
pub fn input(flags: u8, size_sel: u8, base: u16, img: &Image) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(flags).u8(size_sel).u16(base).u32(0).u32(0).u32(0).bytes(&img.0);
    w.0
}

/// The packed driver's initial SET_VRING_BASE value (index 0, wrap counter 1).
pub const PACKED_BASE: u16 = 1 << 15;
