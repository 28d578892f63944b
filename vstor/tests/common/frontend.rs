//! A scripted vhost-user frontend (not a VM): rust-vmm's `vhost` crate speaks the protocol,
//! `vstor_virtio::driver` writes the rings, so tests can send vstor exactly the chains they want,
//! well-formed or not.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vstor_mem::{memfd, GuestMemory, Region};
use vstor_virtio::driver::SplitDriver;

pub const VERSION_1: u64 = 1 << 32;
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
pub const EVENT_IDX: u64 = 1 << 29;
pub const INDIRECT: u64 = 1 << 28;

/// Guest memory layout: rings of queue `q` at `q * RING_STRIDE`, data from `DATA`.
pub const RING_STRIDE: u64 = 0x10_0000;
pub const DATA: u64 = 0x100_0000;
pub const MEM_SIZE: u64 = 64 << 20;

pub struct Queue {
    pub d: SplitDriver,
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
}

impl TestFrontend {
    /// Connects and sets up `nq` split queues of `size` entries (VA == GPA, one memfd region).
    pub fn connect(sock: &Path, nq: usize, size: u16, features: u64) -> Self {
        let fe = Frontend::connect(sock, nq as u64).expect("connect");
        Self::setup(fe, nq, size, features)
    }

    pub fn setup(mut fe: Frontend, nq: usize, size: u16, want: u64) -> Self {
        let file = memfd("guest", MEM_SIZE).unwrap();
        let mem = Arc::new(GuestMemory::new(vec![Region::map(&file, 0, MEM_SIZE, 0, 0).unwrap()]).unwrap());
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        // Device-specific bits (0..24) are all taken, like a driver that supports them all.
        let features = (want | VERSION_1 | PROTOCOL_FEATURES | 0xff_ffff) & offered;
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        let want_pf = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        fe.set_protocol_features(pf & want_pf).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: 0,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        let mut t = Self { fe, mem, file, queues: Vec::new(), features };
        for q in 0..nq {
            t.add_queue(q, size);
        }
        t
    }

    fn add_queue(&mut self, q: usize, size: u16) {
        let d = SplitDriver::new_at(self.mem.clone(), size, 0x1000 + q as u64 * RING_STRIDE);
        let (kick, call, err) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        self.fe.set_vring_num(q, size).unwrap();
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: d.desc,
            used_ring_addr: d.used,
            avail_ring_addr: d.avail,
            log_addr: None,
        };
        self.fe.set_vring_addr(q, &cfg).unwrap();
        self.fe.set_vring_base(q, 0).unwrap();
        self.fe.set_vring_call(q, &call).unwrap();
        self.fe.set_vring_err(q, &err).unwrap();
        self.fe.set_vring_kick(q, &kick).unwrap();
        self.fe.set_vring_enable(q, true).unwrap();
        self.queues.push(Queue { d, kick, call, err });
    }

    /// Device config bytes.
    pub fn config(&mut self, len: u32) -> Vec<u8> {
        let buf = vec![0u8; len as usize];
        let (_, data) = self.fe.get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf).unwrap();
        data
    }

    /// Makes chain `head` available on queue `q` and kicks.
    pub fn publish(&mut self, q: usize, head: u16) {
        self.queues[q].d.publish(head);
        self.queues[q].kick.write(1).unwrap();
    }

    /// Waits for `n` used entries on queue `q`.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            got.extend(self.queues[q].d.used());
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
