#!/usr/bin/env bash
# Remove every forkd-child-* network namespace (and, with them, the --uplink veth pairs and NAT rules
# that scripts/netns-setup.sh added). Dry run by default: it only lists what it would remove.
#
#   sudo scripts/netns-teardown.sh                 # list
#   sudo scripts/netns-teardown.sh --yes           # remove the namespaces no process is using
#   sudo scripts/netns-teardown.sh --yes --force   # ... and those still in use (their VMs lose the network)
set -euo pipefail

PREFIX=forkd-child-
UPLINK_NET=10.201.0.0/16

usage() { printf 'usage: %s [--yes] [--force]\n' "$0" >&2; exit 2; }
die() { printf 'netns-teardown: error: %s\n' "$*" >&2; exit 1; }

yes=0
force=0
for arg in "$@"; do
    case $arg in
        --yes|-y) yes=1 ;;
        --force) force=1 ;;
        *) usage ;;
    esac
done
[[ $(id -u) -eq 0 ]] || die "must run as root to remove network namespaces (try: sudo $0 $*)"
command -v ip >/dev/null 2>&1 || die "ip not found: apt-get install -y iproute2"

shopt -s nullglob
names=()
for path in /var/run/netns/"$PREFIX"*; do
    names+=("${path##*/}")
done

removed=0
skipped=0
for ns in "${names[@]}"; do
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${pids// /} && $force -eq 0 ]]; then
        echo "netns-teardown: keep $ns: in use by PID(s) ${pids% } (--force removes it anyway)"
        skipped=$((skipped + 1))
        continue
    fi
    if ((yes)); then
        # Deleting the namespace destroys its end of a veth pair, and the kernel removes the host end.
        ip netns delete "$ns"
        echo "netns-teardown: removed $ns"
    else
        echo "netns-teardown: would remove $ns"
    fi
    removed=$((removed + 1))
done

# NAT and filter rules of --uplink, only once no namespace is left.
if ((yes)) && ((skipped == 0)) && command -v iptables >/dev/null 2>&1; then
    while read -r table chain rule; do
        read -ra r <<<"$rule"
        while iptables -t "$table" -C "$chain" "${r[@]}" 2>/dev/null; do
            iptables -t "$table" -D "$chain" "${r[@]}"
            echo "netns-teardown: removed iptables rule: -t $table $chain $rule"
        done
    done <<EOF
nat POSTROUTING -s $UPLINK_NET ! -d $UPLINK_NET -j MASQUERADE
filter FORWARD -s $UPLINK_NET -d $UPLINK_NET -j DROP
filter FORWARD -s $UPLINK_NET ! -d $UPLINK_NET -j ACCEPT
filter FORWARD -d $UPLINK_NET -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
filter INPUT -s $UPLINK_NET -m conntrack --ctstate NEW -j DROP
EOF
fi

if ((yes)); then
    echo "netns-teardown: removed $removed namespace(s), kept $skipped"
else
    echo "netns-teardown: dry run: would remove $removed namespace(s), keep $skipped; run with --yes to remove"
fi
