#!/usr/bin/env bash
# Fuzzes vstor's hostile-input surfaces (issue 6) with the cargo-fuzz targets in fuzz/.
#
#   scripts/fuzz.sh [SECONDS]      run every target for SECONDS (default 60), two at a time
#
# Installs cargo-fuzz if missing, builds every target once (AddressSanitizer, on the stable
# toolchain through RUSTC_BOOTSTRAP=1), then runs each from a copy of its seed corpus
# (fuzz/seeds/<target>) in a temporary directory, so the tree stays clean. Exits non-zero if any
# target crashed (panic, sanitizer report, timeout, out-of-memory) and prints the input that did it;
# reproduce with the printed command.
#
# Environment:
#   FUZZ_TARGETS="a b"   only these targets          FUZZ_JOBS=2        targets run at once
#   FUZZ_SANITIZER=none  build without ASan           FUZZ_WORK=dir      keep corpora/logs there
#   CARGO_TARGET_DIR     where to build (default fuzz/target)
set -euo pipefail

SECS=${1:-60}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ_DIR=$ROOT/fuzz
JOBS=${FUZZ_JOBS:-2}
SANITIZER=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$FUZZ_DIR/target}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')

# target:max_len:extra libFuzzer flags. Targets that run vstor's threads (reactors, connection
# threads) do not check for leaks after each input: memory those threads hold looks leaked then.
ALL_TARGETS=(
    "nvme_cmd:16384:-detect_leaks=0"
    "virtio_split_chain:20000:"
    "vhost_user_msgs:20000:-detect_leaks=0"
    "virtio_packed_chain:20000:"
    "jsonrpc:4096:-detect_leaks=0"
    "virtio_blk_request:20000:"
    "config:4096:-detect_leaks=0"
    "scsi_cdb:16384:"
    "vfio_user_msgs:20000:-detect_leaks=0"
)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

selected=()
for t in "${ALL_TARGETS[@]}"; do
    name=${t%%:*}
    if [[ -z ${FUZZ_TARGETS:-} || " $FUZZ_TARGETS " == *" $name "* ]]; then
        selected+=("$t")
    fi
done
if [[ ${#selected[@]} -eq 0 ]]; then
    echo "no target matches FUZZ_TARGETS=$FUZZ_TARGETS" >&2
    exit 2
fi

start=$(date +%s)
echo "== building ${#selected[@]} targets (sanitizer: $SANITIZER, target dir: $CARGO_TARGET_DIR)"
(cd "$FUZZ_DIR" && cargo fuzz build --sanitizer "$SANITIZER" --release)
built=$(date +%s)
BIN_DIR=$CARGO_TARGET_DIR/$TRIPLE/release

if [[ -n ${FUZZ_WORK:-} ]]; then
    WORK=$FUZZ_WORK
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/vstor-fuzz.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi

run_target() {
    local name=$1 max_len=$2 extra=$3
    local corpus=$WORK/corpus/$name art=$WORK/artifacts/$name/ log=$WORK/$name.log
    rm -rf "$corpus" "$art"
    mkdir -p "$corpus" "$art"
    cp "$FUZZ_DIR/seeds/$name/"* "$corpus/"
    local rc=0
    # shellcheck disable=SC2086 # $extra is a list of flags
    (cd "$WORK" && TMPDIR=$WORK exec "$BIN_DIR/$name" "$corpus" -max_total_time="$SECS" -max_len="$max_len" \
        -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$art" $extra) >"$log" 2>&1 ||
        rc=$?
    echo "$rc" >"$WORK/$name.rc"
}

echo "== fuzzing each target for ${SECS}s, $JOBS at a time (work directory $WORK)"
for t in "${selected[@]}"; do
    IFS=: read -r name max_len extra <<<"$t"
    while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do
        wait -n || true
    done
    echo "   start $name"
    run_target "$name" "$max_len" "$extra" &
done
wait

failed=0
crashed=()
printf '\n%-22s %10s %12s %8s  %s\n' target execs exec/s cov result
for t in "${selected[@]}"; do
    name=${t%%:*}
    status=$(cat "$WORK/$name.rc" 2>/dev/null || echo 1)
    log=$WORK/$name.log
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1 || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)
    artifacts=$(find "$WORK/artifacts/$name" -type f 2>/dev/null || true)
    if [[ $status -ne 0 || -n $artifacts ]]; then
        result=CRASH
        failed=1
        crashed+=("$name")
    else
        result=ok
    fi
    printf '%-22s %10s %12s %8s  %s\n' "$name" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$result"
done

for name in "${crashed[@]}"; do
    artifacts=$(find "$WORK/artifacts/$name" -type f 2>/dev/null || true)
    status_line=$(grep -m1 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)|SUMMARY' "$WORK/$name.log" || true)
    {
        echo
        echo "== $name crashed: ${status_line:-see the log}"
        # Keep the evidence outside the temporary directory.
        keep=$ROOT/fuzz/artifacts/$name
        mkdir -p "$keep"
        for a in $artifacts; do
            cp "$a" "$keep/"
            echo "   crash input: $keep/$(basename "$a")"
            echo "   reproduce:   $BIN_DIR/$name $keep/$(basename "$a")"
        done
        cp "$WORK/$name.log" "$keep/fuzz.log"
        echo "   log: $keep/fuzz.log"
        tail -n 40 "$WORK/$name.log" | sed 's/^/   | /'
    }
done

end=$(date +%s)
echo
echo "== build $((built - start))s, fuzzing $((end - built))s, total $((end - start))s"
exit $failed
