#!/bin/sh
# Entrypoint of the forkd-controller container (packaging/container/Dockerfile), then exec "$@"
# (by default `forkd-controller serve`, configured by the FORKD_* environment of the image):
#
#  1. cgroups: every jailed QEMU gets memory and pids cgroups of its own under <cgroup root>/forkd.
#     cgroup v2 with a private cgroup namespace (podman's and containerd's default on v2): the
#     container's cgroup is the root of what it sees, and it already holds our processes, so they
#     move to a leaf (forkd-controller/) first; then the controllers can be enabled for forkd/
#     (the "no internal processes" rule). cgroup v1 (and the host's /sys/fs/cgroup mounted in, as
#     the Kubernetes manifests do): the memory hierarchy must be writable. Without usable cgroups
#     the entrypoint refuses to start (FORKD_CONTAINER_ALLOW_NO_CGROUP=1: start anyway, VMs then
#     have no per-VM memory/pids limit, only the container's).
#  2. the guest image: the one baked into the image is used unless it was built for another TSC
#     rate (then one is built onto the state volume, which needs Debian's mirror once).
#  3. the snapshot $FORKD_SNAPSHOT_TAG (default pyagent) is created on the state volume when it is
#     missing ($FORKD_SNAPSHOT_ARGS are passed to `forkd snapshot create`); one that cannot be
#     restored here (another QEMU, accelerator or CPU) is reported, and re-created when
#     FORKD_SNAPSHOT_RECREATE=1. FORKD_SNAPSHOT_TAG= (empty) skips this step.
set -eu

say() { printf 'forkd-entrypoint: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }
INIT=/opt/forkd/forkd_container_init.py
# the local engine, not a daemon (FORKD_URL), and not the daemon's token file (FORKD_TOKEN_FILE)
local_forkd() { env -u FORKD_URL -u FORKD_TOKEN_FILE forkd "$@"; }
STATE_DIR=$(dirname "${FORKD_STATE:-/var/lib/forkd/state.json}")

# -- 1. cgroups -------------------------------------------------------------------------------
# A runtime mounts the container's own cgroup read-only; with CAP_SYS_ADMIN (which the jail needs
# anyway) it can be made writable again: the mount shows only this container's subtree, so the VMs'
# cgroups become children of the container's and count against its limits. (In a user namespace
# the mount is locked read-only and this fails: see docs/deployment.md.)
rw_cgroup() { [ -w "$1" ] || mount -o remount,bind,rw "$1" 2>/dev/null || true; }
cg_ok=""
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    rw_cgroup /sys/fs/cgroup
    if grep -qx "$$" /sys/fs/cgroup/cgroup.procs 2>/dev/null \
       && mkdir -p /sys/fs/cgroup/forkd-controller 2>/dev/null; then
        # our own cgroup is the root we see: move every process of it into a leaf
        while read -r pid; do
            echo "$pid" > /sys/fs/cgroup/forkd-controller/cgroup.procs 2>/dev/null || true
        done < /sys/fs/cgroup/cgroup.procs
        for c in memory pids cpu; do
            if grep -qw "$c" /sys/fs/cgroup/cgroup.controllers; then
                echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
            fi
        done
    fi
    if grep -qw memory /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null && [ -w /sys/fs/cgroup ]; then
        cg_ok="cgroup v2, $(cat /sys/fs/cgroup/cgroup.subtree_control)"
    fi
elif [ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ]; then
    for c in memory pids cpu; do
        if [ -d "/sys/fs/cgroup/$c" ]; then rw_cgroup "/sys/fs/cgroup/$c"; fi
    done
    if [ -w /sys/fs/cgroup/memory ]; then
        cg_ok="cgroup v1, memory at /sys/fs/cgroup/memory ($(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup))"
    fi
fi
if [ -n "$cg_ok" ]; then
    say "per-VM cgroups: $cg_ok"
elif [ "${FORKD_CONTAINER_ALLOW_NO_CGROUP:-}" = 1 ]; then
    say "WARNING: no writable cgroup memory controller: VMs get no cgroups of their own (only the container's limits)"
else
    die "no writable cgroup memory controller at /sys/fs/cgroup, so jailed VMs would get no memory/pids cgroups.
  cgroup v2: run with a private cgroup namespace (podman's default) and CAP_SYS_ADMIN, or mount /sys/fs/cgroup rw;
  cgroup v1: mount the host's /sys/fs/cgroup read-write (-v /sys/fs/cgroup:/sys/fs/cgroup:rw).
  FORKD_CONTAINER_ALLOW_NO_CGROUP=1 starts without them (docs/deployment.md, Container image)."
fi

mkdir -p "$STATE_DIR"

# -- 2. the guest image -------------------------------------------------------------------------
if [ -z "${FORKD_SKIP_IMAGE_CHECK:-}" ]; then
    verdict=$(python3 "$INIT" image)
    say "guest image in $FORKD_IMAGE_ROOT: $verdict"
    case $verdict in rebuild*)
        export FORKD_IMAGE_ROOT="$STATE_DIR/images" FORKD_CACHE_DIR="$STATE_DIR/cache"
        verdict=$(python3 "$INIT" image)
        say "guest image in $FORKD_IMAGE_ROOT: $verdict"
        case $verdict in rebuild*)
            say "building the guest image for this host into $FORKD_IMAGE_ROOT"
            local_forkd image build --force >&2
            ;;
        esac
        ;;
    esac
fi

# -- 3. the snapshot ----------------------------------------------------------------------------
tag=${FORKD_SNAPSHOT_TAG-pyagent}
if [ -n "$tag" ]; then
    rc=0
    msg=$(python3 "$INIT" snapshot "$tag") || rc=$?
    say "$msg"
    if [ "$rc" = 4 ] && [ "${FORKD_SNAPSHOT_RECREATE:-}" = 1 ]; then
        say "FORKD_SNAPSHOT_RECREATE=1: deleting snapshot $tag to re-create it here"
        local_forkd snapshot rm "$tag" >&2
        rc=3
    fi
    case $rc in
        0|4) ;;
        3)
            say "creating snapshot $tag (boots a VM; under TCG this takes a minute or more)"
            start=$(date +%s)
            # shellcheck disable=SC2086  # FORKD_SNAPSHOT_ARGS is a list of options
            local_forkd snapshot create --tag "$tag" ${FORKD_SNAPSHOT_ARGS:-} >&2
            say "snapshot $tag created in $(( $(date +%s) - start )) s"
            ;;
        *) die "checking snapshot $tag failed (status $rc)" ;;
    esac
fi

exec "$@"
