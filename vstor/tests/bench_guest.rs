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
    // A console file per target: a reused one would still hold the previous guest's lines.
    let file: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    o.console = Some(format!("console-bench-{file}.log"));
    o.devices = devices;
    o.timeout = Duration::from_secs(600);
    let mut g = guest::spawn(&o, dir);
    for rw in ["randread", "randwrite"] {
        for qd in [1, 32, 128] {
            // No line end in the pattern: the serial console may end lines with "\r\n". QD 1 comes
            // before 128, so "... 1" cannot match the later "... 128" line first.
            assert!(g.wait_for(&format!("BENCH-BEGIN {rw} {qd}"), Duration::from_secs(300)), "{}", g.console());
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

/// A vhost-user-scsi device; `extra` device options (vhost-device-scsi needs `param_change=off`
/// with QEMU 7.2: it refuses the feature and ends the session otherwise).
fn scsi_dev(sock: &Path, extra: &str) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=c0,path={}", sock.display()),
        "-device".into(),
        format!("vhost-user-scsi-pci,chardev=c0,num_queues=1{extra}"),
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
    println!(); // the harness prints "test NAME ... " without a newline: keep it off our lines
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
            // The blk controller holds U0 exclusively: free it for the SCSI target.
            d.rpc_ok("vhost_delete_controller", json!({"ctrlr": "vb"}));
            d.rpc_ok("vhost_create_scsi_controller", json!({"ctrlr": "vs"}));
            d.rpc_ok(
                "vhost_scsi_controller_add_target",
                json!({"ctrlr": "vs", "scsi_target_num": 0, "bdev_name": "U0"}),
            );
            bench(&name, d.pid(), "sda", scsi_dev(&d.dir.path().join("vs"), ""), dir.path());
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
        bench("vhost-device-scsi", c.0.id(), "sda", scsi_dev(&sock, ",param_change=off"), dir.path());
    }
    let _ = std::fs::remove_file(&img);
}

/// What a guest finds on vstor's vhost-user-scsi and on vhost-device-scsi, each with two 64 MiB
/// file disks (`scripts/bench-guest.sh` runs it; BENCHMARKS.md records the table).
#[test]
#[ignore = "comparison: run by scripts/bench-guest.sh"]
fn scsi_survey_vstor_and_vhost_device_scsi() {
    println!(); // the harness prints "test NAME ... " without a newline: keep it off our lines
    assert!(guest::available(), "QEMU, a guest kernel and fio are needed (scripts/deps.sh)");
    let dir = test_dir();
    let imgs: Vec<_> = (0..2).map(|i| dir.path().join(format!("s{i}.img"))).collect();
    let survey = |name: &str, sock: &Path, dir: &Path, extra: &str| {
        let mut o = GuestOpts::new("scsi_survey");
        o.devices = scsi_dev(sock, extra);
        o.timeout = Duration::from_secs(240);
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
        survey("vstor-scsi", &d.dir.path().join("vs"), dir.path(), "");
    }
    for i in &imgs {
        std::fs::File::create(i).unwrap().set_len(64 << 20).unwrap();
    }
    let vds = std::env::var("VHOST_DEVICE_SCSI").unwrap_or_else(|_| "vhost-device-scsi".into());
    if Command::new(&vds).arg("--help").output().is_ok() {
        let sock = dir.path().join("vds.sock");
        let log = dir.path().join("vds.log");
        let mut c = KillOnDrop(
            Command::new(&vds)
                .args(["--socket-path", sock.to_str().unwrap(), "--solid-state"])
                .args(&imgs)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn vhost-device-scsi"),
        );
        wait_sock(&sock);
        survey("vhost-device-scsi", &sock, dir.path(), ",param_change=off");
        if let Ok(Some(st)) = c.0.try_wait() {
            let l = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = l.lines().rev().take(5).collect();
            println!("SURVEY vhost-device-scsi  exited during the survey ({st}): {}", tail.join(" | "));
        }
        drop(c);
    }
}

mod mig {
    //! Migration benchmark: total time, downtime and guest IOPS before, during and after a
    //! pre-copy and a post-copy migration, for vstor and for qemu-storage-daemon in one run.
    use std::path::Path;
    use std::time::{Duration, Instant};

    use serde_json::json;

    use crate::common::guest::{self, GuestOpts, RunningGuest};
    use crate::common::qmp::Qmp;

    /// The disk the migrating VM has: vhost-user-blk on a socket, or (the baseline without a
    /// vhost-user disk) QEMU's own virtio-blk on an image file both QEMUs open.
    #[derive(Clone, Copy)]
    pub enum Disk<'a> {
        VhostUser(&'a Path),
        Builtin(&'a Path),
    }

    fn vm(dir: &Path, n: u32, disk: Disk, incoming: bool) -> (RunningGuest, Qmp) {
        let mut o = match disk {
            Disk::VhostUser(sock) => GuestOpts::new("mig_bench").blk(sock, ",num-queues=1"),
            Disk::Builtin(img) => {
                let mut o = GuestOpts::new("mig_bench");
                o.devices = vec![
                    "-drive".into(),
                    format!(
                        "file={},if=none,id=d0,format=raw,cache.direct=on,aio=io_uring,file.locking=off",
                        img.display()
                    ),
                    "-device".into(),
                    "virtio-blk-pci,drive=d0,num-queues=1".into(),
                ];
                o
            }
        };
        o.mem_mb = 512;
        o.console = Some(format!("mb-console-{n}.log"));
        o.timeout = Duration::from_secs(600);
        let qmp = dir.join(format!("mb-qmp-{n}.sock"));
        o.extra = vec!["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())];
        if incoming {
            o.extra.extend(["-incoming".into(), "defer".into()]);
        }
        let g = guest::spawn(&o, dir);
        (g, Qmp::connect(&qmp))
    }

    /// Migrates; returns (start, end, total ms, downtime ms).
    fn migrate(dir: &Path, n: u32, src: &mut Qmp, dst: &mut Qmp, postcopy: bool) -> (Instant, Instant, u64, u64) {
        let uri = format!("unix:{}", dir.join(format!("mb-mig-{n}.sock")).display());
        for q in [&mut *src, &mut *dst] {
            let bw: u64 = if postcopy { 32 << 20 } else { 1 << 30 };
            q.cmd("migrate-set-parameters", json!({"max-bandwidth": bw}));
            q.cmd(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "postcopy-ram", "state": postcopy}]}),
            );
        }
        dst.cmd("migrate-incoming", json!({"uri": uri}));
        let start = Instant::now();
        src.cmd("migrate", json!({"uri": uri}));
        if postcopy {
            std::thread::sleep(Duration::from_millis(300));
            src.cmd("migrate-start-postcopy", json!({}));
        }
        loop {
            let st = src.cmd("query-migrate", json!({}));
            match st["status"].as_str() {
                Some("completed") => {
                    return (
                        start,
                        Instant::now(),
                        st["total-time"].as_u64().unwrap_or(0),
                        st["downtime"].as_u64().unwrap_or(0),
                    )
                }
                Some("failed") | Some("cancelled") => panic!("migration {n} failed: {st}"),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Runs the workload on `a`, migrates to `b` (pre-copy) after 10 s and back to `a` 12 s later
    /// (post-copy when `postcopy`, else pre-copy again); prints the figures.
    pub fn run(name: &str, dir: &Path, a: Disk, b: Disk, postcopy: bool) {
        // Consoles and sockets of each target in their own directory: a console file left by the
        // previous target would show its FIO-START before the new QEMU truncates it.
        let tag: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let dir = &dir.join(tag);
        std::fs::create_dir_all(dir).unwrap();
        let (mut g1, mut q1) = vm(dir, 1, a, false);
        assert!(g1.wait_for("FIO-START", Duration::from_secs(300)), "{}", g1.console());
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(10));
        let (g2, mut q2) = vm(dir, 2, b, true);
        let (s1, e1, tot1, down1) = migrate(dir, 1, &mut q1, &mut q2, false);
        let _ = q1.try_cmd("quit", json!({}));
        g1.kill();
        std::thread::sleep(Duration::from_secs(10).saturating_sub(e1.elapsed()) + Duration::from_secs(2));
        let (g3, mut q3) = vm(dir, 3, a, true);
        let (s2, e2, tot2, down2) = migrate(dir, 2, &mut q2, &mut q3, postcopy);
        let _ = q2.try_cmd("quit", json!({}));
        g2.kill();
        let r = g3.finish();
        let _ = q3;
        assert!(r.console.contains("FIO-END"), "{}", r.tail(30));
        // IOPS log: "msec, iops, dir, bs, ..." relative to fio's start (~t0).
        let samples: Vec<(f64, f64)> = r
            .console
            .lines()
            .filter_map(|l| l.strip_prefix("IOPSLOG "))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').map(str::trim).collect();
                Some((f.first()?.parse::<f64>().ok()? / 1000.0, f.get(1)?.parse().ok()?))
            })
            .collect();
        let at = |t: Instant| t.duration_since(t0).as_secs_f64();
        let mean = |from: f64, to: f64| {
            let v: Vec<f64> = samples.iter().filter(|(t, _)| *t > from && *t <= to).map(|(_, i)| *i).collect();
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let end = samples.last().map(|s| s.0).unwrap_or(40.0);
        let second = if postcopy { "post-copy" } else { "pre-copy (no post-copy support)" };
        println!(
            "MIG {name:<22} pre-copy: {tot1} ms total, {down1} ms downtime | {second}: {tot2} ms total, {down2} ms downtime"
        );
        println!(
            "MIG {name:<22} guest IOPS: before {:.0} | during pre-copy {:.0} | between {:.0} | during 2nd {:.0} | after {:.0}",
            mean(0.5, at(s1)),
            mean(at(s1), at(e1) + 0.5),
            mean(at(e1) + 0.5, at(s2)),
            mean(at(s2), at(e2) + 0.5),
            mean(at(e2) + 0.5, end)
        );
    }
}

/// Migration figures for BENCHMARKS.md (`scripts/bench-guest.sh`).
#[test]
#[ignore = "benchmark: run by scripts/bench-guest.sh"]
fn migration_precopy_and_postcopy_vstor_and_qsd() {
    println!(); // the harness prints "test NAME ... " without a newline: keep it off our lines
    assert!(guest::available(), "QEMU, a guest kernel and fio are needed (scripts/deps.sh)");
    let dir = test_dir();
    let img = dir.path().join("mig.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    {
        let d = Daemon::start(&["--cpumask", "0x2"]);
        d.rpc_ok("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()}));
        for c in ["ma", "mb"] {
            d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": c, "dev_name": "U0", "shared": true}));
        }
        let (a, b) = (d.dir.path().join("ma"), d.dir.path().join("mb"));
        mig::run("vstor", dir.path(), mig::Disk::VhostUser(&a), mig::Disk::VhostUser(&b), true);
    }
    if Command::new("qemu-storage-daemon").arg("--version").output().is_ok() {
        let (a, b) = (dir.path().join("qa.sock"), dir.path().join("qb.sock"));
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "1", "qemu-storage-daemon", "--blockdev"])
            .arg(format!("driver=file,node-name=f0,filename={},cache.direct=on,aio=io_uring", img.display()));
        for (i, s) in [&a, &b].iter().enumerate() {
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e{i},node-name=f0,addr.type=unix,addr.path={},writable=on",
                s.display()
            ));
        }
        let _q = KillOnDrop(spawn(&mut cmd));
        wait_sock(&a);
        wait_sock(&b);
        // qemu-storage-daemon 7.2 offers no VHOST_USER_PROTOCOL_F_PAGEFAULT: QEMU cannot post-copy
        // a VM on it (the attempt hangs), so its second migration is pre-copy too.
        mig::run("qemu-storage-daemon", dir.path(), mig::Disk::VhostUser(&a), mig::Disk::VhostUser(&b), false);
    }
    // The baseline: the same VM and workload with QEMU's own virtio-blk on the same file.
    mig::run("QEMU virtio-blk (no vhost-user)", dir.path(), mig::Disk::Builtin(&img), mig::Disk::Builtin(&img), true);
}
