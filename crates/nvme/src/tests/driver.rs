//! A fake NVMe host driver: guest memory in a memfd, registers and doorbells through the
//! controller's BAR accessors (or the mapped doorbell page), queues built in guest memory,
//! completions found by their phase tag, interrupts counted.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_bdev::{malloc, uring, Bdev, BdevParams};
use vstor_mem::{memfd, GuestMemory, Region};
use vstor_reactor::{CpuMask, Mode, ReactorConfig, Reactors};

use crate::queue::{cq_db, sq_db};
use crate::spec::*;
use crate::{IrqSink, NsIds, NvmeConfig, NvmeController};

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const MEM_BASE: u64 = 0x1_0000_0000;
pub const MEM_SIZE: u64 = 96 << 20;
pub const PAGE: u64 = 4096;

/// Counts MSI-X messages per vector and tracks the INTx level.
pub struct CountingIrq {
    vectors: Vec<AtomicU64>,
    pub intx: AtomicBool,
    pub intx_changes: AtomicU64,
}

impl Default for CountingIrq {
    fn default() -> Self {
        CountingIrq {
            vectors: (0..2048).map(|_| AtomicU64::new(0)).collect(),
            intx: AtomicBool::new(false),
            intx_changes: AtomicU64::new(0),
        }
    }
}

impl IrqSink for CountingIrq {
    fn msix(&self, vector: u16) {
        self.vectors[usize::from(vector)].fetch_add(1, Ordering::SeqCst);
    }
    fn intx(&self, asserted: bool) {
        self.intx.store(asserted, Ordering::SeqCst);
        self.intx_changes.fetch_add(1, Ordering::SeqCst);
    }
}

impl CountingIrq {
    pub fn count(&self, v: u16) -> u64 {
        self.vectors[usize::from(v)].load(Ordering::SeqCst)
    }

    pub fn total(&self) -> u64 {
        self.vectors.iter().map(|v| v.load(Ordering::SeqCst)).sum()
    }

    pub fn intx(&self) -> bool {
        self.intx.load(Ordering::SeqCst)
    }
}

/// Waits until `f` holds or the timeout passes.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// A decoded completion entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    #[track_caller]
    pub fn ok(self) -> Cqe {
        assert!(self.status.is_success(), "command failed: {self:?}");
        self
    }

    /// (SCT, SC) of the status.
    pub fn sc(self) -> (u8, u8) {
        (self.status.sct, self.status.sc)
    }
}

/// Expected (SCT, SC) of a status constant.
pub fn sc(s: Status) -> (u8, u8) {
    (s.sct, s.sc)
}

/// A command under construction.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cmd(pub Command);

impl Cmd {
    pub fn new(opc: u8) -> Cmd {
        let mut c = Command::default();
        c.dw[0] = u32::from(opc);
        Cmd(c)
    }
    pub fn ns(mut self, nsid: u32) -> Cmd {
        self.0.dw[1] = nsid;
        self
    }
    pub fn d(mut self, i: usize, v: u32) -> Cmd {
        self.0.dw[i] = v;
        self
    }
    pub fn prp(mut self, p1: u64, p2: u64) -> Cmd {
        self.0.dw[6] = p1 as u32;
        self.0.dw[7] = (p1 >> 32) as u32;
        self.0.dw[8] = p2 as u32;
        self.0.dw[9] = (p2 >> 32) as u32;
        self
    }
    pub fn sgl(mut self, d: [u8; 16]) -> Cmd {
        self.0.dw[0] = (self.0.dw[0] & !(3 << 14)) | (1 << 14);
        for i in 0..4 {
            self.0.dw[6 + i] = u32::from_le_bytes([d[i * 4], d[i * 4 + 1], d[i * 4 + 2], d[i * 4 + 3]]);
        }
        self
    }
    pub fn psdt(mut self, v: u32) -> Cmd {
        self.0.dw[0] = (self.0.dw[0] & !(3 << 14)) | (v << 14);
        self
    }
    pub fn fuse(mut self, v: u32) -> Cmd {
        self.0.dw[0] = (self.0.dw[0] & !(3 << 8)) | (v << 8);
        self
    }
    /// SLBA and NLB (1-based).
    pub fn lba(mut self, slba: u64, nlb: u32) -> Cmd {
        self.0.dw[10] = slba as u32;
        self.0.dw[11] = (slba >> 32) as u32;
        self.0.dw[12] = (self.0.dw[12] & !0xffff) | (nlb - 1);
        self
    }
}

/// An SGL descriptor.
pub fn desc(addr: u64, len: u32, kind: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[15] = kind << 4;
    d
}

/// Host view of one queue pair.
#[derive(Debug)]
pub struct Queue {
    pub qid: u16,
    pub size: u32,
    pub sq: u64,
    pub cq: u64,
    pub tail: u32,
    pub head: u32,
    pub phase: bool,
    pub shadow: bool,
    next_cid: u16,
    pending: Vec<Cqe>,
}

impl Queue {
    pub fn new(qid: u16, size: u32, sq: u64, cq: u64, shadow: bool) -> Queue {
        Queue { qid, size, sq, cq, tail: 0, head: 0, phase: true, shadow, next_cid: 1, pending: Vec::new() }
    }
}

/// A data buffer scattered over non-adjacent guest pages, starting `off` bytes into the first.
#[derive(Debug, Clone)]
pub struct Buf {
    pub pages: Vec<u64>,
    pub off: u64,
    pub len: u64,
}

/// The client's mapping of the doorbell page.
pub struct MappedDb {
    ptr: *mut u8,
    len: usize,
}

impl MappedDb {
    fn write(&self, index: usize, v: u32) {
        assert!(index * 4 + 4 <= self.len);
        // SAFETY: in bounds of a live shared mapping (checked above), 4-byte aligned; the
        // controller reads it atomically.
        unsafe { std::ptr::write_volatile(self.ptr.add(index * 4).cast::<u32>(), v) };
    }
}

impl Drop for MappedDb {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `Driver::map_doorbells`, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub reactors: usize,
    pub mode: Mode,
    pub max_io_queues: u16,
    pub depth: u16,
    pub shadow: bool,
    pub mappable: bool,
    pub msix: bool,
    pub nn: u32,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            reactors: 1,
            mode: Mode::Adaptive,
            max_io_queues: 8,
            depth: 256,
            shadow: true,
            mappable: false,
            msix: true,
            nn: 32,
        }
    }
}

pub struct Driver {
    pub ctrl: Arc<NvmeController>,
    pub irq: Arc<CountingIrq>,
    pub mem: Arc<GuestMemory>,
    pub file: std::fs::File,
    next: u64,
    pub admin: Queue,
    pub io: Vec<Queue>,
    /// Shadow doorbell and EventIdx buffers, once configured.
    pub shadow: Option<(u64, u64)>,
    /// Write the CQ head doorbell after each completion found.
    pub auto_ack: bool,
    pub mapped: Option<MappedDb>,
    pub opts: Opts,
    /// Dropped last, after the controller.
    _reactors: Reactors,
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn malloc_bdev(name: &str, block_size: u32, num_blocks: u64) -> Arc<Bdev> {
    malloc::create(BdevParams { name: name.into(), uuid: None, block_size, num_blocks, read_only: false }, false)
        .unwrap()
}

/// A uring bdev over a temporary file under /var/tmp.
pub fn uring_bdev(name: &str, bytes: u64, flavor: uring::Flavor, fallocate: bool) -> (Arc<Bdev>, tempfile::TempDir) {
    let dir = tempfile::tempdir_in(std::env::var("VSTOR_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
    let b = uring::create(uring::UringOptions {
        name: name.into(),
        filename: path.to_string_lossy().into_owned(),
        block_size: Some(4096),
        uuid: None,
        readonly: false,
        flavor,
        fallocate,
    })
    .unwrap();
    (b, dir)
}

impl Driver {
    /// Starts reactors and a controller with guest memory installed and PCI set up (bus master,
    /// MSI-X enabled with every vector unmasked unless `msix` is off). Not yet enabled.
    pub fn new(opts: Opts) -> Driver {
        let reactors = Reactors::start(
            &CpuMask::from_cores(0..opts.reactors),
            ReactorConfig { mode: opts.mode, idle_threshold: Duration::from_micros(200), pin: false, seccomp: false },
        )
        .unwrap();
        let irq = Arc::new(CountingIrq::default());
        let cfg = NvmeConfig {
            max_io_queues: opts.max_io_queues,
            max_queue_depth: opts.depth,
            shadow_doorbells: opts.shadow,
            mappable_doorbells: opts.mappable,
            reactors: reactors.handles().to_vec(),
            max_namespaces: opts.nn,
            ..Default::default()
        };
        let ctrl = NvmeController::new(cfg, irq.clone()).unwrap();
        let file = memfd("guest", MEM_SIZE).unwrap();
        let mem =
            Arc::new(GuestMemory::new(vec![Region::map(&file, MEM_BASE, MEM_SIZE, MEM_BASE, 0).unwrap()]).unwrap());
        ctrl.set_dma_memory(mem.clone());
        let mut d = Driver {
            ctrl,
            irq,
            mem,
            file,
            next: MEM_BASE,
            admin: Queue::new(0, 0, 0, 0, false),
            io: Vec::new(),
            shadow: None,
            auto_ack: true,
            mapped: None,
            opts: opts.clone(),
            _reactors: reactors,
        };
        d.pci_setup();
        if opts.mappable {
            d.map_doorbells();
        }
        d
    }

    /// A controller enabled with an admin queue of 32 entries.
    pub fn enabled(opts: Opts) -> Driver {
        let mut d = Driver::new(opts);
        d.enable(32);
        d
    }

    pub fn pci_setup(&mut self) {
        self.ctrl.pci_config_write(0x04, &0x0006u16.to_le_bytes());
        if self.opts.msix {
            self.ctrl.pci_config_write(0x52, &0x8000u16.to_le_bytes());
            for v in 0..self.ctrl.msix_vectors() {
                self.ctrl.bar_write(4, u64::from(v) * 16 + 12, &0u32.to_le_bytes());
            }
        }
    }

    fn map_doorbells(&mut self) {
        let bars = self.ctrl.bars();
        let area = &bars[0].mmap_areas[0];
        assert_eq!(area.offset, DOORBELL_BASE);
        let len = area.len as usize;
        use std::os::fd::AsRawFd;
        // SAFETY: a new shared mapping of the controller's doorbell memfd at a kernel-chosen
        // address; unmapped by `MappedDb::drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                area.fd.as_raw_fd(),
                area.fd_offset as libc::off_t,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        self.mapped = Some(MappedDb { ptr: p.cast(), len });
    }

    /// Allocates `bytes` of zeroed, page-aligned guest memory.
    pub fn alloc(&mut self, bytes: u64) -> u64 {
        let a = self.next;
        self.next += bytes.div_ceil(PAGE).max(1) * PAGE;
        assert!(self.next <= MEM_BASE + MEM_SIZE, "test guest memory exhausted");
        a
    }

    pub fn reg32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn reg64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.ctrl.bar_read(0, off, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn set_reg32(&self, off: u64, v: u32) {
        self.ctrl.bar_write(0, off, &v.to_le_bytes());
    }

    pub fn set_reg64(&self, off: u64, v: u64) {
        self.ctrl.bar_write(0, off, &v.to_le_bytes());
    }

    pub fn csts(&self) -> u32 {
        self.reg32(REG_CSTS)
    }

    pub fn wait_csts(&self, what: &str, mask: u32, value: u32) {
        wait_until(what, || self.csts() & mask == value);
    }

    /// Programs the admin queue (`size` entries each) and sets CC.EN; waits for CSTS.RDY.
    pub fn enable(&mut self, size: u32) {
        let sq = self.alloc(u64::from(size) * 64);
        let cq = self.alloc(u64::from(size) * 16);
        self.admin = Queue::new(0, size, sq, cq, false);
        self.io.clear();
        self.shadow = None;
        self.set_reg32(REG_AQA, ((size - 1) << 16) | (size - 1));
        self.set_reg64(REG_ASQ, sq);
        self.set_reg64(REG_ACQ, cq);
        self.set_reg32(REG_CC, CC_EN | (6 << CC_IOSQES_SHIFT) | (4 << CC_IOCQES_SHIFT));
        self.wait_csts("CSTS.RDY", CSTS_RDY | CSTS_CFS, CSTS_RDY);
    }

    /// Clears CC.EN and waits for CSTS.RDY = 0.
    pub fn disable(&mut self) {
        self.set_reg32(REG_CC, 0);
        self.wait_csts("CSTS.RDY = 0", CSTS_RDY, 0);
    }

    /// Doorbell Buffer Config with two fresh pages.
    pub fn configure_shadow(&mut self) {
        let db = self.alloc(PAGE);
        let ei = self.alloc(PAGE);
        self.admin(Cmd::new(ADM_DOORBELL_BUFFER_CONFIG).prp(db, ei)).ok();
        self.shadow = Some((db, ei));
        for q in self.io.iter_mut() {
            q.shadow = true;
        }
    }

    /// Creates `n` I/O queue pairs of `size` entries (CQ q uses vector q), after setting the
    /// number of queues and, if `shadow`, the doorbell buffers.
    pub fn setup_io(&mut self, n: u16, size: u32, shadow: bool) {
        let nq = u32::from(n - 1);
        self.admin(Cmd::new(ADM_SET_FEATURES).d(10, u32::from(FEAT_NUM_QUEUES)).d(11, nq | (nq << 16))).ok();
        if shadow {
            self.configure_shadow();
        }
        for qid in 1..=n {
            self.create_queue_pair(qid, size);
        }
    }

    pub fn create_queue_pair(&mut self, qid: u16, size: u32) {
        let cq = self.alloc(u64::from(size) * 16);
        let sq = self.alloc(u64::from(size) * 64);
        let q = u32::from(qid);
        self.admin(Cmd::new(ADM_CREATE_CQ).prp(cq, 0).d(10, ((size - 1) << 16) | q).d(11, (q << 16) | 3)).ok();
        self.admin(Cmd::new(ADM_CREATE_SQ).prp(sq, 0).d(10, ((size - 1) << 16) | q).d(11, (q << 16) | 1)).ok();
        let shadow = self.shadow.is_some();
        self.io.push(Queue::new(qid, size, sq, cq, shadow));
    }

    fn queue(&mut self, qi: usize) -> &mut Queue {
        if qi == 0 {
            &mut self.admin
        } else {
            &mut self.io[qi - 1]
        }
    }

    /// Writes doorbell `index` through MMIO (the mapped page if mapped, else a trapped write).
    pub fn mmio_doorbell(&self, index: usize, v: u32) {
        match &self.mapped {
            Some(m) => m.write(index, v),
            None => self.ctrl.bar_write(0, DOORBELL_BASE + index as u64 * 4, &v.to_le_bytes()),
        }
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mem.read(gpa, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn write_u32(&self, gpa: u64, v: u32) {
        self.mem.write(gpa, &v.to_le_bytes()).unwrap();
    }

    /// Updates a doorbell the way Linux does: shadow buffer first, then BAR0 only if EventIdx
    /// asks for it.
    fn ring(&self, index: usize, new: u32, shadow: bool) {
        match (shadow, self.shadow) {
            (true, Some((db, ei))) => {
                let at = db + index as u64 * 4;
                let old = self.read_u32(at);
                self.write_u32(at, new);
                fence(Ordering::SeqCst);
                let event = self.read_u32(ei + index as u64 * 4);
                let need = (new.wrapping_sub(event).wrapping_sub(1) as u16) < (new.wrapping_sub(old) as u16);
                if need {
                    self.mmio_doorbell(index, new);
                }
            }
            _ => self.mmio_doorbell(index, new),
        }
    }

    /// Writes `cmd` to queue `qi` (0 = admin, i = I/O queue i) without ringing the doorbell.
    pub fn push(&mut self, qi: usize, cmd: Cmd) -> u16 {
        let q = self.queue(qi);
        let cid = q.next_cid;
        q.next_cid = if q.next_cid >= 0xfff0 { 1 } else { q.next_cid + 1 };
        let mut c = cmd.0;
        c.dw[0] = (c.dw[0] & 0xffff) | (u32::from(cid) << 16);
        let at = q.sq + u64::from(q.tail) * 64;
        q.tail = (q.tail + 1) % q.size;
        self.mem.write(at, &c.to_bytes()).unwrap();
        cid
    }

    /// Rings queue `qi`'s submission doorbell with its current tail.
    pub fn ring_sq(&mut self, qi: usize) {
        let q = self.queue(qi);
        let (idx, tail, shadow) = (sq_db(q.qid), q.tail, q.shadow);
        fence(Ordering::SeqCst);
        self.ring(idx, tail, shadow);
    }

    /// Rings queue `qi`'s completion doorbell with its current head.
    pub fn ring_cq(&mut self, qi: usize) {
        let q = self.queue(qi);
        let (idx, head, shadow) = (cq_db(q.qid), q.head, q.shadow);
        self.ring(idx, head, shadow);
    }

    pub fn submit(&mut self, qi: usize, cmd: Cmd) -> u16 {
        let cid = self.push(qi, cmd);
        self.ring_sq(qi);
        cid
    }

    /// The next completion on queue `qi`, if its phase tag says it is new.
    pub fn poll_cqe(&mut self, qi: usize) -> Option<Cqe> {
        let (cq, head, phase, size) = {
            let q = self.queue(qi);
            (q.cq, q.head, q.phase, q.size)
        };
        let at = cq + u64::from(head) * 16;
        let dw3 = self.read_u32(at + 12);
        if ((dw3 >> 16) & 1 != 0) != phase {
            return None;
        }
        fence(Ordering::Acquire);
        let dw0 = self.read_u32(at);
        let dw2 = self.read_u32(at + 8);
        let q = self.queue(qi);
        q.head = (head + 1) % size;
        if q.head == 0 {
            q.phase = !q.phase;
        }
        if self.auto_ack {
            self.ring_cq(qi);
        }
        Some(Cqe { dw0, sqhd: dw2 as u16, sqid: (dw2 >> 16) as u16, cid: dw3 as u16, status: Status::from_dw3(dw3) })
    }

    /// Waits for the completion of `cid` on queue `qi` (others are kept for later).
    #[track_caller]
    pub fn wait(&mut self, qi: usize, cid: u16) -> Cqe {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let q = self.queue(qi);
            if let Some(i) = q.pending.iter().position(|c| c.cid == cid) {
                return q.pending.remove(i);
            }
            match self.poll_cqe(qi) {
                Some(c) if c.cid == cid => return c,
                Some(c) => self.queue(qi).pending.push(c),
                None => {
                    assert!(Instant::now() < deadline, "timed out waiting for cid {cid} on queue {qi}");
                    std::thread::sleep(Duration::from_micros(20));
                }
            }
        }
    }

    /// Whether a completion arrives on queue `qi` within `d`.
    pub fn completion_within(&mut self, qi: usize, d: Duration) -> Option<Cqe> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(c) = self.queue(qi).pending.pop() {
                return Some(c);
            }
            if let Some(c) = self.poll_cqe(qi) {
                return Some(c);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    #[track_caller]
    pub fn run(&mut self, qi: usize, cmd: Cmd) -> Cqe {
        let cid = self.submit(qi, cmd);
        self.wait(qi, cid)
    }

    #[track_caller]
    pub fn admin(&mut self, cmd: Cmd) -> Cqe {
        self.run(0, cmd)
    }

    /// Runs an admin command that returns `len` bytes into a fresh buffer; returns both.
    #[track_caller]
    pub fn admin_data(&mut self, cmd: Cmd, len: u64) -> (Cqe, Vec<u8>) {
        let buf = self.alloc(len);
        let second = if len > PAGE { buf + PAGE } else { 0 };
        assert!(len <= 2 * PAGE);
        let c = self.admin(cmd.prp(buf, second));
        let mut data = vec![0u8; len as usize];
        self.mem.read(buf, &mut data).unwrap();
        (c, data)
    }

    pub fn identify(&mut self, cns: u32, nsid: u32) -> (Cqe, Vec<u8>) {
        self.admin_data(Cmd::new(ADM_IDENTIFY).ns(nsid).d(10, cns), 4096)
    }

    /// Get Log Page of `len` bytes (a multiple of 4) at `offset`.
    pub fn log_page(&mut self, lid: u8, len: u64, offset: u64, rae: bool) -> (Cqe, Vec<u8>) {
        let numd = (len / 4 - 1) as u32;
        let cdw10 = u32::from(lid) | (u32::from(rae) << 15) | ((numd & 0xffff) << 16);
        let cmd = Cmd::new(ADM_GET_LOG_PAGE).ns(NSID_ALL).d(10, cdw10).d(11, numd >> 16).d(12, offset as u32).d(13, 0);
        self.admin_data(cmd, len)
    }

    pub fn get_feature(&mut self, fid: u8, cdw11: u32) -> Cqe {
        self.admin(Cmd::new(ADM_GET_FEATURES).d(10, u32::from(fid)).d(11, cdw11))
    }

    pub fn set_feature(&mut self, fid: u8, cdw11: u32) -> Cqe {
        self.admin(Cmd::new(ADM_SET_FEATURES).d(10, u32::from(fid)).d(11, cdw11))
    }

    pub fn add_ns(&self, nsid: u32, bdev: Arc<Bdev>) {
        assert_eq!(self.ctrl.add_namespace(Some(nsid), bdev, NsIds::default()).unwrap(), nsid);
    }

    /// A buffer of `len` bytes over separate guest pages (with a gap page between each).
    pub fn buf(&mut self, len: u64, off: u64) -> Buf {
        let n = (off + len).div_ceil(PAGE);
        let pages = (0..n).map(|_| self.alloc(2 * PAGE)).collect();
        Buf { pages, off, len }
    }

    /// Guest address ranges of `b`, in order.
    pub fn chunks(b: &Buf) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut left = b.len;
        for (i, p) in b.pages.iter().enumerate() {
            let start = if i == 0 { b.off } else { 0 };
            let n = (PAGE - start).min(left);
            if n == 0 {
                break;
            }
            out.push((p + start, n));
            left -= n;
        }
        out
    }

    pub fn fill(&self, b: &Buf, data: &[u8]) {
        let mut at = 0usize;
        for (gpa, n) in Self::chunks(b) {
            self.mem.write(gpa, &data[at..at + n as usize]).unwrap();
            at += n as usize;
        }
    }

    pub fn contents(&self, b: &Buf) -> Vec<u8> {
        let mut out = vec![0u8; b.len as usize];
        let mut at = 0usize;
        for (gpa, n) in Self::chunks(b) {
            self.mem.read(gpa, &mut out[at..at + n as usize]).unwrap();
            at += n as usize;
        }
        out
    }

    /// PRP1/PRP2 for `b`, building a PRP list (chained every 512 entries) when needed.
    pub fn prps(&mut self, b: &Buf) -> (u64, u64) {
        let chunks = Self::chunks(b);
        let first = chunks[0].0;
        match chunks.len() {
            1 => (first, 0),
            2 => (first, chunks[1].0),
            _ => {
                let entries: Vec<u64> = chunks[1..].iter().map(|c| c.0).collect();
                let head = self.alloc(PAGE);
                let mut list = head;
                let mut rest = &entries[..];
                loop {
                    if rest.len() <= 512 {
                        let bytes: Vec<u8> = rest.iter().flat_map(|e| e.to_le_bytes()).collect();
                        self.mem.write(list, &bytes).unwrap();
                        break;
                    }
                    let next = self.alloc(PAGE);
                    let mut bytes: Vec<u8> = rest[..511].iter().flat_map(|e| e.to_le_bytes()).collect();
                    bytes.extend_from_slice(&next.to_le_bytes());
                    self.mem.write(list, &bytes).unwrap();
                    rest = &rest[511..];
                    list = next;
                }
                (first, head)
            }
        }
    }

    /// An SGL for `b`: a single Data Block if it is one chunk, else the data blocks spread over
    /// `segments` chained segments.
    pub fn sgl(&mut self, b: &Buf, segments: usize) -> [u8; 16] {
        let chunks = Self::chunks(b);
        if chunks.len() == 1 && segments == 0 {
            return desc(chunks[0].0, chunks[0].1 as u32, 0);
        }
        let segments = segments.max(1).min(chunks.len());
        let per = chunks.len().div_ceil(segments);
        let groups: Vec<&[(u64, u64)]> = chunks.chunks(per).collect();
        let addrs: Vec<u64> = groups.iter().map(|_| self.alloc(PAGE)).collect();
        for (i, g) in groups.iter().enumerate() {
            let mut bytes: Vec<u8> = g.iter().flat_map(|&(a, n)| desc(a, n as u32, 0)).collect();
            if i + 1 < groups.len() {
                let next_len = (groups[i + 1].len() + usize::from(i + 2 < groups.len())) * 16;
                let kind = if i + 2 < groups.len() { 2 } else { 3 };
                bytes.extend_from_slice(&desc(addrs[i + 1], next_len as u32, kind));
            }
            self.mem.write(addrs[i], &bytes).unwrap();
        }
        let first_len = (groups[0].len() + usize::from(groups.len() > 1)) * 16;
        desc(addrs[0], first_len as u32, if groups.len() > 1 { 2 } else { 3 })
    }

    /// Writes `data` at `slba` of `nsid` through queue `qi` with PRPs (`sgl`: with an SGL of that
    /// many segments instead).
    #[track_caller]
    pub fn write(&mut self, qi: usize, nsid: u32, slba: u64, data: &[u8], bs: u64, sgl: Option<usize>) -> Cqe {
        let b = self.buf(data.len() as u64, if sgl.is_some() { 24 } else { 512 });
        self.fill(&b, data);
        let cmd = Cmd::new(IO_WRITE).ns(nsid).lba(slba, (data.len() as u64 / bs) as u32);
        let cmd = match sgl {
            Some(segs) => cmd.sgl(self.sgl(&b, segs)),
            None => {
                let (p1, p2) = self.prps(&b);
                cmd.prp(p1, p2)
            }
        };
        self.run(qi, cmd)
    }

    /// Reads `blocks` blocks at `slba` of `nsid` through queue `qi`.
    #[track_caller]
    pub fn read(&mut self, qi: usize, nsid: u32, slba: u64, blocks: u64, bs: u64, sgl: Option<usize>) -> Vec<u8> {
        let b = self.buf(blocks * bs, if sgl.is_some() { 40 } else { 1024 });
        let cmd = Cmd::new(IO_READ).ns(nsid).lba(slba, blocks as u32);
        let cmd = match sgl {
            Some(segs) => cmd.sgl(self.sgl(&b, segs)),
            None => {
                let (p1, p2) = self.prps(&b);
                cmd.prp(p1, p2)
            }
        };
        self.run(qi, cmd).ok();
        self.contents(&b)
    }
}
