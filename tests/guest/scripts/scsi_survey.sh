# A survey, not a pass/fail test: what a Linux guest finds on a virtio-scsi controller with two
# disks. Prints one "SURVEY <item>: <result>" line per check (used to compare SCSI targets).
. /tests/lib.sh
disk() { for d in /sys/class/scsi_disk/*:0:$1:0/device/block/*; do [ -e "$d" ] && basename "$d"; done; }
i=0
while [ -z "$(disk 1)" ] && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
n=$(ls /sys/class/scsi_disk | wc -l)
echo "SURVEY disks found: $n"
d=$(disk 0)
[ -n "$d" ] || { echo "SURVEY target 0: missing"; exit 0; }
echo "SURVEY size (sectors): $(cat /sys/block/$d/size)"
echo "SURVEY vendor/model: $(cat /sys/block/$d/device/vendor | tr -s ' ') / $(cat /sys/block/$d/device/model | tr -s ' ')"
echo "SURVEY cache type: $(cat /sys/class/scsi_disk/*:0:0:0/cache_type)"
echo "SURVEY rotational: $(cat /sys/block/$d/queue/rotational)"
echo "SURVEY discard max bytes: $(cat /sys/block/$d/queue/discard_max_bytes)"
echo "SURVEY write same max bytes: $(cat /sys/block/$d/queue/write_same_max_bytes 2>/dev/null || echo n/a)"
echo "SURVEY max sectors kb: $(cat /sys/block/$d/queue/max_sectors_kb)"
if command -v sg_vpd >/dev/null; then
    echo "SURVEY VPD pages: $(sg_vpd -p sv /dev/$d 2>&1 | grep -o '\[[a-z0-9]*\]' | tr -d '[]' | tr '\n' ' ')"
    sg_vpd -p di /dev/$d >/dev/null 2>&1 && echo "SURVEY device identification: yes" || echo "SURVEY device identification: no"
    sg_vpd -p lbpv /dev/$d >/dev/null 2>&1 && echo "SURVEY logical block provisioning page: yes" || echo "SURVEY logical block provisioning page: no"
    echo "SURVEY READ CAPACITY 16: $(sg_readcap -l /dev/$d 2>&1 | grep -o 'Logical block length=[0-9]*' || echo fails)"
fi
if fio_run --name=w --filename=/dev/$d --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
    --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1 >/dev/null; then
    echo "SURVEY fio randwrite+verify: ok"
else
    echo "SURVEY fio randwrite+verify: FAILED"
fi
if /usr/sbin/blkdiscard -o 0 -l 1048576 /dev/$d 2>/tmp/bd; then
    if dd if=/dev/$d of=/tmp/after bs=1M count=1 iflag=direct 2>/tmp/dd; then
        echo "SURVEY blkdiscard: ok (non-zero bytes after: $(tr -d '\000' </tmp/after | wc -c) of $(wc -c </tmp/after))"
    else
        echo "SURVEY blkdiscard: ok (read-back fails: $(head -c 80 /tmp/dd))"
    fi
else
    echo "SURVEY blkdiscard: fails ($(head -c 80 /tmp/bd))"
fi
dd if=/dev/zero of=/dev/$d bs=4k count=1 seek=100 oflag=direct conv=fsync 2>/tmp/dd && echo "SURVEY fsync'd write: ok" ||
    echo "SURVEY fsync'd write: fails ($(head -c 80 /tmp/dd))"
echo "SURVEY done"
