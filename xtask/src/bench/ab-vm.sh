# A/B in one VM boot: the previous session's binary (OLD) and this one (NEW), same
# image and store, fio io_uring O_DIRECT, 3 interleaved rounds.
set -u
OLD=/work/main/.cache/ab-old-livemount  # the previous release binary, copied here by hand
NEW=/work/main/target/release/livemount
cp --sparse=always /work/main/.cache/bench/image.img /tmp/image.img
cp -a /work/main/.cache/bench/store /tmp/store
FIO="timeout 90 fio --ioengine=io_uring --direct=1 --numjobs=1 --group_reporting --size=512M --output-format=json"
mount_lm() { # bin
  rm -f /tmp/ov.img
  $1 mount --store /tmp/store bench --overlay /tmp/ov.img --cache-mem 640M --queues 1 --depth 128 --daemon --log /tmp/lm.log > /tmp/lm.out || { cat /tmp/lm.log; exit 1; }
  awk '/^device/{print $2}' /tmp/lm.out
}
for r in 1 2 3; do
  for v in old new; do
    B=$OLD; [ $v = new ] && B=$NEW
    D=$(mount_lm $B)
    $FIO --name=seq --rw=read --bs=1M --iodepth=4 --io_size=512M --filename=$D --output=/results/$v-cold-seq1m-r$r.json >/dev/null
    $B unmount $D >/dev/null
    D=$(mount_lm $B)
    $FIO --name=rr --rw=randread --bs=4k --iodepth=32 --runtime=5 --time_based --filename=$D --output=/results/$v-cold-rr4k_qd32-r$r.json >/dev/null
    dd if=$D of=/dev/null bs=1M iflag=direct status=none
    $FIO --name=rr --rw=randread --bs=4k --iodepth=32 --runtime=5 --time_based --filename=$D --output=/results/$v-warm-rr4k_qd32-r$r.json >/dev/null
    $FIO --name=rr1 --rw=randread --bs=4k --iodepth=1 --runtime=5 --time_based --filename=$D --output=/results/$v-warm-rr4k_qd1-r$r.json >/dev/null
    $FIO --name=rw --rw=randwrite --bs=4k --iodepth=32 --runtime=5 --time_based --size=64M --filename=$D --output=/results/$v-rw4k_qd32-r$r.json >/dev/null
    $B unmount $D >/dev/null
  done
done
dmesg | tail -20 > /results/dmesg.txt
echo ab-done
