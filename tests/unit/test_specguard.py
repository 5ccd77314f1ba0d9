"""The machine spec recorded in snapshot.json goes into QEMU's argv: only what this forkd writes is accepted."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forkd.engine import accel as accel_mod
from forkd.engine import specguard
from forkd.engine.qemu import MachineSpec, QemuBinary, default_devices
from forkd.engine.snapshot import META_NAME, SnapshotMeta, SnapshotStore, make_spec, validate_machine
from forkd.errors import SnapshotInvalidError, ValidationError

Edit = Callable[[dict[str, Any]], None]


def _set(key: str, value: object) -> Edit:
    return lambda d: d.__setitem__(key, value)


# (edit of the recorded spec, the field the refusal must name)
HOSTILE: dict[str, tuple[Edit, str]] = {
    "extra_device": (lambda d: d["devices"].append("e1000e"), "spec.devices"),
    "device_option": (lambda d: d["devices"].__setitem__(0, d["devices"][0] + ",ioeventfd=off"), "spec.devices"),
    "devices_reordered": (lambda d: d["devices"].reverse(), "spec.devices"),
    "devices_string": (_set("devices", "virtio-serial-device"), "spec.devices"),
    "machine_pc": (_set("machine", "pc"), "spec.machine"),
    "machine_option": (_set("machine", "microvm,smm=on"), "spec.machine"),
    "machine_opts_extra": (_set("machine_opts", "x-option-roms=off,mem-merge=off,pic=on"), "spec.machine_opts"),
    "machine_opts_merge_on": (_set("machine_opts", "x-option-roms=off,mem-merge=on"), "spec.machine_opts"),
    "cpu_property": (_set("cpu", "max,kernel-irqchip=off"), "spec.cpu"),
    "cpu_flag_then_property": (_set("cpu", "max,+vmx,migratable=off"), "spec.cpu"),
    "cpu_empty": (_set("cpu", ""), "spec.cpu"),
    "cpu_space": (_set("cpu", "max -smp 64"), "spec.cpu"),
    "cpu_not_str": (_set("cpu", ["max"]), "spec.cpu"),
    "accel_hvf": (_set("accel", "hvf"), "spec.accel"),
    "accel_option": (_set("accel", "tcg,thread=multi"), "spec.accel"),
    "accel_opts_other": (_set("accel_opts", "thread=multi"), "spec.accel_opts"),
    "accel_opts_extra": (_set("accel_opts", "tb-size=32,thread=multi"), "spec.accel_opts"),
    "tb_size_huge": (_set("accel_opts", "tb-size=100000"), "spec.accel_opts"),
    "tb_size_zero": (_set("accel_opts", "tb-size=0"), "spec.accel_opts"),
    "memory_huge": (_set("memory_mib", 10**9), "spec.memory_mib"),
    "memory_small": (_set("memory_mib", 1), "spec.memory_mib"),
    "memory_float": (_set("memory_mib", 512.0), "spec.memory_mib"),
    "memory_string": (_set("memory_mib", "512"), "spec.memory_mib"),
    "vcpus_string": (_set("vcpus", "2"), "spec.vcpus"),
    "vcpus_bool": (_set("vcpus", True), "spec.vcpus"),
    "vcpus_many": (_set("vcpus", 65), "spec.vcpus"),
    "vcpus_zero": (_set("vcpus", 0), "spec.vcpus"),
    "unknown_field": (_set("append", "init=/bin/sh"), "spec: unknown field"),
    "missing_field": (lambda d: d.pop("devices"), "spec: missing field"),
}


def _spec_json(**kw: Any) -> dict[str, Any]:
    return json.loads(json.dumps(MachineSpec(**kw).to_json()))


@pytest.mark.parametrize("spec", [
    MachineSpec(), MachineSpec(memory_mib=128, vcpus=64), MachineSpec(memory_mib=65536),
    MachineSpec(accel="tcg", accel_opts="tb-size=32", cpu="max"),
    MachineSpec(accel="kvm", accel_opts="", cpu="host"),
    MachineSpec(machine_opts="x-option-roms=off"),  # snapshots made before mem-merge=off
    MachineSpec(machine_opts="x-option-roms=off,mem-merge=off,pit=off"),  # TCG with a known TSC rate
    MachineSpec(cpu="Skylake-Client-v4,-hle,+pcid"),  # a FORKD_TCG_CPU with feature flags
    MachineSpec(cpu="max,+vmx"),
], ids=lambda s: f"{s.machine_opts}|{s.accel}|{s.cpu}|{s.memory_mib}")
def test_what_this_version_writes_is_accepted(spec: MachineSpec) -> None:
    assert MachineSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.check() is spec


def test_make_spec_output_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    monkeypatch.delenv("FORKD_TCG_CPU", raising=False)
    monkeypatch.setattr(accel_mod, "kvm_status", lambda: (True, "test"))
    # every kernel command line make_spec may look at (when it takes one)
    takes_cmdline = "kernel_cmdline" in inspect.signature(make_spec).parameters
    cmdlines = [{}, {"kernel_cmdline": "console=ttyS0 tsc_early_khz=2000000"}] if takes_cmdline else [{}]
    for name, cpu in (("tcg", "max"), ("kvm", "host")):
        for kw in cmdlines:
            spec, _ = make_spec(256, 2, name, **kw)
            assert spec.cpu == cpu
            assert MachineSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_accel_opts_may_be_absent() -> None:
    d = _spec_json()
    del d["accel_opts"]
    assert MachineSpec.from_json(d).accel_opts == ""


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_spec_is_refused(name: str) -> None:
    edit, field = HOSTILE[name]
    d = _spec_json(accel_opts="tb-size=32")
    edit(d)
    with pytest.raises(SnapshotInvalidError, match=rf"^snapshot\.json: {field}") as ei:
        MachineSpec.from_json(d)
    assert "tampered with" in str(ei.value)
    assert len(str(ei.value)) < 1500  # an untrusted value is shown cut


def test_messages_name_the_rule() -> None:
    cases = [
        (_set("devices", [*default_devices(), "e1000e"]), "not a device list this forkd version produces"),
        (_set("memory_mib", 10**9), r"must be in 128\.\.65536; got 1000000000"),
        (_set("vcpus", "2"), r"must be an integer \(JSON number\) in 1\.\.64; got '2'"),
        (_set("machine", "pc"), "must be one of 'microvm'"),
        (_set("cpu", "max,kernel-irqchip=off"), r"optionally followed by ,\+feature"),
        (_set("accel_opts", "tb-size=4096"), r"tb-size must be in 1\.\.1024"),
    ]
    for edit, match in cases:
        d = _spec_json()
        edit(d)
        with pytest.raises(SnapshotInvalidError, match=match):
            MachineSpec.from_json(d)
    with pytest.raises(SnapshotInvalidError, match="spec: must be a JSON object"):
        MachineSpec.from_json(["microvm"])


def test_a_long_value_is_cut_in_the_message() -> None:
    d = _spec_json()
    d["cpu"] = "max," + "x" * 100_000
    with pytest.raises(SnapshotInvalidError) as ei:
        MachineSpec.from_json(d)
    assert len(str(ei.value)) < 1000


def _store_with(tmp_path: Path, tag: str, spec: MachineSpec | None = None) -> SnapshotStore:
    store = SnapshotStore(tmp_path / "snaps")
    staging = store.stage(tag)
    (staging / "vmstate").write_bytes(b"QEVM")
    (staging / "memory.bin").write_bytes(bytes(4096))
    meta = SnapshotMeta(tag=tag, created_at=time.time(), spec=spec or MachineSpec(), qemu={"version": "7.2.22"},
                        accel_reason="", host_cpu="", image={}, guest={}, files={})
    store.publish(staging, meta)
    return store


@pytest.mark.parametrize("name", ["extra_device", "machine_pc", "machine_opts_extra", "cpu_property",
                                  "memory_huge", "vcpus_string"])
def test_a_tampered_snapshot_directory_is_refused_at_open(tmp_path: Path, name: str) -> None:
    store = _store_with(tmp_path, "snap")
    meta_path = store.path("snap") / META_NAME
    d = json.loads(meta_path.read_text())
    edit, field = HOSTILE[name]
    edit(d["machine"])
    meta_path.write_text(json.dumps(d))
    with pytest.raises(SnapshotInvalidError, match=rf"^snapshot snap: snapshot\.json: {field}"):
        store.open("snap")
    [(tag, snap, err)] = store.list()
    assert (tag, snap) == ("snap", None) and err is not None and field in err


def test_check_restorable_rechecks_the_spec(tmp_path: Path) -> None:
    """A spec that never went through from_json (built in code) is still checked before a restore."""
    store = _store_with(tmp_path, "snap")
    snap = store.open("snap")
    qemu = QemuBinary("/usr/bin/qemu-system-x86_64", "7.2.22", "")
    snap.check_restorable(qemu, "tcg", "")
    snap.meta.spec = MachineSpec(devices=(*default_devices(), "e1000e"))
    with pytest.raises(SnapshotInvalidError, match=r"^snapshot snap: snapshot\.json: spec\.devices"):
        snap.check_restorable(qemu, "tcg", "")


def test_tcg_cpu_override_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "kvm_status", lambda: (False, "no vmx"))
    monkeypatch.setenv("FORKD_TCG_CPU", "Skylake-Client,-hle")
    assert accel_mod.choose_accel("tcg").cpu_model == "Skylake-Client,-hle"
    monkeypatch.setenv("FORKD_TCG_CPU", "max,kernel-irqchip=off")
    with pytest.raises(ValidationError, match="FORKD_TCG_CPU must be a QEMU CPU model"):
        accel_mod.choose_accel("tcg")
    monkeypatch.setattr(accel_mod, "kvm_status", lambda: (True, "vmx"))
    assert accel_mod.choose_accel("auto").cpu_model == "host"  # not used under KVM: no error


def test_limits_are_shared() -> None:
    from forkd.daemon.models import CreateSnapshotRequest

    for bad in (True, specguard.MIN_MEMORY_MIB - 1, specguard.MAX_MEMORY_MIB + 1):
        with pytest.raises(ValidationError, match="memory_mib"):
            validate_machine(bad, 1)
    for bad in (True, 0, specguard.MAX_VCPUS + 1):
        with pytest.raises(ValidationError, match="vcpus"):
            validate_machine(512, bad)
    schema = CreateSnapshotRequest.model_json_schema()["properties"]
    assert (schema["memory_mib"]["minimum"], schema["memory_mib"]["maximum"]) == (
        specguard.MIN_MEMORY_MIB, specguard.MAX_MEMORY_MIB)
    assert schema["vcpus"]["maximum"] == specguard.MAX_VCPUS
