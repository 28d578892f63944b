# Restart resilience: fio writes and verifies while the host kills and restarts vstor. The guest
# must see pauses, never an I/O error. Several rounds so the kills land during writes.
. /tests/lib.sh
wait_dev /sys/block/vda || exit 1
for round in 1 2 3 4 5 6; do
    echo "round $round"
    fio_run --name=rs$round --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite \
        --bs=4k --iodepth=16 --size=16M --offset=$(( (round - 1) * 16 ))M \
        --verify=crc32c --verify_fatal=1 --randseed=$round || fail "round $round"
done
echo "all rounds verified"
