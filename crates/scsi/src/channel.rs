//! Per-reactor command execution: [`LunChannel`].
//!
//! A command is decoded ([`crate::cdb::parse`]), checked against the LUN's current state
//! (capacity, write protection, limits) and either answered at once — the answer is queued to
//! this reactor's deferred poller — or turned into bdev I/O. A command that needs several bdev
//! operations (VERIFY with BYTCHK reads and compares chunk by chunk, WRITE SAME with a pattern
//! writes chunk by chunk, a write followed by a flush) keeps its state in a slot whose index is
//! the bdev tag, and takes its next step from [`IoSink::io_done`].
//!
//! Every submitted command gets a sequence number. `inflight` is the set of numbers not yet
//! completed; a LUN reset waits until none below its own barrier remains.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use vstor_bdev::mem::AlignedBuf;
use vstor_bdev::{
    smallvec, BdevError, BlockRange, IoCallback, IoError, IoOp, IoResult, IoSink, IoType, IoVecs, SmallVec,
};
use vstor_reactor::{PollStatus, Poller, Reactor};

use crate::cdb::{self, opcode as op, ByteCheck, Command, Transfer};
use crate::lun::Lun;
use crate::mode::{self, SenseRequest};
use crate::sense::{Asc, Sense, SenseKey};
use crate::spc;
use crate::{put_data, ScsiTask, TaskCallback, TaskResult};

/// Bytes VERIFY reads and compares per step.
const VERIFY_CHUNK_BYTES: u64 = 1 << 20;
/// Blocks per bdev write when WRITE SAME writes a pattern.
const PATTERN_CHUNK_BLOCKS: u64 = 256;
/// Segments per pattern write (Linux's IOV_MAX; longer lists would be bounced by io_uring).
const PATTERN_MAX_SEGMENTS: u64 = 1024;

// ---------------------------------------------------------------------------------------------
// Deferred completions

enum Deferred {
    Task { chan: Rc<Inner>, seq: u64, cb: TaskCallback, result: TaskResult },
    Reset { cb: TaskCallback },
}

/// Answers waiting for the next pass of this reactor's poller.
#[derive(Default)]
struct DeferQueue(RefCell<VecDeque<Deferred>>);

/// Delivers deferred answers. One per reactor, registered with the first channel there.
struct DeferPoller(Rc<DeferQueue>);

/// Reactor-local state: the deferred queue shared by every channel on the reactor.
struct ReactorLocal(Rc<DeferQueue>);

impl Poller for DeferPoller {
    fn poll(&mut self) -> PollStatus {
        // Only what is queued now: answers queued by the callbacks wait for the next pass.
        let n = self.0 .0.borrow().len();
        for _ in 0..n {
            let Some(item) = self.0 .0.borrow_mut().pop_front() else {
                break;
            };
            match item {
                Deferred::Task { chan, seq, cb, result } => chan.finish(seq, cb, result),
                Deferred::Reset { cb } => cb.sink.task_done(cb.tag, TaskResult::good(0)),
            }
        }
        PollStatus::from_work(n > 0)
    }

    fn arm(&mut self) -> bool {
        !self.0 .0.borrow().is_empty()
    }

    fn name(&self) -> &str {
        "scsi_deferred"
    }
}

// ---------------------------------------------------------------------------------------------
// In-flight state

/// What a bdev failure means for the command (which sense to report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoKind {
    Read,
    Write,
    Flush,
    Unmap,
}

/// A command waiting for bdev I/O.
struct Pending {
    seq: u64,
    cb: TaskCallback,
    op: Op,
}

enum Op {
    /// One bdev operation, optionally followed by a flush; GOOD with `data_in_len` at the end.
    Single { kind: IoKind, data_in_len: u32, then_flush: bool },
    /// VERIFY with BYTCHK.
    Verify(Box<Verify>),
    /// WRITE SAME writing a pattern.
    Pattern(Box<Pattern>),
}

/// VERIFY with BYTCHK 01b/11b: read a chunk into `buf`, compare, repeat.
struct Verify {
    lba: u64,
    remaining: u64,
    /// Blocks in the read in flight.
    chunk: u64,
    /// Blocks verified so far.
    done: u64,
    max_chunk: u64,
    bs: u64,
    /// BYTCHK 11b: `expect` is one block to compare with every block.
    single: bool,
    expect: IoVecs,
    buf: AlignedBuf,
}

impl Verify {
    fn next_read(&mut self) -> Option<IoOp> {
        self.chunk = self.remaining.min(self.max_chunk);
        let len = usize::try_from(self.chunk.checked_mul(self.bs)?).ok()?;
        if len > self.buf.len() {
            return None;
        }
        let mut iovs = IoVecs::new();
        // SAFETY: `buf` is owned by this state, which stays in its slot until the read completes
        // (only `io_done` takes it out, after the bdev is done with the buffer); nothing reads or
        // borrows the buffer meanwhile. `len <= buf.len()`.
        unsafe { iovs.push_raw(self.buf.as_mut_ptr(), len) };
        Some(IoOp::Read { offset_blocks: self.lba, num_blocks: self.chunk, iovs })
    }

    /// Compares the chunk just read. `Err(offset)`: first differing byte, counted from the start
    /// of the verified range.
    fn compare(&self) -> Result<(), u64> {
        let bs = usize::try_from(self.bs).unwrap_or(usize::MAX);
        let len = usize::try_from(self.chunk.saturating_mul(self.bs)).unwrap_or(usize::MAX).min(self.buf.len());
        let got = &self.buf.as_slice()[..len];
        let base = self.done.saturating_mul(self.bs);
        let mut want = vec![0u8; if self.single { bs } else { len }];
        let filled = if self.single { self.expect.copy_to(&mut want) } else { self.expect.copy_to_at(base, &mut want) };
        if filled != want.len() {
            return Err(base);
        }
        let mismatch = if self.single {
            got.chunks(bs.max(1)).enumerate().find_map(|(blk, b)| {
                b.iter().zip(&want).position(|(x, y)| x != y).map(|i| blk.saturating_mul(bs).saturating_add(i))
            })
        } else {
            got.iter().zip(&want).position(|(x, y)| x != y)
        };
        match mismatch {
            Some(i) => Err(base.saturating_add(u64::try_from(i).unwrap_or(u64::MAX))),
            None => Ok(()),
        }
    }
}

/// WRITE SAME with a data pattern: writes of up to `per_chunk` blocks whose iovecs repeat the one
/// block of data.
struct Pattern {
    lba: u64,
    remaining: u64,
    chunk: u64,
    per_chunk: u64,
    fua: bool,
    /// The block to repeat: the data-out block, or `_zero`.
    block: IoVecs,
    /// Owns the zero block for NDOB=1 (referenced by `block`).
    _zero: Option<AlignedBuf>,
}

impl Pattern {
    fn next_write(&mut self) -> IoOp {
        self.chunk = self.remaining.min(self.per_chunk);
        let mut iovs = IoVecs::new();
        for _ in 0..self.chunk {
            for s in self.block.as_slice() {
                // SAFETY: every segment comes from `block`, which lives under `push_raw`'s
                // contract until the command completes: it points into the task's data-out
                // buffer (valid until `task_done`, see `ScsiTask`) or into `_zero`, owned by this
                // state. The bdev only reads these segments for a write, so repeating one is
                // harmless.
                unsafe { iovs.push_raw(s.iov_base.cast::<u8>(), s.iov_len) };
            }
        }
        IoOp::Write { offset_blocks: self.lba, num_blocks: self.chunk, iovs, fua: self.fua }
    }
}

/// What a command needs after decoding and checking.
enum Flow {
    Done(TaskResult),
    Io(IoOp, Op),
}

/// Next step of a command in flight.
enum Next {
    Io(IoOp),
    Done(TaskResult),
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Sequence numbers of commands not yet completed.
    outstanding: BTreeSet<u64>,
    /// LUN resets waiting for every command below their barrier.
    resets: Vec<(u64, TaskCallback)>,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
}

/// Where bdev I/O goes. Tests put a logging, fault-injecting wrapper around the `BdevChannel`.
#[cfg(not(test))]
type Target = vstor_bdev::BdevChannel;
#[cfg(test)]
type Target = crate::tests::TestTarget;

struct Inner {
    lun: Arc<Lun>,
    bdev: RefCell<Target>,
    deferred: Rc<DeferQueue>,
    me: Weak<Inner>,
    state: RefCell<State>,
    /// The LUN's capacity generation this channel has reported (UNIT ATTENTION once per change).
    seen_gen: Cell<u64>,
}

/// Per-reactor handle to a LUN; owns a [`BdevChannel`](vstor_bdev::BdevChannel). Not `Send`: it
/// lives on its reactor.
pub struct LunChannel {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for LunChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LunChannel({:?}, {} in flight)", self.inner.lun, self.inflight())
    }
}

impl LunChannel {
    /// Opens a channel on reactor `r` (call from a message running on that reactor, not from
    /// inside a poller: the first channel on a reactor registers its deferred-answer poller).
    pub fn new(lun: Arc<Lun>, r: &mut Reactor) -> Result<LunChannel, BdevError> {
        let bdev = Target::new(lun.bdev().clone(), r)?;
        let deferred = r
            .local_or_insert_with(|r| {
                let q = Rc::new(DeferQueue::default());
                r.add_poller(Box::new(DeferPoller(q.clone())));
                ReactorLocal(q)
            })
            .0
            .clone();
        let seen = lun.capacity_generation();
        let inner = Rc::new_cyclic(|me| Inner {
            lun,
            bdev: RefCell::new(bdev),
            deferred,
            me: me.clone(),
            state: RefCell::new(State::default()),
            seen_gen: Cell::new(seen),
        });
        Ok(LunChannel { inner })
    }

    /// The LUN.
    pub fn lun(&self) -> &Arc<Lun> {
        &self.inner.lun
    }

    /// Executes one command. `done.sink.task_done(done.tag, result)` is called exactly once, on
    /// this reactor, never from inside this call.
    pub fn submit(&mut self, task: ScsiTask, done: TaskCallback) {
        let seq = {
            let mut st = self.inner.state.borrow_mut();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.outstanding.insert(seq);
            seq
        };
        match self.inner.run(&task) {
            Flow::Done(result) => self.inner.defer(Deferred::Task { chan: self.inner.clone(), seq, cb: done, result }),
            Flow::Io(io, op) => self.inner.start(Pending { seq, cb: done, op }, io),
        }
    }

    /// LOGICAL UNIT RESET: completes (GOOD) when every command submitted on this channel before
    /// it has completed. Nothing is aborted: commands in flight are bdev I/O, which completes.
    /// No UNIT ATTENTION is established.
    pub fn reset(&mut self, done: TaskCallback) {
        let mut st = self.inner.state.borrow_mut();
        let barrier = st.next_seq;
        if st.outstanding.first().is_none_or(|&m| m >= barrier) {
            drop(st);
            self.inner.defer(Deferred::Reset { cb: done });
        } else {
            st.resets.push((barrier, done));
        }
    }

    /// Commands submitted and not yet completed.
    pub fn inflight(&self) -> usize {
        self.inner.state.borrow().outstanding.len()
    }
}

/// Maps a bdev failure to a status and sense (SPC-4 sense keys and additional sense codes).
fn io_error(e: IoError, kind: IoKind) -> TaskResult {
    use std::io::ErrorKind as K;
    let medium = |asc| TaskResult::check_condition(Sense::new(SenseKey::MediumError, asc));
    match e {
        IoError::OutOfRange => TaskResult::check_condition(Sense::lba_out_of_range()),
        IoError::Unsupported => TaskResult::check_condition(Sense::invalid_opcode()),
        IoError::ReadOnly => TaskResult::check_condition(Sense::write_protected()),
        IoError::InvalidLength => {
            TaskResult::check_condition(Sense::new(SenseKey::HardwareError, Asc::INTERNAL_TARGET_FAILURE))
        }
        IoError::Aborted => TaskResult::check_condition(Sense::new(SenseKey::AbortedCommand, Asc::NO_ADDITIONAL_SENSE)),
        IoError::NoMemory => TaskResult::busy(),
        IoError::Os(errno) => match std::io::Error::from_raw_os_error(errno).kind() {
            // A thin-provisioned backing store ran out of space (SBC-3, thin provisioning).
            K::StorageFull | K::QuotaExceeded => TaskResult::check_condition(Sense::new(
                SenseKey::DataProtect,
                Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
            )),
            K::ReadOnlyFilesystem => TaskResult::check_condition(Sense::write_protected()),
            K::OutOfMemory | K::WouldBlock => TaskResult::busy(),
            // The backing store cannot unmap or zero (e.g. no hole punching): the initiator
            // should stop asking.
            K::Unsupported if kind == IoKind::Unmap => TaskResult::check_condition(Sense::invalid_opcode()),
            _ => match kind {
                IoKind::Read => medium(Asc::UNRECOVERED_READ_ERROR),
                IoKind::Write | IoKind::Flush | IoKind::Unmap => medium(Asc::WRITE_ERROR),
            },
        },
    }
}

fn check(s: Sense) -> Flow {
    Flow::Done(TaskResult::check_condition(s))
}

fn good() -> Flow {
    Flow::Done(TaskResult::good(0))
}

fn be(d: &[u8], start: usize, n: usize) -> u64 {
    d.get(start..start.saturating_add(n)).map_or(0, |b| b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn at(off: usize) -> u16 {
    u16::try_from(off).unwrap_or(u16::MAX)
}

/// Copies the first `len` bytes of a data-out buffer; `None` if it is shorter.
fn read_params(data_out: &IoVecs, len: u32) -> Option<Vec<u8>> {
    if data_out.total_len() < u64::from(len) {
        return None;
    }
    // `len` comes from a 1- or 2-byte CDB field: at most 64 KiB.
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    data_out.copy_to(&mut buf);
    Some(buf)
}

impl Inner {
    fn defer(&self, d: Deferred) {
        self.deferred.0.borrow_mut().push_back(d);
    }

    /// Records the completion of command `seq` and delivers it, then any reset it unblocked.
    fn finish(&self, seq: u64, cb: TaskCallback, result: TaskResult) {
        let ready: Vec<TaskCallback> = {
            let mut st = self.state.borrow_mut();
            st.outstanding.remove(&seq);
            let min = st.outstanding.first().copied().unwrap_or(u64::MAX);
            let (ready, waiting): (Vec<_>, Vec<_>) =
                std::mem::take(&mut st.resets).into_iter().partition(|(b, _)| *b <= min);
            st.resets = waiting;
            ready.into_iter().map(|(_, cb)| cb).collect()
        };
        if result.status != crate::ScsiStatus::Good {
            tracing::debug!(lun = ?self.lun, ?result, "command failed");
        }
        cb.sink.task_done(cb.tag, result);
        for r in ready {
            r.sink.task_done(r.tag, TaskResult::good(0));
        }
    }

    /// Parks `p` in a slot and submits its first bdev operation.
    fn start(&self, p: Pending, io: IoOp) {
        let slot = {
            let mut st = self.state.borrow_mut();
            match st.free.pop() {
                Some(i) => {
                    st.slots[i] = Some(p);
                    i
                }
                None => {
                    st.slots.push(Some(p));
                    st.slots.len() - 1
                }
            }
        };
        self.submit_io(slot, io);
    }

    fn submit_io(&self, slot: usize, io: IoOp) {
        // `me` always upgrades: `self` is only ever reached through an `Rc<Inner>`.
        let Some(me) = self.me.upgrade() else {
            tracing::error!("LunChannel used after drop; command dropped");
            return;
        };
        let cb = IoCallback { sink: me, tag: slot as u64 };
        self.bdev.borrow_mut().submit(io, cb);
    }

    fn lba_in_range(&self, lba: u64, blocks: u64) -> bool {
        lba.checked_add(blocks).is_some_and(|end| end <= self.lun.num_blocks())
    }

    /// The bdev has a volatile cache and MODE SELECT turned it off (WCE=0): writes must be
    /// durable on completion.
    fn cache_disabled(&self) -> bool {
        self.lun.bdev().write_cache() && !self.lun.write_cache_enabled()
    }

    fn can_flush(&self) -> bool {
        self.lun.bdev().io_type_supported(IoType::Flush)
    }

    /// Decodes and checks one command and says what it needs.
    fn run(&self, task: &ScsiTask) -> Flow {
        let cdb_bytes = task.cdb();
        let opcode = cdb_bytes.first().copied();
        // SAM-5/SPC-4 (unit attention condition): a pending UNIT ATTENTION terminates any command
        // with CHECK CONDITION, except INQUIRY and REPORT LUNS (which neither report nor clear it)
        // and REQUEST SENSE (which returns it as its data and clears it).
        let gen = self.lun.capacity_generation();
        let ua_pending = gen != self.seen_gen.get();
        if ua_pending && !matches!(opcode, Some(op::INQUIRY | op::REPORT_LUNS | op::REQUEST_SENSE)) {
            self.seen_gen.set(gen);
            return check(ua_sense());
        }
        let cmd = match cdb::parse(cdb_bytes) {
            Ok(c) => c,
            Err(s) => return check(s),
        };
        let lun = &*self.lun;
        match cmd {
            Command::TestUnitReady => good(),
            Command::RequestSense { desc, alloc_len } => {
                // SPC-4, REQUEST SENSE: with nothing to report, NO SENSE / NO ADDITIONAL SENSE
                // INFORMATION.
                let sense = if ua_pending {
                    self.seen_gen.set(gen);
                    ua_sense()
                } else {
                    Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE)
                };
                let data = if desc { sense.to_descriptor_bytes() } else { sense.to_bytes().to_vec() };
                Flow::Done(put_data(task, &data, alloc_len))
            }
            Command::Inquiry { evpd, page, alloc_len } => {
                let data = if evpd { spc::vpd_page(lun, page) } else { spc::standard_inquiry(lun) };
                Flow::Done(put_data(task, &data, alloc_len))
            }
            Command::ModeSense { ten, dbd, llbaa, pc, page, subpage: _, alloc_len } => {
                let data = mode::mode_sense(lun, SenseRequest { ten, dbd, llbaa, pc, page });
                Flow::Done(put_data(task, &data, alloc_len))
            }
            Command::ModeSelect { ten, param_len, len_field } => self.mode_select(task, ten, param_len, len_field),
            Command::StartStopUnit { no_flush, start } => {
                // SBC-3, START STOP UNIT: stopping makes cached data durable unless NO_FLUSH.
                // Otherwise a virtual disk has nothing to start or stop.
                if !start && !no_flush && self.can_flush() {
                    Flow::Io(IoOp::Flush, Op::Single { kind: IoKind::Flush, data_in_len: 0, then_flush: false })
                } else {
                    good()
                }
            }
            Command::ReadCapacity10 => Flow::Done(put_data(task, &spc::read_capacity_10(lun), u32::MAX)),
            Command::ReadCapacity16 { alloc_len } => Flow::Done(put_data(task, &spc::read_capacity_16(lun), alloc_len)),
            Command::Read(x) => self.read(task, x),
            Command::Write(x) => self.write(task, x),
            Command::Verify { xfer, bytchk } => self.verify(task, xfer, bytchk),
            Command::SynchronizeCache { lba, blocks } => {
                // SBC-3, SYNCHRONIZE CACHE: a range past the capacity is LBA OUT OF RANGE. NUMBER
                // OF LOGICAL BLOCKS 0 means "to the end". The bdev flushes everything.
                if !self.lba_in_range(lba, u64::from(blocks)) {
                    return check(Sense::lba_out_of_range());
                }
                if self.can_flush() {
                    Flow::Io(IoOp::Flush, Op::Single { kind: IoKind::Flush, data_in_len: 0, then_flush: false })
                } else {
                    good()
                }
            }
            Command::WriteSame { xfer, unmap, ndob } => self.write_same(task, xfer, unmap, ndob),
            Command::Unmap { param_len } => self.unmap(task, param_len),
            Command::ReportLuns { select, alloc_len } => {
                Flow::Done(put_data(task, &spc::report_luns(select, true), alloc_len))
            }
            Command::ReportOpcodes { options, rctd, opcode, sa, alloc_len } => {
                match spc::report_opcodes(options, rctd, opcode, sa) {
                    Ok(data) => Flow::Done(put_data(task, &data, alloc_len)),
                    Err(s) => check(s),
                }
            }
        }
    }

    /// Checks shared by READ, WRITE and VERIFY: MAXIMUM TRANSFER LENGTH (SBC-3, Block Limits VPD
    /// page: larger is INVALID FIELD IN CDB) and the LBA range (SBC-3: LOGICAL BLOCK ADDRESS OUT OF
    /// RANGE).
    fn check_transfer(&self, x: Transfer) -> Result<(), Sense> {
        let max = self.lun.max_transfer_blocks();
        if max != 0 && x.blocks > max {
            return Err(Sense::invalid_cdb_field(x.len_field, None));
        }
        if !self.lba_in_range(x.lba, u64::from(x.blocks)) {
            return Err(Sense::lba_out_of_range());
        }
        Ok(())
    }

    fn bytes(&self, blocks: u64) -> u64 {
        // At most 2^32 blocks of at most 64 KiB: no overflow.
        blocks.saturating_mul(u64::from(self.lun.block_size()))
    }

    fn read(&self, task: &ScsiTask, x: Transfer) -> Flow {
        if let Err(s) = self.check_transfer(x) {
            return check(s);
        }
        // SBC-3, READ(10)/(12)/(16): TRANSFER LENGTH 0 transfers nothing and is not an error.
        if x.blocks == 0 {
            return good();
        }
        let bytes = self.bytes(u64::from(x.blocks));
        // The data-in buffer must hold the whole transfer (see the crate docs).
        let (Some(iovs), Ok(len)) = (task.data_in.sub(0, bytes), u32::try_from(bytes)) else {
            return check(Sense::invalid_cdb_field(x.len_field, None));
        };
        let io = IoOp::Read { offset_blocks: x.lba, num_blocks: u64::from(x.blocks), iovs };
        Flow::Io(io, Op::Single { kind: IoKind::Read, data_in_len: len, then_flush: false })
    }

    fn write(&self, task: &ScsiTask, x: Transfer) -> Flow {
        if let Err(s) = self.check_transfer(x) {
            return check(s);
        }
        if self.lun.bdev().read_only() {
            return check(Sense::write_protected());
        }
        if x.blocks == 0 {
            return good();
        }
        let bytes = self.bytes(u64::from(x.blocks));
        let Some(iovs) = task.data_out.sub(0, bytes) else {
            return check(Sense::invalid_cdb_field(x.len_field, None));
        };
        // SBC-3, WRITE and the Caching mode page: FUA, or any write while the write cache is
        // disabled, must be durable when it completes.
        let fua = x.fua || self.cache_disabled();
        let io = IoOp::Write { offset_blocks: x.lba, num_blocks: u64::from(x.blocks), iovs, fua };
        Flow::Io(io, Op::Single { kind: IoKind::Write, data_in_len: 0, then_flush: false })
    }

    fn verify(&self, task: &ScsiTask, x: Transfer, bytchk: ByteCheck) -> Flow {
        if let Err(s) = self.check_transfer(x) {
            return check(s);
        }
        // SBC-3, VERIFY: VERIFICATION LENGTH 0 verifies nothing; BYTCHK 0 only checks the medium,
        // which for a bdev means the range check above.
        if x.blocks == 0 || bytchk == ByteCheck::None {
            return good();
        }
        let bs = u64::from(self.lun.block_size());
        let single = bytchk == ByteCheck::SingleBlock;
        let want = if single { bs } else { self.bytes(u64::from(x.blocks)) };
        let Some(expect) = task.data_out.sub(0, want) else {
            return check(if single {
                Sense::illegal(Asc::INVALID_FIELD_IN_CDB)
            } else {
                Sense::invalid_cdb_field(x.len_field, None)
            });
        };
        let max_chunk = (VERIFY_CHUNK_BYTES / bs).max(1);
        let chunk_bytes = max_chunk.min(u64::from(x.blocks)).saturating_mul(bs);
        let align = self.lun.bdev().buf_align().max(8);
        let Some(buf) = usize::try_from(chunk_bytes).ok().and_then(|n| AlignedBuf::zeroed(n, align)) else {
            return Flow::Done(TaskResult::busy());
        };
        let mut v = Box::new(Verify {
            lba: x.lba,
            remaining: u64::from(x.blocks),
            chunk: 0,
            done: 0,
            max_chunk,
            bs,
            single,
            expect,
            buf,
        });
        match v.next_read() {
            Some(io) => Flow::Io(io, Op::Verify(v)),
            None => Flow::Done(TaskResult::busy()),
        }
    }

    fn write_same(&self, task: &ScsiTask, x: Transfer, unmap: bool, ndob: bool) -> Flow {
        let lun = &*self.lun;
        // SBC-3, WRITE SAME: more than MAXIMUM WRITE SAME LENGTH blocks is INVALID FIELD IN CDB.
        if x.blocks > lun.max_write_same_blocks() {
            return check(Sense::invalid_cdb_field(x.len_field, None));
        }
        if !self.lba_in_range(x.lba, u64::from(x.blocks)) {
            return check(Sense::lba_out_of_range());
        }
        if lun.bdev().read_only() {
            return check(Sense::write_protected());
        }
        let bs = u64::from(lun.block_size());
        let block = if ndob {
            None
        } else {
            let Some(block) = task.data_out.sub(0, bs) else {
                return check(Sense::illegal(Asc::INVALID_FIELD_IN_CDB));
            };
            Some(block)
        };
        let zero = match &block {
            None => true,
            Some(b) => {
                let mut data = vec![0u8; usize::try_from(bs).unwrap_or(0)];
                b.copy_to(&mut data);
                data.iter().all(|&x| x == 0)
            }
        };
        let range = BlockRange { offset_blocks: x.lba, num_blocks: u64::from(x.blocks) };
        let then_flush = self.cache_disabled() && self.can_flush();
        let single = Op::Single { kind: IoKind::Write, data_in_len: 0, then_flush };
        // SBC-3, WRITE SAME: with UNMAP=1 the device server may unmap instead of writing; vstor
        // does so for all-zero data only, so what reads back is still the pattern (or, without
        // LBPRZ, what the provisioning rules allow for an unmapped block).
        if zero && unmap && lun.thin_provisioned() {
            return Flow::Io(IoOp::Unmap { ranges: smallvec![range] }, single);
        }
        if zero && lun.bdev().io_type_supported(IoType::WriteZeroes) {
            return Flow::Io(
                IoOp::WriteZeroes { offset_blocks: range.offset_blocks, num_blocks: range.num_blocks },
                single,
            );
        }
        let (block, zero_buf) = match block {
            Some(b) => (b, None),
            None => {
                let align = lun.bdev().buf_align().max(8);
                let Some(mut z) = usize::try_from(bs).ok().and_then(|n| AlignedBuf::zeroed(n, align)) else {
                    return Flow::Done(TaskResult::busy());
                };
                let mut v = IoVecs::new();
                let len = z.len();
                // SAFETY: `z` moves into the pattern state below (its heap memory does not move)
                // and lives until the command completes; the bdev only reads it.
                unsafe { v.push_raw(z.as_mut_ptr(), len) };
                (v, Some(z))
            }
        };
        let segs = u64::try_from(block.len()).unwrap_or(u64::MAX).max(1);
        let per_chunk = (PATTERN_MAX_SEGMENTS / segs).clamp(1, PATTERN_CHUNK_BLOCKS);
        let mut p = Box::new(Pattern {
            lba: x.lba,
            remaining: u64::from(x.blocks),
            chunk: 0,
            per_chunk,
            fua: self.cache_disabled(),
            block,
            _zero: zero_buf,
        });
        let io = p.next_write();
        Flow::Io(io, Op::Pattern(p))
    }

    fn unmap(&self, task: &ScsiTask, param_len: u32) -> Flow {
        let lun = &*self.lun;
        // SBC-3, UNMAP and the Logical Block Provisioning VPD page: UNMAP exists only when LBPU is
        // set, i.e. the bdev can unmap.
        if !lun.bdev().backend().io_type_supported(IoType::Unmap) {
            return check(Sense::invalid_opcode());
        }
        if lun.bdev().read_only() {
            return check(Sense::write_protected());
        }
        // SBC-3, UNMAP: PARAMETER LIST LENGTH 0 transfers nothing and is not an error.
        if param_len == 0 {
            return good();
        }
        let Some(list) = read_params(&task.data_out, param_len) else {
            return check(Sense::invalid_cdb_field(7, None));
        };
        match self.unmap_ranges(&list) {
            Err(s) => check(s),
            Ok(ranges) if ranges.is_empty() => good(),
            Ok(ranges) => {
                Flow::Io(IoOp::Unmap { ranges }, Op::Single { kind: IoKind::Unmap, data_in_len: 0, then_flush: false })
            }
        }
    }

    /// Parses the UNMAP parameter list (SBC-3, UNMAP parameter list), every length checked against
    /// the data.
    fn unmap_ranges(&self, d: &[u8]) -> Result<SmallVec<[BlockRange; 1]>, Sense> {
        let lun = &*self.lun;
        // A list shorter than its 8-byte header: PARAMETER LIST LENGTH ERROR.
        if d.len() < 8 {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let data_len = be(d, 0, 2);
        let bd_len = be(d, 2, 2);
        // Descriptors claimed beyond the data sent: the list is truncated.
        if bd_len > u64::try_from(d.len() - 8).unwrap_or(u64::MAX) {
            return Err(Sense::illegal(Asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        // UNMAP DATA LENGTH counts the bytes after itself: at least the rest of the header plus
        // the descriptors.
        if data_len < bd_len + 6 {
            return Err(Sense::invalid_param_field(0, None));
        }
        // An incomplete last descriptor is ignored.
        let n = bd_len / 16;
        if n > u64::from(lun.max_unmap_descriptors()) {
            return Err(Sense::invalid_param_field(2, None));
        }
        let mut ranges = SmallVec::new();
        let mut total = 0u64;
        // `n` <= 4095 (max_unmap_descriptors is capped), and every descriptor lies within `d`.
        for i in 0..usize::try_from(n).unwrap_or(0) {
            let off = 8 + 16 * i;
            let lba = be(d, off, 8);
            let blocks = be(d, off + 8, 4);
            if blocks == 0 {
                continue;
            }
            if !self.lba_in_range(lba, blocks) {
                return Err(Sense::lba_out_of_range());
            }
            total = total.saturating_add(blocks);
            if total > u64::from(lun.max_unmap_blocks()) {
                return Err(Sense::invalid_param_field(at(off + 8), None));
            }
            ranges.push(BlockRange { offset_blocks: lba, num_blocks: blocks });
        }
        Ok(ranges)
    }

    fn mode_select(&self, task: &ScsiTask, ten: bool, param_len: u32, len_field: u16) -> Flow {
        // SPC-4, MODE SELECT: PARAMETER LIST LENGTH 0 transfers nothing and is not an error.
        if param_len == 0 {
            return good();
        }
        let Some(list) = read_params(&task.data_out, param_len) else {
            return check(Sense::invalid_cdb_field(len_field, None));
        };
        match mode::mode_select(&self.lun, ten, &list) {
            Err(s) => check(s),
            Ok(None) => good(),
            Ok(Some(wce)) => {
                let was = self.lun.set_write_cache(wce);
                // Turning the cache off: what it holds must become durable (SBC-3, Caching mode
                // page).
                if was && !wce && self.can_flush() {
                    Flow::Io(IoOp::Flush, Op::Single { kind: IoKind::Flush, data_in_len: 0, then_flush: false })
                } else {
                    good()
                }
            }
        }
    }

    /// The next step of command `p` after a bdev operation finished with `result`.
    fn advance(&self, op: &mut Op, result: IoResult) -> Next {
        match op {
            Op::Single { kind, data_in_len, then_flush } => {
                if let Err(e) = result {
                    return Next::Done(io_error(e, *kind));
                }
                if *then_flush {
                    *then_flush = false;
                    *kind = IoKind::Flush;
                    return Next::Io(IoOp::Flush);
                }
                Next::Done(TaskResult::good(*data_in_len))
            }
            Op::Verify(v) => {
                if let Err(e) = result {
                    return Next::Done(io_error(e, IoKind::Read));
                }
                if let Err(offset) = v.compare() {
                    // SBC-3, VERIFY: MISCOMPARE, INFORMATION = offset of the first differing byte.
                    return Next::Done(TaskResult::check_condition(Sense {
                        information: u32::try_from(offset).ok(),
                        ..Sense::new(SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY)
                    }));
                }
                v.lba += v.chunk;
                v.done += v.chunk;
                v.remaining -= v.chunk;
                if v.remaining == 0 {
                    return Next::Done(TaskResult::good(0));
                }
                match v.next_read() {
                    Some(io) => Next::Io(io),
                    None => Next::Done(TaskResult::busy()),
                }
            }
            Op::Pattern(p) => {
                if let Err(e) = result {
                    return Next::Done(io_error(e, IoKind::Write));
                }
                p.lba += p.chunk;
                p.remaining -= p.chunk;
                if p.remaining == 0 {
                    return Next::Done(TaskResult::good(0));
                }
                Next::Io(p.next_write())
            }
        }
    }
}

fn ua_sense() -> Sense {
    Sense::new(SenseKey::UnitAttention, Asc::CAPACITY_DATA_HAS_CHANGED)
}

impl IoSink for Inner {
    fn io_done(&self, tag: u64, result: IoResult) {
        let Ok(slot) = usize::try_from(tag) else { return };
        // Take the command out of its slot (the index stays reserved) while deciding what next.
        let Some(mut p) = self.state.borrow_mut().slots.get_mut(slot).and_then(Option::take) else {
            tracing::warn!(tag, "bdev completion for an empty slot");
            return;
        };
        match self.advance(&mut p.op, result) {
            Next::Io(io) => {
                if let Some(s) = self.state.borrow_mut().slots.get_mut(slot) {
                    *s = Some(p);
                }
                self.submit_io(slot, io);
            }
            Next::Done(r) => {
                self.state.borrow_mut().free.push(slot);
                self.finish(p.seq, p.cb, r);
            }
        }
    }
}
