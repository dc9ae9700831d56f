#!/bin/busybox sh
# livemount test VM, stage 1: /init of the busybox initramfs (PID 1).
#
# Loads the 9p and overlay modules, mounts the host root read-only over 9p with a
# tmpfs overlay on top (so the guest can write anywhere, writes vanish at power-off),
# mounts the run's control share, the results share and the unpacked kernel's
# modules, then switch_roots into the overlay and runs the host's bash on stage 2
# (/run/lmvm/stage2.sh, written per run by `cargo xtask`).
#
# Markers on the console ("@@LMVM-...") are parsed by xtask/src/vm/runner.rs.
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin

step() {
    { read -r up _ < /proc/uptime; } 2>/dev/null || { read -r up _ < /newroot/proc/uptime; } 2>/dev/null
    echo "@@LMVM-STEP $1 (uptime $up)"
}
die() {
    echo "@@LMVM-ERROR stage1: $*"
    [ -d /mnt/ctl ] && echo "stage1: $*" > /mnt/ctl/error 2>/dev/null
    sync
    echo o > /proc/sysrq-trigger
    sleep 30
}

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

step insmod
for m in $(cat /modules.order); do
    insmod "/lib/mod/$m.ko" || die "insmod $m failed"
done

NINEP="trans=virtio,version=9p2000.L,msize=262144"
step mount-ctl
mkdir -p /mnt/ctl /mnt/lower /mnt/rw /newroot
mount -t 9p -o "$NINEP" lmctl /mnt/ctl || die "mounting the control share failed"
. /mnt/ctl/config.sh || die "cannot read /mnt/ctl/config.sh"

step mount-root
mount -t 9p -o "$NINEP,ro,cache=${LM_ROOT_CACHE:-loose}" hostroot /mnt/lower || die "mounting the host root over 9p failed"
mount -t tmpfs -o mode=0755 rootrw /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot \
    || die "overlay mount failed"

step mount-misc
R=/newroot
mount --move /proc $R/proc
mount --move /sys $R/sys
mount --move /dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mount -t tmpfs -o mode=0755 run $R/run
# The guest gets a fresh /tmp; a repository that lives under /tmp (a CI checkout)
# stays visible at its path, writable through the overlay like everything else.
case "$LM_REPO" in
    /tmp/*) mkdir -p /mnt/repo && mount --bind "$R$LM_REPO" /mnt/repo || die "keeping $LM_REPO visible failed" ;;
esac
mount -t tmpfs -o mode=1777 tmp $R/tmp
if [ -d /mnt/repo ]; then
    mkdir -p "$R$LM_REPO" && mount --move /mnt/repo "$R$LM_REPO" || die "keeping $LM_REPO visible failed"
fi
mkdir -p $R/run/lmvm
mount --move /mnt/ctl $R/run/lmvm
mkdir -p "$R/lib/modules/$LM_KVER"
mount --bind "$R$LM_MODULES" "$R/lib/modules/$LM_KVER" || die "bind-mounting the modules failed"
if [ -n "$LM_RESULTS" ]; then
    mkdir -p "$R$LM_RESULTS"
    mount -t 9p -o "$NINEP" lmresults "$R$LM_RESULTS" || die "mounting the results share failed"
fi
ip link set lo up
hostname livemount-vm

step switch-root
exec switch_root $R /bin/bash /run/lmvm/stage2.sh
die "switch_root failed"
