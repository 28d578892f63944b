//! vhost-user controllers: a UNIX socket per controller, a connection thread that speaks the
//! vhost-user protocol (through rust-vmm's `vhost` crate), and virtio devices whose queues run as
//! pollers on the controller's reactors.
//!
//! ```text
//!  QEMU ──socket──► controller thread: vhost::BackendReqHandler ─► Session (protocol state)
//!                                                   │ ReactorHandle::call (start/stop/memory)
//!                                                   ▼
//!                  reactor N: VirtqPoller ─► BlkHandler ─► BdevChannel ─► backend
//! ```

pub mod blk;
pub mod queue;
pub mod scsi;
mod session;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::{json, Value};
use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vstor_bdev::Bdev;
use vstor_reactor::{CpuMask, PollerId, Reactor, ReactorHandle};

pub use blk::BlkDevice;
pub use queue::{Coalescing, QueueCell, QueueCore, QueueHandler, VirtqPoller};
use session::Session;

/// Queues a controller offers (a guest uses at most one per vCPU).
pub const MAX_QUEUES: u16 = 16;

/// What a virtio device type provides to the vhost layer.
pub trait VirtioBackend: Send + Sync + 'static {
    /// Device-specific feature bits.
    fn device_features(&self) -> u64;
    /// The device configuration space.
    fn config(&self) -> Vec<u8>;
    /// Queues offered.
    fn max_queues(&self) -> u16;
    /// Builds queue `index`'s handler on reactor `r`.
    fn make_handler(
        &self,
        r: &mut Reactor,
        index: u16,
        size: u16,
        features: u64,
    ) -> Result<Box<dyn QueueHandler>, String>;

    /// Which of the controller's `reactors` runs queue `index`.
    fn reactor_index(&self, index: u16, reactors: usize) -> usize {
        usize::from(index) % reactors.max(1)
    }

    /// Queue `index` now runs as poller `id` on `reactor`.
    fn queue_started(&self, _index: u16, _reactor: ReactorHandle, _id: PollerId) {}

    /// Queue `index` stopped.
    fn queue_stopped(&self, _index: u16) {}
}

impl VirtioBackend for BlkDevice {
    fn device_features(&self) -> u64 {
        self.features()
    }

    fn config(&self) -> Vec<u8> {
        BlkDevice::config(self)
    }

    fn max_queues(&self) -> u16 {
        self.num_queues
    }

    fn make_handler(
        &self,
        r: &mut Reactor,
        _index: u16,
        size: u16,
        features: u64,
    ) -> Result<Box<dyn QueueHandler>, String> {
        self.bdev.activate(&self.owner).map_err(|other| {
            format!("bdev {} is in use by controller {other}: one side of a handover runs at a time", self.bdev.name())
        })?;
        let dev = Arc::new(BlkDevice::new(self.bdev.clone(), self.readonly, self.num_queues, &self.owner));
        match blk::BlkHandler::new(dev, r, size, features) {
            Ok(h) => Ok(Box::new(h)),
            Err(e) => {
                self.bdev.deactivate(&self.owner);
                Err(e.to_string())
            }
        }
    }

    fn queue_stopped(&self, _index: u16) {
        self.bdev.deactivate(&self.owner);
    }
}

/// Errors of controller management.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("controller '{0}' already exists")]
    Exists(String),
    #[error("controller '{0}' not found")]
    NotFound(String),
    #[error("controller '{0}' has a connected frontend; stop the VM (or detach the device) first")]
    InUse(String),
    #[error("invalid {param}: {msg}")]
    InvalidParam { param: &'static str, msg: String },
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Bdev(#[from] vstor_bdev::BdevError),
}

/// Which device a controller is.
pub enum DeviceKind {
    Blk { bdev: Arc<Bdev>, readonly: bool, shared: bool },
    Scsi { dev: Arc<scsi::ScsiDevice> },
}

/// State shared by a controller, its connection thread and its sessions.
pub struct CtrlShared {
    pub name: Arc<str>,
    pub backend: Arc<dyn VirtioBackend>,
    pub reactors: Vec<ReactorHandle>,
    pub packed: bool,
    pub coalescing: Arc<Coalescing>,
    /// Offer dirty logging (VHOST_F_LOG_ALL, LOG_SHMFD): without it QEMU refuses to migrate.
    pub migration: bool,
    connected: AtomicBool,
    started_queues: AtomicUsize,
}

/// A vhost-user controller: a listening socket and at most one connected frontend.
pub struct Controller {
    shared: Arc<CtrlShared>,
    kind: DeviceKind,
    socket: PathBuf,
    cpumask: CpuMask,
    stop: Arc<StopSignal>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Tells a controller's connection thread to stop, waking it wherever it waits: a flag, and a
/// socket pair whose read end is in every `poll` the thread makes. (Waking it by connecting to
/// the controller's socket fails when the socket file is gone, and the thread would never exit.)
struct StopSignal {
    flag: AtomicBool,
    tx: UnixStream,
    rx: UnixStream,
}

impl StopSignal {
    fn new() -> std::io::Result<Self> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        Ok(Self { flag: AtomicBool::new(false), tx, rx })
    }

    fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        // One byte stays unread: the read end is readable from now on.
        let _ = std::io::Write::write(&mut &self.tx, &[1]);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Controller({})", self.shared.name)
    }
}

impl Controller {
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// SPDK's `vhost_get_controllers` entry.
    pub fn info(&self) -> Value {
        let backend = match &self.kind {
            DeviceKind::Blk { bdev, readonly, shared } => json!({
                "block": { "readonly": readonly, "bdev": bdev.name(), "transport": "vhost_user_blk", "shared": shared }
            }),
            DeviceKind::Scsi { dev } => dev.info(),
        };
        json!({
            "ctrlr": self.name(),
            "cpumask": self.cpumask.to_hex(),
            "delay_base_us": self.shared.coalescing.delay_base_us.load(Ordering::Relaxed),
            "iops_threshold": self.shared.coalescing.iops_threshold.load(Ordering::Relaxed),
            "socket": self.socket.display().to_string(),
            "connected": self.is_connected(),
            "started_queues": self.shared.started_queues.load(Ordering::Relaxed),
            "backend_specific": backend,
        })
    }

    /// The RPC calls that recreate this controller.
    pub fn config(&self) -> Vec<Value> {
        let mut out = Vec::new();
        match &self.kind {
            DeviceKind::Blk { bdev, readonly, shared } => {
                let mut p = json!({
                    "ctrlr": self.name(),
                    "dev_name": bdev.name(),
                    "readonly": readonly,
                    "packed_ring": self.shared.packed,
                    "cpumask": self.cpumask.to_hex(),
                });
                if *shared {
                    p["shared"] = json!(true);
                }
                out.push(json!({ "method": "vhost_create_blk_controller", "params": p }))
            }
            DeviceKind::Scsi { dev } => {
                out.push(json!({
                    "method": "vhost_create_scsi_controller",
                    "params": { "ctrlr": self.name(), "cpumask": self.cpumask.to_hex(), "delay": true }
                }));
                for (i, t) in dev.targets() {
                    out.push(json!({
                        "method": "vhost_scsi_controller_add_target",
                        "params": { "ctrlr": self.name(), "scsi_target_num": i, "bdev_name": t.bdev.name() }
                    }));
                }
                out.push(json!({ "method": "vhost_start_scsi_controller", "params": { "ctrlr": self.name() } }));
            }
        }
        let c = &self.shared.coalescing;
        let (d, i) = (c.delay_base_us.load(Ordering::Relaxed), c.iops_threshold.load(Ordering::Relaxed));
        if d != 0 {
            out.push(json!({
                "method": "vhost_controller_set_coalescing",
                "params": { "ctrlr": self.name(), "delay_base_us": d, "iops_threshold": i }
            }));
        }
        out
    }

    fn claim_owner(&self) -> String {
        format!("vhost:{}", self.name())
    }

    /// Disconnects the frontend (if any), stops the thread, removes the socket, releases the bdev.
    fn shutdown(&self) {
        let started = self.thread.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        self.stop.set();
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        if started {
            let _ = std::fs::remove_file(&self.socket);
        }
        match &self.kind {
            DeviceKind::Blk { bdev, .. } => {
                bdev.deactivate(&self.claim_owner());
                bdev.release(&self.claim_owner())
            }
            DeviceKind::Scsi { dev } => dev.release_all(),
        }
    }

    /// The SCSI device, for a vhost-scsi controller.
    pub fn scsi(&self) -> Option<&Arc<scsi::ScsiDevice>> {
        match &self.kind {
            DeviceKind::Scsi { dev } => Some(dev),
            DeviceKind::Blk { .. } => None,
        }
    }
}

/// Most file descriptors one vhost-user message may carry (what the vhost crate receives; the
/// largest legitimate message, SET_MEM_TABLE, carries one per region, at most 32).
pub const MAX_FDS_PER_MSG: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;

/// The kernel's limit on descriptors in one SCM_RIGHTS message (SCM_MAX_FD).
const SCM_MAX_FD: usize = 253;

/// Connections that arrive while a frontend is connected wait at most this long for it to leave
/// (a frontend that reconnects may be seen connecting before its old connection is seen closing,
/// e.g. while a process it forked still holds the old socket); then they are closed.
const WAITING_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Most connections waiting so; more are closed at once.
const MAX_WAITING: usize = 4;

/// What woke a connection thread.
enum Ready {
    /// The connection has data, an error or hung up.
    Conn,
    /// Someone else is connecting to the controller's socket.
    Listener,
    /// The timeout passed.
    Timeout,
    /// The controller is being shut down.
    Stop,
}

/// Waits until `stop`, `conn` (if any) or `listener` is readable, or until `deadline`. The
/// connection wins a tie with the listener, so a frontend that closes and reconnects at once is
/// not taken for a second one.
fn wait_readable(conn: Option<RawFd>, listener: RawFd, stop: RawFd, deadline: Option<std::time::Instant>) -> Ready {
    // poll(2) skips entries with a negative fd: no connection is -1.
    let mut fds = [
        libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: conn.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
    ];
    let n: libc::nfds_t = 3;
    loop {
        let timeout = match deadline {
            None => -1,
            Some(d) => {
                let ms = d.saturating_duration_since(std::time::Instant::now()).as_millis();
                libc::c_int::try_from(ms.saturating_add(1)).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `fds` is a valid array of at least `n` pollfds that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // Let the caller's next read or accept report the problem (not in a tight loop).
            std::thread::sleep(std::time::Duration::from_millis(10));
            return if conn.is_some() { Ready::Conn } else { Ready::Listener };
        }
        if fds[2].revents != 0 {
            return Ready::Stop;
        }
        if conn.is_some() && fds[1].revents != 0 {
            return Ready::Conn;
        }
        if fds[0].revents != 0 {
            return Ready::Listener;
        }
        if r == 0 && deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Ready::Timeout;
        }
    }
}

/// Accepts a connection from the non-blocking `listener`; `None` if there was none after all.
fn accept_one(listener: &UnixListener) -> Option<std::io::Result<UnixStream>> {
    match listener.accept() {
        Ok((s, _)) => Some(s.set_nonblocking(false).map(|()| s)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => Some(Err(e)),
    }
}

/// How many file descriptors come with the next message on `fd`, without taking it from the
/// socket: `None` at end of stream or on error (the vhost crate then reports it). The kernel
/// installs peeked descriptors in this process; they are closed at once. More than the receive
/// buffer could hold counts as `SCM_MAX_FD + 1`.
fn peek_fd_count(fd: RawFd) -> Option<usize> {
    let fd_bytes = u32::try_from(SCM_MAX_FD * std::mem::size_of::<libc::c_int>()).unwrap_or(u32::MAX);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = usize::try_from(unsafe { libc::CMSG_SPACE(fd_bytes) }).unwrap_or(0);
    // u64 elements: the control buffer must be aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut byte = 0u8;
    let mut iov = libc::iovec { iov_base: std::ptr::addr_of_mut!(byte).cast(), iov_len: 1 };
    // SAFETY: an all-zero msghdr is a valid empty one; the fields that matter are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at `iov` (one byte of `byte`) and `control` (`space` bytes), all live
    // for the call. MSG_PEEK leaves the data in the socket.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
            Some(0)
        } else {
            None
        };
    }
    let mut count = 0usize;
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR reads its control fields only.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a cmsghdr inside `control` (CMSG_FIRSTHDR and
        // CMSG_NXTHDR check it fits); `control` is 8-byte aligned, as cmsghdr needs.
        let h = unsafe { std::ptr::read(c) };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let head = usize::try_from(unsafe { libc::CMSG_LEN(0) }).unwrap_or(usize::MAX);
            let nfds = h.cmsg_len.saturating_sub(head) / std::mem::size_of::<libc::c_int>();
            // SAFETY: the data of a cmsghdr inside `control` starts inside `control`.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..nfds {
                // SAFETY: the kernel wrote `nfds` descriptors after the header, inside
                // `control` (cmsg_len counts them); they may be unaligned.
                let peeked = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: the peek installed `peeked` in this process and nothing else knows it.
                unsafe { libc::close(peeked) };
            }
            count += nfds;
        }
        // SAFETY: `c` is a header inside `msg`'s control buffer.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        count = count.max(SCM_MAX_FD + 1);
    }
    Some(count)
}

/// Rate limit for warnings a frontend can cause at will (failed requests, refused connections),
/// so that it cannot flood the log: at most `LOG_BURST` a second; what is held back is counted
/// and reported with the next one let through.
struct LogLimit {
    window: std::time::Instant,
    in_window: u32,
    held_back: u64,
}

const LOG_BURST: u32 = 10;

impl LogLimit {
    fn new() -> Self {
        Self { window: std::time::Instant::now(), in_window: 0, held_back: 0 }
    }

    /// `Some(n)`: log now, mentioning the `n` similar messages held back since the last one.
    fn allow(&mut self) -> Option<u64> {
        if self.window.elapsed() >= std::time::Duration::from_secs(1) {
            self.window = std::time::Instant::now();
            self.in_window = 0;
        }
        if self.in_window >= LOG_BURST {
            self.held_back += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Connections accepted while a frontend was connected, oldest first, with when they came.
type Waiting = std::collections::VecDeque<(UnixStream, std::time::Instant)>;

/// Serves connections on `listener` until stopped. One frontend at a time: a connection made
/// while a frontend is connected waits (a few, briefly: a reconnecting frontend can look like a
/// second one for a moment) and is served if the frontend leaves; otherwise it is closed, with a
/// warning, so none waits unanswered for long and none holds resources. Connections made during
/// a teardown wait in the backlog and are served next.
fn serve(shared: Arc<CtrlShared>, listener: UnixListener, stop: Arc<StopSignal>, conn: Arc<Mutex<Option<UnixStream>>>) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(ctrlr = %shared.name, "cannot make the socket non-blocking: {e}; not serving");
        return;
    }
    let mut refusals = LogLimit::new();
    let mut waiting = Waiting::new();
    loop {
        if stop.is_set() {
            break;
        }
        let stream = if let Some((s, _)) = waiting.pop_front() {
            s
        } else {
            wait_readable(None, listener.as_raw_fd(), stop.fd(), None);
            if stop.is_set() {
                break;
            }
            match accept_one(&listener) {
                None => continue,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::warn!(ctrlr = %shared.name, "accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
            }
        };
        session(&shared, stream, &listener, &stop, &conn, &mut waiting, &mut refusals);
    }
}

/// A connection came while a frontend is connected: it waits (bounded), or is closed.
fn another_connection(shared: &CtrlShared, listener: &UnixListener, waiting: &mut Waiting, refusals: &mut LogLimit) {
    match accept_one(listener) {
        None => {}
        Some(Ok(other)) if waiting.len() < MAX_WAITING => waiting.push_back((other, std::time::Instant::now())),
        Some(Ok(other)) => {
            drop(other);
            if let Some(held_back) = refusals.allow() {
                tracing::warn!(ctrlr = %shared.name, held_back, waiting = waiting.len(),
                    "a frontend is already connected: closed another connection to the socket (one frontend per controller)");
            }
        }
        Some(Err(e)) => {
            // Out of descriptors, say: the connection stays in the backlog; do not spin on it.
            if let Some(held_back) = refusals.allow() {
                tracing::warn!(ctrlr = %shared.name, held_back, "cannot accept another connection: {e}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Closes waiting connections that have waited `WAITING_GRACE`.
fn expire_waiting(shared: &CtrlShared, waiting: &mut Waiting, refusals: &mut LogLimit) {
    while waiting.front().is_some_and(|(_, t)| t.elapsed() >= WAITING_GRACE) {
        waiting.pop_front();
        if let Some(held_back) = refusals.allow() {
            tracing::warn!(ctrlr = %shared.name, held_back,
                "a frontend is already connected: closed another connection to the socket after {WAITING_GRACE:?} (one frontend per controller)");
        }
    }
}

/// Runs one frontend's connection until it ends.
fn session(
    shared: &Arc<CtrlShared>,
    stream: UnixStream,
    listener: &UnixListener,
    stop: &StopSignal,
    conn: &Mutex<Option<UnixStream>>,
    waiting: &mut Waiting,
    refusals: &mut LogLimit,
) {
    *conn.lock().unwrap_or_else(|e| e.into_inner()) = stream.try_clone().ok();
    shared.connected.store(true, Ordering::SeqCst);
    tracing::info!(ctrlr = %shared.name, "frontend connected");
    let session = Arc::new(Mutex::new(Session::new(shared.clone())));
    let mut handler = BackendReqHandler::from_stream(stream, session.clone());
    let fd = handler.as_raw_fd();
    let mut errors = 0u32;
    let mut failures = LogLimit::new();
    loop {
        expire_waiting(shared, waiting, refusals);
        let deadline = waiting.front().map(|(_, t)| *t + WAITING_GRACE);
        match wait_readable(Some(fd), listener.as_raw_fd(), stop.fd(), deadline) {
            Ready::Conn => {}
            Ready::Timeout => continue,
            // Controller::shutdown: leave it to the accept loop.
            Ready::Stop => break,
            Ready::Listener => {
                another_connection(shared, listener, waiting, refusals);
                continue;
            }
        }
        if let Some(n) = peek_fd_count(fd).filter(|&n| n > MAX_FDS_PER_MSG) {
            // The vhost crate would drop such a message whole (descriptors and bytes) and read the
            // rest of the stream out of step.
            let n = if n > SCM_MAX_FD {
                "more file descriptors than vstor could receive".to_string()
            } else {
                format!("{n} file descriptors")
            };
            tracing::warn!(ctrlr = %shared.name,
                "closing the connection: a message carries {n}; the limit is {MAX_FDS_PER_MSG} per message");
            break;
        }
        let r = handler.handle_request();
        let (close, running) = {
            let s = session.lock().unwrap_or_else(|e| e.into_inner());
            (s.close, s.running())
        };
        shared.started_queues.store(running, Ordering::Relaxed);
        match r {
            Ok(()) => errors = 0,
            Err(VuError::Disconnected) => break,
            Err(
                e @ (VuError::PartialMessage
                | VuError::SocketBroken(_)
                | VuError::SocketError(_)
                | VuError::InvalidMessage
                | VuError::IncorrectFds
                | VuError::OversizedMsg),
            ) => {
                tracing::warn!(ctrlr = %shared.name, "closing the connection: {e}");
                break;
            }
            Err(e) if close => {
                tracing::warn!(ctrlr = %shared.name, "closing the connection: {e}");
                break;
            }
            Err(e) => {
                if let Some(held_back) = failures.allow() {
                    tracing::warn!(ctrlr = %shared.name, held_back, "request failed: {e}");
                }
                errors += 1;
                if errors > 64 {
                    tracing::warn!(ctrlr = %shared.name, "too many failed requests; closing the connection");
                    break;
                }
            }
        }
        if close || stop.is_set() {
            break;
        }
    }
    drop(handler);
    session.lock().unwrap_or_else(|e| e.into_inner()).teardown();
    shared.started_queues.store(0, Ordering::Relaxed);
    shared.connected.store(false, Ordering::SeqCst);
    *conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    tracing::info!(ctrlr = %shared.name, "frontend disconnected");
}

/// Every vhost controller of the process.
pub struct VhostManager {
    socket_dir: PathBuf,
    socket_mode: u32,
    migration: bool,
    reactors: Vec<ReactorHandle>,
    ctrls: Mutex<BTreeMap<String, Arc<Controller>>>,
    order: Mutex<Vec<String>>,
}

impl std::fmt::Debug for VhostManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VhostManager({})", self.socket_dir.display())
    }
}

/// Options for a new blk controller.
#[derive(Debug, Clone, Default)]
pub struct BlkOptions {
    pub readonly: bool,
    pub packed_ring: bool,
    pub cpumask: Option<CpuMask>,
    /// Share the bdev with other controllers (live-migration handover: one side active at a
    /// time); otherwise the controller claims it exclusively.
    pub shared: bool,
}

impl VhostManager {
    /// `migration`: offer dirty logging so VMs can be live-migrated.
    pub fn new(socket_dir: PathBuf, socket_mode: u32, reactors: Vec<ReactorHandle>, migration: bool) -> Self {
        Self {
            socket_dir,
            socket_mode,
            migration,
            reactors,
            ctrls: Mutex::new(BTreeMap::new()),
            order: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Controller>>> {
        self.ctrls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The directory controller sockets are created in.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    fn check_name(&self, name: &str) -> Result<PathBuf, VhostError> {
        if name.is_empty() || name.contains('/') || name.contains('\0') || name == "." || name == ".." {
            return Err(VhostError::InvalidParam {
                param: "ctrlr",
                msg: format!("'{name}' is not a valid socket name"),
            });
        }
        let path = self.socket_dir.join(name);
        if path.as_os_str().len() >= 108 {
            return Err(VhostError::InvalidParam {
                param: "ctrlr",
                msg: format!("socket path {} is longer than a UNIX socket path may be (107 bytes)", path.display()),
            });
        }
        if self.lock().contains_key(name) {
            return Err(VhostError::Exists(name.to_string()));
        }
        Ok(path)
    }

    fn reactors_for(&self, mask: Option<&CpuMask>) -> Result<(CpuMask, Vec<ReactorHandle>), VhostError> {
        let all = CpuMask::from_cores(self.reactors.iter().map(|h| h.core()));
        let Some(mask) = mask else { return Ok((all, self.reactors.clone())) };
        if let Some(c) = mask.cores().iter().find(|c| !all.contains(**c)) {
            return Err(VhostError::InvalidParam {
                param: "cpumask",
                msg: format!("core {c} of {mask} has no reactor (vstor runs on {all})"),
            });
        }
        let r = self.reactors.iter().filter(|h| mask.contains(h.core())).cloned().collect();
        Ok((mask.clone(), r))
    }

    /// Creates a vhost-user-blk controller serving `bdev` at `<socket dir>/<name>`.
    pub fn create_blk(&self, name: &str, bdev: Arc<Bdev>, o: BlkOptions) -> Result<(), VhostError> {
        let path = self.check_name(name)?;
        let (cpumask, reactors) = self.reactors_for(o.cpumask.as_ref())?;
        let owner = format!("vhost:{name}");
        let backend = Arc::new(BlkDevice::new(bdev.clone(), o.readonly, MAX_QUEUES, &owner));
        let kind = DeviceKind::Blk { bdev: bdev.clone(), readonly: o.readonly, shared: o.shared };
        bdev.claim(&owner, !o.shared)?;
        match self.start(name, path, cpumask, reactors, backend, kind, o.packed_ring) {
            Ok(()) => Ok(()),
            Err(e) => {
                bdev.release(&owner);
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &self,
        name: &str,
        path: PathBuf,
        cpumask: CpuMask,
        reactors: Vec<ReactorHandle>,
        backend: Arc<dyn VirtioBackend>,
        kind: DeviceKind,
        packed: bool,
    ) -> Result<(), VhostError> {
        self.start_maybe(name, path, cpumask, reactors, backend, kind, packed, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn start_maybe(
        &self,
        name: &str,
        path: PathBuf,
        cpumask: CpuMask,
        reactors: Vec<ReactorHandle>,
        backend: Arc<dyn VirtioBackend>,
        kind: DeviceKind,
        packed: bool,
        listen: bool,
    ) -> Result<(), VhostError> {
        let shared = Arc::new(CtrlShared {
            name: Arc::from(name),
            backend,
            reactors,
            packed,
            coalescing: Arc::new(Coalescing::default()),
            migration: self.migration,
            connected: AtomicBool::new(false),
            started_queues: AtomicUsize::new(0),
        });
        let ctrl = Arc::new(Controller {
            shared,
            kind,
            socket: path.clone(),
            cpumask,
            stop: Arc::new(StopSignal::new().map_err(|source| VhostError::Socket { path: path.clone(), source })?),
            conn: Arc::new(Mutex::new(None)),
            thread: Mutex::new(None),
        });
        if listen {
            self.listen(&ctrl)?;
        }
        tracing::info!(ctrlr = name, socket = %path.display(), cpumask = %ctrl.cpumask, listening = listen, "vhost controller created");
        self.lock().insert(name.to_string(), ctrl);
        self.order.lock().unwrap_or_else(|e| e.into_inner()).push(name.to_string());
        Ok(())
    }

    /// Creates the controller's socket and starts serving it.
    fn listen(&self, ctrl: &Arc<Controller>) -> Result<(), VhostError> {
        let path = ctrl.socket.clone();
        let sock_err = |source| VhostError::Socket { path: path.clone(), source };
        let mut thread = ctrl.thread.lock().unwrap_or_else(|e| e.into_inner());
        if thread.is_some() {
            return Err(VhostError::InvalidParam {
                param: "ctrlr",
                msg: format!("controller '{}' is already started", ctrl.name()),
            });
        }
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(VhostError::InvalidParam {
                    param: "ctrlr",
                    msg: format!("socket {} is in use by another process", path.display()),
                });
            }
            std::fs::remove_file(&path).map_err(sock_err)?;
        }
        let listener = UnixListener::bind(&path).map_err(sock_err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(self.socket_mode)).map_err(sock_err)?;
        let (s2, st2, c2) = (ctrl.shared.clone(), ctrl.stop.clone(), ctrl.conn.clone());
        let name = ctrl.name().to_string();
        *thread = Some(
            std::thread::Builder::new()
                .name(format!("vhost_{name}"))
                .spawn(move || serve(s2, listener, st2, c2))
                .map_err(sock_err)?,
        );
        Ok(())
    }

    /// Creates a vhost-user-scsi controller with no targets. With `delay`, its socket appears
    /// only after [`start_scsi`](Self::start_scsi) (so targets can be added first).
    pub fn create_scsi(&self, name: &str, cpumask: Option<CpuMask>, delay: bool) -> Result<(), VhostError> {
        let path = self.check_name(name)?;
        let (cpumask, reactors) = self.reactors_for(cpumask.as_ref())?;
        let dev = scsi::ScsiDevice::new(name);
        self.start_maybe(name, path, cpumask, reactors, dev.clone(), DeviceKind::Scsi { dev }, false, !delay)
    }

    /// Starts a controller created with `delay`.
    pub fn start_scsi(&self, name: &str) -> Result<(), VhostError> {
        let ctrl = self.get(name).ok_or_else(|| VhostError::NotFound(name.to_string()))?;
        if ctrl.scsi().is_none() {
            return Err(VhostError::InvalidParam { param: "ctrlr", msg: format!("'{name}' is not a SCSI controller") });
        }
        self.listen(&ctrl)
    }

    /// Adds a SCSI target backed by `bdev`; returns its number.
    pub fn scsi_add_target(&self, name: &str, target: Option<usize>, bdev: Arc<Bdev>) -> Result<usize, VhostError> {
        let ctrl = self.get(name).ok_or_else(|| VhostError::NotFound(name.to_string()))?;
        let dev = ctrl.scsi().ok_or_else(|| VhostError::InvalidParam {
            param: "ctrlr",
            msg: format!("'{name}' is not a SCSI controller"),
        })?;
        dev.add_target(target, bdev)
    }

    /// Removes a SCSI target (its commands in flight complete first).
    pub fn scsi_remove_target(&self, name: &str, target: usize) -> Result<(), VhostError> {
        let ctrl = self.get(name).ok_or_else(|| VhostError::NotFound(name.to_string()))?;
        let dev = ctrl.scsi().ok_or_else(|| VhostError::InvalidParam {
            param: "ctrlr",
            msg: format!("'{name}' is not a SCSI controller"),
        })?;
        dev.remove_target(target)
    }

    /// Deletes a controller; refused while a frontend is connected (as SPDK does).
    pub fn delete(&self, name: &str) -> Result<(), VhostError> {
        let ctrl = self.lock().get(name).cloned().ok_or_else(|| VhostError::NotFound(name.to_string()))?;
        if ctrl.is_connected() {
            return Err(VhostError::InUse(name.to_string()));
        }
        ctrl.shutdown();
        self.lock().remove(name);
        self.order.lock().unwrap_or_else(|e| e.into_inner()).retain(|n| n != name);
        tracing::info!(ctrlr = name, "vhost controller deleted");
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Controller>> {
        self.lock().get(name).cloned()
    }

    /// Controllers sorted by name.
    pub fn list(&self) -> Vec<Arc<Controller>> {
        self.lock().values().cloned().collect()
    }

    /// Controllers in creation order (for config dumps).
    pub fn list_in_creation_order(&self) -> Vec<Arc<Controller>> {
        let m = self.lock();
        self.order.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(|n| m.get(n).cloned()).collect()
    }

    /// Sets SPDK-style interrupt coalescing for a controller.
    pub fn set_coalescing(&self, name: &str, delay_base_us: u32, iops_threshold: u32) -> Result<(), VhostError> {
        let ctrl = self.get(name).ok_or_else(|| VhostError::NotFound(name.to_string()))?;
        if delay_base_us > 0 && iops_threshold == 0 {
            return Err(VhostError::InvalidParam { param: "iops_threshold", msg: "must be greater than 0".into() });
        }
        let c = &ctrl.shared.coalescing;
        c.delay_base_us.store(delay_base_us, Ordering::Relaxed);
        c.iops_threshold.store(iops_threshold, Ordering::Relaxed);
        Ok(())
    }

    /// Stops every controller: frontends are disconnected after their in-flight requests drain.
    pub fn shutdown(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.lock()).into_values().collect();
        for c in all {
            c.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Sends `bytes` with `fds` attached (SCM_RIGHTS).
    fn send_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let fd_bytes = u32::try_from(std::mem::size_of_val(fds)).unwrap();
        // SAFETY: CMSG_SPACE only computes a size.
        let space = usize::try_from(unsafe { libc::CMSG_SPACE(fd_bytes) }).unwrap();
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds one header with room for `fds` (CMSG_SPACE above).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = usize::try_from(libc::CMSG_LEN(fd_bytes)).unwrap();
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
        }
        // SAFETY: `msg` points at live buffers for the call.
        let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, 0) };
        assert_eq!(usize::try_from(n).unwrap(), bytes.len());
    }

    /// Descriptors of this process open on /dev/null (what the test sends; other tests running
    /// at the same time open other things).
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| p == Path::new("/dev/null"))
            .count()
    }

    #[test]
    fn peeking_counts_attached_descriptors_and_leaves_the_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(peek_fd_count(b.as_raw_fd()), Some(0), "nothing to read yet");
        a.write_all_fds(b"hello", &[]);
        assert_eq!(peek_fd_count(b.as_raw_fd()), Some(0));
        let mut buf = [0u8; 5];
        (&b).read_exact(&mut buf).unwrap();
        let before = open_fds();
        send_fds(&a, b"x", &[f.as_raw_fd(); 3]);
        assert_eq!(peek_fd_count(b.as_raw_fd()), Some(3));
        assert_eq!(peek_fd_count(b.as_raw_fd()), Some(3), "a peek takes nothing");
        assert_eq!(open_fds(), before, "peeked descriptors are closed");
        (&b).read_exact(&mut buf[..1]).unwrap();
        send_fds(&a, b"y", &[f.as_raw_fd(); 40]);
        assert_eq!(peek_fd_count(b.as_raw_fd()), Some(40));
        assert_eq!(open_fds(), before);
        drop(a);
        (&b).read_exact(&mut buf[..1]).unwrap();
        assert_eq!(peek_fd_count(b.as_raw_fd()), None, "end of stream");
    }

    trait WriteFds {
        fn write_all_fds(&self, bytes: &[u8], fds: &[RawFd]);
    }

    impl WriteFds for UnixStream {
        fn write_all_fds(&self, bytes: &[u8], fds: &[RawFd]) {
            if fds.is_empty() {
                std::io::Write::write_all(&mut &*self, bytes).unwrap();
            } else {
                send_fds(self, bytes, fds);
            }
        }
    }

    #[test]
    fn log_limit_lets_a_burst_through_then_counts() {
        let mut l = LogLimit::new();
        for _ in 0..LOG_BURST {
            assert_eq!(l.allow(), Some(0));
        }
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.window -= std::time::Duration::from_secs(2);
        assert_eq!(l.allow(), Some(2), "the next one reports what was held back");
        assert_eq!(l.allow(), Some(0));
    }
}
