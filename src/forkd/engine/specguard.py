"""What a recorded machine spec may hold: only what this forkd version writes.

``snapshot.json`` (``"machine"``) comes from disk or from a pack, and its fields go straight into
QEMU's argv. Each field is checked against an allow-list, with its JSON type (no coercion: ``"2"`` is
not a vcpu count), before a ``MachineSpec`` is built from it: at unpack and every time a snapshot is
opened. This module is also the one place for the machine's limits (the CLI, the API and
``make_spec`` use them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from forkd.errors import SnapshotInvalidError
from forkd.limits import MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, MIN_VCPUS

MACHINES = ("microvm",)
# the options this version writes (pit=off: TCG with a known TSC rate; without it: KVM, or a host whose
# TSC rate could not be measured), then those of versions before mem-merge=off (still restorable)
MACHINE_OPTS = ("x-option-roms=off,mem-merge=off,pit=off", "x-option-roms=off,mem-merge=off", "x-option-roms=off")
ACCELS = ("tcg", "kvm")
MIN_TB_SIZE_MIB, MAX_TB_SIZE_MIB = 1, 1024  # TCG translation cache, per child
# a QEMU CPU model ("max", "host", "Skylake-Client-v4"), then optional +feature / -feature flags only:
# no key=value property can ride along
CPU_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}(?:,[+-][A-Za-z0-9][A-Za-z0-9_.-]{0,63}){0,32}")
_TB_SIZE_RE = re.compile(r"tb-size=([1-9][0-9]{0,5})")
REQUIRED = ("memory_mib", "vcpus", "machine", "machine_opts", "accel", "cpu", "devices")
OPTIONAL = {"accel_opts": ""}  # absent in the earliest snapshots
WHERE = "snapshot.json"
TAMPERED = "(a pack or snapshot directory may have been tampered with)"


def _show(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (the value is untrusted)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def _refuse(field: str, rule: str, value: object) -> SnapshotInvalidError:
    return SnapshotInvalidError(f"{WHERE}: spec.{field}: {rule}; got {_show(value)} {TAMPERED}")


def _int_in(field: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse(field, f"must be an integer (JSON number) in {lo}..{hi}", value)
    if not lo <= value <= hi:
        raise _refuse(field, f"must be in {lo}..{hi}", value)
    return value


def _one_of(field: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _refuse(field, f"must be one of {', '.join(map(repr, allowed))} (what this forkd version writes)",
                      value)
    return value


def accel_opts_problem(opts: object) -> str | None:
    """Why ``opts`` is not an accelerator option string this version writes ("" or tb-size=N), or None."""
    if opts == "":
        return None
    m = _TB_SIZE_RE.fullmatch(opts) if isinstance(opts, str) else None
    if m is None:
        return "must be empty or tb-size=<MiB>"
    if not MIN_TB_SIZE_MIB <= int(m.group(1)) <= MAX_TB_SIZE_MIB:
        return f"tb-size must be in {MIN_TB_SIZE_MIB}..{MAX_TB_SIZE_MIB} MiB"
    return None


def cpu_problem(cpu: object) -> str | None:
    """Why ``cpu`` is not a ``-cpu`` value this version can choose (a model name, then optional
    ``,+flag`` / ``,-flag``), or None."""
    if not isinstance(cpu, str) or not CPU_RE.fullmatch(cpu):
        return ("must be a QEMU CPU model name (letters, digits, _ . -) optionally followed by ,+feature or "
                "-feature flags (no other options)")
    return None


def _device_difference(got: list[str], expected: tuple[str, ...]) -> str:
    """How ``got`` differs from ``expected``, naming the first entry that does."""
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return f"device {i} is {_show(a)}, this forkd version writes {b!r}"
    if len(got) > len(expected):
        return f"an extra device {_show(got[len(expected)])}"
    return f"device {len(got)} ({expected[len(got)]!r}) is missing"


def _check_devices(value: object, allowed: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _refuse("devices", "must be a list of strings", value)
    for expected in allowed:
        if tuple(value) == expected:
            return expected
    closest = min(allowed, key=lambda e: abs(len(e) - len(value)))
    raise SnapshotInvalidError(f"{WHERE}: spec.devices: not a device list this forkd version produces: "
                               f"{_device_difference(value, closest)} {TAMPERED}")


def _check_keys(d: Mapping[Any, Any]) -> None:
    unknown = [k for k in d if k not in REQUIRED and k not in OPTIONAL]
    if unknown:
        raise SnapshotInvalidError(f"{WHERE}: spec: unknown field(s) {_show(unknown)} (this forkd version writes "
                                   f"{', '.join([*REQUIRED, *OPTIONAL])}) {TAMPERED}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise SnapshotInvalidError(f"{WHERE}: spec: missing field(s) {', '.join(missing)} {TAMPERED}")


def _check_str(field: str, value: object, why: str | None) -> str:
    if why is not None or not isinstance(value, str):
        raise _refuse(field, why or "must be a string", value)
    return value


def check_spec_json(d: object, devices: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """The fields of a recorded spec (``snapshot.json``'s ``"machine"``) as ``MachineSpec`` arguments,
    each checked against what this version writes; ``devices`` are the only device lists accepted.
    SnapshotInvalidError names the field and the rule."""
    if not isinstance(d, Mapping):
        raise SnapshotInvalidError(f"{WHERE}: spec: must be a JSON object; got {_show(d)} {TAMPERED}")
    _check_keys(d)
    accel_opts = d.get("accel_opts", OPTIONAL["accel_opts"])
    return {
        "memory_mib": _int_in("memory_mib", d["memory_mib"], MIN_MEMORY_MIB, MAX_MEMORY_MIB),
        "vcpus": _int_in("vcpus", d["vcpus"], MIN_VCPUS, MAX_VCPUS),
        "machine": _one_of("machine", d["machine"], MACHINES),
        "machine_opts": _one_of("machine_opts", d["machine_opts"], MACHINE_OPTS),
        "accel": _one_of("accel", d["accel"], ACCELS),
        "accel_opts": _check_str("accel_opts", accel_opts, accel_opts_problem(accel_opts)),
        "cpu": _check_str("cpu", d["cpu"], cpu_problem(d["cpu"])),
        "devices": _check_devices(d["devices"], devices),
    }
