//! Transport-free NVMe controller emulation over bdevs.
//!
//! [`NvmeController`] is an NVMe 1.4 I/O controller presented as a PCI function: configuration
//! space, BAR0 (controller registers and doorbells), BAR4 (MSI-X table and pending bits). A
//! transport (vfio-user, or a test playing the driver) forwards the client's configuration and
//! BAR accesses, its DMA memory ([`NvmeController::set_dma_memory`]) and delivers interrupts
//! through an [`IrqSink`]. This crate knows nothing of sockets or vfio-user.
//!
//! # Threads and ownership
//!
//! - **Transport thread(s)** call the public methods. Register accesses take short control-path
//!   locks (`regs`, `pci`) and never touch queue state; a CC write only stores the register and
//!   sends the admin poller a message. Doorbell writes store into the doorbell page and wake the
//!   owning poller's reactor if it sleeps.
//! - **Admin poller** (`admin.rs`, on `cfg.reactors[0]`) owns the controller state machine
//!   (enable / disable / shutdown / reset, CSTS), the admin queue pair, the queue registry,
//!   features, asynchronous events and log pages. It reads CC when told it changed and reconciles.
//!   Commands that affect queues on other reactors are sent there as messages; the admin queue
//!   processes one such command at a time and completes it when the owner answers.
//! - **I/O group pollers** (`io.rs`, one per reactor in `cfg.reactors`) own the I/O queue pairs
//!   placed on their reactor (completion queue `q` goes to reactor `(q - 1) % n`, and a
//!   submission queue to its completion queue's reactor), a bdev channel per namespace, and the
//!   requests in flight. The I/O path takes no lock: doorbells are atomics, interrupt state is
//!   atomics, memory snapshots are swapped when a generation counter changes.
//! - Control-plane changes (queue creation/deletion, namespace add/remove, shadow doorbells, reset)
//!   reach a group as messages (`ReactorHandle::send`/`call`), applied between polls.
//!
//! # Doorbells
//!
//! BAR0 doorbells live in a memfd page ([`BarInfo::mmap_areas`] offers it to the client when
//! `mappable_doorbells` is set). Trapped writes land in the same page; queue pollers read doorbell
//! values from it, so both paths look the same to them. After Doorbell Buffer Config (opcode 7Ch)
//! I/O queues read the guest's shadow doorbell buffer instead and write EventIdx: `u32::MAX` while
//! polling (the host rarely rings BAR0), the last consumed index before the reactor sleeps (the
//! host's next update then rings BAR0, which traps and wakes the reactor). The admin queue is never
//! shadowed (Linux does not shadow it). Out-of-range doorbell values kill the queue and raise an
//! "Invalid Doorbell Write Value" asynchronous event (for the admin queue: CSTS.CFS).
//!
//! With mappable doorbells, stores by the client cannot wake a sleeping reactor, so pollers of an
//! enabled controller report pending work in `arm()` and their reactors keep polling.
//!
//! # Guest memory and `unsafe`
//!
//! Every guest address (queue bases, PRP entries and lists, SGL descriptors and segments, shadow
//! buffers) is translated against the current `GuestMemory` snapshot with checked arithmetic;
//! lists are copied out once and then validated. In-flight I/O keeps the snapshot its iovecs point
//! into. `unsafe` is confined to:
//! - `guest.rs`: volatile reads/writes through translated, bounds-checked guest pointers;
//! - `sys.rs`: the doorbell page (memfd, mmap, atomics over it) and eventfds;
//! - `io.rs`: one `IoVecs::push_raw` over the Compare / Write Zeroes bounce buffers;
//! - tests: mapping the doorbell page the way a client would.
//!
//! # Namespaces
//!
//! [`NvmeController::add_namespace`] opens a bdev channel on every reactor, then publishes the
//! namespace and raises a Namespace Attribute Changed event (if the host enabled it), with the
//! Changed Namespace List log. Removal and bdev resize raise the same event.
//!
//! # What a transport does
//!
//! - Present a PCI device with a configuration region of [`PCI_CONFIG_SIZE`] bytes and the BARs of
//!   [`NvmeController::bars`] (64-bit, non-prefetchable memory); forward accesses to
//!   [`pci_config_read`](NvmeController::pci_config_read)/[`write`](NvmeController::pci_config_write)
//!   and [`bar_read`](NvmeController::bar_read)/[`bar_write`](NvmeController::bar_write). Register
//!   accesses are naturally aligned dwords or qwords; doorbells are dwords.
//! - Offer each [`MmapArea`] as a sparse-mmap area (shared, read-write) when present.
//! - Offer [`NvmeController::msix_vectors`] MSI-X vectors and one INTx pin; implement [`IrqSink`]
//!   (typically one eventfd per vector). If the client virtualizes the MSI-X table itself, report
//!   its mask/unmask requests with [`NvmeController::set_msix_vector_masked`].
//! - After every DMA map or unmap, build a new `GuestMemory` and call
//!   [`NvmeController::set_dma_memory`] (IOVA = guest address).
//! - On client disconnect call [`NvmeController::reset`] (it waits for in-flight I/O), and call it
//!   before dropping the controller. Completions of I/O still in flight when the controller is
//!   dropped are discarded.
//! - Call the control-plane methods (`new`, `add_namespace`, `remove_namespace`, `reset`, a config
//!   write that triggers FLR) from a thread that is not one of the controller's reactors: they
//!   wait for those reactors.
//!
//! # Scope
//!
//! Admin: Identify (CNS 0, 1, 2, 3), Create/Delete I/O SQ/CQ, Get/Set Features (arbitration,
//! power management, temperature threshold, error recovery, volatile write cache, number of
//! queues, interrupt coalescing, interrupt vector configuration, write atomicity, asynchronous
//! event configuration, keep alive timer), Get Log Page (error information, SMART / health,
//! firmware slot, changed namespace list, commands supported and effects), Asynchronous Event
//! Request, Abort, Keep Alive, Doorbell Buffer Config. I/O: Flush (also NSID FFFFFFFFh), Write
//! (FUA; forced when the volatile write cache is disabled), Read, Compare, Write Zeroes (emulated
//! with zero-buffer writes on bdevs that cannot), Dataset Management (deallocate). PRPs and SGLs
//! (Data Block, Segment, Last Segment; no Bit Bucket or keyed descriptors).
//!
//! Not implemented: metadata and protection information (one LBA format), reservations,
//! namespace management and attachment, Format NVM, Sanitize, firmware download/commit, device
//! self-test, Verify/Copy/Write Uncorrectable, fused operations, timestamp, host memory buffer,
//! power state transitions, CMB/PMR, NVM subsystem reset, weighted round robin arbitration (the
//! feature value is only stored), memory page sizes other than 4 KiB, MSI (MSI-X and INTx only).
//! Abort can only abort Asynchronous Event Requests: commands are fetched as soon as the doorbell
//! is seen and bdev I/O cannot be recalled, so other aborts report "not aborted". Memory Space
//! and Bus Master Enable are stored but not enforced; D3hot is stored but has no effect.

mod admin;
mod dptr;
mod guest;
mod identify;
mod io;
mod pci;
mod queue;
pub mod spec;
mod sys;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use uuid::Uuid;
use vstor_bdev::{Bdev, BdevError};
use vstor_mem::GuestMemory;
use vstor_reactor::{PollerId, ReactorError, ReactorHandle};

pub use pci::{IrqSink, PciIds, PCI_CONFIG_SIZE};

use admin::{AdminCore, AdminPoller};
use identify::ErrorLog;
use io::{Group, GroupPoller};
use pci::{BarLayout, Interrupts, PciConfig, CMD_INTX_DISABLE};
use spec::*;
use sys::{DoorbellPage, Kick};

/// How long control-plane calls wait for a reactor.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NvmeController::reset`] waits for in-flight I/O to drain.
const RESET_TIMEOUT: Duration = Duration::from_secs(30);

/// Controller configuration. Construct with struct-update syntax over `Default`.
#[derive(Debug, Clone)]
pub struct NvmeConfig {
    /// Serial number (ASCII, at most 20 characters).
    pub serial: String,
    /// Model number (ASCII, at most 40 characters).
    pub model: String,
    /// NVM subsystem NQN (at most 223 bytes).
    pub subnqn: String,
    /// I/O queue pairs offered (1..=1023). MSI-X vectors: one more than this.
    pub max_io_queues: u16,
    /// Largest queue size (entries, 2..=4096); CAP.MQES is this minus one.
    pub max_queue_depth: u16,
    /// Offer Doorbell Buffer Config (shadow doorbells with EventIdx).
    pub shadow_doorbells: bool,
    /// Offer the doorbell page as a sparse-mmap area of BAR0.
    pub mappable_doorbells: bool,
    /// Reactors to spread I/O queues over; the admin queue is polled on the first.
    pub reactors: Vec<ReactorHandle>,
    /// Highest namespace ID (Identify Controller NN), 1..=1024.
    pub max_namespaces: u32,
    /// PCI vendor/device/subsystem IDs.
    pub pci_ids: PciIds,
    /// Firmware revision (ASCII, at most 8 characters).
    pub firmware_revision: String,
    /// Controller ID.
    pub cntlid: u16,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            serial: "VSTOR0000000001".into(),
            model: "vstor NVMe controller".into(),
            subnqn: "nqn.2024-01.io.vstor:nvme0".into(),
            max_io_queues: 32,
            max_queue_depth: 1024,
            shadow_doorbells: true,
            mappable_doorbells: false,
            reactors: Vec::new(),
            max_namespaces: 32,
            pci_ids: PciIds::default(),
            firmware_revision: concat!("v", env!("CARGO_PKG_VERSION")).into(),
            cntlid: 1,
        }
    }
}

/// Namespace identifiers. A missing UUID defaults to the bdev's UUID; NGUID and EUI-64 are
/// reported only when given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NsIds {
    pub uuid: Option<Uuid>,
    pub nguid: Option<[u8; 16]>,
    pub eui64: Option<[u8; 8]>,
}

/// A part of a BAR the client may map instead of trapping accesses.
#[derive(Debug, Clone)]
pub struct MmapArea {
    /// Offset in the BAR.
    pub offset: u64,
    pub len: u64,
    /// File to map (shared, read-write) and the offset in it.
    pub fd: Arc<OwnedFd>,
    pub fd_offset: u64,
}

/// A memory BAR of the function (64-bit, not prefetchable).
#[derive(Debug, Clone)]
pub struct BarInfo {
    pub index: u8,
    pub size: u64,
    pub mmap_areas: Vec<MmapArea>,
}

/// Errors of controller management.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error("invalid NVMe controller configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    #[error(transparent)]
    Bdev(#[from] BdevError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("namespace ID {nsid} is not between 1 and {max}")]
    NsidOutOfRange { nsid: u32, max: u32 },
    #[error("namespace ID {0} is in use")]
    NsidInUse(u32),
    #[error("no free namespace ID")]
    NoFreeNsid,
    #[error("namespace {0} not found")]
    NsNotFound(u32),
    #[error("the controller's pollers are gone")]
    Gone,
}

/// Configuration fixed at creation.
pub(crate) struct Fixed {
    pub serial: String,
    pub model: String,
    pub subnqn: String,
    pub firmware: String,
    pub max_io_queues: u16,
    /// Largest queue size in entries.
    pub max_qsize: u32,
    pub shadow_doorbells: bool,
    pub mappable_doorbells: bool,
    pub nn: u32,
    pub cntlid: u16,
    pub ids: PciIds,
}

/// Host-written controller registers.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Regs {
    pub cc: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    pub intms: u32,
}

/// A namespace: an NSID over a bdev.
pub(crate) struct Namespace {
    pub nsid: u32,
    pub bdev: Arc<Bdev>,
    pub uuid: Option<Uuid>,
    pub nguid: Option<[u8; 16]>,
    pub eui64: Option<[u8; 8]>,
    listener: u64,
}

/// Feature values the I/O path reads (written by the admin poller).
pub(crate) struct SharedFeatures {
    /// Volatile Write Cache enabled; when off, writes are submitted with FUA.
    pub wce: AtomicBool,
    /// Interrupt Coalescing: THR (7:0), TIME (15:8).
    pub coalescing: AtomicU32,
    /// Interrupt Vector Configuration: coalescing disabled, per vector.
    pub vector_cd: Box<[AtomicBool]>,
}

impl SharedFeatures {
    pub fn reset(&self) {
        self.wce.store(true, Ordering::Relaxed);
        self.coalescing.store(0, Ordering::Relaxed);
        for v in self.vector_cd.iter() {
            v.store(false, Ordering::Relaxed);
        }
    }
}

/// Per-group counters for the SMART log (written only by the group's reactor).
#[derive(Default)]
pub(crate) struct GroupStats {
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

pub(crate) struct Pollers {
    pub admin: PollerId,
    pub timer: PollerId,
    pub groups: Vec<PollerId>,
}

/// State shared by the transport side and every poller.
pub(crate) struct Inner {
    pub cfg: Fixed,
    pub reactors: Vec<ReactorHandle>,
    pub irq: Interrupts,
    pub layout: BarLayout,
    pub regs: Mutex<Regs>,
    pub csts: AtomicU32,
    pub doorbells: DoorbellPage,
    /// Doorbells of queues that exist (bit per doorbell index), for trapped-write validation.
    live: Box<[AtomicU64]>,
    /// Which group polls the queue of each doorbell index (for wake-ups).
    owner: Box<[AtomicU32]>,
    pub pci: Mutex<PciConfig>,
    mem: Mutex<Arc<GuestMemory>>,
    pub mem_gen: AtomicU64,
    pub namespaces: Mutex<BTreeMap<u32, Arc<Namespace>>>,
    ctl: Mutex<()>,
    pub pollers: OnceLock<Pollers>,
    pub admin_kick: Kick,
    pub group_kicks: Vec<Kick>,
    pub features: SharedFeatures,
    pub errlog: Mutex<ErrorLog>,
    pub stats: Vec<GroupStats>,
    pub created: Instant,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    /// Number of doorbells (two per queue pair, admin included).
    pub fn doorbell_count(&self) -> usize {
        2 * (usize::from(self.cfg.max_io_queues) + 1)
    }

    /// The current DMA memory snapshot.
    pub fn memory(&self) -> Arc<GuestMemory> {
        lock(&self.mem).clone()
    }

    pub fn set_live(&self, index: usize, live: bool, owner: usize) {
        if let Some(w) = self.live.get(index / 64) {
            let bit = 1u64 << (index % 64);
            if live {
                if let Some(o) = self.owner.get(index) {
                    o.store(u32::try_from(owner).unwrap_or(0), Ordering::Relaxed);
                }
                w.fetch_or(bit, Ordering::SeqCst);
            } else {
                w.fetch_and(!bit, Ordering::SeqCst);
            }
        }
    }

    fn is_live(&self, index: usize) -> bool {
        self.live.get(index / 64).is_some_and(|w| w.load(Ordering::SeqCst) & (1u64 << (index % 64)) != 0)
    }

    pub fn clear_live(&self) {
        for w in self.live.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    pub fn set_csts(&self, v: u32) {
        self.csts.store(v, Ordering::SeqCst);
    }

    pub fn csts(&self) -> u32 {
        self.csts.load(Ordering::SeqCst)
    }

    /// Runs `f` on the admin poller (reactor 0), between polls.
    pub fn send_admin(&self, f: impl FnOnce(&mut AdminCore) + Send + 'static) {
        let Some(p) = self.pollers.get() else { return };
        let id = p.admin;
        let _ = self.reactors[0].send(move |r| {
            if let Some(p) = r.poller_mut::<AdminPoller>(id) {
                let core = p.core.clone();
                let mut c = core.borrow_mut();
                f(&mut c);
            }
        });
    }

    /// Runs `f` on group `g`'s poller, between polls.
    pub fn send_group(&self, g: usize, f: impl FnOnce(&mut Group) + Send + 'static) {
        let Some(id) = self.pollers.get().and_then(|p| p.groups.get(g).copied()) else { return };
        let _ = self.reactors[g].send(move |r| {
            if let Some(p) = r.poller_mut::<GroupPoller>(id) {
                p.with(f);
            }
        });
    }

    /// Total host-visible counters, for the SMART log.
    pub fn health(&self) -> identify::HealthCounters {
        let mut c = identify::HealthCounters::default();
        for s in &self.stats {
            c.read_cmds += s.read_cmds.load(Ordering::Relaxed);
            c.write_cmds += s.write_cmds.load(Ordering::Relaxed);
            c.read_bytes += s.read_bytes.load(Ordering::Relaxed);
            c.write_bytes += s.write_bytes.load(Ordering::Relaxed);
        }
        c.errors = lock(&self.errlog).count;
        c.power_on_hours = self.created.elapsed().as_secs() / 3600;
        c
    }

    fn cap(&self) -> u64 {
        let mqes = u64::from(self.cfg.max_qsize - 1);
        // MQES, CQR (contiguous queues required), TO = 10 s (500 ms units), DSTRD 0,
        // CSS: NVM command set, MPSMIN = MPSMAX = 0 (4 KiB).
        mqes | (1 << 16) | (20 << 24) | (1 << 37)
    }

    fn reg_dword(&self, r: &Regs, off: u64) -> u32 {
        match off {
            0x00 => lo32(self.cap()),
            0x04 => hi32(self.cap()),
            0x08 => NVME_VERSION,
            0x0c | 0x10 => r.intms,
            0x14 => r.cc,
            0x1c => self.csts(),
            0x24 => r.aqa,
            0x28 => lo32(r.asq),
            0x2c => hi32(r.asq),
            0x30 => lo32(r.acq),
            0x34 => hi32(r.acq),
            _ => 0,
        }
    }

    fn bar0_read(&self, offset: u64, buf: &mut [u8]) {
        let regs = *lock(&self.regs);
        for (i, b) in buf.iter_mut().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else { break };
            let aligned = o & !3;
            let dword = if aligned < DOORBELL_BASE {
                self.reg_dword(&regs, aligned)
            } else {
                usize::try_from((aligned - DOORBELL_BASE) / 4).map(|i| self.doorbells.load(i)).unwrap_or(0)
            };
            *b = dword.to_le_bytes()[usize::try_from(o & 3).unwrap_or(0)];
        }
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) {
        if offset >= DOORBELL_BASE {
            if data.len() == 4 && offset.is_multiple_of(4) {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                if let Ok(i) = usize::try_from((offset - DOORBELL_BASE) / 4) {
                    self.doorbell_write(i, v);
                }
            }
            return;
        }
        // Registers take naturally aligned dword or qword accesses.
        if !((data.len() == 4 && offset.is_multiple_of(4)) || (data.len() == 8 && offset.is_multiple_of(8))) {
            tracing::debug!(offset, len = data.len(), "ignoring unaligned NVMe register write");
            return;
        }
        for (k, c) in data.chunks_exact(4).enumerate() {
            self.reg_write(offset + 4 * k as u64, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
    }

    fn reg_write(&self, off: u64, v: u32) {
        let mut r = lock(&self.regs);
        match off {
            REG_INTMS | REG_INTMC => {
                // Undefined while MSI-X is in use: ignored.
                if self.irq.msix_enabled() {
                    return;
                }
                if off == REG_INTMS {
                    r.intms |= v;
                } else {
                    r.intms &= !v;
                }
                let masked = r.intms & 1 != 0;
                drop(r);
                self.irq.set_intms(masked);
            }
            REG_CC => {
                let old = r.cc;
                let mut new = v & CC_WRITABLE;
                if old & CC_EN != 0 && new & CC_EN != 0 {
                    // While enabled only SHN may change.
                    let shn = 3 << CC_SHN_SHIFT;
                    new = (old & !shn) | (new & shn);
                }
                r.cc = new;
                drop(r);
                if new != old {
                    self.send_admin(|a| a.reconcile());
                }
            }
            REG_AQA => r.aqa = v & 0x0fff_0fff,
            0x28 => r.asq = (r.asq & !0xffff_ffff) | u64::from(v),
            0x2c => r.asq = (r.asq & 0xffff_ffff) | (u64::from(v) << 32),
            0x30 => r.acq = (r.acq & !0xffff_ffff) | u64::from(v),
            0x34 => r.acq = (r.acq & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {} // read-only or reserved (NSSR is not supported)
        }
    }

    /// A trapped doorbell write: validated, stored in the doorbell page, owner woken.
    fn doorbell_write(&self, index: usize, v: u32) {
        if self.csts() & CSTS_RDY == 0 {
            return;
        }
        if index >= self.doorbell_count() || !self.is_live(index) {
            let qid = u16::try_from(index / 2).unwrap_or(u16::MAX);
            self.send_admin(move |a| a.error_event(AER_ERR_INVALID_DB_REGISTER, qid));
            return;
        }
        self.doorbells.store(index, v);
        if index < 2 {
            self.admin_kick.kick();
        } else {
            let g = self.owner.get(index).map(|o| o.load(Ordering::Relaxed)).unwrap_or(0);
            if let Some(k) = self.group_kicks.get(g as usize) {
                k.kick();
            }
        }
    }
}

/// An emulated NVMe controller and its PCI function. `Send + Sync`; share it as an `Arc`.
pub struct NvmeController {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NvmeController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NvmeController({})", self.inner.cfg.subnqn)
    }
}

fn check_ascii(what: &str, s: &str, max: usize) -> Result<(), NvmeError> {
    if s.len() > max || !s.bytes().all(|c| (0x20..0x7f).contains(&c)) {
        return Err(NvmeError::Config(format!("{what} must be at most {max} printable ASCII characters")));
    }
    Ok(())
}

impl NvmeController {
    /// Creates a disabled controller and registers its pollers on `cfg.reactors`. Call from a
    /// thread that is not one of those reactors.
    pub fn new(cfg: NvmeConfig, irq: Arc<dyn IrqSink>) -> Result<Arc<Self>, NvmeError> {
        if cfg.reactors.is_empty() {
            return Err(NvmeError::Config("at least one reactor is needed".into()));
        }
        check_ascii("serial", &cfg.serial, 20)?;
        check_ascii("model", &cfg.model, 40)?;
        check_ascii("firmware_revision", &cfg.firmware_revision, 8)?;
        if cfg.subnqn.is_empty() || cfg.subnqn.len() > 223 {
            return Err(NvmeError::Config("subnqn must be 1 to 223 bytes".into()));
        }
        if !(1..=1023).contains(&cfg.max_io_queues) {
            return Err(NvmeError::Config("max_io_queues must be between 1 and 1023".into()));
        }
        if !(2..=4096).contains(&cfg.max_queue_depth) {
            return Err(NvmeError::Config("max_queue_depth must be between 2 and 4096".into()));
        }
        if !(1..=1024).contains(&cfg.max_namespaces) {
            return Err(NvmeError::Config("max_namespaces must be between 1 and 1024".into()));
        }
        let nvec = cfg.max_io_queues + 1;
        let ndb = 2 * (usize::from(cfg.max_io_queues) + 1);
        let db_bytes = (ndb * 4).div_ceil(4096) * 4096;
        let io = |context: &str| {
            let context = context.to_string();
            move |source| NvmeError::Io { context, source }
        };
        let doorbells = DoorbellPage::new(db_bytes).map_err(io("creating the doorbell page"))?;
        let layout = BarLayout::new(db_bytes as u64, nvec);
        let n = cfg.reactors.len();
        let group_kicks = (0..n).map(|_| Kick::new()).collect::<Result<Vec<_>, _>>().map_err(io("eventfd"))?;
        let inner = Arc::new(Inner {
            cfg: Fixed {
                serial: cfg.serial,
                model: cfg.model,
                subnqn: cfg.subnqn,
                firmware: cfg.firmware_revision,
                max_io_queues: cfg.max_io_queues,
                max_qsize: u32::from(cfg.max_queue_depth),
                shadow_doorbells: cfg.shadow_doorbells,
                mappable_doorbells: cfg.mappable_doorbells,
                nn: cfg.max_namespaces,
                cntlid: cfg.cntlid,
                ids: cfg.pci_ids,
            },
            reactors: cfg.reactors,
            irq: Interrupts::new(irq, nvec),
            layout,
            regs: Mutex::new(Regs::default()),
            csts: AtomicU32::new(0),
            doorbells,
            live: (0..ndb.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            owner: (0..ndb).map(|_| AtomicU32::new(0)).collect(),
            pci: Mutex::new(PciConfig::new(cfg.pci_ids, layout)),
            mem: Mutex::new(Arc::new(GuestMemory::empty())),
            mem_gen: AtomicU64::new(0),
            namespaces: Mutex::new(BTreeMap::new()),
            ctl: Mutex::new(()),
            pollers: OnceLock::new(),
            admin_kick: Kick::new().map_err(io("eventfd"))?,
            group_kicks,
            features: SharedFeatures {
                wce: AtomicBool::new(true),
                coalescing: AtomicU32::new(0),
                vector_cd: (0..nvec).map(|_| AtomicBool::new(false)).collect(),
            },
            errlog: Mutex::new(ErrorLog::default()),
            stats: (0..n).map(|_| GroupStats::default()).collect(),
            created: Instant::now(),
        });
        let mut groups = Vec::new();
        let cleanup = |inner: &Arc<Inner>, groups: &[PollerId]| {
            for (g, id) in groups.iter().copied().enumerate() {
                let _ = inner.reactors[g].send(move |r| drop(r.remove_poller(id)));
            }
        };
        for g in 0..n {
            let inn = inner.clone();
            match inner.reactors[g].call_timeout(CALL_TIMEOUT, move |r| GroupPoller::register(inn, g, r)) {
                Ok(Ok(id)) => groups.push(id),
                Ok(Err(e)) => {
                    cleanup(&inner, &groups);
                    return Err(io("registering the queue poller")(e));
                }
                Err(e) => {
                    cleanup(&inner, &groups);
                    return Err(e.into());
                }
            }
        }
        let inn = inner.clone();
        let admin = inner.reactors[0].call_timeout(CALL_TIMEOUT, move |r| AdminPoller::register(inn, r));
        let (admin, timer) = match admin {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => {
                cleanup(&inner, &groups);
                return Err(io("registering the admin poller")(e));
            }
            Err(e) => {
                cleanup(&inner, &groups);
                return Err(e.into());
            }
        };
        let _ = inner.pollers.set(Pollers { admin, timer, groups });
        Ok(Arc::new(NvmeController { inner }))
    }

    /// Attaches `bdev` as namespace `nsid` (or the lowest free NSID). Opens a channel on every
    /// reactor first, then publishes the namespace and raises a Namespace Attribute Changed event.
    pub fn add_namespace(&self, nsid: Option<u32>, bdev: Arc<Bdev>, ids: NsIds) -> Result<u32, NvmeError> {
        let inner = &self.inner;
        let _ctl = lock(&inner.ctl);
        let max = inner.cfg.nn;
        let nsid = {
            let map = lock(&inner.namespaces);
            match nsid {
                Some(n) if n == 0 || n > max => return Err(NvmeError::NsidOutOfRange { nsid: n, max }),
                Some(n) if map.contains_key(&n) => return Err(NvmeError::NsidInUse(n)),
                Some(n) => n,
                None => (1..=max).find(|n| !map.contains_key(n)).ok_or(NvmeError::NoFreeNsid)?,
            }
        };
        let weak = Arc::downgrade(inner);
        let listener = bdev.listen(move |ev| {
            if !matches!(ev, vstor_bdev::BdevEvent::Resized { .. }) {
                return;
            }
            if let Some(inner) = weak.upgrade() {
                inner.send_admin(move |a| a.ns_changed(nsid));
            }
        });
        let ns = Arc::new(Namespace {
            nsid,
            bdev: bdev.clone(),
            uuid: ids.uuid.or(Some(bdev.uuid())),
            nguid: ids.nguid,
            eui64: ids.eui64,
            listener,
        });
        let ids_p = inner.pollers.get().ok_or(NvmeError::Gone)?;
        for (g, id) in ids_p.groups.iter().copied().enumerate() {
            let ns2 = ns.clone();
            let res = inner.reactors[g].call_timeout(CALL_TIMEOUT, move |r| io::attach_namespace(r, id, ns2));
            let err = match res {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => NvmeError::from(e),
                Err(e) => NvmeError::from(e),
            };
            for (g2, id2) in ids_p.groups.iter().copied().enumerate().take(g) {
                let _ = inner.reactors[g2].call_timeout(CALL_TIMEOUT, move |r| io::detach_namespace(r, id2, nsid));
            }
            bdev.unlisten(listener);
            return Err(err);
        }
        lock(&inner.namespaces).insert(nsid, ns);
        inner.send_admin(move |a| a.ns_changed(nsid));
        Ok(nsid)
    }

    /// Detaches namespace `nsid` and returns its bdev. I/O already submitted completes; new
    /// commands for the NSID fail with Invalid Namespace. Raises a Namespace Attribute Changed
    /// event.
    pub fn remove_namespace(&self, nsid: u32) -> Result<Arc<Bdev>, NvmeError> {
        let inner = &self.inner;
        let _ctl = lock(&inner.ctl);
        let ns = lock(&inner.namespaces).remove(&nsid).ok_or(NvmeError::NsNotFound(nsid))?;
        ns.bdev.unlisten(ns.listener);
        if let Some(p) = inner.pollers.get() {
            for (g, id) in p.groups.iter().copied().enumerate() {
                if let Err(e) = inner.reactors[g].call_timeout(CALL_TIMEOUT, move |r| io::detach_namespace(r, id, nsid))
                {
                    tracing::warn!(nsid, "detaching namespace from reactor {g}: {e}");
                }
            }
        }
        inner.send_admin(move |a| a.ns_changed(nsid));
        Ok(ns.bdev.clone())
    }

    /// The attached namespaces, by NSID.
    pub fn namespaces(&self) -> Vec<(u32, Arc<Bdev>)> {
        lock(&self.inner.namespaces).iter().map(|(n, ns)| (*n, ns.bdev.clone())).collect()
    }

    /// Reads configuration space (4 KiB; bytes past it read as 0xff).
    pub fn pci_config_read(&self, offset: u64, buf: &mut [u8]) {
        let intx = self.inner.irq.intx_status();
        lock(&self.inner.pci).read(offset, buf, intx);
    }

    /// Writes configuration space. A Function Level Reset (PCIe Device Control bit 15) resets the
    /// controller before this returns.
    pub fn pci_config_write(&self, offset: u64, data: &[u8]) {
        let inner = &self.inner;
        let (fx, msix, cmd) = {
            let mut p = lock(&inner.pci);
            let fx = p.write(offset, data);
            (fx, p.msix_control(), p.command())
        };
        if fx.msix_changed {
            inner.irq.set_msix_control(msix);
        }
        if fx.intx_disable_changed {
            inner.irq.set_intx_disabled(cmd & CMD_INTX_DISABLE != 0);
        }
        if fx.flr {
            self.reset();
        }
    }

    /// Reads a BAR: 0 (registers and doorbells) or 4 (MSI-X table and PBA). Others read zeroes.
    pub fn bar_read(&self, bar: u8, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        match bar {
            0 => self.inner.bar0_read(offset, buf),
            4 => self.inner.irq.bar_read(&self.inner.layout, offset, buf),
            _ => {}
        }
    }

    /// Writes a BAR: 0 (registers and doorbells) or 4 (MSI-X table). Others are ignored.
    pub fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            0 => self.inner.bar0_write(offset, data),
            4 => self.inner.irq.bar_write(offset, data),
            _ => {}
        }
    }

    /// The function's BARs. BAR0 offers the doorbell page as a mappable area when configured.
    pub fn bars(&self) -> Vec<BarInfo> {
        let inner = &self.inner;
        let mut mmap_areas = Vec::new();
        if inner.cfg.mappable_doorbells {
            mmap_areas.push(MmapArea {
                offset: DOORBELL_BASE,
                len: inner.doorbells.len() as u64,
                fd: inner.doorbells.fd().clone(),
                fd_offset: sys::FILE_OFFSET,
            });
        }
        vec![
            BarInfo { index: 0, size: inner.layout.bar0_size, mmap_areas },
            BarInfo { index: 4, size: inner.layout.bar4_size, mmap_areas: Vec::new() },
        ]
    }

    /// Number of MSI-X vectors.
    pub fn msix_vectors(&self) -> u16 {
        self.inner.irq.nvec()
    }

    /// Masks or unmasks an MSI-X vector (the transport's equivalent of a table write, for
    /// clients that virtualize the table themselves). Unmasking delivers a pending interrupt.
    pub fn set_msix_vector_masked(&self, vector: u16, masked: bool) {
        self.inner.irq.set_vector_masked(vector, masked);
    }

    /// Whether MSI-X vector `vector`'s pending bit is set.
    pub fn msix_pending(&self, vector: u16) -> bool {
        self.inner.irq.pending(vector)
    }

    /// Installs a new DMA memory snapshot. Pollers switch to it before their next poll; in-flight
    /// I/O keeps the snapshot it was mapped with.
    pub fn set_dma_memory(&self, mem: Arc<GuestMemory>) {
        *lock(&self.inner.mem) = mem;
        self.inner.mem_gen.fetch_add(1, Ordering::SeqCst);
        // Sleeping pollers re-check their queues with the new memory.
        self.inner.admin_kick.kick();
        for k in &self.inner.group_kicks {
            k.kick();
        }
    }

    /// Device / function reset (FLR, or the client going away): stops every queue, waits for
    /// in-flight I/O (up to 30 s), clears registers, CSTS and PCI state. Namespaces are kept.
    /// Call from a thread that is not one of the controller's reactors.
    pub fn reset(&self) {
        let inner = &self.inner;
        let _ctl = lock(&inner.ctl);
        *lock(&inner.regs) = Regs::default();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        inner.send_admin(move |a| a.function_reset(tx));
        if rx.recv_timeout(RESET_TIMEOUT).is_err() {
            tracing::warn!("NVMe controller reset did not finish within {RESET_TIMEOUT:?}");
        }
        lock(&inner.pci).reset();
        inner.irq.reset();
        inner.doorbells.clear();
    }

    /// CSTS as the host reads it.
    pub fn csts(&self) -> u32 {
        self.inner.csts()
    }
}

impl Drop for NvmeController {
    fn drop(&mut self) {
        let inner = &self.inner;
        for ns in lock(&inner.namespaces).values() {
            ns.bdev.unlisten(ns.listener);
        }
        if let Some(p) = inner.pollers.get() {
            for (g, id) in p.groups.iter().copied().enumerate() {
                let _ = inner.reactors[g].send(move |r| drop(r.remove_poller(id)));
            }
            let (a, t) = (p.admin, p.timer);
            let _ = inner.reactors[0].send(move |r| {
                drop(r.remove_poller(a));
                drop(r.remove_poller(t));
            });
        }
    }
}

#[cfg(test)]
mod tests;
