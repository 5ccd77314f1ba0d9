#!/usr/bin/env bash
# Prove packaging/systemd/forkd-controller.service under a real systemd: boot systemd (PID 1) in a podman
# container made from a clean Debian 12 root file system (debootstrap + systemd + dbus), install forkd
# the way docs/deployment.md says (/opt/forkd, `make install`: the apt packages and /opt/forkd/.venv),
# install the unit and packaging/logrotate/forkd, start the unit, and over the REST API: create a
# snapshot, spawn a sandbox with a memory limit in a per-child network namespace, eval in it, branch it,
# `systemctl restart` the unit and check the sandbox is re-adopted (same id, same QEMU, still answers);
# then `logrotate -f` and check the daemon writes its audit log to the new file. Prints what it saw:
# the unit's effective hardening (`systemctl show`), QEMU's cgroup, namespace and seccomp status, journal lines.
# Run as root on a Debian/Ubuntu host with debootstrap and podman.
#
#   sudo scripts/systemd-check.sh --base /var/tmp/forkd-base/rootfs        # copy a pristine minbase root
#   sudo scripts/systemd-check.sh                                         # or debootstrap one
#   sudo scripts/systemd-check.sh --phase test --keep     # re-run the checks in the container kept last time
#
# Options:
#   --base DIR     copy DIR (a pristine `debootstrap --variant=minbase bookworm` tree) instead of debootstrapping
#   --work DIR     scratch directory (default /var/tmp/forkd-deploy/systemd)
#   --ref REF      the commit to install (default HEAD); --worktree: the working tree as it would be committed
#   --unit FILE    the unit to test (default packaging/systemd/forkd-controller.service of this checkout)
#   --phase P      setup (root + container + install), test (unit + checks), or all (default)
#   --keep         leave the container running (and the root) afterwards
#   --no-host-ca   do not copy this host's extra CA certificates in (see scripts/clean-debian-check.sh)
#   --host-alias   point the host's /var/lib/forkd at the container's while the check runs (when the host
#                  has none). Older forkd versions on the host killed the container's VMs as orphans (their
#                  sweep looked work dirs up by path); current ones skip QEMUs in other PID namespaces and
#                  tell an orphan by its qemu.log having no links, so this is off by default.
set -euo pipefail

say() { printf 'systemd-check: %s\n' "$*"; }
die() { printf 'systemd-check: error: %s\n' "$*" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
work=/var/tmp/forkd-deploy/systemd
base="" ref=HEAD worktree=0 keep=0 host_ca=1 phase=all unit="" host_alias=0
while (($#)); do
    case $1 in
        --base) base=$2; shift ;;
        --work) work=$2; shift ;;
        --ref) ref=$2; shift ;;
        --worktree) worktree=1 ;;
        --unit) unit=$2; shift ;;
        --phase) phase=$2; shift ;;
        --keep) keep=1 ;;
        --no-host-ca) host_ca=0 ;;
        --host-alias) host_alias=1 ;;
        --no-host-alias) host_alias=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (try --help)" ;;
    esac
    shift
done
[[ $phase == setup || $phase == test || $phase == all ]] || die "--phase must be setup, test or all"
unit=${unit:-$repo/packaging/systemd/forkd-controller.service}
[[ -f $unit ]] || die "no unit file $unit"
[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v podman >/dev/null || die "podman not found: apt-get install -y podman"

rootfs=$work/rootfs
name=forkd-systemd-check
runtime=()
if command -v runc >/dev/null && grep -q ' /sys/fs/cgroup/unified cgroup2' /proc/mounts; then
    runtime=(--runtime runc)  # crun refuses hybrid cgroup hosts
fi
pm() { podman "${runtime[@]}" "$@"; }
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu) pidmax=$(cat /proc/sys/kernel/pid_max)
[[ $nproc == unlimited || $nproc -gt $pidmax ]] && nproc=$pidmax
[[ $nofile == unlimited ]] && nofile=1048576
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
envs=()
if ((host_ca)) && compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    for v in PIP_CERT REQUESTS_CA_BUNDLE SSL_CERT_FILE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS; do
        envs+=(--env "$v=/etc/host-ca-bundle.pem")
    done
fi
in_ct() { pm exec "${envs[@]}" "$name" bash -c "$1"; }
step() { printf '\n==== %s\n' "$*"; }

setup() {
    pm rm -f -t 5 "$name" >/dev/null 2>&1 || true
    rm -rf "$rootfs"
    mkdir -p "$work"
    if [[ -n $base ]]; then
        [[ -x $base/bin/bash && -f $base/etc/debian_version ]] || die "--base $base is not a Debian root file system"
        say "root: copy of $base (Debian $(cat "$base/etc/debian_version"))"
        cp -a "$base" "$rootfs"
    else
        command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install -y debootstrap"
        say "root: debootstrap --variant=minbase bookworm"
        debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
            || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }
    fi
    cat >"$rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    if ((host_ca)) && compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        mkdir -p "$rootfs/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/host-ca-bundle.pem"
        say "host CAs copied in (pip reaches PyPI through this host's egress proxy)"
    fi
    # The repository, as docs/deployment.md installs it: /opt/forkd
    mkdir -p "$rootfs/opt/forkd"
    if ((worktree)); then
        idx=$(mktemp)
        cp "$repo/.git/index" "$idx" 2>/dev/null || true
        GIT_INDEX_FILE=$idx git -C "$repo" add -A
        tree=$(GIT_INDEX_FILE=$idx git -C "$repo" write-tree)
        rm -f "$idx"
        say "repository: working tree of $repo as tree $tree (on $(git -C "$repo" rev-parse --short HEAD))"
        git -C "$repo" archive "$tree" | tar -C "$rootfs/opt/forkd" -x
    else
        commit=$(git -C "$repo" rev-parse --verify "$ref^{commit}")
        say "repository: git archive $ref ($commit)"
        git -C "$repo" archive "$commit" | tar -C "$rootfs/opt/forkd" -x
    fi
    # systemd and dbus (what a stock Debian 12 boots with), logrotate, make; curl for this script's requests
    step "install systemd, dbus, logrotate, make, curl into the root (podman, not booted yet)"
    pm run --rm "${limits[@]}" "${envs[@]}" --rootfs "$rootfs" bash -c \
        'apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
         systemd systemd-sysv dbus logrotate make curl >/dev/null && echo "installed: $(systemctl --version | head -1)"'
    step "boot: systemd as PID 1 in a podman container (privileged: the jail needs namespaces, cgroups, nftables)"
    pm run -d --name "$name" --privileged --systemd=always --cgroupns=private --network=bridge --shm-size=1g \
        "${limits[@]}" "${envs[@]}" --rootfs "$rootfs" /sbin/init >/dev/null
    for _ in $(seq 60); do
        st=$(pm exec "$name" systemctl is-system-running 2>/dev/null || true)
        [[ $st == running || $st == degraded ]] && break
        sleep 2
    done
    in_ct 'echo "PID 1: $(cat /proc/1/comm), system: $(systemctl is-system-running)"; systemctl --failed --no-legend --plain | sed "s/^/  failed: /"'
    step "install forkd as docs/deployment.md says: cd /opt/forkd && make install"
    in_ct 'cd /opt/forkd && make install 2>&1 | tail -n 3; ls -l /opt/forkd/.venv/bin/forkd-controller'
    step "token, guest image (FORKD_HOME=/var/lib/forkd), per-child network namespaces"
    in_ct 'install -d -m 0700 /etc/forkd /var/lib/forkd && head -c 32 /dev/urandom | base64 > /etc/forkd/token && chmod 600 /etc/forkd/token
           FORKD_HOME=/var/lib/forkd /opt/forkd/.venv/bin/forkd image build 2>&1 | tail -n 2
           /opt/forkd/scripts/netns-setup.sh 2'
}

api() {  # METHOD PATH [JSON]: prints the body, then "HTTP <status>" on its own line
    local data=()
    [[ $# -ge 3 ]] && data=(-H 'Content-Type: application/json' -d "$3")
    in_ct "curl -sS -m 900 -w '\nHTTP %{http_code}\n' -X $1 -H \"Authorization: Bearer \$(cat /etc/forkd/token)\" \
           ${data[*]+$(printf '%q ' "${data[@]}")} http://127.0.0.1:8889$2"
}
json() { python3 -c "import json,sys; d=json.loads(sys.stdin.read().rsplit('HTTP',1)[0]); print($1)"; }
code() { tail -n 1 | awk '{print $2}'; }
fail=0
check() {  # DESCRIPTION CONDITION...
    local what=$1; shift
    if "$@"; then say "PASS $what"; else say "FAIL $what"; fail=1; fi
}

wait_healthy() {
    for _ in $(seq 180); do
        in_ct 'curl -sf -m 2 http://127.0.0.1:8889/healthz >/dev/null' 2>/dev/null && return 0
        in_ct 'systemctl -q is-failed forkd-controller' 2>/dev/null && return 1
        sleep 1
    done
    return 1
}

run_checks() {
    step "install the unit and packaging/logrotate/forkd, start it"
    pm cp "$unit" "$name:/etc/systemd/system/forkd-controller.service"
    pm cp "$repo/packaging/logrotate/forkd" "$name:/etc/logrotate.d/forkd"
    # a re-run: stop the last run's daemon and its VMs (the processes left in the unit's cgroup, by pid)
    in_ct 'systemctl stop forkd-controller 2>/dev/null
           for p in $(cat /sys/fs/cgroup/systemd/system.slice/forkd-controller.service/cgroup.procs 2>/dev/null); do kill -KILL $p; done
           rm -rf /var/lib/forkd/snapshots/sd-* /var/lib/forkd/state.json /var/lib/forkd/run; sleep 1
           systemctl daemon-reload && systemctl enable --now forkd-controller 2>&1
           grep -E "^ExecStart=" /etc/systemd/system/forkd-controller.service'
    if ! wait_healthy; then
        in_ct 'systemctl status --no-pager forkd-controller | head -20; journalctl -u forkd-controller --no-pager -n 40'
        die "the daemon did not become healthy"
    fi
    local t0 mainpid
    mainpid=$(in_ct 'systemctl show -p MainPID --value forkd-controller')
    say "healthy; MainPID $mainpid"

    step "effective hardening (systemctl show)"
    in_ct 'systemctl show forkd-controller -p User -p NoNewPrivileges -p PrivateTmp -p ProtectSystem -p ProtectHome \
      -p ProtectControlGroups -p ProtectKernelTunables -p ProtectKernelModules -p ProtectKernelLogs -p ProtectClock \
      -p ProtectHostname -p RestrictRealtime -p RestrictSUIDSGID -p LockPersonality -p RestrictNamespaces \
      -p RestrictAddressFamilies -p DevicePolicy -p DeviceAllow -p CapabilityBoundingSet -p SystemCallArchitectures \
      -p SystemCallErrorNumber -p MemoryDenyWriteExecute -p ReadWritePaths -p KillMode -p RuntimeDirectoryPreserve \
      -p TasksMax -p LimitNOFILE -p UMask | sed "s/^/  /"
      echo "  SystemCallFilter (first 300 chars, allow-list): $(systemctl show -p SystemCallFilter --value forkd-controller | cut -c1-300)"
      echo "  systemd-analyze security: $(systemd-analyze security forkd-controller --no-pager 2>/dev/null | tail -n 1)"
      echo "  daemon: $(grep -E "^(NoNewPrivs|Seccomp|CapBnd|CapEff)" /proc/'"$mainpid"'/status | tr -s "\t\n" "  ")"'

    step "POST /v1/snapshots {tag: sd-base} (a parent VM booted under the unit)"
    t0=$(date +%s)
    out=$(api POST /v1/snapshots '{"tag": "sd-base", "memory_mib": 512}')
    say "-> HTTP $(code <<<"$out") after $(( $(date +%s) - t0 )) s: $(head -c 300 <<<"$out" | tr '\n' ' ')"
    check "snapshot created (201)" test "$(code <<<"$out")" = 201

    step "POST /v1/sandboxes {memory_limit_mib: 1024, per_child_netns: true}"
    out=$(api POST /v1/sandboxes '{"snapshot_tag": "sd-base", "n": 1, "memory_limit_mib": 1024, "per_child_netns": true}')
    say "-> HTTP $(code <<<"$out"): $(head -c 400 <<<"$out" | tr '\n' ' ')"
    sid=$(json 'd[0]["sandbox"]["id"]' <<<"$out" 2>/dev/null || true)
    check "sandbox spawned (201, an id)" test -n "$sid"
    [[ -n $sid ]] || { in_ct 'journalctl -u forkd-controller --no-pager -n 40'; return; }
    info=$(api GET "/v1/sandboxes/$sid")
    qpid=$(json 'd["pid"]' <<<"$info")
    say "sandbox $sid: $(json '{k: d[k] for k in ("status", "pid", "netns", "memory_limit_mib")}' <<<"$info")"
    in_ct "echo \"  QEMU $qpid: uid \$(awk '/^Uid/{print \$2}' /proc/$qpid/status), \$(grep -E '^(Seccomp|NoNewPrivs)' /proc/$qpid/status | tr -s '\t\n' '  ')\"
           echo \"  QEMU net ns \$(readlink /proc/$qpid/ns/net), forkd-child-1 is net:[\$(stat -L -c %i /run/netns/forkd-child-1)], the host's \$(readlink /proc/1/ns/net)\"
           echo \"  QEMU cgroups: \$(grep -E ':(memory|pids|name=systemd):' /proc/$qpid/cgroup | tr '\n' ' ')\"
           m=\$(awk -F: '\$2==\"memory\"{print \$3}' /proc/$qpid/cgroup)
           echo \"  memory limit: \$(cat /sys/fs/cgroup/memory\$m/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup\$m/memory.max) bytes\""
    netok=$(in_ct "[ \$(readlink /proc/$qpid/ns/net) = net:[\$(stat -L -c %i /run/netns/forkd-child-1)] ] && echo yes || echo no")
    check "QEMU runs in network namespace forkd-child-1" test "$netok" = yes
    memok=$(in_ct "m=\$(awk -F: '\$2==\"memory\"{print \$3}' /proc/$qpid/cgroup); v=\$(cat /sys/fs/cgroup/memory\$m/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup\$m/memory.max); [ \"\$v\" = \$((1024 << 20)) ] && echo yes || echo no")
    check "QEMU's memory cgroup limit is 1024 MiB" test "$memok" = yes
    seccok=$(in_ct "grep -q '^Seccomp:[[:space:]]*2' /proc/$qpid/status && echo yes || echo no")
    check "QEMU runs under a seccomp filter (QEMU's -sandbox on, stacked on the unit's)" test "$seccok" = yes

    out=$(api POST "/v1/sandboxes/$sid/eval" '{"expr": "numpy.zeros(5).tolist()"}')
    say "eval -> HTTP $(code <<<"$out"): $(head -n 1 <<<"$out")"
    check "eval answers" test "$(code <<<"$out")" = 200

    step "POST /v1/sandboxes/$sid/branch {tag: sd-branch}"
    out=$(api POST "/v1/sandboxes/$sid/branch" '{"tag": "sd-branch"}')
    say "-> HTTP $(code <<<"$out"): $(head -n 1 <<<"$out" | head -c 300)"
    check "branch created (201)" test "$(code <<<"$out")" = 201
    out=$(api POST /v1/sandboxes '{"snapshot_tag": "sd-branch", "n": 1, "memory_limit_mib": 1024, "per_child_netns": true}')
    bsid=$(json 'd[0]["sandbox"]["id"]' <<<"$out" 2>/dev/null || true)
    check "a child of the branch spawned (in forkd-child-2)" test -n "$bsid"
    if [[ -n $bsid ]]; then
        say "branch child $bsid: $(api GET "/v1/sandboxes/$bsid" | json '{k: d[k] for k in ("status", "netns")}')"
        out=$(api POST "/v1/sandboxes/$bsid/eval" '{"expr": "1 + 1"}')
        check "the branch's child answers eval" test "$(code <<<"$out")" = 200
        api DELETE "/v1/sandboxes/$bsid" >/dev/null
    fi

    step "systemctl restart forkd-controller: the sandbox must be re-adopted"
    in_ct 'ls /run/forkd/uids | wc -l | sed "s/^/  uid lock files before: /"; systemctl restart forkd-controller'
    wait_healthy || die "the daemon did not come back after the restart"
    newpid=$(in_ct 'systemctl show -p MainPID --value forkd-controller')
    say "MainPID $mainpid -> $newpid"
    in_ct 'ls /run/forkd/uids | wc -l | sed "s/^/  uid lock files after: /"'
    info=$(api GET "/v1/sandboxes/$sid")
    say "GET /v1/sandboxes/$sid -> HTTP $(code <<<"$info"): $(json '{k: d[k] for k in ("id", "status", "pid", "netns")}' <<<"$info" 2>/dev/null)"
    check "same sandbox, running, same QEMU pid after the restart" \
        test "$(json '(d["id"], d["status"], d["pid"])' <<<"$info" 2>/dev/null)" = "('$sid', 'running', $qpid)"
    out=$(api POST "/v1/sandboxes/$sid/eval" '{"expr": "numpy.ones(3).tolist()"}')
    say "eval after restart -> HTTP $(code <<<"$out"): $(head -n 1 <<<"$out")"
    check "the re-adopted sandbox answers" test "$(code <<<"$out")" = 200
    in_ct 'journalctl -u forkd-controller --no-pager -o cat | grep -E "reconcile|Found left-over|re-adopted" | tail -n 4 | sed "s/^/  journal: /"'
    adopted=$(in_ct 'journalctl -u forkd-controller --no-pager -o cat | grep -E "reconcile: \{.adopted.: [1-9]" | tail -n 1 | grep -c . || true')
    check "journal: reconcile adopted a sandbox" test "${adopted:-0}" -ge 1

    step "log rotation: logrotate -f /etc/logrotate.d/forkd, then a request"
    in_ct 'cat /etc/logrotate.d/forkd | sed "s/^/  /"; ls -l /var/log/forkd/ | sed "s/^/  before: /"
           logrotate -f -v /etc/logrotate.d/forkd 2>&1 | grep -E "rotating|renaming|running|postrotate|error" | sed "s/^/  logrotate: /"
           sleep 1; curl -s -o /dev/null -H "Authorization: Bearer $(cat /etc/forkd/token)" http://127.0.0.1:8889/v1/snapshots; sleep 1
           ls -l /var/log/forkd/ | sed "s/^/  after: /"; echo "  new audit.log: $(tail -n 1 /var/log/forkd/audit.log)"'
    rot=$(in_ct 'test -s /var/log/forkd/audit.log && test -e /var/log/forkd/audit.log.1 && grep -q "/v1/snapshots" /var/log/forkd/audit.log && stat -c %a /var/log/forkd/audit.log')
    check "after logrotate the daemon writes the new audit.log (mode $rot), the old one is audit.log.1" test "$rot" = 600
    in_ct 'systemctl reload forkd-controller && sleep 1 && echo "  systemctl reload (ExecReload, SIGHUP): $(systemctl is-active forkd-controller), MainPID $(systemctl show -p MainPID --value forkd-controller)"'
    check "systemctl reload leaves the daemon running (same MainPID)" \
        test "$(in_ct 'systemctl show -p MainPID --value forkd-controller')" = "$newpid"

    step "journal (forkd-controller)"
    in_ct 'journalctl -u forkd-controller --no-pager -o short-monotonic | grep -vE "GET /healthz" | tail -n 30'
    api DELETE "/v1/sandboxes/$sid" >/dev/null || true
}

alias_made=0
unalias_host() { if ((alias_made)) && [[ -L /var/lib/forkd ]]; then rm -f /var/lib/forkd; fi; }
if ((host_alias)); then
    if [[ -L /var/lib/forkd && $(readlink /var/lib/forkd) == "$rootfs/var/lib/forkd" ]]; then
        alias_made=1
    elif [[ ! -e /var/lib/forkd && ! -L /var/lib/forkd ]]; then
        mkdir -p "$rootfs/var/lib/forkd" && ln -s "$rootfs/var/lib/forkd" /var/lib/forkd && alias_made=1
        say "host: /var/lib/forkd -> $rootfs/var/lib/forkd while the check runs (--host-alias)"
    else
        say "warning: the host has its own /var/lib/forkd: its forkd cleanup may kill this container's VMs"
    fi
    ((keep)) || trap unalias_host EXIT
fi
if [[ $phase == setup || $phase == all ]]; then
    setup
fi
if [[ $phase == test || $phase == all ]]; then
    pm container exists "$name" || die "no container $name: run with --phase setup (or all) first"
    run_checks
    echo
    if ((fail)); then say "RESULT: FAIL (see the FAIL lines above)"; else say "RESULT: every check passed"; fi
fi
if ((keep == 0)); then
    pm rm -f -t 10 "$name" >/dev/null 2>&1 || true
    rm -rf "$rootfs"
else
    say "kept: container $name (podman exec -it $name bash), root $rootfs"
fi
exit $fail
