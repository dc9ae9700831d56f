#!/bin/sh
# livemount boot marker (/usr/local/sbin/lm-boot-marker), run by lm-boot-marker.service
# once multi-user.target is reached: prints the guest uptime and a few facts read
# from the root file system on the serial console (and the kernel log), then powers
# off. With `lm.hold` on the kernel command line it waits instead (up to 2 min):
# the livemount benchmark's watcher collects its figures and powers off itself.
read -r up _ < /proc/uptime
root=$(findmnt -no SOURCE / 2>/dev/null)
failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | wc -l)
debian=$(cat /etc/debian_version 2>/dev/null)
shell_sum=$(md5sum /bin/bash 2>/dev/null | cut -c1-12)
line="@@LMBOOT-MARKER multi-user uptime=$up root=$root debian=$debian failed_units=$failed bash_md5=$shell_sum"
# Serial first; the console too unless it is that same serial line.
echo "$line" > /dev/ttyS0 2>/dev/null
case " $(cat /sys/class/tty/console/active 2>/dev/null) " in
    *" ttyS0 "*) ;;
    *) echo "$line" > /dev/console ;;
esac
echo "$line" > /dev/kmsg
# lm.debug: where the boot's time went (after the marker, so not in the timing).
case " $(cat /proc/cmdline) " in
    *" lm.debug "*)
        { systemd-analyze 2>&1; systemd-analyze blame 2>&1 | head -20; systemd-analyze critical-chain 2>&1; } |
            sed 's/^/@@LMBOOT-DEBUG /' > /dev/ttyS0 ;;
esac
case " $(cat /proc/cmdline) " in
    *" lm.hold "*) sleep 120 ;;
esac
sync
echo o > /proc/sysrq-trigger
sleep 10
systemctl poweroff --force --force
