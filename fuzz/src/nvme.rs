//! `nvme_cmd`: NVMe admin and I/O submission entries (PRPs, SGLs, lists in guest memory the input
//! wrote) into `vstor_nvme::NvmeController`, driven through its transport API (BAR accesses, DMA
//! memory) by a minimal host driver, like the crate's fake-driver tests.
//!
//! The controller runs on one reactor thread in interrupt mode: trapped doorbell writes wake it, and
//! its MSI-X interrupts wake the driver, so neither spins against the other (or against a second
//! fuzzer) for a CPU. Before each input the driver resets the controller (function reset), enables
//! it with a 16-entry admin queue and creates I/O queue pair 1 (16 entries), so inputs do not
//! depend on each other.
//!
//! Guest memory: region 0 at gpa 0 (1 MiB), region 1 at gpa 4 GiB (64 KiB, to catch 32-bit
//! truncation). Queues live below [`DATA`]; the input's memory image is copied to [`DATA`].
//!
//! Input layout:
//!
//! ```text
//! u16 image_len, image_len bytes   copied to DATA (PRP lists, SGL segments, write data)
//! then operations until the input ends (at most MAX_OPS):
//!   u8 op   bits 0-1: 0 admin command, 1 I/O command (on queue 1), 2 doorbell write,
//!                     3 register write
//!           bit 2: queue the command without ringing the doorbell (rung with the next one)
//!   admin / I/O: 64-byte submission queue entry, as the host writes it (CID included)
//!   doorbell:    u8 index, u32 value (a trapped BAR0 write to doorbell `index % 16`)
//!   register:    u8 which (0 INTMS, 1 INTMC, 2 CC, 3 MSI-X table), u32 value
//! ```

use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vstor_mem::{memfd, GuestMemory, Region};
use vstor_nvme::{IrqSink, NsIds, NvmeConfig, NvmeController};
use vstor_reactor::{CpuMask, Mode, ReactorConfig, Reactors};

use crate::bdevs;
use crate::{Reader, Writer};

// The NVMe definitions the harness shares with the controller.
pub use vstor_nvme::spec::{
    ADM_ABORT, ADM_ASYNC_EVENT, ADM_CREATE_CQ, ADM_CREATE_SQ, ADM_DELETE_CQ, ADM_DELETE_SQ, ADM_DOORBELL_BUFFER_CONFIG,
    ADM_GET_FEATURES, ADM_GET_LOG_PAGE, ADM_IDENTIFY, ADM_KEEP_ALIVE, ADM_SET_FEATURES, CC_EN, CSTS_CFS, CSTS_RDY,
    DOORBELL_BASE, IO_COMPARE, IO_DSM, IO_FLUSH, IO_READ, IO_WRITE, IO_WRITE_ZEROES, REG_ACQ, REG_AQA, REG_ASQ, REG_CC,
    REG_CSTS, REG_INTMC, REG_INTMS,
};

pub const OP_ADMIN: u8 = 0;
pub const OP_IO: u8 = 1;
pub const OP_DOORBELL: u8 = 2;
pub const OP_REGISTER: u8 = 3;
pub const OP_NO_RING: u8 = 4;

/// Entries per queue (admin and I/O).
pub const QSIZE: u32 = 16;
pub const ADMIN_SQ: u64 = 0x0000;
pub const ADMIN_CQ: u64 = 0x1000;
pub const IO_SQ: u64 = 0x2000;
pub const IO_CQ: u64 = 0x3000;
/// Where the input's memory image goes.
pub const DATA: u64 = 0x10000;
pub const MEM_SIZE: u64 = 1 << 20;
pub const HIGH: u64 = 1 << 32;
pub const HIGH_SIZE: u64 = 64 << 10;
pub const MAX_OPS: usize = 48;
/// How long a command may take before the driver gives up on its queue.
const CMD_TIMEOUT: Duration = Duration::from_millis(5);
/// How long control-path steps (enable, queue creation) may take: longer is a bug.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Interrupts wake the driver's completion wait (so it need not spin against the reactor for a
/// CPU); it also polls, since the input may mask vectors or coalesce interrupts.
#[derive(Default)]
struct Irq {
    count: Mutex<u64>,
    cv: Condvar,
}

impl IrqSink for Irq {
    fn msix(&self, _vector: u16) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
    }
    fn intx(&self, _asserted: bool) {
        self.msix(0);
    }
}

impl Irq {
    fn seen(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until an interrupt after `seen` arrives, or `d` passes.
    fn wait(&self, seen: u64, d: Duration) {
        let g = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.cv.wait_timeout_while(g, d, |c| *c == seen);
    }
}

struct Env {
    ctrl: Arc<NvmeController>,
    irq: Arc<Irq>,
    file: std::fs::File,
    mem: Arc<GuestMemory>,
    /// Dropped after the controller (field order).
    _reactors: Reactors,
}

static ENV: OnceLock<Mutex<Env>> = OnceLock::new();

/// One reactor in interrupt mode (so the harness and the controller do not spin against each other
/// or against a second fuzzer for a CPU) and a controller configuration on it: 4 I/O queue pairs
/// of 64 entries, shadow doorbells, up to 4 namespaces. Shared with the vfio-user harness.
pub(crate) fn reactor_and_config(mappable_doorbells: bool) -> (Reactors, NvmeConfig) {
    let reactors = Reactors::start(
        &CpuMask::from_cores(0..1),
        ReactorConfig {
            mode: Mode::Interrupt,
            idle_threshold: Duration::from_millis(1),
            pin: false,
            ..Default::default()
        },
    )
    .expect("reactors");
    let cfg = NvmeConfig {
        max_io_queues: 4,
        max_queue_depth: 64,
        shadow_doorbells: true,
        mappable_doorbells,
        reactors: reactors.handles().to_vec(),
        max_namespaces: 4,
        ..Default::default()
    };
    (reactors, cfg)
}

impl Env {
    fn new() -> Self {
        let (reactors, cfg) = reactor_and_config(false);
        let irq = Arc::new(Irq::default());
        let ctrl = NvmeController::new(cfg, irq.clone()).expect("controller");
        let ns1 = bdevs::create(bdevs::Kind::Malloc, "nvme_fuzz1", 512, 1 << 20, false);
        let ns2 = bdevs::create(bdevs::Kind::Cached, "nvme_fuzz2", 4096, 1 << 20, false);
        ctrl.add_namespace(Some(1), ns1, NsIds::default()).expect("namespace 1");
        ctrl.add_namespace(Some(2), ns2, NsIds::default()).expect("namespace 2");
        let file = memfd("fuzz-nvme-guest", MEM_SIZE + HIGH_SIZE).expect("memfd");
        let regions = vec![
            Region::map(&file, 0, MEM_SIZE, 0, 0).expect("region 0"),
            Region::map(&file, HIGH, HIGH_SIZE, HIGH, MEM_SIZE).expect("region 1"),
        ];
        let mem = Arc::new(GuestMemory::new(regions).expect("guest memory"));
        ctrl.set_dma_memory(mem.clone());
        Self { ctrl, irq, file, mem, _reactors: reactors }
    }

    fn reg32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn set_reg32(&self, off: u64, v: u32) {
        self.ctrl.bar_write(0, off, &v.to_le_bytes());
    }

    fn set_reg64(&self, off: u64, v: u64) {
        self.ctrl.bar_write(0, off, &v.to_le_bytes());
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mem.read(gpa, &mut b).expect("guest read");
        u32::from_le_bytes(b)
    }

    /// Reset, PCI setup, zeroed memory, enable, I/O queue pair 1.
    fn prepare(&self) -> Driver {
        self.ctrl.reset();
        // Memory space + bus master; MSI-X on with every vector unmasked.
        self.ctrl.pci_config_write(0x04, &0x0006u16.to_le_bytes());
        self.ctrl.pci_config_write(0x52, &0x8000u16.to_le_bytes());
        for v in 0..self.ctrl.msix_vectors() {
            self.ctrl.bar_write(4, u64::from(v) * 16 + 12, &0u32.to_le_bytes());
        }
        static ZERO: [u8; MEM_SIZE as usize] = [0; MEM_SIZE as usize];
        self.file.write_all_at(&ZERO, 0).expect("zero guest memory");
        self.file.write_all_at(&ZERO[..HIGH_SIZE as usize], MEM_SIZE).expect("zero guest memory");
        self.set_reg32(REG_AQA, ((QSIZE - 1) << 16) | (QSIZE - 1));
        self.set_reg64(REG_ASQ, ADMIN_SQ);
        self.set_reg64(REG_ACQ, ADMIN_CQ);
        self.set_reg32(REG_CC, CC_EN | (6 << 16) | (4 << 20));
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut spins = 0u32;
        while self.reg32(REG_CSTS) & (CSTS_RDY | CSTS_CFS) != CSTS_RDY {
            assert!(Instant::now() < deadline, "controller not ready after reset: CSTS {:#x}", self.reg32(REG_CSTS));
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        let mut d = Driver { queues: [Queue::new(0, ADMIN_SQ, ADMIN_CQ), Queue::new(1, IO_SQ, IO_CQ)], shadow: None };
        let q = u32::from(1u16);
        let create_cq = sqe(ADM_CREATE_CQ, 0, IO_CQ, 0, [((QSIZE - 1) << 16) | q, (q << 16) | 3, 0, 0, 0, 0]);
        let create_sq = sqe(ADM_CREATE_SQ, 0, IO_SQ, 0, [((QSIZE - 1) << 16) | q, (q << 16) | 1, 0, 0, 0, 0]);
        for c in [create_cq, create_sq] {
            d.push(self, 0, &c);
            d.ring_sq(self, 0);
            let got = d.wait(self, 0, 1, SETUP_TIMEOUT);
            d.queues[0].awaited = 0;
            assert_eq!(got.len(), 1, "creating I/O queue 1 did not complete");
            assert_eq!(got[0] >> 17, 0, "creating I/O queue 1 failed: status {:#x}", got[0] >> 17);
        }
        d
    }
}

#[derive(Debug, Clone, Copy)]
struct Queue {
    qid: u16,
    sq: u64,
    cq: u64,
    tail: u32,
    head: u32,
    phase: bool,
    /// Entries pushed and not yet rung.
    unrung: u32,
    /// Entries rung whose completion is awaited.
    awaited: u32,
    /// A command timed out: the queue is gone (deleted, or killed by a bad doorbell).
    dead: bool,
}

impl Queue {
    fn new(qid: u16, sq: u64, cq: u64) -> Self {
        Self { qid, sq, cq, tail: 0, head: 0, phase: true, unrung: 0, awaited: 0, dead: false }
    }
}

struct Driver {
    queues: [Queue; 2],
    /// Shadow doorbell and EventIdx buffers, after a successful Doorbell Buffer Config.
    shadow: Option<(u64, u64)>,
}

/// A submission queue entry: opcode, NSID, PRP1/PRP2 (or SGL), CDW10..15.
pub fn sqe(opc: u8, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 6]) -> [u8; 64] {
    let mut e = [0u8; 64];
    e[0] = opc;
    e[4..8].copy_from_slice(&nsid.to_le_bytes());
    e[24..32].copy_from_slice(&prp1.to_le_bytes());
    e[32..40].copy_from_slice(&prp2.to_le_bytes());
    for (i, v) in cdw.iter().enumerate() {
        e[40 + 4 * i..44 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    e
}

impl Driver {
    fn push(&mut self, env: &Env, qi: usize, entry: &[u8; 64]) {
        let q = &mut self.queues[qi];
        env.mem.write(q.sq + u64::from(q.tail) * 64, entry).expect("SQ write");
        q.tail = (q.tail + 1) % QSIZE;
        q.unrung += 1;
    }

    fn doorbell(&self, env: &Env, index: u64, v: u32) {
        // The admin queue is never shadowed; I/O queues read the shadow buffer once configured.
        if let (true, Some((db, _))) = (index >= 2, self.shadow) {
            let _ = env.mem.write(db.wrapping_add(index * 4), &v.to_le_bytes());
            fence(Ordering::SeqCst);
        }
        env.ctrl.bar_write(0, DOORBELL_BASE + index * 4, &v.to_le_bytes());
    }

    fn ring_sq(&mut self, env: &Env, qi: usize) {
        let q = &mut self.queues[qi];
        if q.unrung == 0 {
            return;
        }
        q.awaited += q.unrung;
        q.unrung = 0;
        let (idx, tail) = (2 * u64::from(q.qid), q.tail);
        fence(Ordering::SeqCst);
        self.doorbell(env, idx, tail);
    }

    /// Collects up to `n` completions from queue `qi` (dword 3 of each), acknowledging them.
    fn wait(&mut self, env: &Env, qi: usize, n: u32, timeout: Duration) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while (out.len() as u32) < n {
            let irqs = env.irq.seen();
            let q = self.queues[qi];
            let at = q.cq + u64::from(q.head) * 16;
            let dw3 = env.read_u32(at + 12);
            if ((dw3 >> 16) & 1 != 0) == q.phase {
                fence(Ordering::Acquire);
                out.push(dw3);
                let q = &mut self.queues[qi];
                q.head = (q.head + 1) % QSIZE;
                if q.head == 0 {
                    q.phase = !q.phase;
                }
                let (idx, head) = (2 * u64::from(q.qid) + 1, q.head);
                self.doorbell(env, idx, head);
                continue;
            }
            let csts = env.reg32(REG_CSTS);
            if csts & CSTS_CFS != 0 || csts & CSTS_RDY == 0 || Instant::now() >= deadline {
                break;
            }
            env.irq.wait(irqs, Duration::from_micros(200));
        }
        out
    }

    /// Rings queue `qi` and waits for what it owes; returns dword 3 of the completions seen.
    fn settle(&mut self, env: &Env, qi: usize) -> Vec<u32> {
        self.ring_sq(env, qi);
        let awaited = self.queues[qi].awaited;
        if awaited == 0 || self.queues[qi].dead {
            return Vec::new();
        }
        let got = self.wait(env, qi, awaited, CMD_TIMEOUT);
        if crate::trace() {
            let st: Vec<String> = got.iter().map(|d| format!("cid {} status {:#x}", d & 0xffff, d >> 17)).collect();
            eprintln!("nvme queue {qi}: awaited {awaited}, got {st:?}");
        }
        let q = &mut self.queues[qi];
        q.awaited = q.awaited.saturating_sub(got.len() as u32);
        if q.awaited > 0 {
            q.dead = true;
        }
        got
    }
}

pub fn cmd(data: &[u8]) {
    let mut r = Reader::new(data);
    let env = ENV.get_or_init(|| Mutex::new(Env::new()));
    let env = env.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = env.prepare();
    let image_len = usize::from(r.u16());
    let image = r.take(image_len);
    env.mem.write(DATA, &image[..image.len().min((MEM_SIZE - DATA) as usize)]).expect("image");
    for _ in 0..MAX_OPS {
        if r.is_empty() {
            break;
        }
        let op = r.u8();
        match op & 3 {
            OP_ADMIN | OP_IO => {
                let qi = usize::from(op & 3);
                let entry: [u8; 64] = r.array();
                if d.queues[qi].dead {
                    continue;
                }
                d.push(&env, qi, &entry);
                if qi == 0 && entry[0] == ADM_ASYNC_EVENT {
                    // Completes only when an event occurs: ring, but do not wait for it.
                    d.ring_sq(&env, 0);
                    d.queues[0].awaited = d.queues[0].awaited.saturating_sub(1);
                    continue;
                }
                if op & OP_NO_RING != 0 {
                    continue;
                }
                let got = d.settle(&env, qi);
                if qi == 0 && entry[0] == ADM_DOORBELL_BUFFER_CONFIG {
                    let cid = u32::from(u16::from_le_bytes([entry[2], entry[3]]));
                    if got.iter().any(|dw3| dw3 & 0xffff == cid && dw3 >> 17 == 0) {
                        let prp1 = u64::from_le_bytes(entry[24..32].try_into().unwrap_or_default());
                        let prp2 = u64::from_le_bytes(entry[32..40].try_into().unwrap_or_default());
                        d.shadow = Some((prp1, prp2));
                    }
                }
            }
            OP_DOORBELL => {
                let index = u64::from(r.u8() % 16);
                let v = r.u32();
                d.doorbell(&env, index, v);
            }
            _ => {
                let which = r.u8();
                let v = r.u32();
                match which % 4 {
                    0 => env.set_reg32(REG_INTMS, v),
                    1 => env.set_reg32(REG_INTMC, v),
                    2 => env.set_reg32(REG_CC, v),
                    _ => env.ctrl.bar_write(4, u64::from(which >> 2) * 4, &v.to_le_bytes()),
                }
            }
        }
    }
    d.settle(&env, 0);
    d.settle(&env, 1);
}

/// The input prefix: the memory image.
pub fn input(image: &[u8]) -> Writer {
    let mut w = Writer::default();
    w.u16(u16::try_from(image.len()).expect("image under 64 KiB")).bytes(image);
    w
}

/// Appends an admin (`qi` 0) or I/O (`qi` 1) command, with a command ID unique in the input.
pub fn op_cmd(w: &mut Writer, qi: u8, entry: &[u8; 64]) {
    let mut e = *entry;
    let cid = u16::try_from(w.0.len() % 0xffff).unwrap_or(0);
    e[2..4].copy_from_slice(&cid.to_le_bytes());
    w.u8(qi).bytes(&e);
}
