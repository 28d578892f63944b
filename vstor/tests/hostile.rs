//! A hostile (or just buggy) driver, scripted: malformed chains, bad requests, index jumps and
//! misuse of the protocol. vstor must answer with an error status (or mark only the guilty queue
//! broken), never crash, and keep serving other queues and the next client.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::frontend::*;
use common::*;
use serde_json::json;
use vstor_virtio::driver::desc_bytes;

const T: Duration = Duration::from_secs(10);
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const IN: u32 = 0;
const OUT: u32 = 1;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;

fn daemon(readonly: bool) -> Daemon {
    let d = Daemon::start(&["--cpumask", "0x3"]);
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 8192, "block_size": 512}));
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vb", "dev_name": "M0", "readonly": readonly, "cpumask": "0x3"}),
    );
    d
}

fn connect(d: &Daemon, nq: usize) -> TestFrontend {
    TestFrontend::connect(&d.dir.path().join("vb"), nq, 64, EVENT_IDX | INDIRECT)
}

/// Lays out a request (header, data, status) at `base` and makes it available; returns the
/// status byte address.
/// The chain uses descriptors `head..head+3`: callers space their heads accordingly.
fn request(f: &mut TestFrontend, q: usize, head: u16, rtype: u32, sector: u64, data: Option<(&[u8], bool)>) -> u64 {
    let base = DATA + u64::from(head) * 0x1_0000 + q as u64 * 0x40_0000;
    f.write(base, &blk_header(rtype, sector));
    let status = base + 0x8000;
    f.write(status, &[0xff]);
    let mut bufs = vec![(base, 16u32, false)];
    if let Some((d, device_writes)) = data {
        f.write(base + 0x1000, d);
        bufs.push((base + 0x1000, d.len() as u32, device_writes));
    }
    bufs.push((status, 1, true));
    f.queues[q].d.add(head, &bufs);
    f.queues[q].kick.write(1).unwrap();
    status
}

fn status(f: &TestFrontend, at: u64) -> u8 {
    f.read(at, 1)[0]
}

#[test]
fn bad_requests_get_the_right_status_and_good_ones_still_work() {
    let d = daemon(false);
    let mut f = connect(&d, 2);
    // A good write and read back.
    let s = request(&mut f, 0, 0, OUT, 8, Some((&[0x5a; 4096], false)));
    assert_eq!(f.wait_used(0, 1, T), vec![(0, 1)]);
    assert_eq!(status(&f, s), S_OK);
    let s = request(&mut f, 0, 3, IN, 8, Some((&[0; 4096], true)));
    assert_eq!(f.wait_used(0, 1, T), vec![(3, 4097)]);
    assert_eq!(status(&f, s), S_OK);
    assert_eq!(f.read(DATA + 3 * 0x1_0000 + 0x1000, 4096), vec![0x5a; 4096]);
    // Unknown type: UNSUPP. Past the end: IOERR. Not a multiple of 512: IOERR.
    let s1 = request(&mut f, 0, 12, 0x77, 0, None);
    let s2 = request(&mut f, 0, 15, IN, 8192, Some((&[0; 512], true)));
    let s3 = request(&mut f, 0, 18, OUT, 0, Some((&[1; 100], false)));
    f.wait_used(0, 3, T);
    assert_eq!((status(&f, s1), status(&f, s2), status(&f, s3)), (S_UNSUPP, S_IOERR, S_IOERR));
    // GET_ID: the bdev name.
    let s = request(&mut f, 0, 21, GET_ID, 0, Some((&[0; 20], true)));
    let u = f.wait_used(0, 1, T);
    assert_eq!((u[0].0, status(&f, s)), (21, S_OK));
    assert_eq!(&f.read(DATA + 21 * 0x1_0000 + 0x1000, 2), b"M0");
    // Discard with reserved flags: UNSUPP. Write-zeroes with two segments: IOERR.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&0u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..16].copy_from_slice(&2u32.to_le_bytes());
    let s1 = request(&mut f, 0, 24, DISCARD, 0, Some((&seg, false)));
    let mut two = [0u8; 32];
    two[8..12].copy_from_slice(&8u32.to_le_bytes());
    two[24..28].copy_from_slice(&8u32.to_le_bytes());
    let s2 = request(&mut f, 0, 27, WRITE_ZEROES, 0, Some((&two, false)));
    f.wait_used(0, 2, T);
    assert_eq!((status(&f, s1), status(&f, s2)), (S_UNSUPP, S_IOERR));
    // A header shorter than 16 bytes: IOERR.
    let base = DATA + 0x30_0000;
    f.queues[0].d.add(30, &[(base, 8, false), (base + 0x100, 1, true)]);
    f.queues[0].kick.write(1).unwrap();
    f.wait_used(0, 1, T);
    assert_eq!(status(&f, base + 0x100), S_IOERR);
    // No device-writable byte at all: nothing can be reported; the chain comes back with length 0.
    f.queues[0].d.add(33, &[(base, 16, false)]);
    f.queues[0].kick.write(1).unwrap();
    assert_eq!(f.wait_used(0, 1, T), vec![(33, 0)]);
    assert!(!f.errored(0));
}

#[test]
fn malformed_chains_are_returned_and_the_queue_keeps_serving() {
    let d = daemon(false);
    let mut f = connect(&d, 2);
    let q = &mut f.queues[0].d;
    // A loop.
    q.set_desc(0, DATA, 16, 1, 1);
    q.set_desc(1, DATA, 16, 1, 0);
    q.publish(0);
    // Next index out of range.
    q.set_desc(2, DATA, 16, 1, 200);
    q.publish(2);
    // A buffer outside guest memory, and one straddling its end.
    q.add(3, &[(DATA, 16, false), (MEM_SIZE + 4096, 512, true), (DATA + 64, 1, true)]);
    q.add(6, &[(DATA, 16, false), (MEM_SIZE - 256, 512, true), (DATA + 64, 1, true)]);
    // Indirect inside indirect.
    let table = DATA + 0x20_0000;
    let nested = DATA + 0x21_0000;
    f.mem.write(nested, &desc_bytes(table, 32, 4, 0)).unwrap();
    f.mem.write(table, &desc_bytes(DATA, 16, 0, 0)).unwrap();
    let q = &mut f.queues[0].d;
    q.set_desc(9, nested, 16, 4, 0);
    q.publish(9);
    // Readable after writable.
    q.add(10, &[(DATA, 16, true), (DATA + 16, 16, false)]);
    f.queues[0].kick.write(1).unwrap();
    let mut heads: Vec<u32> = f.wait_used(0, 6, T).iter().map(|u| u.0).collect();
    heads.sort();
    assert_eq!(heads, vec![0, 2, 3, 6, 9, 10], "every bad chain is returned");
    assert!(!f.errored(0), "bad chains with a known head do not break the queue");
    // The same queue and the other one still serve good requests.
    for q in [0, 1] {
        let s = request(&mut f, q, 20, OUT, 0, Some((&[7; 512], false)));
        f.wait_used(q, 1, T);
        assert_eq!(status(&f, s), S_OK, "queue {q}");
    }
}

#[test]
fn an_index_jump_breaks_only_that_queue_and_the_next_client_is_served() {
    let d = daemon(false);
    let mut f = connect(&d, 2);
    // The driver claims 100 new buffers in a 64-entry queue.
    let avail = f.queues[0].d.avail;
    vstor_virtio::driver::w16(&f.mem, avail + 2, 100);
    f.queues[0].kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + T;
    while !f.errored(0) {
        assert!(std::time::Instant::now() < deadline, "the error eventfd was not signalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Queue 1 carries on.
    let s = request(&mut f, 1, 1, OUT, 0, Some((&[1; 512], false)));
    f.wait_used(1, 1, T);
    assert_eq!(status(&f, s), S_OK);
    // A head index beyond the queue on queue 1 breaks it too.
    f.queues[1].d.publish(999);
    f.queues[1].kick.write(1).unwrap();
    let deadline = std::time::Instant::now() + T;
    while !f.errored(1) {
        assert!(std::time::Instant::now() < deadline, "head out of range not reported");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(f);
    // A new connection starts clean.
    let mut g = connect(&d, 1);
    let s = request(&mut g, 0, 0, IN, 0, Some((&[0; 512], true)));
    g.wait_used(0, 1, T);
    assert_eq!(status(&g, s), S_OK);
    assert!(d.log().contains("virtqueue broken"));
}

#[test]
fn a_read_only_controller_refuses_writes_the_driver_sends_anyway() {
    let d = daemon(true);
    let mut f = connect(&d, 1);
    let s = request(&mut f, 0, 0, OUT, 0, Some((&[9; 4096], false)));
    f.wait_used(0, 1, T);
    assert_eq!(status(&f, s), S_IOERR);
    let s = request(&mut f, 0, 1, WRITE_ZEROES, 0, Some((&[0; 16], false)));
    f.wait_used(0, 1, T);
    assert_eq!(status(&f, s), S_UNSUPP, "write-zeroes is not offered on a read-only device");
    let st = d.rpc_ok("bdev_get_iostat", json!({"names": ["M0"]}));
    assert_eq!(st["bdevs"][0]["num_write_ops"], 0);
}

#[test]
fn the_config_space_describes_the_bdev() {
    let d = daemon(false);
    let mut f = connect(&d, 1);
    let c = f.config(60);
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 8192, "capacity in sectors");
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512, "blk_size");
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 16, "num_queues");
}

#[test]
fn memory_table_changes_while_running_keep_the_queues_serving() {
    let d = daemon(false);
    let mut f = connect(&d, 1);
    let s = request(&mut f, 0, 0, OUT, 0, Some((&[3; 512], false)));
    f.wait_used(0, 1, T);
    assert_eq!(status(&f, s), S_OK);
    // The same memory again (QEMU re-sends the table on hotplug): the queue moves to it.
    let region = vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: 0,
        mmap_offset: 0,
        mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&f.file),
    };
    vhost::VhostBackend::set_mem_table(&f.fe, &[region]).unwrap();
    let s = request(&mut f, 0, 1, IN, 0, Some((&[0; 512], true)));
    f.wait_used(0, 1, T);
    assert_eq!(status(&f, s), S_OK);
    assert_eq!(f.read(DATA + 0x1_0000 + 0x1000, 512), vec![3; 512]);
}
