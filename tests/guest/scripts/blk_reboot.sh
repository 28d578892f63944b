# Guest reboot: phase 1 writes a verifiable pattern and a marker, then reboots (the device is reset);
# phase 2 (after the reset) verifies the pattern through the re-initialised device.
. /tests/lib.sh
wait_dev /sys/block/vda || exit 1
last=$(( $(cat /sys/block/vda/size) - 1 ))
mark=$(dd if=/dev/vda bs=512 skip=$last count=1 2>/dev/null | head -c 12)
job="--name=rb --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=16M --verify=crc32c --verify_fatal=1 --randseed=7"
if [ "$mark" = "VSTORREBOOT1" ]; then
    echo "phase 2: verifying after reboot"
    fio_run $job --verify_only || fail "verify after reboot"
    dd if=/dev/zero of=/dev/vda bs=512 seek=$last count=1 conv=notrunc 2>/dev/null
    sync
else
    echo "phase 1: writing"
    fio_run $job --do_verify=0 || fail "write"
    printf 'VSTORREBOOT1' | dd of=/dev/vda bs=512 seek=$last count=1 conv=sync 2>/dev/null
    sync
    touch /tmp/vstor-reboot
fi
