"""What a sandbox's network may reach: an nftables table keyed on the jailed VMs' uids.

A child's user-mode network (slirp) lives inside its QEMU process: every connection the guest opens
is a socket QEMU opens on the host, in QEMU's network namespace, and the guest's gateway 10.0.2.2 is
that namespace's 127.0.0.1. Every jailed QEMU runs as a uid from one range (``jail.uid_range``), so a
single ``output`` rule set on those uids decides, whatever number of VMs run: no new connection to
any address of this host (loopback included: the daemon, other sandboxes' exposed ports, every
local service), to private, shared, link-local (the cloud metadata address 169.254.169.254),
multicast or reserved ranges, v4 or v6. Replies on connections the host opened to an exposed guest
port pass (they are established). DNS goes to this host's resolvers (``/etc/resolv.conf``), port
53 only. The table is installed in each network namespace a VM runs in, once per process.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import threading
from pathlib import Path

from forkd.engine import jail
from forkd.errors import ValidationError

TABLE = "forkd"
BLOCKED_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
              "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")
BLOCKED_V6 = ("::/127", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
              "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")
RESOLV_CONF = Path("/etc/resolv.conf")
INSTALL_HINT = "apt-get install -y nftables"

_done: set[tuple[str, int]] = set()
_lock = threading.Lock()


def resolvers(path: Path = RESOLV_CONF) -> tuple[list[str], list[str]]:
    """The IPv4 and IPv6 name servers of this host (what slirp's DNS forwards to)."""
    v4: list[str] = []
    v6: list[str] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return v4, v6
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            (v4 if addr.version == 4 else v6).append(str(addr))
    return v4, v6


def ruleset() -> str:
    """The nft script: replaces table ``inet forkd`` atomically (one transaction)."""
    ids = jail.uid_range()
    uids = f"{ids.start}-{ids.stop - 1}"
    dns4, dns6 = resolvers()
    lines = [f"table inet {TABLE} {{}}", f"flush table inet {TABLE}", f"table inet {TABLE} {{",
             "  chain output {",
             "    type filter hook output priority filter; policy accept;",
             f"    meta skuid != {uids} accept",
             "    ct state established,related accept"]
    if dns4:
        lines.append(f"    ip daddr {{ {', '.join(dns4)} }} meta l4proto {{ tcp, udp }} th dport 53 accept")
    if dns6:
        lines.append(f"    ip6 daddr {{ {', '.join(dns6)} }} meta l4proto {{ tcp, udp }} th dport 53 accept")
    lines += ["    fib daddr type { local, broadcast, anycast, multicast } jump deny",
              f"    ip daddr {{ {', '.join(BLOCKED_V4)} }} jump deny",
              f"    ip6 daddr {{ {', '.join(BLOCKED_V6)} }} jump deny",
              "  }",
              # a TCP reset makes the guest's connect fail at once ("connection refused"), not time out
              "  chain deny {",
              "    meta l4proto tcp counter reject with tcp reset",
              "    counter reject",
              "  }", "}"]
    return "\n".join(lines) + "\n"


def nft_path() -> str:
    nft = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)
    if nft is None:
        raise ValidationError(f"sandbox network isolation needs nftables' nft: {INSTALL_HINT}")
    return nft


def _apply(netns_file: str | None) -> None:
    argv = [nft_path(), "-f", "-"]
    if netns_file is not None:
        argv = ["nsenter", f"--net={netns_file}", "--", *argv]
    try:
        r = subprocess.run(argv, input=ruleset(), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise ValidationError(f"cannot install the sandbox network filter: {e}") from e
    if r.returncode != 0:
        where = f" in network namespace {netns_file}" if netns_file else ""
        raise ValidationError(f"cannot install the sandbox network filter{where}: nft said: "
                              f"{(r.stderr or r.stdout).strip()[:500]}")


def ensure(netns_file: str | None = None) -> None:
    """Install (once per process and namespace) the filter in the namespace of ``netns_file``
    (a path such as /var/run/netns/NAME), or in this process's own one."""
    ns = netns_file or "/proc/self/ns/net"
    try:
        key = (netns_file or "", os.stat(ns).st_ino)
    except OSError as e:
        raise ValidationError(f"network namespace {ns}: {e}") from e
    with _lock:
        if key in _done:
            return
        _apply(netns_file)
        _done.add(key)


def require() -> None:
    """Fail with the fix if this host cannot filter sandboxes' networks (nft missing or refused)."""
    ensure(None)


def status() -> str | None:
    """None if the filter table is installed in this namespace, else why not (for ``forkd doctor``)."""
    try:
        r = subprocess.run([nft_path(), "list", "table", "inet", TABLE], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError, ValidationError) as e:
        return str(e)
    if r.returncode != 0:
        return "the table inet forkd is not installed (it is, once forkd-controller or forkd has started a VM)"
    return None
