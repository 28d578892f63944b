//! `vhost_user_msgs`: a vhost-user frontend's message stream, written to the socket of a vstor
//! vhost-user-blk or vhost-user-scsi controller (`vstor_vhost::VhostManager`, its connection
//! thread, sessions and queue pollers on one reactor), with file descriptors attached as
//! SCM_RIGHTS the way QEMU sends them.
//!
//! Each input is one connection: the harness connects, sends the messages, half-closes, and reads
//! until the controller closes its end, which it does only after tearing the session down (rings
//! stopped, in-flight requests drained). So every input starts from a fresh, idle controller.
//!
//! Input layout:
//!
//! ```text
//! u8  select      bit 0: the SCSI controller (else blk)
//! u16 image_len, image_len bytes   copied to the start of the guest memfd (64 KiB, zeroed)
//! then messages until the input ends (at most MAX_MSGS):
//!   u8  ctl       bits 0-1: number of fds to attach; bits 2-3: kind of the first (then the next
//!                 kinds in turn): 0 guest memfd, 1 an eventfd, 2 a second memfd (log, in-flight)
//!                 bit 4: after sending, signal every eventfd sent so far (a guest kick)
//!   u32 request, u32 flags, u32 size     the vhost-user header, as is
//!   payload: `size` bytes, or as many as the input has left
//! ```
//!
//! Ring memory for the seeds: the guest memfd is one region at guest address 0, frontend address
//! [`USER_ADDR`]; rings at 0x0 / 0x1000 / 0x2000 and requests from 0x3000 as in `virtio`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vstor_bdev::Bdev;
use vstor_mem::memfd;
use vstor_reactor::{CpuMask, Mode, ReactorConfig, Reactors};
use vstor_vhost::{BlkOptions, VhostManager};

use crate::bdevs;
use crate::{Reader, Writer};

pub const GUEST_SIZE: u64 = 64 << 10;
pub const AUX_SIZE: u64 = 64 << 10;
/// The frontend (QEMU) virtual address of guest address 0 in the seeds.
pub const USER_ADDR: u64 = 0x7f00_0000_0000;
pub const MAX_MSGS: usize = 64;
/// Eventfds per connection (kick / call / err of a few rings).
const EVENTFDS: usize = 6;

pub const FD_GUEST: u8 = 0;
pub const FD_EVENT: u8 = 1;
pub const FD_AUX: u8 = 2;
pub const CTL_KICK: u8 = 16;

// vhost-user requests (frontend to backend).
pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const RESET_OWNER: u32 = 4;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const SET_VRING_ERR: u32 = 14;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_CONFIG: u32 = 24;
pub const SET_CONFIG: u32 = 25;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const RESET_DEVICE: u32 = 34;
pub const GET_MAX_MEM_SLOTS: u32 = 36;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;
/// Header flags: protocol version 1.
pub const VERSION: u32 = 1;
pub const NEED_REPLY: u32 = 1 << 3;
/// SET_VRING_KICK/CALL/ERR payload bit: no file descriptor.
pub const NOFD: u64 = 1 << 8;

struct Env {
    /// Keeps the controllers (and their threads) alive; dropped before the reactors.
    _vhost: VhostManager,
    blk_sock: PathBuf,
    scsi_sock: PathBuf,
    guest: std::fs::File,
    aux: std::fs::File,
    _bdevs: Vec<Arc<Bdev>>,
    /// Dropped last: the controllers' queues run on it.
    _reactors: Reactors,
}

static ENV: OnceLock<Mutex<Env>> = OnceLock::new();

impl Env {
    fn new() -> Self {
        let dir = crate::sandbox("vhost");
        let reactors = Reactors::start(
            &CpuMask::from_cores(0..1),
            ReactorConfig {
                mode: Mode::Adaptive,
                idle_threshold: Duration::from_micros(200),
                pin: false,
                ..Default::default()
            },
        )
        .expect("reactors");
        let vhost = VhostManager::new(dir.clone(), 0o600, reactors.handles().to_vec(), true);
        let b1 = bdevs::create(bdevs::Kind::Cached, "vfuzz_blk", 512, 1 << 20, false);
        let b2 = bdevs::create(bdevs::Kind::Malloc, "vfuzz_scsi", 512, 1 << 20, false);
        let o = BlkOptions { packed_ring: true, ..Default::default() };
        vhost.create_blk("blk.sock", b1.clone(), o).expect("blk controller");
        vhost.create_scsi("scsi.sock", None, false).expect("scsi controller");
        vhost.scsi_add_target("scsi.sock", Some(0), b2.clone()).expect("scsi target");
        let guest = memfd("fuzz-vhost-guest", GUEST_SIZE).expect("memfd");
        let aux = memfd("fuzz-vhost-aux", AUX_SIZE).expect("memfd");
        Self {
            _vhost: vhost,
            blk_sock: dir.join("blk.sock"),
            scsi_sock: dir.join("scsi.sock"),
            guest,
            aux,
            _bdevs: vec![b1, b2],
            _reactors: reactors,
        }
    }
}

pub(crate) fn eventfd() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd has no memory arguments; it returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is fresh and owned by nobody else.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS) in one message. Errors (the controller closed
/// the connection) are returned, not raised: the frontend just stops.
pub(crate) fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0usize;
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        let mut iov = libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
        // Room for one SCM_RIGHTS control message of up to 3 fds (u64 for alignment).
        let mut cbuf = [0u64; 8];
        // SAFETY: an all-zero msghdr is a valid "no name, no control" header; fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // The fds go with the first part only.
        if sent == 0 && !fds.is_empty() {
            let fd_bytes = std::mem::size_of_val(fds);
            let fd_len = u32::try_from(fd_bytes).expect("few fds");
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
            assert!(space <= std::mem::size_of_val(&cbuf), "control buffer too small");
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: `msg_control` points to `space` writable, 8-aligned bytes, enough for one
            // header and `fds` (checked above), so CMSG_FIRSTHDR is non-null and CMSG_DATA has
            // room for `fd_bytes` bytes.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_len) as usize;
                std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
            }
        }
        // SAFETY: `msg` points to a valid iovec over `rest` and (first round) the control buffer,
        // all alive for the call; MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

pub fn msgs(data: &[u8]) {
    let mut r = Reader::new(data);
    let select = r.u8();
    let env = ENV.get_or_init(|| Mutex::new(Env::new()));
    let env = env.lock().unwrap_or_else(|e| e.into_inner());
    static ZERO: [u8; GUEST_SIZE as usize] = [0; GUEST_SIZE as usize];
    env.guest.write_all_at(&ZERO, 0).expect("zero guest memory");
    env.aux.write_all_at(&ZERO[..AUX_SIZE as usize], 0).expect("zero aux memory");
    let image_len = usize::from(r.u16());
    let image = r.take(image_len);
    env.guest.write_all_at(image, 0).expect("guest image");
    let events: Vec<std::fs::File> = (0..EVENTFDS).map(|_| eventfd()).collect();
    let path = if select & 1 != 0 { &env.scsi_sock } else { &env.blk_sock };
    let mut sock = UnixStream::connect(path).expect("connect to the controller");
    let mut next_event = 0usize;
    let mut sent_events = Vec::new();
    for _ in 0..MAX_MSGS {
        if r.is_empty() {
            break;
        }
        let ctl = r.u8();
        let hdr: [u8; 12] = r.array();
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let payload = r.take(usize::try_from(size).unwrap_or(usize::MAX));
        let mut fds = Vec::new();
        for k in 0..(ctl & 3) {
            let kind = (((ctl >> 2) & 3) + k) % 3;
            fds.push(match kind {
                FD_GUEST => env.guest.as_raw_fd(),
                FD_EVENT => {
                    let e = &events[next_event % EVENTFDS];
                    next_event += 1;
                    sent_events.push(e.as_raw_fd());
                    e.as_raw_fd()
                }
                _ => env.aux.as_raw_fd(),
            });
        }
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(payload);
        if send_with_fds(&sock, &bytes, &fds).is_err() {
            break;
        }
        if ctl & CTL_KICK != 0 {
            for e in &events {
                let _ = (&*e).write(&1u64.to_ne_bytes());
            }
            // Give the reactor a moment to take the requests before the next message (which may
            // stop the ring).
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
    // Returns once the controller has torn the session down and closed its end.
    let mut replies = Vec::new();
    let _ = sock.read_to_end(&mut replies);
    drop(events);
}

/// The input prefix: controller and memory image.
pub fn input(scsi: bool, image: &[u8]) -> Writer {
    let mut w = Writer::default();
    w.u8(u8::from(scsi)).u16(u16::try_from(image.len()).expect("image under 64 KiB")).bytes(image);
    w
}

/// Appends a message with `ctl` (fd count and kinds) and `payload`.
pub fn msg(w: &mut Writer, ctl: u8, request: u32, flags: u32, payload: &[u8]) {
    w.u8(ctl).u32(request).u32(VERSION | flags).u32(u32::try_from(payload.len()).expect("small payload"));
    w.bytes(payload);
}
