//! Restart without losing requests: a frontend keeps the in-flight region across a `kill -9` of
//! vstor; the new vstor resubmits what the old one had taken and not completed.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::frontend::*;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// A daemon started from a config file (so `kill_and_restart` brings the same state back): an
/// 8 MiB file `U0` under `D0`, a delay bdev holding every I/O 2 s, and `device`, a config
/// subsystem that serves `D0`. Returns the daemon and the file.
fn slow_disk_daemon(device: serde_json::Value) -> (Daemon, std::path::PathBuf) {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let cfg = dir.path().join("vstor.json");
    let config = json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_uring_create", "params": {"name": "U0", "filename": img.to_str().unwrap()}},
            {"method": "bdev_delay_create", "params": {"name": "D0", "base_bdev_name": "U0",
                "avg_read_latency": 2_000_000, "p99_read_latency": 2_000_000,
                "avg_write_latency": 2_000_000, "p99_write_latency": 2_000_000}}]},
        device
    ]});
    std::fs::write(&cfg, config.to_string()).unwrap();
    (Daemon::start_in(dir, &["--config", cfg.to_str().unwrap()]), img)
}

#[test]
fn requests_in_flight_at_a_kill_9_are_completed_by_the_next_vstor() {
    let (mut d, img) = slow_disk_daemon(json!({"subsystem": "vhost_blk", "config": [
        {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vb", "dev_name": "D0"}}]}));
    let sock = d.dir.path().join("vb");
    let mut f = TestFrontend::connect_inflight(&sock, 1, 64, EVENT_IDX);
    // Four writes, each held 2 s by the delay bdev: all in flight when vstor dies.
    let status = |i: u16| DATA + u64::from(i) * 0x1_0000 + 0x8000;
    for i in 0..4u16 {
        let base = DATA + u64::from(i) * 0x1_0000;
        f.write(base, &blk_header(1, u64::from(i) * 8));
        f.write(base + 0x1000, &[0xA0 + i as u8; 4096]);
        f.write(status(i), &[0xff]);
        f.queues[0].d.add(i * 3, &[(base, 16, false), (base + 0x1000, 4096, false), (status(i), 1, true)]);
    }
    f.queues[0].kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(f.queues[0].d.used().is_empty(), "nothing completes within the delay");
    // kill -9 and restart with the same config; the frontend reconnects with the same memory,
    // rings and in-flight region.
    d.kill_and_restart(None);
    f.reconnect(&sock);
    let mut heads: Vec<u32> = f.wait_used(0, 4, T).iter().map(|u| u.0).collect();
    heads.sort_unstable();
    assert_eq!(heads, vec![0, 3, 6, 9], "every request in flight at the kill completes");
    for i in 0..4 {
        assert_eq!(f.read(status(i), 1), vec![0], "request {i} succeeded");
    }
    // The data is on the file.
    let file = std::fs::read(&img).unwrap();
    for i in 0..4usize {
        assert!(file[i * 4096..(i + 1) * 4096].iter().all(|&b| b == 0xA0 + i as u8), "block {i}");
    }
    assert!(d.log().contains("resubmitting requests left in flight"), "{}", d.log());
    // New requests after the recovered ones work.
    let base = DATA + 0x20_0000;
    f.write(base, &blk_header(0, 0));
    f.write(base + 0x8000, &[0xff]);
    f.queues[0].d.add(20, &[(base, 16, false), (base + 0x1000, 512, true), (base + 0x8000, 1, true)]);
    f.queues[0].kick.write(1).unwrap();
    assert_eq!(f.wait_used(0, 1, T), vec![(20, 513)]);
    assert_eq!(f.read(base + 0x1000, 512), vec![0xA0; 512]);
}

/// The same with a packed ring, where out-of-order completion overwrites the descriptors of
/// requests still in flight: a GET_ID that completes at once puts its used element over the first
/// descriptor of a held write, so the next vstor can only rebuild that write from the copy in the
/// in-flight region. The frontend reconnects with the stale ring position QEMU has for a packed
/// ring (where it started); the next vstor takes the position from the region.
#[test]
fn packed_ring_requests_in_flight_at_a_kill_9_are_rebuilt_from_the_inflight_region() {
    let (mut d, img) = slow_disk_daemon(json!({"subsystem": "vhost_blk", "config": [
        {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vb", "dev_name": "D0", "packed_ring": true}}]}));
    let sock = d.dir.path().join("vb");
    let mut f = TestFrontend::connect_inflight(&sock, 1, 64, EVENT_IDX | RING_PACKED);
    let status = |i: u16| DATA + u64::from(i) * 0x1_0000 + 0x8000;
    let write_chain = |f: &mut TestFrontend, i: u16| {
        let base = DATA + u64::from(i) * 0x1_0000;
        f.write(base, &blk_header(1, u64::from(i) * 8));
        f.write(base + 0x1000, &[0xC0 + i as u8; 4096]);
        f.write(status(i), &[0xff]);
        let p = f.queues[0].p.as_mut().unwrap();
        p.add(i, &[(base, 16, 0), (base + 0x1000, 4096, 0), (status(i), 1, 2)]);
    };
    // Write 0 (slots 0-2, held 2 s), GET_ID as buffer 1 (slots 3-5, completes at once and is
    // returned in slot 0), writes 2 and 3 (slots 6-11, held).
    write_chain(&mut f, 0);
    let id = DATA + 0x10_0000;
    f.write(id, &blk_header(8, 0));
    f.write(id + 0x100, &[0xff]);
    f.queues[0].p.as_mut().unwrap().add(1, &[(id, 16, 0), (id + 0x1000, 20, 2), (id + 0x100, 1, 2)]);
    write_chain(&mut f, 2);
    write_chain(&mut f, 3);
    f.queues[0].kick.write(1).unwrap();
    assert_eq!(f.wait_used(0, 1, T), vec![(1, 21)], "GET_ID completes while the writes are held");
    assert_eq!(f.read(id + 0x100, 1), vec![0]);
    std::thread::sleep(Duration::from_millis(200));
    d.kill_and_restart(None);
    f.reconnect(&sock);
    let mut ids: Vec<u32> = f.wait_used(0, 3, T).iter().map(|u| u.0).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 2, 3], "every write in flight at the kill completes");
    let file = std::fs::read(&img).unwrap();
    for i in [0u16, 2, 3] {
        assert_eq!(f.read(status(i), 1), vec![0], "write {i} succeeded");
        let at = usize::from(i) * 4096;
        assert!(file[at..at + 4096].iter().all(|&b| b == 0xC0 + i as u8), "block {i} is on the file");
    }
    let log = d.log();
    assert!(log.contains("resubmitting requests left in flight"), "{log}");
    let resumed = log.lines().find(|l| l.contains("ring resumes where the in-flight region says")).unwrap_or_default();
    assert!(resumed.contains("frontend_base=32768 base=32780"), "slot 12, wrap 1, not the stale slot 0:\n{log}");
    // The ring goes on from slot 12, where the previous vstor stopped taking requests.
    let base = DATA + 0x20_0000;
    f.write(base, &blk_header(0, 16));
    f.write(base + 0x8000, &[0xff]);
    f.queues[0].p.as_mut().unwrap().add(7, &[(base, 16, 0), (base + 0x1000, 512, 2), (base + 0x8000, 1, 2)]);
    f.queues[0].kick.write(1).unwrap();
    assert_eq!(f.wait_used(0, 1, T), vec![(7, 513)]);
    assert_eq!(f.read(base + 0x1000, 512), vec![0xC2; 512], "sector 16 holds write 2's data");
}

/// The same for vhost-user-scsi: WRITE(10) commands held by a slow bdev when vstor is killed are
/// completed (GOOD status, data on the file) by the next vstor from the in-flight region. (QEMU
/// 7.2's vhost-user-scsi-pci does not reconnect to a restarted backend, see spdk/spdk#2840, so no
/// guest test can show this here; later QEMU releases added the reconnect.)
#[test]
fn scsi_commands_in_flight_at_a_kill_9_are_completed_by_the_next_vstor() {
    let (mut d, img) = slow_disk_daemon(json!({"subsystem": "vhost_scsi", "config": [
        {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "vs"}},
        {"method": "vhost_scsi_controller_add_target", "params": {"ctrlr": "vs", "scsi_target_num": 0, "bdev_name": "D0"}}]}));
    let sock = d.dir.path().join("vs");
    let bs = d.rpc_ok("bdev_get_bdevs", json!({"name": "D0"}))[0]["block_size"].as_u64().unwrap();
    let per = (4096 / bs) as u8;
    // Control, event and one request queue (index 2).
    let mut f = TestFrontend::connect_inflight(&sock, 3, 64, EVENT_IDX);
    const Q: usize = 2;
    let resp = |i: u16| DATA + u64::from(i) * 0x1_0000 + 0x8000;
    for i in 0..4u16 {
        let base = DATA + u64::from(i) * 0x1_0000;
        // virtio-scsi request header: LUN 0 of target 0, then WRITE(10) of 4 KiB at 4 KiB * i.
        let mut req = [0u8; 51];
        req[0] = 1;
        req[2] = 0x40;
        req[19..29].copy_from_slice(&[0x2a, 0, 0, 0, 0, per * i as u8, 0, 0, per, 0]);
        f.write(base, &req);
        f.write(base + 0x1000, &[0xB0 + i as u8; 4096]);
        f.write(resp(i), &[0xee; 108]);
        f.queues[Q].d.add(i * 3, &[(base, 51, false), (base + 0x1000, 4096, false), (resp(i), 108, true)]);
    }
    f.queues[Q].kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(f.queues[Q].d.used().is_empty(), "nothing completes within the delay");
    d.kill_and_restart(None);
    f.reconnect(&sock);
    let mut heads: Vec<u32> = f.wait_used(Q, 4, T).iter().map(|u| u.0).collect();
    heads.sort_unstable();
    assert_eq!(heads, vec![0, 3, 6, 9], "every command in flight at the kill completes");
    for i in 0..4 {
        let r = f.read(resp(i), 108);
        // response (byte 11) VIRTIO_SCSI_S_OK, status (byte 10) GOOD.
        assert_eq!((r[11], r[10]), (0, 0), "command {i}: {:?}", &r[..12]);
    }
    let file = std::fs::read(&img).unwrap();
    for i in 0..4usize {
        assert!(file[i * 4096..(i + 1) * 4096].iter().all(|&b| b == 0xB0 + i as u8), "blocks of command {i}");
    }
    assert!(d.log().contains("resubmitting requests left in flight"), "{}", d.log());
}

/// The in-flight region comes from the frontend, which keeps it across restarts and may hand back
/// anything. One whose packed free list loops is refused with the reason logged, and the queue
/// serves requests without tracking; it is not followed around the loop.
#[test]
fn a_scribbled_inflight_region_is_refused_and_the_queue_still_serves() {
    let (mut d, _img) = slow_disk_daemon(json!({"subsystem": "vhost_blk", "config": [
        {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vb", "dev_name": "D0", "packed_ring": true}}]}));
    let sock = d.dir.path().join("vb");
    let mut f = TestFrontend::connect_inflight(&sock, 1, 64, EVENT_IDX | RING_PACKED);
    let read = |f: &mut TestFrontend, id: u16| {
        let base = DATA + u64::from(id) * 0x1_0000;
        f.write(base, &blk_header(0, 0));
        f.write(base + 0x8000, &[0xff]);
        f.queues[0].p.as_mut().unwrap().add(id, &[(base, 16, 0), (base + 0x1000, 512, 2), (base + 0x8000, 1, 2)]);
        f.queues[0].kick.write(1).unwrap();
        assert_eq!(f.wait_used(0, 1, T), vec![(u32::from(id), 513)], "read {id}");
    };
    read(&mut f, 0);
    // Point every entry's `next` at entry 0 (32-byte header, 32-byte entries, `next` at +2).
    {
        use std::os::unix::fs::FileExt;
        let (_, file) = f.inflight.as_ref().unwrap();
        for e in 0..64u64 {
            file.write_all_at(&0u16.to_le_bytes(), 32 + 32 * e + 2).unwrap();
        }
    }
    d.kill_and_restart(None);
    // Without a usable region, a packed ring resumes where the frontend says; this frontend
    // knows (slot 3, wrap 1).
    f.reconnect_at(&sock, &[3 | 1 << 15]);
    read(&mut f, 1);
    let log = d.log();
    assert!(log.contains("in-flight region ignored: the in-flight region's free list has a loop"), "{log}");
}
