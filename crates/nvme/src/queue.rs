//! Submission and completion queue rings in guest memory, shared by the admin queue and the I/O
//! queue groups, and doorbell reads (BAR0 doorbell page or shadow doorbell buffer).

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vstor_mem::GuestMemory;

use crate::guest::GuestPtr;
use crate::pci::Interrupts;
use crate::spec::{Command, Completion, CQE_SIZE, SQE_SIZE};
use crate::sys::DoorbellPage;

/// Doorbell index of SQ `qid`'s tail (CAP.DSTRD = 0).
pub(crate) fn sq_db(qid: u16) -> usize {
    2 * usize::from(qid)
}

/// Doorbell index of CQ `qid`'s head.
pub(crate) fn cq_db(qid: u16) -> usize {
    2 * usize::from(qid) + 1
}

/// EventIdx value written while a queue is polled: the host then rings BAR0 only when its index
/// wraps past it, which costs nearly nothing.
pub(crate) const EVENTIDX_POLL: u32 = u32::MAX;

/// The host's shadow doorbell and EventIdx buffers (Doorbell Buffer Config), one memory page each.
pub(crate) struct ShadowBufs {
    pub db_gpa: u64,
    pub ei_gpa: u64,
    pub page: u64,
    db: Option<GuestPtr>,
    ei: Option<GuestPtr>,
}

impl ShadowBufs {
    /// Translates both buffers; `None` if either is not in guest memory.
    pub fn new(mem: &Arc<GuestMemory>, db_gpa: u64, ei_gpa: u64, page: u64) -> Option<ShadowBufs> {
        let mut s = ShadowBufs { db_gpa, ei_gpa, page, db: None, ei: None };
        s.remap(mem);
        (s.db.is_some() && s.ei.is_some()).then_some(s)
    }

    /// Re-translates after a memory change; unmapped buffers read as "no change".
    pub fn remap(&mut self, mem: &Arc<GuestMemory>) {
        self.db = GuestPtr::new(mem, self.db_gpa, self.page);
        self.ei = GuestPtr::new(mem, self.ei_gpa, self.page);
    }

    pub fn read(&self, index: usize) -> Option<u32> {
        let v = self.db.as_ref()?.read_u32(index.checked_mul(4)?);
        // The queue entries the host wrote before updating the shadow doorbell must be visible.
        fence(Ordering::Acquire);
        v
    }

    pub fn write_db(&self, index: usize, v: u32) {
        if let (Some(db), Some(off)) = (self.db.as_ref(), index.checked_mul(4)) {
            db.write_u32(off, v);
        }
    }

    pub fn write_eventidx(&self, index: usize, v: u32) {
        if let (Some(ei), Some(off)) = (self.ei.as_ref(), index.checked_mul(4)) {
            ei.write_u32(off, v);
        }
    }
}

/// Reads doorbell `index` from the shadow buffer when the queue uses it, else from BAR0.
pub(crate) fn read_doorbell(page: &DoorbellPage, shadow: Option<&ShadowBufs>, index: usize) -> Option<u32> {
    match shadow {
        Some(s) => s.read(index),
        None => Some(page.load(index)),
    }
}

/// A completion queue.
pub(crate) struct Cq {
    /// Entries (2..=65536).
    pub size: u32,
    pub gpa: u64,
    ring: Option<GuestPtr>,
    pub tail: u32,
    phase: bool,
    pub head: u32,
    pub ien: bool,
    pub iv: u16,
    /// Completions waiting for room in the ring (bounded by the commands outstanding on the
    /// submission queues that use this CQ).
    pub backlog: VecDeque<Completion>,
    /// Entries posted since the last interrupt, and when the first of them was posted.
    pub unsignaled: u32,
    pub since: Option<Instant>,
    /// Counted as an INTx source (MSI-X off, unacknowledged entries signalled).
    pub intx_source: bool,
    /// Reads its head from the shadow doorbell buffer.
    pub shadow: bool,
    /// An invalid head doorbell was seen; the queue is dead until deleted or reset.
    pub broken: bool,
}

impl Cq {
    pub fn new(gpa: u64, size: u32, ien: bool, iv: u16, mem: &Arc<GuestMemory>) -> Option<Cq> {
        let ring = GuestPtr::new(mem, gpa, u64::from(size) * CQE_SIZE)?;
        Some(Cq {
            size,
            gpa,
            ring: Some(ring),
            tail: 0,
            phase: true,
            head: 0,
            ien,
            iv,
            backlog: VecDeque::new(),
            unsignaled: 0,
            since: None,
            intx_source: false,
            shadow: false,
            broken: false,
        })
    }

    /// Re-translates the ring after a memory change (unmapped: completions wait in the backlog).
    pub fn remap(&mut self, mem: &Arc<GuestMemory>) {
        self.ring = GuestPtr::new(mem, self.gpa, u64::from(self.size) * CQE_SIZE);
    }

    /// Entries posted and not yet consumed by the host.
    pub fn outstanding(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Applies a head doorbell value. `Err` if it is out of range or moves past the tail.
    pub fn set_head(&mut self, h: u32) -> Result<bool, ()> {
        if h >= self.size {
            return Err(());
        }
        let consumed = (h + self.size - self.head) % self.size;
        if consumed > self.outstanding() {
            return Err(());
        }
        let changed = h != self.head;
        self.head = h;
        Ok(changed)
    }

    /// Raises this queue's interrupt for the entries posted since the last one: its MSI-X vector,
    /// or (MSI-X off) makes it an INTx source until the host consumes the entries.
    pub fn raise(&mut self, irq: &Interrupts) {
        self.unsignaled = 0;
        self.since = None;
        if !self.ien {
            return;
        }
        if !irq.signal(self.iv) && !self.intx_source && self.outstanding() > 0 {
            self.intx_source = true;
            irq.intx_source(true);
        }
    }

    /// Stops being an INTx source once the host has consumed every entry.
    pub fn update_intx(&mut self, irq: &Interrupts) {
        if self.intx_source && self.outstanding() == 0 {
            self.intx_source = false;
            irq.intx_source(false);
        }
    }

    /// Stops being an INTx source (queue deleted).
    pub fn release_intx(&mut self, irq: &Interrupts) {
        if self.intx_source {
            self.intx_source = false;
            irq.intx_source(false);
        }
    }

    fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }

    /// Posts `c`, or queues it if the ring is full (or unmapped).
    pub fn post(&mut self, c: Completion) {
        if !self.backlog.is_empty() || !self.try_write(&c) {
            self.backlog.push_back(c);
        }
    }

    /// Moves backlogged completions into the ring while there is room. Returns how many moved.
    pub fn flush_backlog(&mut self) -> usize {
        let mut n = 0;
        while let Some(c) = self.backlog.front().copied() {
            if !self.try_write(&c) {
                break;
            }
            self.backlog.pop_front();
            n += 1;
        }
        n
    }

    fn try_write(&mut self, c: &Completion) -> bool {
        if self.full() {
            return false;
        }
        let Some(ring) = self.ring.as_ref() else { return false };
        let off = usize::try_from(u64::from(self.tail) * CQE_SIZE).unwrap_or(usize::MAX);
        let dw3 = u32::from(c.cid) | (u32::from(self.phase) << 16) | (c.status & !0x1_ffff);
        let ok = ring.write_u32(off, c.dw0)
            && ring.write_u32(off + 4, 0)
            && ring.write_u32(off + 8, u32::from(c.sqhd) | (u32::from(c.sqid) << 16));
        // The host reads the phase tag first: the rest of the entry must be visible before it.
        fence(Ordering::Release);
        if !ok || !ring.write_u32(off + 12, dw3) {
            return false;
        }
        self.tail += 1;
        if self.tail == self.size {
            self.tail = 0;
            self.phase = !self.phase;
        }
        if self.unsignaled == 0 {
            self.since = Some(Instant::now());
        }
        self.unsignaled += 1;
        true
    }
}

/// A submission queue.
pub(crate) struct Sq {
    pub cqid: u16,
    pub size: u32,
    pub gpa: u64,
    ring: Option<GuestPtr>,
    pub head: u32,
    /// Reads its tail from the shadow doorbell buffer.
    pub shadow: bool,
    /// An invalid tail doorbell was seen; the queue is dead until deleted or reset.
    pub broken: bool,
    /// Unique among every SQ this controller ever created, so late completions of a deleted queue
    /// never land on a new queue with the same id.
    pub instance: u64,
    /// Commands fetched and not yet completed.
    pub inflight: u32,
}

impl Sq {
    pub fn new(cqid: u16, gpa: u64, size: u32, instance: u64, mem: &Arc<GuestMemory>) -> Option<Sq> {
        let ring = GuestPtr::new(mem, gpa, u64::from(size) * SQE_SIZE)?;
        Some(Sq { cqid, size, gpa, ring: Some(ring), head: 0, shadow: false, broken: false, instance, inflight: 0 })
    }

    pub fn remap(&mut self, mem: &Arc<GuestMemory>) {
        self.ring = GuestPtr::new(mem, self.gpa, u64::from(self.size) * SQE_SIZE);
    }

    pub fn mapped(&self) -> bool {
        self.ring.is_some()
    }

    /// Copies the entry at the head out of the ring and advances the head, if `tail` is past it.
    pub fn fetch(&mut self, tail: u32) -> Option<Command> {
        if self.head == tail {
            return None;
        }
        let ring = self.ring.as_ref()?;
        let mut b = [0u8; 64];
        let off = usize::try_from(u64::from(self.head) * SQE_SIZE).ok()?;
        if !ring.read(off, &mut b) {
            return None;
        }
        self.head = (self.head + 1) % self.size;
        Some(Command::from_bytes(&b))
    }
}
