//! `--seccomp`: reactor threads run under the filter (and only they), and the work they do (vhost
//! rings, io_uring file I/O with flush/discard/write-zeroes, NVMe over vfio-user, logging, exit)
//! stays within it: a syscall outside the list would kill the daemon.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use vstor::blkclient::{BlkClient, ClientOptions};

/// (thread name, Seccomp mode from /proc) for every thread of `pid`.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field =
            |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string()).unwrap_or_default();
        out.push((field("Name:"), field("Seccomp:")));
    }
    out
}

#[test]
fn reactors_under_the_filter_serve_blk_and_nvme_and_exit_cleanly() {
    if !cfg!(target_arch = "x86_64") {
        return;
    }
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let mut d = Daemon::start_in(dir, &["--seccomp", "--cpumask", "0x3"]);
    let modes = thread_modes(d.pid());
    let reactors: Vec<_> = modes.iter().filter(|(n, _)| n.starts_with("reactor_")).collect();
    assert_eq!(reactors.len(), 2, "{modes:?}");
    assert!(reactors.iter().all(|(_, m)| m == "2"), "reactor threads are in seccomp filter mode: {modes:?}");
    assert!(modes.iter().any(|(n, m)| !n.starts_with("reactor_") && m == "0"), "control threads are not: {modes:?}");

    d.rpc_ok("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()}));
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 16384, "block_size": 512}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb", "dev_name": "U0"}));
    let path = d.dir.path().join("vb").to_string_lossy().into_owned();
    let mut c = BlkClient::connect(&ClientOptions { path, num_queues: 2, ..Default::default() }).unwrap();
    for q in 0..2 {
        c.buf()[..8192].fill(0x5a + q as u8);
        assert_eq!(c.sync(q, |c| c.write(q, q as u64 * 65536, 0, 8192, 1)).unwrap(), 0);
        assert_eq!(c.sync(q, |c| c.flush(q, 2)).unwrap(), 0);
        assert_eq!(c.sync(q, |c| c.discard(q, 1 << 20, 65536, 3)).unwrap(), 0);
        assert_eq!(c.sync(q, |c| c.write_zeroes(q, 2 << 20, 65536, 4)).unwrap(), 0);
        c.buf()[..8192].fill(0);
        assert_eq!(c.sync(q, |c| c.read(q, q as u64 * 65536, 0, 8192, 5)).unwrap(), 0);
        assert!(c.buf()[..8192].iter().all(|&b| b == 0x5a + q as u8));
    }
    drop(c);

    let traddr = d.dir.path().join("nvme");
    for (m, p) in [
        ("nvmf_create_transport", json!({"trtype": "VFIOUSER"})),
        ("nvmf_create_subsystem", json!({"nqn": "nqn.2019-07.io.spdk:s", "allow_any_host": true})),
        ("nvmf_subsystem_add_ns", json!({"nqn": "nqn.2019-07.io.spdk:s", "namespace": {"bdev_name": "M0"}})),
        (
            "nvmf_subsystem_add_listener",
            json!({"nqn": "nqn.2019-07.io.spdk:s", "listen_address": {"trtype": "VFIOUSER", "traddr": traddr.to_str().unwrap()}}),
        ),
    ] {
        d.rpc_ok(m, p);
    }
    for extra in [&[][..], &["--interrupts", "--no-shadow-doorbells"][..]] {
        let out = std::process::Command::new(vstor_bin())
            .args(["perf", "--nvme-vfio-user", traddr.to_str().unwrap(), "-w", "verify", "-q", "8", "--queues", "2"])
            .args(["-t", "1", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), d.log());
    }
    // Sleeping and waking (adaptive mode) under the filter, then a clean stop.
    std::thread::sleep(Duration::from_millis(50));
    d.rpc_ok("bdev_get_iostat", json!({}));
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(20)).expect("vstor exits on SIGTERM");
    assert!(st.success(), "clean exit under seccomp: {st}\n{}", d.log());
}
