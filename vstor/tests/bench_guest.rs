//! Guest benchmark (not part of the test suite: `scripts/bench-guest.sh` runs it with
//! `--ignored`). fio inside a QEMU 7.2 TCG guest, 4 KiB randread/randwrite at QD 1/32/128, on
//! one RAM-backed file (/dev/shm) served by each target in turn: vstor vhost-user-blk and
//! vhost-user-scsi (adaptive and interrupt reactor modes), qemu-storage-daemon (vhost-user-blk)
//! and rust-vmm's vhost-device-scsi. TCG makes the guest slow, so the figure that matters is the
//! target's CPU time per I/O (utime + stime of the target process over the fio run / I/Os).
#![allow(clippy::cast_precision_loss)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{self, GuestOpts};
use common::*;
use serde_json::json;

fn cpu_ns(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 12 and 13 after the command name.
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    ticks * 1_000_000_000 / hz
}

fn wait_sock(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the guest benchmark against `pid`'s socket; prints one line per job.
fn bench(name: &str, pid: u32, dev: &str, devices: Vec<String>, dir: &Path) {
    let mut o = GuestOpts::new("bench");
    o.arg = dev.to_string();
    o.devices = devices;
    o.timeout = Duration::from_secs(600);
    let mut g = guest::spawn(&o, dir);
    for rw in ["randread", "randwrite"] {
        for qd in [1, 32, 128] {
            assert!(g.wait_for(&format!("BENCH-BEGIN {rw} {qd}\n"), Duration::from_secs(300)), "{}", g.console());
            let (c0, t0) = (cpu_ns(pid), Instant::now());
            let end = format!("BENCH-END {rw} {qd} ");
            assert!(g.wait_for(&end, Duration::from_secs(120)), "{}", g.console());
            let (c1, t1) = (cpu_ns(pid), Instant::now());
            let console = g.console();
            let kib: f64 = console
                .lines()
                .find_map(|l| l.strip_prefix(&end))
                .and_then(|l| l.trim().strip_prefix("kib="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let ios = kib / 4.0;
            let secs = (t1 - t0).as_secs_f64();
            println!(
                "BENCH {name:<26} {rw:<9} qd {qd:>3}: {:>8.0} IOPS  target CPU {:>7.2} us/IO  ({:.0}% of a core)",
                ios / 8.0,
                (c1 - c0) as f64 / 1000.0 / ios.max(1.0),
                (c1 - c0) as f64 / 1e9 / secs * 100.0
            );
        }
    }
    let r = g.finish();
    r.assert_ok(1);
}

fn blk_dev(sock: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=c0,path={}", sock.display()),
        "-device".into(),
        "vhost-user-blk-pci,chardev=c0,num-queues=1".into(),
    ]
}

fn scsi_dev(sock: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=c0,path={}", sock.display()),
        "-device".into(),
        "vhost-user-scsi-pci,chardev=c0,num_queues=1".into(),
    ]
}

fn vstor(img: &Path, mode: &str) -> Daemon {
    let d = Daemon::start(&["--cpumask", "0x2", "--reactor-mode", mode]);
    d.rpc_ok("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb", "dev_name": "U0"}));
    d
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn peer")
}

#[test]
#[ignore = "benchmark: run by scripts/bench-guest.sh"]
fn guest_fio_through_each_target() {
    assert!(guest::available(), "QEMU, a guest kernel and fio are needed (scripts/deps.sh)");
    let dir = test_dir();
    let img = Path::new("/dev/shm/vstor-bench.img").to_path_buf();
    std::fs::File::create(&img).unwrap().set_len(128 << 20).unwrap();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let want = |n: &str| only.is_empty() || only.split(',').any(|o| n.contains(o));

    for mode in ["adaptive", "interrupt"] {
        let name = format!("vstor-blk ({mode})");
        if want(&name) {
            let d = vstor(&img, mode);
            bench(&name, d.pid(), "vda", blk_dev(&d.dir.path().join("vb")), dir.path());
        }
        let name = format!("vstor-scsi ({mode})");
        if want(&name) {
            let d = vstor(&img, mode);
            d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "vs"}));
            d.rpc_ok(
                "vhost_scsi_controller_add_target",
                json!({"ctrlr": "vs", "scsi_target_num": 0, "bdev_name": "U0"}),
            )
            .to_string();
            d.rpc_ok("vhost_delete_controller", json!({"ctrlr": "vb"}));
            bench(&name, d.pid(), "sda", scsi_dev(&d.dir.path().join("vs")), dir.path());
        }
    }
    if want("qemu-storage-daemon") && Command::new("qemu-storage-daemon").arg("--version").output().is_ok() {
        let sock = dir.path().join("qsd.sock");
        let c = KillOnDrop(spawn(Command::new("taskset").args(["-c", "1", "qemu-storage-daemon"]).args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={},aio=io_uring", img.display()),
            "--export",
            &format!("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on", sock.display()),
        ])));
        wait_sock(&sock);
        bench("qemu-storage-daemon (blk)", c.0.id(), "vda", blk_dev(&sock), dir.path());
    }
    let vds = std::env::var("VHOST_DEVICE_SCSI").unwrap_or_else(|_| "vhost-device-scsi".into());
    if want("vhost-device-scsi") && Command::new(&vds).arg("--help").output().is_ok() {
        let sock = dir.path().join("vds.sock");
        let c = KillOnDrop(spawn(Command::new("taskset").args(["-c", "1", &vds]).args([
            "--socket-path",
            sock.to_str().unwrap(),
            "--solid-state",
            img.to_str().unwrap(),
        ])));
        wait_sock(&sock);
        bench("vhost-device-scsi", c.0.id(), "sda", scsi_dev(&sock), dir.path());
    }
    let _ = std::fs::remove_file(&img);
}

/// What a guest finds on vstor's vhost-user-scsi and on vhost-device-scsi, each with two 64 MiB
/// file disks (`scripts/bench-guest.sh` runs it; BENCHMARKS.md records the table).
#[test]
#[ignore = "comparison: run by scripts/bench-guest.sh"]
fn scsi_survey_vstor_and_vhost_device_scsi() {
    assert!(guest::available(), "QEMU, a guest kernel and fio are needed (scripts/deps.sh)");
    let dir = test_dir();
    let imgs: Vec<_> = (0..2).map(|i| dir.path().join(format!("s{i}.img"))).collect();
    let survey = |name: &str, sock: &Path, dir: &Path| {
        let mut o = GuestOpts::new("scsi_survey");
        o.devices = scsi_dev(sock);
        let r = guest::run(&o, dir);
        for l in r.console.lines().filter_map(|l| l.strip_prefix("SURVEY ")) {
            println!("SURVEY {name:<18} {l}");
        }
    };
    for i in &imgs {
        std::fs::File::create(i).unwrap().set_len(64 << 20).unwrap();
    }
    {
        let d = Daemon::start(&["--cpumask", "0x2"]);
        for (n, i) in imgs.iter().enumerate() {
            d.rpc_ok("bdev_uring_create", json!({"name": format!("U{n}"), "filename": i.to_str().unwrap()}));
        }
        d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "vs"}));
        for n in 0..2 {
            d.rpc_ok(
                "vhost_scsi_controller_add_target",
                json!({"ctrlr": "vs", "scsi_target_num": n, "bdev_name": format!("U{n}")}),
            );
        }
        survey("vstor-scsi", &d.dir.path().join("vs"), dir.path());
    }
    for i in &imgs {
        std::fs::File::create(i).unwrap().set_len(64 << 20).unwrap();
    }
    let vds = std::env::var("VHOST_DEVICE_SCSI").unwrap_or_else(|_| "vhost-device-scsi".into());
    if Command::new(&vds).arg("--help").output().is_ok() {
        let sock = dir.path().join("vds.sock");
        let c = KillOnDrop(spawn(
            Command::new(&vds).args(["--socket-path", sock.to_str().unwrap(), "--solid-state"]).args(&imgs),
        ));
        wait_sock(&sock);
        survey("vhost-device-scsi", &sock, dir.path());
        drop(c);
    }
}
