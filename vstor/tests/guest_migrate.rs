//! Live migration of a QEMU 7.2 guest (TCG) whose disk vstor serves: three migrations, a pre-copy
//! one while the guest writes, then a pre-copy and a post-copy one while it reads back and
//! verifies, over slow storage (a delay bdev) so requests are in flight when QEMU stops the rings.
//! Also: QEMU refusing to migrate with `--no-live-migration`, and qemu-storage-daemon under the
//! same migrations for comparison.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::guest::{self, GuestOpts, RunningGuest};
use common::qmp::Qmp;
use common::*;
use serde_json::json;

fn vm(dir: &Path, n: u32, sock: &Path, incoming: bool) -> (RunningGuest, Qmp) {
    let mut o = GuestOpts::new("blk_migrate").blk(sock, ",num-queues=1");
    o.mem_mb = 512;
    o.console = Some(format!("console-{n}.log"));
    let qmp = dir.join(format!("qmp-{n}.sock"));
    o.extra = vec!["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())];
    if incoming {
        o.extra.extend(["-incoming".into(), "defer".into()]);
    }
    let g = guest::spawn(&o, dir);
    let q = Qmp::connect(&qmp);
    (g, q)
}

/// Migrates from `src` to `dst` over a UNIX socket; returns (total ms, downtime ms).
///
/// With `postcopy`, the copy is throttled so most of memory is still on the source when the
/// destination is started (migrate-start-postcopy): its pages then arrive on first touch, by
/// QEMU's or by vstor's (through the userfaultfd vstor registered).
fn migrate(dir: &Path, n: u32, src: &mut Qmp, dst: &mut Qmp, postcopy: bool) -> (u64, u64) {
    let uri = format!("unix:{}", dir.join(format!("mig-{n}.sock")).display());
    for q in [&mut *src, &mut *dst] {
        let bw: u64 = if postcopy { 16 << 20 } else { 8 << 30 };
        q.cmd("migrate-set-parameters", json!({"max-bandwidth": bw}));
        if postcopy {
            q.cmd("migrate-set-capabilities", json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}));
        }
    }
    dst.cmd("migrate-incoming", json!({"uri": uri}));
    src.cmd("migrate", json!({"uri": uri}));
    if postcopy {
        std::thread::sleep(Duration::from_millis(500));
        src.cmd("migrate-start-postcopy", json!({}));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen_postcopy = false;
    loop {
        let st = src.cmd("query-migrate", json!({}));
        seen_postcopy |= st["status"].as_str().is_some_and(|s| s.starts_with("postcopy"));
        match st["status"].as_str() {
            Some("completed") if postcopy && !seen_postcopy => panic!("migration {n} completed without postcopy: {st}"),
            Some("completed") => {
                return (st["total-time"].as_u64().unwrap_or(0), st["downtime"].as_u64().unwrap_or(0));
            }
            Some("failed") | Some("cancelled") => panic!("migration {n} failed: {st}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration {n} did not complete: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_inflight(d: &Daemon, what: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = d.rpc_ok("bdev_get_iostat", json!({"names": ["D0"]}));
        let b = &st["bdevs"][0];
        if b["queue_depth"].as_u64().unwrap_or(0) > 0 && b[key].as_u64().unwrap_or(0) > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "no {what} in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn guest_survives_migrations_while_writing_and_while_reading_back_precopy_and_postcopy() {
    if !guest::available() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let d = Daemon::start_in(dir, &["--cpumask", "0x3"]);
    let dir = d.dir.path().to_path_buf();
    d.rpc_ok("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()}));
    d.rpc_ok(
        "bdev_delay_create",
        // 12 ms per request at QD 16: each fio phase takes ~10 s, long enough to migrate during it.
        json!({"name": "D0", "base_bdev_name": "U0", "avg_read_latency": 12000, "p99_read_latency": 12000,
               "avg_write_latency": 12000, "p99_write_latency": 12000}),
    );
    for c in ["mig-a", "mig-b"] {
        d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": c, "dev_name": "D0", "shared": true}));
    }
    let (a, b) = (dir.join("mig-a"), dir.join("mig-b"));

    let (mut g1, mut q1) = vm(&dir, 1, &a, false);
    assert!(g1.wait_for("phase: write", Duration::from_secs(300)), "{}", g1.console());
    wait_inflight(&d, "write", "num_write_ops");
    let (mut g2, mut q2) = vm(&dir, 2, &b, true);
    let (t1, down1) = migrate(&dir, 1, &mut q1, &mut q2, false);
    let _ = q1.try_cmd("quit", json!({}));
    g1.kill();
    eprintln!("migration 1 (writing): {t1} ms total, {down1} ms downtime");

    assert!(g2.wait_for("phase: verify", Duration::from_secs(300)), "{}", g2.console());
    wait_inflight(&d, "read", "num_read_ops");
    let (g3, mut q3) = vm(&dir, 3, &a, true);
    let (t2, down2) = migrate(&dir, 2, &mut q2, &mut q3, false);
    let _ = q2.try_cmd("quit", json!({}));
    g2.kill();
    eprintln!("migration 2 (verifying): {t2} ms total, {down2} ms downtime");

    // Still verifying (the phase takes ~12 s): once more, post-copy.
    let still = !g3.console().contains("migration workload verified");
    wait_inflight(&d, "read", "num_read_ops");
    let (g4, mut q4) = vm(&dir, 4, &b, true);
    let (t3, down3) = migrate(&dir, 3, &mut q3, &mut q4, true);
    let _ = q3.try_cmd("quit", json!({}));
    g3.kill();
    eprintln!("migration 3 (verifying: {still}, postcopy): {t3} ms total, {down3} ms downtime");

    let r = g4.finish();
    r.assert_ok(1);
    assert!(r.console.contains("migration workload verified"), "{}", r.tail(40));
    let log = d.log();
    assert!(log.contains("dirty log set") && log.contains("logging=true"), "QEMU logged dirty pages through vstor");
    if vstor_mem::Userfault::available() {
        let pc: Vec<&str> = log.lines().filter(|l| l.contains("postcopy") || l.contains("memory table")).collect();
        assert!(
            log.contains("postcopy: memory registered with userfaultfd"),
            "postcopy went through vstor's userfaultfd: {pc:#?}"
        );
        assert!(log.contains("postcopy ended"), "postcopy finished");
    }
}

/// `--no-live-migration`: vstor offers no dirty logging, and QEMU refuses to migrate, saying why.
#[test]
fn qemu_refuses_to_migrate_when_vstor_offers_no_dirty_logging() {
    if !guest::available() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start(&["--no-live-migration"]);
    let dir = d.dir.path().to_path_buf();
    d.rpc_ok("bdev_malloc_create", json!({"name": "M0", "num_blocks": 131072, "block_size": 512}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vm", "dev_name": "M0"}));
    let (mut g, mut q) = vm(&dir, 1, &dir.join("vm"), false);
    assert!(g.wait_for("phase: write", Duration::from_secs(300)), "{}", g.console());
    let uri = format!("unix:{}", dir.join("nowhere.sock").display());
    let e = q.try_cmd("migrate", json!({"uri": uri})).expect_err("QEMU must refuse the migration");
    let msg = e["desc"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("Migration disabled") && msg.contains("vhost"), "QEMU says why: {e}");
    eprintln!("QEMU refused: {msg}");
    let _ = q.try_cmd("quit", json!({}));
    g.kill();
}

fn qsd_exports(dir: &Path, img: &Path, socks: &[&Path]) -> std::process::Child {
    let mut c = std::process::Command::new("qemu-storage-daemon");
    c.args(["--blockdev", &format!("driver=file,node-name=f0,filename={},cache.direct=on", img.display())]);
    // Slow storage, like the 12 ms delay bdev at QD 16 in the vstor test: ~1300 IOPS, so each
    // fio phase takes ~10 s and requests wait inside qsd.
    c.args(["--object", "throttle-group,id=tg0,x-iops-total=1300"]);
    c.args(["--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=f0"]);
    for (i, s) in socks.iter().enumerate() {
        c.args([
            "--export",
            &format!("type=vhost-user-blk,id=e{i},node-name=t0,addr.type=unix,addr.path={},writable=on", s.display()),
        ]);
    }
    let log = std::fs::File::create(dir.join("qsd.log")).unwrap();
    let child = c.stdout(std::process::Stdio::null()).stderr(log).spawn().expect("qemu-storage-daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socks.iter().all(|s| s.exists()) {
        assert!(Instant::now() < deadline, "qsd sockets");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// The comparison the issue asks for: the same two migrations (during writes, during the
/// read-back) with qemu-storage-daemon serving the disk over slow storage. Recorded, not asserted
/// (BENCHMARKS.md and SECURITY.md quote it); the harness asserts only that both migrations ran.
#[test]
fn qemu_storage_daemon_under_the_same_migrations() {
    if !guest::available() || std::process::Command::new("qemu-storage-daemon").arg("--version").output().is_err() {
        return;
    }
    let _g = guest::GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = test_dir();
    let dir = tmp.path().to_path_buf();
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let (a, b) = (dir.join("qa.sock"), dir.join("qb.sock"));
    let _qsd = KillOnDrop(qsd_exports(&dir, &img, &[&a, &b]));
    let (mut g1, mut q1) = vm(&dir, 1, &a, false);
    assert!(g1.wait_for("phase: write", Duration::from_secs(300)), "{}", g1.console());
    std::thread::sleep(Duration::from_secs(2));
    let (mut g2, mut q2) = vm(&dir, 2, &b, true);
    let (t1, down1) = migrate(&dir, 1, &mut q1, &mut q2, false);
    let _ = q1.try_cmd("quit", json!({}));
    g1.kill();
    eprintln!("qemu-storage-daemon migration 1 (writing): {t1} ms total, {down1} ms downtime");
    // A phase takes ~10 s when it works; 60 s without progress is a hang.
    let summary =
        |c: &str| c.lines().filter(|l| l.contains("fio rc=") || l.contains("FAIL")).collect::<Vec<_>>().join(" | ");
    let outcome = if !g2.wait_for("phase: verify", Duration::from_secs(60)) {
        let c = g2.console();
        if c.contains("FAIL") {
            format!("failed the write phase after migration 1: {}", summary(&c))
        } else {
            "hung in the write phase after migration 1 (no progress in 60 s)".to_string()
        }
    } else {
        let (g3, mut q3) = vm(&dir, 3, &a, true);
        let (t2, down2) = migrate(&dir, 2, &mut q2, &mut q3, false);
        eprintln!("qemu-storage-daemon migration 2 (verifying): {t2} ms total, {down2} ms downtime");
        let _ = q2.try_cmd("quit", json!({}));
        let mut g3 = g3;
        let verified = g3.wait_for("migration workload verified", Duration::from_secs(60));
        let c = g3.console();
        let o = if verified {
            "survived both migrations and verified".to_string()
        } else if c.contains("FAIL") {
            format!("failed after migration 2: {}", summary(&c))
        } else {
            "hung in the verify phase after migration 2 (no progress in 60 s)".to_string()
        };
        let _ = q3.try_cmd("quit", json!({}));
        g3.kill();
        o
    };
    eprintln!("qemu-storage-daemon over slow storage, the same two migrations: the guest {outcome}");
    let _ = q2.try_cmd("quit", json!({}));
    g2.kill();
}
