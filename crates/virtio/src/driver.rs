//! The driver side of split and packed rings, written into guest memory: for tests of the device
//! side (this crate's, the vhost layer's) and for tools that play a virtio driver.
//! It trusts its caller and panics on misuse; it is not for production paths.
#![allow(clippy::cast_possible_truncation, missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;

use vstor_mem::GuestMemory;

use crate::{QueueParams, RingAddrs};

pub fn w16(m: &GuestMemory, gpa: u64, v: u16) {
    m.write(gpa, &v.to_le_bytes()).unwrap();
}
pub fn r16(m: &GuestMemory, gpa: u64) -> u16 {
    let mut b = [0u8; 2];
    m.read(gpa, &mut b).unwrap();
    u16::from_le_bytes(b)
}
pub fn r32(m: &GuestMemory, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    m.read(gpa, &mut b).unwrap();
    u32::from_le_bytes(b)
}
pub fn desc_bytes(addr: u64, len: u32, a: u16, b: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&a.to_le_bytes());
    d[14..16].copy_from_slice(&b.to_le_bytes());
    d
}

/// A split-ring driver.
pub struct SplitDriver {
    pub m: Arc<GuestMemory>,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub used_seen: u16,
}

impl SplitDriver {
    pub fn new(m: Arc<GuestMemory>, size: u16) -> Self {
        Self::new_at(m, size, 0x1000)
    }

    /// Rings laid out from `desc` (16-aligned): table, available ring, used ring (page-aligned).
    pub fn new_at(m: Arc<GuestMemory>, size: u16, desc: u64) -> Self {
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        Self { m, size, desc, avail, used, avail_idx: 0, used_seen: 0 }
    }

    pub fn params(&self, event_idx: bool, indirect: bool) -> QueueParams {
        QueueParams {
            size: self.size,
            addrs: RingAddrs { desc: self.desc, driver: self.avail, device: self.used },
            packed: false,
            event_idx,
            indirect,
            base: 0,
        }
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.m.write(self.desc + 16 * u64::from(i), &desc_bytes(addr, len, flags, next)).unwrap();
    }

    /// Writes a chain into descriptors `first..` and makes it available.
    pub fn add(&mut self, first: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let mut flags = if write { 2 } else { 0 };
            if k + 1 < bufs.len() {
                flags |= 1;
            }
            self.set_desc(i, addr, len, flags, i + 1);
        }
        self.publish(first);
        first
    }

    pub fn publish(&mut self, head: u16) {
        w16(&self.m, self.avail + 4 + 2 * u64::from(self.avail_idx % self.size), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(&self.m, self.avail + 2, self.avail_idx);
    }

    pub fn used(&mut self) -> Vec<(u32, u32)> {
        let idx = r16(&self.m, self.used + 2);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            out.push((r32(&self.m, e), r32(&self.m, e + 4)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A packed-ring driver.
pub struct PackedDriver {
    pub m: Arc<GuestMemory>,
    pub size: u16,
    pub desc: u64,
    pub drv: u64,
    pub dev: u64,
    pub next: u16,
    pub wrap: bool,
    pub used_next: u16,
    pub used_wrap: bool,
    pub chain_len: HashMap<u16, u16>,
}

impl PackedDriver {
    pub fn new(m: Arc<GuestMemory>, size: u16) -> Self {
        Self::new_at(m, size, 0x2000)
    }

    /// Rings laid out from `desc` (16-aligned): descriptor ring, then the driver and device event
    /// suppression areas.
    pub fn new_at(m: Arc<GuestMemory>, size: u16, desc: u64) -> Self {
        Self {
            m,
            size,
            desc,
            drv: desc + 16 * u64::from(size),
            dev: desc + 16 * u64::from(size) + 4,
            next: 0,
            wrap: true,
            used_next: 0,
            used_wrap: true,
            chain_len: HashMap::new(),
        }
    }

    pub fn params(&self, event_idx: bool, indirect: bool) -> QueueParams {
        QueueParams {
            size: self.size,
            addrs: RingAddrs { desc: self.desc, driver: self.drv, device: self.dev },
            packed: true,
            event_idx,
            indirect,
            base: 1 << 15,
        }
    }

    pub fn avail_flags(&self, wrap: bool) -> u16 {
        if wrap {
            1 << 7
        } else {
            1 << 15
        }
    }

    /// Writes the chain (head last) with buffer id `id`.
    pub fn add(&mut self, id: u16, bufs: &[(u64, u32, u16)]) {
        let (start, start_wrap) = (self.next, self.wrap);
        let mut slots = Vec::new();
        for (k, &(addr, len, extra)) in bufs.iter().enumerate() {
            let mut flags = extra | self.avail_flags(self.wrap);
            if k + 1 < bufs.len() {
                flags |= 1;
            }
            slots.push((self.next, desc_bytes(addr, len, id, flags)));
            self.next += 1;
            if self.next == self.size {
                self.next = 0;
                self.wrap = !self.wrap;
            }
        }
        for (slot, bytes) in slots.iter().rev() {
            self.m.write(self.desc + 16 * u64::from(*slot), bytes).unwrap();
        }
        let _ = (start, start_wrap);
        self.chain_len.insert(id, bufs.len() as u16);
    }

    pub fn used(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        loop {
            let d = self.desc + 16 * u64::from(self.used_next);
            let flags = r16(&self.m, d + 14);
            let a = flags & (1 << 7) != 0;
            let u = flags & (1 << 15) != 0;
            if !(a == self.used_wrap && u == self.used_wrap) {
                return out;
            }
            let id = r16(&self.m, d + 12);
            out.push((id, r32(&self.m, d + 8)));
            let n = self.chain_len[&id];
            self.used_next += n;
            if self.used_next >= self.size {
                self.used_next -= self.size;
                self.used_wrap = !self.used_wrap;
            }
        }
    }
}
