#!/usr/bin/env bash
# Guest benchmark (issue 4): fio inside a QEMU TCG guest against vstor (blk, scsi; adaptive and
# interrupt modes), qemu-storage-daemon and vhost-device-scsi, all serving one file on /dev/shm.
# Prints IOPS and target CPU time per I/O. BENCH_ONLY=vstor-blk,vhost-device-scsi limits the set.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
command -v vhost-device-scsi >/dev/null || cargo install vhost-device-scsi --locked
cargo test --release -p vstor --test bench_guest -- --ignored --nocapture --test-threads 1 2>&1 | grep -E "^BENCH |^SURVEY |^MIG |panicked|error"
