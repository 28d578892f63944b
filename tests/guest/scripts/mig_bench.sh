# Migration benchmark workload: 4 KiB random writes at QD 16 for 40 s with an IOPS log averaged
# over 500 ms, printed at the end (the host migrates the VM meanwhile, maybe twice).
. /tests/lib.sh
wait_dev /sys/block/vda || exit 1
echo "FIO-START"
fio --name=m --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 \
    --size=64M --time_based --runtime=40 --write_iops_log=/tmp/m --log_avg_msec=500 \
    --eta=never --output-format=terse --terse-version=3 > /tmp/m.out 2>&1 || { cat /tmp/m.out; fail fio; }
echo "FIO-END"
for f in /tmp/m_iops*.log; do sed 's/^/IOPSLOG /' "$f"; done
