//! Negative control for the restart test: the same guest workload (fio writing and verifying,
//! requests in flight when the storage daemon is killed) against qemu-storage-daemon, which does
//! not offer INFLIGHT_SHMFD. It shows the restart test can tell a target that keeps in-flight
//! requests across a kill from one that does not. The outcome is printed, not asserted: it depends
//! on which requests were in flight; the test asserts only that the harness did what it claims
//! (a kill while fio runs, a restart, QEMU reconnecting). Seen here: the guest hangs.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{self, GuestOpts};
use common::*;

fn qsd(dir: &Path, img: &Path, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("qsd.log")).unwrap();
    let c = Command::new("qemu-storage-daemon")
        .args(["--blockdev", &format!("driver=file,node-name=file0,filename={},cache.direct=on", img.display())])
        // Slow storage, as the delay bdev makes it in the vstor test: requests wait in qsd.
        .args(["--object", "throttle-group,id=tg0,x-iops-total=500"])
        .args(["--blockdev", "driver=throttle,node-name=thr0,throttle-group=tg0,file=file0"])
        .args([
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=thr0,addr.type=unix,addr.path={},writable=on,num-queues=2",
                sock.display()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("qemu-storage-daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-storage-daemon did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

#[test]
fn qemu_storage_daemon_killed_under_the_same_workload() {
    if !guest::available() || Command::new("qemu-storage-daemon").arg("--version").output().is_err() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir();
    let d = dir.path();
    let img = d.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(128 << 20).unwrap();
    let sock = d.join("qsd.sock");
    let mut q = KillOnDrop(qsd(d, &img, &sock));
    let mut o = GuestOpts::new("blk_restart");
    o.devices = vec![
        "-chardev".into(),
        format!("socket,id=c0,path={},reconnect=1", sock.display()),
        "-device".into(),
        "vhost-user-blk-pci,chardev=c0,num-queues=2".into(),
    ];
    let mut g = guest::spawn(&o, d);
    assert!(g.wait_for("round 1", Duration::from_secs(300)), "{}", g.console());
    // fio keeps 16 requests queued against 500 IOPS: some are always inside qsd.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!g.console().contains("all rounds verified"), "the workload ended before the kill");
    drop(q);
    q = KillOnDrop(qsd(d, &img, &sock));
    // QEMU reconnects: the new qsd gains the connection's fds (socket, kick and call eventfds).
    let fds = |c: &Child| std::fs::read_dir(format!("/proc/{}/fd", c.id())).map(|d| d.count()).unwrap_or(0);
    let listening = fds(&q.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while fds(&q.0) <= listening + 2 {
        assert!(Instant::now() < deadline, "QEMU did not reconnect to the restarted qemu-storage-daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Watch the guest for 30 s after the restart (a round takes a few seconds when it works).
    let clean = g.wait_for("all rounds verified", Duration::from_secs(30));
    let console = g.console();
    let outcome = if clean {
        "finished and verified (the lost requests happened to be redone)".to_string()
    } else if console.contains("I/O error") || console.contains("verify") && console.contains("bad") {
        "I/O errors or verify failures".to_string()
    } else {
        let last = console.lines().rev().find(|l| l.starts_with("round")).unwrap_or("none").to_string();
        format!("hung: no progress for 30 s after the restart (last: {last})")
    };
    eprintln!("negative control, qemu-storage-daemon killed with I/O in flight: the guest {outcome}");
    drop(q);
    g.kill();
}
