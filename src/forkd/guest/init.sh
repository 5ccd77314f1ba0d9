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

# An image with its own root file system (forkd.root=/dev/vda on the command line): mount it, move the
# kernel file systems over, and hand over to the image's Python, which runs the agent as PID 1.
root="" py=""
for arg in $($bb cat /proc/cmdline); do
  case "$arg" in
    forkd.root=*) root="${arg#forkd.root=}" ;;
    forkd.python=*) py="${arg#forkd.python=}" ;;
  esac
done
if [ -n "$root" ]; then
  $bb mkdir -p /newroot
  $bb mount -t ext4 -o noatime,noinit_itable "$root" /newroot || { err "cannot mount $root"; exit 1; }
  for d in proc sys dev run tmp etc root; do $bb mkdir -p "/newroot/$d"; done
  $bb chmod 1777 /newroot/tmp
  $bb umount /tmp /run
  $bb mount --move /proc /newroot/proc
  $bb mount --move /sys /newroot/sys
  $bb mount --move /dev /newroot/dev
  $bb mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /newroot/run
  $bb mkdir -p /newroot/run/forkd
  $bb cp /forkd/agent.py /newroot/run/forkd/agent.py
  if [ -e /sys/class/net/eth0 ] || [ -e /newroot/sys/class/net/eth0 ]; then
    $bb rm -f /newroot/etc/resolv.conf
    echo "nameserver 10.0.2.3" > /newroot/etc/resolv.conf
  fi
  # the image's environment (K=V lines written by the image builder) and working directory
  export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  [ -d /newroot/opt/forkd/python ] && export PYTHONPATH=/opt/forkd/python
  if [ -r /newroot/etc/forkd/env ]; then
    while IFS= read -r line; do
      case "$line" in [A-Za-z_]*=*) export "$line" ;; esac
    done < /newroot/etc/forkd/env
  fi
  [ -r /newroot/etc/forkd/workdir ] && export FORKD_WORKDIR="$($bb cat /newroot/etc/forkd/workdir)"
  log "switch to $root, exec $py"
  exec $bb switch_root /newroot "$py" -s /run/forkd/agent.py
  err "switch_root to $root failed"
  exit 1
fi

log "exec agent"
exec /usr/bin/python3.11 -S -E /forkd/agent.py
err "exec /usr/bin/python3.11 failed"
exit 1
