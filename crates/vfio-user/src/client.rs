//! An NVMe host driver over vfio-user: what a VMM plus a guest's NVMe driver do to an NVMe
//! vfio-user device, in one library. The protocol side is rust-vmm's `vfio_user::Client` (an
//! implementation independent of this crate's server, so each checks the other).
//!
//! [`NvmeClient::connect`] connects to `<dir>/cntrl`, shares a memfd as DMA memory (one
//! `DMA_MAP` with the descriptor, IOVA [`IOVA_BASE`]), maps BAR0's doorbells when the server
//! offers them as a sparse-mmap area (else doorbells are `REGION_WRITE`s), and brings the
//! controller up the way Linux's `nvme` driver does: enable bus mastering (and MSI-X with one
//! eventfd per vector through `SET_IRQS` when interrupts are asked for), read CAP, disable and
//! wait for RDY=0, program AQA/ASQ/ACQ, enable and wait for RDY=1, Identify Controller, Set
//! Features Number of Queues, Asynchronous Event Configuration, the active namespace list and
//! Identify Namespace for each, Create I/O CQ/SQ pairs (CQ `q` on vector `q`), Doorbell Buffer
//! Config when offered and asked for, and one Asynchronous Event Request.
//!
//! Memory layout of the memfd (offsets; IOVA = [`IOVA_BASE`] + offset): admin SQ, admin CQ, a
//! scratch page (Identify, log pages), the shadow doorbell and EventIdx pages, per I/O queue its
//! SQ, CQ and one PRP-list page per command slot, then the data buffer ([`NvmeClient::buf`]).
//!
//! Data transfers use PRPs: PRP1 (any dword-aligned address), PRP2 as the second page or a PRP
//! list when the transfer spans more than two pages. Transfers are limited by the controller's
//! MDTS and by one PRP-list page (2 MiB).
//!
//! `unsafe` is confined to `DmaMem` (volatile, bounds-checked accesses to the DMA memory, which
//! `vstor_mem::Region` maps), `MappedDoorbells` (the doorbell `mmap` and its volatile stores) and
//! the raw `poll(2)` of the interrupt eventfds.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vfio_user::Client;
use vmm_sys_util::eventfd::EventFd;

use crate::proto::{BAR0_REGION, CONFIG_REGION, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD, MSIX_IRQ};

/// IOVA of the first byte of the client's DMA memory.
pub const IOVA_BASE: u64 = 0x1_0000_0000;
/// Admin queue entries.
pub const ADMIN_DEPTH: u16 = 32;
const PAGE: usize = 4096;
const PAGE64: u64 = 4096;
/// Command identifiers from here on are Asynchronous Event Requests.
const AER_CID: u16 = 0xf000;
/// Largest transfer one PRP-list page can describe.
const MAX_PRP_XFER: usize = 512 * PAGE;

// NVMe registers and opcodes (NVM Express Base Specification 1.4).
const REG_CAP: u64 = 0x00;
const REG_CC: u64 = 0x14;
const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
const DOORBELL_BASE: u64 = 0x1000;
const CC_EN: u32 = 1;
const CC_SHN_NORMAL: u32 = 1 << 14;
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;
const CSTS_SHST_MASK: u32 = 3 << 2;
const CSTS_SHST_DONE: u32 = 2 << 2;
const ADM_CREATE_SQ: u8 = 0x01;
const ADM_GET_LOG_PAGE: u8 = 0x02;
const ADM_CREATE_CQ: u8 = 0x05;
const ADM_IDENTIFY: u8 = 0x06;
const ADM_SET_FEATURES: u8 = 0x09;
const ADM_ASYNC_EVENT: u8 = 0x0c;
const ADM_DBBUF_CONFIG: u8 = 0x7c;
const IO_FLUSH: u8 = 0x00;
const IO_WRITE: u8 = 0x01;
const IO_READ: u8 = 0x02;
const IO_WRITE_ZEROES: u8 = 0x08;
const IO_DSM: u8 = 0x09;
const FEAT_NUM_QUEUES: u32 = 0x07;
const FEAT_ASYNC_EVENT_CONFIG: u32 = 0x0b;
/// Log page: Changed Namespace List.
pub const LOG_CHANGED_NS: u8 = 0x04;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vfio-user: {0}")]
    Vfu(#[from] vfio_user::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("invalid {param}: {msg}")]
    InvalidArg { param: &'static str, msg: String },
    #[error("the device is not usable: {0}")]
    Device(String),
    #[error("the controller reports a fatal status (CSTS {0:#x})")]
    Fatal(u32),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("admin command {opcode:#04x} failed with status {status:#06x}")]
    Admin { opcode: u8, status: u16 },
    #[error("I/O queue {0} has no free command slot")]
    QueueFull(u16),
}

fn io_err(context: &str) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io { context: context.into(), source }
}

fn arg(param: &'static str, msg: impl Into<String>) -> ClientError {
    ClientError::InvalidArg { param, msg: msg.into() }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Directory of the socket (`<dir>/cntrl`).
    pub dir: PathBuf,
    /// I/O queue pairs to create (the controller may grant fewer).
    pub io_queues: u16,
    /// Entries per I/O queue (capped by CAP.MQES + 1).
    pub queue_depth: u16,
    /// Use Doorbell Buffer Config when the controller offers it.
    pub shadow_doorbells: bool,
    /// Complete I/O through MSI-X interrupts (eventfds) instead of pure polling.
    pub interrupts: bool,
    /// Bytes of data buffer ([`NvmeClient::buf`]).
    pub buf_size: usize,
    /// Longest wait for an admin command or a controller state change.
    pub admin_timeout: Duration,
    /// Do not ring the SQ doorbell on submission; the caller rings with [`NvmeClient::ring`].
    pub defer_doorbells: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            dir: PathBuf::new(),
            io_queues: 1,
            queue_depth: 128,
            shadow_doorbells: true,
            interrupts: false,
            buf_size: 1 << 20,
            admin_timeout: Duration::from_secs(10),
            defer_doorbells: false,
        }
    }
}

/// An active namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub blocks: u64,
}

/// What [`NvmeClient::reset_and_reinit`] resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// Controller reset: CC.EN = 0, wait for CSTS.RDY = 0.
    Controller,
    /// Device reset: `VFIO_USER_DEVICE_RESET` (function level: PCI state and MSI-X too).
    Function,
    /// Function Level Reset through the PCI Express Device Control register.
    Flr,
}

/// A completion entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub sqhd: u16,
    pub cid: u16,
    /// Status field without the phase tag: SC (7:0), SCT (10:8), CRD, M, DNR (14).
    pub status: u16,
}

impl Completion {
    /// SC and SCT are zero.
    pub fn is_success(&self) -> bool {
        self.status & 0x7ff == 0
    }
}

/// The client's DMA memory: a memfd mapped shared (through `vstor_mem::Region`, which owns the
/// mapping), accessed with volatile bounds-checked operations (the device writes it concurrently).
struct DmaMem {
    region: vstor_mem::Region,
    len: usize,
    file: File,
}

impl DmaMem {
    fn new(len: usize) -> Result<DmaMem, ClientError> {
        let file = vstor_mem::memfd("vstor-nvme-client", len as u64).map_err(io_err("memfd"))?;
        let region = vstor_mem::Region::map(&file, 0, len as u64, 0, 0)
            .map_err(|e| io_err("mmap of the DMA memory")(std::io::Error::other(e.to_string())))?;
        Ok(DmaMem { region, len, file })
    }

    /// Pointer to `len` bytes at `off`. Offsets are computed by this module; an out-of-range one
    /// is a bug here, not bad input.
    fn at(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "DMA memory access {off:#x}+{len} out of range"
        );
        // SAFETY: `off + len <= self.len` (checked above): inside the region's mapping.
        unsafe { self.region.host().add(off) }
    }

    fn read32(&self, off: usize) -> u32 {
        assert!(off.is_multiple_of(4));
        // SAFETY: in range (checked by `at`) and 4-byte aligned (the mapping is page aligned).
        unsafe { std::ptr::read_volatile(self.at(off, 4).cast::<u32>()) }
    }

    fn write32(&self, off: usize, v: u32) {
        assert!(off.is_multiple_of(4));
        // SAFETY: in range (checked by `at`) and 4-byte aligned.
        unsafe { std::ptr::write_volatile(self.at(off, 4).cast::<u32>(), v) }
    }

    fn write64(&self, off: usize, v: u64) {
        let (lo, hi) = split64(v);
        self.write32(off, lo);
        self.write32(off + 4, hi);
    }

    fn read_bytes(&self, off: usize, out: &mut [u8]) {
        let p = self.at(off, out.len());
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: `i < out.len()`, inside the range checked by `at`.
            *b = unsafe { std::ptr::read_volatile(p.add(i)) };
        }
    }

    fn zero(&self, off: usize, len: usize) {
        let p = self.at(off, len);
        for i in 0..len {
            // SAFETY: `i < len`, inside the range checked by `at`.
            unsafe { std::ptr::write_volatile(p.add(i), 0) };
        }
    }

    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        let p = self.at(off, len);
        // SAFETY: in range (checked by `at`); the borrow of `self` is exclusive on our side.
        // The device writes this memory only for commands the caller submitted.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }
}

/// BAR0's doorbells mapped from the server's sparse-mmap area.
pub(crate) struct MappedDoorbells {
    ptr: *mut u8,
    len: usize,
    /// BAR0 offset of the first mapped byte.
    bar_off: u64,
}

// SAFETY: the mapping is owned by this value and only written with volatile stores.
unsafe impl Send for MappedDoorbells {}

impl Drop for MappedDoorbells {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` come from a successful mmap and are unmapped once, here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl MappedDoorbells {
    pub(crate) fn map(vfu: &Client) -> Option<MappedDoorbells> {
        let r = vfu.region(BAR0_REGION)?;
        let fo = r.file_offset.as_ref()?;
        let area = r
            .sparse_areas
            .iter()
            .find(|a| a.offset <= DOORBELL_BASE && DOORBELL_BASE < a.offset.saturating_add(a.size))?;
        let off = libc::off_t::try_from(fo.start().checked_add(area.offset)?).ok()?;
        let len = usize::try_from(area.size).ok()?;
        // SAFETY: a new shared mapping of the server's descriptor at a kernel-chosen address;
        // unmapped by `Drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fo.file().as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::warn!("mapping BAR0's doorbells: {}", std::io::Error::last_os_error());
            return None;
        }
        Some(MappedDoorbells { ptr: p.cast(), len, bar_off: area.offset })
    }

    /// Stores `v` at BAR0 offset `off` if mapped here.
    pub(crate) fn write(&self, off: u64, v: u32) -> bool {
        let Some(rel) = off.checked_sub(self.bar_off).and_then(|r| usize::try_from(r).ok()) else { return false };
        if rel.checked_add(4).is_none_or(|end| end > self.len) || !rel.is_multiple_of(4) {
            return false;
        }
        // SAFETY: `rel + 4 <= len` inside a live shared mapping, 4-byte aligned.
        unsafe { std::ptr::write_volatile(self.ptr.add(rel).cast::<u32>(), v) };
        true
    }
}

/// Host view of one queue pair.
struct Queue {
    qid: u16,
    size: u16,
    sq_off: usize,
    cq_off: usize,
    tail: u16,
    head: u16,
    phase: bool,
    /// User tag of each command slot (CID) in flight.
    slots: Vec<Option<u16>>,
    free: Vec<u16>,
    /// First PRP-list page (one page per CID).
    prp_off: usize,
    /// Completions found by a `wait` that timed out, handed out by the next poll.
    stash: Vec<(u16, u16)>,
}

impl Queue {
    fn new(qid: u16, size: u16, sq_off: usize, cq_off: usize, prp_off: usize) -> Queue {
        let slots = if qid == 0 { 0 } else { usize::from(size) - 1 };
        Queue {
            qid,
            size,
            sq_off,
            cq_off,
            tail: 0,
            head: 0,
            phase: true,
            slots: vec![None; slots],
            free: (0..u16::try_from(slots).unwrap_or(0)).rev().collect(),
            prp_off,
            stash: Vec::new(),
        }
    }
}

/// Offsets in the DMA memory.
#[derive(Debug, Clone, Copy)]
struct Layout {
    admin_sq: usize,
    admin_cq: usize,
    scratch: usize,
    shadow_db: usize,
    shadow_ei: usize,
    shadow_pages: usize,
    queues: usize,
    sq_bytes: usize,
    cq_bytes: usize,
    per_queue: usize,
    buf: usize,
    buf_len: usize,
    total: usize,
}

fn pages(bytes: usize) -> usize {
    bytes.div_ceil(PAGE).max(1) * PAGE
}

impl Layout {
    fn new(io_queues: u16, depth: u16, buf_size: usize) -> Layout {
        let shadow_pages = pages(2 * (usize::from(io_queues) + 1) * 4);
        let admin_sq = 0;
        let admin_cq = admin_sq + pages(usize::from(ADMIN_DEPTH) * 64);
        let scratch = admin_cq + pages(usize::from(ADMIN_DEPTH) * 16);
        let shadow_db = scratch + PAGE;
        let shadow_ei = shadow_db + shadow_pages;
        let queues = shadow_ei + shadow_pages;
        let sq_bytes = pages(usize::from(depth) * 64);
        let cq_bytes = pages(usize::from(depth) * 16);
        let per_queue = sq_bytes + cq_bytes + usize::from(depth) * PAGE;
        let buf = queues + per_queue * usize::from(io_queues);
        let buf_len = pages(buf_size);
        Layout {
            admin_sq,
            admin_cq,
            scratch,
            shadow_db,
            shadow_ei,
            shadow_pages,
            queues,
            sq_bytes,
            cq_bytes,
            per_queue,
            buf,
            buf_len,
            total: buf + buf_len,
        }
    }

    /// (SQ, CQ, PRP pages) offsets of I/O queue `q` (1-based).
    fn queue(&self, q: u16) -> (usize, usize, usize) {
        let base = self.queues + self.per_queue * (usize::from(q) - 1);
        (base, base + self.sq_bytes, base + self.sq_bytes + self.cq_bytes)
    }
}

fn iova(off: usize) -> u64 {
    IOVA_BASE + off as u64
}

/// Low and high dwords of a qword (command fields split that way).
#[allow(clippy::cast_possible_truncation)] // truncation is the point
fn split64(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

/// Low 16 bits (doorbell values are 16-bit indexes stored in dwords).
#[allow(clippy::cast_possible_truncation)] // truncation is the point
fn low16(v: u32) -> u16 {
    v as u16
}

/// Linux's EventIdx test: ring when the device asked to hear about an index in (old, new].
fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A submission queue entry under construction.
#[derive(Debug, Clone, Copy, Default)]
struct Sqe([u32; 16]);

impl Sqe {
    fn new(opc: u8) -> Sqe {
        let mut s = Sqe::default();
        s.0[0] = u32::from(opc);
        s
    }
    fn nsid(mut self, n: u32) -> Sqe {
        self.0[1] = n;
        self
    }
    fn prp(mut self, p1: u64, p2: u64) -> Sqe {
        (self.0[6], self.0[7]) = split64(p1);
        (self.0[8], self.0[9]) = split64(p2);
        self
    }
    fn slba(mut self, lba: u64) -> Sqe {
        (self.0[10], self.0[11]) = split64(lba);
        self
    }
    fn dw(mut self, i: usize, v: u32) -> Sqe {
        self.0[i] = v;
        self
    }
    fn opcode(&self) -> u8 {
        (self.0[0] & 0xff) as u8
    }
}

/// Identify Controller fields used here.
#[derive(Debug, Clone, Copy, Default)]
struct CtrlInfo {
    mdts_bytes: usize,
    oacs: u16,
    oaes: u32,
}

/// An NVMe controller driven over vfio-user.
pub struct NvmeClient {
    opts: ClientOptions,
    vfu: Client,
    mem: DmaMem,
    layout: Layout,
    mapped: Option<MappedDoorbells>,
    /// Doorbell stride in bytes (4 << CAP.DSTRD).
    db_stride: u64,
    timeout: Duration,
    admin: Queue,
    next_admin_cid: u16,
    io: Vec<Queue>,
    depth: u16,
    irqs: Vec<EventFd>,
    msix_count: u32,
    info: CtrlInfo,
    ns: Vec<NsInfo>,
    events: Vec<u32>,
    pending_logs: Vec<u8>,
    aer_outstanding: bool,
    shadow_active: bool,
    irq_count: u64,
}

impl std::fmt::Debug for NvmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NvmeClient({}, {} I/O queues)", self.opts.dir.display(), self.io.len())
    }
}

impl NvmeClient {
    /// Connects to `<dir>/cntrl`, shares DMA memory and brings the controller up.
    pub fn connect(o: &ClientOptions) -> Result<NvmeClient, ClientError> {
        if !(1..=1023).contains(&o.io_queues) {
            return Err(arg("io_queues", format!("{} is not between 1 and 1023", o.io_queues)));
        }
        if !(2..=4096).contains(&o.queue_depth) {
            return Err(arg("queue_depth", format!("{} is not between 2 and 4096", o.queue_depth)));
        }
        if o.buf_size == 0 || o.buf_size > 1 << 30 {
            return Err(arg("buf_size", format!("{} is not between 1 byte and 1 GiB", o.buf_size)));
        }
        let layout = Layout::new(o.io_queues, o.queue_depth, o.buf_size);
        let mut vfu = Client::new(&o.dir.join(crate::nvmf::SOCKET_NAME))?;
        let mem = DmaMem::new(layout.total)?;
        vfu.dma_map(0, IOVA_BASE, layout.total as u64, mem.file.as_raw_fd())?;
        let mapped = MappedDoorbells::map(&vfu);
        let msix_count = vfu.get_irq_info(MSIX_IRQ)?.count;
        let mut c = NvmeClient {
            opts: o.clone(),
            vfu,
            mem,
            layout,
            mapped,
            db_stride: 4,
            timeout: o.admin_timeout,
            admin: Queue::new(0, ADMIN_DEPTH, layout.admin_sq, layout.admin_cq, 0),
            next_admin_cid: 0,
            io: Vec::new(),
            depth: o.queue_depth,
            irqs: Vec::new(),
            msix_count,
            info: CtrlInfo::default(),
            ns: Vec::new(),
            events: Vec::new(),
            pending_logs: Vec::new(),
            aer_outstanding: false,
            shadow_active: false,
            irq_count: 0,
        };
        c.bring_up()?;
        Ok(c)
    }

    // ---- accessors ----

    /// Active namespaces, by NSID.
    pub fn namespaces(&self) -> &[NsInfo] {
        &self.ns
    }

    /// Namespace `nsid`, if active.
    pub fn namespace(&self, nsid: u32) -> Option<NsInfo> {
        self.ns.iter().copied().find(|n| n.nsid == nsid)
    }

    /// I/O queues in use (numbered 1..=n).
    pub fn io_queues(&self) -> u16 {
        u16::try_from(self.io.len()).unwrap_or(u16::MAX)
    }

    /// Entries per I/O queue (at most `queue_depth - 1` commands in flight per queue).
    pub fn queue_depth(&self) -> u16 {
        self.depth
    }

    /// Whether Doorbell Buffer Config is in effect.
    pub fn shadow_doorbells_active(&self) -> bool {
        self.shadow_active
    }

    /// Whether BAR0's doorbells are mapped (else they are trapped `REGION_WRITE`s).
    pub fn doorbells_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    /// Bytes of DMA memory shared with the device (mapped at [`IOVA_BASE`]).
    pub fn dma_len(&self) -> u64 {
        self.layout.total as u64
    }

    /// Largest transfer of one command, in bytes.
    pub fn max_transfer(&self) -> usize {
        self.info.mdts_bytes
    }

    /// Commands in flight on I/O queue `q`.
    pub fn outstanding(&self, q: u16) -> usize {
        self.queue(q).map(|qu| qu.slots.iter().filter(|s| s.is_some()).count()).unwrap_or(0)
    }

    /// The data buffer. Transfers name offsets into it. The device writes it for reads in
    /// flight: touch only the parts no submitted command uses.
    pub fn buf(&mut self) -> &mut [u8] {
        let (off, len) = (self.layout.buf, self.layout.buf_len);
        self.mem.slice_mut(off, len)
    }

    /// The underlying vfio-user client (region access, raw commands).
    pub fn vfio_user(&mut self) -> &mut Client {
        &mut self.vfu
    }

    // ---- registers, configuration space, doorbells ----

    fn reg32(&mut self, off: u64) -> Result<u32, ClientError> {
        let mut b = [0u8; 4];
        self.vfu.region_read(BAR0_REGION, off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn reg64(&mut self, off: u64) -> Result<u64, ClientError> {
        let mut b = [0u8; 8];
        self.vfu.region_read(BAR0_REGION, off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn set_reg32(&mut self, off: u64, v: u32) -> Result<(), ClientError> {
        Ok(self.vfu.region_write(BAR0_REGION, off, &v.to_le_bytes())?)
    }

    fn set_reg64(&mut self, off: u64, v: u64) -> Result<(), ClientError> {
        Ok(self.vfu.region_write(BAR0_REGION, off, &v.to_le_bytes())?)
    }

    fn cfg16(&mut self, off: u64) -> Result<u16, ClientError> {
        let mut b = [0u8; 2];
        self.vfu.region_read(CONFIG_REGION, off, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn set_cfg16(&mut self, off: u64, v: u16) -> Result<(), ClientError> {
        Ok(self.vfu.region_write(CONFIG_REGION, off, &v.to_le_bytes())?)
    }

    /// CSTS as read now.
    pub fn csts(&mut self) -> Result<u32, ClientError> {
        self.reg32(REG_CSTS)
    }

    fn find_capability(&mut self, id: u8) -> Result<Option<u64>, ClientError> {
        let mut ptr = u64::from(self.cfg16(0x34)? & 0xfc);
        for _ in 0..48 {
            if ptr < 0x40 {
                return Ok(None);
            }
            let w = self.cfg16(ptr)?;
            if (w & 0xff) as u8 == id {
                return Ok(Some(ptr));
            }
            ptr = u64::from((w >> 8) & 0xfc);
        }
        Ok(None)
    }

    fn write_doorbell(&mut self, index: u32, v: u16) -> Result<(), ClientError> {
        let off = DOORBELL_BASE + u64::from(index) * self.db_stride;
        fence(Ordering::SeqCst);
        if let Some(m) = &self.mapped {
            if m.write(off, u32::from(v)) {
                return Ok(());
            }
        }
        self.set_reg32(off, u32::from(v))
    }

    /// Rings doorbell `index` (SQ y tail: 2y, CQ y head: 2y + 1) with `v`, through the shadow
    /// buffer when in effect (I/O queues only), touching BAR0 only when EventIdx asks for it.
    fn ring_doorbell(&mut self, index: u32, v: u16) -> Result<(), ClientError> {
        if self.shadow_active && index >= 2 {
            let slot = index as usize * usize::try_from(self.db_stride).unwrap_or(4);
            let (db, ei) = (self.layout.shadow_db + slot, self.layout.shadow_ei + slot);
            if slot + 4 <= self.layout.shadow_pages {
                let old = self.mem.read32(db);
                fence(Ordering::SeqCst);
                self.mem.write32(db, u32::from(v));
                fence(Ordering::SeqCst);
                let event = self.mem.read32(ei);
                if !need_event(low16(event), v, low16(old)) {
                    return Ok(());
                }
            }
        }
        self.write_doorbell(index, v)
    }

    fn wait_csts(&mut self, what: &str, mask: u32, want: u32) -> Result<u32, ClientError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let csts = self.reg32(REG_CSTS)?;
            if csts & mask == want {
                return Ok(csts);
            }
            if csts & CSTS_CFS != 0 && mask & CSTS_CFS == 0 {
                return Err(ClientError::Fatal(csts));
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(format!("{what} (CSTS {csts:#x})")));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    // ---- bring-up ----

    fn bring_up(&mut self) -> Result<(), ClientError> {
        let nq = self.opts.io_queues;
        // PCI: memory space and bus mastering.
        let cmd = self.cfg16(0x04)?;
        self.set_cfg16(0x04, cmd | 0x6)?;
        if self.opts.interrupts {
            self.setup_msix(nq)?;
        }
        let cap = self.reg64(REG_CAP)?;
        if cap & (1 << 37) == 0 {
            return Err(ClientError::Device("CAP.CSS lacks the NVM command set".into()));
        }
        if (cap >> 48) & 0xf != 0 {
            return Err(ClientError::Device("CAP.MPSMIN is above 4 KiB".into()));
        }
        self.db_stride = 4 << ((cap >> 32) & 0xf);
        let to = Duration::from_millis(500 * ((cap >> 24) & 0xff));
        self.timeout = self.opts.admin_timeout.max(to);
        let mqes = u16::try_from((cap & 0xffff) + 1).unwrap_or(u16::MAX);
        self.depth = self.opts.queue_depth.min(mqes);

        // Disable.
        let cc = self.reg32(REG_CC)?;
        if cc & CC_EN != 0 {
            self.set_reg32(REG_CC, cc & !CC_EN)?;
        }
        self.wait_csts("CSTS.RDY = 0", CSTS_RDY, 0)?;

        // Admin queues.
        let l = self.layout;
        self.mem.zero(l.admin_sq, l.admin_cq - l.admin_sq);
        self.mem.zero(l.admin_cq, l.scratch - l.admin_cq);
        self.admin = Queue::new(0, ADMIN_DEPTH, l.admin_sq, l.admin_cq, 0);
        self.aer_outstanding = false;
        let a = u32::from(ADMIN_DEPTH - 1);
        self.set_reg32(REG_AQA, (a << 16) | a)?;
        self.set_reg64(REG_ASQ, iova(l.admin_sq))?;
        self.set_reg64(REG_ACQ, iova(l.admin_cq))?;
        // Enable: NVM command set, 4 KiB pages, round robin, 64-byte SQEs, 16-byte CQEs.
        self.set_reg32(REG_CC, CC_EN | (6 << 16) | (4 << 20))?;
        self.wait_csts("CSTS.RDY = 1", CSTS_RDY, CSTS_RDY)?;

        // Identify Controller.
        let id = self.identify(1, 0)?;
        let mdts = id[77];
        let mdts_bytes =
            if mdts == 0 { MAX_PRP_XFER } else { PAGE.checked_shl(u32::from(mdts)).unwrap_or(MAX_PRP_XFER) };
        self.info = CtrlInfo {
            mdts_bytes: mdts_bytes.min(MAX_PRP_XFER),
            oacs: u16::from_le_bytes([id[256], id[257]]),
            oaes: u32::from_le_bytes([id[92], id[93], id[94], id[95]]),
        };

        // Number of queues.
        let want = u32::from(nq - 1);
        let c = self.admin_cmd(Sqe::new(ADM_SET_FEATURES).dw(10, FEAT_NUM_QUEUES).dw(11, (want << 16) | want))?;
        let granted = ((c.dw0 & 0xffff).min(c.dw0 >> 16) + 1).min(u32::from(nq));
        let nq = u16::try_from(granted).unwrap_or(1);

        // Asynchronous events: namespace attribute notices.
        if self.info.oaes & (1 << 8) != 0 {
            self.admin_cmd(Sqe::new(ADM_SET_FEATURES).dw(10, FEAT_ASYNC_EVENT_CONFIG).dw(11, 1 << 8))?;
        }

        self.rescan_namespaces()?;

        // I/O queues.
        self.io.clear();
        self.shadow_active = false;
        for q in 1..=nq {
            let (sq, cq, prp) = l.queue(q);
            self.mem.zero(sq, l.sq_bytes);
            self.mem.zero(cq, l.cq_bytes);
            let size = u32::from(self.depth - 1) << 16;
            let ien = if self.opts.interrupts { 1 << 1 } else { 0 };
            self.admin_cmd(
                Sqe::new(ADM_CREATE_CQ)
                    .prp(iova(cq), 0)
                    .dw(10, size | u32::from(q))
                    .dw(11, (u32::from(q) << 16) | ien | 1),
            )?;
            self.admin_cmd(
                Sqe::new(ADM_CREATE_SQ).prp(iova(sq), 0).dw(10, size | u32::from(q)).dw(11, (u32::from(q) << 16) | 1),
            )?;
            self.io.push(Queue::new(q, self.depth, sq, cq, prp));
        }

        // Shadow doorbells.
        if self.opts.shadow_doorbells && self.info.oacs & (1 << 8) != 0 {
            self.mem.zero(l.shadow_db, l.shadow_pages);
            self.mem.zero(l.shadow_ei, l.shadow_pages);
            self.admin_cmd(Sqe::new(ADM_DBBUF_CONFIG).prp(iova(l.shadow_db), iova(l.shadow_ei)))?;
            self.shadow_active = true;
        }

        self.submit_aer()?;
        tracing::debug!(
            queues = nq,
            depth = self.depth,
            shadow = self.shadow_active,
            mapped = self.mapped.is_some(),
            interrupts = self.opts.interrupts,
            "NVMe controller up"
        );
        Ok(())
    }

    fn setup_msix(&mut self, nq: u16) -> Result<(), ClientError> {
        let nvec = u32::from(nq) + 1;
        if nvec > self.msix_count {
            return Err(ClientError::Device(format!("{} MSI-X vectors, {nvec} needed", self.msix_count)));
        }
        let cap = self.find_capability(0x11)?.ok_or_else(|| ClientError::Device("no MSI-X capability".into()))?;
        // The eventfds are assigned once per connection: they stay assigned across controller,
        // function and device resets (the server keeps them and re-arms the vectors).
        if self.irqs.len() < nvec as usize {
            self.irqs = (0..nvec)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
                .collect::<Result<_, _>>()
                .map_err(io_err("eventfd"))?;
            let fds: Vec<i32> = self.irqs.iter().map(|e| e.as_raw_fd()).collect();
            self.vfu.set_irqs(MSIX_IRQ, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, nvec, &fds)?;
        }
        // MSI-X Enable, function not masked.
        let ctrl = self.cfg16(cap + 2)?;
        self.set_cfg16(cap + 2, (ctrl | 0x8000) & !0x4000)?;
        Ok(())
    }

    /// Re-reads the active namespace list and each namespace's geometry.
    pub fn rescan_namespaces(&mut self) -> Result<(), ClientError> {
        let list = self.identify(2, 0)?;
        let mut ns = Vec::new();
        for w in list.chunks_exact(4) {
            let nsid = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            if nsid == 0 {
                break;
            }
            let id = self.identify(0, nsid)?;
            let nsze = u64::from_le_bytes(id[0..8].try_into().unwrap_or([0; 8]));
            let flbas = usize::from(id[26] & 0xf);
            let lbaf = 128 + 4 * flbas;
            let lbads = u32::from(id[lbaf + 2]);
            if nsze == 0 || !(9..=16).contains(&lbads) {
                continue;
            }
            ns.push(NsInfo { nsid, block_size: 1 << lbads, blocks: nsze });
        }
        self.ns = ns;
        Ok(())
    }

    fn identify(&mut self, cns: u32, nsid: u32) -> Result<Vec<u8>, ClientError> {
        let s = self.layout.scratch;
        self.mem.zero(s, PAGE);
        self.admin_cmd(Sqe::new(ADM_IDENTIFY).nsid(nsid).prp(iova(s), 0).dw(10, cns))?;
        let mut out = vec![0u8; PAGE];
        self.mem.read_bytes(s, &mut out);
        Ok(out)
    }

    /// Reads log page `lid` (4 KiB) and returns it.
    pub fn get_log_page(&mut self, lid: u8, nsid: u32) -> Result<Vec<u8>, ClientError> {
        let s = self.layout.scratch;
        self.mem.zero(s, PAGE);
        let numd: u32 = 4096 / 4 - 1;
        self.admin_cmd(Sqe::new(ADM_GET_LOG_PAGE).nsid(nsid).prp(iova(s), 0).dw(10, (numd << 16) | u32::from(lid)))?;
        let mut out = vec![0u8; PAGE];
        self.mem.read_bytes(s, &mut out);
        Ok(out)
    }

    // ---- admin queue ----

    fn sq_write(&self, q: &Queue, sqe: &Sqe) {
        let off = q.sq_off + usize::from(q.tail) * 64;
        for (i, d) in sqe.0.iter().enumerate() {
            self.mem.write32(off + i * 4, *d);
        }
    }

    /// The next completion posted on `qu`, consumed.
    fn next_cqe(mem: &DmaMem, qu: &mut Queue) -> Option<Completion> {
        let off = qu.cq_off + usize::from(qu.head) * 16;
        let dw3 = mem.read32(off + 12);
        if (dw3 >> 16) & 1 != u32::from(qu.phase) {
            return None;
        }
        fence(Ordering::Acquire);
        let dw0 = mem.read32(off);
        let dw2 = mem.read32(off + 8);
        qu.head += 1;
        if qu.head == qu.size {
            qu.head = 0;
            qu.phase = !qu.phase;
        }
        Some(Completion { dw0, sqhd: (dw2 & 0xffff) as u16, cid: (dw3 & 0xffff) as u16, status: (dw3 >> 17) as u16 })
    }

    fn admin_submit(&mut self, sqe: Sqe) -> Result<(), ClientError> {
        // At most one command and one AER are outstanding: the admin queue never fills.
        let next = (self.admin.tail + 1) % self.admin.size;
        self.sq_write(&self.admin, &sqe);
        self.admin.tail = next;
        self.ring_doorbell(0, next)
    }

    /// Consumes posted admin completions: AER completions are recorded, the one with `cid` (if
    /// any) returned.
    fn drain_admin(&mut self, cid: Option<u16>) -> Result<Option<Completion>, ClientError> {
        let mut found = None;
        let mut consumed = false;
        while let Some(c) = Self::next_cqe(&self.mem, &mut self.admin) {
            consumed = true;
            if c.cid >= AER_CID {
                self.aer_outstanding = false;
                if c.is_success() {
                    self.events.push(c.dw0);
                    self.pending_logs.push(((c.dw0 >> 16) & 0xff) as u8);
                }
            } else if Some(c.cid) == cid {
                found = Some(c);
                break;
            }
        }
        if consumed {
            let head = self.admin.head;
            self.ring_doorbell(1, head)?;
        }
        Ok(found)
    }

    /// Runs one admin command to completion.
    fn admin_cmd(&mut self, mut sqe: Sqe) -> Result<Completion, ClientError> {
        let cid = self.next_admin_cid;
        self.next_admin_cid = (cid + 1) % AER_CID;
        sqe.0[0] = (sqe.0[0] & 0xffff) | (u32::from(cid) << 16);
        self.admin_submit(sqe)?;
        let deadline = Instant::now() + self.timeout;
        let mut last_csts_check = Instant::now();
        loop {
            if let Some(c) = self.drain_admin(Some(cid))? {
                if !c.is_success() {
                    return Err(ClientError::Admin { opcode: sqe.opcode(), status: c.status });
                }
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(format!("admin command {:#04x}", sqe.opcode())));
            }
            if now.duration_since(last_csts_check) > Duration::from_millis(100) {
                last_csts_check = now;
                let csts = self.reg32(REG_CSTS)?;
                if csts & CSTS_CFS != 0 {
                    return Err(ClientError::Fatal(csts));
                }
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    fn submit_aer(&mut self) -> Result<(), ClientError> {
        if self.aer_outstanding {
            return Ok(());
        }
        let sqe = Sqe::new(ADM_ASYNC_EVENT).dw(0, u32::from(ADM_ASYNC_EVENT) | (u32::from(AER_CID) << 16));
        self.admin_submit(sqe)?;
        self.aer_outstanding = true;
        Ok(())
    }

    /// Asynchronous event completions seen since the last call (their dword 0: type in bits 2:0,
    /// information in 15:8, log page in 23:16). Reads the log page of each (which re-arms the
    /// event), rescans namespaces after a Changed Namespace List notice, and keeps an
    /// Asynchronous Event Request outstanding.
    pub fn take_async_events(&mut self) -> Result<Vec<u32>, ClientError> {
        self.drain_admin(None)?;
        let logs = std::mem::take(&mut self.pending_logs);
        for lid in logs {
            self.get_log_page(lid, u32::MAX)?;
            if lid == LOG_CHANGED_NS {
                self.rescan_namespaces()?;
            }
        }
        self.submit_aer()?;
        Ok(std::mem::take(&mut self.events))
    }

    // ---- I/O ----

    fn queue(&self, q: u16) -> Option<&Queue> {
        self.io.get(usize::from(q).checked_sub(1)?)
    }

    fn queue_index(&self, q: u16) -> Result<usize, ClientError> {
        let i = usize::from(q).checked_sub(1).filter(|&i| i < self.io.len());
        i.ok_or_else(|| arg("q", format!("I/O queue {q} does not exist (1..={})", self.io.len())))
    }

    fn ns_block_size(&self, nsid: u32) -> Result<u32, ClientError> {
        self.namespace(nsid).map(|n| n.block_size).ok_or_else(|| arg("nsid", format!("namespace {nsid} is not active")))
    }

    /// Builds PRP1/PRP2 for `len` bytes at buffer offset `buf_off`, writing a PRP list into the
    /// slot's page when needed.
    fn prps(&self, qi: usize, cid: u16, buf_off: usize, len: usize) -> (u64, u64) {
        let start = iova(self.layout.buf + buf_off);
        let first = usize::try_from(PAGE64 - start % PAGE64).unwrap_or(PAGE);
        if len <= first {
            return (start, 0);
        }
        let second = start + first as u64;
        let rest = len - first;
        if rest <= PAGE {
            return (start, second);
        }
        let list = self.io[qi].prp_off + usize::from(cid) * PAGE;
        for i in 0..rest.div_ceil(PAGE) {
            self.mem.write64(list + i * 8, second + (i * PAGE) as u64);
        }
        (start, iova(list))
    }

    fn check_buf(&self, buf_off: usize, len: usize) -> Result<(), ClientError> {
        if !buf_off.is_multiple_of(4) {
            return Err(arg("buf_off", format!("{buf_off} is not dword aligned")));
        }
        if buf_off.checked_add(len).is_none_or(|end| end > self.layout.buf_len) {
            return Err(arg("buf_off", format!("{buf_off}+{len} is beyond the {}-byte buffer", self.layout.buf_len)));
        }
        if len > self.info.mdts_bytes {
            return Err(arg("blocks", format!("{len} bytes exceed the {}-byte transfer limit", self.info.mdts_bytes)));
        }
        Ok(())
    }

    /// Places `sqe` (its CID filled in) on I/O queue index `qi` for `tag`.
    fn push(&mut self, qi: usize, cid: u16, mut sqe: Sqe, tag: u16) -> Result<(), ClientError> {
        sqe.0[0] = (sqe.0[0] & 0xffff) | (u32::from(cid) << 16);
        let qu = &self.io[qi];
        self.sq_write(qu, &sqe);
        let qu = &mut self.io[qi];
        qu.slots[usize::from(cid)] = Some(tag);
        qu.tail = (qu.tail + 1) % qu.size;
        if !self.opts.defer_doorbells {
            let (qid, tail) = (qu.qid, qu.tail);
            self.ring_doorbell(2 * u32::from(qid), tail)?;
        }
        Ok(())
    }

    fn alloc(&mut self, qi: usize) -> Result<u16, ClientError> {
        let qid = self.io[qi].qid;
        self.io[qi].free.pop().ok_or(ClientError::QueueFull(qid))
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_rw(
        &mut self,
        opc: u8,
        q: u16,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buf_off: usize,
        tag: u16,
    ) -> Result<(), ClientError> {
        let qi = self.queue_index(q)?;
        let bs = self.ns_block_size(nsid)?;
        if !(1..=65536).contains(&blocks) {
            return Err(arg("blocks", format!("{blocks} is not between 1 and 65536")));
        }
        let len = usize::try_from(u64::from(blocks) * u64::from(bs)).unwrap_or(usize::MAX);
        self.check_buf(buf_off, len)?;
        let cid = self.alloc(qi)?;
        let (p1, p2) = self.prps(qi, cid, buf_off, len);
        let sqe = Sqe::new(opc).nsid(nsid).prp(p1, p2).slba(lba).dw(12, blocks - 1);
        self.push(qi, cid, sqe, tag)
    }

    /// Submits a Read of `blocks` blocks at `lba` into the buffer at `buf_off`.
    pub fn submit_read(
        &mut self,
        q: u16,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buf_off: usize,
        tag: u16,
    ) -> Result<(), ClientError> {
        self.submit_rw(IO_READ, q, nsid, lba, blocks, buf_off, tag)
    }

    /// Submits a Write of `blocks` blocks at `lba` from the buffer at `buf_off`.
    pub fn submit_write(
        &mut self,
        q: u16,
        nsid: u32,
        lba: u64,
        blocks: u32,
        buf_off: usize,
        tag: u16,
    ) -> Result<(), ClientError> {
        self.submit_rw(IO_WRITE, q, nsid, lba, blocks, buf_off, tag)
    }

    /// Submits a Flush.
    pub fn submit_flush(&mut self, q: u16, nsid: u32, tag: u16) -> Result<(), ClientError> {
        let qi = self.queue_index(q)?;
        let cid = self.alloc(qi)?;
        self.push(qi, cid, Sqe::new(IO_FLUSH).nsid(nsid), tag)
    }

    /// Submits a Write Zeroes of `blocks` blocks at `lba`.
    pub fn submit_write_zeroes(
        &mut self,
        q: u16,
        nsid: u32,
        lba: u64,
        blocks: u32,
        tag: u16,
    ) -> Result<(), ClientError> {
        let qi = self.queue_index(q)?;
        if !(1..=65536).contains(&blocks) {
            return Err(arg("blocks", format!("{blocks} is not between 1 and 65536")));
        }
        let cid = self.alloc(qi)?;
        let sqe = Sqe::new(IO_WRITE_ZEROES).nsid(nsid).slba(lba).dw(12, blocks - 1);
        self.push(qi, cid, sqe, tag)
    }

    /// Submits a Dataset Management deallocate of `ranges` (LBA, blocks), 1 to 256 of them.
    pub fn submit_deallocate(&mut self, q: u16, nsid: u32, ranges: &[(u64, u32)], tag: u16) -> Result<(), ClientError> {
        let qi = self.queue_index(q)?;
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(arg("ranges", format!("{} ranges (1 to 256)", ranges.len())));
        }
        let cid = self.alloc(qi)?;
        let page = self.io[qi].prp_off + usize::from(cid) * PAGE;
        for (i, &(lba, n)) in ranges.iter().enumerate() {
            let o = page + i * 16;
            self.mem.write32(o, 0);
            self.mem.write32(o + 4, n);
            self.mem.write64(o + 8, lba);
        }
        let nr = u32::try_from(ranges.len() - 1).unwrap_or(0);
        let sqe = Sqe::new(IO_DSM).nsid(nsid).prp(iova(page), 0).dw(10, nr).dw(11, 1 << 2);
        self.push(qi, cid, sqe, tag)
    }

    /// Rings I/O queue `q`'s SQ doorbell (for [`ClientOptions::defer_doorbells`]).
    pub fn ring(&mut self, q: u16) -> Result<(), ClientError> {
        let qi = self.queue_index(q)?;
        let (qid, tail) = (self.io[qi].qid, self.io[qi].tail);
        self.ring_doorbell(2 * u32::from(qid), tail)
    }

    /// Appends the completions posted on I/O queue `q` as (tag, status) pairs, without blocking.
    /// Status 0 is success (see [`Completion::status`]).
    pub fn poll(&mut self, q: u16, out: &mut Vec<(u16, u16)>) -> Result<(), ClientError> {
        let qi = self.queue_index(q)?;
        let qu = &mut self.io[qi];
        out.append(&mut qu.stash);
        let mut n = 0;
        while let Some(c) = Self::next_cqe(&self.mem, qu) {
            n += 1;
            match qu.slots.get_mut(usize::from(c.cid)).and_then(Option::take) {
                Some(tag) => {
                    qu.free.push(c.cid);
                    out.push((tag, c.status));
                }
                None => tracing::warn!(q, cid = c.cid, "completion for a command not in flight"),
            }
        }
        if n > 0 {
            let (qid, head) = (qu.qid, qu.head);
            self.ring_doorbell(2 * u32::from(qid) + 1, head)?;
        }
        Ok(())
    }

    /// Waits until at least `n` completions of queue `q` arrived (or `timeout` passed), blocking
    /// on the queue's MSI-X eventfd with interrupts, polling otherwise. On timeout the
    /// completions gathered are kept for the next poll.
    pub fn wait(&mut self, q: u16, n: usize, timeout: Duration) -> Result<Vec<(u16, u16)>, ClientError> {
        let qi = self.queue_index(q)?;
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut last_progress = Instant::now();
        loop {
            let before = got.len();
            self.poll(q, &mut got)?;
            if got.len() >= n {
                return Ok(got);
            }
            let now = Instant::now();
            if got.len() > before {
                last_progress = now;
            }
            if now >= deadline {
                let have = got.len();
                self.io[qi].stash = got;
                return Err(ClientError::Timeout(format!("{n} completions on queue {q} ({have} arrived)")));
            }
            match self.irqs.get(usize::from(q)).filter(|_| self.opts.interrupts) {
                Some(e) => {
                    let left = (deadline - now).min(Duration::from_millis(100));
                    let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(100).max(1);
                    let mut p = libc::pollfd { fd: e.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut p, 1, ms) };
                    let n = e.read().unwrap_or(0);
                    self.irq_count += n;
                }
                // Polling: spin (yielding the core) for a while after progress, then nap.
                None if now.duration_since(last_progress) < Duration::from_micros(200) => std::thread::yield_now(),
                None => std::thread::sleep(Duration::from_micros(10)),
            }
        }
    }

    /// Reads vector `v`'s eventfd: interrupts since the last read (by this or by `wait`).
    pub fn take_interrupts(&mut self, v: u16) -> u64 {
        self.irqs.get(usize::from(v)).and_then(|e| e.read().ok()).unwrap_or(0)
    }

    /// Interrupts [`wait`](Self::wait) has received so far (all vectors).
    pub fn interrupts_received(&self) -> u64 {
        self.irq_count
    }

    // ---- reset and shutdown ----

    /// Resets the controller mid-run and brings it up again (queues, shadow doorbells, AER).
    /// Commands in flight are forgotten; their tags never complete.
    pub fn reset_and_reinit(&mut self, kind: ResetKind) -> Result<(), ClientError> {
        match kind {
            ResetKind::Controller => {
                let cc = self.reg32(REG_CC)?;
                self.set_reg32(REG_CC, cc & !CC_EN)?;
                self.wait_csts("CSTS.RDY = 0", CSTS_RDY, 0)?;
            }
            ResetKind::Function => self.vfu.reset()?,
            ResetKind::Flr => {
                let cap = self
                    .find_capability(0x10)?
                    .ok_or_else(|| ClientError::Device("no PCI Express capability".into()))?;
                let ctl = self.cfg16(cap + 8)?;
                self.set_cfg16(cap + 8, ctl | 0x8000)?;
            }
        }
        self.io.clear();
        self.events.clear();
        self.pending_logs.clear();
        self.shadow_active = false;
        self.aer_outstanding = false;
        self.bring_up()
    }

    /// Normal shutdown (CC.SHN), then disconnect.
    pub fn shutdown(mut self) -> Result<(), ClientError> {
        let cc = self.reg32(REG_CC)?;
        self.set_reg32(REG_CC, cc | CC_SHN_NORMAL)?;
        self.wait_csts("shutdown complete", CSTS_SHST_MASK, CSTS_SHST_DONE)?;
        let _ = self.vfu.shutdown();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_index_arithmetic_matches_linux() {
        // The device wants to hear about index 5: moving from 4 to 6 crosses it.
        assert!(need_event(5, 6, 4));
        assert!(!need_event(7, 6, 4));
        // Polling sentinel (u32::MAX truncated): never rings in the normal range.
        assert!(!need_event(0xffff, 10, 9));
        // Wrap-around.
        assert!(need_event(0xfffe, 1, 0xfff0));
    }

    #[test]
    fn layout_keeps_areas_apart() {
        let l = Layout::new(4, 128, 1 << 20);
        assert!(l.admin_cq >= l.admin_sq + 32 * 64);
        let (sq1, cq1, prp1) = l.queue(1);
        let (sq2, _, _) = l.queue(2);
        assert!(sq1 >= l.shadow_ei + l.shadow_pages);
        assert_eq!(cq1, sq1 + 128 * 64);
        assert_eq!(prp1, cq1 + PAGE);
        assert_eq!(sq2, prp1 + 128 * PAGE);
        assert_eq!(l.buf, l.queues + 4 * l.per_queue);
        assert_eq!(l.total, l.buf + (1 << 20));
        assert!(l.total.is_multiple_of(PAGE));
    }
}
