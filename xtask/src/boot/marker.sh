#!/bin/sh
# livemount boot marker (/usr/local/sbin/lm-boot-marker), run by lm-boot-marker.service
# once multi-user.target is reached: prints the guest uptime and a few facts read
# from the root file system on the serial console (and the kernel log), then powers
# off. Also usable as init itself (`lm.init=/usr/local/sbin/lm-boot-marker`, the quick
# smoke test): then it only shows that the root's files can be read. With `lm.hold` on the kernel command line it waits instead (up to 2 min):
# the livemount benchmark's watcher collects its figures and powers off itself.
read -r up _ < /proc/uptime
root=$(findmnt -no SOURCE / 2>/dev/null)
failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | wc -l)
debian=$(cat /etc/debian_version 2>/dev/null)
shell_sum=$(md5sum /bin/bash 2>/dev/null | cut -c1-12)
pid1=$(cat /proc/1/comm 2>/dev/null)
step=multi-user
[ "$pid1" = systemd ] || step=init-script
line="@@LMBOOT-MARKER $step uptime=$up root=$root pid1=$pid1 debian=$debian failed_units=$failed bash_md5=$shell_sum"
# lm.debug: where the boot's time went (the uptime above is already taken; printed
# before the marker because watchers power off when they see it).
case " $(cat /proc/cmdline) " in
    *" lm.debug "*)
        journalctl -b -o short-monotonic --no-pager 2>&1 | grep -E 'Start|Reached|Finished|kernel: [a-z]' |
            sed 's/^/@@LMBOOT-DEBUG /' > /dev/ttyS0 ;;
esac
# Serial first; the console too unless it is that same serial line.
echo "$line" > /dev/ttyS0 2>/dev/null
case " $(cat /sys/class/tty/console/active 2>/dev/null) " in
    *" ttyS0 "*) ;;
    *) echo "$line" > /dev/console ;;
esac
echo "$line" > /dev/kmsg
case " $(cat /proc/cmdline) " in
    *" lm.hold "*) sleep 120 ;;
esac
sync
echo o > /proc/sysrq-trigger
sleep 10
systemctl poweroff --force --force
