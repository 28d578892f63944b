//! Per-reactor channels: validation, statistics and completion routing around a backend's own
//! per-reactor state.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use vstor_reactor::{clock, PollStatus, Poller, Reactor};

use crate::bdev::Bdev;
use crate::io::{IoCallback, IoError, IoOp, IoResult, IoType};
use crate::stats::ChannelStats;
use crate::BdevError;

/// A backend's per-reactor half. `submit` receives only validated requests.
pub trait ChannelBackend {
    /// Starts `op`. The backend must eventually finish `token`: with [`IoToken::defer`] from
    /// inside `submit`, or with [`IoToken::complete`] from its own poller.
    fn submit(&mut self, op: IoOp, token: IoToken);

    /// Does `op` at once, if this backend completes synchronously (RAM, null); `None` sends it
    /// through [`submit`](Self::submit) instead.
    fn try_now(&mut self, _op: &IoOp) -> Option<IoResult> {
        None
    }

    /// A reset arrived while I/O is in flight: a backend that holds I/O indefinitely (the error
    /// bdev's `pending` injection) must now finish it, so the reset can complete.
    fn reset(&mut self) {}
}

/// Channel state shared with in-flight tokens.
pub(crate) struct ChannelShared {
    stats: Arc<ChannelStats>,
    inflight: Cell<u64>,
    parked_resets: RefCell<Vec<IoToken>>,
}

/// Proof that an I/O was submitted, carried by the backend until it completes. Completing it
/// records statistics and calls the submitter's [`IoSink`](crate::IoSink).
#[must_use = "an I/O token must be completed"]
pub struct IoToken {
    cb: IoCallback,
    /// Submission time in clock ticks.
    start: u64,
    kind: IoType,
    bytes: u64,
    shared: Rc<ChannelShared>,
}

impl std::fmt::Debug for IoToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoToken({:?}, {} bytes)", self.kind, self.bytes)
    }
}

impl IoToken {
    /// Finishes the I/O now. Call only from a poller (never from inside `submit`), so the
    /// submitter is not re-entered.
    pub fn complete(self, result: IoResult) {
        let lat = clock::ticks().wrapping_sub(self.start);
        let sh = self.shared;
        sh.stats.record_done();
        sh.stats.record(self.kind, self.bytes, lat, &result);
        if self.kind != IoType::Reset {
            let n = sh.inflight.get().saturating_sub(1);
            sh.inflight.set(n);
            if n == 0 && !sh.parked_resets.borrow().is_empty() {
                let parked = std::mem::take(&mut *sh.parked_resets.borrow_mut());
                for t in parked {
                    t.defer(Ok(()));
                }
            }
        }
        self.cb.sink.io_done(self.cb.tag, result);
    }

    /// Finishes the I/O on the next pass of this reactor's completion poller. Safe to call from
    /// inside `submit`.
    pub fn defer(self, result: IoResult) {
        DEFERRED.with(|d| d.borrow_mut().push_back((self, result)));
    }

    /// Bytes the I/O moves (0 for flush/reset).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

thread_local! {
    static DEFERRED: RefCell<VecDeque<(IoToken, IoResult)>> = const { RefCell::new(VecDeque::new()) };
}

/// Runs deferred completions. One per reactor, registered by the first channel created there.
struct DeferredPoller;

/// Marker stored in reactor-local state once the deferred poller is registered.
struct DeferredRegistered;

impl Poller for DeferredPoller {
    fn poll(&mut self) -> PollStatus {
        // Only what is queued now: completions queued by callbacks run on the next pass.
        let n = DEFERRED.with(|d| d.borrow().len());
        for _ in 0..n {
            let Some((t, r)) = DEFERRED.with(|d| d.borrow_mut().pop_front()) else {
                break;
            };
            t.complete(r);
        }
        PollStatus::from_work(n > 0)
    }

    fn arm(&mut self) -> bool {
        DEFERRED.with(|d| !d.borrow().is_empty())
    }

    fn name(&self) -> &str {
        "bdev_deferred"
    }
}

/// One reactor's handle for doing I/O on one bdev. Not `Send`: it lives on its reactor.
pub struct BdevChannel {
    bdev: Arc<Bdev>,
    backend: Box<dyn ChannelBackend>,
    shared: Rc<ChannelShared>,
}

impl std::fmt::Debug for BdevChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BdevChannel({})", self.bdev.name())
    }
}

impl BdevChannel {
    /// Opens a channel on reactor `r` (call from a message running on that reactor).
    pub fn new(bdev: Arc<Bdev>, r: &mut Reactor) -> Result<Self, BdevError> {
        r.local_or_insert_with(|r| {
            r.add_poller(Box::new(DeferredPoller));
            DeferredRegistered
        });
        let backend = bdev.backend().create_channel(&bdev, r)?;
        let stats = Arc::new(ChannelStats::default());
        stats.core.store(r.core() as u64, std::sync::atomic::Ordering::Relaxed);
        bdev.register_stats(&stats);
        let shared = Rc::new(ChannelShared { stats, inflight: Cell::new(0), parked_resets: RefCell::new(Vec::new()) });
        Ok(Self { bdev, backend, shared })
    }

    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// I/Os submitted and not yet completed on this channel.
    pub fn inflight(&self) -> u64 {
        self.shared.inflight.get()
    }

    /// Submits `op`; `cb` is called exactly once when it completes, on this reactor, never from
    /// inside this call. Invalid requests complete with an error.
    pub fn submit(&mut self, op: IoOp, cb: IoCallback) {
        let _ = self.dispatch(op, cb, false);
    }

    /// Like [`submit`](Self::submit), but an I/O that completes at once (validation errors, RAM
    /// and null backends, a reset with nothing in flight) is returned here as `Some(result)` and
    /// `cb` is not called; `None` means `cb` will be called later. Saves a trip through the
    /// deferred-completion queue on the fast path.
    pub fn try_submit(&mut self, op: IoOp, cb: IoCallback) -> Option<IoResult> {
        self.dispatch(op, cb, true)
    }

    fn dispatch(&mut self, op: IoOp, cb: IoCallback, sync_ok: bool) -> Option<IoResult> {
        let kind = op.io_type();
        let bs = u64::from(self.bdev.block_size());
        let bytes = match &op {
            IoOp::Read { num_blocks, .. } | IoOp::Write { num_blocks, .. } | IoOp::WriteZeroes { num_blocks, .. } => {
                num_blocks.saturating_mul(bs)
            }
            IoOp::Unmap { ranges } => {
                ranges.iter().map(|r| r.num_blocks).fold(0u64, u64::saturating_add).saturating_mul(bs)
            }
            IoOp::Flush | IoOp::Reset => 0,
        };
        let start = clock::ticks();
        if let Err(e) = self.validate(&op) {
            tracing::debug!(bdev = self.bdev.name(), ?kind, "rejected I/O: {e}");
            if sync_ok {
                self.shared.stats.record(kind, bytes, 0, &Err(e));
                return Some(Err(e));
            }
            self.shared.stats.record_submit();
            self.shared.inflight.set(self.shared.inflight.get() + 1);
            IoToken { cb, start, kind, bytes, shared: self.shared.clone() }.defer(Err(e));
            return None;
        }
        if kind == IoType::Reset {
            if sync_ok && self.shared.inflight.get() == 0 {
                self.shared.stats.record(kind, 0, 0, &Ok(()));
                return Some(Ok(()));
            }
            self.shared.stats.record_submit();
            let token = IoToken { cb, start, kind, bytes, shared: self.shared.clone() };
            if self.shared.inflight.get() == 0 {
                token.defer(Ok(()));
            } else {
                self.shared.parked_resets.borrow_mut().push(token);
                self.backend.reset();
            }
            return None;
        }
        if sync_ok {
            if let Some(r) = self.backend.try_now(&op) {
                self.shared.stats.record(kind, bytes, clock::ticks().wrapping_sub(start), &r);
                return Some(r);
            }
        }
        self.shared.stats.record_submit();
        self.shared.inflight.set(self.shared.inflight.get() + 1);
        self.backend.submit(op, IoToken { cb, start, kind, bytes, shared: self.shared.clone() });
        None
    }

    fn validate(&self, op: &IoOp) -> IoResult {
        let kind = op.io_type();
        if self.bdev.read_only() && kind.modifies() {
            return Err(IoError::ReadOnly);
        }
        if !self.bdev.io_type_supported(kind) {
            return Err(IoError::Unsupported);
        }
        let cap = self.bdev.num_blocks();
        let in_range = |off: u64, n: u64| off.checked_add(n).is_some_and(|end| end <= cap);
        let bs = u64::from(self.bdev.block_size());
        match op {
            IoOp::Read { offset_blocks, num_blocks, iovs } | IoOp::Write { offset_blocks, num_blocks, iovs, .. } => {
                if !in_range(*offset_blocks, *num_blocks) {
                    return Err(IoError::OutOfRange);
                }
                if num_blocks.checked_mul(bs) != Some(iovs.total_len()) {
                    return Err(IoError::InvalidLength);
                }
            }
            IoOp::WriteZeroes { offset_blocks, num_blocks } => {
                if !in_range(*offset_blocks, *num_blocks) {
                    return Err(IoError::OutOfRange);
                }
            }
            IoOp::Unmap { ranges } => {
                if ranges.iter().any(|r| !in_range(r.offset_blocks, r.num_blocks)) {
                    return Err(IoError::OutOfRange);
                }
            }
            IoOp::Flush | IoOp::Reset => {}
        }
        Ok(())
    }
}

impl Drop for BdevChannel {
    fn drop(&mut self) {
        self.bdev.retire_stats(&self.shared.stats);
    }
}
