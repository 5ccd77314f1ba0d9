#!/usr/bin/env bash
# Prove the README's two commands on a clean Debian 12: make a pristine bookworm root file system with
# debootstrap (Debian's packages only), put this repository in it (`git archive`, no venvs, no caches),
# and run `make demo` and `make test` in it, unmodified, in a podman container (its own network, PID and
# cgroup namespaces, so its nftables table, VMs and cgroups are its own); print what it saw.
# Run as root on a Debian/Ubuntu host with debootstrap and podman.
#
#   sudo scripts/clean-debian-check.sh                        # debootstrap, HEAD, make demo + make test
#   sudo scripts/clean-debian-check.sh --base /var/tmp/forkd-base/rootfs   # copy a pristine rootfs instead
#   sudo scripts/clean-debian-check.sh --worktree --step 'make demo' --step 'make lint'
#
# Options:
#   --base DIR       copy DIR (a pristine `debootstrap --variant=minbase bookworm` tree) instead of debootstrapping
#   --cache DIR      keep the debootstrapped tree as DIR/bookworm-minbase.tar and reuse it (nothing else is cached)
#   --work DIR       scratch directory (default /var/tmp/forkd-deploy/clean-debian); its rootfs is replaced
#   --ref REF        the commit to test (default HEAD)
#   --worktree       test the working tree as it would be committed (tracked and untracked files that
#                    .gitignore does not exclude), not a commit
#   --step CMD       a command to run in the repository inside the root, in order (repeatable;
#                    default: 'make demo' then 'make test'); every step runs, whatever the previous one did
#   --keep           keep the root file system afterwards (default: removed when every step passed)
#   --no-host-ca     do not copy this host's extra CA certificates into the root (see below)
#
# What the root gets beyond debootstrap, and why: `make`, because the README starts with
# `apt-get install make`; TMPDIR=/fdt, a directory at the same path inside and on the host (see below); and,
# only when this host trusts extra CAs (/usr/local/share/ca-certificates, e.g. a TLS-intercepting egress
# proxy), those CAs plus PIP_CERT/NODE_EXTRA_CA_CERTS/... pointing at the host's bundle, so pip and npm
# can reach PyPI and npm's registry through it. Nothing else: apt sources are Debian's (bookworm,
# bookworm-updates, bookworm-security), the rest is the Makefile's job.
set -euo pipefail

say() { printf 'clean-debian-check: %s\n' "$*"; }
die() { printf 'clean-debian-check: error: %s\n' "$*" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
work=/var/tmp/forkd-deploy/clean-debian
base="" cache="" ref=HEAD worktree=0 keep=0 host_ca=1
steps=()
while (($#)); do
    case $1 in
        --base) base=$2; shift ;;
        --cache) cache=$2; shift ;;
        --work) work=$2; shift ;;
        --ref) ref=$2; shift ;;
        --worktree) worktree=1 ;;
        --step) steps+=("$2"); shift ;;
        --keep) keep=1 ;;
        --no-host-ca) host_ca=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (try --help)" ;;
    esac
    shift
done
((${#steps[@]})) || steps=("make demo" "make test")
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap and a privileged container)"
command -v podman >/dev/null || die "podman not found: apt-get install -y podman"
[[ -n $base ]] || command -v debootstrap >/dev/null || die "debootstrap not found: apt-get install -y debootstrap"

rootfs=$work/rootfs
logs=$work/logs
mkdir -p "$work"
rm -rf "$rootfs" "$logs"
mkdir -p "$logs"
t0=$(date +%s)

# 1. The root file system: Debian's packages only.
if [[ -n $base ]]; then
    [[ -x $base/bin/bash && -f $base/etc/debian_version ]] || die "--base $base is not a Debian root file system"
    say "root: copy of $base (Debian $(cat "$base/etc/debian_version"))"
    cp -a "$base" "$rootfs"
elif [[ -n $cache && -f $cache/bookworm-minbase.tar ]]; then
    say "root: $cache/bookworm-minbase.tar (debootstrapped earlier)"
    mkdir -p "$rootfs" && tar -C "$rootfs" -xpf "$cache/bookworm-minbase.tar"
else
    say "root: debootstrap --variant=minbase bookworm (deb.debian.org)"
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$logs/debootstrap.log" 2>&1 \
        || { tail -20 "$logs/debootstrap.log"; die "debootstrap failed (log: $logs/debootstrap.log)"; }
    if [[ -n $cache ]]; then
        mkdir -p "$cache" && tar -C "$rootfs" -cpf "$cache/bookworm-minbase.tar" .
    fi
fi
# A stock Debian 12 install has the updates and security suites as well as bookworm itself.
cat >"$rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF

# 2. The repository, without the working tree's venvs, node_modules or caches.
dest=$rootfs/root/forkd
mkdir -p "$dest"
if ((worktree)); then
    idx=$(mktemp)
    trap 'rm -f "$idx"' EXIT
    cp "$repo/.git/index" "$idx" 2>/dev/null || true
    GIT_INDEX_FILE=$idx git -C "$repo" add -A
    tree=$(GIT_INDEX_FILE=$idx git -C "$repo" write-tree)
    say "repository: the working tree of $repo as tree $tree (on $(git -C "$repo" rev-parse --short HEAD), uncommitted changes included)"
    git -C "$repo" archive "$tree" | tar -C "$dest" -x
else
    commit=$(git -C "$repo" rev-parse --verify "$ref^{commit}") || die "no such commit: $ref"
    say "repository: git archive $ref ($commit)"
    git -C "$repo" archive "$commit" | tar -C "$dest" -x
fi

# 3. This host's extra CAs (an intercepting egress proxy), so pip and npm get through it.
envs=()
if ((host_ca)) && compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/host-ca-bundle.pem"
    for v in PIP_CERT REQUESTS_CA_BUNDLE SSL_CERT_FILE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS GIT_SSL_CAINFO; do
        envs+=(--env "$v=/etc/host-ca-bundle.pem")
    done
    say "host CAs: $(cd /usr/local/share/ca-certificates && echo *.crt) copied in; pip/npm/curl pointed at /etc/host-ca-bundle.pem"
fi

# 4. The runner inside: the README's prerequisite (make), then each step, unmodified.
{
    echo '#!/bin/bash'
    echo 'cd /root/forkd'
    echo 'echo "== inside: Debian $(cat /etc/debian_version), $(uname -r), python3: $(command -v python3 || echo none), make: $(command -v make || echo none)"'
    echo 'echo "== prerequisite (README): apt-get install make"'
    echo 'apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make >/dev/null || exit 97'
    i=0
    for s in "${steps[@]}"; do
        i=$((i + 1))
        printf 'echo "== step %d: %s"\n' "$i" "$s"
        printf 's=$(date +%%s); ( %s ) 2>&1 | tee /root/step%d.log; rc=${PIPESTATUS[0]}\n' "$s" "$i"
        printf 'echo "== step %d: exit $rc after $(( $(date +%%s) - s )) s"; echo $rc >/root/step%d.rc\n' "$i" "$i"
    done
} >"$rootfs/root/clean-check-run"
chmod 755 "$rootfs/root/clean-check-run"

# The container: podman gives it its own network namespace (with NAT: apt, PyPI, npm), PID, IPC, UTS and
# cgroup namespaces, and the privileges the jail needs. TMPDIR, where the tests make their FORKD_HOMEs and
# so their VMs' work dirs, is a scratch directory mounted at /fdt inside, and /fdt on the host is a symlink
# to it while the steps run: `forkd cleanup` and every daemon start-up on the host kill forkd QEMUs whose
# work dir they cannot see at the path their qemu.log shows (engine/cleanup.py), and would otherwise kill
# this root's VMs while its tests run. The name is as long as /tmp: a longer TMPDIR makes some tests' VM
# sockets pass the 108-byte AF_UNIX limit. (Running the steps chrooted at the root's own host path instead
# breaks BRANCH: engine/pagemap.py finds memory.bin in /proc/PID/maps by path, and a chrooted reader sees
# the path in QEMU's mount namespace.)
shared_tmp=$work/tmp
rm -rf "$shared_tmp" && mkdir -m 1777 -p "$shared_tmp"
alias_tmp=/fdt
if [[ -L $alias_tmp || ! -e $alias_tmp ]]; then
    ln -sfn "$shared_tmp" "$alias_tmp"
    trap 'rm -f "$alias_tmp"; [[ -n ${idx:-} ]] && rm -f "$idx"' EXIT
else
    say "warning: $alias_tmp exists on this host and is not a symlink: the host's forkd cleanup may kill this root's VMs"
fi
# crun (podman's default) refuses hybrid cgroup hosts; runc does not.
runtime=()
if command -v runc >/dev/null && grep -q ' /sys/fs/cgroup/unified cgroup2' /proc/mounts; then
    runtime=(--runtime runc)
fi
# podman lowers its own RLIMIT_NPROC to pid_max, and a raised limit needs CAP_SYS_RESOURCE: take ours.
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu) pidmax=$(cat /proc/sys/kernel/pid_max)
[[ $nproc == unlimited || $nproc -gt $pidmax ]] && nproc=$pidmax
[[ $nofile == unlimited ]] && nofile=1048576

say "running ${#steps[@]} step(s) in podman ${runtime[*]} (privileged: the jail's namespaces, cgroups, chroot, nftables)"
name=forkd-clean-debian-$$
set +e
podman "${runtime[@]}" run --rm --name "$name" --privileged --cgroupns=private --network=bridge \
    --shm-size=2g --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" \
    -v "$shared_tmp:$alias_tmp" --env TMPDIR="$alias_tmp" \
    --env TERM=dumb "${envs[@]}" --rootfs "$rootfs" /root/clean-check-run 2>&1 | tee "$logs/run.log"
prc=${PIPESTATUS[0]}
set -e

# 5. What it saw.
echo
say "==================== summary ===================="
say "root: $rootfs (Debian $(cat "$rootfs/etc/debian_version")); container exit $prc; $(( $(date +%s) - t0 )) s in all"
fail=0
i=0
for s in "${steps[@]}"; do
    i=$((i + 1))
    rc=$(cat "$rootfs/root/step$i.rc" 2>/dev/null || echo "not run")
    cp "$rootfs/root/step$i.log" "$logs/step$i.log" 2>/dev/null || true
    say "step $i: '$s' -> exit $rc (log: $logs/step$i.log)"
    [[ $rc == 0 ]] || fail=1
    if [[ -f $logs/step$i.log ]]; then
        # pytest's summary, the demo's result lines, or the last lines
        if grep -qE '^=+ .*(passed|failed|error).* in [0-9.]+s' "$logs/step$i.log"; then
            grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error).* in [0-9.]+s' "$logs/step$i.log" | sed 's/^/    /'
        else
            tail -n 15 "$logs/step$i.log" | sed 's/^/    /'
        fi
    fi
done
for v in .venv/bin/forkd .venv/bin/forkd-controller .venv/bin/python; do
    [[ -e $dest/$v ]] && say "installed: /root/forkd/$v -> $(readlink -f "$dest/$v" | sed "s|^$rootfs||")"
done
if ((fail == 0 && keep == 0)); then
    rm -rf "$rootfs" "$shared_tmp"
    say "every step passed; root removed (logs kept in $logs)"
else
    say "root kept: $rootfs"
fi
exit $fail
