#!/bin/busybox sh
# forkd guest /init (PID 1 of the initramfs), run by busybox sh.
# Mounts the kernel file systems, loads the virtio modules listed (in dependency order) in
# /etc/forkd-modules by the image builder, sets up loopback and the QEMU user-mode network, then
# execs the Python agent. If the agent exits, PID 1 exits and the kernel panics (panic=-1: reboot).
bb=/bin/busybox

log() { echo "<6>forkd-init: $*" > /dev/kmsg 2>/dev/null; }
err() { echo "forkd-init: $*" >&2; echo "<3>forkd-init: $*" > /dev/kmsg 2>/dev/null; }

$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
$bb mkdir -p /dev/pts /dev/shm /tmp /run
$bb mount -t devpts -o mode=620,ptmxmode=666 devpts /dev/pts
$bb mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
$bb mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
$bb mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run

if [ -r /etc/forkd-modules ]; then
  while read -r mod; do
    case "$mod" in ''|'#'*) continue ;; esac
    $bb insmod "$mod" || err "insmod $mod failed"
  done < /etc/forkd-modules
fi
log "modules loaded"

# Periodic kernel work an idle sandbox does not need (each wake-up costs host CPU under emulation):
# proactive compaction (kcompactd every 0.5 s), per-CPU vm statistics folding (every 1 s), the hung
# task detector.
echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null
echo 30 > /proc/sys/vm/stat_interval 2>/dev/null
echo 0 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null

$bb hostname forkd
$bb ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  $bb ip link set eth0 up
  $bb ip addr add 10.0.2.15/24 dev eth0
  $bb ip route add default via 10.0.2.2 dev eth0
  echo "nameserver 10.0.2.3" > /etc/resolv.conf
  log "eth0 10.0.2.15/24 via 10.0.2.2"
fi

export PATH=/usr/local/bin:/usr/bin:/bin HOME=/root
cd /
log "exec agent"
exec /usr/bin/python3.11 -S -E /forkd/agent.py
err "exec /usr/bin/python3.11 failed"
exit 1
