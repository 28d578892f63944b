//! `vfio_user_msgs`: a vfio-user client's message stream, written to the socket of a vstor
//! NVMe/vfio-user endpoint (`vstor_vfio_user::server::VfioUserEndpoint`, its connection thread and
//! an NVMe controller with one namespace on one reactor), with file descriptors attached as
//! SCM_RIGHTS the way QEMU and SPDK's client send them (DMA memory, interrupt eventfds).
//!
//! Each input is one connection: the harness connects, sends the messages (a second thread
//! drains the replies, so a large REGION_READ reply never blocks the server against the
//! harness), half-closes, and waits until the endpoint has torn the session down (controller
//! reset, DMA maps and eventfds dropped) and counted it. A session that does not end within
//! [`SESSION_TIMEOUT`] is a hang: the harness panics. So every input starts from an idle endpoint.
//!
//! Input layout:
//!
//! ```text
//! u8  pre         bit 0: send a valid VERSION (0.2, no capabilities) first
//! then messages until the input ends (at most MAX_MSGS):
//!   u8  ctl       bits 0-1: number of fds to attach; bits 2-3: kind of the first (then the next
//!                 kinds in turn): 0 the DMA memfd, 1 an eventfd, 2 a regular file (not an eventfd,
//!                 not mappable read-write: opened read-only); bit 5: every fd of the first kind
//!   u16 command, u32 flags    the rest of the header is filled in: id counts up, size is 16 +
//!                             the payload length (unless ctl bit 4: then the next u32 is used
//!                             as size, as is), error 0
//!   u16 payload_len, payload  (as many bytes as the input has left)
//! ```
//!
//! The DMA memfd is [`DMA_SIZE`] bytes; the seeds map it at IOVA [`DMA_IOVA`].

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vstor_bdev::Bdev;
use vstor_mem::memfd;
use vstor_nvme::NsIds;
use vstor_reactor::Reactors;
use vstor_vfio_user::server::VfioUserEndpoint;

use crate::bdevs;
use crate::vhost_user::{eventfd, send_with_fds};
use crate::{Reader, Writer};

pub const DMA_SIZE: u64 = 256 << 10;
pub const DMA_IOVA: u64 = 0x1_0000_0000;
pub const MAX_MSGS: usize = 64;
/// Eventfds per connection (MSI-X vectors, INTx, ERR/REQ).
const EVENTFDS: usize = 6;
/// How long the endpoint may take to end a session after the client half-closed.
const SESSION_TIMEOUT: Duration = Duration::from_secs(20);

pub const FD_DMA: u8 = 0;
pub const FD_EVENT: u8 = 1;
pub const FD_FILE: u8 = 2;
/// `ctl` bit: the header's size field comes from the input.
pub const CTL_RAW_SIZE: u8 = 16;
/// `ctl` bit: every fd attached is of the first kind.
pub const CTL_SAME_KIND: u8 = 32;

struct Env {
    endpoint: VfioUserEndpoint,
    sock: PathBuf,
    dma: std::fs::File,
    file: std::fs::File,
    _bdev: Arc<Bdev>,
    /// Dropped last: the controller's queues run on it.
    _reactors: Reactors,
}

static ENV: OnceLock<Mutex<Env>> = OnceLock::new();

impl Env {
    fn new() -> Self {
        let dir = crate::sandbox("vfio-user");
        let (reactors, cfg) = crate::nvme::reactor_and_config(true);
        let bdev = bdevs::create(bdevs::Kind::Malloc, "vfu_fuzz1", 512, 1 << 20, false);
        let sock = dir.join("cntrl");
        let b = bdev.clone();
        let endpoint = VfioUserEndpoint::start_with(cfg, &sock, 0o600, move |c| {
            c.add_namespace(Some(1), b, NsIds::default()).map(|_| ())
        })
        .expect("vfio-user endpoint");
        let dma = memfd("fuzz-vfio-user-dma", DMA_SIZE).expect("memfd");
        let path = dir.join("plain-file");
        std::fs::write(&path, [0u8; 4096]).expect("plain file");
        let file = std::fs::File::open(&path).expect("plain file");
        Self { endpoint, sock, dma, file, _bdev: bdev, _reactors: reactors }
    }
}

pub fn msgs(data: &[u8]) {
    let mut r = Reader::new(data);
    let pre = r.u8();
    let env = ENV.get_or_init(|| Mutex::new(Env::new()));
    let env = env.lock().unwrap_or_else(|e| e.into_inner());
    static ZERO: [u8; DMA_SIZE as usize] = [0; DMA_SIZE as usize];
    env.dma.write_all_at(&ZERO, 0).expect("zero DMA memory");
    let sessions = env.endpoint.sessions();
    let events: Vec<std::fs::File> = (0..EVENTFDS).map(|_| eventfd()).collect();
    let sock = UnixStream::connect(&env.sock).expect("connect to the endpoint");
    let mut reader = sock.try_clone().expect("clone the socket");
    let drain = std::thread::spawn(move || {
        let mut replies = Vec::new();
        let _ = reader.read_to_end(&mut replies);
    });
    let mut id = 0u16;
    let mut send = |command: u16, flags: u32, size: Option<u32>, payload: &[u8], fds: &[RawFd]| {
        id = id.wrapping_add(1);
        let size = size.unwrap_or_else(|| u32::try_from(16 + payload.len()).expect("small payload"));
        let mut bytes = Vec::with_capacity(16 + payload.len());
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes.extend_from_slice(&command.to_le_bytes());
        bytes.extend_from_slice(&size.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(payload);
        send_with_fds(&sock, &bytes, fds)
    };
    let mut ok = true;
    if pre & 1 != 0 {
        ok = send(CMD_VERSION, 0, None, &version(), &[]).is_ok();
    }
    let mut next_event = 0usize;
    for _ in 0..MAX_MSGS {
        if r.is_empty() || !ok {
            break;
        }
        let ctl = r.u8();
        let command = r.u16();
        let flags = r.u32();
        let size = if ctl & CTL_RAW_SIZE != 0 { Some(r.u32()) } else { None };
        let len = usize::from(r.u16());
        let payload = r.take(len);
        let mut fds = Vec::new();
        for k in 0..(ctl & 3) {
            let step = if ctl & CTL_SAME_KIND != 0 { 0 } else { k };
            fds.push(match (((ctl >> 2) & 3) + step) % 3 {
                FD_DMA => env.dma.as_raw_fd(),
                FD_EVENT => {
                    let e = &events[next_event % EVENTFDS];
                    next_event += 1;
                    e.as_raw_fd()
                }
                _ => env.file.as_raw_fd(),
            });
        }
        ok = send(command, flags, size, payload, &fds).is_ok();
    }
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let start = Instant::now();
    while env.endpoint.is_connected() || env.endpoint.sessions() == sessions {
        assert!(
            start.elapsed() < SESSION_TIMEOUT,
            "the vfio-user endpoint did not end the session within {SESSION_TIMEOUT:?} of the client's EOF"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    drain.join().expect("reply reader");
    drop(events);
}

// vfio-user commands.
pub const CMD_VERSION: u16 = 1;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_DEVICE_GET_INFO: u16 = 4;
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_DEVICE_RESET: u16 = 13;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const REGION_BAR0: u32 = 0;
pub const REGION_BAR4: u32 = 4;
pub const REGION_CONFIG: u32 = 7;
pub const IRQ_INTX: u32 = 0;
pub const IRQ_MSIX: u32 = 2;
pub const IRQ_DATA_NONE: u32 = 1;
pub const IRQ_DATA_EVENTFD: u32 = 4;
pub const IRQ_ACTION_MASK: u32 = 1 << 3;
pub const IRQ_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_ACTION_TRIGGER: u32 = 1 << 5;

/// A VERSION payload: 0.2 with a capabilities document.
pub fn version() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#);
    v.push(0);
    v
}

/// The input prefix.
pub fn input(send_version: bool) -> Writer {
    let mut w = Writer::default();
    w.u8(u8::from(send_version));
    w
}

/// Appends a message with `ctl` (fd count and kinds), `command`, `flags` and `payload`.
pub fn msg(w: &mut Writer, ctl: u8, command: u16, flags: u32, payload: &[u8]) {
    w.u8(ctl & !CTL_RAW_SIZE).u16(command).u32(flags);
    w.u16(u16::try_from(payload.len()).expect("small payload")).bytes(payload);
}

/// Appends a message whose header claims `size` bytes whatever the payload.
pub fn msg_raw_size(w: &mut Writer, ctl: u8, command: u16, flags: u32, size: u32, payload: &[u8]) {
    w.u8(ctl | CTL_RAW_SIZE).u16(command).u32(flags).u32(size);
    w.u16(u16::try_from(payload.len()).expect("small payload")).bytes(payload);
}

/// A DMA_MAP payload (read-write unless `flags` says otherwise).
pub fn dma_map(flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    let mut v = Writer::default();
    v.u32(32).u32(flags).u64(offset).u64(iova).u64(size);
    v.0
}

/// A DMA_UNMAP payload.
pub fn dma_unmap(flags: u32, iova: u64, size: u64) -> Vec<u8> {
    let mut v = Writer::default();
    v.u32(24).u32(flags).u64(iova).u64(size);
    v.0
}

/// A REGION_READ/REGION_WRITE payload.
pub fn access(region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Writer::default();
    v.u64(offset).u32(region).u32(count).bytes(data);
    v.0
}

/// A SET_IRQS payload (data, if any, follows: BOOL bytes).
pub fn irq_set(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut v = Writer::default();
    v.u32(20).u32(flags).u32(index).u32(start).u32(count);
    v.0
}

/// A 16-byte info request (DEVICE_GET_INFO, GET_REGION_INFO / GET_IRQ_INFO of `index`).
pub fn info(argsz: u32, index: u32) -> Vec<u8> {
    let mut v = Writer::default();
    v.u32(argsz).u32(0).u32(index).u32(0);
    v.0
}
