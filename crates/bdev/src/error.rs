//! `error` bdevs (SPDK's `bdev_error_*`): a virtual bdev named `EE_<base>` that passes I/O to its
//! base bdev and, when told to, injects faults into the next `num` reads, writes, unmaps or
//! flushes: fail them, hold them (`pending`: the I/O never completes until
//! `bdev_error_resume_pending` or a reset), or corrupt their data (one byte XORed at an offset:
//! reads after they complete, writes in a bounce copy so the submitter's buffer is untouched).
//! For tests of what a guest sees when storage misbehaves.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use uuid::Uuid;
use vstor_reactor::{PollStatus, Poller, Reactor};

use crate::mem::AlignedBuf;
use crate::{
    Bdev, BdevBackend, BdevChannel, BdevError, BdevParams, ChannelBackend, IoCallback, IoError, IoOp, IoResult, IoSink,
    IoToken, IoType, IoVecs,
};

/// Product name, as SPDK prints it.
pub const PRODUCT: &str = "Error Injection Disk";
/// Prefix SPDK gives error bdevs.
pub const PREFIX: &str = "EE_";

/// What to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Failure,
    Pending,
    CorruptData,
}

impl std::str::FromStr for ErrorType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "failure" => ErrorType::Failure,
            "pending" => ErrorType::Pending,
            "corrupt_data" => ErrorType::CorruptData,
            "nomem" | "nvme_failure" => {
                return Err(format!("'{s}' is not supported by vstor (failure, pending, corrupt_data are)"))
            }
            o => return Err(format!("'{o}' is not one of failure, pending, corrupt_data")),
        })
    }
}

/// Which I/O the injection applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    One(IoType),
    All,
    /// Stop every injection.
    Clear,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "read" => Target::One(IoType::Read),
            "write" => Target::One(IoType::Write),
            "unmap" => Target::One(IoType::Unmap),
            "flush" => Target::One(IoType::Flush),
            "all" => Target::All,
            "clear" => Target::Clear,
            o => return Err(format!("'{o}' is not one of read, write, unmap, flush, all, clear")),
        })
    }
}

/// One injection: `num` more I/Os of its type get `kind`, once the channel has `qd` in flight.
#[derive(Default)]
struct Slot {
    /// 0 none, 1 failure, 2 pending, 3 corrupt.
    kind: AtomicU8,
    num: AtomicU32,
    qd: AtomicU64,
    corrupt_offset: AtomicU64,
    corrupt_value: AtomicU8,
}

const INJECTABLE: [IoType; 4] = [IoType::Read, IoType::Write, IoType::Unmap, IoType::Flush];

fn slot_index(t: IoType) -> Option<usize> {
    INJECTABLE.iter().position(|&x| x == t)
}

struct Shared {
    slots: [Slot; 4],
    /// Bumped by `resume_pending`: channels release what they hold when they see a new value.
    resume: AtomicU64,
}

impl Shared {
    /// Takes one injection for an I/O of type `t` on a channel with `inflight` I/Os.
    fn take(&self, t: IoType, inflight: u64) -> Option<(ErrorType, u64, u8)> {
        let s = &self.slots[slot_index(t)?];
        let kind = match s.kind.load(Ordering::Relaxed) {
            1 => ErrorType::Failure,
            2 => ErrorType::Pending,
            3 => ErrorType::CorruptData,
            _ => return None,
        };
        if inflight < s.qd.load(Ordering::Relaxed) {
            return None;
        }
        s.num.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).ok()?;
        Some((kind, s.corrupt_offset.load(Ordering::Relaxed), s.corrupt_value.load(Ordering::Relaxed)))
    }
}

struct ErrorBackend {
    base: Arc<Bdev>,
    owner: String,
    shared: Arc<Shared>,
}

impl BdevBackend for ErrorBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT
    }

    fn io_type_supported(&self, t: IoType) -> bool {
        self.base.io_type_supported(t)
    }

    fn create_channel(&self, _bdev: &Arc<Bdev>, r: &mut Reactor) -> Result<Box<dyn ChannelBackend>, BdevError> {
        let base = BdevChannel::new(self.base.clone(), r)?;
        let list = r.local_or_insert_with(|r| {
            let list: Rc<RefCell<Vec<Weak<ErrChannel>>>> = Rc::default();
            r.add_poller(Box::new(ResumePoller { channels: list.clone() }));
            ErrList(list)
        });
        let me = Rc::new(ErrChannel {
            st: RefCell::new(ChanState {
                base,
                slots: Vec::new(),
                free: Vec::new(),
                held: VecDeque::new(),
                inflight: 0,
                resume_seen: self.shared.resume.load(Ordering::Relaxed),
            }),
            shared: self.shared.clone(),
        });
        list.0.borrow_mut().push(Rc::downgrade(&me));
        Ok(Box::new(ErrHandle(me)))
    }

    fn write_cache(&self) -> bool {
        self.base.write_cache()
    }

    fn buf_align(&self) -> usize {
        self.base.buf_align()
    }

    fn driver_specific(&self) -> Value {
        json!({ "error": { "base_bdev_name": self.base.name() } })
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        Some(("bdev_error_create", json!({ "base_name": self.base.name(), "uuid": bdev.uuid().to_string() })))
    }

    fn on_delete(&self) {
        self.base.release(&self.owner);
    }

    fn flush_sync(&self) -> std::io::Result<()> {
        self.base.backend().flush_sync()
    }
}

/// What a forwarded I/O needs when it comes back.
struct Outstanding {
    token: IoToken,
    /// Reads to corrupt on completion: (buffers, offset, value).
    corrupt_read: Option<(IoVecs, u64, u8)>,
    /// The bounce copy a corrupted write was sent from.
    _bounce: Option<AlignedBuf>,
}

struct ChanState {
    base: BdevChannel,
    slots: Vec<Option<Outstanding>>,
    free: Vec<usize>,
    held: VecDeque<(IoOp, IoToken)>,
    /// I/Os submitted here and not yet completed (held ones included).
    inflight: u64,
    resume_seen: u64,
}

struct ErrChannel {
    st: RefCell<ChanState>,
    shared: Arc<Shared>,
}

impl ErrChannel {
    /// Sends `op` to the base bdev; `token` completes when it returns.
    fn forward(self: &Rc<Self>, st: &mut ChanState, op: IoOp, out: Outstanding) {
        let slot = match st.free.pop() {
            Some(i) => i,
            None => {
                st.slots.push(None);
                st.slots.len() - 1
            }
        };
        st.slots[slot] = Some(out);
        let sink: Rc<dyn IoSink> = self.clone();
        st.base.submit(op, IoCallback { sink, tag: slot as u64 });
    }

    fn submit(self: &Rc<Self>, op: IoOp, token: IoToken) {
        let mut st = self.st.borrow_mut();
        // As SPDK: the queue depth is what was in flight before this I/O.
        let before = st.inflight;
        st.inflight += 1;
        let plain = |token| Outstanding { token, corrupt_read: None, _bounce: None };
        match self.shared.take(op.io_type(), before) {
            None => self.forward(&mut st, op, plain(token)),
            Some((ErrorType::Failure, ..)) => {
                st.inflight -= 1;
                token.defer(Err(IoError::Os(libc::EIO)));
            }
            Some((ErrorType::Pending, ..)) => {
                if st.held.is_empty() {
                    // Only a resume after this point releases it.
                    st.resume_seen = self.shared.resume.load(Ordering::Relaxed);
                }
                st.held.push_back((op, token));
            }
            Some((ErrorType::CorruptData, off, val)) => match op {
                IoOp::Read { offset_blocks, num_blocks, iovs } => {
                    let keep = iovs.sub(0, iovs.total_len());
                    let out = Outstanding { token, corrupt_read: keep.map(|v| (v, off, val)), _bounce: None };
                    self.forward(&mut st, IoOp::Read { offset_blocks, num_blocks, iovs }, out);
                }
                IoOp::Write { offset_blocks, num_blocks, iovs, fua } => {
                    let len = usize::try_from(iovs.total_len()).unwrap_or(usize::MAX);
                    let Some(mut buf) = AlignedBuf::zeroed(len, st.base.bdev().buf_align().max(8)) else {
                        st.inflight -= 1;
                        token.defer(Err(IoError::NoMemory));
                        return;
                    };
                    iovs.copy_to(buf.as_mut_slice());
                    if let Some(b) = usize::try_from(off).ok().and_then(|o| buf.as_mut_slice().get_mut(o)) {
                        *b ^= val;
                    }
                    let mut bounce = IoVecs::new();
                    // SAFETY: the buffer is kept in the I/O's slot (`_bounce`) until it completes.
                    unsafe { bounce.push_raw(buf.as_mut_ptr(), len) };
                    let out = Outstanding { token, corrupt_read: None, _bounce: Some(buf) };
                    self.forward(&mut st, IoOp::Write { offset_blocks, num_blocks, iovs: bounce, fua }, out);
                }
                other => self.forward(&mut st, other, plain(token)),
            },
        }
    }

    /// Finishes every held I/O with `Aborted` (a reset came).
    fn abort_held(&self) {
        let mut st = self.st.borrow_mut();
        while let Some((_, token)) = st.held.pop_front() {
            st.inflight -= 1;
            token.defer(Err(IoError::Aborted));
        }
    }

    /// Sends held I/O on if `resume_pending` was called since the last look. Returns whether it
    /// did anything, or still holds I/O.
    fn poll(self: &Rc<Self>) -> bool {
        let mut st = self.st.borrow_mut();
        if st.held.is_empty() {
            return false;
        }
        let now = self.shared.resume.load(Ordering::Relaxed);
        if now != st.resume_seen {
            st.resume_seen = now;
            while let Some((op, token)) = st.held.pop_front() {
                self.forward(&mut st, op, Outstanding { token, corrupt_read: None, _bounce: None });
            }
        }
        true
    }
}

impl IoSink for ErrChannel {
    fn io_done(&self, tag: u64, result: IoResult) {
        let out = {
            let mut st = self.st.borrow_mut();
            let i = usize::try_from(tag).unwrap_or(usize::MAX);
            let o = st.slots.get_mut(i).and_then(Option::take);
            if o.is_some() {
                st.free.push(i);
                st.inflight -= 1;
            }
            o
        };
        let Some(o) = out else { return };
        if let (Ok(()), Some((iovs, off, val))) = (&result, &o.corrupt_read) {
            let mut b = [0u8];
            if iovs.copy_to_at(*off, &mut b) == 1 {
                b[0] ^= val;
                iovs.copy_from_at(*off, &b);
            }
        }
        o.token.complete(result);
    }
}

struct ErrHandle(Rc<ErrChannel>);

impl ChannelBackend for ErrHandle {
    fn submit(&mut self, op: IoOp, token: IoToken) {
        self.0.submit(op, token);
    }

    fn reset(&mut self) {
        self.0.abort_held();
    }
}

/// Reactor-local list of the error channels on this reactor.
struct ErrList(Rc<RefCell<Vec<Weak<ErrChannel>>>>);

/// Releases held I/O after `resume_pending`. Reports busy while anything is held, so a sleeping
/// reactor notices a resume (this is a test bdev: it spins while it holds I/O).
struct ResumePoller {
    channels: Rc<RefCell<Vec<Weak<ErrChannel>>>>,
}

impl Poller for ResumePoller {
    fn poll(&mut self) -> PollStatus {
        let live: Vec<Rc<ErrChannel>> = {
            let mut v = self.channels.borrow_mut();
            v.retain(|w| w.strong_count() > 0);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        let mut busy = false;
        for ch in live {
            busy |= ch.poll();
        }
        PollStatus::from_work(busy)
    }

    fn arm(&mut self) -> bool {
        self.channels.borrow().iter().filter_map(Weak::upgrade).any(|c| !c.st.borrow().held.is_empty())
    }

    fn name(&self) -> &str {
        "bdev_error"
    }
}

/// Creates `EE_<base>` over `base` (claimed exclusively).
pub fn create(uuid: Option<Uuid>, base: Arc<Bdev>) -> Result<Arc<Bdev>, BdevError> {
    let name = format!("{PREFIX}{}", base.name());
    let owner = format!("error:{name}");
    base.claim(&owner, true)?;
    let p = BdevParams {
        name,
        uuid,
        block_size: base.block_size(),
        num_blocks: base.num_blocks(),
        read_only: base.read_only(),
    };
    let shared = Arc::new(Shared { slots: Default::default(), resume: AtomicU64::new(0) });
    let backend = ErrorBackend { base: base.clone(), owner: owner.clone(), shared };
    Bdev::new(p, Box::new(backend)).inspect_err(|_| base.release(&owner))
}

fn backend(bdev: &Bdev) -> Result<&ErrorBackend, BdevError> {
    let b: &dyn std::any::Any = bdev.backend();
    b.downcast_ref::<ErrorBackend>().ok_or_else(|| BdevError::WrongType {
        name: bdev.name().to_string(),
        is: bdev.product_name(),
        expected: PRODUCT.to_string(),
    })
}

/// An injection request (`bdev_error_inject_error`).
#[derive(Debug, Clone, Copy)]
pub struct Injection {
    pub target: Target,
    pub kind: ErrorType,
    pub num: u32,
    pub queue_depth: u64,
    pub corrupt_offset: u64,
    pub corrupt_value: u8,
}

/// Sets (or, with [`Target::Clear`] or `num` 0, stops) an injection.
pub fn inject(bdev: &Bdev, i: Injection) -> Result<(), BdevError> {
    let b = backend(bdev)?;
    if i.kind == ErrorType::CorruptData && i.corrupt_value == 0 && i.num > 0 && i.target != Target::Clear {
        return Err(BdevError::InvalidParam {
            param: "corrupt_value",
            msg: "must be 1-255 (0 would change nothing)".into(),
        });
    }
    let code = match i.kind {
        ErrorType::Failure => 1,
        ErrorType::Pending => 2,
        ErrorType::CorruptData => 3,
    };
    let set = |s: &Slot| {
        s.kind.store(code, Ordering::Relaxed);
        s.qd.store(i.queue_depth, Ordering::Relaxed);
        s.corrupt_offset.store(i.corrupt_offset, Ordering::Relaxed);
        s.corrupt_value.store(i.corrupt_value, Ordering::Relaxed);
        s.num.store(i.num, Ordering::Relaxed);
    };
    match i.target {
        Target::Clear => b.shared.slots.iter().for_each(|s| s.num.store(0, Ordering::Relaxed)),
        Target::All => b.shared.slots.iter().for_each(set),
        Target::One(t) => {
            let idx = slot_index(t).ok_or_else(|| BdevError::InvalidParam {
                param: "io_type",
                msg: format!("{t:?} cannot be injected"),
            })?;
            set(&b.shared.slots[idx]);
        }
    }
    Ok(())
}

/// Stops `pending` injections and lets every held I/O go on to the base bdev.
pub fn resume_pending(bdev: &Bdev) -> Result<(), BdevError> {
    let b = backend(bdev)?;
    for s in &b.shared.slots {
        if s.kind.load(Ordering::Relaxed) == 2 {
            s.num.store(0, Ordering::Relaxed);
        }
    }
    b.shared.resume.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
