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

#[test]
fn guest_io_survives_three_kill_9_restarts_of_vstor() {
    guest_io_survives_kill_9_restarts(false);
}

/// The same with a packed ring: QEMU cannot tell a restarted backend where a packed ring stands
/// (it resends the position it had at the last clean start), so the position and the requests to
/// redo both come from the packed in-flight region.
#[test]
fn guest_io_on_a_packed_ring_survives_three_kill_9_restarts_of_vstor() {
    guest_io_survives_kill_9_restarts(true);
}

fn guest_io_survives_kill_9_restarts(packed: bool) {
    if !guest::available() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(128 << 20).unwrap();
    let cfg = dir.path().join("vstor.json");
    let config = json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "bdev_uring_create", "params": {"name": "U0", "filename": img.to_str().unwrap()}},
            // Slow storage: every write takes 5 ms, so requests are in flight when vstor is killed.
            {"method": "bdev_delay_create", "params": {"name": "D0", "base_bdev_name": "U0",
                "avg_read_latency": 1000, "p99_read_latency": 1000, "avg_write_latency": 5000, "p99_write_latency": 5000}}]},
        {"subsystem": "vhost_blk", "config": [
            {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vrs", "dev_name": "D0", "packed_ring": packed}}]}
    ]});
    std::fs::write(&cfg, config.to_string()).unwrap();
    let mut d = Daemon::start_in(dir, &["--cpumask", "0x3", "--config", cfg.to_str().unwrap()]);
    let sock = d.dir.path().join("vrs");
    let mut o = GuestOpts::new("blk_restart");
    if packed {
        o.console = Some("console-blk_restart_packed.log".into());
    }
    o.devices = vec![
        "-chardev".into(),
        format!("socket,id=c0,path={},reconnect=1", sock.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=c0,num-queues=2{}", if packed { ",packed=on" } else { "" }),
    ];
    let mut g = guest::spawn(&o, d.dir.path());
    for round in 1..=3 {
        assert!(g.wait_for(&format!("round {round}"), std::time::Duration::from_secs(300)), "{}", g.console());
        // Kill while fio's requests are in flight in vstor (the delay bdev holds each write 5 ms).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let st = d.rpc_ok("bdev_get_iostat", json!({"names": ["D0"]}));
            if st["bdevs"][0]["queue_depth"].as_u64().unwrap_or(0) > 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no I/O in flight during round {round}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        d.kill_and_restart(None);
    }
    let r = g.finish();
    r.assert_ok(1);
    assert!(r.console.contains("all rounds verified"));
    assert!(!r.console.contains("I/O error") && !r.console.contains("error="), "{}", r.tail(60));
    let log = d.log();
    assert!(log.matches("frontend connected").count() >= 4, "QEMU reconnected after each restart:\n{log}");
    // Each kill caught requests in flight, and the next vstor resubmitted them.
    assert!(log.matches("resubmitting requests left in flight").count() >= 3, "{log}");
    assert_eq!(log.contains("packed=true"), packed, "the ring format asked for:\n{log}");
}
