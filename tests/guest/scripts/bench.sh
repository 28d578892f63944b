# Benchmark: 4 KiB randread/randwrite at QD 1, 32 and 128 on the disk named by vstor.arg
# (vda or sda), 8 s each. The host samples the target's CPU time between BENCH-BEGIN and BENCH-END.
. /tests/lib.sh
dev=$VSTOR_ARG
wait_dev /sys/block/$dev || exit 1
for rw in randread randwrite; do
    for qd in 1 32 128; do
        echo "BENCH-BEGIN $rw $qd"
        fio --name=b --filename=/dev/$dev --ioengine=libaio --direct=1 --rw=$rw --bs=4k --iodepth=$qd \
            --time_based --runtime=8 --size=128M --eta=never --output-format=terse --terse-version=3 \
            > /tmp/b.out 2>&1 || { cat /tmp/b.out; fail "fio $rw $qd"; }
        # terse v3: field 6 read KiB, 47 write KiB
        kb=$(awk -F';' '{print $6 + $47}' /tmp/b.out)
        echo "BENCH-END $rw $qd kib=$kb"
    done
done
