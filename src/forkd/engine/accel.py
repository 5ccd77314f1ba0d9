"""Choosing the accelerator: KVM where the CPU has hardware virtualization and /dev/kvm works, else TCG."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forkd.engine.specguard import cpu_problem
from forkd.errors import ValidationError

ACCELS = ("auto", "kvm", "tcg")
# The CPU model under TCG ($FORKD_TCG_CPU overrides).
TCG_CPU = "max"


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator forkd will use, and why."""

    name: str  # "kvm" or "tcg"
    reason: str
    cpu_model: str  # the QEMU -cpu value that goes with it

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason, "cpu_model": self.cpu_model}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty when unreadable)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def software_kvm_module() -> str | None:
    """Name of a loaded software-only KVM implementation (e.g. ``kvm_pvm``), if any."""
    for name in ("kvm_pvm",):
        if Path("/sys/module", name).exists():
            return name
    return None


def kvm_status() -> tuple[bool, str]:
    """Whether KVM can run a stock guest here, with a one-line explanation."""
    flags = cpu_flags()
    hw = "vmx" if "vmx" in flags else "svm" if "svm" in flags else None
    if hw is None:
        soft = software_kvm_module()
        if soft and os.path.exists("/dev/kvm"):
            return False, (
                f"/dev/kvm is provided by {soft} (software nested virtualization), and the CPU has no "
                "vmx/svm flag: it cannot run a stock Linux guest"
            )
        return False, "the CPU has no hardware virtualization (no vmx/svm flag in /proc/cpuinfo)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"the CPU has {hw} but /dev/kvm cannot be opened: {e.strerror}"
    os.close(fd)
    return True, f"the CPU has {hw} and /dev/kvm opens"


def choose_accel(requested: str | None = None) -> AccelChoice:
    """Pick the accelerator: ``requested`` (or ``$FORKD_ACCEL``) of auto|kvm|tcg; auto prefers KVM."""
    req = (requested or os.environ.get("FORKD_ACCEL") or "auto").lower()
    if req not in ACCELS:
        raise ValidationError(f"accel must be one of {', '.join(ACCELS)}; got {req!r}")
    ok, why = kvm_status()
    if req == "kvm":
        if not ok:
            raise ValidationError(f"accel=kvm was requested but KVM is not usable: {why}")
        return AccelChoice("kvm", f"forced; {why}", "host")
    if req == "tcg":
        return AccelChoice("tcg", "forced (TCG: software emulation)", tcg_cpu_model())
    if ok:
        return AccelChoice("kvm", why, "host")
    return AccelChoice("tcg", f"{why}; using TCG (software emulation: correct, slower guest code)", tcg_cpu_model())


def tcg_cpu_model() -> str:
    """The -cpu value under TCG: ``$FORKD_TCG_CPU`` or TCG_CPU, refused unless snapshot.json would accept it
    (a model name, then optional +feature / -feature flags)."""
    cpu = os.environ.get("FORKD_TCG_CPU") or TCG_CPU
    why_not = cpu_problem(cpu)
    if why_not is not None:
        raise ValidationError(f"FORKD_TCG_CPU {why_not}, e.g. max or Skylake-Client,-hle; got {cpu[:100]!r}")
    return cpu
