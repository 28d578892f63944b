# virtio-scsi on vstor: two targets at boot (sizes checked), fio verify on each, discard, SCSI
# inquiry, then a target hot-added by the host and another hot-removed while fio runs on the first.
# vstor.arg = "SECTORS0,SECTORS1" expected sizes of targets 0 and 1 (512-byte sectors).
. /tests/lib.sh
disk() { # disk TARGET -> block device name of LUN 0 of that target
    for d in /sys/class/scsi_disk/*:0:$1:0/device/block/*; do [ -e "$d" ] && basename "$d"; done
}
wait_disk() { # wait_disk TARGET
    i=0
    while [ -z "$(disk $1)" ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
    [ -n "$(disk $1)" ]
}
wait_disk 0 || fail "target 0 not found"
wait_disk 1 || fail "target 1 not found"
d0=$(disk 0); d1=$(disk 1)
s0=$(cat /sys/block/$d0/size); s1=$(cat /sys/block/$d1/size)
echo "targets: 0=$d0 ($s0 sectors) 1=$d1 ($s1 sectors)"
[ "$s0,$s1" = "$VSTOR_ARG" ] || fail "sizes $s0,$s1, expected $VSTOR_ARG"
if command -v sg_inq >/dev/null; then
    sg_inq /dev/$d0 | grep -q VSTOR || fail "sg_inq vendor"
    sg_vpd -p bl /dev/$d0 >/dev/null || fail "sg_vpd block limits"
    sg_readcap -l /dev/$d1 | grep -q "Logical block length=512" || fail "sg_readcap"
fi
grep -q VSTOR /sys/block/$d0/device/vendor || fail "vendor"
for d in $d0 $d1; do
    fio_run --name=v$d --filename=/dev/$d --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
        --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1 || fail "fio on $d"
done
/usr/sbin/blkdiscard -o 0 -l 1048576 /dev/$d0 || fail "blkdiscard"
nz=$(dd if=/dev/$d0 bs=1M count=1 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
[ "$nz" = 0 ] || fail "discarded range holds $nz non-zero bytes"
echo "VSTOR-WAIT hotadd"
wait_disk 2 || fail "hot-added target 2 did not appear"
d2=$(disk 2)
echo "hot-added target 2 = $d2 ($(cat /sys/block/$d2/size) sectors)"
fio_run --name=h --filename=/dev/$d2 --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 \
    --size=4M --verify=crc32c --verify_fatal=1 || fail "fio on hot-added disk"
# fio on target 0 while the host removes target 1.
fio --eta=never --output-format=terse --terse-version=3 --name=bg --filename=/dev/$d0 --ioengine=libaio \
    --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=24M --verify=crc32c --verify_fatal=1 > /tmp/bg.out 2>&1 &
bg=$!
echo "VSTOR-WAIT hotremove"
i=0
while [ -n "$(disk 1)" ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
[ -z "$(disk 1)" ] || fail "target 1 still present after removal"
echo "target 1 removed"
wait $bg || { cat /tmp/bg.out; fail "fio on target 0 during hot-remove"; }
echo "fio on target 0 passed during hot-remove"
