#!/usr/bin/env bash
# Target benchmark for BENCHMARKS.md: vstor's vhost-user-blk against qemu-storage-daemon (QEMU 7.2)
# with the same backend, the same client (vstor perf --vhost-user, i.e. libblkio) and the same
# pinning: target on core 1, client on core 0; and vstor's NVMe controller over vfio-user
# (vstor perf --nvme-vfio-user, the NVMe client library on rust-vmm's vfio-user client) with and
# without shadow doorbells, in the same run. Runs are interleaved target by target; each cell is
# the median of ROUNDS runs. CPU time per I/O is the target's (all its threads, from schedstat).
#
# Targets: vstor (blk, adaptive), vstor-int (blk, interrupt mode), qsd, nvme (shadow doorbells),
# nvme-mmio (no shadow doorbells; doorbells in the mapped BAR0 page), nvme-trap (no shadow
# doorbells, BAR0 not mappable: every doorbell is a vfio-user REGION_WRITE message).
# Usage: ROUNDS=3 SECS=5 TARGETS="vstor qsd nvme" ./scripts/bench-vhost.sh   (needs scripts/deps.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-5}; FILE=${FILE:-/var/tmp/vstor-bench.img}
QDS=${QDS:-"1 32 128"}; WORKLOADS=${WORKLOADS:-"randread randwrite"}; BACKENDS=${BACKENDS:-"null file"}
TARGETS=${TARGETS:-"vstor qsd"}
cargo build --release -q -p vstor
V=$PWD/target/release/vstor
W=$(mktemp -d /var/tmp/vstor-bench.XXXXXX)
[ -f "$FILE" ] || { dd if=/dev/urandom of="$FILE" bs=1M count=2048 status=none; sync; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

start_target() { # target backend -> prints "pid socket"
  local t=$1 b=$2 sock="$W/$1-$2.sock"
  case $t in
    nvme|nvme-trap|nvme-mmio)
      $V serve --cpumask 0x2 --rpc-socket "$W/$t-$b.rpc" -S "$W" >/dev/null 2>"$W/$t-$b.log" &
      local pid=$! r="$V rpc -s $W/$t-$b.rpc"
      for _ in $(seq 100); do [ -S "$W/$t-$b.rpc" ] && break; sleep 0.05; done
      if [ "$b" = null ]; then
        $r bdev_null_create --name D0 --num_blocks 2097152 --block_size 512 >/dev/null
      else
        $r bdev_uring_create --name D0 --filename "$FILE" >/dev/null
      fi
      local extra=""; [ $t = nvme-trap ] && extra="--disable_mappable_bar0 true"
      $r nvmf_create_transport --trtype VFIOUSER $extra >/dev/null
      $r nvmf_create_subsystem --nqn nqn.2019-07.io.spdk:bench --allow_any_host true >/dev/null
      $r nvmf_subsystem_add_ns '{"nqn": "nqn.2019-07.io.spdk:bench", "namespace": {"bdev_name": "D0"}}' >/dev/null
      $r nvmf_subsystem_add_listener "{\"nqn\": \"nqn.2019-07.io.spdk:bench\", \"listen_address\": {\"trtype\": \"VFIOUSER\", \"traddr\": \"$W/$t-$b\"}}" >/dev/null
      echo "$pid $W/$t-$b" ;;
    vstor|vstor-int)
      local mode=adaptive; [ $t = vstor-int ] && mode=interrupt
      $V serve --cpumask 0x2 --reactor-mode $mode --rpc-socket "$W/$t-$b.rpc" -S "$W" >/dev/null 2>"$W/$t-$b.log" &
      local pid=$!
      for _ in $(seq 100); do [ -S "$W/$t-$b.rpc" ] && break; sleep 0.05; done
      if [ "$b" = null ]; then
        $V rpc -s "$W/$t-$b.rpc" bdev_null_create --name D0 --num_blocks 2097152 --block_size 512 >/dev/null
      else
        $V rpc -s "$W/$t-$b.rpc" bdev_uring_create --name D0 --filename "$FILE" >/dev/null
      fi
      $V rpc -s "$W/$t-$b.rpc" vhost_create_blk_controller --ctrlr "$t-$b.sock" --dev_name D0 >/dev/null
      echo "$pid $sock" ;;
    qsd)
      local bd
      if [ "$b" = null ]; then bd="driver=null-co,node-name=n0,size=1073741824,read-zeroes=on"
      else bd="driver=file,node-name=n0,filename=$FILE,aio=io_uring,cache.direct=on"; fi
      taskset -c 1 qemu-storage-daemon --blockdev "$bd" \
        --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
        >/dev/null 2>"$W/qsd-$b.log" &
      local pid=$!
      for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
      echo "$pid $sock" ;;
  esac
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

echo "| backend | workload | QD | target | IOPS | p50 us | p99 us | target CPU ns/IO |"
echo "|---|---|---|---|---|---|---|---|"
for b in $BACKENDS; do
  declare -A PID SOCK
  for t in $TARGETS; do read -r PID[$t] SOCK[$t] < <(start_target $t $b); pids+=("${PID[$t]}"); done
  for w in $WORKLOADS; do
    for qd in $QDS; do
      declare -A I P5 P9 C
      for t in $TARGETS; do I[$t]=""; P5[$t]=""; P9[$t]=""; C[$t]=""; done
      for r in $(seq "$ROUNDS"); do
        for t in $TARGETS; do
          case $t in
            nvme) how=(--nvme-vfio-user "${SOCK[$t]}") ;;
            nvme-trap|nvme-mmio) how=(--nvme-vfio-user "${SOCK[$t]}" --no-shadow-doorbells) ;;
            *) how=(--vhost-user "${SOCK[$t]}") ;;
          esac
          j=$(taskset -c 0 $V perf "${how[@]}" -w $w -o 4096 -q $qd -t "$SECS" --target-pid "${PID[$t]}" --json)
          I[$t]+="$(echo "$j" | field iops) "; P5[$t]+="$(echo "$j" | field p50_us) "
          P9[$t]+="$(echo "$j" | field p99_us) "; C[$t]+="$(echo "$j" | field cpu_ns_per_io) "
        done
      done
      for t in $TARGETS; do
        printf "| %s | %s 4K | %s | %s | %.0f | %.1f | %.1f | %.0f |\n" $b $w $qd $t \
          "$(tr ' ' '\n' <<<"${I[$t]}" | grep . | median)" "$(tr ' ' '\n' <<<"${P5[$t]}" | grep . | median)" \
          "$(tr ' ' '\n' <<<"${P9[$t]}" | grep . | median)" "$(tr ' ' '\n' <<<"${C[$t]}" | grep . | median)"
      done
    done
  done
  # The targets are not this shell's children (started in a process substitution): wait for
  # each to exit before the next backend (and before the EXIT trap removes their directory).
  for t in $TARGETS; do kill "${PID[$t]}" 2>/dev/null || true; done
  for t in $TARGETS; do
    for _ in $(seq 200); do kill -0 "${PID[$t]}" 2>/dev/null || break; sleep 0.1; done
    kill -0 "${PID[$t]}" 2>/dev/null && { echo "$t ($b) did not exit 20 s after SIGTERM" >&2; kill -9 "${PID[$t]}"; }
  done
done
