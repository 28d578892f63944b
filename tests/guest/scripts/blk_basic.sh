# virtio-blk on vstor: size, queues, fio randwrite+verify with fsyncs on both vCPUs, discard,
# write-zeroes. vstor.arg = expected size in 512-byte sectors.
. /tests/lib.sh
wait_dev /sys/block/vda || exit 1
size=$(cat /sys/block/vda/size)
queues=$(ls /sys/block/vda/mq | wc -l)
echo "vda: $size sectors, $queues queues, cache: $(cat /sys/block/vda/cache_type), lbs $(cat /sys/block/vda/queue/logical_block_size)"
[ "$size" = "$VSTOR_ARG" ] || fail "size $size, expected $VSTOR_ARG"
echo "write back" > /sys/block/vda/cache_type 2>/dev/null
fio_run --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite \
    --bsrange=512-128k --iodepth=16 --size=24M --verify=crc32c --verify_fatal=1 --fsync=16 \
    --numjobs=2 --offset_increment=24M --group_reporting || fail "fio verify"
# Discard: the range reads back as zeroes on a RAM disk (vstor zeroes unmapped malloc blocks).
/usr/sbin/blkdiscard -o 50331648 -l 4194304 /dev/vda || fail "blkdiscard"
nz=$(dd if=/dev/vda bs=1M skip=48 count=4 2>/dev/null | tr -d '\000' | wc -c)
[ "$nz" = 0 ] || fail "discarded range holds $nz non-zero bytes"
# Write-zeroes: write data, zero it out, read zeroes.
dd if=/dev/urandom of=/dev/vda bs=1M seek=52 count=4 oflag=direct 2>/dev/null || fail "dd"
/usr/sbin/blkdiscard -z -o 54525952 -l 4194304 /dev/vda || fail "blkdiscard -z"
nz=$(dd if=/dev/vda bs=1M skip=52 count=4 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
[ "$nz" = 0 ] || fail "zeroed range holds $nz non-zero bytes"
sync
echo "vda ok"
