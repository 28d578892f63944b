//! Per-core reactors.
//!
//! A reactor is one thread pinned to one core. It owns a set of *pollers* (queue pollers, io_uring
//! completion reapers, timers) and runs them in a loop. Other threads never touch a reactor's data:
//! they send it a *message* (a closure run on the reactor between poller passes) through a
//! [`ReactorHandle`], and the reactor is woken through an eventfd if it sleeps.
//!
//! Three modes decide what a reactor does when its pollers report no work:
//! - [`Mode::Poll`]: keep spinning (lowest latency, one full core per reactor);
//! - [`Mode::Interrupt`]: arm every wake-up source and sleep in `epoll_wait` after one idle pass;
//! - [`Mode::Adaptive`] (default): spin while busy; after `idle_threshold` without work, arm and sleep.
//!
//! Arming follows the usual race-free order: a poller enables its notifications, then re-checks
//! for work ([`Poller::arm`] returns `true` if some arrived), and only then does the reactor sleep.

pub mod clock;
pub mod cpumask;
#[cfg(target_arch = "x86_64")]
pub mod seccomp;
mod sys;

use std::any::{Any, TypeId};
use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use cpumask::{CpuMask, CpuMaskError};
use sys::{Epoll, Timer, WakeFd};

/// What a poller found on its last pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// Did work; the reactor should poll again soon.
    Busy,
    /// Found nothing to do.
    Idle,
}

impl PollStatus {
    /// `Busy` if `did_work`.
    pub fn from_work(did_work: bool) -> Self {
        if did_work {
            PollStatus::Busy
        } else {
            PollStatus::Idle
        }
    }
}

/// A unit of recurring work owned by one reactor.
pub trait Poller: Any {
    /// Does a bounded amount of work.
    fn poll(&mut self) -> PollStatus;

    /// Called before the reactor sleeps: enable this poller's wake-up sources (guest kick
    /// notifications, io_uring eventfd), then re-check for work. Returns `true` if work is already
    /// pending, in which case the reactor does not sleep.
    fn arm(&mut self) -> bool {
        false
    }

    /// Called after the reactor wakes in adaptive mode: the poller may suppress notifications
    /// again while the reactor spins.
    fn disarm(&mut self) {}

    /// A short name for logs and `framework_get_reactors`.
    fn name(&self) -> &str {
        "poller"
    }
}

/// A closure run on a reactor, with the reactor itself as argument.
pub type Msg = Box<dyn FnOnce(&mut Reactor) + Send + 'static>;

/// How a reactor behaves when idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Spin always.
    Poll,
    /// Sleep after every idle pass.
    Interrupt,
    /// Spin while busy; sleep after an idle period.
    Adaptive,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poll" | "polling" => Ok(Mode::Poll),
            "interrupt" => Ok(Mode::Interrupt),
            "adaptive" => Ok(Mode::Adaptive),
            other => Err(format!("reactor mode '{other}' is not one of poll, interrupt, adaptive")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Poll => "poll",
            Mode::Interrupt => "interrupt",
            Mode::Adaptive => "adaptive",
        })
    }
}

/// Settings shared by every reactor of a set.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    pub mode: Mode,
    /// In adaptive mode, how long a reactor spins without work before it sleeps.
    pub idle_threshold: Duration,
    /// Pin each reactor thread to its core. Turned off only by tests that run many reactor sets.
    pub pin: bool,
    /// Confine each reactor thread with the seccomp filter of [`seccomp`] once it is set up.
    pub seccomp: bool,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        Self { mode: Mode::Adaptive, idle_threshold: Duration::from_micros(300), pin: true, seccomp: false }
    }
}

/// Errors starting or talking to reactors.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    #[error("core {core} is not available to this process (allowed cores: {allowed:?})")]
    CoreNotAllowed { core: usize, allowed: Vec<usize> },
    #[error("reactor on core {0} has stopped")]
    Gone(usize),
    #[error("reactor on core {0} did not answer within {1:?}")]
    Timeout(usize, Duration),
    #[error("setting up reactor on core {core}: {source}")]
    Setup { core: usize, source: std::io::Error },
}

/// Counters a reactor publishes for `framework_get_reactors`. Written only by the reactor.
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Clock ticks ([`clock::ticks`]) spent in passes that found work.
    pub busy_ticks: AtomicU64,
    /// Clock ticks spent in idle passes and asleep.
    pub idle_ticks: AtomicU64,
    /// Times the reactor went to sleep in `epoll_wait`.
    pub sleeps: AtomicU64,
    /// Kernel thread id.
    pub tid: AtomicI32,
    /// Number of pollers registered.
    pub pollers: AtomicU64,
}

struct Shared {
    index: usize,
    core: usize,
    sleeping: AtomicBool,
    /// Messages sent and not yet taken: lets a busy reactor skip the channel when it is empty
    /// (incremented before the send, so it never underflows).
    pending: AtomicUsize,
    wake: WakeFd,
    stats: ReactorStats,
}

/// A cloneable, thread-safe way to reach one reactor.
#[derive(Clone)]
pub struct ReactorHandle {
    shared: Arc<Shared>,
    tx: Sender<Msg>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReactorHandle(core {})", self.shared.core)
    }
}

impl ReactorHandle {
    /// Index of the reactor in its set (0-based).
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The core the reactor runs on.
    pub fn core(&self) -> usize {
        self.shared.core
    }

    /// Published counters.
    pub fn stats(&self) -> &ReactorStats {
        &self.shared.stats
    }

    /// Queues `f` to run on the reactor. Does not wait.
    pub fn send(&self, f: impl FnOnce(&mut Reactor) + Send + 'static) -> Result<(), ReactorError> {
        self.shared.pending.fetch_add(1, Ordering::Release);
        if self.tx.send(Box::new(f)).is_err() {
            self.shared.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(ReactorError::Gone(self.shared.core));
        }
        // Pairs with the fence in `Reactor::sleep`: either the reactor sees the message before it
        // sleeps, or we see `sleeping` and wake it.
        fence(Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.shared.wake.signal();
        }
        Ok(())
    }

    /// Runs `f` on the reactor and waits for its result.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
    ) -> Result<R, ReactorError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(move |r| {
            let _ = tx.send(f(r));
        })?;
        rx.recv().map_err(|_| ReactorError::Gone(self.shared.core))
    }

    /// Like [`call`](Self::call), but gives up after `timeout`.
    pub fn call_timeout<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
    ) -> Result<R, ReactorError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(move |r| {
            let _ = tx.send(f(r));
        })?;
        rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => ReactorError::Timeout(self.shared.core, timeout),
            RecvTimeoutError::Disconnected => ReactorError::Gone(self.shared.core),
        })
    }
}

/// Identifies a poller on one reactor. Stale ids (of removed pollers) are detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PollerId {
    slot: u32,
    generation: u32,
}

struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

struct Entry {
    poller: Box<dyn Poller>,
    /// `Some` for timers: run once per period (in clock ticks) instead of every pass.
    period: Option<u64>,
    /// Clock tick at which a timer runs next.
    next_run: u64,
}

/// A reactor's epoll set, shared with its pollers so they can add their own wake-up fds.
#[derive(Clone)]
pub struct EpollHandle(Rc<Epoll>);

impl EpollHandle {
    /// Adds `fd` (level-triggered, readable) as a wake-up source.
    pub fn add(&self, fd: RawFd) -> std::io::Result<()> {
        self.0.add(fd, TOKEN_POLLER)
    }

    /// Removes `fd`. Removing an fd that was never added is not an error.
    pub fn remove(&self, fd: RawFd) {
        self.0.remove(fd);
    }
}

const TOKEN_WAKE: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const TOKEN_POLLER: u64 = 3;

/// One reactor. Lives on its own thread; reached from elsewhere through [`ReactorHandle`].
pub struct Reactor {
    shared: Arc<Shared>,
    handle: ReactorHandle,
    rx: Receiver<Msg>,
    stashed: Option<Msg>,
    cfg: ReactorConfig,
    slots: Vec<Slot>,
    free: Vec<u32>,
    epoll: EpollHandle,
    timer: Timer,
    stop: bool,
    in_pass: Cell<bool>,
    locals: HashMap<TypeId, Box<dyn Any>>,
    timers: usize,
}

impl Reactor {
    fn new(index: usize, core: usize, cfg: ReactorConfig) -> Result<(Reactor, ReactorHandle), ReactorError> {
        let setup = |source| ReactorError::Setup { core, source };
        let shared = Arc::new(Shared {
            index,
            core,
            sleeping: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            wake: WakeFd::new().map_err(setup)?,
            stats: ReactorStats::default(),
        });
        let (tx, rx) = mpsc::channel();
        let handle = ReactorHandle { shared: shared.clone(), tx };
        let epoll = Epoll::new().map_err(setup)?;
        let timer = Timer::new().map_err(setup)?;
        epoll.add(shared.wake.as_raw_fd(), TOKEN_WAKE).map_err(setup)?;
        epoll.add(timer.as_raw_fd(), TOKEN_TIMER).map_err(setup)?;
        let r = Reactor {
            shared,
            handle: handle.clone(),
            rx,
            stashed: None,
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            epoll: EpollHandle(Rc::new(epoll)),
            timer,
            stop: false,
            in_pass: Cell::new(false),
            locals: HashMap::new(),
            timers: 0,
        };
        Ok((r, handle))
    }

    /// Creates a reactor for the current thread without starting a loop; drive it with
    /// [`run_once`](Self::run_once). For tests and tools that own their thread.
    pub fn new_local(cfg: ReactorConfig) -> Result<(Reactor, ReactorHandle), ReactorError> {
        let (r, h) = Self::new(0, 0, cfg)?;
        r.shared.stats.tid.store(sys::gettid(), Ordering::Relaxed);
        Ok((r, h))
    }

    /// Index in the reactor set.
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The core this reactor runs on.
    pub fn core(&self) -> usize {
        self.shared.core
    }

    /// A handle to this reactor, for pollers that need to message it later.
    pub fn handle(&self) -> ReactorHandle {
        self.handle.clone()
    }

    /// The reactor's epoll set, for pollers that register wake-up fds.
    pub fn epoll(&self) -> EpollHandle {
        self.epoll.clone()
    }

    /// The reactor's mode.
    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }

    /// Registers a poller that runs on every pass.
    pub fn add_poller(&mut self, poller: Box<dyn Poller>) -> PollerId {
        self.insert(Entry { poller, period: None, next_run: 0 })
    }

    /// Registers a poller that runs once per `period` (a timer).
    pub fn add_timer(&mut self, poller: Box<dyn Poller>, period: Duration) -> PollerId {
        let period = clock::duration_to_ticks(period).max(1);
        let next_run = clock::ticks().saturating_add(period);
        self.timers += 1;
        self.insert(Entry { poller, period: Some(period), next_run })
    }

    fn insert(&mut self, entry: Entry) -> PollerId {
        assert!(!self.in_pass.get(), "pollers are added from messages, not from inside a poll pass");
        self.shared.stats.pollers.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.free.pop() {
            let s = &mut self.slots[slot as usize];
            s.entry = Some(entry);
            return PollerId { slot, generation: s.generation };
        }
        let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 pollers");
        self.slots.push(Slot { generation: 0, entry: Some(entry) });
        PollerId { slot, generation: 0 }
    }

    /// Removes a poller and hands it back (so its owner can drain or drop it).
    pub fn remove_poller(&mut self, id: PollerId) -> Option<Box<dyn Poller>> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        let e = s.entry.take()?;
        if e.period.is_some() {
            self.timers -= 1;
        }
        s.generation = s.generation.wrapping_add(1);
        self.free.push(id.slot);
        self.shared.stats.pollers.fetch_sub(1, Ordering::Relaxed);
        Some(e.poller)
    }

    /// The poller `id`, if it still exists and is a `T`.
    pub fn poller_mut<T: Poller>(&mut self, id: PollerId) -> Option<&mut T> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        let p: &mut dyn Any = s.entry.as_mut()?.poller.as_mut();
        p.downcast_mut::<T>()
    }

    /// Reactor-local state of type `T` (one per reactor), created by `init` on first use. Layers
    /// keep per-core services here, such as the bdev layer's io_uring ring.
    pub fn local_or_insert_with<T: Any>(&mut self, init: impl FnOnce(&mut Reactor) -> T) -> &mut T {
        let key = TypeId::of::<T>();
        if !self.locals.contains_key(&key) {
            let v = init(self);
            self.locals.insert(key, Box::new(v));
        }
        self.locals.get_mut(&key).and_then(|b| b.downcast_mut::<T>()).expect("local of the right type")
    }

    /// Asks the loop to end after the current message. Pollers are dropped in order.
    pub fn stop(&mut self) {
        self.stop = true;
    }

    /// Runs queued messages. Returns how many ran.
    fn drain_messages(&mut self) -> usize {
        let mut n = 0;
        if let Some(m) = self.stashed.take() {
            m(self);
            n += 1;
        }
        if self.shared.pending.load(Ordering::Acquire) == 0 {
            return n;
        }
        // Bounded so a flood of messages cannot starve the pollers.
        while n < 64 {
            match self.rx.try_recv() {
                Ok(m) => {
                    self.shared.pending.fetch_sub(1, Ordering::Relaxed);
                    m(self);
                    n += 1;
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
            if self.stop {
                break;
            }
        }
        n
    }

    /// One pass: messages, then every poller, then due timers. Returns whether anything was busy.
    pub fn run_once(&mut self) -> bool {
        let mut busy = self.drain_messages() > 0;
        if self.stop {
            return busy;
        }
        // Only timers need the clock; the TSC read costs a few ns (clock_gettime costs far more
        // under some hypervisors).
        let now = if self.timers > 0 { Some(clock::ticks()) } else { None };
        self.in_pass.set(true);
        for s in self.slots.iter_mut() {
            let Some(e) = s.entry.as_mut() else { continue };
            match (e.period, now) {
                (None, _) | (Some(_), None) => busy |= e.poller.poll() == PollStatus::Busy,
                (Some(period), Some(now)) => {
                    if now >= e.next_run {
                        busy |= e.poller.poll() == PollStatus::Busy;
                        e.next_run = now.saturating_add(period);
                    }
                }
            }
        }
        self.in_pass.set(false);
        busy
    }

    /// The clock tick at which the next timer is due.
    fn next_deadline(&self) -> Option<u64> {
        self.slots.iter().filter_map(|s| s.entry.as_ref()).filter(|e| e.period.is_some()).map(|e| e.next_run).min()
    }

    /// Arms wake-up sources and sleeps until one fires or the next timer is due.
    fn sleep(&mut self) {
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence in `ReactorHandle::send`.
        fence(Ordering::SeqCst);
        let mut pending = false;
        self.in_pass.set(true);
        for s in self.slots.iter_mut() {
            if let Some(e) = s.entry.as_mut() {
                pending |= e.poller.arm();
            }
        }
        self.in_pass.set(false);
        if !pending {
            if let Ok(m) = self.rx.try_recv() {
                self.shared.pending.fetch_sub(1, Ordering::Relaxed);
                self.stashed = Some(m);
                pending = true;
            }
        }
        if !pending {
            let deadline = self.next_deadline();
            if let Some(d) = deadline {
                let wait = clock::ticks_to_ns(d.saturating_sub(clock::ticks()));
                self.timer.arm_in(Duration::from_nanos(wait));
            }
            self.shared.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.epoll.0.wait_any() {
                tracing::warn!(core = self.core(), "epoll_wait failed: {e}");
            }
            self.shared.wake.drain();
            if deadline.is_some() {
                self.timer.disarm();
            }
        }
        self.shared.sleeping.store(false, Ordering::SeqCst);
        if self.cfg.mode == Mode::Adaptive {
            self.in_pass.set(true);
            for s in self.slots.iter_mut() {
                if let Some(e) = s.entry.as_mut() {
                    e.poller.disarm();
                }
            }
            self.in_pass.set(false);
        }
    }

    /// The reactor loop. Returns when [`stop`](Self::stop) is called.
    pub fn run(&mut self) {
        let idle_threshold = clock::duration_to_ticks(self.cfg.idle_threshold);
        let stats = self.shared.clone();
        let add = |a: &AtomicU64, v: u64| a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
        let mut last_busy = clock::ticks();
        let mut t_prev = last_busy;
        while !self.stop {
            let busy = self.run_once();
            let now = clock::ticks();
            let spent = now.wrapping_sub(t_prev);
            t_prev = now;
            if busy {
                add(&stats.stats.busy_ticks, spent);
                last_busy = now;
                continue;
            }
            add(&stats.stats.idle_ticks, spent);
            if self.stop {
                break;
            }
            let sleep_now = match self.cfg.mode {
                Mode::Poll => false,
                Mode::Interrupt => true,
                Mode::Adaptive => now.wrapping_sub(last_busy) >= idle_threshold,
            };
            if sleep_now {
                self.sleep();
                let woke = clock::ticks();
                add(&stats.stats.idle_ticks, woke.wrapping_sub(t_prev));
                t_prev = woke;
                last_busy = woke;
            }
        }
        // Drop pollers in registration order so queue pollers go before the engines they use.
        for s in self.slots.iter_mut() {
            s.entry = None;
        }
        self.locals.clear();
    }
}

/// A started set of reactors, one per core of a mask.
pub struct Reactors {
    handles: Vec<ReactorHandle>,
    joins: Mutex<Vec<JoinHandle<()>>>,
    mask: CpuMask,
    cfg: ReactorConfig,
}

impl std::fmt::Debug for Reactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reactors({})", self.mask)
    }
}

/// The cores this process may run on.
pub fn allowed_cores() -> Vec<usize> {
    sys::allowed_cores()
}

impl Reactors {
    /// Starts one reactor thread per core in `mask`, pinned when `cfg.pin`.
    pub fn start(mask: &CpuMask, cfg: ReactorConfig) -> Result<Self, ReactorError> {
        clock::init();
        let allowed = sys::allowed_cores();
        if cfg.pin {
            if let Some(&core) = mask.cores().iter().find(|c| !allowed.contains(c)) {
                return Err(ReactorError::CoreNotAllowed { core, allowed });
            }
        }
        let prog = if cfg.seccomp {
            #[cfg(target_arch = "x86_64")]
            let p = Some(Arc::new(
                seccomp::filter().map_err(|e| ReactorError::Setup { core: 0, source: std::io::Error::other(e) })?,
            ));
            #[cfg(not(target_arch = "x86_64"))]
            let p: Option<Arc<()>> = {
                return Err(ReactorError::Setup { core: 0, source: std::io::Error::other("--seccomp is x86_64-only") });
            };
            p
        } else {
            None
        };
        let mut handles = Vec::new();
        let mut joins = Vec::new();
        for (index, &core) in mask.cores().iter().enumerate() {
            let prog = prog.clone();
            let (tx, rx) = mpsc::sync_channel(1);
            let cfg2 = cfg.clone();
            let join = std::thread::Builder::new()
                .name(format!("reactor_{core}"))
                .spawn(move || {
                    let (mut r, h) = match Reactor::new(index, core, cfg2.clone()) {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    if cfg2.pin {
                        if let Err(source) = sys::pin_to_core(core) {
                            let _ = tx.send(Err(ReactorError::Setup { core, source }));
                            return;
                        }
                    }
                    r.shared.stats.tid.store(sys::gettid(), Ordering::Relaxed);
                    #[cfg(target_arch = "x86_64")]
                    if let Some(p) = &prog {
                        if let Err(e) = seccomp::apply(p) {
                            let _ = tx.send(Err(ReactorError::Setup { core, source: std::io::Error::other(e) }));
                            return;
                        }
                    }
                    let _ = tx.send(Ok(h));
                    tracing::debug!(core, mode = %cfg2.mode, "reactor started");
                    r.run();
                    tracing::debug!(core, "reactor stopped");
                })
                .map_err(|source| ReactorError::Setup { core, source })?;
            let h = rx.recv().map_err(|_| ReactorError::Gone(core))??;
            handles.push(h);
            joins.push(join);
        }
        Ok(Self { handles, joins: Mutex::new(joins), mask: mask.clone(), cfg })
    }

    /// Handles, in core order.
    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// The reactor on `core`, if it is in the set.
    pub fn on_core(&self, core: usize) -> Option<&ReactorHandle> {
        self.handles.iter().find(|h| h.core() == core)
    }

    /// The mask the set was started with.
    pub fn mask(&self) -> &CpuMask {
        &self.mask
    }

    /// The configuration the set was started with.
    pub fn config(&self) -> &ReactorConfig {
        &self.cfg
    }

    /// Stops every reactor and waits for its thread. Idempotent.
    pub fn stop(&self) {
        for h in &self.handles {
            let _ = h.send(|r| r.stop());
        }
        let joins = std::mem::take(&mut *self.joins.lock().unwrap_or_else(|e| e.into_inner()));
        for j in joins {
            let _ = j.join();
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
