"""Turning a snapshot into running children: cold launches, pre-started (pooled) QEMUs, activation.

A child maps the snapshot's ``memory.bin`` MAP_PRIVATE (copy-on-write), loads ``vmstate`` through an
inherited fd, and runs as soon as the load completes. Its first message is the agent's ``fresh`` step
(clock + RNG), written before the guest even runs.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from forkd.engine.child import Child
from forkd.engine.qemu import QemuBinary
from forkd.engine.snapshot import Snapshot
from forkd.engine.vm import VMProcess
from forkd.errors import AgentError, ChannelClosedError, ForkdError, VMError

CAPS = {"capabilities": [{"capability": "x-ignore-shared", "state": True},
                         {"capability": "events", "state": True}]}
NETWORKS = ("internet", "none", "user")  # "user": the old name of "internet"
# After an incoming migration QEMU makes the guest announce itself on the network (gratuitous ARP
# rounds). A child's user-mode network is private to it, so nobody needs the announcement, and it
# costs every child a burst of cold guest network code.
ANNOUNCE_OFF: tuple[str, dict[str, Any]] = ("migrate-set-parameters", {"announce-rounds": 0})


def new_child_id() -> str:
    """An unguessable sandbox id (64 random bits)."""
    return "sb-" + secrets.token_hex(8)


def netdev_for(network: str, ports: dict[int, int] | None = None) -> str:
    """QEMU -netdev for a child: its own user-mode stack (``internet``: what it may reach is decided by
    ``netfilter``), or one that opens no connection at all (``none``); ``ports`` maps guest TCP ports
    to host loopback ports forwarded to them."""
    nd = "user,id=net0,restrict=on" if network == "none" else "user,id=net0"
    for guest, host in sorted((ports or {}).items()):
        nd += f",hostfwd=tcp:127.0.0.1:{int(host)}-:{int(guest)}"
    return nd


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_child(snap: Snapshot, qemu: QemuBinary, run_dir: Path, *, child_id: str | None = None,
                 network: str = "internet", preload: bool = True, meta: dict[str, Any] | None = None,
                 memory_limit_mib: int | None = None, netns: str | None = None,
                 expose: tuple[int, ...] = (), cpu_limit: float | None = None) -> VMProcess:
    """Start a child QEMU waiting for its state (``preload=False``: a pool member) or loading it now.

    ``expose`` lists guest TCP ports to forward from free host loopback ports (in the child's network
    namespace when it has one); the mapping is recorded in ``vm.meta["ports"]``."""
    child_id = child_id or new_child_id()
    ahead: list[tuple[str, dict[str, Any] | None]] = [("migrate-set-capabilities", CAPS), ANNOUNCE_OFF]
    pass_fds: tuple[int, ...] = ()
    fd = -1
    if preload:
        fd = os.open(snap.vmstate, os.O_RDONLY | os.O_CLOEXEC)
        pass_fds = (fd,)
        ahead.append(("migrate-incoming", {"uri": f"fd:{fd}"}))
    ports = {g: free_loopback_port() for g in expose} if netns is None else {g: 20000 + g % 40000 for g in expose}
    chain = snap.disk_chain()
    try:
        vm, _ = VMProcess.launch(
            child_id, run_dir / child_id, qemu, snap.meta.spec, snap.memory, share=False, incoming=True,
            netdev=netdev_for(network, ports), pass_fds=pass_fds, qmp_ahead=ahead,
            memory_limit_mib=memory_limit_mib, netns=netns, cpu_limit=cpu_limit,
            disk=(chain, None) if chain is not None else None,
            meta={"role": "child", "snapshot": snap.tag, "network": network,
                  "ports": {str(g): h for g, h in ports.items()}, **(meta or {})})
    finally:
        if fd >= 0:
            os.close(fd)
    return vm


def send_state(vm: VMProcess, snap: Snapshot) -> None:
    """Hand a waiting (pooled) QEMU the snapshot's vmstate and start the load."""
    fd = os.open(snap.vmstate, os.O_RDONLY | os.O_CLOEXEC)
    try:
        vm.qmp.send("getfd", {"fdname": "vmstate"}, fds=[fd])
    finally:
        os.close(fd)
    vm.qmp.send("migrate-incoming", {"uri": "fd:vmstate"})


def wait_waiting(vm: VMProcess, timeout: float = 60.0) -> None:
    """Block until a pool member's QEMU has answered its set-up commands (it is ready to take state)."""
    for cid in sorted(vm.qmp.commands):
        vm.qmp.wait(cid, timeout)


def warm_member(vm: VMProcess, snap: Snapshot, timeout: float = 120.0) -> None:
    """Load ``snap`` into a waiting pool member and run the agent's first-contact paths once (``fresh``
    and an ``eval``) before any spawn takes it.

    Under TCG the first run of a guest code path in a new QEMU process costs ~10x its later runs (the
    code is translated first, and the translation cache is per process, not in the snapshot): the
    first request after a load takes ~150 ms of CPU, the same request again ~10 ms. A warm member
    has paid that before the spawn; the spawn's own ``fresh`` then gives it its clock and RNGs, as for
    any child. Nothing but these two requests runs in the guest before it is taken."""
    send_state(vm, snap)
    try:
        vm.channel.call("fresh", reply_timeout=timeout, time=time.time(),
                        entropy_b64=base64.b64encode(os.urandom(64)).decode())
        vm.channel.call("eval", reply_timeout=timeout, expr="None")
    except ChannelClosedError as e:
        raise VMError(f"pool member {vm.vm_id} of {snap.tag} died while warming: {vm.describe_exit()}") from e
    for cid in sorted(vm.qmp.commands):
        vm.qmp.wait(cid, timeout=10)


def finish_restore(vm: VMProcess, snap: Snapshot, t_launch: float, timeout: float,
                   from_pool: bool = False) -> Child:
    """Send ``fresh`` and wait for its reply: the child is then running, with its own clock and RNG."""
    child = Child(id=vm.vm_id, snapshot=snap.tag, vm=vm, from_pool=from_pool)
    try:
        fut = vm.channel.submit("fresh", time=time.time(), entropy_b64=base64.b64encode(os.urandom(64)).decode())
        res = vm.channel.result("fresh", fut, timeout)
    except ChannelClosedError as e:
        raise VMError(f"child {vm.vm_id} of {snap.tag} died while restoring: {vm.describe_exit()}") from e
    except AgentError as e:
        raise VMError(f"child {vm.vm_id} of {snap.tag}: the agent's fresh step failed: {e}") from e
    except ForkdError as e:
        if not vm.alive():
            raise VMError(f"child {vm.vm_id} of {snap.tag} died while restoring: {vm.describe_exit()}") from e
        raise VMError(f"child {vm.vm_id} of {snap.tag} did not answer within {timeout} s after restore; "
                      f"console tail:\n{vm.console_tail()}") from e
    now = time.time()
    child.ready_s = time.monotonic() - t_launch
    child.fresh = res
    if isinstance(res.get("time"), (int, float)):
        child.clock_skew_s = float(res["time"]) - now
    # Collect the QMP replies (all written ahead); a refused command is reported, not ignored.
    for cid in sorted(vm.qmp.commands):
        vm.qmp.wait(cid, timeout=10)
    return child
