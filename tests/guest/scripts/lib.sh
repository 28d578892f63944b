# Helpers for guest test scripts (sourced).
wait_dev() { # wait_dev /sys/block/vda [seconds]
    i=0
    while [ ! -e "$1" ] && [ $i -lt "${2:-30}" ]; do sleep 1; i=$((i + 1)); done
    [ -e "$1" ] || { echo "device $1 did not appear"; return 1; }
}
fail() { echo "FAIL: $*"; exit 1; }
fio_run() { # fio with compact output; fails on any error
    fio --eta=never --output-format=terse --terse-version=3 "$@" > /tmp/fio.out 2>&1
    rc=$?
    # terse v3: field 5 = error code
    err=$(awk -F';' '{print $5}' /tmp/fio.out | sort -u | tr '\n' ' ')
    echo "fio rc=$rc errors=[$err] $*"
    [ $rc -eq 0 ] || { cat /tmp/fio.out | head -40; return 1; }
    return 0
}
