//! `virtio_blk_request`: virtio-blk requests a guest wrote, through vstor's queue poller and
//! virtio-blk handler (`vstor_vhost::VirtqPoller` + `blk::BlkHandler`) into a malloc or null bdev,
//! on a local reactor driven by hand, as the reactor thread would.
//!
//! Input layout:
//!
//! ```text
//! u8 flags   F_* below
//! u8 size    queue size (as in `virtio`: split 1 << (size % 8) or raw with bit 7; packed raw)
//! u8 flags2  G_* below
//! u8 reserved
//! memory image (default ring layout of `virtio`: descriptors 0x0, driver area 0x1000, device
//! area 0x2000 / 0x1004; requests from 0x3000)
//! ```

use std::cell::RefCell;
use std::sync::Arc;

use vstor_mem::{memfd, DirtyLog};
use vstor_reactor::{Mode, Poller, Reactor, ReactorConfig};
use vstor_vhost::blk::BlkHandler;
use vstor_vhost::queue::QueueStart;
use vstor_vhost::{BlkDevice, Coalescing, VirtqPoller};

use crate::bdevs;
use crate::guest::Guest;
use crate::virtio::{self, F_EVENT_IDX, F_INDIRECT};
use crate::Reader;

pub const F_PACKED: u8 = 1;
pub const F_EVENT: u8 = 2;
pub const F_IND: u8 = 4;
/// 4096-byte blocks (else 512).
pub const F_4K: u8 = 8;
pub const F_READONLY: u8 = 16;
pub const F_DISCARD: u8 = 32;
pub const F_WRITE_ZEROES: u8 = 64;
/// Migration dirty logging on.
pub const F_DIRTY_LOG: u8 = 128;
/// Bits 0-1: the bdev kind (`bdevs::Kind::from_bits`: malloc, null, cached RAM).
pub const G_KIND: u8 = 3;
/// A read-only bdev (as opposed to a read-only controller).
pub const G_BDEV_RO: u8 = 4;

pub const HEADER_LEN: usize = 4;
const DISK_BYTES: u64 = 1 << 20;

thread_local! {
    static ENV: RefCell<Option<Env>> = const { RefCell::new(None) };
}

struct Env {
    r: Reactor,
    guest: Guest,
    log: Arc<DirtyLog>,
    _log_file: std::fs::File,
}

impl Env {
    fn new() -> Self {
        let (r, _h) = Reactor::new_local(ReactorConfig { mode: Mode::Poll, pin: false, ..Default::default() })
            .expect("local reactor");
        let f = memfd("fuzz-dirty-log", 4096).expect("memfd");
        let log = Arc::new(DirtyLog::map(&f, 4096, 0).expect("dirty log"));
        Self { r, guest: Guest::new(), log, _log_file: f }
    }
}

/// virtio-blk feature bits (virtio 5.2.3).
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub fn request(data: &[u8]) {
    let mut r = Reader::new(data);
    let f = r.u8();
    let packed = f & F_PACKED != 0;
    let size = virtio::queue_size(packed, r.u8());
    let g = r.u8();
    let _ = r.u8();
    let mut ring_flags = 0;
    if f & F_EVENT != 0 {
        ring_flags |= F_EVENT_IDX;
    }
    if f & F_IND != 0 {
        ring_flags |= F_INDIRECT;
    }
    let base = if packed { virtio::PACKED_BASE } else { 0 };
    let params = virtio::params(packed, ring_flags, size, base, [0; 3]);
    let mut features = 0;
    if f & F_DISCARD != 0 {
        features |= VIRTIO_BLK_F_DISCARD;
    }
    if f & F_WRITE_ZEROES != 0 {
        features |= VIRTIO_BLK_F_WRITE_ZEROES;
    }
    ENV.with(|env| {
        let mut env = env.borrow_mut();
        let env = env.get_or_insert_with(Env::new);
        env.guest.load(r.rest());
        let dev = Arc::new(BlkDevice::new(
            bdevs::create(
                bdevs::Kind::from_bits(g),
                "fuzz0",
                if f & F_4K != 0 { 4096 } else { 512 },
                DISK_BYTES,
                g & G_BDEV_RO != 0,
            ),
            f & F_READONLY != 0,
            1,
            "fuzz",
        ));
        let handler = BlkHandler::new(dev, &mut env.r, size, features).expect("handler");
        let start = QueueStart {
            params,
            mem: env.guest.mem.clone(),
            index: 0,
            name: Arc::from("fuzz"),
            kick: None,
            call: None,
            err: None,
            coalescing: Arc::new(Coalescing::default()),
            inflight: None,
            features,
            dirty: (f & F_DIRTY_LOG != 0).then(|| (env.log.clone(), params.addrs.device)),
        };
        let Ok(mut poller) = VirtqPoller::new(start, Box::new(handler), env.r.epoll()) else { return };
        // One pass takes every chain (queues here are smaller than the poll budget); RAM and null
        // bdevs complete inline or on the reactor's next pass.
        let _ = poller.poll();
        for _ in 0..4 {
            if poller.inflight() == 0 {
                break;
            }
            env.r.run_once();
        }
        assert_eq!(poller.inflight(), 0, "a request on a RAM/null bdev was never completed");
        let _ = poller.poll();
        if crate::trace() {
            eprintln!("blk: {} requests completed", poller.completed());
        }
        let _ = poller.arm();
        poller.disarm();
        drop(poller);
        env.r.run_once();
    });
}
