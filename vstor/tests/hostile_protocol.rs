//! A hostile (or broken) vhost-user frontend, at the protocol level: memory tables vstor cannot
//! use, rings and buffers outside guest memory, kick storms, connection churn, file descriptors
//! closed under vstor, memory-table swaps with I/O in flight, and the limits on what one
//! connection can make vstor hold. After each, vstor must keep serving a well-behaved client, and
//! where it makes sense its file descriptors and memory must return to where they were.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use serde_json::json;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vstor_mem::memfd;
use vstor_virtio::driver::desc_bytes;

const T: Duration = Duration::from_secs(10);
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// RSS a test may leave behind (allocator caches, log buffers).
const RSS_SLACK_KB: u64 = 8 << 10;

// vhost-user request codes and header flags, for messages the frontend crate will not send.
const SET_OWNER: u32 = 3;
const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_KICK: u32 = 12;
const NEED_REPLY: u32 = 0x8;

/// A daemon on both cores with controller `vb` on an 8 MiB RAM disk.
fn start(extra: &[&str]) -> Daemon {
    let mut args = vec!["--cpumask", "0x3"];
    args.extend_from_slice(extra);
    let d = Daemon::start(&args);
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 16384, "block_size": 512}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb", "dev_name": "M0", "cpumask": "0x3"}));
    d
}

/// Adds controller `name` on a RAM disk behind an error bdev that holds every write until
/// `bdev_error_resume_pending`.
fn add_holding(d: &Daemon, name: &str) {
    let m = format!("{name}_m");
    d.rpc_ok("bdev_malloc_create", json!({"name": m, "num_blocks": 16384, "block_size": 512}));
    d.rpc_ok("bdev_error_create", json!({"base_name": m}));
    let e = format!("EE_{m}");
    d.rpc_ok(
        "bdev_error_inject_error",
        json!({"name": e, "io_type": "write", "error_type": "pending", "num": 1_000_000}),
    );
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": name, "dev_name": e, "cpumask": "0x3"}));
}

fn sock(d: &Daemon, ctrlr: &str) -> PathBuf {
    d.dir.path().join(ctrlr)
}

fn connect(d: &Daemon, ctrlr: &str, nq: usize) -> TestFrontend {
    TestFrontend::connect(&sock(d, ctrlr), nq, 64, EVENT_IDX | INDIRECT)
}

/// Where request `head` of queue `q` keeps its indirect table (+0), header (+0x100), status
/// (+0x200) and data (+0x1000, up to 60 KiB).
fn slot(q: usize, head: u16) -> u64 {
    DATA + (q as u64 * 128 + u64::from(head)) * 0x1_0000
}

/// Submits a read or write of `data.len()` bytes at `sector` as one ring descriptor pointing to
/// an indirect table (so a queue of N entries holds N requests). For a read, `data` is ignored
/// and the buffer is cleared.
fn submit(f: &mut TestFrontend, q: usize, head: u16, write: bool, sector: u64, data: &[u8]) {
    let s = slot(q, head);
    f.write(s + 0x100, &blk_header(u32::from(write), sector));
    f.write(s + 0x200, &[0xff]);
    if write {
        f.write(s + 0x1000, data);
    } else {
        f.write(s + 0x1000, &vec![0; data.len()]);
    }
    let data_flags = F_NEXT | if write { 0 } else { F_WRITE };
    let table = [
        desc_bytes(s + 0x100, 16, F_NEXT, 1),
        desc_bytes(s + 0x1000, data.len() as u32, data_flags, 2),
        desc_bytes(s + 0x200, 1, F_WRITE, 0),
    ]
    .concat();
    f.write(s, &table);
    f.queues[q].d.set_desc(head, s, 48, F_INDIRECT, 0);
    f.queues[q].d.publish(head);
    f.queues[q].kick.write(1).unwrap();
}

fn status(f: &TestFrontend, q: usize, head: u16) -> u8 {
    f.read(slot(q, head) + 0x200, 1)[0]
}

fn data(f: &TestFrontend, q: usize, head: u16, len: usize) -> Vec<u8> {
    f.read(slot(q, head) + 0x1000, len)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| (seed.wrapping_mul(0x9e37_79b9).wrapping_add(i * 7) >> 3) as u8).collect()
}

static SEED: AtomicU64 = AtomicU64::new(1);

/// A verified write and read-back on `ctrlr` through a fresh, well-behaved client.
fn serves(d: &Daemon, ctrlr: &str) {
    let mut f = connect(d, ctrlr, 1);
    let seed = SEED.fetch_add(1, Ordering::Relaxed);
    let sector = (seed % 1024) * 8;
    let p = pattern(seed, 4096);
    submit(&mut f, 0, 0, true, sector, &p);
    f.wait_used(0, 1, T);
    assert_eq!(status(&f, 0, 0), S_OK, "{ctrlr}: write");
    submit(&mut f, 0, 1, false, sector, &p);
    assert_eq!(f.wait_used(0, 1, T), vec![(1, 4097)], "{ctrlr}: read");
    assert_eq!(status(&f, 0, 1), S_OK, "{ctrlr}: read status");
    assert!(data(&f, 0, 1, 4096) == p, "{ctrlr}: the data read back is what was written");
}

/// Waits until no frontend is connected to `ctrlr` (its teardown is over).
fn settle(d: &Daemon, ctrlr: &str) {
    let deadline = Instant::now() + T;
    loop {
        let c = d.rpc_ok("vhost_get_controllers", json!({"name": ctrlr}));
        if c[0]["connected"] == json!(false) {
            return;
        }
        assert!(Instant::now() < deadline, "{ctrlr} still has a frontend: {c}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// File descriptors and RSS of an idle daemon, measured after warm-up clients.
struct Baseline {
    fds: usize,
    rss_kb: u64,
}

fn baseline(d: &Daemon, ctrlr: &str) -> Baseline {
    for _ in 0..3 {
        serves(d, ctrlr);
    }
    settle(d, ctrlr);
    std::thread::sleep(Duration::from_millis(50));
    Baseline { fds: d.fd_count(), rss_kb: d.rss_kb() }
}

/// vstor still serves every controller in `ctrlrs`, and once idle again holds no more
/// descriptors than at `b` and not much more memory.
fn back_to(d: &Daemon, ctrlrs: &[&str], b: &Baseline) {
    for c in ctrlrs {
        serves(d, c);
    }
    for c in ctrlrs {
        settle(d, c);
    }
    let deadline = Instant::now() + T;
    while d.fd_count() > b.fds {
        assert!(Instant::now() < deadline, "file descriptors: {} now, {} before", d.fd_count(), b.fds);
        std::thread::sleep(Duration::from_millis(10));
    }
    let rss = d.rss_kb();
    assert!(rss <= b.rss_kb + RSS_SLACK_KB, "RSS grew from {} KiB to {rss} KiB", b.rss_kb);
}

/// Counts `needle` in the log.
fn log_count(d: &Daemon, needle: &str) -> usize {
    d.log().matches(needle).count()
}

/// Waits until `needle` appears at least `n` times in the log.
fn wait_log_n(d: &Daemon, needle: &str, n: usize) {
    let deadline = Instant::now() + T;
    while log_count(d, needle) < n {
        assert!(Instant::now() < deadline, "expected {n} × '{needle}' in the log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects and negotiates like QEMU, asking for a reply to every message (so refusals show).
fn handshake(sock: &Path) -> Frontend {
    // The frontend crate checks queue indices against this: let vstor do the checking.
    let mut fe = Frontend::connect(sock, 256).expect("connect");
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    fe.set_features(offered & (VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX | INDIRECT)).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

/// Whether vstor closed `fe`'s connection (the next request gets no answer).
fn closed(fe: &Frontend) -> bool {
    fe.get_features().is_err()
}

fn region(fd: RawFd, gpa: u64, size: u64, va: u64, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: va,
        mmap_offset: offset,
        mmap_handle: fd,
    }
}

/// A vhost-user connection written by hand, for messages the frontend crate refuses to send.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        Raw { s }
    }

    fn send(&self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let mut m = Vec::with_capacity(12 + body.len());
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&(flags | 1).to_le_bytes());
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        self.s.send_with_fds(&[&m[..]], fds).map(drop).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    /// A SET_MEM_TABLE body: (gpa, size, frontend address, offset) per region.
    fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(gpa, size, va, off) in regions {
            for v in [gpa, size, va, off] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// Reads until vstor closes the connection (true) or `within` passes (false).
    fn closed_within(&mut self, within: Duration) -> bool {
        self.s.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// An `EventFd` view of any descriptor, for frontend calls that take one (it is not closed).
fn as_eventfd(fd: RawFd) -> ManuallyDrop<EventFd> {
    // SAFETY: the EventFd is never dropped (ManuallyDrop), so `fd` stays owned by the caller.
    ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------------
// Memory tables
// ---------------------------------------------------------------------------------------------

#[test]
fn memory_tables_vstor_cannot_use_are_refused_and_the_connection_closed() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let sock = sock(&d, "vb");
    let mem = memfd("guest", 128 << 20).unwrap();
    let small = memfd("small", 1 << 20).unwrap();
    let (pipe_r, _pipe_w) = pipe();
    let efd = EventFd::new(0).unwrap();
    let sealed = memfd("sealed", 1 << 20).unwrap();
    // SAFETY: fcntl on our own memfd; nothing maps it, so a write seal can be added.
    assert_eq!(unsafe { libc::fcntl(sealed.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) }, 0);
    let ro_path = d.dir.path().join("readonly.img");
    std::fs::write(&ro_path, vec![0u8; 1 << 20]).unwrap();
    let ro = std::fs::File::open(&ro_path).unwrap();
    let m = mem.as_raw_fd();
    const MIB: u64 = 1 << 20;
    let va = 0x7f00_0000_0000u64;
    let cases: Vec<(&str, Vec<VhostUserMemoryRegionInfo>, &str)> = vec![
        (
            "guest ranges overlap",
            vec![region(m, 0, 64 * MIB, va, 0), region(m, 32 * MIB, 64 * MIB, va + (1 << 30), 0)],
            "overlaps the region at",
        ),
        (
            "frontend ranges overlap",
            vec![region(m, 0, 64 * MIB, va, 0), region(m, 1 << 30, 64 * MIB, va + 32 * MIB, 0)],
            "overlaps another region's frontend addresses",
        ),
        ("guest range wraps", vec![region(m, u64::MAX - 4095, 8192, va, 0)], "closing the connection: invalid message"),
        (
            "frontend range wraps",
            vec![region(m, 0, 8192, u64::MAX - 4095, 0)],
            "closing the connection: invalid message",
        ),
        ("file offset wraps", vec![region(m, 0, 8192, va, u64::MAX - 4095)], "closing the connection: invalid message"),
        ("region larger than its file", vec![region(small.as_raw_fd(), 0, 2 * MIB, va, 0)], "fewer than offset"),
        ("offset past the end of the file", vec![region(small.as_raw_fd(), 0, 4096, va, MIB)], "fewer than offset"),
        // mmap refuses: EACCES for a pipe's read end or a file opened read-only, ENODEV for an
        // eventfd, EPERM for a memfd sealed against writes.
        ("a pipe", vec![region(pipe_r.as_raw_fd(), 0, MIB, va, 0)], "cannot map region"),
        ("an eventfd", vec![region(efd.as_raw_fd(), 0, MIB, va, 0)], "cannot map region"),
        ("a memfd sealed against writes", vec![region(sealed.as_raw_fd(), 0, MIB, va, 0)], "cannot map region"),
        ("a file opened read-only", vec![region(ro.as_raw_fd(), 0, MIB, va, 0)], "cannot map region"),
    ];
    for (i, (what, regions, needle)) in cases.iter().enumerate() {
        let before = log_count(&d, needle);
        let fe = handshake(&sock);
        assert!(fe.set_mem_table(regions).is_err(), "{what}: the table is refused");
        assert!(closed(&fe), "{what}: the connection is closed");
        wait_log_n(&d, "closing the connection", i + 1);
        wait_log_n(&d, needle, before + 1);
    }
    let n = cases.len();
    // Messages the frontend crate will not send: a region of size 0, fewer fds than regions, and
    // more regions than a message may carry.
    let many: Vec<_> = (0..33).map(|i| (i * MIB, MIB, va + i * MIB, 0)).collect();
    for (k, (body, fds)) in [
        (Raw::mem_table(&[(0, 0, va, 0)]), vec![m]),
        (Raw::mem_table(&[(0, MIB, va, 0), (MIB, MIB, va + MIB, MIB)]), vec![m]),
        (Raw::mem_table(&many), vec![m]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = Raw::connect(&sock);
        r.send(SET_MEM_TABLE, 0, &body, &fds).unwrap();
        assert!(r.closed_within(T), "case {k}: the connection is closed");
        wait_log_n(&d, "closing the connection: invalid message", 3 + k + 1);
    }
    assert_eq!(log_count(&d, "closing the connection"), n + 3);
    back_to(&d, &["vb"], &base);
}

// ---------------------------------------------------------------------------------------------
// Rings and buffers outside guest memory
// ---------------------------------------------------------------------------------------------

fn ring_config(desc: u64, avail: u64, used: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    }
}

#[test]
fn ring_addresses_outside_guest_memory_are_refused() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let sock = sock(&d, "vb");
    let mem = memfd("guest", MEM_SIZE).unwrap();
    let table = [region(mem.as_raw_fd(), 0, MEM_SIZE, 0, 0)];
    let (desc, avail, used) = (0x1000, 0x1400, 0x2000);
    // At SET_VRING_ADDR, once there is a memory table.
    let cases = [
        (
            "used ring past the end of memory",
            ring_config(desc, avail, MEM_SIZE + 0x1000),
            "used ring at frontend address",
        ),
        ("used ring straddling the end", ring_config(desc, avail, MEM_SIZE - 16), "used ring at frontend address"),
        ("available ring past the end", ring_config(desc, MEM_SIZE, used), "available ring at frontend address"),
        (
            "descriptor table straddling the end",
            ring_config(MEM_SIZE - 512, avail, used),
            "descriptor table at frontend address",
        ),
    ];
    for (i, (what, cfg, needle)) in cases.iter().enumerate() {
        let fe = handshake(&sock);
        fe.set_mem_table(&table).unwrap();
        fe.set_vring_num(0, 64).unwrap();
        assert!(fe.set_vring_addr(0, cfg).is_err(), "{what}: refused");
        assert!(closed(&fe), "{what}: the connection is closed");
        wait_log_n(&d, "closing the connection", i + 1);
        assert!(d.log().contains(needle), "{what}:\n{}", d.log());
    }
    // Before any memory table the addresses cannot be checked; the kick that would start the
    // ring finds them outside the table that came since.
    let mut fe = handshake(&sock);
    fe.set_vring_num(0, 64).unwrap();
    fe.set_vring_addr(0, &ring_config(desc, avail, 48 << 20)).unwrap();
    fe.set_mem_table(&[region(mem.as_raw_fd(), 0, 16 << 20, 0, 0)]).unwrap();
    let (kick, call) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    assert!(fe.set_vring_enable(0, true).is_err(), "the ring does not start");
    assert!(closed(&fe), "and the connection is closed");
    assert!(d.wait_log("are not in guest memory", T), "{}", d.log());
    // A running ring whose memory the next table leaves out.
    let f = connect(&d, "vb", 1);
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let file = f.file.as_raw_fd();
    assert!(f.fe.set_mem_table(&[region(file, 16 << 20, 48 << 20, 16 << 20, 16 << 20)]).is_err());
    assert!(closed(&f.fe), "the connection is closed");
    drop(f);
    back_to(&d, &["vb"], &base);
}

/// Writes a chain of `bufs` at descriptors `head..` and makes it available.
fn chain(f: &mut TestFrontend, head: u16, bufs: &[(u64, u32, bool)]) {
    f.queues[0].d.add(head, bufs);
    f.queues[0].kick.write(1).unwrap();
}

#[test]
fn buffers_outside_guest_memory_get_an_error_status() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let mut f = connect(&d, "vb", 1);
    let hdr = DATA;
    f.write(hdr, &blk_header(0, 0));
    let st = |i: u64| DATA + 0x1000 + i;
    for i in 0..32 {
        f.write(st(i), &[0xff]);
    }
    // Chains whose status byte is in memory but a buffer is not: the status says IOERR.
    chain(&mut f, 0, &[(hdr, 16, false), (MEM_SIZE + 4096, 512, true), (st(0), 1, true)]);
    chain(&mut f, 3, &[(hdr, 16, false), (MEM_SIZE - 256, 512, true), (st(1), 1, true)]);
    chain(&mut f, 6, &[(hdr, 16, false), (u64::MAX - 100, 512, true), (st(2), 1, true)]);
    chain(&mut f, 9, &[(MEM_SIZE + 8, 16, false), (st(3), 1, true)]);
    let mut used = f.wait_used(0, 4, T);
    used.sort_unstable();
    assert_eq!(used, vec![(0, 1), (3, 1), (6, 1), (9, 1)], "each comes back with its status byte written");
    for i in 0..4 {
        assert_eq!(f.read(st(i), 1)[0], S_IOERR, "chain {i}: IOERR");
    }
    // The status byte itself outside memory: nothing can be written; length 0.
    chain(&mut f, 12, &[(hdr, 16, false), (DATA + 0x2000, 512, true), (MEM_SIZE, 1, true)]);
    chain(&mut f, 15, &[(hdr, 16, false), (DATA + 0x2000, 512, true), (MEM_SIZE - 1, 2, true)]);
    let mut used = f.wait_used(0, 2, T);
    used.sort_unstable();
    assert_eq!(used, vec![(12, 0), (15, 0)]);

    // Indirect tables: outside memory, straddling its end, of a length that is not whole
    // descriptors, empty, longer than allowed, with NEXT set, looping, and one whose buffer is
    // outside memory (its status, inside the table, says IOERR).
    let q = &mut f.queues[0].d;
    q.set_desc(20, MEM_SIZE + 4096, 48, F_INDIRECT, 0);
    q.set_desc(21, MEM_SIZE - 32, 48, F_INDIRECT, 0);
    q.set_desc(22, DATA + 0x4000, 40, F_INDIRECT, 0);
    q.set_desc(23, DATA + 0x4000, 0, F_INDIRECT, 0);
    q.set_desc(24, DATA + 0x4000, 16 * 4097, F_INDIRECT, 0);
    q.set_desc(25, DATA + 0x4000, 48, F_INDIRECT | F_NEXT, 26);
    q.set_desc(27, DATA + 0x6000, 48, F_INDIRECT, 0);
    q.set_desc(28, DATA + 0x7000, 48, F_INDIRECT, 0);
    let looping = [
        desc_bytes(hdr, 16, F_NEXT, 1),
        desc_bytes(DATA + 0x2000, 512, F_NEXT | F_WRITE, 2),
        desc_bytes(st(4), 1, F_WRITE | F_NEXT, 0),
    ];
    f.write(DATA + 0x6000, &looping.concat());
    let outside = [
        desc_bytes(hdr, 16, F_NEXT, 1),
        desc_bytes(MEM_SIZE - 100, 512, F_NEXT | F_WRITE, 2),
        desc_bytes(st(5), 1, F_WRITE, 0),
    ];
    f.write(DATA + 0x7000, &outside.concat());
    let q = &mut f.queues[0].d;
    for h in [20, 21, 22, 23, 24, 25, 27, 28] {
        q.publish(h);
    }
    f.queues[0].kick.write(1).unwrap();
    let mut used = f.wait_used(0, 8, T);
    used.sort_unstable();
    assert_eq!(used, vec![(20, 0), (21, 0), (22, 0), (23, 0), (24, 0), (25, 0), (27, 0), (28, 1)]);
    assert_eq!(f.read(st(4), 1)[0], 0xff, "a looping table has no last descriptor: nothing written");
    assert_eq!(f.read(st(5), 1)[0], S_IOERR);

    // A chain through every descriptor of the queue is fine; one that loops back is not.
    let p = pattern(77, 62 * 512);
    submit(&mut f, 0, 40, true, 64, &p);
    f.wait_used(0, 1, T);
    f.write(hdr, &blk_header(0, 64));
    let q = &mut f.queues[0].d;
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    for i in 1..63u16 {
        q.set_desc(i, DATA + 0x10_0000 + u64::from(i - 1) * 512, 512, F_NEXT | F_WRITE, i + 1);
    }
    q.set_desc(63, st(6), 1, F_WRITE, 0);
    q.publish(0);
    f.queues[0].kick.write(1).unwrap();
    assert_eq!(f.wait_used(0, 1, T), vec![(0, 62 * 512 + 1)]);
    assert_eq!(f.read(st(6), 1)[0], S_OK);
    assert!(f.read(DATA + 0x10_0000, 62 * 512) == p, "a 64-descriptor chain reads the right data");
    let q = &mut f.queues[0].d;
    q.set_desc(63, st(7), 1, F_WRITE | F_NEXT, 0);
    q.publish(0);
    f.queues[0].kick.write(1).unwrap();
    assert_eq!(f.wait_used(0, 1, T), vec![(0, 0)], "a chain longer than the queue (a loop) is returned");

    // Two regions: a buffer across adjacent regions is served; across a hole it is refused.
    // (With a reply asked for, each table is in place when set_mem_table returns.)
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let file = f.file.as_raw_fd();
    let half = MEM_SIZE / 2;
    f.fe.set_mem_table(&[region(file, 0, half, 0, 0), region(file, half, half, half, half)]).unwrap();
    let p = pattern(78, 4096);
    submit(&mut f, 0, 40, true, 128, &p);
    f.wait_used(0, 1, T);
    let across = half - 2048;
    f.write(hdr, &blk_header(0, 128));
    chain(&mut f, 50, &[(hdr, 16, false), (across, 4096, true), (st(8), 1, true)]);
    assert_eq!(f.wait_used(0, 1, T), vec![(50, 4097)]);
    assert_eq!((f.read(st(8), 1)[0], f.read(across, 4096) == p), (S_OK, true), "read across two regions");
    f.fe.set_mem_table(&[
        region(file, 0, half, 0, 0),
        region(file, half + (8 << 20), half - (8 << 20), half + (8 << 20), half + (8 << 20)),
    ])
    .unwrap();
    chain(&mut f, 53, &[(hdr, 16, false), (across, 4096, true), (st(9), 1, true)]);
    assert_eq!(f.wait_used(0, 1, T), vec![(53, 1)]);
    assert_eq!(f.read(st(9), 1)[0], S_IOERR, "a buffer running into a hole between regions");
    assert!(!f.errored(0), "none of this breaks the queue");
    drop(f);
    back_to(&d, &["vb"], &base);
}

#[test]
fn a_full_queue_takes_nothing_more_and_a_head_reused_in_flight_breaks_it() {
    let d = start(&[]);
    add_holding(&d, "ve");
    let base = baseline(&d, "vb");
    let mut f = connect(&d, "ve", 2);
    // Every head of the 64-entry queue in flight (held by the error bdev)...
    for h in 0..64u16 {
        submit(&mut f, 0, h, true, u64::from(h) * 8, &pattern(u64::from(h), 512));
    }
    // ...and taken: the bdev has 64 I/Os outstanding.
    let depth = || d.rpc_ok("bdev_get_iostat", json!({"name": "EE_ve_m"}))["bdevs"][0]["queue_depth"].clone();
    let deadline = Instant::now() + T;
    while depth() != json!(64) {
        assert!(Instant::now() < deadline, "vstor did not take the 64 requests: {}", depth());
        std::thread::sleep(Duration::from_millis(5));
    }
    // One head published again while in flight: the available index now runs one past what the
    // ring can hold.
    f.queues[0].d.publish(5);
    f.queues[0].kick.write(1).unwrap();
    let deadline = Instant::now() + T;
    while !f.errored(0) {
        assert!(Instant::now() < deadline, "the reused head was not reported");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(f.queues[0].d.used().is_empty(), "nothing completed yet");
    assert!(d.log().contains("head 5 made available again while in flight"), "{}", d.log());
    assert_eq!(depth(), json!(64), "nothing more was taken");
    // The 64 taken complete once the bdev lets them go; nothing more was taken.
    d.rpc_ok("bdev_error_resume_pending", json!({"name": "EE_ve_m"}));
    let mut heads: Vec<u32> = f.wait_used(0, 64, T).iter().map(|u| u.0).collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..64).collect::<Vec<u32>>());
    for h in 0..64u16 {
        assert_eq!(status(&f, 0, h), S_OK);
    }
    let st = d.rpc_ok("bdev_get_iostat", json!({"name": "EE_ve_m"}));
    assert_eq!(st["bdevs"][0]["num_write_ops"], 64, "{st}");
    // The other queue is unaffected.
    let p = pattern(9, 4096);
    submit(&mut f, 1, 0, true, 0, &p);
    f.wait_used(1, 1, T);
    submit(&mut f, 1, 1, false, 0, &p);
    f.wait_used(1, 1, T);
    assert!(status(&f, 1, 1) == S_OK && data(&f, 1, 1, 4096) == p);
    drop(f);
    back_to(&d, &["vb", "ve"], &base);
}

// ---------------------------------------------------------------------------------------------
// Kick storms and connection churn
// ---------------------------------------------------------------------------------------------

fn kick_storm(mode: &str) {
    let d = start(&["--reactor-mode", mode]);
    d.rpc_ok("bdev_malloc_create", json!({"name": "M1", "num_blocks": 16384, "block_size": 512}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vc", "dev_name": "M1", "cpumask": "0x3"}));
    let base = baseline(&d, "vb");
    let mut f = connect(&d, "vb", 2);
    let mut g = connect(&d, "vc", 1);
    let kick = f.queues[0].kick.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let kicks = Arc::new(AtomicU64::new(0));
    let storm = {
        let (stop, kicks) = (stop.clone(), kicks.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..1000 {
                    let _ = kick.write(1);
                }
                kicks.fetch_add(1000, Ordering::Relaxed);
            }
        })
    };
    let t0 = Instant::now();
    let mut rounds = 0u64;
    // Requests flow on the stormed queue, the other queue and another controller until at least
    // five million kicks went in.
    while kicks.load(Ordering::Relaxed) < 5_000_000 || rounds < 50 {
        assert!(t0.elapsed() < Duration::from_secs(60), "{mode}: too slow ({rounds} rounds)");
        for (c, q) in [(0usize, 0usize), (0, 1), (1, 0)] {
            let seed = rounds * 3 + c as u64 + q as u64;
            let p = pattern(seed, 4096);
            let sector = (seed % 512) * 8;
            let h = (rounds % 32) as u16 * 2;
            let fe = if c == 0 { &mut f } else { &mut g };
            submit(fe, q, h, true, sector, &p);
            fe.wait_used(q, 1, T);
            submit(fe, q, h + 1, false, sector, &p);
            fe.wait_used(q, 1, T);
            assert_eq!((status(fe, q, h), status(fe, q, h + 1)), (S_OK, S_OK), "{mode} round {rounds}");
            assert!(data(fe, q, h + 1, 4096) == p, "{mode} round {rounds}: data");
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    storm.join().unwrap();
    eprintln!("{mode}: {} kicks, {rounds} rounds of I/O in {:?}", kicks.load(Ordering::Relaxed), t0.elapsed());
    let rss = d.rss_kb();
    assert!(rss <= base.rss_kb + RSS_SLACK_KB, "{mode}: RSS grew from {} to {rss} KiB under the storm", base.rss_kb);
    drop(f);
    drop(g);
    back_to(&d, &["vb", "vc"], &base);
}

#[test]
fn a_kick_storm_starves_nothing_adaptive() {
    kick_storm("adaptive");
}

#[test]
fn a_kick_storm_starves_nothing_interrupt() {
    kick_storm("interrupt");
}

#[test]
fn ten_thousand_connections_come_and_go() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let sock = sock(&d, "vb");
    let mem = memfd("guest", MEM_SIZE).unwrap();
    let t0 = Instant::now();
    for i in 0..10_000u32 {
        match i % 5 {
            // Gone before saying anything.
            0 => drop(UnixStream::connect(&sock).unwrap()),
            // Gone in the middle of the handshake.
            1 => {
                let fe = Frontend::connect(&sock, 1).unwrap();
                fe.set_owner().unwrap();
                fe.get_features().unwrap();
            }
            // Gone after the memory table.
            2 => {
                let fe = handshake(&sock);
                fe.set_mem_table(&[region(mem.as_raw_fd(), 0, MEM_SIZE, 0, 0)]).unwrap();
            }
            // Gone with its queues running.
            3 => drop(TestFrontend::connect(&sock, 2, 64, EVENT_IDX)),
            // Gone in the middle of a message.
            _ => {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.write_all(&SET_OWNER.to_le_bytes()).unwrap();
            }
        }
        // Now and then, wait for vstor to catch up (connections queue in the backlog) and check
        // that it serves.
        if i % 50 == 49 {
            let fe = Frontend::connect(&sock, 1).unwrap();
            fe.get_features().unwrap();
        }
        if i % 2000 == 1999 {
            serves(&d, "vb");
        }
    }
    let took = t0.elapsed();
    eprintln!("10000 connections in {took:?}");
    assert!(took < Duration::from_secs(120), "10000 connections took {took:?}");
    settle(&d, "vb");
    // vstor really went through each kind: every connection was accepted, 2000 set up memory
    // and 2000 more started two queues each.
    let log = d.log();
    assert!(log.matches("frontend connected").count() >= 10_000);
    assert!(log.matches("memory table set").count() >= 4000);
    assert!(log.matches("vring started").count() >= 4000);
    assert!(log.matches("closing the connection: partial message").count() >= 2000);
    back_to(&d, &["vb"], &base);
    assert!(!d.log().contains("panicked"));
}

// ---------------------------------------------------------------------------------------------
// File descriptors the frontend closes or misuses
// ---------------------------------------------------------------------------------------------

#[test]
fn descriptors_the_frontend_closes_after_sending_them() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let mut f = connect(&d, "vb", 2);
    // The memory fd closed after SET_MEM_TABLE (QEMU may do this): vstor has its own mapping.
    drop(std::mem::replace(&mut f.file, std::fs::File::open("/dev/null").unwrap()));
    let p = pattern(5, 8192);
    submit(&mut f, 0, 0, true, 16, &p);
    f.wait_used(0, 1, T);
    submit(&mut f, 0, 1, false, 16, &p);
    f.wait_used(0, 1, T);
    assert!(data(&f, 0, 1, 8192) == p && status(&f, 0, 1) == S_OK, "I/O after the memfd was closed");
    // Kick and call fds closed right after sending them (a new call fd is signalled at once,
    // into nothing), then working ones again.
    for _ in 0..100 {
        let (k, c) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        f.fe.set_vring_call(1, &c).unwrap();
        f.fe.set_vring_kick(1, &k).unwrap();
    }
    let fresh = |f: &mut TestFrontend| {
        let (k, c) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        f.fe.set_vring_call(1, &c).unwrap();
        f.fe.set_vring_kick(1, &k).unwrap();
        f.queues[1].kick = k;
        f.queues[1].call = c;
    };
    fresh(&mut f);
    submit(&mut f, 1, 0, true, 32, &p);
    f.wait_used(1, 1, T);
    assert_eq!(status(&f, 1, 0), S_OK, "queue 1 serves with its new fds");
    // Kick and call fds that are not eventfds: a pipe's ends and a memfd. Nothing can wake vstor
    // through them, but nothing breaks either.
    let (r, w) = pipe();
    let other = memfd("not-an-eventfd", 4096).unwrap();
    for (kick, call) in
        [(r.as_raw_fd(), w.as_raw_fd()), (w.as_raw_fd(), r.as_raw_fd()), (other.as_raw_fd(), other.as_raw_fd())]
    {
        f.fe.set_vring_call(1, &as_eventfd(call)).unwrap();
        f.fe.set_vring_kick(1, &as_eventfd(kick)).unwrap();
        submit(&mut f, 0, 2, true, 48, &p[..512]);
        f.wait_used(0, 1, T);
    }
    drop((r, w, other));
    fresh(&mut f);
    submit(&mut f, 1, 1, false, 32, &p);
    f.wait_used(1, 1, T);
    assert!(data(&f, 1, 1, 8192) == p, "queue 1 serves again with eventfds");
    drop(f);
    back_to(&d, &["vb"], &base);
}

// ---------------------------------------------------------------------------------------------
// Memory-table swaps with I/O in flight
// ---------------------------------------------------------------------------------------------

#[test]
fn memory_table_swaps_with_io_in_flight_lose_and_corrupt_nothing() {
    let d = start(&[]);
    add_holding(&d, "ve");
    let base = baseline(&d, "vb");
    let mut f = connect(&d, "ve", 2);
    // With a reply asked for, each table is in place when set_mem_table returns.
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let file = f.file.as_raw_fd();
    let same = [region(file, 0, MEM_SIZE, 0, 0)];
    let m = MEM_SIZE / 4;
    let halves = [region(file, 0, 2 * m, 0, 0), region(file, 2 * m, 2 * m, 2 * m, 2 * m)];
    let quarters: Vec<_> = (0..4).map(|i| region(file, i * m, m, i * m, i * m)).collect();
    let depth = || d.rpc_ok("bdev_get_iostat", json!({"name": "EE_ve_m"}))["bdevs"][0]["queue_depth"].clone();
    let len = 8192;
    for (round, tables) in (0u64..).zip([&same[..], &halves[..], &quarters[..], &same[..]]) {
        // Writes on both queues held by the bdev, table swaps, then the writes let go; then reads
        // of the same sectors, the same way.
        for phase in [true, false] {
            let io = if phase { "write" } else { "read" };
            d.rpc_ok(
                "bdev_error_inject_error",
                json!({"name": "EE_ve_m", "io_type": io, "error_type": "pending", "num": 1000}),
            );
            for q in 0..2 {
                for h in 0..16u16 {
                    let sector = (q as u64 * 16 + u64::from(h)) * 16;
                    submit(&mut f, q, h, phase, sector, &pattern(round * 100 + sector, len));
                }
            }
            let deadline = Instant::now() + T;
            while depth() != json!(32) {
                assert!(Instant::now() < deadline, "round {round}: 32 requests in flight: {}", depth());
                std::thread::sleep(Duration::from_millis(2));
            }
            for _ in 0..3 {
                f.fe.set_mem_table(tables).unwrap_or_else(|e| panic!("round {round}: {e}\n{}", d.log()));
            }
            assert!(
                f.queues[0].d.used().is_empty() && f.queues[1].d.used().is_empty(),
                "round {round}: still in flight"
            );
            d.rpc_ok("bdev_error_resume_pending", json!({"name": "EE_ve_m"}));
            for q in 0..2 {
                let mut heads: Vec<u32> = f.wait_used(q, 16, T).iter().map(|u| u.0).collect();
                heads.sort_unstable();
                assert_eq!(heads, (0..16).collect::<Vec<u32>>(), "round {round}: every request completes once");
                for h in 0..16u16 {
                    assert_eq!(status(&f, q, h), S_OK, "round {round} queue {q} head {h}");
                    if !phase {
                        let sector = (q as u64 * 16 + u64::from(h)) * 16;
                        assert!(data(&f, q, h, len) == pattern(round * 100 + sector, len), "round {round}: data");
                    }
                }
            }
        }
    }
    assert!(!d.log().contains("virtqueue broken"), "{}", d.log());
    drop(f);
    back_to(&d, &["vb", "ve"], &base);
}

// ---------------------------------------------------------------------------------------------
// Limits on what one connection can make vstor hold
// ---------------------------------------------------------------------------------------------

#[test]
fn limit_memory_regions_per_connection() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let mut fe = handshake(&sock(&d, "vb"));
    assert_eq!(fe.get_max_mem_slots().unwrap(), 509);
    let mem = memfd("guest", 4096).unwrap();
    for i in 0..509u64 {
        fe.add_mem_region(&region(mem.as_raw_fd(), i << 20, 4096, i << 20, 0)).unwrap();
    }
    assert!(fe.add_mem_region(&region(mem.as_raw_fd(), 509 << 20, 4096, 509 << 20, 0)).is_err(), "region 510");
    assert!(closed(&fe));
    assert!(d.wait_log("region 510 would be over the limit of 509 memory regions per connection", T), "{}", d.log());
    // SET_MEM_TABLE carries at most 32 regions (the vhost crate refuses more fds per message).
    drop(fe);
    back_to(&d, &["vb"], &base);
}

#[test]
fn limit_bytes_mapped_per_connection() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let sock = sock(&d, "vb");
    const TIB: u64 = 1 << 40;
    // Sparse memfds: nothing is allocated, vstor only reserves address space.
    let big = memfd("sparse", 9 * TIB).unwrap();
    let b = big.as_raw_fd();
    // 16 TiB in one table is allowed...
    let fe = handshake(&sock);
    fe.set_mem_table(&[region(b, 0, 8 * TIB, 0, 0), region(b, 8 * TIB, 8 * TIB, 8 * TIB, 0)]).unwrap();
    drop(fe);
    // ...18 TiB is not.
    let fe = handshake(&sock);
    assert!(fe.set_mem_table(&[region(b, 0, 9 * TIB, 0, 0), region(b, 9 * TIB, 9 * TIB, 9 * TIB, 0)]).is_err());
    assert!(closed(&fe));
    assert!(d.wait_log("a memory table of 19791209299968 bytes (18 TiB) is over the limit of 17592186044416 bytes (16 TiB) per connection", T), "{}", d.log());
    // Nor by adding regions one at a time.
    let mut fe = handshake(&sock);
    fe.add_mem_region(&region(b, 0, 9 * TIB, 0, 0)).unwrap();
    assert!(fe.add_mem_region(&region(b, 9 * TIB, 9 * TIB, 9 * TIB, 0)).is_err());
    assert!(closed(&fe));
    assert!(d.wait_log("ADD_MEM_REG: a memory table of 19791209299968 bytes (18 TiB)", T), "{}", d.log());
    // A dirty log too large for any guest vstor maps.
    let fe = handshake(&sock);
    let log = memfd("log", 2 << 30).unwrap();
    let r = VhostUserDirtyLogRegion { mmap_size: 2 << 30, mmap_offset: 0, mmap_handle: log.as_raw_fd() };
    assert!(fe.set_log_base(0, Some(r)).is_err());
    assert!(closed(&fe));
    assert!(
        d.wait_log("a dirty log of 2147483648 bytes (2 GiB) is over the limit of 1073741824 bytes (1 GiB)", T),
        "{}",
        d.log()
    );
    back_to(&d, &["vb"], &base);
}

/// Submits a write (held by the error bdev) and then a memory table, `tables` times or until a
/// table is held back: then checks that vstor says why, lets the writes go and sees the table
/// accepted. Returns at which table it was held back.
fn swap_until_held(d: &Daemon, f: &mut TestFrontend, table: &[VhostUserMemoryRegionInfo], tables: u16) -> u16 {
    const NEEDLE: &str = "waiting for requests in flight to complete";
    for h in 0..tables {
        submit(f, 0, h, true, u64::from(h) * 8, &[h as u8; 512]);
        // (Taken by vstor before the table comes, normally; if not, the next table is held back.)
        std::thread::sleep(Duration::from_millis(10));
        let waits = log_count(d, NEEDLE);
        let (fe, table) = (f.fe.clone(), table.to_vec());
        let swap = std::thread::spawn(move || fe.set_mem_table(&table).map(drop));
        let deadline = Instant::now() + T;
        while !swap.is_finished() && log_count(d, NEEDLE) == waits {
            assert!(Instant::now() < deadline, "table {h} neither accepted nor held back");
            std::thread::sleep(Duration::from_millis(5));
        }
        if swap.is_finished() {
            swap.join().unwrap().unwrap_or_else(|e| panic!("table {h}: {e}"));
            continue;
        }
        // Held back: the frontend waits for its reply while the requests are in flight.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!swap.is_finished(), "table {h} waits for the requests in flight");
        d.rpc_ok("bdev_error_resume_pending", json!({"name": "EE_ve_m"}));
        swap.join().unwrap().unwrap_or_else(|e| panic!("table {h} after the requests completed: {e}"));
        let mut heads: Vec<u32> = f.wait_used(0, usize::from(h) + 1, T).iter().map(|u| u.0).collect();
        heads.sort_unstable();
        assert_eq!(heads, (0..=u32::from(h)).collect::<Vec<u32>>());
        for i in 0..=h {
            assert_eq!(status(f, 0, i), S_OK);
        }
        assert!(!closed(&f.fe), "the connection goes on");
        return h;
    }
    panic!("no table was held back in {tables}:\n{}", d.log());
}

#[test]
fn limit_tables_kept_for_requests_in_flight_makes_the_frontend_wait() {
    let d = start(&[]);
    add_holding(&d, "ve");
    let base = baseline(&d, "vb");
    let mut f = TestFrontend::connect(&sock(&d, "ve"), 1, 128, EVENT_IDX | INDIRECT);
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let table = [region(f.file.as_raw_fd(), 0, MEM_SIZE, 0, 0)];
    // One request in flight under each table: each replaced table stays mapped until its request
    // completes. With 63 kept and the current one, the 64th swap waits.
    let h = swap_until_held(&d, &mut f, &table, 120);
    assert!(h >= 63, "held back at table {h}, below the limit");
    assert!(d.log().contains("64 memory tables"), "{}", d.log());
    assert!(d.log().contains("limits: 64 tables"), "{}", d.log());
    drop(f);
    back_to(&d, &["vb", "ve"], &base);
}

#[test]
fn limit_bytes_kept_for_requests_in_flight_makes_the_frontend_wait() {
    let d = start(&[]);
    add_holding(&d, "ve");
    let base = baseline(&d, "vb");
    let mut f = connect(&d, "ve", 1);
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    const TIB: u64 = 1 << 40;
    let big = memfd("sparse", 9 * TIB).unwrap();
    // Guest RAM plus 9 TiB of (sparse) hotplugged memory: each table is 9 TiB of new mappings.
    let table = [region(f.file.as_raw_fd(), 0, MEM_SIZE, 0, 0), region(big.as_raw_fd(), TIB, 9 * TIB, TIB, 0)];
    f.fe.set_mem_table(&table).unwrap();
    // Kept at the third swap: the tables of requests 0 and 1 and the current one, 27 TiB; 9 TiB
    // more would make 36 > 32.
    let h = swap_until_held(&d, &mut f, &table, 10);
    assert!(h >= 2, "held back at table {h}");
    assert!(d.log().contains("27 TiB) still mapped for requests in flight, plus 9 TiB new"), "{}", d.log());
    assert!(d.log().contains("limits: 64 tables, 32 TiB per connection"), "{}", d.log());
    drop(f);
    back_to(&d, &["vb", "ve"], &base);
}

#[test]
fn limit_file_descriptors_per_message() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let sock = sock(&d, "vb");
    let efd = EventFd::new(0).unwrap();
    // More descriptors than any message may carry: refused before the vhost crate reads it
    // (which would drop the message and lose its place in the stream).
    for (i, (n, needle)) in [
        (33usize, "carries 33 file descriptors; the limit is 32"),
        (253, "carries 253 file descriptors; the limit is 32"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = Raw::connect(&sock);
        r.send(SET_VRING_KICK, NEED_REPLY, &0u64.to_le_bytes(), &vec![efd.as_raw_fd(); n]).unwrap();
        assert!(r.closed_within(T), "{n} fds: closed");
        wait_log_n(&d, needle, 1);
        assert_eq!(log_count(&d, "closing the connection"), i + 1);
    }
    // Descriptors on a message that takes none, and two on one that takes one.
    let mut r = Raw::connect(&sock);
    r.send(GET_FEATURES, 0, &[], &[efd.as_raw_fd()]).unwrap();
    assert!(r.closed_within(T));
    let mut r = Raw::connect(&sock);
    r.send(SET_VRING_KICK, 0, &0u64.to_le_bytes(), &[efd.as_raw_fd(), efd.as_raw_fd()]).unwrap();
    assert!(r.closed_within(T));
    wait_log_n(&d, "closing the connection: invalid message", 2);
    // A message larger than the protocol allows (partial ones: see the connection churn test).
    let mut r = Raw::connect(&sock);
    r.send(SET_OWNER, 0, &vec![0; 0x2000], &[]).unwrap();
    assert!(r.closed_within(T));
    wait_log_n(&d, "closing the connection: invalid message", 3);
    back_to(&d, &["vb"], &base);
}

#[test]
fn limit_queues_and_queue_size() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let mut fe = handshake(&sock(&d, "vb"));
    assert_eq!(fe.get_queue_num().unwrap(), 16);
    drop(fe);
    // (A frontend that asked would not send the indices below: this one did not ask.)
    let fe = handshake(&sock(&d, "vb"));
    assert!(fe.set_vring_num(16, 64).is_err(), "queue 17 of 16");
    assert!(d.wait_log("vring index 16 is beyond the 16 queues offered", T));
    assert!(fe.set_vring_num(0, 0).is_err(), "size 0");
    assert!(d.wait_log("size 0 is not between 1 and 32768", T));
    assert!(fe.set_vring_num(0, 40000).is_err(), "size 40000");
    assert!(d.wait_log("size 40000 is not between 1 and 32768", T));
    assert!(fe.set_vring_base(200, 0).is_err());
    // Errors vstor can report do not end the connection...
    assert!(!closed(&fe));
    // ...but a stream of them does.
    for _ in 0..70 {
        let _ = fe.set_vring_num(100, 64);
    }
    assert!(closed(&fe));
    assert!(d.wait_log("too many failed requests; closing the connection", T));
    back_to(&d, &["vb"], &base);
}

#[test]
fn limit_one_frontend_per_controller() {
    let d = start(&[]);
    let base = baseline(&d, "vb");
    let sock = sock(&d, "vb");
    let mut f = connect(&d, "vb", 1);
    // (Once a request completed, vstor has set the queue up and holds its descriptors.)
    submit(&mut f, 0, 1, false, 0, &[0; 512]);
    f.wait_used(0, 1, T);
    let with_one = d.fd_count();
    // Others are closed (a few after a grace period, the rest at once), however many, and hold
    // nothing.
    let mut others: Vec<Raw> = (0..300).map(|_| Raw::connect(&sock)).collect();
    for (i, r) in others.iter_mut().enumerate() {
        assert!(r.closed_within(T), "connection {i} is closed");
    }
    drop(others);
    assert!(d.wait_log("a frontend is already connected: closed another connection", T), "{}", d.log());
    assert!(d.fd_count() <= with_one + 2, "{} fds with one frontend, {} now", with_one, d.fd_count());
    // The first one is unaffected.
    submit(&mut f, 0, 0, true, 0, &[9; 512]);
    f.wait_used(0, 1, T);
    assert_eq!(status(&f, 0, 0), S_OK);
    // A connection made while the frontend is connected waits a little: if the frontend leaves
    // (a reconnect seen out of order), it is served.
    let sock2 = sock.clone();
    let next = std::thread::spawn(move || {
        let mut g = TestFrontend::connect(&sock2, 1, 64, EVENT_IDX | INDIRECT);
        submit(&mut g, 0, 0, false, 0, &[0; 512]);
        g.wait_used(0, 1, T);
        assert_eq!(data(&g, 0, 0, 512), vec![9; 512]);
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(f);
    next.join().unwrap();
    f = connect(&d, "vb", 1);
    // A frontend that reconnects right after closing is served, not refused.
    for _ in 0..20 {
        drop(f);
        f = connect(&d, "vb", 1);
        submit(&mut f, 0, 0, false, 0, &[0; 512]);
        f.wait_used(0, 1, T);
        assert!(status(&f, 0, 0) == S_OK && data(&f, 0, 0, 512) == vec![9; 512]);
    }
    drop(f);
    back_to(&d, &["vb"], &base);
}

/// A frontend that shrinks its memory file under vstor: vstor's next touch of a page past the new
/// end raises SIGBUS, which by default kills the daemon and every VM it serves. vstor asks for a
/// seal against shrinking (F_SEAL_SHRINK), which holds for QEMU's sealable memfds; a memfd created
/// without MFD_ALLOW_SEALING, or a file on tmpfs or hugetlbfs, cannot be sealed. vstor-mem's SIGBUS
/// handler maps a zero page over each lost page instead, and the daemon logs it.
#[test]
fn a_frontend_truncating_its_memory_file_does_not_kill_vstor() {
    let mut d = start(&[]);
    let sock = sock(&d, "vb");
    // SAFETY: memfd_create with a NUL-terminated name; no sealing allowed.
    let fd = unsafe { libc::memfd_create(c"unsealable".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is new and owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE).unwrap();
    let mem = vstor_mem::GuestMemory::new(vec![vstor_mem::Region::map(&file, 0, MEM_SIZE, 0, 0).unwrap()]).unwrap();
    let drv = vstor_virtio::driver::SplitDriver::new_at(Arc::new(mem), 64, 0x1000);
    let mut fe = handshake(&sock);
    fe.set_mem_table(&[region(file.as_raw_fd(), 0, MEM_SIZE, 0, 0)]).unwrap();
    fe.set_vring_num(0, 64).unwrap();
    fe.set_vring_addr(0, &ring_config(drv.desc, drv.avail, drv.used)).unwrap();
    let (kick, call) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    drop(drv);
    file.set_len(0).unwrap();
    kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let exit = d.child.try_wait().unwrap();
    assert!(exit.is_none(), "vstor died ({exit:?}):\n{}", d.log());
    assert!(d.wait_log("truncated the file behind guest memory", Duration::from_secs(5)), "{}", d.log());
}
