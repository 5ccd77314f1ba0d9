#!/bin/bash
# Build the forkd-controller container image (packaging/container/Dockerfile) from a locally made
# Debian base with podman, run it, and fork sandboxes through its REST API:
#
#   1. the base: localhost/debian:bookworm, imported from a debootstrap minbase rootfs (an existing
#      one at $FORKD_BASE_ROOTFS is reused, else debootstrap makes one under $SCRATCH);
#   2. the image: $IMAGE (localhost/forkd-controller:0.1.0, the tag packaging/k8s/*.yaml use);
#   3. run "tcg": no /dev/kvm, state on a fresh named volume, the least privilege that jails
#      (docs/deployment.md, "Container image"): the entrypoint creates snapshot pyagent on the
#      volume, then the daemon serves; spawn a sandbox, eval 1+1 and a numpy expression, show the
#      QEMU's uid, capabilities and cgroup, kill the sandbox;
#   4. run "kvm": the same with --device /dev/kvm, on the same volume (the snapshot is reused if
#      the accelerator is the same; forkd picks KVM only with vmx/svm, so where /dev/kvm is a
#      software KVM such as kvm_pvm it says so and uses TCG);
#   5. run "userns" (only with --userns): container root is not host root (--uidmap), jail uids
#      mapped, no per-VM cgroups (see the docs for why).
#
# Usage: scripts/container-check.sh [--no-build] [--userns] [--only tcg|kvm|userns] [--state hostdir|volume]
#                                   [--keep-state]
# State: "volume" (default) is the named volume $VOLUME at /var/lib/forkd, the image's own layout;
# "hostdir" is a host directory mounted at the same path inside the container. A forkd on the host
# leaves a container's VMs alone (engine/cleanup.py orphans() skips QEMUs in other PID namespaces).
# Containers are removed on exit, and the state unless --keep-state; the image and the base stay.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${FORKD_CONTAINER_IMAGE:-localhost/forkd-controller:0.1.0}
BASE=${FORKD_CONTAINER_BASE:-localhost/debian:bookworm}
SCRATCH=${FORKD_CONTAINER_SCRATCH:-/var/tmp/forkd-container}
BASE_ROOTFS=${FORKD_BASE_ROOTFS:-/var/tmp/forkd-base/rootfs}
MIRROR=${FORKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PORT=${FORKD_CONTAINER_PORT:-18889}
VOLUME=${FORKD_CONTAINER_VOLUME:-forkd-check-state}
READY_TIMEOUT=${FORKD_CONTAINER_READY_TIMEOUT:-1200}  # first start creates the snapshot (a TCG boot)
PREFIX=forkd-check
USERNS_HOST_ROOT=2000000000  # --userns: the host uid container root is mapped to

build=1 userns=0 only="" keep_state=0 state_kind=volume
while [ $# -gt 0 ]; do
    case $1 in
        --no-build) build=0 ;;
        --userns) userns=1 ;;
        --only) only=$2; shift ;;
        --state) state_kind=$2; shift ;;
        --keep-state) keep_state=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '\n== %s %s\n' "$(date -u +%H:%M:%S)" "$*"; }
mkdir -p "$SCRATCH"

# -- podman on this host ------------------------------------------------------------------------
PODMAN=(podman)
# crun refuses cgroup v1 hosts whose unified hierarchy has controllers ("hybrid mode"); runc does not.
if grep -qs . /sys/fs/cgroup/unified/cgroup.controllers && command -v runc >/dev/null; then
    PODMAN+=(--runtime runc)
fi
# podman asks for RLIMIT_NOFILE 1048576 and a high NPROC; without CAP_SYS_RESOURCE (a host that is
# itself a container) that fails ("setrlimit RLIMIT_NOFILE: Operation not permitted"): ask for less.
ULIMITS=()
hard_nofile=$(ulimit -Hn)
if [ "$hard_nofile" != unlimited ] && [ "$hard_nofile" -lt 1048576 ]; then
    ULIMITS+=(--ulimit "nofile=$hard_nofile:$hard_nofile" --ulimit "nproc=32768:32768")
fi

# -- 1. the base --------------------------------------------------------------------------------
if "${PODMAN[@]}" image exists "$BASE"; then
    log "base $BASE exists"
else
    if [ ! -f "$BASE_ROOTFS/etc/debian_version" ]; then
        BASE_ROOTFS=$SCRATCH/rootfs
        if [ ! -f "$BASE_ROOTFS/etc/debian_version" ]; then
            log "debootstrap --variant=minbase bookworm $BASE_ROOTFS"
            rm -rf "$BASE_ROOTFS.tmp"
            debootstrap --variant=minbase bookworm "$BASE_ROOTFS.tmp" "$MIRROR" > "$SCRATCH/debootstrap.log"
            mv "$BASE_ROOTFS.tmp" "$BASE_ROOTFS"
        fi
    fi
    log "importing $BASE_ROOTFS as $BASE"
    tar -C "$BASE_ROOTFS" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE"
fi

# -- 2. the image -------------------------------------------------------------------------------
if [ "$build" = 1 ]; then
    BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE" --build-arg "DEBIAN_MIRROR=$MIRROR")
    # pip behind a TLS-intercepting proxy: the host's CA bundle, mounted for the build only
    ca=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-}}
    if [ -n "$ca" ] && [ -f "$ca" ]; then
        BUILD_ARGS+=(-v "$ca:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
    fi
    log "podman build -t $IMAGE (base $BASE)"
    start=$(date +%s)
    "${PODMAN[@]}" build "${ULIMITS[@]}" "${BUILD_ARGS[@]}" -f "$REPO/packaging/container/Dockerfile" \
        -t "$IMAGE" "$REPO" > "$SCRATCH/build.log" 2>&1 || { tail -40 "$SCRATCH/build.log"; exit 1; }
    echo "built in $(( $(date +%s) - start )) s (log: $SCRATCH/build.log)"
fi
"${PODMAN[@]}" image inspect "$IMAGE" --format 'image {{.Id}} size {{.Size}} bytes created {{.Created}}' \
    | cut -c1-200
"${PODMAN[@]}" run --rm "${ULIMITS[@]}" --network none -e COLUMNS=150 --entrypoint forkd "$IMAGE" image info 2>&1 \
    | sed -n "1,10p"

# -- the token ----------------------------------------------------------------------------------
TOKEN_FILE=$SCRATCH/token
if [ ! -s "$TOKEN_FILE" ]; then
    (umask 077; head -c 32 /dev/urandom | base64 > "$TOKEN_FILE")
fi
chmod 600 "$TOKEN_FILE"
TOKEN=$(cat "$TOKEN_FILE")
URL=http://127.0.0.1:$PORT

cleanup() {
    local c
    for c in $("${PODMAN[@]}" ps -a --format '{{.Names}}' | grep "^$PREFIX-" || true); do
        "${PODMAN[@]}" rm -f -v -t 40 "$c" >/dev/null 2>&1 || true
    done
    if [ "$keep_state" = 0 ]; then
        "${PODMAN[@]}" volume rm -f "$VOLUME" "$VOLUME-userns" >/dev/null 2>&1 || true
        rm -rf "$SCRATCH/state" "$SCRATCH/state-userns"
    fi
}
trap cleanup EXIT
keep_state_saved=$keep_state
keep_state=0
cleanup  # what an earlier run left
keep_state=$keep_state_saved

api() {  # METHOD PATH [JSON]
    local args=(-sS --max-time 900 -X "$1" -H "Authorization: Bearer $TOKEN" "$URL$2")
    if [ $# -ge 3 ]; then args+=(-H 'Content-Type: application/json' -d "$3"); fi
    curl "${args[@]}"
}

# The least privilege that jails (each line: docs/deployment.md, "Container image"):
JAIL_OPTS=(
    --cap-drop=all
    --cap-add=CHOWN --cap-add=DAC_OVERRIDE                                     # hand files to a VM's uid, read them back
    --cap-add=KILL                                                             # kill VMs (they run as other uids)
    --cap-add=SETUID --cap-add=SETGID --cap-add=SETPCAP                        # QEMU's uid, the bounding set
    --cap-add=SYS_CHROOT                                                       # QEMU's chroot
    --cap-add=SYS_ADMIN                                                        # unshare(mount/IPC/UTS), cgroups rw
    --cap-add=NET_ADMIN                                                        # the nftables table
    --cap-add=SYS_PTRACE                                                       # BRANCH reads the guest's RAM
    --security-opt=no-new-privileges
)

show_qemus() {  # what the jail did to each QEMU, read from inside the container
    "${PODMAN[@]}" exec "$1" sh -c '
        for d in /proc/[0-9]*; do
            [ "$(cat $d/comm 2>/dev/null)" = qemu-system-x86 ] || continue
            echo "QEMU pid ${d#/proc/}: $(grep -E "^(Uid|CapEff|NoNewPrivs|Seccomp):" $d/status | tr "\t\n" "  ")"
            echo "  cgroups: $(grep -E ":(memory|pids):|^0::" $d/cgroup | tr "\n" " ")"
        done'
}

run_mode() {  # NAME [podman run options...]: the container is removed whatever happened
    local rc=0
    run_mode_1 "$@" || rc=$?
    "${PODMAN[@]}" rm -f -v -t 40 "$PREFIX-$1" >/dev/null 2>&1 || true
    [ $rc = 0 ] || echo "FAIL $1"
    return $rc
}

run_mode_1() {
    local mode=$1; shift
    local name=$PREFIX-$mode suffix="" token=$TOKEN_FILE state_opts=()
    if [ "$mode" = userns ]; then
        # the files container root uses must belong to the uid it is mapped to
        suffix=-userns token=$SCRATCH/token-userns
        install -m 0600 -o "$USERNS_HOST_ROOT" -g "$USERNS_HOST_ROOT" "$TOKEN_FILE" "$token"
    fi
    if [ "$state_kind" = volume ]; then
        state_opts=(-v "$VOLUME$suffix:/var/lib/forkd")
        local where="named volume $VOLUME$suffix at /var/lib/forkd"
    else
        local dir=$SCRATCH/state$suffix
        mkdir -p "$dir"
        if [ "$mode" = userns ]; then chown "$USERNS_HOST_ROOT:$USERNS_HOST_ROOT" "$dir"; fi
        state_opts=(-v "$dir:$dir" -e "FORKD_HOME=$dir" -e "FORKD_STATE=$dir/state.json"
                    -e "FORKD_SNAPSHOT_ROOT=$dir/snapshots" -e "FORKD_AUDIT_LOG=$dir/audit.log")
        local where="host dir $dir (same path inside)"
    fi
    log "run $mode: podman run $* (state: $where)"
    local start; start=$(date +%s)
    "${PODMAN[@]}" run -d --name "$name" "${ULIMITS[@]}" -p "127.0.0.1:$PORT:8889" \
        "${state_opts[@]}" -v "$token:/etc/forkd/token:ro" "$@" "$IMAGE" >/dev/null
    local t=0
    until curl -sf --max-time 5 "$URL/healthz" >/dev/null 2>&1; do
        if [ "$("${PODMAN[@]}" inspect -f '{{.State.Running}}' "$name")" != true ]; then
            echo "the container exited:"; "${PODMAN[@]}" logs "$name" 2>&1 | tail -30; return 1
        fi
        if [ $t -ge "$READY_TIMEOUT" ]; then
            echo "not ready after $t s:"; "${PODMAN[@]}" logs "$name" 2>&1 | tail -30; return 1
        fi
        sleep 5; t=$((t + 5))
    done
    echo "ready after $(( $(date +%s) - start )) s; the container's log:"
    "${PODMAN[@]}" logs "$name" 2>&1 | grep -E "forkd-entrypoint|forkd-controller|WARNING|error" | cut -c1-400
    echo "GET /version: $(api GET /version)"
    echo "GET /v1/snapshots: $(api GET /v1/snapshots | jq -c '[.[] | {tag, accel, bootable, qemu_version}]' 2>/dev/null)"
    local spawn sid
    spawn=$(api POST /v1/sandboxes '{"snapshot_tag": "pyagent", "n": 1, "lifetime_s": 600}')
    echo "POST /v1/sandboxes: $spawn"
    sid=$(jq -r '.[0].sandbox.id // empty' <<<"$spawn" 2>/dev/null || true)
    if [ -z "$sid" ]; then
        sid=$(jq -r '.. | objects | select(has("id")) | .id' <<<"$spawn" 2>/dev/null | head -1 || true)
    fi
    if [ -z "$sid" ]; then echo "FAIL: no sandbox"; "${PODMAN[@]}" logs "$name" 2>&1 | tail -20; return 1; fi
    echo "eval 1+1: $(api POST "/v1/sandboxes/$sid/eval" '{"expr": "1+1"}')"
    echo "eval numpy: $(api POST "/v1/sandboxes/$sid/eval" \
        '{"expr": "float(numpy.linalg.det(numpy.array([[2.0, 1.0], [1.0, 3.0]])))"}')"
    echo "exec id: $(api POST "/v1/sandboxes/$sid/exec" '{"argv": ["id"]}' | jq -c '{exit_code, stdout}')"
    show_qemus "$name"
    # BRANCH: the daemon reads the state the jailed QEMU wrote (as its own uid), then a child of it
    local br child
    br=$(api POST "/v1/sandboxes/$sid/branch" '{"tag": "check-branch", "wait": true}')
    echo "POST branch: $br"
    child=$(api POST /v1/sandboxes '{"snapshot_tag": "check-branch", "n": 1}' | jq -r '.[0].sandbox.id // empty' 2>/dev/null || true)
    if [ -n "$child" ]; then
        echo "child of the branch $child, eval: $(api POST "/v1/sandboxes/$child/eval" '{"expr": "2**10"}' | jq -c '{ok, repr}')"
        api DELETE "/v1/sandboxes/$child" >/dev/null
    else
        echo "FAIL: no child of the branch"; return 1
    fi
    echo "DELETE sandbox: HTTP $(curl -s -o /dev/null -w '%{http_code}' -X DELETE -H "Authorization: Bearer $TOKEN" \
        "$URL/v1/sandboxes/$sid")"
    echo "DELETE snapshot check-branch: HTTP $(curl -s -o /dev/null -w '%{http_code}' -X DELETE \
        -H "Authorization: Bearer $TOKEN" "$URL/v1/snapshots/check-branch")"
    "${PODMAN[@]}" stop -t 40 "$name" >/dev/null
    echo "stopped; exit code $("${PODMAN[@]}" inspect -f '{{.State.ExitCode}}' "$name"); last log lines:"
    "${PODMAN[@]}" logs "$name" 2>&1 | tail -3 | cut -c1-300
    echo "PASS $mode in $(( $(date +%s) - start )) s"
}

failed=0
if [ -z "$only" ] || [ "$only" = tcg ]; then
    run_mode tcg "${JAIL_OPTS[@]}" || failed=1
fi
if [ -z "$only" ] || [ "$only" = kvm ]; then
    if [ -e /dev/kvm ]; then
        run_mode kvm "${JAIL_OPTS[@]}" --device /dev/kvm || failed=1
    else
        log "run kvm: skipped, this host has no /dev/kvm"
    fi
fi
if [ "$userns" = 1 ] || [ "$only" = userns ]; then
    # container uid 0..199999 -> host 2000000000..; the jail's uids inside that range
    run_mode userns "${JAIL_OPTS[@]}" --uidmap "0:$USERNS_HOST_ROOT:200000" --gidmap "0:$USERNS_HOST_ROOT:200000" \
        -e FORKD_JAIL_UID_BASE=100000 -e FORKD_JAIL_UID_COUNT=65536 -e FORKD_CONTAINER_ALLOW_NO_CGROUP=1 \
        || failed=1
fi
exit $failed
