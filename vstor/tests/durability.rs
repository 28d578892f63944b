//! Durability: writes a guest has seen completed and flushed survive a `kill -9` of vstor. The
//! libblkio client writes a seeded pattern to a file-backed disk, flushes, vstor is killed at once
//! and started again from the same config; the pattern reads back intact.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use vstor::blkclient::{BlkClient, ClientOptions};
use vstor::perf::workload::{check, fill};

const T: Duration = Duration::from_secs(20);
const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 256; // 16 MiB
const QD: usize = 8;

fn client(d: &Daemon) -> BlkClient {
    let path = d.dir.path().join("vd").to_string_lossy().into_owned();
    BlkClient::connect(&ClientOptions { path, num_queues: 1, queue_size: 64, read_only: false, buf_size: QD * CHUNK })
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", d.log()))
}

#[test]
fn flushed_writes_survive_kill_9_and_read_back_after_restart() {
    let dir = test_dir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len((CHUNKS * CHUNK) as u64).unwrap();
    let cfg = dir.path().join("vstor.json");
    std::fs::write(
        &cfg,
        json!({"subsystems": [
            {"subsystem": "bdev", "config": [
                {"method": "bdev_uring_create", "params": {"name": "U0", "filename": img.to_str().unwrap()}}]},
            {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vd", "dev_name": "U0"}}]}]})
        .to_string(),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let mut d = Daemon::start_in(dir, &["--config", &cfg]);
    let b = d.rpc_ok("bdev_get_bdevs", json!({"name": "U0"}));
    assert_eq!(b[0]["supported_io_types"]["flush"], json!(true), "a file has a write cache, so FLUSH matters: {b}");

    let mut c = client(&d);
    for round in 0..2u64 {
        // Each round overwrites the disk with a new generation of the pattern.
        let generation = 10 + round;
        for batch in (0..CHUNKS).collect::<Vec<_>>().chunks(QD) {
            for (slot, &i) in batch.iter().enumerate() {
                fill(&mut c.buf()[slot * CHUNK..(slot + 1) * CHUNK], i as u64, generation);
                c.write(0, (i * CHUNK) as u64, slot * CHUNK, CHUNK, i);
            }
            for (tag, ret) in c.wait(0, batch.len(), QD, T).unwrap() {
                assert_eq!(ret, 0, "write of chunk {tag}");
            }
        }
        assert_eq!(c.sync(0, |c| c.flush(0, 999)).unwrap(), 0, "flush");
        // Killed the moment the flush is acknowledged.
        drop(c);
        d.kill_and_restart(None);
        c = client(&d);
        for batch in (0..CHUNKS).collect::<Vec<_>>().chunks(QD) {
            for (slot, &i) in batch.iter().enumerate() {
                c.buf()[slot * CHUNK..(slot + 1) * CHUNK].fill(0);
                c.read(0, (i * CHUNK) as u64, slot * CHUNK, CHUNK, slot);
            }
            for (slot, ret) in c.wait(0, batch.len(), QD, T).unwrap() {
                assert_eq!(ret, 0);
                let i = batch[slot];
                assert!(
                    check(&c.buf()[slot * CHUNK..(slot + 1) * CHUNK], i as u64, generation),
                    "round {round}: chunk {i} did not survive the kill"
                );
            }
        }
    }
}
