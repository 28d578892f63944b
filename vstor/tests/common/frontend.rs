//! A scripted vhost-user frontend (not a VM): rust-vmm's `vhost` crate speaks the protocol,
//! `vstor_virtio::driver` writes the rings, so tests can send vstor exactly the chains they want,
//! well-formed or not, and can reconnect to a restarted vstor as QEMU does.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vstor_mem::{memfd, GuestMemory, Region};
use vstor_virtio::driver::{PackedDriver, SplitDriver};

pub const VERSION_1: u64 = 1 << 32;
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
pub const EVENT_IDX: u64 = 1 << 29;
pub const INDIRECT: u64 = 1 << 28;
pub const RING_PACKED: u64 = 1 << 34;

/// Guest memory layout: rings of queue `q` at `q * RING_STRIDE`, data from `DATA`.
pub const RING_STRIDE: u64 = 0x10_0000;
pub const DATA: u64 = 0x100_0000;
pub const MEM_SIZE: u64 = 64 << 20;

pub struct Queue {
    pub d: SplitDriver,
    /// The packed ring driver, when RING_PACKED was negotiated (`d` is then unused).
    pub p: Option<PackedDriver>,
    pub kick: EventFd,
    pub call: EventFd,
    pub err: EventFd,
}

pub struct TestFrontend {
    pub fe: Frontend,
    pub mem: Arc<GuestMemory>,
    pub file: File,
    pub queues: Vec<Queue>,
    pub features: u64,
    want: u64,
    /// Queues the frontend sets up (the in-flight region covers them all).
    nq: usize,
    size: u16,
    /// The in-flight region the backend handed out (kept across reconnects, as QEMU does).
    pub inflight: Option<(VhostUserInflight, File)>,
    /// Postcopy: the backend's userfaultfd and the address it mapped each region at.
    pub postcopy: Option<(File, Vec<u64>)>,
}

fn want_protocol(inflight: bool) -> VhostUserProtocolFeatures {
    let mut p = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD;
    if inflight {
        p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    p
}

impl TestFrontend {
    /// Connects and sets up `nq` split queues of `size` entries (VA == GPA, one memfd region).
    pub fn connect(sock: &Path, nq: usize, size: u16, features: u64) -> Self {
        Self::connect_with(sock, nq, size, features, false)
    }

    /// Like [`connect`](Self::connect), asking the backend for an in-flight region first.
    pub fn connect_inflight(sock: &Path, nq: usize, size: u16, features: u64) -> Self {
        Self::connect_with(sock, nq, size, features, true)
    }

    /// Connects as the destination of a postcopy migration does: POSTCOPY_ADVISE (the backend
    /// hands over a userfaultfd), POSTCOPY_LISTEN, then the memory table, whose pages are mostly
    /// missing: only those the test writes (rings, request headers) exist.
    pub fn connect_postcopy(sock: &Path, nq: usize, size: u16, features: u64) -> Self {
        Self::connect_full(sock, nq, size, features, false, true)
    }

    fn connect_with(sock: &Path, nq: usize, size: u16, want: u64, inflight: bool) -> Self {
        Self::connect_full(sock, nq, size, want, inflight, false)
    }

    fn connect_full(sock: &Path, nq: usize, size: u16, want: u64, inflight: bool, postcopy: bool) -> Self {
        let file = memfd("guest", MEM_SIZE).unwrap();
        let mem = Arc::new(GuestMemory::new(vec![Region::map(&file, 0, MEM_SIZE, 0, 0).unwrap()]).unwrap());
        let fe = Frontend::connect(sock, nq as u64).expect("connect");
        let mut t =
            Self { fe, mem, file, queues: Vec::new(), nq, features: 0, want, size, inflight: None, postcopy: None };
        t.handshake_full(inflight, postcopy);
        let packed = t.features & RING_PACKED != 0;
        assert_eq!(packed, want & RING_PACKED != 0, "the backend offers packed rings when asked");
        for q in 0..nq {
            let at = 0x1000 + q as u64 * RING_STRIDE;
            let d = SplitDriver::new_at(t.mem.clone(), size, at);
            let p = packed.then(|| PackedDriver::new_at(t.mem.clone(), size, at));
            let new = || EventFd::new(EFD_NONBLOCK).unwrap();
            t.queues.push(Queue { d, p, kick: new(), call: new(), err: new() });
            // A packed ring starts at slot 0 with wrap counter 1.
            t.start_queue(q, if packed { 1 << 15 } else { 0 });
        }
        t
    }

    fn handshake(&mut self, inflight: bool) {
        self.handshake_full(inflight, false);
    }

    fn handshake_full(&mut self, inflight: bool, postcopy: bool) {
        let fe = &mut self.fe;
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        // Device-specific bits (0..24) are all taken, like a driver that supports them all.
        self.features = (self.want | VERSION_1 | PROTOCOL_FEATURES | 0xff_ffff) & offered;
        fe.set_features(self.features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        let mut want = want_protocol(inflight);
        if postcopy {
            assert!(pf.contains(VhostUserProtocolFeatures::PAGEFAULT), "postcopy (PAGEFAULT) is offered");
            want |= VhostUserProtocolFeatures::PAGEFAULT;
        }
        fe.set_protocol_features(pf & want).unwrap();
        if inflight {
            let (info, file) = match self.inflight.take() {
                Some(x) => x,
                None => {
                    let req = VhostUserInflight::new(0, 0, self.nq.max(1) as u16, self.size);
                    fe.get_inflight_fd(&req).unwrap()
                }
            };
            fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
            self.inflight = Some((info, file));
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: 0,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        };
        if postcopy {
            let uffd = fe.postcopy_advise().expect("POSTCOPY_ADVISE");
            fe.postcopy_listen().expect("POSTCOPY_LISTEN");
            let bases = fe.set_mem_table(&[region]).unwrap().expect("region bases in postcopy");
            fe.postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE).unwrap();
            self.postcopy = Some((uffd, bases));
        } else {
            fe.set_mem_table(&[region]).unwrap();
        }
    }

    fn start_queue(&mut self, q: usize, base: u16) {
        let Queue { d, p, kick, call, err } = &self.queues[q];
        let fe = &mut self.fe;
        fe.set_vring_num(q, d.size).unwrap();
        let (desc, driver, device) = match p {
            Some(p) => (p.desc, p.drv, p.dev),
            None => (d.desc, d.avail, d.used),
        };
        let cfg = VringConfigData {
            queue_max_size: d.size,
            queue_size: d.size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: device,
            avail_ring_addr: driver,
            log_addr: None,
        };
        fe.set_vring_addr(q, &cfg).unwrap();
        fe.set_vring_base(q, base).unwrap();
        fe.set_vring_call(q, call).unwrap();
        fe.set_vring_err(q, err).unwrap();
        fe.set_vring_kick(q, kick).unwrap();
        fe.set_vring_enable(q, true).unwrap();
    }

    /// Connects again (after the backend restarted), with the same memory, rings and in-flight
    /// region. Each split ring restarts at the used index found in memory, as QEMU does when it
    /// could not ask the dead backend where it was; a packed ring has no such index, so QEMU sends
    /// the base it last knew (here: where the ring started), and so does this.
    pub fn reconnect(&mut self, sock: &Path) {
        let bases: Vec<u16> = (0..self.queues.len())
            .map(|q| match &self.queues[q].p {
                Some(_) => 1 << 15,
                None => vstor_virtio::driver::r16(&self.mem, self.queues[q].d.used + 2),
            })
            .collect();
        self.reconnect_at(sock, &bases);
    }

    /// [`reconnect`](Self::reconnect) with the SET_VRING_BASE value of each queue given.
    pub fn reconnect_at(&mut self, sock: &Path, bases: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        self.fe = loop {
            match Frontend::connect(sock, self.queues.len() as u64) {
                Ok(fe) => break fe,
                Err(e) => {
                    assert!(Instant::now() < deadline, "reconnect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let inflight = self.inflight.is_some();
        self.handshake(inflight);
        for (q, &base) in bases.iter().enumerate() {
            self.start_queue(q, base);
        }
    }

    /// Starts migration dirty logging as QEMU does: SET_LOG_BASE with a memfd bitmap, SET_FEATURES
    /// with LOG_ALL, SET_VRING_ADDR with the log flag. Returns a view of the bitmap.
    pub fn start_logging(&mut self) -> vstor_mem::DirtyLog {
        let size = MEM_SIZE / 4096 / 8;
        let file = memfd("dirty-log", size).unwrap();
        let region = vhost::VhostUserDirtyLogRegion { mmap_size: size, mmap_offset: 0, mmap_handle: file.as_raw_fd() };
        self.fe.set_log_base(0, Some(region)).unwrap();
        self.features |= 1 << 26;
        self.fe.set_features(self.features).unwrap();
        // As QEMU does, wait for the backend's reply to SET_VRING_ADDR with the log flag: the
        // rings log from then on.
        self.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        for (q, Queue { d, .. }) in self.queues.iter().enumerate() {
            let cfg = VringConfigData {
                queue_max_size: d.size,
                queue_size: d.size,
                flags: 1,
                desc_table_addr: d.desc,
                used_ring_addr: d.used,
                avail_ring_addr: d.avail,
                log_addr: Some(d.used),
            };
            self.fe.set_vring_addr(q, &cfg).unwrap();
        }
        self.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        vstor_mem::DirtyLog::map(&file, size, 0).unwrap()
    }

    /// Ends logging (a cancelled migration): SET_FEATURES without LOG_ALL.
    pub fn stop_logging(&mut self) {
        self.features &= !(1 << 26);
        self.fe.set_features(self.features).unwrap();
        // SET_FEATURES has no reply: a round trip makes sure vstor applied it before the next
        // request is made available.
        self.fe.get_features().unwrap();
    }

    /// Device config bytes.
    pub fn config(&mut self, len: u32) -> Vec<u8> {
        let buf = vec![0u8; len as usize];
        let (_, data) = self.fe.get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf).unwrap();
        data
    }

    /// Waits for `n` used entries on queue `q`.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            let Queue { d, p, .. } = &mut self.queues[q];
            match p {
                Some(p) => got.extend(p.used().into_iter().map(|(id, len)| (u32::from(id), len))),
                None => got.extend(d.used()),
            }
            if got.len() >= n {
                break;
            }
            assert!(Instant::now() < deadline, "queue {q}: {} of {n} used entries within {timeout:?}", got.len());
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    /// Whether the device signalled the queue's error eventfd.
    pub fn errored(&self, q: usize) -> bool {
        self.queues[q].err.read().is_ok()
    }

    pub fn write(&self, gpa: u64, b: &[u8]) {
        self.mem.write(gpa, b).unwrap();
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(gpa, &mut v).unwrap();
        v
    }
}

/// A virtio-blk request header.
pub fn blk_header(rtype: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&rtype.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}
