//! One vhost-user connection: the protocol state a frontend sets up (features, memory table,
//! vrings) and the queues it starts on reactors.
//!
//! Runs on the controller's connection thread. The rust-vmm `vhost` crate reads, validates and
//! answers each message and calls the handler methods below; anything that touches a running queue
//! is a message to that queue's reactor, and the reply is sent only after the reactor acknowledged
//! (so GET_VRING_BASE answers once the ring is stopped and drained).

use std::collections::HashSet;
use std::fs::File;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::*;
use vhost::vhost_user::{Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vstor_mem::{GuestMemory, Region};
use vstor_reactor::{PollerId, ReactorHandle};
use vstor_virtio::{features as vf, QueueParams, RingAddrs, MAX_QUEUE_SIZE};

use crate::queue::{InflightMap, QueueStart, VirtqPoller};
use crate::CtrlShared;

/// VHOST_USER_F_PROTOCOL_FEATURES (virtio feature bit 30, vhost-user only).
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VHOST_F_LOG_ALL (bit 26): the frontend is migrating; log every guest page the device writes.
pub const F_LOG_ALL: u64 = 1 << 26;
/// Memory slots offered with CONFIGURE_MEM_SLOTS: the most regions one connection's memory table
/// may have (SET_MEM_TABLE carries at most 32; ADD_MEM_REG adds one at a time).
pub const MAX_MEM_SLOTS: u64 = 509;
/// Largest memory table (the guest's RAM) one connection may map, in bytes.
pub const MAX_TABLE_BYTES: u64 = 16 << 40;
/// Most bytes one connection keeps mapped at a time: its memory table plus the tables it replaced
/// that requests still in flight point into (a table being replaced and its successor fit).
pub const MAX_MAPPED_BYTES: u64 = 2 * MAX_TABLE_BYTES;
/// Most memory tables one connection keeps mapped at a time (the current one and replaced ones
/// that requests still in flight point into). Each table brings at most 32 new mappings.
pub const MAX_LIVE_TABLES: usize = 64;
/// Largest dirty log (SET_LOG_BASE): one bit per 4 KiB page, so 1 GiB covers guest addresses up
/// to 32 TiB.
pub const MAX_LOG_BYTES: u64 = 1 << 30;
/// How long a stop waits for in-flight requests before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new memory table waits for requests in flight to release replaced tables when the
/// connection is at its limit of tables or bytes kept mapped.
const TABLE_WAIT: Duration = STOP_TIMEOUT;
/// Largest config space read accepted.
const MAX_CONFIG: u32 = 256;

fn err(msg: impl Into<String>) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(msg.into()))
}

#[derive(Default)]
struct Vring {
    num: u16,
    /// Frontend virtual addresses: descriptor, available (driver) and used (device) areas.
    addrs: Option<(u64, u64, u64)>,
    /// Guest address to log used-ring writes at (SET_VRING_ADDR with the log flag).
    log_addr: Option<u64>,
    base: u32,
    kick_set: bool,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: bool,
    running: Option<(ReactorHandle, PollerId, RingAddrs)>,
}

/// Whether userfaultfd works for this process (checked once): postcopy is offered only then.
fn postcopy_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let ok = vstor_mem::Userfault::available();
        if !ok {
            tracing::info!("userfaultfd is not available (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1): postcopy migration is not offered");
        }
        ok
    })
}

fn dup(f: &Option<File>) -> Option<File> {
    f.as_ref().and_then(|f| f.try_clone().ok())
}

/// `bytes` for people: "16 TiB", "1.5 GiB", "4096 bytes".
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} bytes");
    }
    let scale = 1u64 << (10 * unit);
    let tenths = (bytes % scale).saturating_mul(10) / scale;
    if tenths == 0 {
        format!("{whole} {}", UNITS[unit])
    } else {
        format!("{whole}.{tenths} {}", UNITS[unit])
    }
}

/// A refused region, for the log: the OS error by name where mmap failed.
fn region_error(e: &vstor_mem::MemError) -> String {
    match e {
        vstor_mem::MemError::Map { gpa, errno } => {
            format!("cannot map region at guest address {gpa:#x}: {}", std::io::Error::from_raw_os_error(*errno))
        }
        other => other.to_string(),
    }
}

/// Bytes mapped by the distinct mappings behind `tables` (tables share the mappings of the
/// regions they have in common).
fn mapped_bytes(tables: &[Weak<GuestMemory>]) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    for t in tables.iter().filter_map(Weak::upgrade) {
        for r in t.regions() {
            let (base, len) = r.page_range();
            if seen.insert(base) {
                total = total.saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
            }
        }
    }
    total
}

/// Protocol state of one connection.
pub(crate) struct Session {
    ctrl: Arc<CtrlShared>,
    features: u64,
    protocol: u64,
    mem: Arc<GuestMemory>,
    /// Every memory table this connection installed that is still mapped (the current one, and
    /// replaced ones that requests in flight point into): what the mapping limits count.
    tables: Vec<Weak<GuestMemory>>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightMap>>,
    /// The migration dirty log (SET_LOG_BASE).
    log: Option<Arc<vstor_mem::DirtyLog>>,
    /// Postcopy: the userfaultfd given to the frontend (POSTCOPY_ADVISE), and whether it
    /// listens (memory tables mapped now are registered with it).
    uffd: Option<vstor_mem::Userfault>,
    postcopy_listening: bool,
    /// Set when a reply could not be produced: the connection is then closed, since the frontend
    /// would otherwise wait for an answer forever.
    pub close: bool,
}

impl Session {
    pub fn new(ctrl: Arc<CtrlShared>) -> Self {
        let n = usize::from(ctrl.backend.max_queues());
        let mut vrings = Vec::new();
        vrings.resize_with(n, Vring::default);
        Self {
            ctrl,
            features: 0,
            protocol: 0,
            mem: Arc::new(GuestMemory::empty()),
            tables: Vec::new(),
            vrings,
            inflight: None,
            log: None,
            uffd: None,
            postcopy_listening: false,
            close: false,
        }
    }

    /// Every feature bit offered.
    pub fn offered_features(&self) -> u64 {
        let mut f = self.ctrl.backend.device_features()
            | vf::VERSION_1
            | vf::RING_INDIRECT_DESC
            | vf::RING_EVENT_IDX
            | F_PROTOCOL_FEATURES;
        if self.ctrl.packed {
            f |= vf::RING_PACKED;
        }
        if self.ctrl.migration {
            f |= F_LOG_ALL;
        }
        f
    }

    /// The dirty log for ring `i`, while the frontend asks for logging.
    fn dirty_for(&self, i: usize, addrs: Option<RingAddrs>) -> Option<(Arc<vstor_mem::DirtyLog>, u64)> {
        if self.features & F_LOG_ALL == 0 {
            return None;
        }
        let log = self.log.clone()?;
        let v = &self.vrings[i];
        let used = v.log_addr.or_else(|| addrs.map(|a| a.device))?;
        Some((log, used))
    }

    /// Applies the current logging state to every running ring.
    fn update_logging(&self) {
        for i in 0..self.vrings.len() {
            let Some((_, _, addrs)) = self.vrings[i].running.clone() else { continue };
            let d = self.dirty_for(i, Some(addrs));
            tracing::info!(ctrlr = %self.ctrl.name, queue = i, logging = d.is_some(), "dirty logging");
            self.update_running(i, move |p| p.set_dirty_log(d));
        }
    }

    fn ring(&mut self, index: u32) -> VuResult<&mut Vring> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(usize::try_from(index).unwrap_or(usize::MAX))
            .ok_or_else(|| err(format!("vring index {index} is beyond the {n} queues offered")))
    }

    fn reactor_for(&self, index: usize) -> ReactorHandle {
        let r = &self.ctrl.reactors;
        let i = self.ctrl.backend.reactor_index(u16::try_from(index).unwrap_or(u16::MAX), r.len());
        r[i % r.len()].clone()
    }

    /// Number of queues running now.
    pub fn running(&self) -> usize {
        self.vrings.iter().filter(|v| v.running.is_some()).count()
    }

    fn gpa_addrs(&self, va: (u64, u64, u64)) -> Option<RingAddrs> {
        Some(RingAddrs {
            desc: self.mem.va_to_gpa(va.0)?,
            driver: self.mem.va_to_gpa(va.1)?,
            device: self.mem.va_to_gpa(va.2)?,
        })
    }

    /// Starts ring `i` on its reactor if everything it needs has arrived.
    fn try_start(&mut self, i: usize) -> VuResult<()> {
        let protocol_features = self.features & F_PROTOCOL_FEATURES != 0;
        let v = &self.vrings[i];
        if v.running.is_some() || !v.kick_set || v.num == 0 || (protocol_features && !v.enabled) {
            return Ok(());
        }
        let Some(va) = v.addrs else { return Ok(()) };
        let Some(addrs) = self.gpa_addrs(va) else {
            // The frontend would wait forever on a ring that cannot run.
            self.close = true;
            return Err(err(format!(
                "vring {i}: addresses (descriptors {:#x}, available {:#x}, used {:#x}) are not in guest memory",
                va.0, va.1, va.2
            )));
        };
        let params = QueueParams {
            size: v.num,
            addrs,
            packed: self.features & vf::RING_PACKED != 0,
            event_idx: self.features & vf::RING_EVENT_IDX != 0,
            indirect: self.features & vf::RING_INDIRECT_DESC != 0,
            base: v.base,
        };
        let start = QueueStart {
            params,
            mem: self.mem.clone(),
            index: u16::try_from(i).unwrap_or(u16::MAX),
            name: self.ctrl.name.clone(),
            kick: dup(&v.kick),
            call: dup(&v.call),
            err: dup(&v.err),
            coalescing: self.ctrl.coalescing.clone(),
            inflight: self.inflight.clone(),
            features: self.features,
            dirty: self.dirty_for(i, Some(addrs)),
        };
        let reactor = self.reactor_for(i);
        let backend = self.ctrl.backend.clone();
        let features = self.features;
        // Err((rings_bad, why)): bad rings are the frontend's fault and end the connection; a
        // device that cannot start now (a bdev busy on the other side of a handover) does not.
        let started = reactor
            .call(move |r| -> Result<PollerId, (bool, String)> {
                let index = start.index;
                let handler = backend.make_handler(r, index, start.params.size, features).map_err(|e| (false, e))?;
                match VirtqPoller::new(start, handler, r.epoll()) {
                    Ok(p) => Ok(r.add_poller(Box::new(p))),
                    Err(e) => {
                        // Undo what make_handler took (e.g. the bdev activation).
                        backend.queue_stopped(index);
                        Err((true, e.to_string()))
                    }
                }
            })
            .map_err(|e| err(e.to_string()))?;
        let id = match started {
            Ok(id) => id,
            Err((rings_bad, why)) => {
                self.close |= rings_bad;
                return Err(err(format!("starting vring {i}: {why}")));
            }
        };
        tracing::info!(ctrlr = %self.ctrl.name, queue = i, core = reactor.core(), size = v.num, base = v.base,
            packed = params.packed, event_idx = params.event_idx, "vring started");
        self.vrings[i].running = Some((reactor.clone(), id, addrs));
        self.ctrl.backend.queue_started(u16::try_from(i).unwrap_or(u16::MAX), reactor, id);
        Ok(())
    }

    /// Stops ring `i`: no new requests; waits until every request taken has completed; returns
    /// the position to resume from.
    fn stop(&mut self, i: usize) -> u32 {
        let name = self.ctrl.name.clone();
        let v = &mut self.vrings[i];
        let Some((h, id, _)) = v.running.take() else { return v.base };
        self.ctrl.backend.queue_stopped(u16::try_from(i).unwrap_or(u16::MAX));
        let v = &mut self.vrings[i];
        let (tx, rx) = mpsc::channel();
        let found =
            h.call(move |r| r.poller_mut::<VirtqPoller>(id).map(|p| p.begin_stop(tx)).is_some()).unwrap_or(false);
        if found && rx.recv_timeout(STOP_TIMEOUT).is_err() {
            tracing::error!(ctrlr = %name, queue = i, "requests still in flight after {STOP_TIMEOUT:?}; stopping anyway");
        }
        let state = h
            .call(move |r| {
                let p = r.remove_poller(id)?;
                let p: Box<dyn std::any::Any> = p;
                p.downcast::<VirtqPoller>().ok().map(|p| (p.base(), p.completed()))
            })
            .ok()
            .flatten();
        if let Some((base, completed)) = state {
            v.base = base;
            tracing::info!(ctrlr = %name, queue = i, base, completed, "vring stopped");
        }
        v.base
    }

    fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
    }

    /// Installs a new memory table and moves running queues onto it.
    fn set_memory(&mut self, mem: GuestMemory) -> VuResult<()> {
        self.mem = Arc::new(mem);
        self.tables.retain(|t| t.strong_count() > 0);
        self.tables.push(Arc::downgrade(&self.mem));
        tracing::info!(ctrlr = %self.ctrl.name, regions = self.mem.regions().len(), bytes = self.mem.total_size(), "memory table set");
        for i in 0..self.vrings.len() {
            let Some((h, id, old)) = self.vrings[i].running.clone() else { continue };
            let va = self.vrings[i].addrs.unwrap_or_default();
            if self.gpa_addrs(va) == Some(old) {
                let mem = self.mem.clone();
                let _ = h.call(move |r| {
                    if let Some(p) = r.poller_mut::<VirtqPoller>(id) {
                        p.set_memory(mem);
                    }
                });
            } else {
                // The rings moved (or vanished): restart the queue on the new addresses.
                self.stop(i);
                self.try_start(i)?;
            }
        }
        Ok(())
    }

    /// Checks that this connection may map a new memory table that brings `new_bytes` of new
    /// mappings. At its limit of tables or bytes kept mapped, it waits (the frontend waits for the
    /// reply) for requests in flight to complete and release replaced tables; a table too large
    /// by itself, or a wait that does not end, is refused and ends the connection.
    fn admit_table(&mut self, what: &str, table_bytes: u64, new_bytes: u64) -> VuResult<()> {
        if table_bytes > MAX_TABLE_BYTES {
            self.close = true;
            return Err(err(format!(
                "{what}: a memory table of {table_bytes} bytes ({}) is over the limit of {MAX_TABLE_BYTES} bytes ({}) per connection",
                human(table_bytes),
                human(MAX_TABLE_BYTES)
            )));
        }
        let deadline = Instant::now() + TABLE_WAIT;
        let mut waiting_since = None;
        loop {
            self.tables.retain(|t| t.strong_count() > 0);
            let live = self.tables.len();
            let mapped = mapped_bytes(&self.tables);
            let total = mapped.saturating_add(new_bytes);
            if live < MAX_LIVE_TABLES && total <= MAX_MAPPED_BYTES {
                if let Some(t) = waiting_since {
                    tracing::info!(ctrlr = %self.ctrl.name, waited = ?Instant::now().duration_since(t),
                        "{what}: replaced memory tables released; going on");
                }
                return Ok(());
            }
            let state = format!(
                "{live} memory tables ({}) still mapped for requests in flight, plus {} new; limits: {MAX_LIVE_TABLES} tables, {} per connection",
                human(mapped),
                human(new_bytes),
                human(MAX_MAPPED_BYTES)
            );
            if Instant::now() >= deadline {
                self.close = true;
                return Err(err(format!("{what}: {state}, and requests did not complete within {TABLE_WAIT:?}")));
            }
            if waiting_since.is_none() {
                tracing::warn!(ctrlr = %self.ctrl.name, "{what}: {state}: waiting for requests in flight to complete");
                waiting_since = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Checks ring addresses against the memory table, if there is one (they may come first).
    fn check_ring_addrs(&self, index: u32, va: (u64, u64, u64)) -> Result<(), String> {
        if self.mem.regions().is_empty() {
            return Ok(());
        }
        let v = self.vrings.get(usize::try_from(index).unwrap_or(usize::MAX));
        let n = u64::from(v.map_or(1, |v| v.num.max(1)));
        let areas = if self.features & vf::RING_PACKED != 0 {
            [("descriptor ring", va.0, 16 * n), ("driver area", va.1, 4), ("device area", va.2, 4)]
        } else {
            [("descriptor table", va.0, 16 * n), ("available ring", va.1, 6 + 2 * n), ("used ring", va.2, 6 + 8 * n)]
        };
        for (name, addr, len) in areas {
            let ok = self.mem.va_to_gpa(addr).and_then(|gpa| self.mem.translate(gpa, len)).is_some();
            if !ok {
                return Err(format!(
                    "vring {index}: {name} at frontend address {addr:#x} ({len} bytes) is not inside one guest memory region"
                ));
            }
        }
        Ok(())
    }

    fn map_inflight(&self, file: &File, offset: u64, size: u64, nq: u16, qs: u16) -> VuResult<Arc<InflightMap>> {
        let region = Region::map(file, 0, size, 0, offset).map_err(|e| err(format!("in-flight region: {e}")))?;
        if !(region.host() as usize).is_multiple_of(8) {
            return Err(err("in-flight region offset is not 8-byte aligned"));
        }
        let per_queue = vstor_virtio::inflight::queue_region_size(qs);
        Ok(Arc::new(InflightMap { region, per_queue, num_queues: nq, queue_size: qs }))
    }

    /// Releases everything when the frontend goes away.
    pub fn teardown(&mut self) {
        self.stop_all();
        self.mem = Arc::new(GuestMemory::empty());
        self.tables.clear();
        self.inflight = None;
        self.log = None;
        self.uffd = None;
        self.postcopy_listening = false;
    }

    /// In postcopy listening, registers `region` with the userfaultfd (faults on pages that have
    /// not arrived go to the frontend) and returns the address the frontend must know it by.
    fn postcopy_register(&self, region: &Region) -> VuResult<u64> {
        let uffd = self.uffd.as_ref().ok_or_else(|| err("postcopy memory table without POSTCOPY_ADVISE"))?;
        uffd.register(region).map_err(|e| err(format!("userfaultfd register of {region:?}: {e}")))?;
        Ok(region.host() as u64)
    }

    fn update_running(&self, i: usize, f: impl FnOnce(&mut VirtqPoller) + Send + 'static) {
        if let Some((h, id, _)) = &self.vrings[i].running {
            let id = *id;
            let _ = h.call(move |r| {
                if let Some(p) = r.poller_mut::<VirtqPoller>(id) {
                    f(p)
                }
            });
        }
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        self.features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        for v in self.vrings.iter_mut() {
            *v = Vring::default();
        }
        self.features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let extra = features & !self.offered_features();
        if extra != 0 {
            return Err(err(format!("features {extra:#x} were not offered")));
        }
        let logging_changed = (self.features ^ features) & F_LOG_ALL != 0;
        self.features = features;
        if logging_changed {
            // QEMU turns logging on (and off, when a migration is cancelled) on a running device.
            self.update_logging();
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        // A memory table vstor cannot use leaves the device unusable, and the frontend may not have
        // asked for a reply: every refusal below ends the connection.
        if ctx.len() != files.len() {
            self.close = true;
            return Err(err(format!("SET_MEM_TABLE: {} regions but {} file descriptors", ctx.len(), files.len())));
        }
        if ctx.len() as u64 > MAX_MEM_SLOTS {
            self.close = true;
            return Err(err(format!(
                "SET_MEM_TABLE: {} regions; the limit is {MAX_MEM_SLOTS} per connection",
                ctx.len()
            )));
        }
        let bytes = ctx.iter().try_fold(0u64, |a, r| a.checked_add(r.memory_size)).unwrap_or(u64::MAX);
        self.admit_table("SET_MEM_TABLE", bytes, bytes)?;
        let mut regions = Vec::with_capacity(ctx.len());
        for (r, f) in ctx.iter().zip(files.iter()) {
            match Region::map(f, r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset) {
                Ok(region) => regions.push(region),
                Err(e) => {
                    self.close = true;
                    return Err(err(format!("SET_MEM_TABLE: {}", region_error(&e))));
                }
            }
        }
        let mem = match GuestMemory::new(regions) {
            Ok(m) => m,
            Err(e) => {
                self.close = true;
                return Err(err(format!("SET_MEM_TABLE: {e}")));
            }
        };
        let bases = if postcopy_listening == Some(true) {
            // Register before any queue can touch the new mapping.
            let bases = mem.regions().iter().map(|r| self.postcopy_register(r)).collect::<VuResult<Vec<u64>>>()?;
            tracing::info!(ctrlr = %self.ctrl.name, regions = bases.len(), "postcopy: memory registered with userfaultfd");
            Some(bases)
        } else {
            None
        };
        self.set_memory(mem)?;
        Ok(bases)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) {
            return Err(err(format!("vring {index}: size {num} is not between 1 and {MAX_QUEUE_SIZE}")));
        }
        self.ring(index)?.num = u16::try_from(num).unwrap_or(0);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        self.ring(index)?;
        let va = (descriptor, available, used);
        if let Err(e) = self.check_ring_addrs(index, va) {
            // The frontend may not have asked for a reply, and would wait on a dead ring.
            self.close = true;
            return Err(err(e));
        }
        let v = self.ring(index)?;
        v.addrs = Some(va);
        v.log_addr = flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG).then_some(log);
        if v.running.is_some() {
            // Only the logging address may change on a running ring (QEMU re-sends the address
            // with the log flag when a migration starts).
            self.update_logging();
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.ring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        if i >= self.vrings.len() {
            self.close = true;
            return Err(err(format!("GET_VRING_BASE for vring {index}, beyond the queues offered")));
        }
        let base = self.stop(i);
        let v = &mut self.vrings[i];
        // The ring is stopped; it starts again only after a new SET_VRING_KICK.
        v.kick_set = false;
        v.kick = None;
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = usize::from(index);
        let v = self.ring(u32::from(index))?;
        v.kick = fd;
        v.kick_set = true;
        if v.running.is_some() {
            let k = dup(&v.kick);
            self.update_running(i, move |p| p.set_kick(k));
            Ok(())
        } else {
            self.try_start(i)
        }
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.ring(u32::from(index))?;
        v.call = fd;
        let c = dup(&v.call);
        self.update_running(usize::from(index), move |p| p.set_call(c));
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.ring(u32::from(index))?;
        v.err = fd;
        let e = dup(&v.err);
        self.update_running(usize::from(index), move |p| p.set_err(e));
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | if self.ctrl.migration {
                VhostUserProtocolFeatures::LOG_SHMFD
            } else {
                VhostUserProtocolFeatures::empty()
            }
            | if self.ctrl.migration && postcopy_available() {
                VhostUserProtocolFeatures::PAGEFAULT
            } else {
                VhostUserProtocolFeatures::empty()
            })
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        self.ring(index)?.enabled = enable;
        if enable {
            self.try_start(i)
        } else {
            self.stop(i);
            Ok(())
        }
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let end = offset.checked_add(size).filter(|&e| e <= MAX_CONFIG);
        let Some(end) = end else {
            self.close = true;
            return Err(err(format!("GET_CONFIG offset {offset} size {size} beyond the config space")));
        };
        let mut cfg = self.ctrl.backend.config();
        cfg.resize(MAX_CONFIG as usize, 0);
        Ok(cfg[offset as usize..end as usize].to_vec())
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        tracing::debug!(ctrlr = %self.ctrl.name, offset, len = buf.len(), "SET_CONFIG ignored (read-only config space)");
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(err("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(err("shared objects are not supported"))
    }

    fn get_inflight_fd(&mut self, req: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let (nq, qs) = (req.num_queues, req.queue_size);
        if nq == 0 || usize::from(nq) > self.vrings.len() || qs == 0 || qs > MAX_QUEUE_SIZE {
            self.close = true;
            return Err(err(format!("GET_INFLIGHT_FD for {nq} queues of {qs} entries is out of range")));
        }
        let per = vstor_virtio::inflight::queue_region_size(qs);
        let size = per * u64::from(nq);
        let file = vstor_mem::memfd("vstor-inflight", size).map_err(|e| {
            self.close = true;
            err(format!("in-flight region: {e}"))
        })?;
        let map = self.map_inflight(&file, 0, size, nq, qs)?;
        self.inflight = Some(map);
        tracing::info!(ctrlr = %self.ctrl.name, queues = nq, queue_size = qs, bytes = size, "in-flight region created");
        Ok((VhostUserInflight::new(size, 0, nq, qs), file))
    }

    fn set_inflight_fd(&mut self, req: &VhostUserInflight, file: File) -> VuResult<()> {
        let (nq, qs) = (req.num_queues, req.queue_size);
        if nq == 0 || usize::from(nq) > self.vrings.len() || qs == 0 || qs > MAX_QUEUE_SIZE {
            return Err(err(format!("SET_INFLIGHT_FD for {nq} queues of {qs} entries is out of range")));
        }
        let need = vstor_virtio::inflight::queue_region_size(qs) * u64::from(nq);
        if req.mmap_size < need {
            return Err(err(format!("in-flight region of {} bytes is smaller than the {need} needed", req.mmap_size)));
        }
        self.inflight = Some(self.map_inflight(&file, req.mmap_offset, need, nq, qs)?);
        tracing::info!(ctrlr = %self.ctrl.name, queues = nq, queue_size = qs, "in-flight region set");
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<u64>> {
        let have = self.mem.regions().len() as u64;
        if have >= MAX_MEM_SLOTS {
            self.close = true;
            return Err(err(format!(
                "ADD_MEM_REG: region {} would be over the limit of {MAX_MEM_SLOTS} memory regions per connection",
                have + 1
            )));
        }
        let table = self.mem.total_size().saturating_add(r.memory_size);
        self.admit_table("ADD_MEM_REG", table, r.memory_size)?;
        let region = match Region::map(&fd, r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset) {
            Ok(region) => region,
            Err(e) => {
                self.close = true;
                return Err(err(format!("ADD_MEM_REG: {}", region_error(&e))));
            }
        };
        let base = if postcopy_listening == Some(true) {
            let base = self.postcopy_register(&region)?;
            tracing::info!(ctrlr = %self.ctrl.name, region = ?region, "postcopy: memory registered with userfaultfd");
            Some(base)
        } else {
            None
        };
        let mem = match self.mem.with_region(region) {
            Ok(m) => m,
            Err(e) => {
                self.close = true;
                return Err(err(format!("ADD_MEM_REG: {e}")));
            }
        };
        self.set_memory(mem)?;
        Ok(base)
    }

    fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let mem =
            self.mem.without_region(r.guest_phys_addr, r.memory_size).map_err(|e| err(format!("REM_MEM_REG: {e}")))?;
        self.set_memory(mem)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(err("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(err("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        self.close = true;
        Err(err("shared memory regions are not supported"))
    }

    fn postcopy_advice(&mut self) -> VuResult<File> {
        let uffd = vstor_mem::Userfault::new().map_err(|e| err(format!("postcopy: userfaultfd: {e}")))?;
        let file = uffd.try_clone_file().map_err(|e| err(format!("postcopy: {e}")))?;
        tracing::info!(ctrlr = %self.ctrl.name, "postcopy advised: userfaultfd sent to the frontend");
        self.uffd = Some(uffd);
        Ok(file)
    }

    fn postcopy_listen(&mut self) -> VuResult<()> {
        if self.uffd.is_none() {
            return Err(err("POSTCOPY_LISTEN without POSTCOPY_ADVISE"));
        }
        self.postcopy_listening = true;
        tracing::info!(ctrlr = %self.ctrl.name, "postcopy listening: missing guest pages are fetched on first touch");
        Ok(())
    }

    fn postcopy_end(&mut self) -> VuResult<()> {
        if let Some(uffd) = self.uffd.take() {
            for r in self.mem.regions() {
                if let Err(e) = uffd.unregister(r) {
                    tracing::warn!(ctrlr = %self.ctrl.name, region = ?r, "postcopy end: unregister: {e}");
                }
            }
        }
        self.postcopy_listening = false;
        tracing::info!(ctrlr = %self.ctrl.name, "postcopy ended: all guest memory has arrived");
        Ok(())
    }

    fn postcopy_ack_mem_regions(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        if !self.ctrl.migration {
            self.close = true;
            return Err(err("dirty logging was not offered"));
        }
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        if size > MAX_LOG_BYTES {
            self.close = true;
            return Err(err(format!(
                "SET_LOG_BASE: a dirty log of {size} bytes ({}) is over the limit of {MAX_LOG_BYTES} bytes ({})",
                human(size),
                human(MAX_LOG_BYTES)
            )));
        }
        let l = vstor_mem::DirtyLog::map(&file, size, offset).map_err(|e| {
            self.close = true;
            err(format!("dirty log: {e}"))
        })?;
        tracing::info!(ctrlr = %self.ctrl.name, bytes = size, "dirty log set");
        self.log = Some(Arc::new(l));
        self.update_logging();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(0), "0 bytes");
        assert_eq!(human(1023), "1023 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(MAX_TABLE_BYTES), "16 TiB");
        assert_eq!(human(18 << 40), "18 TiB");
        assert_eq!(human(u64::MAX), "16383.9 PiB");
    }
}
