//! The vfio-user server of one NVMe controller: a listening socket, a thread that serves one
//! client at a time, and the per-connection protocol state (negotiation, DMA maps, interrupts).
//!
//! # Thread and lifetime
//!
//! [`VfioUserEndpoint::start`] binds the socket, creates the [`NvmeController`] (its pollers run
//! on the reactors of the [`NvmeConfig`]) and spawns the connection thread. That thread is the
//! only caller of the controller's transport methods besides the manager's control plane
//! (namespaces), and it is never a reactor, so `reset()` and FLR may block on reactors there.
//! It waits in `poll(2)` on the listener, the connection and a stop eventfd:
//! - idle: a connection is accepted and served;
//! - connected: a second connection is accepted and closed at once; a readable connection is one
//!   message, read (with a 5 s timeout for its remaining bytes), handled, answered;
//! - stop ([`VfioUserEndpoint::stop`]): the connection is torn down and the thread exits.
//!
//! When a connection ends for any reason (EOF, error, malformed framing, stop) the controller is
//! reset (in-flight I/O drained), its DMA memory emptied, and every interrupt eventfd dropped;
//! the socket then accepts the next client.
//!
//! # Validation
//!
//! Framing first: a header shorter than 16 bytes, a size below 16 or above [`MAX_MSG_SIZE`], or a
//! reply-type message ends the connection (after an error reply when the header was readable).
//! The body is read in full (a bounded allocation), then each command checks its payload length
//! before decoding (`read_wire`), then its fields: region indexes and `offset + count` against the
//! region size, `count <= MAX_DATA_XFER`, DMA ranges (non-empty, non-wrapping, 4 KiB aligned,
//! not overlapping, at most [`MAX_DMA_MAPS`]), IRQ index/start/count against the device, flag
//! combinations, and the number and kind of descriptors (interrupt descriptors must be eventfds).
//! A failed check answers with an error reply carrying an errno; the connection stays up.
//!
//! # Device model
//!
//! A PCI device (`DEVICE_GET_INFO`: PCI, RESET; 9 regions; 5 IRQ types). Regions: configuration
//! space (index 7, [`PCI_CONFIG_SIZE`] bytes), BAR0 (registers and doorbells) and BAR4 (MSI-X
//! table and PBA) as the controller sizes them; the others have size 0. All three are accessed with
//! `REGION_READ`/`REGION_WRITE` (up to [`MAX_DATA_XFER`] bytes). BAR0 also carries the
//! sparse-mmap capability and the doorbell file descriptor when the controller's mappable area can
//! be described to a vfio-user client (`sparse_layout`): the protocol maps a sparse area at
//! file offset `region offset + area offset`, so the doorbells must sit in their file at an offset
//! of at least their BAR offset. IRQs: INTx (1, eventfd, maskable, automasked), MSI (0), MSI-X
//! ([`NvmeController::msix_vectors`], eventfd, maskable), ERR and REQ (0). `DEVICE_RESET` resets
//! the controller. VERSION is negotiated first (major 0, minor up to 0.2); the capabilities sent
//! are `max_msg_fds`, `max_data_xfer_size`, `max_dma_maps` and `pgsizes` (4 KiB); no migration,
//! no twin socket, no `REGION_WRITE_MULTI`, no message-based DMA.
//!
//! # Interrupts
//!
//! `SET_IRQS` with `TRIGGER | EVENTFD` assigns eventfds (as many as `count`) or, without
//! descriptors, de-assigns; `MASK`/`UNMASK` with `NONE`/`BOOL` mask and unmask; `TRIGGER` with
//! `NONE`/`BOOL` fires from the client; `count` 0 with `NONE | TRIGGER` disables the index. An
//! MSI-X vector is unmasked in the controller exactly while it has an eventfd and is not masked by
//! the client (see [`VfuIrqs`]); MSI-X itself is enabled by the client's write to the MSI-X
//! capability in configuration space, as QEMU and SPDK's clients do. Eventfds survive
//! `DEVICE_RESET` and FLR (vectors are re-armed after them); the server sets them non-blocking.
//!
//! # DMA memory
//!
//! DMA maps are mapped read-write through `vstor_mem::Region` and the controller gets a new
//! `GuestMemory` snapshot after each map/unmap; in-flight I/O keeps the snapshot it started with,
//! so an unmap never pulls memory from under a running request. Maps that are not both readable
//! and writable are accepted and tracked but not made visible to the controller (it would need
//! per-region permissions to honour them); DMA to them fails like DMA outside guest memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;
use vstor_mem::{GuestMemory, MemError, Region};
use vstor_nvme::{BarInfo, NvmeConfig, NvmeController, NvmeError, PCI_CONFIG_SIZE};

use crate::irq::VfuIrqs;
use crate::proto::*;
use crate::sock::{is_eventfd, poll_readable, recv_with_fds, send_with_fd, set_nonblocking};

/// Largest `count` of a region access (advertised as `max_data_xfer_size`).
pub const MAX_DATA_XFER: u32 = 1 << 20;
/// Most descriptors accepted with one message (advertised as `max_msg_fds`).
pub const MAX_MSG_FDS: usize = 64;
/// Most DMA maps at once (advertised as `max_dma_maps`; `vstor_mem`'s region limit).
pub const MAX_DMA_MAPS: usize = vstor_mem::MAX_REGIONS;
/// Largest message accepted: a region write of `MAX_DATA_XFER` bytes plus headers, rounded up.
pub const MAX_MSG_SIZE: u32 = MAX_DATA_XFER + 4096;
/// Protocol version served (0.2, libvfio-user's).
pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 2;
/// Largest VERSION capabilities document.
const MAX_VERSION_JSON: usize = 64 << 10;
/// How long the rest of a started message (or a reply's send) may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// DMA page size (advertised as `pgsizes`).
const PAGE: u64 = 4096;

/// Errors of starting an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("socket {0} is in use by a running server")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error(transparent)]
    Nvme(#[from] NvmeError),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

/// BAR0's sparse-mmap description: the doorbell areas the client may map.
#[derive(Clone)]
pub(crate) struct SparseLayout {
    pub fd: Arc<OwnedFd>,
    /// `offset` of the region info: mmap offset of an area = this + the area's BAR offset.
    pub region_offset: u64,
    pub areas: Vec<SparseArea>,
}

/// The sparse-mmap layout of `bar`, if its mappable areas can be described to a vfio-user client:
/// one file, and a file offset of `region_offset + area offset` for every area (the protocol has
/// one base offset per region).
pub(crate) fn sparse_layout(bar: &BarInfo) -> Option<SparseLayout> {
    let first = bar.mmap_areas.first()?;
    let region_offset = first.fd_offset.checked_sub(first.offset)?;
    let mut areas = Vec::new();
    for a in &bar.mmap_areas {
        let end = a.offset.checked_add(a.len)?;
        let aligned = a.offset.is_multiple_of(PAGE) && a.len.is_multiple_of(PAGE) && a.len > 0;
        if !Arc::ptr_eq(&a.fd, &first.fd)
            || a.fd_offset.checked_sub(a.offset)? != region_offset
            || end > bar.size
            || !aligned
        {
            return None;
        }
        areas.push(SparseArea { offset: a.offset, size: a.len });
    }
    Some(SparseLayout { fd: first.fd.clone(), region_offset, areas })
}

/// What the connection thread shares with the endpoint handle.
struct Shared {
    ctrl: Arc<NvmeController>,
    irqs: Arc<VfuIrqs>,
    bar0_size: u64,
    bar4_size: u64,
    sparse: Option<SparseLayout>,
    /// Configuration-space offset of the PCI Express capability (FLR detection).
    pcie_cap: Option<u64>,
    connected: AtomicBool,
    sessions: AtomicU64,
}

/// A controller served over vfio-user at one socket path.
pub struct VfioUserEndpoint {
    path: PathBuf,
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for VfioUserEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VfioUserEndpoint({})", self.path.display())
    }
}

/// Binds `path` (creating its directory), replacing a stale socket and refusing a live one or a
/// file that is not a socket.
fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, EndpointError> {
    let sock_err = |source| EndpointError::Socket { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(EndpointError::InUse(path.to_path_buf()));
            }
            tracing::info!(path = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => return Err(EndpointError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    let l = UnixListener::bind(path).map_err(sock_err)?;
    let cleanup = |e| {
        let _ = std::fs::remove_file(path);
        sock_err(e)
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(cleanup)?;
    l.set_nonblocking(true).map_err(cleanup)?;
    Ok(l)
}

/// Walks the configuration space's capability list for capability `id`.
fn find_capability(ctrl: &NvmeController, id: u8) -> Option<u64> {
    let mut b = [0u8; 2];
    ctrl.pci_config_read(0x34, &mut b[..1]);
    let mut ptr = u64::from(b[0] & !3);
    for _ in 0..48 {
        if !(0x40..0x100).contains(&ptr) {
            return None;
        }
        ctrl.pci_config_read(ptr, &mut b);
        if b[0] == id {
            return Some(ptr);
        }
        ptr = u64::from(b[1] & !3);
    }
    None
}

fn create_controller(cfg: NvmeConfig) -> Result<(Arc<NvmeController>, Arc<VfuIrqs>), NvmeError> {
    let irqs = Arc::new(VfuIrqs::new(cfg.max_io_queues.saturating_add(1)));
    let ctrl = NvmeController::new(cfg, irqs.clone())?;
    Ok((ctrl, irqs))
}

impl VfioUserEndpoint {
    /// Binds `path` with permissions `mode`, creates the controller described by `cfg` and starts
    /// serving. Call from a thread that is not one of `cfg.reactors`.
    ///
    /// If `cfg.mappable_doorbells` is set but the controller's doorbell area cannot be described
    /// as a vfio-user sparse-mmap area (see `sparse_layout`), the controller is created with
    /// trapped doorbells instead and a warning is logged.
    pub fn start(cfg: NvmeConfig, path: &Path, mode: u32) -> Result<VfioUserEndpoint, EndpointError> {
        Self::start_with(cfg, path, mode, |_| Ok(()))
    }

    /// [`start`](Self::start), running `prepare` on the new controller (attaching namespaces,
    /// say) before the first client can connect. A failure stops everything and is returned.
    pub fn start_with(
        cfg: NvmeConfig,
        path: &Path,
        mode: u32,
        prepare: impl FnOnce(&NvmeController) -> Result<(), NvmeError>,
    ) -> Result<VfioUserEndpoint, EndpointError> {
        Self::start_inner(cfg, path, mode, prepare, None)
    }

    /// `start_with`, optionally describing BAR0's mappable areas with `sparse` instead of the
    /// controller's (tests of the sparse-mmap encoding with a file laid out the vfio-user way).
    pub(crate) fn start_inner(
        cfg: NvmeConfig,
        path: &Path,
        mode: u32,
        prepare: impl FnOnce(&NvmeController) -> Result<(), NvmeError>,
        sparse: Option<SparseLayout>,
    ) -> Result<VfioUserEndpoint, EndpointError> {
        let listener = bind_socket(path, mode)?;
        let fail = |e: EndpointError| {
            let _ = std::fs::remove_file(path);
            e
        };
        let io_err = |context: &str| {
            let context = context.to_string();
            move |source| EndpointError::Io { context, source }
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io_err("eventfd")).map_err(fail)?;
        let stop2 = stop.try_clone().map_err(io_err("eventfd")).map_err(fail)?;
        let mappable = cfg.mappable_doorbells;
        let (mut ctrl, mut irqs) = create_controller(cfg.clone()).map_err(|e| fail(e.into()))?;
        let mut bars = ctrl.bars();
        if mappable && bars.first().and_then(sparse_layout).is_none() {
            tracing::warn!(
                path = %path.display(),
                "the controller's doorbell page cannot be offered as a vfio-user sparse-mmap area \
                 (its file offset is below its BAR offset); serving trapped doorbells"
            );
            ctrl.reset();
            drop(ctrl);
            (ctrl, irqs) =
                create_controller(NvmeConfig { mappable_doorbells: false, ..cfg }).map_err(|e| fail(e.into()))?;
            bars = ctrl.bars();
        }
        if let Err(e) = prepare(&ctrl) {
            ctrl.reset();
            return Err(fail(e.into()));
        }
        let bar = |i: u8| bars.iter().find(|b| b.index == i);
        let shared = Arc::new(Shared {
            bar0_size: bar(0).map(|b| b.size).unwrap_or(0),
            bar4_size: bar(4).map(|b| b.size).unwrap_or(0),
            sparse: sparse.or_else(|| bar(0).and_then(sparse_layout)),
            pcie_cap: find_capability(&ctrl, 0x10),
            irqs,
            ctrl,
            connected: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let thread = match std::thread::Builder::new().name("vfio-user".into()).spawn(move || run(sh, listener, stop2))
        {
            Ok(t) => t,
            Err(e) => {
                shared.ctrl.reset();
                return Err(fail(io_err("spawning the vfio-user thread")(e)));
            }
        };
        tracing::info!(path = %path.display(), mappable = shared.sparse.is_some(), "vfio-user endpoint listening");
        Ok(VfioUserEndpoint { path: path.to_path_buf(), shared, stop, thread: Mutex::new(Some(thread)) })
    }

    /// The controller served.
    pub fn controller(&self) -> &Arc<NvmeController> {
        &self.shared.ctrl
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Whether a client is attached.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// Connections served to completion so far.
    pub fn sessions(&self) -> u64 {
        self.shared.sessions.load(Ordering::SeqCst)
    }

    /// Whether BAR0 offers the doorbells as a sparse-mmap area.
    pub fn mappable_doorbells(&self) -> bool {
        self.shared.sparse.is_some()
    }

    /// Disconnects the client (resetting the controller), stops the thread and removes the socket.
    /// Idempotent. The controller itself lives on while others hold it.
    pub fn stop(&self) {
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = self.stop.write(1);
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
            tracing::info!(path = %self.path.display(), "vfio-user endpoint stopped");
        }
    }
}

impl Drop for VfioUserEndpoint {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a connection ended.
enum Exit {
    Disconnected,
    Stop,
}

fn run(shared: Arc<Shared>, listener: UnixListener, stop: EventFd) {
    loop {
        let ready = match poll_readable(&[listener.as_raw_fd(), stop.as_raw_fd()], None) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("vfio-user poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if ready[1] {
            return;
        }
        if !ready[0] {
            continue;
        }
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("vfio-user accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.connected.store(true, Ordering::SeqCst);
        tracing::info!("vfio-user client connected");
        let exit = match Session::new(&shared, conn) {
            Ok(mut s) => {
                let exit = s.serve(&listener, &stop);
                s.teardown();
                exit
            }
            Err(e) => {
                tracing::warn!("vfio-user connection setup: {e}");
                Exit::Disconnected
            }
        };
        shared.sessions.fetch_add(1, Ordering::SeqCst);
        shared.connected.store(false, Ordering::SeqCst);
        tracing::info!("vfio-user client gone; ready for the next one");
        if matches!(exit, Exit::Stop) {
            return;
        }
    }
}

/// A received command.
struct Msg {
    hdr: Header,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
    fds_truncated: bool,
}

/// Why reading a message failed.
enum ReadError {
    /// Clean EOF between messages.
    Eof,
    /// The stream cannot be trusted any more: close without replying.
    Broken(String),
    /// Close after an error reply to this header.
    Refuse(Header, i32, String),
}

/// How a command is answered.
enum Outcome {
    Reply(Vec<u8>, Option<Arc<OwnedFd>>),
    Error(i32, String),
    /// Error reply, then close the connection.
    Fatal(i32, String),
}

fn ok(payload: Vec<u8>) -> Outcome {
    Outcome::Reply(payload, None)
}

fn err(errno: i32, msg: impl Into<String>) -> Outcome {
    Outcome::Error(errno, msg.into())
}

struct DmaEntry {
    size: u64,
    /// Mapped for the controller (read-write maps only).
    region: Option<Region>,
}

struct Session<'a> {
    sh: &'a Shared,
    conn: UnixStream,
    negotiated: bool,
    /// Descriptors the client accepts per message.
    client_max_fds: u64,
    dma: BTreeMap<u64, DmaEntry>,
}

fn mem_errno(e: &MemError) -> i32 {
    match e {
        MemError::Map { errno, .. } if *errno != 0 => *errno,
        MemError::TooManyRegions => libc::ENOSPC,
        _ => libc::EINVAL,
    }
}

impl<'a> Session<'a> {
    fn new(sh: &'a Shared, conn: UnixStream) -> io::Result<Session<'a>> {
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Session { sh, conn, negotiated: false, client_max_fds: 1, dma: BTreeMap::new() })
    }

    fn serve(&mut self, listener: &UnixListener, stop: &EventFd) -> Exit {
        loop {
            let fds = [self.conn.as_raw_fd(), listener.as_raw_fd(), stop.as_raw_fd()];
            let ready = match poll_readable(&fds, None) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("vfio-user poll: {e}");
                    return Exit::Disconnected;
                }
            };
            if ready[2] {
                return Exit::Stop;
            }
            // The attached client first: if it has gone (EOF pending), a new connection waiting
            // in the backlog is the next client, not a second one.
            if ready[1] && !ready[0] {
                if let Ok((extra, _)) = listener.accept() {
                    tracing::warn!("refusing a second vfio-user client while one is attached");
                    drop(extra);
                }
            }
            if !ready[0] {
                continue;
            }
            let msg = match self.read_msg() {
                Ok(m) => m,
                Err(ReadError::Eof) => return Exit::Disconnected,
                Err(ReadError::Broken(why)) => {
                    tracing::warn!("closing the vfio-user connection: {why}");
                    return Exit::Disconnected;
                }
                Err(ReadError::Refuse(hdr, errno, why)) => {
                    tracing::warn!("closing the vfio-user connection: {why}");
                    let _ = self.send_reply(&hdr, &Outcome::Error(errno, why));
                    return Exit::Disconnected;
                }
            };
            let hdr = msg.hdr;
            let outcome = self.dispatch(msg);
            let fatal = matches!(outcome, Outcome::Fatal(..));
            match &outcome {
                Outcome::Error(errno, why) | Outcome::Fatal(errno, why) => {
                    tracing::warn!(command = command_name(hdr.command), errno, "vfio-user command refused: {why}")
                }
                Outcome::Reply(..) => {}
            }
            let quiet = hdr.flags & FLAG_NO_REPLY != 0 && hdr.command != CMD_VERSION && !fatal;
            if !quiet {
                if let Err(e) = self.send_reply(&hdr, &outcome) {
                    tracing::warn!("vfio-user reply: {e}; closing the connection");
                    return Exit::Disconnected;
                }
            }
            if fatal {
                return Exit::Disconnected;
            }
        }
    }

    /// Receives exactly `buf.len()` bytes (collecting descriptors). `Ok(false)`: EOF before the
    /// first byte.
    fn recv_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>, trunc: &mut bool) -> Result<bool, String> {
        let mut got = 0;
        while got < buf.len() {
            let (n, t) = match recv_with_fds(self.conn.as_raw_fd(), &mut buf[got..], fds, MAX_MSG_FDS) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(format!("no data for {IO_TIMEOUT:?} in the middle of a message"))
                }
                Err(e) => return Err(format!("receive: {e}")),
            };
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err("connection closed in the middle of a message".into());
            }
            got += n;
            *trunc |= t;
            if fds.len() > MAX_MSG_FDS {
                fds.truncate(MAX_MSG_FDS);
                *trunc = true;
            }
        }
        Ok(true)
    }

    fn read_msg(&mut self) -> Result<Msg, ReadError> {
        let mut fds = Vec::new();
        let mut trunc = false;
        let mut hb = [0u8; HEADER_SIZE];
        match self.recv_exact(&mut hb, &mut fds, &mut trunc) {
            Ok(true) => {}
            Ok(false) => return Err(ReadError::Eof),
            Err(why) => return Err(ReadError::Broken(why)),
        }
        let Some(hdr) = read_wire::<Header>(&hb) else {
            return Err(ReadError::Broken("short header".into()));
        };
        if hdr.size < wire_len::<Header>() {
            return Err(ReadError::Refuse(
                hdr,
                libc::EINVAL,
                format!("message size {} is below the header size", hdr.size),
            ));
        }
        if hdr.size > MAX_MSG_SIZE {
            return Err(ReadError::Refuse(
                hdr,
                libc::E2BIG,
                format!("message size {} exceeds {MAX_MSG_SIZE}", hdr.size),
            ));
        }
        if hdr.flags & FLAG_TYPE_MASK != TYPE_COMMAND {
            return Err(ReadError::Broken(format!("unexpected message type {:#x} from the client", hdr.flags)));
        }
        let body_len = usize::try_from(hdr.size - wire_len::<Header>()).unwrap_or(0);
        let mut body = vec![0u8; body_len];
        if body_len > 0 {
            match self.recv_exact(&mut body, &mut fds, &mut trunc) {
                Ok(true) => {}
                Ok(false) => return Err(ReadError::Broken("connection closed in the middle of a message".into())),
                Err(why) => return Err(ReadError::Broken(why)),
            }
        }
        Ok(Msg { hdr, body, fds, fds_truncated: trunc })
    }

    fn send_reply(&self, req: &Header, outcome: &Outcome) -> io::Result<()> {
        let (payload, fd, flags, error): (&[u8], Option<&Arc<OwnedFd>>, u32, i32) = match outcome {
            Outcome::Reply(p, fd) => (p, fd.as_ref(), TYPE_REPLY, 0),
            Outcome::Error(e, _) | Outcome::Fatal(e, _) => (&[], None, TYPE_REPLY | FLAG_ERROR, *e),
        };
        let size =
            u32::try_from(HEADER_SIZE + payload.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let hdr = Header { id: req.id, command: req.command, size, flags, error: error.unsigned_abs() };
        send_with_fd(self.conn.as_raw_fd(), &[wire_bytes(&hdr), payload], fd.map(|f| f.as_raw_fd()))
    }

    fn dispatch(&mut self, msg: Msg) -> Outcome {
        let Msg { hdr, body, fds, fds_truncated } = msg;
        tracing::trace!(
            command = command_name(hdr.command),
            id = hdr.id,
            size = hdr.size,
            fds = fds.len(),
            "vfio-user"
        );
        if !self.negotiated && hdr.command != CMD_VERSION {
            return Outcome::Fatal(libc::EINVAL, format!("{} before VERSION negotiation", command_name(hdr.command)));
        }
        if fds_truncated {
            return err(libc::EINVAL, format!("more than {MAX_MSG_FDS} descriptors in one message"));
        }
        let takes_fds = matches!(hdr.command, CMD_DMA_MAP | CMD_DEVICE_SET_IRQS);
        if !takes_fds && !fds.is_empty() {
            return err(libc::EINVAL, format!("{} takes no descriptors", command_name(hdr.command)));
        }
        match hdr.command {
            CMD_VERSION => self.version(&hdr, &body),
            CMD_DEVICE_GET_INFO => self.device_info(&body),
            CMD_DEVICE_GET_REGION_INFO => self.region_info(&body),
            CMD_DEVICE_GET_IRQ_INFO => self.irq_info(&body),
            CMD_DEVICE_SET_IRQS => self.set_irqs(&body, fds),
            CMD_REGION_READ => self.region_read(&body),
            CMD_REGION_WRITE => self.region_write(&body),
            CMD_DMA_MAP => self.dma_map(&body, fds),
            CMD_DMA_UNMAP => self.dma_unmap(&body),
            CMD_DEVICE_RESET => {
                self.sh.ctrl.reset();
                self.rearm_after_reset();
                ok(Vec::new())
            }
            CMD_DEVICE_GET_REGION_IO_FDS
            | CMD_REGION_WRITE_MULTI
            | CMD_DEVICE_FEATURE
            | CMD_DIRTY_PAGES
            | CMD_MIG_DATA_READ
            | CMD_MIG_DATA_WRITE => err(libc::ENOTSUP, format!("{} is not supported", command_name(hdr.command))),
            other => err(libc::EINVAL, format!("command {other} ({}) is not a client command", command_name(other))),
        }
    }

    // ---- VERSION ----

    fn version(&mut self, hdr: &Header, body: &[u8]) -> Outcome {
        if self.negotiated {
            return err(libc::EINVAL, "VERSION already negotiated");
        }
        if hdr.flags & FLAG_NO_REPLY != 0 {
            return Outcome::Fatal(libc::EINVAL, "VERSION with No_reply".into());
        }
        let Some(v) = read_wire::<Version>(body) else {
            return Outcome::Fatal(libc::EINVAL, format!("VERSION payload of {} bytes", body.len()));
        };
        if v.major != VERSION_MAJOR {
            return Outcome::Fatal(
                libc::ENOTSUP,
                format!("protocol major version {} (served: {VERSION_MAJOR})", v.major),
            );
        }
        let json = &body[std::mem::size_of::<Version>()..];
        if json.len() > MAX_VERSION_JSON {
            return Outcome::Fatal(libc::E2BIG, format!("VERSION capabilities of {} bytes", json.len()));
        }
        if let Err(why) = self.parse_client_caps(json) {
            return Outcome::Fatal(libc::EINVAL, why);
        }
        let caps = json!({
            "capabilities": {
                "max_msg_fds": MAX_MSG_FDS,
                "max_data_xfer_size": MAX_DATA_XFER,
                "max_dma_maps": MAX_DMA_MAPS,
                "pgsizes": PAGE,
            }
        });
        let mut out = Vec::new();
        push_wire(&mut out, &Version { major: VERSION_MAJOR, minor: v.minor.min(VERSION_MINOR) });
        out.extend_from_slice(caps.to_string().as_bytes());
        out.push(0);
        self.negotiated = true;
        tracing::debug!(
            minor = v.minor.min(VERSION_MINOR),
            client_max_fds = self.client_max_fds,
            "vfio-user version negotiated"
        );
        ok(out)
    }

    fn parse_client_caps(&mut self, json: &[u8]) -> Result<(), String> {
        let end = json.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let text = &json[..end];
        if text.is_empty() {
            return Ok(());
        }
        if text.contains(&0) {
            return Err("NUL inside the VERSION capabilities".into());
        }
        let v: Value = serde_json::from_slice(text).map_err(|e| format!("VERSION capabilities are not JSON: {e}"))?;
        let obj = v.as_object().ok_or("VERSION capabilities are not a JSON object")?;
        let Some(caps) = obj.get("capabilities") else { return Ok(()) };
        let caps = caps.as_object().ok_or("\"capabilities\" is not an object")?;
        for key in ["max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"] {
            if let Some(x) = caps.get(key) {
                let n = x.as_u64().ok_or(format!("capability {key} is not a non-negative integer"))?;
                if key == "max_msg_fds" {
                    self.client_max_fds = n;
                }
            }
        }
        Ok(())
    }

    // ---- device and region information ----

    fn device_info(&self, body: &[u8]) -> Outcome {
        let Some(req) = read_wire::<DeviceInfo>(body) else {
            return err(libc::EINVAL, format!("DEVICE_GET_INFO payload of {} bytes", body.len()));
        };
        if req.argsz < wire_len::<DeviceInfo>() {
            return err(libc::EINVAL, format!("DEVICE_GET_INFO argsz {}", req.argsz));
        }
        let info = DeviceInfo {
            argsz: wire_len::<DeviceInfo>(),
            flags: VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
        };
        ok(wire_bytes(&info).to_vec())
    }

    /// Size of an accessible region (0: not accessible).
    fn region_size(&self, index: u32) -> u64 {
        match index {
            CONFIG_REGION => PCI_CONFIG_SIZE,
            BAR0_REGION => self.sh.bar0_size,
            BAR4_REGION => self.sh.bar4_size,
            _ => 0,
        }
    }

    fn region_info(&self, body: &[u8]) -> Outcome {
        let Some(req) = read_wire::<RegionInfo>(body) else {
            return err(libc::EINVAL, format!("DEVICE_GET_REGION_INFO payload of {} bytes", body.len()));
        };
        if req.argsz < wire_len::<RegionInfo>() {
            return err(libc::EINVAL, format!("DEVICE_GET_REGION_INFO argsz {}", req.argsz));
        }
        if req.index >= NUM_REGIONS {
            return err(libc::EINVAL, format!("region index {} (the device has {NUM_REGIONS})", req.index));
        }
        let size = self.region_size(req.index);
        let mut info = RegionInfo { argsz: wire_len::<RegionInfo>(), index: req.index, size, ..Default::default() };
        if size > 0 {
            info.flags = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
        }
        let mut caps = Vec::new();
        let mut fd = None;
        if req.index == BAR0_REGION && self.client_max_fds >= 1 {
            if let Some(s) = &self.sh.sparse {
                info.flags |= REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS;
                info.offset = s.region_offset;
                push_wire(&mut caps, &CapHeader { id: REGION_INFO_CAP_SPARSE_MMAP, version: 1, next: 0 });
                let nr_areas = u32::try_from(s.areas.len()).unwrap_or(0);
                push_wire(&mut caps, &SparseMmapHeader { nr_areas, reserved: 0 });
                for a in &s.areas {
                    push_wire(&mut caps, a);
                }
                fd = Some(s.fd.clone());
            }
        }
        let needed = wire_len::<RegionInfo>() + u32::try_from(caps.len()).unwrap_or(0);
        info.argsz = needed;
        if req.argsz < needed {
            // Too small for the capabilities: say how much is needed, without them.
            return ok(wire_bytes(&info).to_vec());
        }
        if !caps.is_empty() {
            info.cap_offset = wire_len::<RegionInfo>();
        }
        let mut out = wire_bytes(&info).to_vec();
        out.extend_from_slice(&caps);
        Outcome::Reply(out, fd)
    }

    fn irq_count(&self, index: u32) -> u32 {
        match index {
            INTX_IRQ => 1,
            MSIX_IRQ => u32::from(self.sh.irqs.nvec()),
            _ => 0,
        }
    }

    fn irq_info(&self, body: &[u8]) -> Outcome {
        let Some(req) = read_wire::<IrqInfo>(body) else {
            return err(libc::EINVAL, format!("DEVICE_GET_IRQ_INFO payload of {} bytes", body.len()));
        };
        if req.argsz < wire_len::<IrqInfo>() {
            return err(libc::EINVAL, format!("DEVICE_GET_IRQ_INFO argsz {}", req.argsz));
        }
        let flags = match req.index {
            INTX_IRQ => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            MSI_IRQ => IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
            MSIX_IRQ => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE,
            ERR_IRQ | REQ_IRQ => IRQ_INFO_EVENTFD,
            i => return err(libc::EINVAL, format!("IRQ index {i} (the device has {NUM_IRQS})")),
        };
        let info = IrqInfo { argsz: wire_len::<IrqInfo>(), flags, index: req.index, count: self.irq_count(req.index) };
        ok(wire_bytes(&info).to_vec())
    }

    // ---- interrupts ----

    /// Mirrors vector `v`'s deliverability into the controller's vector mask.
    fn sync_vector_mask(&self, v: u16) {
        self.sh.ctrl.set_msix_vector_masked(v, !self.sh.irqs.msix_deliverable(v));
    }

    fn sync_all_vector_masks(&self) {
        for v in 0..self.sh.irqs.nvec() {
            self.sync_vector_mask(v);
        }
    }

    /// After a device reset or FLR: the controller masked every vector and dropped INTx; the
    /// client's eventfds stay assigned, so deliverable vectors are unmasked again and INTx's
    /// automask is cleared.
    fn rearm_after_reset(&self) {
        self.sync_all_vector_masks();
        self.sh.irqs.set_intx_masked(false);
    }

    fn set_irqs(&mut self, body: &[u8], fds: Vec<OwnedFd>) -> Outcome {
        let Some(s) = read_wire::<IrqSet>(body) else {
            return err(libc::EINVAL, format!("DEVICE_SET_IRQS payload of {} bytes", body.len()));
        };
        if s.argsz < wire_len::<IrqSet>() {
            return err(libc::EINVAL, format!("DEVICE_SET_IRQS argsz {}", s.argsz));
        }
        let data = s.flags & IRQ_SET_DATA_MASK;
        let action = s.flags & IRQ_SET_ACTION_MASK_ALL;
        if s.flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) != 0
            || data.count_ones() != 1
            || action.count_ones() != 1
        {
            return err(libc::EINVAL, format!("DEVICE_SET_IRQS flags {:#x}", s.flags));
        }
        if s.index >= NUM_IRQS {
            return err(libc::EINVAL, format!("IRQ index {} (the device has {NUM_IRQS})", s.index));
        }
        let extra = &body[std::mem::size_of::<IrqSet>()..];
        let bools_len = if data == IRQ_SET_DATA_BOOL { s.count as usize } else { 0 };
        if extra.len() != bools_len {
            return err(
                libc::EINVAL,
                format!("DEVICE_SET_IRQS carries {} data bytes, expected {bools_len}", extra.len()),
            );
        }
        if data != IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return err(libc::EINVAL, "descriptors sent without VFIO_IRQ_SET_DATA_EVENTFD");
        }
        // count 0: "disable all interrupts of the index" (DATA_NONE + TRIGGER), nothing else.
        if s.count == 0 {
            if data != IRQ_SET_DATA_NONE || action != IRQ_SET_ACTION_TRIGGER || s.start != 0 {
                return err(libc::EINVAL, "count 0 is only valid as DATA_NONE | ACTION_TRIGGER from start 0");
            }
            match s.index {
                INTX_IRQ => self.sh.irqs.set_intx_fd(None),
                MSIX_IRQ => {
                    for v in 0..self.sh.irqs.nvec() {
                        self.sh.irqs.set_msix_fd(v, None);
                        self.sh.irqs.set_msix_masked(v, false);
                    }
                    self.sync_all_vector_masks();
                }
                _ => {}
            }
            return ok(Vec::new());
        }
        let max = self.irq_count(s.index);
        let in_range = s.start.checked_add(s.count).is_some_and(|end| end <= max);
        if !in_range {
            return err(libc::EINVAL, format!("IRQs {}+{} of index {} (it has {max})", s.start, s.count, s.index));
        }
        // Which sub-indexes the action applies to.
        let selected: Vec<u32> = (0..s.count)
            .filter(|&i| data != IRQ_SET_DATA_BOOL || extra.get(i as usize).is_some_and(|&b| b != 0))
            .collect();
        let vector = |i: u32| u16::try_from(s.start + i).unwrap_or(u16::MAX);
        match (action, data) {
            (IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) => {
                let assign = match fds.len() {
                    0 => false,
                    n if n == s.count as usize => true,
                    n => return err(libc::EINVAL, format!("{n} eventfds for {} interrupts", s.count)),
                };
                for f in &fds {
                    if !is_eventfd(f.as_fd()) {
                        return err(libc::EINVAL, "an interrupt descriptor is not an eventfd");
                    }
                }
                for f in &fds {
                    // The data path must never block on a full counter.
                    if let Err(e) = set_nonblocking(f.as_fd()) {
                        return err(e.raw_os_error().unwrap_or(libc::EINVAL), format!("eventfd: {e}"));
                    }
                }
                let mut fds = fds.into_iter();
                for i in 0..s.count {
                    let fd = if assign { fds.next() } else { None };
                    if s.index == INTX_IRQ {
                        self.sh.irqs.set_intx_fd(fd);
                    } else {
                        self.sh.irqs.set_msix_fd(vector(i), fd);
                        self.sync_vector_mask(vector(i));
                    }
                }
            }
            (IRQ_SET_ACTION_TRIGGER, _) => {
                for i in selected {
                    if s.index == INTX_IRQ {
                        self.sh.irqs.trigger_intx();
                    } else {
                        self.sh.irqs.trigger_msix(vector(i));
                    }
                }
            }
            (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD) => {
                return err(libc::ENOTSUP, "mask/unmask eventfds are not supported");
            }
            (_, _) => {
                let masked = action == IRQ_SET_ACTION_MASK;
                for i in selected {
                    if s.index == INTX_IRQ {
                        self.sh.irqs.set_intx_masked(masked);
                    } else {
                        self.sh.irqs.set_msix_masked(vector(i), masked);
                        self.sync_vector_mask(vector(i));
                    }
                }
            }
        }
        ok(Vec::new())
    }

    // ---- region access ----

    fn check_access(&self, body: &[u8]) -> Result<RegionAccess, Outcome> {
        let Some(a) = read_wire::<RegionAccess>(body) else {
            return Err(err(libc::EINVAL, format!("region access payload of {} bytes", body.len())));
        };
        let size = self.region_size(a.region);
        if size == 0 {
            return Err(err(libc::EINVAL, format!("region {} is not accessible", a.region)));
        }
        if a.count == 0 || a.count > MAX_DATA_XFER {
            return Err(err(libc::EINVAL, format!("access of {} bytes (1 to {MAX_DATA_XFER})", a.count)));
        }
        if a.offset.checked_add(u64::from(a.count)).is_none_or(|end| end > size) {
            return Err(err(
                libc::EINVAL,
                format!("access {:#x}+{} beyond region {} ({size:#x} bytes)", a.offset, a.count, a.region),
            ));
        }
        Ok(a)
    }

    fn region_read(&self, body: &[u8]) -> Outcome {
        let a = match self.check_access(body) {
            Ok(a) => a,
            Err(o) => return o,
        };
        if body.len() != std::mem::size_of::<RegionAccess>() {
            return err(libc::EINVAL, "REGION_READ carries data");
        }
        let mut data = vec![0u8; a.count as usize];
        match a.region {
            CONFIG_REGION => self.sh.ctrl.pci_config_read(a.offset, &mut data),
            BAR0_REGION => self.sh.ctrl.bar_read(0, a.offset, &mut data),
            _ => self.sh.ctrl.bar_read(4, a.offset, &mut data),
        }
        let mut out = wire_bytes(&a).to_vec();
        out.extend_from_slice(&data);
        ok(out)
    }

    fn region_write(&self, body: &[u8]) -> Outcome {
        let a = match self.check_access(body) {
            Ok(a) => a,
            Err(o) => return o,
        };
        let data = &body[std::mem::size_of::<RegionAccess>()..];
        if data.len() != a.count as usize {
            return err(libc::EINVAL, format!("REGION_WRITE of count {} carries {} bytes", a.count, data.len()));
        }
        match a.region {
            CONFIG_REGION => {
                self.sh.ctrl.pci_config_write(a.offset, data);
                // A Function Level Reset (PCIe Device Control bit 15) masked every vector.
                if let Some(cap) = self.sh.pcie_cap {
                    let flr_byte = cap + 9;
                    let hit = flr_byte.checked_sub(a.offset).and_then(|i| data.get(usize::try_from(i).ok()?));
                    if hit.is_some_and(|b| b & 0x80 != 0) {
                        self.rearm_after_reset();
                    }
                }
            }
            BAR0_REGION => self.sh.ctrl.bar_write(0, a.offset, data),
            _ => self.sh.ctrl.bar_write(4, a.offset, data),
        }
        ok(wire_bytes(&a).to_vec())
    }

    // ---- DMA ----

    fn publish_memory(&self) -> Result<(), MemError> {
        let regions: Vec<Region> = self.dma.values().filter_map(|e| e.region.clone()).collect();
        let mem = GuestMemory::new(regions)?;
        self.sh.ctrl.set_dma_memory(Arc::new(mem));
        Ok(())
    }

    fn dma_map(&mut self, body: &[u8], mut fds: Vec<OwnedFd>) -> Outcome {
        let Some(m) = read_wire::<DmaMap>(body) else {
            return err(libc::EINVAL, format!("DMA_MAP payload of {} bytes", body.len()));
        };
        if m.argsz < wire_len::<DmaMap>() {
            return err(libc::EINVAL, format!("DMA_MAP argsz {}", m.argsz));
        }
        if m.flags & !(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE) != 0 {
            return err(libc::EINVAL, format!("DMA_MAP flags {:#x}", m.flags));
        }
        let Some(fd) = fds.pop() else {
            return err(libc::EINVAL, "DMA_MAP without a file descriptor (message-based DMA is not supported)");
        };
        if !fds.is_empty() {
            return err(libc::EINVAL, "DMA_MAP with more than one file descriptor");
        }
        let end = m.address.checked_add(m.size);
        if m.size == 0 || end.is_none() || m.offset.checked_add(m.size).is_none() {
            return err(libc::EINVAL, format!("DMA range {:#x}+{:#x}", m.address, m.size));
        }
        if !m.address.is_multiple_of(PAGE) || !m.size.is_multiple_of(PAGE) {
            return err(libc::EINVAL, format!("DMA range {:#x}+{:#x} is not 4 KiB aligned", m.address, m.size));
        }
        if self.dma.len() >= MAX_DMA_MAPS {
            return err(libc::ENOSPC, format!("more than {MAX_DMA_MAPS} DMA maps"));
        }
        let end = end.unwrap_or(u64::MAX);
        let before = self.dma.range(..end).next_back();
        if let Some((&start, e)) = before {
            if start + e.size > m.address {
                return err(
                    libc::EEXIST,
                    format!("DMA range {:#x}+{:#x} overlaps {start:#x}+{:#x}", m.address, m.size, e.size),
                );
            }
        }
        let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
        let region = if m.flags == rw {
            let file = File::from(fd);
            match Region::map(&file, m.address, m.size, m.address, m.offset) {
                Ok(r) => Some(r),
                Err(e) => return err(mem_errno(&e), format!("DMA_MAP: {e}")),
            }
        } else {
            tracing::warn!(
                address = m.address,
                size = m.size,
                flags = m.flags,
                "DMA map that is not read-write: tracked, not visible to the controller"
            );
            None
        };
        let mapped = region.is_some();
        self.dma.insert(m.address, DmaEntry { size: m.size, region });
        if mapped {
            if let Err(e) = self.publish_memory() {
                self.dma.remove(&m.address);
                return err(mem_errno(&e), format!("DMA_MAP: {e}"));
            }
        }
        tracing::debug!(address = m.address, size = m.size, maps = self.dma.len(), "DMA map");
        ok(Vec::new())
    }

    fn dma_unmap(&mut self, body: &[u8]) -> Outcome {
        let Some(u) = read_wire::<DmaUnmap>(body) else {
            return err(libc::EINVAL, format!("DMA_UNMAP payload of {} bytes", body.len()));
        };
        if u.argsz < wire_len::<DmaUnmap>() {
            return err(libc::EINVAL, format!("DMA_UNMAP argsz {}", u.argsz));
        }
        if u.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return err(libc::ENOTSUP, "dirty page tracking is not supported");
        }
        if u.flags & !DMA_UNMAP_FLAG_ALL != 0 {
            return err(libc::EINVAL, format!("DMA_UNMAP flags {:#x}", u.flags));
        }
        let removed_mapped = if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if u.address != 0 || u.size != 0 {
                return err(libc::EINVAL, "DMA_UNMAP of all maps with a non-zero range");
            }
            let any = self.dma.values().any(|e| e.region.is_some());
            self.dma.clear();
            any
        } else {
            match self.dma.get(&u.address) {
                Some(e) if e.size == u.size => self.dma.remove(&u.address).is_some_and(|e| e.region.is_some()),
                _ => return err(libc::ENOENT, format!("no DMA map at {:#x}+{:#x}", u.address, u.size)),
            }
        };
        if removed_mapped {
            if let Err(e) = self.publish_memory() {
                // Removing regions cannot make a valid table invalid; empty memory is the safe side.
                tracing::error!("rebuilding DMA memory after unmap: {e}");
                self.sh.ctrl.set_dma_memory(Arc::new(GuestMemory::empty()));
            }
        }
        tracing::debug!(address = u.address, size = u.size, maps = self.dma.len(), "DMA unmap");
        let reply = DmaUnmap { argsz: wire_len::<DmaUnmap>(), flags: u.flags, address: u.address, size: u.size };
        ok(wire_bytes(&reply).to_vec())
    }

    /// The client is gone: reset the controller (drains in-flight I/O), drop its memory and
    /// interrupt descriptors.
    fn teardown(&mut self) {
        self.sh.ctrl.reset();
        self.sh.ctrl.set_dma_memory(Arc::new(GuestMemory::empty()));
        self.dma.clear();
        self.sh.irqs.clear();
        self.sync_all_vector_masks();
    }
}
