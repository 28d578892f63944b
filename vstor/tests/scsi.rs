//! virtio-scsi device behaviour through a scripted frontend: commands, BAD_TARGET, events on
//! hot-add/remove/resize, task management.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::frontend::*;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// A virtio-scsi command chain: request header with `cdb`, response header + `data_in` bytes.
fn scsi_cmd(f: &mut TestFrontend, q: usize, head: u16, target: u8, cdb: &[u8], data_in: u32) -> (u64, u64) {
    let base = DATA + u64::from(head) * 0x1_0000 + q as u64 * 0x40_0000;
    let mut req = [0u8; 51];
    req[0] = 1;
    req[1] = target;
    req[2] = 0x40;
    req[19..19 + cdb.len()].copy_from_slice(cdb);
    f.write(base, &req);
    let resp = base + 0x1000;
    f.write(resp, &[0xee; 108]);
    let mut bufs = vec![(base, 51u32, false), (resp, 108, true)];
    if data_in > 0 {
        bufs.push((base + 0x2000, data_in, true));
    }
    f.queues[q].d.add(head, &bufs);
    f.queues[q].kick.write(1).unwrap();
    (resp, base + 0x2000)
}

fn post_event_buffer(f: &mut TestFrontend, head: u16) -> u64 {
    let at = DATA + 0x80_0000 + u64::from(head) * 0x100;
    f.write(at, &[0xee; 16]);
    f.queues[1].d.add(head, &[(at, 16, true)]);
    f.queues[1].kick.write(1).unwrap();
    at
}

#[test]
fn commands_events_and_hotplug() {
    let d = Daemon::start(&["--cpumask", "0x3"]);
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 2048, "block_size": 512}));
    d.rpc_ok("bdev_malloc_create", json!({"name": "M1", "num_blocks": 4096, "block_size": 512}));
    d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "vs"}));
    d.rpc_ok("vhost_scsi_controller_add_target", json!({"ctrlr": "vs", "scsi_target_num": 0, "bdev_name": "M0"}));
    let mut f = TestFrontend::connect(&d.dir.path().join("vs"), 3, 64, EVENT_IDX);
    let ev: Vec<u64> = (0..4).map(|h| post_event_buffer(&mut f, h)).collect();
    // The add that happened before the VM attached is reported once the event queue runs.
    let u = f.wait_used(1, 1, T);
    assert_eq!(u[0].1, 16);
    let e = f.read(ev[u[0].0 as usize], 16);
    assert_eq!(&e[0..4], &1u32.to_le_bytes(), "TRANSPORT_RESET");
    assert_eq!(&e[4..8], &[1, 0, 0, 0], "LUN 0 of target 0");
    assert_eq!(&e[12..16], &1u32.to_le_bytes(), "RESCAN");
    // INQUIRY on target 0: GOOD; on target 1: BAD_TARGET.
    let (resp, data) = scsi_cmd(&mut f, 2, 0, 0, &[0x12, 0, 0, 0, 96, 0], 96);
    f.wait_used(2, 1, T);
    let r = f.read(resp, 108);
    assert_eq!((r[10], r[11]), (0, 0), "status GOOD, response OK");
    assert_eq!(&f.read(data + 8, 5), b"VSTOR");
    let (resp, _) = scsi_cmd(&mut f, 2, 4, 1, &[0x12, 0, 0, 0, 96, 0], 96);
    f.wait_used(2, 1, T);
    assert_eq!(f.read(resp, 108)[11], 3, "BAD_TARGET");
    // Hot-add target 1: an event, then commands work.
    assert_eq!(
        d.rpc_ok("vhost_scsi_controller_add_target", json!({"ctrlr": "vs", "scsi_target_num": -1, "bdev_name": "M1"})),
        1
    );
    let u = f.wait_used(1, 1, T);
    let e = f.read(ev[u[0].0 as usize], 16);
    assert_eq!((&e[0..4], &e[4..6], &e[12..16]), (&1u32.to_le_bytes()[..], &[1u8, 1][..], &1u32.to_le_bytes()[..]));
    let (resp, data) = scsi_cmd(&mut f, 2, 8, 1, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    f.wait_used(2, 1, T);
    assert_eq!(f.read(resp, 108)[10], 0);
    assert_eq!(
        f.read(data, 8),
        vec![0, 0, 0x0f, 0xff, 0, 0, 2, 0],
        "READ CAPACITY(10): last LBA 4095, 512-byte blocks"
    );
    // Hot-remove target 1: event REMOVED, then BAD_TARGET; the bdev is free again.
    d.rpc_ok("vhost_scsi_controller_remove_target", json!({"ctrlr": "vs", "scsi_target_num": 1}));
    let u = f.wait_used(1, 1, T);
    let e = f.read(ev[u[0].0 as usize], 16);
    assert_eq!((&e[4..6], &e[12..16]), (&[1u8, 1][..], &2u32.to_le_bytes()[..]), "REMOVED");
    let (resp, _) = scsi_cmd(&mut f, 2, 12, 1, &[0, 0, 0, 0, 0, 0], 0);
    f.wait_used(2, 1, T);
    assert_eq!(f.read(resp, 108)[11], 3);
    d.rpc_ok("bdev_malloc_delete", json!({"name": "M1"}));
    // LUN reset on target 0 through the control queue: FUNCTION COMPLETE.
    let tmf = DATA + 0x90_0000;
    let mut req = [0u8; 24];
    req[0..4].copy_from_slice(&0u32.to_le_bytes());
    req[4..8].copy_from_slice(&5u32.to_le_bytes());
    req[8] = 1;
    f.write(tmf, &req);
    f.write(tmf + 0x100, &[0xee]);
    f.queues[0].d.add(0, &[(tmf, 24, false), (tmf + 0x100, 1, true)]);
    f.queues[0].kick.write(1).unwrap();
    f.wait_used(0, 1, T);
    assert_eq!(f.read(tmf + 0x100, 1), vec![0]);
    // Resize: a PARAM_CHANGE event (ASC 2Ah ASCQ 09h).
    d.rpc_ok("bdev_null_create", json!({"name": "N", "num_blocks": 100, "block_size": 512}));
    d.rpc_ok("vhost_scsi_controller_add_target", json!({"ctrlr": "vs", "scsi_target_num": 3, "bdev_name": "N"}));
    f.wait_used(1, 1, T);
    post_event_buffer(&mut f, 4);
    post_event_buffer(&mut f, 5);
    d.rpc_ok("bdev_null_resize", json!({"name": "N", "new_size": 1}));
    let u = f.wait_used(1, 1, T);
    let e = f.read(DATA + 0x80_0000 + u64::from(u[0].0) * 0x100, 16);
    assert_eq!((&e[0..4], &e[12..16]), (&3u32.to_le_bytes()[..], &(0x2au32 | 0x09 << 8).to_le_bytes()[..]));
}
