# Live migration: write a verifiable pattern (the host migrates the VM meanwhile), then read it
# back and verify (the host migrates again meanwhile). Runs on whichever QEMU holds the VM.
. /tests/lib.sh
wait_dev /sys/block/vda || exit 1
job="--name=mig --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=60M --verify=crc32c --verify_fatal=1 --randseed=11"
echo "phase: write"
fio_run $job --do_verify=0 || fail "write phase"
echo "phase: verify"
fio_run $job --verify_only || fail "verify phase"
echo "migration workload verified"
