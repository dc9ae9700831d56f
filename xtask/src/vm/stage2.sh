#!/bin/bash
# livemount test VM, stage 2: PID 1 after switch_root into the overlay of the host root.
#
# Loads the requested modules (ublk_drv), runs the run's script with bash in the
# requested directory and environment, writes its exit code to the control share
# (/run/lmvm/rc, read by the host) and on the console, then powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
. /run/lmvm/config.sh

step() { read -r up _ < /proc/uptime; echo "@@LMVM-STEP $1 (uptime $up)"; }
poweroff_now() {
    sync
    # Give the serial line a moment to drain before the machine goes away.
    sleep 0.2
    echo o > /proc/sysrq-trigger
    sleep 60
}
error() {
    echo "@@LMVM-ERROR $*"
    echo "$*" > /run/lmvm/error
    poweroff_now
}

for m in $LM_MODPROBE; do
    step "modprobe $m"
    out=$(modprobe "$m" 2>&1) || error "modprobe $m failed: $out"
done

step script
(
    # The script's environment: only what the host chose to pass.
    . /run/lmvm/env.sh
    cd "$LM_CWD" || exit 125
    exec bash /run/lmvm/script.sh
) < /dev/null
rc=$?
echo "$rc" > /run/lmvm/rc
step "script-exit $rc"

if [ "$LM_SHELL" = 1 ]; then
    echo "@@LMVM shell: the script exited with $rc; 'exit' or Ctrl-D powers the VM off"
    cd "$LM_CWD" && setsid -c bash -i < /dev/ttyS0 > /dev/ttyS0 2>&1
fi

step poweroff
echo "@@LMVM-EXIT $LM_NONCE $rc"
poweroff_now
