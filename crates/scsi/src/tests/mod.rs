//! Test harness: a local reactor, LUN channels, a recording sink, data buffers split into odd
//! iovec segments, and a scriptable bdev backend (hold, fail, log).
#![allow(clippy::cast_possible_truncation)] // test sizes are small

mod basic;
mod inquiry;
mod lifecycle;
mod mode;
mod provisioning;
mod rw;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vstor_bdev::{
    malloc, null, uring, Bdev, BdevChannel, BdevError, BdevParams, IoCallback, IoError, IoOp, IoResult, IoType, IoVecs,
};
use vstor_reactor::{Mode, PollStatus, Poller, Reactor, ReactorConfig};

use crate::*;

/// Records completions and notices any delivered while `submit`/`reset` runs.
#[derive(Default)]
pub(crate) struct Recorder {
    pub done: RefCell<Vec<(u64, TaskResult)>>,
    pub in_call: Cell<bool>,
    pub reentered: Cell<bool>,
}

impl TaskSink for Recorder {
    fn task_done(&self, tag: u64, result: TaskResult) {
        if self.in_call.get() {
            self.reentered.set(true);
        }
        self.done.borrow_mut().push((tag, result));
    }
}

pub(crate) struct H {
    pub r: Reactor,
    pub rec: Rc<Recorder>,
    pub lun: Arc<Lun>,
    pub ch: LunChannel,
    next_tag: u64,
}

impl Drop for H {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert!(!self.rec.reentered.get(), "a completion was delivered inside submit or reset");
            let mut seen = std::collections::HashSet::new();
            for (t, _) in self.rec.done.borrow().iter() {
                assert!(seen.insert(*t), "tag {t} completed twice");
            }
        }
    }
}

impl H {
    pub fn new(bdev: Arc<Bdev>) -> Self {
        Self::with_opts(bdev, LunOptions::default())
    }

    pub fn with_opts(bdev: Arc<Bdev>, opts: LunOptions) -> Self {
        faults(|f| *f = Faults::default());
        let (mut r, _h) = Reactor::new_local(ReactorConfig { mode: Mode::Poll, ..Default::default() }).unwrap();
        let lun = Lun::new(bdev, 0, opts);
        let ch = LunChannel::new(lun.clone(), &mut r).expect("channel");
        Self { r, rec: Rc::new(Recorder::default()), lun, ch, next_tag: 0 }
    }

    /// Another channel on the same reactor and LUN.
    pub fn channel(&mut self) -> LunChannel {
        LunChannel::new(self.lun.clone(), &mut self.r).expect("channel")
    }

    pub fn submit_on(&mut self, ch: &mut LunChannel, task: ScsiTask) -> u64 {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.rec.in_call.set(true);
        ch.submit(task, TaskCallback { sink: self.rec.clone(), tag });
        self.rec.in_call.set(false);
        assert!(self.result(tag).is_none(), "completed inside submit");
        tag
    }

    pub fn submit(&mut self, task: ScsiTask) -> u64 {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.rec.in_call.set(true);
        self.ch.submit(task, TaskCallback { sink: self.rec.clone(), tag });
        self.rec.in_call.set(false);
        assert!(self.result(tag).is_none(), "completed inside submit");
        tag
    }

    pub fn reset(&mut self) -> u64 {
        self.next_tag += 1;
        let tag = self.next_tag;
        self.rec.in_call.set(true);
        self.ch.reset(TaskCallback { sink: self.rec.clone(), tag });
        self.rec.in_call.set(false);
        assert!(self.result(tag).is_none(), "reset completed inside the call");
        tag
    }

    pub fn result(&self, tag: u64) -> Option<TaskResult> {
        self.rec.done.borrow().iter().find(|(t, _)| *t == tag).map(|(_, r)| *r)
    }

    /// Position of `tag` in completion order.
    pub fn position(&self, tag: u64) -> Option<usize> {
        self.rec.done.borrow().iter().position(|(t, _)| *t == tag)
    }

    pub fn poll(&mut self, passes: usize) {
        for _ in 0..passes {
            self.r.run_once();
        }
    }

    pub fn wait(&mut self, tag: u64) -> TaskResult {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self.result(tag) {
                return r;
            }
            assert!(Instant::now() < deadline, "command {tag} did not complete");
            self.r.run_once();
        }
    }

    /// Runs `cdb` with no data buffers.
    pub fn cmd(&mut self, cdb: &[u8]) -> TaskResult {
        let t = self.submit(ScsiTask::new(cdb, IoVecs::new(), IoVecs::new()));
        self.wait(t)
    }

    /// Runs `cdb` with a data-in buffer of `len` bytes (split into odd segments); returns the
    /// result and the bytes it reported as transferred.
    pub fn cmd_in(&mut self, cdb: &[u8], len: usize) -> (TaskResult, Vec<u8>) {
        let mut buf = vec![0xEEu8; len];
        let t = self.submit(ScsiTask::new(cdb, IoVecs::new(), iovs(&mut buf, &ODD)));
        let r = self.wait(t);
        buf.truncate(r.data_in_len as usize);
        (r, buf)
    }

    /// Runs `cdb` with `data` as data-out (split into odd segments).
    pub fn cmd_out(&mut self, cdb: &[u8], data: &[u8]) -> TaskResult {
        let mut buf = data.to_vec();
        let t = self.submit(ScsiTask::new(cdb, iovs(&mut buf, &ODD), IoVecs::new()));
        let r = self.wait(t);
        drop(buf);
        r
    }

    /// Writes `data` at `lba` with WRITE(16) and expects GOOD.
    pub fn write(&mut self, lba: u64, data: &[u8]) {
        let bs = self.lun.block_size() as usize;
        let r = self.cmd_out(&cdb16(0x8A, 0, lba, (data.len() / bs) as u32), data);
        assert_eq!(r, TaskResult::good(0));
    }

    /// Reads `blocks` at `lba` with READ(16) and expects GOOD.
    pub fn read(&mut self, lba: u64, blocks: u32) -> Vec<u8> {
        let bs = self.lun.block_size() as usize;
        let (r, d) = self.cmd_in(&cdb16(0x88, 0, lba, blocks), blocks as usize * bs);
        assert_eq!(r, TaskResult::good((blocks as usize * bs) as u32));
        d
    }
}

/// Segment sizes that cut blocks at odd places.
pub(crate) const ODD: [usize; 7] = [1, 7, 500, 13, 1031, 3, 4093];

/// iovecs over `buf`, cut into pieces of `segs` sizes in turn.
pub(crate) fn iovs(buf: &mut [u8], segs: &[usize]) -> IoVecs {
    let mut v = IoVecs::new();
    let len = buf.len();
    let mut off = 0;
    let mut i = 0;
    while off < len {
        let n = segs[i % segs.len()].min(len - off);
        // SAFETY: every test waits for the task's completion before touching or dropping `buf`,
        // so the buffer outlives the task and is not borrowed while it runs.
        unsafe { v.push_raw(buf.as_mut_ptr().add(off), n) };
        off += n;
        i += 1;
    }
    v
}

pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(crate) const UUID: Uuid = Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff);

pub(crate) fn params(block_size: u32, num_blocks: u64) -> BdevParams {
    BdevParams { name: "d0".into(), uuid: Some(UUID), block_size, num_blocks, read_only: false }
}

pub(crate) fn malloc_bdev(block_size: u32, num_blocks: u64) -> Arc<Bdev> {
    malloc::create(params(block_size, num_blocks), false).unwrap()
}

pub(crate) fn null_bdev(block_size: u32, num_blocks: u64) -> Arc<Bdev> {
    null::create(params(block_size, num_blocks)).unwrap()
}

// ---- CDB builders -----------------------------------------------------------------------------

pub(crate) fn cdb6(op: u8, lba: u32, len: u8) -> Vec<u8> {
    let l = lba.to_be_bytes();
    vec![op, l[1] & 0x1F, l[2], l[3], len, 0]
}

pub(crate) fn cdb10(op: u8, b1: u8, lba: u32, len: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = op;
    c[1] = b1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

pub(crate) fn cdb12(op: u8, b1: u8, lba: u32, len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 12];
    c[0] = op;
    c[1] = b1;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&len.to_be_bytes());
    c
}

pub(crate) fn cdb16(op: u8, b1: u8, lba: u64, len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[1] = b1;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

pub(crate) fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x12, u8::from(evpd), page, a[0], a[1], 0]
}

// ---- sense assertions -------------------------------------------------------------------------

/// Asserts CHECK CONDITION with fixed-format sense `key/asc/ascq` and sense-key-specific bytes
/// `sks` (all zero when `None`), checking the raw bytes.
#[track_caller]
pub(crate) fn assert_check(r: &TaskResult, key: u8, asc: u8, ascq: u8, sks: Option<[u8; 3]>) {
    assert_eq!(r.status, ScsiStatus::CheckCondition, "{r:?}");
    assert_eq!(r.status.as_u8(), 0x02);
    assert_eq!(r.data_in_len, 0);
    let b = r.sense_bytes().expect("sense data");
    assert_eq!(b[0] & 0x7F, 0x70, "fixed format, current: {b:02x?}");
    assert_eq!(b[2] & 0x0F, key, "sense key: {b:02x?}");
    assert_eq!(b[7], 10, "additional sense length");
    assert_eq!((b[12], b[13]), (asc, ascq), "ASC/ASCQ: {b:02x?}");
    assert_eq!([b[15], b[16], b[17]], sks.unwrap_or([0; 3]), "sense-key specific: {b:02x?}");
}

/// INVALID FIELD IN CDB at `byte` (bit pointer `bit` when given).
#[track_caller]
pub(crate) fn assert_invalid_cdb(r: &TaskResult, byte: u16, bit: Option<u8>) {
    let b0 = 0xC0 | bit.map_or(0, |b| 0x08 | b);
    let [hi, lo] = byte.to_be_bytes();
    assert_check(r, 0x05, 0x24, 0x00, Some([b0, hi, lo]));
}

/// INVALID FIELD IN PARAMETER LIST at `byte` of the data-out buffer.
#[track_caller]
pub(crate) fn assert_invalid_param(r: &TaskResult, byte: u16, bit: Option<u8>) {
    let b0 = 0x80 | bit.map_or(0, |b| 0x08 | b);
    let [hi, lo] = byte.to_be_bytes();
    assert_check(r, 0x05, 0x26, 0x00, Some([b0, hi, lo]));
}

#[track_caller]
pub(crate) fn assert_lba_out_of_range(r: &TaskResult) {
    assert_check(r, 0x05, 0x21, 0x00, None);
}

// ---- the I/O target seen by LunChannel in tests ------------------------------------------------

/// One operation as the channel submitted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Logged {
    pub kind: IoType,
    pub offset: u64,
    pub blocks: u64,
    pub fua: bool,
    pub segments: usize,
}

/// What the test target does with the operations it gets (per test thread).
#[derive(Default)]
pub(crate) struct Faults {
    /// Keep operations (in `held`) instead of passing them to the bdev.
    pub hold: bool,
    /// Fail operations of this type with this error instead of passing them to the bdev.
    pub fail: Option<(IoType, IoError)>,
    pub log: Vec<Logged>,
    held: Vec<IoCallback>,
    /// Completions to deliver on the next reactor pass.
    ready: std::collections::VecDeque<(IoCallback, IoResult)>,
}

thread_local! {
    pub(crate) static FAULTS: RefCell<Faults> = RefCell::new(Faults::default());
}

pub(crate) fn faults<R>(f: impl FnOnce(&mut Faults) -> R) -> R {
    FAULTS.with(|x| f(&mut x.borrow_mut()))
}

/// Operations logged so far on this thread.
pub(crate) fn logged() -> Vec<Logged> {
    faults(|f| f.log.clone())
}

pub(crate) fn logged_kinds() -> Vec<IoType> {
    logged().iter().map(|l| l.kind).collect()
}

pub(crate) fn clear_log() {
    faults(|f| f.log.clear());
}

/// Completes every held operation with `result` on the next reactor pass; returns how many.
pub(crate) fn release_held(result: IoResult) -> usize {
    faults(|f| {
        let held = std::mem::take(&mut f.held);
        let n = held.len();
        f.ready.extend(held.into_iter().map(|cb| (cb, result)));
        n
    })
}

/// Completes the `n` oldest held operations with `result` on the next reactor pass.
pub(crate) fn release_first(n: usize, result: IoResult) {
    faults(|f| {
        let n = n.min(f.held.len());
        let first: Vec<IoCallback> = f.held.drain(..n).collect();
        f.ready.extend(first.into_iter().map(|cb| (cb, result)));
    });
}

pub(crate) fn held_count() -> usize {
    faults(|f| f.held.len())
}

/// Delivers the test target's completions, like the bdev's deferred poller.
struct TargetPoller;

struct TargetPollerRegistered;

impl Poller for TargetPoller {
    fn poll(&mut self) -> PollStatus {
        let n = faults(|f| f.ready.len());
        for _ in 0..n {
            let Some((cb, r)) = faults(|f| f.ready.pop_front()) else { break };
            cb.sink.io_done(cb.tag, r);
        }
        PollStatus::from_work(n > 0)
    }
}

/// Stands in for `BdevChannel` in `LunChannel` under test: logs every operation, then passes it
/// to a real `BdevChannel` or, as `FAULTS` says, holds or fails it.
pub(crate) struct TestTarget {
    ch: BdevChannel,
}

impl TestTarget {
    pub fn new(bdev: Arc<Bdev>, r: &mut Reactor) -> Result<Self, BdevError> {
        r.local_or_insert_with(|r| {
            r.add_poller(Box::new(TargetPoller));
            TargetPollerRegistered
        });
        Ok(Self { ch: BdevChannel::new(bdev, r)? })
    }

    pub fn submit(&mut self, op: IoOp, cb: IoCallback) {
        let (offset, blocks, fua, segments) = match &op {
            IoOp::Read { offset_blocks, num_blocks, iovs } => (*offset_blocks, *num_blocks, false, iovs.len()),
            IoOp::Write { offset_blocks, num_blocks, iovs, fua } => (*offset_blocks, *num_blocks, *fua, iovs.len()),
            IoOp::WriteZeroes { offset_blocks, num_blocks } => (*offset_blocks, *num_blocks, false, 0),
            IoOp::Unmap { ranges } => (
                ranges.first().map_or(0, |r| r.offset_blocks),
                ranges.iter().map(|r| r.num_blocks).sum(),
                false,
                ranges.len(),
            ),
            IoOp::Flush | IoOp::Reset => (0, 0, false, 0),
        };
        let kind = op.io_type();
        let pass = faults(|f| {
            f.log.push(Logged { kind, offset, blocks, fua, segments });
            if f.hold {
                f.held.push(cb.clone());
                return false;
            }
            match f.fail {
                Some((t, e)) if t == kind => {
                    f.ready.push_back((cb.clone(), Err(e)));
                    false
                }
                _ => true,
            }
        });
        if pass {
            self.ch.submit(op, cb);
        }
    }
}

/// A file under /var/tmp (or $VSTOR_TEST_DIR), removed on drop.
pub(crate) struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(bytes: u64) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::var("VSTOR_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::path::Path::new(&dir).join(format!("vstor-scsi-test-{}-{n}.img", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(bytes).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A uring bdev (write cache, unmap) or, with `fallocate: false`, an aio bdev without unmap and
/// write-zeroes, over a temp file of `blocks` 512-byte blocks.
pub(crate) fn file_bdev(blocks: u64, flavor: uring::Flavor, fallocate: bool) -> (TempFile, Arc<Bdev>) {
    let f = TempFile::new(blocks * 512);
    let b = uring::create(uring::UringOptions {
        name: "f0".into(),
        filename: f.0.to_string_lossy().into_owned(),
        block_size: None,
        uuid: Some(UUID),
        readonly: false,
        flavor,
        fallocate,
    })
    .unwrap();
    (f, b)
}
