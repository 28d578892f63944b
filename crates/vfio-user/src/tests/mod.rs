//! Real server and real client in one process: an [`NvmfManager`] serving one subsystem with a
//! malloc and a uring namespace on reactors, driven by [`NvmeClient`] (rust-vmm's vfio-user
//! client underneath) and by a raw socket for malformed traffic.

#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)] // test sizes are small

mod io;
mod irqs;
mod manager;
mod robust;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstor_bdev::{malloc, uring, Bdev, BdevParams};
use vstor_reactor::{CpuMask, ReactorConfig, Reactors};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::proto::*;
use crate::*;

pub const NQN: &str = "nqn.2024-01.io.vstor:test";
pub const TIMEOUT: Duration = Duration::from_secs(20);

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

/// Waits until `f` holds, or panics after [`TIMEOUT`].
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn malloc_bdev(name: &str, block_size: u32, num_blocks: u64) -> Arc<Bdev> {
    malloc::create(BdevParams { name: name.into(), uuid: None, block_size, num_blocks, read_only: false }, false)
        .unwrap()
}

fn test_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(std::env::var("VSTOR_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap()
}

/// A target: reactors, a manager with transport `t`, subsystem [`NQN`] with namespace 1 (malloc,
/// 512-byte blocks) and 2 (uring file under /var/tmp, 4 KiB blocks), listening in a temp dir.
pub struct Target {
    pub mgr: NvmfManager,
    pub malloc: Arc<Bdev>,
    pub uring: Arc<Bdev>,
    pub dir: tempfile::TempDir,
    _file_dir: tempfile::TempDir,
    /// Dropped last, after the manager shut its controllers down.
    _reactors: Reactors,
}

impl Target {
    pub fn new(t: TransportOpts) -> Target {
        let reactors =
            Reactors::start(&CpuMask::from_cores([0, 1]), ReactorConfig { pin: false, ..Default::default() }).unwrap();
        let mgr = NvmfManager::new(reactors.handles().to_vec(), 0o660);
        mgr.create_transport(t).unwrap();
        mgr.create_subsystem(SubsystemOpts {
            nqn: NQN.into(),
            serial_number: Some("VSTORTEST01".into()),
            model_number: Some("vstor test controller".into()),
            allow_any_host: true,
            max_namespaces: Some(16),
        })
        .unwrap();
        let malloc = malloc_bdev("Malloc0", 512, 16384);
        let file_dir = test_dir();
        let path = file_dir.path().join("ns2.img");
        std::fs::File::create(&path).unwrap().set_len(16 << 20).unwrap();
        let uring = uring::create(uring::UringOptions {
            name: "Uring0".into(),
            filename: path.to_string_lossy().into_owned(),
            block_size: Some(4096),
            uuid: None,
            readonly: false,
            flavor: uring::Flavor::Uring,
            fallocate: true,
        })
        .unwrap();
        assert_eq!(mgr.add_ns(NQN, malloc.clone(), NsOpts { nsid: Some(1), ..Default::default() }).unwrap(), 1);
        assert_eq!(mgr.add_ns(NQN, uring.clone(), NsOpts::default()).unwrap(), 2);
        let dir = tempfile::tempdir().unwrap();
        let target = Target { mgr, malloc, uring, dir, _file_dir: file_dir, _reactors: reactors };
        target.mgr.add_listener(NQN, &ListenAddress::vfio_user(target.traddr())).unwrap();
        target
    }

    pub fn traddr(&self) -> String {
        self.dir.path().join("ctrl").to_string_lossy().into_owned()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("ctrl").join("cntrl")
    }

    pub fn client_opts(&self) -> ClientOptions {
        ClientOptions { dir: PathBuf::from(self.traddr()), buf_size: 4 << 20, ..Default::default() }
    }

    pub fn state(&self) -> ListenerState {
        self.mgr.listener_state(NQN, &self.traddr()).unwrap()
    }

    /// Waits until the session count exceeds `before` and no client is attached.
    pub fn wait_idle(&self, before: u64) {
        wait_until("the server to finish the session", || {
            let s = self.state();
            !s.connected && s.sessions > before
        });
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.mgr.shutdown();
    }
}

/// Submits one command with `submit`, waits for it and returns its status.
pub fn run1(c: &mut NvmeClient, q: u16, submit: impl FnOnce(&mut NvmeClient) -> Result<(), ClientError>) -> u16 {
    submit(c).unwrap();
    let done = c.wait(q, 1, TIMEOUT).unwrap();
    assert_eq!(done.len(), 1);
    done[0].1
}

/// Writes then reads back `per_q` commands per I/O queue on every namespace (varied sizes,
/// unaligned buffer starts, PRP lists) and checks the data.
pub fn verify_data(c: &mut NvmeClient, seed: u64, per_q: usize) {
    const SLOT: usize = 128 << 10;
    let nq = c.io_queues();
    assert!(usize::from(nq) * per_q * SLOT <= c.buf().len());
    let namespaces = c.namespaces().to_vec();
    assert!(!namespaces.is_empty());
    for ns in namespaces {
        let bs = ns.block_size as usize;
        // Each command gets its own LBA span (at most 24 blocks), so none overlap.
        let ncmds = usize::from(nq) * per_q;
        let span = (ns.blocks.saturating_sub(7) as usize / ncmds).min(24);
        assert!(span >= 1, "namespace {} is too small for {ncmds} commands", ns.nsid);
        let mut cmds = Vec::new();
        for q in 1..=nq {
            for i in 0..per_q {
                let idx = usize::from(q - 1) * per_q + i;
                let blocks = (1 + idx * 7) % span + 1;
                let off = idx * SLOT + if idx % 2 == 1 { 512 } else { 0 };
                let lba = (idx * span) as u64 + seed % 7;
                let data = pattern(seed ^ (u64::from(ns.nsid) << 32) ^ idx as u64, blocks * bs);
                cmds.push((q, idx, blocks, off, lba, data));
            }
        }
        for (q, idx, blocks, off, lba, data) in &cmds {
            c.buf()[*off..*off + data.len()].copy_from_slice(data);
            c.submit_write(*q, ns.nsid, *lba, *blocks as u32, *off, *idx as u16).unwrap();
        }
        for q in 1..=nq {
            for (tag, status) in c.wait(q, per_q, TIMEOUT).unwrap() {
                assert_eq!(status, 0, "write tag {tag} on queue {q} of namespace {}", ns.nsid);
            }
        }
        for (_, _, _, off, _, data) in &cmds {
            c.buf()[*off..*off + data.len()].fill(0xee);
        }
        for (q, idx, blocks, off, lba, _) in &cmds {
            c.submit_read(*q, ns.nsid, *lba, *blocks as u32, *off, *idx as u16).unwrap();
        }
        for q in 1..=nq {
            let done = c.wait(q, per_q, TIMEOUT).unwrap();
            assert_eq!(done.len(), per_q);
            for (tag, status) in done {
                assert_eq!(status, 0, "read tag {tag} on queue {q} of namespace {}", ns.nsid);
            }
        }
        for (q, idx, _, off, _, data) in &cmds {
            assert!(
                c.buf()[*off..*off + data.len()] == data[..],
                "data of command {idx} on queue {q}, namespace {}",
                ns.nsid
            );
        }
    }
}

/// A hand-rolled vfio-user client speaking raw bytes.
pub struct Raw {
    pub s: UnixStream,
    pub id: u16,
    /// Descriptors received with the last message.
    pub fds: Vec<std::os::fd::OwnedFd>,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        Raw { s, id: 0, fds: Vec::new() }
    }

    pub fn send(&mut self, cmd: u16, flags: u32, payload: &[u8], fds: &[RawFd]) {
        self.try_send(cmd, flags, payload, fds).unwrap();
    }

    pub fn try_send(&mut self, cmd: u16, flags: u32, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        self.id = self.id.wrapping_add(1);
        let hdr = Header { id: self.id, command: cmd, size: (HEADER_SIZE + payload.len()) as u32, flags, error: 0 };
        let mut msg = wire_bytes(&hdr).to_vec();
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            self.s.write_all(&msg)
        } else {
            self.s.send_with_fds(&[&msg[..]], fds).map(|_| ()).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        }
    }

    /// Next message, or `None` at EOF.
    pub fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut hb = [0u8; HEADER_SIZE];
        self.fds.clear();
        let mut got = 0;
        while got < HEADER_SIZE {
            match crate::sock::recv_with_fds(self.s.as_raw_fd(), &mut hb[got..], &mut self.fds, 4) {
                Ok((0, _)) => return None,
                Ok((n, _)) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("receive: {e}"),
            }
        }
        let h: Header = read_wire(&hb).unwrap();
        let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
        self.s.read_exact(&mut body).unwrap();
        Some((h, body))
    }

    pub fn call(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> (Header, Vec<u8>) {
        self.send(cmd, 0, payload, fds);
        let (h, b) = self.recv().expect("a reply");
        assert_eq!((h.id, h.command), (self.id, cmd), "reply matches the request");
        assert_eq!(h.flags & FLAG_TYPE_MASK, TYPE_REPLY);
        (h, b)
    }

    /// Expects an error reply with `errno`.
    #[track_caller]
    pub fn expect_err(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd], errno: i32) {
        let (h, b) = self.call(cmd, payload, fds);
        assert_ne!(h.flags & FLAG_ERROR, 0, "{} should fail", command_name(cmd));
        assert_eq!(h.error, errno as u32, "errno of {}", command_name(cmd));
        assert!(b.is_empty(), "an error reply is only a header");
    }

    #[track_caller]
    pub fn expect_ok(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Vec<u8> {
        let (h, b) = self.call(cmd, payload, fds);
        assert_eq!(h.flags & FLAG_ERROR, 0, "{} failed with errno {}", command_name(cmd), h.error);
        b
    }

    pub fn version(&mut self) {
        let mut p = wire_bytes(&Version { major: 0, minor: 3 }).to_vec();
        p.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#);
        p.push(0);
        let b = self.expect_ok(CMD_VERSION, &p, &[]);
        let v: Version = read_wire(&b).unwrap();
        assert_eq!((v.major, v.minor), (0, 2), "the server answers with a minor version it supports");
        let caps: serde_json::Value = serde_json::from_slice(&b[4..b.len() - 1]).unwrap();
        assert_eq!(caps["capabilities"]["max_msg_fds"], 64);
        assert_eq!(caps["capabilities"]["pgsizes"], 4096);
        assert!(caps["capabilities"].get("migration").is_none());
    }

    pub fn expect_eof(&mut self) {
        assert!(self.recv().is_none(), "the server closes the connection");
    }
}
