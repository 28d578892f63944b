//! QEMU 7.2 guests (TCG) with vhost-user-scsi-pci on vstor: two targets, fio verify, discard,
//! SCSI inquiry, hot-add and hot-remove while the guest runs.

mod common;

use std::time::Duration;

use common::guest::{self, GuestOpts};
use common::*;
use serde_json::json;

fn scsi_device(o: GuestOpts, sock: &std::path::Path, opts: &str) -> GuestOpts {
    let mut o = o;
    let id = format!("s{}", o.devices.len());
    o.devices.push("-chardev".into());
    o.devices.push(format!("socket,id={id},path={}", sock.display()));
    o.devices.push("-device".into());
    o.devices.push(format!("vhost-user-scsi-pci,chardev={id}{opts}"));
    o
}

#[test]
fn guest_sees_two_targets_and_follows_hot_add_and_hot_remove() {
    if !guest::available() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(96 << 20).unwrap();
    let d = Daemon::start_in(dir, &["--cpumask", "0x3"]);
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 131072, "block_size": 512}));
    d.rpc_ok("bdev_uring_create", json!({"name": "U1", "filename": img.to_str().unwrap()}));
    d.rpc_ok("bdev_malloc_create", json!({"name": "M2", "num_blocks": 32768, "block_size": 4096}));
    d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "vs", "delay": true}));
    assert_eq!(
        d.rpc_ok("vhost_scsi_controller_add_target", json!({"ctrlr": "vs", "scsi_target_num": 0, "bdev_name": "M0"})),
        0
    );
    assert_eq!(
        d.rpc_ok("vhost_scsi_controller_add_target", json!({"ctrlr": "vs", "scsi_target_num": -1, "bdev_name": "U1"})),
        1
    );
    d.rpc_ok("vhost_start_scsi_controller", json!({"ctrlr": "vs"}));
    let info = &d.rpc_ok("vhost_get_controllers", json!({"name": "vs"}))[0];
    assert_eq!(info["backend_specific"]["scsi"][1]["luns"][0]["bdev_name"], "U1");

    let mut o = scsi_device(GuestOpts::new("scsi_hotplug"), &d.dir.path().join("vs"), ",num_queues=2");
    o.arg = "131072,196608".into();
    let mut g = guest::spawn(&o, d.dir.path());
    assert!(
        g.wait_for("VSTOR-WAIT hotadd", Duration::from_secs(240)),
        "{}\n--- vstor log ---\n{}",
        g.console(),
        d.log()
    );
    assert_eq!(
        d.rpc_ok("vhost_scsi_controller_add_target", json!({"ctrlr": "vs", "scsi_target_num": 2, "bdev_name": "M2"})),
        2
    );
    assert!(
        g.wait_for("VSTOR-WAIT hotremove", Duration::from_secs(240)),
        "{}\n--- vstor log ---\n{}",
        g.console(),
        d.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    // Hot-remove by deleting the bdev under the live LUN: the target goes (the guest is told,
    // as with vhost_scsi_controller_remove_target), then the bdev.
    d.rpc_ok("bdev_uring_delete", json!({"name": "U1"}));
    assert!(d.rpc("bdev_get_bdevs", json!({"name": "U1"})).is_err(), "U1 is deleted");
    let info = &d.rpc_ok("vhost_get_controllers", json!({"name": "vs"}))[0];
    let targets: Vec<u64> = info["backend_specific"]["scsi"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["scsi_dev_num"].as_u64().unwrap())
        .collect();
    assert_eq!(targets, [0, 2], "{info}");
    let r = g.finish();
    r.assert_ok(1);
    assert!(r.console.contains("fio on target 0 passed during hot-remove"), "{}", r.tail(50));
    let cfg = d.rpc_ok("framework_get_config", json!({"name": "vhost_scsi"}));
    let methods: Vec<&str> = cfg.as_array().unwrap().iter().map(|c| c["method"].as_str().unwrap()).collect();
    assert_eq!(
        methods,
        [
            "vhost_create_scsi_controller",
            "vhost_scsi_controller_add_target",
            "vhost_scsi_controller_add_target",
            "vhost_start_scsi_controller"
        ]
    );
}
