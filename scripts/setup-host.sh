#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host for forkd: install QEMU and the guest image's packages, keep KSM off,
# make sure /dev/net/tun exists. Idempotent: a second run changes nothing. Run as root.
#
#   sudo scripts/setup-host.sh
#   forkd doctor            # then check the result
set -euo pipefail

PACKAGES=(qemu-system-x86 qemu-utils e2fsprogs cpio python3 zstd iproute2 nftables)
KSM_RUN=/sys/kernel/mm/ksm/run

say() { printf 'setup-host: %s\n' "$*"; }
die() { printf 'setup-host: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo $0)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script supports Debian and Ubuntu only"

# 1. Packages: install only what is missing.
missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} > 0)); then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "packages already installed: ${PACKAGES[*]}"
fi
# The guest image copies the host's python3.11 into the initramfs (Debian 12's version).
if [[ ! -x /usr/bin/python3.11 ]]; then
    say "warning: /usr/bin/python3.11 not found; forkd image build expects Debian 12's python3.11"
fi

# 2. KSM stays OFF. Kernel same-page merging de-duplicates identical pages across processes; QEMU marks
# guest RAM mergeable, so with KSM on, pages of different tenants' VMs are merged, and the time a write
# takes (copy-on-write of a merged page) reveals what another guest holds: a cross-tenant side channel
# (CVE-2015-2877; Firecracker's production host setup also says to disable KSM). forkd does not need
# it: its children already share the parent snapshot's memory through the page cache of memory.bin.
if [[ -w $KSM_RUN ]]; then
    ksm=$(<"$KSM_RUN")
    if [[ $ksm == 1 ]]; then
        # 2 = stop ksmd and un-merge every page merged so far; then 0 = stopped.
        echo 2 >"$KSM_RUN" || say "warning: could not un-merge KSM pages (writing 2 to $KSM_RUN failed)"
        echo 0 >"$KSM_RUN"
        say "KSM turned off (was 1; merged pages un-merged)"
    else
        say "KSM already off ($KSM_RUN = $ksm)"
    fi
    if command -v systemctl >/dev/null 2>&1 && systemctl list-unit-files ksmtuned.service >/dev/null 2>&1; then
        if systemctl is-enabled --quiet ksmtuned.service 2>/dev/null; then
            systemctl disable --now ksmtuned.service
            say "disabled ksmtuned (it would turn KSM back on)"
        fi
    fi
else
    say "KSM not available in this kernel: nothing to turn off"
fi

# 3. /dev/net/tun (tap networking; the default user-mode network does not need it).
if [[ ! -c /dev/net/tun ]]; then
    modprobe tun 2>/dev/null || true
fi
if [[ -c /dev/net/tun ]]; then
    say "/dev/net/tun present"
else
    say "warning: /dev/net/tun is missing and 'modprobe tun' did not create it (tap networking unavailable)"
fi

# 4. Report the accelerator forkd will pick (nothing to change: forkd falls back to TCG by itself).
if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -c /dev/kvm ]]; then
    say "hardware virtualization and /dev/kvm present: forkd will use KVM"
elif [[ -d /sys/module/kvm_pvm ]]; then
    say "/dev/kvm comes from kvm_pvm (software-only KVM): forkd will use TCG"
else
    say "no hardware virtualization: forkd will use TCG (software emulation)"
fi
say "done; next: forkd image build && forkd doctor"
