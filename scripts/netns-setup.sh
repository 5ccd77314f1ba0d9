#!/usr/bin/env bash
# Create the network namespaces forkd-child-1 .. forkd-child-N that per_child_netns spawns run in.
# Idempotent: existing namespaces are kept. Run as root.
#
#   sudo scripts/netns-setup.sh 100            # namespaces with loopback only: no outbound network
#   sudo scripts/netns-setup.sh 100 --uplink   # plus a veth pair to the host and NAT
#
# Each child runs its own QEMU user-mode network stack *inside* its namespace, so whatever the guest
# sends leaves from that namespace. By default a namespace has only loopback: the guest reaches
# nothing outside it. With --uplink each namespace gets a veth pair to the host (10.201.0.0/16, one /30
# per namespace) and the host masquerades that range, so guests reach the outside; traffic between two
# namespaces and new connections to the host itself (e.g. the daemon's port) are dropped. Filter the
# rest of the egress on the host as you need (e.g. the cloud metadata address 169.254.169.254).
set -euo pipefail

PREFIX=forkd-child-
UPLINK_NET=10.201.0.0/16

usage() { printf 'usage: %s N [--uplink]\n' "$0" >&2; exit 2; }
die() { printf 'netns-setup: error: %s\n' "$*" >&2; exit 1; }

n=""
uplink=0
for arg in "$@"; do
    case $arg in
        --uplink) uplink=1 ;;
        -h|--help) usage ;;
        *) [[ $arg =~ ^[0-9]+$ && -z $n ]] || usage; n=$arg ;;
    esac
done
[[ -n $n ]] || usage
((n >= 1 && n <= 16000)) || die "N must be in 1..16000; got $n"
[[ $(id -u) -eq 0 ]] || die "must run as root to create network namespaces (try: sudo $0 $*)"
command -v ip >/dev/null 2>&1 || die "ip not found: apt-get install -y iproute2"
if ((uplink)); then
    command -v iptables >/dev/null 2>&1 || die "--uplink needs iptables: apt-get install -y iptables"
fi

# The /30 of namespace i: host side .1, namespace side .2 (as dotted quads).
addr() {
    local i=$1 host=$2 base
    base=$((i * 4 + host))
    printf '10.201.%d.%d' $((base >> 8)) $((base & 255))
}

created=0
for ((i = 1; i <= n; i++)); do
    ns=$PREFIX$i
    if [[ ! -e /var/run/netns/$ns ]]; then
        ip netns add "$ns"
        created=$((created + 1))
    fi
    ip -n "$ns" link set lo up
    if ((uplink)); then
        host_if=fkh$i
        if ! ip link show "$host_if" >/dev/null 2>&1; then
            ip link add "$host_if" type veth peer name eth0 netns "$ns"
            ip addr add "$(addr "$i" 1)/30" dev "$host_if"
            ip -n "$ns" addr add "$(addr "$i" 2)/30" dev eth0
        fi
        ip link set "$host_if" up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route replace default via "$(addr "$i" 1)"
    fi
done

if ((uplink)); then
    sysctl -q -w net.ipv4.ip_forward=1
    # "TABLE CHAIN RULE...": each rule added once, at the top of its chain
    while read -r table chain rule; do
        read -ra r <<<"$rule"
        if ! iptables -t "$table" -C "$chain" "${r[@]}" 2>/dev/null; then
            iptables -t "$table" -I "$chain" 1 "${r[@]}"
        fi
    done <<EOF
nat POSTROUTING -s $UPLINK_NET ! -d $UPLINK_NET -j MASQUERADE
filter FORWARD -s $UPLINK_NET -d $UPLINK_NET -j DROP
filter FORWARD -s $UPLINK_NET ! -d $UPLINK_NET -j ACCEPT
filter FORWARD -d $UPLINK_NET -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
filter INPUT -s $UPLINK_NET -m conntrack --ctstate NEW -j DROP
EOF
    echo "netns-setup: uplink: veth fkh<i> <-> eth0 per namespace, NAT for $UPLINK_NET (ip_forward=1)"
fi
echo "netns-setup: $n namespaces ${PREFIX}1..${PREFIX}$n ready ($created created, $((n - created)) already there)"
