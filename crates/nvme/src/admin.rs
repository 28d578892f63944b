//! The admin poller (on the first reactor): controller state machine, admin queue, queue registry,
//! features, asynchronous events, log pages.
//!
//! State machine (driven by [`AdminCore::reconcile`], called when CC changes and when a step
//! finishes):
//!
//! ```text
//! Disabled --CC.EN=1, valid--> Enabled (CSTS.RDY=1)          invalid config --> Failed (CFS=1)
//! Enabled  --CC.EN=0--> Teardown(reset) --all groups drained--> Disabled (CSTS=0)
//! Enabled  --CC.SHN!=0--> Teardown(shutdown, SHST=01) --drained+flushed--> ShutDown (SHST=10)
//! Failed / ShutDown --CC.EN=0--> Teardown(reset)
//! ```
//!
//! Every teardown bumps an epoch; answers from groups carry the epoch they were asked under, so
//! late answers to a previous life of the controller are ignored.

use std::cell::RefCell;
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_bdev::IoVecs;
use vstor_mem::GuestMemory;
use vstor_reactor::{EpollHandle, PollStatus, Poller, PollerId, Reactor};

use crate::dptr::map_data;
use crate::identify::{self, AERL, MAX_TRANSFER, WCTEMP_K};
use crate::queue::{Cq, Sq};
use crate::spec::*;
use crate::{lock, Inner};

/// Admin commands handled per poll.
const ADMIN_BUDGET: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Disabled,
    Enabled,
    /// CSTS.CFS set: an invalid configuration at enable, a broken admin doorbell, or an expired
    /// keep alive timer. Waits for CC.EN = 0.
    Failed,
    /// Shutdown processing complete (SHST = 10b). Waits for CC.EN = 0.
    ShutDown,
    /// Waiting for every group to stop its queues.
    Teardown,
}

/// What a group is asked to do when the controller stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TeardownKind {
    /// Drop every I/O queue (in-flight I/O completes unseen).
    Reset,
    /// Stop fetching, let in-flight I/O complete, flush every namespace.
    Shutdown,
}

struct Teardown {
    epoch: u64,
    left: usize,
    kind: TeardownKind,
}

/// An admin command waiting for groups to answer.
#[derive(Debug, Clone, Copy)]
enum Pending {
    CreateCq { qid: u16, group: usize },
    CreateSq { qid: u16, cqid: u16 },
    DeleteSq { qid: u16 },
    DeleteCq { qid: u16 },
    DoorbellBuffer { db: u64, ei: u64 },
}

struct Busy {
    cid: u16,
    left: usize,
    status: Status,
    what: Pending,
}

#[derive(Debug, Clone, Copy)]
struct CqReg {
    group: usize,
    sqs: u16,
}

/// Feature values owned by the admin poller.
#[derive(Debug, Clone, Copy)]
struct Features {
    arbitration: u32,
    power: u32,
    /// Temperature thresholds of the composite sensor: over, under.
    temp: [u16; 2],
    error_recovery: u32,
    wce: bool,
    /// Allocated I/O queues (0-based): submission, completion.
    queues: (u16, u16),
    coalescing: u32,
    write_atomicity: u32,
    aec: u32,
    kato: u32,
}

impl Features {
    fn defaults(max_io_queues: u16) -> Features {
        Features {
            arbitration: 0,
            power: 0,
            temp: [WCTEMP_K, 0],
            error_recovery: 0,
            wce: true,
            queues: (max_io_queues - 1, max_io_queues - 1),
            coalescing: 0,
            write_atomicity: 0,
            aec: 0,
            kato: 0,
        }
    }
}

/// What an admin command handler decided.
enum Outcome {
    Done(Status, u32),
    /// Completed later, when the groups answer.
    Async,
    /// Held (Asynchronous Event Request).
    Parked,
}

use Outcome::*;

fn done(s: Status) -> Outcome {
    Done(s, 0)
}

/// The admin side of the controller. Lives on reactor 0, shared by its poller and its timer.
pub(crate) struct AdminCore {
    pub inner: Arc<Inner>,
    state: State,
    epoch: u64,
    mem: Arc<GuestMemory>,
    mem_gen: u64,
    page: u64,
    sq: Option<Sq>,
    cq: Option<Cq>,
    busy: Option<Busy>,
    teardown: Option<Teardown>,
    cqs: Vec<Option<CqReg>>,
    /// Registered submission queues: their completion queue.
    sqs: Vec<Option<u16>>,
    feat: Features,
    aers: VecDeque<u16>,
    events: VecDeque<u32>,
    error_masked: bool,
    notice_masked: bool,
    changed_ns: BTreeSet<u32>,
    changed_overflow: bool,
    last_keep_alive: Instant,
    shadow: Option<(u64, u64)>,
    next_instance: u64,
    waiters: Vec<SyncSender<()>>,
}

impl AdminCore {
    fn new(inner: Arc<Inner>) -> AdminCore {
        let n = usize::from(inner.cfg.max_io_queues) + 1;
        let feat = Features::defaults(inner.cfg.max_io_queues);
        AdminCore {
            mem: inner.memory(),
            mem_gen: inner.mem_gen.load(Ordering::SeqCst),
            inner,
            state: State::Disabled,
            epoch: 0,
            page: 4096,
            sq: None,
            cq: None,
            busy: None,
            teardown: None,
            cqs: vec![None; n],
            sqs: vec![None; n],
            feat,
            aers: VecDeque::new(),
            events: VecDeque::new(),
            error_masked: false,
            notice_masked: false,
            changed_ns: BTreeSet::new(),
            changed_overflow: false,
            last_keep_alive: Instant::now(),
            shadow: None,
            next_instance: 1,
            waiters: Vec::new(),
        }
    }

    fn refresh_mem(&mut self) {
        let gen = self.inner.mem_gen.load(Ordering::SeqCst);
        if gen != self.mem_gen {
            self.mem = self.inner.memory();
            self.mem_gen = gen;
            if let Some(q) = self.sq.as_mut() {
                q.remap(&self.mem);
            }
            if let Some(q) = self.cq.as_mut() {
                q.remap(&self.mem);
            }
        }
    }

    fn set_shst(&self, shst: u32) {
        let c = self.inner.csts();
        self.inner.set_csts((c & !CSTS_SHST_MASK) | (shst << CSTS_SHST_SHIFT));
    }

    fn fail(&mut self, why: &str) {
        tracing::warn!("NVMe controller fatal status: {why}");
        self.state = State::Failed;
        let c = self.inner.csts();
        self.inner.set_csts(c | CSTS_CFS);
    }

    fn flush_waiters(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
    }

    /// Brings the state in line with CC.
    pub fn reconcile(&mut self) {
        let cc = lock(&self.inner.regs).cc;
        let en = cc & CC_EN != 0;
        let shn = (cc >> CC_SHN_SHIFT) & 3;
        match self.state {
            State::Teardown => {}
            State::Disabled => {
                if en {
                    self.enable();
                } else {
                    if shn != 0 {
                        self.set_shst(SHST_COMPLETE);
                    }
                    self.flush_waiters();
                }
            }
            State::Enabled => {
                if !en {
                    self.start_teardown(TeardownKind::Reset);
                } else if shn != 0 {
                    self.start_teardown(TeardownKind::Shutdown);
                }
            }
            State::Failed | State::ShutDown => {
                if !en {
                    self.start_teardown(TeardownKind::Reset);
                }
            }
        }
    }

    /// Function reset: `tx` is told when the controller is disabled and drained.
    pub fn function_reset(&mut self, tx: SyncSender<()>) {
        self.waiters.push(tx);
        if self.state == State::Disabled {
            self.finish_reset();
        } else {
            self.reconcile();
        }
    }

    fn enable(&mut self) {
        let regs = *lock(&self.inner.regs);
        let cc = regs.cc;
        let css = (cc >> CC_CSS_SHIFT) & 7;
        let mps = (cc >> CC_MPS_SHIFT) & 0xf;
        let ams = (cc >> CC_AMS_SHIFT) & 7;
        if css != 0 || mps != 0 || ams != 0 {
            return self.fail("CC selects an unsupported command set, page size or arbitration");
        }
        let asqs = (regs.aqa & 0xfff) + 1;
        let acqs = ((regs.aqa >> 16) & 0xfff) + 1;
        if asqs < 2 || acqs < 2 {
            return self.fail("admin queue size below 2");
        }
        if regs.asq & 0xfff != 0 || regs.acq & 0xfff != 0 {
            return self.fail("admin queue not page aligned");
        }
        self.refresh_mem();
        self.page = page_size(mps);
        let sq = Sq::new(0, regs.asq, asqs, 0, &self.mem);
        let cq = Cq::new(regs.acq, acqs, true, 0, &self.mem);
        let (Some(sq), Some(cq)) = (sq, cq) else {
            return self.fail("admin queue not in DMA memory");
        };
        self.epoch += 1;
        self.sq = Some(sq);
        self.cq = Some(cq);
        self.inner.doorbells.store(0, 0);
        self.inner.doorbells.store(1, 0);
        self.inner.set_live(0, true, 0);
        self.inner.set_live(1, true, 0);
        self.feat = Features::defaults(self.inner.cfg.max_io_queues);
        self.inner.features.reset();
        self.last_keep_alive = Instant::now();
        self.state = State::Enabled;
        self.inner.set_csts(CSTS_RDY);
        tracing::debug!(asqs, acqs, "NVMe controller enabled");
    }

    fn release_admin_queues(&mut self) {
        if let Some(mut cq) = self.cq.take() {
            cq.release_intx(&self.inner.irq);
        }
        self.sq = None;
        self.inner.set_live(0, false, 0);
        self.inner.set_live(1, false, 0);
    }

    fn start_teardown(&mut self, kind: TeardownKind) {
        self.epoch += 1;
        let epoch = self.epoch;
        self.busy = None;
        match kind {
            TeardownKind::Reset => {
                self.release_admin_queues();
                self.aers.clear();
                self.events.clear();
            }
            TeardownKind::Shutdown => self.set_shst(SHST_OCCURRING),
        }
        self.state = State::Teardown;
        let n = self.inner.reactors.len();
        self.teardown = Some(Teardown { epoch, left: n, kind });
        for g in 0..n {
            self.inner.send_group(g, move |grp| grp.teardown(epoch, kind));
        }
    }

    /// A group finished its part of a teardown.
    pub fn on_teardown_done(&mut self, epoch: u64) {
        let Some(t) = self.teardown.as_mut() else { return };
        if t.epoch != epoch {
            return;
        }
        t.left -= 1;
        if t.left > 0 {
            return;
        }
        let kind = t.kind;
        self.teardown = None;
        match kind {
            TeardownKind::Reset => self.finish_reset(),
            TeardownKind::Shutdown => {
                self.set_shst(SHST_COMPLETE);
                self.state = State::ShutDown;
            }
        }
        self.reconcile();
    }

    fn finish_reset(&mut self) {
        self.release_admin_queues();
        self.busy = None;
        self.cqs.iter_mut().for_each(|c| *c = None);
        self.sqs.iter_mut().for_each(|s| *s = None);
        self.feat = Features::defaults(self.inner.cfg.max_io_queues);
        self.inner.features.reset();
        self.aers.clear();
        self.events.clear();
        self.error_masked = false;
        self.notice_masked = false;
        self.changed_ns.clear();
        self.changed_overflow = false;
        self.shadow = None;
        self.inner.clear_live();
        self.inner.doorbells.clear();
        self.inner.set_csts(0);
        self.state = State::Disabled;
        self.flush_waiters();
        tracing::debug!("NVMe controller reset complete");
    }

    /// One pass over the admin queue.
    fn poll(&mut self) -> bool {
        self.inner.admin_kick.disarm();
        self.refresh_mem();
        if self.state != State::Enabled {
            return false;
        }
        let mut work = false;
        let head = self.inner.doorbells.load(1);
        let Some(cq) = self.cq.as_mut() else { return false };
        match cq.set_head(head) {
            Ok(changed) => work |= changed,
            Err(()) => {
                self.fail("invalid admin completion queue head doorbell");
                return true;
            }
        }
        cq.flush_backlog();
        cq.update_intx(&self.inner.irq);
        if self.busy.is_none() {
            let tail = self.inner.doorbells.load(0);
            for _ in 0..ADMIN_BUDGET {
                let Some(sq) = self.sq.as_mut() else { break };
                if tail >= sq.size {
                    self.fail("invalid admin submission queue tail doorbell");
                    return true;
                }
                let Some(cmd) = sq.fetch(tail) else { break };
                work = true;
                self.execute(&cmd);
                if self.busy.is_some() || self.state != State::Enabled {
                    break;
                }
            }
        }
        self.fire_irq();
        self.check_keep_alive();
        work
    }

    fn arm(&mut self) -> bool {
        if self.state != State::Enabled {
            return false;
        }
        if self.inner.cfg.mappable_doorbells {
            return true;
        }
        self.inner.admin_kick.arm();
        let (Some(sq), Some(cq)) = (self.sq.as_ref(), self.cq.as_ref()) else { return false };
        if self.busy.is_none() && self.inner.doorbells.load(0) != sq.head {
            return true;
        }
        let head_moved = self.inner.doorbells.load(1) != cq.head;
        cq.unsignaled > 0 || (head_moved && (!cq.backlog.is_empty() || cq.intx_source))
    }

    fn fire_irq(&mut self) {
        if let Some(cq) = self.cq.as_mut() {
            if cq.unsignaled > 0 {
                cq.raise(&self.inner.irq);
            }
        }
    }

    fn check_keep_alive(&mut self) {
        let kato = self.feat.kato;
        if self.state == State::Enabled
            && kato > 0
            && self.last_keep_alive.elapsed() > Duration::from_millis(u64::from(kato) + 100)
        {
            self.fail("keep alive timer expired");
        }
    }

    fn post(&mut self, cid: u16, status: Status, dw0: u32) {
        if !status.is_success() {
            lock(&self.inner.errlog).record(0, cid, status, 0, 0);
        }
        let (Some(sq), Some(cq)) = (self.sq.as_ref(), self.cq.as_mut()) else { return };
        let sqhd = u16::try_from(sq.head).unwrap_or(0);
        cq.post(Completion { dw0, sqhd, sqid: 0, cid, status: status.dw3_bits() });
    }

    fn execute(&mut self, cmd: &Command) {
        let cid = cmd.cid();
        let outcome = if cmd.fuse() != 0 || cmd.psdt() != 0 {
            // No fused admin commands; admin commands use PRPs.
            done(SC_INVALID_FIELD)
        } else {
            match cmd.opc() {
                ADM_IDENTIFY => self.identify(cmd),
                ADM_GET_LOG_PAGE => self.get_log_page(cmd),
                ADM_GET_FEATURES => self.get_features(cmd),
                ADM_SET_FEATURES => self.set_features(cmd),
                ADM_CREATE_CQ => self.create_cq(cmd),
                ADM_CREATE_SQ => self.create_sq(cmd),
                ADM_DELETE_SQ => self.delete_sq(cmd),
                ADM_DELETE_CQ => self.delete_cq(cmd),
                ADM_ASYNC_EVENT => self.async_event_request(cmd),
                ADM_ABORT => self.abort(cmd),
                ADM_KEEP_ALIVE => {
                    self.last_keep_alive = Instant::now();
                    done(Status::SUCCESS)
                }
                ADM_DOORBELL_BUFFER_CONFIG if self.inner.cfg.shadow_doorbells => self.doorbell_buffer_config(cmd),
                _ => done(SC_INVALID_OPCODE),
            }
        };
        match outcome {
            Done(s, dw0) => self.post(cid, s, dw0),
            Async | Parked => {}
        }
    }

    /// Copies `data` (zero-padded to `len`) to the command's PRPs.
    fn data_out(&self, cmd: &Command, data: &[u8], len: u64) -> Result<(), Status> {
        if len > MAX_TRANSFER {
            return Err(SC_INVALID_FIELD);
        }
        let mut iovs = IoVecs::new();
        map_data(&self.mem, cmd, len, self.page, false, &mut iovs)?;
        // `len` <= MAX_TRANSFER, so it fits a usize.
        let want = usize::try_from(len).map_err(|_| SC_INVALID_FIELD)?;
        let n = iovs.copy_from(&data[..data.len().min(want)]);
        if n < want {
            iovs.copy_from_at(n as u64, &vec![0u8; want - n]);
        }
        Ok(())
    }

    fn identify(&mut self, cmd: &Command) -> Outcome {
        let cns = lo8(cmd.cdw10());
        let nsid = cmd.nsid();
        let data = {
            let nss = lock(&self.inner.namespaces);
            match cns {
                CNS_CONTROLLER => identify::controller(&self.inner.cfg),
                CNS_NAMESPACE => {
                    if nsid == 0 || nsid > self.inner.cfg.nn {
                        return done(SC_INVALID_NAMESPACE);
                    }
                    match nss.get(&nsid) {
                        Some(ns) => identify::namespace(ns),
                        None => vec![0u8; 4096],
                    }
                }
                CNS_ACTIVE_NS_LIST => {
                    if nsid >= 0xffff_fffe {
                        return done(SC_INVALID_NAMESPACE);
                    }
                    identify::active_list(&nss, nsid)
                }
                CNS_NS_ID_DESCRIPTORS => match nss.get(&nsid) {
                    Some(ns) => identify::descriptors(ns),
                    None => return done(SC_INVALID_NAMESPACE),
                },
                _ => return done(SC_INVALID_FIELD),
            }
        };
        done(self.data_out(cmd, &data, 4096).err().unwrap_or(Status::SUCCESS))
    }

    fn get_log_page(&mut self, cmd: &Command) -> Outcome {
        let lid = lo8(cmd.cdw10());
        let rae = cmd.cdw10() & (1 << 15) != 0;
        let numd = (u64::from(cmd.cdw11() & 0xffff) << 16) | u64::from(hi16(cmd.cdw10()));
        let len = (numd + 1) * 4;
        let offset = u64::from(cmd.cdw12()) | (u64::from(cmd.cdw13()) << 32);
        if offset & 3 != 0 || len > MAX_TRANSFER {
            return done(SC_INVALID_FIELD);
        }
        let nsid = cmd.nsid();
        let data = match lid {
            LOG_ERROR => lock(&self.inner.errlog).page(),
            LOG_SMART => {
                if nsid != 0 && nsid != NSID_ALL {
                    // SMART information is kept for the controller only (LPA bit 0 clear).
                    return done(SC_INVALID_FIELD);
                }
                identify::smart(&self.inner.health())
            }
            LOG_FIRMWARE_SLOT => identify::firmware_slot(&self.inner.cfg),
            LOG_CHANGED_NS => identify::changed_ns(&self.changed_ns, self.changed_overflow),
            LOG_COMMAND_EFFECTS => identify::command_effects(self.inner.cfg.shadow_doorbells),
            _ => return done(SC_INVALID_LOG_PAGE),
        };
        let Ok(off) = usize::try_from(offset) else { return done(SC_INVALID_FIELD) };
        if off >= data.len() {
            return done(SC_INVALID_FIELD);
        }
        if let Err(s) = self.data_out(cmd, &data[off..], len) {
            return done(s);
        }
        if !rae {
            match lid {
                LOG_ERROR => self.error_masked = false,
                LOG_CHANGED_NS => {
                    self.changed_ns.clear();
                    self.changed_overflow = false;
                    self.notice_masked = false;
                }
                _ => {}
            }
        }
        done(Status::SUCCESS)
    }

    fn feature_known(fid: u8) -> bool {
        matches!(
            fid,
            FEAT_ARBITRATION
                | FEAT_POWER_MGMT
                | FEAT_TEMP_THRESHOLD
                | FEAT_ERROR_RECOVERY
                | FEAT_VOLATILE_WC
                | FEAT_NUM_QUEUES
                | FEAT_INT_COALESCING
                | FEAT_INT_VECTOR_CONFIG
                | FEAT_WRITE_ATOMICITY
                | FEAT_ASYNC_EVENT_CONFIG
                | FEAT_KEEP_ALIVE_TIMER
        )
    }

    /// Temperature Threshold selection: only the composite sensor (TMPSEL 0, or Fh for all).
    fn temp_index(cdw11: u32) -> Option<usize> {
        let tmpsel = (cdw11 >> 16) & 0xf;
        let thsel = (cdw11 >> 20) & 3;
        ((tmpsel == 0 || tmpsel == 0xf) && thsel <= 1).then_some(thsel as usize)
    }

    fn get_features(&mut self, cmd: &Command) -> Outcome {
        let fid = lo8(cmd.cdw10());
        let sel = (cmd.cdw10() >> 8) & 7;
        let cdw11 = cmd.cdw11();
        if !Self::feature_known(fid) || sel > 3 {
            return done(SC_INVALID_FIELD);
        }
        let nvec = self.inner.irq.nvec();
        if sel == 3 {
            // Supported capabilities: every feature is changeable, none saveable or per namespace.
            return Done(Status::SUCCESS, 1 << 2);
        }
        let defaults = Features::defaults(self.inner.cfg.max_io_queues);
        let f = if sel == 0 { self.feat } else { defaults };
        let dw0 = match fid {
            FEAT_ARBITRATION => f.arbitration,
            FEAT_POWER_MGMT => f.power,
            FEAT_TEMP_THRESHOLD => match Self::temp_index(cdw11) {
                Some(i) => u32::from(f.temp[i]),
                None => return done(SC_INVALID_FIELD),
            },
            FEAT_ERROR_RECOVERY => f.error_recovery,
            FEAT_VOLATILE_WC => u32::from(f.wce),
            FEAT_NUM_QUEUES => u32::from(f.queues.0) | (u32::from(f.queues.1) << 16),
            FEAT_INT_COALESCING => f.coalescing,
            FEAT_INT_VECTOR_CONFIG => {
                let iv = lo16(cdw11);
                if iv >= nvec {
                    return done(SC_INVALID_FIELD);
                }
                let cd = sel == 0 && self.inner.features.vector_cd[usize::from(iv)].load(Ordering::Relaxed);
                u32::from(iv) | (u32::from(cd) << 16)
            }
            FEAT_WRITE_ATOMICITY => f.write_atomicity,
            FEAT_ASYNC_EVENT_CONFIG => f.aec,
            FEAT_KEEP_ALIVE_TIMER => f.kato,
            _ => return done(SC_INVALID_FIELD),
        };
        Done(Status::SUCCESS, dw0)
    }

    fn any_io_queue(&self) -> bool {
        self.cqs.iter().skip(1).any(Option::is_some) || self.sqs.iter().skip(1).any(Option::is_some)
    }

    fn set_features(&mut self, cmd: &Command) -> Outcome {
        let fid = lo8(cmd.cdw10());
        let cdw11 = cmd.cdw11();
        if !Self::feature_known(fid) {
            return done(SC_INVALID_FIELD);
        }
        if cmd.cdw10() & (1 << 31) != 0 {
            return done(SC_FEATURE_NOT_SAVEABLE);
        }
        let nsid = cmd.nsid();
        if nsid != 0 && nsid != NSID_ALL {
            return done(SC_FEATURE_NOT_NS_SPECIFIC);
        }
        let shared = &self.inner.features;
        let mut dw0 = 0;
        match fid {
            FEAT_ARBITRATION => self.feat.arbitration = cdw11 & 0xffff_ff07,
            FEAT_POWER_MGMT => {
                if cdw11 & 0x1f != 0 {
                    return done(SC_INVALID_FIELD); // only power state 0 exists
                }
                self.feat.power = cdw11 & 0xff;
            }
            FEAT_TEMP_THRESHOLD => match Self::temp_index(cdw11) {
                Some(i) => self.feat.temp[i] = lo16(cdw11),
                None => return done(SC_INVALID_FIELD),
            },
            FEAT_ERROR_RECOVERY => {
                if cdw11 & (1 << 16) != 0 {
                    return done(SC_INVALID_FIELD); // DULBE needs NSFEAT bit 2
                }
                self.feat.error_recovery = cdw11 & 0xffff;
            }
            FEAT_VOLATILE_WC => {
                self.feat.wce = cdw11 & 1 != 0;
                shared.wce.store(self.feat.wce, Ordering::Relaxed);
            }
            FEAT_NUM_QUEUES => {
                let (nsqr, ncqr) = (lo16(cdw11), hi16(cdw11));
                if nsqr == 0xffff || ncqr == 0xffff {
                    return done(SC_INVALID_FIELD);
                }
                if self.any_io_queue() {
                    return done(SC_COMMAND_SEQUENCE_ERROR);
                }
                let max = self.inner.cfg.max_io_queues - 1;
                self.feat.queues = (nsqr.min(max), ncqr.min(max));
                dw0 = u32::from(self.feat.queues.0) | (u32::from(self.feat.queues.1) << 16);
            }
            FEAT_INT_COALESCING => {
                self.feat.coalescing = cdw11 & 0xffff;
                shared.coalescing.store(self.feat.coalescing, Ordering::Relaxed);
            }
            FEAT_INT_VECTOR_CONFIG => {
                let iv = lo16(cdw11);
                if iv >= self.inner.irq.nvec() {
                    return done(SC_INVALID_FIELD);
                }
                shared.vector_cd[usize::from(iv)].store(cdw11 & (1 << 16) != 0, Ordering::Relaxed);
            }
            FEAT_WRITE_ATOMICITY => self.feat.write_atomicity = cdw11 & 1,
            FEAT_ASYNC_EVENT_CONFIG => self.feat.aec = cdw11 & 0x1ff,
            FEAT_KEEP_ALIVE_TIMER => {
                // Rounded up to the 100 ms granularity (KAS).
                self.feat.kato = cdw11.div_ceil(100).saturating_mul(100);
                self.last_keep_alive = Instant::now();
                dw0 = 0;
            }
            _ => return done(SC_INVALID_FIELD),
        }
        Done(Status::SUCCESS, dw0)
    }

    fn queue_base_ok(&self, gpa: u64, bytes: u64) -> Result<(), Status> {
        if gpa & (self.page - 1) != 0 {
            return Err(SC_PRP_OFFSET_INVALID);
        }
        if self.mem.translate(gpa, bytes).is_none() {
            return Err(SC_INVALID_FIELD);
        }
        Ok(())
    }

    fn cc(&self) -> u32 {
        lock(&self.inner.regs).cc
    }

    fn create_cq(&mut self, cmd: &Command) -> Outcome {
        let qid = lo16(cmd.cdw10());
        let size = u32::from(hi16(cmd.cdw10())) + 1;
        let cdw11 = cmd.cdw11();
        let (pc, ien, iv) = (cdw11 & 1 != 0, cdw11 & 2 != 0, hi16(cdw11));
        if qid == 0 || qid > self.feat.queues.1 + 1 || self.cqs[usize::from(qid)].is_some() {
            return done(SC_INVALID_QID);
        }
        if size < 2 || size > self.inner.cfg.max_qsize {
            return done(SC_INVALID_QSIZE);
        }
        if !pc {
            return done(SC_INVALID_FIELD);
        }
        if iv >= self.inner.irq.nvec() {
            return done(SC_INVALID_INT_VECTOR);
        }
        if (self.cc() >> CC_IOCQES_SHIFT) & 0xf != 4 {
            return done(SC_INVALID_FIELD);
        }
        let gpa = cmd.prp1();
        if let Err(s) = self.queue_base_ok(gpa, u64::from(size) * CQE_SIZE) {
            return done(s);
        }
        let group = (usize::from(qid) - 1) % self.inner.reactors.len();
        let (epoch, page) = (self.epoch, self.page);
        self.busy =
            Some(Busy { cid: cmd.cid(), left: 1, status: Status::SUCCESS, what: Pending::CreateCq { qid, group } });
        self.inner.send_group(group, move |g| g.create_cq(epoch, qid, gpa, size, ien, iv, page));
        Async
    }

    fn create_sq(&mut self, cmd: &Command) -> Outcome {
        let qid = lo16(cmd.cdw10());
        let size = u32::from(hi16(cmd.cdw10())) + 1;
        let cdw11 = cmd.cdw11();
        let (pc, cqid) = (cdw11 & 1 != 0, hi16(cdw11));
        if qid == 0 || qid > self.feat.queues.0 + 1 || self.sqs[usize::from(qid)].is_some() {
            return done(SC_INVALID_QID);
        }
        if size < 2 || size > self.inner.cfg.max_qsize {
            return done(SC_INVALID_QSIZE);
        }
        let Some(cq) = self.cqs.get(usize::from(cqid)).copied().flatten().filter(|_| cqid != 0) else {
            return done(SC_CQ_INVALID);
        };
        if !pc {
            return done(SC_INVALID_FIELD);
        }
        if (self.cc() >> CC_IOSQES_SHIFT) & 0xf != 6 {
            return done(SC_INVALID_FIELD);
        }
        let gpa = cmd.prp1();
        if let Err(s) = self.queue_base_ok(gpa, u64::from(size) * SQE_SIZE) {
            return done(s);
        }
        let instance = self.next_instance;
        self.next_instance += 1;
        let (epoch, page) = (self.epoch, self.page);
        self.busy =
            Some(Busy { cid: cmd.cid(), left: 1, status: Status::SUCCESS, what: Pending::CreateSq { qid, cqid } });
        self.inner.send_group(cq.group, move |g| g.create_sq(epoch, qid, cqid, gpa, size, instance, page));
        Async
    }

    fn delete_sq(&mut self, cmd: &Command) -> Outcome {
        let qid = lo16(cmd.cdw10());
        let Some(cqid) = self.sqs.get(usize::from(qid)).copied().flatten().filter(|_| qid != 0) else {
            return done(SC_INVALID_QID);
        };
        let Some(cq) = self.cqs[usize::from(cqid)] else { return done(SC_INTERNAL_ERROR) };
        let epoch = self.epoch;
        self.busy = Some(Busy { cid: cmd.cid(), left: 1, status: Status::SUCCESS, what: Pending::DeleteSq { qid } });
        self.inner.send_group(cq.group, move |g| g.delete_sq(epoch, qid));
        Async
    }

    fn delete_cq(&mut self, cmd: &Command) -> Outcome {
        let qid = lo16(cmd.cdw10());
        let Some(cq) = self.cqs.get(usize::from(qid)).copied().flatten().filter(|_| qid != 0) else {
            return done(SC_INVALID_QID);
        };
        if cq.sqs > 0 {
            return done(SC_INVALID_QUEUE_DELETION);
        }
        let epoch = self.epoch;
        self.busy = Some(Busy { cid: cmd.cid(), left: 1, status: Status::SUCCESS, what: Pending::DeleteCq { qid } });
        self.inner.send_group(cq.group, move |g| g.delete_cq(epoch, qid));
        Async
    }

    fn doorbell_buffer_config(&mut self, cmd: &Command) -> Outcome {
        let (db, ei) = (cmd.prp1(), cmd.prp2());
        let mask = self.page - 1;
        if db == 0 || ei == 0 || db == ei || db & mask != 0 || ei & mask != 0 {
            return done(SC_INVALID_FIELD);
        }
        if self.mem.translate(db, self.page).is_none() || self.mem.translate(ei, self.page).is_none() {
            return done(SC_INVALID_FIELD);
        }
        let n = self.inner.reactors.len();
        let (epoch, page) = (self.epoch, self.page);
        self.busy =
            Some(Busy { cid: cmd.cid(), left: n, status: Status::SUCCESS, what: Pending::DoorbellBuffer { db, ei } });
        for g in 0..n {
            self.inner.send_group(g, move |grp| grp.set_shadow(epoch, db, ei, page));
        }
        Async
    }

    /// A group answered an admin command's request.
    pub fn on_reply(&mut self, epoch: u64, result: Result<(), Status>) {
        if epoch != self.epoch || self.state != State::Enabled {
            return;
        }
        let Some(b) = self.busy.as_mut() else { return };
        b.left = b.left.saturating_sub(1);
        if let Err(s) = result {
            if b.status.is_success() {
                b.status = s;
            }
        }
        if b.left > 0 {
            return;
        }
        let Some(b) = self.busy.take() else { return };
        if b.status.is_success() {
            match b.what {
                Pending::CreateCq { qid, group } => self.cqs[usize::from(qid)] = Some(CqReg { group, sqs: 0 }),
                Pending::CreateSq { qid, cqid } => {
                    self.sqs[usize::from(qid)] = Some(cqid);
                    if let Some(c) = self.cqs[usize::from(cqid)].as_mut() {
                        c.sqs += 1;
                    }
                }
                Pending::DeleteSq { qid } => {
                    if let Some(cqid) = self.sqs[usize::from(qid)].take() {
                        if let Some(c) = self.cqs[usize::from(cqid)].as_mut() {
                            c.sqs = c.sqs.saturating_sub(1);
                        }
                    }
                }
                Pending::DeleteCq { qid } => self.cqs[usize::from(qid)] = None,
                Pending::DoorbellBuffer { db, ei } => self.shadow = Some((db, ei)),
            }
        }
        self.post(b.cid, b.status, 0);
    }

    fn async_event_request(&mut self, cmd: &Command) -> Outcome {
        if self.aers.len() > usize::from(AERL) {
            return done(SC_AER_LIMIT_EXCEEDED);
        }
        self.aers.push_back(cmd.cid());
        self.deliver_events();
        Parked
    }

    fn abort(&mut self, cmd: &Command) -> Outcome {
        let sqid = lo16(cmd.cdw10());
        let cid = hi16(cmd.cdw10());
        if sqid == 0 {
            if let Some(i) = self.aers.iter().position(|&c| c == cid) {
                self.aers.remove(i);
                self.post(cid, SC_ABORT_REQUESTED, 0);
                return Done(Status::SUCCESS, 0);
            }
        }
        // Commands are fetched as soon as they are seen and cannot be recalled from the bdev
        // layer: report "not aborted" (Dword 0 bit 0).
        Done(Status::SUCCESS, 1)
    }

    fn deliver_events(&mut self) {
        while !self.events.is_empty() && !self.aers.is_empty() {
            let (Some(ev), Some(cid)) = (self.events.pop_front(), self.aers.pop_front()) else { break };
            self.post(cid, Status::SUCCESS, ev);
        }
    }

    fn event(kind: u8, info: u8, log: u8) -> u32 {
        u32::from(kind) | (u32::from(info) << 8) | (u32::from(log) << 16)
    }

    /// An asynchronous error (invalid doorbell write or register) on queue `qid`.
    pub fn error_event(&mut self, info: u8, qid: u16) {
        lock(&self.inner.errlog).record(qid, 0xffff, Status::SUCCESS, 0, 0);
        if self.state != State::Enabled || self.error_masked {
            return;
        }
        self.error_masked = true;
        self.events.push_back(Self::event(AER_TYPE_ERROR, info, LOG_ERROR));
        self.deliver_events();
    }

    /// Namespace `nsid` was added, removed or resized.
    pub fn ns_changed(&mut self, nsid: u32) {
        if self.changed_ns.len() >= 1024 {
            self.changed_overflow = true;
        } else {
            self.changed_ns.insert(nsid);
        }
        if self.state != State::Enabled || self.feat.aec & (1 << 8) == 0 || self.notice_masked {
            return;
        }
        self.notice_masked = true;
        self.events.push_back(Self::event(AER_TYPE_NOTICE, AER_NOTICE_NS_CHANGED, LOG_CHANGED_NS));
        self.deliver_events();
    }
}

/// The admin queue poller.
pub(crate) struct AdminPoller {
    pub core: Rc<RefCell<AdminCore>>,
    epoll: EpollHandle,
    fd: std::os::fd::RawFd,
    /// Passes left to skip: an idle admin queue is looked at every [`ADMIN_IDLE_STRIDE`]th pass
    /// so it does not tax the I/O queues sharing the reactor (admin commands are rare; a burst
    /// is served pass after pass).
    skip: u32,
}

/// See [`AdminPoller::skip`].
const ADMIN_IDLE_STRIDE: u32 = 32;

impl AdminPoller {
    /// Registers the admin poller and its keep-alive timer on reactor `r` (the first reactor).
    pub fn register(inner: Arc<Inner>, r: &mut Reactor) -> std::io::Result<(PollerId, PollerId)> {
        let epoll = r.epoll();
        let fd = inner.admin_kick.raw_fd();
        epoll.add(fd)?;
        let core = Rc::new(RefCell::new(AdminCore::new(inner)));
        let a = r.add_poller(Box::new(AdminPoller { core: core.clone(), epoll, fd, skip: 0 }));
        let t = r.add_timer(Box::new(AdminTimer { core }), Duration::from_millis(100));
        Ok((a, t))
    }
}

impl Drop for AdminPoller {
    fn drop(&mut self) {
        self.epoll.remove(self.fd);
    }
}

impl Poller for AdminPoller {
    fn poll(&mut self) -> PollStatus {
        if self.skip > 0 {
            self.skip -= 1;
            return PollStatus::Idle;
        }
        match self.core.try_borrow_mut() {
            Ok(mut c) => {
                let work = c.poll();
                if !work {
                    self.skip = ADMIN_IDLE_STRIDE - 1;
                }
                PollStatus::from_work(work)
            }
            Err(_) => PollStatus::Idle,
        }
    }

    fn arm(&mut self) -> bool {
        // Before sleeping, look now: nothing may wait behind a skipped pass.
        self.skip = 0;
        self.core.try_borrow_mut().map(|mut c| c.arm()).unwrap_or(true)
    }

    fn disarm(&mut self) {
        if let Ok(c) = self.core.try_borrow() {
            c.inner.admin_kick.disarm();
        }
    }

    fn name(&self) -> &str {
        "nvme_admin"
    }
}

/// Checks the keep alive timer while the reactor sleeps.
pub(crate) struct AdminTimer {
    core: Rc<RefCell<AdminCore>>,
}

impl Poller for AdminTimer {
    fn poll(&mut self) -> PollStatus {
        if let Ok(mut c) = self.core.try_borrow_mut() {
            c.check_keep_alive();
        }
        PollStatus::Idle
    }

    fn name(&self) -> &str {
        "nvme_keep_alive"
    }
}
