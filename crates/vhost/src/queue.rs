//! The reactor side of one virtqueue: a poller that takes chains from the ring, hands them to a
//! device handler (virtio-blk, virtio-scsi), and returns them when the device completes them.
//!
//! Everything here lives on the queue's reactor. The control thread reaches it only through
//! reactor messages (memory-table swap, fd changes, stop), applied between polls.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use vstor_bdev::{IoResult, IoSink};
use vstor_mem::GuestMemory;
use vstor_reactor::{clock, EpollHandle, PollStatus, Poller};
use vstor_virtio::{DescChain, PopError, QueueParams, Virtqueue};

/// Chains taken per poll, so one busy queue cannot starve the others on its reactor.
pub const POLL_BUDGET: usize = 128;

/// SPDK-style interrupt coalescing settings of a controller, shared by its queues.
#[derive(Debug, Default)]
pub struct Coalescing {
    pub delay_base_us: AtomicU32,
    pub iops_threshold: AtomicU32,
}

/// Sets `O_NONBLOCK` on an fd received from the frontend, so draining it never blocks.
pub fn set_nonblocking(f: &File) {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl with F_GETFL/F_SETFL on an fd we own; no memory is passed.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

/// Signals an eventfd.
pub fn signal_fd(f: &File) {
    // A full counter (EAGAIN) still means "signalled"; other errors are the frontend's problem.
    let _ = (&*f).write(&1u64.to_ne_bytes());
}

/// Reads an eventfd's counter to zero (it is non-blocking).
pub fn drain_fd(f: &File) {
    let mut b = [0u8; 8];
    let _ = (&*f).read(&mut b);
}

/// Generic per-queue state the device handlers use.
pub struct QueueCore {
    pub vq: Virtqueue,
    pub index: u16,
    /// Controller name, for logs.
    pub name: Arc<str>,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    epoll: EpollHandle,
    inflight: usize,
    /// Of `inflight`, buffers the device holds on purpose (virtio-scsi event buffers waiting for
    /// an event): a stop does not wait for them.
    parked: usize,
    need_call: bool,
    broken: bool,
    stopping: bool,
    drained: Option<Sender<()>>,
    coalescing: Arc<Coalescing>,
    /// Coalescing window start and the next allowed interrupt, in clock ticks.
    window_start: u64,
    window_done: u64,
    irq_delay: u64,
    next_call: u64,
    /// Memory snapshots replaced while requests taken under them were in flight: each is kept
    /// mapped until those requests have completed (not until the queue is idle, which a busy
    /// queue never is). At most one per request in flight.
    retired_mem: Vec<Retired>,
    /// Which snapshot requests taken now point into (counts memory-table changes).
    mem_epoch: u32,
    /// Requests taken under the current snapshot and not yet completed.
    epoch_inflight: usize,
    /// The snapshot each head in flight was taken under (indexed by head).
    head_epoch: Vec<u32>,
    /// Ring layout (to find the status byte of a chain refused as malformed).
    params: QueueParams,
    /// Heads a previous device instance left in flight, to process before new requests.
    resubmit: VecDeque<u16>,
    /// Keeps the in-flight region mapped while the ring records into it.
    _inflight: Option<Arc<InflightMap>>,
    /// Migration dirty log, while the frontend asks for logging (VHOST_F_LOG_ALL).
    dirty: Option<Arc<vstor_mem::DirtyLog>>,
    /// Requests completed on this queue.
    pub completed: u64,
}

/// A memory snapshot replaced while requests taken under it were in flight.
struct Retired {
    epoch: u32,
    mem: Arc<GuestMemory>,
    /// Of those requests, how many have not completed.
    pending: usize,
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Descriptor `i` of the table at `table`, read by copy: (address, length, flags, next).
fn read_desc(mem: &GuestMemory, table: u64, i: u32) -> Option<(u64, u32, u16, u16)> {
    let at = table.checked_add(u64::from(i).checked_mul(16)?)?;
    let mut b = [0u8; 16];
    mem.read(at, &mut b).ok()?;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    Some((
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        u16_at(12),
        u16_at(14),
    ))
}

/// The final descriptor (address, length) of the split-ring chain at `head`, if the walk reaches
/// one under the same rules as the virtqueue (indices in range, no longer than the table, one
/// level of indirection) and it is device-writable.
fn final_writable(mem: &GuestMemory, p: &QueueParams, head: u16) -> Option<(u64, u32)> {
    if p.packed {
        return None;
    }
    let (mut table, mut n, mut i) = (p.addrs.desc, u32::from(p.size), u32::from(head));
    let mut indirect = false;
    let mut steps = 0u32;
    loop {
        if i >= n || steps >= n {
            return None;
        }
        steps += 1;
        let (addr, len, flags, next) = read_desc(mem, table, i)?;
        if flags & F_INDIRECT != 0 {
            if indirect
                || !p.indirect
                || flags & F_NEXT != 0
                || len == 0
                || !len.is_multiple_of(16)
                || len / 16 > vstor_virtio::MAX_INDIRECT
            {
                return None;
            }
            (table, n, i, steps, indirect) = (addr, len / 16, 0, 0, true);
            continue;
        }
        if flags & F_NEXT == 0 {
            return (flags & F_WRITE != 0 && len > 0).then_some((addr, len));
        }
        i = u32::from(next);
    }
}

impl QueueCore {
    /// Counts chain `head` as taken (the handler must then complete it).
    fn took(&mut self, head: u16) {
        self.inflight += 1;
        // The virtqueue refuses a head already in flight, so a queue never has more requests
        // out than entries; should that ever fail, stop this queue rather than take more.
        if self.inflight > usize::from(self.vq.size()) {
            let why = format!("{} requests in flight on a queue of {} entries", self.inflight, self.vq.size());
            self.mark_broken(&why);
        }
        if let Some(e) = self.head_epoch.get_mut(usize::from(head)) {
            *e = self.mem_epoch;
        }
        self.epoch_inflight += 1;
    }

    /// Chain `head` completed: releases the replaced memory snapshot it pointed into once no
    /// other request does.
    fn release_epoch(&mut self, head: u16) {
        let epoch = self.head_epoch.get(usize::from(head)).copied().unwrap_or(self.mem_epoch);
        if epoch == self.mem_epoch {
            self.epoch_inflight = self.epoch_inflight.saturating_sub(1);
        } else if let Some(i) = self.retired_mem.iter().position(|r| r.epoch == epoch) {
            let r = &mut self.retired_mem[i];
            r.pending = r.pending.saturating_sub(1);
            if r.pending == 0 {
                self.retired_mem.swap_remove(i);
            }
        }
    }

    /// For a chain refused as malformed (a buffer outside guest memory, say): its last byte, if
    /// the chain ends in a device-writable descriptor whose last byte is in guest memory. That is
    /// where a virtio-blk driver looks for the status, so it can be told about the error rather
    /// than find whatever the byte held. Split rings only.
    pub fn bad_chain_last_byte(&self, head: u16) -> Option<vstor_bdev::IoVecs> {
        let mem = self.vq.memory();
        let (addr, len) = final_writable(mem, &self.params, head)?;
        let last = addr.checked_add(u64::from(len) - 1)?;
        let mut iov = vstor_bdev::IoVecs::new();
        mem.append_iovecs(last, 1, &mut iov).ok()?;
        Some(iov)
    }

    /// Returns chain `head` (using `ndesc` ring slots) with `len` bytes written to the driver.
    pub fn complete(&mut self, head: u16, ndesc: u16, len: u32) {
        self.vq.push_used(head, ndesc, len);
        self.inflight = self.inflight.saturating_sub(1);
        self.completed += 1;
        self.window_done += 1;
        self.need_call = true;
        self.release_epoch(head);
        if self.inflight <= self.parked && self.stopping {
            if let Some(tx) = self.drained.take() {
                let _ = tx.send(());
            }
        }
    }

    /// Marks, in the migration dirty log if one is active, the guest pages of buffers the device
    /// wrote. Free when logging is off.
    #[inline]
    pub fn mark_written(&self, iovs: &vstor_bdev::IoVecs) {
        if let Some(log) = &self.dirty {
            self.vq.memory().mark_dirty(log, iovs);
            for r in &self.retired_mem {
                r.mem.mark_dirty(log, iovs);
            }
        }
    }

    /// The handler keeps the chain it was just given (an event buffer): it does not count as work
    /// a stop must wait for.
    pub fn park(&mut self) {
        self.parked += 1;
    }

    /// A parked chain is about to be completed.
    pub fn unpark(&mut self) {
        self.parked = self.parked.saturating_sub(1);
    }

    /// Requests taken and not yet returned.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// The memory snapshot chains point into; requests keep a clone while in flight.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.vq.memory()
    }

    /// Stops processing and tells the frontend (its error eventfd makes QEMU flag the device as
    /// needing reset).
    pub fn mark_broken(&mut self, why: &dyn std::fmt::Display) {
        if !self.broken {
            tracing::warn!(ctrlr = %self.name, queue = self.index, "virtqueue broken: {why}");
            self.broken = true;
            if let Some(e) = &self.err {
                signal_fd(e);
            }
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn update_coalescing(&mut self, now: u64) {
        let elapsed = now.wrapping_sub(self.window_start);
        let window = clock::duration_to_ticks(Duration::from_millis(10));
        if elapsed < window {
            return;
        }
        let base = u64::from(self.coalescing.delay_base_us.load(Ordering::Relaxed));
        let threshold = u64::from(self.coalescing.iops_threshold.load(Ordering::Relaxed));
        let elapsed_us = (clock::ticks_to_ns(elapsed) / 1000).max(1);
        let iops = self.window_done.saturating_mul(1_000_000) / elapsed_us;
        self.irq_delay = if base > 0 && threshold > 0 && iops > threshold {
            // SPDK's rule: the delay grows with how far the rate is above the threshold.
            let us = base.saturating_mul(iops - threshold) / threshold;
            clock::duration_to_ticks(Duration::from_micros(us.min(base.saturating_mul(10))))
        } else {
            0
        };
        self.window_start = now;
        self.window_done = 0;
    }

    /// Sends the interrupt the driver asked for, unless coalescing holds it back for now.
    /// Returns true if an interrupt is still owed.
    fn maybe_call(&mut self) -> bool {
        if !self.need_call {
            return false;
        }
        let now = clock::ticks();
        self.update_coalescing(now);
        if self.irq_delay != 0 && now < self.next_call {
            return true;
        }
        self.need_call = false;
        if self.vq.needs_call() {
            if let Some(c) = &self.call {
                signal_fd(c);
            }
            self.next_call = now + self.irq_delay;
        }
        false
    }
}

/// Device-specific request processing.
pub trait QueueHandler: Any {
    /// A new request. The handler completes it with [`QueueCore::complete`], now or later.
    fn handle(&mut self, core: &mut QueueCore, chain: DescChain, me: &Rc<QueueCell>);

    /// A bdev I/O submitted with `me` as sink completed.
    fn io_done(&mut self, core: &mut QueueCore, tag: u64, result: IoResult);

    /// A SCSI command submitted with `me` as sink completed.
    fn task_done(&mut self, core: &mut QueueCore, tag: u64, result: vstor_scsi::TaskResult) {
        let _ = (tag, result);
        tracing::error!(ctrlr = %core.name, "unexpected SCSI completion on a non-SCSI queue");
    }

    /// A chain too malformed to parse: return it with nothing written.
    fn bad_chain(&mut self, core: &mut QueueCore, head: u16, ndesc: u16) {
        core.complete(head, ndesc, 0);
    }
}

/// Queue state, shared between the poller and in-flight I/O callbacks (same reactor).
pub struct QueueState {
    pub core: QueueCore,
    pub handler: Box<dyn QueueHandler>,
}

/// The `Rc` target that bdev completions call into.
pub struct QueueCell(pub RefCell<QueueState>);

impl IoSink for QueueCell {
    fn io_done(&self, tag: u64, result: IoResult) {
        let mut st = self.0.borrow_mut();
        let QueueState { core, handler } = &mut *st;
        handler.io_done(core, tag, result);
    }
}

impl vstor_scsi::TaskSink for QueueCell {
    fn task_done(&self, tag: u64, result: vstor_scsi::TaskResult) {
        let mut st = self.0.borrow_mut();
        let QueueState { core, handler } = &mut *st;
        handler.task_done(core, tag, result);
    }
}

/// The shared in-flight region a frontend handed over (GET/SET_INFLIGHT_FD): one mapping for
/// all queues of a connection, kept alive by every queue that records into it.
pub struct InflightMap {
    pub region: vstor_mem::Region,
    /// Bytes per queue.
    pub per_queue: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// What the control thread gives the reactor to start a queue.
pub struct QueueStart {
    pub params: QueueParams,
    pub mem: Arc<GuestMemory>,
    pub index: u16,
    pub name: Arc<str>,
    pub kick: Option<File>,
    pub call: Option<File>,
    pub err: Option<File>,
    pub coalescing: Arc<Coalescing>,
    /// In-flight tracking for this queue, if the frontend set up the region.
    pub inflight: Option<Arc<InflightMap>>,
    /// Negotiated features (recorded in the in-flight region).
    pub features: u64,
    /// Dirty log and the guest address to log used-ring writes at, if logging is on.
    pub dirty: Option<(Arc<vstor_mem::DirtyLog>, u64)>,
}

/// The poller registered on the queue's reactor.
pub struct VirtqPoller {
    cell: Rc<QueueCell>,
    kick_fd: Option<RawFd>,
}

impl VirtqPoller {
    /// Builds the queue (validating the rings) with `handler`; registers the kick fd for wake-ups.
    pub fn new(
        s: QueueStart,
        handler: Box<dyn QueueHandler>,
        epoll: EpollHandle,
    ) -> Result<Self, vstor_virtio::QueueError> {
        let mut vq = Virtqueue::new(&s.params, s.mem)?;
        let params = s.params;
        let mut resubmit = VecDeque::new();
        let mut inflight_map = None;
        if let Some(map) = s.inflight {
            let i = usize::from(s.index);
            if i >= usize::from(map.num_queues) || map.queue_size != s.params.size {
                tracing::warn!(ctrlr = %s.name, queue = i, "in-flight region does not cover this queue; not tracking");
            } else {
                let off = usize::try_from(map.per_queue).unwrap_or(0) * i;
                // SAFETY: `off + per_queue <= region.size` (checked when the region was mapped:
                // per_queue = queue_region_size(queue_size) bytes per queue, num_queues queues,
                // and i < num_queues); the region is page-aligned so `off` (a multiple of 64)
                // keeps 8-byte alignment; `inflight_map` below keeps the mapping alive as long as
                // the queue.
                let region =
                    unsafe { vstor_virtio::inflight::QueueRegion::new(map.region.host().add(off), s.params.size) };
                match vq.attach_inflight(region, s.features) {
                    Ok(heads) => {
                        tracing::debug!(ctrlr = %s.name, queue = i, n = heads.len(), base = vq.base(), "in-flight region attached");
                        if vq.base() != s.params.base {
                            // A packed ring after a crash (the frontend's base is stale), or a
                            // split ring resuming after the requests it resubmits.
                            tracing::info!(ctrlr = %s.name, queue = i, frontend_base = s.params.base, base = vq.base(),
                                "ring resumes where the in-flight region says, not at the frontend's base");
                        }
                        if !heads.is_empty() {
                            tracing::info!(ctrlr = %s.name, queue = i, n = heads.len(),
                                "resubmitting requests left in flight by the previous backend");
                        }
                        resubmit = heads.into();
                        inflight_map = Some(map);
                    }
                    Err(e) => tracing::warn!(ctrlr = %s.name, queue = i, "in-flight region ignored: {e}"),
                }
            }
        }
        for f in [&s.kick, &s.call, &s.err].into_iter().flatten() {
            set_nonblocking(f);
        }
        let kick_fd = s.kick.as_ref().map(|k| k.as_raw_fd());
        if let Some(fd) = kick_fd {
            if let Err(e) = epoll.add(fd) {
                tracing::warn!(ctrlr = %s.name, queue = s.index, "cannot watch kick fd: {e}");
            }
        }
        let now = clock::ticks();
        let core = QueueCore {
            vq,
            index: s.index,
            name: s.name,
            kick: s.kick,
            call: s.call,
            err: s.err,
            epoll,
            inflight: 0,
            parked: 0,
            need_call: false,
            broken: false,
            stopping: false,
            drained: None,
            coalescing: s.coalescing,
            window_start: now,
            window_done: 0,
            irq_delay: 0,
            next_call: now,
            retired_mem: Vec::new(),
            mem_epoch: 0,
            epoch_inflight: 0,
            head_epoch: vec![0; usize::from(params.size)],
            params,
            resubmit,
            _inflight: inflight_map,
            dirty: None,
            completed: 0,
        };
        let cell = Rc::new(QueueCell(RefCell::new(QueueState { core, handler })));
        let mut p = Self { cell, kick_fd };
        p.set_dirty_log(s.dirty);
        Ok(p)
    }

    /// Switches to a new memory table. In-flight requests keep the old snapshot alive.
    pub fn set_memory(&mut self, mem: Arc<GuestMemory>) {
        let mut st = self.cell.0.borrow_mut();
        let core = &mut st.core;
        if core.epoch_inflight > 0 {
            // Requests in flight point into the old snapshot: keep it mapped until they finish.
            let old = core.vq.memory().clone();
            core.retired_mem.push(Retired { epoch: core.mem_epoch, mem: old, pending: core.epoch_inflight });
        }
        core.mem_epoch = core.mem_epoch.wrapping_add(1);
        core.epoch_inflight = 0;
        if let Err(e) = core.vq.set_memory(mem) {
            core.mark_broken(&e);
        }
    }

    /// Starts or stops migration dirty logging.
    pub fn set_dirty_log(&mut self, log: Option<(Arc<vstor_mem::DirtyLog>, u64)>) {
        let mut st = self.cell.0.borrow_mut();
        st.core.dirty = log.as_ref().map(|(l, _)| l.clone());
        st.core.vq.set_dirty_log(log);
    }

    /// Replaces the call (interrupt) eventfd. The new one is signalled once: an interrupt sent
    /// on the old fd while the frontend was switching (QEMU does at every vector unmask) would
    /// otherwise be lost, and with EVENT_IDX the driver would then never be interrupted again.
    /// A spurious interrupt costs the driver one look at the used ring.
    pub fn set_call(&mut self, call: Option<File>) {
        if let Some(f) = &call {
            set_nonblocking(f);
            signal_fd(f);
        }
        self.cell.0.borrow_mut().core.call = call;
    }

    /// Replaces the error eventfd.
    pub fn set_err(&mut self, err: Option<File>) {
        if let Some(f) = &err {
            set_nonblocking(f);
        }
        self.cell.0.borrow_mut().core.err = err;
    }

    /// Replaces the kick eventfd (None: the frontend wants the device to poll).
    pub fn set_kick(&mut self, kick: Option<File>) {
        let mut st = self.cell.0.borrow_mut();
        if let Some(fd) = self.kick_fd.take() {
            st.core.epoll.remove(fd);
        }
        if let Some(f) = &kick {
            set_nonblocking(f);
            if st.core.epoll.add(f.as_raw_fd()).is_ok() {
                self.kick_fd = Some(f.as_raw_fd());
            }
        }
        st.core.kick = kick;
    }

    /// Stops taking new requests; `drained` fires once nothing is in flight.
    pub fn begin_stop(&mut self, drained: Sender<()>) {
        let mut st = self.cell.0.borrow_mut();
        st.core.stopping = true;
        if st.core.inflight <= st.core.parked {
            let _ = drained.send(());
        } else {
            st.core.drained = Some(drained);
        }
    }

    /// The ring position to resume from (GET_VRING_BASE).
    pub fn base(&self) -> u32 {
        self.cell.0.borrow().core.vq.base()
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.cell.0.borrow().core.inflight
    }

    /// Requests completed.
    pub fn completed(&self) -> u64 {
        self.cell.0.borrow().core.completed
    }

    /// Runs `f` on the device handler (e.g. to deliver a hot-plug event).
    pub fn with_handler<R>(&mut self, f: impl FnOnce(&mut QueueCore, &mut dyn QueueHandler, &Rc<QueueCell>) -> R) -> R {
        let cell = self.cell.clone();
        let mut st = cell.0.borrow_mut();
        let QueueState { core, handler } = &mut *st;
        f(core, handler.as_mut(), &cell)
    }
}

impl Drop for VirtqPoller {
    fn drop(&mut self) {
        if let Some(fd) = self.kick_fd.take() {
            self.cell.0.borrow().core.epoll.remove(fd);
        }
    }
}

impl Poller for VirtqPoller {
    fn poll(&mut self) -> PollStatus {
        let cell = &self.cell;
        let mut st = cell.0.borrow_mut();
        let QueueState { core, handler } = &mut *st;
        if core.broken {
            return PollStatus::Idle;
        }
        let mut taken = 0;
        while let Some(head) = core.resubmit.pop_front() {
            match core.vq.resubmit(head) {
                Ok(chain) => {
                    core.took(chain.head);
                    handler.handle(core, chain, cell);
                }
                Err(PopError::Chain { head, ndesc, kind }) => {
                    tracing::debug!(ctrlr = %core.name, queue = core.index, head, "bad resubmitted chain: {kind}");
                    core.took(head);
                    handler.bad_chain(core, head, ndesc);
                }
                Err(PopError::Fatal(f)) => {
                    core.mark_broken(&f);
                    return PollStatus::Idle;
                }
            }
            taken += 1;
        }
        if !core.stopping {
            while taken < POLL_BUDGET && !core.broken {
                match core.vq.pop() {
                    None => break,
                    Some(Ok(chain)) => {
                        core.took(chain.head);
                        handler.handle(core, chain, cell);
                    }
                    Some(Err(PopError::Chain { head, ndesc, kind })) => {
                        tracing::debug!(ctrlr = %core.name, queue = core.index, head, "bad descriptor chain: {kind}");
                        core.took(head);
                        handler.bad_chain(core, head, ndesc);
                    }
                    Some(Err(PopError::Fatal(f))) => {
                        core.mark_broken(&f);
                        break;
                    }
                }
                taken += 1;
            }
        }
        let owed = core.maybe_call();
        PollStatus::from_work(taken > 0 || owed)
    }

    fn arm(&mut self) -> bool {
        let mut st = self.cell.0.borrow_mut();
        let core = &mut st.core;
        if core.broken {
            return false;
        }
        if let Some(k) = &core.kick {
            drain_fd(k);
        } else {
            // No kick fd: the frontend expects the device to poll, so never sleep on this queue.
            return true;
        }
        if core.stopping {
            return core.need_call;
        }
        core.vq.enable_kicks() || core.need_call
    }

    fn disarm(&mut self) {
        let mut st = self.cell.0.borrow_mut();
        if !st.core.broken && !st.core.stopping {
            st.core.vq.disable_kicks();
        }
    }

    fn name(&self) -> &str {
        "virtqueue"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vstor_mem::{memfd, Region};
    use vstor_virtio::RingAddrs;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    }

    #[test]
    fn the_last_writable_descriptor_of_a_chain_is_found_under_the_ring_rules() {
        let f = memfd("t", 1 << 20).unwrap();
        let mem = GuestMemory::new(vec![Region::map(&f, 0, 1 << 20, 0, 0).unwrap()]).unwrap();
        let p = QueueParams {
            size: 8,
            addrs: RingAddrs { desc: 0x1000, driver: 0x2000, device: 0x3000 },
            packed: false,
            event_idx: false,
            indirect: true,
            base: 0,
        };
        let set = |i: u64, d: [u8; 16]| mem.write(0x1000 + 16 * i, &d).unwrap();
        // 0 -> 1 -> 2 (writable, 1 byte at 0x9000).
        set(0, desc(0x8000, 16, F_NEXT, 1));
        set(1, desc(0x1_0000_0000, 512, F_NEXT | F_WRITE, 2));
        set(2, desc(0x9000, 1, F_WRITE, 0));
        assert_eq!(final_writable(&mem, &p, 0), Some((0x9000, 1)));
        // A read-only last descriptor: no status byte.
        set(3, desc(0x8000, 16, 0, 0));
        assert_eq!(final_writable(&mem, &p, 3), None);
        // A loop, and a next index out of range.
        set(4, desc(0x8000, 16, F_NEXT, 5));
        set(5, desc(0x9000, 1, F_WRITE | F_NEXT, 4));
        assert_eq!(final_writable(&mem, &p, 4), None);
        set(6, desc(0x8000, 16, F_NEXT, 200));
        assert_eq!(final_writable(&mem, &p, 6), None);
        // Indirect: a table of two ending in a writable byte; nested tables are not followed.
        mem.write(0x4000, &[desc(0x8000, 16, F_NEXT, 1), desc(0x9100, 4, F_WRITE, 0)].concat()).unwrap();
        set(7, desc(0x4000, 32, F_INDIRECT, 0));
        assert_eq!(final_writable(&mem, &p, 7), Some((0x9100, 4)));
        mem.write(0x5000, &desc(0x4000, 32, F_INDIRECT, 0)).unwrap();
        set(7, desc(0x5000, 16, F_INDIRECT, 0));
        assert_eq!(final_writable(&mem, &p, 7), None);
        // A table outside memory, or of a bad length.
        set(7, desc(1 << 30, 32, F_INDIRECT, 0));
        assert_eq!(final_writable(&mem, &p, 7), None);
        set(7, desc(0x4000, 24, F_INDIRECT, 0));
        assert_eq!(final_writable(&mem, &p, 7), None);
        assert_eq!(final_writable(&mem, &QueueParams { indirect: false, ..p }, 0), Some((0x9000, 1)));
        assert_eq!(final_writable(&mem, &QueueParams { packed: true, ..p }, 0), None);
        assert_eq!(final_writable(&mem, &p, 8), None, "head out of range");
    }
}
