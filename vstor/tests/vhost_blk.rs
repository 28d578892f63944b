//! vhost-user-blk with a real client: libblkio's `virtio-blk-vhost-user` driver (the `blkio`
//! crate) against the real vstor daemon.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)] // small test values

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use vstor::blkclient::{BlkClient, ClientOptions};
use vstor::perf::workload::{check, fill, Rng};

const T: Duration = Duration::from_secs(20);

fn client(d: &Daemon, ctrl: &str, queues: i32, queue_size: i32) -> BlkClient {
    let path = d.dir.path().join(ctrl).to_string_lossy().into_owned();
    BlkClient::connect(&ClientOptions { path, num_queues: queues, queue_size, read_only: false, buf_size: 64 << 20 })
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", d.log()))
}

fn daemon_with(bdev_rpc: (&str, serde_json::Value), ctrl: serde_json::Value, extra: &[&str]) -> Daemon {
    let d = Daemon::start(extra);
    d.rpc_ok(bdev_rpc.0, bdev_rpc.1);
    d.rpc_ok("vhost_create_blk_controller", ctrl);
    d
}

fn malloc_daemon(mb: u64, extra: &[&str]) -> Daemon {
    daemon_with(
        ("bdev_malloc_create", json!({"name": "M0", "num_blocks": mb * 2048, "block_size": 512})),
        json!({"ctrlr": "vb0", "dev_name": "M0"}),
        extra,
    )
}

#[test]
fn whole_device_written_with_a_seeded_pattern_reads_back_intact() {
    let d = malloc_daemon(64, &[]);
    let mut c = client(&d, "vb0", 1, 256);
    assert_eq!(c.capacity, 64 << 20);
    const CHUNK: usize = 1 << 20;
    const QD: usize = 8;
    let chunks = (c.capacity as usize) / CHUNK;
    // Writes, QD 8, each chunk its own pattern.
    for batch in (0..chunks).collect::<Vec<_>>().chunks(QD) {
        for (slot, &i) in batch.iter().enumerate() {
            fill(&mut c.buf()[slot * CHUNK..(slot + 1) * CHUNK], i as u64, 1);
            c.write(0, (i * CHUNK) as u64, slot * CHUNK, CHUNK, i);
        }
        for (tag, ret) in c.wait(0, batch.len(), QD, T).unwrap() {
            assert_eq!(ret, 0, "write of chunk {tag}");
        }
    }
    for batch in (0..chunks).collect::<Vec<_>>().chunks(QD) {
        for (slot, &i) in batch.iter().enumerate() {
            c.buf()[slot * CHUNK..(slot + 1) * CHUNK].fill(0);
            c.read(0, (i * CHUNK) as u64, slot * CHUNK, CHUNK, slot);
        }
        for (slot, ret) in c.wait(0, batch.len(), QD, T).unwrap() {
            assert_eq!(ret, 0);
            let i = batch[slot];
            assert!(check(&c.buf()[slot * CHUNK..(slot + 1) * CHUNK], i as u64, 1), "chunk {i} corrupted");
        }
    }
    let st = d.rpc_ok("bdev_get_iostat", json!({"names": ["M0"]}));
    assert_eq!(st["bdevs"][0]["num_write_ops"], chunks as u64);
    assert_eq!(st["bdevs"][0]["bytes_read"], c.capacity);
}

#[test]
fn random_sizes_and_queue_depths_on_four_queues_verify() {
    let d = malloc_daemon(128, &["--cpumask", "0x3"]);
    d.rpc_ok("vhost_delete_controller", json!({"ctrlr": "vb0"}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb0", "dev_name": "M0", "cpumask": "0x3"}));
    let mut c = client(&d, "vb0", 4, 512);
    // Both reactors own queues: one VM uses two cores.
    let ctrl = &d.rpc_ok("vhost_get_controllers", json!({"name": "vb0"}))[0];
    assert_eq!(ctrl["started_queues"], 4);
    let reactors = d.rpc_ok("framework_get_reactors", json!(null));
    for r in reactors["reactors"].as_array().unwrap() {
        assert!(r["pollers"].as_u64().unwrap() >= 3, "each reactor polls two queues: {r}");
    }
    let cap = c.capacity;
    let mut rng = Rng::new(42);
    // Each queue owns a quarter of the device, each slot an equal share of that quarter (and of
    // the buffer); request sizes are random from 512 B up to 1 MiB (or the share, if smaller).
    for &qd in &[1usize, 8, 32, 128] {
        for q in 0..4usize {
            let share = cap / 4 / qd as u64; // bytes of device and of buffer per slot
            let mut reqs = Vec::new();
            for slot in 0..qd {
                let max_sectors = (share / 512).min(2048);
                let len = (1 + rng.below(max_sectors)) * 512;
                let off = q as u64 * (cap / 4) + slot as u64 * share + rng.below((share - len) / 512 + 1) * 512;
                let boff = (slot as u64 * share) as usize;
                reqs.push((off, len as usize, boff, slot as u64 + 1000 * qd as u64 + 100_000 * q as u64));
            }
            for &(off, len, boff, seed) in &reqs {
                fill(&mut c.buf()[boff..boff + len], off, seed);
            }
            for (i, &(off, len, boff, _)) in reqs.iter().enumerate() {
                c.write(q, off, boff, len, i);
            }
            for (tag, ret) in c.wait(q, qd, qd, T).unwrap() {
                assert_eq!(ret, 0, "qd {qd} queue {q} write {tag}");
            }
            for &(_, len, boff, _) in &reqs {
                c.buf()[boff..boff + len].fill(0);
            }
            for (i, &(off, len, boff, _)) in reqs.iter().enumerate() {
                c.read(q, off, boff, len, i);
            }
            for (tag, ret) in c.wait(q, qd, qd, T).unwrap() {
                assert_eq!(ret, 0);
                let (off, len, boff, seed) = reqs[tag];
                assert!(check(&c.buf()[boff..boff + len], off, seed), "qd {qd} queue {q} request {tag}");
            }
        }
    }
}

#[test]
fn flush_discard_and_write_zeroes_reach_the_file() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let d = Daemon::start_in(dir, &[]);
    d.rpc_ok("bdev_uring_create", json!({"name": "U0", "filename": img.to_str().unwrap()}));
    d.rpc_ok("vhost_create_blk_controller", json!({"ctrlr": "vb1", "dev_name": "U0"}));
    let mut c = client(&d, "vb1", 1, 128);
    fill(&mut c.buf()[..1 << 20], 7, 7);
    assert_eq!(c.sync(0, |c| c.write(0, 0, 0, 1 << 20, 1)).unwrap(), 0);
    assert_eq!(c.sync(0, |c| c.flush(0, 2)).unwrap(), 0);
    assert_eq!(c.sync(0, |c| c.discard(0, 64 << 10, 64 << 10, 3)).unwrap(), 0);
    assert_eq!(c.sync(0, |c| c.write_zeroes(0, 512 << 10, 128 << 10, 4)).unwrap(), 0);
    let file = std::fs::read(&img).unwrap();
    let mut want = vec![0u8; 1 << 20];
    fill(&mut want, 7, 7);
    want[64 << 10..128 << 10].fill(0);
    want[512 << 10..640 << 10].fill(0);
    assert_eq!(&file[..1 << 20], &want[..], "the file holds the data with the discarded and zeroed ranges cleared");
    // Reads see the same.
    c.buf()[..1 << 20].fill(0xee);
    assert_eq!(c.sync(0, |c| c.read(0, 0, 0, 1 << 20, 5)).unwrap(), 0);
    assert_eq!(&c.buf()[..1 << 20], &want[..]);
    // Past the end: an error, not a hang or a crash.
    let r = c.sync(0, |c| c.read(0, (16 << 20) - 512, 0, 4096, 6)).unwrap();
    assert!(r < 0, "read past the end must fail, got {r}");
    assert_eq!(c.sync(0, |c| c.read(0, 0, 0, 512, 7)).unwrap(), 0);
}

#[test]
fn readonly_controllers_refuse_writes() {
    let d = daemon_with(
        ("bdev_malloc_create", json!({"name": "M0", "num_blocks": 2048, "block_size": 512})),
        json!({"ctrlr": "ro", "dev_name": "M0", "readonly": true}),
        &[],
    );
    let path = d.dir.path().join("ro").to_string_lossy().into_owned();
    // The device offers VIRTIO_BLK_F_RO: libblkio refuses write access when it sees it. (The
    // device's own refusal of writes a driver sends anyway is tested with the scripted frontend in
    // tests/hostile.rs.)
    let e = BlkClient::connect(&ClientOptions { path: path.clone(), read_only: false, ..Default::default() }).err();
    assert!(e.as_deref().unwrap_or("").contains("read-only"), "{e:?}");
    let mut c = BlkClient::connect(&ClientOptions { path, read_only: true, ..Default::default() }).unwrap();
    assert_eq!(c.sync(0, |c| c.read(0, 0, 0, 4096, 1)).unwrap(), 0);
    let st = d.rpc_ok("bdev_get_iostat", json!({"names": ["M0"]}));
    assert_eq!(st["bdevs"][0]["num_write_ops"], 0, "no write reached the bdev");
}

#[test]
fn clients_come_and_go_and_the_controller_keeps_serving() {
    let d = malloc_daemon(8, &[]);
    for i in 0..20 {
        let mut c = client(&d, "vb0", 1 + (i % 2), 64);
        c.buf()[..512].fill(i as u8);
        c.write(0, 512 * i as u64, 0, 512, 0);
        if i % 3 == 0 {
            // Leave with the request in flight.
            drop(c);
            continue;
        }
        assert_eq!(c.wait(0, 1, 1, T).unwrap()[0].1, 0);
    }
    // Raw connections that vanish mid-handshake or send garbage.
    for junk in [&b""[..], b"\x01\x00\x00\x00", b"\xff\xff\xff\xff\x01\x00\x00\x00\x08\x00\x00\x00garbage!"] {
        let mut s = std::os::unix::net::UnixStream::connect(d.dir.path().join("vb0")).unwrap();
        let _ = std::io::Write::write_all(&mut s, junk);
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut c = client(&d, "vb0", 1, 64);
    assert_eq!(c.sync(0, |c| c.read(0, 512 * 19, 0, 512, 1)).unwrap(), 0);
    assert!(c.buf()[..512].iter().all(|&b| b == 19));
    assert_eq!(d.rpc_ok("vhost_get_controllers", json!({"name": "vb0"}))[0]["connected"], true);
}

#[test]
fn controllers_are_managed_over_rpc_and_saved_in_the_config() {
    let d = malloc_daemon(8, &[]);
    let e = d.rpc("vhost_create_blk_controller", json!({"ctrlr": "vb0", "dev_name": "M0"})).unwrap_err();
    assert_eq!(e["code"], -libc::EEXIST);
    let e = d.rpc("vhost_create_blk_controller", json!({"ctrlr": "x", "dev_name": "nope"})).unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("nope"), "{e}");
    let e =
        d.rpc("vhost_create_blk_controller", json!({"ctrlr": "x", "dev_name": "M0", "cpumask": "0x4"})).unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("cpumask"), "{e}");
    // The bdev is claimed: it cannot be deleted under the controller.
    let e = d.rpc("bdev_malloc_delete", json!({"name": "M0"})).unwrap_err();
    assert_eq!(e["code"], -libc::EBUSY, "{e}");
    assert!(e["message"].as_str().unwrap().contains("vhost:vb0"), "the error names the holder: {e}");
    d.rpc_ok("vhost_controller_set_coalescing", json!({"ctrlr": "vb0", "delay_base_us": 50, "iops_threshold": 10000}));
    let info = &d.rpc_ok("vhost_get_controllers", json!(null))[0];
    assert_eq!((info["ctrlr"].as_str(), info["delay_base_us"].as_u64()), (Some("vb0"), Some(50)));
    assert_eq!(info["backend_specific"]["block"]["bdev"], "M0");
    let cfg = d.rpc_ok("framework_get_config", json!({"name": "vhost_blk"}));
    assert_eq!(cfg[0]["method"], "vhost_create_blk_controller");
    assert_eq!(cfg[1]["method"], "vhost_controller_set_coalescing");

    // Deleting is refused while a frontend is connected.
    let c = client(&d, "vb0", 1, 64);
    let e = d.rpc("vhost_delete_controller", json!({"ctrlr": "vb0"})).unwrap_err();
    assert_eq!(e["code"], -libc::EBUSY, "{e}");
    drop(c);
    let deadline = std::time::Instant::now() + T;
    while d.rpc("vhost_delete_controller", json!({"ctrlr": "vb0"})).is_err() {
        assert!(std::time::Instant::now() < deadline, "controller still busy after the client left");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!d.dir.path().join("vb0").exists(), "socket removed");
    d.rpc_ok("bdev_malloc_delete", json!({"name": "M0"}));
}
