#!/bin/busybox sh
# livemount boot initramfs: /init (busybox, PID 1) that mounts a Debian root file
# system from a block device and switch_roots into its systemd.
#
# Kernel command line:
#   lm.init=PATH   what to run on the new root (default /sbin/init, i.e. systemd).
#   lm.stamp=WORD  print the stamp an earlier boot wrote on the root, write WORD.
#   lm.mode=disk   (default) root on a plain disk: lm.root=DEV (default /dev/vda).
#                  Used for the host profiling boot and for the nested-qemu smoke test.
#   lm.mode=vm     inside the ublk test VM: also mounts the host root over 9p (read-only,
#                  tmpfs overlay) at /host and the run's control share at
#                  /host/run/lmboot, runs /run/lmboot/prepare.sh chrooted into /host
#                  (it starts the livemount daemon or picks the local disk, writes the
#                  root device to /run/lmboot/root-dev and starts the watcher), then
#                  mounts that device and switch_roots onto it. The daemon and the
#                  watcher keep running from /host after the switch (the daemon in its
#                  own mount namespace, as libublk requires).
#
# Console markers "@@LMBOOT <step> uptime=<s> ..." are parsed by xtask/src/boot/.
/bin/busybox mkdir -p /bin /proc /sys /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

mark() {
    read -r up _ < /proc/uptime
    echo "@@LMBOOT $1 uptime=$up${2:+ $2}"
}
die() {
    echo "@@LMBOOT-ERROR $*"
    [ -d /host/run/lmboot ] && echo "$*" > /host/run/lmboot/error 2>/dev/null
    sync
    sleep 1
    echo o > /proc/sysrq-trigger
    sleep 30
}
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}
# Wait up to 10 s for a block device node.
wait_dev() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ $i -gt 200 ] && return 1
        sleep 0.05
    done
}

MODE=$(arg lm.mode) || MODE=disk
mark init "mode=$MODE"
for m in $(cat /modules.disk); do
    insmod "/lib/mod/$m.ko" || die "insmod $m failed"
done

if [ "$MODE" = disk ]; then
    ROOTDEV=$(arg lm.root) || ROOTDEV=/dev/vda
    wait_dev "$ROOTDEV" || die "no root device $ROOTDEV"
elif [ "$MODE" = vm ]; then
    for m in $(cat /modules.vm); do
        insmod "/lib/mod/$m.ko" || die "insmod $m failed"
    done
    NINEP="trans=virtio,version=9p2000.L,msize=262144"
    mkdir -p /mnt/lower /mnt/rw /host
    mount -t 9p -o "$NINEP,ro,cache=loose" hostroot /mnt/lower || die "mounting the host root over 9p failed"
    mount -t tmpfs -o mode=0755 rootrw /mnt/rw
    mkdir -p /mnt/rw/upper /mnt/rw/work
    mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /host \
        || die "overlay mount failed"
    H=/host
    mount -t proc proc $H/proc
    mount -t sysfs sys $H/sys
    mount -t devtmpfs dev $H/dev
    mkdir -p $H/dev/pts $H/dev/shm
    mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $H/dev/pts
    mount -t tmpfs -o mode=1777 shm $H/dev/shm
    ln -sf /proc/self/fd $H/dev/fd
    mount -t tmpfs -o mode=0755 run $H/run
    mount -t tmpfs -o mode=1777 tmp $H/tmp
    mkdir -p $H/run/lmboot
    mount -t 9p -o "$NINEP" lmctl $H/run/lmboot || die "mounting the control share failed"
    ip link set lo up 2>/dev/null
    mark prepare
    chroot $H /bin/bash /run/lmboot/prepare.sh || die "prepare.sh failed"
    ROOTDEV=$(cat $H/run/lmboot/root-dev) || die "prepare.sh wrote no root-dev"
    wait_dev "$ROOTDEV" || die "no root device $ROOTDEV"
else
    die "unknown lm.mode=$MODE"
fi

mark mount-root "dev=$ROOTDEV"
mount -t ext4 -o rw "$ROOTDEV" /newroot || die "mounting $ROOTDEV failed"
# lm.stamp=WORD (the migration smoke test): show the stamp an earlier boot left on
# the root, then leave this boot's (a write through the disk during the boot).
if STAMP=$(arg lm.stamp); then
    echo "@@LMBOOT-STAMP found=$(cat /newroot/var/lib/lm-stamp 2>/dev/null || echo none) new=$STAMP"
    echo "$STAMP" > /newroot/var/lib/lm-stamp && sync
fi
INIT=$(arg lm.init) || INIT=/sbin/init
[ -L "/newroot$INIT" ] || [ -x "/newroot$INIT" ] || die "no $INIT on $ROOTDEV"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
echo "@@LMBOOT switch-root uptime=$(cut -d' ' -f1 /newroot/proc/uptime)"
exec switch_root /newroot "$INIT"
die "switch_root failed"
