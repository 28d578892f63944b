#!/usr/bin/env bash
# bdev-layer benchmark for BENCHMARKS.md: vstor perf on null/malloc (4 KiB randread, QD 1/32/128,
# one core) and on a file through io_uring next to fio's io_uring engine on the same file,
# interleaved, each run ROUNDS times; prints medians.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; SECS=${SECS:-5}; FILE=${FILE:-/var/tmp/vstor-bench.img}
cargo build --release -q -p vstor
V=target/release/vstor
[ -f "$FILE" ] || { dd if=/dev/urandom of="$FILE" bs=1M count=2048 status=none; sync; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
jq_num() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

echo "| target | workload | QD | IOPS (median of $ROUNDS) | p50 us | p99 us | CPU ns/IO |"
echo "|---|---|---|---|---|---|---|"
for bdev in null:1024 malloc:1024; do
  for qd in 1 32 128; do
    iops=(); p50=(); p99=(); cpu=()
    for r in $(seq "$ROUNDS"); do
      j=$($V perf --bdev $bdev -w randread -o 4096 -q $qd -t "$SECS" --json)
      iops+=("$(echo "$j" | jq_num iops)"); p50+=("$(echo "$j" | jq_num p50_us)"); p99+=("$(echo "$j" | jq_num p99_us)"); cpu+=("$(echo "$j" | jq_num cpu_ns_per_io)")
    done
    printf "| vstor perf %s | randread 4K | %s | %.0f | %.1f | %.1f | %.0f |\n" "$bdev" $qd \
      "$(printf '%s\n' "${iops[@]}" | median)" "$(printf '%s\n' "${p50[@]}" | median)" "$(printf '%s\n' "${p99[@]}" | median)" "$(printf '%s\n' "${cpu[@]}" | median)"
  done
done
for rw in randread randwrite; do
  for qd in 1 32 128; do
    vi=(); fi_=(); vp=(); fp=()
    for r in $(seq "$ROUNDS"); do
      j=$($V perf --bdev uring:$FILE -w $rw -o 4096 -q $qd -t "$SECS" --json)
      vi+=("$(echo "$j" | jq_num iops)"); vp+=("$(echo "$j" | jq_num p50_us)")
      f=$(taskset -c 0 fio --name=b --filename="$FILE" --ioengine=io_uring --direct=1 --rw=$rw --bs=4k --iodepth=$qd \
          --runtime="$SECS" --time_based --output-format=json --eta=never)
      fi_+=("$(echo "$f" | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; print(j['read']['iops']+j['write']['iops'])")")
      fp+=("$(echo "$f" | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]; k='read' if j['read']['io_bytes'] else 'write'; print(j[k]['clat_ns']['percentile']['50.000000']/1000)")")
    done
    printf "| vstor perf uring | %s 4K | %s | %.0f | %.1f | | |\n" $rw $qd "$(printf '%s\n' "${vi[@]}" | median)" "$(printf '%s\n' "${vp[@]}" | median)"
    printf "| fio io_uring direct | %s 4K | %s | %.0f | %.1f | | |\n" $rw $qd "$(printf '%s\n' "${fi_[@]}" | median)" "$(printf '%s\n' "${fp[@]}" | median)"
  done
done
