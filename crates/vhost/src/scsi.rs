//! virtio-scsi (virtio 1.x section 5.6) on the transport-free SCSI target of `vstor-scsi`.
//!
//! Queue 0 is the control queue (task management, asynchronous-notification queries), queue 1
//! the event queue (hot-plug and capacity-change events), queues 2.. carry commands. Up to eight
//! targets, each with LUN 0 backed by a bdev, can be added and removed while a VM runs: the
//! device's target table is the control-plane truth, and every running request queue is told to
//! re-read it ("sync") on its own reactor.

use std::any::Any;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use virtio_bindings::virtio_scsi::*;
use vstor_bdev::{Bdev, IoResult};
use vstor_reactor::{PollerId, Reactor, ReactorHandle};
use vstor_scsi::{lun_not_present, Lun, LunChannel, LunOptions, ScsiTask, TaskCallback, TaskResult};
use vstor_virtio::DescChain;

use crate::queue::{QueueCell, QueueCore, QueueHandler, VirtqPoller};
use crate::{VhostError, VirtioBackend};

/// Targets a controller offers (SPDK's limit).
pub const MAX_TARGETS: usize = 8;
/// Request queues offered (plus the control and event queues).
pub const REQUEST_QUEUES: u16 = 8;
const REQ_HDR: u64 = 51; // lun[8] id u64 task_attr prio crn cdb[32]
const RESP_HDR: u64 = 108; // sense_len u32, resid u32, status_qualifier u16, status u8, response u8, sense[96]
const SENSE_SIZE: usize = 96;
const EVENT_SIZE: u64 = 16;
const REQ_HDR_LEN: usize = 51;
const RESP_HDR_LEN: usize = 108;
// Response codes (virtio 5.6.6.1) as the one byte they occupy.
const S_OK: u8 = 0;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
const S_FUNCTION_REJECTED: u8 = 11;
/// Tags at or above this are LUN resets, not commands.
const RESET_TAG: u64 = 1 << 32;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// A target as the control plane sees it.
#[derive(Clone)]
pub struct Target {
    pub lun: Arc<Lun>,
    pub bdev: Arc<Bdev>,
    listener: u64,
}

/// One running queue of the current session.
#[derive(Clone)]
struct Running {
    index: u16,
    reactor: ReactorHandle,
    id: PollerId,
}

/// A virtio-scsi device: targets and the queues serving them.
pub struct ScsiDevice {
    name: Arc<str>,
    targets: Mutex<[Option<Target>; MAX_TARGETS]>,
    running: Mutex<Vec<Running>>,
    /// Events raised while no event queue runs, delivered when one starts.
    pending_events: Mutex<Vec<[u8; 16]>>,
}

impl std::fmt::Debug for ScsiDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScsiDevice({})", self.name)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The 8-byte virtio-scsi LUN address of LUN 0 of `target`, as events carry it (flat addressing
/// only for LUNs above 255, as QEMU writes it and Linux reads it).
fn lun_addr(target: u8) -> [u8; 8] {
    [1, target, 0, 0, 0, 0, 0, 0]
}

fn event(kind: u32, target: u8, reason: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0..4].copy_from_slice(&kind.to_le_bytes());
    e[4..12].copy_from_slice(&lun_addr(target));
    e[12..16].copy_from_slice(&reason.to_le_bytes());
    e
}

impl ScsiDevice {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: Arc::from(name),
            targets: Mutex::new(Default::default()),
            running: Mutex::new(Vec::new()),
            pending_events: Mutex::new(Vec::new()),
        })
    }

    /// The current targets.
    pub fn targets(&self) -> Vec<(usize, Target)> {
        lock(&self.targets).iter().enumerate().filter_map(|(i, t)| t.clone().map(|t| (i, t))).collect()
    }

    fn owner(&self, target: usize) -> String {
        format!("vhost-scsi:{}:{target}", self.name)
    }

    /// Adds `bdev` as LUN 0 of `target` (`None`: the first free one); returns the target number.
    /// A running VM is told (TRANSPORT_RESET / RESCAN) and its queues start serving the target.
    pub fn add_target(self: &Arc<Self>, target: Option<usize>, bdev: Arc<Bdev>) -> Result<usize, VhostError> {
        let t = {
            let mut tab = lock(&self.targets);
            let t = match target {
                Some(t) if t >= MAX_TARGETS => {
                    return Err(VhostError::InvalidParam {
                        param: "scsi_target_num",
                        msg: format!("{t} is not between 0 and {}", MAX_TARGETS - 1),
                    })
                }
                Some(t) => t,
                None => tab.iter().position(Option::is_none).ok_or_else(|| VhostError::InvalidParam {
                    param: "scsi_target_num",
                    msg: format!("all {MAX_TARGETS} targets are in use"),
                })?,
            };
            if tab[t].is_some() {
                return Err(VhostError::InvalidParam {
                    param: "scsi_target_num",
                    msg: format!("target {t} is in use"),
                });
            }
            bdev.claim(&self.owner(t), true)?;
            let lun = Lun::new(bdev.clone(), u8::try_from(t).unwrap_or(0), LunOptions::default());
            let weak = Arc::downgrade(self);
            let tnum = u8::try_from(t).unwrap_or(0);
            let listener = bdev.listen(move |ev| {
                let Some(dev) = weak.upgrade() else { return };
                match ev {
                    vstor_bdev::BdevEvent::Resized { .. } => {
                        // CAPACITY DATA HAS CHANGED: ASC 2Ah, ASCQ 09h (reason = ASC | ASCQ << 8).
                        dev.post_event(event(VIRTIO_SCSI_T_PARAM_CHANGE, tnum, 0x2a | (0x09 << 8)));
                    }
                    vstor_bdev::BdevEvent::RemoveRequested => {
                        // The bdev is being deleted under the LUN: hot-remove the target (its
                        // commands in flight finish, the guest gets TRANSPORT_RESET / REMOVED).
                        tracing::info!(ctrlr = %dev.name, target = tnum, "bdev deleted under a live LUN: hot-removing the target");
                        if let Err(e) = dev.remove_target(usize::from(tnum)) {
                            tracing::warn!(ctrlr = %dev.name, target = tnum, "hot-removing the target failed: {e}");
                        }
                    }
                }
            });
            tab[t] = Some(Target { lun, bdev, listener });
            t
        };
        self.sync_all(None);
        self.post_event(event(
            VIRTIO_SCSI_T_TRANSPORT_RESET,
            u8::try_from(t).unwrap_or(0),
            VIRTIO_SCSI_EVT_RESET_RESCAN,
        ));
        tracing::info!(ctrlr = %self.name, target = t, "SCSI target added");
        Ok(t)
    }

    /// Removes `target`: new commands to it fail with BAD_TARGET, commands in flight complete,
    /// then the bdev is released and the VM is told (TRANSPORT_RESET / REMOVED).
    pub fn remove_target(&self, target: usize) -> Result<(), VhostError> {
        let t = lock(&self.targets).get_mut(target).and_then(Option::take).ok_or_else(|| VhostError::InvalidParam {
            param: "scsi_target_num",
            msg: format!("target {target} does not exist"),
        })?;
        t.bdev.unlisten(t.listener);
        let (tx, rx) = std::sync::mpsc::channel();
        let n = self.sync_all(Some(tx));
        for _ in 0..n {
            if rx.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
                tracing::error!(ctrlr = %self.name, target, "commands still in flight after 60 s; releasing the bdev anyway");
                break;
            }
        }
        t.bdev.release(&self.owner(target));
        self.post_event(event(
            VIRTIO_SCSI_T_TRANSPORT_RESET,
            u8::try_from(target).unwrap_or(0),
            VIRTIO_SCSI_EVT_RESET_REMOVED,
        ));
        tracing::info!(ctrlr = %self.name, target, "SCSI target removed");
        Ok(())
    }

    /// Releases every target (controller deletion).
    pub fn release_all(&self) {
        let mut tab = lock(&self.targets);
        for (i, t) in tab.iter_mut().enumerate() {
            if let Some(t) = t.take() {
                t.bdev.unlisten(t.listener);
                t.bdev.release(&self.owner(i));
            }
        }
    }

    /// Tells every running request queue to re-read the target table. Returns how many were
    /// told; each sends on `drained` once no command of a removed target is in flight.
    fn sync_all(&self, drained: Option<Sender<()>>) -> usize {
        let table: Vec<Option<Arc<Lun>>> =
            lock(&self.targets).iter().map(|t| t.as_ref().map(|t| t.lun.clone())).collect();
        let queues: Vec<Running> = lock(&self.running).iter().filter(|q| q.index >= 2).cloned().collect();
        for q in &queues {
            let (table, drained) = (table.clone(), drained.clone());
            let id = q.id;
            let _ = q.reactor.send(move |r| sync_queue(r, id, &table, drained));
        }
        queues.len()
    }

    /// Sends an event to the guest (queued until the event queue runs).
    fn post_event(&self, e: [u8; 16]) {
        let evq = lock(&self.running).iter().find(|q| q.index == 1).cloned();
        match evq {
            Some(q) => {
                let id = q.id;
                let _ = q.reactor.send(move |r| {
                    if let Some(p) = r.poller_mut::<VirtqPoller>(id) {
                        p.with_handler(|core, h, _| {
                            if let Some(ev) = (h as &mut dyn Any).downcast_mut::<EventHandler>() {
                                ev.post(core, e);
                            }
                        });
                    }
                });
            }
            None => lock(&self.pending_events).push(e),
        }
    }

    /// SPDK's `backend_specific` for `vhost_get_controllers`.
    pub fn info(&self) -> Value {
        let v: Vec<Value> = self
            .targets()
            .iter()
            .map(|(i, t)| {
                json!({
                    "target_name": format!("Target {i}"),
                    "id": i,
                    "scsi_dev_num": i,
                    "luns": [{ "id": 0, "bdev_name": t.bdev.name() }],
                })
            })
            .collect();
        json!({ "scsi": v })
    }
}

fn sync_queue(r: &mut Reactor, id: PollerId, table: &[Option<Arc<Lun>>], drained: Option<Sender<()>>) {
    let Some(p) = r.poller_mut::<VirtqPoller>(id) else {
        if let Some(d) = drained {
            let _ = d.send(());
        }
        return;
    };
    // LunChannels are created on this reactor; the poller cannot add pollers itself, so channels
    // are built here (outside its borrow) and handed in.
    let needed: Vec<(usize, Arc<Lun>)> = p.with_handler(|_, h, _| {
        let Some(rq) = (h as &mut dyn Any).downcast_mut::<RequestHandler>() else { return Vec::new() };
        table
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().filter(|l| !rq.has(i, l)).map(|l| (i, l.clone())))
            .collect()
    });
    let mut made = Vec::new();
    for (i, lun) in needed {
        match LunChannel::new(lun, r) {
            Ok(ch) => made.push((i, ch)),
            Err(e) => tracing::error!("cannot open target {i} on core {}: {e}", r.core()),
        }
    }
    if let Some(p) = r.poller_mut::<VirtqPoller>(id) {
        p.with_handler(|core, h, _| match (h as &mut dyn Any).downcast_mut::<RequestHandler>() {
            Some(rq) => rq.sync(core, table, made, drained),
            None => {
                if let Some(d) = drained {
                    let _ = d.send(());
                }
            }
        });
    }
}

impl VirtioBackend for ScsiDevice {
    fn device_features(&self) -> u64 {
        bit(VIRTIO_SCSI_F_HOTPLUG) | bit(VIRTIO_SCSI_F_CHANGE)
    }

    fn config(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(36);
        // num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size, sense_size, cdb_size
        for v in [u32::from(REQUEST_QUEUES), 126, 0xffff, 128, 16, 96, 32] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.extend_from_slice(&0u16.to_le_bytes()); // max_channel
        c.extend_from_slice(&7u16.to_le_bytes()); // max_target: MAX_TARGETS - 1
        c.extend_from_slice(&0u32.to_le_bytes()); // max_lun: LUN 0 only
        c
    }

    fn max_queues(&self) -> u16 {
        REQUEST_QUEUES + 2
    }

    fn reactor_index(&self, index: u16, reactors: usize) -> usize {
        // Control and event queues on the first reactor; request queues spread over all.
        if index < 2 {
            0
        } else {
            usize::from(index - 2) % reactors.max(1)
        }
    }

    fn make_handler(
        &self,
        r: &mut Reactor,
        index: u16,
        size: u16,
        _features: u64,
    ) -> Result<Box<dyn QueueHandler>, String> {
        let _ = size;
        Ok(match index {
            0 => Box::new(ControlHandler { dev_running: Vec::new() }),
            1 => Box::new(EventHandler { buffers: Default::default(), pending: Vec::new(), missed: false }),
            _ => {
                let table: Vec<Option<Arc<Lun>>> =
                    lock(&self.targets).iter().map(|t| t.as_ref().map(|t| t.lun.clone())).collect();
                let mut rq = RequestHandler::new(usize::from(size));
                for (i, lun) in table.iter().enumerate() {
                    if let Some(lun) = lun {
                        rq.targets[i] = Some(TargetChan {
                            ch: LunChannel::new(lun.clone(), r).map_err(|e| e.to_string())?,
                            inflight: 0,
                            removing: None,
                        });
                    }
                }
                Box::new(rq)
            }
        })
    }

    fn queue_started(&self, index: u16, reactor: ReactorHandle, id: PollerId) {
        lock(&self.running).push(Running { index, reactor: reactor.clone(), id });
        if index == 1 {
            for e in std::mem::take(&mut *lock(&self.pending_events)) {
                self.post_event(e);
            }
        } else if index >= 2 {
            // Catch up with any target change that raced with the start.
            let table: Vec<Option<Arc<Lun>>> =
                lock(&self.targets).iter().map(|t| t.as_ref().map(|t| t.lun.clone())).collect();
            let _ = reactor.send(move |r| sync_queue(r, id, &table, None));
        } else {
            // The control queue needs the request queues for resets; it reads the list on use.
            let running = lock(&self.running).clone();
            let _ = reactor.send(move |r| {
                if let Some(p) = r.poller_mut::<VirtqPoller>(id) {
                    p.with_handler(|_, h, _| {
                        if let Some(c) = (h as &mut dyn Any).downcast_mut::<ControlHandler>() {
                            c.dev_running = running;
                        }
                    });
                }
            });
        }
        if index >= 2 {
            self.refresh_control();
        }
    }

    fn queue_stopped(&self, index: u16) {
        lock(&self.running).retain(|q| q.index != index);
        self.refresh_control();
    }
}

impl ScsiDevice {
    /// Gives the control queue the current list of request queues (for LUN resets).
    fn refresh_control(&self) {
        let running = lock(&self.running).clone();
        if let Some(c) = running.iter().find(|q| q.index == 0).cloned() {
            let id = c.id;
            let _ = c.reactor.send(move |r| {
                if let Some(p) = r.poller_mut::<VirtqPoller>(id) {
                    p.with_handler(|_, h, _| {
                        if let Some(c) = (h as &mut dyn Any).downcast_mut::<ControlHandler>() {
                            c.dev_running = running;
                        }
                    });
                }
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request queues

struct TargetChan {
    ch: LunChannel,
    inflight: usize,
    /// Set when the target was removed: told once the last command finishes.
    removing: Option<Option<Sender<()>>>,
}

struct Req {
    ndesc: u16,
    target: usize,
    data_in_total: u64,
    /// The chain's device-writable buffers: the response header, then the data-in buffers. Kept
    /// whole: the response is written at its start, and a migration's dirty log is told all of it.
    writable: vstor_bdev::IoVecs,
}

/// Serves commands on one request queue.
pub struct RequestHandler {
    targets: [Option<TargetChan>; MAX_TARGETS],
    reqs: Vec<Option<Req>>,
    /// LUN resets in progress: tag → what to do when done.
    resets: Vec<(u64, Box<dyn FnOnce() + Send>)>,
    next_reset: u64,
}

impl RequestHandler {
    fn new(size: usize) -> Self {
        let mut reqs = Vec::new();
        reqs.resize_with(size, || None);
        Self { targets: Default::default(), reqs, resets: Vec::new(), next_reset: RESET_TAG }
    }

    fn has(&self, i: usize, lun: &Arc<Lun>) -> bool {
        self.targets[i].as_ref().is_some_and(|t| t.removing.is_none() && Arc::ptr_eq(t.ch.lun(), lun))
    }

    /// Applies the control plane's table: new channels in `made`; targets no longer there are
    /// marked removing (and dropped once idle).
    fn sync(
        &mut self,
        _core: &mut QueueCore,
        table: &[Option<Arc<Lun>>],
        made: Vec<(usize, LunChannel)>,
        drained: Option<Sender<()>>,
    ) {
        for (i, ch) in made {
            self.targets[i] = Some(TargetChan { ch, inflight: 0, removing: None });
        }
        for (i, slot) in self.targets.iter_mut().enumerate() {
            let gone = match (slot.as_ref(), table.get(i).and_then(Option::as_ref)) {
                (Some(t), Some(l)) => !Arc::ptr_eq(t.ch.lun(), l),
                (Some(_), None) => true,
                _ => false,
            };
            if gone {
                if let Some(t) = slot.as_mut() {
                    if t.inflight == 0 {
                        *slot = None;
                    } else if t.removing.is_none() {
                        t.removing = Some(drained.clone());
                        continue;
                    }
                }
            }
        }
        // Tell the remover now unless a removed target still has commands in flight.
        if !self.targets.iter().flatten().any(|t| t.removing.is_some()) {
            if let Some(d) = drained {
                let _ = d.send(());
            }
        }
    }

    /// Writes the response header at the start of `writable` (the chain's device-writable
    /// buffers) and returns the chain; every page of `writable` is marked for a migration's dirty
    /// log (data-in the target wrote as well as the header).
    fn respond(
        core: &mut QueueCore,
        head: u16,
        ndesc: u16,
        writable: &vstor_bdev::IoVecs,
        r: &TaskResult,
        resid: u32,
        response: u8,
    ) {
        let mut b = [0u8; RESP_HDR_LEN];
        let sense = r.sense_bytes();
        let sense_len = sense.map(|s| s.len()).unwrap_or(0).min(SENSE_SIZE);
        b[0..4].copy_from_slice(&u32::try_from(sense_len).unwrap_or(0).to_le_bytes());
        b[4..8].copy_from_slice(&resid.to_le_bytes());
        b[10] = r.status.as_u8();
        b[11] = response;
        if let Some(s) = sense {
            b[12..12 + sense_len].copy_from_slice(&s[..sense_len]);
        }
        writable.copy_from(&b);
        core.mark_written(writable);
        core.complete(head, ndesc, u32::try_from(RESP_HDR).unwrap_or(0) + r.data_in_len);
    }

    fn bad_target(core: &mut QueueCore, head: u16, ndesc: u16, writable: &vstor_bdev::IoVecs) {
        let mut b = [0u8; RESP_HDR_LEN];
        b[11] = S_BAD_TARGET;
        writable.copy_from(&b);
        core.mark_written(writable);
        core.complete(head, ndesc, u32::try_from(RESP_HDR).unwrap_or(0));
    }

    /// Starts a LUN reset of `target`; `done` runs when every command before it has finished.
    fn reset_target(&mut self, target: usize, me: &Rc<QueueCell>, done: Box<dyn FnOnce() + Send>) {
        match self.targets.get_mut(target).and_then(Option::as_mut) {
            Some(t) => {
                let tag = self.next_reset;
                self.next_reset += 1;
                self.resets.push((tag, done));
                t.ch.reset(TaskCallback { sink: me.clone(), tag });
            }
            None => done(),
        }
    }
}

impl QueueHandler for RequestHandler {
    fn handle(&mut self, core: &mut QueueCore, chain: DescChain, me: &Rc<QueueCell>) {
        let (head, ndesc) = (chain.head, chain.ndesc);
        let (rlen, wlen) = (chain.readable.total_len(), chain.writable.total_len());
        if rlen < REQ_HDR || wlen < RESP_HDR || usize::from(head) >= self.reqs.len() {
            // Too short to hold a request or a response: nothing can be answered.
            core.complete(head, ndesc, 0);
            return;
        }
        let mut hdr = [0u8; REQ_HDR_LEN];
        chain.readable.copy_to(&mut hdr);
        let lun = &hdr[0..8];
        let target = usize::from(lun[1]);
        // virtio 5.6.6.1: lun[0] is 1; lun[1] the target; lun[2..4] the flat LUN.
        let lun_num = (u16::from(lun[2] & 0x3f) << 8) | u16::from(lun[3]);
        let present =
            lun[0] == 1 && target < MAX_TARGETS && self.targets[target].as_ref().is_some_and(|t| t.removing.is_none());
        if !present {
            return Self::bad_target(core, head, ndesc, &chain.writable);
        }
        let data_out = chain.readable.sub(REQ_HDR, rlen - REQ_HDR).unwrap_or_default();
        let data_in = chain.writable.sub(RESP_HDR, wlen - RESP_HDR).unwrap_or_default();
        let data_in_total = data_in.total_len();
        let task = ScsiTask::new(&hdr[19..51], data_out, data_in);
        if lun_num != 0 || lun[4..8] != [0, 0, 0, 0] {
            let r = lun_not_present(&task);
            let resid = u32::try_from(data_in_total.saturating_sub(u64::from(r.data_in_len))).unwrap_or(0);
            return Self::respond(core, head, ndesc, &chain.writable, &r, resid, S_OK);
        }
        let Some(t) = self.targets[target].as_mut() else {
            return Self::bad_target(core, head, ndesc, &chain.writable);
        };
        t.inflight += 1;
        self.reqs[usize::from(head)] = Some(Req { ndesc, target, data_in_total, writable: chain.writable });
        t.ch.submit(task, TaskCallback { sink: me.clone(), tag: u64::from(head) });
    }

    fn io_done(&mut self, _core: &mut QueueCore, _tag: u64, _result: IoResult) {}

    fn task_done(&mut self, core: &mut QueueCore, tag: u64, r: TaskResult) {
        if tag >= RESET_TAG {
            if let Some(i) = self.resets.iter().position(|(t, _)| *t == tag) {
                let (_, done) = self.resets.swap_remove(i);
                done();
            }
            return;
        }
        let Some(req) = usize::try_from(tag).ok().and_then(|i| self.reqs.get_mut(i)).and_then(Option::take) else {
            tracing::error!(ctrlr = %core.name, tag, "SCSI completion for a request not in flight");
            return;
        };
        let head = u16::try_from(tag).unwrap_or(0);
        let resid = u32::try_from(req.data_in_total.saturating_sub(u64::from(r.data_in_len))).unwrap_or(0);
        Self::respond(core, head, req.ndesc, &req.writable, &r, resid, S_OK);
        if let Some(t) = self.targets[req.target].as_mut() {
            t.inflight = t.inflight.saturating_sub(1);
            if t.inflight == 0 {
                if let Some(drained) = t.removing.take() {
                    self.targets[req.target] = None;
                    if !self.targets.iter().flatten().any(|t| t.removing.is_some()) {
                        if let Some(d) = drained {
                            let _ = d.send(());
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Event queue

/// Holds the driver's empty event buffers and fills them as events happen.
pub struct EventHandler {
    buffers: std::collections::VecDeque<(u16, u16, vstor_bdev::IoVecs)>,
    pending: Vec<[u8; 16]>,
    missed: bool,
}

impl EventHandler {
    fn post(&mut self, core: &mut QueueCore, e: [u8; 16]) {
        self.pending.push(e);
        self.deliver(core);
    }

    fn deliver(&mut self, core: &mut QueueCore) {
        while !self.pending.is_empty() {
            let Some((head, ndesc, buf)) = self.buffers.pop_front() else {
                if self.pending.len() > 64 {
                    // The driver is not giving buffers: drop the oldest, flag the loss.
                    self.pending.remove(0);
                    self.missed = true;
                }
                return;
            };
            core.unpark();
            let mut e = self.pending.remove(0);
            if self.missed {
                let kind = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) | VIRTIO_SCSI_T_EVENTS_MISSED;
                e[0..4].copy_from_slice(&kind.to_le_bytes());
                self.missed = false;
            }
            buf.copy_from(&e);
            core.mark_written(&buf);
            core.complete(head, ndesc, u32::try_from(EVENT_SIZE).unwrap_or(16));
        }
    }
}

impl QueueHandler for EventHandler {
    fn handle(&mut self, core: &mut QueueCore, chain: DescChain, _me: &Rc<QueueCell>) {
        if chain.writable.total_len() < EVENT_SIZE {
            core.complete(chain.head, chain.ndesc, 0);
            return;
        }
        let buf = chain.writable.sub(0, EVENT_SIZE).unwrap_or_default();
        core.park();
        self.buffers.push_back((chain.head, chain.ndesc, buf));
        self.deliver(core);
    }

    fn io_done(&mut self, _core: &mut QueueCore, _tag: u64, _result: IoResult) {}
}

// ---------------------------------------------------------------------------------------------
// Control queue

/// Task management and asynchronous-notification requests.
pub struct ControlHandler {
    dev_running: Vec<Running>,
}

impl QueueHandler for ControlHandler {
    fn handle(&mut self, core: &mut QueueCore, chain: DescChain, me: &Rc<QueueCell>) {
        let (head, ndesc) = (chain.head, chain.ndesc);
        let mut ty = [0u8; 4];
        if chain.readable.copy_to(&mut ty) < 4 || chain.writable.total_len() == 0 {
            core.complete(head, ndesc, 0);
            return;
        }
        match u32::from_le_bytes(ty) {
            VIRTIO_SCSI_T_TMF => {
                // type u32, subtype u32, lun[8], id u64 -> response u8
                let mut req = [0u8; 24];
                if chain.readable.copy_to(&mut req) < 24 {
                    core.complete(head, ndesc, 0);
                    return;
                }
                let subtype = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
                let target = usize::from(req[9]);
                let resp = chain.writable.sub(0, 1).unwrap_or_default();
                match subtype {
                    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET
                    | VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET
                    | VIRTIO_SCSI_T_TMF_ABORT_TASK_SET
                    | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET => {
                        // Completes once every command sent to the target before it, on every
                        // request queue, has finished.
                        let queues: Vec<Running> = self.dev_running.iter().filter(|q| q.index >= 2).cloned().collect();
                        let me_reactor = queues.first().map(|_| ());
                        let _ = me_reactor;
                        self.start_reset(core, me, head, ndesc, resp, target, queues);
                    }
                    VIRTIO_SCSI_T_TMF_QUERY_TASK | VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => {
                        // FUNCTION COMPLETE: no such task is known to be pending.
                        resp.copy_from(&[S_OK]);
                        core.mark_written(&resp);
                        core.complete(head, ndesc, 1);
                    }
                    _ => {
                        // ABORT TASK and CLEAR ACA are refused; Linux escalates to a LUN reset,
                        // which waits for the command instead of racing its completion.
                        resp.copy_from(&[S_FUNCTION_REJECTED]);
                        core.mark_written(&resp);
                        core.complete(head, ndesc, 1);
                    }
                }
            }
            VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => {
                // event_actual u32 = 0 (no asynchronous notifications), response u8 = OK
                let resp = [0, 0, 0, 0, S_OK];
                let n = chain.writable.copy_from(&resp);
                core.mark_written(&chain.writable);
                core.complete(head, ndesc, u32::try_from(n).unwrap_or(0));
            }
            _ => {
                let n = chain.writable.copy_from(&[S_FAILURE]);
                core.mark_written(&chain.writable);
                core.complete(head, ndesc, u32::try_from(n).unwrap_or(0));
            }
        }
    }

    fn io_done(&mut self, _core: &mut QueueCore, _tag: u64, _result: IoResult) {}
}

impl ControlHandler {
    #[allow(clippy::too_many_arguments)]
    fn start_reset(
        &mut self,
        core: &mut QueueCore,
        _me: &Rc<QueueCell>,
        head: u16,
        ndesc: u16,
        resp: vstor_bdev::IoVecs,
        target: usize,
        queues: Vec<Running>,
    ) {
        if queues.is_empty() || target >= MAX_TARGETS {
            resp.copy_from(&[S_OK]);
            core.complete(head, ndesc, 1);
            return;
        }
        let Some(me_q) = self.dev_running.iter().find(|q| q.index == 0).cloned() else {
            resp.copy_from(&[S_OK]);
            core.complete(head, ndesc, 1);
            return;
        };
        // The control queue's own reactor finishes the TMF when the last request queue reports.
        let left = Arc::new(AtomicUsize::new(queues.len()));
        let resp = Arc::new(Mutex::new(Some(SendIoVecs(resp))));
        for q in queues {
            let (left, resp, me_q) = (left.clone(), resp.clone(), me_q.clone());
            let qid = q.id;
            let _ = q.reactor.send(move |r| {
                let done: Box<dyn FnOnce() + Send> = Box::new(move || {
                    if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                        let id = me_q.id;
                        let _ = me_q.reactor.send(move |r| {
                            if let Some(p) = r.poller_mut::<VirtqPoller>(id) {
                                p.with_handler(|core, _, _| {
                                    if let Some(SendIoVecs(v)) = lock(&resp).take() {
                                        v.copy_from(&[S_OK]);
                                        core.mark_written(&v);
                                        core.complete(head, ndesc, 1);
                                    }
                                });
                            }
                        });
                    }
                });
                match r.poller_mut::<VirtqPoller>(qid) {
                    Some(p) => {
                        p.with_handler(|_, h, cell| match (h as &mut dyn Any).downcast_mut::<RequestHandler>() {
                            Some(rq) => rq.reset_target(target, cell, done),
                            None => done(),
                        })
                    }
                    None => done(),
                }
            });
        }
    }
}

/// An iovec list handed between reactors of the same queue set: it points into guest memory the
/// control queue keeps mapped while the TMF is in flight, and is only used on that queue's reactor.
struct SendIoVecs(vstor_bdev::IoVecs);

// SAFETY: the list is created on the control queue's reactor, moved through a message and used
// again only on that same reactor (inside `me_q.reactor.send`); no other thread dereferences it.
unsafe impl Send for SendIoVecs {}
