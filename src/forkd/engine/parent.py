"""Creating a snapshot: boot a parent VM, wait for its agent, warm it, save it, never run it again."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from forkd.engine import clock
from forkd.engine import disk as disks
from forkd.engine.disk import DiskChain
from forkd.engine.qemu import MachineSpec, QemuBinary
from forkd.engine.restore import CAPS
from forkd.engine.snapshot import (
    MEMORY_NAME,
    VMSTATE_NAME,
    Snapshot,
    SnapshotMeta,
    SnapshotStore,
    host_cpu_model,
)
from forkd.engine.vm import VMProcess
from forkd.errors import AgentError, BootTimeoutError, ForkdError, SnapshotError, VMError
from forkd.fsutil import tail

Step = Callable[[str], None]
# Paths every child exercises on first contact; running them once in the parent puts them in the snapshot.
WARM_EVAL = "numpy.zeros(5).tolist() if 'numpy' in globals() else None"  # numpy is optional in an image


def boot_parent(vm_id: str, workdir: Path, qemu: QemuBinary, spec: MachineSpec, memory_path: Path,
                image: object, boot_timeout: float,
                disk: tuple[DiskChain, Path] | None = None) -> tuple[VMProcess, dict[str, object], float]:
    """Start the parent and wait for the agent's ready line; BootTimeoutError carries the console tail."""
    t0 = time.monotonic()
    vm, ids = VMProcess.launch(
        vm_id, workdir, qemu, spec, memory_path, share=True, disk=disk,
        boot=(image.kernel, image.initramfs, image.cmdline),  # type: ignore[attr-defined]
        qmp_ahead=[("migrate-set-capabilities", CAPS)], meta={"role": "parent"})
    deadline = t0 + boot_timeout
    ready = None
    while ready is None:
        ready = vm.channel.wait_ready(0.25)
        if ready is not None:
            break
        if not vm.alive() or vm.channel.closed:
            raise BootTimeoutError(f"the parent VM exited during boot ({vm.describe_exit()}); "
                                   f"console tail:\n{tail(vm.workdir.console)}")
        if time.monotonic() > deadline:
            vm.kill(remove_workdir=False)
            raise BootTimeoutError(f"the guest agent did not come up within {boot_timeout:.0f} s; "
                                   f"console tail:\n{tail(vm.workdir.console)}")
    for cid in ids:
        vm.qmp.wait(cid, 30)
    return vm, ready, time.monotonic() - t0


def warm(vm: VMProcess, warm_code: str | None) -> dict[str, object]:
    """Run the first-contact paths once (ping, eval, exec, files) and the user's warm-up code."""
    ch = vm.channel
    info = ch.call("ping", timeout=120)
    ch.call("eval", timeout=120, expr=WARM_EVAL)
    # the agent's own interpreter is the one program every image has (a rootfs may lack /bin/true)
    exe = ch.call("eval", timeout=120, expr="__import__('sys').executable")["value"]
    ch.call("exec", timeout=120, argv=[str(exe) if exe else "/bin/true", "-S", "-c", ""])
    ch.call("file_stat", timeout=60, path="/")
    if warm_code:
        try:
            ch.call("run_code", timeout=600, code=warm_code)
        except AgentError as e:
            raise SnapshotError(f"the warm-up code failed in the parent: {e}\n{e.traceback or ''}") from e
    return info


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(vm: VMProcess, max_s: float = 60.0, window_s: float = 1.0, quiet: float = 0.03) -> float:
    """Let the booted guest finish its deferred boot-time work (delayed work items, timers) before the
    snapshot, so that it runs once here rather than in every child after restore (measured: ~0.1 s of
    emulated CPU per child). Waits until the VM used less than ``quiet`` of a CPU over two consecutive
    windows, or ``max_s`` seconds. Returns the seconds waited."""
    t0 = time.monotonic()
    calm = 0
    last = cpu_seconds(vm.pid)
    while time.monotonic() - t0 < max_s and calm < 2:
        time.sleep(window_s)
        now = cpu_seconds(vm.pid)
        calm = calm + 1 if (now - last) / window_s < quiet else 0
        last = now
    return time.monotonic() - t0


def check_clock(vm: VMProcess) -> clock.ClockReport:
    """Refuse a parent that would tick periodically: every child would inherit the tick."""
    report = clock.measure(vm.channel)
    problems = report.problems()
    if problems:
        cmdline = str(vm.channel.call("clock_info")["cmdline"])[:2000]
        fix = ("the CPU model or accelerator gives the guest no usable timer (keep the default -cpu max, "
               "or unset FORKD_TCG_CPU)" if "tsc=reliable" in cmdline.split() else
               "rebuild the image (forkd image build --force) so it boots with tsc=reliable")
        raise SnapshotError(
            "the parent's guest clock is not tickless, so every child would burn host CPU while idle: "
            + "; ".join(problems) + f". Kernel command line: {cmdline!r}. Fix: {fix}; see forkd doctor")
    return report


def save_state(vm: VMProcess, vmstate: Path, timeout: float = 120.0) -> float:
    """Pause the parent and write its device state (RAM is already in the shared memory file)."""
    t0 = time.monotonic()
    vm.qmp.execute("stop", timeout=30)
    fd = os.open(vmstate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        vm.qmp.execute("getfd", {"fdname": "vmstate"}, fds=[fd], timeout=30)
    finally:
        os.close(fd)
    vm.qmp.execute("migrate", {"uri": "fd:vmstate"}, timeout=30)
    deadline = time.monotonic() + timeout
    while True:
        st = vm.qmp.execute("query-migrate", timeout=30)
        status = st.get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise SnapshotError(f"saving the parent's state {status or 'timed out'}: {st.get('error-desc', '')}")
        time.sleep(0.002)
    return time.monotonic() - t0


def create_snapshot(store: SnapshotStore, tag: str, spec: MachineSpec, accel_reason: str, qemu: QemuBinary,
                    image: object, run_dir: Path, *, warm_code: str | None = None, boot_timeout: float = 300.0,
                    keep_workdir: bool = False, step: Step | None = None, settle_max_s: float = 60.0) -> Snapshot:
    """Boot, warm and save a parent as snapshot ``tag``. Nothing is left behind when it fails."""
    say = step or (lambda _msg: None)
    staging = store.stage(tag)
    vm: VMProcess | None = None
    ok = False
    try:
        say("booting parent VM")
        vm_id = f"parent-{tag}-{secrets.token_hex(4)}"
        rootfs = getattr(image, "rootfs", None)
        disk = None
        disk_record: dict[str, object] = {}
        if rootfs is not None:
            size = Path(rootfs).stat().st_size  # the file system's own size, not what image.json says
            disk = (DiskChain(rootfs, (), size), disks.new_layer(staging / disks.LAYER_NAME, size))
            disk_record = {"image": image.image_id, "size_bytes": size,  # type: ignore[attr-defined]
                           "base_sha256": image.rootfs_sha256, "layers": [tag], "layer_sha256": []}  # type: ignore[attr-defined]
        vm, ready, boot_s = boot_parent(vm_id, run_dir / vm_id, qemu, spec, staging / MEMORY_NAME,
                                        image, boot_timeout, disk)
        say(f"agent ready after {boot_s:.2f} s; warming")
        t = time.monotonic()
        info = warm(vm, warm_code)
        warm_s = time.monotonic() - t
        say("letting the guest settle")
        settle_s = settle(vm, max_s=settle_max_s)
        say(f"settled after {settle_s:.1f} s; checking the guest clock")
        clk = check_clock(vm)
        say(f"clock {clk.clocksource}, tickless, {clk.timer_irq_per_s or 0:.1f} timer interrupts/s idle; saving state")
        save_s = save_state(vm, staging / VMSTATE_NAME)
        vm.kill(remove_workdir=not keep_workdir)  # the parent must never run again: it shares memory.bin
        say("hashing and publishing")
        meta = SnapshotMeta(
            tag=tag, created_at=time.time(), spec=spec, qemu=qemu.to_json(), accel_reason=accel_reason,
            host_cpu=host_cpu_model(),
            image={"id": image.image_id, "kernel_version": image.kernel_version,  # type: ignore[attr-defined]
                   **({"name": image.name} if getattr(image, "name", None) else {})},  # type: ignore[attr-defined]
            disk=disk_record,
            guest={"agent_version": ready.get("agent_version"), "python": info.get("python"),
                   "numpy": info.get("numpy"), "clock": clk.to_json()},
            files={}, timings={"boot_s": round(boot_s, 3), "warm_s": round(warm_s, 3), "settle_s": round(settle_s, 2),
                               "save_ms": round(save_s * 1000, 2)})
        snap = store.publish(staging, meta)
        ok = True
        return snap
    except ForkdError:
        raise
    except OSError as e:
        raise SnapshotError(f"creating snapshot {tag} failed: {e}") from e
    finally:
        if vm is not None and vm.alive():
            with contextlib.suppress(VMError):
                vm.kill(remove_workdir=not keep_workdir)
        if not ok:
            store.discard(staging)
