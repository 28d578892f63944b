//! QEMU 7.2 guests (TCG) with vhost-user-blk-pci on vstor: the guest's own virtio-blk driver,
//! fio with crc32c verify, discard, write-zeroes, multiqueue, packed ring, and a reboot.

mod common;

use common::guest::{self, GuestOpts};
use common::*;
use serde_json::json;

fn setup(bdev: (&str, serde_json::Value), ctrl: serde_json::Value) -> Daemon {
    let d = Daemon::start(&["--cpumask", "0x3"]);
    d.rpc_ok(bdev.0, bdev.1);
    d.rpc_ok("vhost_create_blk_controller", ctrl);
    d
}

#[test]
fn guest_fio_verify_discard_and_write_zeroes_on_two_queues_and_two_cores() {
    if !guest::available() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = setup(
        ("bdev_malloc_create", json!({"name": "M0", "num_blocks": 262144, "block_size": 512})),
        json!({"ctrlr": "vblk", "dev_name": "M0", "cpumask": "0x3"}),
    );
    let mut o = GuestOpts::new("blk_basic").blk(&d.dir.path().join("vblk"), ",num-queues=2");
    o.arg = "262144".into();
    let r = guest::run(&o, d.dir.path());
    r.assert_ok(1);
    assert!(r.console.contains("2 queues"), "{}", r.tail(40));
    let total = d.rpc_ok("bdev_get_iostat", json!({"names": ["M0"]}));
    let b = &total["bdevs"][0];
    assert!(b["num_write_ops"].as_u64().unwrap() > 1000, "{total}");
    assert!(b["num_unmap_ops"].as_u64().unwrap() >= 1, "{total}");
    assert!(b["num_write_zeroes_ops"].as_u64().unwrap() >= 1, "{total}");
    assert_eq!(b["io_error"]["total"], 0, "{total}");
    // Queue 0 ran on core 0 and queue 1 on core 1 (the log names the core of each vring).
    let log = d.log();
    assert!(log.contains("queue=0 core=0") && log.contains("queue=1 core=1"), "{log}");
}

#[test]
fn guest_packed_ring_on_a_file_with_qboot() {
    if !guest::available() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(128 << 20).unwrap();
    let d = Daemon::start_in(dir, &["--cpumask", "0x3"]);
    d.rpc_ok("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vpk", "dev_name": "U0", "packed_ring": true}));
    let mut o = GuestOpts::new("blk_basic").blk(&d.dir.path().join("vpk"), ",num-queues=2,packed=on");
    o.arg = "262144".into();
    o.qboot = true;
    let r = guest::run(&o, d.dir.path());
    r.assert_ok(1);
    assert!(d.log().contains("packed=true"), "the ring was packed:\n{}", d.log());
    // A file has a write cache: the device offers FLUSH, and the guest's fsyncs arrive as flushes.
    assert!(r.console.contains("cache: write back"), "{}", r.tail(40));
    let st = d.rpc_ok("bdev_get_iostat", json!({"names": ["U0"]}));
    assert!(st["bdevs"][0]["num_flush_ops"].as_u64().unwrap() >= 1, "{st}");
}

#[test]
fn guest_reboot_resets_the_device_and_the_data_survives() {
    if !guest::available() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = setup(
        ("bdev_malloc_create", json!({"name": "M0", "num_blocks": 65536, "block_size": 512})),
        json!({"ctrlr": "vrb", "dev_name": "M0"}),
    );
    let mut o = GuestOpts::new("blk_reboot").blk(&d.dir.path().join("vrb"), ",num-queues=1");
    o.allow_reboot = true;
    let r = guest::run(&o, d.dir.path());
    r.assert_ok(2);
    assert!(r.console.contains("phase 2"), "{}", r.tail(40));
}
