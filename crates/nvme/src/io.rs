//! I/O queue groups: one poller per reactor per controller, owning the I/O queue pairs placed on
//! that reactor, a bdev channel per namespace and the requests in flight.
//!
//! A pass: switch memory snapshots if the generation changed; read completion queue heads (move
//! backlogged completions into freed slots, drop INTx sources that were consumed); fetch up to
//! [`IO_BUDGET`] commands from each submission queue whose completion queue has no backlog; start
//! them (validation failures complete at once); raise interrupts (coalescing permitting).
//! Completions from the bdev layer arrive through [`IoSink::io_done`] on this reactor and are
//! posted immediately; the interrupt goes out on the next pass (`arm` keeps the reactor awake
//! until then).
//!
//! Requests carry the instance number of their submission queue: a completion for a queue that
//! was deleted (and maybe re-created with the same id) is routed to the draining copy of the old
//! queue, or dropped after a controller reset.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vstor_bdev::mem::AlignedBuf;
use vstor_bdev::{
    smallvec, BdevChannel, BdevError, BlockRange, IoCallback, IoError, IoOp, IoResult, IoSink, IoType, IoVecs, SmallVec,
};
use vstor_mem::GuestMemory;
use vstor_reactor::{EpollHandle, PollStatus, Poller, PollerId, Reactor};

use crate::admin::TeardownKind;
use crate::dptr::map_data;
use crate::identify::MAX_TRANSFER;
use crate::queue::{cq_db, read_doorbell, sq_db, Cq, ShadowBufs, Sq, EVENTIDX_POLL};
use crate::spec::*;
use crate::{lock, Inner, Namespace};

/// Commands fetched from one submission queue per pass.
pub(crate) const IO_BUDGET: u32 = 64;
/// Size of the zero buffer used when a bdev cannot write zeroes itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// Maps a bdev error to an NVMe status.
pub(crate) fn io_status(e: IoError, opc: u8) -> Status {
    match e {
        IoError::OutOfRange => SC_LBA_OUT_OF_RANGE,
        IoError::InvalidLength => SC_INTERNAL_ERROR,
        IoError::Unsupported => SC_INVALID_OPCODE,
        IoError::ReadOnly => SC_NS_WRITE_PROTECTED,
        IoError::Os(libc::ENOSPC) => SC_CAPACITY_EXCEEDED,
        IoError::Os(libc::EIO | libc::ENODATA | libc::EBADMSG) => {
            if opc == IO_READ || opc == IO_COMPARE {
                SC_UNRECOVERED_READ
            } else {
                SC_WRITE_FAULT
            }
        }
        IoError::Os(_) => SC_INTERNAL_ERROR.retryable(),
        IoError::Aborted => SC_ABORT_REQUESTED.retryable(),
        IoError::NoMemory => SC_INTERNAL_ERROR.retryable(),
    }
}

/// What a request still has to do after its current bdev operation.
enum Kind {
    Plain,
    Read {
        bytes: u64,
    },
    Write {
        bytes: u64,
    },
    /// Data read from the namespace into `buf`, compared with the host's buffer at the end.
    Compare {
        buf: AlignedBuf,
        host: IoVecs,
    },
    /// Write Zeroes: `zero` is a zero buffer when the bdev cannot write zeroes itself (then the
    /// range is written chunk by chunk from `next`); `flush` when FUA asks for durability on a bdev
    /// with a volatile cache.
    WriteZeroes {
        next: u64,
        end: u64,
        bs: u64,
        fua: bool,
        zero: Option<AlignedBuf>,
        flushed: bool,
    },
    /// The flushes of a shutdown (no completion entry).
    ShutdownFlush,
}

struct Req {
    /// Instance of the submission queue (0 for internal requests).
    instance: u64,
    sqid: u16,
    cid: u16,
    opc: u8,
    nsid: u32,
    slba: u64,
    /// Keeps the guest memory the iovecs point into mapped until the I/O is done.
    _mem: Arc<GuestMemory>,
    /// Bdev operations outstanding.
    pending: u32,
    status: Status,
    kind: Kind,
}

/// A deleted (or reset) submission queue whose commands are still in flight.
struct Draining {
    sq: Sq,
    /// Post their completions (queue deletion) or drop them (controller reset).
    post: bool,
    /// Answer the admin's Delete I/O SQ under this epoch when the last one completes.
    reply: Option<u64>,
}

struct NsChan {
    ns: Arc<Namespace>,
    chan: BdevChannel,
}

struct GroupTeardown {
    epoch: u64,
    kind: TeardownKind,
    flushing: bool,
}

/// One reactor's share of a controller's I/O queues.
pub(crate) struct Group {
    pub inner: Arc<Inner>,
    index: usize,
    me: Weak<GroupCell>,
    mem: Arc<GuestMemory>,
    mem_gen: u64,
    page: u64,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    active_sqs: Vec<u16>,
    active_cqs: Vec<u16>,
    draining: Vec<Draining>,
    ns: Vec<Option<NsChan>>,
    reqs: Vec<Option<Req>>,
    free: Vec<usize>,
    shadow: Option<ShadowBufs>,
    /// EventIdx values were set for sleeping; restore polling values on the next pass.
    eventidx_armed: bool,
    /// Commands of requests in flight for host queues.
    inflight: u32,
    /// Shutdown: fetch nothing more.
    stopped: bool,
    teardown: Option<GroupTeardown>,
    fetched: Vec<Command>,
    /// The poller was removed (controller dropped): late completions are dropped unseen.
    dead: bool,
}

fn index_of(n: u16) -> usize {
    usize::from(n)
}

impl Group {
    fn new(inner: Arc<Inner>, index: usize, me: Weak<GroupCell>) -> Group {
        let nq = usize::from(inner.cfg.max_io_queues) + 1;
        let nn = usize::try_from(inner.cfg.nn).unwrap_or(0) + 1;
        Group {
            mem: inner.memory(),
            mem_gen: inner.mem_gen.load(Ordering::SeqCst),
            inner,
            index,
            me,
            page: 4096,
            sqs: (0..nq).map(|_| None).collect(),
            cqs: (0..nq).map(|_| None).collect(),
            active_sqs: Vec::new(),
            active_cqs: Vec::new(),
            draining: Vec::new(),
            ns: (0..nn).map(|_| None).collect(),
            reqs: Vec::new(),
            free: Vec::new(),
            shadow: None,
            eventidx_armed: false,
            inflight: 0,
            stopped: false,
            teardown: None,
            fetched: Vec::with_capacity(IO_BUDGET as usize),
            dead: false,
        }
    }

    fn reply(&self, epoch: u64, r: Result<(), Status>) {
        self.inner.send_admin(move |a| a.on_reply(epoch, r));
    }

    fn refresh_mem(&mut self) {
        let gen = self.inner.mem_gen.load(Ordering::SeqCst);
        if gen == self.mem_gen {
            return;
        }
        self.mem = self.inner.memory();
        self.mem_gen = gen;
        for q in self.sqs.iter_mut().flatten() {
            q.remap(&self.mem);
        }
        for q in self.cqs.iter_mut().flatten() {
            q.remap(&self.mem);
        }
        if let Some(s) = self.shadow.as_mut() {
            s.remap(&self.mem);
        }
    }

    // ---- control plane (messages from the admin poller and the transport) ----

    #[allow(clippy::too_many_arguments)]
    pub fn create_cq(&mut self, epoch: u64, qid: u16, gpa: u64, size: u32, ien: bool, iv: u16, page: u64) {
        self.refresh_mem();
        self.page = page;
        let i = index_of(qid);
        if self.cqs.get(i).is_none_or(Option::is_some) {
            return self.reply(epoch, Err(SC_INVALID_QID));
        }
        let Some(mut cq) = Cq::new(gpa, size, ien, iv, &self.mem) else {
            return self.reply(epoch, Err(SC_INVALID_FIELD));
        };
        self.inner.doorbells.store(cq_db(qid), 0);
        if let Some(s) = self.shadow.as_ref() {
            cq.shadow = true;
            s.write_db(cq_db(qid), 0);
            s.write_eventidx(cq_db(qid), EVENTIDX_POLL);
        }
        self.cqs[i] = Some(cq);
        self.active_cqs.push(qid);
        self.inner.set_live(cq_db(qid), true, self.index);
        self.reply(epoch, Ok(()));
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create_sq(&mut self, epoch: u64, qid: u16, cqid: u16, gpa: u64, size: u32, instance: u64, page: u64) {
        self.refresh_mem();
        self.page = page;
        let i = index_of(qid);
        if self.sqs.get(i).is_none_or(Option::is_some) {
            return self.reply(epoch, Err(SC_INVALID_QID));
        }
        if self.cqs.get(index_of(cqid)).is_none_or(Option::is_none) {
            return self.reply(epoch, Err(SC_CQ_INVALID));
        }
        let Some(mut sq) = Sq::new(cqid, gpa, size, instance, &self.mem) else {
            return self.reply(epoch, Err(SC_INVALID_FIELD));
        };
        self.inner.doorbells.store(sq_db(qid), 0);
        if let Some(s) = self.shadow.as_ref() {
            sq.shadow = true;
            s.write_db(sq_db(qid), 0);
            s.write_eventidx(sq_db(qid), EVENTIDX_POLL);
        }
        self.sqs[i] = Some(sq);
        self.active_sqs.push(qid);
        self.inner.set_live(sq_db(qid), true, self.index);
        self.reply(epoch, Ok(()));
    }

    pub fn delete_sq(&mut self, epoch: u64, qid: u16) {
        self.active_sqs.retain(|&q| q != qid);
        self.inner.set_live(sq_db(qid), false, self.index);
        match self.sqs.get_mut(index_of(qid)).and_then(Option::take) {
            Some(sq) if sq.inflight > 0 => self.draining.push(Draining { sq, post: true, reply: Some(epoch) }),
            _ => self.reply(epoch, Ok(())),
        }
    }

    pub fn delete_cq(&mut self, epoch: u64, qid: u16) {
        self.active_cqs.retain(|&q| q != qid);
        self.inner.set_live(cq_db(qid), false, self.index);
        if let Some(mut cq) = self.cqs.get_mut(index_of(qid)).and_then(Option::take) {
            cq.release_intx(&self.inner.irq);
        }
        self.reply(epoch, Ok(()));
    }

    pub fn set_shadow(&mut self, epoch: u64, db: u64, ei: u64, page: u64) {
        self.refresh_mem();
        let Some(s) = ShadowBufs::new(&self.mem, db, ei, page) else {
            return self.reply(epoch, Err(SC_INVALID_FIELD));
        };
        // Start the new shadow values from the doorbells in use (BAR0, or the previous shadow
        // buffer), for hosts that do not clear the buffer (older Linux drivers after a reset).
        let old = self.shadow.as_ref();
        let db = &self.inner.doorbells;
        let current = |index: usize, shadowed: bool| {
            let prev = if shadowed { old.and_then(|o| o.read(index)) } else { None };
            prev.unwrap_or_else(|| db.load(index))
        };
        for &qid in &self.active_sqs {
            if let Some(sq) = self.sqs[index_of(qid)].as_mut() {
                s.write_db(sq_db(qid), current(sq_db(qid), sq.shadow));
                s.write_eventidx(sq_db(qid), EVENTIDX_POLL);
                sq.shadow = true;
            }
        }
        for &qid in &self.active_cqs {
            if let Some(cq) = self.cqs[index_of(qid)].as_mut() {
                s.write_db(cq_db(qid), current(cq_db(qid), cq.shadow));
                s.write_eventidx(cq_db(qid), EVENTIDX_POLL);
                cq.shadow = true;
            }
        }
        self.shadow = Some(s);
        self.reply(epoch, Ok(()));
    }

    /// Stops every queue for a controller reset or shutdown; answers when done.
    pub fn teardown(&mut self, epoch: u64, kind: TeardownKind) {
        self.refresh_mem();
        match kind {
            TeardownKind::Reset => {
                for qid in std::mem::take(&mut self.active_sqs) {
                    self.inner.set_live(sq_db(qid), false, self.index);
                    if let Some(sq) = self.sqs[index_of(qid)].take() {
                        if sq.inflight > 0 {
                            self.draining.push(Draining { sq, post: false, reply: None });
                        }
                    }
                }
                for d in self.draining.iter_mut() {
                    d.post = false;
                    d.reply = None;
                }
                for qid in std::mem::take(&mut self.active_cqs) {
                    self.inner.set_live(cq_db(qid), false, self.index);
                    if let Some(mut cq) = self.cqs[index_of(qid)].take() {
                        cq.release_intx(&self.inner.irq);
                    }
                }
                self.shadow = None;
                self.eventidx_armed = false;
                self.stopped = false;
            }
            TeardownKind::Shutdown => self.stopped = true,
        }
        self.teardown = Some(GroupTeardown { epoch, kind, flushing: false });
        self.check_teardown();
    }

    fn check_teardown(&mut self) {
        let Some(t) = self.teardown.as_mut() else { return };
        let shutdown = t.kind == TeardownKind::Shutdown;
        let ready = match t.kind {
            TeardownKind::Reset => self.draining.is_empty(),
            TeardownKind::Shutdown => {
                if self.inflight > 0 || t.flushing {
                    false
                } else {
                    t.flushing = true;
                    true
                }
            }
        };
        // A shutdown with nothing in flight flushes the namespaces next; it is done at once only
        // if there is nothing to flush.
        let done = if shutdown && ready { self.start_shutdown_flush() } else { ready };
        if done {
            if let Some(t) = self.teardown.take() {
                let epoch = t.epoch;
                self.inner.send_admin(move |a| a.on_teardown_done(epoch));
            }
        }
    }

    /// Flushes every namespace with a volatile cache. Returns true if there is nothing to wait for.
    fn start_shutdown_flush(&mut self) -> bool {
        let targets: Vec<u32> = self
            .ns
            .iter()
            .flatten()
            .filter(|c| c.ns.bdev.write_cache() && c.ns.bdev.io_type_supported(IoType::Flush))
            .map(|c| c.ns.nsid)
            .collect();
        if targets.is_empty() {
            return true;
        }
        let n = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let tag = self.alloc(Req {
            instance: 0,
            sqid: 0,
            cid: 0,
            opc: IO_FLUSH,
            nsid: NSID_ALL,
            slba: 0,
            _mem: self.mem.clone(),
            pending: n,
            status: Status::SUCCESS,
            kind: Kind::ShutdownFlush,
        });
        for nsid in targets {
            self.submit_op(nsid, IoOp::Flush, tag);
        }
        false
    }

    pub fn attach(&mut self, ns: Arc<Namespace>, chan: BdevChannel) {
        if let Some(slot) = usize::try_from(ns.nsid).ok().and_then(|i| self.ns.get_mut(i)) {
            *slot = Some(NsChan { ns, chan });
        }
    }

    pub fn detach(&mut self, nsid: u32) {
        if let Some(slot) = usize::try_from(nsid).ok().and_then(|i| self.ns.get_mut(i)) {
            *slot = None;
        }
    }

    // ---- data path ----

    fn alloc(&mut self, r: Req) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.reqs[i] = Some(r);
                i as u64
            }
            None => {
                self.reqs.push(Some(r));
                (self.reqs.len() - 1) as u64
            }
        }
    }

    fn sink(&self) -> Rc<dyn IoSink> {
        match self.me.upgrade() {
            Some(c) => c,
            None => Rc::new(NullSink),
        }
    }

    /// Submits `op` on namespace `nsid` for request `tag`. If the namespace went away, the
    /// operation fails at once (as an I/O error completion, never re-entrantly).
    fn submit_op(&mut self, nsid: u32, op: IoOp, tag: u64) {
        let sink = self.sink();
        match usize::try_from(nsid).ok().and_then(|i| self.ns.get_mut(i)).and_then(Option::as_mut) {
            Some(c) => c.chan.submit(op, IoCallback { sink, tag }),
            None => {
                if let Some(r) = usize::try_from(tag).ok().and_then(|i| self.reqs.get_mut(i)).and_then(Option::as_mut) {
                    r.pending = r.pending.saturating_sub(1);
                    r.status = SC_INVALID_NAMESPACE;
                    if r.pending == 0 {
                        self.finish(tag);
                    }
                }
            }
        }
    }

    /// Posts a completion for queue `sqid` right away (command rejected or trivially done).
    fn post_now(&mut self, sqid: u16, cid: u16, status: Status, nsid: u32, slba: u64) {
        if !status.is_success() {
            lock(&self.inner.errlog).record(sqid, cid, status, nsid, slba);
        }
        let Some(sq) = self.sqs.get(index_of(sqid)).and_then(Option::as_ref) else { return };
        let (cqid, sqhd) = (sq.cqid, u16::try_from(sq.head).unwrap_or(0));
        if let Some(cq) = self.cqs.get_mut(index_of(cqid)).and_then(Option::as_mut) {
            cq.post(Completion { dw0: 0, sqhd, sqid, cid, status: status.dw3_bits() });
        }
    }

    /// Starts command `cmd` from SQ `sqid`. `Err(status)` completes it at once with `status`.
    fn start(&mut self, sqid: u16, instance: u64, cmd: &Command) -> Result<(), Status> {
        if cmd.fuse() != 0 {
            return Err(SC_INVALID_FIELD);
        }
        let opc = cmd.opc();
        if !matches!(opc, IO_FLUSH | IO_WRITE | IO_READ | IO_COMPARE | IO_WRITE_ZEROES | IO_DSM) {
            return Err(SC_INVALID_OPCODE);
        }
        let nsid = cmd.nsid();
        if opc == IO_FLUSH && nsid == NSID_ALL {
            return self.flush_all(sqid, instance, cmd);
        }
        let Some(ns) = usize::try_from(nsid).ok().and_then(|i| self.ns.get(i)).and_then(Option::as_ref) else {
            return Err(SC_INVALID_NAMESPACE);
        };
        let bdev = ns.ns.bdev.clone();
        let mut req = Req {
            instance,
            sqid,
            cid: cmd.cid(),
            opc,
            nsid,
            slba: 0,
            _mem: self.mem.clone(),
            pending: 1,
            status: Status::SUCCESS,
            kind: Kind::Plain,
        };
        let bs = u64::from(bdev.block_size());
        let range = |slba: u64, nlb: u64| -> Result<(), Status> {
            match slba.checked_add(nlb) {
                Some(end) if end <= bdev.num_blocks() => Ok(()),
                _ => Err(SC_LBA_OUT_OF_RANGE),
            }
        };
        let op = match opc {
            IO_FLUSH => {
                if !bdev.io_type_supported(IoType::Flush) {
                    return Err(Status::SUCCESS);
                }
                IoOp::Flush
            }
            IO_READ | IO_WRITE | IO_COMPARE => {
                let (slba, nlb) = (cmd.slba(), cmd.nlb());
                req.slba = slba;
                range(slba, nlb)?;
                let len = nlb * bs;
                if len > MAX_TRANSFER {
                    return Err(SC_INVALID_FIELD);
                }
                let mut iovs = IoVecs::new();
                map_data(&self.mem, cmd, len, self.page, true, &mut iovs)?;
                match opc {
                    IO_READ => {
                        req.kind = Kind::Read { bytes: len };
                        IoOp::Read { offset_blocks: slba, num_blocks: nlb, iovs }
                    }
                    IO_WRITE => {
                        let fua = cmd.cdw12() & (1 << 30) != 0 || !self.inner.features.wce.load(Ordering::Relaxed);
                        req.kind = Kind::Write { bytes: len };
                        IoOp::Write { offset_blocks: slba, num_blocks: nlb, iovs, fua }
                    }
                    _ => {
                        let n = usize::try_from(len).map_err(|_| SC_INVALID_FIELD)?;
                        let mut buf = AlignedBuf::zeroed(n, bdev.buf_align().max(64)).ok_or(SC_INTERNAL_ERROR)?;
                        let into = bounce_iovs(&mut buf, n);
                        req.kind = Kind::Compare { buf, host: iovs };
                        IoOp::Read { offset_blocks: slba, num_blocks: nlb, iovs: into }
                    }
                }
            }
            IO_WRITE_ZEROES => {
                let (slba, nlb) = (cmd.slba(), cmd.nlb());
                req.slba = slba;
                range(slba, nlb)?;
                let fua = cmd.cdw12() & (1 << 30) != 0;
                if bdev.io_type_supported(IoType::WriteZeroes) {
                    req.kind = Kind::WriteZeroes { next: slba, end: slba + nlb, bs, fua, zero: None, flushed: false };
                    IoOp::WriteZeroes { offset_blocks: slba, num_blocks: nlb }
                } else {
                    let chunk = (ZERO_CHUNK / bs).clamp(1, nlb);
                    let n = usize::try_from(chunk * bs).map_err(|_| SC_INTERNAL_ERROR)?;
                    let mut zero = AlignedBuf::zeroed(n, bdev.buf_align().max(64)).ok_or(SC_INTERNAL_ERROR)?;
                    let iovs = bounce_iovs(&mut zero, n);
                    let (next, end) = (slba + chunk, slba + nlb);
                    req.kind = Kind::WriteZeroes { next, end, bs, fua, zero: Some(zero), flushed: true };
                    IoOp::Write { offset_blocks: slba, num_blocks: chunk, iovs, fua }
                }
            }
            IO_DSM => {
                let nr = usize::from(lo8(cmd.cdw10())) + 1;
                let mut raw = vec![0u8; nr * 16];
                let mut iovs = IoVecs::new();
                map_data(&self.mem, cmd, raw.len() as u64, self.page, true, &mut iovs)?;
                iovs.copy_to(&mut raw);
                let mut ranges: SmallVec<[BlockRange; 1]> = smallvec![];
                for r in raw.chunks_exact(16) {
                    let nlb = u64::from(u32::from_le_bytes([r[4], r[5], r[6], r[7]]));
                    let slba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
                    range(slba, nlb)?;
                    if nlb > 0 {
                        ranges.push(BlockRange { offset_blocks: slba, num_blocks: nlb });
                    }
                }
                let deallocate = cmd.cdw11() & (1 << 2) != 0;
                // Deallocation is advisory: without it (or without unmap support) there is
                // nothing to do.
                if !deallocate || ranges.is_empty() || !bdev.io_type_supported(IoType::Unmap) {
                    return Err(Status::SUCCESS);
                }
                IoOp::Unmap { ranges }
            }
            _ => return Err(SC_INVALID_OPCODE),
        };
        let tag = self.alloc(req);
        self.submit_op(nsid, op, tag);
        Ok(())
    }

    fn flush_all(&mut self, sqid: u16, instance: u64, cmd: &Command) -> Result<(), Status> {
        let targets: Vec<u32> = self
            .ns
            .iter()
            .flatten()
            .filter(|c| c.ns.bdev.io_type_supported(IoType::Flush))
            .map(|c| c.ns.nsid)
            .collect();
        if targets.is_empty() {
            return Err(Status::SUCCESS);
        }
        let tag = self.alloc(Req {
            instance,
            sqid,
            cid: cmd.cid(),
            opc: IO_FLUSH,
            nsid: NSID_ALL,
            slba: 0,
            _mem: self.mem.clone(),
            pending: u32::try_from(targets.len()).unwrap_or(u32::MAX),
            status: Status::SUCCESS,
            kind: Kind::Plain,
        });
        for nsid in targets {
            self.submit_op(nsid, IoOp::Flush, tag);
        }
        Ok(())
    }

    /// A bdev operation of request `tag` completed.
    fn io_done(&mut self, tag: u64, result: IoResult) {
        let Some(r) = usize::try_from(tag).ok().and_then(|i| self.reqs.get_mut(i)).and_then(Option::as_mut) else {
            return;
        };
        if let Err(e) = result {
            if r.status.is_success() {
                r.status = io_status(e, r.opc);
            }
        }
        r.pending = r.pending.saturating_sub(1);
        if r.pending > 0 {
            return;
        }
        if r.status.is_success() {
            if let Some((nsid, op)) = next_step(r) {
                r.pending = 1;
                self.submit_op(nsid, op, tag);
                return;
            }
        }
        self.finish(tag);
    }

    /// Completes request `tag`: compares data for Compare, counts statistics, posts the
    /// completion to its queue (or the draining copy of it), and answers waiters.
    fn finish(&mut self, tag: u64) {
        let Some(i) = usize::try_from(tag).ok() else { return };
        let Some(mut r) = self.reqs.get_mut(i).and_then(Option::take) else { return };
        self.free.push(i);
        if self.dead {
            return;
        }
        if let Kind::Compare { buf, host } = &r.kind {
            if r.status.is_success() {
                let mut theirs = vec![0u8; buf.len()];
                host.copy_to(&mut theirs);
                if theirs != buf.as_slice() {
                    r.status = SC_COMPARE_FAILURE;
                }
            }
        }
        if r.status.is_success() {
            let st = &self.inner.stats[self.index];
            match r.kind {
                Kind::Read { bytes } => {
                    st.read_cmds.fetch_add(1, Ordering::Relaxed);
                    st.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                Kind::Write { bytes } => {
                    st.write_cmds.fetch_add(1, Ordering::Relaxed);
                    st.write_bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if matches!(r.kind, Kind::ShutdownFlush) {
            self.check_teardown_flush_done();
            return;
        }
        if !r.status.is_success() {
            lock(&self.inner.errlog).record(r.sqid, r.cid, r.status, r.nsid, r.slba);
        }
        self.inflight = self.inflight.saturating_sub(1);
        let c = |sq: &Sq| Completion {
            dw0: 0,
            sqhd: u16::try_from(sq.head).unwrap_or(0),
            sqid: r.sqid,
            cid: r.cid,
            status: r.status.dw3_bits(),
        };
        let live = self.sqs.get_mut(index_of(r.sqid)).and_then(Option::as_mut).filter(|s| s.instance == r.instance);
        if let Some(sq) = live {
            sq.inflight = sq.inflight.saturating_sub(1);
            let (cqid, cqe) = (sq.cqid, c(sq));
            if let Some(cq) = self.cqs.get_mut(index_of(cqid)).and_then(Option::as_mut) {
                cq.post(cqe);
            }
        } else if let Some(pos) = self.draining.iter().position(|d| d.sq.instance == r.instance) {
            let d = &mut self.draining[pos];
            d.sq.inflight = d.sq.inflight.saturating_sub(1);
            if d.post {
                let (cqid, cqe) = (d.sq.cqid, c(&d.sq));
                if let Some(cq) = self.cqs.get_mut(index_of(cqid)).and_then(Option::as_mut) {
                    cq.post(cqe);
                }
            }
            if self.draining[pos].sq.inflight == 0 {
                let d = self.draining.swap_remove(pos);
                if let Some(epoch) = d.reply {
                    self.reply(epoch, Ok(()));
                }
            }
        }
        self.check_teardown();
    }

    fn check_teardown_flush_done(&mut self) {
        if self.teardown.as_ref().is_some_and(|t| t.flushing) {
            if let Some(t) = self.teardown.take() {
                let epoch = t.epoch;
                self.inner.send_admin(move |a| a.on_teardown_done(epoch));
            }
        }
    }

    fn poll(&mut self) -> bool {
        self.inner.group_kicks[self.index].disarm();
        self.refresh_mem();
        if self.eventidx_armed {
            self.eventidx_armed = false;
            if let Some(s) = self.shadow.as_ref() {
                for &qid in &self.active_sqs {
                    s.write_eventidx(sq_db(qid), EVENTIDX_POLL);
                }
                for &qid in &self.active_cqs {
                    s.write_eventidx(cq_db(qid), EVENTIDX_POLL);
                }
            }
        }
        let mut work = false;
        let irq = &self.inner.irq;
        // Completion queue heads.
        for &qid in &self.active_cqs {
            let Some(cq) = self.cqs[index_of(qid)].as_mut() else { continue };
            if cq.broken {
                continue;
            }
            let shadow = if cq.shadow { self.shadow.as_ref() } else { None };
            let Some(h) = read_doorbell(&self.inner.doorbells, shadow, cq_db(qid)) else { continue };
            match cq.set_head(h) {
                Ok(changed) => work |= changed,
                Err(()) => {
                    cq.broken = true;
                    self.inner.send_admin(move |a| a.error_event(AER_ERR_INVALID_DB_VALUE, qid));
                    continue;
                }
            }
            if !cq.backlog.is_empty() {
                work |= cq.flush_backlog() > 0;
            }
            cq.update_intx(irq);
        }
        // Submission queues.
        if !self.stopped {
            for i in 0..self.active_sqs.len() {
                let qid = self.active_sqs[i];
                let Some(sq) = self.sqs[index_of(qid)].as_mut() else { continue };
                if sq.broken || !sq.mapped() {
                    continue;
                }
                let blocked = self.cqs[index_of(sq.cqid)].as_ref().is_none_or(|c| !c.backlog.is_empty() || c.broken);
                if blocked {
                    continue;
                }
                let shadow = if sq.shadow { self.shadow.as_ref() } else { None };
                let Some(tail) = read_doorbell(&self.inner.doorbells, shadow, sq_db(qid)) else { continue };
                if tail >= sq.size {
                    sq.broken = true;
                    self.inner.send_admin(move |a| a.error_event(AER_ERR_INVALID_DB_VALUE, qid));
                    continue;
                }
                let instance = sq.instance;
                let budget = IO_BUDGET.min(sq.size);
                let mut fetched = std::mem::take(&mut self.fetched);
                for _ in 0..budget {
                    match sq.fetch(tail) {
                        Some(c) => fetched.push(c),
                        None => break,
                    }
                }
                work |= !fetched.is_empty();
                for cmd in fetched.drain(..) {
                    match self.start(qid, instance, &cmd) {
                        Ok(()) => {
                            self.inflight += 1;
                            if let Some(sq) = self.sqs[index_of(qid)].as_mut() {
                                sq.inflight += 1;
                            }
                        }
                        Err(status) => {
                            let slba = if matches!(cmd.opc(), IO_READ | IO_WRITE | IO_COMPARE | IO_WRITE_ZEROES) {
                                cmd.slba()
                            } else {
                                0
                            };
                            self.post_now(qid, cmd.cid(), status, cmd.nsid(), slba)
                        }
                    }
                }
                self.fetched = fetched;
            }
        }
        self.fire_interrupts();
        work
    }

    fn fire_interrupts(&mut self) {
        let coal = self.inner.features.coalescing.load(Ordering::Relaxed);
        let thr = coal & 0xff;
        let time = Duration::from_micros(100 * u64::from((coal >> 8) & 0xff));
        for &qid in &self.active_cqs {
            let Some(cq) = self.cqs[index_of(qid)].as_mut() else { continue };
            if cq.unsignaled == 0 {
                continue;
            }
            let coalesced =
                !self.inner.features.vector_cd.get(usize::from(cq.iv)).is_some_and(|c| c.load(Ordering::Relaxed));
            let due = !coalesced || cq.unsignaled > thr || cq.since.is_none_or(|t| t.elapsed() >= time);
            if due {
                cq.raise(&self.inner.irq);
            }
        }
    }

    /// Before the reactor sleeps: enable wake-ups, then report whether work is pending.
    fn arm(&mut self) -> bool {
        if self.inner.cfg.mappable_doorbells && !self.active_sqs.is_empty() {
            return true;
        }
        self.inner.group_kicks[self.index].arm();
        let db = &self.inner.doorbells;
        for &qid in &self.active_cqs {
            let Some(cq) = self.cqs[index_of(qid)].as_ref() else { continue };
            if cq.unsignaled > 0 {
                return true;
            }
            if cq.broken || (cq.backlog.is_empty() && !cq.intx_source) {
                continue;
            }
            let shadow = if cq.shadow { self.shadow.as_ref() } else { None };
            if let Some(s) = shadow {
                s.write_eventidx(cq_db(qid), cq.head);
                self.eventidx_armed = true;
                fence(Ordering::SeqCst);
            }
            if read_doorbell(db, shadow, cq_db(qid)).is_some_and(|h| h != cq.head) {
                return true;
            }
        }
        if self.stopped {
            return false;
        }
        for &qid in &self.active_sqs {
            let Some(sq) = self.sqs[index_of(qid)].as_ref() else { continue };
            // A queue whose completion queue is full waits for that queue's head (above).
            let blocked = self.cqs[index_of(sq.cqid)].as_ref().is_none_or(|c| !c.backlog.is_empty() || c.broken);
            if sq.broken || !sq.mapped() || blocked {
                continue;
            }
            let shadow = if sq.shadow { self.shadow.as_ref() } else { None };
            if let Some(s) = shadow {
                s.write_eventidx(sq_db(qid), sq.head);
                self.eventidx_armed = true;
                fence(Ordering::SeqCst);
            }
            if read_doorbell(db, shadow, sq_db(qid)).is_some_and(|t| t != sq.head) {
                return true;
            }
        }
        false
    }
}

/// The next bdev operation of a multi-step request, if any.
fn next_step(r: &mut Req) -> Option<(u32, IoOp)> {
    let Kind::WriteZeroes { next, end, bs, fua, zero, flushed } = &mut r.kind else { return None };
    if let Some(buf) = zero.as_mut() {
        if *next < *end {
            let blocks = (buf.len() as u64 / *bs).min(*end - *next);
            let n = usize::try_from(blocks * *bs).ok()?;
            let iovs = bounce_iovs(buf, n);
            let off = *next;
            *next += blocks;
            return Some((r.nsid, IoOp::Write { offset_blocks: off, num_blocks: blocks, iovs, fua: *fua }));
        }
        return None;
    }
    if *fua && !*flushed {
        *flushed = true;
        return Some((r.nsid, IoOp::Flush));
    }
    None
}

/// iovecs over the first `len` bytes of a request's bounce buffer.
fn bounce_iovs(buf: &mut AlignedBuf, len: usize) -> IoVecs {
    let mut v = IoVecs::new();
    // SAFETY: the buffer is owned by the request (`Kind::Compare` / `Kind::WriteZeroes`), which
    // lives in the group's request table until its last bdev operation has completed; moving the
    // `AlignedBuf` value does not move its heap allocation, and no reference to the bytes is
    // formed while an operation is in flight (Compare reads them only in `finish`).
    unsafe { v.push_raw(buf.as_mut_ptr(), len.min(buf.len())) };
    v
}

struct NullSink;

impl IoSink for NullSink {
    fn io_done(&self, _tag: u64, _result: IoResult) {}
}

/// The group and completions that arrived while it was borrowed.
pub(crate) struct GroupCell {
    group: RefCell<Group>,
    deferred: RefCell<Vec<(u64, IoResult)>>,
}

impl GroupCell {
    fn run_deferred(&self, g: &mut Group) {
        let d = std::mem::take(&mut *self.deferred.borrow_mut());
        for (tag, r) in d {
            g.io_done(tag, r);
        }
    }
}

impl IoSink for GroupCell {
    fn io_done(&self, tag: u64, result: IoResult) {
        match self.group.try_borrow_mut() {
            Ok(mut g) => g.io_done(tag, result),
            Err(_) => self.deferred.borrow_mut().push((tag, result)),
        }
    }
}

/// The poller of one group.
pub(crate) struct GroupPoller {
    cell: Rc<GroupCell>,
    epoll: EpollHandle,
    fd: RawFd,
}

impl GroupPoller {
    pub fn register(inner: Arc<Inner>, index: usize, r: &mut Reactor) -> std::io::Result<PollerId> {
        let epoll = r.epoll();
        let fd = inner.group_kicks[index].raw_fd();
        epoll.add(fd)?;
        let cell = Rc::new_cyclic(|me| GroupCell {
            group: RefCell::new(Group::new(inner, index, me.clone())),
            deferred: RefCell::new(Vec::new()),
        });
        Ok(r.add_poller(Box::new(GroupPoller { cell, epoll, fd })))
    }

    /// Runs `f` on the group (from a message, between polls).
    pub fn with(&mut self, f: impl FnOnce(&mut Group)) {
        let Ok(mut g) = self.cell.group.try_borrow_mut() else { return };
        self.cell.run_deferred(&mut g);
        f(&mut g);
    }
}

impl Drop for GroupPoller {
    fn drop(&mut self) {
        self.epoll.remove(self.fd);
        // I/O still in flight keeps the cell (and the memory it points into) alive; its
        // completions must not reach the guest of a controller that is gone.
        if let Ok(mut g) = self.cell.group.try_borrow_mut() {
            g.dead = true;
        }
    }
}

impl Poller for GroupPoller {
    fn poll(&mut self) -> PollStatus {
        let Ok(mut g) = self.cell.group.try_borrow_mut() else { return PollStatus::Busy };
        let had_deferred = !self.cell.deferred.borrow().is_empty();
        self.cell.run_deferred(&mut g);
        PollStatus::from_work(g.poll() || had_deferred)
    }

    fn arm(&mut self) -> bool {
        if !self.cell.deferred.borrow().is_empty() {
            return true;
        }
        self.cell.group.try_borrow_mut().map(|mut g| g.arm()).unwrap_or(true)
    }

    fn disarm(&mut self) {
        if let Ok(g) = self.cell.group.try_borrow() {
            g.inner.group_kicks[g.index].disarm();
        }
    }

    fn name(&self) -> &str {
        "nvme_io"
    }
}

/// Opens a channel for `ns` on this reactor and hands it to the group `id`.
pub(crate) fn attach_namespace(r: &mut Reactor, id: PollerId, ns: Arc<Namespace>) -> Result<(), BdevError> {
    let chan = BdevChannel::new(ns.bdev.clone(), r)?;
    if let Some(p) = r.poller_mut::<GroupPoller>(id) {
        p.with(|g| g.attach(ns, chan));
    }
    Ok(())
}

/// Drops the group's channel for `nsid`.
pub(crate) fn detach_namespace(r: &mut Reactor, id: PollerId, nsid: u32) {
    if let Some(p) = r.poller_mut::<GroupPoller>(id) {
        p.with(|g| g.detach(nsid));
    }
}
