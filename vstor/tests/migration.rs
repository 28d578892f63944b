//! Live-migration support seen from a scripted frontend: dirty logging of every guest page the
//! device writes, turning it off again, one bdev shared by two controllers with one active at a
//! time, and the masking option.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::frontend::*;
use common::*;
use serde_json::json;
use vhost::vhost_user::VhostUserFrontend;

const T: Duration = Duration::from_secs(10);

fn read_req(f: &mut TestFrontend, head: u16, base: u64, sector: u64) -> (u64, u64) {
    f.write(base, &blk_header(0, sector));
    let data = base + 0x4000;
    let status = base + 0x9000;
    f.queues[0].d.add(head, &[(base, 16, false), (data, 4096, true), (status, 1, true)]);
    f.queues[0].kick.write(1).unwrap();
    (data, status)
}

/// A daemon with `U0`, a 1 MiB file of `fill` bytes, through io_uring.
fn daemon_with_file(fill: u8) -> Daemon {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![fill; 1 << 20]).unwrap();
    let d = Daemon::start_in(dir, &[]);
    d.rpc_ok("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()}));
    d
}

#[test]
fn every_page_the_device_writes_is_logged_while_logging_is_on() {
    let d = daemon_with_file(0x77);
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb", "dev_name": "U0"}));
    let mut f = TestFrontend::connect(&d.dir.path().join("vb"), 1, 64, EVENT_IDX);
    // Before logging: nothing is marked (there is no log yet).
    let log = f.start_logging();
    let base = DATA + 0x10_0000;
    let (data, status) = read_req(&mut f, 0, base, 0);
    f.wait_used(0, 1, T);
    assert_eq!(f.read(data, 4), vec![0x77; 4], "io_uring read the file into guest memory");
    let used = f.queues[0].d.used;
    assert!(log.is_dirty(data), "data written by io_uring is logged");
    assert!(log.is_dirty(status), "the status byte is logged");
    assert!(log.is_dirty(used), "the used ring is logged");
    assert!(!log.is_dirty(base), "the request header (read by the device) is not");
    assert!(!log.is_dirty(DATA + 0x30_0000), "untouched memory is not");
    // A cancelled migration: logging off, later writes are not logged.
    f.stop_logging();
    let base2 = DATA + 0x20_0000;
    let (data2, status2) = read_req(&mut f, 3, base2, 8);
    f.wait_used(0, 1, T);
    assert!(!log.is_dirty(data2) && !log.is_dirty(status2), "no logging after LOG_ALL is cleared");
}

/// The same for vhost-user-scsi: a READ(10)'s data-in pages (written by io_uring) and its
/// response header are logged; the request header is not.
#[test]
fn every_page_the_scsi_device_writes_is_logged_while_logging_is_on() {
    let d = daemon_with_file(0x66);
    d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "vs"}));
    d.rpc_ok("vhost_scsi_controller_add_target", json!({"ctrlr": "vs", "scsi_target_num": 0, "bdev_name": "U0"}));
    // Control, event and one request queue (index 2).
    let mut f = TestFrontend::connect(&d.dir.path().join("vs"), 3, 64, EVENT_IDX);
    let log = f.start_logging();
    let base = DATA + 0x10_0000;
    let (resp, data) = (base + 0x9000, base + 0x4000);
    // virtio-scsi request header: LUN 0 of target 0, READ(10) of 8 blocks of 512 bytes at LBA 0.
    let mut req = [0u8; 51];
    req[0] = 1;
    req[19..29].copy_from_slice(&[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
    f.write(base, &req);
    f.queues[2].d.add(0, &[(base, 51, false), (resp, 108, true), (data, 4096, true)]);
    f.queues[2].kick.write(1).unwrap();
    assert_eq!(f.wait_used(2, 1, T), vec![(0, 108 + 4096)]);
    assert_eq!((f.read(resp + 11, 1)[0], f.read(resp + 10, 1)[0]), (0, 0), "VIRTIO_SCSI_S_OK, GOOD");
    assert_eq!(f.read(data, 4), vec![0x66; 4], "io_uring read the file into guest memory");
    assert!(log.is_dirty(data) && log.is_dirty(data + 4095), "data-in written by io_uring is logged: {}", d.log());
    assert!(log.is_dirty(resp), "the response header is logged");
    assert!(log.is_dirty(f.queues[2].d.used), "the used ring is logged");
    assert!(!log.is_dirty(base), "the request header (read by the device) is not");
}

#[test]
fn one_bdev_on_two_controllers_runs_on_one_side_at_a_time() {
    let d = Daemon::start(&[]);
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 2048, "block_size": 512}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "src", "dev_name": "M0", "shared": true}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "dst", "dev_name": "M0", "shared": true}));
    let e = d.rpc("vhost_create_blk_controller", json!({"ctrlr": "x", "dev_name": "M0"})).unwrap_err();
    assert_eq!(e["code"], -libc::EBUSY, "an exclusive claim is refused while shared claims exist: {e}");
    let mut src = TestFrontend::connect(&d.dir.path().join("src"), 1, 64, EVENT_IDX);
    let (_, status) = read_req(&mut src, 0, DATA, 0);
    src.wait_used(0, 1, T);
    assert_eq!(src.read(status, 1), vec![0]);
    // The destination cannot start its rings while the source runs: its requests are not served...
    let mut early = TestFrontend::connect(&d.dir.path().join("dst"), 1, 64, EVENT_IDX);
    let _ = read_req(&mut early, 0, DATA, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(early.queues[0].d.used().is_empty(), "the second side must not run while the first is active");
    assert!(d.log().contains("one side of a handover runs at a time"), "{}", d.log());
    drop(early);
    // ...and are once the source stopped (GET_VRING_BASE, as QEMU does when the source VM stops).
    vhost::VhostBackend::get_vring_base(&src.fe, 0).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut dst = TestFrontend::connect(&d.dir.path().join("dst"), 1, 64, EVENT_IDX);
    let (_, status) = read_req(&mut dst, 0, DATA, 0);
    dst.wait_used(0, 1, T);
    assert_eq!(dst.read(status, 1), vec![0]);
}

#[test]
fn without_live_migration_no_dirty_logging_is_offered() {
    let d = Daemon::start(&["--no-live-migration"]);
    d.rpc_ok("bdev_null_create", json!({"name": "N0", "num_blocks": 2048, "block_size": 512}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb", "dev_name": "N0"}));
    let fe = vhost::vhost_user::Frontend::connect(d.dir.path().join("vb"), 1).unwrap();
    vhost::VhostBackend::set_owner(&fe).unwrap();
    let features = vhost::VhostBackend::get_features(&fe).unwrap();
    assert_eq!(features & (1 << 26), 0, "VHOST_F_LOG_ALL must not be offered");
    let mut fe = fe;
    vhost::VhostBackend::set_features(&fe, features).unwrap();
    let pf = vhost::vhost_user::VhostUserFrontend::get_protocol_features(&mut fe).unwrap();
    assert!(!pf.contains(vhost::vhost_user::message::VhostUserProtocolFeatures::LOG_SHMFD));
}

/// Postcopy, as the destination vstor sees it: guest pages that have not arrived are missing from
/// the shared memory; a request whose buffer is such a page waits (the reactor sleeps in the
/// kernel) until the frontend has placed the page and woken it through the userfaultfd vstor gave
/// it. The request then completes with the right data.
#[test]
fn postcopy_a_request_on_a_missing_page_waits_for_the_page() {
    if !vstor_mem::Userfault::available() {
        eprintln!("userfaultfd is not available here; skipping");
        return;
    }
    let d = Daemon::start(&[]);
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 2048, "block_size": 512}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb", "dev_name": "M0"}));
    // Put a pattern on the disk through a normal connection first.
    let mut w = TestFrontend::connect(&d.dir.path().join("vb"), 1, 64, 0);
    let base = DATA + 0x10_0000;
    w.write(base, &blk_header(1, 8));
    w.write(base + 0x4000, &[0x5a; 4096]);
    w.queues[0].d.add(0, &[(base, 16, false), (base + 0x4000, 4096, false), (base + 0x9000, 1, true)]);
    w.queues[0].kick.write(1).unwrap();
    w.wait_used(0, 1, T);
    assert_eq!(w.read(base + 0x9000, 1), vec![0]);
    drop(w);

    let mut f = TestFrontend::connect_postcopy(&d.dir.path().join("vb"), 1, 64, 0);
    let (uffd, bases) = f.postcopy.take().unwrap();
    let vstor_base = bases[0];
    // The header and status pages arrived (the test writes them); the data page has not.
    f.write(base + 0x9000, &[0xff]);
    let (data, status) = read_req(&mut f, 0, base, 8);
    let mut faults = Vec::new();
    let deadline = std::time::Instant::now() + T;
    while f.queues[0].d.used().is_empty() {
        assert!(std::time::Instant::now() < deadline, "request did not complete; faults seen: {faults:x?}");
        let mut pfd = libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } != 1 {
            continue;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads one 32-byte uffd_msg into `msg`.
        if unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) } != 32 {
            continue;
        }
        assert_eq!(msg[0], 0x12, "a page-fault event");
        let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap()) & !4095;
        let gpa = addr - vstor_base;
        faults.push(gpa);
        // The request cannot have completed while its page is missing.
        assert_eq!(f.read(status, 1), vec![0xff], "status written before the page arrived");
        // Place the page (here: zeroes through the frontend's own mapping), then wake vstor.
        f.write(gpa, &[0]);
        let mut range = [addr, 4096u64];
        // SAFETY: UFFDIO_WAKE (_IOR(0xAA, 0x02, struct uffdio_range)) reads one 16-byte range.
        assert_eq!(unsafe { libc::ioctl(uffd.as_raw_fd(), 0x8010_aa02, range.as_mut_ptr()) }, 0);
    }
    assert!(faults.contains(&(data & !4095)), "vstor faulted on the missing data page: {faults:x?}");
    assert_eq!(f.read(status, 1), vec![0], "request succeeded");
    assert_eq!(f.read(data, 4096), vec![0x5a; 4096], "the data reached the page once it was placed");
    f.fe.postcopy_end().unwrap();
    assert!(d.wait_log("postcopy ended", T), "POSTCOPY_END handled");
    // After POSTCOPY_END nothing is registered: a new missing page is simply allocated.
    let base2 = DATA + 0x30_0000;
    let (data2, status2) = read_req(&mut f, 3, base2, 8);
    f.wait_used(0, 1, T);
    assert_eq!(f.read(status2, 1), vec![0]);
    assert_eq!(f.read(data2, 4096), vec![0x5a; 4096]);
}
